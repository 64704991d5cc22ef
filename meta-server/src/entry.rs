//! How a fresh meta node enters a cluster: creating it (`--bootstrap`, the lowest id of the
//! initial voters) or joining one through a member of it (`--join`), and refusing to join another
//! cluster than the one on disk.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use roster_common::peers::PeerPool;
use roster_common::proto::{MetaRequest, MetaResponse};
use roster_common::{Error, NodeId, Result};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{MetaConfig, Start};

use crate::node::{ADD_META_TIMEOUT, Node};

/// A node with state asked to `--join` checks that the node it names is of its own cluster.
pub(crate) async fn refuse_other_cluster(
    pool: &PeerPool,
    addr: &str,
    ours: &str,
    config: &MetaConfig,
) -> Result<()> {
    let answer = pool.call::<_, MetaResponse>(
        addr,
        &MetaRequest::NodeInfo {},
        config.max_frame,
        config.request_timeout,
    );
    match answer.await {
        Ok(MetaResponse::NodeInfo {
            cluster_id: Some(theirs),
            ..
        }) if theirs != ours => Err(Error::ClusterMismatch(format!(
            "the data in {} belongs to cluster {ours}, but the meta node at {addr} belongs to cluster {theirs}; use an empty --data-dir to join it",
            config.data_dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Creates the cluster (bootstrap) or joins it, as configured, for a node that has not yet.
pub(crate) async fn enter_cluster(node: Arc<Node>, shutdown: CancellationToken) {
    let result = match node.config.start.clone() {
        Start::Recover => return,
        Start::Bootstrap(voters) => bootstrap(&node, voters).await,
        Start::Join { addr, learner } => {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = join(&node, &addr, learner, &shutdown) => result,
            }
        }
    };
    if let Err(e) = result {
        warn!(error = %e, "could not enter the cluster");
    }
}

pub(crate) async fn bootstrap(node: &Node, voters: BTreeMap<NodeId, String>) -> Result<()> {
    if node.raft.is_initialized().await || node.cluster_id.read().is_some() {
        return Ok(());
    }
    let lowest = *voters.keys().next().expect("validated non-empty");
    if lowest != node.config.id {
        info!(
            creator = lowest,
            "waiting for meta node {lowest} to create the cluster"
        );
        return Ok(());
    }
    let cluster_id = format!("{:016x}", rand::random::<u64>());
    node.adopt_cluster(&cluster_id)?;
    info!(cluster = %cluster_id, voters = ?voters, "creating the meta group");
    node.raft.initialize(voters).await
}

pub(crate) async fn join(
    node: &Node,
    addr: &str,
    learner: bool,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        match try_join(node, addr, learner).await {
            Ok(()) => return Ok(()),
            Err(e @ Error::ClusterMismatch(_)) => {
                tracing::error!(error = %e, "refusing to join");
                return Err(e);
            }
            Err(e) => warn!(via = %addr, error = %e, "could not join the meta group yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

pub(crate) async fn try_join(node: &Node, addr: &str, learner: bool) -> Result<()> {
    let view = node.raft.view();
    if view.voters.contains_key(&node.config.id)
        || (learner && view.learners.contains_key(&node.config.id))
    {
        return Ok(());
    }
    let info = node
        .pool
        .call(
            addr,
            &MetaRequest::NodeInfo {},
            node.config.max_frame,
            node.config.request_timeout,
        )
        .await?;
    let MetaResponse::NodeInfo {
        cluster_id: Some(theirs),
        ..
    } = info
    else {
        return Err(Error::Unavailable(format!(
            "the meta node at {addr} belongs to no cluster yet"
        )));
    };
    node.adopt_cluster(&theirs)?;
    info!(via = %addr, cluster = %theirs, "asking to join the meta group");
    let request = MetaRequest::AddMeta {
        addr: node.advertise.clone(),
        learner,
    };
    node.pool
        .call::<_, MetaResponse>(addr, &request, node.config.max_frame, ADD_META_TIMEOUT)
        .await?;
    info!(learner, "joined the meta group");
    Ok(())
}
