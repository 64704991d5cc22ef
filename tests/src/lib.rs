//! Helpers for Roster's integration tests: a whole cluster in one process on `127.0.0.1:0`, and
//! deadline-based waiting.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use quinn::{Connection, Endpoint, RecvStream};
use roster_client::{ClientConfig, Snapshot, Subscription};
use roster_common::frame::{self, DEFAULT_MAX_FRAME};
use roster_common::peers::{FaultTable, PeerPool};
use roster_common::proto::{
    ALPN_CLIENT, ALPN_PEER, ClientRequest, ClientResponse, ClusterView, MetaRequest, MetaResponse,
    PROTOCOL_VERSION, Push, Reply, Scope,
};
pub use roster_common::push::Replica;
use roster_common::quic::{self, TransportSettings};
use roster_common::tls::{self, CA_CERT_FILE, NodeIdentity, Pki};
use roster_data::{DataConfig, DataServer};
use roster_meta::{MetaConfig, MetaServer, Start};
use roster_session::{DnsSockets, SessionConfig, SessionServer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    roster_common::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Binds a UDP socket on an ephemeral loopback port.
pub fn bind_loopback() -> UdpSocket {
    roster_common::quic::bind_udp("127.0.0.1:0".parse().unwrap()).expect("bind 127.0.0.1:0")
}

/// Knobs for [`Cluster::start_with`].
pub struct ClusterOptions {
    pub datas: usize,
    pub sessions: usize,
    /// Applied to every session server's config before it starts.
    pub session: fn(&mut SessionConfig),
    /// The fault table of each data server's calls to its peers, by position (data server 1
    /// first); data servers past the end have none.
    pub data_faults: Vec<Arc<FaultTable>>,
    /// The same for each session server (session server 1 first).
    pub session_faults: Vec<Arc<FaultTable>>,
    /// Every session server answers DNS on a loopback port of its own.
    pub dns: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            datas: 1,
            sessions: 1,
            session: |_| {},
            data_faults: Vec::new(),
            session_faults: Vec::new(),
            dns: false,
        }
    }
}

/// One meta node, data servers and session servers, each a task of this process.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub identity: NodeIdentity,
    pub meta_addr: SocketAddr,
    pub data_addrs: Vec<SocketAddr>,
    pub session_addrs: Vec<SocketAddr>,
    /// Where each session server answers DNS, with `ClusterOptions::dns`.
    pub dns_addrs: Vec<SocketAddr>,
    /// Each session server's admin status source.
    pub session_admins: Vec<roster_common::admin::Admin>,
    /// Whether each session server is ready: a member with a watch stream up to every data server.
    pub session_ready: Vec<watch::Receiver<bool>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<roster_common::Result<()>>>,
}

impl Cluster {
    /// Starts 1 meta, 1 data and 1 session server and waits until they are ready.
    pub async fn start() -> Cluster {
        Self::start_with(ClusterOptions::default()).await
    }

    pub async fn start_with(options: ClusterOptions) -> Cluster {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::generate(&[]).expect("pki");
        pki.write_to(dir.path()).expect("write pki");
        let identity = pki.node_identity().expect("identity");
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut ready: Vec<watch::Receiver<bool>> = Vec::new();

        let meta_socket = bind_loopback();
        let meta_addr = meta_socket.local_addr().unwrap();
        let mut meta_config = MetaConfig::new(1, dir.path().join("meta-1"));
        meta_config.start = Start::Bootstrap([(1, meta_addr.to_string())].into());
        let meta = MetaServer::open(meta_config, identity.clone()).expect("meta");
        tasks.push(tokio::spawn(meta.run(meta_socket, shutdown.clone())));

        let metas = vec![meta_addr.to_string()];
        let mut data_addrs = Vec::new();
        for i in 0..options.datas {
            let mut config = DataConfig::new(i as u64 + 1, metas.clone());
            config.faults = options.data_faults.get(i).cloned();
            let server = DataServer::new(config, identity.clone()).expect("data");
            let socket = bind_loopback();
            data_addrs.push(socket.local_addr().unwrap());
            ready.push(server.ready());
            tasks.push(tokio::spawn(server.run(socket, shutdown.clone())));
        }
        let mut session_addrs = Vec::new();
        let mut session_ready = Vec::new();
        let mut dns_addrs = Vec::new();
        let mut session_admins = Vec::new();
        for i in 0..options.sessions {
            let mut config = SessionConfig::new(i as u64 + 1, metas.clone());
            (options.session)(&mut config);
            config.faults = options.session_faults.get(i).cloned();
            let socket = bind_loopback();
            session_addrs.push(socket.local_addr().unwrap());
            let mut server = SessionServer::new(config, identity.clone()).expect("session");
            if options.dns {
                let sockets =
                    DnsSockets::bind("127.0.0.1:0".parse().unwrap()).expect("bind DNS sockets");
                dns_addrs.push(sockets.local_addr().unwrap());
                server.serve_dns(sockets);
            }
            ready.push(server.ready());
            session_ready.push(server.ready());
            session_admins.push(server.admin());
            tasks.push(tokio::spawn(server.run(socket, shutdown.clone())));
        }
        for mut rx in ready {
            tokio::time::timeout(DEADLINE, rx.wait_for(|r| *r))
                .await
                .expect("servers ready in time")
                .expect("server still running");
        }
        Cluster {
            dir,
            identity,
            meta_addr,
            data_addrs,
            session_addrs,
            dns_addrs,
            session_admins,
            session_ready,
            shutdown,
            tasks,
        }
    }

    /// Starts session server 2 of this cluster on `socket`, its config adjusted by `configure`,
    /// and waits until it is ready; stopped by cancelling the token, and the task tells how it
    /// ended. For tests that stop a session server and start it again on the same address.
    pub async fn start_session_on(
        &self,
        socket: UdpSocket,
        configure: impl FnOnce(&mut SessionConfig),
    ) -> (CancellationToken, JoinHandle<roster_common::Result<()>>) {
        let stop = CancellationToken::new();
        let mut config = SessionConfig::new(2, vec![self.meta_addr.to_string()]);
        configure(&mut config);
        let server = SessionServer::new(config, self.identity.clone()).unwrap();
        let mut ready = server.ready();
        let task = tokio::spawn(server.run(socket, stop.clone()));
        tokio::time::timeout(DEADLINE, ready.wait_for(|r| *r))
            .await
            .expect("session server 2 ready")
            .unwrap();
        (stop, task)
    }

    /// A client config for the first session server, delivering empty snapshots too.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(
            vec![self.session_addrs[0].to_string()],
            self.dir.path().join(CA_CERT_FILE),
        );
        config.refuse_empty = false;
        config
    }

    /// The meta node's view of the cluster: its members and slot table.
    pub async fn view(&self) -> ClusterView {
        let config = quic::client_config(
            tls::peer_client(&self.identity, ALPN_PEER).expect("peer TLS"),
            &TransportSettings::default(),
            false,
        )
        .expect("client config");
        let endpoint = quic::client_endpoint(self.meta_addr).expect("endpoint");
        let pool = PeerPool::new(endpoint, config, DEADLINE);
        let answer = pool
            .call::<_, MetaResponse>(
                &self.meta_addr.to_string(),
                &MetaRequest::GetView { stale: true },
                DEFAULT_MAX_FRAME,
                DEADLINE,
            )
            .await;
        pool.close_all();
        match answer {
            Ok(MetaResponse::View { view, .. }) => view,
            other => panic!("no view from the meta node: {other:?}"),
        }
    }

    /// Signals every server to stop and waits for each to finish cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let result = tokio::time::timeout(DEADLINE, task)
                .await
                .expect("server stopped in time")
                .expect("server task did not panic");
            result.expect("server stopped without error");
        }
    }
}

/// Polls `check` until it returns `Some`, failing the test after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads snapshots until one satisfies `pred`, failing after `deadline`. Returns it and every
/// snapshot seen on the way (the last one included).
pub async fn next_matching(
    sub: &mut Subscription,
    deadline: Duration,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> (Snapshot, Vec<Snapshot>) {
    let mut seen = Vec::new();
    let wait = async {
        while let Some(snapshot) = sub.next().await {
            seen.push(snapshot.clone());
            if pred(&snapshot) {
                return Some(snapshot);
            }
        }
        None
    };
    match tokio::time::timeout(deadline, wait).await {
        Ok(Some(snapshot)) => (snapshot, seen),
        Ok(None) => panic!("subscription ended while waiting for {what}; saw {seen:?}"),
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}; saw {seen:?}"),
    }
}

/// Every snapshot a subscription delivers, recorded by a background task, for checking a whole
/// history afterwards.
pub struct SnapshotLog {
    seen: std::sync::Arc<parking_lot::Mutex<Vec<Snapshot>>>,
    task: JoinHandle<()>,
}

impl SnapshotLog {
    pub fn start(mut sub: Subscription) -> Self {
        let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(snapshot) = sub.next().await {
                    seen.lock().push(snapshot);
                }
            }
        });
        SnapshotLog { seen, task }
    }

    /// Waits (up to [`DEADLINE`]) until the latest snapshot satisfies `pred`.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Snapshot) -> bool) {
        eventually(DEADLINE, what, || async {
            self.seen.lock().last().is_some_and(&pred).then_some(())
        })
        .await
    }

    /// Stops recording and returns every snapshot seen.
    pub fn finish(self) -> Vec<Snapshot> {
        self.task.abort();
        self.seen.lock().clone()
    }
}

/// The data strings of a snapshot's publishers, sorted.
pub fn addresses(snapshot: &Snapshot) -> Vec<String> {
    roster_common::push::data_text(snapshot.publishers.iter())
}

/// Asserts versions strictly increase through `snapshots`.
pub fn assert_versions_increase(snapshots: &[Snapshot]) {
    for pair in snapshots.windows(2) {
        assert!(
            pair[1].version > pair[0].version,
            "version went from {} to {}",
            pair[0].version,
            pair[1].version
        );
    }
}

/// A publisher's identity in a snapshot: `(client_id, register_id)`.
pub type PublisherKey = (String, String);

/// The identities of a snapshot's publishers.
pub fn keys(snapshot: &Snapshot) -> std::collections::BTreeSet<PublisherKey> {
    snapshot
        .publishers
        .iter()
        .map(|p| (p.client_id.clone(), p.register_id.clone()))
        .collect()
}

/// The invariant every fault test checks on what one subscriber saw of one service: versions
/// strictly increase, and no snapshot lacks a publisher of `stable` (those live throughout).
/// Returns a description of the first violation.
pub fn check_history(
    seen: &[Snapshot],
    stable: &std::collections::BTreeSet<PublisherKey>,
) -> Result<(), String> {
    for pair in seen.windows(2) {
        if pair[1].version <= pair[0].version {
            return Err(format!(
                "{}: version went from {} to {}",
                pair[0].service, pair[0].version, pair[1].version
            ));
        }
    }
    for snapshot in seen {
        let have = keys(snapshot);
        if let Some(missing) = stable.iter().find(|k| !have.contains(*k)) {
            return Err(format!(
                "{} at version {} lacks the live publisher {missing:?} ({} of {} present)",
                snapshot.service,
                snapshot.version,
                stable.iter().filter(|k| have.contains(*k)).count(),
                stable.len()
            ));
        }
    }
    Ok(())
}

/// The secret every `RawClient` of `client_id` presents: a new connection is the same client.
fn raw_secret(client_id: &str) -> String {
    format!("the secret of the raw client {client_id}")
}

/// A client speaking `roster/1` by hand over its own QUIC connection, for tests that need to
/// control what a client asks for and when it reads.
pub struct RawClient {
    pub endpoint: Endpoint,
    pub conn: Connection,
    push: Option<RecvStream>,
}

impl RawClient {
    /// Connects to session `addr` of `cluster`. `receive_window`: the QUIC flow-control window
    /// for the push stream, in bytes (quinn's default when `None`).
    pub async fn connect(
        cluster: &Cluster,
        addr: SocketAddr,
        receive_window: Option<u32>,
    ) -> RawClient {
        Self::connect_trusting(&cluster.identity.ca, addr, receive_window).await
    }

    /// Connects to the session server at `addr` whose certificate chains to the CA in the PEM
    /// file `ca` (a cluster of separate processes).
    pub async fn connect_with_ca(ca: &std::path::Path, addr: SocketAddr) -> RawClient {
        let certs = tls::load_certs(ca).unwrap();
        Self::connect_trusting(&certs, addr, None).await
    }

    /// As [`RawClient::connect_with_ca`], failing with the error instead of the test, and giving up
    /// on a handshake after 2 s (for clients that dial servers which may be down).
    pub async fn try_connect_with_ca(
        ca: &std::path::Path,
        addr: SocketAddr,
    ) -> roster_common::Result<RawClient> {
        let certs = tls::load_certs(ca)?;
        Self::try_connect(&certs, addr, None, Duration::from_secs(2)).await
    }

    async fn connect_trusting(
        ca: &[quinn::rustls::pki_types::CertificateDer<'static>],
        addr: SocketAddr,
        receive_window: Option<u32>,
    ) -> RawClient {
        Self::try_connect(ca, addr, receive_window, DEADLINE)
            .await
            .unwrap()
    }

    async fn try_connect(
        ca: &[quinn::rustls::pki_types::CertificateDer<'static>],
        addr: SocketAddr,
        receive_window: Option<u32>,
        handshake: Duration,
    ) -> roster_common::Result<RawClient> {
        let roots = tls::roots_from(ca)?;
        let mut config = quic::client_config(
            tls::client(roots, ALPN_CLIENT)?,
            &TransportSettings::default(),
            true,
        )?;
        if let Some(window) = receive_window {
            let mut transport = quinn::TransportConfig::default();
            transport
                .keep_alive_interval(Some(Duration::from_millis(500)))
                .max_concurrent_uni_streams(8u32.into())
                .stream_receive_window(window.into())
                .receive_window(window.into());
            config.transport_config(std::sync::Arc::new(transport));
        }
        let endpoint = quic::client_endpoint(addr)?;
        let conn = quic::connect(&endpoint, &config, &addr.to_string(), None, handshake).await?;
        Ok(RawClient {
            endpoint,
            conn,
            push: None,
        })
    }

    /// One request, one reply.
    pub async fn call(&self, request: &ClientRequest) -> Reply<ClientResponse> {
        self.call_raw(&frame::encode(request, DEFAULT_MAX_FRAME).unwrap())
            .await
    }

    /// Sends `bytes`, whatever they are, as the whole content of a new stream and returns the
    /// reply frame. (The server may stop the stream before reading it all; the reply still comes.)
    /// A connection that is gone answers `Connection` (a client of a server being killed sees
    /// that); anything else that is not a well-formed reply in time fails the test.
    pub async fn call_raw(&self, bytes: &[u8]) -> Reply<ClientResponse> {
        let gone = |e: &dyn std::fmt::Display| {
            Err(roster_common::Error::Connection(e.to_string()).to_wire())
        };
        let (mut send, mut recv) = match self.conn.open_bi().await {
            Ok(streams) => streams,
            Err(e) => return gone(&e),
        };
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        match tokio::time::timeout(DEADLINE, frame::read_frame(&mut recv, DEFAULT_MAX_FRAME))
            .await
            .expect("a reply in time")
        {
            Err(e @ roster_common::Error::Connection(_)) => gone(&e),
            other => other.expect("a well-formed reply").expect("a reply frame"),
        }
    }

    /// `Hello` as `client_id`, asking for `capabilities`; returns those granted. The secret is
    /// the same for every `RawClient` of that id: a new connection is the same client.
    pub async fn hello(&self, client_id: &str, capabilities: &[&str]) -> Vec<String> {
        let secret = raw_secret(client_id);
        match self
            .hello_as(client_id, secret.as_bytes(), capabilities)
            .await
        {
            Ok(ClientResponse::Welcome { capabilities, .. }) => capabilities,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// `Hello` as `client_id` presenting `secret`; the server's answer.
    pub async fn hello_with_secret(&self, client_id: &str, secret: &[u8]) -> Reply<ClientResponse> {
        self.hello_as(client_id, secret, &[]).await
    }

    /// `Hello` as `client_id` (with its usual secret) presenting `token`; the server's answer.
    pub async fn hello_with_token(
        &self,
        client_id: &str,
        token: Option<&str>,
    ) -> Reply<ClientResponse> {
        let secret = raw_secret(client_id);
        self.hello_full(client_id, secret.as_bytes(), token, &[])
            .await
    }

    async fn hello_as(
        &self,
        client_id: &str,
        secret: &[u8],
        capabilities: &[&str],
    ) -> Reply<ClientResponse> {
        self.hello_full(client_id, secret, None, capabilities).await
    }

    async fn hello_full(
        &self,
        client_id: &str,
        secret: &[u8],
        token: Option<&str>,
        capabilities: &[&str],
    ) -> Reply<ClientResponse> {
        let hello = ClientRequest::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_id: client_id.into(),
            client_name: String::new(),
            token: token.map(str::to_owned),
            client_secret: bytes::Bytes::copy_from_slice(secret),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        };
        self.call(&hello).await
    }

    /// Subscribes `register_id` to `service`.
    pub async fn subscribe(&self, register_id: &str, service: &str) {
        let request = ClientRequest::Subscribe {
            healthy_only: false,
            register_id: register_id.into(),
            service: service.parse().unwrap(),
            scope: Scope::Global,
        };
        assert!(matches!(
            self.call(&request).await,
            Ok(ClientResponse::Done {})
        ));
    }

    /// The next push, or `None` if none arrives within `wait` or the connection is gone.
    pub async fn next_push(&mut self, wait: Duration) -> Option<Push> {
        let read = async {
            if self.push.is_none() {
                self.push = Some(self.conn.accept_uni().await.ok()?);
            }
            let stream = self.push.as_mut().expect("accepted above");
            match frame::read_frame::<_, Push>(stream, DEFAULT_MAX_FRAME).await {
                // The connection went away: nothing more will come.
                Err(roster_common::Error::Connection(_)) => None,
                other => other.expect("a well-formed push"),
            }
        };
        tokio::time::timeout(wait, read).await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use roster_client::PublisherView;

    use super::*;

    fn snapshot(version: u64, ids: &[&str]) -> Snapshot {
        Snapshot::new(
            "demo".parse().unwrap(),
            version,
            ids.iter()
                .map(|id| PublisherView {
                    health: None,
                    persistent: false,
                    client_id: "c".into(),
                    register_id: id.to_string(),
                    data: vec![],
                    attributes: Default::default(),
                    client_version: 1,
                })
                .collect(),
        )
    }

    #[test]
    fn the_invariant_catches_regressions_and_flaps() {
        let stable: std::collections::BTreeSet<PublisherKey> =
            [("c".to_string(), "a".to_string())].into();
        assert!(check_history(&[snapshot(1, &["a"]), snapshot(2, &["a", "b"])], &stable).is_ok());
        assert!(check_history(&[snapshot(2, &["a"]), snapshot(2, &["a"])], &stable).is_err());
        assert!(check_history(&[snapshot(1, &["a"]), snapshot(3, &["b"])], &stable).is_err());
    }
}
