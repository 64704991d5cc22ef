//! After its first snapshot a subscriber that asked for deltas is pushed only what changed, and
//! what it reconstructs is, after every push, the service's datum as it stood after some prefix
//! of the changes made — through slow reading, reconnects, and a client that never asked for
//! deltas (which keeps getting full snapshots). The bytes pushed per change are printed.

use std::collections::BTreeMap;
use std::time::Duration;

use roster_client::{Client, PublisherView};
use roster_common::proto::{CAPABILITY_DELTA, Push};
use roster_tests::{Cluster, DEADLINE, PublisherKey, RawClient, Replica};

/// The service's datum after each change the test made, in order.
struct Prefixes {
    states: Vec<BTreeMap<PublisherKey, Vec<u8>>>,
}

impl Prefixes {
    fn of(replica: &Replica) -> BTreeMap<PublisherKey, Vec<u8>> {
        replica
            .publishers
            .iter()
            .map(|(k, p)| (k.clone(), p.data.concat()))
            .collect()
    }

    /// The index of the latest prefix state the replica equals, at or after `from`.
    fn position(&self, replica: &Replica, from: usize) -> Option<usize> {
        let state = Self::of(replica);
        (from..self.states.len())
            .rev()
            .find(|i| self.states[*i] == state)
    }
}

/// A reader that checks every push it gets against the prefixes.
struct Checked {
    raw: RawClient,
    replica: Replica,
    at: usize,
    bytes: usize,
    delta_bytes: usize,
}

impl Checked {
    async fn connect(cluster: &Cluster, name: &str, deltas: bool) -> Checked {
        let raw = RawClient::connect(cluster, cluster.session_addrs[0], None).await;
        let caps: &[&str] = if deltas { &[CAPABILITY_DELTA] } else { &[] };
        let granted = raw.hello(name, caps).await;
        assert_eq!(granted.len(), caps.len());
        raw.subscribe("s", "churn").await;
        Checked {
            raw,
            replica: Replica::default(),
            at: 0,
            bytes: 0,
            delta_bytes: 0,
        }
    }

    /// Reads every push already due (waiting `linger` for more), checking each.
    async fn drain(&mut self, prefixes: &Prefixes, linger: Duration) {
        while let Some(push) = self.raw.next_push(linger).await {
            let size = roster_common::frame::encode(&push, u32::MAX).unwrap().len();
            self.bytes += size;
            if matches!(push, Push::Delta(_)) {
                self.delta_bytes += size;
            }
            self.replica
                .apply(push)
                .expect("every push applies to what the reader holds");
            self.at = prefixes.position(&self.replica, self.at).unwrap_or_else(|| {
                panic!(
                    "after the push to version {:?} the reader holds a state the service never had",
                    self.replica.version
                )
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_reconstruct_the_datum_from_deltas_and_old_clients_get_snapshots() {
    let cluster = Cluster::start().await;
    let publisher = Client::connect(cluster.client_config()).await.unwrap();
    let mut prefixes = Prefixes {
        states: vec![BTreeMap::new()],
    };
    let mut live: BTreeMap<String, roster_client::Publication> = BTreeMap::new();
    let mut state: BTreeMap<PublisherKey, Vec<u8>> = BTreeMap::new();
    let client_id = publisher.client_id().to_owned();

    // Publishes instance `id` with `data`, under `id` as its register id.
    let add = |id: String, data: String| {
        let publisher = publisher.clone();
        async move {
            let p = publisher
                .publisher("churn")
                .register_id(&id)
                .publish(vec![data.into()])
                .await
                .unwrap();
            (id, p)
        }
    };

    // A service of 50 publishers before anyone subscribes.
    for i in 0..50 {
        let data = format!("10.0.0.{i}:80");
        let (id, p) = add(format!("i{i:02}"), data.clone()).await;
        live.insert(id.clone(), p);
        state.insert((client_id.clone(), id), data.into_bytes());
        prefixes.states.push(state.clone());
    }

    let mut steady = Checked::connect(&cluster, "steady", true).await;
    let mut slow = Checked::connect(&cluster, "slow", true).await;
    let mut old = Checked::connect(&cluster, "old", false).await;
    let mut returning = Checked::connect(&cluster, "returning", true).await;
    for reader in [&mut steady, &mut slow, &mut old, &mut returning] {
        reader.drain(&prefixes, Duration::from_millis(200)).await;
        assert_eq!(
            reader.at,
            prefixes.states.len() - 1,
            "each starts from the whole datum"
        );
    }

    // 120 changes: updates, removals and additions in turn.
    for k in 0..120usize {
        let id = format!("i{:02}", k % 60);
        match (k % 3, live.contains_key(&id)) {
            (0, true) => {
                live.remove(&id).unwrap().unpublish().await.unwrap();
                state.remove(&(client_id.clone(), id));
            }
            (_, true) => {
                let data = format!("10.1.{k}.1:80");
                live.get_mut(&id)
                    .unwrap()
                    .update(vec![data.clone().into()])
                    .await
                    .unwrap();
                state.insert((client_id.clone(), id), data.into_bytes());
            }
            (_, false) => {
                let data = format!("10.2.{k}.1:80");
                let (id, p) = add(id, data.clone()).await;
                live.insert(id.clone(), p);
                state.insert((client_id.clone(), id), data.into_bytes());
            }
        }
        prefixes.states.push(state.clone());
        // The steady reader reads as it goes; the slow one only every 40 changes; the returning
        // one reconnects halfway (a new connection: a snapshot, then deltas again).
        steady.drain(&prefixes, Duration::from_millis(1)).await;
        old.drain(&prefixes, Duration::from_millis(1)).await;
        if k % 40 == 39 {
            slow.drain(&prefixes, Duration::from_millis(1)).await;
        }
        if k == 60 {
            returning = Checked::connect(&cluster, "returning", true).await;
        } else {
            returning.drain(&prefixes, Duration::from_millis(1)).await;
        }
    }
    let last = prefixes.states.len() - 1;
    for reader in [&mut steady, &mut slow, &mut old, &mut returning] {
        let deadline = std::time::Instant::now() + DEADLINE;
        while reader.at != last {
            assert!(
                std::time::Instant::now() < deadline,
                "a reader never converged"
            );
            reader.drain(&prefixes, Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        steady.replica.snapshots, 1,
        "one snapshot, then only deltas"
    );
    assert!(steady.replica.deltas > 0);
    assert_eq!(
        returning.replica.snapshots, 1,
        "a new connection starts from a snapshot"
    );
    assert_eq!(
        old.replica.deltas, 0,
        "a client that did not ask gets no deltas"
    );
    assert!(old.replica.snapshots > 1);

    let changes = 120;
    let one = rmp_size(&PublisherView {
        health: None,
        persistent: false,
        client_id: client_id.clone(),
        register_id: "i00".into(),
        data: vec!["10.1.100.1:80".into()],
        attributes: Default::default(),
        client_version: 2,
    });
    println!(
        "push bytes per change: deltas {:.0} (one changed publisher encodes to {one} bytes), full snapshots {:.0}",
        (steady.delta_bytes as f64) / changes as f64,
        (old.bytes as f64) / changes as f64,
    );
    // Deltas cost what changed: at most twice the changed publisher.
    assert!(
        steady.delta_bytes <= 2 * one * changes,
        "{} bytes of deltas for {changes} changes of {one}-byte publishers",
        steady.delta_bytes
    );
    drop(live);
    publisher.close().await;
    cluster.stop().await;
}

fn rmp_size(view: &PublisherView) -> usize {
    roster_common::push::encode_publisher(view).len()
}
