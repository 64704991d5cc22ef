//! The session server's admin view: connections, services and links, and its gauges.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use roster_common::acl::AclView;
use roster_common::admin::AdminSource;
use roster_common::proto::Role;
use serde_json::json;

use crate::shared::Shared;

pub(crate) struct SessionAdmin {
    pub shared: Arc<Shared>,
    pub advertise: String,
}

impl AdminSource for SessionAdmin {
    fn refresh_metrics(&self) {
        let (counts, pending) = {
            let hub = self.shared.hub();
            (hub.counts(), hub.pending())
        };
        let publishers = self.shared.owned().len();
        metrics::gauge!("roster_session_connections").set(counts.connections as f64);
        metrics::gauge!("roster_session_subscribers").set(counts.subscribers as f64);
        metrics::gauge!("roster_session_publishers").set(publishers as f64);
        metrics::gauge!("roster_session_push_pending").set(pending as f64);
    }

    fn acl(&self) -> Option<AclView> {
        self.shared.view().map(|view| view.acl.clone())
    }

    fn status(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>> {
        Box::pin(async move {
            let shared = &self.shared;
            let config = shared.config();
            let (counts, services) = {
                let hub = shared.hub();
                (hub.counts(), hub.services())
            };
            let publishers = shared.owned().len();
            let links = shared.data_links();
            let (data_servers, links_up) = (links.wanted, links.up);
            let view = shared.view();
            json!({
                "server": {
                    "role": "session",
                    "id": config.id,
                    "instance": format!("{:x}", shared.instance()),
                    "addr": self.advertise,
                    "zone": config.zone,
                    "version": env!("CARGO_PKG_VERSION"),
                    "draining": shared.draining().is_cancelled(),
                },
                "cluster": {
                    "cluster_id": view.as_ref().map(|v| v.cluster_id.clone()),
                    "table_epoch": view.as_ref().map(|v| v.table.epoch),
                    "meta_leader": view.as_ref().and_then(|v| v.meta_leader.clone()),
                    "sessions": view.as_ref().map_or(0, |v| v.members_of(Role::Session).count()),
                    "data_servers": data_servers,
                    "data_links_up": links_up,
                    "mean_session_load": shared.mean_load(),
                },
                "connections": {
                    "count": counts.connections,
                    "max": config.max_connections,
                    "subscribers": counts.subscribers,
                    "publishers": publishers,
                    "limits": {
                        "publishers_per_connection": config.max_publishers_per_connection,
                        "subscriptions_per_connection": config.max_subscriptions_per_connection,
                        "requests_per_connection": config.max_requests_per_connection,
                        "publisher_bytes": config.max_publisher_bytes,
                        "push_stall_ms": config.push_stall_timeout.as_millis() as u64,
                    },
                },
                "services": services
                    .into_iter()
                    .map(|s| json!({
                        "service": s.service,
                        "subscribers": s.subscribers,
                        "version": s.version,
                    }))
                    .collect::<Vec<_>>(),
            })
        })
    }
}
