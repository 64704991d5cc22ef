//! The services DNS watches, and what it answers for each.
//!
//! The first query of a service watches it in the hub (`hub/watch.rs`): this session registers
//! interest with the slot leader, fetches the datum and from then on applies every change, as for
//! a subscriber. The query is answered once the datum is here, if that is within
//! [`FIRST_ANSWER_WITHIN`]; later queries are answered at once from the copy. What is answered is
//! worked out once per version of the datum ([`Instances`]). A service nobody asked for during
//! `--dns-idle-ms` is no longer watched, and a name no service was ever published to after
//! `DnsConfig::unknown_idle` (10 s), so that queries for made-up names do not hold watches long. At most
//! `--dns-max-services` are watched at once: a query for one more is answered `SERVFAIL`, and the
//! log says so (at most every 10 s).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use roster_common::ServiceId;
use tracing::{debug, warn};

use super::records::Instances;
use crate::hub::ConnId;
use crate::shared::{LinkEvent, Shared};

/// How long a query may wait for the first snapshot of a service nobody here watched.
pub const FIRST_ANSWER_WITHIN: Duration = Duration::from_millis(1500);
/// How often a query waiting for a first snapshot looks whether it came.
const FIRST_ANSWER_POLL: Duration = Duration::from_millis(2);
/// The least time between two warnings that the watched services are at their limit.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// One service DNS watches.
struct Watched {
    watcher: ConnId,
    last_query: Instant,
    /// No publisher was ever published to it (version 0) when last asked.
    unknown: bool,
    /// What it answers, for the version it was worked out at.
    instances: Option<Arc<Instances>>,
}

/// What a query finds.
pub enum Found {
    /// The instances to answer with.
    Instances(Arc<Instances>),
    /// No publisher was ever published to the service.
    Unknown,
}

/// Why a query could not be answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Unanswered {
    /// The first snapshot did not come in time.
    NoSnapshot,
    /// As many services as allowed are watched already.
    Full,
}

/// The services DNS watches.
pub struct Cache {
    shared: Arc<Shared>,
    max_services: usize,
    protection_threshold: f64,
    services: Mutex<HashMap<ServiceId, Watched>>,
    /// When the limit of watched services was last warned about.
    warned_full: Mutex<Option<Instant>>,
}

impl Cache {
    pub fn new(shared: Arc<Shared>, max_services: usize) -> Self {
        let protection_threshold = shared.config().protection_threshold;
        Cache {
            shared,
            max_services,
            protection_threshold,
            services: Mutex::new(HashMap::new()),
            warned_full: Mutex::new(None),
        }
    }

    /// The answer for `service` if it can be given without waiting: `None` when the service is
    /// not watched yet or its first snapshot has not come.
    pub fn get(&self, service: &ServiceId, now: Instant) -> Option<Found> {
        let cached = {
            let mut services = self.services.lock();
            let watched = services.get_mut(service)?;
            watched.last_query = now;
            watched.instances.clone()
        };
        let version = self.shared.hub().version(service)?;
        if version == 0 {
            if let Some(watched) = self.services.lock().get_mut(service) {
                watched.unknown = true;
            }
            return Some(Found::Unknown);
        }
        if let Some(instances) = cached.filter(|i| i.version == version) {
            return Some(Found::Instances(instances));
        }
        // The datum moved on: work out the answer again, outside the locks.
        let (version, encoded) = self.shared.hub().publishers(service)?;
        let instances = Arc::new(Instances::new(version, &encoded, self.protection_threshold));
        if let Some(watched) = self.services.lock().get_mut(service)
            && watched
                .instances
                .as_ref()
                .is_none_or(|i| i.version < version)
        {
            watched.instances = Some(instances.clone());
        }
        Some(if version == 0 {
            Found::Unknown
        } else {
            Found::Instances(instances)
        })
    }

    /// The answer for `service`, watching it first if need be and waiting for its first
    /// snapshot up to [`FIRST_ANSWER_WITHIN`].
    pub async fn resolve(&self, service: &ServiceId) -> Result<Found, Unanswered> {
        let started = tokio::time::Instant::now();
        let first = {
            let mut services = self.services.lock();
            if services.contains_key(service) {
                false
            } else {
                if services.len() >= self.max_services {
                    drop(services);
                    self.warn_full(service);
                    return Err(Unanswered::Full);
                }
                let (watcher, first) = self.shared.watch(service.clone());
                services.insert(
                    service.clone(),
                    Watched {
                        watcher,
                        last_query: Instant::now(),
                        unknown: false,
                        instances: None,
                    },
                );
                first
            }
        };
        if first {
            debug!(%service, "DNS watches a new service");
            self.shared
                .link_event(LinkEvent::Want(service.clone()))
                .await;
        }
        loop {
            if let Some(found) = self.get(service, Instant::now()) {
                return Ok(found);
            }
            if started.elapsed() >= FIRST_ANSWER_WITHIN {
                return Err(Unanswered::NoSnapshot);
            }
            tokio::time::sleep(FIRST_ANSWER_POLL).await;
        }
    }

    fn warn_full(&self, service: &ServiceId) {
        let now = Instant::now();
        let mut warned = self.warned_full.lock();
        if warned.is_none_or(|at| now.duration_since(at) >= FULL_WARNING_EVERY) {
            *warned = Some(now);
            warn!(%service, max = self.max_services,
                "DNS watches as many services as --dns-max-services allows: queries for others \
                 are answered SERVFAIL until some go idle (this warning repeats at most every 10 s)");
        }
    }

    /// Stops watching the services nobody asked for since `idle` before `now` (since
    /// `unknown_idle` for names no service was published to); returns how many.
    pub fn sweep(&self, now: Instant, idle: Duration, unknown_idle: Duration) -> usize {
        let gone: Vec<(ServiceId, ConnId)> = {
            let mut services = self.services.lock();
            let gone = services
                .iter()
                .filter(|(_, w)| {
                    let quiet = now.saturating_duration_since(w.last_query);
                    quiet >= idle || (w.unknown && quiet >= unknown_idle)
                })
                .map(|(s, w)| (s.clone(), w.watcher))
                .collect::<Vec<_>>();
            for (service, _) in &gone {
                services.remove(service);
            }
            gone
        };
        for (service, watcher) in &gone {
            self.shared.unwatch(*watcher);
            debug!(%service, "DNS no longer watches an idle service");
        }
        gone.len()
    }

    /// Services watched.
    pub fn len(&self) -> usize {
        self.services.lock().len()
    }
}
