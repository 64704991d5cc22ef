//! Whether a one-shot request (publish, unpublish, list, register a persistent instance …) is
//! tried again after it failed, decided from the error and what the connection was doing alone;
//! `Inner::call` does the waiting.
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

use roster_common::Error;

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
