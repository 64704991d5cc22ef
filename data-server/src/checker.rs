//! Running the health checks of the slots this server leads.
//!
//! One task per checked record probes it every `interval_ms`, the first time after a random
//! delay within one interval so that a slot taken over does not probe all of its instances at
//! once, and never more than one probe at a time; the probe's result goes to the record's
//! [`Tracker`], and a new health it reports is written through the leader's write path
//! ([`Shared::lead`]), so followers replicate it and subscribers are pushed. The supervising task
//! ([`run_checks`]) rescans a slot whenever the store's stamp for it moves: it starts tasks for new
//! records, and stops those whose record is gone, whose check or address changed, or whose slot
//! this server no longer leads.
//!
//! Probes across all records are bounded by `DataConfig::probe_concurrency`; when more are due
//! they wait their turn, so many slow targets delay probes rather than open ever more sockets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use roster_common::SlotId;
use roster_common::health::{CheckSpec, Health, Probe};
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::health::Tracker;
use crate::probe;
use crate::shared::Shared;
use crate::store::{Checked, RecordKey};

/// Probes run, by result: `success` or `failure`.
pub(crate) const METRIC_CHECKS: &str = "roster_health_checks_total";
/// Failed probes, by reason: `refused`, `timeout`, `http_status`, `resolve`, `other`.
pub(crate) const METRIC_FAILURES: &str = "roster_health_check_failures_total";
/// How long each probe took, in seconds.
pub(crate) const METRIC_DURATION: &str = "roster_health_check_duration_seconds";

/// How often the store's check stamps are compared with what runs.
const SCAN: Duration = Duration::from_millis(100);

/// One running check.
struct Running {
    check: CheckSpec,
    probe: Probe,
    task: AbortHandle,
}

/// The checks running in one led slot, as of the slot's stamp.
#[derive(Default)]
struct SlotChecks {
    stamp: Option<u64>,
    running: HashMap<RecordKey, Running>,
}

impl SlotChecks {
    fn stop_all(&mut self) {
        for (_, run) in self.running.drain() {
            run.task.abort();
        }
    }
}

/// Keeps one check task per checked record of the slots this server leads, until `shutdown`.
pub(crate) async fn run_checks(shared: Arc<Shared>, shutdown: CancellationToken) {
    let probes = Arc::new(Semaphore::new(shared.config.probe_concurrency.max(1)));
    let mut slots: HashMap<SlotId, SlotChecks> = HashMap::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut scan = tokio::time::interval(SCAN);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Reaps the tasks stopped below.
            Some(_) = tasks.join_next() => continue,
            _ = scan.tick() => {}
        }
        let stamps: HashMap<SlotId, u64> = shared.store.lock().check_stamps().into_iter().collect();
        slots.retain(|slot, checks| {
            let led = stamps.contains_key(slot);
            if !led {
                checks.stop_all();
            }
            led
        });
        for (slot, stamp) in stamps {
            let checks = slots.entry(slot).or_default();
            if checks.stamp == Some(stamp) {
                continue;
            }
            checks.stamp = Some(stamp);
            let records = shared.store.lock().checked_in(slot);
            reconcile(&shared, &probes, &mut tasks, checks, records);
        }
    }
    tasks.shutdown().await;
}

/// Makes the running checks of a slot those of `records`: a check whose record is gone or whose
/// check or probe changed is stopped; a record without a running check gets one.
fn reconcile(
    shared: &Arc<Shared>,
    probes: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    checks: &mut SlotChecks,
    records: Vec<Checked>,
) {
    let mut wanted: HashMap<RecordKey, Checked> = HashMap::new();
    for record in records {
        match &record.probe {
            Ok(_) => {
                wanted.insert(record.key.clone(), record);
            }
            Err(e) => {
                debug!(service = %record.key.0, id = %record.key.2, error = %e, "a check with no address to probe; not run")
            }
        }
    }
    checks.running.retain(|key, run| {
        let same = wanted
            .get(key)
            .is_some_and(|c| c.check == run.check && c.probe.as_ref() == Ok(&run.probe));
        if same {
            wanted.remove(key);
        } else {
            run.task.abort();
        }
        same
    });
    for (key, record) in wanted {
        let Ok(probe) = record.probe else { continue };
        let task = tasks.spawn(check_one(
            shared.clone(),
            probes.clone(),
            key.clone(),
            record.check.clone(),
            probe.clone(),
            record.health,
        ));
        checks.running.insert(
            key,
            Running {
                check: record.check,
                probe,
                task,
            },
        );
    }
}

/// Probes one record every interval for as long as it runs, writing each health its tracker
/// reports.
async fn check_one(
    shared: Arc<Shared>,
    probes: Arc<Semaphore>,
    key: RecordKey,
    check: CheckSpec,
    probe: Probe,
    recorded: Option<Health>,
) {
    let interval = Duration::from_millis(check.interval_ms.max(1));
    let timeout = Duration::from_millis(check.timeout_ms.max(1));
    let mut tracker = Tracker::new(&check, recorded.as_ref());
    let jitter = Duration::from_millis(rand::random_range(0..check.interval_ms.max(1)));
    let mut next = Instant::now() + jitter;
    loop {
        tokio::time::sleep_until(next).await;
        let Ok(permit) = probes.acquire().await else {
            return;
        };
        let started = Instant::now();
        let result = probe::run(&probe, timeout).await;
        drop(permit);
        metrics::histogram!(METRIC_DURATION).record(started.elapsed().as_secs_f64());
        let (ok, reason) = match result {
            Ok(()) => {
                metrics::counter!(METRIC_CHECKS, "result" => "success").increment(1);
                (true, None)
            }
            Err(failure) => {
                metrics::counter!(METRIC_CHECKS, "result" => "failure").increment(1);
                metrics::counter!(METRIC_FAILURES, "reason" => failure.kind.label()).increment(1);
                (false, Some(failure.reason))
            }
        };
        let was = tracker.healthy();
        if let Some(health) = tracker.on_result(ok, reason, roster_common::unix_millis()) {
            if health.healthy != was {
                info!(
                    service = %key.0,
                    id = %key.2,
                    client = %key.1,
                    healthy = health.healthy,
                    reason = health.failure.as_deref().unwrap_or(""),
                    "instance health changed"
                );
            }
            if let Err(e) = shared.lead(|store| store.set_health(&key, &check, &probe, health)) {
                debug!(service = %key.0, id = %key.2, error = %e, "could not record a health");
            }
        }
        next = started + interval;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use roster_common::ServiceId;
    use roster_common::proto::{PersistentInstance, Publisher, WriteOp};
    use tokio::net::TcpListener;

    use super::*;
    use crate::testing::{self, http_responder, wait_until};

    const DEADLINE: Duration = Duration::from_secs(10);

    fn fast(target: &str) -> CheckSpec {
        CheckSpec {
            interval_ms: 100,
            timeout_ms: 100,
            rise: 1,
            fall: 2,
            ..CheckSpec::new(target)
        }
    }

    fn health_of(shared: &Shared, service: &ServiceId) -> Option<(Health, u64)> {
        let snapshot = shared.store.lock().snapshot(service).ok()?;
        let p = snapshot.publishers.first()?;
        Some((p.health.clone()?, p.client_version))
    }

    #[tokio::test]
    async fn an_ephemeral_check_records_its_first_result_then_its_fall() {
        let node = testing::node(&testing::identity(), vec![], testing::view(BTreeMap::new()));
        let shared = node.shared.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service: ServiceId = "web".parse().unwrap();
        let publisher = Publisher {
            client_id: "c".into(),
            register_id: "r".into(),
            service: service.clone(),
            data: vec![Bytes::from(listener.local_addr().unwrap().to_string())],
            attributes: Default::default(),
            client_version: 7,
            session: 1,
            session_instance: 9,
            owner: 1,
            persistent: false,
            check: Some(fast("tcp")),
            health: None,
            registered_ms: 0,
        };
        shared
            .lead(|store| store.write(WriteOp::Put { publisher }))
            .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_checks(shared.clone(), shutdown.clone()));

        wait_until("the first result", DEADLINE, || {
            health_of(&shared, &service).is_some_and(|(h, _)| h.checked_ms != 0)
        })
        .await;
        assert!(health_of(&shared, &service).unwrap().0.healthy);

        drop(listener);
        wait_until("the fall", DEADLINE, || {
            health_of(&shared, &service).is_some_and(|(h, _)| !h.healthy)
        })
        .await;
        let (health, version) = health_of(&shared, &service).unwrap();
        assert_eq!(health.failure.as_deref(), Some("connection refused"));
        assert_eq!(version, 7, "an ephemeral record keeps its client version");

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_persistent_http_check_falls_on_a_500_and_rises_on_a_200() {
        let node = testing::node(&testing::identity(), vec![], testing::view(BTreeMap::new()));
        let shared = node.shared.clone();
        let (broken, _seen) = http_responder(500).await;
        let (fine, _seen_too) = http_responder(200).await;
        let service: ServiceId = "api".parse().unwrap();
        let slot = roster_common::slot::slot_of(&service, testing::SLOTS);
        let instance = |authority: std::net::SocketAddr, version| {
            let instance = PersistentInstance {
                service: service.clone(),
                id: "one".into(),
                data: vec![Bytes::from_static(b"10.0.0.1:80")],
                attributes: Default::default(),
                check: Some(fast(&format!("http://{authority}/health"))),
                registered_ms: 0,
                by: String::new(),
            };
            shared
                .lead(|store| store.merge_persistent(slot, version, vec![instance]))
                .unwrap();
        };
        instance(broken, 1);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_checks(shared.clone(), shutdown.clone()));
        wait_until("the fall", DEADLINE, || {
            health_of(&shared, &service).is_some_and(|(h, _)| !h.healthy)
        })
        .await;
        let (health, version) = health_of(&shared, &service).unwrap();
        assert_eq!(health.failure.as_deref(), Some("HTTP 500"));
        assert!(
            version > 1,
            "a persistent record's version moves with its health"
        );

        // The check moves to a healthy endpoint: the old probe stops, the new one starts over
        // from an unchecked health.
        instance(fine, 2);
        wait_until("the new check's first result", DEADLINE, || {
            health_of(&shared, &service).is_some_and(|(h, _)| h.healthy && h.checked_ms != 0)
        })
        .await;
        shutdown.cancel();
        task.await.unwrap();
    }
}
