//! `roster certs`, `roster meta`, `roster data`, `roster session`.
//!
//! Each server's settings come from three layers, later winning: a TOML file (`--config`, keys
//! named like the long flags), `ROSTER_*` environment variables, then flags.

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
use roster_meta::{DEFAULT_META_MAX_FRAME, MetaConfig, MetaServer, Start, parse_voters};
use roster_session::{SessionConfig, SessionServer};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::files::ADMIN_TOKEN_FILE;
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

/// Fills every `None` field of `$flags` from `$file`.
macro_rules! layer {
    ($flags:ident, $file:ident; $($field:ident),+ $(,)?) => {
        $( if $flags.$field.is_none() { $flags.$field = $file.$field; } )+
    };
}

/// Keys every server's config file may have.
const COMMON_KEYS: &[&str] = &[
    "id",
    "listen",
    "http",
    "tls-dir",
    "keep-alive-ms",
    "idle-timeout-ms",
    "max-frame",
];

/// Reads a server's TOML config file, refusing keys that are not among `COMMON_KEYS` and `own_keys`
/// (a misspelt key silently ignored is a setting silently lost).
fn read_config_file<T: DeserializeOwned + Default>(
    path: Option<&Path>,
    own_keys: &[&str],
) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
    if let Some(unknown) = table
        .keys()
        .find(|k| !COMMON_KEYS.contains(&k.as_str()) && !own_keys.contains(&k.as_str()))
    {
        let mut known: Vec<&str> = COMMON_KEYS.iter().chain(own_keys).copied().collect();
        known.sort_unstable();
        bail!(
            "config file {}: unknown key `{unknown}`; known keys: {}",
            path.display(),
            known.join(", ")
        );
    }
    T::deserialize(table).with_context(|| format!("config file {}", path.display()))
}

/// Settings every server has.
#[derive(Args, Deserialize, Default, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct CommonArgs {
    /// TOML file with any of these settings; keys are the long flag names (e.g. `tls-dir = "..."`).
    #[arg(long, env = "ROSTER_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// This server's id, unique within its tier. Required.
    #[arg(long, env = "ROSTER_ID")]
    id: Option<u64>,
    /// UDP address to accept QUIC connections on.
    #[arg(long, env = "ROSTER_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// TCP address of the HTTP admin port: /healthz, /readyz, /metrics (Prometheus) and the JSON
    /// admin API under /admin.
    #[arg(long, env = "ROSTER_HTTP", value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Directory with ca.pem, node.pem and node-key.pem (made by `roster certs`). Required.
    #[arg(long, env = "ROSTER_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// QUIC keep-alive interval in milliseconds [default: 1000].
    #[arg(long, env = "ROSTER_KEEP_ALIVE_MS", value_name = "MS")]
    keep_alive_ms: Option<u64>,
    /// QUIC idle timeout in milliseconds: a peer silent this long is dead [default: 4000; a
    /// session server's connections to clients: 2500].
    #[arg(long, env = "ROSTER_IDLE_TIMEOUT_MS", value_name = "MS")]
    idle_timeout_ms: Option<u64>,
    /// Largest frame accepted, in bytes [default: 1048576].
    #[arg(long, env = "ROSTER_MAX_FRAME", value_name = "BYTES")]
    max_frame: Option<u32>,
}

impl CommonArgs {
    fn layer(&mut self, file: CommonArgs) {
        layer!(self, file; id, listen, http, tls_dir, keep_alive_ms, idle_timeout_ms, max_frame);
    }

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

    fn transport(&self) -> TransportSettings {
        let defaults = TransportSettings::default();
        TransportSettings {
            keep_alive: self
                .keep_alive_ms
                .map_or(defaults.keep_alive, Duration::from_millis),
            idle_timeout: self
                .idle_timeout_ms
                .map_or(defaults.idle_timeout, Duration::from_millis),
            ..defaults
        }
    }

    fn max_frame(&self) -> u32 {
        self.max_frame
            .unwrap_or(roster_common::frame::DEFAULT_MAX_FRAME)
    }
}

/// Arguments of `roster meta`.
#[derive(Args, Deserialize, Default, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct MetaArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
    /// Directory for the node's durable state. Required.
    #[arg(long, env = "ROSTER_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Create a new cluster with these initial voters (start every one of them with the same
    /// list; the lowest id creates the cluster). Only for a node without state.
    #[arg(
        long,
        env = "ROSTER_BOOTSTRAP",
        value_name = "ID=ADDR,...",
        conflicts_with = "join"
    )]
    bootstrap: Option<String>,
    /// Join the cluster of the meta node at ADDR: this node is added as a learner and becomes a
    /// voter once caught up. Only for a node without state.
    #[arg(long, env = "ROSTER_JOIN", value_name = "ADDR")]
    join: Option<String>,
    /// With --join: stay a non-voting learner (a read replica).
    #[arg(long, env = "ROSTER_LEARNER", requires = "join")]
    #[serde(default)]
    learner: bool,
    /// The address other meta nodes and members dial this node at [default: the listen address,
    /// if a specific IP]. Must match this node's address in --bootstrap.
    #[arg(long, env = "ROSTER_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Slots of a new cluster, fixed once it exists [default: 256].
    #[arg(long, env = "ROSTER_SLOTS")]
    slots: Option<u32>,
    /// Data servers per slot, leader included [default: 3].
    #[arg(long, env = "ROSTER_REPLICAS")]
    replicas: Option<u32>,
    /// Below this many live data servers the slot table is frozen [default: 0, never].
    #[arg(long, env = "ROSTER_MIN_DATA_SERVERS")]
    min_data_servers: Option<u32>,
    /// Silence after which a data or session server is removed, in milliseconds [default: 3000].
    #[arg(long, env = "ROSTER_LEASE_TIMEOUT_MS", value_name = "MS")]
    lease_timeout_ms: Option<u64>,
    /// Snapshot the meta state every N applied log entries; the log is compacted behind it
    /// [default: 10000].
    #[arg(long, env = "ROSTER_SNAPSHOT_EVERY", value_name = "N")]
    snapshot_every: Option<u64>,
    /// How long a new slot table must stand before leadership is handed to data servers that
    /// joined, in milliseconds [default: 5000].
    #[arg(long, env = "ROSTER_REBALANCE_DELAY_MS", value_name = "MS")]
    rebalance_delay_ms: Option<u64>,
    /// Log entries kept behind a snapshot for followers slightly behind [default: 1000].
    #[arg(long, env = "ROSTER_KEEP_BEHIND_SNAPSHOT", value_name = "N")]
    keep_behind_snapshot: Option<u64>,
    /// With --bootstrap: the cluster's first admin token, in a file. Every initial voter must be
    /// given the same one (a mounted Secret, or a file made with `roster acl token generate`).
    /// With a single voter a missing file is created with a new token [default:
    /// DATA_DIR/admin.token].
    #[arg(long, env = "ROSTER_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// With --bootstrap: create the cluster without authentication. Any client that reaches a
    /// session server may then publish and subscribe anything, and anyone may read /admin. Every
    /// server logs a warning about it at start. Fixed when the cluster is created.
    #[arg(
        long,
        env = "ROSTER_INSECURE_NO_AUTH",
        conflicts_with = "admin_token_file"
    )]
    #[serde(default)]
    insecure_no_auth: bool,
}

/// The admin token a new cluster is created with (`None`: without authentication): read from
/// `--admin-token-file`, or, for a single voter, created in the data directory. A node that already
/// holds state needs none: the cluster's rules are in its log.
fn bootstrap_admin_token(
    args: &MetaArgs,
    data_dir: &Path,
    voters: usize,
) -> anyhow::Result<Option<Secret>> {
    if roster_meta::holds_state(data_dir)? {
        return Ok(None);
    }
    if args.insecure_no_auth {
        warn!(
            "creating the cluster WITHOUT authentication (--insecure-no-auth): anyone who reaches it may publish, subscribe and read /admin"
        );
        return Ok(None);
    }
    let path = match &args.admin_token_file {
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

/// Settings of the servers that join the cluster as members (data and session).
#[derive(Args, Deserialize, Default, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct MemberArgs {
    /// Meta node addresses, comma-separated. Required.
    #[arg(
        long,
        env = "ROSTER_META",
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ','
    )]
    meta: Option<Vec<String>>,
    /// The address others dial this server at: sessions for a data server, clients for a session
    /// server [default: the listen address, if a specific IP].
    #[arg(long, env = "ROSTER_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Failure zone reported to the meta tier.
    #[arg(long, env = "ROSTER_ZONE")]
    zone: Option<String>,
}

/// Keys of [`MemberArgs`] in a config file.
const MEMBER_KEYS: [&str; 3] = ["meta", "advertise", "zone"];

impl MemberArgs {
    fn layer(&mut self, file: MemberArgs) {
        layer!(self, file; meta, advertise, zone);
    }

    fn metas(&self) -> anyhow::Result<Vec<String>> {
        self.meta
            .clone()
            .filter(|m| !m.is_empty())
            .context("--meta is required (or ROSTER_META, or `meta` in the config file)")
    }
}

/// Arguments of `roster data`.
#[derive(Args, Deserialize, Default, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct DataArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    #[serde(flatten)]
    member: MemberArgs,
    /// How long a departed session's publishers are kept, in milliseconds [default: 5000].
    #[arg(long, env = "ROSTER_SESSION_GRACE_MS", value_name = "MS")]
    session_grace_ms: Option<u64>,
}

/// Arguments of `roster session`.
#[derive(Args, Deserialize, Default, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct SessionArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    #[serde(flatten)]
    member: MemberArgs,
    /// How long the publishers of a lost client connection (timed out or reset, not closed by
    /// the client) stay, in milliseconds; the same client connecting again within it keeps them
    /// [default: 1000].
    #[arg(long, env = "ROSTER_CLIENT_GRACE_MS", value_name = "MS")]
    client_grace_ms: Option<u64>,
    /// On SIGTERM, how long to wait for clients to move after GoAway, in milliseconds
    /// [default: 10000].
    #[arg(long, env = "ROSTER_DRAIN_TIMEOUT_MS", value_name = "MS")]
    drain_timeout_ms: Option<u64>,
    /// Client connections accepted [default: 100000].
    #[arg(long, env = "ROSTER_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Publishers per connection [default: 10000].
    #[arg(long, env = "ROSTER_MAX_PUBLISHERS_PER_CONNECTION")]
    max_publishers_per_connection: Option<usize>,
    /// Subscriptions per connection [default: 10000].
    #[arg(long, env = "ROSTER_MAX_SUBSCRIPTIONS_PER_CONNECTION")]
    max_subscriptions_per_connection: Option<usize>,
    /// Requests outstanding per connection [default: 64].
    #[arg(long, env = "ROSTER_MAX_REQUESTS_PER_CONNECTION")]
    max_requests_per_connection: Option<u32>,
    /// Bytes per publisher: data plus attributes [default: 65536].
    #[arg(long, env = "ROSTER_MAX_PUBLISHER_BYTES")]
    max_publisher_bytes: Option<usize>,
    /// The least time between two pushes of one service to one client, in milliseconds. 0 pushes
    /// a change as soon as the client's push stream is free and merges what arrives while it is
    /// busy [default: 0].
    #[arg(long, env = "ROSTER_COALESCE_MS", value_name = "MS")]
    coalesce_ms: Option<u64>,
    /// How long a client's push stream may make no progress (the client reads nothing) before
    /// the connection is closed, in milliseconds. A client that reads slowly is not cut off: its
    /// pushes merge [default: 30000].
    #[arg(long, env = "ROSTER_PUSH_STALL_MS", value_name = "MS")]
    push_stall_ms: Option<u64>,
    /// How often the server compares its connection count with the mean of the session servers
    /// and asks some clients to move when it holds well more, in milliseconds [default: 5000].
    #[arg(long, env = "ROSTER_BALANCE_INTERVAL_MS", value_name = "MS")]
    balance_interval_ms: Option<u64>,
}

const META_LISTEN: &str = "0.0.0.0:7100";
const META_HTTP: &str = "0.0.0.0:7180";
const DATA_LISTEN: &str = "0.0.0.0:7200";
const DATA_HTTP: &str = "0.0.0.0:7280";
const SESSION_LISTEN: &str = "0.0.0.0:7300";
const SESSION_HTTP: &str = "0.0.0.0:7380";

/// Which server runs, for its start line and logs, and how long it may take to stop.
struct Running {
    role: &'static str,
    /// `meta 1 of cluster …`, `data 2`: how its start line names it.
    who: String,
    /// From the shutdown signal to exit, at most: past it the process exits with an error, whatever
    /// it was waiting for (a peer that is gone, a task that does not end).
    stop_within: Duration,
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
    let (http, http_task) = http::serve(http, ready, admin, shutdown.clone()).await?;
    roster_common::admin::build_info(running.role);
    println!("roster {} listening: quic={quic} http={http}", running.who);
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

fn addr_or(value: Option<SocketAddr>, default: &str) -> SocketAddr {
    value.unwrap_or_else(|| default.parse().expect("literal address"))
}

pub async fn meta(mut args: MetaArgs) -> anyhow::Result<()> {
    let file: MetaArgs = read_config_file(
        args.common.config.as_deref(),
        &[
            "data-dir",
            "bootstrap",
            "join",
            "learner",
            "advertise",
            "slots",
            "replicas",
            "min-data-servers",
            "lease-timeout-ms",
            "snapshot-every",
            "keep-behind-snapshot",
            "rebalance-delay-ms",
            "admin-token-file",
            "insecure-no-auth",
        ],
    )?;
    args.common.layer(file.common);
    layer!(args, file; data_dir, bootstrap, join, advertise, slots, replicas, min_data_servers,
        lease_timeout_ms, snapshot_every, keep_behind_snapshot, rebalance_delay_ms,
        admin_token_file);
    args.learner |= file.learner;
    args.insecure_no_auth |= file.insecure_no_auth;

    let id = args.common.id()?;
    let data_dir = args
        .data_dir
        .clone()
        .context("--data-dir is required (or ROSTER_DATA_DIR)")?;
    let mut config = MetaConfig::new(id, data_dir.clone());
    config.start = match (&args.bootstrap, &args.join) {
        (Some(voters), None) => {
            let voters = parse_voters(voters).context("--bootstrap")?;
            config.admin_token = bootstrap_admin_token(&args, &data_dir, voters.len())?;
            Start::Bootstrap(voters)
        }
        (None, Some(addr)) => Start::Join {
            addr: addr.clone(),
            learner: args.learner,
        },
        (None, None) => Start::Recover,
        (Some(_), Some(_)) => bail!("--bootstrap and --join exclude each other"),
    };
    config.advertise = args.advertise;
    config.transport = args.common.transport();
    config.max_frame = args.common.max_frame.unwrap_or(DEFAULT_META_MAX_FRAME);
    if let Some(slots) = args.slots {
        config.slot_count = slots;
    }
    if let Some(replicas) = args.replicas {
        config.replicas = replicas;
    }
    if let Some(min) = args.min_data_servers {
        config.min_data_servers = min;
    }
    if let Some(ms) = args.lease_timeout_ms {
        config.lease_timeout = Duration::from_millis(ms);
        config.renew_interval = config.renew_interval.min(config.lease_timeout / 3);
    }
    if let Some(n) = args.snapshot_every {
        config.raft.snapshot_every = n;
    }
    if let Some(ms) = args.rebalance_delay_ms {
        config.rebalance_delay = Duration::from_millis(ms);
    }
    if let Some(n) = args.keep_behind_snapshot {
        config.raft.keep_behind_snapshot = n;
    }
    info!(?config, "starting meta node");
    let identity = args.common.identity()?;
    let server = MetaServer::open(config, identity)?;
    let ready = server.ready();
    let admin = server.admin();
    let listen = addr_or(args.common.listen, META_LISTEN);
    let http = addr_or(args.common.http, META_HTTP);
    let cluster = server.cluster_id().unwrap_or_else(|| "(new)".into());
    let running = Running {
        role: "meta",
        who: format!("meta {id} of cluster {cluster}"),
        stop_within: STOP_SLACK,
    };
    run_server(running, listen, http, ready, admin, |socket, shutdown| {
        server.run(socket, shutdown)
    })
    .await
}

pub async fn data(mut args: DataArgs) -> anyhow::Result<()> {
    let keys = [&MEMBER_KEYS[..], &["session-grace-ms"]].concat();
    let file: DataArgs = read_config_file(args.common.config.as_deref(), &keys)?;
    args.common.layer(file.common);
    args.member.layer(file.member);
    layer!(args, file; session_grace_ms);

    let mut config = DataConfig::new(args.common.id()?, args.member.metas()?);
    config.advertise = args.member.advertise;
    config.zone = args.member.zone.unwrap_or_default();
    config.transport = args.common.transport();
    config.max_frame = args.common.max_frame();
    if let Some(ms) = args.session_grace_ms {
        config.session_grace = Duration::from_millis(ms);
    }
    info!(?config, "starting data server");
    let id = config.id;
    let server = DataServer::new(config, args.common.identity()?)?;
    let listen = addr_or(args.common.listen, DATA_LISTEN);
    let http = addr_or(args.common.http, DATA_HTTP);
    let ready = server.ready();
    let admin = server.admin();
    let running = Running {
        role: "data",
        who: format!("data {id}"),
        stop_within: STOP_SLACK,
    };
    run_server(running, listen, http, ready, admin, |socket, shutdown| {
        server.run(socket, shutdown)
    })
    .await
}

pub async fn session(mut args: SessionArgs) -> anyhow::Result<()> {
    let keys = [
        &MEMBER_KEYS[..],
        &[
            "client-grace-ms",
            "drain-timeout-ms",
            "max-connections",
            "max-publishers-per-connection",
            "max-subscriptions-per-connection",
            "max-requests-per-connection",
            "max-publisher-bytes",
            "coalesce-ms",
            "push-stall-ms",
            "balance-interval-ms",
        ],
    ]
    .concat();
    let file: SessionArgs = read_config_file(args.common.config.as_deref(), &keys)?;
    args.common.layer(file.common);
    args.member.layer(file.member);
    layer!(args, file; client_grace_ms, drain_timeout_ms, max_connections, max_publishers_per_connection,
        max_subscriptions_per_connection, max_requests_per_connection, max_publisher_bytes, coalesce_ms,
        push_stall_ms, balance_interval_ms);

    let mut config = SessionConfig::new(args.common.id()?, args.member.metas()?);
    config.advertise = args.member.advertise;
    config.zone = args.member.zone.unwrap_or_default();
    config.client_transport = TransportSettings {
        idle_timeout: args
            .common
            .idle_timeout_ms
            .map_or(config.client_transport.idle_timeout, Duration::from_millis),
        ..args.common.transport()
    };
    config.peer_transport = args.common.transport();
    config.max_frame = args.common.max_frame();
    if let Some(ms) = args.client_grace_ms {
        config.client_grace = Duration::from_millis(ms);
    }
    if let Some(ms) = args.drain_timeout_ms {
        config.drain_timeout = Duration::from_millis(ms);
    }
    if let Some(ms) = args.coalesce_ms {
        config.coalesce_window = Duration::from_millis(ms);
    }
    if let Some(ms) = args.push_stall_ms {
        config.push_stall_timeout = Duration::from_millis(ms);
    }
    if let Some(ms) = args.balance_interval_ms {
        config.balance_interval = Duration::from_millis(ms);
    }
    config.max_connections = args.max_connections.unwrap_or(config.max_connections);
    config.max_publishers_per_connection = args
        .max_publishers_per_connection
        .unwrap_or(config.max_publishers_per_connection);
    config.max_subscriptions_per_connection = args
        .max_subscriptions_per_connection
        .unwrap_or(config.max_subscriptions_per_connection);
    config.max_requests_per_connection = args
        .max_requests_per_connection
        .unwrap_or(config.max_requests_per_connection);
    config.max_publisher_bytes = args
        .max_publisher_bytes
        .unwrap_or(config.max_publisher_bytes);
    info!(?config, "starting session server");
    let id = config.id;
    let drain_timeout = config.drain_timeout;
    let server = SessionServer::new(config, args.common.identity()?)?;
    let listen = addr_or(args.common.listen, SESSION_LISTEN);
    let http = addr_or(args.common.http, SESSION_HTTP);
    let ready = server.ready();
    let admin = server.admin();
    let running = Running {
        role: "session",
        who: format!("session {id}"),
        stop_within: drain_timeout + STOP_SLACK,
    };
    run_server(running, listen, http, ready, admin, |socket, shutdown| {
        server.run(socket, shutdown)
    })
    .await
}
