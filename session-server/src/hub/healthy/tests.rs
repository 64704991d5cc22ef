//! Healthy-only subscriptions: what they are shown, when the protection switches, and that plain
//! subscribers of the same service keep their deltas.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use roster_common::frame::{DEFAULT_MAX_FRAME, HEADER_LEN, decode};
use roster_common::health::Health;
use roster_common::proto::{PublisherView, Push};
use roster_common::push::{Replica, encode_publisher};
use roster_common::{ServiceId, Version};
use tokio::sync::Notify;

use super::HealthIndex;
use crate::hub::Pacing;
use crate::hub::{Applied, Change, ConnId, Fetched, Hub, Op, PubKey};

fn svc() -> ServiceId {
    "db".parse().unwrap()
}

/// Instance `reg`, checked and found `healthy`, or unchecked (`None`).
fn instance(reg: &str, healthy: Option<bool>) -> (PubKey, Bytes) {
    let view = PublisherView {
        client_id: "~persistent".into(),
        register_id: reg.into(),
        data: vec![Bytes::copy_from_slice(reg.as_bytes())],
        attributes: Default::default(),
        client_version: 1,
        persistent: true,
        health: healthy.map(|healthy| Health {
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

fn name(i: usize) -> String {
    format!("i{i:02}")
}

/// `n` checked instances at `version`, the first `unhealthy` of them unhealthy.
fn fleet(n: usize, unhealthy: usize, version: Version) -> Fetched {
    Fetched {
        service: svc(),
        version,
        entries: (0..n)
            .map(|i| instance(&name(i), Some(i >= unhealthy)))
            .collect(),
    }
}

/// Instance `i` checked again: `healthy` or not, as the change from `prev` to `prev + 1`.
fn turns(i: usize, healthy: bool, prev: Version) -> Change {
    let (key, bytes) = instance(&name(i), Some(healthy));
    Change {
        service: svc(),
        prev,
        version: prev + 1,
        op: Op::Put(key, bytes),
    }
}

fn frames(hub: &mut Hub, conn: ConnId) -> Vec<Bytes> {
    hub.take_pushes(conn, Instant::now(), Duration::from_millis(1))
        .expect("attached")
        .frames
        .into_iter()
        .map(|o| o.frame)
        .collect()
}

fn pushes(hub: &mut Hub, conn: ConnId) -> Vec<Push> {
    frames(hub, conn)
        .iter()
        .map(|f| decode::<Push>(&f[HEADER_LEN..]).unwrap())
        .collect()
}

/// The one push due on `conn`, which must be a snapshot: its version and, per publisher shown,
/// its register id and whether it is healthy.
fn shown(hub: &mut Hub, conn: ConnId) -> (Version, Vec<(String, bool)>) {
    let got = pushes(hub, conn);
    let [Push::Snapshot(s)] = &got[..] else {
        panic!("a healthy-only subscriber gets one snapshot, not {got:?}")
    };
    let publishers = s
        .publishers
        .iter()
        .map(|p| {
            let healthy = p.health.as_ref().is_none_or(|h| h.healthy);
            (p.register_id.clone(), healthy)
        })
        .collect();
    (s.version, publishers)
}

/// Connection 1 subscribed healthy-only, connection 2 plainly, both taking deltas, to "db".
fn hub() -> Hub {
    let mut hub = Hub::new(DEFAULT_MAX_FRAME, Pacing::NONE);
    hub.attach(1, true, Arc::new(Notify::new()));
    hub.attach(2, true, Arc::new(Notify::new()));
    assert!(hub.subscribe_with(1, "h".into(), svc(), true).first);
    hub.subscribe(2, "p".into(), svc());
    hub
}

#[test]
fn two_unhealthy_of_ten_are_hidden_and_eight_of_ten_are_all_shown() {
    let mut hub = hub();
    hub.fetched(fleet(10, 2, 1), Instant::now());
    let (version, publishers) = shown(&mut hub, 1);
    assert_eq!(version, 1);
    assert_eq!(publishers.len(), 8);
    assert!(publishers.iter().all(|(_, healthy)| *healthy));
    let got = pushes(&mut hub, 2);
    let [Push::Snapshot(all)] = &got[..] else {
        panic!("expected the first snapshot, got {got:?}")
    };
    assert_eq!(
        all.publishers.len(),
        10,
        "a plain subscriber sees every one"
    );

    // 8 of 10 unhealthy, above the default half: all 10, each marked.
    hub.fetched(fleet(10, 8, 2), Instant::now());
    let (version, publishers) = shown(&mut hub, 1);
    assert_eq!(version, 2);
    assert_eq!(publishers.len(), 10);
    assert_eq!(publishers.iter().filter(|(_, healthy)| !healthy).count(), 8);
}

#[test]
fn a_transition_pushes_a_new_snapshot_and_plain_subscribers_keep_their_deltas() {
    let mut hub = hub();
    let mut replica = Replica::default();
    hub.fetched(fleet(4, 0, 1), Instant::now());
    for push in pushes(&mut hub, 1) {
        replica.apply(push).unwrap();
    }
    pushes(&mut hub, 2);

    assert_eq!(hub.apply(turns(0, false, 1), Instant::now()), Applied::Done);
    let got = pushes(&mut hub, 1);
    let [Push::Snapshot(s)] = &got[..] else {
        panic!("expected a snapshot, got {got:?}")
    };
    let regs: Vec<&str> = s
        .publishers
        .iter()
        .map(|p| p.register_id.as_str())
        .collect();
    assert_eq!((s.version, regs), (2, vec!["i01", "i02", "i03"]));
    for push in got {
        replica.apply(push).unwrap();
    }

    let got = pushes(&mut hub, 2);
    let [Push::Delta(delta)] = &got[..] else {
        panic!("a plain subscriber keeps its deltas, got {got:?}")
    };
    assert_eq!((delta.base, delta.version), (1, 2));
    assert_eq!(delta.put.len(), 1);
    assert_eq!(delta.put[0].health.as_ref().map(|h| h.healthy), Some(false));

    // Back up: shown again.
    hub.apply(turns(0, true, 2), Instant::now());
    let (version, publishers) = shown(&mut hub, 1);
    assert_eq!((version, publishers.len()), (3, 4));
    assert!(matches!(&pushes(&mut hub, 2)[..], [Push::Delta(d)] if d.base == 2));
}

#[test]
fn one_more_failure_past_the_threshold_shows_every_instance_and_one_recovery_hides_them() {
    let mut hub = hub();
    // 5 of 10 unhealthy is not more than half: the 5 healthy ones.
    hub.fetched(fleet(10, 5, 1), Instant::now());
    assert_eq!(shown(&mut hub, 1).1.len(), 5);
    // A sixth falls: protection on, all 10.
    hub.apply(turns(5, false, 1), Instant::now());
    let (version, publishers) = shown(&mut hub, 1);
    assert_eq!((version, publishers.len()), (2, 10));
    // One recovers: 5 unhealthy again, the 5 healthy ones.
    hub.apply(turns(0, true, 2), Instant::now());
    let (version, publishers) = shown(&mut hub, 1);
    assert_eq!(version, 3);
    let healthy: Vec<&str> = publishers.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(healthy, ["i00", "i06", "i07", "i08", "i09"]);
}

#[test]
fn the_threshold_is_the_servers_setting() {
    let mut hub = hub();
    hub.set_protection_threshold(0.9);
    hub.fetched(fleet(10, 8, 1), Instant::now());
    // 8 of 10 is not above 90 %: only the 2 healthy ones.
    assert_eq!(shown(&mut hub, 1).1.len(), 2);

    let mut hub = self::hub();
    hub.set_protection_threshold(0.0);
    hub.fetched(fleet(10, 1, 1), Instant::now());
    // At 0 any unhealthy instance shows them all.
    assert_eq!(shown(&mut hub, 1).1.len(), 10);
}

#[test]
fn unchecked_publishers_count_as_healthy() {
    let mut hub = hub();
    let entries = [
        instance("a", None),
        instance("b", Some(false)),
        instance("c", None),
    ];
    hub.fetched(
        Fetched {
            service: svc(),
            version: 1,
            entries: entries.into_iter().collect(),
        },
        Instant::now(),
    );
    let (_, publishers) = shown(&mut hub, 1);
    let regs: Vec<&str> = publishers.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(regs, ["a", "c"]);
}

#[test]
fn healthy_only_subscribers_share_one_frame_which_is_the_plain_snapshot_while_none_is_unhealthy() {
    let mut hub = hub();
    hub.attach(3, false, Arc::new(Notify::new()));
    hub.subscribe_with(3, "h".into(), svc(), true);
    hub.attach(4, false, Arc::new(Notify::new()));
    hub.subscribe(4, "p".into(), svc());
    hub.fetched(fleet(6, 1, 1), Instant::now());
    let (one, three) = (frames(&mut hub, 1), frames(&mut hub, 3));
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].as_ptr(), three[0].as_ptr(), "built once, shared");

    hub.apply(turns(0, true, 1), Instant::now());
    let (healthy_only, plain) = (frames(&mut hub, 1), frames(&mut hub, 4));
    assert_eq!(healthy_only.len(), 1);
    assert_eq!(
        healthy_only[0].as_ptr(),
        plain[0].as_ptr(),
        "nothing hidden: the plain snapshot itself"
    );
}

#[test]
fn subscribing_again_switches_between_healthy_only_and_plain() {
    let mut hub = hub();
    hub.fetched(fleet(4, 1, 1), Instant::now());
    assert_eq!(shown(&mut hub, 1).1.len(), 3);
    // The same register id, now plain: a full snapshot of all 4, then deltas.
    hub.subscribe_with(1, "h".into(), svc(), false);
    assert_eq!(shown(&mut hub, 1).1.len(), 4);
    hub.apply(turns(1, false, 1), Instant::now());
    assert!(matches!(&pushes(&mut hub, 1)[..], [Push::Delta(_)]));
    // And healthy-only again.
    hub.subscribe(1, "h".into(), svc());
    hub.subscribe_with(1, "h".into(), svc(), true);
    assert_eq!(shown(&mut hub, 1).1.len(), 2);
}

#[test]
fn the_index_follows_changes_as_a_fresh_read_would() {
    let (a, b, c) = (
        instance("a", Some(true)),
        instance("b", Some(false)),
        instance("c", None),
    );
    let mut index = HealthIndex::new([(&a.0, &a.1), (&b.0, &b.1), (&c.0, &c.1)]);
    assert_eq!(index.unhealthy().len(), 1);
    let a_falls = instance("a", Some(false));
    index.note(&Op::Put(a_falls.0.clone(), a_falls.1.clone()));
    index.note(&Op::Removed(b.0.clone()));
    let c_falls = instance("c", Some(false));
    index.note(&Op::Put(c_falls.0.clone(), c_falls.1.clone()));
    let fresh = HealthIndex::new([(&a_falls.0, &a_falls.1), (&c_falls.0, &c_falls.1)]);
    assert_eq!(index.unhealthy(), fresh.unhealthy());
    assert_eq!(index.unhealthy().len(), 2);
}
