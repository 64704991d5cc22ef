//! What a server shows on its HTTP admin port besides health: a JSON account of its state, and the
//! gauges refreshed just before each metrics scrape. The HTTP layer (in the `roster` binary) knows
//! nothing of the servers; a server installs an [`AdminSource`] into its [`Admin`] when it starts.
//!
//! Also the metric helpers every server uses, so names and labels are spelled once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::Error;
use crate::acl::AclView;

/// A server's admin view.
pub trait AdminSource: Send + Sync + 'static {
    /// Sets every gauge from the current state. Called before metrics are rendered.
    fn refresh_metrics(&self);
    /// The server's state as one JSON object whose top-level keys are its sections.
    fn status(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>>;
    /// The cluster's access rules as this server last received them; `None` before it knows.
    fn acl(&self) -> Option<AclView>;
}

/// A slot for a server's [`AdminSource`], handed out before the server runs.
#[derive(Clone, Default)]
pub struct Admin {
    source: Arc<RwLock<Option<Arc<dyn AdminSource>>>>,
}

impl Admin {
    pub fn install(&self, source: Arc<dyn AdminSource>) {
        *self.source.write() = Some(source);
    }

    /// The installed source; `None` before the server has started.
    pub fn source(&self) -> Option<Arc<dyn AdminSource>> {
        self.source.read().clone()
    }
}

/// The outcome label of a request: `ok`, or the name of its error code.
pub fn outcome<T>(result: &crate::Result<T>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => outcome_of(e),
    }
}

fn outcome_of(e: &Error) -> String {
    match e.code() {
        Some(code) => format!("{code:?}"),
        None => "Unknown".to_owned(),
    }
}

/// Counts one request served by `role` (`meta`, `data`, `session`): `roster_requests_total`.
pub fn count_request<T>(role: &'static str, request: &'static str, result: &crate::Result<T>) {
    metrics::counter!(
        "roster_requests_total",
        "role" => role,
        "request" => request,
        "result" => outcome(result),
    )
    .increment(1);
}

/// Registers `role`'s metrics and sets `roster_build_info{version, role}` to 1.
pub fn build_info(role: &'static str) {
    register_metrics(role);
    metrics::gauge!("roster_build_info", "version" => env!("CARGO_PKG_VERSION"), "role" => role)
        .set(1.0);
}

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric a server exports: the list docs/OPERATIONS.md documents and dashboards may use.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: MetricKind,
    /// The server role that exports it, or `"all"`.
    pub role: &'static str,
    /// Labels whose values are known in advance, with those values (zeroed at start).
    pub labels: &'static [(&'static str, &'static [&'static str])],
    pub help: &'static str,
}

const ROLES: &[&str] = &["data", "session"];

use MetricKind::{Counter, Gauge, Histogram};

/// Every metric Roster's servers export.
pub const METRICS: &[MetricDef] = &[
    MetricDef {
        name: "roster_build_info",
        kind: Gauge,
        role: "all",
        labels: &[],
        help: "1, labelled with the version and role of the running server",
    },
    MetricDef {
        name: "roster_requests_total",
        kind: Counter,
        role: "all",
        labels: &[],
        help: "requests served, by role, request and result (ok or the error code name)",
    },
    MetricDef {
        name: "roster_raft_term",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "current Raft term",
    },
    MetricDef {
        name: "roster_raft_leader_id",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "id of the meta node this node believes leads (0: none)",
    },
    MetricDef {
        name: "roster_raft_is_leader",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "1 on the leading meta node",
    },
    MetricDef {
        name: "roster_raft_last_log_index",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "index of the last Raft log entry stored",
    },
    MetricDef {
        name: "roster_raft_commit_index",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "index of the last Raft log entry known committed",
    },
    MetricDef {
        name: "roster_raft_applied_index",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "index of the last Raft log entry applied to the state",
    },
    MetricDef {
        name: "roster_raft_append_seconds",
        kind: Histogram,
        role: "meta",
        labels: &[],
        help: "time to append entries to the Raft log, fsync included",
    },
    MetricDef {
        name: "roster_meta_members",
        kind: Gauge,
        role: "meta",
        labels: &[("role", ROLES)],
        help: "data and session servers in the committed membership",
    },
    MetricDef {
        name: "roster_meta_table_epoch",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "epoch of the committed slot table",
    },
    MetricDef {
        name: "roster_meta_persistent_instances",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "persistent instances stored by the meta group",
    },
    MetricDef {
        name: "roster_lease_renewals_total",
        kind: Counter,
        role: "meta",
        labels: &[("role", ROLES)],
        help: "lease renewals accepted (by the leader)",
    },
    MetricDef {
        name: "roster_lease_expiries_total",
        kind: Counter,
        role: "meta",
        labels: &[("role", ROLES)],
        help: "members removed because their lease lapsed (by the leader)",
    },
    MetricDef {
        name: "roster_self_preservation",
        kind: Gauge,
        role: "meta",
        labels: &[],
        help: "1 while self-preservation holds off session expiries",
    },
    MetricDef {
        name: "roster_data_slots",
        kind: Gauge,
        role: "data",
        labels: &[("state", &["leading", "moving", "following", "fetching"])],
        help: "slots held, by state",
    },
    MetricDef {
        name: "roster_data_services",
        kind: Gauge,
        role: "data",
        labels: &[],
        help: "services with publishers in the slots this server leads",
    },
    MetricDef {
        name: "roster_data_publishers",
        kind: Gauge,
        role: "data",
        labels: &[],
        help: "publishers in the slots this server leads",
    },
    MetricDef {
        name: "roster_data_writes_total",
        kind: Counter,
        role: "data",
        labels: &[],
        help: "publisher changes applied as slot leader",
    },
    MetricDef {
        name: "roster_data_persistent_instances",
        kind: Gauge,
        role: "data",
        labels: &[],
        help: "persistent instances in the slots this server leads",
    },
    MetricDef {
        name: "roster_data_checked_instances",
        kind: Gauge,
        role: "data",
        labels: &[("health", &["healthy", "unhealthy"])],
        help: "instances this server health-checks (the slots it leads), by health",
    },
    MetricDef {
        name: "roster_health_checks_total",
        kind: Counter,
        role: "data",
        labels: &[("result", &["success", "failure"])],
        help: "health-check probes run, by result",
    },
    MetricDef {
        name: "roster_health_check_failures_total",
        kind: Counter,
        role: "data",
        labels: &[(
            "reason",
            &["refused", "timeout", "http_status", "resolve", "other"],
        )],
        help: "failed health-check probes, by reason",
    },
    MetricDef {
        name: "roster_health_check_duration_seconds",
        kind: Histogram,
        role: "data",
        labels: &[],
        help: "time a health-check probe took, failures included",
    },
    MetricDef {
        name: "roster_data_repairs_total",
        kind: Counter,
        role: "data",
        labels: &[("kind", &["slot_fetch", "drift", "lag", "session_sync"])],
        help: "repairs: followed slots fetched whole, drift found, session records synced",
    },
    MetricDef {
        name: "roster_session_connections",
        kind: Gauge,
        role: "session",
        labels: &[],
        help: "client connections",
    },
    MetricDef {
        name: "roster_session_publishers",
        kind: Gauge,
        role: "session",
        labels: &[],
        help: "publishers of this server's clients",
    },
    MetricDef {
        name: "roster_session_subscribers",
        kind: Gauge,
        role: "session",
        labels: &[],
        help: "subscriptions of this server's clients",
    },
    MetricDef {
        name: "roster_session_push_seconds",
        kind: Histogram,
        role: "session",
        labels: &[],
        help: "from a change reaching the session to the push carrying it written to a subscriber's stream",
    },
    MetricDef {
        name: "roster_session_push_pending",
        kind: Gauge,
        role: "session",
        labels: &[],
        help: "connection-service pairs with a push due that the connection's writer has not taken yet",
    },
    MetricDef {
        name: "roster_session_pushes_total",
        kind: Counter,
        role: "session",
        labels: &[("kind", &["snapshot", "delta", "goaway"])],
        help: "push frames written to clients, by kind",
    },
    MetricDef {
        name: "roster_session_push_bytes_total",
        kind: Counter,
        role: "session",
        labels: &[],
        help: "bytes of push frames written to clients",
    },
    MetricDef {
        name: "roster_session_slow_consumers_total",
        kind: Counter,
        role: "session",
        labels: &[],
        help: "connections cut off because their push stream made no progress for --push-stall-ms",
    },
    MetricDef {
        name: "roster_session_changes_total",
        kind: Counter,
        role: "session",
        labels: &[("outcome", &["applied", "stale", "held", "fetch"])],
        help: "changes of subscribed services heard from slot leaders, by what became of them (fetch: a gap, the datum was fetched)",
    },
    MetricDef {
        name: "roster_auth_failures_total",
        kind: Counter,
        role: "all",
        labels: &[(
            "reason",
            &[
                "client_id_in_use",
                "missing_token",
                "invalid_token",
                "expired_token",
                "rate_limited",
                "permission_denied",
            ],
        )],
        help: "connections, requests and admin API calls refused for who they are, by reason",
    },
    MetricDef {
        name: "roster_session_client_returns_total",
        kind: Counter,
        role: "session",
        labels: &[],
        help: "clients that came back within --client-grace-ms and kept the publishers of their lost connection",
    },
    MetricDef {
        name: "roster_session_goaways_total",
        kind: Counter,
        role: "session",
        labels: &[],
        help: "GoAway pushes sent (draining or rebalancing)",
    },
    MetricDef {
        name: "roster_session_slot_syncs_total",
        kind: Counter,
        role: "session",
        labels: &[],
        help: "slots whose records this session synced to a slot leader",
    },
    MetricDef {
        name: "roster_dns_queries_total",
        kind: Counter,
        role: "session",
        labels: &[
            ("qtype", &["A", "AAAA", "SRV", "TXT", "ANY", "SOA", "other"]),
            (
                "rcode",
                &[
                    "NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP",
                ],
            ),
        ],
        help: "DNS queries answered (with --dns), by query type and response code",
    },
    MetricDef {
        name: "roster_dns_query_duration_seconds",
        kind: Histogram,
        role: "session",
        labels: &[],
        help: "from a DNS query read to its answer ready, a first query's wait for its snapshot included",
    },
    MetricDef {
        name: "roster_dns_dropped_total",
        kind: Counter,
        role: "session",
        labels: &[("reason", &["malformed", "rate_limited", "busy"])],
        help: "DNS packets dropped unanswered: not a DNS query, past --dns-qps-per-source, or too many waiting",
    },
    MetricDef {
        name: "roster_dns_truncated_total",
        kind: Counter,
        role: "session",
        labels: &[],
        help: "DNS answers truncated to fit a UDP buffer (the client asks again over TCP)",
    },
    MetricDef {
        name: "roster_dns_watched_services",
        kind: Gauge,
        role: "session",
        labels: &[],
        help: "services watched for DNS queries",
    },
];

/// Describes every metric of `role` to the recorder and zeroes the counters whose labels are
/// known, so series exist from the start (a `rate()` over them works before the first event).
pub fn register_metrics(role: &'static str) {
    for m in METRICS.iter().filter(|m| m.role == role || m.role == "all") {
        match m.kind {
            Counter => metrics::describe_counter!(m.name, m.help),
            Gauge => metrics::describe_gauge!(m.name, m.help),
            Histogram => metrics::describe_histogram!(m.name, metrics::Unit::Seconds, m.help),
        }
        if m.kind != Counter {
            continue;
        }
        match m.labels {
            [] if m.name != "roster_requests_total" => metrics::counter!(m.name).absolute(0),
            [(label, values)] => {
                for value in *values {
                    metrics::counter!(m.name, *label => *value).absolute(0);
                }
            }
            _ => {}
        }
    }
}
