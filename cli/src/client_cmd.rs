//! `roster publish`, `roster subscribe`, `roster ls`, `roster register`, `roster deregister`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use roster_client::{
    CheckSpec, Client, ClientConfig, Error, ServiceId, Snapshot, SubscribeOptions,
};
use roster_common::health::MAX_THRESHOLD;
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
    #[command(flatten)]
    check: CheckArgs,
    /// The service: a bare name means default/DEFAULT/NAME; or NAMESPACE/GROUP/NAME.
    service: String,
    /// What subscribers receive, typically HOST:PORT; several values make one instance.
    #[arg(required = true)]
    data: Vec<String>,
}

/// The health check of `roster publish` and `roster register`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Have the registry check the instance: `tcp` connects to the first DATA item (which must
    /// be HOST:PORT), `tcp://HOST:PORT` connects to that address, `http://HOST:PORT/PATH` GETs
    /// it and counts a 2xx or 3xx status as a success. The data server leading the instance's
    /// slot probes it every --interval. The instance starts healthy and becomes unhealthy only
    /// after --fall failed probes in a row, healthy again after --rise good ones; an unhealthy
    /// instance is marked (subscribers see `"healthy": false`), not removed, and
    /// `roster subscribe --healthy-only` leaves it out. [default: no check]
    #[arg(long, value_name = "TARGET")]
    check: Option<String>,
    /// Time between two probes, e.g. 500ms, 5s, 1m (100ms to 1h) [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "check")]
    interval: Option<Duration>,
    /// A probe that has not succeeded within this long has failed (at least 10ms, at most the
    /// interval) [default: 1s, or the interval if that is shorter].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "check")]
    timeout: Option<Duration>,
    /// Good probes in a row that make an unhealthy instance healthy again (1 to 100) [default:
    /// 2].
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_THRESHOLD)),
        requires = "check"
    )]
    rise: Option<u32>,
    /// Failed probes in a row that make a healthy instance unhealthy (1 to 100) [default: 3].
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_THRESHOLD)),
        requires = "check"
    )]
    fall: Option<u32>,
}

impl CheckArgs {
    /// The check asked for, if any, refused here with the server's own words when it is bad
    /// (so a typo costs no round trip, and no cluster is needed to find it).
    fn spec(&self, data: &[Bytes]) -> anyhow::Result<Option<CheckSpec>> {
        let Some(target) = &self.check else {
            return Ok(None);
        };
        let mut spec = CheckSpec::new(target.as_str());
        if let Some(interval) = self.interval {
            spec.interval_ms = millis(interval);
        }
        spec.timeout_ms = match self.timeout {
            Some(timeout) => millis(timeout),
            // A short interval alone should not be refused for the default timeout.
            None => spec.timeout_ms.min(spec.interval_ms),
        };
        if let Some(rise) = self.rise {
            spec.rise = rise;
        }
        if let Some(fall) = self.fall {
            spec.fall = fall;
        }
        spec.validate(data)?;
        Ok(Some(spec))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A duration like `500ms`, `5s`, `2m`, `1h` or `1d`: a whole number and a unit.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 2m or 1h"))?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: the unit is one of ms, s, m, h, d")),
    };
    number
        .checked_mul(millis)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

fn parse_attr(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let data: Vec<Bytes> = args.data.iter().map(|d| Bytes::from(d.clone())).collect();
    let check = args.check.spec(&data)?;
    let client = args.connection.connect().await?;
    let attributes: BTreeMap<String, String> = args.attributes.into_iter().collect();
    let mut publisher = client.publisher(&args.service).attributes(attributes);
    if let Some(id) = args.register_id {
        publisher = publisher.register_id(id);
    }
    if let Some(check) = check {
        publisher = publisher.check(check);
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
    /// Show only publishers that are healthy or not checked — unless more than the session
    /// server's protection threshold (half, by default) of them are unhealthy: then all are
    /// shown, the unhealthy ones with `"healthy": false`, so that a checker cut off from the
    /// network cannot empty a service.
    #[arg(long)]
    healthy_only: bool,
    /// The service: a bare name means default/DEFAULT/NAME; or NAMESPACE/GROUP/NAME.
    service: String,
}

/// One publisher as JSON. Data that is UTF-8 prints as a string, anything else as
/// `{"base64": "..."}`. `persistent` is always there; a checked publisher also has `healthy` and
/// `checked_ms` (when the probe that settled its verdict finished; 0 before the first), and
/// `failure` when that probe failed.
fn publisher_json(p: &roster_client::PublisherView) -> Value {
    let data: Vec<Value> = p
        .data
        .iter()
        .map(|d| match std::str::from_utf8(d) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(d) }),
        })
        .collect();
    let mut value = json!({
        "client_id": p.client_id,
        "register_id": p.register_id,
        "data": data,
        "attributes": p.attributes,
        "client_version": p.client_version,
        "persistent": p.persistent,
    });
    if let Some(health) = &p.health {
        value["healthy"] = json!(health.healthy);
        value["checked_ms"] = json!(health.checked_ms);
        if let Some(failure) = &health.failure {
            value["failure"] = json!(failure);
        }
    }
    value
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
    let options = SubscribeOptions {
        healthy_only: args.healthy_only,
    };
    let subscription = client.subscribe_with(&args.service, options).await?;
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
        // `healthy` is null where no publisher of the service is checked.
        let rows: Vec<Value> = services
            .iter()
            .map(|s| {
                json!({
                    "service": s.service.as_str(),
                    "publishers": s.publishers,
                    "healthy": s.healthy,
                    "version": s.version,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let width = services
            .iter()
            .map(|s| s.service.as_str().len())
            .max()
            .unwrap_or(0)
            .max(7);
        println!("{:<width$}  PUBLISHERS  HEALTHY", "SERVICE");
        for s in &services {
            println!(
                "{:<width$}  {:<10}  {}",
                s.service.as_str(),
                s.publishers,
                healthy_column(s.healthy, s.publishers)
            );
        }
    }
    client.close().await;
    Ok(())
}

/// `8/10`: healthy publishers of all; `-` where none is checked.
fn healthy_column(healthy: Option<u64>, publishers: u64) -> String {
    match healthy {
        Some(healthy) => format!("{healthy}/{publishers}"),
        None => "-".to_owned(),
    }
}

/// Arguments of `roster register`.
#[derive(Args, Debug)]
pub struct RegisterArgs {
    #[command(flatten)]
    connection: Connection,
    /// The instance's id within the service (1 to 256 bytes). Registering an id that is already
    /// registered replaces that instance. [default: the first DATA item]
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Attribute KEY=VALUE registered with the instance (repeatable), e.g. zone=eu-1.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    attributes: Vec<(String, String)>,
    #[command(flatten)]
    check: CheckArgs,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// The service: a bare name means default/DEFAULT/NAME; or NAMESPACE/GROUP/NAME.
    service: String,
    /// What subscribers receive, typically HOST:PORT; several values make one instance.
    #[arg(required = true)]
    data: Vec<String>,
}

pub async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let service: ServiceId = args.service.parse()?;
    let id = args.id.clone().unwrap_or_else(|| args.data[0].clone());
    let data: Vec<Bytes> = args.data.iter().map(|d| Bytes::from(d.clone())).collect();
    let check = args.check.spec(&data)?;
    let client = args.connection.connect().await?;
    let mut registration = client
        .register_persistent(service.as_str(), id.as_str(), data)
        .attributes(args.attributes.into_iter().collect());
    if let Some(check) = check {
        registration = registration.check(check);
    }
    let result = registration.await;
    client.close().await;
    result.with_context(|| format!("cannot register {id} in {service}"))?;
    print_done("registered", &service, &id, args.json)
}

/// Arguments of `roster deregister`.
#[derive(Args, Debug)]
pub struct DeregisterArgs {
    #[command(flatten)]
    connection: Connection,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// The service: a bare name means default/DEFAULT/NAME; or NAMESPACE/GROUP/NAME.
    service: String,
    /// The id the instance was registered under.
    id: String,
}

pub async fn deregister(args: DeregisterArgs) -> anyhow::Result<()> {
    let service: ServiceId = args.service.parse()?;
    let client = args.connection.connect().await?;
    let result = client
        .deregister_persistent(service.as_str(), args.id.as_str())
        .await;
    client.close().await;
    match result {
        Ok(()) => print_done("deregistered", &service, &args.id, args.json),
        Err(Error::NotFound(_)) => bail!(
            "{service} has no persistent instance {:?} (`roster subscribe {service}` lists them)",
            args.id
        ),
        Err(e) => Err(e).with_context(|| format!("cannot deregister {} from {service}", args.id)),
    }
}

/// `registered SERVICE ID`, or with `--json` `{"event": "registered", "service": .., "id": ..}`.
fn print_done(event: &str, service: &ServiceId, id: &str, json: bool) -> anyhow::Result<()> {
    if json {
        let value = json!({"event": event, "service": service.as_str(), "id": id});
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("{event} {service} {id}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_units_of_ttl_and_milliseconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "5 sec",
            "-1s",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    fn args(check: &str) -> CheckArgs {
        CheckArgs {
            check: Some(check.into()),
            interval: None,
            timeout: None,
            rise: None,
            fall: None,
        }
    }

    #[test]
    fn a_check_takes_the_defaults_and_a_short_interval_shortens_the_timeout() {
        let data = [Bytes::from_static(b"127.0.0.1:5432")];
        assert_eq!(
            args("tcp").spec(&data).unwrap(),
            Some(CheckSpec::new("tcp"))
        );
        let fast = CheckArgs {
            interval: Some(Duration::from_millis(200)),
            rise: Some(1),
            ..args("tcp://db:5432")
        };
        let spec = fast.spec(&data).unwrap().unwrap();
        assert_eq!((spec.interval_ms, spec.timeout_ms), (200, 200));
        assert_eq!((spec.rise, spec.fall), (1, 3));
        let none = CheckArgs {
            check: None,
            ..args("tcp")
        };
        assert_eq!(none.spec(&data).unwrap(), None);
    }

    #[test]
    fn a_bad_check_is_refused_before_connecting() {
        let err = args("tcp").spec(&[Bytes::from_static(b"not-an-address")]);
        assert!(err.unwrap_err().to_string().contains("HOST:PORT"));
        let slow = CheckArgs {
            interval: Some(Duration::from_secs(1)),
            timeout: Some(Duration::from_secs(2)),
            ..args("tcp://db:5432")
        };
        assert!(slow.spec(&[]).unwrap_err().to_string().contains("timeout"));
    }

    #[test]
    fn the_healthy_column_says_dash_when_nothing_is_checked() {
        assert_eq!(healthy_column(Some(8), 10), "8/10");
        assert_eq!(healthy_column(None, 10), "-");
    }
}
