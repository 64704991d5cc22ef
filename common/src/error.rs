//! The error type that crosses the wire.
//!
//! Every failure a peer can report has a stable numeric [`ErrorCode`] (documented in
//! `docs/PROTOCOL.md`), a human message, and for the codes that need it a structured detail
//! (`leader` for `NotLeader`, `retry_after_ms` for `SlotMoving`). On the wire an error is a
//! [`WireError`]; in Rust it is an [`Error`], which callers match on or classify with
//! [`Error::is_retryable`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The closed set of error codes. Numbers never change meaning; new codes may be added, and a
/// receiver maps a code it does not know to [`Error::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    Internal = 1,
    BadFrame = 2,
    FrameTooLarge = 3,
    UnexpectedMessage = 4,
    UnsupportedVersion = 5,
    Unauthenticated = 6,
    InvalidArgument = 7,
    LimitExceeded = 8,
    NotFound = 9,
    NotLeader = 10,
    SlotMoving = 11,
    NoQuorum = 12,
    Overloaded = 13,
    Unavailable = 14,
    ClusterMismatch = 15,
    UnknownMember = 16,
    ShuttingDown = 17,
    HelloRequired = 18,
    PermissionDenied = 19,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::Internal,
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnexpectedMessage,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthenticated,
        ErrorCode::InvalidArgument,
        ErrorCode::LimitExceeded,
        ErrorCode::NotFound,
        ErrorCode::NotLeader,
        ErrorCode::SlotMoving,
        ErrorCode::NoQuorum,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
        ErrorCode::ClusterMismatch,
        ErrorCode::UnknownMember,
        ErrorCode::ShuttingDown,
        ErrorCode::HelloRequired,
        ErrorCode::PermissionDenied,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    pub fn from_u16(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u16() == code)
    }
}

/// An error as it travels: `{code, message, leader?, retry_after_ms?}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: u16,
    pub message: String,
    /// For `NotLeader`: the address of the node believed to lead, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// For `SlotMoving`: how long to wait before retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// Everything that can go wrong talking to or inside Roster.
///
/// The variants up to `PermissionDenied` cross the wire with the code of the same name. `Connection`
/// and `Timeout` are local: they describe the transport, never a peer's answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("internal error: {0}")]
    Internal(String),
    #[error("malformed frame: {0}")]
    BadFrame(String),
    #[error("frame too large: {0}")]
    FrameTooLarge(String),
    #[error("unexpected message: {0}")]
    UnexpectedMessage(String),
    #[error("unsupported protocol version: {0}")]
    UnsupportedVersion(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("not the leader{}", leader.as_ref().map(|l| format!("; try {l}")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
    #[error("slot is moving; retry after {} ms", retry_after.as_millis())]
    SlotMoving { retry_after: Duration },
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("cluster mismatch: {0}")]
    ClusterMismatch(String),
    #[error("unknown member: {0}")]
    UnknownMember(String),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("send Hello first: {0}")]
    HelloRequired(String),
    /// The caller is who it says, but may not do this: a record another client owns, or a
    /// permission its token lacks.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A code this build does not know, from a newer peer.
    #[error("error code {code}: {message}")]
    Unknown { code: u16, message: String },
    /// The transport failed: could not connect, or the connection or stream broke.
    #[error("connection: {0}")]
    Connection(String),
    /// No answer within the deadline.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl Error {
    /// The wire code, or `None` for the local-only variants.
    pub fn code(&self) -> Option<ErrorCode> {
        use ErrorCode as C;
        Some(match self {
            Error::Internal(_) => C::Internal,
            Error::BadFrame(_) => C::BadFrame,
            Error::FrameTooLarge(_) => C::FrameTooLarge,
            Error::UnexpectedMessage(_) => C::UnexpectedMessage,
            Error::UnsupportedVersion(_) => C::UnsupportedVersion,
            Error::Unauthenticated(_) => C::Unauthenticated,
            Error::InvalidArgument(_) => C::InvalidArgument,
            Error::LimitExceeded(_) => C::LimitExceeded,
            Error::NotFound(_) => C::NotFound,
            Error::NotLeader { .. } => C::NotLeader,
            Error::SlotMoving { .. } => C::SlotMoving,
            Error::NoQuorum(_) => C::NoQuorum,
            Error::Overloaded(_) => C::Overloaded,
            Error::Unavailable(_) => C::Unavailable,
            Error::ClusterMismatch(_) => C::ClusterMismatch,
            Error::UnknownMember(_) => C::UnknownMember,
            Error::ShuttingDown => C::ShuttingDown,
            Error::HelloRequired(_) => C::HelloRequired,
            Error::PermissionDenied(_) => C::PermissionDenied,
            Error::Unknown { .. } | Error::Connection(_) | Error::Timeout(_) => return None,
        })
    }

    /// Whether the same request may succeed if tried again later (possibly elsewhere).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. }
                | Error::SlotMoving { .. }
                | Error::NoQuorum(_)
                | Error::Overloaded(_)
                | Error::Unavailable(_)
                | Error::ShuttingDown
                | Error::Connection(_)
                | Error::Timeout(_)
        )
    }

    /// The form that crosses the wire. Local-only variants travel as `Internal`/`Unavailable`.
    pub fn to_wire(&self) -> WireError {
        let (code, message) = match self {
            Error::Internal(m)
            | Error::BadFrame(m)
            | Error::FrameTooLarge(m)
            | Error::UnexpectedMessage(m)
            | Error::UnsupportedVersion(m)
            | Error::Unauthenticated(m)
            | Error::InvalidArgument(m)
            | Error::LimitExceeded(m)
            | Error::NotFound(m)
            | Error::NoQuorum(m)
            | Error::Overloaded(m)
            | Error::Unavailable(m)
            | Error::ClusterMismatch(m)
            | Error::UnknownMember(m)
            | Error::HelloRequired(m)
            | Error::PermissionDenied(m) => (self.code().map_or(1, ErrorCode::as_u16), m.clone()),
            Error::NotLeader { .. } | Error::SlotMoving { .. } | Error::ShuttingDown => {
                (self.code().map_or(1, ErrorCode::as_u16), self.to_string())
            }
            Error::Unknown { code, message } => (*code, message.clone()),
            Error::Connection(_) | Error::Timeout(_) => {
                (ErrorCode::Unavailable.as_u16(), self.to_string())
            }
        };
        WireError {
            code,
            message,
            leader: match self {
                Error::NotLeader { leader } => leader.clone(),
                _ => None,
            },
            retry_after_ms: match self {
                Error::SlotMoving { retry_after } => Some(retry_after.as_millis() as u64),
                _ => None,
            },
        }
    }

    /// The error a peer reported.
    pub fn from_wire(wire: WireError) -> Self {
        use ErrorCode as C;
        let WireError {
            code,
            message: m,
            leader,
            retry_after_ms,
        } = wire;
        let Some(known) = ErrorCode::from_u16(code) else {
            return Error::Unknown { code, message: m };
        };
        match known {
            C::Internal => Error::Internal(m),
            C::BadFrame => Error::BadFrame(m),
            C::FrameTooLarge => Error::FrameTooLarge(m),
            C::UnexpectedMessage => Error::UnexpectedMessage(m),
            C::UnsupportedVersion => Error::UnsupportedVersion(m),
            C::Unauthenticated => Error::Unauthenticated(m),
            C::InvalidArgument => Error::InvalidArgument(m),
            C::LimitExceeded => Error::LimitExceeded(m),
            C::NotFound => Error::NotFound(m),
            C::NotLeader => Error::NotLeader { leader },
            C::SlotMoving => Error::SlotMoving {
                retry_after: Duration::from_millis(retry_after_ms.unwrap_or(100)),
            },
            C::NoQuorum => Error::NoQuorum(m),
            C::Overloaded => Error::Overloaded(m),
            C::Unavailable => Error::Unavailable(m),
            C::ClusterMismatch => Error::ClusterMismatch(m),
            C::UnknownMember => Error::UnknownMember(m),
            C::ShuttingDown => Error::ShuttingDown,
            C::HelloRequired => Error::HelloRequired(m),
            C::PermissionDenied => Error::PermissionDenied(m),
        }
    }
}

impl From<quinn::ConnectionError> for Error {
    fn from(e: quinn::ConnectionError) -> Self {
        Error::Connection(describe_close(&e))
    }
}

/// Why a connection ended, with the peer's reason text when it gave one.
pub fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) if !close.reason.is_empty() => format!(
            "closed by peer (code {}): {}",
            close.error_code,
            String::from_utf8_lossy(&close.reason)
        ),
        other => other.to_string(),
    }
}

impl From<quinn::WriteError> for Error {
    fn from(e: quinn::WriteError) -> Self {
        Error::Connection(e.to_string())
    }
}

impl From<quinn::ReadExactError> for Error {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(n) => {
                Error::BadFrame(format!("stream ended after {n} bytes, inside a frame"))
            }
            quinn::ReadExactError::ReadError(e) => Error::Connection(e.to_string()),
        }
    }
}

impl From<quinn::ConnectError> for Error {
    fn from(e: quinn::ConnectError) -> Self {
        Error::Connection(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_number() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(999), None);
    }

    #[test]
    fn wire_errors_keep_code_and_details() {
        let cases = [
            Error::NotLeader {
                leader: Some("10.0.0.2:7000".into()),
            },
            Error::SlotMoving {
                retry_after: Duration::from_millis(250),
            },
            Error::FrameTooLarge("2000000 bytes > 1048576".into()),
            Error::ShuttingDown,
            Error::InvalidArgument("empty register id".into()),
        ];
        for e in cases {
            let wire = e.to_wire();
            assert_eq!(Some(wire.code), e.code().map(ErrorCode::as_u16));
            let back = Error::from_wire(wire);
            assert_eq!(back.code(), e.code());
            match (&e, &back) {
                (Error::NotLeader { leader: a }, Error::NotLeader { leader: b }) => {
                    assert_eq!(a, b)
                }
                (Error::SlotMoving { retry_after: a }, Error::SlotMoving { retry_after: b }) => {
                    assert_eq!(a, b)
                }
                (Error::FrameTooLarge(a), Error::FrameTooLarge(b)) => assert_eq!(a, b),
                _ => {}
            }
        }
    }

    #[test]
    fn unknown_codes_survive_as_unknown() {
        let back = Error::from_wire(WireError {
            code: 4242,
            message: "from the future".into(),
            leader: None,
            retry_after_ms: None,
        });
        assert_eq!(
            back,
            Error::Unknown {
                code: 4242,
                message: "from the future".into()
            }
        );
        assert!(!back.is_retryable());
    }
}
