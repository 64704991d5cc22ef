//! The live half of the overview, slots, events and services pages: a server-sent-event stream
//! per open page that sends the page's `<main>` again, rendered as on a page load, whenever it
//! differs from what it sent last. The overview and slots follow the observer's pictures, the
//! events page its log; the services page asks the data tier again every [`SERVICES_PERIOD`].
//!
//! A stream checks its viewer's access before every update and ends when it is gone (the script
//! then reloads the page, which shows the sign-in form), or when the server starts shutting down.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use futures_util::stream;
use roster_common::proto::{DataRequest, DataResponse, Role};
use tokio::sync::watch;

use super::pages::{self, Listing};
use super::picture::Picture;
use super::{Console, ConsoleSlot, ViewerGuard, admit, too_many_streams};
use crate::shared::Shared;

/// How often an open services page asks the data tier again.
pub const SERVICES_PERIOD: Duration = Duration::from_secs(2);
/// How long a data server may take to list its services.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// Which page a stream renders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    Overview,
    Slots,
    Events,
    Services,
}

/// Asks every data server for the services it leads, as `roster ls` does, and merges what
/// answers; a data server that does not answer within [`LIST_TIMEOUT`] is listed as missing.
pub async fn list_services(shared: &Shared) -> Listing {
    let Some(view) = shared.view() else {
        return Listing {
            services: Vec::new(),
            missing: vec![(0, "no cluster view yet".into())],
        };
    };
    let asks = view.members_of(Role::Data).map(|m| async move {
        let ask = shared.call_data(&m.addr, &DataRequest::ListServices {});
        let answer = match tokio::time::timeout(LIST_TIMEOUT, ask).await {
            Ok(Ok(DataResponse::Services { services })) => Ok(services),
            Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {LIST_TIMEOUT:?}")),
        };
        (m.id, answer)
    });
    let mut listing = Listing::default();
    let mut all = Vec::new();
    for (id, answer) in join_all(asks).await {
        match answer {
            Ok(services) => all.extend(services),
            Err(e) => listing.missing.push((id, e)),
        }
    }
    listing.services = crate::conn::merge_services(all);
    listing
}

/// One open stream's state.
struct Live {
    console: Arc<Console>,
    headers: HeaderMap,
    source: IpAddr,
    page: Page,
    pictures: watch::Receiver<Arc<Picture>>,
    last: Option<String>,
    /// The event count the events page last rendered.
    events_logged: u64,
    _viewing: ViewerGuard,
}

impl Live {
    /// The next `<main>` worth sending; `None` ends the stream.
    async fn next(&mut self) -> Option<String> {
        loop {
            if self.last.is_some() {
                let draining = self.console.shared.draining().clone();
                let polled = self.page == Page::Services;
                tokio::select! {
                    _ = draining.cancelled() => return None,
                    changed = self.pictures.changed(), if !polled => changed.ok()?,
                    _ = tokio::time::sleep(SERVICES_PERIOD), if polled => {}
                }
            }
            self.console.access(&self.headers, self.source).ok()?;
            let Some(html) = self.render().await else {
                continue;
            };
            if self.last.as_ref() != Some(&html) {
                self.last = Some(html.clone());
                return Some(html);
            }
        }
    }

    /// The page's region now; `None` when there is nothing new to render from (a picture taken
    /// without asking the data servers, a picture with no new event).
    async fn render(&mut self) -> Option<String> {
        match self.page {
            Page::Overview | Page::Slots => {
                let picture = self.pictures.borrow_and_update().clone();
                if !picture.complete {
                    return None;
                }
                Some(match self.page {
                    Page::Overview => pages::overview(&picture),
                    _ => pages::slots(&picture),
                })
            }
            Page::Events => {
                let logged = self.pictures.borrow_and_update().events_logged;
                if self.last.is_some() && self.events_logged == logged {
                    return None;
                }
                self.events_logged = logged;
                Some(pages::events(&self.console.events.lock()))
            }
            Page::Services => {
                // The filter lives in the page (the script applies it to each update).
                let listing = list_services(&self.console.shared).await;
                Some(pages::services_list(&listing, ""))
            }
        }
    }
}

fn open(slot: &ConsoleSlot, headers: HeaderMap, peer: SocketAddr, page: Page) -> Response {
    let console = match admit(slot, &headers, peer) {
        Ok((console, _)) => console,
        Err(refusal) => return refusal.plain(),
    };
    let Some(viewing) = console.viewing() else {
        return too_many_streams();
    };
    let live = Live {
        pictures: console.picture.subscribe(),
        _viewing: viewing,
        console,
        headers,
        source: peer.ip(),
        page,
        last: None,
        events_logged: 0,
    };
    let stream = stream::unfold(live, |mut live| async move {
        let html = live.next().await?;
        let event = Event::default().event("main").data(html);
        Some((Ok::<_, Infallible>(event), live))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

macro_rules! live_route {
    ($name:ident, $page:expr) => {
        pub(super) async fn $name(
            State(slot): State<ConsoleSlot>,
            ConnectInfo(peer): ConnectInfo<SocketAddr>,
            headers: HeaderMap,
        ) -> Response {
            open(&slot, headers, peer, $page)
        }
    };
}

live_route!(overview, Page::Overview);
live_route!(slots, Page::Slots);
live_route!(events, Page::Events);
live_route!(services, Page::Services);
