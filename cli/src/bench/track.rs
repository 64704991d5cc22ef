//! What the subscribers have seen, and the expectations the phases wait on: every instance of a
//! service present, none of some instances left, or one instance arriving or leaving. Each
//! expectation records how long after its start it was met.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::OnChange;

/// A handle on one expectation.
#[derive(Clone, Copy, Debug)]
pub struct Expect(usize);

enum Cond {
    All(HashSet<String>),
    NoneOf(HashSet<String>),
    One { instance: String, present: bool },
}

impl Cond {
    fn met(&self, set: &HashSet<String>) -> bool {
        match self {
            Cond::All(want) => want.iter().all(|i| set.contains(i)),
            Cond::NoneOf(gone) => gone.iter().all(|i| !set.contains(i)),
            Cond::One { instance, present } => set.contains(instance) == *present,
        }
    }
}

struct Wait {
    id: usize,
    cond: Cond,
    since: Instant,
}

#[derive(Default)]
struct State {
    /// (subscriber, service) → the instances it last saw.
    sets: HashMap<(usize, String), HashSet<String>>,
    /// (subscriber, service) → when its last update arrived.
    last_update: HashMap<(usize, String), Instant>,
    waits: HashMap<(usize, String), Vec<Wait>>,
    results: Vec<Option<Duration>>,
    updates: u64,
}

#[derive(Clone, Default)]
pub struct Tracker {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(
        &self,
        sub: usize,
        service: &str,
        cond: Cond,
        since: Instant,
        check_now: bool,
    ) -> Expect {
        let mut state = self.state.lock();
        let id = state.results.len();
        state.results.push(None);
        let key = (sub, service.to_owned());
        let met_now = check_now && state.sets.get(&key).is_some_and(|set| cond.met(set));
        if met_now {
            state.results[id] = Some(since.elapsed());
        } else {
            state
                .waits
                .entry(key)
                .or_default()
                .push(Wait { id, cond, since });
        }
        Expect(id)
    }

    /// Subscriber `sub` sees every one of `instances` in `service`.
    pub fn expect_all(
        &self,
        sub: usize,
        service: &str,
        instances: Vec<String>,
        since: Instant,
    ) -> Expect {
        self.add(
            sub,
            service,
            Cond::All(instances.into_iter().collect()),
            since,
            true,
        )
    }

    /// Subscriber `sub` sees none of `instances` in `service`.
    pub fn expect_none_of(
        &self,
        sub: usize,
        service: &str,
        instances: Vec<String>,
        since: Instant,
    ) -> Expect {
        self.add(
            sub,
            service,
            Cond::NoneOf(instances.into_iter().collect()),
            since,
            true,
        )
    }

    /// Subscriber `sub`, in an update after now, sees `instance` present (or absent).
    pub fn expect_one(
        &self,
        sub: usize,
        service: &str,
        instance: &str,
        present: bool,
        since: Instant,
    ) -> Expect {
        let cond = Cond::One {
            instance: instance.to_owned(),
            present,
        };
        self.add(sub, service, cond, since, false)
    }

    /// The callback a watch of subscriber `sub` reports to.
    pub fn callback(&self, sub: usize) -> OnChange {
        let tracker = self.clone();
        Arc::new(move |service: &str, instances: Vec<String>| {
            let now = Instant::now();
            let set: HashSet<String> = instances.into_iter().collect();
            let mut state = tracker.state.lock();
            state.updates += 1;
            let key = (sub, service.to_owned());
            let mut met = Vec::new();
            if let Some(waits) = state.waits.get_mut(&key) {
                waits.retain(|w| {
                    let done = w.cond.met(&set);
                    if done {
                        met.push((w.id, now.duration_since(w.since)));
                    }
                    !done
                });
            }
            for (id, took) in met {
                state.results[id] = Some(took);
            }
            state.last_update.insert(key.clone(), now);
            state.sets.insert(key, set);
            drop(state);
            tracker.changed.notify_waiters();
        })
    }

    /// Waits until every expectation is met or `limit` passes; returns how long each took
    /// (`None`: not met in time).
    pub async fn wait(
        &self,
        expects: &[Expect],
        limit: Duration,
        progress: &ProgressBar,
    ) -> Vec<Option<Duration>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            let results: Vec<Option<Duration>> = {
                let state = self.state.lock();
                expects.iter().map(|e| state.results[e.0]).collect()
            };
            let done = results.iter().filter(|r| r.is_some()).count();
            progress.set_position(done as u64);
            if done == expects.len() || tokio::time::Instant::now() >= deadline {
                return results;
            }
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                changed,
            )
            .await;
        }
    }

    /// Up to `limit` expectations not met yet, described, for diagnosing a shortfall.
    pub fn unmet(&self, limit: usize) -> Vec<String> {
        let guard = self.state.lock();
        let state = &*guard;
        let mut out: Vec<String> = state
            .waits
            .iter()
            .flat_map(|((sub, service), waits)| {
                waits.iter().map(move |w| {
                    let what = match &w.cond {
                        Cond::All(want) => format!("all {} instances", want.len()),
                        Cond::NoneOf(gone) => format!("none of {} instances", gone.len()),
                        Cond::One { instance, present } => {
                            format!("{instance} {}", if *present { "present" } else { "absent" })
                        }
                    };
                    let key = (*sub, service.clone());
                    let seen = state.sets.get(&key).map_or(0, |s| s.len());
                    let last = match state.last_update.get(&key) {
                        Some(t) if *t >= w.since => {
                            format!("{:?} after", t.duration_since(w.since))
                        }
                        Some(t) => format!("{:?} before", w.since.duration_since(*t)),
                        None => "never".into(),
                    };
                    format!("subscriber {sub} {service}: {what} (sees {seen}; last update {last})")
                })
            })
            .take(limit)
            .collect();
        out.sort();
        out
    }

    /// Watch updates delivered so far.
    pub fn updates(&self) -> u64 {
        self.state.lock().updates
    }
}
