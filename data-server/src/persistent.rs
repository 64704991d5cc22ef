//! Serving persistent instances: the leader of a slot keeps the slot's persistent records equal to
//! the meta group's set.
//!
//! The meta group stores persistent instances and carries, in every view, a version per slot of
//! their set. Whenever the view's version of a slot this server leads moves past what it merged,
//! or it has just taken the slot (over), it fetches the set (`MetaRequest::PersistentSlot`, from
//! any meta node that has applied that version) and merges it into the store
//! ([`crate::store::Store::merge_persistent`]) through the leader's write path, so followers
//! replicate the records and subscribers are pushed like for any change. A slot the view gives no
//! version never held a persistent instance: its set is empty and needs no fetch.
//!
//! The merge runs as soon as this server leads the slot, during the takeover too, so a slot
//! usually opens with its persistent instances already in it.
//!
//! Caveats: a fetch that fails (no meta node reachable, or none has applied the version yet) is
//! retried with backoff ([`FetchPlan`]); meanwhile the slot serves what it merged before, which
//! for a server new to the slot is none of its persistent instances.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roster_common::member;
use roster_common::proto::{MetaRequest, MetaResponse, PersistentInstance};
use roster_common::{Error, Result, SlotId, Version};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::shared::{STEP, Shared};

/// Slots whose set is fetched at once, at most.
pub const FETCH_CONCURRENCY: usize = 8;
/// First pause before a failed fetch is retried; doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
pub const MAX_RETRY: Duration = Duration::from_secs(5);
/// The largest answer taken from the meta tier: a slot's set may exceed the data tier's own frame
/// limit, and meta nodes send frames of up to their 64 MiB default.
const META_ANSWER_FRAME: u32 = 64 << 20;

/// Which due slots to fetch now: at most [`FETCH_CONCURRENCY`] at once, one fetch per slot, and
/// a slot whose fetch failed only after its backoff. Time is passed in.
#[derive(Debug, Default)]
pub struct FetchPlan {
    in_flight: HashSet<SlotId>,
    /// Slots whose last fetch failed: not before when, and the pause after the next failure.
    backoff: HashMap<SlotId, (Instant, Duration)>,
}

impl FetchPlan {
    /// The slots of `due` (slot, version at least) to start fetching now; they count as in flight
    /// until [`FetchPlan::on_done`]. Backoffs of slots no longer due are forgotten.
    pub fn next(&mut self, due: &[(SlotId, Version)], now: Instant) -> Vec<(SlotId, Version)> {
        self.backoff
            .retain(|slot, _| due.iter().any(|(s, _)| s == slot));
        let mut start = Vec::new();
        for &(slot, version) in due {
            if self.in_flight.len() >= FETCH_CONCURRENCY {
                break;
            }
            if self.in_flight.contains(&slot)
                || self.backoff.get(&slot).is_some_and(|(at, _)| now < *at)
            {
                continue;
            }
            self.in_flight.insert(slot);
            start.push((slot, version));
        }
        start
    }

    /// A fetch of `slot` ended; a failed one is retried after a pause that doubles each time.
    pub fn on_done(&mut self, slot: SlotId, ok: bool, now: Instant) {
        self.in_flight.remove(&slot);
        if ok {
            self.backoff.remove(&slot);
            return;
        }
        let pause = self.backoff.get(&slot).map_or(FIRST_RETRY, |(_, p)| *p);
        self.backoff
            .insert(slot, (now + pause, (pause * 2).min(MAX_RETRY)));
    }
}

type Fetched = (SlotId, Result<(Version, Vec<PersistentInstance>)>);

/// Keeps the persistent records of the slots this server leads equal to the meta group's sets,
/// until `shutdown`.
pub(crate) async fn keep_persistent(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut views = shared.view.clone();
    let mut step = tokio::time::interval(STEP * 2);
    step.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut plan = FetchPlan::default();
    let mut fetches: JoinSet<Fetched> = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(done) = fetches.join_next() => {
                if let Ok((slot, fetched)) = done {
                    let ok = match fetched {
                        Ok((version, instances)) => merge(&shared, slot, version, instances),
                        Err(e) => {
                            match e {
                                // The meta node behind the view, or the meta group electing.
                                Error::Unavailable(_) | Error::NoQuorum(_) | Error::NotLeader { .. } => {
                                    debug!(slot, error = %e, "persistent instances not fetched yet; retrying")
                                }
                                _ => warn!(slot, error = %e, "could not fetch a slot's persistent instances; retrying"),
                            }
                            false
                        }
                    };
                    plan.on_done(slot, ok, Instant::now());
                }
                continue;
            }
            changed = views.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = step.tick() => {}
        }
        let Some(view) = shared.view() else { continue };
        let due = shared.store.lock().persistent_due(&view.persistent);
        let (never, to_fetch): (Vec<_>, Vec<_>) = due.into_iter().partition(|(_, v)| *v == 0);
        for (slot, _) in never {
            merge(&shared, slot, 0, Vec::new());
        }
        let mut metas: Vec<String> = view.meta_leader.iter().cloned().collect();
        metas.extend(
            shared
                .config
                .metas
                .iter()
                .filter(|m| view.meta_leader.as_ref() != Some(*m))
                .cloned(),
        );
        let metas = Arc::new(metas);
        for (slot, at_least) in plan.next(&to_fetch, Instant::now()) {
            let shared = shared.clone();
            let metas = metas.clone();
            fetches.spawn(async move { (slot, fetch(&shared, &metas, slot, at_least).await) });
        }
    }
}

/// The meta group's set of `slot` at `at_least` or later, from the first of `metas` that has it.
async fn fetch(
    shared: &Shared,
    metas: &[String],
    slot: SlotId,
    at_least: Version,
) -> Result<(Version, Vec<PersistentInstance>)> {
    let answer = member::call_meta(
        &shared.pool,
        metas,
        &MetaRequest::PersistentSlot { slot, at_least },
        shared.config.max_frame.max(META_ANSWER_FRAME),
        shared.config.request_timeout,
    )
    .await?;
    match answer {
        MetaResponse::Persistent {
            slot: answered,
            version,
            instances,
        } if answered == slot => Ok((version, instances)),
        other => Err(Error::UnexpectedMessage(format!(
            "expected slot {slot}'s persistent instances, got {other:?}"
        ))),
    }
}

/// Merges a fetched set; false if it must be fetched again.
fn merge(
    shared: &Shared,
    slot: SlotId,
    version: Version,
    instances: Vec<PersistentInstance>,
) -> bool {
    match shared.lead(|store| store.merge_persistent(slot, version, instances)) {
        Ok(applied) => {
            if !applied.ops.is_empty() {
                info!(
                    slot,
                    version,
                    changes = applied.ops.len(),
                    "merged the slot's persistent instances"
                );
            }
            true
        }
        // Lost the slot meanwhile: its next leader merges.
        Err(Error::NotLeader { .. }) => true,
        Err(e) => {
            warn!(slot, error = %e, "could not merge a slot's persistent instances");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use parking_lot::Mutex;
    use roster_common::ServiceId;
    use roster_common::tls::NodeIdentity;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::testing::{self, SLOTS, wait_until};

    /// What a fake meta node holds for one slot.
    struct MetaSlot {
        version: Version,
        instances: Vec<PersistentInstance>,
        calls: AtomicUsize,
    }

    /// A meta node that answers `PersistentSlot` from `state`, `Unavailable` to the first call
    /// and while it is behind the version asked for, as a lagging meta node does.
    fn fake_meta(
        identity: &NodeIdentity,
        state: Arc<Mutex<MetaSlot>>,
    ) -> (String, CancellationToken) {
        let (endpoint, _) = testing::endpoint(identity);
        let addr = endpoint.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let tracker = TaskTracker::new();
            roster_common::serve::serve_requests(
                &endpoint,
                &stop,
                &tracker,
                move |mut send, mut recv| {
                    let state = state.clone();
                    async move {
                        let max = 1 << 20;
                        let request =
                            roster_common::rpc::read_request::<MetaRequest>(&mut recv, max).await;
                        let answer = match request {
                            Ok(MetaRequest::PersistentSlot { slot, at_least }) => {
                                let state = state.lock();
                                let first = state.calls.fetch_add(1, Ordering::SeqCst) == 0;
                                if first || state.version < at_least {
                                    Err(Error::Unavailable("behind".into()))
                                } else {
                                    Ok(MetaResponse::Persistent {
                                        slot,
                                        version: state.version,
                                        instances: state.instances.clone(),
                                    })
                                }
                            }
                            Ok(other) => Err(Error::InvalidArgument(format!("{other:?}"))),
                            Err(e) => Err(e),
                        };
                        let _ = roster_common::rpc::send_reply(&mut send, answer, max).await;
                    }
                },
            )
            .await;
        });
        (addr, shutdown)
    }

    #[tokio::test]
    async fn a_led_slot_gets_the_meta_groups_set_and_loses_what_it_drops() {
        let identity = testing::identity();
        let service: ServiceId = "db".parse().unwrap();
        let slot = roster_common::slot::slot_of(&service, SLOTS);
        let state = Arc::new(Mutex::new(MetaSlot {
            version: 3,
            instances: vec![PersistentInstance {
                service: service.clone(),
                id: "primary".into(),
                data: vec![Bytes::from_static(b"10.0.0.1:5432")],
                attributes: Default::default(),
                check: None,
                registered_ms: 1,
                by: "ops".into(),
            }],
            calls: AtomicUsize::new(0),
        }));
        let (meta, meta_shutdown) = fake_meta(&identity, state.clone());
        let node = testing::node(
            &identity,
            vec![meta],
            testing::view(BTreeMap::from([(slot, 3)])),
        );
        let shared = node.shared.clone();
        let (_, mut events) = shared.interests.lock().attach(7, 7);
        shared
            .interests
            .lock()
            .set(7, std::slice::from_ref(&service), true);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(keep_persistent(shared.clone(), shutdown.clone()));
        let merged = |n: usize| {
            let shared = shared.clone();
            move || shared.store.lock().persistent_records().len() == n
        };
        wait_until("the slot's set merged", Duration::from_secs(10), merged(1)).await;
        assert!(
            state.lock().calls.load(Ordering::SeqCst) >= 2,
            "retried after Unavailable"
        );
        let event = events.try_recv().expect("interested sessions are told");
        assert!(format!("{event:?}").contains("primary"), "{event:?}");

        // Deregistered: the view moves on and the set is empty.
        {
            let mut state = state.lock();
            state.version = 4;
            state.instances.clear();
        }
        node.view_tx
            .send(Some(Arc::new(testing::view(BTreeMap::from([(slot, 4)])))))
            .unwrap();
        wait_until("the instance removed", Duration::from_secs(10), merged(0)).await;
        let removed = std::iter::from_fn(|| events.try_recv().ok())
            .last()
            .unwrap();
        assert!(format!("{removed:?}").contains("Remove"), "{removed:?}");

        shutdown.cancel();
        task.await.unwrap();
        meta_shutdown.cancel();
    }

    #[test]
    fn a_slot_is_fetched_once_at_a_time_and_retried_after_a_growing_pause() {
        let t0 = Instant::now();
        let mut plan = FetchPlan::default();
        assert_eq!(plan.next(&[(3, 7)], t0), vec![(3, 7)]);
        assert!(plan.next(&[(3, 8)], t0).is_empty(), "already in flight");

        plan.on_done(3, false, t0);
        assert!(plan.next(&[(3, 8)], t0).is_empty(), "backing off");
        assert_eq!(plan.next(&[(3, 8)], t0 + FIRST_RETRY), vec![(3, 8)]);
        plan.on_done(3, false, t0 + FIRST_RETRY);
        let again = t0 + FIRST_RETRY;
        assert!(
            plan.next(&[(3, 8)], again + FIRST_RETRY).is_empty(),
            "the pause doubled"
        );
        assert_eq!(plan.next(&[(3, 8)], again + FIRST_RETRY * 2), vec![(3, 8)]);
        plan.on_done(3, true, again + FIRST_RETRY * 2);
        assert_eq!(plan.next(&[(3, 9)], again + FIRST_RETRY * 2), vec![(3, 9)]);
    }

    #[test]
    fn fetches_are_bounded_and_backoffs_of_slots_no_longer_due_are_forgotten() {
        let t0 = Instant::now();
        let mut plan = FetchPlan::default();
        let due: Vec<(SlotId, Version)> = (0..20).map(|s| (s, 1)).collect();
        let first = plan.next(&due, t0);
        assert_eq!(first.len(), FETCH_CONCURRENCY);
        for (slot, _) in &first {
            plan.on_done(*slot, false, t0);
        }
        let second = plan.next(&due, t0);
        assert_eq!(second.len(), FETCH_CONCURRENCY);
        assert!(second.iter().all(|s| !first.contains(s)), "the failed wait");

        // Slot 0 is no longer led, then led again: it starts without a pause.
        plan.next(&[], t0);
        for (slot, _) in &second {
            plan.on_done(*slot, true, t0);
        }
        assert_eq!(plan.next(&[(0, 2)], t0), vec![(0, 2)]);
    }

    #[test]
    fn pauses_stop_growing_at_the_maximum() {
        let mut now = Instant::now();
        let mut plan = FetchPlan::default();
        for _ in 0..20 {
            assert_eq!(plan.next(&[(1, 1)], now).len(), 1);
            plan.on_done(1, false, now);
            now += MAX_RETRY;
        }
        assert!(
            plan.next(&[(1, 1)], now - Duration::from_millis(1))
                .is_empty()
        );
    }
}
