//! `roster certs`, `roster meta`, `roster data`, `roster session`.
//!
//! Each server's settings come from three layers, later winning: a TOML file (`--config`, keys
//! named like the long flags), `ROSTER_*` environment variables, then flags; what none of them
//! gives keeps the server's default. Every setting is declared once, in a [`settings!`] table
//! below: its flag, variable, file key, help and where it goes in the server's config.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use roster_common::acl::{Secret, generate_token, token_id};
use roster_common::admin::Admin;
use roster_common::quic::{TransportSettings, bind_udp};
use roster_common::tls::{CA_CERT_FILE, NodeIdentity, Pki};
use roster_data::{DataConfig, DataServer};
use roster_meta::{MetaConfig, MetaServer, Start, parse_voters};
use roster_session::{DnsSockets, SessionConfig, SessionServer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::files::ADMIN_TOKEN_FILE;
use crate::settings::{ConfigFile, Defaults, Settings, millis, settings};
use crate::{http, shutdown_on_signal};

/// Arguments of `roster certs`.
#[derive(Args)]
pub struct CertsArgs {
    /// Directory to write ca.pem, ca-key.pem, node.pem and node-key.pem into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Extra host name or IP the node certificate is valid for (repeatable). localhost, 127.0.0.1
    /// and ::1 are always included. Use the names servers dial each other and clients dial servers by.
    #[arg(long = "name", value_name = "HOST")]
    names: Vec<String>,
    /// Overwrite certificates already in the directory.
    #[arg(long)]
    force: bool,
}

pub fn certs(args: CertsArgs) -> anyhow::Result<()> {
    if args.dir.join(CA_CERT_FILE).exists() && !args.force {
        bail!(
            "{} already holds a cluster CA; pass --force to replace it (every server and client must then get the new files)",
            args.dir.display()
        );
    }
    let pki = Pki::generate(&args.names)?;
    pki.write_to(&args.dir)?;
    println!(
        "wrote ca.pem, ca-key.pem, node.pem and node-key.pem to {}",
        args.dir.display()
    );
    println!(
        "give every server --tls-dir {}; give clients ca.pem; keep ca-key.pem offline",
        args.dir.display()
    );
    Ok(())
}

/// `--config`, which every server has: the TOML file that gives the settings neither a flag nor
/// the environment gives.
#[derive(Args, Debug)]
pub struct ConfigArg {
    /// TOML file with any of these settings; keys are the long flag names (e.g. `tls-dir = "..."`).
    #[arg(long, env = "ROSTER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

/// What the settings every server has need of the server's config: where it listens unless told
/// otherwise, its frame limit and its QUIC transports. Each server keeps these in its own places
/// (a session server has a transport for clients and one for peers).
pub trait ServerConfig: Defaults {
    /// The UDP address it accepts QUIC connections on by default.
    const LISTEN: &'static str;
    /// The TCP address of its HTTP admin port by default.
    const HTTP: &'static str;
    /// Its largest frame accepted, in bytes.
    fn max_frame(&mut self) -> &mut u32;
    /// Its QUIC transports; each takes the keep-alive and idle timeout given.
    fn transports(&mut self) -> Vec<&mut TransportSettings>;
}

impl Defaults for MetaConfig {
    fn defaults() -> Self {
        MetaConfig::new(0, PathBuf::new())
    }
}

impl ServerConfig for MetaConfig {
    const LISTEN: &'static str = "0.0.0.0:7100";
    const HTTP: &'static str = "0.0.0.0:7180";

    fn max_frame(&mut self) -> &mut u32 {
        &mut self.max_frame
    }

    fn transports(&mut self) -> Vec<&mut TransportSettings> {
        vec![&mut self.transport]
    }
}

impl Defaults for DataConfig {
    fn defaults() -> Self {
        DataConfig::new(0, Vec::new())
    }
}

impl ServerConfig for DataConfig {
    const LISTEN: &'static str = "0.0.0.0:7200";
    const HTTP: &'static str = "0.0.0.0:7280";

    fn max_frame(&mut self) -> &mut u32 {
        &mut self.max_frame
    }

    fn transports(&mut self) -> Vec<&mut TransportSettings> {
        vec![&mut self.transport]
    }
}

impl Defaults for SessionConfig {
    fn defaults() -> Self {
        SessionConfig::new(0, Vec::new())
    }
}

impl ServerConfig for SessionConfig {
    const LISTEN: &'static str = "0.0.0.0:7300";
    const HTTP: &'static str = "0.0.0.0:7380";

    fn max_frame(&mut self) -> &mut u32 {
        &mut self.max_frame
    }

    /// A keep-alive or idle timeout given applies to clients too, in place of their shorter
    /// default idle timeout.
    fn transports(&mut self) -> Vec<&mut TransportSettings> {
        vec![&mut self.client_transport, &mut self.peer_transport]
    }
}

settings! {
    /// Settings every server has, with the defaults of server `S`. The server applies them by
    /// hand ([`CommonSettings::apply_common`] and the accessors), as each keeps them in its own
    /// places.
    pub struct CommonSettings<S: ServerConfig> for S {
        /// This server's id, unique within its tier. Required.
        id: Option<u64> [env = "ROSTER_ID"];
        /// UDP address to accept QUIC connections on.
        listen: Option<SocketAddr> [env = "ROSTER_LISTEN", value_name = "ADDR"]
            default(S::LISTEN);
        /// TCP address of the HTTP admin port: /healthz, /readyz, /metrics (Prometheus) and the
        /// JSON admin API under /admin.
        http: Option<SocketAddr> [env = "ROSTER_HTTP", value_name = "ADDR"]
            default(S::HTTP);
        /// Directory with ca.pem, node.pem and node-key.pem (made by `roster certs`). Required.
        tls_dir: Option<PathBuf> [env = "ROSTER_TLS_DIR", value_name = "DIR"];
        /// QUIC keep-alive interval in milliseconds.
        keep_alive_ms: Option<u64> [env = "ROSTER_KEEP_ALIVE_MS", value_name = "MS"]
            default(millis(TransportSettings::default().keep_alive));
        /// QUIC idle timeout in milliseconds: a peer silent this long is dead.
        idle_timeout_ms: Option<u64> [env = "ROSTER_IDLE_TIMEOUT_MS", value_name = "MS"]
            default(format!(
                "{}; a session server's connections to clients: {}",
                millis(TransportSettings::default().idle_timeout),
                millis(SessionConfig::defaults().client_transport.idle_timeout),
            ));
        /// Largest frame accepted, in bytes.
        max_frame: Option<u32> [env = "ROSTER_MAX_FRAME", value_name = "BYTES"]
            default(*S::defaults().max_frame());
    }
}

impl<S: ServerConfig> CommonSettings<S> {
    fn id(&self) -> anyhow::Result<u64> {
        self.id
            .context("--id is required (or ROSTER_ID, or `id` in the config file)")
    }

    fn identity(&self) -> anyhow::Result<NodeIdentity> {
        let dir = self.tls_dir.as_deref().context(
            "--tls-dir is required (or ROSTER_TLS_DIR); make one with `roster certs --dir DIR`",
        )?;
        Ok(NodeIdentity::load(dir)?)
    }

    /// The UDP address to accept QUIC connections on.
    fn listen(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| S::LISTEN.parse().expect("literal address"))
    }

    /// The TCP address of the HTTP admin port.
    fn http(&self) -> SocketAddr {
        self.http
            .unwrap_or_else(|| S::HTTP.parse().expect("literal address"))
    }

    /// Copies the frame limit, keep-alive and idle timeout given into `config`.
    fn apply_common(&self, config: &mut S) {
        if let Some(max_frame) = self.max_frame {
            *config.max_frame() = max_frame;
        }
        for transport in config.transports() {
            if let Some(ms) = self.keep_alive_ms {
                transport.keep_alive = Duration::from_millis(ms);
            }
            if let Some(ms) = self.idle_timeout_ms {
                transport.idle_timeout = Duration::from_millis(ms);
            }
        }
    }
}

/// Arguments of `roster meta`.
#[derive(Args, Debug)]
pub struct MetaArgs {
    #[command(flatten)]
    file: ConfigArg,
    #[command(flatten)]
    common: CommonSettings<MetaConfig>,
    #[command(flatten)]
    meta: MetaSettings,
}

settings! {
    /// The settings only a meta node has.
    pub struct MetaSettings for MetaConfig {
        /// Directory for the node's durable state. Required.
        data_dir: Option<PathBuf> [env = "ROSTER_DATA_DIR", value_name = "DIR"];
        /// Create a new cluster with these initial voters (start every one of them with the same
        /// list; the lowest id creates the cluster). Only for a node without state.
        bootstrap: Option<String> [
            env = "ROSTER_BOOTSTRAP",
            value_name = "ID=ADDR,...",
            conflicts_with = "join",
        ];
        /// Join the cluster of the meta node at ADDR: this node is added as a learner and becomes
        /// a voter once caught up. Only for a node without state.
        join: Option<String> [env = "ROSTER_JOIN", value_name = "ADDR"];
        /// With --join: stay a non-voting learner (a read replica).
        learner: bool [env = "ROSTER_LEARNER", requires = "join"];
        /// The address other meta nodes and members dial this node at [default: the listen
        /// address, if a specific IP]. Must match this node's address in --bootstrap.
        advertise: Option<String> [env = "ROSTER_ADVERTISE", value_name = "HOST:PORT"];
        /// Slots of a new cluster, fixed once it exists.
        slots: Option<u32> [env = "ROSTER_SLOTS"] => slot_count;
        /// Data servers per slot, leader included.
        replicas: Option<u32> [env = "ROSTER_REPLICAS"] => replicas;
        /// Below this many live data servers the slot table is frozen [default: {default}, never].
        min_data_servers: Option<u32> [env = "ROSTER_MIN_DATA_SERVERS"] => min_data_servers;
        /// Silence after which a data or session server is removed, in milliseconds.
        lease_timeout_ms: Option<u64> [env = "ROSTER_LEASE_TIMEOUT_MS", value_name = "MS"]
            => lease_timeout in millis;
        /// Snapshot the meta state every N applied log entries; the log is compacted behind it.
        snapshot_every: Option<u64> [env = "ROSTER_SNAPSHOT_EVERY", value_name = "N"]
            => raft.snapshot_every;
        /// How long a new slot table must stand before leadership is handed to data servers that
        /// joined, in milliseconds.
        rebalance_delay_ms: Option<u64> [env = "ROSTER_REBALANCE_DELAY_MS", value_name = "MS"]
            => rebalance_delay in millis;
        /// Log entries kept behind a snapshot for followers slightly behind.
        keep_behind_snapshot: Option<u64> [env = "ROSTER_KEEP_BEHIND_SNAPSHOT", value_name = "N"]
            => raft.keep_behind_snapshot;
        /// The most persistent instances the cluster stores (`roster register`); a new one past it
        /// is refused. The meta state, persistent instances included, must fit in --max-frame.
        max_persistent_instances: Option<usize> [
            env = "ROSTER_MAX_PERSISTENT_INSTANCES",
            value_name = "N",
        ] => max_persistent_instances;
        /// With --bootstrap: the cluster's first admin token, in a file. Every initial voter must
        /// be given the same one (a mounted Secret, or a file made with `roster acl token
        /// generate`). With a single voter a missing file is created with a new token.
        admin_token_file: Option<PathBuf> [env = "ROSTER_ADMIN_TOKEN_FILE", value_name = "FILE"]
            default(format!("DATA_DIR/{ADMIN_TOKEN_FILE}"));
        /// With --bootstrap: create the cluster without authentication. Any client that reaches a
        /// session server may then publish and subscribe anything, and anyone may read /admin.
        /// Every server logs a warning about it at start. Fixed when the cluster is created.
        insecure_no_auth: bool [
            env = "ROSTER_INSECURE_NO_AUTH",
            conflicts_with = "admin_token_file",
        ];
    }
}

/// The admin token a new cluster is created with (`None`: without authentication): read from
/// `--admin-token-file`, or, for a single voter, created in the data directory. A node that already
/// holds state needs none: the cluster's rules are in its log.
fn bootstrap_admin_token(
    settings: &MetaSettings,
    data_dir: &Path,
    voters: usize,
) -> anyhow::Result<Option<Secret>> {
    if roster_meta::holds_state(data_dir)? {
        return Ok(None);
    }
    if settings.insecure_no_auth {
        warn!(
            "creating the cluster WITHOUT authentication (--insecure-no-auth): anyone who reaches it may publish, subscribe and read /admin"
        );
        return Ok(None);
    }
    let path = match &settings.admin_token_file {
        Some(path) => path.clone(),
        None if voters > 1 => bail!(
            "a cluster of {voters} voters needs one admin token shared by all of them: write one \
             with `roster acl token generate > admin.token` and give every voter \
             --admin-token-file admin.token (or create the cluster with --insecure-no-auth)"
        ),
        None => data_dir.join(ADMIN_TOKEN_FILE),
    };
    if !path.exists() {
        if voters > 1 {
            bail!(
                "{} does not exist: every initial voter must be given the same admin token file \
                 (write one with `roster acl token generate`)",
                path.display()
            );
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        roster_common::tls::write_file(&path, &format!("{}\n", generate_token()), true)?;
        println!(
            "roster meta: the cluster's admin token is in {} (readable by its owner only)",
            path.display()
        );
    }
    let token = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the admin token file {}", path.display()))?;
    let token = token.trim();
    token_id(&format!("the admin token in {}", path.display()), token)?;
    Ok(Some(Secret::new(token)))
}

settings! {
    /// Settings of the servers that join the cluster as members (data and session), applied by
    /// hand.
    pub struct MemberSettings {
        /// Meta node addresses, comma-separated. Required.
        meta: Option<Vec<String>> [
            env = "ROSTER_META",
            value_name = "ADDR[,ADDR...]",
            value_delimiter = ',',
        ];
        /// The address others dial this server at: sessions for a data server, clients for a
        /// session server [default: the listen address, if a specific IP].
        advertise: Option<String> [env = "ROSTER_ADVERTISE", value_name = "HOST:PORT"];
        /// Failure zone reported to the meta tier.
        zone: Option<String> [env = "ROSTER_ZONE"];
    }
}

impl MemberSettings {
    fn metas(&self) -> anyhow::Result<Vec<String>> {
        self.meta
            .clone()
            .filter(|m| !m.is_empty())
            .context("--meta is required (or ROSTER_META, or `meta` in the config file)")
    }
}

/// Arguments of `roster data`.
#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(flatten)]
    file: ConfigArg,
    #[command(flatten)]
    common: CommonSettings<DataConfig>,
    #[command(flatten)]
    member: MemberSettings,
    #[command(flatten)]
    data: DataSettings,
}

settings! {
    /// The settings only a data server has.
    pub struct DataSettings for DataConfig {
        /// How long a departed session's publishers are kept, in milliseconds.
        session_grace_ms: Option<u64> [env = "ROSTER_SESSION_GRACE_MS", value_name = "MS"]
            => session_grace in millis;
        /// Health-check probes this server runs at once, across every check of the slots it
        /// leads; more wait their turn (a probe delayed, never two of one instance at once).
        probe_concurrency: Option<usize> [env = "ROSTER_PROBE_CONCURRENCY", value_name = "N"]
            => probe_concurrency;
    }
}

/// Arguments of `roster session`.
#[derive(Args, Debug)]
pub struct SessionArgs {
    #[command(flatten)]
    file: ConfigArg,
    #[command(flatten)]
    common: CommonSettings<SessionConfig>,
    #[command(flatten)]
    member: MemberSettings,
    #[command(flatten)]
    session: SessionSettings,
}

settings! {
    /// The settings only a session server has.
    pub struct SessionSettings for SessionConfig {
        /// How long the publishers of a lost client connection (timed out or reset, not closed by
        /// the client) stay, in milliseconds; the same client connecting again within it keeps
        /// them.
        client_grace_ms: Option<u64> [env = "ROSTER_CLIENT_GRACE_MS", value_name = "MS"]
            => client_grace in millis;
        /// On SIGTERM, how long to wait for clients to move after GoAway, in milliseconds.
        drain_timeout_ms: Option<u64> [env = "ROSTER_DRAIN_TIMEOUT_MS", value_name = "MS"]
            => drain_timeout in millis;
        /// Client connections accepted.
        max_connections: Option<usize> [env = "ROSTER_MAX_CONNECTIONS"] => max_connections;
        /// Publishers per connection.
        max_publishers_per_connection: Option<usize> [
            env = "ROSTER_MAX_PUBLISHERS_PER_CONNECTION",
        ] => max_publishers_per_connection;
        /// Subscriptions per connection.
        max_subscriptions_per_connection: Option<usize> [
            env = "ROSTER_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        ] => max_subscriptions_per_connection;
        /// Requests outstanding per connection.
        max_requests_per_connection: Option<u32> [
            env = "ROSTER_MAX_REQUESTS_PER_CONNECTION",
        ] => max_requests_per_connection;
        /// Bytes per publisher: data plus attributes.
        max_publisher_bytes: Option<usize> [env = "ROSTER_MAX_PUBLISHER_BYTES"]
            => max_publisher_bytes;
        /// The longest a change waits to be pushed, in milliseconds, when the client falls behind
        /// (it answers over 1 ms later than its best): after `--coalesce-burst` pushes of one
        /// service in a row it gets the next 20 times that lateness later, with every change since.
        /// A client that keeps up is not held. 0: push whenever its push stream is free.
        coalesce_ms: Option<u64> [env = "ROSTER_COALESCE_MS", value_name = "MS"]
            => pacing.window in millis;
        /// Pushes of one service to one client in a row before pacing spaces them (at least 1).
        coalesce_burst: Option<u32> [env = "ROSTER_COALESCE_BURST", value_name = "N"]
            => pacing.burst;
        /// Above this share (0 to 1) of a service's instances unhealthy, a healthy-only subscriber
        /// is pushed all of them, marked, instead of the few healthy ones: a health checker cut off
        /// from the network must not empty a service.
        protection_threshold: Option<f64> [
            env = "ROSTER_PROTECTION_THRESHOLD",
            value_name = "SHARE",
        ] => protection_threshold;
        /// How long a client's push stream may make no progress (the client reads nothing) before
        /// the connection is closed, in milliseconds. A client that reads slowly is not cut off:
        /// its pushes merge.
        push_stall_ms: Option<u64> [env = "ROSTER_PUSH_STALL_MS", value_name = "MS"]
            => push_stall_timeout in millis;
        /// How often the server compares its connection count with the mean of the session
        /// servers and asks some clients to move when it holds well more, in milliseconds.
        balance_interval_ms: Option<u64> [env = "ROSTER_BALANCE_INTERVAL_MS", value_name = "MS"]
            => balance_interval in millis;
        /// Answer DNS queries for services over UDP and TCP on this address (one port, both
        /// protocols; port 0 lets the system pick). Off unless given. DNS answers are not
        /// authenticated.
        dns: Option<SocketAddr> [env = "ROSTER_DNS", value_name = "ADDR"] default("off");
        /// The zone DNS answers for: `NAME.ZONE` is the service default/DEFAULT/NAME, and
        /// `NAME.GROUP.NAMESPACE.ZONE` any other.
        dns_domain: Option<String> [env = "ROSTER_DNS_DOMAIN", value_name = "DOMAIN"]
            default(roster_session::DnsConfig::default().domain);
        /// TTL of DNS records and of negative answers, in seconds.
        dns_ttl: Option<u32> [env = "ROSTER_DNS_TTL", value_name = "SECONDS"] => dns.ttl_secs;
        /// How long a service DNS was asked for stays watched after its last query, in
        /// milliseconds.
        dns_idle_ms: Option<u64> [env = "ROSTER_DNS_IDLE_MS", value_name = "MS"]
            => dns.idle in millis;
        /// DNS queries per second one source address may make; more are dropped. 0 is no limit.
        dns_qps_per_source: Option<u32> [env = "ROSTER_DNS_QPS_PER_SOURCE", value_name = "N"]
            => dns.qps_per_source;
        /// Services DNS watches at once; a query for one more is answered SERVFAIL.
        dns_max_services: Option<usize> [env = "ROSTER_DNS_MAX_SERVICES", value_name = "N"]
            => dns.max_services;
    }
}

/// Which server runs, for its start line and logs, and how long it may take to stop.
struct Running {
    role: &'static str,
    /// `meta 1 of cluster …`, `data 2`: how its start line names it.
    who: String,
    /// From the shutdown signal to exit, at most: past it the process exits with an error, whatever
    /// it was waiting for (a peer that is gone, a task that does not end).
    stop_within: Duration,
    /// Routes the server adds to its HTTP admin port (a session server's web console).
    routes: axum::Router,
    /// More of the start line: ` dns=ADDR` for a session server serving DNS.
    also: String,
}

/// Slack beyond a server's own drain for its last steps (leaving the cluster, closing links).
const STOP_SLACK: Duration = Duration::from_secs(5);

/// Binds the server's sockets, serves the HTTP admin port beside it, and runs it until SIGINT or
/// SIGTERM. Prints where it listens on stdout, so scripts can find ports the system chose
/// (`--listen 127.0.0.1:0`).
async fn run_server<F, Fut>(
    running: Running,
    listen: SocketAddr,
    http: SocketAddr,
    ready: watch::Receiver<bool>,
    admin: Admin,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(UdpSocket, CancellationToken) -> Fut,
    Fut: Future<Output = roster_common::Result<()>>,
{
    let socket = bind_udp(listen)?;
    let quic = socket.local_addr()?;
    let shutdown = shutdown_on_signal();
    let routes = running.routes.clone();
    let (http, http_task) = http::serve(http, ready, admin, routes, shutdown.clone()).await?;
    roster_common::admin::build_info(running.role);
    println!(
        "roster {} listening: quic={quic} http={http}{}",
        running.who, running.also
    );
    let overdue = async {
        shutdown.cancelled().await;
        tokio::time::sleep(running.stop_within).await;
    };
    let result = tokio::select! {
        result = run(socket, shutdown.clone()) => result,
        () = overdue => {
            tracing::error!(within = ?running.stop_within, "did not stop in time after the shutdown signal; exiting anyway");
            bail!("{} did not stop within {:?} of the shutdown signal", running.who, running.stop_within);
        }
    };
    // Also stops the admin port when the server ended on its own.
    shutdown.cancel();
    let _ = http_task.await;
    Ok(result?)
}

pub async fn meta(args: MetaArgs) -> anyhow::Result<()> {
    let MetaArgs {
        file,
        mut common,
        mut meta,
    } = args;
    let file = ConfigFile::read(
        file.config.as_deref(),
        &[CommonSettings::<MetaConfig>::FIELDS, MetaSettings::FIELDS],
    )?;
    file.fill(&mut common)?;
    file.fill(&mut meta)?;

    let id = common.id()?;
    let data_dir = meta
        .data_dir
        .clone()
        .context("--data-dir is required (or ROSTER_DATA_DIR)")?;
    let mut config = MetaConfig::new(id, data_dir.clone());
    config.start = match (&meta.bootstrap, &meta.join) {
        (Some(voters), None) => {
            let voters = parse_voters(voters).context("--bootstrap")?;
            config.admin_token = bootstrap_admin_token(&meta, &data_dir, voters.len())?;
            Start::Bootstrap(voters)
        }
        (None, Some(addr)) => Start::Join {
            addr: addr.clone(),
            learner: meta.learner,
        },
        (None, None) => Start::Recover,
        (Some(_), Some(_)) => bail!("--bootstrap and --join exclude each other"),
    };
    config.advertise = meta.advertise.clone();
    common.apply_common(&mut config);
    meta.apply(&mut config);
    if meta.lease_timeout_ms.is_some() {
        // Leases are renewed at least three times within a shorter lease.
        config.renew_interval = config.renew_interval.min(config.lease_timeout / 3);
    }
    info!(?config, "starting meta node");
    let identity = common.identity()?;
    let server = MetaServer::open(config, identity)?;
    let ready = server.ready();
    let admin = server.admin();
    let listen = common.listen();
    let http = common.http();
    let cluster = server.cluster_id().unwrap_or_else(|| "(new)".into());
    let running = Running {
        role: "meta",
        who: format!("meta {id} of cluster {cluster}"),
        stop_within: STOP_SLACK,
        routes: axum::Router::new(),
        also: String::new(),
    };
    run_server(running, listen, http, ready, admin, |socket, shutdown| {
        server.run(socket, shutdown)
    })
    .await
}

pub async fn data(args: DataArgs) -> anyhow::Result<()> {
    let DataArgs {
        file,
        mut common,
        mut member,
        mut data,
    } = args;
    let file = ConfigFile::read(
        file.config.as_deref(),
        &[
            CommonSettings::<DataConfig>::FIELDS,
            MemberSettings::FIELDS,
            DataSettings::FIELDS,
        ],
    )?;
    file.fill(&mut common)?;
    file.fill(&mut member)?;
    file.fill(&mut data)?;

    let mut config = DataConfig::new(common.id()?, member.metas()?);
    config.advertise = member.advertise;
    config.zone = member.zone.unwrap_or_default();
    common.apply_common(&mut config);
    data.apply(&mut config);
    info!(?config, "starting data server");
    let id = config.id;
    let server = DataServer::new(config, common.identity()?)?;
    let listen = common.listen();
    let http = common.http();
    let ready = server.ready();
    let admin = server.admin();
    let running = Running {
        role: "data",
        who: format!("data {id}"),
        stop_within: STOP_SLACK,
        routes: axum::Router::new(),
        also: String::new(),
    };
    run_server(running, listen, http, ready, admin, |socket, shutdown| {
        server.run(socket, shutdown)
    })
    .await
}

pub async fn session(args: SessionArgs) -> anyhow::Result<()> {
    let SessionArgs {
        file,
        mut common,
        mut member,
        mut session,
    } = args;
    let file = ConfigFile::read(
        file.config.as_deref(),
        &[
            CommonSettings::<SessionConfig>::FIELDS,
            MemberSettings::FIELDS,
            SessionSettings::FIELDS,
        ],
    )?;
    file.fill(&mut common)?;
    file.fill(&mut member)?;
    file.fill(&mut session)?;

    let mut config = SessionConfig::new(common.id()?, member.metas()?);
    config.advertise = member.advertise;
    config.zone = member.zone.unwrap_or_default();
    common.apply_common(&mut config);
    session.apply(&mut config);
    if let Some(domain) = &session.dns_domain {
        config.dns.domain = domain.clone();
    }
    info!(?config, "starting session server");
    let id = config.id;
    let drain_timeout = config.drain_timeout;
    let mut server = SessionServer::new(config, common.identity()?)?;
    let mut also = String::new();
    if let Some(addr) = session.dns {
        let sockets = DnsSockets::bind(addr)?;
        also = format!(" dns={}", sockets.local_addr()?);
        server.serve_dns(sockets);
    }
    let listen = common.listen();
    let http = common.http();
    let ready = server.ready();
    let admin = server.admin();
    let running = Running {
        role: "session",
        who: format!("session {id}"),
        stop_within: drain_timeout + STOP_SLACK,
        routes: server.console(),
        also,
    };
    run_server(running, listen, http, ready, admin, |socket, shutdown| {
        server.run(socket, shutdown)
    })
    .await
}
