//! `roster dev`: a whole cluster in this process on 127.0.0.1, with its CA and a client config
//! written where the client commands look by default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use roster_client::ClientConfig;
use roster_common::quic::bind_udp;
use roster_common::tls::{self, CA_CERT_FILE, Pki};
use roster_data::{DataConfig, DataServer};
use roster_meta::{MetaConfig, MetaServer, Start};
use roster_session::{SessionConfig, SessionServer};
use tokio::task::JoinSet;
use tracing::info;

use crate::shutdown_on_signal;

/// The client config file `roster dev` writes and client commands read by default.
pub const CLIENT_CONFIG_FILE: &str = "client.toml";
/// Where `roster dev` writes, and client commands look, by default.
pub const DEFAULT_DIR: &str = ".roster";

/// Arguments of `roster dev`.
#[derive(Args)]
pub struct DevArgs {
    /// Directory for the cluster CA (ca.pem), the client config (client.toml) and node state.
    /// Client commands run from the same working directory find the config without flags.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Meta nodes to run (a Raft group; 3 or 5 tolerate the loss of 1 or 2).
    #[arg(long, default_value_t = 1)]
    metas: usize,
    /// Data servers to run.
    #[arg(long, default_value_t = 1)]
    datas: usize,
    /// Session servers to run; client.toml lists them all.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.metas == 0 || args.datas == 0 || args.sessions == 0 {
        bail!("a cluster needs at least one meta, one data and one session server");
    }
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pki = Pki::generate(&[])?;
    pki.write_to(&dir.join("tls"))?;
    tls::write_file(&dir.join(CA_CERT_FILE), &pki.ca_cert_pem, false)?;
    let identity = pki.node_identity()?;

    let shutdown = shutdown_on_signal();
    let mut servers: JoinSet<(String, roster_common::Result<()>)> = JoinSet::new();
    let mut ready = Vec::new();
    let localhost = "127.0.0.1:0".parse().expect("literal address");

    // A dev cluster starts empty every time: the certificates above are new, so is the cluster.
    let mut meta_sockets = Vec::new();
    for id in 1..=args.metas as u64 {
        let socket = bind_udp(localhost)?;
        meta_sockets.push((id, socket.local_addr()?.to_string(), socket));
    }
    let voters: BTreeMap<u64, String> = meta_sockets
        .iter()
        .map(|(id, addr, _)| (*id, addr.clone()))
        .collect();
    let meta_addrs: Vec<String> = voters.values().cloned().collect();
    for (id, _, socket) in meta_sockets {
        let meta_dir = dir.join(format!("meta-{id}"));
        if meta_dir.exists() {
            std::fs::remove_dir_all(&meta_dir)
                .with_context(|| format!("cannot clear {}", meta_dir.display()))?;
        }
        let mut config = MetaConfig::new(id, meta_dir);
        config.start = Start::Bootstrap(voters.clone());
        let meta = MetaServer::open(config, identity.clone())?;
        let token = shutdown.clone();
        servers.spawn(async move { (format!("meta {id}"), meta.run(socket, token).await) });
    }

    for id in 1..=args.datas as u64 {
        let server = DataServer::new(DataConfig::new(id, meta_addrs.clone()), identity.clone())?;
        ready.push(server.ready());
        let socket = bind_udp(localhost)?;
        let token = shutdown.clone();
        servers.spawn(async move { (format!("data {id}"), server.run(socket, token).await) });
    }
    let mut session_addrs = Vec::new();
    for id in 1..=args.sessions as u64 {
        let server =
            SessionServer::new(SessionConfig::new(id, meta_addrs.clone()), identity.clone())?;
        ready.push(server.ready());
        let socket = bind_udp(localhost)?;
        session_addrs.push(socket.local_addr()?.to_string());
        let token = shutdown.clone();
        servers.spawn(async move { (format!("session {id}"), server.run(socket, token).await) });
    }

    let client_config = ClientConfig::new(session_addrs.clone(), CA_CERT_FILE);
    let config_path = dir.join(CLIENT_CONFIG_FILE);
    tls::write_file(&config_path, &client_config.to_toml(), false)?;
    let cluster_config = crate::cluster_cmd::ClusterConfig {
        meta: meta_addrs.clone(),
        tls_dir: "tls".into(),
    };
    tls::write_file(
        &dir.join(crate::cluster_cmd::CLUSTER_CONFIG_FILE),
        &cluster_config.to_toml(),
        false,
    )?;

    let all_ready = async {
        for mut rx in ready {
            let _ = rx.wait_for(|r| *r).await;
        }
    };
    tokio::select! {
        _ = all_ready => {}
        Some(done) = servers.join_next() => {
            let (name, result) = done?;
            result.with_context(|| format!("{name} failed to start"))?;
            bail!("{name} stopped during start-up");
        }
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => bail!("the dev cluster did not become ready within 30 s"),
    }
    if !shutdown.is_cancelled() {
        println!(
            "roster dev ready: clients connect to {} (config {}, CA {}); Ctrl-C stops",
            session_addrs.join(","),
            config_path.display(),
            dir.join(CA_CERT_FILE).display()
        );
    }

    let mut failure = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(done) = servers.join_next() => {
            let (name, result) = done?;
            failure = Some(match result {
                Ok(()) => anyhow::anyhow!("{name} stopped unexpectedly"),
                Err(e) => anyhow::Error::new(e).context(format!("{name} failed")),
            });
            shutdown.cancel();
        }
    }
    while let Some(done) = servers.join_next().await {
        let (name, result) = done?;
        if let Err(e) = result {
            failure.get_or_insert(anyhow::Error::new(e).context(format!("{name} failed")));
        }
    }
    info!("dev cluster stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
