//! `roster bench --checks N`: health checks at scale. Starts a Roster cluster and small HTTP
//! servers in this process, registers N persistent instances each checked by HTTP `GET` against
//! those servers, and measures:
//!
//! - registration: persistent instances stored per second (each one a Raft write);
//! - first checks: how long until every instance has been probed once;
//! - steady state: probes per second seen by the HTTP servers (against N / interval), the probes'
//!   latency as the data servers time them (p50, p99, from their histogram), unhealthy instances
//!   (must be 0), and the servers' CPU and memory;
//! - a full restart: every server stopped, then started again from its directory; how long until
//!   the servers are ready, until every instance is served again, and until every instance has
//!   been probed again.
//!
//! The HTTP servers record the last time each instance's path (`/i/N`) was asked for, so "checked"
//! means a probe arrived, whatever the servers report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt as _;
use roster_client::{CheckSpec, Client, ClientConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use super::proc_stats;
use crate::dev::LocalCluster;
use crate::files::{CLIENT_CONFIG_FILE, TARGETS_FILE};

/// HTTP servers the probes are spread over.
const LISTENERS: usize = 8;
/// Services the instances are spread over.
const SERVICES: usize = 100;
/// Registrations in flight at once.
const IN_FLIGHT: usize = 64;
/// How long any one wait (first checks, a restart) may take.
const SETTLE: Duration = Duration::from_secs(300);

/// What the HTTP servers saw: per instance, when its last probe arrived (milliseconds since the
/// bench started, 0: never), and probes in all.
struct Probes {
    started: Instant,
    last: Vec<AtomicU64>,
    total: AtomicU64,
}

impl Probes {
    fn new(n: usize) -> Self {
        Probes {
            started: Instant::now(),
            last: (0..n).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
        }
    }

    fn record(&self, path: &str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let Some(index) = path
            .strip_prefix("/i/")
            .and_then(|i| i.parse::<usize>().ok())
        else {
            return;
        };
        if let Some(slot) = self.last.get(index) {
            let now = self.started.elapsed().as_millis().max(1) as u64;
            slot.store(now, Ordering::Relaxed);
        }
    }

    /// Instances not probed since `since`.
    fn unprobed_since(&self, since: Instant) -> usize {
        let since = since.duration_since(self.started).as_millis() as u64;
        self.last
            .iter()
            .filter(|t| {
                let t = t.load(Ordering::Relaxed);
                t == 0 || t < since
            })
            .count()
    }
}

/// Starts an HTTP server on 127.0.0.1 answering every `GET` with 200; returns its port.
async fn http_server(probes: Arc<Probes>, stop: CancellationToken) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            let probes = probes.clone();
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(256);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                if let Some(path) = text.lines().next().and_then(|l| l.split(' ').nth(1)) {
                    probes.record(path);
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    Ok(port)
}

/// The data servers' admin addresses, from the cluster's targets.json.
fn data_admins(cluster: &LocalCluster) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(cluster.dir.join(TARGETS_FILE))?;
    let targets: Value = serde_json::from_str(&text)?;
    Ok(targets
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["labels"]["role"] == "data")
        .filter_map(|t| t["targets"][0].as_str().map(str::to_owned))
        .collect())
}

/// Sums, over `admins`, the probe-duration histogram's cumulative bucket counts (by upper bound)
/// and the unhealthy-instance gauge.
async fn scrape(admins: &[String]) -> (BTreeMap<u64, f64>, f64) {
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    let mut unhealthy = 0.0;
    for admin in admins {
        let url = format!("http://{admin}/metrics");
        let Ok(Ok(text)) = tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
        })
        .await
        else {
            continue;
        };
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if let Some(labels) =
                series.strip_prefix("roster_health_check_duration_seconds_bucket{")
                && let Some(le) = labels
                    .split("le=\"")
                    .nth(1)
                    .and_then(|l| l.split('"').next())
            {
                // Upper bounds in microseconds, `+Inf` last.
                let bound = le
                    .parse::<f64>()
                    .map_or(u64::MAX, |s| (s * 1e6).round() as u64);
                *buckets.entry(bound).or_default() += value;
            } else if series.starts_with("roster_data_checked_instances{")
                && series.contains("health=\"unhealthy\"")
            {
                unhealthy += value;
            }
        }
    }
    (buckets, unhealthy)
}

/// The `q` quantile, in milliseconds, of what was observed between two scrapes of a cumulative
/// histogram: the upper bound of the bucket it falls in (`None`: nothing observed).
fn quantile_ms(before: &BTreeMap<u64, f64>, after: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let delta: Vec<(u64, f64)> = after
        .iter()
        .map(|(le, n)| (*le, n - before.get(le).copied().unwrap_or(0.0)))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let (le, _) = delta.iter().find(|(_, n)| *n >= q * total)?;
    Some(if *le == u64::MAX {
        f64::INFINITY
    } else {
        *le as f64 / 1000.0
    })
}

/// Waits until `done` holds, checking every 100 ms, for at most [`SETTLE`]; returns how long.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !done().await {
        if start.elapsed() > SETTLE {
            bail!("{what}: not within {SETTLE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(start.elapsed())
}

/// Persistent instances of the bench's services that `config`'s cluster serves.
async fn served(config: &ClientConfig) -> u64 {
    let Ok(client) = Client::connect(config.clone()).await else {
        return 0;
    };
    let count = client
        .list_services()
        .await
        .map(|services| {
            services
                .iter()
                .filter(|s| s.service.as_str().starts_with("checks/svc/"))
                .map(|s| s.publishers)
                .sum()
        })
        .unwrap_or(0);
    client.close().await;
    count
}

pub async fn run(args: &BenchArgs, n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--checks must be at least 1");
    }
    let interval_ms = args.check_interval_ms;
    let [metas, datas, sessions] = super::roster::cluster_shape(&args.cluster)?;
    let dir = tempfile::tempdir().context("cannot create a working directory")?;
    let cluster_dir = dir.path().join("cluster");
    let auth = !args.insecure_no_auth;
    let log = Some("warn,openraft=off");
    let cancel = CancellationToken::new();
    let mut cluster = LocalCluster::start(
        &cluster_dir,
        metas,
        datas,
        sessions,
        auth,
        log,
        &cancel,
        true,
    )
    .await?;
    let stop = CancellationToken::new();
    let probes = Arc::new(Probes::new(n));
    let mut ports = Vec::new();
    for _ in 0..LISTENERS {
        ports.push(http_server(probes.clone(), stop.clone()).await?);
    }
    let result = measure(args, n, interval_ms, &mut cluster, &probes, &ports).await;
    stop.cancel();
    cluster.stop().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

async fn measure(
    args: &BenchArgs,
    n: usize,
    interval_ms: u64,
    cluster: &mut LocalCluster,
    probes: &Arc<Probes>,
    ports: &[u16],
) -> anyhow::Result<Value> {
    let config = ClientConfig::load(&cluster.dir.join(CLIENT_CONFIG_FILE))?;
    let client = Client::connect(config.clone()).await?;
    let registering = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..n)
        .map(|i| {
            let port = ports[i % ports.len()];
            let check = CheckSpec {
                interval_ms,
                timeout_ms: 1000.min(interval_ms),
                rise: 2,
                fall: 3,
                ..CheckSpec::new(format!("http://127.0.0.1:{port}/i/{i}"))
            };
            client
                .register_persistent(
                    format!("checks/svc/{}", i % SERVICES),
                    format!("i{i}"),
                    vec![format!("127.0.0.1:{port}").into()],
                )
                .check(check)
                .send()
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let registration = registering.elapsed();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        bail!("registering persistent instances: {e}");
    }
    client.close().await;
    until("every instance probed once", async || {
        probes.unprobed_since(registering) == 0
    })
    .await?;
    let first_checks = registering.elapsed();

    // The steady state, from one scrape to the next.
    let admins = data_admins(cluster)?;
    let servers = cluster.processes();
    let cpu = |servers: &[(String, u32)]| -> Vec<(String, f64, u64)> {
        servers
            .iter()
            .filter_map(|(name, pid)| {
                let s = proc_stats::read(*pid)?;
                Some((name.clone(), s.cpu_seconds, s.rss_kib))
            })
            .collect()
    };
    let (before, _) = scrape(&admins).await;
    let cpu_before = cpu(&servers);
    let probes_before = probes.total.load(Ordering::Relaxed);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration.max(1))).await;
    let seconds = window.elapsed().as_secs_f64();
    let probes_after = probes.total.load(Ordering::Relaxed);
    let cpu_after = cpu(&servers);
    let (after, unhealthy) = scrape(&admins).await;
    let per_server: Vec<Value> = cpu_after
        .iter()
        .map(|(name, cpu, rss)| {
            let was = cpu_before
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or(0.0, |b| b.1);
            json!({"name": name, "cpu_cores": round2((cpu - was) / seconds), "rss_kib": rss})
        })
        .collect();
    let rss_total: u64 = cpu_after.iter().map(|s| s.2).sum();

    // A full restart from the directories.
    if let Some(e) = cluster.stop().await {
        bail!("stopping the cluster: {e}");
    }
    let restarting = Instant::now();
    let [metas, datas, sessions] = super::roster::cluster_shape(&args.cluster)?;
    *cluster = LocalCluster::start(
        &cluster.dir.clone(),
        metas,
        datas,
        sessions,
        !args.insecure_no_auth,
        Some("warn,openraft=off"),
        &CancellationToken::new(),
        false,
    )
    .await?;
    let ready = restarting.elapsed();
    let config = ClientConfig::load(&cluster.dir.join(CLIENT_CONFIG_FILE))?;
    until("every instance served after the restart", async || {
        served(&config).await == n as u64
    })
    .await?;
    let back = restarting.elapsed();
    until("every instance probed after the restart", async || {
        probes.unprobed_since(restarting) == 0
    })
    .await?;
    let checked = restarting.elapsed();

    Ok(json!({
        "scenario": "health checks",
        "target": format!("roster {}", args.cluster),
        "parameters": {
            "instances": n,
            "services": SERVICES,
            "check": "http",
            "interval_ms": interval_ms,
            "http_servers": ports.len(),
            "steady_seconds": round2(seconds),
        },
        "registration": {
            "seconds": round2(registration.as_secs_f64()),
            "per_second": (n as f64 / registration.as_secs_f64()).round(),
        },
        "first_checks_seconds": round2(first_checks.as_secs_f64()),
        "steady": {
            "probes_per_second": ((probes_after - probes_before) as f64 / seconds).round(),
            "expected_per_second": (n as f64 * 1000.0 / interval_ms as f64).round(),
            "probe_latency_ms": {
                "p50": quantile_ms(&before, &after, 0.5),
                "p99": quantile_ms(&before, &after, 0.99),
            },
            "unhealthy": unhealthy,
            "servers": per_server,
            "server_rss_kib_total": rss_total,
        },
        "restart": {
            "ready_seconds": round2(ready.as_secs_f64()),
            "all_served_seconds": round2(back.as_secs_f64()),
            "all_checked_seconds": round2(checked.as_secs_f64()),
        },
    }))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn print_table(report: &Value) {
    let p = &report["parameters"];
    let s = &report["steady"];
    let r = &report["restart"];
    println!(
        "{} persistent instances, HTTP checks every {} ms, {} ({} services)",
        p["instances"], p["interval_ms"], report["target"], p["services"]
    );
    println!(
        "registration          {} /s ({} s)",
        report["registration"]["per_second"], report["registration"]["seconds"]
    );
    println!(
        "every instance probed {} s after registering began",
        report["first_checks_seconds"]
    );
    println!(
        "steady probes         {} /s (expected {}), latency p50 {} ms, p99 {} ms, unhealthy {}",
        s["probes_per_second"],
        s["expected_per_second"],
        s["probe_latency_ms"]["p50"],
        s["probe_latency_ms"]["p99"],
        s["unhealthy"]
    );
    for server in s["servers"].as_array().into_iter().flatten() {
        println!(
            "  {:<10} {} cores, {} MiB",
            server["name"].as_str().unwrap_or("?"),
            server["cpu_cores"],
            server["rss_kib"].as_u64().unwrap_or(0) / 1024
        );
    }
    println!(
        "full restart          servers ready {} s, every instance served {} s, every instance probed {} s",
        r["ready_seconds"], r["all_served_seconds"], r["all_checked_seconds"]
    );
}
