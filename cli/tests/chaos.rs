//! The chaos suite: a 3/3/2 cluster of real processes under 40 publishing clients on 4 services,
//! watched by subscribers that record every push exactly as a session server sent it (raw
//! protocol, full snapshots; the SDK would hide a server-side regression by dropping pushes that
//! are not newer). Faults, one at a time, each with a publisher leaving and another joining right
//! after it:
//!
//! kill -9 a data server and restart it · kill -9 the meta leader · kill -9 a session server ·
//! SIGSTOP a data server for 15 s · SIGSTOP the meta leader for 10 s · kill -9 two data servers at
//! once · kill -9 a publisher · SIGSTOP a session server for 10 s.
//!
//! After every fault every subscriber must converge on exactly the live publishers (the time it
//! took is printed), and over the whole record: versions of a service strictly increase on every
//! subscriber connection, and no snapshot ever lacks a publisher that was live throughout.
//!
//! `ROSTER_CHAOS_ROUNDS=N` then runs N more faults chosen at random (a soak, by hand), printing the
//! servers' memory after each.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use roster_client::Snapshot;
use roster_client::{Client, ClientConfig, Publication};
use roster_common::proto::{ClientRequest, ClientResponse, Push, Scope};
use roster_tests::{PublisherKey, RawClient, check_history, keys};
use support::{Cluster, cluster_status, roster, wait_for};

const START: Duration = Duration::from_secs(60);
const SERVICES: usize = 4;
const PUBLISHERS: usize = 40;
/// Publishers that may leave during the run; the others are live throughout.
const LEAVERS: usize = 10;
/// How long every subscriber may take to see exactly the live publishers after a fault.
const CONVERGE_WITHIN: Duration = Duration::from_secs(45);

fn service(i: usize) -> String {
    format!("chaos/svc/s{i}")
}

/// The faults the suite inflicts on the cluster's processes.
trait Faults {
    fn meta_leader(&self) -> u64;
    /// Kills `victims` with SIGKILL, runs `during`, then starts them again.
    fn kill_then_restart(&mut self, victims: &[(&'static str, u64)], during: impl FnOnce());
    /// Stops a server with SIGSTOP for `pause`, running `during` right after stopping it.
    fn pause(&self, role: &'static str, id: u64, pause: Duration, during: impl FnOnce());
    fn rss_kib(&self) -> Vec<(String, u64)>;
}

impl Faults for Cluster {
    fn meta_leader(&self) -> u64 {
        meta_leader(self.cwd(), &self.meta_list())
    }

    fn kill_then_restart(&mut self, victims: &[(&'static str, u64)], during: impl FnOnce()) {
        for (role, id) in victims {
            self.kill(role, *id);
        }
        during();
        for (role, id) in victims {
            self.restart(role, *id);
        }
    }

    fn pause(&self, role: &'static str, id: u64, pause: Duration, during: impl FnOnce()) {
        self.signal(role, id, "STOP");
        during();
        // The fault lasts this long: a duration chosen, not a wait for a condition.
        std::thread::sleep(pause);
        self.signal(role, id, "CONT");
    }

    fn rss_kib(&self) -> Vec<(String, u64)> {
        ["meta", "data", "session"]
            .iter()
            .flat_map(|role| self.of(role))
            .filter(|server| server.running())
            .filter_map(|server| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", server.proc().pid()))
                        .ok()?;
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .trim()
                    .trim_end_matches(" kB")
                    .parse()
                    .ok()?;
                Some((format!("{} {}", server.role, server.id), kib))
            })
            .collect()
    }
}

/// The leader of the meta group at `metas`, once there is one.
fn meta_leader(cwd: &Path, metas: &str) -> u64 {
    wait_for(START, "a meta leader", || {
        let status = cluster_status(cwd, &[metas], false)?;
        status["leader"].as_u64()
    })
}

/// Every push one raw subscriber was sent, connection by connection.
type Record = Arc<Mutex<Vec<Watched>>>;

/// What one raw subscriber connection was pushed, and by which session server.
struct Watched {
    server: SocketAddr,
    /// Each snapshot with the wall-clock time it arrived, to read against the servers' logs.
    pushes: Vec<(SystemTime, Snapshot)>,
}

/// A subscriber speaking the protocol by hand: subscribes to every service on one session
/// server, records each snapshot pushed, and on losing the connection moves to the next server.
async fn raw_subscriber(ca: PathBuf, sessions: Vec<SocketAddr>, first: usize, record: Record) {
    let mut at = first;
    loop {
        let addr = sessions[at % sessions.len()];
        at += 1;
        let Ok(mut raw) = RawClient::try_connect_with_ca(&ca, addr).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let hello = raw
            .hello_with_secret("chaos-watcher", b"the secret of the chaos watcher")
            .await;
        if !matches!(hello, Ok(ClientResponse::Welcome { .. })) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut subscribed = true;
        for i in 0..SERVICES {
            let request = ClientRequest::Subscribe {
                healthy_only: false,
                register_id: format!("w{i}"),
                service: service(i).parse().unwrap(),
                scope: Scope::Global,
            };
            subscribed &= matches!(raw.call(&request).await, Ok(ClientResponse::Done {}));
        }
        if !subscribed {
            continue;
        }
        record.lock().push(Watched {
            server: addr,
            pushes: Vec::new(),
        });
        loop {
            match raw.next_push(Duration::from_millis(500)).await {
                Some(Push::Snapshot(snapshot)) => record
                    .lock()
                    .last_mut()
                    .expect("pushed above")
                    .pushes
                    .push((SystemTime::now(), Snapshot::from_wire(snapshot))),
                Some(_) => {}
                None if raw.conn.close_reason().is_some() => break,
                None => {}
            }
        }
    }
}

/// The publishers a raw record currently shows, per service: the latest snapshot of each.
fn latest(record: &Record) -> BTreeMap<String, BTreeSet<PublisherKey>> {
    let mut out = BTreeMap::new();
    if let Some(connection) = record.lock().last() {
        for (_, snapshot) in &connection.pushes {
            out.insert(snapshot.service.as_str().to_owned(), keys(snapshot));
        }
    }
    out
}

struct Publishers {
    ca: PathBuf,
    sessions: Vec<String>,
    live: Vec<(Client, Publication)>,
    joined: usize,
}

impl Publishers {
    async fn join(&mut self) {
        let n = self.joined;
        self.joined += 1;
        let mut config = ClientConfig::new(self.sessions.clone(), self.ca.clone());
        config.client_id = Some(format!("publisher-{n}"));
        // In soak rounds one session server may be paused while the other is still taking back
        // the clients that moved: a first connect may find neither answering in time.
        let give_up = Instant::now() + START;
        let client = loop {
            match Client::connect(config.clone()).await {
                Ok(client) => break client,
                Err(e) if Instant::now() < give_up => {
                    eprintln!("chaos: publisher-{n} connecting again: {e}")
                }
                Err(e) => panic!("publisher-{n} could not connect within {START:?}: {e}"),
            }
        };
        let publication = client
            .publisher(service(n % SERVICES))
            .register_id(format!("p{n}"))
            .publish(vec![format!("10.0.{}.{}:80", n / 250, n % 250).into()])
            .await
            .unwrap();
        self.live.push((client, publication));
    }

    /// The newest leaver of the first `LEAVERS` still live unpublishes and goes.
    async fn leave(&mut self) {
        let at = self
            .live
            .iter()
            .position(|(client, _)| {
                let n: usize = client.client_id()["publisher-".len()..].parse().unwrap();
                n < LEAVERS
            })
            .expect("a leaver is left");
        let (client, publication) = self.live.remove(at);
        publication.unpublish().await.unwrap();
        client.close().await;
    }

    fn expected(&self, cli: &[(String, PublisherKey)]) -> BTreeMap<String, BTreeSet<PublisherKey>> {
        let mut out: BTreeMap<String, BTreeSet<PublisherKey>> = (0..SERVICES)
            .map(|i| (service(i), BTreeSet::new()))
            .collect();
        for (client, publication) in &self.live {
            out.get_mut(publication.service().as_str())
                .unwrap()
                .insert((
                    client.client_id().to_owned(),
                    publication.register_id().to_owned(),
                ));
        }
        for (service, key) in cli {
            out.get_mut(service).unwrap().insert(key.clone());
        }
        out
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillData,
    KillMetaLeader,
    KillSession,
    StopData,
    StopMetaLeader,
    KillTwoData,
    KillPublisher,
    StopSession,
}

#[test]
fn the_cluster_rides_through_every_fault_without_a_dip() {
    let _ = std::fs::remove_file(Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.txt"));
    // Session servers come back where their clients look for them.
    let mut cluster = Cluster::builder()
        .metas(3)
        .datas(3)
        .sessions(2)
        .picked_session_ports()
        .session_args(&["--drain-timeout-ms", "2000"])
        .start();
    cluster.wait_members(3, 2);
    let cwd = cluster.cwd().to_owned();
    let cwd = cwd.as_path();
    let ca = cluster.ca();
    let session_addrs: Vec<SocketAddr> = cluster
        .session_addrs()
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();

    let records: Vec<Record> = (0..2).map(|_| Record::default()).collect();
    for (i, record) in records.iter().enumerate() {
        runtime.spawn(raw_subscriber(
            ca.clone(),
            session_addrs.clone(),
            i,
            record.clone(),
        ));
    }
    let mut publishers = Publishers {
        ca: ca.clone(),
        sessions: cluster.session_addrs(),
        live: Vec::new(),
        joined: 0,
    };
    runtime.block_on(async {
        for _ in 0..PUBLISHERS {
            publishers.join().await;
        }
    });
    // A publisher in a process of its own, for the fault that kills one.
    let client_toml = cwd.join("publisher.toml");
    std::fs::write(
        &client_toml,
        format!(
            "sessions = [{}]\nca = \"tls/ca.pem\"\nclient_id = \"cli-publisher\"\n",
            cluster
                .session_addrs()
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .unwrap();
    let cli_service = service(0);
    let mut cli_publisher = Some(roster(
        "roster publish",
        cwd,
        &[
            "publish",
            "--config",
            "publisher.toml",
            "--register-id",
            "cli",
            &service(0),
            "10.9.9.9:80",
        ],
    ));
    let mut cli_live = vec![(cli_service, ("cli-publisher".to_owned(), "cli".to_owned()))];

    let converge = |what: &str, publishers: &Publishers, cli: &[(String, PublisherKey)]| {
        let expected = publishers.expected(cli);
        let start = Instant::now();
        wait_for(
            CONVERGE_WITHIN,
            &format!("every subscriber exact after {what}"),
            || records.iter().all(|r| latest(r) == expected).then_some(()),
        );
        start.elapsed()
    };
    let took = converge("start", &publishers, &cli_live);
    report(format!("chaos: converged at start in {took:?}"));

    let scripted = [
        Fault::KillData,
        Fault::KillMetaLeader,
        Fault::KillSession,
        Fault::StopData,
        Fault::StopMetaLeader,
        Fault::KillTwoData,
        Fault::KillPublisher,
        Fault::StopSession,
    ];
    let rounds: usize = std::env::var("ROSTER_CHAOS_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut seed = rand_index() as u64 | 1;
    // A killed publisher process is not restarted: soak rounds draw from the other faults.
    let pick: Vec<Fault> = scripted
        .into_iter()
        .filter(|f| !matches!(f, Fault::KillPublisher))
        .collect();
    let random = (0..rounds).map(|_| {
        // A small linear congruential generator: a different sequence each soak run.
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        pick[(seed >> 33) as usize % pick.len()]
    });
    let faults: Vec<Fault> = scripted.into_iter().chain(random).collect();
    let mut leavers_left = LEAVERS;
    for (round, fault) in faults.into_iter().enumerate() {
        let started = Instant::now();
        let churn = |publishers: &mut Publishers, leavers_left: &mut usize| {
            runtime.block_on(async {
                if *leavers_left > 0 {
                    publishers.leave().await;
                    *leavers_left -= 1;
                }
                publishers.join().await;
            })
        };
        let mut during = || churn(&mut publishers, &mut leavers_left);
        match fault {
            Fault::KillData => {
                let id = 1 + (round as u64 % 3);
                cluster.kill_then_restart(&[("data", id)], during);
            }
            Fault::KillMetaLeader => {
                let leader = cluster.meta_leader();
                let (cwd, metas) = (cluster.cwd().to_owned(), cluster.meta_list());
                cluster.kill_then_restart(&[("meta", leader)], || {
                    during();
                    meta_leader(&cwd, &metas);
                });
            }
            Fault::KillSession => {
                let id = 1 + (round as u64 % 2);
                cluster.kill_then_restart(&[("session", id)], during);
            }
            Fault::StopData => {
                let id = 1 + (round as u64 % 3);
                cluster.pause("data", id, Duration::from_secs(15), during);
            }
            Fault::StopMetaLeader => {
                let leader = cluster.meta_leader();
                cluster.pause("meta", leader, Duration::from_secs(10), during);
            }
            Fault::KillTwoData => {
                let a = 1 + (round as u64 % 3);
                let b = 1 + ((round as u64 + 1) % 3);
                cluster.kill_then_restart(&[("data", a), ("data", b)], during);
            }
            Fault::KillPublisher => {
                if let Some(mut proc) = cli_publisher.take() {
                    proc.signal("KILL");
                    let _ = proc.wait_exit(Duration::from_secs(10));
                    cli_live.clear();
                }
                during();
            }
            Fault::StopSession => {
                let id = 1 + (round as u64 % 2);
                cluster.pause("session", id, Duration::from_secs(10), during);
            }
        }
        let took = converge(&format!("{fault:?}"), &publishers, &cli_live);
        report(format!(
            "chaos: round {round} {fault:?}: every subscriber exact {took:?} after recovery ({:?} since the fault)",
            started.elapsed()
        ));
        if round >= scripted.len() {
            report(format!(
                "chaos: server RSS KiB after round {round}: {:?}",
                cluster.rss_kib()
            ));
        }
    }

    // Over the whole record: versions strictly increase on every connection, and no snapshot
    // lacks a publisher that was live throughout.
    let stable_keys: BTreeSet<PublisherKey> = publishers
        .live
        .iter()
        .filter(|(client, _)| {
            let n: usize = client.client_id()["publisher-".len()..].parse().unwrap();
            (LEAVERS..PUBLISHERS).contains(&n)
        })
        .map(|(client, p)| (client.client_id().to_owned(), p.register_id().to_owned()))
        .collect();
    let mut checked = 0;
    for record in &records {
        for (nth, connection) in record.lock().iter().enumerate() {
            let mut by_service: BTreeMap<&str, Vec<Snapshot>> = BTreeMap::new();
            let mut arrivals: BTreeMap<&str, Vec<SystemTime>> = BTreeMap::new();
            for (at, snapshot) in &connection.pushes {
                let name = snapshot.service.as_str();
                by_service.entry(name).or_default().push(snapshot.clone());
                arrivals.entry(name).or_default().push(*at);
            }
            for (name, snapshots) in by_service {
                let stable: BTreeSet<PublisherKey> = stable_keys
                    .iter()
                    .filter(|(client, _)| {
                        let n: usize = client["publisher-".len()..].parse().unwrap();
                        service(n % SERVICES) == name
                    })
                    .cloned()
                    .collect();
                // The first connection's first snapshots predate the initial load; every later
                // connection must show every stable publisher from its first snapshot on.
                let from = if nth == 0 {
                    snapshots
                        .iter()
                        .position(|s| stable.iter().all(|k| keys(s).contains(k)))
                        .unwrap_or(snapshots.len())
                } else {
                    0
                };
                if let Err(e) = check_history(&snapshots[from..], &stable) {
                    panic!(
                        "a subscriber saw a regression or a dip: {e}\n{}",
                        history(connection.server, &snapshots, &arrivals[name], &stable)
                    );
                }
                checked += snapshots.len();
            }
        }
    }
    report(format!(
        "chaos: {checked} pushes checked over {} subscriber connections",
        records.iter().map(|r| r.lock().len()).sum::<usize>()
    ));
    runtime.block_on(async move {
        for (client, publication) in publishers.live {
            drop(publication);
            client.close().await;
        }
    });
}

/// One subscriber connection's pushes of one service, a line each — arrival time (UTC), version
/// (term and counter), publishers, the stable ones missing — to read against the servers' logs.
fn history(
    server: SocketAddr,
    snapshots: &[Snapshot],
    arrivals: &[SystemTime],
    stable: &BTreeSet<PublisherKey>,
) -> String {
    let mut out = format!("pushes of this service on the connection to {server}:\n");
    for (snapshot, at) in snapshots.iter().zip(arrivals) {
        let micros = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros()
            % 86_400_000_000;
        let have = keys(snapshot);
        let missing: Vec<_> = stable.iter().filter(|k| !have.contains(*k)).collect();
        out.push_str(&format!(
            "  {:02}:{:02}:{:02}.{:06} term {} #{} publishers {} missing {missing:?}\n",
            micros / 3_600_000_000,
            micros / 60_000_000 % 60,
            micros / 1_000_000 % 60,
            micros % 1_000_000,
            snapshot.version >> 32,
            snapshot.version & 0xffff_ffff,
            have.len(),
        ));
    }
    out
}

/// Prints a line of the suite's report and appends it to `chaos-report.txt` in the test target's
/// scratch directory, which `.ci/run` prints (the test harness keeps a passing test's output to
/// itself).
fn report(line: String) {
    use std::io::Write;
    println!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.txt");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}

/// A different start for each soak run.
fn rand_index() -> usize {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or(0)
}
