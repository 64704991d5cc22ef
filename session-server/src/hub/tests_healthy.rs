//! Healthy-only subscriptions: what they are shown, and that plain subscribers of the same
//! service are not affected.

use roster_common::frame::{DEFAULT_MAX_FRAME, HEADER_LEN, decode};
use roster_common::health::Health;
use roster_common::proto::{PublisherView, Push};

use super::*;

fn svc() -> ServiceId {
    "db".parse().unwrap()
}

fn checked(reg: &str, healthy: bool) -> (PubKey, Bytes) {
    let view = PublisherView {
        client_id: "~persistent".into(),
        register_id: reg.into(),
        data: vec![Bytes::copy_from_slice(reg.as_bytes())],
        attributes: Default::default(),
        client_version: 1,
        persistent: true,
        health: Some(Health {
            healthy,
            checked_ms: 1,
            failure: (!healthy).then(|| "connection refused".into()),
        }),
    };
    (
        (view.client_id.clone(), view.register_id.clone()),
        encode_publisher(&view),
    )
}

/// `n` instances, the first `unhealthy` of them unhealthy, at `version`.
fn fleet(n: usize, unhealthy: usize, version: Version) -> Fetched {
    Fetched {
        service: svc(),
        version,
        entries: (0..n)
            .map(|i| checked(&format!("i{i:02}"), i >= unhealthy))
            .collect(),
    }
}

fn pushes(hub: &mut Hub, conn: ConnId) -> Vec<Push> {
    hub.take_pushes(conn, Instant::now())
        .expect("attached")
        .frames
        .into_iter()
        .map(|o| decode::<Push>(&o.frame[HEADER_LEN..]).unwrap())
        .collect()
}

fn shown(push: &Push) -> (Version, Vec<(String, bool)>) {
    let Push::Snapshot(s) = push else {
        panic!("a healthy-only subscriber gets snapshots, not {push:?}")
    };
    let publishers = s
        .publishers
        .iter()
        .map(|p| (p.register_id.clone(), p.health.as_ref().unwrap().healthy))
        .collect();
    (s.version, publishers)
}

/// Connection 1 subscribed healthy-only, connection 2 plainly (with deltas), to "db".
fn hub() -> Hub {
    let mut hub = Hub::new(DEFAULT_MAX_FRAME, Duration::ZERO);
    hub.attach(1, true, Arc::new(Notify::new()));
    hub.attach(2, true, Arc::new(Notify::new()));
    hub.subscribe_with(1, "h".into(), svc(), true);
    hub.subscribe(2, "p".into(), svc());
    hub
}

#[test]
fn a_healthy_only_subscriber_is_shown_the_healthy_ones_until_too_many_are_unhealthy() {
    let mut hub = hub();
    // 2 of 10 unhealthy: the 8 others are shown.
    hub.fetched(fleet(10, 2, 1), Instant::now());
    let [first] = &pushes(&mut hub, 1)[..] else {
        panic!()
    };
    let (version, publishers) = shown(first);
    assert_eq!(version, 1);
    assert_eq!(publishers.len(), 8);
    assert!(publishers.iter().all(|(_, healthy)| *healthy));
    // The plain subscriber sees all 10, marked.
    let [Push::Snapshot(all)] = &pushes(&mut hub, 2)[..] else {
        panic!()
    };
    assert_eq!(all.publishers.len(), 10);

    // 8 of 10 unhealthy, above the default half: all 10 are shown, marked.
    hub.fetched(fleet(10, 8, 2), Instant::now());
    let [second] = &pushes(&mut hub, 1)[..] else {
        panic!()
    };
    let (version, publishers) = shown(second);
    assert_eq!(version, 2);
    assert_eq!(publishers.len(), 10);
    assert_eq!(publishers.iter().filter(|(_, h)| !h).count(), 8);
}

#[test]
fn a_health_change_reaches_both_kinds_of_subscriber() {
    let mut hub = hub();
    hub.fetched(fleet(4, 0, 1), Instant::now());
    pushes(&mut hub, 1);
    pushes(&mut hub, 2);
    // One instance falls.
    let (key, bytes) = checked("i00", false);
    let applied = hub.apply(
        Change {
            service: svc(),
            prev: 1,
            version: 2,
            op: Op::Put(key, bytes),
        },
        Instant::now(),
    );
    assert_eq!(applied, Applied::Done);
    let [healthy_only] = &pushes(&mut hub, 1)[..] else {
        panic!()
    };
    let (version, publishers) = shown(healthy_only);
    assert_eq!(version, 2);
    assert_eq!(
        publishers
            .iter()
            .map(|(r, _)| r.as_str())
            .collect::<Vec<_>>(),
        ["i01", "i02", "i03"]
    );
    // The plain subscriber gets the change as a delta, the fallen instance marked.
    let [Push::Delta(delta)] = &pushes(&mut hub, 2)[..] else {
        panic!("a plain subscriber keeps its deltas")
    };
    assert_eq!((delta.base, delta.version), (1, 2));
    assert_eq!(delta.put.len(), 1);
    assert_eq!(delta.put[0].health.as_ref().map(|h| h.healthy), Some(false));
}

#[test]
fn the_threshold_is_the_servers_setting() {
    let mut hub = hub();
    hub.set_protection_threshold(0.9);
    hub.fetched(fleet(10, 8, 1), Instant::now());
    let [push] = &pushes(&mut hub, 1)[..] else {
        panic!()
    };
    // 8 of 10 is not above 90 %: only the 2 healthy ones.
    assert_eq!(shown(push).1.len(), 2);
}
