//! Session servers dying and draining under client load, with real processes: a session server
//! killed with SIGKILL, then one stopped with SIGTERM. Their clients must be connected elsewhere
//! within 2 s, and no subscriber anywhere may see any publisher disappear, even for one snapshot.
//! The cluster checks tokens, as one created by `roster meta --bootstrap` does by default.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use roster_client::{Client, ClientConfig, ConnectionState, Publication, Snapshot};
use roster_tests::{PublisherKey, check_history, keys};
use support::{Proc, cluster_status, create_token, free_udp_addr, roster, run, wait_for};

const START: Duration = Duration::from_secs(60);
const SERVICES: usize = 10;
const PUBLISHER_CLIENTS: usize = 40;
const PER_CLIENT: usize = 25;
const SUBSCRIBER_CLIENTS: usize = 6;

struct Sessions {
    procs: Vec<Option<Proc>>,
    addrs: Vec<String>,
    /// HTTP admin addresses.
    https: Vec<String>,
}

/// Starts the cluster; returns its meta and data servers, the sessions, the meta address, a
/// token that may publish and subscribe in the test's namespace, and the data server's HTTP
/// address.
fn start(cwd: &Path) -> (Proc, Proc, Sessions, String, String, String) {
    let (ok, _, err) = run(cwd, &["certs", "--dir", "tls"]);
    assert!(ok, "{err}");
    let meta = free_udp_addr();
    let voters = format!("1={meta}");
    let meta_proc = roster(
        "meta",
        cwd,
        &[
            "meta",
            "--id",
            "1",
            "--listen",
            &meta,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            "meta-1",
            "--tls-dir",
            "tls",
            "--bootstrap",
            &voters,
        ],
    );
    meta_proc.line_matching(START, "its listen line", |l| l.contains("listening:"));
    // A short session grace: the moved publishers must survive their old session's removal, and
    // the test need not wait long to see it.
    let data = roster(
        "data",
        cwd,
        &[
            "data",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--meta",
            &meta,
            "--tls-dir",
            "tls",
            "--session-grace-ms",
            "500",
        ],
    );
    let line = data.line_matching(START, "its listen line", |l| l.contains("listening:"));
    let data_http = line.split("http=").nth(1).unwrap().trim().to_owned();
    let mut sessions = Sessions {
        procs: Vec::new(),
        addrs: Vec::new(),
        https: Vec::new(),
    };
    for id in 1..=3 {
        let proc = roster(
            &format!("session {id}"),
            cwd,
            &[
                "session",
                "--id",
                &id.to_string(),
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--meta",
                &meta,
                "--tls-dir",
                "tls",
                "--drain-timeout-ms",
                "5000",
            ],
        );
        let line = proc.line_matching(START, "its listen line", |l| l.contains("listening:"));
        sessions.addrs.push(
            line.split("quic=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned(),
        );
        sessions
            .https
            .push(line.split("http=").nth(1).unwrap().trim().to_owned());
        sessions.procs.push(Some(proc));
    }
    wait_for(START, "three sessions registered", || {
        let status = cluster_status(cwd, &[&meta], false)?;
        let leases = status["leases"].as_array()?;
        (leases.iter().filter(|l| l["role"] == "session").count() == 3
            && leases.iter().any(|l| l["role"] == "data"))
        .then_some(())
    });
    let token = create_token(cwd, &meta, "moving", "publish,subscribe", &[]);
    (meta_proc, data, sessions, meta, token, data_http)
}

/// Waits until the meta tier no longer lists session `id`.
fn wait_session_gone(cwd: &Path, meta: &str, id: u64) {
    wait_for(START, &format!("session {id} removed"), || {
        let status = cluster_status(cwd, &[meta], false)?;
        let leases = status["leases"].as_array()?;
        (!leases
            .iter()
            .any(|l| l["role"] == "session" && l["id"] == id))
        .then_some(())
    });
}

type Seen = Arc<Mutex<HashMap<(usize, String), Vec<Snapshot>>>>;

#[test]
fn killed_and_drained_session_servers_lose_no_publisher() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (_meta, _data, mut sessions, meta, token, data_http) = start(cwd);
    // The cluster checks tokens: /admin wants the admin token `roster meta --bootstrap` wrote.
    let admin = std::fs::read_to_string(cwd.join("meta-1/admin.token")).unwrap();
    let admin = admin.trim().to_owned();
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
        let mut c = ClientConfig::new(sessions.addrs.clone(), cwd.join("tls/ca.pem"));
        c.refuse_empty = false;
        c.token = Some(token.as_str().into());
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
        let victim_http = &sessions.https[victim as usize - 1];
        let instance =
            admin_json(victim_http, "/admin/server").expect("the victim's status")["instance"]
                .as_str()
                .unwrap()
                .to_owned();
        let hit = Instant::now();
        let mut proc = sessions.procs[victim as usize - 1].take().unwrap();
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
        wait_session_gone(cwd, &meta, victim);
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
