//! Persistent instances and health checks, end to end: real server processes, real listeners for
//! the checks to probe (a TCP acceptor, an HTTP server that can be told to answer 500), kill -9.
//!
//! - health changes are pushed: healthy → unhealthy after `fall` failures → healthy after `rise`,
//!   for a persistent instance registered with `roster register` and for an ephemeral publisher
//!   that opted into a check; a port nobody listens on is unhealthy with a reason
//! - protection: a healthy-only subscriber is shown only healthy instances, until more than half
//!   are unhealthy; then all of them, marked
//! - durability: 1,000 persistent instances survive kill -9 of the meta leader and of a data
//!   server, then kill -9 of every process and a restart from their directories, checks running
//! - checks move: a check follows its slot to a new data server and, when the server running it
//!   is killed, to a survivor within seconds, never probed by two servers at once

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use roster_client::{CheckSpec, Client, PublisherView, Snapshot, SubscribeOptions};
use support::targets::{Target, dead_addr};
use support::{Cluster, START, cluster_status, http_get, roster, run, wait_for, wait_ready};

/// How long a health change may take to reach a subscriber: `fall` (or `rise`) intervals, a
/// probe timeout, and the push, on a loaded machine.
const CHANGE_WITHIN: Duration = Duration::from_secs(15);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A check of `target` every `interval_ms`, timing out at half of it, rise 2, fall 3.
fn check(target: impl Into<String>, interval_ms: u64) -> CheckSpec {
    CheckSpec {
        interval_ms,
        timeout_ms: interval_ms / 2,
        rise: 2,
        fall: 3,
        ..CheckSpec::new(target)
    }
}

/// The publisher `id` of `snapshot`, whoever published it.
fn publisher<'a>(snapshot: &'a Snapshot, id: &str) -> Option<&'a PublisherView> {
    snapshot.publishers.iter().find(|p| p.register_id == id)
}

/// Whether `id` has been probed at least once and found `healthy`.
fn checked_as(snapshot: &Snapshot, id: &str, healthy: bool) -> bool {
    publisher(snapshot, id)
        .and_then(|p| p.health.as_ref())
        .is_some_and(|h| h.checked_ms != 0 && h.healthy == healthy)
}

/// `id`'s last failure reason, if any.
fn failure(snapshot: &Snapshot, id: &str) -> Option<String> {
    publisher(snapshot, id)?.health.as_ref()?.failure.clone()
}

#[test]
fn health_changes_are_pushed_and_a_dead_port_is_unhealthy() {
    let cluster = Cluster::builder().start();
    let session = cluster.addr("session", 1);
    let config = cluster.client_toml("c", &[&session], "");
    let web = Target::http();
    let dead = dead_addr();
    let cli = |args: &[&str]| {
        let mut full = args.to_vec();
        full.extend(["--config", &config]);
        let (ok, out, err) = run(cluster.cwd(), &full);
        assert!(ok, "roster {args:?}: {err}");
        out
    };
    let health_url = web.url("/health");
    cli(&[
        "register",
        "web",
        &web.host_port(),
        "--id",
        "w1",
        "--check",
        &health_url,
        "--interval",
        "200ms",
        "--timeout",
        "100ms",
    ]);
    cli(&[
        "register",
        "db",
        &dead,
        "--id",
        "d1",
        "--check",
        "tcp",
        "--interval",
        "200ms",
        "--timeout",
        "100ms",
    ]);
    // The CLI subscriber prints every snapshot as a JSON line.
    let printed = roster(
        "roster subscribe web",
        cluster.cwd(),
        &["subscribe", "web", "--config", &config],
    );

    runtime().block_on(async {
        let mut subscriber_config = cluster.client_config(None);
        subscriber_config.refuse_empty = false;
        let subscriber = Client::connect(subscriber_config).await.unwrap();
        let web_sub = subscriber.subscribe("web").await.unwrap();
        let db_sub = subscriber.subscribe("db").await.unwrap();

        let first = web_sub
            .wait_for(|s| checked_as(s, "w1", true), CHANGE_WITHIN)
            .await
            .expect("the first probe's result");
        let w1 = publisher(&first, "w1").unwrap();
        assert!(w1.persistent, "registered instances are marked persistent");
        assert_eq!(w1.data, vec![Bytes::from(web.host_port())]);
        assert!(web.probe_count() >= 1, "the listener saw the probe");

        web.answer_with(500);
        let failed_at = Instant::now();
        let down = web_sub
            .wait_for(|s| checked_as(s, "w1", false), CHANGE_WITHIN)
            .await
            .expect("unhealthy after `fall` failed probes");
        assert_eq!(failure(&down, "w1").as_deref(), Some("HTTP 500"));
        // Three failures in a row at 200 ms: not before the third.
        let failures = web
            .probes_of("/health")
            .into_iter()
            .filter(|at| *at >= failed_at)
            .count();
        assert!(
            failures >= 3,
            "unhealthy after {failures} failed probes; fall is 3"
        );
        assert!(down.version > first.version, "a health change is a change");

        let line = printed.line_matching(CHANGE_WITHIN, "an unhealthy web in the CLI", |l| {
            l.contains("\"healthy\":false")
        });
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        let shown = &json["publishers"][0];
        assert_eq!(shown["persistent"], true, "{line}");
        assert_eq!(shown["failure"], "HTTP 500", "{line}");
        assert_ne!(shown["checked_ms"], 0, "{line}");

        let (ok, out, err) = run(cluster.cwd(), &["ls", "--json", "--config", &config]);
        assert!(ok, "{err}");
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let row = |name: &str| {
            rows.as_array()
                .unwrap()
                .iter()
                .find(|r| r["service"].as_str().unwrap().ends_with(name))
                .cloned()
                .unwrap_or_else(|| panic!("ls lacks {name}: {out}"))
        };
        assert_eq!(row("/web")["healthy"], 0, "{out}");
        assert_eq!(row("/web")["publishers"], 1, "{out}");

        web.answer_with(200);
        let up = web_sub
            .wait_for(|s| checked_as(s, "w1", true), CHANGE_WITHIN)
            .await
            .expect("healthy again after `rise` good probes");
        assert_eq!(
            failure(&up, "w1"),
            None,
            "a healthy instance has no failure"
        );

        // Nobody listens on the port: refused, and unhealthy.
        let db = db_sub
            .wait_for(|s| checked_as(s, "d1", false), CHANGE_WITHIN)
            .await
            .expect("a dead port is unhealthy");
        let reason = failure(&db, "d1").unwrap();
        assert!(reason.contains("refused"), "reason: {reason}");

        // An ephemeral publisher opts into the same check.
        let publisher_client = Client::connect(cluster.client_config(None)).await.unwrap();
        let _publication = publisher_client
            .publisher("eph")
            .register_id("e1")
            .check(check("tcp", 200))
            .publish(vec![Bytes::from(dead.clone())])
            .await
            .unwrap();
        let eph_sub = subscriber.subscribe("eph").await.unwrap();
        let eph = eph_sub
            .wait_for(|s| checked_as(s, "e1", false), CHANGE_WITHIN)
            .await
            .expect("a checked ephemeral publisher marked unhealthy");
        assert!(!publisher(&eph, "e1").unwrap().persistent);

        // Deregistered: gone from the snapshot, and its probes stop.
        cli(&["deregister", "web", "w1"]);
        web_sub
            .wait_for(|s| s.publishers.is_empty(), CHANGE_WITHIN)
            .await
            .expect("the deregistered instance gone");
        let count = web.probe_count();
        wait_for(CHANGE_WITHIN, "the probes of w1 to stop", || {
            // Two intervals without a new probe, after the one that may have been under way.
            let quiet = web
                .probes()
                .last()
                .is_some_and(|at| at.elapsed() > Duration::from_millis(600));
            quiet.then_some(())
        });
        assert!(
            web.probe_count() <= count + 1,
            "probes went on after deregistration"
        );

        publisher_client.close().await;
        subscriber.close().await;
    });
}

#[test]
fn protection_gives_a_healthy_only_subscriber_every_instance_marked() {
    let cluster = Cluster::builder().start();
    let targets: Vec<Target> = (0..10).map(|_| Target::http()).collect();
    runtime().block_on(async {
        let registrar = Client::connect(cluster.client_config(None)).await.unwrap();
        for (i, target) in targets.iter().enumerate() {
            registrar
                .register_persistent("guarded", format!("g{i}"), vec![target.host_port().into()])
                .check(CheckSpec {
                    rise: 1,
                    fall: 2,
                    ..check(target.url("/"), 200)
                })
                .await
                .unwrap();
        }
        let watcher = Client::connect(cluster.client_config(None)).await.unwrap();
        let all = watcher.subscribe("guarded").await.unwrap();
        let picky = Client::connect(cluster.client_config(None)).await.unwrap();
        let healthy_only = picky
            .subscribe_with("guarded", SubscribeOptions { healthy_only: true })
            .await
            .unwrap();
        let ids = |s: &Snapshot| {
            let mut ids: Vec<String> = s.publishers.iter().map(|p| p.register_id.clone()).collect();
            ids.sort();
            ids
        };
        let unhealthy = |s: &Snapshot| {
            s.publishers
                .iter()
                .filter(|p| p.health.as_ref().is_some_and(|h| !h.healthy))
                .count()
        };
        all.wait_for(
            |s| (0..10).all(|i| checked_as(s, &format!("g{i}"), true)),
            CHANGE_WITHIN,
        )
        .await
        .expect("every instance checked healthy");
        healthy_only
            .wait_for(|s| s.publishers.len() == 10, CHANGE_WITHIN)
            .await
            .unwrap();

        // Three of ten unhealthy: below the threshold, they are left out.
        for target in &targets[..3] {
            target.answer_with(503);
        }
        all.wait_for(|s| unhealthy(s) == 3, CHANGE_WITHIN)
            .await
            .expect("three unhealthy");
        let shown = healthy_only
            .wait_for(|s| s.publishers.len() == 7, CHANGE_WITHIN)
            .await
            .expect("the healthy seven");
        assert_eq!(unhealthy(&shown), 0);
        assert_eq!(ids(&shown), ["g3", "g4", "g5", "g6", "g7", "g8", "g9"]);

        // Eight of ten: protection gives all ten, the eight marked.
        for target in &targets[3..8] {
            target.answer_with(503);
        }
        all.wait_for(|s| unhealthy(s) == 8, CHANGE_WITHIN)
            .await
            .expect("eight unhealthy");
        let protected = healthy_only
            .wait_for(
                |s| s.publishers.len() == 10 && unhealthy(s) == 8,
                CHANGE_WITHIN,
            )
            .await
            .expect("all ten, eight marked unhealthy");
        for i in 0..8 {
            assert_eq!(
                failure(&protected, &format!("g{i}")).as_deref(),
                Some("HTTP 503")
            );
        }

        // Healed: all ten, all healthy.
        for target in &targets {
            target.answer_with(200);
        }
        healthy_only
            .wait_for(
                |s| s.publishers.len() == 10 && unhealthy(s) == 0,
                CHANGE_WITHIN,
            )
            .await
            .expect("all ten healthy again");
        for client in [registrar, watcher, picky] {
            client.close().await;
        }
    });
}

/// The meta group's leader, once there is one.
fn meta_leader(cluster: &Cluster) -> u64 {
    wait_for(START, "a meta leader", || {
        let metas = cluster.live_metas();
        let metas: Vec<&str> = metas.iter().map(String::as_str).collect();
        cluster_status(cluster.cwd(), &metas, false)?["leader"].as_u64()
    })
}

/// The persistent instances data server `id` lists as checked by it (`/admin/persistent`): their
/// ids.
fn checked_by(cluster: &Cluster, id: u64) -> Vec<String> {
    let Some((200, body)) = http_get(&format!("{}/admin/persistent", cluster.http("data", id)))
    else {
        return Vec::new();
    };
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some(p["id"].as_str()?.to_owned()))
        .collect()
}

const SERVICES: usize = 10;
const PER_SERVICE: usize = 100;

/// Waits until every service shows its `PER_SERVICE` persistent instances, each checked healthy
/// at or after `since_ms` (unix milliseconds), to a new client of `cluster`.
async fn wait_all_back(cluster: &Cluster, since_ms: u64, deadline: Duration) {
    let client = Client::connect(cluster.client_config(None)).await.unwrap();
    for s in 0..SERVICES {
        let sub = client.subscribe(format!("dur-{s}")).await.unwrap();
        let back = |snapshot: &Snapshot| {
            snapshot.publishers.len() == PER_SERVICE
                && snapshot.publishers.iter().all(|p| {
                    p.persistent
                        && p.health
                            .as_ref()
                            .is_some_and(|h| h.healthy && h.checked_ms >= since_ms)
                })
        };
        let snapshot = sub
            .wait_for(back, deadline)
            .await
            .unwrap_or_else(|e| panic!("dur-{s}: not every instance back and checked: {e}"));
        for i in 0..PER_SERVICE {
            let p = publisher(&snapshot, &format!("i{i}")).expect("every id");
            assert_eq!(p.data, vec![Bytes::from(format!("10.1.{s}.{i}:80"))]);
            assert_eq!(
                p.attributes.get("n").map(String::as_str),
                Some(&*i.to_string())
            );
        }
    }
    client.close().await;
}

#[test]
fn a_thousand_persistent_instances_survive_kill_9_and_a_full_restart() {
    let mut cluster = Cluster::builder().metas(3).datas(2).start();
    cluster.wait_members(2, 1);
    let target = Target::http();
    let rt = runtime();
    let registered_ms = roster_common::unix_millis();
    rt.block_on(async {
        let client = Client::connect(cluster.client_config(None)).await.unwrap();
        let all: Vec<(usize, usize)> = (0..SERVICES)
            .flat_map(|s| (0..PER_SERVICE).map(move |i| (s, i)))
            .collect();
        let results: Vec<_> = futures_util::stream::iter(all)
            .map(|(s, i)| {
                client
                    .register_persistent(
                        format!("dur-{s}"),
                        format!("i{i}"),
                        vec![format!("10.1.{s}.{i}:80").into()],
                    )
                    .attribute("n", i.to_string())
                    .check(check(target.url(&format!("/{s}/{i}")), 5_000))
                    .send()
            })
            .buffer_unordered(64)
            .collect()
            .await;
        for result in results {
            result.expect("registered");
        }
        client.close().await;
        wait_all_back(&cluster, registered_ms, START).await;
    });

    // kill -9 the meta leader (it holds the committed copy everyone follows) and the data server
    // leading most of the instances (it runs their checks and serves them to sessions).
    let leader = meta_leader(&cluster);
    cluster.kill("meta", leader);
    let busiest = (1..=2)
        .max_by_key(|id| checked_by(&cluster, *id).len())
        .unwrap();
    assert!(!checked_by(&cluster, busiest).is_empty());
    cluster.kill("data", busiest);
    let new_leader = meta_leader(&cluster);
    assert_ne!(new_leader, leader);
    rt.block_on(async {
        // Everything the killed data server led is checked again by the survivor.
        wait_all_back(&cluster, 0, START).await;
        // And the meta group still takes registrations.
        let client = Client::connect(cluster.client_config(None)).await.unwrap();
        client
            .register_persistent("dur-extra", "x", vec!["10.9.9.9:80".into()])
            .await
            .expect("a registration after the failover");
        client.close().await;
    });
    let survivor = 3 - busiest;
    wait_for(START, "the survivor checking every instance", || {
        (checked_by(&cluster, survivor).len() > SERVICES * PER_SERVICE).then_some(())
    });

    // kill -9 every process, then start each again from its directory.
    let everyone: Vec<(&'static str, u64)> = cluster
        .servers_mut()
        .filter(|s| s.running())
        .map(|s| (s.role, s.id))
        .collect();
    for (role, id) in &everyone {
        cluster.kill(role, *id);
    }
    let restarted = Instant::now();
    let restarted_ms = roster_common::unix_millis();
    for role in ["meta", "data", "session"] {
        let ids: Vec<u64> = cluster.of(role).map(|s| s.id).collect();
        for id in ids {
            if !cluster.server(role, id).running() {
                cluster.restart(role, id);
            }
        }
    }
    for role in ["data", "session"] {
        let ids: Vec<u64> = cluster.of(role).map(|s| s.id).collect();
        for id in ids {
            wait_ready(&cluster.http(role, id));
        }
    }
    rt.block_on(wait_all_back(&cluster, restarted_ms, START));
    println!(
        "all {} instances back and checked {:?} after every process was restarted",
        SERVICES * PER_SERVICE,
        restarted.elapsed()
    );
    let probed = target.paths_since(restarted);
    let missing = (0..SERVICES)
        .flat_map(|s| (0..PER_SERVICE).map(move |i| format!("/{s}/{i}")))
        .filter(|path| !probed.contains(path))
        .count();
    assert_eq!(missing, 0, "instances not probed since the restart");
}

#[test]
fn a_check_moves_with_its_slot_and_never_runs_twice() {
    const INSTANCES: usize = 12;
    const INTERVAL: Duration = Duration::from_millis(400);
    let mut cluster = Cluster::builder().datas(3).start();
    cluster.wait_members(3, 1);
    let target = Target::http();
    let path = |i: usize| format!("/mv/{i}");
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(cluster.client_config(None)).await.unwrap();
        // One service each, so that their slots spread over the data servers.
        for i in 0..INSTANCES {
            client
                .register_persistent(
                    format!("mv-{i}"),
                    format!("m{i}"),
                    vec!["10.2.0.1:80".into()],
                )
                .check(check(target.url(&path(i)), INTERVAL.as_millis() as u64))
                .await
                .unwrap();
        }
        client.close().await;
    });
    let probed_twice = || (0..INSTANCES).all(|i| target.probes_of(&path(i)).len() >= 2);
    wait_for(START, "every instance probed twice", || {
        probed_twice().then_some(())
    });
    let checker = |cluster: &Cluster, i: usize| -> Vec<u64> {
        cluster
            .of("data")
            .filter(|s| s.running())
            .map(|s| s.id)
            .filter(|id| checked_by(cluster, *id).contains(&format!("m{i}")))
            .collect()
    };

    // A fourth data server takes some slots from running servers: their checks move with them.
    let added = cluster.add("data", &[]);
    wait_ready(&cluster.http("data", added));
    let moved = wait_for(START, "a check moved to the new data server", || {
        let moved: Vec<usize> = (0..INSTANCES)
            .filter(|i| checker(&cluster, *i) == [added])
            .collect();
        (!moved.is_empty()).then_some(moved)
    });
    let settled = Instant::now();
    wait_for(START, "moved checks probed by the new server", || {
        moved
            .iter()
            .all(|i| {
                target
                    .probes_of(&path(*i))
                    .iter()
                    .filter(|at| **at > settled)
                    .count()
                    >= 3
            })
            .then_some(())
    });

    // kill -9 the server checking m0: a survivor takes the check over within seconds.
    let victim = wait_for(START, "one server checking m0", || {
        match checker(&cluster, 0)[..] {
            [id] => Some(id),
            _ => None,
        }
    });
    let victims: Vec<usize> = (0..INSTANCES)
        .filter(|i| checked_by(&cluster, victim).contains(&format!("m{i}")))
        .collect();
    cluster.kill("data", victim);
    let killed = Instant::now();
    let resumed = wait_for(START, "the killed server's checks run elsewhere", || {
        let firsts: Option<Vec<Duration>> = victims
            .iter()
            .map(|i| {
                let probes = target.probes_of(&path(*i));
                probes
                    .iter()
                    .find(|at| **at > killed)
                    .map(|at| *at - killed)
            })
            .collect();
        firsts.map(|f| f.into_iter().max().unwrap())
    });
    println!(
        "{} checks of the killed data server ran again {resumed:?} after kill -9",
        victims.len()
    );
    assert!(
        resumed < Duration::from_secs(10),
        "checks resumed only {resumed:?} after their server was killed"
    );
    // A few more intervals of the new arrangement, then look at every probe of every instance.
    let after = Instant::now();
    wait_for(START, "every instance probed three more times", || {
        (0..INSTANCES)
            .all(|i| {
                target
                    .probes_of(&path(i))
                    .iter()
                    .filter(|at| **at > after)
                    .count()
                    >= 3
            })
            .then_some(())
    });
    // One server probes every interval; two at once would probe about twice as often. A handover
    // may bring one probe early, so any four intervals hold at most six probes.
    let mut worst = HashMap::new();
    for i in 0..INSTANCES {
        let probes = target.probes_of(&path(i));
        let most = probes
            .iter()
            .map(|start| {
                probes
                    .iter()
                    .filter(|at| **at >= *start && **at - *start < INTERVAL * 4)
                    .count()
            })
            .max()
            .unwrap_or(0);
        worst.insert(i, most);
    }
    println!(
        "most probes of one instance in four intervals: {}",
        worst.values().max().unwrap()
    );
    let doubled: Vec<_> = worst.iter().filter(|(_, n)| **n > 6).collect();
    assert!(
        doubled.is_empty(),
        "instances probed more than six times in four intervals (checked twice at once): {doubled:?}"
    );
}
