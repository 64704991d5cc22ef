//! The ZooKeeper target: a running ZooKeeper server (bench/start-zookeeper.sh starts one).
//!
//! An instance is the ephemeral znode `/bench/<service>/<instance>`, created by the connection's
//! session under persistent parents; a client that dies stops pinging, and the server deletes
//! its znodes when the session expires. A watch is a `getChildren` with a child watch on
//! `/bench/<service>`, set again after each time it fires; each read gives the whole list.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

use super::{BoxFut, Conn, OnChange, PeerServer, Target, TargetKind, Update};

pub struct ZkTarget {
    /// Its `ttl` is the session timeout asked for, in seconds.
    server: PeerServer,
    /// The one the server granted.
    negotiated: Duration,
    version: Option<String>,
}

impl ZkTarget {
    /// Checks that the server at `endpoint` answers.
    pub async fn new(
        endpoint: &str,
        server_pid: Option<u32>,
        timeout: u64,
    ) -> anyhow::Result<Self> {
        let probe = session(endpoint, timeout).await?;
        Ok(ZkTarget {
            server: PeerServer {
                kind: TargetKind::Zookeeper,
                endpoint: endpoint.to_owned(),
                pid: server_pid,
                ttl: timeout,
            },
            negotiated: probe.session_timeout(),
            version: version(endpoint).await,
        })
    }
}

/// The server's version, from the `srvr` four-letter word, if the server allows it.
async fn version(endpoint: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(endpoint).await.ok()?;
        stream.write_all(b"srvr").await.ok()?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.ok()?;
        // "Zookeeper version: 3.8.0-<build>, built on …"
        let line = reply
            .lines()
            .find_map(|l| l.strip_prefix("Zookeeper version: "))?;
        line.split(['-', ',']).next().map(str::to_owned)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

impl Target for ZkTarget {
    fn describe(&self) -> String {
        let version = self.version.as_deref().map(|v| format!(" {v}"));
        format!(
            "zookeeper{} (session timeout {} s)",
            version.unwrap_or_default(),
            self.negotiated.as_secs_f64()
        )
    }

    fn connect(&self) -> BoxFut<'_, anyhow::Result<Arc<dyn Conn>>> {
        Box::pin(async move { connect(&self.server.endpoint, self.server.ttl).await })
    }

    fn processes(&self) -> Vec<(String, u32)> {
        self.server.processes()
    }

    fn holder_args(&self) -> Vec<String> {
        self.server.holder_args()
    }
}

async fn session(endpoint: &str, timeout: u64) -> anyhow::Result<zk::Client> {
    zk::Client::connector()
        .with_session_timeout(Duration::from_secs(timeout))
        .connect(endpoint)
        .await
        .with_context(|| format!("cannot open a ZooKeeper session at {endpoint}"))
}

/// A client connection: one ZooKeeper session.
pub async fn connect(endpoint: &str, timeout: u64) -> anyhow::Result<Arc<dyn Conn>> {
    Ok(Arc::new(ZkConn {
        client: Mutex::new(Some(session(endpoint, timeout).await?)),
        cancel: CancellationToken::new(),
    }))
}

fn dir(service: &str) -> String {
    format!("/bench/{service}")
}

fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

struct ZkConn {
    client: Mutex<Option<zk::Client>>,
    /// Ends the watch tasks, which hold the session too.
    cancel: CancellationToken,
}

impl ZkConn {
    fn client(&self) -> anyhow::Result<zk::Client> {
        match self.client.lock().as_ref() {
            Some(client) => Ok(client.clone()),
            None => bail!("the connection is closed"),
        }
    }
}

impl Conn for ZkConn {
    fn register<'a>(
        &'a self,
        service: &'a str,
        instance: &'a str,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let client = self.client()?;
            let path = format!("{}/{instance}", dir(service));
            let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
            match client.create(&path, instance.as_bytes(), &ephemeral).await {
                Ok(_) => {}
                Err(zk::Error::NoNode) => {
                    // The first instance of the service: its parents first.
                    client.mkdir(&dir(service), &persistent()).await?;
                    client
                        .create(&path, instance.as_bytes(), &ephemeral)
                        .await?;
                }
                Err(e) => return Err(e.into()),
            }
            Ok(())
        })
    }

    fn unregister<'a>(
        &'a self,
        service: &'a str,
        instance: &'a str,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let path = format!("{}/{instance}", dir(service));
            self.client()?.delete(&path, None).await?;
            Ok(())
        })
    }

    fn watch<'a>(
        &'a self,
        service: &'a str,
        on_change: OnChange,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let client = self.client()?;
            let dir = dir(service);
            let (children, mut watcher) = match client.list_and_watch_children(&dir).await {
                Err(zk::Error::NoNode) => {
                    client.mkdir(&dir, &persistent()).await?;
                    client.list_and_watch_children(&dir).await?
                }
                other => other?,
            };
            // ZooKeeper's watches say only that something changed: the difference from the
            // last list read is what changed.
            let mut known: std::collections::HashSet<String> = children.iter().cloned().collect();
            on_change(service, Update::All(children));
            let service = service.to_owned();
            tokio::spawn(self.cancel.clone().run_until_cancelled_owned(async move {
                loop {
                    let event = watcher.changed().await;
                    if event.event_type == zk::EventType::Session {
                        // Only a session's end (expired, closed) reaches a one-shot watch.
                        tracing::warn!(state = ?event.session_state, service, "watch ended");
                        return;
                    }
                    // Read again and watch again: whatever changed meanwhile is in the list.
                    match client.list_and_watch_children(&dir).await {
                        Ok((children, next)) => {
                            let now: std::collections::HashSet<String> =
                                children.into_iter().collect();
                            let added = now.difference(&known).cloned().collect();
                            let removed = known.difference(&now).cloned().collect();
                            known = now;
                            on_change(&service, Update::Changed { added, removed });
                            watcher = next;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, service, "cannot watch again");
                            return;
                        }
                    }
                }
            }));
            Ok(())
        })
    }

    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            // The session closes, and its ephemeral znodes go, once its last handle is dropped.
            self.client.lock().take();
        })
    }
}
