use std::time::{Duration, Instant};

use roster_common::proto::{Publisher, WriteOp};
use roster_common::{Error, Result, ServiceId, SlotId};
use tokio::sync::oneshot;

use super::*;

fn service(name: &str) -> ServiceId {
    ServiceId::new("default", "DEFAULT", name).unwrap()
}

fn put(svc: &str, register_id: &str, version: u64) -> WriteOp {
    WriteOp::Put {
        publisher: Publisher {
            check: None,
            health: None,
            persistent: false,
            client_id: "client".into(),
            register_id: register_id.into(),
            service: service(svc),
            data: vec![format!("{register_id}@{version}").into()],
            attributes: Default::default(),
            client_version: version,
            session: 1,
            session_instance: 1,
            owner: 1,
            registered_ms: 0,
        },
    }
}

fn version_of(op: &WriteOp) -> u64 {
    match op {
        WriteOp::Put { publisher } => publisher.client_version,
        WriteOp::Remove { .. } => 0,
    }
}

/// A change with an ack to read the outcome from.
fn change(op: WriteOp) -> (Forward, oneshot::Receiver<Result<bool>>) {
    let (tx, rx) = oneshot::channel();
    (Forward { op, ack: Some(tx) }, rx)
}

fn outcome(rx: &mut oneshot::Receiver<Result<bool>>) -> Option<Result<bool>> {
    rx.try_recv().ok()
}

/// Every service led by "data-1" in slot 0; the gate always lets writes through.
fn take(f: &mut Forwarder, now: Instant) -> Vec<Batch<()>> {
    f.take_batches(now, |_| Some(("data-1".into(), 0)), |_| Some(()))
}

fn answered(batch: Batch<()>, results: Result<Vec<Result<()>>>) -> Answered {
    Answered {
        addr: batch.addr,
        items: batch.items,
        results,
    }
}

fn ok(batch: Batch<()>) -> Answered {
    let n = batch.items.len();
    answered(batch, Ok(vec![Ok(()); n]))
}

#[test]
fn a_lone_change_goes_at_once_and_its_ack_says_durable() {
    let now = Instant::now();
    let mut f = Forwarder::default();
    let (fwd, mut rx) = change(put("a", "p1", 1));
    f.on_change(fwd);
    let mut batches = take(&mut f, now);
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].items.len(), 1);
    assert_eq!(f.due(), None, "nothing held back");
    assert!(
        outcome(&mut rx).is_none(),
        "not answered before the leader is"
    );
    f.on_result(ok(batches.remove(0)), now);
    assert!(matches!(outcome(&mut rx), Some(Ok(true))));
    assert!(take(&mut f, now).is_empty());
}

#[test]
fn changes_of_one_publisher_merge_while_waiting_and_go_one_at_a_time() {
    let now = Instant::now();
    let mut f = Forwarder::default();
    // Two changes before anything is sent: only the latest goes; both acks hear its outcome.
    let (first, mut rx1) = change(put("a", "p1", 1));
    let (second, mut rx2) = change(put("a", "p1", 2));
    f.on_change(first);
    f.on_change(second);
    let mut batches = take(&mut f, now);
    assert_eq!(batches[0].items.len(), 1);
    assert_eq!(version_of(&batches[0].items[0].op), 2);

    // A third while the second is in flight waits behind it.
    let (third, mut rx3) = change(put("a", "p1", 3));
    f.on_change(third);
    assert!(
        take(&mut f, now).is_empty(),
        "one change of a publisher in flight at a time"
    );
    f.on_result(ok(batches.remove(0)), now);
    assert!(matches!(outcome(&mut rx1), Some(Ok(true))));
    assert!(matches!(outcome(&mut rx2), Some(Ok(true))));
    assert!(outcome(&mut rx3).is_none());
    let batches = take(&mut f, now);
    assert_eq!(version_of(&batches[0].items[0].op), 3);
}

#[test]
fn a_retryable_refusal_is_answered_not_durable_and_retried_with_growing_backoff() {
    let t0 = Instant::now();
    let mut f = Forwarder::default();
    let (fwd, mut rx) = change(put("a", "p1", 1));
    f.on_change(fwd);
    let batch = take(&mut f, t0).remove(0);
    let moving = Error::SlotMoving {
        retry_after: Duration::from_millis(5),
    };
    f.on_result(answered(batch, Ok(vec![Err(moving.clone())])), t0);
    assert!(matches!(outcome(&mut rx), Some(Ok(false))));
    assert_eq!(f.due(), Some(t0 + FIRST_RETRY));
    assert!(
        take(&mut f, t0 + FIRST_RETRY / 2).is_empty(),
        "still backing off"
    );

    let t1 = t0 + FIRST_RETRY;
    let batch = take(&mut f, t1).remove(0);
    assert_eq!(f.due(), None);
    // Refused again: the wait doubles.
    f.on_result(answered(batch, Err(Error::Timeout("no answer".into()))), t1);
    assert_eq!(f.due(), Some(t1 + FIRST_RETRY * 2));
    let t2 = t1 + FIRST_RETRY * 2;
    let batch = take(&mut f, t2).remove(0);
    f.on_result(ok(batch), t2);
    assert_eq!(f.due(), None);
    assert!(
        take(&mut f, t2 + MAX_RETRY).is_empty(),
        "landed: nothing left"
    );
}

#[test]
fn a_refusal_that_retrying_cannot_fix_is_the_clients_answer() {
    let now = Instant::now();
    let mut f = Forwarder::default();
    let (fwd, mut rx) = change(put("a", "p1", 1));
    f.on_change(fwd);
    let batch = take(&mut f, now).remove(0);
    let denied = Error::PermissionDenied("another client owns this record".into());
    f.on_result(answered(batch, Ok(vec![Err(denied)])), now);
    assert!(matches!(
        outcome(&mut rx),
        Some(Err(Error::PermissionDenied(_)))
    ));
    assert_eq!(f.due(), None, "not retried");
    assert!(take(&mut f, now + MAX_RETRY).is_empty());
}

#[test]
fn without_a_leader_a_change_is_held_and_backs_off() {
    let now = Instant::now();
    let mut f = Forwarder::default();
    let (fwd, mut rx) = change(put("a", "p1", 1));
    f.on_change(fwd);
    let batches: Vec<Batch<()>> = f.take_batches(now, |_| None, |_| Some(()));
    assert!(batches.is_empty());
    assert!(matches!(outcome(&mut rx), Some(Ok(false))));
    assert_eq!(f.due(), Some(now + FIRST_RETRY));
    assert_eq!(
        take(&mut f, now + FIRST_RETRY).len(),
        1,
        "goes once a leader is known"
    );
}

#[test]
fn a_slot_being_synced_holds_its_changes_and_asks_for_a_look_soon() {
    let now = Instant::now();
    let mut f = Forwarder::default();
    f.on_change(change(put("a", "p1", 1)).0);
    let route = |s: &ServiceId| Some(("data-1".to_owned(), s.as_str().len() as SlotId));
    let batches = f.take_batches(now, route, |_| None::<()>);
    assert!(batches.is_empty());
    assert_eq!(f.due(), Some(now + GATE_RECHECK));
    let later = now + GATE_RECHECK;
    let batches = f.take_batches(later, route, |_| Some(()));
    assert_eq!(batches.len(), 1);
    assert_eq!(f.due(), None);
}

#[test]
fn changes_group_by_leader_within_the_batch_and_in_flight_limits() {
    let now = Instant::now();
    let mut f = Forwarder::default();
    // Two services on two leaders.
    let route = |s: &ServiceId| {
        let addr = if s.data_id() == "a" {
            "data-1"
        } else {
            "data-2"
        };
        Some((addr.to_owned(), 0))
    };
    let per_leader = MAX_BATCH * BATCHES_PER_LEADER + 10;
    for i in 0..per_leader {
        f.on_change(Forward {
            op: put("a", &format!("p{i}"), 1),
            ack: None,
        });
    }
    f.on_change(Forward {
        op: put("b", "q", 1),
        ack: None,
    });
    let batches = f.take_batches(now, route, |_| Some(()));
    let to = |addr: &str| batches.iter().filter(|b| b.addr == addr).count();
    assert_eq!(to("data-1"), BATCHES_PER_LEADER);
    assert_eq!(to("data-2"), 1);
    assert!(batches.iter().all(|b| b.items.len() <= MAX_BATCH));

    // The rest waits for a batch in flight to be answered.
    assert!(f.take_batches(now, route, |_| Some(())).is_empty());
    let first = batches.into_iter().find(|b| b.addr == "data-1").unwrap();
    f.on_result(ok(first), now);
    let rest = f.take_batches(now, route, |_| Some(()));
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].items.len(), 10);
}

#[test]
fn changes_waiting_for_room_are_not_walked_again_until_a_batch_returns() {
    let now = Instant::now();
    let mut f = Forwarder::default();
    let full = BATCHES_PER_LEADER * MAX_BATCH;
    for i in 0..full + 1_000 {
        f.on_change(change(put("a", &format!("p{i}"), 1)).0);
    }
    let mut in_flight = take(&mut f, now);
    assert_eq!(in_flight.len(), BATCHES_PER_LEADER);
    assert!(in_flight.iter().all(|b| b.items.len() == MAX_BATCH));

    // The leader is full: a new change is routed alone, the 1,000 waiting are not looked at.
    f.on_change(change(put("a", "late", 1)).0);
    let routed = std::cell::Cell::new(0);
    let route = |_: &ServiceId| {
        routed.set(routed.get() + 1);
        Some(("data-1".to_owned(), 0))
    };
    assert!(f.take_batches(now, route, |_| Some(())).is_empty());
    assert_eq!(routed.get(), 1);

    // A batch comes back: the oldest waiting go first, the late one last.
    f.on_result(ok(in_flight.pop().unwrap()), now);
    let next = take(&mut f, now);
    assert_eq!(next.len(), 1);
    let first = &next[0].items[0].key.2;
    assert_eq!(first, &format!("p{full}"));
    f.on_result(ok(next.into_iter().next().unwrap()), now);
    let rest: Vec<String> = take(&mut f, now)
        .into_iter()
        .flat_map(|b| b.items.into_iter().map(|i| i.key.2))
        .collect();
    assert_eq!(rest.len(), 1_000 + 1 - MAX_BATCH);
    assert_eq!(rest.last().unwrap(), "late");

    // A new route is followed at once by what waited for the old one.
    for i in 0..MAX_BATCH * BATCHES_PER_LEADER {
        f.on_change(change(put("b", &format!("q{i}"), 1)).0);
    }
    assert!(take(&mut f, now).len() <= BATCHES_PER_LEADER);
    f.routes_changed();
    let moved = f.take_batches(now, |_| Some(("data-2".into(), 0)), |_| Some(()));
    assert!(!moved.is_empty() && moved.iter().all(|b| b.addr == "data-2"));
}
