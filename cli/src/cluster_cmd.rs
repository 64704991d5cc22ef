//! `roster cluster status|add-meta|remove-meta|transfer-leader`: operating the meta group.
//!
//! These speak the peer protocol to any meta node, with mutual TLS: they need the cluster's node
//! certificate (`--tls-dir`). A follower passes each request to the leader.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use roster_common::proto::{ClusterStatus, MetaRequest, MetaResponse};
use roster_common::tls::NodeIdentity;
use roster_common::{Error, quic, rpc};
use serde::{Deserialize, Serialize};

use crate::files::{CLUSTER_CONFIG_FILE, DEFAULT_DIR};

/// Where the meta nodes are and the certificates to talk to them with.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClusterConfig {
    /// Meta node addresses; tried in order.
    pub meta: Vec<String>,
    /// Directory with ca.pem, node.pem and node-key.pem; relative to the config file.
    pub tls_dir: PathBuf,
}

impl ClusterConfig {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a cluster config always serializes")
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut config: ClusterConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        if config.tls_dir.is_relative()
            && let Some(dir) = path.parent()
        {
            config.tls_dir = dir.join(&config.tls_dir);
        }
        Ok(config)
    }
}

/// Which meta group to ask and how: shared by `roster cluster` and `roster acl`.
#[derive(Args, Debug)]
pub struct MetaTarget {
    /// Cluster config file (`meta = [...]`, `tls-dir = "..."`) [default: ./.roster/cluster.toml,
    /// written by `roster dev`].
    #[arg(
        long,
        global = true,
        env = "ROSTER_CLUSTER_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
    /// Meta node addresses, comma-separated, instead of a config file (needs --tls-dir).
    #[arg(
        long,
        global = true,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ','
    )]
    meta: Option<Vec<String>>,
    /// Directory with the cluster's node certificate, with --meta.
    #[arg(long, global = true, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Arguments shared by every `roster cluster` command.
#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    target: MetaTarget,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// The meta group: leader, term, voters and learners with their replication lag, the lease
    /// of every data and session server, the slot table epoch.
    Status {
        /// Ask the node itself (its own, possibly stale, view) instead of the leader.
        #[arg(long)]
        local: bool,
    },
    /// Add the meta node at ADDR (started with --join): it joins as a learner and becomes a voter
    /// once it has caught up.
    AddMeta {
        addr: String,
        /// Keep it a non-voting learner (a read replica).
        #[arg(long)]
        learner: bool,
    },
    /// Remove meta node ID from the group.
    RemoveMeta { id: u64 },
    /// Hand leadership to meta node ID.
    TransferLeader { id: u64 },
}

impl MetaTarget {
    pub fn config(&self) -> anyhow::Result<ClusterConfig> {
        match (&self.meta, &self.tls_dir) {
            (Some(meta), Some(tls_dir)) => Ok(ClusterConfig {
                meta: meta.clone(),
                tls_dir: tls_dir.clone(),
            }),
            (Some(_), None) => bail!("--meta needs --tls-dir"),
            _ => {
                let path = self
                    .config
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR).join(CLUSTER_CONFIG_FILE));
                if !path.exists() {
                    bail!(
                        "no cluster config at {}: start `roster dev` in this directory, or pass --config FILE or --meta ADDR --tls-dir DIR",
                        path.display()
                    );
                }
                let mut config = ClusterConfig::load(&path)?;
                if let Some(dir) = &self.tls_dir {
                    config.tls_dir = dir.clone();
                }
                Ok(config)
            }
        }
    }
}

/// Sends `request` to the first meta node that answers.
pub async fn ask(
    config: &ClusterConfig,
    request: &MetaRequest,
    timeout: Duration,
) -> anyhow::Result<MetaResponse> {
    let identity = NodeIdentity::load(&config.tls_dir)?;
    let tls = roster_common::tls::peer_client(&identity, roster_common::proto::ALPN_PEER)?;
    let quic_config = quic::client_config(tls, &quic::TransportSettings::default(), false)?;
    let mut last: Option<Error> = None;
    for addr in &config.meta {
        let attempt = async {
            let endpoint = quic::client_endpoint(quic::resolve(addr).await?)?;
            let conn =
                quic::connect(&endpoint, &quic_config, addr, None, Duration::from_secs(3)).await?;
            let answer =
                rpc::call(&conn, request, roster_meta::DEFAULT_META_MAX_FRAME, timeout).await;
            conn.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            answer
        };
        match attempt.await {
            Ok(answer) => return Ok(answer),
            // Another node may do better: this one is unreachable, or sees no leader right now.
            Err(e) if e.is_retryable() => last = Some(e),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("meta node {addr}"))),
        }
    }
    match last {
        Some(e) => Err(anyhow::Error::new(e).context("no meta node answered")),
        None => bail!("the cluster config names no meta node"),
    }
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let config = args.target.config()?;
    let json = args.target.json;
    match &args.command {
        ClusterCommand::Status { local } => {
            let answer = ask(
                &config,
                &MetaRequest::Status { local: *local },
                Duration::from_secs(5),
            )
            .await?;
            let MetaResponse::Status(status) = answer else {
                bail!("unexpected answer: {answer:?}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        ClusterCommand::AddMeta { addr, learner } => {
            let request = MetaRequest::AddMeta {
                addr: addr.clone(),
                learner: *learner,
            };
            ask(&config, &request, Duration::from_secs(150)).await?;
            done(
                json,
                &format!(
                    "meta node at {addr} added as a {}",
                    if *learner { "learner" } else { "voter" }
                ),
            );
        }
        ClusterCommand::RemoveMeta { id } => {
            ask(
                &config,
                &MetaRequest::RemoveMeta { id: *id },
                Duration::from_secs(15),
            )
            .await?;
            done(json, &format!("meta node {id} removed"));
        }
        ClusterCommand::TransferLeader { id } => {
            ask(
                &config,
                &MetaRequest::TransferLeader { id: *id },
                Duration::from_secs(15),
            )
            .await?;
            done(json, &format!("meta node {id} leads"));
        }
    }
    Ok(())
}

pub fn done(json: bool, message: &str) {
    if json {
        println!("{}", serde_json::json!({ "ok": true, "message": message }));
    } else {
        println!("{message}");
    }
}

fn print_status(status: &ClusterStatus) {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "cluster {}  leader {}  term {}  table epoch {}  self-preservation {}",
        status.cluster_id,
        opt(status.leader),
        status.term,
        status.table_epoch,
        if status.self_preservation {
            "ON"
        } else {
            "off"
        }
    );
    if !status.from_leader {
        println!(
            "(as meta node {} sees it, not confirmed by the leader)",
            status.answered_by
        );
    }
    println!(
        "log of node {}: last {}  applied {}  snapshot {}  purged {}",
        status.answered_by,
        opt(status.last_log_index),
        opt(status.last_applied),
        opt(status.snapshot_index),
        opt(status.purged_index)
    );
    println!();
    println!(
        "{:<6} {:<24} {:<8} {:>8} {:>6}",
        "META", "ADDR", "ROLE", "MATCHED", "LAG"
    );
    for node in &status.nodes {
        let role = if Some(node.id) == status.leader {
            "leader"
        } else if node.voter {
            "voter"
        } else {
            "learner"
        };
        println!(
            "{:<6} {:<24} {:<8} {:>8} {:>6}",
            node.id,
            node.addr,
            role,
            opt(node.matched_index),
            opt(node.lag)
        );
    }
    if !status.leases.is_empty() {
        println!();
        println!("{:<8} {:<6} {:<24} {:>8}", "MEMBER", "ID", "ADDR", "LEASE");
        for lease in &status.leases {
            println!(
                "{:<8} {:<6} {:<24} {:>7.1}s",
                lease.role.to_string(),
                lease.id,
                lease.addr,
                lease.remaining_ms as f64 / 1000.0
            );
        }
    }
}
