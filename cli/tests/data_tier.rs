//! The data tier under faults, with real processes: 3 data servers (replicas = 3), 2 session
//! servers, publishers from many client connections and subscribers on every service. Data
//! servers are killed with SIGKILL, one added under churn, and all killed and restarted empty;
//! every subscriber must converge to exactly the live set, never see a version go back, and never
//! see a publisher that stayed live go missing.
//!
//! Scale: `ROSTER_TEST_PUBLISHERS` (default 100,000) publishers from `ROSTER_TEST_CONNECTIONS`
//! (default 200) connections, spread over 100 services.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use roster_client::{Client, ClientConfig, Publication, Snapshot};
use roster_tests::{PublisherKey, check_history, keys};
use support::{Cluster, wait_explained, wait_for};

const START: Duration = Duration::from_secs(60);
const SERVICES: usize = 100;
const SUBSCRIBERS: usize = 4;

fn scale(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The processes of one deployment: 1 meta node, `datas` data servers and 2 sessions.
struct Deployment {
    cluster: Cluster,
}

impl Deployment {
    fn start(datas: usize) -> Self {
        let cluster = Cluster::builder()
            .datas(datas)
            .sessions(2)
            .meta_args(&["--rebalance-delay-ms", "1000"])
            .start();
        let deployment = Deployment { cluster };
        deployment.wait_members(datas);
        deployment
    }

    fn status(&self) -> Option<serde_json::Value> {
        self.cluster.status()
    }

    /// Waits until the meta tier lists `datas` data servers and both sessions.
    fn wait_members(&self, datas: usize) -> serde_json::Value {
        self.cluster.wait_members(datas, 2)
    }

    fn epoch(&self) -> u64 {
        self.status()
            .and_then(|s| s["table_epoch"].as_u64())
            .unwrap_or(0)
    }

    fn kill_data(&mut self, id: u64) {
        self.cluster.kill("data", id);
    }

    /// Starts data server `id` again, empty, or a new one.
    fn restart_data(&mut self, id: u64) {
        if self.cluster.of("data").any(|s| s.id == id) {
            self.cluster.restart("data", id);
        } else {
            assert_eq!(self.cluster.add("data", &[]), id);
        }
    }

    /// The committed slot table.
    fn table(&self) -> roster_common::proto::SlotTable {
        match support::meta_call(
            &self.cluster.cwd().join("tls"),
            &self.cluster.meta_list(),
            &roster_common::proto::MetaRequest::GetView { stale: true },
        ) {
            Ok(roster_common::proto::MetaResponse::View { view, .. }) => view.table,
            other => panic!("no view: {other:?}"),
        }
    }

    /// Waits for a committed table that satisfies `pred`.
    fn wait_table(
        &self,
        what: &str,
        pred: impl Fn(&roster_common::proto::SlotTable) -> bool,
    ) -> roster_common::proto::SlotTable {
        wait_for(START, what, || Some(self.table()).filter(|t| pred(t)))
    }

    /// Waits for a table newer than `epoch`.
    fn wait_epoch_after(&self, epoch: u64) -> u64 {
        wait_for(START, "a new slot table", || {
            Some(self.epoch()).filter(|e| *e > epoch)
        })
    }

    fn client_config(&self, session: usize) -> ClientConfig {
        ClientConfig::new(
            vec![self.cluster.session_addrs()[session % 2].clone()],
            self.cluster.ca(),
        )
    }
}

/// Publishers, subscribers and what they saw.
struct Load {
    clients: Vec<Client>,
    /// Live publications with their client's id.
    publications: Vec<(String, Publication)>,
    /// One subscription handle per (subscriber, service), for reading the current snapshot.
    subscriptions: Vec<(String, roster_client::Subscription)>,
    /// Every snapshot each subscription delivered while recording.
    seen: Arc<Mutex<Seen>>,
    recording: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Snapshots recorded per (subscription index, service).
type Seen = HashMap<(usize, String), Vec<Snapshot>>;

fn service(i: usize) -> String {
    format!("load/svc/{i}")
}

impl Load {
    async fn start(deployment: &Deployment, publishers: usize, connections: usize) -> Load {
        let mut clients = Vec::new();
        for i in 0..connections {
            clients.push(
                Client::connect(deployment.client_config(i))
                    .await
                    .expect("client connects"),
            );
        }
        let per_connection = publishers / connections;
        let mut handles = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            let client = client.clone();
            handles.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for j in 0..per_connection {
                    let svc = service((i * per_connection + j) % SERVICES);
                    let data = format!("10.{}.{}.{}:80", i % 250, j / 250, j % 250);
                    let publication = client
                        .publish(&svc, vec![data.into()])
                        .await
                        .expect("publish");
                    mine.push((client.client_id().to_owned(), publication));
                }
                mine
            }));
        }
        let mut publications = Vec::new();
        for handle in handles {
            publications.extend(handle.await.unwrap());
        }
        let mut load = Load {
            clients,
            publications,
            subscriptions: Vec::new(),
            seen: Arc::default(),
            recording: Arc::default(),
            tasks: Vec::new(),
        };
        for s in 0..SUBSCRIBERS {
            let client = Client::connect(deployment.client_config(s))
                .await
                .expect("subscriber connects");
            for i in 0..SERVICES {
                let index = load.subscriptions.len();
                let mut stream = client.subscribe(service(i)).await.expect("subscribe");
                let (seen, recording, key) = (
                    load.seen.clone(),
                    load.recording.clone(),
                    (index, service(i)),
                );
                load.tasks.push(tokio::spawn(async move {
                    while let Some(snapshot) = stream.next().await {
                        if recording.load(Ordering::Relaxed) {
                            seen.lock()
                                .unwrap()
                                .entry(key.clone())
                                .or_default()
                                .push(snapshot);
                        }
                    }
                }));
                load.subscriptions.push((
                    service(i),
                    client.subscribe(service(i)).await.expect("subscribe"),
                ));
            }
            load.clients.push(client);
        }
        load
    }

    /// The publishers that should be live, per service.
    fn expected(&self) -> HashMap<String, BTreeSet<PublisherKey>> {
        let mut expected: HashMap<String, BTreeSet<PublisherKey>> = (0..SERVICES)
            .map(|i| (service(i), BTreeSet::new()))
            .collect();
        for (client, p) in &self.publications {
            expected
                .entry(p.service().as_str().to_owned())
                .or_default()
                .insert((client.clone(), p.register_id().to_owned()));
        }
        expected
    }

    /// How many subscriptions do not yet hold exactly the live publishers.
    fn unconverged(&self, expected: &HashMap<String, BTreeSet<PublisherKey>>) -> usize {
        self.subscriptions
            .iter()
            .filter(|(svc, sub)| sub.current().map(|s| keys(&s)) != Some(expected[svc].clone()))
            .count()
    }

    /// Waits until every subscription holds exactly the live publishers; returns how long it took.
    fn converge(&self, what: &str, deadline: Duration) -> Duration {
        let expected = self.expected();
        let start = Instant::now();
        wait_explained(deadline, what, || {
            let left = self.unconverged(&expected);
            if left == 0 {
                return Ok(start.elapsed());
            }
            let details: Vec<String> = self
                .subscriptions
                .iter()
                .filter_map(|(svc, sub)| {
                    let current = sub.current();
                    let have = current.as_ref().map(keys).unwrap_or_default();
                    (have != expected[svc]).then(|| {
                        format!(
                            "{svc}: version {:?}, {} held, {} expected, {} missing, {} extra",
                            current.as_ref().map(|c| c.version),
                            have.len(),
                            expected[svc].len(),
                            expected[svc].difference(&have).count(),
                            have.difference(&expected[svc]).count()
                        )
                    })
                })
                .take(5)
                .collect();
            Err(format!("{left} subscriptions not converged: {details:#?}"))
        })
    }

    fn record(&self, on: bool) {
        if on {
            self.seen.lock().unwrap().clear();
        }
        self.recording.store(on, Ordering::Relaxed);
    }

    /// Checks the shared invariant on everything recorded: versions only grow, and no snapshot
    /// lacks a publisher of `stable` (live before and after).
    fn check(&self, stable: &HashMap<String, BTreeSet<PublisherKey>>) -> usize {
        let seen = self.seen.lock().unwrap();
        for ((_, svc), snapshots) in seen.iter() {
            if let Err(e) = check_history(snapshots, &stable[svc]) {
                panic!("invariant broken: {e}");
            }
        }
        seen.values().map(Vec::len).sum()
    }
}

#[test]
fn data_servers_die_join_and_restart_without_losing_a_publisher() {
    let publishers = scale("ROSTER_TEST_PUBLISHERS", 100_000);
    let connections = scale("ROSTER_TEST_CONNECTIONS", 200);
    let mut deployment = Deployment::start(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut load = runtime.block_on(Load::start(&deployment, publishers, connections));
    println!(
        "registered {} publishers from {connections} connections in {:?}",
        load.publications.len(),
        started.elapsed()
    );
    let took = load.converge("initial load", START * 3);
    println!("initial convergence {took:?} after the last publish");
    let probe_client = runtime
        .block_on(Client::connect(deployment.client_config(0)))
        .unwrap();

    // kill -9 a data server, then the one that took over its slot 0.
    for round in 1..=2 {
        let stable = load.expected();
        let victim = deployment.table().leader(0).expect("slot 0 has a leader");
        load.record(true);
        let killed = Instant::now();
        deployment.kill_data(victim);
        deployment.wait_table("the victim gone from the table", |t| {
            t.slots.iter().all(|r| !r.contains(&victim))
        });
        let table_changed = killed.elapsed();
        // Writes work again: one new publisher on each of ten services.
        for i in 0..10 {
            let p = runtime
                .block_on(
                    probe_client.publish(service(i), vec![format!("probe-{round}-{i}").into()]),
                )
                .unwrap();
            load.publications
                .push((probe_client.client_id().to_owned(), p));
        }
        let converged = load.converge(&format!("kill {round}"), Duration::from_secs(30));
        let since_kill = killed.elapsed();
        load.record(false);
        let snapshots = load.check(&stable);
        println!(
            "kill {round} (data {victim}): new table after {table_changed:?}, every subscriber exact {:?} after the kill ({:?} after the new table); {snapshots} snapshots checked",
            since_kill, converged
        );
    }

    // Bring the two back (empty), then add a fourth under churn.
    for id in (1..=3u64)
        .filter(|id| !deployment.cluster.server("data", *id).running())
        .collect::<Vec<_>>()
    {
        deployment.restart_data(id);
    }
    deployment.wait_members(3);
    // Settled: the returning servers have their share of leaderships back.
    let before = deployment.wait_table("a balanced table of three", |t| {
        (1..=3).all(|n| (77..=94).contains(&t.led_by(n).count()))
    });
    load.converge("data servers back", Duration::from_secs(30));
    let stable_before = load.expected();
    load.record(true);
    let churn_stop = Arc::new(AtomicBool::new(false));
    let churned = {
        let stop = churn_stop.clone();
        let client = probe_client.clone();
        runtime.spawn(async move {
            let mut live: Vec<Publication> = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                live.push(
                    client
                        .publish(service(n % SERVICES), vec![format!("churn-{n}").into()])
                        .await
                        .expect("churn publish"),
                );
                if live.len() > 20 {
                    live.remove(0).unpublish().await.expect("churn unpublish");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            live
        })
    };
    deployment.restart_data(4);
    // The joiner follows first; the leader then hands it its share of leaderships.
    deployment.wait_table("data 4 leading", |t| t.led_by(4).count() > 0);
    churn_stop.store(true, Ordering::Relaxed);
    for p in runtime.block_on(churned).unwrap() {
        load.publications
            .push((probe_client.client_id().to_owned(), p));
    }
    let after = deployment.table();
    let moved = (0..before.slot_count)
        .filter(|s| before.leader(*s) != after.leader(*s))
        .count();
    let led_by_4 = after.led_by(4).count();
    println!(
        "scale-out: {moved} of {} slot leaders moved; data 4 leads {led_by_4}",
        before.slot_count
    );
    assert!(
        (40..=90).contains(&led_by_4),
        "about a quarter of the slots: {led_by_4}"
    );
    let converged = load.converge("scale-out", Duration::from_secs(30));
    load.record(false);
    let snapshots = load.check(&stable_before);
    println!(
        "scale-out converged {converged:?} after the rebalance; {snapshots} snapshots checked"
    );

    // All data servers killed and restarted empty: rebuilt from the sessions.
    let stable = load.expected();
    load.record(true);
    let epoch = deployment.epoch();
    for id in 1..=4 {
        deployment.kill_data(id);
    }
    let restarted = Instant::now();
    for id in 1..=4 {
        deployment.restart_data(id);
    }
    deployment.wait_epoch_after(epoch);
    deployment.wait_members(4);
    let probe = runtime
        .block_on(probe_client.publish(service(0), vec!["after-restart".into()]))
        .unwrap();
    load.publications
        .push((probe_client.client_id().to_owned(), probe));
    load.converge("rebuild", Duration::from_secs(30));
    let rebuilt = restarted.elapsed();
    load.record(false);
    let snapshots = load.check(&stable);
    println!(
        "all data servers restarted empty: rebuilt and exact {rebuilt:?} after the restart; {snapshots} snapshots checked"
    );
    assert!(
        rebuilt < Duration::from_secs(15),
        "rebuild took {rebuilt:?}"
    );
    drop(load);
}
