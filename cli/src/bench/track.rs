//! What the subscribers have seen, and the expectations the phases wait on: every instance of a
//! service present, none of some instances left, or one instance arriving or leaving. Each
//! expectation records how long after its start it was met.
//!
//! Subscribers report changes (instances added and removed), not whole lists, and expectations
//! are kept up to date from those changes: the tracker's cost per update is the size of the
//! update, so it measures the registry, not itself, at any service size. It also counts removals
//! of instances that were never unregistered: a registry that flaps live instances shows here.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use parking_lot::Mutex;
use rustc_hash::{FxHashMap as HashMap, FxHashSet};
use tokio::sync::Notify;

use super::{OnChange, Update};

/// A handle on one expectation.
#[derive(Clone, Copy, Debug)]
pub struct Expect(usize);

enum Cond {
    /// Every one of these present; `missing` of them are not yet.
    All {
        want: Arc<HashSet<String>>,
        missing: usize,
    },
    /// None of these present; `present` of them still are.
    NoneOf {
        gone: Arc<HashSet<String>>,
        present: usize,
    },
    One {
        instance: String,
        present: bool,
    },
}

impl Cond {
    /// Brings the counts up to date with one update (`set` is the set after it).
    fn update(&mut self, added: &[String], removed: &[String], set: &FxHashSet<String>) -> bool {
        match self {
            Cond::All { want, missing } => {
                *missing += removed.iter().filter(|i| want.contains(*i)).count();
                *missing -= added.iter().filter(|i| want.contains(*i)).count();
                *missing == 0
            }
            Cond::NoneOf { gone, present } => {
                *present += added.iter().filter(|i| gone.contains(*i)).count();
                *present -= removed.iter().filter(|i| gone.contains(*i)).count();
                *present == 0
            }
            Cond::One { instance, present } => set.contains(instance) == *present,
        }
    }

    /// Starts the counts from `set`.
    fn start(&mut self, set: &FxHashSet<String>) -> bool {
        match self {
            Cond::All { want, missing } => {
                *missing = want.iter().filter(|i| !set.contains(*i)).count();
                *missing == 0
            }
            Cond::NoneOf { gone, present } => {
                *present = gone.iter().filter(|i| set.contains(*i)).count();
                *present == 0
            }
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
    /// (subscriber, service) → the instances it sees now.
    sets: HashMap<(usize, String), FxHashSet<String>>,
    /// (subscriber, service) → when its last update arrived.
    last_update: HashMap<(usize, String), Instant>,
    waits: HashMap<(usize, String), Vec<Wait>>,
    results: Vec<Option<Duration>>,
    updates: u64,
    /// Removals of instances that were never unregistered, and a few of them.
    spurious: u64,
    spurious_sample: Vec<String>,
}

#[derive(Clone)]
pub struct Tracker {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    /// Whether removing this instance is something the workload does (unregistering it, killing
    /// its holder); any other removal is spurious.
    expected_removal: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

impl Tracker {
    pub fn new(expected_removal: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Tracker {
            state: Arc::default(),
            changed: Arc::default(),
            expected_removal: Arc::new(expected_removal),
        }
    }

    fn add(
        &self,
        sub: usize,
        service: &str,
        mut cond: Cond,
        since: Instant,
        check_now: bool,
    ) -> Expect {
        let mut state = self.state.lock();
        let id = state.results.len();
        state.results.push(None);
        let key = (sub, service.to_owned());
        let empty = FxHashSet::default();
        let met_now = cond.start(state.sets.get(&key).unwrap_or(&empty));
        if met_now && check_now {
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
        instances: Arc<HashSet<String>>,
        since: Instant,
    ) -> Expect {
        let cond = Cond::All {
            missing: instances.len(),
            want: instances,
        };
        self.add(sub, service, cond, since, true)
    }

    /// Subscriber `sub` sees none of `instances` in `service`.
    pub fn expect_none_of(
        &self,
        sub: usize,
        service: &str,
        instances: Arc<HashSet<String>>,
        since: Instant,
    ) -> Expect {
        let cond = Cond::NoneOf {
            gone: instances,
            present: 0,
        };
        self.add(sub, service, cond, since, true)
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
        Arc::new(move |service: &str, update: Update| {
            let now = Instant::now();
            let mut state = tracker.state.lock();
            let state = &mut *state;
            state.updates += 1;
            let key = (sub, service.to_owned());
            let set = state.sets.entry(key.clone()).or_default();
            let (added, removed) = match update {
                Update::All(instances) => {
                    let now: FxHashSet<String> = instances.into_iter().collect();
                    let added = now.difference(set).cloned().collect::<Vec<_>>();
                    let removed = set.difference(&now).cloned().collect::<Vec<_>>();
                    (added, removed)
                }
                Update::Changed { added, removed } => (added, removed),
            };
            let mut removed_now = Vec::with_capacity(removed.len());
            for instance in removed {
                if set.remove(&instance) {
                    removed_now.push(instance);
                }
            }
            let added: Vec<String> = added
                .into_iter()
                .filter(|i| set.insert(i.clone()))
                .collect();
            for instance in &removed_now {
                if !(tracker.expected_removal)(instance) {
                    state.spurious += 1;
                    if state.spurious_sample.len() < 10 {
                        state
                            .spurious_sample
                            .push(format!("subscriber {sub} {service}: {instance}"));
                    }
                }
            }
            let mut met = Vec::new();
            if let Some(waits) = state.waits.get_mut(&key) {
                waits.retain_mut(|w| {
                    let done = w.cond.update(&added, &removed_now, set);
                    if done {
                        met.push((w.id, now.duration_since(w.since)));
                    }
                    !done
                });
            }
            for (id, took) in met {
                state.results[id] = Some(took);
            }
            state.last_update.insert(key, now);
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
                        Cond::All { want, missing } => {
                            format!("all {} instances ({missing} missing)", want.len())
                        }
                        Cond::NoneOf { gone, present } => {
                            format!("none of {} instances ({present} left)", gone.len())
                        }
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

    /// Removals of instances the workload never removed, and a sample of them.
    pub fn spurious_removals(&self) -> (u64, Vec<String>) {
        let state = self.state.lock();
        (state.spurious, state.spurious_sample.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> Arc<HashSet<String>> {
        Arc::new(items.iter().map(|s| s.to_string()).collect())
    }

    fn changed(added: &[&str], removed: &[&str]) -> Update {
        Update::Changed {
            added: added.iter().map(|s| s.to_string()).collect(),
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn expectations_follow_updates_and_spurious_removals_are_counted() {
        let tracker = Tracker::new(|i| i.starts_with("churn"));
        let start = Instant::now();
        let all = tracker.expect_all(0, "s", set(&["a", "b"]), start);
        let report = tracker.callback(0);
        report("s", Update::All(vec!["a".into()]));
        report("s", changed(&["b", "churn1"], &[]));
        let gone = tracker.expect_none_of(0, "s", set(&["a"]), start);
        let back = tracker.expect_one(0, "s", "churn1", false, start);
        report("s", changed(&[], &["churn1"]));
        report("s", changed(&[], &["a", "never-there"]));
        let state = tracker.state.lock();
        assert!(state.results[all.0].is_some());
        assert!(state.results[back.0].is_some());
        assert!(state.results[gone.0].is_some());
        drop(state);
        let (spurious, sample) = tracker.spurious_removals();
        assert_eq!(spurious, 1, "only a, which the workload never removed");
        assert_eq!(sample, ["subscriber 0 s: a"]);
    }
}
