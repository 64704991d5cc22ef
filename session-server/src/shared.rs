//! What every task of a session server shares, and the messages the tasks send each other.
//!
//! [`Shared`] is handed to the client connections (`conn`, `hello`), the forwarder (`forward`),
//! the link manager (`links`, `repair`) and the admin view. Its parts are private: each is reached
//! through a method that says what it is for, and each part that holds state (the hub, the owned
//! publishers, the client identities) changes only through its own methods.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use roster_common::acl::FailureLimiter;
use roster_common::member::ViewRx;
use roster_common::peers::PeerPool;
use roster_common::proto::{ClusterView, DataRequest, DataResponse, WriteOp};
use roster_common::{Error, InstanceId, NodeId, Result, ServiceId, Version};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::SessionConfig;
use crate::batching::{Ack, Forward};
use crate::clients::Clients;
use crate::gate::SlotGate;
use crate::hub::{ConnId, Hub};
use crate::owned::Owned;

/// Changes queued for the forwarder before senders wait. Senders are connection handlers, which
/// then stop reading requests: backpressure reaches the clients.
pub const FORWARD_QUEUE: usize = 8192;

/// Events queued for the link manager before senders wait. Link tasks then stop reading their
/// watch streams, the data servers' queues fill, and they detach this session, which then
/// resyncs.
pub const LINK_EVENTS: usize = 8192;

/// Input to the link manager (see `links`).
#[derive(Debug)]
pub enum LinkEvent {
    /// The first subscriber of a service arrived.
    Want(ServiceId),
    /// The last subscriber of a service left.
    Unwant(ServiceId),
    /// A watch stream to data server `node` is up.
    Up { node: NodeId, generation: u64 },
    /// A watch stream to data server `node` ended.
    Down { node: NodeId, generation: u64 },
    /// `service` is at `version` on its leader; fetch it if this session is behind.
    Changed {
        node: NodeId,
        service: ServiceId,
        version: Version,
    },
    /// The hub could not apply a change of `service` (and marked it as being fetched): fetch it.
    Fetch { node: NodeId, service: ServiceId },
}

/// The data servers of the slot table, and how many of them have a watch stream up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DataLinks {
    pub wanted: usize,
    pub up: usize,
}

/// The receiving ends of the channels into the forwarder and the link manager.
pub(crate) struct Inboxes {
    pub forward: mpsc::Receiver<Forward>,
    pub links: mpsc::Receiver<LinkEvent>,
}

/// What every task of a session server shares.
pub(crate) struct Shared {
    config: SessionConfig,
    instance: InstanceId,
    pool: Arc<PeerPool>,
    view: ViewRx,
    /// Subscribers and cached datums.
    hub: Mutex<Hub>,
    /// The publishers of every client connected here: the source copy.
    owned: Mutex<Owned>,
    /// The client ids in use here, and the publishers of lost connections within their grace.
    clients: Mutex<Clients>,
    /// Keeps a slot's writes and syncs from overtaking each other.
    slot_gate: SlotGate,
    /// Failed authentications by source address.
    auth_failures: Mutex<FailureLimiter>,
    /// Data servers in the slot table, and those with a watch stream up (set by the link manager).
    data_links: Mutex<DataLinks>,
    forward_tx: mpsc::Sender<Forward>,
    links_tx: mpsc::Sender<LinkEvent>,
    next_conn: AtomicU64,
    /// Cancelled when the server starts shutting down.
    draining: CancellationToken,
    /// The mean of the session servers' connection counts, as the meta tier last reported it.
    mean_load: Arc<AtomicU64>,
}

impl Shared {
    /// The shared state of a server, and the inboxes of its forwarder and link manager.
    /// `draining` is cancelled when the server starts shutting down; `mean_load` is kept by the
    /// membership agent.
    pub fn new(
        config: SessionConfig,
        instance: InstanceId,
        pool: Arc<PeerPool>,
        view: ViewRx,
        draining: CancellationToken,
        mean_load: Arc<AtomicU64>,
    ) -> (Arc<Shared>, Inboxes) {
        let (forward_tx, forward) = mpsc::channel(FORWARD_QUEUE);
        let (links_tx, links) = mpsc::channel(LINK_EVENTS);
        let shared = Shared {
            hub: Mutex::new({
                let mut hub = Hub::new(config.max_frame, config.pacing);
                hub.set_protection_threshold(config.protection_threshold);
                hub
            }),
            owned: Mutex::new(Owned::new(config.id, instance)),
            clients: Mutex::new(Clients::default()),
            slot_gate: SlotGate::default(),
            auth_failures: Mutex::new(FailureLimiter::default()),
            data_links: Mutex::new(DataLinks::default()),
            next_conn: AtomicU64::new(1),
            config,
            instance,
            pool,
            view,
            forward_tx,
            links_tx,
            draining,
            mean_load,
        };
        (Arc::new(shared), Inboxes { forward, links })
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// This run of the server (a restart gets a new one).
    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    /// The cluster view, once the meta tier has sent one.
    pub fn view(&self) -> Option<Arc<ClusterView>> {
        self.view.borrow().clone()
    }

    /// A receiver of every new cluster view, to wait on changes.
    pub fn views(&self) -> ViewRx {
        self.view.clone()
    }

    pub fn hub(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock()
    }

    pub fn owned(&self) -> MutexGuard<'_, Owned> {
        self.owned.lock()
    }

    pub fn clients(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock()
    }

    pub fn slot_gate(&self) -> &SlotGate {
        &self.slot_gate
    }

    pub fn auth_failures(&self) -> MutexGuard<'_, FailureLimiter> {
        self.auth_failures.lock()
    }

    pub fn data_links(&self) -> DataLinks {
        *self.data_links.lock()
    }

    pub fn set_data_links(&self, links: DataLinks) {
        *self.data_links.lock() = links;
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Cancelled once the server starts shutting down: clients are asked to move, and a closing
    /// connection's publishers are left for the data tier to hand over, not removed.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    pub fn mean_load(&self) -> u64 {
        self.mean_load.load(Ordering::Relaxed)
    }

    /// Hands a publisher change to the forwarder; `ack` hears whether the slot leader applied it.
    pub async fn forward(&self, op: WriteOp, ack: Option<Ack>) -> Result<()> {
        self.forward_tx
            .send(Forward { op, ack })
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Tells the link manager something happened.
    pub async fn link_event(&self, event: LinkEvent) {
        // Fails only when the manager has stopped, at shutdown.
        let _ = self.links_tx.send(event).await;
    }

    /// Watches `service` without a connection, for the console or DNS (`hub/watch.rs`), under a
    /// new connection number. True with it: nobody here subscribed to the service before, so the
    /// caller registers interest (`link_event(LinkEvent::Want(..))`).
    pub fn watch(&self, service: ServiceId) -> (ConnId, bool) {
        let watcher = self.next_conn_id();
        let first = self.hub().watch(watcher, service);
        (watcher, first)
    }

    /// Ends a watch [`Shared::watch`] started; interest goes if nobody here wants the service.
    pub fn unwatch(&self, watcher: ConnId) {
        let abandoned = self.hub().unwatch(watcher);
        if let Some(service) = abandoned {
            // Full (or closed at shutdown): the link manager's periodic reconcile drops the
            // interest of a service nobody wants anyway.
            let _ = self.links_tx.try_send(LinkEvent::Unwant(service));
        }
    }

    /// A sender into the link manager's inbox, for its own link tasks.
    pub fn link_events(&self) -> mpsc::Sender<LinkEvent> {
        self.links_tx.clone()
    }

    /// One request to the data server at `addr`, within the request timeout.
    pub async fn call_data(&self, addr: &str, request: &DataRequest) -> Result<DataResponse> {
        self.pool
            .call(
                addr,
                request,
                self.config.max_frame,
                self.config.request_timeout,
            )
            .await
    }

    /// The connection pool to other servers (for streams that outlive one request).
    pub fn pool(&self) -> &PeerPool {
        &self.pool
    }
}
