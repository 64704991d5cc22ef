//! The HTTP admin port: `/healthz` (the process is up), `/readyz` (the server can do its job),
//! `/metrics` (Prometheus text format), the JSON admin API under `/admin/`, and whatever routes
//! the server adds (a session server's web console under `/ui/`, which checks access itself).
//!
//! The first three are open: probes and scrapers carry no credentials, and no metric names a
//! secret. `/admin` shows the cluster's topology and is for operators: where the cluster checks
//! tokens, it answers only `Authorization: Bearer <token>` with a token that holds `admin` in every
//! namespace (`*`) — 401 without a valid token, 403 with one that lacks it, 429 for a source that
//! keeps failing.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use roster_common::acl::{ANY_NAMESPACE, FailureLimiter, Permission, failure_reason};
use roster_common::admin::Admin;
use roster_common::unix_millis;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Latency buckets, in seconds, for every `*_seconds` histogram: 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The process-wide metrics recorder, installed on first use.
fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("non-empty buckets");
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    warn!(error = %e, "metrics are not recorded");
                    None
                }
            }
        })
        .as_ref()
}

#[derive(Clone)]
struct AppState {
    ready: watch::Receiver<bool>,
    admin: Admin,
    failures: Arc<Mutex<FailureLimiter>>,
}

/// Binds `addr` and serves the admin routes, and the server's own `routes`, until `shutdown`.
/// Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    ready: watch::Receiver<bool>,
    admin: Admin,
    routes: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the HTTP admin port {addr}"))?;
    let local = listener.local_addr()?;
    if let Some(handle) = recorder() {
        let handle = handle.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        });
    }
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin", get(admin_index))
        .route("/admin/{section}", get(admin_section))
        .with_state(AppState {
            ready,
            admin,
            failures: Arc::default(),
        })
        .merge(routes);
    info!(addr = %local, "HTTP admin port serving /healthz, /readyz, /metrics and /admin");
    let task = tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((local, task))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if *state.ready.borrow() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let Some(handle) = recorder() else {
        return (StatusCode::NOT_FOUND, "metrics are not recorded\n").into_response();
    };
    if let Some(source) = state.admin.source() {
        source.refresh_metrics();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

async fn status_of(state: &AppState) -> Option<serde_json::Value> {
    let source = state.admin.source()?;
    Some(source.status().await)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    let mut body = serde_json::to_string_pretty(&value).unwrap_or_default();
    body.push('\n');
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The answer to an operator's request that may not pass (`None`: it may): 503 before the server
/// knows the cluster's access rules, 401 / 403 / 429 as the module says.
fn refusal(state: &AppState, headers: &HeaderMap, source: IpAddr) -> Option<Response> {
    let starting = || {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "the server is still starting"}),
        )
    };
    let Some(acl) = state.admin.source().and_then(|source| source.acl()) else {
        return Some(starting());
    };
    if !acl.enabled {
        return None;
    }
    let now = Instant::now();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let checked = state
        .failures
        .lock()
        .check(source, now)
        .and_then(|()| acl.authenticate(token, unix_millis()))
        .and_then(|who| who.check(ANY_NAMESPACE, Permission::Admin));
    let Err(e) = checked else {
        return None;
    };
    let reason = failure_reason(&e);
    metrics::counter!("roster_auth_failures_total", "reason" => reason).increment(1);
    let status = match reason {
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "permission_denied" => StatusCode::FORBIDDEN,
        _ => {
            state.failures.lock().failed(source, now);
            StatusCode::UNAUTHORIZED
        }
    };
    let mut response = json(status, serde_json::json!({"error": e.to_string()}));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"roster\""),
        );
    }
    Some(response)
}

/// `/admin`: the whole status of the server.
async fn admin_index(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refusal(&state, &headers, peer.ip()) {
        return refused;
    }
    match status_of(&state).await {
        Some(status) => json(StatusCode::OK, status),
        None => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "the server is still starting"}),
        ),
    }
}

/// `/admin/{section}`: one top-level section of the status.
async fn admin_section(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(section): Path<String>,
) -> Response {
    if let Some(refused) = refusal(&state, &headers, peer.ip()) {
        return refused;
    }
    let Some(status) = status_of(&state).await else {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "the server is still starting"}),
        );
    };
    match status.get(&section) {
        Some(value) => json(StatusCode::OK, value.clone()),
        None => {
            let sections: Vec<&String> = status
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": format!("no section {section:?}"), "sections": sections}),
            )
        }
    }
}
