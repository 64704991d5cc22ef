use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use roster_common::frame::{DEFAULT_MAX_FRAME, HEADER_LEN, decode};
use roster_common::proto::{PublisherView, Push};
use roster_common::push::{Replica, encode_publisher};

use super::*;

fn svc(name: &str) -> ServiceId {
    name.parse().unwrap()
}

fn key(reg: &str) -> PubKey {
    ("c".into(), reg.into())
}

fn view(reg: &str, data: &str) -> PublisherView {
    PublisherView {
        health: None,
        persistent: false,
        client_id: "c".into(),
        register_id: reg.into(),
        data: vec![Bytes::copy_from_slice(data.as_bytes())],
        attributes: Default::default(),
        client_version: 1,
    }
}

fn put(reg: &str, data: &str) -> Op {
    Op::Put(key(reg), encode_publisher(&view(reg, data)))
}

fn change(service: &str, prev: Version, version: Version, op: Op) -> Change {
    Change {
        service: svc(service),
        prev,
        version,
        op,
    }
}

fn fetched(service: &str, version: Version, entries: &[(&str, &str)]) -> Fetched {
    Fetched {
        service: svc(service),
        version,
        entries: entries
            .iter()
            .map(|(reg, data)| (key(reg), encode_publisher(&view(reg, data))))
            .collect(),
    }
}

/// How late a client answers (see `Pacing`): 2 ms, for a paced window of 20 ms at most.
const LATE: Duration = Duration::from_millis(2);

fn pushes(hub: &mut Hub, conn: ConnId, now: Instant) -> Vec<Push> {
    hub.take_pushes(conn, now, LATE)
        .expect("attached")
        .frames
        .into_iter()
        .map(|o| decode::<Push>(&o.frame[HEADER_LEN..]).unwrap())
        .collect()
}

/// A hub with connection 1 (deltas) subscribed to "a", whose datum is at version 1 with "x".
fn hub_with_one_subscriber(now: Instant) -> Hub {
    let mut hub = Hub::new(DEFAULT_MAX_FRAME, Pacing::NONE);
    hub.attach(1, true, Arc::new(Notify::new()));
    assert!(hub.subscribe(1, "s".into(), svc("a")).first);
    assert!(!hub.fetched(fetched("a", 1, &[("x", "1")]), now));
    hub
}

#[test]
fn a_first_push_is_the_snapshot_then_each_change_is_a_delta() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    let first = pushes(&mut hub, 1, now);
    assert!(matches!(&first[..], [Push::Snapshot(s)] if s.version == 1 && s.publishers.len() == 1));
    assert!(
        pushes(&mut hub, 1, now).is_empty(),
        "nothing due until something changes"
    );

    assert_eq!(
        hub.apply(change("a", 1, 2, put("y", "2")), now),
        Applied::Done
    );
    let second = pushes(&mut hub, 1, now);
    let [Push::Delta(delta)] = &second[..] else {
        panic!("expected one delta, got {second:?}")
    };
    assert_eq!((delta.base, delta.version), (1, 2));
    assert_eq!(delta.put, vec![view("y", "2")]);
    assert!(delta.removed.is_empty());
}

#[test]
fn a_client_without_deltas_gets_snapshots() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    hub.attach(2, false, Arc::new(Notify::new()));
    hub.subscribe(2, "old".into(), svc("a"));
    pushes(&mut hub, 2, now);
    hub.apply(change("a", 1, 2, put("y", "2")), now);
    let got = pushes(&mut hub, 2, now);
    assert!(matches!(&got[..], [Push::Snapshot(s)] if s.version == 2 && s.publishers.len() == 2));
}

#[test]
fn changes_while_a_writer_is_busy_merge_into_one_delta() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    pushes(&mut hub, 1, now);
    hub.apply(change("a", 1, 2, put("y", "2")), now);
    hub.apply(change("a", 2, 3, put("y", "3")), now);
    hub.apply(change("a", 3, 4, put("z", "4")), now);
    hub.apply(change("a", 4, 5, put("w", "5")), now);
    hub.apply(change("a", 5, 6, Op::Removed(key("w"))), now);
    let got = pushes(&mut hub, 1, now);
    let [Push::Delta(delta)] = &got[..] else {
        panic!("expected one merged delta, got {got:?}")
    };
    assert_eq!((delta.base, delta.version), (1, 6));
    assert_eq!(
        delta.put,
        vec![view("y", "3"), view("z", "4")],
        "the last put of y wins"
    );
    assert_eq!(delta.removed, vec![view("w", "").id()]);
}

#[test]
fn the_snapshot_is_sent_when_it_is_smaller_than_the_delta() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    pushes(&mut hub, 1, now);
    // Add ten publishers, then remove all but one: the squashed delta (ten removals, one put)
    // outweighs a one-publisher snapshot.
    let mut version = 1;
    for i in 0..10 {
        hub.apply(
            change("a", version, version + 1, put(&format!("p{i}"), "data")),
            now,
        );
        version += 1;
    }
    hub.apply(
        change("a", version, version + 1, Op::Removed(key("x"))),
        now,
    );
    version += 1;
    for i in 1..10 {
        hub.apply(
            change(
                "a",
                version,
                version + 1,
                Op::Removed(key(&format!("p{i}"))),
            ),
            now,
        );
        version += 1;
    }
    let got = pushes(&mut hub, 1, now);
    assert!(
        matches!(&got[..], [Push::Snapshot(s)] if s.version == version && s.publishers.len() == 1),
        "{got:?}"
    );
}

#[test]
fn a_gap_fetches_and_the_changes_meanwhile_are_replayed() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    pushes(&mut hub, 1, now);
    // Version 2 was lost: 3 does not follow 1.
    assert_eq!(
        hub.apply(change("a", 2, 3, put("z", "3")), now),
        Applied::Fetch
    );
    assert_eq!(
        hub.apply(change("a", 3, 4, put("w", "4")), now),
        Applied::Held
    );
    assert!(
        pushes(&mut hub, 1, now).is_empty(),
        "nothing is pushed from a copy with a hole"
    );
    // The fetch answers version 3; the held change to 4 is replayed on top.
    assert!(!hub.fetched(fetched("a", 3, &[("x", "1"), ("y", "2"), ("z", "3")]), now));
    assert_eq!(hub.version(&svc("a")), Some(4));
    let got = pushes(&mut hub, 1, now);
    let [Push::Delta(delta)] = &got[..] else {
        panic!("the fetched datum still reaches subscribers as a delta: {got:?}")
    };
    assert_eq!((delta.base, delta.version), (1, 4));
    assert_eq!(delta.put.len(), 3);
    assert_eq!(
        hub.apply(change("a", 4, 5, put("v", "5")), now),
        Applied::Done
    );
}

#[test]
fn a_fetch_that_misses_a_held_change_asks_for_another() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    assert_eq!(
        hub.apply(change("a", 3, 4, put("z", "4")), now),
        Applied::Fetch
    );
    // The fetch answers version 2; the held change needs 3.
    assert!(hub.fetched(fetched("a", 2, &[("x", "1")]), now));
    assert!(!hub.fetched(fetched("a", 4, &[("x", "1"), ("z", "4")]), now));
    assert_eq!(hub.version(&svc("a")), Some(4));
}

#[test]
fn changes_announced_without_content_are_fetched_once_at_a_time() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    assert!(hub.changed(&svc("a"), 2));
    assert!(!hub.changed(&svc("a"), 3), "one fetch at a time");
    assert!(
        hub.fetched(fetched("a", 2, &[]), now),
        "a change announced during the fetch asks for one more"
    );
    assert!(!hub.fetched(fetched("a", 3, &[]), now));
    assert!(!hub.changed(&svc("a"), 3), "already have it");
    assert!(!hub.changed(&svc("b"), 1), "no subscriber, no fetch");
}

#[test]
fn subscribing_again_resyncs_with_a_snapshot() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    pushes(&mut hub, 1, now);
    hub.apply(change("a", 1, 2, put("y", "2")), now);
    pushes(&mut hub, 1, now);
    let again = hub.subscribe(1, "s".into(), svc("a"));
    assert_eq!(again, Subscribed::default());
    let got = pushes(&mut hub, 1, now);
    assert!(matches!(&got[..], [Push::Snapshot(s)] if s.version == 2));
}

#[test]
fn two_subscriptions_of_one_connection_to_a_service_are_pushed_as_one() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    pushes(&mut hub, 1, now);
    hub.apply(change("a", 1, 2, put("y", "2")), now);
    pushes(&mut hub, 1, now);

    // A second subscription joins: one snapshot, for both.
    assert_eq!(
        hub.subscribe(1, "s2".into(), svc("a")),
        Subscribed::default()
    );
    let got = pushes(&mut hub, 1, now);
    assert!(
        matches!(&got[..], [Push::Snapshot(s)] if s.version == 2),
        "{got:?}"
    );
    // Then one push per change, not one per subscription.
    hub.apply(change("a", 2, 3, put("z", "3")), now);
    let got = pushes(&mut hub, 1, now);
    assert!(
        matches!(&got[..], [Push::Delta(d)] if d.version == 3),
        "{got:?}"
    );

    // The first leaves; the second goes on being pushed.
    assert_eq!(hub.unsubscribe(1, "s"), None, "still wanted");
    hub.apply(change("a", 3, 4, put("w", "4")), now);
    let got = pushes(&mut hub, 1, now);
    assert!(
        matches!(&got[..], [Push::Delta(d)] if d.version == 4),
        "{got:?}"
    );
    assert_eq!(hub.unsubscribe(1, "s2"), Some(svc("a")), "nobody left");
}

#[test]
fn a_joining_subscription_of_the_other_kind_switches_the_connection_to_it() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    pushes(&mut hub, 1, now);
    hub.subscribe_with(1, "h".into(), svc("a"), true);
    hub.apply(change("a", 1, 2, put("y", "2")), now);
    let got = pushes(&mut hub, 1, now);
    assert!(
        matches!(&got[..], [Push::Snapshot(s)] if s.version == 2),
        "healthy-only: full snapshots, one per version: {got:?}"
    );
    // The plain one leaves (its Unsubscribe arriving late): the healthy-only one stays.
    assert_eq!(hub.unsubscribe(1, "s"), None);
    hub.apply(change("a", 2, 3, put("z", "3")), now);
    let got = pushes(&mut hub, 1, now);
    assert!(
        matches!(&got[..], [Push::Snapshot(s)] if s.version == 3),
        "{got:?}"
    );
}

#[test]
fn pacing_lets_a_burst_through_then_holds_a_busy_service_and_says_when_to_wake() {
    let now = Instant::now();
    let window = Duration::from_millis(5);
    let mut hub = Hub::new(DEFAULT_MAX_FRAME, Pacing { window, burst: 2 });
    hub.attach(1, true, Arc::new(Notify::new()));
    hub.subscribe(1, "s".into(), svc("a"));
    hub.fetched(fetched("a", 1, &[("x", "1")]), now);
    // Quiet: pushed at once, and so is the change right after it.
    assert_eq!(pushes(&mut hub, 1, now).len(), 1);
    hub.apply(change("a", 1, 2, put("y", "2")), now);
    assert_eq!(pushes(&mut hub, 1, now).len(), 1);
    // The third within the window waits for it, and the writer is told when to look again.
    hub.apply(change("a", 2, 3, put("z", "3")), now);
    let held = hub
        .take_pushes(1, now + Duration::from_millis(1), LATE)
        .unwrap();
    assert!(held.frames.is_empty());
    assert_eq!(held.wake_at, Some(now + window));
    // What arrives meanwhile goes out with it, as one delta.
    hub.apply(change("a", 3, 4, put("w", "4")), now);
    let got = pushes(&mut hub, 1, now + window);
    assert!(matches!(&got[..], [Push::Delta(d)] if (d.base, d.version) == (2, 4)));
    // A quiet spell fills the bucket again.
    let later = now + window * 10;
    for (base, id) in [(4, "p"), (5, "q")] {
        hub.apply(change("a", base, base + 1, put(id, "1")), later);
        assert_eq!(pushes(&mut hub, 1, later).len(), 1, "{id}");
    }
}

#[test]
fn the_history_is_bounded_and_a_subscriber_behind_it_gets_the_snapshot() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    hub.attach(2, true, Arc::new(Notify::new()));
    hub.subscribe(2, "late".into(), svc("a"));
    pushes(&mut hub, 1, now);
    pushes(&mut hub, 2, now);
    // Rewriting one small publisher over and over: the history stays within its bounds.
    let mut version = 1;
    for i in 0..100 {
        hub.apply(
            change("a", version, version + 1, put("x", &i.to_string())),
            now,
        );
        version += 1;
        pushes(&mut hub, 1, now);
    }
    let datum = hub.services[&svc("a")].datum.as_ref().unwrap();
    assert_eq!(datum.steps(), MIN_STEPS);
    let got = pushes(&mut hub, 2, now);
    assert!(matches!(&got[..], [Push::Snapshot(s)] if s.version == version));
}

#[test]
fn history_no_subscriber_needs_is_forgotten() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    hub.attach(2, true, Arc::new(Notify::new()));
    hub.subscribe(2, "late".into(), svc("a"));
    pushes(&mut hub, 1, now);
    pushes(&mut hub, 2, now);
    hub.apply(change("a", 1, 2, put("y", "2")), now);
    hub.apply(change("a", 2, 3, put("z", "3")), now);
    pushes(&mut hub, 1, now);
    // Connection 2 is still at version 1: both steps stay.
    hub.rescan();
    assert_eq!(hub.services[&svc("a")].datum.as_ref().unwrap().steps(), 2);
    let got = pushes(&mut hub, 2, now);
    assert!(matches!(&got[..], [Push::Delta(d)] if (d.base, d.version) == (1, 3)));
    // Everyone is current: nothing is kept.
    hub.rescan();
    assert!(hub.services[&svc("a")].datum.as_ref().unwrap().steps() == 0);
    hub.apply(change("a", 3, 4, put("w", "4")), now);
    let got = pushes(&mut hub, 1, now);
    assert!(matches!(&got[..], [Push::Delta(d)] if (d.base, d.version) == (3, 4)));
}

#[test]
fn a_detached_connection_is_gone_and_goaways_come_first() {
    let now = Instant::now();
    let mut hub = hub_with_one_subscriber(now);
    assert_eq!(hub.go_away(5, "moving"), 1);
    let got = pushes(&mut hub, 1, now);
    assert!(matches!(&got[..], [Push::GoAway { .. }, Push::Snapshot(_)]));
    assert_eq!(hub.detach(1), vec![svc("a")]);
    assert!(hub.take_pushes(1, now, LATE).is_none());
    assert_eq!(hub.counts(), Counts::default());
}

#[test]
fn the_last_subscriber_leaving_abandons_the_service() {
    let mut hub = Hub::new(DEFAULT_MAX_FRAME, Pacing::NONE);
    hub.attach(1, true, Arc::new(Notify::new()));
    hub.subscribe(1, "s1".into(), svc("a"));
    hub.subscribe(1, "s2".into(), svc("a"));
    assert_eq!(hub.unsubscribe(1, "s1"), None);
    assert_eq!(hub.unsubscribe(1, "s2"), Some(svc("a")));
    assert!(!hub.is_wanted(&svc("a")));
    hub.subscribe(1, "s3".into(), svc("b"));
    let moved = hub.subscribe(1, "s3".into(), svc("c"));
    assert_eq!(
        moved,
        Subscribed {
            first: true,
            abandoned: Some(svc("b"))
        }
    );
    assert_eq!(hub.subscriptions_of(1), 1);
    assert_eq!(hub.detach(1), vec![svc("c")]);
    assert_eq!(hub.counts(), Counts::default());
}

#[derive(Clone, Debug)]
enum Action {
    /// Publisher `k` is put with data `d`.
    Put(u8, u8),
    /// Publisher `k` is removed (if present).
    Remove(u8),
    /// The next `n` changes never reach the hub; then it learns of the gap and fetches.
    Lose(u8),
    /// Connection `c` pulls what is due.
    Pull(u8),
    /// Connection `c` reconnects: a new connection, subscribed afresh.
    Reconnect(u8),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0u8..12, any::<u8>()).prop_map(|(k, d)| Action::Put(k, d)),
        2 => (0u8..12).prop_map(Action::Remove),
        1 => (1u8..4).prop_map(Action::Lose),
        4 => (0u8..3).prop_map(Action::Pull),
        1 => (0u8..3).prop_map(Action::Reconnect),
    ]
}

proptest! {
    /// Deltas and snapshots, interleaved with gaps, reconnects and readers that pull late: after
    /// every push, what each subscriber reconstructs equals the datum at the version it was
    /// pushed, and in the end every one of them holds the current datum.
    #[test]
    fn every_subscriber_reconstructs_the_datum_after_every_push(
        actions in proptest::collection::vec(action(), 1..120),
        deltas in proptest::collection::vec(any::<bool>(), 3),
    ) {
        let now = Instant::now();
        let service = svc("a");
        let mut hub = Hub::new(DEFAULT_MAX_FRAME, Pacing::NONE);
        // The slot leader's datum, and its state at every version.
        let mut truth: BTreeMap<PubKey, PublisherView> = BTreeMap::new();
        let mut version: Version = 1;
        let mut states: HashMap<Version, BTreeMap<PubKey, PublisherView>> = HashMap::new();
        states.insert(version, truth.clone());
        // Connection id of each client slot, and its replica.
        let mut conns: Vec<ConnId> = vec![10, 20, 30];
        let mut replicas: Vec<Replica> = (0..3).map(|_| Replica::default()).collect();
        for (i, conn) in conns.iter().enumerate() {
            hub.attach(*conn, deltas[i], Arc::new(Notify::new()));
            hub.subscribe(*conn, "s".into(), service.clone());
        }
        hub.fetched(Fetched { service: service.clone(), version, entries: BTreeMap::new() }, now);
        let mut losing = 0u8;

        let pull = |hub: &mut Hub, i: usize, conns: &[ConnId], replicas: &mut [Replica],
                        states: &HashMap<Version, BTreeMap<PubKey, PublisherView>>| {
            for push in pushes(hub, conns[i], now) {
                replicas[i].apply(push)?;
                let at = replicas[i].version.expect("a push sets the version");
                let want = states.get(&at).ok_or(format!("pushed unknown version {at}"))?;
                let held: BTreeMap<PubKey, PublisherView> = replicas[i].publishers.clone();
                if &held != want {
                    return Err(format!("client {i} at version {at} differs from the datum"));
                }
            }
            Ok::<(), String>(())
        };

        for action in actions {
            let op = match action {
                Action::Put(k, d) => {
                    let reg = format!("p{k}");
                    let v = view(&reg, &d.to_string());
                    truth.insert(key(&reg), v.clone());
                    Some(Op::Put(key(&reg), encode_publisher(&v)))
                }
                Action::Remove(k) => {
                    let reg = format!("p{k}");
                    truth.remove(&key(&reg)).map(|_| Op::Removed(key(&reg)))
                }
                Action::Lose(n) => {
                    losing = n;
                    None
                }
                Action::Pull(c) => {
                    let i = c as usize;
                    pull(&mut hub, i, &conns, &mut replicas, &states)
                        .map_err(TestCaseError::fail)?;
                    None
                }
                Action::Reconnect(c) => {
                    let i = c as usize;
                    hub.detach(conns[i]);
                    conns[i] += 100; // never another slot's id (10, 20, 30 apart mod 100)
                    replicas[i] = Replica::default();
                    hub.attach(conns[i], deltas[i], Arc::new(Notify::new()));
                    hub.subscribe(conns[i], "s".into(), service.clone());
                    None
                }
            };
            let Some(op) = op else { continue };
            let prev = version;
            version += 1;
            states.insert(version, truth.clone());
            if losing > 0 {
                losing -= 1;
                continue;
            }
            let outcome = hub.apply(Change { service: service.clone(), prev, version, op }, now);
            if outcome == Applied::Fetch {
                // The fetch answers the leader's current datum.
                let entries = truth.iter().map(|(k, v)| (k.clone(), encode_publisher(v))).collect();
                let again = hub.fetched(Fetched { service: service.clone(), version, entries }, now);
                prop_assert!(!again);
            }
        }
        // Whatever was lost last is caught up the way a session does: the leader's version, then
        // a fetch.
        if hub.changed(&service, version) {
            let entries = truth.iter().map(|(k, v)| (k.clone(), encode_publisher(v))).collect();
            let again = hub.fetched(Fetched { service: service.clone(), version, entries }, now);
            prop_assert!(!again);
        }
        for i in 0..3 {
            pull(&mut hub, i, &conns, &mut replicas, &states).map_err(TestCaseError::fail)?;
            prop_assert_eq!(replicas[i].version, Some(version));
            prop_assert_eq!(&replicas[i].publishers, &truth);
        }
    }
}
