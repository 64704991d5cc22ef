//! Session servers dying and draining under client load, with real processes: a session server
//! killed with SIGKILL, then one stopped with SIGTERM. Their clients must be connected elsewhere
//! within 2 s, and no subscriber anywhere may see any publisher disappear, even for one snapshot.
//! The cluster checks tokens.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use roster_client::{Client, ConnectionState, Publication, Snapshot};
use roster_tests::{PublisherKey, check_history, keys};
use support::{Cluster, wait_for};

const START: Duration = Duration::from_secs(60);
const SERVICES: usize = 10;
const PUBLISHER_CLIENTS: usize = 40;
const PER_CLIENT: usize = 25;
const SUBSCRIBER_CLIENTS: usize = 6;

type Seen = Arc<Mutex<HashMap<(usize, String), Vec<Snapshot>>>>;

#[test]
fn killed_and_drained_session_servers_lose_no_publisher() {
    // A short session grace: the moved publishers must survive their old session's removal, and
    // the test need not wait long to see it.
    let mut cluster = Cluster::builder()
        .auth(true)
        .sessions(3)
        .data_args(&["--session-grace-ms", "500"])
        .session_args(&["--drain-timeout-ms", "5000"])
        .start();
    cluster.wait_members(1, 3);
    let token = cluster.create_token("moving", "publish,subscribe", &[]);
    let data_http = cluster.http("data", 1);
    // The cluster checks tokens: /admin wants the admin token.
    let admin = cluster.admin_token.clone().unwrap();
    let admin_json = |http: &str, path: &str| -> Option<serde_json::Value> {
        let (status, body) = support::http_get_with(&format!("{http}{path}"), Some(&admin))?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = || {
        let mut c = cluster.client_config(Some(&token));
        c.refuse_empty = false;
        c
    };
    let service = |i: usize| format!("moving/svc/{i}");

    // Publishers and subscribers, spread over the three sessions at random.
    let (publishers, publications, expected, subscriptions, seen) = runtime.block_on(async {
        let mut publishers = Vec::new();
        let mut publications: Vec<Publication> = Vec::new();
        let mut expected: HashMap<String, BTreeSet<PublisherKey>> = HashMap::new();
        for c in 0..PUBLISHER_CLIENTS {
            let client = Client::connect(config()).await.unwrap();
            for j in 0..PER_CLIENT {
                let svc = service((c + j) % SERVICES);
                let p = client
                    .publish(&svc, vec![format!("10.0.{c}.{j}:80").into()])
                    .await
                    .unwrap();
                expected
                    .entry(p.service().as_str().to_owned())
                    .or_default()
                    .insert((client.client_id().to_owned(), p.register_id().to_owned()));
                publications.push(p);
            }
            publishers.push(client);
        }
        let seen: Seen = Arc::default();
        let mut subscriptions = Vec::new();
        for s in 0..SUBSCRIBER_CLIENTS {
            let client = Client::connect(config()).await.unwrap();
            for i in 0..SERVICES {
                let mut stream = client.subscribe(service(i)).await.unwrap();
                let (seen, key) = (seen.clone(), (s, service(i)));
                tokio::spawn(async move {
                    while let Some(snapshot) = stream.next().await {
                        seen.lock()
                            .unwrap()
                            .entry(key.clone())
                            .or_default()
                            .push(snapshot);
                    }
                });
                subscriptions.push((service(i), client.subscribe(service(i)).await.unwrap()));
            }
            publishers.push(client);
        }
        (publishers, publications, expected, subscriptions, seen)
    });
    let exact = || {
        subscriptions
            .iter()
            .all(|(svc, sub)| sub.current().map(|s| keys(&s)).as_ref() == expected.get(svc))
    };
    wait_for(START, "every subscriber exact", || exact().then_some(()));
    let check = |what: &str| {
        let seen = seen.lock().unwrap();
        for ((_, svc), snapshots) in seen.iter() {
            // Only snapshots from after the start: the first ones filled up while publishing.
            let start = snapshots
                .iter()
                .position(|s| keys(s) == expected[svc])
                .unwrap_or(snapshots.len());
            if let Err(e) = check_history(&snapshots[start..], &expected[svc]) {
                panic!("{what}: {e}");
            }
        }
    };

    for (round, signal) in [(1u64, "KILL"), (2, "TERM")] {
        let victim = round;
        let moving: Vec<&Client> = publishers
            .iter()
            .filter(|c| c.session_id() == Some(victim))
            .collect();
        let mut states: Vec<_> = moving.iter().map(|c| c.connection_state()).collect();
        let victim_http = &cluster.http("session", victim);
        let instance =
            admin_json(victim_http, "/admin/server").expect("the victim's status")["instance"]
                .as_str()
                .unwrap()
                .to_owned();
        let hit = Instant::now();
        let mut proc = cluster.take("session", victim);
        proc.signal(signal);
        // Every client of the victim is connected to another session server.
        let moved = runtime.block_on(async {
            let mut slowest = Duration::ZERO;
            for state in &mut states {
                tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| matches!(s, ConnectionState::Connected { session_id, .. } if *session_id != victim)))
                    .await
                    .expect("a client moved in time")
                    .expect("the client is running");
                slowest = slowest.max(hit.elapsed());
            }
            slowest
        });
        println!(
            "{signal}: {} clients of session {victim} connected elsewhere within {moved:?}",
            moving.len()
        );
        assert!(!moving.is_empty(), "session {victim} had clients");
        assert!(
            moved < Duration::from_secs(2),
            "{signal}: clients moved after {moved:?}"
        );
        if signal == "TERM" {
            assert!(
                proc.wait_exit(Duration::from_secs(10)),
                "session {victim} exits 0 after draining"
            );
        }
        // The old session is removed, and the data tier holds nothing of it any more: every
        // publisher moved to another session (had any stayed, its grace would drop it, and the
        // subscribers would no longer be exact).
        cluster.wait_session_gone(victim);
        wait_for(
            Duration::from_secs(10),
            "the data tier to hold nothing of the old session",
            || {
                let owners = admin_json(&data_http, "/admin/owners")?;
                (!owners.as_object()?.contains_key(&instance)).then_some(())
            },
        );
        wait_for(Duration::from_secs(10), "every subscriber exact", || {
            exact().then_some(())
        });
        check(signal);
    }
    drop(publications);
    drop(subscriptions);
    drop(publishers);
}
