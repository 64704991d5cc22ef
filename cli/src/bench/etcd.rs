//! The etcd target: a running etcd server (bench/start-etcd.sh starts one), driven over its gRPC
//! API.
//!
//! An instance is the key `/bench/<service>/<instance>`, put with the connection's lease. Each
//! connection grants one lease and keeps it alive in the background; a client that dies stops
//! renewing, and the server deletes its keys once the lease's TTL has passed. A connection's
//! watches share one watch stream: each is a prefix watch on `/bench/<service>/` that starts
//! right after a range read of the prefix, so the connection keeps every watched service's
//! instance set from that read plus the events.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchRequestSender,
    WatchResponseStream,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::{BoxFut, Conn, OnChange, PeerServer, Target, TargetKind, Update};

pub struct EtcdTarget {
    server: PeerServer,
    version: String,
}

impl EtcdTarget {
    /// Checks that the server at `endpoint` answers.
    pub async fn new(endpoint: &str, server_pid: Option<u32>, ttl: u64) -> anyhow::Result<Self> {
        let mut client = client(endpoint).await?;
        let status = client
            .status()
            .await
            .with_context(|| format!("etcd at {endpoint} does not answer"))?;
        Ok(EtcdTarget {
            server: PeerServer {
                kind: TargetKind::Etcd,
                endpoint: endpoint.to_owned(),
                pid: server_pid,
                ttl,
            },
            version: status.version().to_owned(),
        })
    }
}

impl Target for EtcdTarget {
    fn describe(&self) -> String {
        format!("etcd {} (lease TTL {} s)", self.version, self.server.ttl)
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

async fn client(endpoint: &str) -> anyhow::Result<Client> {
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
    Client::connect([endpoint], Some(options))
        .await
        .with_context(|| format!("cannot connect to etcd at {endpoint}"))
}

fn key(service: &str, instance: &str) -> String {
    format!("/bench/{service}/{instance}")
}

/// The instance a key names: its last path segment.
fn instance_of(key: &[u8]) -> String {
    let key = String::from_utf8_lossy(key);
    key.rsplit('/').next().unwrap_or_default().to_owned()
}

/// A client connection with its lease, kept alive until the connection closes.
pub async fn connect(endpoint: &str, ttl: u64) -> anyhow::Result<Arc<dyn Conn>> {
    let client = client(endpoint).await?;
    let ttl = i64::try_from(ttl).context("--ttl is too large")?;
    let lease = client
        .lease_client()
        .grant(ttl, None)
        .await
        .context("cannot grant a lease")?
        .id();
    let (mut keeper, mut responses) = client
        .lease_client()
        .keep_alive(lease)
        .await
        .context("cannot keep the lease alive")?;
    let cancel = CancellationToken::new();
    // Renewed at a third of the TTL, as etcd's own clients do, whether or not the previous
    // renewal was answered yet: an answer can be held up behind a busy watch stream on the same
    // HTTP/2 connection, and waiting for it would let the lease lapse.
    let period = Duration::from_millis((ttl as u64 * 1000 / 3).max(100));
    tokio::spawn(cancel.clone().run_until_cancelled_owned(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if let Err(e) = keeper.keep_alive().await {
                tracing::warn!(lease, error = %e, "cannot send a lease keep-alive");
            }
        }
    }));
    tokio::spawn(cancel.clone().run_until_cancelled_owned(async move {
        loop {
            match responses.message().await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(Some(_)) => tracing::error!(lease, "the lease expired"),
                Ok(None) => {
                    tracing::error!(lease, "the lease keep-alive stream ended");
                    return;
                }
                Err(e) => tracing::warn!(lease, error = %e, "lease keep-alive failed"),
            }
        }
    }));
    Ok(Arc::new(EtcdConn {
        client,
        lease,
        cancel,
        watch: tokio::sync::Mutex::new(None),
        watched: Arc::new(Mutex::new(HashMap::new())),
    }))
}

/// A watched service and whom to tell of its changes.
struct Watched {
    service: String,
    on_change: OnChange,
}

/// The connection's one watch stream: where to send new watches, and the next watch id.
struct WatchSender {
    sender: WatchRequestSender,
    next_id: i64,
}

struct EtcdConn {
    client: Client,
    lease: i64,
    cancel: CancellationToken,
    watch: tokio::sync::Mutex<Option<WatchSender>>,
    /// Watch id → the service it watches.
    watched: Arc<Mutex<HashMap<i64, Watched>>>,
}

impl Conn for EtcdConn {
    fn register<'a>(
        &'a self,
        service: &'a str,
        instance: &'a str,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.client
                .kv_client()
                .put(
                    key(service, instance),
                    instance,
                    Some(PutOptions::new().with_lease(self.lease)),
                )
                .await?;
            Ok(())
        })
    }

    fn unregister<'a>(
        &'a self,
        service: &'a str,
        instance: &'a str,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.client
                .kv_client()
                .delete(key(service, instance), None)
                .await?;
            Ok(())
        })
    }

    fn watch<'a>(
        &'a self,
        service: &'a str,
        on_change: OnChange,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let prefix = format!("/bench/{service}/");
            // One watch created at a time, so ids and start revisions stay in order.
            let mut watch = self.watch.lock().await;
            let current = self
                .client
                .kv_client()
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await?;
            let revision = current
                .header()
                .context("a range response without a header")?
                .revision();
            let id = watch.as_ref().map_or(1, |w| w.next_id);
            {
                let instances: BTreeSet<String> = current
                    .kvs()
                    .iter()
                    .map(|kv| instance_of(kv.key()))
                    .collect();
                // Reported before the watch exists, so no event can overtake the initial list.
                on_change(service, Update::All(instances.into_iter().collect()));
                let watched = Watched {
                    service: service.to_owned(),
                    on_change,
                };
                self.watched.lock().insert(id, watched);
            }
            // Every change after the read, and none before.
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1)
                .with_watch_id(id);
            match watch.as_mut() {
                Some(w) => {
                    w.sender.watch(prefix, Some(options)).await?;
                    w.next_id = id + 1;
                }
                None => {
                    let stream = self
                        .client
                        .watch_client()
                        .watch(prefix, Some(options))
                        .await?;
                    let (sender, responses) = stream.split();
                    tokio::spawn(
                        self.cancel
                            .clone()
                            .run_until_cancelled_owned(dispatch(responses, self.watched.clone())),
                    );
                    *watch = Some(WatchSender {
                        sender,
                        next_id: id + 1,
                    });
                }
            }
            Ok(())
        })
    }

    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            self.watch.lock().await.take();
            // Revoking the lease deletes every key this connection put.
            if let Err(e) = self.client.lease_client().revoke(self.lease).await {
                tracing::warn!(lease = self.lease, error = %e, "cannot revoke the lease");
            }
        })
    }
}

/// Reports the events of every watch response of the connection's stream as changes of its
/// service.
async fn dispatch(mut responses: WatchResponseStream, watched: Arc<Mutex<HashMap<i64, Watched>>>) {
    loop {
        let response = match responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                tracing::warn!("the etcd watch stream ended");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the etcd watch stream failed");
                return;
            }
        };
        let mut watched = watched.lock();
        if response.canceled() {
            tracing::warn!(
                watch = response.watch_id(),
                reason = response.cancel_reason(),
                "etcd canceled a watch"
            );
            watched.remove(&response.watch_id());
            continue;
        }
        // A response carries the events of one watch; those of one revision (a lease expiring
        // deletes all its keys at once) may come together.
        if response.events().is_empty() {
            continue;
        }
        let Some(w) = watched.get(&response.watch_id()) else {
            continue;
        };
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let instance = instance_of(kv.key());
            match event.event_type() {
                EventType::Put => added.push(instance),
                EventType::Delete => removed.push(instance),
            };
        }
        (w.on_change)(&w.service, Update::Changed { added, removed });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn instance_is_the_last_segment() {
        let key = super::key("bench/svc/3", "i42");
        assert_eq!(key, "/bench/bench/svc/3/i42");
        assert_eq!(super::instance_of(key.as_bytes()), "i42");
    }
}
