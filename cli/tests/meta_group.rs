//! The meta tier as a Raft group of real `roster meta` processes: election and failover under
//! `kill -9`, restart from disk, a node joining from a snapshot, refusal of another cluster's node,
//! and losing the quorum.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roster_common::proto::{Member, MetaRequest, MetaResponse, Role};
use roster_common::{Error, ErrorCode};
use serde_json::Value;
use support::{
    Cluster, cluster_status, create_token, http_status, meta_call, run, run_within, wait_for,
};

const START: Duration = Duration::from_secs(30);

/// These tests each run several processes with sub-second election timeouts; run them one at a
/// time so they do not starve each other of the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A meta group: the meta nodes of a [`Cluster`], by id.
trait Group {
    /// The leader's status, once some live node answers as the leader of a created cluster.
    fn leader_status(&self, deadline: Duration) -> Value;
    /// Node `id`'s own view of the group.
    fn local_status(&self, id: u64) -> Option<Value>;
}

impl Group for Cluster {
    fn leader_status(&self, deadline: Duration) -> Value {
        wait_for(deadline, "a meta leader", || {
            self.status().filter(|s| {
                s["from_leader"] == true && s["cluster_id"].as_str().is_some_and(|c| !c.is_empty())
            })
        })
    }

    fn local_status(&self, id: u64) -> Option<Value> {
        cluster_status(self.cwd(), &[&self.addr("meta", id)], true)
    }
}

/// A group of `n` meta nodes started with `extra`, without data or session servers.
fn group(n: usize, extra: &[&str]) -> Cluster {
    Cluster::builder()
        .metas(n)
        .datas(0)
        .sessions(0)
        .meta_args(extra)
        .start()
}

/// The id of the cluster the meta node at `addr` leads, once it has been created.
fn created_cluster(cwd: &Path, addr: &str) -> String {
    wait_for(START, "the cluster created", || {
        cluster_status(cwd, &[addr], false).and_then(|s| {
            s["cluster_id"]
                .as_str()
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
        })
    })
}

/// The ids of the cluster's tokens, as `roster acl token list --json` gives them.
fn token_ids(cwd: &Path, metas: &str) -> Vec<String> {
    let (ok, out, err) = run(
        cwd,
        &[
            "acl",
            "token",
            "list",
            "--json",
            "--meta",
            metas,
            "--tls-dir",
            "tls",
        ],
    );
    assert!(ok, "roster acl token list: {err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["auth"], true);
    list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

/// `(role, id, instance)` of every member in a status, sorted.
fn members(status: &Value) -> Vec<(String, u64, u64)> {
    let mut out: Vec<_> = status["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| {
            (
                l["role"].as_str().unwrap().to_owned(),
                l["id"].as_u64().unwrap(),
                l["instance"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn fake_member(role: Role, id: u64) -> Member {
    Member {
        role,
        id,
        instance: 1000 + id,
        addr: format!("10.9.9.9:{}", 7000 + id),
        zone: String::new(),
        joined_at_ms: 0,
        version: String::new(),
    }
}

#[test]
fn leader_failover_keeps_every_member_and_acl_and_all_metas_restart_from_disk() {
    let _serial = serial();
    // Authentication on: every voter is given the same admin token.
    let mut group = Cluster::builder()
        .auth(true)
        .metas(3)
        .datas(0)
        .sessions(0)
        .start();
    let cwd = group.cwd().to_owned();
    let cwd = cwd.as_path();
    let admin_token = group.admin_token.clone().unwrap();
    let status = group.leader_status(START);
    let cluster = status["cluster_id"].as_str().unwrap().to_owned();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3);

    group.add("data", &[]);
    group.add("session", &[]);
    let (data_http, session_http) = (group.http("data", 1), group.http("session", 1));
    let before = wait_for(START, "both members registered", || {
        group
            .leader_status(START)
            .as_object()
            .cloned()
            .filter(|s| s["leases"].as_array().unwrap().len() == 2)
    });
    let before = Value::Object(before);
    let (members_before, epoch_before) =
        (members(&before), before["table_epoch"].as_u64().unwrap());
    for http in [&data_http, &session_http] {
        wait_for(START, "members ready", || {
            (http_status(http, "/readyz", None) == 200).then_some(())
        });
    }

    // Watch both members' readiness through the failover.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (stop, failures) = (stop.clone(), failures.clone());
        let urls = [data_http.clone(), session_http.clone()];
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for url in &urls {
                    let code = http_status(url, "/readyz", None);
                    if code != 200 {
                        failures.lock().unwrap().push((url.clone(), code));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // A token is created (acknowledged), and the leader is killed at once: kill -9 the leader,
    // a new one within 2 s.
    let metas = group.meta_list();
    let token = create_token(cwd, &metas, "prod", "subscribe", &[]);
    let old_leader = before["leader"].as_u64().unwrap();
    let start = Instant::now();
    group.kill("meta", old_leader);
    // A survivor that says it leads, in its own words.
    let new_leader = wait_for(Duration::from_secs(10), "a new leader", || {
        (1..=3u64).filter(|id| *id != old_leader).find(|id| {
            group
                .local_status(*id)
                .is_some_and(|s| s["leader"] == *id && s["answered_by"] == *id)
        })
    });
    let failover = start.elapsed();
    println!("new meta leader {new_leader} after {failover:?}");
    assert!(
        failover < Duration::from_secs(2),
        "failover took {failover:?}"
    );

    // For more than a lease period after, nobody is expired and the table stays.
    let observe_until = Instant::now() + Duration::from_millis(4_000);
    while Instant::now() < observe_until {
        if let Some(status) = group.status().filter(|s| s["from_leader"] == true) {
            assert_eq!(
                members(&status),
                members_before,
                "a member was expired during the failover"
            );
            assert_eq!(
                status["table_epoch"].as_u64().unwrap(),
                epoch_before,
                "the table changed"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let token_id = &token[4..20];
    assert!(
        token_ids(cwd, &group.live_metas().join(",")).contains(&token_id.to_owned()),
        "the token acknowledged before the leader was killed is kept"
    );
    assert!(
        failures.lock().unwrap().is_empty(),
        "members were not ready during the failover: {:?}",
        failures.lock().unwrap()
    );

    // All three killed and restarted from disk: the same cluster, members and table epoch.
    group.restart("meta", old_leader);
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != old_leader).collect();
    for id in survivors {
        group.kill("meta", id);
    }
    group.kill("meta", old_leader);
    for id in 1..=3 {
        group.restart("meta", id);
    }
    let restarted = wait_for(START, "the restarted group with both members", || {
        group
            .leader_status(START)
            .as_object()
            .cloned()
            .filter(|s| s["leases"].as_array().unwrap().len() == 2)
    });
    let restarted = Value::Object(restarted);
    let ids = token_ids(cwd, &metas);
    assert_eq!(ids.len(), 2, "the admin token and the one created: {ids:?}");
    assert!(ids.contains(&token_id.to_owned()));
    // The members learn the rules again from the restarted group: /admin wants the admin token.
    wait_for(
        START,
        "the session's /admin to check the admin token",
        || (http_status(&session_http, "/admin", Some(&admin_token)) == 200).then_some(()),
    );
    assert_eq!(http_status(&session_http, "/admin", None), 401);
    assert_eq!(http_status(&data_http, "/admin", Some(&token)), 403);
    assert_eq!(restarted["cluster_id"].as_str().unwrap(), cluster);
    assert_eq!(members(&restarted), members_before);
    assert_eq!(restarted["table_epoch"].as_u64().unwrap(), epoch_before);
}

#[test]
fn a_new_node_joins_from_a_snapshot_and_the_group_is_operated() {
    let _serial = serial();
    let flags = [
        "--snapshot-every",
        "20",
        "--keep-behind-snapshot",
        "5",
        "--lease-timeout-ms",
        "60000",
    ];
    let mut group = group(3, &flags);
    let cwd = group.cwd().to_owned();
    let cwd = cwd.as_path();
    let leader = group.leader_status(START);
    let leader_addr = group.addr("meta", leader["leader"].as_u64().unwrap());

    // Make the log long enough that it was snapshotted and compacted.
    let tls = cwd.join("tls");
    for id in 1..=30 {
        let member = fake_member(Role::Session, id);
        let registered = meta_call(
            &tls,
            &leader_addr,
            &MetaRequest::Register {
                member: member.clone(),
                cluster_id: None,
            },
        );
        assert!(
            matches!(registered, Ok(MetaResponse::Registered { .. })),
            "{registered:?}"
        );
        if id % 2 == 0 {
            let left = meta_call(
                &tls,
                &leader_addr,
                &MetaRequest::Leave {
                    role: member.role,
                    id,
                    instance: member.instance,
                },
            );
            assert!(matches!(left, Ok(MetaResponse::Done {})), "{left:?}");
        }
    }
    let compacted = wait_for(START, "a compacted log", || {
        group
            .leader_status(START)
            .as_object()
            .cloned()
            .filter(|s| s["purged_index"].as_u64().is_some_and(|p| p > 0))
    });
    let purged = compacted["purged_index"].as_u64().unwrap();

    // A fresh node joins through a follower, catches up from the snapshot, becomes a voter.
    let follower = (1..=3u64)
        .find(|id| Some(*id) != leader["leader"].as_u64())
        .unwrap();
    let joiner = group.add("meta", &["--join", &group.addr("meta", follower)]);
    assert_eq!(joiner, 4);
    let addr4 = group.addr("meta", 4);
    let all = group.meta_addrs();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_for(START, "node 4 a caught-up voter", || {
        let status = cluster_status(cwd, &all, false).filter(|s| s["from_leader"] == true)?;
        let node = status["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["id"] == 4)?
            .clone();
        (node["voter"] == true && node["lag"] == 0).then_some(())
    });
    let local = cluster_status(cwd, &[&addr4], true).expect("node 4 answers");
    assert!(
        local["snapshots_installed"].as_u64().unwrap() >= 1,
        "node 4 caught up from a snapshot: {local}"
    );
    assert!(local["last_applied"].as_u64().unwrap() >= purged);
    assert_eq!(local["cluster_id"], leader["cluster_id"]);

    // A learner: joins and stays a learner until an operator promotes it.
    let learner = group.add("meta", &["--join", &leader_addr, "--learner"]);
    assert_eq!(learner, 5);
    let addr5 = group.addr("meta", 5);
    let node5 = |status: &Value| {
        status["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == 5).cloned())
    };
    wait_for(START, "node 5 a learner", || {
        let status = cluster_status(cwd, &all, false)?;
        node5(&status).filter(|n| n["voter"] == false && n["lag"] == 0)
    });
    let list = all.join(",");
    let cluster = |args: &[&str]| {
        let mut full = vec!["cluster"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--meta", &list, "--tls-dir", "tls"]);
        let (ok, out, err) = run_within(cwd, &full, Duration::from_secs(60));
        assert!(ok, "roster {full:?}: {err}");
        out
    };
    cluster(&["add-meta", &addr5]);
    let status = cluster_status(cwd, &all, false).unwrap();
    assert_eq!(
        node5(&status).unwrap()["voter"],
        true,
        "add-meta promoted the learner"
    );
    cluster(&["remove-meta", "5"]);
    let status = cluster_status(cwd, &all, false).unwrap();
    assert!(node5(&status).is_none(), "node 5 removed: {status}");

    // Leadership moves on request.
    cluster(&["transfer-leader", "4"]);
    wait_for(Duration::from_secs(10), "node 4 leading", || {
        cluster_status(cwd, &all, false).filter(|s| s["leader"] == 4 && s["from_leader"] == true)
    });
    let text = cluster(&["status"]);
    assert!(text.contains("leader 4"), "{text}");
    drop(group);
}

#[test]
fn a_node_with_another_clusters_data_is_refused() {
    let _serial = serial();
    // Cluster A: one node.
    let meta_a = group(1, &[]);
    let cwd = meta_a.cwd();
    let a = meta_a.addr("meta", 1);
    let cluster_a = created_cluster(cwd, &a);
    // Cluster B, in the same directory with the same certificates: created, then stopped.
    let mut group_b = Cluster::builder()
        .in_dir(cwd)
        .first_meta_id(2)
        .datas(0)
        .sessions(0)
        .start();
    let b = group_b.addr("meta", 2);
    let data_b = group_b.server("meta", 2).data_dir.clone().unwrap();
    let cluster_b = created_cluster(cwd, &b);
    let mut meta_b = group_b.take("meta", 2);
    meta_b.signal("TERM");
    assert!(meta_b.wait_exit(Duration::from_secs(10)));
    assert_ne!(cluster_a, cluster_b);

    // B's node started to join A: refused at start, naming both clusters.
    let (ok, _, err) = run_within(
        cwd,
        &[
            "meta",
            "--id",
            "2",
            "--listen",
            &b,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            &data_b,
            "--tls-dir",
            "tls",
            "--join",
            &a,
        ],
        Duration::from_secs(20),
    );
    assert!(!ok, "a node of cluster B must not join cluster A");
    assert!(
        err.contains(&cluster_a) && err.contains(&cluster_b),
        "the error names both clusters: {err}"
    );

    // A fresh node without --bootstrap or --join refuses to start.
    let (ok, _, err) = run_within(
        cwd,
        &[
            "meta",
            "--id",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            "c-3",
            "--tls-dir",
            "tls",
        ],
        Duration::from_secs(20),
    );
    assert!(!ok);
    assert!(
        err.contains("--bootstrap") && err.contains("--join"),
        "{err}"
    );
    drop(meta_a);
}

#[test]
fn without_a_quorum_writes_fail_fast_stale_reads_answer_and_nothing_is_lost() {
    let _serial = serial();
    let mut group = group(3, &["--lease-timeout-ms", "60000"]);
    let cwd = group.cwd().to_owned();
    let status = group.leader_status(START);
    let leader = status["leader"].as_u64().unwrap();
    let tls = cwd.join("tls");
    let acknowledged = fake_member(Role::Data, 42);
    let registered = meta_call(
        &tls,
        &group.addr("meta", leader),
        &MetaRequest::Register {
            member: acknowledged.clone(),
            cluster_id: None,
        },
    );
    assert!(
        matches!(registered, Ok(MetaResponse::Registered { .. })),
        "{registered:?}"
    );

    // Two of three down, the leader among them.
    let survivor = (1..=3u64).find(|id| *id != leader).unwrap();
    let other = (1..=3u64)
        .find(|id| *id != leader && *id != survivor)
        .unwrap();
    group.kill("meta", leader);
    group.kill("meta", other);
    wait_for(
        Duration::from_secs(10),
        "the survivor to see no leader",
        || {
            group
                .local_status(survivor)
                .filter(|s| s["leader"].is_null())
        },
    );

    let addr = group.addr("meta", survivor);
    let start = Instant::now();
    let write = meta_call(
        &tls,
        &addr,
        &MetaRequest::Register {
            member: fake_member(Role::Data, 43),
            cluster_id: None,
        },
    );
    assert!(matches!(write, Err(Error::NoQuorum(_))), "{write:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "writes fail fast: {:?}",
        start.elapsed()
    );
    let linear = meta_call(&tls, &addr, &MetaRequest::GetView { stale: false });
    assert!(
        matches!(&linear, Err(e) if e.code() == Some(ErrorCode::NoQuorum)),
        "{linear:?}"
    );
    match meta_call(&tls, &addr, &MetaRequest::GetView { stale: true }) {
        Ok(MetaResponse::View { view, stale }) => {
            assert!(stale, "a local read says it is stale");
            assert!(
                view.member(Role::Data, 42).is_some(),
                "the stale view has what was acknowledged"
            );
        }
        other => panic!("a stale read answers: {other:?}"),
    }

    // They return: nothing acknowledged was lost, and writes work again.
    group.restart("meta", leader);
    group.restart("meta", other);
    group.leader_status(START);
    let view = wait_for(START, "a linearizable read", || {
        match meta_call(&tls, &addr, &MetaRequest::GetView { stale: false }) {
            Ok(MetaResponse::View { view, stale: false }) => Some(view),
            _ => None,
        }
    });
    assert_eq!(
        view.member(Role::Data, 42),
        Some(&Member {
            joined_at_ms: view.member(Role::Data, 42).unwrap().joined_at_ms,
            ..acknowledged
        })
    );
    let write = meta_call(
        &tls,
        &addr,
        &MetaRequest::Register {
            member: fake_member(Role::Data, 44),
            cluster_id: None,
        },
    );
    assert!(
        matches!(write, Ok(MetaResponse::Registered { .. })),
        "{write:?}"
    );
}

#[test]
fn self_preservation_holds_session_expiry_when_too_many_lapse_at_once() {
    let _serial = serial();
    let group = group(1, &["--lease-timeout-ms", "1000"]);
    let cwd = group.cwd().to_owned();
    group.leader_status(START);
    let addr = group.addr("meta", 1);
    let tls = cwd.join("tls");
    let sessions_in = |status: &Value| -> Vec<u64> {
        status["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["role"] == "session")
            .map(|l| l["id"].as_u64().unwrap())
            .collect()
    };

    // Renew a chosen set of fake session servers in the background.
    let renewing: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![]));
    let stop = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (renewing, stop, tls, addr) =
            (renewing.clone(), stop.clone(), tls.clone(), addr.clone());
        std::thread::spawn(move || {
            let client =
                support::MetaClient::connect(&tls, &addr).expect("connect to the meta node");
            while !stop.load(Ordering::Relaxed) {
                let ids = renewing.lock().unwrap().clone();
                for id in ids {
                    let m = fake_member(Role::Session, id);
                    let _ = client.call(&MetaRequest::Renew {
                        role: m.role,
                        id,
                        instance: m.instance,
                        load: None,
                        subscribers: None,
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let register = |id: u64| {
        let answer = meta_call(
            &tls,
            &addr,
            &MetaRequest::Register {
                member: fake_member(Role::Session, id),
                cluster_id: None,
            },
        );
        assert!(
            matches!(answer, Ok(MetaResponse::Registered { .. })),
            "{answer:?}"
        );
    };
    for id in 1..=4 {
        register(id);
    }
    *renewing.lock().unwrap() = vec![1, 2, 3];

    // One of four lapses: it is expired as usual.
    wait_for(START, "session 4 expired", || {
        group
            .leader_status(START)
            .as_object()
            .cloned()
            .filter(|s| sessions_in(&Value::Object(s.clone())) == [1, 2, 3])
    });

    // Six of seven lapse at once: a few may go before the share is crossed, then
    // self-preservation holds the rest.
    for id in 5..=8 {
        register(id);
    }
    *renewing.lock().unwrap() = vec![1, 2, 3, 5, 6, 7, 8];
    wait_for(START, "every lease fresh", || {
        let status = group.leader_status(START);
        let leases = status["leases"].as_array()?.clone();
        (leases.len() == 7
            && leases
                .iter()
                .all(|l| l["remaining_ms"].as_u64() > Some(700)))
        .then_some(())
    });
    *renewing.lock().unwrap() = vec![1];
    let held = wait_for(START, "self-preservation on", || {
        group
            .leader_status(START)
            .as_object()
            .cloned()
            .filter(|s| s["self_preservation"] == true)
    });
    let held = sessions_in(&Value::Object(held));
    assert!(
        held.len() >= 4,
        "most lapsed sessions are held, not expired: {held:?}"
    );
    let observe_until = Instant::now() + Duration::from_millis(2_500);
    while Instant::now() < observe_until {
        let status = group.leader_status(START);
        assert_eq!(
            sessions_in(&status),
            held,
            "nobody is expired while preserving"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Their leases come back: self-preservation ends, everybody held is still there.
    *renewing.lock().unwrap() = held.clone();
    let released = wait_for(START, "self-preservation off", || {
        group
            .leader_status(START)
            .as_object()
            .cloned()
            .filter(|s| s["self_preservation"] == false)
    });
    assert_eq!(sessions_in(&Value::Object(released)), held);
    stop.store(true, Ordering::Relaxed);
    renewer.join().unwrap();
}
