//! Partitions made through the fault tables of the servers' peer pools, while clients publish,
//! unpublish and subscribe through two session servers; then each cut is healed.
//!
//! - A data server cut off from its peers (the meta node and the other data server): the meta
//!   tier expires it and its slots move to the other one; after healing it joins again and takes
//!   its share back.
//! - A session server cut off from one data server (which the rest of the cluster still reaches):
//!   its writes to that server's slots are acknowledged not durable and retried, its subscribers
//!   hear nothing of that server's services; after healing its writes land and its subscribers
//!   catch up.
//!
//! Every subscriber must end with exactly the live publishers (no acknowledged publish lost, no
//! departed one left behind), and over everything recorded, versions only grow and no publisher
//! live throughout ever goes missing from a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use parking_lot::Mutex;
use roster_client::{Client, ClientConfig, Publication, Snapshot};
use roster_common::peers::FaultTable;
use roster_common::proto::Role;
use roster_tests::{Cluster, ClusterOptions, PublisherKey, check_history, eventually, keys};

const SERVICES: usize = 4;
/// Publishers live from start to end.
const STAYERS: usize = 6;
/// Publishers that leave, one at each step of the fault.
const LEAVERS: usize = 3;
/// The cut-off server's lease must lapse (3 s), its slots move, and after healing the rebalance
/// (5 s after it joins) must hand it slots back: generous bounds on a loaded machine.
const WITHIN: Duration = Duration::from_secs(45);

fn service(i: usize) -> String {
    format!("cut/svc/s{i}")
}

/// Every snapshot each (subscriber, service) was pushed.
type Record = Arc<Mutex<BTreeMap<(usize, String), Vec<Snapshot>>>>;

struct Publishers {
    configs: [ClientConfig; 2],
    live: Vec<(usize, Client, Publication)>,
    joined: usize,
    durable: usize,
}

impl Publishers {
    /// A new client, on the sessions in turn, publishes one instance.
    async fn join(&mut self) {
        let n = self.joined;
        self.joined += 1;
        let client = Client::connect(self.configs[n % 2].clone()).await.unwrap();
        let publication = client
            .publish(service(n % SERVICES), vec![format!("10.0.0.{n}:80").into()])
            .await
            .unwrap();
        self.durable += usize::from(publication.is_durable());
        self.live.push((n, client, publication));
    }

    /// The oldest leaver still live unpublishes and goes.
    async fn leave(&mut self) {
        let at = self
            .live
            .iter()
            .position(|(n, _, _)| *n < LEAVERS)
            .expect("a leaver is left");
        let (_, client, publication) = self.live.remove(at);
        publication.unpublish().await.unwrap();
        client.close().await;
    }

    fn expected(&self, only_stayers: bool) -> BTreeMap<String, BTreeSet<PublisherKey>> {
        let mut out: BTreeMap<String, BTreeSet<PublisherKey>> = (0..SERVICES)
            .map(|i| (service(i), BTreeSet::new()))
            .collect();
        for (n, client, p) in &self.live {
            if only_stayers && !(LEAVERS..LEAVERS + STAYERS).contains(n) {
                continue;
            }
            out.get_mut(p.service().as_str())
                .unwrap()
                .insert((client.client_id().to_owned(), p.register_id().to_owned()));
        }
        out
    }
}

/// Waits until every subscriber's latest snapshot of every service holds exactly the live
/// publishers; returns how long that took.
async fn converge(
    what: &str,
    record: &Record,
    publishers: &Publishers,
    subscribers: usize,
) -> Duration {
    let expected = publishers.expected(false);
    let start = Instant::now();
    eventually(
        WITHIN,
        &format!("every subscriber exact {what}"),
        || async {
            let record = record.lock();
            let exact = (0..subscribers).all(|s| {
                expected.iter().all(|(svc, want)| {
                    record
                        .get(&(s, svc.clone()))
                        .and_then(|snapshots| snapshots.last())
                        .is_some_and(|last| keys(last) == *want)
                })
            });
            exact.then_some(())
        },
    )
    .await;
    start.elapsed()
}

/// Subscribers on both sessions recording every snapshot of every service, and the publishers,
/// all in place (`LEAVERS + STAYERS` publishers, both data servers leading slots, every subscriber
/// exact).
async fn set_up(cluster: &Cluster) -> (Record, Vec<Client>, Publishers) {
    let config = |i: usize| {
        let mut config = cluster.client_config();
        config.sessions = vec![cluster.session_addrs[i].to_string()];
        config
    };
    let record = Record::default();
    let mut subscribers = Vec::new();
    for s in 0..2 {
        let client = Client::connect(config(s)).await.unwrap();
        for i in 0..SERVICES {
            let mut stream = client.subscribe(service(i)).await.unwrap();
            let (record, key) = (record.clone(), (s, service(i)));
            tokio::spawn(async move {
                while let Some(snapshot) = stream.next().await {
                    record.lock().entry(key.clone()).or_default().push(snapshot);
                }
            });
        }
        subscribers.push(client);
    }
    let mut publishers = Publishers {
        configs: [config(0), config(1)],
        live: Vec::new(),
        joined: 0,
        durable: 0,
    };
    for _ in 0..LEAVERS + STAYERS {
        publishers.join().await;
    }
    // Data 2 joined second: the rebalance hands it its share of the slots.
    eventually(WITHIN, "both data servers leading slots", || async {
        let view = cluster.view().await;
        (view.table.led_by(1).count() > 0 && view.table.led_by(2).count() > 0).then_some(())
    })
    .await;
    converge("at the start", &record, &publishers, 2).await;
    (record, subscribers, publishers)
}

/// Over everything recorded: versions only grow, and from the first snapshot holding them all,
/// no publisher live throughout is ever missing. Then everyone leaves.
async fn check_and_close(
    cluster: Cluster,
    record: Record,
    subscribers: Vec<Client>,
    mut publishers: Publishers,
) {
    let stayers = publishers.expected(true);
    let mut checked = 0;
    for ((s, svc), snapshots) in record.lock().iter() {
        let stable = &stayers[svc];
        let from = snapshots
            .iter()
            .position(|snap| stable.is_subset(&keys(snap)))
            .unwrap_or_else(|| panic!("subscriber {s} never saw every stayer of {svc}"));
        if let Err(e) = check_history(&snapshots[from..], stable) {
            panic!("subscriber {s}: {e}");
        }
        // Versions only grow over the whole record, the first snapshots included.
        if let Err(e) = check_history(snapshots, &BTreeSet::new()) {
            panic!("subscriber {s}: {e}");
        }
        checked += snapshots.len();
    }
    println!(
        "{checked} snapshots checked; {} of {} publishes acknowledged durable",
        publishers.durable, publishers.joined
    );
    for (_, client, publication) in publishers.live.drain(..) {
        drop(publication);
        client.close().await;
    }
    for client in subscribers {
        client.close().await;
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_server_cut_off_from_its_peers_heals_without_losing_a_publisher() {
    let faults = [FaultTable::new(), FaultTable::new()];
    let cluster = Cluster::start_with(ClusterOptions {
        datas: 2,
        sessions: 2,
        data_faults: faults.to_vec(),
        ..Default::default()
    })
    .await;
    let (record, subscribers, mut publishers) = set_up(&cluster).await;
    // Cut data 2 off from the meta node and from data 1, both ways between the data servers.
    let (meta, data1, data2) = (
        cluster.meta_addr.to_string(),
        cluster.data_addrs[0].to_string(),
        cluster.data_addrs[1].to_string(),
    );
    let cut = Instant::now();
    faults[1].drop_calls(&meta);
    faults[1].drop_calls(&data1);
    faults[0].drop_calls(&data2);
    publishers.leave().await;
    publishers.join().await;
    let view = eventually(WITHIN, "data 2 expired and its slots moved", || async {
        let view = cluster.view().await;
        (view.member(Role::Data, 2).is_none() && view.table.led_by(2).count() == 0).then_some(view)
    })
    .await;
    assert!(view.table.led_by(1).count() > 0);
    let expired = cut.elapsed();
    publishers.leave().await;
    publishers.join().await;
    let took = converge("while data 2 is cut off", &record, &publishers, 2).await;
    println!(
        "cut: data 2 expired {expired:?} after the cut; every subscriber exact {took:?} later"
    );

    // Heal: data 2 joins again and takes slots back.
    for table in &faults {
        table.heal_all();
    }
    let healed = Instant::now();
    eventually(WITHIN, "data 2 back, leading slots", || async {
        let view = cluster.view().await;
        (view.member(Role::Data, 2).is_some() && view.table.led_by(2).count() > 0).then_some(())
    })
    .await;
    let back = healed.elapsed();
    publishers.leave().await;
    publishers.join().await;
    let took = converge("after healing", &record, &publishers, 2).await;
    println!(
        "healed: data 2 leads slots again {back:?} after healing; every subscriber exact {took:?} later"
    );

    assert!(
        publishers.durable > 0,
        "publishes were acknowledged durable"
    );
    check_and_close(cluster, record, subscribers, publishers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_cut_off_from_a_data_server_catches_up_without_losing_a_publisher() {
    let faults = [FaultTable::new(), FaultTable::new()];
    let cluster = Cluster::start_with(ClusterOptions {
        datas: 2,
        sessions: 2,
        session_faults: faults.to_vec(),
        ..Default::default()
    })
    .await;
    let (record, subscribers, mut publishers) = set_up(&cluster).await;

    // Cut session 1 off from data 1; everyone else still reaches everyone.
    let data1 = cluster.data_addrs[0].to_string();
    faults[0].drop_calls(&data1);
    let mut ready = cluster.session_ready[0].clone();
    tokio::time::timeout(WITHIN, ready.wait_for(|r| !*r))
        .await
        .expect("session 1 sees its link to data 1 down")
        .unwrap();
    // Changes through both sessions to every service while the cut lasts: through session 1,
    // those of data 1's slots are acknowledged not durable and held.
    let durable_before = publishers.durable;
    for _ in 0..2 * SERVICES {
        publishers.join().await;
    }
    publishers.leave().await;
    publishers.leave().await;
    let joined_during = 2 * SERVICES;
    assert!(
        publishers.durable - durable_before < joined_during,
        "some publishes through session 1 were held (not durable) while it could not reach data 1"
    );
    assert!(cluster.view().await.member(Role::Session, 1).is_some());

    // Heal: the held writes land, the link comes back, and session 1's subscribers catch up.
    faults[0].heal_all();
    let healed = Instant::now();
    tokio::time::timeout(WITHIN, ready.wait_for(|r| *r))
        .await
        .expect("session 1 ready again")
        .unwrap();
    let back = healed.elapsed();
    let took = converge("after healing", &record, &publishers, 2).await;
    println!(
        "healed: session 1 ready {back:?} after healing; every subscriber exact {took:?} later"
    );
    check_and_close(cluster, record, subscribers, publishers).await;
}
