//! Health probes, the I/O: a TCP connect, or an HTTP/1.1 `GET` whose status decides. Each probe
//! is one attempt bounded by the check's timeout, on a fresh connection that is closed after it;
//! failures come back classified ([`FailureKind`]) with a short reason for the record's health.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use roster_common::health::Probe;
use tokio::net::TcpStream;

use crate::health::{FailureKind, ProbeFailure};

/// Runs `probe` once; a probe still running after `timeout` has failed.
pub async fn run(probe: &Probe, timeout: Duration) -> Result<(), ProbeFailure> {
    let attempt = async {
        match probe {
            Probe::Tcp(addr) => connect(addr).await.map(drop),
            Probe::Http { authority, path } => get(authority, path).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ProbeFailure::new(
            FailureKind::Timeout,
            format!("timed out after {} ms", timeout.as_millis()),
        )),
    }
}

/// Resolves `addr` (`HOST:PORT`) and connects to the first address that accepts.
async fn connect(addr: &str) -> Result<TcpStream, ProbeFailure> {
    let no_address = || {
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        ProbeFailure::new(FailureKind::Resolve, format!("no address for host {host}"))
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|_| no_address())?
        .collect();
    if addrs.is_empty() {
        return Err(no_address());
    }
    TcpStream::connect(&addrs[..]).await.map_err(io_failure)
}

/// `GET path` from `authority`; a 2xx or 3xx status is a success. Only the status line and
/// headers are read; the body is left unread and the connection closed.
async fn get(authority: &str, path: &str) -> Result<(), ProbeFailure> {
    let other = |what: &str, e: &dyn std::fmt::Display| {
        ProbeFailure::new(FailureKind::Other, format!("{what}: {e}"))
    };
    let stream = connect(authority).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| other("HTTP handshake", &e))?;
    let request = hyper::Request::get(path)
        .header(HOST, authority)
        .header(USER_AGENT, "roster-health-check")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| other("bad request", &e))?;
    // The connection does the reading and writing; it must be polled while the request waits.
    // With `Connection: close` it may finish as soon as it has handed the response over.
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        response = &mut response => response,
        done = &mut conn => match done {
            Ok(()) => response.await,
            Err(e) => return Err(other("HTTP", &e)),
        },
    }
    .map_err(|e| other("HTTP", &e))?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(ProbeFailure::new(
            FailureKind::HttpStatus,
            format!("HTTP {}", status.as_u16()),
        ))
    }
}

fn io_failure(e: io::Error) -> ProbeFailure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            ProbeFailure::new(FailureKind::Refused, "connection refused")
        }
        io::ErrorKind::ConnectionReset => ProbeFailure::new(FailureKind::Other, "connection reset"),
        io::ErrorKind::NetworkUnreachable => {
            ProbeFailure::new(FailureKind::Other, "network unreachable")
        }
        io::ErrorKind::HostUnreachable => ProbeFailure::new(FailureKind::Other, "host unreachable"),
        io::ErrorKind::TimedOut => ProbeFailure::new(FailureKind::Timeout, "connect timed out"),
        _ => ProbeFailure::new(FailureKind::Other, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::testing::{closed_port, http_responder};

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_tcp_probe_succeeds_on_a_listener_and_is_refused_on_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = Probe::Tcp(listener.local_addr().unwrap().to_string());
        assert_eq!(run(&open, TIMEOUT).await, Ok(()));

        let closed = Probe::Tcp(closed_port().await.to_string());
        let failure = run(&closed, TIMEOUT).await.unwrap_err();
        assert_eq!(failure.kind, FailureKind::Refused);
        assert_eq!(failure.reason, "connection refused");
    }

    #[tokio::test]
    async fn a_tcp_probe_resolves_host_names() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(
            run(&Probe::Tcp(format!("localhost:{port}")), TIMEOUT).await,
            Ok(())
        );
        let failure = run(&Probe::Tcp("no-such-host.invalid:80".into()), TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(failure.kind, FailureKind::Resolve);
        assert_eq!(failure.reason, "no address for host no-such-host.invalid");
    }

    #[tokio::test]
    async fn an_http_probe_takes_2xx_as_healthy_and_names_other_statuses() {
        let (ok, mut seen) = http_responder(200).await;
        let probe = Probe::Http {
            authority: ok.to_string(),
            path: "/health?deep=1".into(),
        };
        assert_eq!(run(&probe, TIMEOUT).await, Ok(()));
        let head = seen.recv().await.unwrap();
        assert!(
            head.starts_with("GET /health?deep=1 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase().contains(&format!("host: {ok}")),
            "{head}"
        );

        let (redirect, _seen) = http_responder(302).await;
        let probe = Probe::Http {
            authority: redirect.to_string(),
            path: "/".into(),
        };
        assert_eq!(run(&probe, TIMEOUT).await, Ok(()));

        let (broken, _seen) = http_responder(500).await;
        let probe = Probe::Http {
            authority: broken.to_string(),
            path: "/".into(),
        };
        let failure = run(&probe, TIMEOUT).await.unwrap_err();
        assert_eq!(failure.kind, FailureKind::HttpStatus);
        assert_eq!(failure.reason, "HTTP 500");

        let probe = Probe::Http {
            authority: closed_port().await.to_string(),
            path: "/".into(),
        };
        assert_eq!(
            run(&probe, TIMEOUT).await.unwrap_err().kind,
            FailureKind::Refused
        );
    }

    #[tokio::test]
    async fn a_probe_that_gets_no_answer_times_out() {
        // Accepts (the kernel completes the handshake) but never answers the request.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let probe = Probe::Http {
            authority: silent.local_addr().unwrap().to_string(),
            path: "/".into(),
        };
        let failure = run(&probe, Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(failure.kind, FailureKind::Timeout);
        assert_eq!(failure.reason, "timed out after 50 ms");
    }
}
