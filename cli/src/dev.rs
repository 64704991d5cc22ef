//! `roster dev`: a whole cluster on 127.0.0.1 — every server a child process of its own, as in
//! production — with its CA and a client config written where the client commands look by default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use roster_client::ClientConfig;
use roster_common::acl::{ANY_NAMESPACE, Permission, generate_token};
use roster_common::proto::{MetaRequest, MetaResponse};
use roster_common::quic::bind_udp;
use roster_common::tls::{self, CA_CERT_FILE, Pki};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::files::{
    ADMIN_TOKEN_FILE, CLIENT_CONFIG_FILE, CLUSTER_CONFIG_FILE, DEFAULT_DIR, TARGETS_FILE,
};
use crate::shutdown_on_signal;

mod resume;
use resume::{previous, wait_port_free};

/// How long the cluster may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long servers get to stop after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Arguments of `roster dev`.
#[derive(Args)]
pub struct DevArgs {
    /// Directory for the cluster CA (ca.pem), the client config (client.toml), the Prometheus
    /// targets (targets.json) and node state. Client commands run from the same working directory
    /// find the config without flags. A directory that holds a cluster `roster dev` ran before is
    /// resumed: the same certificates, tokens and meta addresses, and what the meta group stored
    /// (persistent instances, tokens); publishers of clients that were connected are gone.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Start a new, empty cluster even where DIR holds one. By default a DIR holding a cluster
    /// `roster dev` ran before is resumed with its data (persistent instances, tokens,
    /// certificates); --fresh discards all of it.
    #[arg(long)]
    fresh: bool,
    /// Meta nodes to run (a Raft group; 3 or 5 tolerate the loss of 1 or 2).
    #[arg(long, default_value_t = 1)]
    metas: usize,
    /// Data servers to run.
    #[arg(long, default_value_t = 1)]
    datas: usize,
    /// Session servers to run; client.toml lists them all.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Run the cluster without authentication (as `roster meta --insecure-no-auth`). By default
    /// the cluster checks tokens: its admin token is in DIR/admin.token and client.toml carries a
    /// token that may publish and subscribe in every namespace.
    #[arg(long)]
    insecure_no_auth: bool,
}

/// One server process of the dev cluster.
struct Server {
    role: &'static str,
    id: u64,
    child: Child,
    quic: String,
    http: String,
    /// Where a session server answers DNS.
    dns: Option<String>,
}

impl Server {
    fn name(&self) -> String {
        format!("{} {}", self.role, self.id)
    }
}

/// A cluster of `roster` server processes on 127.0.0.1, its CA and config files in `dir`.
pub struct LocalCluster {
    pub dir: PathBuf,
    servers: Vec<Server>,
    /// Started from the state a previous run left in `dir`.
    pub resumed: bool,
}

impl LocalCluster {
    /// Starts `metas` meta nodes, `datas` data servers and `sessions` session servers, writes the
    /// CA, client.toml, cluster.toml and targets.json into `dir`, and waits until every server is
    /// ready. With `auth`, the cluster checks tokens: its admin token goes to `dir/admin.token` and
    /// client.toml gets a token that may publish and subscribe everywhere. `log` is the `RUST_LOG`
    /// of the servers (`None`: inherit). Gives up on `cancel`. Unless `fresh`, a cluster started
    /// in `dir` before is resumed with its state (see [`previous`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        dir: &Path,
        metas: usize,
        datas: usize,
        sessions: usize,
        auth: bool,
        log: Option<&str>,
        cancel: &tokio_util::sync::CancellationToken,
        fresh: bool,
    ) -> anyhow::Result<LocalCluster> {
        if metas == 0 || datas == 0 || sessions == 0 {
            bail!("a cluster needs at least one meta, one data and one session server");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        let tls_dir = dir.join("tls");
        let previous = if fresh {
            None
        } else {
            previous(&dir, metas, auth).await?
        };
        let resumed = previous.is_some();
        if resumed {
            info!(dir = %dir.display(), "resuming the cluster stored here");
            // Clients read the CA beside client.toml: put it back should it be gone.
            let ca = std::fs::read_to_string(tls_dir.join(CA_CERT_FILE))
                .with_context(|| format!("cannot read {}", tls_dir.join(CA_CERT_FILE).display()))?;
            if std::fs::read_to_string(dir.join(CA_CERT_FILE))
                .ok()
                .as_ref()
                != Some(&ca)
            {
                tls::write_file(&dir.join(CA_CERT_FILE), &ca, false)?;
            }
        } else {
            let pki = Pki::generate(&[])?;
            pki.write_to(&tls_dir)?;
            tls::write_file(&dir.join(CA_CERT_FILE), &pki.ca_cert_pem, false)?;
        }
        let mut client_token = None;

        // The meta group's voters must know each other's addresses up front: reserve ports (or
        // take those the resumed cluster's Raft membership records).
        let mut voters = BTreeMap::new();
        if let Some(previous) = previous {
            voters = previous.voters;
            client_token = previous.client_token.filter(|_| auth);
        } else {
            let localhost = "127.0.0.1:0".parse().expect("literal address");
            let mut reserved = Vec::new();
            for id in 1..=metas as u64 {
                let socket = bind_udp(localhost)?;
                voters.insert(id, socket.local_addr()?.to_string());
                reserved.push(socket);
            }
        }
        let bootstrap = voters
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let meta_list = voters.values().cloned().collect::<Vec<_>>().join(",");
        let tls_arg = tls_dir.to_string_lossy().into_owned();
        let admin_token_file = dir.join(ADMIN_TOKEN_FILE);
        let auth_args = if auth {
            if !resumed {
                tls::write_file(&admin_token_file, &format!("{}\n", generate_token()), true)?;
            }
            vec![
                "--admin-token-file".to_owned(),
                admin_token_file.to_string_lossy().into_owned(),
            ]
        } else {
            let _ = std::fs::remove_file(&admin_token_file);
            vec!["--insecure-no-auth".to_owned()]
        };

        let mut cluster = LocalCluster {
            dir: dir.clone(),
            servers: Vec::new(),
            resumed,
        };
        let servers = &mut cluster.servers;
        let started = async {
            for (id, addr) in &voters {
                // A new cluster starts empty: its certificates are new, so is the cluster.
                let meta_dir = dir.join(format!("meta-{id}"));
                if !resumed && meta_dir.exists() {
                    std::fs::remove_dir_all(&meta_dir)
                        .with_context(|| format!("cannot clear {}", meta_dir.display()))?;
                }
                if resumed {
                    wait_port_free(*id, addr).await?;
                }
                let meta_dir = meta_dir.to_string_lossy().into_owned();
                let mut extra = vec![
                    "--listen",
                    addr,
                    "--data-dir",
                    &meta_dir,
                    "--bootstrap",
                    &bootstrap,
                ];
                extra.extend(auth_args.iter().map(String::as_str));
                let meta = spawn("meta", *id, &extra, &tls_arg, log).await;
                let meta = if resumed {
                    meta.with_context(|| {
                        format!("meta {id} of the cluster in {} did not start on {addr}, its address recorded in {CLUSTER_CONFIG_FILE}: if another process holds that port, free it, or pass --fresh to start a new cluster", dir.display())
                    })?
                } else {
                    meta?
                };
                servers.push(meta);
            }
            for id in 1..=datas as u64 {
                servers.push(spawn("data", id, &["--meta", &meta_list], &tls_arg, log).await?);
            }
            for id in 1..=sessions as u64 {
                let extra = [
                    "--meta",
                    &meta_list,
                    "--drain-timeout-ms",
                    "2000",
                    "--dns",
                    "127.0.0.1:0",
                ];
                servers.push(spawn("session", id, &extra, &tls_arg, log).await?);
            }
            write_files(&dir, servers, &meta_list)?;
            // A resumed cluster's client token stays in client.toml all along.
            write_client_config(&dir, servers, client_token.clone())?;
            let admin_ports: Vec<String> = servers.iter().map(|s| s.http.clone()).collect();
            tokio::select! {
                ready = wait_ready(&admin_ports) => ready?,
                _ = tokio::time::sleep(START_TIMEOUT) => bail!("the cluster did not become ready within {START_TIMEOUT:?}"),
            }
            if auth {
                let meta = crate::cluster_cmd::ClusterConfig {
                    meta: voters.values().cloned().collect(),
                    tls_dir: tls_dir.clone(),
                };
                let token = match client_token.take() {
                    Some(token) => token,
                    None => mint_client_token(&meta).await?,
                };
                write_client_config(&dir, servers, Some(token))?;
            }
            anyhow::Ok(())
        };
        let started = tokio::select! {
            started = started => started,
            _ = cancel.cancelled() => Err(anyhow::anyhow!("interrupted while starting")),
        };
        if let Err(e) = started {
            cluster.stop().await;
            return Err(e);
        }
        Ok(cluster)
    }

    /// The session servers' client addresses.
    pub fn session_addrs(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|s| s.role == "session")
            .map(|s| s.quic.clone())
            .collect()
    }

    /// Each server's name (`meta 1`, …) and process id.
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.servers
            .iter()
            .filter_map(|s| Some((s.name(), s.child.id()?)))
            .collect()
    }

    /// Resolves when the first server exits, with an error naming it.
    pub async fn first_exit(&mut self) -> anyhow::Error {
        first_exit(&mut self.servers).await
    }

    /// Stops every server (SIGTERM; sessions, then data, then meta). Returns an error naming any
    /// that did not stop cleanly.
    pub async fn stop(&mut self) -> Option<anyhow::Error> {
        stop_all(&mut self.servers).await
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let mut cluster = match LocalCluster::start(
        &args.dir,
        args.metas,
        args.datas,
        args.sessions,
        !args.insecure_no_auth,
        None,
        &shutdown,
        args.fresh,
    )
    .await
    {
        Ok(cluster) => cluster,
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(e) => return Err(e),
    };
    for s in &cluster.servers {
        let dns = s
            .dns
            .as_ref()
            .map(|d| format!(" dns={d}"))
            .unwrap_or_default();
        println!(
            "roster dev: {} quic={} http={}{dns}",
            s.name(),
            s.quic,
            s.http
        );
    }
    println!(
        "roster dev ready: clients connect to {} (config {}, CA {}); Ctrl-C stops",
        cluster.session_addrs().join(","),
        cluster.dir.join(CLIENT_CONFIG_FILE).display(),
        cluster.dir.join(CA_CERT_FILE).display()
    );
    if cluster.resumed {
        println!(
            "roster dev: resumed the cluster in {} (its persistent instances, tokens and certificates; --fresh starts a new one)",
            cluster.dir.display()
        );
    } else {
        println!(
            "roster dev: created a new cluster in {} (started again there, it resumes it)",
            cluster.dir.display()
        );
    }
    if args.insecure_no_auth {
        println!("roster dev: authentication is OFF (--insecure-no-auth)");
    } else {
        println!(
            "roster dev: authentication is on; the admin token is in {}, and client.toml holds a publish+subscribe token",
            cluster.dir.join(ADMIN_TOKEN_FILE).display()
        );
    }
    // After the ready line, which tools read the server lines up to.
    if let Some(session) = cluster.servers.iter().find(|s| s.role == "session") {
        println!("roster dev: console=http://{}/ui/", session.http);
    }
    if let Some(dns) = cluster.servers.iter().find_map(|s| s.dns.as_ref()) {
        let (host, port) = dns.rsplit_once(':').unwrap_or((dns, "53"));
        println!("roster dev: dns={dns} (try `dig @{host} -p {port} NAME.roster. SRV`)");
    }
    let failure = tokio::select! {
        _ = shutdown.cancelled() => None,
        exited = cluster.first_exit() => Some(exited),
    };
    let unclean = cluster.stop().await;
    info!("dev cluster stopped");
    match (failure, unclean) {
        (Some(e), _) => Err(e),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(()),
    }
}

/// Starts `roster ROLE --id ID` with `extra` flags on 127.0.0.1 and reads where it listens. Its
/// log lines are copied to our stderr, each prefixed with the server's name.
async fn spawn(
    role: &'static str,
    id: u64,
    extra: &[&str],
    tls_dir: &str,
    log: Option<&str>,
) -> anyhow::Result<Server> {
    let exe = std::env::current_exe().context("cannot find the roster binary")?;
    let id_arg = id.to_string();
    let mut command = Command::new(exe);
    command
        .arg(role)
        .args([
            "--id",
            &id_arg,
            "--tls-dir",
            tls_dir,
            "--http",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(log) = log {
        command.env("RUST_LOG", log);
    }
    if !extra.contains(&"--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    #[cfg(target_os = "linux")]
    unsafe {
        command.pre_exec(|| {
            // The server stops when `roster dev` dies, even by SIGKILL.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {role} {id}"))?;
    let name = format!("{role} {id}");
    let stderr = child.stderr.take().expect("piped stderr");
    let prefix = format!("[{name}] ");
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{prefix}{line}");
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let line = tokio::time::timeout(START_TIMEOUT, stdout.next_line())
        .await
        .with_context(|| format!("{name} did not say where it listens"))?
        .with_context(|| format!("cannot read from {name}"))?
        .with_context(|| format!("{name} exited during start-up (its log above says why)"))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
    };
    let (Some(quic), Some(http)) = (field("quic="), field("http=")) else {
        bail!("{name} printed an unexpected first line: {line}");
    };
    let dns = field("dns=");
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    Ok(Server {
        role,
        id,
        child,
        quic,
        http,
        dns,
    })
}

/// Asks the meta group of the cluster in `dir` for a token that may publish and subscribe in
/// every namespace.
async fn mint_client_token(meta: &crate::cluster_cmd::ClusterConfig) -> anyhow::Result<String> {
    let request = MetaRequest::CreateToken {
        namespaces: vec![ANY_NAMESPACE.to_owned()],
        allow: vec![Permission::Publish, Permission::Subscribe],
        ttl_ms: None,
        description: "client.toml of roster dev".into(),
        by: "roster dev".into(),
    };
    match crate::cluster_cmd::ask(meta, &request, Duration::from_secs(10)).await? {
        MetaResponse::TokenCreated { token, .. } => Ok(token),
        other => bail!("unexpected answer to CreateToken: {other:?}"),
    }
}

/// Writes client.toml (with `token`, if given; readable by its owner only then) into `dir`.
fn write_client_config(
    dir: &Path,
    servers: &[Server],
    token: Option<String>,
) -> anyhow::Result<()> {
    let session_addrs: Vec<String> = servers
        .iter()
        .filter(|s| s.role == "session")
        .map(|s| s.quic.clone())
        .collect();
    let mut client_config = ClientConfig::new(session_addrs, CA_CERT_FILE);
    let secret = token.is_some();
    client_config.token = token.map(Into::into);
    tls::write_file(
        &dir.join(CLIENT_CONFIG_FILE),
        &client_config.to_toml(),
        secret,
    )?;
    Ok(())
}

/// Writes cluster.toml and targets.json into `dir`.
fn write_files(dir: &Path, servers: &[Server], meta_list: &str) -> anyhow::Result<()> {
    let cluster_config = crate::cluster_cmd::ClusterConfig {
        meta: meta_list.split(',').map(str::to_owned).collect(),
        tls_dir: "tls".into(),
    };
    tls::write_file(
        &dir.join(CLUSTER_CONFIG_FILE),
        &cluster_config.to_toml(),
        false,
    )?;
    let targets: Vec<serde_json::Value> = servers
        .iter()
        .map(|s| {
            serde_json::json!({
                "targets": [s.http],
                "labels": {"role": s.role, "server_id": s.id.to_string()},
            })
        })
        .collect();
    let json = serde_json::to_string_pretty(&targets)? + "\n";
    tls::write_file(&dir.join(TARGETS_FILE), &json, false)?;
    Ok(())
}

/// Waits until every server answers 200 on `/readyz`.
async fn wait_ready(admin_ports: &[String]) -> anyhow::Result<()> {
    for port in admin_ports {
        let url = format!("http://{port}/readyz");
        loop {
            let probe = url.clone();
            let ready = tokio::task::spawn_blocking(move || {
                ureq::get(&probe)
                    .config()
                    .timeout_global(Some(Duration::from_secs(1)))
                    .build()
                    .call()
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Resolves when the first server exits, with an error naming it.
async fn first_exit(servers: &mut [Server]) -> anyhow::Error {
    if servers.is_empty() {
        return std::future::pending().await;
    }
    let futures = servers.iter_mut().map(|s| {
        let name = s.name();
        Box::pin(async move {
            let status = s.child.wait().await;
            (name, status)
        })
    });
    let ((name, status), _, _) = futures_util::future::select_all(futures).await;
    match status {
        Ok(status) => anyhow::anyhow!("{name} stopped unexpectedly ({status})"),
        Err(e) => anyhow::anyhow!("lost track of {name}: {e}"),
    }
}

/// Sends SIGTERM to every server still running — sessions first, then data, then meta — and
/// waits for them; kills any that outlast [`STOP_TIMEOUT`]. Returns an error naming the servers
/// that did not stop cleanly.
async fn stop_all(servers: &mut [Server]) -> Option<anyhow::Error> {
    let mut unclean = Vec::new();
    for role in ["session", "data", "meta"] {
        for s in servers.iter_mut().filter(|s| s.role == role) {
            if let (Ok(None), Some(pid)) = (s.child.try_wait(), s.child.id()) {
                // SAFETY: signalling a child process we spawned and have not reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        for s in servers.iter_mut().filter(|s| s.role == role) {
            match tokio::time::timeout(STOP_TIMEOUT, s.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => unclean.push(format!("{} ({status})", s.name())),
                Ok(Err(e)) => unclean.push(format!("{} ({e})", s.name())),
                Err(_) => {
                    warn!(server = s.name(), "did not stop in time; killing it");
                    let _ = s.child.kill().await;
                    unclean.push(format!("{} (killed after {STOP_TIMEOUT:?})", s.name()));
                }
            }
        }
    }
    (!unclean.is_empty())
        .then(|| anyhow::anyhow!("servers did not stop cleanly: {}", unclean.join(", ")))
}
