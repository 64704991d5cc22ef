//! Whether a one-shot request (publish, unpublish, list, register a persistent instance …) is
//! tried again after it failed, decided from the error and what the connection was doing alone;
//! [`Inner::call`] does the waiting.
//!
//! Two failures are worth another try. A connection that broke, or no connection at all: wait for
//! the next one the driver makes (a few times at most). A session server that answered
//! `Unavailable`: it is there but cannot serve the request yet (it has no cluster view, the meta
//! group is electing a leader), so pause and ask again, until the request's deadline. Anything
//! else is the answer.
//!
//! A request whose connection broke after it was sent may have been carried out all the same;
//! [`maybe_applied`] says so, for the callers to whom the difference matters (removing something
//! twice answers `NotFound` the second time).

use std::time::Duration;

use roster_common::proto::{ClientRequest, ClientResponse};
use roster_common::{Error, Result, rpc};
use tokio::time::Instant;

use crate::Inner;

/// Attempts of one request across broken connections, the first included.
pub(crate) const MAX_CONNECTION_ATTEMPTS: u32 = 3;
/// The pause after a server's first `Unavailable`; doubled after each further one.
pub(crate) const UNAVAILABLE_PAUSE: Duration = Duration::from_millis(200);
/// The longest pause between two attempts on a server that answers `Unavailable`.
pub(crate) const MAX_UNAVAILABLE_PAUSE: Duration = Duration::from_secs(2);

/// What to do after attempt number `attempt` (from 1) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Wait for a connection other than the one that failed, then try there.
    OnNextConnection,
    /// Pause this long, then try on whatever connection is current.
    After(Duration),
    /// Return the error.
    GiveUp,
}

/// The next step after `error`. `connected`: the attempt went out on a connection (rather than
/// failing for want of one); `left`: the time until the request's deadline.
pub(crate) fn after_failure(error: &Error, connected: bool, attempt: u32, left: Duration) -> Retry {
    if left.is_zero() {
        return Retry::GiveUp;
    }
    match error {
        // Only the server puts `Unavailable` on a working connection: it answered.
        Error::Unavailable(_) if connected => {
            let doublings = attempt.saturating_sub(1).min(8);
            let pause = (UNAVAILABLE_PAUSE * (1 << doublings)).min(MAX_UNAVAILABLE_PAUSE);
            Retry::After(pause.min(left))
        }
        Error::Connection(_) | Error::Unavailable(_) if attempt < MAX_CONNECTION_ATTEMPTS => {
            Retry::OnNextConnection
        }
        _ => Retry::GiveUp,
    }
}

/// Whether a request that failed with `error` on a connection may have reached the server and
/// been carried out: the connection broke while the answer was awaited.
pub(crate) fn maybe_applied(error: &Error, connected: bool) -> bool {
    connected && matches!(error, Error::Connection(_))
}

impl Inner {
    /// Sends `request` on the current connection. If there is none, or it breaks, waits (up to
    /// the request timeout) for the next one and tries there; a server that answers
    /// `Unavailable` is asked again after a pause (see `retry`).
    pub(crate) async fn call(&self, request: &ClientRequest) -> Result<ClientResponse> {
        self.call_noting_resends(request).await.0
    }

    /// As [`Inner::call`], also telling whether the request was sent again after an attempt that
    /// may have been carried out (its connection broke while the answer was awaited).
    pub(crate) async fn call_noting_resends(
        &self,
        request: &ClientRequest,
    ) -> (Result<ClientResponse>, bool) {
        let timeout = self.config.request_timeout();
        let deadline = Instant::now() + timeout;
        let permit = tokio::time::timeout(timeout, self.app_requests.acquire()).await;
        let _permit = match permit {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return (Err(Error::Unavailable("client closed".into())), false),
            Err(_) => {
                let error = Error::Timeout(format!(
                    "{} requests stayed in flight for {timeout:?} (max_in_flight)",
                    self.config.max_in_flight
                ));
                return (Err(error), false);
            }
        };
        let mut attempt = 0;
        let mut maybe_applied = false;
        let mut resent = false;
        loop {
            attempt += 1;
            resent |= maybe_applied;
            let live = self.live.read().clone();
            let result = match &live {
                Some(live) => rpc::call(&live.conn, request, self.config.max_frame, timeout).await,
                None => Err(Error::Unavailable(
                    "not connected to a session server".into(),
                )),
            };
            let error = match result {
                Ok(response) => return (Ok(response), resent),
                Err(error) => error,
            };
            let connected = live.is_some();
            maybe_applied |= self::maybe_applied(&error, connected);
            let left = deadline.saturating_duration_since(Instant::now());
            match after_failure(&error, connected, attempt, left) {
                Retry::GiveUp => return (Err(error), resent),
                Retry::After(pause) => {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return (Err(error), resent),
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                Retry::OnNextConnection => {
                    let failed = live.map(|l| l.conn.stable_id());
                    if !self.wait_for_other_connection(failed, left).await {
                        let error = if connected {
                            Error::Unavailable(format!(
                                "no session server reachable (the last one: {error})"
                            ))
                        } else {
                            Error::Unavailable("no session server reachable".into())
                        };
                        return (Err(error), resent);
                    }
                }
            }
        }
    }

    /// Waits up to `left` for a connection other than `failed` to be in use; false if none came
    /// or the client closed.
    async fn wait_for_other_connection(&self, failed: Option<usize>, left: Duration) -> bool {
        let mut state = self.state_tx.subscribe();
        let next = async {
            loop {
                if self.shutdown.is_cancelled() {
                    return false;
                }
                let current = self.live.read().as_ref().map(|l| l.conn.stable_id());
                if current.is_some() && current != failed {
                    return true;
                }
                if state.changed().await.is_err() {
                    return false;
                }
            }
        };
        matches!(tokio::time::timeout(left, next).await, Ok(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOTS: Duration = Duration::from_secs(10);

    fn lost() -> Error {
        Error::Connection("reset".into())
    }

    fn busy() -> Error {
        Error::Unavailable("meta group electing".into())
    }

    #[test]
    fn a_broken_connection_is_retried_on_the_next_one_a_few_times() {
        assert_eq!(
            after_failure(&lost(), true, 1, LOTS),
            Retry::OnNextConnection
        );
        assert_eq!(
            after_failure(&lost(), true, 2, LOTS),
            Retry::OnNextConnection
        );
        assert_eq!(after_failure(&lost(), true, 3, LOTS), Retry::GiveUp);
        // Not connected at all: the SDK's own `Unavailable`.
        assert_eq!(
            after_failure(&busy(), false, 1, LOTS),
            Retry::OnNextConnection
        );
        assert_eq!(after_failure(&busy(), false, 3, LOTS), Retry::GiveUp);
    }

    #[test]
    fn a_server_that_cannot_serve_yet_is_asked_again_after_a_growing_pause() {
        assert_eq!(
            after_failure(&busy(), true, 1, LOTS),
            Retry::After(UNAVAILABLE_PAUSE)
        );
        assert_eq!(
            after_failure(&busy(), true, 2, LOTS),
            Retry::After(UNAVAILABLE_PAUSE * 2)
        );
        assert_eq!(
            after_failure(&busy(), true, 30, LOTS),
            Retry::After(MAX_UNAVAILABLE_PAUSE)
        );
        // Never past the deadline.
        let left = Duration::from_millis(50);
        assert_eq!(after_failure(&busy(), true, 1, left), Retry::After(left));
        assert_eq!(
            after_failure(&busy(), true, 1, Duration::ZERO),
            Retry::GiveUp
        );
    }

    #[test]
    fn answers_are_not_retried() {
        for error in [
            Error::NotFound("x".into()),
            Error::InvalidArgument("check: bad".into()),
            Error::PermissionDenied("ns".into()),
            Error::Timeout("10 s".into()),
        ] {
            assert_eq!(
                after_failure(&error, true, 1, LOTS),
                Retry::GiveUp,
                "{error}"
            );
        }
    }

    #[test]
    fn only_a_connection_broken_in_flight_leaves_the_outcome_unknown() {
        assert!(maybe_applied(&lost(), true));
        assert!(!maybe_applied(&lost(), false));
        assert!(!maybe_applied(&busy(), true));
        assert!(!maybe_applied(&Error::NotFound("x".into()), true));
    }
}
