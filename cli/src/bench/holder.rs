//! `roster bench-holder` (hidden): a separate process that registers instances and holds them
//! until it is killed, for the failure phase of `roster bench`.

use std::sync::Arc;

use anyhow::Context;
#[cfg(not(feature = "peers"))]
use anyhow::bail;
use clap::Args;
use futures_util::StreamExt as _;

use super::{Conn, DEFAULT_TTL, TargetKind, roster};
#[cfg(feature = "peers")]
use super::{endpoint, etcd, zookeeper};

/// Arguments of the hidden `roster bench-holder`: registers instances and holds them until killed.
#[derive(Args)]
pub struct HolderArgs {
    #[arg(long, value_enum, default_value = "roster")]
    target: TargetKind,
    /// Client config of the Roster cluster.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// The etcd or ZooKeeper server's client address.
    #[arg(long)]
    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    endpoint: Option<String>,
    /// The etcd lease TTL or ZooKeeper session timeout, in seconds.
    #[arg(long, default_value_t = DEFAULT_TTL)]
    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    ttl: u64,
    #[arg(long)]
    service: String,
    #[arg(long)]
    count: usize,
}

pub async fn holder(args: HolderArgs) -> anyhow::Result<()> {
    let conn: Arc<dyn Conn> = match args.target {
        TargetKind::Roster => {
            let config = args.config.context("--config is required")?;
            roster::connect(&config).await?
        }
        #[cfg(feature = "peers")]
        TargetKind::Etcd => {
            let endpoint = endpoint(args.target, args.endpoint.as_deref());
            etcd::connect(endpoint, args.ttl).await?
        }
        #[cfg(feature = "peers")]
        TargetKind::Zookeeper => {
            let endpoint = endpoint(args.target, args.endpoint.as_deref());
            zookeeper::connect(endpoint, args.ttl).await?
        }
        #[cfg(not(feature = "peers"))]
        other => bail!("--target {other:?} is not built in"),
    };
    let mut registering = futures_util::stream::iter(0..args.count)
        .map(|j| {
            let conn = conn.clone();
            let service = args.service.clone();
            async move { conn.register(&service, &format!("held{j}")).await }
        })
        .buffer_unordered(32);
    while let Some(result) = futures_util::StreamExt::next(&mut registering).await {
        result?;
    }
    println!("held");
    // Held until killed.
    std::future::pending::<()>().await;
    Ok(())
}
