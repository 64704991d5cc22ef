//! `roster bench --checks N`: health checks at scale. Starts a Roster cluster and small HTTP
//! servers in this process, registers N persistent instances each checked by HTTP `GET` against
//! those servers, and measures:
//!
//! - registration: persistent instances stored per second (each one a Raft write), over several
//!   clients at once;
//! - first checks: how long until every instance has been probed once (as the HTTP servers see
//!   it), and until a subscriber sees every instance's health `checked_ms` set;
//! - steady state: probes per second seen by the HTTP servers (against N / interval) and how they
//!   spread over the servers and the instances, the time between two probes of one instance, the
//!   probes' latency as the data servers time them (p50, p99, interpolated in their histogram's
//!   buckets), failed probes and unhealthy instances (both must be 0), and the servers' CPU and
//!   memory;
//! - a full restart: every server stopped, then started again from its directory, keeping its
//!   state; how long until the servers are ready, until a new subscriber (through the new
//!   client.toml) sees every instance again, until every instance has been probed again, and
//!   until that subscriber sees every instance's health checked after the restart.
//!
//! The HTTP servers record, per instance path (`/i/N`), when its last probe arrived and how many
//! came, so "probed" means a probe arrived, whatever the servers report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt as _;
use roster_client::{CheckSpec, Client, ClientConfig, Subscription};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

mod listeners;
mod scrape;

use super::BenchArgs;
use super::proc_stats;
use crate::dev::LocalCluster;
use crate::files::CLIENT_CONFIG_FILE;
use listeners::*;
use scrape::*;

/// HTTP servers the probes are spread over.
const LISTENERS: usize = 8;
/// Services the instances are spread over.
const SERVICES: usize = 100;
/// Clients registering the instances, each its own connection.
const REGISTER_CLIENTS: usize = 8;
/// Registrations in flight at once, over all of those clients.
const IN_FLIGHT: usize = 64;
/// How long any one wait (first checks, a restart) may take.
const SETTLE: Duration = Duration::from_secs(300);
/// A subscriber to every service of the bench.
struct Watcher {
    client: Client,
    subscriptions: Vec<Subscription>,
}

/// What a [`Watcher`] sees.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    publishers: usize,
    /// Publishers whose health was settled by a probe that finished after the time asked about.
    checked: usize,
    unhealthy: usize,
}

impl Watcher {
    async fn start(config: &ClientConfig) -> anyhow::Result<Watcher> {
        let client = Client::connect(config.clone()).await?;
        let mut subscriptions = Vec::new();
        for s in 0..SERVICES {
            subscriptions.push(client.subscribe(service_name(s)).await?);
        }
        Ok(Watcher {
            client,
            subscriptions,
        })
    }

    /// What the latest snapshots hold; `checked` counts health settled after `since_ms` (Unix
    /// milliseconds; 0: ever).
    fn seen(&self, since_ms: u64) -> Seen {
        let mut seen = Seen::default();
        for snapshot in self.subscriptions.iter().filter_map(|s| s.current()) {
            for p in snapshot.publishers.iter() {
                seen.publishers += 1;
                if let Some(h) = &p.health {
                    seen.checked += usize::from(h.checked_ms > since_ms);
                    seen.unhealthy += usize::from(!h.healthy);
                }
            }
        }
        seen
    }

    async fn close(self) {
        drop(self.subscriptions);
        self.client.close().await;
    }
}

fn service_name(s: usize) -> String {
    format!("checks/svc/{s}")
}

/// Polls `goals` every 50 ms until each has held once, or [`SETTLE`] has passed; returns when
/// each first held (`None`: not within [`SETTLE`]).
async fn until_each(goals: &mut [&mut dyn FnMut() -> bool]) -> Vec<Option<Duration>> {
    let start = Instant::now();
    let mut met = vec![None; goals.len()];
    loop {
        for (goal, met) in goals.iter_mut().zip(&mut met) {
            if met.is_none() && goal() {
                *met = Some(start.elapsed());
            }
        }
        if met.iter().all(Option::is_some) || start.elapsed() > SETTLE {
            return met;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(args: &BenchArgs, n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--checks must be at least 1");
    }
    if !(roster_common::health::MIN_INTERVAL_MS..=roster_common::health::MAX_INTERVAL_MS)
        .contains(&args.check_interval_ms)
    {
        bail!(
            "--check-interval-ms must be within {}..={}",
            roster_common::health::MIN_INTERVAL_MS,
            roster_common::health::MAX_INTERVAL_MS
        );
    }
    let [metas, datas, sessions] = super::roster::cluster_shape(&args.cluster)?;
    let dir = tempfile::tempdir().context("cannot create a working directory")?;
    let cluster_dir = dir.path().join("cluster");
    let cancel = CancellationToken::new();
    let mut cluster = LocalCluster::start(
        &cluster_dir,
        metas,
        datas,
        sessions,
        !args.insecure_no_auth,
        Some(SERVER_LOG),
        &cancel,
        true,
    )
    .await?;
    let stop = CancellationToken::new();
    let probes = Arc::new(Probes::new(n));
    let mut ports = Vec::new();
    for index in 0..LISTENERS {
        ports.push(http_server(index, probes.clone(), stop.clone()).await?);
    }
    let result = measure(args, n, &mut cluster, &probes, &ports).await;
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

/// The servers' `RUST_LOG`.
const SERVER_LOG: &str = "warn,openraft=off";

/// Registers instances `0..n` over [`REGISTER_CLIENTS`] clients, [`IN_FLIGHT`] at once.
async fn register(
    config: &ClientConfig,
    n: usize,
    interval_ms: u64,
    ports: &[u16],
) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for _ in 0..REGISTER_CLIENTS.min(n) {
        all.push(Client::connect(config.clone()).await?);
    }
    let clients = &all;
    let mut results = futures_util::stream::iter(0..n)
        .map(|i| async move {
            let port = ports[i % ports.len()];
            let check = CheckSpec {
                interval_ms,
                timeout_ms: 1000.min(interval_ms),
                rise: 2,
                fall: 3,
                ..CheckSpec::new(format!("http://127.0.0.1:{port}/i/{i}"))
            };
            clients[i % clients.len()]
                .register_persistent(
                    service_name(i % SERVICES),
                    format!("i{i}"),
                    vec![format!("127.0.0.1:{port}").into()],
                )
                .check(check)
                .send()
                .await
                .with_context(|| format!("registering instance {i}"))
        })
        .buffer_unordered(IN_FLIGHT);
    let mut outcome = Ok(());
    while let Some(result) = results.next().await {
        if let Err(e) = result {
            outcome = Err(e);
            break;
        }
    }
    drop(results);
    for client in all {
        client.close().await;
    }
    outcome
}

/// CPU seconds and RSS of the given processes, by name.
fn usage(processes: &[(String, u32)]) -> Vec<(String, f64, u64)> {
    processes
        .iter()
        .filter_map(|(name, pid)| {
            let s = proc_stats::read(*pid)?;
            Some((name.clone(), s.cpu_seconds, s.rss_kib))
        })
        .collect()
}

fn seconds(d: Option<Duration>) -> Option<f64> {
    d.map(|d| round2(d.as_secs_f64()))
}

async fn measure(
    args: &BenchArgs,
    n: usize,
    cluster: &mut LocalCluster,
    probes: &Arc<Probes>,
    ports: &[u16],
) -> anyhow::Result<Value> {
    let interval_ms = args.check_interval_ms;
    let quiet = args.json;
    let say = |what: &str| {
        if !quiet {
            eprintln!("{what}");
        }
    };
    let config = ClientConfig::load(&cluster.dir.join(CLIENT_CONFIG_FILE))?;

    // Registration, then the first probe of each instance, and its health as a subscriber sees it.
    say(&format!("registering {n} persistent instances"));
    let registering = Instant::now();
    register(&config, n, interval_ms, ports).await?;
    let registration = registering.elapsed();
    let watcher = Watcher::start(&config).await?;
    say("waiting for every instance's first check");
    let first = until_each(
        &mut [&mut || probes.unprobed_since(registering) == 0, &mut || {
            watcher.seen(0).checked == n
        }],
    )
    .await;
    let first_missing = probes.unprobed_since(registering);
    let first_seen = watcher.seen(0);
    let first_probe = first[0].map(|d| d + registration);
    let first_health = first[1].map(|d| d + registration);

    // The steady state, from one scrape to the next.
    say(&format!("steady state: {} s", args.duration.max(1)));
    let admins = data_admins(cluster)?;
    let mut servers = cluster.processes();
    servers.push(("bench".to_owned(), std::process::id()));
    let before = scrape(&admins).await;
    let cpu_before = usage(&servers);
    let tally_before = probes.tally();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration.max(1))).await;
    let window_seconds = window.elapsed().as_secs_f64();
    let tally_after = probes.tally();
    let cpu_after = usage(&servers);
    let after = scrape(&admins).await;
    let steady_seen = watcher.seen(0);
    watcher.close().await;

    let per_server: Vec<Value> = cpu_after
        .iter()
        .map(|(name, cpu, rss)| {
            let was = cpu_before
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or(0.0, |b| b.1);
            json!({"name": name, "cpu_cores": round2((cpu - was) / window_seconds), "rss_kib": rss})
        })
        .collect();
    let rss_total: u64 = cpu_after
        .iter()
        .filter(|s| s.0 != "bench")
        .map(|s| s.2)
        .sum();
    let per_listener: Vec<u64> = tally_after
        .per_listener
        .iter()
        .zip(&tally_before.per_listener)
        .map(|(a, b)| ((a - b) as f64 / window_seconds).round() as u64)
        .collect();
    let per_instance: Vec<u32> = tally_after
        .per_instance
        .iter()
        .zip(&tally_before.per_instance)
        .map(|(a, b)| a - b)
        .collect();
    let (gap_q, gap_max) = gap_quantiles(&tally_before.gaps, &tally_after.gaps, &[0.5, 0.99]);
    let checks = delta(&before.checks, &after.checks);
    let per_data_server: Vec<Option<u64>> = after
        .per_server
        .iter()
        .zip(&before.per_server)
        .map(|(a, b)| Some(((a.as_ref()? - b.as_ref()?) / window_seconds).round() as u64))
        .collect();
    let failures = delta(&before.failures, &after.failures);
    let probe_mean_ms = {
        let count = after.duration_count - before.duration_count;
        (count > 0.0).then(|| round3((after.duration_sum - before.duration_sum) / count * 1e3))
    };

    // A full restart from the directories, state kept.
    say("full restart");
    let stopping = Instant::now();
    if let Some(e) = cluster.stop().await {
        bail!("stopping the cluster: {e}");
    }
    let stopped = stopping.elapsed();
    let restart_ms = roster_common::unix_millis();
    let restarting = Instant::now();
    let [metas, datas, sessions] = super::roster::cluster_shape(&args.cluster)?;
    *cluster = LocalCluster::start(
        &cluster.dir.clone(),
        metas,
        datas,
        sessions,
        !args.insecure_no_auth,
        Some(SERVER_LOG),
        &CancellationToken::new(),
        false,
    )
    .await?;
    let ready = restarting.elapsed();
    if !cluster.resumed {
        bail!("the cluster started afresh instead of resuming its state");
    }
    // From here on, three things are awaited at once: every instance probed again (at the HTTP
    // servers), and through a new subscriber every instance served, and its health seen checked
    // after the restart.
    let config = ClientConfig::load(&cluster.dir.join(CLIENT_CONFIG_FILE))?;
    let tally_restart = probes.tally();
    let mut watcher: Option<Watcher> = None;
    let mut last = Seen::default();
    let (mut connected, mut probed_again, mut served, mut reported) = (None, None, None, None);
    loop {
        if watcher.is_none()
            && let Ok(w) = Watcher::start(&config).await
        {
            connected = Some(restarting.elapsed());
            watcher = Some(w);
        }
        if probed_again.is_none() && probes.unprobed_since(restarting) == 0 {
            probed_again = Some(restarting.elapsed());
        }
        if let Some(w) = &watcher {
            last = w.seen(restart_ms);
            if served.is_none() && last.publishers == n {
                served = Some(restarting.elapsed());
            }
            if reported.is_none() && last.checked == n {
                reported = Some(restarting.elapsed());
            }
        }
        if (probed_again.is_some() && served.is_some() && reported.is_some())
            || restarting.elapsed() > SETTLE
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restart_missing = probes.unprobed_since(restarting);
    let tally_back = probes.tally();
    if let Some(w) = watcher {
        w.close().await;
    }

    Ok(json!({
        "scenario": "health checks",
        "target": format!("roster {}", args.cluster),
        "parameters": {
            "instances": n,
            "services": SERVICES,
            "check": "http",
            "interval_ms": interval_ms,
            "timeout_ms": 1000.min(interval_ms),
            "rise": 2,
            "fall": 3,
            "http_servers": ports.len(),
            "register_clients": REGISTER_CLIENTS.min(n),
            "register_in_flight": IN_FLIGHT,
            "steady_seconds": round2(window_seconds),
        },
        "registration": {
            "seconds": round2(registration.as_secs_f64()),
            "per_second": (n as f64 / registration.as_secs_f64()).round() as u64,
        },
        "first_checks_seconds": seconds(first_probe),
        "first_checks": {
            "all_probed_seconds": seconds(first_probe),
            "all_health_seen_seconds": seconds(first_health),
            "not_probed": first_missing,
            "all_health_seen_after_registered_seconds": seconds(first[1]),
            "health_seen": first_seen.checked,
            "from": "the start of the registration",
        },
        "steady": {
            "probes_per_second": ((tally_after.total - tally_before.total) as f64 / window_seconds).round(),
            "expected_per_second": round2(n as f64 * 1000.0 / interval_ms as f64),
            "stray_requests": tally_after.stray - tally_before.stray,
            "per_http_server_per_second": per_listener,
            "per_data_server_per_second": per_data_server,
            "slots_led_per_data_server": after.led,
            "per_instance_probes": {
                "expected": round2(window_seconds * 1000.0 / interval_ms as f64),
                "min": per_instance.iter().min(),
                "max": per_instance.iter().max(),
                "none": per_instance.iter().filter(|c| **c == 0).count(),
            },
            "gap_between_probes_ms": {"p50": gap_q[0], "p99": gap_q[1], "max": gap_max},
            "probe_latency_ms": {
                "p50": quantile_ms(&before.buckets, &after.buckets, 0.5).map(round3),
                "p99": quantile_ms(&before.buckets, &after.buckets, 0.99).map(round3),
                "mean": probe_mean_ms,
            },
            "probes_by_result": checks,
            "failures_by_reason": failures,
            "unhealthy": after.unhealthy,
            "unhealthy_seen_by_subscriber": steady_seen.unhealthy,
            "persistent_instances_gauge": after.persistent,
            "data_servers_scraped": after.answered,
            "servers": per_server,
            "server_rss_kib_total": rss_total,
        },
        "restart": {
            "stop_seconds": round2(stopped.as_secs_f64()),
            "ready_seconds": round2(ready.as_secs_f64()),
            "subscriber_connected_seconds": seconds(connected),
            "all_served_seconds": seconds(served),
            "all_checked_seconds": seconds(probed_again),
            "all_health_seen_seconds": seconds(reported),
            "not_probed": restart_missing,
            "served": last.publishers,
            "health_seen": last.checked,
            "probes_until_all_seen": tally_back.total - tally_restart.total,
            "from": "every server stopped",
        },
    }))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_table(report: &Value) {
    let p = &report["parameters"];
    let f = &report["first_checks"];
    let s = &report["steady"];
    let r = &report["restart"];
    println!(
        "{} persistent instances, HTTP checks every {} ms, {} ({} services, {} HTTP servers)",
        p["instances"],
        p["interval_ms"],
        report["target"].as_str().unwrap_or("?"),
        p["services"],
        p["http_servers"]
    );
    println!(
        "registration          {} /s ({} s, {} clients)",
        report["registration"]["per_second"],
        report["registration"]["seconds"],
        p["register_clients"]
    );
    println!(
        "first checks          every instance probed {} s, its health seen by a subscriber {} s after registering began ({} s after the last registration)",
        f["all_probed_seconds"],
        f["all_health_seen_seconds"],
        f["all_health_seen_after_registered_seconds"]
    );
    println!(
        "steady probes         {} /s (expected {}), per HTTP server {}, per data server {} (slots led {})",
        s["probes_per_second"],
        s["expected_per_second"],
        s["per_http_server_per_second"],
        s["per_data_server_per_second"],
        s["slots_led_per_data_server"]
    );
    let i = &s["per_instance_probes"];
    let g = &s["gap_between_probes_ms"];
    println!(
        "  per instance        {}..{} probes (expected {}), {} never; gap between probes p50 {} ms, p99 {} ms, max {} ms",
        i["min"], i["max"], i["expected"], i["none"], g["p50"], g["p99"], g["max"]
    );
    println!(
        "  probe latency       p50 {} ms, p99 {} ms, mean {} ms; probes {}, failures {}, unhealthy {}",
        s["probe_latency_ms"]["p50"],
        s["probe_latency_ms"]["p99"],
        s["probe_latency_ms"]["mean"],
        s["probes_by_result"],
        s["failures_by_reason"],
        s["unhealthy"]
    );
    for server in s["servers"].as_array().into_iter().flatten() {
        println!(
            "  {:<10}          {} cores, {} MiB",
            server["name"].as_str().unwrap_or("?"),
            server["cpu_cores"],
            server["rss_kib"].as_u64().unwrap_or(0) / 1024
        );
    }
    println!(
        "full restart          stopped in {} s; then servers ready {} s, every instance served {} s, probed {} s, its health seen {} s",
        r["stop_seconds"],
        r["ready_seconds"],
        r["all_served_seconds"],
        r["all_checked_seconds"],
        r["all_health_seen_seconds"]
    );
}
