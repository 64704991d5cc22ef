//! `roster bench`: the registry workload against a target — Roster, or (with the `peers` feature)
//! etcd or ZooKeeper — printing one JSON object with every parameter and figure, and a table.
//!
//! Phases: initial load (registration throughput), subscribers (convergence), churn (notify
//! latency, bytes pushed and server CPU per change), failure (a holder process killed without
//! unregistering), then the servers' memory and CPU read from /proc. With `--subscribe-first` the
//! subscribers watch before the initial load, as they do while services roll out. Throughout,
//! removals of instances the workload never removed are counted: they must be 0. Every target is
//! driven through [`Target`] and [`Conn`], so the workload is defined once.

mod checks;
#[cfg(feature = "peers")]
mod etcd;
mod holder;
mod proc_stats;
mod report;
mod roster;
mod track;
#[cfg(feature = "peers")]
mod zookeeper;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

pub use holder::{HolderArgs, holder};
use track::Tracker;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a watch reports: the whole instance list, or what changed in it.
#[cfg_attr(not(any(feature = "peers", test)), allow(dead_code))]
pub enum Update {
    All(Vec<String>),
    Changed {
        added: Vec<String>,
        removed: Vec<String>,
    },
}

/// Called with a service and what changed whenever a watch fires.
pub type OnChange = Arc<dyn Fn(&str, Update) + Send + Sync>;

/// What a registry's client library tells about its connection, where it does.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnStats {
    /// Connections re-established after the first.
    pub reconnects: u64,
    /// Connections the server closed or that went silent.
    pub lost: u64,
    /// Bytes of pushes received.
    pub push_bytes: u64,
    pub snapshots: u64,
    pub deltas: u64,
}

/// A registry under test.
pub trait Target: Send + Sync {
    /// A description for the report, e.g. `roster 1/1/1`.
    fn describe(&self) -> String;
    /// A new client connection.
    fn connect(&self) -> BoxFut<'_, anyhow::Result<Arc<dyn Conn>>>;
    /// The server processes to measure: name and pid.
    fn processes(&self) -> Vec<(String, u32)>;
    /// Flags that let `roster bench-holder` reach the same target.
    fn holder_args(&self) -> Vec<String>;
    /// Stops what the target started; by default nothing (a server run by someone else).
    fn stop(&mut self) -> BoxFut<'_, ()> {
        Box::pin(async {})
    }
}

/// A peer registry server the bench connects to but does not run: where it listens, its process
/// (for memory and CPU, when given) and the TTL its clients ask for.
#[cfg(feature = "peers")]
pub struct PeerServer {
    pub kind: TargetKind,
    pub endpoint: String,
    pub pid: Option<u32>,
    pub ttl: u64,
}

#[cfg(feature = "peers")]
impl PeerServer {
    fn name(&self) -> &'static str {
        match self.kind {
            TargetKind::Roster => "roster",
            TargetKind::Etcd => "etcd",
            TargetKind::Zookeeper => "zookeeper",
        }
    }

    /// For [`Target::processes`].
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.pid
            .map(|pid| (self.name().to_owned(), pid))
            .into_iter()
            .collect()
    }

    /// For [`Target::holder_args`].
    pub fn holder_args(&self) -> Vec<String> {
        [
            "--target",
            self.name(),
            "--endpoint",
            &self.endpoint,
            "--ttl",
            &self.ttl.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// One client connection to a registry.
pub trait Conn: Send + Sync {
    /// Registers `instance` of `service`; returns once the registry acknowledged it.
    fn register<'a>(
        &'a self,
        service: &'a str,
        instance: &'a str,
    ) -> BoxFut<'a, anyhow::Result<()>>;
    /// Removes an instance this connection registered.
    fn unregister<'a>(
        &'a self,
        service: &'a str,
        instance: &'a str,
    ) -> BoxFut<'a, anyhow::Result<()>>;
    /// Watches `service`: `on_change` gets its whole instance list after every change.
    fn watch<'a>(&'a self, service: &'a str, on_change: OnChange)
    -> BoxFut<'a, anyhow::Result<()>>;
    /// Closes the connection, unregistering what it holds.
    fn close(&self) -> BoxFut<'_, ()>;
    /// The client library's own figures, where it gives them.
    fn stats(&self) -> Option<ConnStats> {
        None
    }
    /// The encoded size of `instance` as the registry would push it to a watcher, where known.
    fn instance_bytes(&self, _instance: &str) -> Option<usize> {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    Roster,
    Etcd,
    Zookeeper,
}

/// Arguments of `roster bench`.
#[derive(Args, Clone)]
pub struct BenchArgs {
    /// The registry to measure: `roster` starts a cluster of separate processes (or uses
    /// `--config`); `etcd` and `zookeeper` need a build with the `peers` feature and a running
    /// server (see bench/README.md).
    #[arg(long, value_enum, default_value = "roster")]
    target: TargetKind,
    /// Roster cluster to start, as METAS/DATAS/SESSIONS.
    #[arg(long, default_value = "1/1/1")]
    cluster: String,
    /// Start the Roster cluster without authentication (to measure what checking tokens costs;
    /// by default clients present a token, as `roster dev` sets up).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Use a running Roster cluster through this client config instead of starting one (server
    /// memory and CPU are then not reported).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// etcd or ZooKeeper: the server's client address [default: 127.0.0.1:2379 for etcd,
    /// 127.0.0.1:2181 for ZooKeeper].
    #[arg(long)]
    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    endpoint: Option<String>,
    /// etcd or ZooKeeper: the server's process id, whose memory and CPU are then reported (the
    /// bench/start-*.sh scripts write it to their pid file).
    #[arg(long)]
    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    server_pid: Option<u32>,
    /// etcd or ZooKeeper: seconds a client that stopped answering keeps its instances, i.e. the
    /// lease TTL (etcd) or the session timeout (ZooKeeper).
    #[arg(long, default_value_t = DEFAULT_TTL)]
    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    ttl: u64,
    /// Services registered.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Instances registered per service.
    #[arg(long, default_value_t = 100)]
    instances_per_service: usize,
    /// Client connections that register the instances.
    #[arg(long, default_value_t = 20)]
    connections: usize,
    /// Subscriber connections.
    #[arg(long, default_value_t = 50)]
    subscribers: usize,
    /// Services each subscriber watches.
    #[arg(long, default_value_t = 100)]
    watch_services: usize,
    /// Subscribers watch before the initial load (as during a rollout) instead of after it;
    /// convergence is then timed from the start of the load.
    #[arg(long)]
    subscribe_first: bool,
    /// Churn: registrations and unregistrations per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Churn: seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Failure: instances held by the client that is killed.
    #[arg(long, default_value_t = 100)]
    failure_instances: usize,
    /// Print only the JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Instead of the registry workload, measure health checks: register this many persistent
    /// instances, each checked by HTTP against servers in this process, then report the probes
    /// per second and how they spread, their latency and the servers' CPU and memory over
    /// `--duration` seconds, and how long a full restart of the cluster takes until every
    /// instance is served, probed and seen checked again (Roster only; see bench/README.md).
    #[arg(long, value_name = "N")]
    checks: Option<usize>,
    /// With --checks: the interval of each instance's check, in milliseconds.
    #[arg(long, default_value_t = 5000, value_name = "MS", requires = "checks")]
    check_interval_ms: u64,
}

/// How long any one phase may wait for the notifications it expects.
const SETTLE: Duration = Duration::from_secs(60);

/// The peers' failure window, in seconds: etcd's lease TTL, ZooKeeper's session timeout. 10 s is
/// the TTL service registries on etcd commonly grant (go-zero's, for one), and well inside the
/// session timeouts a default ZooKeeper server accepts (2 to 20 ticks of 2 s).
const DEFAULT_TTL: u64 = 10;

/// The peer server's address: the one given, or the usual one.
#[cfg(feature = "peers")]
fn endpoint(kind: TargetKind, given: Option<&str>) -> &str {
    given.unwrap_or(match kind {
        TargetKind::Zookeeper => "127.0.0.1:2181",
        _ => "127.0.0.1:2379",
    })
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(n) = args.checks {
        if args.target != TargetKind::Roster || args.config.is_some() {
            bail!(
                "--checks measures a Roster cluster it starts itself: drop --target and --config"
            );
        }
        return checks::run(&args, n).await;
    }
    if args.services == 0 || args.instances_per_service == 0 || args.connections == 0 {
        bail!("--services, --instances-per-service and --connections must be at least 1");
    }
    if args.watch_services > args.services {
        bail!(
            "--watch-services ({}) cannot exceed --services ({})",
            args.watch_services,
            args.services
        );
    }
    if args.ttl == 0 {
        bail!("--ttl must be at least 1");
    }
    let dir = tempfile::tempdir().context("cannot create a working directory")?;
    let mut target: Box<dyn Target> = match args.target {
        TargetKind::Roster => Box::new(roster::RosterTarget::start(&args, dir.path()).await?),
        #[cfg(feature = "peers")]
        TargetKind::Etcd => {
            let endpoint = endpoint(args.target, args.endpoint.as_deref());
            Box::new(etcd::EtcdTarget::new(endpoint, args.server_pid, args.ttl).await?)
        }
        #[cfg(feature = "peers")]
        TargetKind::Zookeeper => {
            let endpoint = endpoint(args.target, args.endpoint.as_deref());
            Box::new(zookeeper::ZkTarget::new(endpoint, args.server_pid, args.ttl).await?)
        }
        #[cfg(not(feature = "peers"))]
        other => bail!(
            "--target {other:?} is not built in: this build of roster drives Roster only; build \
             it with `--features peers` (see bench/README.md)"
        ),
    };
    let result = workload(&args, target.as_ref()).await;
    target.stop().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report::print_table(&report);
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn service_name(i: usize) -> String {
    format!("bench/svc/{i}")
}

/// The services subscriber `s` watches.
fn watched(args: &BenchArgs, s: usize) -> Vec<usize> {
    (0..args.watch_services)
        .map(|j| (s + j) % args.services)
        .collect()
}

fn bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The instances of service `svc`.
fn instances_of(args: &BenchArgs, svc: usize) -> Arc<HashSet<String>> {
    Arc::new(
        (0..args.instances_per_service)
            .map(|j| format!("i{}", svc * args.instances_per_service + j))
            .collect(),
    )
}

/// Connects the subscribers and watches every service each one watches; returns the connections
/// and the expectations (each subscriber sees every instance of each service), timed from `since`.
async fn subscribe_all(
    args: &BenchArgs,
    target: &dyn Target,
    tracker: &Tracker,
    since: Instant,
) -> anyhow::Result<(Vec<Arc<dyn Conn>>, Vec<track::Expect>)> {
    let mut expectations = Vec::new();
    let per_service: Vec<Arc<HashSet<String>>> = (0..args.services)
        .map(|svc| instances_of(args, svc))
        .collect();
    for s in 0..args.subscribers {
        for svc in watched(args, s) {
            expectations.push(tracker.expect_all(
                s,
                &service_name(svc),
                per_service[svc].clone(),
                since,
            ));
        }
    }
    let mut subscribers = Vec::new();
    for s in 0..args.subscribers {
        let conn = target.connect().await?;
        for svc in watched(args, s) {
            conn.watch(&service_name(svc), tracker.callback(s)).await?;
        }
        subscribers.push(conn);
    }
    Ok((subscribers, expectations))
}

/// Sum of the client figures of `conns` (`None` when the target's client gives none).
fn sum_stats(conns: &[Arc<dyn Conn>]) -> Option<ConnStats> {
    conns
        .iter()
        .try_fold(ConnStats::default(), |mut total, conn| {
            let s = conn.stats()?;
            total.reconnects += s.reconnects;
            total.lost += s.lost;
            total.push_bytes += s.push_bytes;
            total.snapshots += s.snapshots;
            total.deltas += s.deltas;
            Some(total)
        })
}

/// CPU seconds of the target's server processes so far.
fn server_cpu(target: &dyn Target) -> Option<f64> {
    let processes = target.processes();
    if processes.is_empty() {
        return None;
    }
    processes
        .iter()
        .map(|(_, pid)| proc_stats::read(*pid).map(|s| s.cpu_seconds))
        .sum()
}

async fn workload(args: &BenchArgs, target: &dyn Target) -> anyhow::Result<serde_json::Value> {
    let quiet = args.json;
    let total = args.services * args.instances_per_service;
    // Churn instances come and go, and the holder's are killed: only those may disappear.
    let tracker = Tracker::new(|i: &str| i.starts_with("churn") || i.starts_with("held"));

    // Connections.
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        conns.push(target.connect().await?);
    }

    // Subscribers watching before the load, when asked: convergence counts from the load's start.
    let load_started = Instant::now();
    let mut early = None;
    if args.subscribe_first {
        early = Some(subscribe_all(args, target, &tracker, load_started).await?);
    }

    // Initial load: every instance registered, the connections in parallel.
    let progress = bar(total as u64, "register", quiet);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, conn) in conns.iter().enumerate() {
        let conn = conn.clone();
        let progress = progress.clone();
        let (services, per) = (args.services, args.instances_per_service);
        let connections = args.connections;
        tasks.spawn(async move {
            // Connection c registers every instance whose number is c modulo the connections,
            // up to 32 at a time.
            let mine: Vec<(String, String)> = (0..services * per)
                .filter(|n| n % connections == c)
                .map(|n| (service_name(n / per), format!("i{n}")))
                .collect();
            let mut stream = futures_util::stream::iter(mine)
                .map(|(s, i)| {
                    let conn = conn.clone();
                    async move { conn.register(&s, &i).await }
                })
                .buffer_unordered(32);
            while let Some(result) = futures_util::StreamExt::next(&mut stream).await {
                result?;
                progress.inc(1);
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let load_seconds = started.elapsed().as_secs_f64();
    progress.finish();

    // Subscribers: each watches its services until it has seen every instance of each.
    let expected_subscriptions = args.subscribers * args.watch_services;
    let progress = bar(expected_subscriptions as u64, "subscribe", quiet);
    let (subscribers, expectations) = match early {
        Some(early) => early,
        None => subscribe_all(args, target, &tracker, Instant::now()).await?,
    };
    let converged = tracker.wait(&expectations, SETTLE, &progress).await;
    progress.finish();
    let convergence_seconds = converged.iter().flatten().max().map(|d| d.as_secs_f64());
    let subscribe_seen = converged.iter().filter(|c| c.is_some()).count();

    // Churn: alternately register and unregister one instance per service at `rate` per second.
    let ops = (args.rate * args.duration) as usize;
    let progress = bar(ops as u64, "churn", quiet);
    let churn_conn = target.connect().await?;
    let mut churn_expect = Vec::new();
    let mut present = vec![false; args.services];
    let mut errors = 0usize;
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let bytes_before = sum_stats(&subscribers);
    let cpu_before = server_cpu(target);
    let churn_started = Instant::now();
    for k in 0..ops {
        tick.tick().await;
        let svc = k % args.services;
        let service = service_name(svc);
        let instance = format!("churn{svc}");
        let now = Instant::now();
        let watchers: Vec<usize> = (0..args.subscribers)
            .filter(|s| watched(args, *s).contains(&svc))
            .collect();
        for s in &watchers {
            churn_expect.push(tracker.expect_one(*s, &service, &instance, !present[svc], now));
        }
        let result = if present[svc] {
            churn_conn.unregister(&service, &instance).await
        } else {
            churn_conn.register(&service, &instance).await
        };
        match result {
            Ok(()) => present[svc] = !present[svc],
            Err(_) => errors += 1,
        }
        progress.inc(1);
    }
    let churn_seconds = churn_started.elapsed().as_secs_f64();
    progress.finish();
    let progress = bar(churn_expect.len() as u64, "notified", quiet);
    let churn_seen = tracker.wait(&churn_expect, SETTLE, &progress).await;
    progress.finish();
    let cpu_after = server_cpu(target);
    let bytes_after = sum_stats(&subscribers);
    let mut latencies: Vec<Duration> = churn_seen.iter().flatten().copied().collect();
    latencies.sort();
    let pct = |p: f64| -> Option<f64> {
        (!latencies.is_empty()).then(|| {
            let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            millis(latencies[i])
        })
    };
    let pushed_per_notification = match (bytes_before, bytes_after) {
        (Some(b), Some(a)) if !churn_expect.is_empty() => {
            Some((a.push_bytes - b.push_bytes) as f64 / churn_expect.len() as f64)
        }
        _ => None,
    };
    let instance_bytes = churn_conn.instance_bytes("churn0");
    let cpu_ms_per_change = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if ops > 0 => Some((a - b) * 1e3 / ops as f64),
        _ => None,
    };

    // Failure: a holder process registers instances on service 0, then is killed outright.
    let failure = failure_phase(args, target, &tracker, quiet).await?;

    // Servers' memory and CPU.
    let servers: Vec<serde_json::Value> = target
        .processes()
        .into_iter()
        .map(|(name, pid)| {
            let stats = proc_stats::read(pid);
            json!({
                "name": name,
                "pid": pid,
                "rss_kib": stats.as_ref().map(|s| s.rss_kib),
                "peak_rss_kib": stats.as_ref().map(|s| s.peak_rss_kib),
                "cpu_seconds": stats.as_ref().map(|s| s.cpu_seconds),
            })
        })
        .collect();
    let rss_total: u64 = servers.iter().filter_map(|s| s["rss_kib"].as_u64()).sum();
    let everyone: Vec<Arc<dyn Conn>> = subscribers
        .iter()
        .chain(conns.iter())
        .chain(std::iter::once(&churn_conn))
        .cloned()
        .collect();
    let clients = sum_stats(&everyone);
    let (spurious, spurious_sample) = tracker.spurious_removals();

    for conn in &everyone {
        conn.close().await;
    }

    Ok(json!({
        "target": target.describe(),
        "parameters": {
            "services": args.services,
            "instances_per_service": args.instances_per_service,
            "instances": total,
            "connections": args.connections,
            "subscribers": args.subscribers,
            "watch_services": args.watch_services,
            "subscribe_first": args.subscribe_first,
            "rate": args.rate,
            "duration_seconds": args.duration,
            "failure_instances": args.failure_instances,
        },
        "initial_load": {
            "instances": total,
            "seconds": load_seconds,
            "per_second": total as f64 / load_seconds,
        },
        "subscribe": {
            "subscriptions": expected_subscriptions,
            "convergence_seconds": convergence_seconds,
            "convergence_from": if args.subscribe_first { "the start of the load" } else { "subscribing" },
            "notifications_expected": expected_subscriptions,
            "notifications_seen": subscribe_seen,
            "updates_delivered": tracker.updates(),
        },
        "churn": {
            "changes": ops,
            "seconds": churn_seconds,
            "errors": errors,
            "notifications_expected": churn_expect.len(),
            "notifications_seen": latencies.len(),
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": latencies.last().map(|d| millis(*d))},
            "push_bytes_per_notification": pushed_per_notification,
            "changed_instance_bytes": instance_bytes,
            "server_cpu_ms_per_change": cpu_ms_per_change,
        },
        "failure": failure,
        "clients": clients.map(|c| json!({
            "reconnects": c.reconnects,
            "connections_lost": c.lost,
            "push_bytes": c.push_bytes,
            "snapshots": c.snapshots,
            "deltas": c.deltas,
        })),
        "spurious_removals": spurious,
        "spurious_removal_sample": spurious_sample,
        "unmet_sample": tracker.unmet(10),
        "servers": servers,
        "server_rss_kib_total": (rss_total > 0).then_some(rss_total),
        "server_bytes_per_instance": (rss_total > 0).then(|| rss_total as f64 * 1024.0 / total as f64),
    }))
}

async fn failure_phase(
    args: &BenchArgs,
    target: &dyn Target,
    tracker: &Tracker,
    quiet: bool,
) -> anyhow::Result<serde_json::Value> {
    let service = service_name(0);
    let watchers: Vec<usize> = (0..args.subscribers)
        .filter(|s| watched(args, *s).contains(&0))
        .collect();
    let held: Arc<HashSet<String>> = Arc::new(
        (0..args.failure_instances)
            .map(|j| format!("held{j}"))
            .collect(),
    );
    let exe = std::env::current_exe().context("cannot find the roster binary")?;
    let mut holder = tokio::process::Command::new(exe)
        .arg("bench-holder")
        .args(target.holder_args())
        .args([
            "--service",
            &service,
            "--count",
            &args.failure_instances.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the holder process")?;
    let mut lines = tokio::io::BufReader::new(holder.stdout.take().expect("piped")).lines();
    let line = tokio::time::timeout(SETTLE, lines.next_line())
        .await
        .context("the holder did not register in time")??;
    if line.as_deref() != Some("held") {
        bail!("the holder failed to register its instances");
    }
    let now = Instant::now();
    let appeared: Vec<_> = watchers
        .iter()
        .map(|s| tracker.expect_all(*s, &service, held.clone(), now))
        .collect();
    let progress = bar(appeared.len() as u64, "hold", quiet);
    tracker.wait(&appeared, SETTLE, &progress).await;
    progress.finish();

    // SIGKILL: no goodbye; the registry must notice on its own.
    let killed_at = Instant::now();
    let gone: Vec<_> = watchers
        .iter()
        .map(|s| tracker.expect_none_of(*s, &service, held.clone(), killed_at))
        .collect();
    holder.start_kill().context("cannot kill the holder")?;
    let _ = holder.wait().await;
    let progress = bar(gone.len() as u64, "failure", quiet);
    let seen = tracker.wait(&gone, SETTLE, &progress).await;
    progress.finish();
    let detect = seen.iter().flatten().max().map(|d| d.as_secs_f64());
    Ok(json!({
        "instances": args.failure_instances,
        "watchers": watchers.len(),
        "notifications_expected": gone.len(),
        "notifications_seen": seen.iter().filter(|s| s.is_some()).count(),
        "detect_seconds": detect,
    }))
}
