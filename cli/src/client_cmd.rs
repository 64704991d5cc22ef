//! `roster publish`, `roster subscribe`, `roster ls`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use roster_client::{Client, ClientConfig, Snapshot};
use serde_json::{Value, json};

use crate::dev::{CLIENT_CONFIG_FILE, DEFAULT_DIR};
use crate::shutdown_on_signal;

/// How a client command finds the registry.
#[derive(Args, Debug)]
pub struct Connection {
    /// Client config file [default: ./.roster/client.toml, written by `roster dev`].
    #[arg(
        long,
        env = "ROSTER_CLIENT_CONFIG",
        value_name = "FILE",
        conflicts_with = "session"
    )]
    config: Option<PathBuf>,
    /// Session server addresses, comma-separated, instead of a config file (needs --ca).
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        requires = "ca"
    )]
    session: Option<Vec<String>>,
    /// The cluster CA certificate, with --session.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

impl Connection {
    fn config(&self) -> anyhow::Result<ClientConfig> {
        if let (Some(sessions), Some(ca)) = (&self.session, &self.ca) {
            return Ok(ClientConfig::new(sessions.clone(), ca.clone()));
        }
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR).join(CLIENT_CONFIG_FILE));
        if !path.exists() {
            bail!(
                "no client config at {}: start `roster dev` in this directory, or pass --config FILE or --session ADDR --ca FILE",
                path.display()
            );
        }
        Ok(ClientConfig::load(&path)?)
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        let config = self.config()?;
        let sessions = config.sessions.join(",");
        Client::connect(config)
            .await
            .with_context(|| format!("cannot connect to a session server ({sessions})"))
    }
}

/// Arguments of `roster publish`.
#[derive(Args, Debug)]
pub struct PublishArgs {
    #[command(flatten)]
    connection: Connection,
    /// Attribute KEY=VALUE published with the instance (repeatable), e.g. zone=eu-1.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    attributes: Vec<(String, String)>,
    /// The service: a bare name means default/DEFAULT/NAME; or NAMESPACE/GROUP/NAME.
    service: String,
    /// What subscribers receive, typically HOST:PORT; several values make one instance.
    #[arg(required = true)]
    data: Vec<String>,
}

fn parse_attr(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let client = args.connection.connect().await?;
    let data: Vec<Bytes> = args.data.iter().map(|d| Bytes::from(d.clone())).collect();
    let attributes: BTreeMap<String, String> = args.attributes.into_iter().collect();
    let publication = client.publish_with(&args.service, data, attributes).await?;
    eprintln!(
        "published {} [{}] through session {} at {}{}; Ctrl-C unpublishes",
        publication.service(),
        args.data.join(" "),
        client.session_id(),
        client.session_addr(),
        if publication.is_durable() {
            ""
        } else {
            " (held by the session until the data tier is reachable)"
        }
    );
    tokio::select! {
        _ = shutdown.cancelled() => {
            publication.unpublish().await.context("unpublish failed")?;
            client.close().await;
            eprintln!("unpublished");
            Ok(())
        }
        reason = client.closed() => bail!("lost the session server: {reason}"),
    }
}

/// Arguments of `roster subscribe`.
#[derive(Args, Debug)]
pub struct SubscribeArgs {
    #[command(flatten)]
    connection: Connection,
    /// The service: a bare name means default/DEFAULT/NAME; or NAMESPACE/GROUP/NAME.
    service: String,
}

/// One snapshot as a JSON line. Data that is UTF-8 prints as a string, anything else as
/// `{"base64": "..."}`.
pub fn snapshot_json(snapshot: &Snapshot) -> Value {
    let publishers: Vec<Value> = snapshot
        .publishers
        .iter()
        .map(|p| {
            let data: Vec<Value> = p
                .data
                .iter()
                .map(|d| match std::str::from_utf8(d) {
                    Ok(text) => Value::String(text.to_owned()),
                    Err(_) => {
                        json!({ "base64": base64::engine::general_purpose::STANDARD.encode(d) })
                    }
                })
                .collect();
            json!({
                "client_id": p.client_id,
                "register_id": p.register_id,
                "data": data,
                "attributes": p.attributes,
                "client_version": p.client_version,
            })
        })
        .collect();
    json!({
        "service": snapshot.service.as_str(),
        "version": snapshot.version,
        "publishers": publishers,
    })
}

pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let client = args.connection.connect().await?;
    let mut subscription = client.subscribe(&args.service).await?;
    let mut stdout = std::io::stdout().lock();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = subscription.next() => match next {
                Some(snapshot) => {
                    serde_json::to_writer(&mut stdout, &snapshot_json(&snapshot))?;
                    writeln!(stdout)?;
                    stdout.flush()?;
                }
                None => bail!("lost the session server: {}", client.closed().await),
            },
        }
    }
    drop(stdout);
    drop(subscription);
    client.close().await;
    Ok(())
}

/// Arguments of `roster ls`.
#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let client = args.connection.connect().await?;
    let services = client.list_services().await?;
    if args.json {
        let rows: Vec<Value> = services
            .iter()
            .map(|s| json!({"service": s.service.as_str(), "publishers": s.publishers, "version": s.version}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let width = services
            .iter()
            .map(|s| s.service.as_str().len())
            .max()
            .unwrap_or(0)
            .max(7);
        println!("{:<width$}  PUBLISHERS", "SERVICE");
        for s in &services {
            println!("{:<width$}  {}", s.service.as_str(), s.publishers);
        }
    }
    client.close().await;
    Ok(())
}
