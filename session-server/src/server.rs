//! The session server's shell: the client endpoint, the member agent, the forwarder and the data
//! links, wired together.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use roster_common::member::{self, MemberConfig, ViewRx};
use roster_common::peers::PeerPool;
use roster_common::proto::{ALPN_CLIENT, ALPN_PEER, ClusterView, Member, Role};
use roster_common::tls::{self, NodeIdentity};
use roster_common::{InstanceId, Result, ids, quic, serve};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::SessionConfig;
use crate::conn::serve_client;
use crate::forward::{self, FORWARD_QUEUE, Forward};
use crate::hub::{ConnId, Hub};
use crate::links::{self, LINK_EVENTS, LinkEvent};
use crate::owned::Owned;

/// A session server, built from its config and run until a shutdown signal.
pub struct SessionServer {
    config: SessionConfig,
    identity: NodeIdentity,
    instance: InstanceId,
    ready_tx: watch::Sender<bool>,
}

/// What every task of a session server shares.
pub(crate) struct Shared {
    pub config: SessionConfig,
    pub instance: InstanceId,
    pub hub: Mutex<Hub>,
    /// The publishers of every client connected here: the source copy.
    pub owned: Mutex<Owned>,
    pub pool: Arc<PeerPool>,
    pub view: ViewRx,
    pub forward_tx: mpsc::Sender<Forward>,
    links_tx: mpsc::Sender<LinkEvent>,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn view(&self) -> Option<Arc<ClusterView>> {
        self.view.borrow().clone()
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn link_event(&self, event: LinkEvent) {
        // Fails only when the manager has stopped, at shutdown.
        let _ = self.links_tx.send(event).await;
    }
}

impl SessionServer {
    pub fn new(config: SessionConfig, identity: NodeIdentity) -> Result<Self> {
        config.validate()?;
        Ok(SessionServer {
            config,
            identity,
            instance: ids::new_instance_id(),
            ready_tx: watch::channel(false).0,
        })
    }

    /// True while the server is a member of the cluster with a slot table.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Serves clients on `socket` until `shutdown` fires.
    pub async fn run(self, socket: UdpSocket, shutdown: CancellationToken) -> Result<()> {
        let config = self.config;
        let advertise = quic::advertised_addr(config.advertise.as_deref(), &socket)?;
        let server_tls = tls::client_facing_server(&self.identity, ALPN_CLIENT)?;
        let server_config = quic::server_config(server_tls, &config.client_transport)?;
        let peer_tls = tls::peer_client(&self.identity, ALPN_PEER)?;
        let peer_config = quic::client_config(peer_tls, &config.peer_transport, false)?;
        let endpoint = quic::endpoint(socket, Some(server_config))?;
        let pool = Arc::new(PeerPool::new(
            endpoint.clone(),
            peer_config,
            config.request_timeout,
        ));

        let agent_shutdown = CancellationToken::new();
        let (view, agent) = member::spawn(
            MemberConfig {
                metas: config.metas.clone(),
                member: Member {
                    role: Role::Session,
                    id: config.id,
                    instance: self.instance,
                    addr: advertise.clone(),
                    zone: config.zone.clone(),
                    joined_at_ms: 0,
                },
                max_frame: config.max_frame,
                request_timeout: config.request_timeout,
            },
            pool.clone(),
            agent_shutdown.clone(),
        );
        let (forward_tx, forward_rx) = mpsc::channel(FORWARD_QUEUE);
        let (links_tx, links_rx) = mpsc::channel(LINK_EVENTS);
        let shared = Arc::new(Shared {
            hub: Mutex::new(Hub::new(config.max_frame)),
            owned: Mutex::new(Owned::default()),
            config: config.clone(),
            instance: self.instance,
            pool: pool.clone(),
            view,
            forward_tx,
            links_tx: links_tx.clone(),
            next_conn: AtomicU64::new(1),
        });
        info!(id = config.id, addr = %advertise, instance = format_args!("{:x}", self.instance), "session server serving clients");

        let tracker = TaskTracker::new();
        tracker.spawn(forward::run(shared.clone(), forward_rx, shutdown.clone()));
        tracker.spawn(links::run(
            shared.clone(),
            links_tx,
            links_rx,
            shutdown.clone(),
        ));
        tracker.spawn(track_readiness(
            shared.clone(),
            self.ready_tx,
            self.instance,
            shutdown.clone(),
        ));
        let conn_shared = shared.clone();
        let conn_shutdown = shutdown.clone();
        let conn_tracker = tracker.clone();
        serve::accept_loop(&endpoint, &shutdown, &tracker, move |conn| {
            serve_client(
                conn_shared.clone(),
                conn,
                conn_shutdown.clone(),
                conn_tracker.clone(),
            )
        })
        .await;
        agent_shutdown.cancel();
        let _ = agent.await;
        serve::drain(&endpoint, &tracker, Some(&pool), Duration::from_secs(2)).await;
        info!(id = config.id, "session server stopped");
        Ok(())
    }
}

async fn track_readiness(
    shared: Arc<Shared>,
    ready_tx: watch::Sender<bool>,
    instance: InstanceId,
    shutdown: CancellationToken,
) {
    let mut views = shared.view.clone();
    loop {
        let ready = views
            .borrow_and_update()
            .as_ref()
            .and_then(|v| v.member(Role::Session, shared.config.id))
            .is_some_and(|m| m.instance == instance);
        ready_tx.send_if_modified(|r| std::mem::replace(r, ready) != ready);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
    }
}
