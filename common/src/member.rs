//! The member agent: how a data or session server stays in the cluster.
//!
//! The agent registers with a meta node, renews its lease on an interval the meta tier chooses, and
//! holds a watch stream on which the meta tier pushes every committed [`ClusterView`]. The latest
//! view is published on a `watch` channel for the server to act on. When the meta node it talks to
//! fails, the agent moves to the next configured address; when its lease is reported unknown (it
//! expired), it registers again with the same instance. On shutdown it leaves the cluster so its
//! lease does not have to lapse.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::frame;
use crate::peers::PeerPool;
use crate::proto::{ClusterView, Member, MetaRequest, MetaResponse, Reply};
use crate::rpc;

/// Pause between attempts when no meta node answers; doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);
/// How long leaving may take at shutdown before the lease is left to lapse instead.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long dialing one meta node may take before the next is tried. A meta node that is down
/// answers nothing until the handshake times out; waiting the whole request timeout on it (then on
/// the next dead one) while the meta group fails over would outlast this member's lease, and the
/// meta tier would declare a live member dead. A handshake takes a few round trips.
const META_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How a member reaches the meta tier.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// Meta node addresses; the agent tries them in order.
    pub metas: Vec<String>,
    /// This server, as it registers (`joined_at_ms` is set by the meta tier).
    pub member: Member,
    pub max_frame: u32,
    pub request_timeout: Duration,
    /// A session server's load to report with every renewal (its connection count), and where to
    /// put the mean load the meta tier answers with.
    pub load: Option<(Arc<AtomicU64>, Arc<AtomicU64>)>,
    /// A session server's subscription count, reported beside its load (for the console).
    pub subscribers: Option<Arc<AtomicU64>>,
}

/// The latest committed view, or `None` before the first one arrives.
pub type ViewRx = watch::Receiver<Option<Arc<ClusterView>>>;

/// Starts the agent. It runs until `shutdown` fires, then leaves the cluster.
pub fn spawn(
    config: MemberConfig,
    pool: Arc<PeerPool>,
    shutdown: CancellationToken,
) -> (ViewRx, JoinHandle<()>) {
    let (view_tx, view_rx) = watch::channel(None);
    let task = tokio::spawn(run(config, pool, shutdown, view_tx));
    (view_rx, task)
}

/// One request to the meta tier: tried on each address of `metas` in turn until one answers
/// with anything but a sign that it cannot serve now (unreachable, no quorum, not leader, not
/// ready). Followers forward writes to their leader, so any node will do.
pub async fn call_meta(
    pool: &PeerPool,
    metas: &[String],
    request: &MetaRequest,
    max_frame: u32,
    timeout: Duration,
) -> Result<MetaResponse> {
    let mut last = Error::Unavailable("no meta node is configured".into());
    for addr in metas {
        match pool
            .call::<_, MetaResponse>(addr, request, max_frame, timeout)
            .await
        {
            Ok(response) => return Ok(response),
            Err(
                e @ (Error::NoQuorum(_)
                | Error::Unavailable(_)
                | Error::NotLeader { .. }
                | Error::Connection(_)
                | Error::Timeout(_)),
            ) => last = e,
            Err(other) => return Err(other),
        }
    }
    Err(last)
}

async fn run(
    config: MemberConfig,
    pool: Arc<PeerPool>,
    shutdown: CancellationToken,
    view_tx: watch::Sender<Option<Arc<ClusterView>>>,
) {
    let mut cluster_id: Option<String> = None;
    let mut next = 0usize;
    let mut delay = FIRST_RETRY_DELAY;
    let mut last_meta: Option<String> = None;
    while !shutdown.is_cancelled() {
        let addr = config.metas[next % config.metas.len()].clone();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => Ok(()),
            result = session(&config, &pool, &addr, &mut cluster_id, &shutdown, &view_tx) => result,
        };
        match attempt {
            Ok(()) => {
                last_meta = Some(addr);
                break;
            }
            Err(e) => {
                match &e {
                    Error::ClusterMismatch(_) => {
                        warn!(meta = %addr, error = %e, "meta node belongs to another cluster")
                    }
                    // The meta group is starting or electing: normal for a moment.
                    Error::NoQuorum(_) | Error::Unavailable(_) | Error::NotLeader { .. } => {
                        info!(meta = %addr, error = %e, "meta tier not ready; trying the next node")
                    }
                    _ => warn!(meta = %addr, error = %e, "lost the meta node; trying the next"),
                }
                last_meta = Some(addr);
                next += 1;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
    // Leave at once so the meta tier need not wait for the lease to lapse.
    if let Some(addr) = last_meta {
        let member = &config.member;
        let leave = async {
            let request = MetaRequest::Leave {
                role: member.role,
                id: member.id,
                instance: member.instance,
            };
            pool.call::<_, MetaResponse>(&addr, &request, config.max_frame, LEAVE_TIMEOUT)
                .await
        };
        match tokio::time::timeout(LEAVE_TIMEOUT, leave).await {
            Ok(Ok(_)) => info!(member = %member.key(), "left the cluster"),
            Ok(Err(e)) => {
                debug!(member = %member.key(), error = %e, "could not leave the cluster cleanly")
            }
            Err(_) => debug!(member = %member.key(), "no answer to leaving the cluster"),
        }
    }
}

/// Registers with the meta node at `addr`, then renews and follows views until shutdown (`Ok`) or
/// until the meta node fails (`Err`).
async fn session(
    config: &MemberConfig,
    pool: &PeerPool,
    addr: &str,
    cluster_id: &mut Option<String>,
    shutdown: &CancellationToken,
    view_tx: &watch::Sender<Option<Arc<ClusterView>>>,
) -> Result<()> {
    let conn = tokio::time::timeout(META_CONNECT_TIMEOUT, pool.get(addr))
        .await
        .map_err(|_| {
            Error::Connection(format!(
                "cannot connect to {addr}: no handshake within {META_CONNECT_TIMEOUT:?}"
            ))
        })??;
    let member = &config.member;
    let (renew_every, lease) = register(config, &conn, cluster_id).await?;
    // Renewals may fail for a moment (the meta leader changing); if they keep failing for half a
    // lease, another meta node may do better.
    let give_up_after = lease / 2;
    let mut last_renewed = tokio::time::Instant::now();
    info!(member = %member.key(), meta = %addr, cluster = cluster_id.as_deref().unwrap_or(""), "registered with the meta tier");

    let (mut send, mut recv) = conn.open_bi().await?;
    frame::write_frame(&mut send, &MetaRequest::Watch {}, config.max_frame).await?;
    let _ = send.finish();

    let mut renew = tokio::time::interval(renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renew_request = |load: Option<u64>| MetaRequest::Renew {
        role: member.role,
        id: member.id,
        instance: member.instance,
        load,
        subscribers: config
            .subscribers
            .as_ref()
            .map(|n| n.load(Ordering::Relaxed)),
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = renew.tick() => {
                // A renewal must not outlast the interval: a meta node that died silently has to be
                // noticed well within the lease.
                let timeout = renew_every.min(config.request_timeout);
                let load = config.load.as_ref().map(|(ours, _)| ours.load(Ordering::Relaxed));
                match rpc::call::<_, MetaResponse>(&conn, &renew_request(load), config.max_frame, timeout).await {
                    Ok(answer) => {
                        last_renewed = tokio::time::Instant::now();
                        if let (MetaResponse::Renewed { mean_session_load: Some(mean) }, Some((_, out))) = (answer, &config.load) {
                            out.store(mean, Ordering::Relaxed);
                        }
                    }
                    Err(Error::UnknownMember(why)) => {
                        warn!(member = %member.key(), %why, "lease was lost; registering again");
                        register(config, &conn, cluster_id).await?;
                        last_renewed = tokio::time::Instant::now();
                    }
                    Err(e) if e.is_retryable() && conn.close_reason().is_none() && last_renewed.elapsed() < give_up_after => {
                        debug!(member = %member.key(), error = %e, "renewal failed; retrying");
                    }
                    Err(e) => return Err(e),
                }
            }
            next = frame::read_frame::<_, Reply<ClusterView>>(&mut recv, config.max_frame) => {
                match next? {
                    Some(Ok(view)) => {
                        debug!(epoch = view.table.epoch, members = view.members.len(), "cluster view");
                        let first = view_tx.borrow().is_none();
                        if first && !view.acl.enabled {
                            warn!(
                                "this cluster was created with --insecure-no-auth: clients are not asked for tokens, and anyone who can reach a session server may publish, subscribe and read /admin"
                            );
                        }
                        view_tx.send_replace(Some(Arc::new(view)));
                    }
                    Some(Err(wire)) => return Err(Error::from_wire(wire)),
                    None => return Err(Error::Connection("the meta node ended the watch stream".into())),
                }
            }
        }
    }
}

/// Registers and returns the renew interval and lease timeout the meta tier asked for.
async fn register(
    config: &MemberConfig,
    conn: &quinn::Connection,
    cluster_id: &mut Option<String>,
) -> Result<(Duration, Duration)> {
    let request = MetaRequest::Register {
        member: config.member.clone(),
        cluster_id: cluster_id.clone(),
    };
    match rpc::call(conn, &request, config.max_frame, config.request_timeout).await? {
        MetaResponse::Registered {
            cluster_id: id,
            renew_interval_ms,
            lease_timeout_ms,
        } => {
            if let Some(known) = cluster_id.as_deref()
                && known != id
            {
                return Err(Error::ClusterMismatch(format!(
                    "this server belongs to cluster {known}, the meta node to cluster {id}"
                )));
            }
            *cluster_id = Some(id);
            Ok((
                Duration::from_millis(renew_interval_ms.max(10)),
                Duration::from_millis(lease_timeout_ms.max(20)),
            ))
        }
        other => Err(Error::UnexpectedMessage(format!(
            "expected Registered, got {other:?}"
        ))),
    }
}
