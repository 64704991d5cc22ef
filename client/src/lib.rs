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
//! A [`Client`] holds one QUIC connection to a session server. [`Client::publish`] returns a
//! [`Publication`]: the registration lasts until it is dropped, [`Publication::unpublish`]ed, or the
//! connection ends. [`Client::subscribe`] returns a [`Subscription`], a `Stream` of full snapshots
//! of the service, newest first when the reader falls behind (intermediate snapshots are skipped,
//! never reordered), with [`Subscription::current`] for the latest one.
//!
//! Errors are [`Error`]s with a wire code; [`Error::is_retryable`] tells a caller whether trying
//! again may help.
//!
//! Caveats: this client does not reconnect. When its connection ends, subscriptions end (their
//! streams finish) and publications are gone from the registry; build a new `Client` to continue.

mod config;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use parking_lot::Mutex;
use quinn::{Connection, Endpoint};
use roster_common::proto::{
    ALPN_CLIENT, ClientRequest, ClientResponse, PROTOCOL_VERSION, Push, Scope,
};
use roster_common::{NodeId, RegisterId, frame, ids, quic, rpc, tls};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tracing::{debug, warn};

pub use config::ClientConfig;
pub use roster_common::proto::{PublisherView, ServiceSummary, Snapshot};
pub use roster_common::{Error, ErrorCode, Result, ServiceId};

/// A connection to the registry.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

type Subscriptions = Arc<Mutex<HashMap<ServiceId, SubEntry>>>;

struct Inner {
    endpoint: Endpoint,
    conn: Connection,
    max_frame: u32,
    request_timeout: Duration,
    client_id: String,
    session_id: NodeId,
    next_id: AtomicU64,
    subs: Subscriptions,
    /// Removals from dropped handles, carried out by a background task. Unbounded on purpose: a
    /// `Drop` cannot wait, and each handle sends at most one message, so the queue is bounded by the
    /// number of handles.
    background_tx: mpsc::UnboundedSender<ClientRequest>,
}

struct SubEntry {
    register_id: RegisterId,
    tx: watch::Sender<Option<Snapshot>>,
    handles: usize,
}

impl Client {
    /// Connects to one of the configured session servers (tried in random order) and says `Hello`.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        roster_common::install_crypto_provider();
        config.validate()?;
        let roots = tls::roots_from(&tls::load_certs(&config.ca)?)?;
        let quic_config =
            quic::client_config(tls::client(roots, ALPN_CLIENT)?, &config.transport(), true)?;
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);

        let start = rand_index(config.sessions.len());
        let mut last_error = None;
        let mut connected = None;
        for i in 0..config.sessions.len() {
            let addr = &config.sessions[(start + i) % config.sessions.len()];
            let attempt = async {
                let socket_addr = quic::resolve(addr).await?;
                let endpoint = quic::client_endpoint(socket_addr)?;
                let conn = quic::connect(
                    &endpoint,
                    &quic_config,
                    addr,
                    config.server_name.as_deref(),
                    connect_timeout,
                )
                .await?;
                Ok::<_, Error>((endpoint, conn))
            };
            match attempt.await {
                Ok(pair) => {
                    connected = Some(pair);
                    break;
                }
                Err(e) => {
                    debug!(session = %addr, error = %e, "could not connect");
                    last_error = Some(e);
                }
            }
        }
        let Some((endpoint, conn)) = connected else {
            return Err(last_error
                .unwrap_or_else(|| Error::Connection("no session server configured".into())));
        };

        let client_id = config.client_id.clone().unwrap_or_else(ids::new_client_id);
        let hello = ClientRequest::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_id: client_id.clone(),
            client_name: config.client_name.clone(),
            token: config.token.clone(),
        };
        let session_id =
            match rpc::call(&conn, &hello, config.max_frame, config.request_timeout()).await? {
                ClientResponse::Welcome { session_id, .. } => session_id,
                other => {
                    return Err(Error::UnexpectedMessage(format!(
                        "expected Welcome, got {other:?}"
                    )));
                }
            };

        let subs: Subscriptions = Arc::default();
        let (background_tx, background_rx) = mpsc::unbounded_channel();
        tokio::spawn(read_pushes(conn.clone(), subs.clone(), config.max_frame));
        tokio::spawn(run_background(
            conn.clone(),
            background_rx,
            config.max_frame,
            config.request_timeout(),
        ));
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                conn,
                max_frame: config.max_frame,
                request_timeout: config.request_timeout(),
                client_id,
                session_id,
                next_id: AtomicU64::new(1),
                subs,
                background_tx,
            }),
        })
    }

    /// This client's id, as sent in `Hello`.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The id of the session server this client is connected to.
    pub fn session_id(&self) -> NodeId {
        self.inner.session_id
    }

    /// The address of that session server.
    pub fn session_addr(&self) -> std::net::SocketAddr {
        self.inner.conn.remote_address()
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        self.inner.conn.close_reason().is_none()
    }

    /// Waits until the connection ends and says why.
    pub async fn closed(&self) -> Error {
        Error::Connection(roster_common::error::describe_close(
            &self.inner.conn.closed().await,
        ))
    }

    /// Publishes `data` (typically one `host:port`) under `service`. A bare name means
    /// `default/DEFAULT/<name>`.
    pub async fn publish(&self, service: impl AsRef<str>, data: Vec<Bytes>) -> Result<Publication> {
        self.publish_with(service, data, Default::default()).await
    }

    /// Publishes with attributes (zone, weight, anything the subscribers understand).
    pub async fn publish_with(
        &self,
        service: impl AsRef<str>,
        data: Vec<Bytes>,
        attributes: std::collections::BTreeMap<String, String>,
    ) -> Result<Publication> {
        let service: ServiceId = service.as_ref().parse()?;
        let register_id = self.inner.new_register_id("p");
        let mut publication = Publication {
            inner: self.inner.clone(),
            register_id,
            service,
            data: Vec::new(),
            attributes,
            client_version: 0,
            durable: false,
            active: false,
        };
        publication.update(data).await?;
        publication.active = true;
        Ok(publication)
    }

    /// Subscribes to `service`. Subscribing twice to one service shares one registration.
    pub async fn subscribe(&self, service: impl AsRef<str>) -> Result<Subscription> {
        let service: ServiceId = service.as_ref().parse()?;
        let existing = {
            let mut subs = self.inner.subs.lock();
            subs.get_mut(&service).map(|entry| {
                entry.handles += 1;
                entry.tx.subscribe()
            })
        };
        let rx = match existing {
            Some(rx) => rx,
            None => {
                let register_id = self.inner.new_register_id("s");
                let (tx, rx) = watch::channel(None);
                self.inner.subs.lock().insert(
                    service.clone(),
                    SubEntry {
                        register_id: register_id.clone(),
                        tx,
                        handles: 1,
                    },
                );
                let request = ClientRequest::Subscribe {
                    register_id,
                    service: service.clone(),
                    scope: Scope::Global,
                };
                if let Err(e) = self.inner.call(&request).await {
                    self.inner.subs.lock().remove(&service);
                    return Err(e);
                }
                rx
            }
        };
        Ok(Subscription {
            inner: self.inner.clone(),
            service,
            stream: WatchStream::new(rx.clone()),
            rx,
        })
    }

    /// Every service with at least one publisher, with its publisher count.
    pub async fn list_services(&self) -> Result<Vec<ServiceSummary>> {
        match self.inner.call(&ClientRequest::ListServices {}).await? {
            ClientResponse::Services { services } => Ok(services),
            other => Err(Error::UnexpectedMessage(format!(
                "expected Services, got {other:?}"
            ))),
        }
    }

    /// A round trip to the session server.
    pub async fn ping(&self) -> Result<Duration> {
        let start = Instant::now();
        self.inner.call(&ClientRequest::Ping {}).await?;
        Ok(start.elapsed())
    }

    /// Closes the connection now and waits (briefly) for the close to reach the server, which then
    /// removes this client's publishers and subscribers.
    pub async fn close(self) {
        self.inner.conn.close(0u32.into(), b"client closed");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
    }
}

impl Inner {
    fn new_register_id(&self, kind: &str) -> RegisterId {
        format!("{kind}{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    async fn call(&self, request: &ClientRequest) -> Result<ClientResponse> {
        rpc::call(&self.conn, request, self.max_frame, self.request_timeout).await
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The background task closes the connection once it has sent every queued removal.
        debug!(client = %self.client_id, "client dropped");
    }
}

/// One registration of this client. Dropping it unpublishes in the background.
pub struct Publication {
    inner: Arc<Inner>,
    register_id: RegisterId,
    service: ServiceId,
    data: Vec<Bytes>,
    attributes: std::collections::BTreeMap<String, String>,
    client_version: u64,
    durable: bool,
    active: bool,
}

impl Publication {
    pub fn service(&self) -> &ServiceId {
        &self.service
    }

    pub fn register_id(&self) -> &str {
        &self.register_id
    }

    /// The data last published.
    pub fn data(&self) -> &[Bytes] {
        &self.data
    }

    /// True when the slot leader applied the last change; false when the session server holds it
    /// and keeps retrying because the data tier was unreachable.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Replaces the published data.
    pub async fn update(&mut self, data: Vec<Bytes>) -> Result<()> {
        self.client_version += 1;
        let request = ClientRequest::Publish {
            register_id: self.register_id.clone(),
            service: self.service.clone(),
            data: data.clone(),
            attributes: self.attributes.clone(),
            client_version: self.client_version,
        };
        match self.inner.call(&request).await? {
            ClientResponse::Accepted { durable } => {
                self.durable = durable;
                self.data = data;
                Ok(())
            }
            other => Err(Error::UnexpectedMessage(format!(
                "expected Accepted, got {other:?}"
            ))),
        }
    }

    /// Removes the registration and waits for the session server to accept the removal.
    pub async fn unpublish(mut self) -> Result<()> {
        self.active = false;
        let request = ClientRequest::Unpublish {
            register_id: self.register_id.clone(),
        };
        match self.inner.call(&request).await? {
            ClientResponse::Accepted { .. } => Ok(()),
            other => Err(Error::UnexpectedMessage(format!(
                "expected Accepted, got {other:?}"
            ))),
        }
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        if self.active {
            let _ = self.inner.background_tx.send(ClientRequest::Unpublish {
                register_id: self.register_id.clone(),
            });
        }
    }
}

/// Snapshots of one service, as a `Stream`. Dropping the last handle of a service unsubscribes.
pub struct Subscription {
    inner: Arc<Inner>,
    service: ServiceId,
    rx: watch::Receiver<Option<Snapshot>>,
    stream: WatchStream<Option<Snapshot>>,
}

impl Subscription {
    pub fn service(&self) -> &ServiceId {
        &self.service
    }

    /// The latest snapshot received, if any yet.
    pub fn current(&self) -> Option<Snapshot> {
        self.rx.borrow().clone()
    }
}

impl Stream for Subscription {
    type Item = Snapshot;

    /// The next snapshot newer than the last one returned; `None` once the connection has ended.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Snapshot>> {
        loop {
            match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Ready(Some(Some(snapshot))) => return Poll::Ready(Some(snapshot)),
                Poll::Ready(Some(None)) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = self.inner.subs.lock();
        let Some(entry) = subs.get_mut(&self.service) else {
            return;
        };
        entry.handles -= 1;
        if entry.handles == 0 {
            let entry = subs.remove(&self.service).expect("present above");
            let _ = self.inner.background_tx.send(ClientRequest::Unsubscribe {
                register_id: entry.register_id,
            });
        }
    }
}

/// Reads the push stream into the subscriptions until the connection ends, then ends them.
async fn read_pushes(conn: Connection, subs: Subscriptions, max_frame: u32) {
    let result = async {
        let mut push = conn.accept_uni().await?;
        loop {
            let body = match frame::read_frame_bytes(&mut push, max_frame).await? {
                Some(body) => body,
                None => return Ok::<_, Error>(()),
            };
            match frame::decode::<Push>(&body) {
                Ok(Push::Snapshot(snapshot)) => {
                    let subs = subs.lock();
                    if let Some(entry) = subs.get(&snapshot.service) {
                        entry.tx.send_if_modified(|current| {
                            let newer = current
                                .as_ref()
                                .is_none_or(|c| c.version < snapshot.version);
                            if newer {
                                *current = Some(snapshot);
                            }
                            newer
                        });
                    }
                }
                // A push this version does not know: skip it, newer servers may add kinds.
                Err(Error::UnexpectedMessage(e)) => debug!(error = %e, "skipped an unknown push"),
                Err(e) => return Err(e),
            }
        }
    }
    .await;
    if let Err(e) = result {
        if conn.close_reason().is_none() {
            warn!(error = %e, "push stream failed; closing the connection");
            conn.close(0u32.into(), b"bad push stream");
        } else {
            debug!(error = %e, "push stream ended");
        }
    }
    // Ending every subscription ends their streams.
    subs.lock().clear();
}

/// Sends the removals of dropped handles; closes the connection once the client is gone.
async fn run_background(
    conn: Connection,
    mut rx: mpsc::UnboundedReceiver<ClientRequest>,
    max_frame: u32,
    timeout: Duration,
) {
    while let Some(request) = rx.recv().await {
        if conn.close_reason().is_some() {
            continue;
        }
        if let Err(e) = rpc::call::<_, ClientResponse>(&conn, &request, max_frame, timeout).await {
            debug!(error = %e, "background removal failed");
        }
    }
    conn.close(0u32.into(), b"client dropped");
}

fn rand_index(len: usize) -> usize {
    rand::random_range(0..len.max(1))
}
