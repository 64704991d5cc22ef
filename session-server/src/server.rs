//! The session server's shell: the client endpoint, the member agent, the forwarder and the data
//! links, wired together.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use roster_common::admin::Admin;
use roster_common::member::{self, MemberConfig};
use roster_common::peers::PeerPool;
use roster_common::proto::{ALPN_CLIENT, ALPN_PEER, Member, Role};
use roster_common::tls::{self, NodeIdentity};
use roster_common::{InstanceId, Result, ids, quic, serve};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::SessionConfig;
use crate::conn::serve_client;
use crate::console::{Console, ConsoleSlot};
use crate::dns::DnsSockets;
use crate::shared::Shared;
use crate::{forward, links};

/// A session server, built from its config and run until a shutdown signal.
pub struct SessionServer {
    config: SessionConfig,
    identity: NodeIdentity,
    instance: InstanceId,
    ready_tx: watch::Sender<bool>,
    admin: Admin,
    console: ConsoleSlot,
    dns: Option<DnsSockets>,
}

impl SessionServer {
    pub fn new(config: SessionConfig, identity: NodeIdentity) -> Result<Self> {
        config.validate()?;
        Ok(SessionServer {
            config,
            identity,
            instance: ids::new_instance_id(),
            ready_tx: watch::channel(false).0,
            admin: Admin::default(),
            console: ConsoleSlot::default(),
            dns: None,
        })
    }

    /// Where the HTTP admin port finds this server's status and gauges once it runs.
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    /// The web console's routes (`/ui/…`) for the HTTP admin port; they answer 503 until the
    /// server runs.
    pub fn console(&self) -> axum::Router {
        crate::console::router(self.console.clone())
    }

    /// Also answers DNS queries on `sockets` while it runs (`--dns`; see [`crate::dns`]).
    pub fn serve_dns(&mut self, sockets: DnsSockets) {
        self.dns = Some(sockets);
    }

    /// True while the server is a member of the cluster with a slot table.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Serves clients on `socket` until `shutdown` fires, then drains: refuses new clients, asks
    /// every connected client to move (`GoAway`), waits up to `drain_timeout` for them to go, and
    /// stops.
    pub async fn run(self, socket: UdpSocket, shutdown: CancellationToken) -> Result<()> {
        let config = self.config;
        let advertise = quic::advertised_addr(config.advertise.as_deref(), &socket)?;
        let server_tls = tls::client_facing_server(&self.identity, ALPN_CLIENT)?;
        let mut client_transport = config.client_transport.clone();
        // Let a client open more streams than it may use at once, so exceeding the request limit
        // gets a clear LimitExceeded instead of a silent stall.
        client_transport.max_concurrent_requests = config.max_requests_per_connection + 16;
        let server_config = quic::server_config(server_tls, &client_transport)?;
        let peer_tls = tls::peer_client(&self.identity, ALPN_PEER)?;
        let peer_config = quic::client_config(peer_tls, &config.peer_transport, false)?;
        let endpoint = quic::endpoint(socket, Some(server_config))?;
        let pool = Arc::new(
            PeerPool::new(endpoint.clone(), peer_config, config.request_timeout)
                .with_faults(config.faults.clone()),
        );

        let agent_shutdown = CancellationToken::new();
        let load = Arc::new(AtomicU64::new(0));
        let mean_load = Arc::new(AtomicU64::new(0));
        let subscribers = Arc::new(AtomicU64::new(0));
        let (view, agent) = member::spawn(
            MemberConfig {
                load: Some((load.clone(), mean_load.clone())),
                subscribers: Some(subscribers.clone()),
                metas: config.metas.clone(),
                member: Member {
                    role: Role::Session,
                    id: config.id,
                    instance: self.instance,
                    addr: advertise.clone(),
                    zone: config.zone.clone(),
                    joined_at_ms: 0,
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                },
                max_frame: config.max_frame,
                request_timeout: config.request_timeout,
            },
            pool.clone(),
            agent_shutdown.clone(),
        );
        let (shared, inboxes) = Shared::new(
            config.clone(),
            self.instance,
            pool.clone(),
            view,
            shutdown.clone(),
            mean_load,
        );
        self.admin.install(Arc::new(crate::admin::SessionAdmin {
            shared: shared.clone(),
            advertise: advertise.clone(),
        }));
        let console = Console::new(shared.clone(), advertise.clone());
        self.console.install(console.clone());
        info!(id = config.id, addr = %advertise, instance = format_args!("{:x}", self.instance), "session server serving clients");

        // `stop` ends everything once draining is done; until then connections keep being served.
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(forward::run(shared.clone(), inboxes.forward, stop.clone()));
        tracker.spawn(links::run(shared.clone(), inboxes.links, stop.clone()));
        tracker.spawn(track_readiness(
            shared.clone(),
            self.ready_tx,
            self.instance,
            stop.clone(),
        ));
        tracker.spawn(balance(shared.clone(), load, subscribers, stop.clone()));
        tracker.spawn(crate::console::observe(console, stop.clone()));
        if let Some(sockets) = self.dns {
            tracker.spawn(crate::dns::run(shared.clone(), sockets, stop.clone()));
        }
        let conn_shared = shared.clone();
        let conn_stop = stop.clone();
        let conn_tracker = tracker.clone();
        serve::accept_loop(&endpoint, &shutdown, &tracker, move |conn| {
            serve_client(
                conn_shared.clone(),
                conn,
                conn_stop.clone(),
                conn_tracker.clone(),
            )
        })
        .await;

        // Drain: no new clients; ask those here to move, and give them time to.
        endpoint.set_server_config(None);
        let elsewhere = shared.view().is_some_and(|v| {
            v.members_of(Role::Session)
                .any(|m| m.instance != self.instance)
        });
        let asked = if elsewhere {
            shared
                .hub()
                .go_away(usize::MAX, "the session server is shutting down")
        } else {
            info!("no other session server to move clients to; closing their connections");
            0
        };
        if asked > 0 {
            info!(clients = asked, timeout = ?config.drain_timeout, "draining: asked every client to move");
            let deadline = tokio::time::Instant::now() + config.drain_timeout;
            while shared.hub().counts().connections > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = shared.hub().counts().connections;
            if left > 0 {
                warn!(
                    clients = left,
                    "clients still connected after the drain timeout"
                );
            }
        }
        stop.cancel();
        agent_shutdown.cancel();
        let _ = agent.await;
        serve::drain(&endpoint, &tracker, Some(&pool), Duration::from_secs(2)).await;
        info!(id = config.id, "session server stopped");
        Ok(())
    }
}

/// Moves clients off this server when it holds well more than the mean (see [`crate::balance`]),
/// every `balance_interval`. Also reports the count for the meta tier, with the subscription
/// count (which the console shows).
async fn balance(
    shared: Arc<Shared>,
    load: Arc<AtomicU64>,
    subscribers: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(shared.config().balance_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let counts = shared.hub().counts();
        let here = counts.connections as u64;
        subscribers.store(counts.subscribers as u64, Ordering::Relaxed);
        // What the meta tier last heard from us: the load set at the previous tick.
        let reported = load.swap(here, Ordering::Relaxed);
        let sessions = shared
            .view()
            .map_or(0, |v| v.members_of(Role::Session).count());
        let mean = shared.mean_load();
        let Some(excess) = crate::balance::clients_to_move(reported, mean, here, sessions) else {
            continue;
        };
        let asked = shared.hub().go_away(
            excess as usize,
            "rebalancing: this session server holds more than its share",
        );
        info!(
            connections = here,
            mean, asked, "asked clients to move to less loaded session servers"
        );
    }
}

/// Ready: a member of the cluster (so connected to the meta tier), with a watch stream up to every
/// data server of the slot table, and not draining.
async fn track_readiness(
    shared: Arc<Shared>,
    ready_tx: watch::Sender<bool>,
    instance: InstanceId,
    shutdown: CancellationToken,
) {
    let mut views = shared.views();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let member = views
            .borrow_and_update()
            .as_ref()
            .and_then(|v| v.member(Role::Session, shared.config().id))
            .is_some_and(|m| m.instance == instance);
        let links = shared.data_links();
        let ready = member
            && links.wanted > 0
            && links.up == links.wanted
            && !shared.draining().is_cancelled();
        ready_tx.send_if_modified(|r| std::mem::replace(r, ready) != ready);
        tokio::select! {
            _ = shutdown.cancelled() => {
                ready_tx.send_replace(false);
                return;
            }
            changed = views.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}
