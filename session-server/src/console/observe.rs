//! The observer: one task per session server that keeps the console's picture and its event log.
//! It wakes on every new cluster view, when a page asks for a fresh picture, and on a timer —
//! every [`ACTIVE_PERIOD`] while a live stream is open, every [`IDLE_PERIOD`] otherwise — and
//! asks the meta group for its status (always) and every data server for its slot states (only
//! when someone looks: a live stream is open, or a page asked), each within [`ASK_TIMEOUT`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;
use roster_common::proto::{
    ClusterStatus, ClusterView, DataRequest, DataResponse, DataStatus, MetaRequest, MetaResponse,
    Role,
};
use roster_common::{NodeId, member, unix_millis};
use tokio_util::sync::CancellationToken;

use super::Console;
use super::events;
use super::picture::{Inputs, Picture};
use crate::shared::Shared;

/// How often the picture is renewed while a console page is open.
pub const ACTIVE_PERIOD: Duration = Duration::from_secs(1);
/// How often the meta group is asked when nobody looks (for the event log).
pub const IDLE_PERIOD: Duration = Duration::from_secs(5);
/// How long each question may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps `console`'s picture and events until `stop`.
pub(crate) async fn observe(console: Arc<Console>, stop: CancellationToken) {
    let shared = console.shared.clone();
    let mut views = shared.views();
    let mut last_view: Option<Arc<ClusterView>> = None;
    let mut last_status: Option<ClusterStatus> = None;
    loop {
        let active = console.viewers.load(Ordering::Relaxed) > 0;
        let period = if active { ACTIVE_PERIOD } else { IDLE_PERIOD };
        let ask_data = tokio::select! {
            _ = stop.cancelled() => return,
            changed = views.changed() => {
                if changed.is_err() {
                    return;
                }
                active
            }
            _ = console.refresh.notified() => true,
            _ = tokio::time::sleep(period) => active,
        };
        let view = shared.view();
        if let Some(view) = &view {
            let changes = match &last_view {
                None => vec![events::first_view(view)],
                Some(previous) if !Arc::ptr_eq(previous, view) => {
                    events::view_changes(previous, view)
                }
                Some(_) => Vec::new(),
            };
            console.events.lock().record(unix_millis(), changes);
            last_view = Some(view.clone());
        }
        let meta = meta_status(&shared).await;
        if let Ok(status) = &meta {
            if let Some(previous) = &last_status {
                let changes = events::status_changes(previous, status);
                console.events.lock().record(unix_millis(), changes);
            }
            last_status = Some(status.clone());
        }
        let data = match (&view, ask_data) {
            (Some(view), true) => Some(data_statuses(&shared, view).await),
            _ => None,
        };
        let mut picture = Picture::build(Inputs {
            now_ms: unix_millis(),
            view: view.as_deref(),
            local: console.local(),
            meta,
            data: data.as_ref(),
        });
        picture.events_logged = console.events.lock().logged();
        console.picture.send_replace(Arc::new(picture));
    }
}

/// The meta group's status from its leader, or from any node that answers when the leader does
/// not (without lag and leases, then).
async fn meta_status(shared: &Shared) -> Result<ClusterStatus, String> {
    let mut last = String::new();
    for local in [false, true] {
        let request = MetaRequest::Status { local };
        let ask = member::call_meta(
            shared.pool(),
            &shared.config().metas,
            &request,
            shared.config().max_frame,
            ASK_TIMEOUT,
        );
        match tokio::time::timeout(ASK_TIMEOUT * 2, ask).await {
            Ok(Ok(MetaResponse::Status(status))) => return Ok(status),
            Ok(Ok(other)) => last = format!("unexpected answer {other:?}"),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer within {:?}", ASK_TIMEOUT * 2),
        }
    }
    Err(last)
}

/// Every data server's answer to `Status`, asked at once.
async fn data_statuses(
    shared: &Shared,
    view: &ClusterView,
) -> BTreeMap<NodeId, Result<DataStatus, String>> {
    let asks = view.members_of(Role::Data).map(|m| async move {
        let ask = shared.call_data(&m.addr, &DataRequest::Status {});
        let answer = match tokio::time::timeout(ASK_TIMEOUT, ask).await {
            Ok(Ok(DataResponse::Status(status))) => Ok(status),
            Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
        };
        (m.id, answer)
    });
    join_all(asks).await.into_iter().collect()
}
