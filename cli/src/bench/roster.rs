//! The Roster target: a cluster of separate server processes started for the run (or a running
//! one given by its client config), driven through the Rust SDK.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;
use roster_client::{Client, ClientConfig, Publication};
use tokio_util::sync::CancellationToken;

use super::{BenchArgs, BoxFut, Conn, ConnStats, OnChange, Target, Update};
use crate::dev::LocalCluster;
use crate::files::CLIENT_CONFIG_FILE;

pub struct RosterTarget {
    cluster: Option<LocalCluster>,
    shape: String,
    config: PathBuf,
}

impl RosterTarget {
    pub async fn start(args: &BenchArgs, dir: &Path) -> anyhow::Result<Self> {
        if let Some(config) = &args.config {
            return Ok(RosterTarget {
                cluster: None,
                shape: "running cluster".into(),
                config: config.clone(),
            });
        }
        let shape = cluster_shape(&args.cluster)?;
        let cluster = LocalCluster::start(
            &dir.join("cluster"),
            shape[0],
            shape[1],
            shape[2],
            !args.insecure_no_auth,
            Some("warn,openraft=off"),
            &CancellationToken::new(),
            true,
        )
        .await?;
        let config = cluster.dir.join(CLIENT_CONFIG_FILE);
        Ok(RosterTarget {
            cluster: Some(cluster),
            shape: if args.insecure_no_auth {
                format!("{} no-auth", args.cluster)
            } else {
                args.cluster.clone()
            },
            config,
        })
    }
}

/// `--cluster METAS/DATAS/SESSIONS`.
pub(super) fn cluster_shape(text: &str) -> anyhow::Result<[usize; 3]> {
    let shape: Vec<usize> = text
        .split('/')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()
        .filter(|v: &Vec<usize>| v.len() == 3)
        .with_context(|| {
            format!("--cluster {text:?}: expected METAS/DATAS/SESSIONS, e.g. 3/3/2")
        })?;
    Ok([shape[0], shape[1], shape[2]])
}

impl Target for RosterTarget {
    fn describe(&self) -> String {
        format!("roster {}", self.shape)
    }

    fn connect(&self) -> BoxFut<'_, anyhow::Result<Arc<dyn Conn>>> {
        Box::pin(async move { connect(&self.config).await })
    }

    fn processes(&self) -> Vec<(String, u32)> {
        self.cluster
            .as_ref()
            .map(LocalCluster::processes)
            .unwrap_or_default()
    }

    fn holder_args(&self) -> Vec<String> {
        vec![
            "--target".into(),
            "roster".into(),
            "--config".into(),
            self.config.to_string_lossy().into_owned(),
        ]
    }

    fn stop(&mut self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if let Some(cluster) = self.cluster.as_mut()
                && let Some(e) = cluster.stop().await
            {
                tracing::warn!(error = %e, "the cluster did not stop cleanly");
            }
        })
    }
}

/// A client of the cluster described by the client config at `path`.
pub async fn connect(path: &Path) -> anyhow::Result<Arc<dyn Conn>> {
    let mut config = ClientConfig::load(path)?;
    // The workload counts every change, a service emptied included.
    config.refuse_empty = false;
    let client = Client::connect(config).await?;
    Ok(Arc::new(RosterConn {
        client: Mutex::new(Some(client)),
        publications: Mutex::new(HashMap::new()),
    }))
}

struct RosterConn {
    client: Mutex<Option<Client>>,
    publications: Mutex<HashMap<(String, String), Publication>>,
}

impl RosterConn {
    fn client(&self) -> anyhow::Result<Client> {
        match self.client.lock().as_ref() {
            Some(client) => Ok(client.clone()),
            None => bail!("the connection is closed"),
        }
    }
}

impl Conn for RosterConn {
    fn register<'a>(
        &'a self,
        service: &'a str,
        instance: &'a str,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            // The instance's name is its register id, as a service's own instance id would be.
            let publication = self
                .client()?
                .publisher(service)
                .register_id(instance)
                .publish(vec![instance.to_owned().into()])
                .await?;
            self.publications
                .lock()
                .insert((service.to_owned(), instance.to_owned()), publication);
            Ok(())
        })
    }

    fn unregister<'a>(
        &'a self,
        service: &'a str,
        instance: &'a str,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let publication = self
                .publications
                .lock()
                .remove(&(service.to_owned(), instance.to_owned()))
                .with_context(|| format!("{instance} of {service} is not registered here"))?;
            publication.unpublish().await?;
            Ok(())
        })
    }

    fn watch<'a>(
        &'a self,
        service: &'a str,
        on_change: OnChange,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let subscription = self.client()?.subscribe(service).await?;
            let name = service.to_owned();
            tokio::spawn(async move {
                // Events come from the difference between consecutive snapshots, which costs
                // what changed; a burst of them is reported together.
                let mut events = subscription.events();
                let instance = |p: &roster_client::PublisherView| {
                    p.data
                        .first()
                        .map(|d| String::from_utf8_lossy(d).into_owned())
                        .unwrap_or_default()
                };
                while let Some(first) = events.next().await {
                    let (mut added, mut removed) = (Vec::new(), Vec::new());
                    let mut take = |event: roster_client::Event| match event {
                        roster_client::Event::Added(p) => added.push(instance(&p)),
                        roster_client::Event::Removed(p) => removed.push(instance(&p)),
                        roster_client::Event::Changed { old, new } => {
                            removed.push(instance(&old));
                            added.push(instance(&new));
                        }
                    };
                    take(first);
                    while let Some(Some(event)) = events.next().now_or_never() {
                        take(event);
                    }
                    on_change(&name, Update::Changed { added, removed });
                }
            });
            Ok(())
        })
    }

    fn stats(&self) -> Option<ConnStats> {
        let stats = self.client.lock().as_ref()?.stats();
        Some(ConnStats {
            reconnects: stats.reconnects,
            lost: stats.lost + stats.silent,
            push_bytes: stats.push_bytes,
            snapshots: stats.snapshots,
            deltas: stats.deltas,
        })
    }

    fn instance_bytes(&self, instance: &str) -> Option<usize> {
        let client_id = self.client.lock().as_ref()?.client_id().to_owned();
        let view = roster_client::PublisherView {
            health: None,
            persistent: false,
            client_id,
            register_id: instance.to_owned(),
            data: vec![instance.to_owned().into()],
            attributes: Default::default(),
            client_version: 1,
        };
        Some(roster_common::push::encode_publisher(&view).len())
    }

    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.publications.lock().clear();
            let client = self.client.lock().take();
            if let Some(client) = client {
                client.close().await;
            }
        })
    }
}
