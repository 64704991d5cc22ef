//! The `roster` binary: every server, a one-process dev cluster, and the client commands.
//!
//! This crate only parses flags, layers configuration (file, then `ROSTER_*` environment, then
//! flags) and wires the server libraries together; the behaviour lives in those libraries.

mod acl_cmd;
mod bench;
mod client_cmd;
mod cluster_cmd;
mod dev;
mod files;
mod http;
mod server_cmd;
mod settings;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Roster: a distributed service registry.
///
/// Services publish where they run; other services subscribe and are pushed every change within
/// milliseconds. Run `roster dev` for a whole cluster on this machine, then `roster subscribe` and
/// `roster publish` in other terminals.
#[derive(Parser)]
#[command(name = "roster", version, propagate_version = true)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line. Levels come from RUST_LOG
    /// (default: info for servers, warn for client commands).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ROSTER_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a cluster CA and the node certificate every server presents (PEM files).
    Certs(server_cmd::CertsArgs),
    /// Run a meta node: cluster membership, leases and the slot table.
    Meta(server_cmd::MetaArgs),
    /// Run a data server: holds the publishers of the slots it leads.
    Data(server_cmd::DataArgs),
    /// Run a session server: where clients connect, publish and subscribe.
    Session(server_cmd::SessionArgs),
    /// Run a whole cluster in this process on 127.0.0.1, for trying Roster out.
    Dev(dev::DevArgs),
    /// Publish a service instance and keep it registered until Ctrl-C.
    Publish(client_cmd::PublishArgs),
    /// Print every snapshot of a service as one JSON object per line, until Ctrl-C.
    Subscribe(client_cmd::SubscribeArgs),
    /// List the services that have publishers, with their publisher counts and how many of them
    /// are healthy.
    Ls(client_cmd::LsArgs),
    /// Register a persistent instance: one the registry keeps until `roster deregister`.
    ///
    /// A persistent instance stands for something that cannot run a Roster client itself (a
    /// database, an appliance, a service outside the cluster). The registry's meta group stores
    /// it; it is bound to no client or connection, so it stays after this command exits and
    /// through restarts of every server, until `roster deregister SERVICE ID` removes it.
    /// Registering the same SERVICE and ID again replaces it. Subscribers see it as a publisher
    /// with `"persistent": true`, client id `~persistent` and register id ID. Prints `registered
    /// SERVICE ID` once a quorum of the meta group has it on disk.
    ///
    /// With --check the registry probes it and marks it healthy or unhealthy (see --check).
    Register(client_cmd::RegisterArgs),
    /// Remove a persistent instance registered with `roster register`.
    ///
    /// Prints `deregistered SERVICE ID`; fails (exit code 1) when SERVICE has no persistent
    /// instance ID.
    Deregister(client_cmd::DeregisterArgs),
    /// Operate the meta group: status, add-meta, remove-meta, transfer-leader.
    Cluster(cluster_cmd::ClusterArgs),
    /// Manage access: create, list and revoke tokens (`roster acl token ...`).
    Acl(acl_cmd::AclArgs),
    /// Measure a registry under the service-registry workload: registration throughput,
    /// subscriber convergence, notify latency under churn, failure detection, server memory and
    /// CPU. Prints a table and one JSON object (only the JSON with --json).
    Bench(bench::BenchArgs),
    /// Used by `roster bench`: registers instances and holds them until killed.
    #[command(hide = true)]
    BenchHolder(bench::HolderArgs),
}

impl Command {
    fn is_server(&self) -> bool {
        matches!(
            self,
            Command::Meta(_) | Command::Data(_) | Command::Session(_) | Command::Dev(_)
        )
    }
}

/// Every `roster` process allocates with mimalloc rather than the C library's allocator. Servers
/// allocate on one thread and free on another all the time (a frame decoded by a connection's
/// task, pushed by another; a rollout's bursts of registrations and pushes), which glibc serves
/// from shared bins under a lock and hands back to the system between bursts: under a rollout
/// malloc and page faults were a quarter of the session server's time and more of the SDK's in
/// `roster bench`. Built without its transparent-huge-page hint (`no_thp`), so resident memory
/// stays within a tenth of glibc's (docs/OPERATIONS.md, Session).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.command.is_server() {
        // A client command piped into `head` ends quietly when the pipe closes, as Unix tools
        // do, instead of panicking in `println!`. Servers keep ignoring SIGPIPE.
        #[cfg(unix)]
        // SAFETY: called before any other thread exists; restores the default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(
        cli.log_format,
        if cli.command.is_server() {
            // openraft narrates every step of its own life at info.
            "info,openraft=warn"
        } else {
            "warn"
        },
    );
    roster_common::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Certs(args) => server_cmd::certs(args),
            Command::Meta(args) => server_cmd::meta(args).await,
            Command::Data(args) => server_cmd::data(args).await,
            Command::Session(args) => server_cmd::session(args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Publish(args) => client_cmd::publish(args).await,
            Command::Subscribe(args) => client_cmd::subscribe(args).await,
            Command::Ls(args) => client_cmd::ls(args).await,
            Command::Register(args) => client_cmd::register(args).await,
            Command::Deregister(args) => client_cmd::deregister(args).await,
            Command::Cluster(args) => cluster_cmd::run(args).await,
            Command::Acl(args) => acl_cmd::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::BenchHolder(args) => bench::holder(args).await,
        }
    });
    // Tasks still running (a server that overran its stop deadline) get a moment, not forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // A log that cannot be written (stderr a pipe whose reader died, as when `roster dev` is
        // killed) is dropped: reporting it would panic the task that logged, and a server whose
        // signal task panics never shuts down.
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let name = wait_for_signal().await;
        // Cancel first: nothing that follows (a log line) may stand in its way.
        trigger.cancel();
        info!(signal = name, "shutting down");
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}
