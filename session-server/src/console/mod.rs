//! The web console: a read-only view of the whole cluster at `/ui/` on the HTTP admin port,
//! served by every session server from pages rendered here and three small assets compiled into
//! the binary (`assets/`: a style sheet, a script of some sixty lines, an icon; no build step, no
//! request leaves the cluster).
//!
//! **Where the facts come from.** A session server already holds the cluster view the meta group
//! pushes (members, slot table, tokens) and its own counts. The observer ([`observe`]) adds what
//! only others know — the meta group's `Status` (leader, term, voters and their lag, every lease,
//! self-preservation) and each data server's `Status` (the state of every slot it holds) — and
//! folds it all into one [`picture::Picture`], which the overview and slots pages render. It asks
//! every second while a console page is open, and the meta group alone every 5 s otherwise, so an
//! idle console costs the cluster one small request per session server every 5 s. Comparing each
//! view and status with the previous one gives the events page ([`events`]). The services page
//! asks every data server for the services it leads, as `roster ls` does; a service's page asks
//! its slot leader for the records (`Records`, with the session holding each) and watches the
//! service through this server's hub like a subscriber does ([`service`]).
//!
//! **Live.** Each page is whole when fetched (so `curl` sees what exists) and then keeps itself
//! current: its `<main>` is replaced by what a server-sent-event stream under `/ui/live/` sends
//! ([`live`]) — the same rendering, sent again whenever it differs. A stream checks its viewer's
//! login before each update and ends when it is gone, or when the server shuts down.
//!
//! **Who may look** ([`auth`]): a token with `admin`, exchanged for a login cookie, or sent as
//! `Authorization: Bearer`; nothing where the cluster checks no tokens.
//!
//! Caveats: other session servers' connection and subscription counts are those they last
//! reported to the meta leader (every `--balance-interval-ms`, 5 s), and are blank when the meta
//! status did not come from the leader; the events page holds only what this server saw since it
//! started; a console page watching a service counts as one subscriber of it here.

mod auth;
mod events;
mod html;
mod live;
mod observe;
mod pages;
mod picture;
mod service;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use roster_common::acl::FailureLimiter;
use roster_common::unix_millis;
use tokio::sync::{Notify, watch};

use crate::shared::Shared;
use auth::{Logins, Refusal};
use events::EventLog;
use html::{Viewer, page};
use picture::{Local, Picture};

pub(crate) use observe::observe;

/// How long a page waits for the observer's fresh picture before rendering the last one.
const FRESH_WITHIN: Duration = Duration::from_secs(2);
/// Live streams one session server keeps open at once; more are refused with 503 (the page
/// still shows what it showed when loaded, and the script retries after a reload).
pub const MAX_STREAMS: usize = 64;

/// Where the HTTP admin port finds the console once the session server runs: empty before, when
/// every console path answers 503.
#[derive(Clone, Default)]
pub struct ConsoleSlot(Arc<OnceLock<Arc<Console>>>);

impl ConsoleSlot {
    pub(crate) fn install(&self, console: Arc<Console>) {
        let _ = self.0.set(console);
    }

    fn get(&self) -> Option<Arc<Console>> {
        self.0.get().cloned()
    }
}

/// The console of one session server: what its pages and streams share.
pub(crate) struct Console {
    shared: Arc<Shared>,
    advertise: String,
    logins: Mutex<Logins>,
    failures: Mutex<FailureLimiter>,
    events: Mutex<EventLog>,
    /// The latest picture, kept by the observer.
    picture: watch::Sender<Arc<Picture>>,
    /// Asks the observer for a fresh picture now.
    refresh: Notify,
    /// Live streams open: while any is, the observer asks every second.
    viewers: AtomicUsize,
}

impl Console {
    pub fn new(shared: Arc<Shared>, advertise: String) -> Arc<Self> {
        let console = Console {
            shared,
            advertise,
            logins: Mutex::default(),
            failures: Mutex::default(),
            events: Mutex::default(),
            picture: watch::channel(Arc::new(Picture::empty(Local::default()))).0,
            refresh: Notify::new(),
            viewers: AtomicUsize::new(0),
        };
        let local = console.local();
        console
            .picture
            .send_replace(Arc::new(Picture::empty(local)));
        Arc::new(console)
    }

    /// This session server's own counts, now.
    fn local(&self) -> Local {
        let shared = &self.shared;
        let counts = shared.hub().counts();
        let links = shared.data_links();
        Local {
            id: shared.config().id,
            addr: self.advertise.clone(),
            version: html::VERSION.to_owned(),
            connections: counts.connections,
            subscribers: counts.subscribers,
            publishers: shared.owned().len(),
            draining: shared.draining().is_cancelled(),
            links_wanted: links.wanted,
            links_up: links.up,
        }
    }

    /// A picture taken after this call, or the latest one if the observer takes longer than
    /// [`FRESH_WITHIN`].
    async fn fresh_picture(&self) -> Arc<Picture> {
        let mut pictures = self.picture.subscribe();
        let asked = unix_millis();
        self.refresh.notify_one();
        let deadline = tokio::time::sleep(FRESH_WITHIN);
        tokio::pin!(deadline);
        loop {
            let fresh = {
                let picture = pictures.borrow_and_update();
                picture.complete && picture.at_ms >= asked
            };
            if fresh {
                break;
            }
            tokio::select! {
                changed = pictures.changed() => if changed.is_err() { break },
                _ = &mut deadline => break,
            }
        }
        pictures.borrow().clone()
    }

    /// Counts a live stream as open until the guard drops.
    /// `None` when [`MAX_STREAMS`] are open already.
    fn viewing(self: &Arc<Self>) -> Option<ViewerGuard> {
        if self.viewers.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
            self.viewers.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.refresh.notify_one();
        Some(ViewerGuard(self.clone()))
    }
}

/// An open live stream (see [`Console::viewing`]).
struct ViewerGuard(Arc<Console>);

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The console's routes, under `/ui`.
pub fn router(slot: ConsoleSlot) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(overview))
        .route("/ui/services", get(services))
        .route("/ui/services/{*service}", get(service::page))
        .route("/ui/slots", get(slots))
        .route("/ui/events", get(events_page))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/assets/{file}", get(asset))
        .route("/ui/live/overview", get(live::overview))
        .route("/ui/live/slots", get(live::slots))
        .route("/ui/live/events", get(live::events))
        .route("/ui/live/services", get(live::services))
        .route("/ui/live/services/{*service}", get(service::live))
        .with_state(slot)
}

/// The answer to a stream past [`MAX_STREAMS`].
fn too_many_streams() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{MAX_STREAMS} console streams are open on this session server already\n"),
    )
        .into_response()
}

/// What every console handler starts with: the console, and who is looking.
fn admit(
    slot: &ConsoleSlot,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<(Arc<Console>, Viewer), Refusal> {
    let console = slot.get().ok_or(Refusal::Starting)?;
    let viewer = console.access(headers, peer.ip())?;
    Ok((console, viewer))
}

/// A whole HTML page with the headers every console page carries: no caching, and a content
/// security policy that allows only this origin's scripts, styles and streams.
pub(crate) fn document(html: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        ],
        html,
    )
        .into_response()
}

async fn overview(
    State(slot): State<ConsoleSlot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    picture_page(
        &slot,
        &headers,
        peer,
        ("Overview", "overview"),
        pages::overview,
    )
    .await
}

async fn services(
    State(slot): State<ConsoleSlot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (console, viewer) = match admit(&slot, &headers, peer) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.page("/ui/services"),
    };
    let filter = query
        .as_deref()
        .and_then(|q| auth::form_field(q, "q"))
        .unwrap_or_default();
    let listing = live::list_services(&console.shared).await;
    let main = pages::services(&listing, &filter);
    document(page("Services", "services", &viewer, true, &main))
}

async fn slots(
    State(slot): State<ConsoleSlot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    picture_page(&slot, &headers, peer, ("Slots", "slots"), pages::slots).await
}

/// A page drawn from the cluster picture (`render`), titled and found in the navigation as
/// `(title, name)`: at `/ui/` for the overview, `/ui/NAME` otherwise, kept live at
/// `/ui/live/NAME`.
async fn picture_page(
    slot: &ConsoleSlot,
    headers: &HeaderMap,
    peer: SocketAddr,
    (title, name): (&str, &str),
    render: fn(&Picture) -> String,
) -> Response {
    let path = if name == "overview" {
        "/ui/".to_owned()
    } else {
        format!("/ui/{name}")
    };
    let (console, viewer) = match admit(slot, headers, peer) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.page(&path),
    };
    let picture = console.fresh_picture().await;
    let main = render(&picture);
    document(page(
        title,
        name,
        &viewer,
        true,
        &html::live_region(&format!("/ui/live/{name}"), &main),
    ))
}

async fn events_page(
    State(slot): State<ConsoleSlot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let (console, viewer) = match admit(&slot, &headers, peer) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.page("/ui/events"),
    };
    let main = pages::events(&console.events.lock());
    document(page(
        "Events",
        "events",
        &viewer,
        true,
        &html::live_region("/ui/live/events", &main),
    ))
}

async fn login_form(State(slot): State<ConsoleSlot>, RawQuery(query): RawQuery) -> Response {
    let Some(console) = slot.get() else {
        return Refusal::Starting.plain();
    };
    if console.shared.view().is_some_and(|v| !v.acl.enabled) {
        return Redirect::to("/ui/").into_response();
    }
    let query = query.unwrap_or_default();
    let next = auth::safe_next(auth::form_field(&query, "next").as_deref());
    let ended = auth::form_field(&query, "ended").is_some();
    let body = auth::sign_in_form(&next, ended.then_some(auth::ENDED));
    document(page("Sign in", "", &Viewer::Anonymous, false, &body))
}

async fn login(
    State(slot): State<ConsoleSlot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let Some(console) = slot.get() else {
        return Refusal::Starting.plain();
    };
    let body = String::from_utf8_lossy(&body);
    let next = auth::safe_next(auth::form_field(&body, "next").as_deref());
    let token = auth::form_field(&body, "token").unwrap_or_default();
    match console.sign_in(&token, peer.ip()) {
        Ok(cookie) => {
            let mut response = Redirect::to(&next).into_response();
            response.headers_mut().insert(header::SET_COOKIE, cookie);
            response
        }
        Err(refusal) => refusal.page(&next),
    }
}

async fn logout(State(slot): State<ConsoleSlot>, headers: HeaderMap) -> Response {
    let mut response = Redirect::to("/ui/login").into_response();
    if let Some(console) = slot.get() {
        response
            .headers_mut()
            .insert(header::SET_COOKIE, console.sign_out(&headers));
    }
    response
}

/// The compiled-in assets. They hold no cluster data, so they are served to anyone (the sign-in
/// page needs the style sheet); `?v=VERSION` in their links makes caching them safe.
async fn asset(Path(file): Path<String>) -> Response {
    let (content_type, body): (&str, &'static [u8]) = match file.as_str() {
        "console.css" => (
            "text/css; charset=utf-8",
            include_bytes!("assets/console.css"),
        ),
        "console.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("assets/console.js"),
        ),
        "favicon.svg" => ("image/svg+xml", include_bytes!("assets/favicon.svg")),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}
