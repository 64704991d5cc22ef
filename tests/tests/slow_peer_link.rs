//! A slow link made through a session server's fault table: every call session 1 makes to data 1
//! waits first, while clients publish and unpublish through session 1 and subscribe through both
//! sessions. Writes to data 1's services are slower by the delay but still acknowledged durable;
//! every subscriber converges to exactly the live publishers while the link is slow and after it
//! heals, and over everything recorded versions only grow and no publisher live throughout goes
//! missing. Also: a member skips a meta node that answers nothing within a lease.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use roster_client::{Client, Publication};
use roster_common::ServiceId;
use roster_common::peers::FaultTable;
use roster_tests::{
    Cluster, ClusterOptions, DEADLINE, PublisherKey, SnapshotLog, check_history, eventually, keys,
};

/// How long each call from session 1 to data 1 waits (well under the 5 s request timeout).
const DELAY: Duration = Duration::from_millis(300);
/// Services taken from each data server's slots.
const PER_DATA: usize = 2;

/// Two services led by data 1 and two by data 2, from the table in force.
async fn services(cluster: &Cluster) -> (Vec<String>, BTreeSet<String>) {
    let view = cluster.view().await;
    let mut by_leader: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let name = format!("slow/svc/s{i}");
        let id: ServiceId = name.parse().unwrap();
        let leader = view.table.leader_of(&id).expect("every slot led");
        let picked = by_leader.entry(leader).or_default();
        if picked.len() < PER_DATA {
            picked.push(name);
        }
        if by_leader.len() == 2 && by_leader.values().all(|v| v.len() == PER_DATA) {
            break;
        }
    }
    let on_data1: BTreeSet<String> = by_leader[&1].iter().cloned().collect();
    (by_leader.into_values().flatten().collect(), on_data1)
}

/// What each service's subscribers must end with: the live publishers.
fn expected(
    services: &[String],
    live: &[(Client, Publication)],
) -> BTreeMap<String, BTreeSet<PublisherKey>> {
    let mut out: BTreeMap<String, BTreeSet<PublisherKey>> = services
        .iter()
        .map(|s| (s.clone(), BTreeSet::new()))
        .collect();
    for (client, p) in live {
        out.get_mut(p.service().as_str())
            .unwrap()
            .insert((client.client_id().to_owned(), p.register_id().to_owned()));
    }
    out
}

/// Waits until every subscriber's latest snapshot of every service holds exactly `want`.
async fn converge(
    what: &str,
    logs: &[(usize, String, SnapshotLog)],
    want: &BTreeMap<String, BTreeSet<PublisherKey>>,
) {
    for (s, svc, log) in logs {
        log.wait_for(&format!("subscriber {s} of {svc} exact {what}"), |snap| {
            keys(snap) == want[svc]
        })
        .await;
    }
}

/// A new client on `config`'s session publishes one instance of `service`; how long it took.
async fn join(
    config: &roster_client::ClientConfig,
    service: &str,
    n: usize,
) -> ((Client, Publication), Duration) {
    let client = Client::connect(config.clone()).await.unwrap();
    let start = Instant::now();
    let publication = client
        .publish(service, vec![format!("10.0.1.{n}:80").into()])
        .await
        .unwrap();
    ((client, publication), start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_link_from_a_session_to_a_data_server_delays_writes_but_loses_nothing() {
    let faults = FaultTable::new();
    let cluster = Cluster::start_with(ClusterOptions {
        datas: 2,
        sessions: 2,
        session_faults: vec![faults.clone()],
        ..Default::default()
    })
    .await;
    // Data 2 joined second: the rebalance hands it its share of the slots.
    eventually(DEADLINE, "both data servers leading slots", || async {
        let view = cluster.view().await;
        (view.table.led_by(1).count() > 0 && view.table.led_by(2).count() > 0).then_some(())
    })
    .await;
    let (services, on_data1) = services(&cluster).await;
    let config = |i: usize| {
        let mut config = cluster.client_config();
        config.sessions = vec![cluster.session_addrs[i].to_string()];
        config
    };

    // Subscribers on both sessions, to every service.
    let mut subscribers = Vec::new();
    let mut logs = Vec::new();
    for s in 0..2 {
        let client = Client::connect(config(s)).await.unwrap();
        for svc in &services {
            let log = SnapshotLog::start(client.subscribe(svc).await.unwrap());
            logs.push((s, svc.clone(), log));
        }
        subscribers.push(client);
    }

    // A stayer and a leaver per service, through session 1, before the link slows.
    let mut n = 0;
    let mut stayers = Vec::new();
    let mut leavers = Vec::new();
    for svc in &services {
        stayers.push(join(&config(0), svc, n).await.0);
        leavers.push(join(&config(0), svc, n + 1).await.0);
        n += 2;
    }
    let mut live: Vec<(Client, Publication)> = Vec::new();
    live.append(&mut stayers);
    let stayer_count = live.len();
    live.append(&mut leavers);
    converge("at the start", &logs, &expected(&services, &live)).await;

    // Slow the link from session 1 to data 1: one more publisher per service joins through
    // session 1, and the leavers go.
    let data1 = cluster.data_addrs[0].to_string();
    faults.delay_calls(&data1, DELAY);
    let mut slowed = 0;
    for svc in &services {
        let (joined, took) = join(&config(0), svc, n).await;
        n += 1;
        assert!(
            joined.1.is_durable(),
            "{svc}: a publish over the slow link is acknowledged durable ({took:?})"
        );
        if on_data1.contains(svc) {
            assert!(
                took >= DELAY,
                "{svc}: a write to data 1 waited out the delay ({took:?})"
            );
            slowed += 1;
        }
        live.push(joined);
    }
    assert_eq!(slowed, PER_DATA);
    for (client, publication) in live.drain(stayer_count..stayer_count + services.len()) {
        publication.unpublish().await.unwrap();
        client.close().await;
    }
    converge("while the link is slow", &logs, &expected(&services, &live)).await;

    // Heal: one more publisher per service, at full speed again.
    faults.heal(&data1);
    for svc in &services {
        let (joined, _) = join(&config(0), svc, n).await;
        n += 1;
        live.push(joined);
    }
    converge("after healing", &logs, &expected(&services, &live)).await;

    // Over everything recorded: versions only grow, and from the first snapshot holding them all,
    // no stayer is ever missing.
    let stable = expected(&services, &live[..stayer_count]);
    let mut checked = 0;
    for (s, svc, log) in logs {
        let seen = log.finish();
        if let Err(e) = check_history(&seen, &BTreeSet::new()) {
            panic!("subscriber {s}: {e}");
        }
        let from = seen
            .iter()
            .position(|snap| stable[&svc].is_subset(&keys(snap)))
            .unwrap_or_else(|| panic!("subscriber {s} never saw every stayer of {svc}"));
        if let Err(e) = check_history(&seen[from..], &stable[&svc]) {
            panic!("subscriber {s}: {e}");
        }
        checked += seen.len();
    }
    println!("{checked} snapshots checked");

    for (client, publication) in live {
        drop(publication);
        client.close().await;
    }
    for client in subscribers {
        client.close().await;
    }
    cluster.stop().await;
}

/// A member whose first configured meta node answers nothing (down, its address black-holed)
/// joins through the next within a lease: dialing a silent meta node gives up after a second
/// rather than the whole request timeout, which, met twice while the meta group fails over, would
/// outlast the member's lease and have a live member declared dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_skips_a_silent_meta_node_within_a_lease() {
    let cluster = Cluster::start().await;
    let silent = roster_tests::bind_loopback();
    let metas = vec![
        silent.local_addr().unwrap().to_string(),
        cluster.meta_addr.to_string(),
    ];
    let server = roster_session::SessionServer::new(
        roster_session::SessionConfig::new(2, metas),
        cluster.identity.clone(),
    )
    .unwrap();
    let mut ready = server.ready();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(roster_tests::bind_loopback(), stop.clone()));
    let started = Instant::now();
    tokio::time::timeout(DEADLINE, ready.wait_for(|r| *r))
        .await
        .expect("the session server joins through the second meta node")
        .unwrap();
    let joined = started.elapsed();
    // The lease is 3 s; the request timeout, which dialing used to wait, 5 s.
    assert!(
        joined < Duration::from_secs(3),
        "joined after {joined:?}, past a lease"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    cluster.stop().await;
}
