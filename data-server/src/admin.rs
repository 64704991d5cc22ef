//! The data server's HTTP admin view: slots, counts, repairs, owners, the persistent instances
//! of the slots it leads (`/admin/persistent`, with each one's check and health), and its gauges.

use std::collections::BTreeMap;
use std::sync::Arc;

use roster_common::SlotId;
use roster_common::admin::AdminSource;
use roster_common::proto::Publisher;

use crate::store::SlotState;

use crate::shared::Shared;

/// Records with a check in the slots this server leads, by health: `healthy` or `unhealthy`.
pub(crate) const METRIC_CHECKED: &str = "roster_data_checked_instances";
/// Persistent records in the slots this server leads.
pub(crate) const METRIC_PERSISTENT: &str = "roster_data_persistent_instances";

/// The data server's admin view: slots, counts, repairs, and its gauges.
pub(crate) struct DataAdmin {
    pub(crate) shared: Arc<Shared>,
    pub(crate) advertise: String,
}

impl AdminSource for DataAdmin {
    fn refresh_metrics(&self) {
        let slots = self.shared.store.lock().slot_summaries();
        for state in SlotState::ALL {
            let n = slots.iter().filter(|s| s.state == state).count();
            metrics::gauge!("roster_data_slots", "state" => state.name()).set(n as f64);
        }
        let led = slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::Leading | SlotState::Moving));
        let (services, publishers) =
            led.fold((0, 0), |(v, p), s| (v + s.services, p + s.publishers));
        metrics::gauge!("roster_data_services").set(services as f64);
        metrics::gauge!("roster_data_publishers").set(publishers as f64);
        let checks = self.shared.store.lock().check_counts();
        metrics::gauge!(METRIC_CHECKED, "health" => "healthy").set(checks.healthy as f64);
        metrics::gauge!(METRIC_CHECKED, "health" => "unhealthy").set(checks.unhealthy as f64);
        metrics::gauge!(METRIC_PERSISTENT).set(checks.persistent as f64);
    }

    fn acl(&self) -> Option<roster_common::acl::AclView> {
        self.shared.view().map(|view| view.acl.clone())
    }

    fn status(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = serde_json::Value> + Send + '_>> {
        Box::pin(async move {
            let shared = &self.shared;
            let (epoch, slots, checks, persistent) = {
                let store = shared.store.lock();
                let persistent: Vec<serde_json::Value> = store
                    .persistent_records()
                    .into_iter()
                    .map(|(slot, p)| persistent_entry(slot, p))
                    .collect();
                (
                    store.epoch(),
                    store.slot_summaries(),
                    store.check_counts(),
                    persistent,
                )
            };
            let count = |state: SlotState| slots.iter().filter(|s| s.state == state).count();
            let led: Vec<&crate::store::SlotSummary> = slots
                .iter()
                .filter(|s| matches!(s.state, SlotState::Leading | SlotState::Moving))
                .collect();
            let view = shared.view.borrow().clone();
            serde_json::json!({
                "server": {
                    "role": "data",
                    "id": shared.config.id,
                    "instance": format!("{:x}", shared.instance),
                    "addr": self.advertise,
                    "zone": shared.config.zone,
                    "version": env!("CARGO_PKG_VERSION"),
                    "ready": *shared.ready_tx.borrow(),
                },
                "cluster": {
                    "cluster_id": view.as_ref().map(|v| v.cluster_id.clone()),
                    "table_epoch_applied": epoch,
                    "meta_leader": view.as_ref().and_then(|v| v.meta_leader.clone()),
                },
                "counts": {
                    "leading": count(SlotState::Leading),
                    "moving": count(SlotState::Moving),
                    "following": count(SlotState::Following),
                    "fetching": count(SlotState::Fetching),
                    "services": led.iter().map(|s| s.services).sum::<usize>(),
                    "publishers": led.iter().map(|s| s.publishers).sum::<usize>(),
                    "followers": shared.replicators.lock().len(),
                    "persistent": checks.persistent,
                    "checked_healthy": checks.healthy,
                    "checked_unhealthy": checks.unhealthy,
                },
                "repairs": *shared.repairs.lock(),
                "owners": shared.store.lock().owner_counts().map(|(instance, n)| (format!("{instance:016x}"), n)).collect::<BTreeMap<String, usize>>(),
                "slots": slots,
                "persistent": persistent,
            })
        })
    }
}

/// One persistent instance of a led slot as `/admin/persistent` lists it. Data items that are not
/// UTF-8 are shown with replacement characters.
fn persistent_entry(slot: SlotId, p: &Publisher) -> serde_json::Value {
    serde_json::json!({
        "slot": slot,
        "service": p.service.as_str(),
        "id": p.register_id,
        "data": p.data.iter().map(|d| String::from_utf8_lossy(d)).collect::<Vec<_>>(),
        "attributes": p.attributes,
        "check": p.check,
        "health": p.health,
        "client_version": p.client_version,
    })
}
