//! The meta node's HTTP admin view: the Raft group, members, slot table, access rules, and the
//! gauges refreshed before each scrape.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use roster_common::admin::AdminSource;
use roster_common::proto::{MetaRequest, MetaResponse, Role};

use crate::node::{FORWARD_TIMEOUT, Node};

/// The meta node's admin view: the Raft group, members, slot table, and its gauges.
pub(crate) struct MetaAdmin {
    pub(crate) node: Arc<Node>,
}

impl AdminSource for MetaAdmin {
    fn refresh_metrics(&self) {
        let raft = self.node.raft.view();
        metrics::gauge!("roster_raft_term").set(raft.term as f64);
        metrics::gauge!("roster_raft_leader_id").set(raft.leader.unwrap_or(0) as f64);
        metrics::gauge!("roster_raft_is_leader").set(if raft.is_leader { 1.0 } else { 0.0 });
        metrics::gauge!("roster_raft_last_log_index").set(raft.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("roster_raft_applied_index").set(raft.last_applied.unwrap_or(0) as f64);
        let (data, sessions, epoch, preservation, persistent) =
            self.node.raft.state_machine().read(|m| {
                let count = |role| m.state.members.values().filter(|x| x.role == role).count();
                (
                    count(Role::Data),
                    count(Role::Session),
                    m.state.table.epoch,
                    m.state.self_preservation,
                    m.state.persistent_count(),
                )
            });
        metrics::gauge!("roster_meta_members", "role" => "data").set(data as f64);
        metrics::gauge!("roster_meta_members", "role" => "session").set(sessions as f64);
        metrics::gauge!("roster_meta_table_epoch").set(epoch as f64);
        metrics::gauge!("roster_meta_persistent_instances").set(persistent as f64);
        metrics::gauge!("roster_self_preservation").set(if preservation { 1.0 } else { 0.0 });
    }

    fn acl(&self) -> Option<roster_common::acl::AclView> {
        self.node
            .raft
            .state_machine()
            .read(|m| m.state.is_initialized().then(|| m.state.acl.clone()))
    }

    fn status(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>> {
        Box::pin(async move {
            let node = &self.node;
            // The leader's status (with replication lag and leases) when it answers in time;
            // this node's own otherwise.
            let status = match tokio::time::timeout(
                FORWARD_TIMEOUT,
                node.handle(MetaRequest::Status { local: false }, false),
            )
            .await
            {
                Ok(Ok(MetaResponse::Status(status))) => status,
                _ => node.status(true),
            };
            let (members, table) = node.raft.state_machine().read(|m| {
                (
                    m.state.members.values().cloned().collect::<Vec<_>>(),
                    m.state.table.clone(),
                )
            });
            serde_json::json!({
                "server": {
                    "role": "meta",
                    "id": node.config.id,
                    "addr": node.advertise,
                    "version": env!("CARGO_PKG_VERSION"),
                },
                "raft": status,
                "members": members,
                "table": table,
            })
        })
    }
}
