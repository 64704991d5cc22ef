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

/// A server's admin view.
pub trait AdminSource: Send + Sync + 'static {
    /// Sets every gauge from the current state. Called before metrics are rendered.
    fn refresh_metrics(&self);
    /// The server's state as one JSON object whose top-level keys are its sections.
    fn status(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>>;
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

/// Sets `roster_build_info{version}` to 1.
pub fn build_info(role: &'static str) {
    metrics::gauge!("roster_build_info", "version" => env!("CARGO_PKG_VERSION"), "role" => role)
        .set(1.0);
}
