//! A service's page: its instances as the slot leader stores them (data, attributes, the session
//! holding each, ephemeral or persistent, health), the datum's version, and every change as it
//! happens.
//!
//! The records come from the slot leader (`Records`), because only it knows which session holds
//! each publisher; what a subscriber is pushed leaves that out. To hear of changes, the page's
//! stream watches the service in this server's hub like a subscriber (`hub/watch.rs`): the
//! session registers interest with the slot leader and applies each change to its copy within
//! milliseconds; the stream looks at the copy's version every [`POLL`] and asks the leader for
//! the records again when it moved (and every [`REFRESH`] in any case, for what moves no version:
//! a leader that changed, a check's time).

use std::convert::Infallible;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use roster_common::proto::{DataRequest, DataResponse, Publisher};
use roster_common::{Error, NodeId, ServiceId, SlotId, Version, unix_millis};
use tokio::time::Instant;

use super::html::{self, ago, encode_path, esc, live_region};
use super::{Console, ConsoleSlot, ViewerGuard, admit, document, too_many_streams};
use crate::hub::ConnId;
use crate::shared::{LinkEvent, Shared};

/// How often an open service page looks at this session's copy of the service.
pub const POLL: Duration = Duration::from_millis(100);
/// How often it asks the slot leader again even when nothing changed here.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How long the slot leader may take to answer.
const RECORDS_TIMEOUT: Duration = Duration::from_secs(2);

/// What the page shows of a service.
struct Shown {
    slot: SlotId,
    leader: Option<NodeId>,
    /// The records and their version, or why the leader did not give them.
    records: Result<(Version, Vec<Publisher>), String>,
}

/// Asks the slot leader of `service` for its records.
async fn fetch(shared: &Shared, service: &ServiceId) -> Shown {
    let Some(view) = shared.view() else {
        return Shown {
            slot: 0,
            leader: None,
            records: Err("this session server has no cluster view yet".into()),
        };
    };
    let slot = view.table.slot_of(service);
    let leader = view.table.leader(slot);
    let addr = leader.and_then(|l| view.data_addr(l).map(str::to_owned));
    let records = match addr {
        None => Err(format!("slot {slot} has no leader")),
        Some(addr) => {
            let request = DataRequest::Records {
                service: service.clone(),
            };
            let ask = shared.call_data(&addr, &request);
            match tokio::time::timeout(RECORDS_TIMEOUT, ask).await {
                Ok(Ok(DataResponse::Records {
                    version,
                    publishers,
                })) => Ok((version, publishers)),
                Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
                Ok(Err(Error::SlotMoving { .. })) => Err(format!(
                    "slot {slot} is moving: its new leader is taking it over"
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {RECORDS_TIMEOUT:?}")),
            }
        }
    };
    Shown {
        slot,
        leader,
        records,
    }
}

/// The live part of the page.
fn render(shown: &Shown, here: NodeId, now_ms: u64) -> String {
    let mut out = String::new();
    let leader = shown
        .leader
        .map_or_else(|| "none".to_owned(), |l| format!("data {l}"));
    let (version, publishers) = match &shown.records {
        Ok((version, publishers)) => (html::version(*version), &publishers[..]),
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"problem warn\">The slot leader did not give the instances: {}. \
                 This page tries again.</p>",
                esc(e)
            );
            ("—".to_owned(), &[][..])
        }
    };
    let checked: Vec<&Publisher> = publishers.iter().filter(|p| p.health.is_some()).collect();
    let healthy = checked
        .iter()
        .filter(|p| p.health.as_ref().is_some_and(|h| h.healthy))
        .count();
    let health = if checked.is_empty() {
        "not checked".to_owned()
    } else {
        format!(
            "{} of {} healthy{}",
            healthy + publishers.len() - checked.len(),
            publishers.len(),
            if healthy < checked.len() {
                " — some are failing their checks"
            } else {
                ""
            }
        )
    };
    let _ = write!(
        out,
        "<dl class=\"facts inline\"><dt>Version</dt><dd><code>{version}</code></dd>\
         <dt>Instances</dt><dd>{count}</dd><dt>Health</dt><dd class=\"{health_class}\">{health}</dd>\
         <dt>Slot</dt><dd>{slot}, led by {leader}</dd></dl>",
        count = publishers.len(),
        health_class = if healthy < checked.len() { "warn" } else { "" },
        slot = shown.slot,
    );
    if publishers.is_empty() {
        if shown.records.is_ok() {
            out.push_str(
                "<p class=\"muted empty\">No instance is published. They appear here as they are, \
                 without a reload.</p>",
            );
        }
        return out;
    }
    out.push_str(
        "<div class=\"scroll\"><table class=\"instances stack\"><thead><tr><th>Instance</th>\
         <th>Data</th><th>Attributes</th><th>Client</th><th>Session</th><th>Kind</th>\
         <th>Health</th></tr></thead><tbody>",
    );
    for p in publishers {
        instance_row(&mut out, p, here, now_ms);
    }
    out.push_str("</tbody></table></div>");
    out
}

fn instance_row(out: &mut String, p: &Publisher, here: NodeId, now_ms: u64) {
    let data: Vec<String> = p
        .data
        .iter()
        .map(|d| format!("<code>{}</code>", esc(&String::from_utf8_lossy(d))))
        .collect();
    let attributes: Vec<String> = p
        .attributes
        .iter()
        .map(|(k, v)| format!("<span class=\"chip\">{}={}</span>", esc(k), esc(v)))
        .collect();
    let (client, session, kind) = if p.persistent {
        (
            "—".to_owned(),
            "— <span class=\"muted\">(kept by the meta group)</span>".to_owned(),
            "persistent",
        )
    } else {
        let this = if p.session == here {
            " <span class=\"badge\">this one</span>"
        } else {
            ""
        };
        (
            format!("<code>{}</code>", esc(&p.client_id)),
            format!("session {}{this}", p.session),
            "ephemeral",
        )
    };
    let check = p.check.as_ref().map_or_else(String::new, |c| {
        format!(
            " title=\"{} every {} ms, timeout {} ms, rise {}, fall {}\"",
            esc(&c.target),
            c.interval_ms,
            c.timeout_ms,
            c.rise,
            c.fall
        )
    });
    let health = match &p.health {
        None => format!("<td class=\"muted\"{check}>not checked</td>"),
        Some(h) if h.healthy && h.checked_ms == 0 => {
            format!(
                "<td class=\"good\"{check}>healthy <span class=\"muted\">(not probed yet)</span></td>"
            )
        }
        Some(h) if h.healthy => format!(
            "<td class=\"good\"{check}>healthy <span class=\"muted\">since {}</span></td>",
            ago(h.checked_ms, now_ms)
        ),
        Some(h) => format!(
            "<td class=\"bad\"{check}>unhealthy: {} <span class=\"muted\">({})</span></td>",
            esc(h.failure.as_deref().unwrap_or("failing")),
            ago(h.checked_ms, now_ms)
        ),
    };
    let _ = write!(
        out,
        "<tr data-instance=\"{id}\"><td><b>{id}</b></td><td>{data}</td><td>{attributes}</td>\
         <td>{client}</td><td>{session}</td><td><span class=\"kind {kind}\">{kind}</span></td>\
         {health}</tr>",
        id = esc(&p.register_id),
        data = data.join("<br>"),
        attributes = if attributes.is_empty() {
            "<span class=\"muted\">—</span>".to_owned()
        } else {
            attributes.join(" ")
        },
    );
}

fn stream_path(service: &ServiceId) -> String {
    format!("/ui/live/services/{}", encode_path(service.as_str()))
}

/// `GET /ui/services/{service}`.
pub(super) async fn page(
    State(slot): State<ConsoleSlot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Response {
    let here = format!("/ui/services/{}", encode_path(&service));
    let (console, viewer) = match admit(&slot, &headers, peer) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.page(&here),
    };
    let service: ServiceId = match service.parse() {
        Ok(service) => service,
        Err(e) => {
            let main = format!(
                "<h1>No such service</h1><p class=\"problem bad\">{}</p>",
                esc(&e.to_string())
            );
            let page = html::page("Service", "services", &viewer, false, &main);
            return (StatusCode::NOT_FOUND, document(page)).into_response();
        }
    };
    let shown = fetch(&console.shared, &service).await;
    let inner = render(&shown, console.shared.config().id, unix_millis());
    let main = format!(
        "<p class=\"crumbs\"><a href=\"/ui/services\">Services</a> / {ns} / {group}</p>\
         <h1>{name}</h1>{live}",
        ns = esc(service.namespace()),
        group = esc(service.group()),
        name = esc(service.data_id()),
        live = live_region(&stream_path(&service), &inner),
    );
    document(html::page(
        service.data_id(),
        "services",
        &viewer,
        true,
        &main,
    ))
}

/// The page's subscription in the hub, ended when the stream is dropped.
struct Watching {
    shared: Arc<Shared>,
    watcher: ConnId,
    service: ServiceId,
}

impl Watching {
    async fn start(shared: Arc<Shared>, service: ServiceId) -> Self {
        let (watcher, first) = shared.watch(service.clone());
        if first {
            shared.link_event(LinkEvent::Want(service.clone())).await;
        }
        Watching {
            shared,
            watcher,
            service,
        }
    }

    fn version(&self) -> Option<Version> {
        self.shared.hub().version(&self.service)
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.shared.unwatch(self.watcher);
    }
}

/// One open service page's stream.
struct ServiceLive {
    console: Arc<Console>,
    headers: HeaderMap,
    source: IpAddr,
    watching: Watching,
    /// The copy's version when the records were last asked for, and when that was.
    asked: Option<(Option<Version>, Instant)>,
    last: Option<String>,
    _viewing: ViewerGuard,
}

impl ServiceLive {
    async fn next(&mut self) -> Option<String> {
        let draining = self.console.shared.draining().clone();
        loop {
            if let Some((version, at)) = self.asked {
                tokio::select! {
                    _ = draining.cancelled() => return None,
                    _ = tokio::time::sleep(POLL) => {}
                }
                let moved = self.watching.version() != version;
                if !moved && at.elapsed() < REFRESH {
                    continue;
                }
            }
            self.console.access(&self.headers, self.source).ok()?;
            let version = self.watching.version();
            let shown = fetch(&self.console.shared, &self.watching.service).await;
            // A failed ask is retried within a second, not at every poll.
            let at = match shown.records {
                Ok(_) => Instant::now(),
                Err(_) => {
                    let retry_in = Duration::from_secs(1);
                    Instant::now()
                        .checked_sub(REFRESH - retry_in)
                        .unwrap_or_else(Instant::now)
                }
            };
            self.asked = Some((version, at));
            let here = self.console.shared.config().id;
            let html = render(&shown, here, unix_millis());
            if self.last.as_ref() != Some(&html) {
                self.last = Some(html.clone());
                return Some(html);
            }
        }
    }
}

/// `GET /ui/live/services/{service}`: the page's stream.
pub(super) async fn live(
    State(slot): State<ConsoleSlot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (console, _) = match admit(&slot, &headers, peer) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.plain(),
    };
    let service: ServiceId = match service.parse() {
        Ok(service) => service,
        Err(e) => return (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    };
    let Some(viewing) = console.viewing() else {
        return too_many_streams();
    };
    let live = ServiceLive {
        watching: Watching::start(console.shared.clone(), service).await,
        _viewing: viewing,
        console,
        headers,
        source: peer.ip(),
        asked: None,
        last: None,
    };
    let stream = stream::unfold(live, |mut live| async move {
        let html = live.next().await?;
        Some((
            Ok::<_, Infallible>(Event::default().event("main").data(html)),
            live,
        ))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
