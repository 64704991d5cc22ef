//! Raft messages between meta nodes, over the same QUIC peer link (`roster-peer/1`, mutual TLS) as
//! everything else: one `MetaRequest::Raft` per message, its payload the MessagePack of openraft's
//! own request type, answered by the MessagePack of openraft's `Result`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};
use parking_lot::RwLock;
use roster_common::peers::PeerPool;
use roster_common::proto::{MetaRequest, MetaResponse, RaftKind};
use roster_common::{Error, rpc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{MetaNode, NodeId, TypeConfig};

/// A full snapshot as one message.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotMessage {
    pub vote: Vote<NodeId>,
    pub meta: openraft::SnapshotMeta<NodeId, MetaNode>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// What every link needs: who we are, our cluster, and the connections.
#[derive(Clone)]
pub struct Network {
    pub(crate) me: NodeId,
    pub(crate) cluster_id: Arc<RwLock<Option<String>>>,
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) max_frame: u32,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, node: &MetaNode) -> Link {
        Link {
            network: self.clone(),
            target,
            addr: node.addr.clone(),
            last_refusal_logged: None,
        }
    }
}

/// The link to one other meta node. Connects on first use (through the shared pool).
pub struct Link {
    network: Network,
    target: NodeId,
    addr: String,
    /// Refusals repeat with every heartbeat; they are logged at most every [`REFUSAL_LOG_EVERY`].
    last_refusal_logged: Option<std::time::Instant>,
}

/// How often a link logs that its target keeps refusing it.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a message did not get an answer from the target's Raft.
enum SendError {
    /// The target could not be reached, or refused the message before Raft saw it.
    Transport(Error),
}

impl Link {
    async fn send<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        kind: RaftKind,
        message: &Req,
        timeout: Duration,
    ) -> Result<Resp, SendError> {
        let payload = rmp_serde::to_vec_named(message).map_err(|e| {
            SendError::Transport(Error::Internal(format!(
                "cannot encode a Raft message: {e}"
            )))
        })?;
        let request = MetaRequest::Raft {
            cluster_id: self.network.cluster_id.read().clone().unwrap_or_default(),
            from: self.network.me,
            kind,
            payload: Bytes::from(payload),
        };
        let conn = self
            .network
            .pool
            .get(&self.addr)
            .await
            .map_err(SendError::Transport)?;
        match rpc::call::<_, MetaResponse>(&conn, &request, self.network.max_frame, timeout).await {
            Ok(MetaResponse::Raft { payload }) => rmp_serde::from_slice(&payload)
                .map_err(|e| SendError::Transport(Error::BadFrame(format!("bad Raft reply: {e}")))),
            Ok(other) => Err(SendError::Transport(Error::UnexpectedMessage(format!(
                "expected a Raft reply, got {other:?}"
            )))),
            Err(e) => {
                let due = self
                    .last_refusal_logged
                    .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY);
                if matches!(e, Error::ClusterMismatch(_)) && due {
                    self.last_refusal_logged = Some(std::time::Instant::now());
                    tracing::error!(target = self.target, addr = %self.addr, error = %e, "a meta node refuses our Raft messages");
                }
                Err(SendError::Transport(e))
            }
        }
    }

    fn unreachable(e: Error) -> Unreachable {
        Unreachable::new(&e)
    }
}

type RpcResult<T> = Result<T, RPCError<NodeId, MetaNode, RaftError<NodeId>>>;

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self
            .send::<_, Result<_, RaftError<NodeId>>>(
                RaftKind::AppendEntries,
                &request,
                option.hard_ttl(),
            )
            .await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(SendError::Transport(e)) => Err(RPCError::Unreachable(Self::unreachable(e))),
        }
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self
            .send::<_, Result<_, RaftError<NodeId>>>(RaftKind::Vote, &request, option.hard_ttl())
            .await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(SendError::Transport(e)) => Err(RPCError::Unreachable(Self::unreachable(e))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let message = SnapshotMessage {
            vote,
            meta: snapshot.meta,
            data: *snapshot.snapshot,
        };
        let send = self.send::<_, Result<SnapshotResponse<NodeId>, Fatal<NodeId>>>(
            RaftKind::Snapshot,
            &message,
            option.hard_ttl(),
        );
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => match result {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(fatal)) => Err(StreamingError::RemoteError(RemoteError::new(self.target, fatal))),
                Err(SendError::Transport(e)) => Err(StreamingError::Network(NetworkError::new(&e))),
            },
        }
    }
}
