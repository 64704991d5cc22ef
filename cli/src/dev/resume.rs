//! Resuming the cluster a previous `roster dev` left in its directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use roster_client::ClientConfig;
use roster_common::tls::{CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
use tracing::info;

use crate::files::{ADMIN_TOKEN_FILE, CLIENT_CONFIG_FILE, CLUSTER_CONFIG_FILE};

/// What a directory holds of a cluster started there before, to resume it.
pub(super) struct Previous {
    /// Meta node ids and addresses, as cluster.toml lists them (ids from 1).
    pub(super) voters: BTreeMap<u64, String>,
    /// The client token of client.toml, if any.
    pub(super) client_token: Option<String>,
}

/// How long a resumed meta node's data may stay locked by the previous run's server, which may
/// still be stopping (a `roster dev` killed with SIGKILL leaves its servers to stop on their own).
const PREVIOUS_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The cluster a previous `roster dev` left in `dir`, if any: its cluster.toml, certificates and
/// the state in every meta node's data directory. Refuses one that cannot be started as asked
/// (`metas`, `auth`) or that lacks some of its parts, saying how to proceed.
pub(super) async fn previous(
    dir: &Path,
    metas: usize,
    auth: bool,
) -> anyhow::Result<Option<Previous>> {
    let where_ = dir.display();
    let cluster_file = dir.join(CLUSTER_CONFIG_FILE);
    if !cluster_file.exists() {
        return Ok(None);
    }
    let config = crate::cluster_cmd::ClusterConfig::load(&cluster_file).with_context(|| {
        format!("{where_} holds a cluster whose {CLUSTER_CONFIG_FILE} cannot be read; pass --fresh to discard it")
    })?;
    let voters: BTreeMap<u64, String> = (1..).zip(config.meta).collect();
    let mut without_state = Vec::new();
    for id in voters.keys() {
        if !meta_holds_state(&dir.join(format!("meta-{id}"))).await? {
            without_state.push(format!("meta-{id}"));
        }
    }
    if without_state.len() == voters.len() {
        // A start that never got as far as creating the cluster: nothing to keep.
        return Ok(None);
    }
    if !without_state.is_empty() {
        bail!(
            "{where_} holds a cluster of {} meta node(s) but {} holds no state; pass --fresh to discard it",
            voters.len(),
            without_state.join(", ")
        );
    }
    let tls_dir = dir.join("tls");
    let missing: Vec<&str> = [CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE]
        .into_iter()
        .filter(|file| !tls_dir.join(file).exists())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{where_} holds a cluster whose certificates are gone (tls/{} missing); pass --fresh to discard it",
            missing.join(", tls/")
        );
    }
    if voters.len() != metas {
        bail!(
            "{where_} holds a cluster of {} meta node(s); start it with --metas {}, or pass --fresh to discard it",
            voters.len(),
            voters.len()
        );
    }
    let had_auth = dir.join(ADMIN_TOKEN_FILE).exists();
    if had_auth != auth {
        bail!(
            "{where_} holds a cluster {} authentication; start it {}, or pass --fresh to discard it",
            if had_auth { "with" } else { "without" },
            if had_auth {
                "without --insecure-no-auth"
            } else {
                "with --insecure-no-auth"
            }
        );
    }
    let client_token = ClientConfig::load(&dir.join(CLIENT_CONFIG_FILE))
        .ok()
        .and_then(|c| c.token)
        .map(|t| t.expose().to_owned());
    Ok(Some(Previous {
        voters,
        client_token,
    }))
}

/// Whether the meta data directory `dir` holds a node's state, waiting (up to
/// [`PREVIOUS_STOP_TIMEOUT`]) while the previous run's meta node still has it open.
async fn meta_holds_state(dir: &Path) -> anyhow::Result<bool> {
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        let error = match roster_meta::holds_state(dir) {
            Ok(holds) => return Ok(holds),
            Err(e) => e,
        };
        if !error.to_string().contains("already open") {
            return Err(error.into());
        }
        if started.elapsed() >= PREVIOUS_STOP_TIMEOUT {
            bail!(
                "{} is still in use after {PREVIOUS_STOP_TIMEOUT:?}: is another roster dev running on this directory?",
                dir.display()
            );
        }
        if !said {
            info!(dir = %dir.display(), "waiting for the previous run's meta node to stop");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a resumed meta node's address may stay taken, by the previous run's meta node still
/// stopping, before starting it is given up.
const PORT_FREE_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits (up to [`PORT_FREE_TIMEOUT`]) until the UDP address `addr` that the resumed meta node
/// `id` must listen on is free; an error saying how to proceed when it stays taken.
pub(super) async fn wait_port_free(id: u64, addr: &str) -> anyhow::Result<()> {
    let socket_addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("meta {id}'s address {addr:?} in {CLUSTER_CONFIG_FILE}"))?;
    let started = tokio::time::Instant::now();
    loop {
        let error = match std::net::UdpSocket::bind(socket_addr) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if error.kind() != std::io::ErrorKind::AddrInUse || started.elapsed() >= PORT_FREE_TIMEOUT {
            bail!(
                "meta {id} must listen on {addr}, the address the cluster's Raft membership (and {CLUSTER_CONFIG_FILE}) records for it, but it cannot be bound ({error}): free that port (is another roster dev running?), or pass --fresh to start a new cluster"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
