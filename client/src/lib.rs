//! The Roster client SDK: publish where your service runs, subscribe to where others run.
//!
//! ```no_run
//! # async fn demo() -> roster_client::Result<()> {
//! use futures_util::StreamExt;
//! use roster_client::{Client, ClientConfig};
//!
//! let client = Client::connect(ClientConfig::load(".roster/client.toml".as_ref())?).await?;
//! let _me = client.publish("payments", vec!["10.0.0.1:8080".into()]).await?;
//! let mut peers = client.subscribe("payments").await?;
//! while let Some(snapshot) = peers.next().await {
//!     println!("{} instances at version {}", snapshot.publishers.len(), snapshot.version);
//! }
//! # Ok(()) }
//! ```
//!
//! A [`Client`] keeps one QUIC connection to one of the configured session servers and rides
//! through that server's failure: when the connection ends, goes silent, or the server asks it to
//! move (`GoAway`), it connects to another one (random order, jittered backoff), registers every
//! publication and subscription there under the same ids, and only then lets the old connection
//! go — once what the new server holds on its way to the data tier has landed (10 s at most) — so
//! the registry hands them over without dropping them. [`Client::connection_state`] tells
//! what it is doing; [`Client::stats`] counts reconnections, pushes and the rest.
//!
//! The connection lives on the SDK's own threads ([`endpoint`] says more): keep-alives, pushes and
//! the watchdog that tells a dead server from a slow one do not wait for the application's tasks,
//! so a busy application never looks dead to the registry nor takes a healthy server for dead.
//!
//! [`Client::publish`] returns a [`Publication`]: the registration lasts until it is dropped or
//! [`Publication::unpublish`]ed; [`Client::publisher`] lets the application choose its register id
//! and attributes. [`Client::subscribe`] returns a [`Subscription`], a `Stream` of [`Snapshot`]s
//! (newest first when the reader falls behind, never older). After the first snapshot the session
//! server sends only what changed, which the SDK applies to a snapshot shared by every reader:
//! a change costs the client what changed, not the size of the service.
//! [`Subscription::current`], [`Subscription::wait_for`] and [`Subscription::events`] (added,
//! removed and changed publishers) read it. With `refuse_empty` (the default) a snapshot that would
//! empty a subscription is withheld. With `cache_dir`, the last snapshot of every subscribed
//! service is kept on disk and served at start when no session server can be reached.
//!
//! Where the cluster checks tokens, the client presents [`ClientConfig::token`] (`token` or
//! `token-file` in `client.toml`) in every `Hello`: without a valid one, [`Client::connect`] fails
//! with [`Error::Unauthenticated`]; a publish or subscribe outside the token's namespaces fails with
//! [`Error::PermissionDenied`]. When the token is revoked or expires, the session server closes the
//! connection and the client keeps retrying (logging the refusal at `warn`) until it is given a
//! valid token or closed.
//!
//! Errors are [`Error`]s with a wire code; [`Error::is_retryable`] tells a caller whether trying
//! again may help. A publish made while no session server is reachable succeeds as not durable
//! ([`Publication::is_durable`]) and is registered when the client reconnects.
//!
//! # Persistent instances and health checks
//!
//! What cannot run an SDK (a database, an appliance, a service outside the cluster) is registered
//! for it as a *persistent instance* with [`Client::register_persistent`]: the registry's meta
//! group stores it, it is bound to no client or connection, and it stays until
//! [`Client::deregister_persistent`] removes it; registering the same id again replaces it.
//! Subscribers see it like any publisher, with [`PublisherView::persistent`] set. Any instance,
//! persistent or published, may carry a [`CheckSpec`] that the registry probes; the verdict is in
//! [`PublisherView::health`], and a subscription made with [`SubscribeOptions::healthy_only`]
//! leaves unhealthy publishers out.
//!
//! ```ignore
//! use roster_client::{CheckSpec, SubscribeOptions};
//!
//! client
//!     .register_persistent("billing-db", "primary", vec!["10.0.0.9:5432".into()])
//!     .attribute("zone", "eu-1a")
//!     .check(CheckSpec::new("tcp"))
//!     .await?;
//! let healthy = client
//!     .subscribe_with("billing-db", SubscribeOptions { healthy_only: true })
//!     .await?;
//! // Later, when the database is retired:
//! client.deregister_persistent("billing-db", "primary").await?;
//! ```

mod accept;
mod cache;
mod config;
mod driver;
mod handover;
mod io;
mod liveness;
mod persistent;
mod publication;
mod requests;
mod retry;
mod snapshot;
mod subscription;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use quinn::{Connection, Endpoint};
use roster_common::proto::{ALPN_CLIENT, ClientRequest, ClientResponse, Scope};
use roster_common::{NodeId, RegisterId, ids, quic, tls};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use config::ClientConfig;
pub use io::endpoint;
pub use persistent::PersistentBuilder;
pub(crate) use publication::publish_request;
pub use publication::{Publication, PublishBuilder};
pub use roster_common::acl::Secret;
pub use roster_common::health::{CheckSpec, Health};
pub use roster_common::ids::PERSISTENT_CLIENT_ID;
pub use roster_common::proto::{PublisherView, ServiceSummary};
pub use roster_common::{Error, ErrorCode, Result, ServiceId, Version};
pub use snapshot::{Event, Publishers, Snapshot, diff};
pub use subscription::{Events, SubscribeOptions, Subscription};

/// What the client's connection is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// First connection attempt under way.
    Connecting,
    /// Connected to session server `session_id` at socket address `addr`, everything registered
    /// there.
    Connected { session_id: NodeId, addr: String },
    /// The connection was lost (or the server asked the client to move); reconnecting.
    Reconnecting { attempt: u32 },
    /// The client was closed.
    Closed,
}

/// A connection to the registry. Cheap to clone; the connection closes when the last clone, and
/// every publication and subscription made from it, is dropped (or on [`Client::close`]).
#[derive(Clone)]
pub struct Client {
    handle: Handle,
}

/// What every user-facing handle holds: the shared state, and the guard whose last drop stops the
/// client.
#[derive(Clone)]
pub(crate) struct Handle {
    inner: Arc<Inner>,
    _guard: Arc<Guard>,
}

/// Stops the client when the last user-facing handle is dropped.
struct Guard {
    shutdown: CancellationToken,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The connection in use.
#[derive(Clone)]
pub(crate) struct Live {
    pub conn: Connection,
    pub session_id: NodeId,
}

pub(crate) struct PublicationState {
    pub service: ServiceId,
    pub data: Vec<Bytes>,
    pub attributes: BTreeMap<String, String>,
    pub client_version: u64,
    /// Sent with every registration, so a new session server asks the data tier to keep checking.
    pub check: Option<CheckSpec>,
}

pub(crate) struct SubscriptionState {
    pub register_id: RegisterId,
    /// Asked for again on every new connection: the session filters, not the client.
    pub healthy_only: bool,
    /// What the readers see: the latest snapshot, unless `refuse_empty` withheld it.
    pub tx: watch::Sender<Option<Snapshot>>,
    /// The latest snapshot received, which deltas apply to.
    pub latest: Option<Snapshot>,
    pub handles: usize,
}

/// What the client has registered: re-registered in full on every new connection.
#[derive(Default)]
pub(crate) struct Registry {
    pub publications: HashMap<RegisterId, PublicationState>,
    pub subscriptions: HashMap<ServiceId, SubscriptionState>,
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    pub quic_config: quinn::ClientConfig,
    pub endpoint: Endpoint,
    /// The endpoint is this client's alone (made by [`Client::connect`]), not shared.
    pub owns_endpoint: bool,
    pub client_id: String,
    /// Presented in every `Hello`: proves to session servers that a connection is this client's,
    /// so no other client can replace or remove its publishers.
    pub client_secret: Bytes,
    next_id: AtomicU64,
    pub live: RwLock<Option<Live>>,
    pub state_tx: watch::Sender<ConnectionState>,
    pub registry: Mutex<Registry>,
    /// Removals from dropped handles, sent by the driver. Unbounded on purpose: a `Drop` cannot
    /// wait, and each handle sends at most one message, so the queue is bounded by the handles.
    pub background_tx: mpsc::UnboundedSender<ClientRequest>,
    pub shutdown: CancellationToken,
    pub go_away: Notify,
    pub cache: Option<cache::Cache>,
    /// Services whose snapshot changed since the cache was last written.
    pub cache_dirty: Mutex<HashSet<ServiceId>>,
    pub stats: Counters,
    /// Application requests in flight, at most `max_in_flight`; more wait their turn.
    pub app_requests: tokio::sync::Semaphore,
}

/// What [`Client::stats`] reports, counted as it happens.
#[derive(Default)]
pub(crate) struct Counters {
    pub connects: AtomicU64,
    pub lost: AtomicU64,
    pub silent: AtomicU64,
    pub cut_off_slow: AtomicU64,
    pub go_aways: AtomicU64,
    pub snapshots: AtomicU64,
    pub deltas: AtomicU64,
    pub push_bytes: AtomicU64,
    pub resyncs: AtomicU64,
    pub refused_empty: AtomicU64,
}

/// What a client has been through since it was created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections established and fully registered, the first included.
    pub connects: u64,
    /// Of those, the ones after the first: the client moved or reconnected.
    pub reconnects: u64,
    /// Connections that ended without the client closing them (the server went away or closed
    /// them), `cut_off_slow` included.
    pub lost: u64,
    /// Connections the client left because the server sent nothing for `dead_after_ms`.
    pub silent: u64,
    /// Connections the server closed because this client read none of its pushes for too long
    /// (close code `0x10`).
    pub cut_off_slow: u64,
    /// `GoAway`s received: the server asked this client to move.
    pub go_aways: u64,
    /// Full snapshots received.
    pub snapshots: u64,
    /// Deltas received.
    pub deltas: u64,
    /// Bytes of push frames received (headers included).
    pub push_bytes: u64,
    /// Deltas that did not follow the version held (should not happen); each was answered by
    /// asking the server for the full snapshot again.
    pub resyncs: u64,
    /// Empty snapshots withheld by `refuse_empty`.
    pub refused_empty: u64,
}

impl Client {
    /// Connects to one of the configured session servers (tried in random order) and says `Hello`.
    /// Fails if none answers — unless `cache_dir` is set, in which case the client starts
    /// disconnected, serves cached snapshots and keeps trying in the background.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        roster_common::install_crypto_provider();
        config.validate()?;
        let first = quic::resolve(&config.sessions[0]).await.ok();
        let peer = first.unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal address"));
        let endpoint = io::endpoint(quic::unspecified_like(peer))?;
        Self::start(endpoint, true, config).await
    }

    /// As [`Client::connect`], dialing from `endpoint` — many clients can share one endpoint (one
    /// UDP socket). Make it with [`endpoint`] so its I/O runs on the SDK's own threads; an endpoint
    /// made otherwise runs where it was made.
    pub async fn connect_on(endpoint: Endpoint, config: ClientConfig) -> Result<Client> {
        Self::start(endpoint, false, config).await
    }

    async fn start(
        endpoint: Endpoint,
        owns_endpoint: bool,
        config: ClientConfig,
    ) -> Result<Client> {
        roster_common::install_crypto_provider();
        config.validate()?;
        let roots = tls::roots_from(&tls::load_certs(&config.ca)?)?;
        let quic_config =
            quic::client_config(tls::client(roots, ALPN_CLIENT)?, &config.transport(), true)?;
        let cache = config
            .cache_dir
            .as_deref()
            .map(cache::Cache::open)
            .transpose()?;
        let shutdown = CancellationToken::new();
        let (background_tx, background_rx) = mpsc::unbounded_channel();
        let max_in_flight = config.max_in_flight as usize;
        let inner = Arc::new(Inner {
            client_id: config.client_id.clone().unwrap_or_else(ids::new_client_id),
            client_secret: config.client_secret()?.into(),
            config,
            quic_config,
            endpoint,
            owns_endpoint,
            next_id: AtomicU64::new(1),
            live: RwLock::new(None),
            state_tx: watch::channel(ConnectionState::Connecting).0,
            registry: Mutex::new(Registry::default()),
            background_tx,
            shutdown: shutdown.clone(),
            go_away: Notify::new(),
            app_requests: tokio::sync::Semaphore::new(max_in_flight),
            cache,
            cache_dirty: Mutex::new(HashSet::new()),
            stats: Counters::default(),
        });
        // Dialed from the SDK's threads, like every later connection.
        let first = io::spawn({
            let inner = inner.clone();
            async move { driver::connect_any(&inner, None).await }
        })
        .await
        .map_err(|e| Error::Internal(format!("the connecting task failed: {e}")))?;
        match first {
            Ok((live, _)) => driver::install(&inner, live),
            Err(e) if inner.cache.is_none() => return Err(e),
            Err(e) => {
                debug!(error = %e, "no session server reachable; starting from the snapshot cache")
            }
        }
        io::spawn(driver::run(inner.clone(), background_rx));
        if inner.cache.is_some() {
            io::spawn(cache::keep(inner.clone()));
        }
        Ok(Client {
            handle: Handle {
                inner,
                _guard: Arc::new(Guard { shutdown }),
            },
        })
    }

    fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    /// This client's id, as sent in `Hello`; the same on every session server it moves to.
    pub fn client_id(&self) -> &str {
        &self.inner().client_id
    }

    /// The id of the session server this client is connected to, if connected.
    pub fn session_id(&self) -> Option<NodeId> {
        self.inner().live.read().as_ref().map(|l| l.session_id)
    }

    /// The address of that session server.
    pub fn session_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner()
            .live
            .read()
            .as_ref()
            .map(|l| l.conn.remote_address())
    }

    /// What the connection is doing now and next.
    pub fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner().state_tx.subscribe()
    }

    /// How many empty snapshots `refuse_empty` withheld so far.
    pub fn refused_empty_snapshots(&self) -> u64 {
        self.inner().stats.refused_empty.load(Ordering::Relaxed)
    }

    /// What the client has been through so far: connections, moves, pushes.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner().stats;
        let connects = c.connects.load(Ordering::Relaxed);
        ClientStats {
            connects,
            reconnects: connects.saturating_sub(1),
            lost: c.lost.load(Ordering::Relaxed),
            silent: c.silent.load(Ordering::Relaxed),
            cut_off_slow: c.cut_off_slow.load(Ordering::Relaxed),
            go_aways: c.go_aways.load(Ordering::Relaxed),
            snapshots: c.snapshots.load(Ordering::Relaxed),
            deltas: c.deltas.load(Ordering::Relaxed),
            push_bytes: c.push_bytes.load(Ordering::Relaxed),
            resyncs: c.resyncs.load(Ordering::Relaxed),
            refused_empty: c.refused_empty.load(Ordering::Relaxed),
        }
    }

    /// Publishes `data` (typically one `host:port`) under `service`, with a register id the
    /// client chooses. A bare name means `default/DEFAULT/<name>`.
    pub async fn publish(&self, service: impl AsRef<str>, data: Vec<Bytes>) -> Result<Publication> {
        self.publisher(service).publish(data).await
    }

    /// Publishes with attributes (zone, weight, anything the subscribers understand).
    pub async fn publish_with(
        &self,
        service: impl AsRef<str>,
        data: Vec<Bytes>,
        attributes: BTreeMap<String, String>,
    ) -> Result<Publication> {
        self.publisher(service)
            .attributes(attributes)
            .publish(data)
            .await
    }

    /// A publication of `service` to set up before publishing: its register id, its attributes.
    ///
    /// ```no_run
    /// # async fn demo(client: roster_client::Client) -> roster_client::Result<()> {
    /// let me = client
    ///     .publisher("payments")
    ///     .register_id("pod-7f9c")
    ///     .attribute("zone", "eu-1a")
    ///     .publish(vec!["10.0.0.7:8080".into()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn publisher(&self, service: impl AsRef<str>) -> PublishBuilder<'_> {
        PublishBuilder::new(self, service.as_ref().parse())
    }

    /// Subscribes to `service`. Subscribing twice to one service shares one registration. While
    /// the client is not connected this returns at once — with the cached snapshot as the current
    /// value when `cache_dir` has one — and the subscription is registered on connecting.
    ///
    /// Every publisher is shown, persistent instances and unhealthy ones included: see
    /// [`PublisherView::persistent`] and [`PublisherView::health`].
    pub async fn subscribe(&self, service: impl AsRef<str>) -> Result<Subscription> {
        self.subscribe_with(service, SubscribeOptions::default())
            .await
    }

    /// Subscribes to `service` as `options` say, e.g. to be shown only healthy publishers with
    /// `SubscribeOptions { healthy_only: true }`.
    ///
    /// The session server pushes one set of publishers per service to a connection, so a client
    /// holds one kind of subscription per service at a time: asking for a healthy-only one while
    /// a plain one of the same service is held (or the other way round) fails with
    /// [`Error::InvalidArgument`]. Use a second [`Client`] for the other kind.
    pub async fn subscribe_with(
        &self,
        service: impl AsRef<str>,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        let service: ServiceId = service.as_ref().parse()?;
        let healthy_only = options.healthy_only;
        let inner = &self.handle.inner;
        let (rx, register_id) = {
            let mut registry = inner.registry.lock();
            match registry.subscriptions.get_mut(&service) {
                Some(entry) if entry.healthy_only != healthy_only => {
                    return Err(Error::InvalidArgument(format!(
                        "this client already subscribes to {service} {}; one client holds one \
                         kind of subscription per service",
                        if entry.healthy_only {
                            "healthy-only"
                        } else {
                            "to every publisher"
                        }
                    )));
                }
                Some(entry) => {
                    entry.handles += 1;
                    (entry.tx.subscribe(), None)
                }
                None => {
                    let register_id = inner.new_register_id("s", &registry);
                    let cached = inner
                        .cache
                        .as_ref()
                        .and_then(|c| c.load(&service, healthy_only));
                    let (tx, rx) = watch::channel(cached.clone());
                    registry.subscriptions.insert(
                        service.clone(),
                        SubscriptionState {
                            register_id: register_id.clone(),
                            healthy_only,
                            tx,
                            latest: cached,
                            handles: 1,
                        },
                    );
                    (rx, Some(register_id))
                }
            }
        };
        let subscription = Subscription {
            handle: self.handle.clone(),
            service: service.clone(),
            stream: WatchStream::new(rx.clone()),
            rx,
        };
        if let Some(register_id) = register_id {
            let request = subscribe_request(register_id, service, healthy_only);
            if inner.live.read().is_none() {
                // Not connected: return at once (with the cached snapshot, if any) and register
                // as soon as a connection is up. Registering from here too closes the gap where
                // the driver has listed what to register just before this subscription existed.
                let inner = self.handle.inner.clone();
                tokio::spawn(async move {
                    if let Err(e) = inner.call(&request).await {
                        debug!(error = %e, "subscription will be registered on reconnect");
                    }
                });
                return Ok(subscription);
            }
            match inner.call(&request).await {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    debug!(error = %e, "subscription will be registered on reconnect")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(subscription)
    }

    /// Registers (or replaces) the persistent instance `id` of `service`, sent when the returned
    /// builder ([`PersistentBuilder`]: attributes, a check) is awaited; the crate documentation
    /// has an example.
    ///
    /// A persistent instance is for what cannot run an SDK itself (a database, an appliance, a
    /// service outside the cluster): it is not bound to this client or its connection, and stays
    /// — through this client's end and through restarts of every server — until
    /// [`Client::deregister_persistent`] removes it. Registering the same `service` and `id` again
    /// replaces it (data, attributes, check). Subscribers see it as a publisher whose `client_id`
    /// is [`PERSISTENT_CLIENT_ID`], whose `register_id` is `id`, with
    /// [`PublisherView::persistent`] set.
    ///
    /// Needs `publish` permission in the service's namespace. Returns once a quorum of the meta
    /// group has it on disk; an `id` or data the registry refuses, or a bad check, fails with
    /// [`Error::InvalidArgument`].
    pub fn register_persistent(
        &self,
        service: impl AsRef<str>,
        id: impl Into<String>,
        data: Vec<Bytes>,
    ) -> PersistentBuilder<'_> {
        PersistentBuilder::new(self, service.as_ref().parse(), id.into(), data)
    }

    /// Removes the persistent instance `id` of `service`; subscribers see it go. Fails with
    /// [`Error::NotFound`] when there is none.
    pub async fn deregister_persistent(
        &self,
        service: impl AsRef<str>,
        id: impl Into<String>,
    ) -> Result<()> {
        persistent::deregister(self, service.as_ref(), id.into()).await
    }

    /// Every service with at least one publisher, with its publisher count.
    pub async fn list_services(&self) -> Result<Vec<ServiceSummary>> {
        match self.inner().call(&ClientRequest::ListServices {}).await? {
            ClientResponse::Services { services } => Ok(services),
            other => Err(Error::UnexpectedMessage(format!(
                "expected Services, got {other:?}"
            ))),
        }
    }

    /// A round trip to the session server.
    pub async fn ping(&self) -> Result<Duration> {
        let start = Instant::now();
        self.inner().call(&ClientRequest::Ping {}).await?;
        Ok(start.elapsed())
    }

    /// Closes the client now — every publication and subscription of it ends — and waits
    /// (briefly) for the close to reach the session server, which then removes them.
    pub async fn close(self) {
        let inner = self.handle.inner.clone();
        inner.shutdown.cancel();
        let mut state = inner.state_tx.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            state.wait_for(|s| *s == ConnectionState::Closed),
        )
        .await;
        // On an endpoint of its own, wait until the close has been sent; a shared one stays busy
        // with the other clients' connections.
        if inner.owns_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(2), inner.endpoint.wait_idle()).await;
        }
    }
}

impl Handle {
    /// Drops one handle of the subscription to `service`; the last one unsubscribes.
    pub(crate) fn release_subscription(&self, service: &ServiceId) {
        let mut registry = self.inner.registry.lock();
        let Some(entry) = registry.subscriptions.get_mut(service) else {
            return;
        };
        entry.handles -= 1;
        if entry.handles == 0 {
            let entry = registry
                .subscriptions
                .remove(service)
                .expect("present above");
            drop(registry);
            // Keep its last snapshot on disk if the periodic flush has not written it yet.
            if let Some(cache) = &self.inner.cache
                && self.inner.cache_dirty.lock().remove(service)
                && let Some(snapshot) = entry.tx.borrow().as_ref()
            {
                cache.store(&snapshot.to_wire(), entry.healthy_only);
            }
            let _ = self.inner.background_tx.send(ClientRequest::Unsubscribe {
                register_id: entry.register_id,
            });
        }
    }
}

impl Inner {
    /// A register id of `kind` (`p`, `s`) no publication or subscription of this client uses.
    fn new_register_id(&self, kind: &str, registry: &Registry) -> RegisterId {
        loop {
            let id = format!("{kind}{}", self.next_id.fetch_add(1, Ordering::Relaxed));
            let taken = registry.publications.contains_key(&id)
                || registry.subscriptions.values().any(|s| s.register_id == id);
            if !taken {
                return id;
            }
        }
    }
}

/// The `Subscribe` that registers (or, under the same register id, resyncs) a subscription.
pub(crate) fn subscribe_request(
    register_id: RegisterId,
    service: ServiceId,
    healthy_only: bool,
) -> ClientRequest {
    ClientRequest::Subscribe {
        register_id,
        service,
        scope: Scope::Global,
        healthy_only,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the crate documentation (not a doctest, which would need a cluster to run
    /// against): kept compiling here.
    #[allow(dead_code)]
    async fn persistent_example(client: Client) -> Result<()> {
        client
            .register_persistent("billing-db", "primary", vec!["10.0.0.9:5432".into()])
            .attribute("zone", "eu-1a")
            .check(CheckSpec::new("tcp"))
            .await?;
        let _healthy = client
            .subscribe_with("billing-db", SubscribeOptions { healthy_only: true })
            .await?;
        client
            .deregister_persistent("billing-db", "primary")
            .await?;
        Ok(())
    }

    /// Awaiting a registration from a spawned task needs its future to be `Send`.
    #[allow(dead_code)]
    fn registrations_can_be_spawned(client: Client) {
        tokio::spawn(async move { client.register_persistent("svc", "id", vec![]).send().await });
    }
}
