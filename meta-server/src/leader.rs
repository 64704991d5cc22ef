//! What only the meta leader does: on taking over, starting every lease afresh and creating the
//! cluster's `Init` if it is missing; then expiring lapsed members (session servers subject to
//! self-preservation) and rebalancing slot leadership once a new table has settled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use roster_common::acl::{ANY_NAMESPACE, Permission, TokenRecord};
use roster_common::proto::{MemberKey, Role};
use roster_common::{InstanceId, unix_millis};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::leases::Leases;
use crate::state::Command;

use crate::node::Node;

/// While leading: starts every lease afresh on taking over, creates the cluster's `Init` if it is
/// missing, and expires lapsed members (sessions subject to self-preservation).
pub(crate) async fn keep_leases(node: Arc<Node>, shutdown: CancellationToken) {
    let period = (node.config.lease_timeout / 10).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let raft = node.raft.view();
        if !raft.is_leader {
            node.leases.lock().leader_term = None;
            continue;
        }
        if node.leases.lock().leader_term != Some(raft.term) {
            take_over(&node, raft.term).await;
            continue;
        }
        expire_lapsed(&node).await;
        maybe_rebalance(&node).await;
    }
}

/// Hands a data server that joined its share of leaderships once the table has been stable for
/// `rebalance_delay` (time for the newcomer to copy the slots it follows).
pub(crate) async fn maybe_rebalance(node: &Node) {
    let (epoch, needed) = node
        .raft
        .state_machine()
        .read(|m| (m.state.table.epoch, m.state.needs_rebalance()));
    let settled =
        node.leases
            .lock()
            .table_settled(epoch, Instant::now(), node.config.rebalance_delay);
    if needed && settled {
        match node.raft.write(Command::Rebalance {}).await {
            Ok(_) => info!(epoch, "rebalanced slot leadership over the data servers"),
            Err(e) => debug!(error = %e, "could not rebalance yet"),
        }
    }
}

pub(crate) async fn take_over(node: &Node, term: u64) {
    let (initialized, members) = node.raft.state_machine().read(|m| {
        (
            m.state.is_initialized(),
            m.state
                .members
                .values()
                .map(|m| (m.key(), m.instance))
                .collect::<Vec<_>>(),
        )
    });
    if !initialized {
        let Some(cluster_id) = node.cluster_id.read().clone() else {
            return;
        };
        let admin_token = match &node.config.admin_token {
            Some(token) => {
                let record = TokenRecord::of_token(
                    token.expose(),
                    vec![ANY_NAMESPACE.to_owned()],
                    Permission::ALL.to_vec(),
                    None,
                )
                .map(|mut record| {
                    record.description = "bootstrap admin token".into();
                    record.created_at_ms = unix_millis();
                    record.created_by = format!("meta node {}", node.config.id);
                    record
                });
                match record {
                    Ok(record) => Some(record),
                    Err(e) => {
                        warn!(error = %e, "the admin token is malformed; not creating the cluster");
                        return;
                    }
                }
            }
            None => None,
        };
        let init = Command::Init {
            cluster_id,
            slot_count: node.config.slot_count,
            replicas: node.config.replicas,
            min_data_servers: node.config.min_data_servers,
            admin_token,
        };
        if let Err(e) = node.raft.write(init).await {
            warn!(error = %e, "could not create the cluster yet");
            return;
        }
    }
    // Every member was cut off from the old leader too, and finds this one only after giving up
    // on the old (half a lease of failed renewals, then a connect timeout and backoff per meta
    // node tried): each gets that long again on top of its lease, so a failover expires nobody
    // that was renewing, at the cost of noticing a member that died with the old leader one lease
    // later.
    let now = Instant::now();
    let from = now + node.config.lease_timeout;
    let mut book = node.leases.lock();
    book.leases = Leases::new(node.config.lease_timeout);
    for (key, instance) in &members {
        book.leases.grant(*key, *instance, from);
    }
    book.leader_term = Some(term);
    info!(
        term,
        members = members.len(),
        "leading the meta group; every lease starts afresh, with one lease of grace"
    );
}

pub(crate) async fn expire_lapsed(node: &Node) {
    let now = Instant::now();
    let lapsed = node.leases.lock().leases.lapsed(now);
    if lapsed.is_empty()
        && !node
            .raft
            .state_machine()
            .read(|m| m.state.self_preservation)
    {
        return;
    }
    let (sessions, data): (Vec<_>, Vec<_>) = lapsed
        .into_iter()
        .partition(|(key, _)| key.role == Role::Session);
    for (key, instance) in data {
        expire(node, key, instance).await;
    }
    let (live, active) = node.raft.state_machine().read(|m| {
        (
            m.state
                .members
                .keys()
                .filter(|k| k.role == Role::Session)
                .count(),
            m.state.self_preservation,
        )
    });
    let verdict = node
        .leases
        .lock()
        .preservation
        .decide(sessions.len(), live, active, now);
    if let Some(on) = verdict.switch {
        if on {
            warn!(
                lapsed = sessions.len(),
                live,
                "too many session servers lost at once: self-preservation on, not expiring sessions"
            );
        }
        if let Err(e) = node.raft.write(Command::SelfPreservation { on }).await {
            warn!(error = %e, "could not switch self-preservation");
        }
    }
    if verdict.expire {
        for (key, instance) in sessions {
            if expire(node, key, instance).await {
                node.leases.lock().preservation.expired(now);
            }
        }
    }
}

pub(crate) async fn expire(node: &Node, key: MemberKey, instance: InstanceId) -> bool {
    match node.raft.write(Command::Remove { key, instance }).await {
        Ok(_) => {
            info!(member = %key, "lease expired");
            metrics::counter!("roster_lease_expiries_total", "role" => key.role.name())
                .increment(1);
            node.leases.lock().forget(&key);
            true
        }
        Err(e) => {
            warn!(member = %key, error = %e, "could not commit an expiry; will retry");
            false
        }
    }
}
