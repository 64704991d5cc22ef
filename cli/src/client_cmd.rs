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

use crate::files::{CLIENT_CONFIG_FILE, DEFAULT_DIR};
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
    /// The token to present, overriding the config file's `token` / `token-file`.
    #[arg(
        long,
        env = "ROSTER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

impl Connection {
    fn config(&self) -> anyhow::Result<ClientConfig> {
        let mut config = self.config_file()?;
        if let Some(token) = &self.token {
            config.token = Some(token.trim().into());
            config.token_file = None;
        }
        Ok(config)
    }

    fn config_file(&self) -> anyhow::Result<ClientConfig> {
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
    /// The instance's register id, e.g. its pod name (1 to 256 bytes) [default: one the client
    /// picks, p1].
    #[arg(long, value_name = "ID")]
    register_id: Option<String>,
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
    let mut publisher = client.publisher(&args.service).attributes(attributes);
    if let Some(id) = args.register_id {
        publisher = publisher.register_id(id);
    }
    let publication = publisher.publish(data).await?;
    let session = match (client.session_id(), client.session_addr()) {
        (Some(id), Some(addr)) => format!("session {id} at {addr}"),
        _ => "no session yet".to_owned(),
    };
    eprintln!(
        "published {} [{}] through {session}{}; Ctrl-C unpublishes",
        publication.service(),
        args.data.join(" "),
        if publication.is_durable() {
            ""
        } else {
            " (not yet durable: held until the registry is reachable)"
        }
    );
    // The client moves to another session server by itself if this one goes away.
    shutdown.cancelled().await;
    publication.unpublish().await.context("unpublish failed")?;
    client.close().await;
    eprintln!("unpublished");
    Ok(())
}

/// Arguments of `roster subscribe`.
#[derive(Args, Debug)]
pub struct SubscribeArgs {
    #[command(flatten)]
    connection: Connection,
    /// Print one JSON object per change of one publisher (`added`, `removed`, `changed`) after the
    /// snapshots, instead of only snapshots.
    #[arg(long)]
    events: bool,
    /// The service: a bare name means default/DEFAULT/NAME; or NAMESPACE/GROUP/NAME.
    service: String,
}

/// One publisher as JSON. Data that is UTF-8 prints as a string, anything else as
/// `{"base64": "..."}`.
fn publisher_json(p: &roster_client::PublisherView) -> Value {
    let data: Vec<Value> = p
        .data
        .iter()
        .map(|d| match std::str::from_utf8(d) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(d) }),
        })
        .collect();
    json!({
        "client_id": p.client_id,
        "register_id": p.register_id,
        "data": data,
        "attributes": p.attributes,
        "client_version": p.client_version,
    })
}

/// One snapshot as a JSON line.
pub fn snapshot_json(snapshot: &Snapshot) -> Value {
    let publishers: Vec<Value> = snapshot.publishers.iter().map(publisher_json).collect();
    json!({
        "service": snapshot.service.as_str(),
        "version": snapshot.version,
        "publishers": publishers,
    })
}

pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let mut config = args.connection.config()?;
    // Show what the registry says, an empty service included.
    config.refuse_empty = false;
    let client = Client::connect(config)
        .await
        .context("cannot connect to a session server")?;
    let subscription = client.subscribe(&args.service).await?;
    let mut previous: Option<Snapshot> = None;
    let mut stream = subscription;
    let mut stdout = std::io::stdout().lock();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = stream.next() => match next {
                Some(snapshot) => {
                    serde_json::to_writer(&mut stdout, &snapshot_json(&snapshot))?;
                    writeln!(stdout)?;
                    if args.events {
                        let events = match &previous {
                            Some(previous) => roster_client::diff(previous, &snapshot),
                            None => snapshot.publishers.iter_shared().cloned().map(roster_client::Event::Added).collect(),
                        };
                        for event in events {
                            serde_json::to_writer(&mut stdout, &event_json(&snapshot, &event))?;
                            writeln!(stdout)?;
                        }
                        previous = Some(snapshot);
                    }
                    stdout.flush()?;
                }
                None => bail!("the client closed"),
            },
        }
    }
    drop(stdout);
    drop(stream);
    client.close().await;
    Ok(())
}

/// One publisher change as a JSON line: `{"event": "added"|"removed"|"changed", "service", "version",
/// "publisher": {...}}` (`changed` also carries `"old"`).
fn event_json(snapshot: &Snapshot, event: &roster_client::Event) -> Value {
    let one = publisher_json;
    let (kind, publisher, old) = match event {
        roster_client::Event::Added(p) => ("added", one(p), None),
        roster_client::Event::Removed(p) => ("removed", one(p), None),
        roster_client::Event::Changed { old, new } => ("changed", one(new), Some(one(old))),
    };
    let mut value = json!({
        "event": kind,
        "service": snapshot.service.as_str(),
        "version": snapshot.version,
        "publisher": publisher,
    });
    if let Some(old) = old {
        value["old"] = old;
    }
    value
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
