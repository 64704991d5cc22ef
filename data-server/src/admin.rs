//! The data server's HTTP admin view: slots, counts, repairs, owners, and its gauges.

use std::collections::BTreeMap;
use std::sync::Arc;

use roster_common::admin::AdminSource;

use crate::store::SlotState;

use crate::shared::Shared;

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
    }

    fn acl(&self) -> Option<roster_common::acl::AclView> {
        self.shared.view().map(|view| view.acl.clone())
    }

    fn status(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = serde_json::Value> + Send + '_>> {
        Box::pin(async move {
            let shared = &self.shared;
            let (epoch, slots) = {
                let store = shared.store.lock();
                (store.epoch(), store.slot_summaries())
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
                },
                "repairs": *shared.repairs.lock(),
                "owners": shared.store.lock().owner_counts().map(|(instance, n)| (format!("{instance:016x}"), n)).collect::<BTreeMap<String, usize>>(),
                "slots": slots,
            })
        })
    }
}
