//! The session's links to the data tier: one watch stream per data server, interest registered with
//! the leader of each subscribed service, and fetches of datums this session lacks.
//!
//! One task — the manager — owns the link table and where each service's interest is registered.
//! It reacts to subscriptions starting or ending ([`LinkEvent::Want`] / [`LinkEvent::Unwant`]),
//! link tasks coming up or down, requests to fetch a datum, and new cluster views. After each it
//! reconciles: every wanted service must have interest registered with its slot leader over that
//! leader's current watch stream; every unwanted one must have none.
//!
//! Each data server gets a link task that dials it, opens the watch stream, waits for `Ready`,
//! then hands each change it hears straight to the hub ([`crate::hub::Hub::apply`]), which pushes
//! it; only a change the hub cannot apply (a gap) goes to the manager, as a fetch. A broken stream
//! is redialed with backoff; interest does not survive it (the data server drops it with the
//! stream), so the manager registers again when the link comes back, and the versions returned
//! with that registration tell what to fetch to cover anything missed.
//!
//! The manager also decides when the data tier gets a repair report from this session (after
//! every table change, every new link and every `repair_interval`); [`crate::repair`] sends it and
//! the syncs it calls for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roster_common::proto::{
    ClusterView, DataEvent, DataRequest, DataResponse, PublisherChange, Reply, Role,
};
use roster_common::push::encode_publisher;
use roster_common::{Error, InstanceId, NodeId, Result, ServiceId, SlotId, Version, frame};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::hub::{self, Applied, Fetched, Op};
use crate::repair;
use crate::shared::{DataLinks, LinkEvent, Shared};

/// How often the manager re-checks everything, catching up after failed requests.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How soon a request refused for a moving slot or a missing leader is tried again.
const RETRY_SOON: Duration = Duration::from_millis(100);
const FIRST_REDIAL: Duration = Duration::from_millis(100);
const MAX_REDIAL: Duration = Duration::from_secs(2);

struct Link {
    addr: String,
    instance: InstanceId,
    /// The generation of the watch stream now up, if any.
    up: Option<u64>,
    cancel: CancellationToken,
}

enum Done {
    Interest {
        node: NodeId,
        generation: u64,
        services: Vec<ServiceId>,
        result: Result<Vec<(ServiceId, Version)>>,
    },
    InterestOff,
    Fetch {
        service: ServiceId,
        result: Result<Fetched>,
    },
    /// This session's digests (and syncs where they differed) reached `node`.
    Reported {
        node: NodeId,
        mark: ReportMark,
        result: Result<usize>,
    },
}

/// A watch stream: the data server it is to and its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stream {
    node: NodeId,
    generation: u64,
}

/// The last digest report a data server took, and when.
struct Reported {
    mark: ReportMark,
    at: Instant,
}

/// What a digest report to a data server covered: the table epoch and the watch generation. A new
/// table or a new stream (a restarted server) calls for a new report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReportMark {
    epoch: u64,
    generation: u64,
}

struct Manager {
    shared: Arc<Shared>,
    events_tx: mpsc::Sender<LinkEvent>,
    links: HashMap<NodeId, Link>,
    /// Where each service's interest is registered.
    registered: HashMap<ServiceId, Stream>,
    /// Services with an interest request in flight.
    pending: HashSet<ServiceId>,
    /// Services whose last fetch failed, fetched again on the next reconcile.
    stale: HashSet<ServiceId>,
    tasks: JoinSet<Done>,
    link_tasks: TaskTracker,
    /// What was last reported to each data server, and when.
    reported: HashMap<NodeId, Reported>,
    /// Data servers with a report in flight.
    reporting: HashSet<NodeId>,
    /// Something failed for a reason that passes quickly (a slot moving): try again soon.
    retry_soon: bool,
    last_full_pass: Instant,
}

/// Every watch stream gets a generation from this counter, so stale ups and downs are told apart.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Runs the manager until `shutdown`.
pub async fn run(
    shared: Arc<Shared>,
    mut events: mpsc::Receiver<LinkEvent>,
    shutdown: CancellationToken,
) {
    let mut views = shared.views();
    let mut manager = Manager {
        events_tx: shared.link_events(),
        shared,
        links: HashMap::new(),
        registered: HashMap::new(),
        pending: HashSet::new(),
        stale: HashSet::new(),
        tasks: JoinSet::new(),
        link_tasks: TaskTracker::new(),
        reported: HashMap::new(),
        reporting: HashSet::new(),
        retry_soon: false,
        last_full_pass: Instant::now(),
    };
    let mut tick = tokio::time::interval(RETRY_SOON);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = views.changed() => {
                if changed.is_err() {
                    break;
                }
                let view = views.borrow_and_update().clone();
                if let Some(view) = view {
                    manager.follow_view(&view, &shutdown);
                    manager.report_digests();
                    manager.reconcile_all();
                }
            }
            Some(event) = events.recv() => manager.handle_event(event),
            Some(done) = manager.tasks.join_next() => {
                if let Ok(done) = done {
                    manager.handle_done(done);
                }
            }
            _ = tick.tick() => {
                manager.report_digests();
                if manager.retry_soon || manager.last_full_pass.elapsed() >= RECONCILE_EVERY {
                    manager.retry_soon = false;
                    manager.last_full_pass = Instant::now();
                    manager.refetch_stale();
                    manager.reconcile_all();
                    let behind = manager.shared.hub().rescan();
                    if behind > 0 {
                        debug!(subscriptions = behind, "re-marked subscriptions that were behind");
                    }
                }
            }
        }
        let wanted = manager.links.len();
        let up = manager.links.values().filter(|l| l.up.is_some()).count();
        manager.shared.set_data_links(DataLinks { wanted, up });
    }
    for link in manager.links.values() {
        link.cancel.cancel();
    }
    // Link tasks may be blocked sending to us: close the queue so they see it gone.
    drop(events);
    manager.link_tasks.close();
    manager.link_tasks.wait().await;
}

impl Manager {
    /// Starts link tasks for new data servers and stops those of departed or restarted ones.
    fn follow_view(&mut self, view: &ClusterView, shutdown: &CancellationToken) {
        let live: HashMap<NodeId, (&str, InstanceId)> = view
            .members_of(Role::Data)
            .map(|m| (m.id, (m.addr.as_str(), m.instance)))
            .collect();
        let gone: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(id, link)| live.get(id) != Some(&(link.addr.as_str(), link.instance)))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(link) = self.links.remove(&id) {
                link.cancel.cancel();
                self.forget_node(id);
            }
        }
        for (id, (addr, instance)) in live {
            if self.links.contains_key(&id) {
                continue;
            }
            let cancel = shutdown.child_token();
            self.link_tasks.spawn(run_link(
                self.shared.clone(),
                id,
                addr.to_owned(),
                self.events_tx.clone(),
                cancel.clone(),
            ));
            self.links.insert(
                id,
                Link {
                    addr: addr.to_owned(),
                    instance,
                    up: None,
                    cancel,
                },
            );
        }
    }

    /// Interest registered through `node` is gone with its stream.
    fn forget_node(&mut self, node: NodeId) {
        self.registered.retain(|_, stream| stream.node != node);
    }

    fn handle_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Want(service) | LinkEvent::Unwant(service) => self.reconcile(&[service]),
            LinkEvent::Up { node, generation } => {
                if let Some(link) = self.links.get_mut(&node) {
                    link.up = Some(generation);
                    debug!(node, generation, "data link up");
                    self.report_digests();
                    self.reconcile_all();
                }
            }
            LinkEvent::Down { node, generation } => {
                if let Some(link) = self.links.get_mut(&node)
                    && link.up == Some(generation)
                {
                    link.up = None;
                    self.forget_node(node);
                }
            }
            LinkEvent::Changed {
                node,
                service,
                version,
            } => {
                if self.shared.hub().changed(&service, version) {
                    self.fetch(node, service);
                }
            }
            LinkEvent::Fetch { node, service } => self.fetch(node, service),
        }
    }

    fn handle_done(&mut self, done: Done) {
        match done {
            Done::Interest {
                node,
                generation,
                services,
                result,
            } => {
                for service in &services {
                    self.pending.remove(service);
                }
                match result {
                    Ok(versions) => {
                        let still_up = self.links.get(&node).and_then(|l| l.up) == Some(generation);
                        if still_up {
                            for service in &services {
                                self.registered
                                    .insert(service.clone(), Stream { node, generation });
                            }
                        }
                        // Fetch what this session does not have yet (or never had: version 0 of a
                        // service nobody published is an empty snapshot to push too).
                        let wanted: Vec<ServiceId> = {
                            let mut hub = self.shared.hub();
                            versions
                                .into_iter()
                                .filter(|(service, version)| hub.changed(service, *version))
                                .map(|(service, _)| service)
                                .collect()
                        };
                        for service in wanted {
                            self.fetch(node, service);
                        }
                    }
                    Err(e) => {
                        // Tried again at the next tick (`RETRY_SOON`), not at once: a slot being
                        // taken over refuses interest until it opens, and asking again straight
                        // away only spins.
                        debug!(node, error = %e, "interest not registered; will retry");
                        self.retry_soon = true;
                        return;
                    }
                }
                self.reconcile(&services);
            }
            Done::InterestOff => {}
            Done::Reported { node, mark, result } => {
                self.reporting.remove(&node);
                match result {
                    Ok(synced) => {
                        if synced > 0 {
                            metrics::counter!("roster_session_slot_syncs_total")
                                .increment(synced as u64);
                            info!(
                                node,
                                slots = synced,
                                "synced this session's publishers with a data server"
                            );
                        }
                        self.reported.insert(
                            node,
                            Reported {
                                mark,
                                at: Instant::now(),
                            },
                        );
                    }
                    Err(e) => {
                        debug!(node, error = %e, "digest report failed; will retry");
                        self.retry_soon = true;
                    }
                }
            }
            Done::Fetch { service, result } => {
                let again = match result {
                    Ok(datum) => self.shared.hub().fetched(datum, Instant::now()),
                    Err(e) => {
                        debug!(%service, error = %e, "fetch failed; will retry");
                        self.shared.hub().fetch_failed(&service);
                        self.stale.insert(service.clone());
                        self.retry_soon = true;
                        false
                    }
                };
                if again {
                    match self.leader_of(&service) {
                        Some(node) => self.fetch(node, service),
                        None => {
                            self.shared.hub().fetch_failed(&service);
                            self.stale.insert(service);
                        }
                    }
                }
            }
        }
    }

    fn leader_of(&self, service: &ServiceId) -> Option<NodeId> {
        self.shared.view()?.table.leader_of(service)
    }

    /// Fetches `service` from `node`; the hub has marked it as being fetched.
    fn fetch(&mut self, node: NodeId, service: ServiceId) {
        let Some(link) = self.links.get(&node) else {
            self.shared.hub().fetch_failed(&service);
            self.stale.insert(service);
            self.retry_soon = true;
            return;
        };
        let shared = self.shared.clone();
        let addr = link.addr.clone();
        self.tasks.spawn(async move {
            let request = DataRequest::Fetch {
                services: vec![service.clone()],
            };
            let result =
                shared
                    .call_data(&addr, &request)
                    .await
                    .and_then(|response| match response {
                        DataResponse::Datums { mut datums } if datums.len() == 1 => {
                            Ok(Fetched::encode(datums.remove(0)))
                        }
                        other => Err(Error::UnexpectedMessage(format!(
                            "expected one datum, got {other:?}"
                        ))),
                    });
            Done::Fetch { service, result }
        });
    }

    fn refetch_stale(&mut self) {
        for service in std::mem::take(&mut self.stale) {
            let Some(node) = self.leader_of(&service) else {
                continue;
            };
            let version = self.shared.hub().version(&service).unwrap_or(0);
            if self
                .shared
                .hub()
                .changed(&service, version.saturating_add(1))
            {
                self.fetch(node, service);
            }
        }
    }

    /// Tells each data server what this session owns in the slots it leads, when the table or the
    /// link changed since the last report, or `repair_interval` passed: the data server opens a
    /// slot it took over once every session reported, and fixes any records that differ.
    fn report_digests(&mut self) {
        let Some(view) = self.shared.view() else {
            return;
        };
        let due: Vec<(NodeId, String, ReportMark)> = self
            .links
            .iter()
            .filter_map(|(node, link)| {
                let mark = ReportMark {
                    epoch: view.table.epoch,
                    generation: link.up?,
                };
                let fresh = self.reported.get(node).is_some_and(|last| {
                    last.mark == mark && last.at.elapsed() < self.shared.config().repair_interval
                });
                (!fresh && !self.reporting.contains(node)).then(|| (*node, link.addr.clone(), mark))
            })
            .collect();
        for (node, addr, mark) in due {
            let slots: Vec<SlotId> = view.table.led_by(node).collect();
            let slot_count = view.table.slot_count;
            self.reporting.insert(node);
            let shared = self.shared.clone();
            self.tasks.spawn(async move {
                let result = repair::report(shared, addr, mark.epoch, slots, slot_count).await;
                Done::Reported { node, mark, result }
            });
        }
    }

    fn reconcile_all(&mut self) {
        let mut services: Vec<ServiceId> = self.shared.hub().wanted();
        services.extend(self.registered.keys().cloned());
        services.sort();
        services.dedup();
        self.reconcile(&services);
    }

    /// Brings the registration of `services` in line with who subscribes and who leads.
    fn reconcile(&mut self, services: &[ServiceId]) {
        let Some(view) = self.shared.view() else {
            return;
        };
        let mut on: HashMap<NodeId, Vec<ServiceId>> = HashMap::new();
        let mut off: HashMap<NodeId, Vec<ServiceId>> = HashMap::new();
        {
            let hub = self.shared.hub();
            for service in services {
                if self.pending.contains(service) {
                    continue;
                }
                let current = self.registered.get(service).copied();
                let target = if hub.is_wanted(service) {
                    view.table.leader_of(service).and_then(|node| {
                        let generation = self.links.get(&node)?.up?;
                        Some(Stream { node, generation })
                    })
                } else {
                    None
                };
                if current == target {
                    continue;
                }
                if let Some(current) = current {
                    self.registered.remove(service);
                    // Re-registering with the same node replaces the interest; an `off` racing the
                    // new `on` could undo it.
                    if target.map(|t| t.node) != Some(current.node) {
                        off.entry(current.node).or_default().push(service.clone());
                    }
                }
                if let Some(target) = target {
                    on.entry(target.node).or_default().push(service.clone());
                }
            }
        }
        for (node, services) in off {
            self.send_interest(node, services, false);
        }
        for (node, services) in on {
            self.send_interest(node, services, true);
        }
    }

    fn send_interest(&mut self, node: NodeId, services: Vec<ServiceId>, on: bool) {
        let Some(link) = self.links.get(&node) else {
            return;
        };
        let Some(generation) = link.up else { return };
        let shared = self.shared.clone();
        let addr = link.addr.clone();
        if on {
            self.pending.extend(services.iter().cloned());
        }
        self.tasks.spawn(async move {
            let request = DataRequest::Interest {
                instance: shared.instance(),
                services: services.clone(),
                on,
            };
            let result = shared.call_data(&addr, &request).await;
            if !on {
                return Done::InterestOff;
            }
            let result = result.and_then(|response| match response {
                DataResponse::Versions { versions } => Ok(versions),
                other => Err(Error::UnexpectedMessage(format!(
                    "expected versions, got {other:?}"
                ))),
            });
            Done::Interest {
                node,
                generation,
                services,
                result,
            }
        });
    }
}

fn count_change(outcome: Applied) {
    let outcome = match outcome {
        Applied::Done => "applied",
        Applied::Stale => "stale",
        Applied::Held => "held",
        Applied::Fetch => "fetch",
        Applied::Unwanted => return,
    };
    metrics::counter!("roster_session_changes_total", "outcome" => outcome).increment(1);
}

/// Keeps a watch stream open to data server `node`, applying its changes to the hub and
/// forwarding the rest of its events to the manager.
async fn run_link(
    shared: Arc<Shared>,
    node: NodeId,
    addr: String,
    events: mpsc::Sender<LinkEvent>,
    cancel: CancellationToken,
) {
    let mut delay = FIRST_REDIAL;
    loop {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = watch(&shared, node, &addr, generation, &events) => result,
        };
        let _ = events.send(LinkEvent::Down { node, generation }).await;
        match result {
            Ok(true) => {
                info!(node, %addr, "data server ended the watch stream; reopening");
                delay = FIRST_REDIAL;
            }
            Ok(false) => return,
            Err(e) => warn!(node, %addr, error = %e, "data link failed; redialing"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_REDIAL);
    }
}

/// One watch stream's life. `Ok(true)`: the stream ended and should be reopened; `Ok(false)`: the
/// manager is gone.
async fn watch(
    shared: &Shared,
    node: NodeId,
    addr: &str,
    generation: u64,
    events: &mpsc::Sender<LinkEvent>,
) -> Result<bool> {
    let max_frame = shared.config().max_frame;
    let conn = shared.pool().get(addr).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = DataRequest::Watch {
        session: shared.config().id,
        instance: shared.instance(),
    };
    frame::write_frame(&mut send, &request, max_frame).await?;
    let _ = send.finish();
    loop {
        let event = match frame::read_frame::<_, Reply<DataEvent>>(&mut recv, max_frame).await? {
            None => return Ok(true),
            Some(Err(wire)) => return Err(Error::from_wire(wire)),
            Some(Ok(event)) => event,
        };
        let event = match event {
            DataEvent::Ready {} => LinkEvent::Up { node, generation },
            DataEvent::Changed {
                service,
                version,
                prev: Some(prev),
                change: Some(change),
            } => {
                let op = match change {
                    PublisherChange::Put(view) => {
                        let bytes = encode_publisher(&view);
                        Op::Put((view.client_id, view.register_id), bytes)
                    }
                    PublisherChange::Remove(id) => Op::Removed((id.client_id, id.register_id)),
                };
                let change = hub::Change {
                    service: service.clone(),
                    prev,
                    version,
                    op,
                };
                let outcome = shared.hub().apply(change, Instant::now());
                count_change(outcome);
                if outcome != Applied::Fetch {
                    continue;
                }
                LinkEvent::Fetch { node, service }
            }
            // From a data server that does not send the change itself.
            DataEvent::Changed {
                service, version, ..
            } => LinkEvent::Changed {
                node,
                service,
                version,
            },
        };
        if events.send(event).await.is_err() {
            return Ok(false);
        }
    }
}
