//! DNS: discovery for programs without an SDK, answered from this session's copies of the
//! services.
//!
//! With `--dns ADDR`, a session server answers DNS queries over UDP and TCP on `ADDR` (one port,
//! both protocols) for the names of one zone (`--dns-domain`, `roster.` unless set): `NAME.ZONE`
//! for the service `default/DEFAULT/NAME`, `NAME.GROUP.NAMESPACE.ZONE` for any other ([`names`]).
//! The records come from each instance's `HOST:PORT` data items: `SRV` (with the `A`/`AAAA` of IP
//! targets in the additional section), `A`, `AAAA`, and `TXT` with the attributes ([`records`]).
//! Only healthy instances are answered where health is known, with the protection threshold of
//! healthy-only subscribers.
//!
//! Answers come from the copy of the service this session keeps for its subscribers: the first
//! query of a service watches it like a subscriber and is answered once the first snapshot is
//! here; later ones are answered from memory, and a service queried no more for `--dns-idle-ms`
//! is dropped ([`cache`]). So an answer is as fresh as a push: a change is seen by DNS within the
//! push latency, and by a client within that plus what its resolver caches (`--dns-ttl`, 5 s).
//!
//! The answers, all authoritative:
//!
//! | query | answer |
//! |---|---|
//! | a service with instances | `NOERROR` with the records of the type asked (`ANY` is answered as `SRV`) |
//! | a service with none (or none of the type asked) | `NOERROR`, no records, the zone's `SOA` in the authority section |
//! | a name of the zone that is no service ever published to | `NXDOMAIN`, with the `SOA` |
//! | a name outside the zone, or a class other than IN | `REFUSED` (not authoritative) |
//! | a first query whose snapshot did not come within 1.5 s, or past `--dns-max-services` | `SERVFAIL` |
//! | not a standard query (`NOTIFY`, `UPDATE`, …) | `NOTIMP` |
//! | not exactly one question | `FORMERR` |
//!
//! The `SOA`'s minimum is the TTL, so resolvers cache a negative answer no longer than a
//! positive one.
//!
//! Limits: a UDP answer longer than the client's buffer (512 bytes, or what its EDNS record says,
//! up to 4096) is truncated and marked so, and the client asks again over TCP; queries past
//! `--dns-qps-per-source` from one address are dropped ([`limit`]); a packet that is not a DNS
//! query is dropped; each is counted (`roster_dns_dropped_total`). At most [`MAX_WAITING`]
//! queries wait for a first snapshot at once and [`MAX_TCP_CONNECTIONS`] TCP connections are
//! served, each closed after [`TCP_IDLE`] without a query.
//!
//! Caveat: DNS answers are not authenticated. Where the cluster checks tokens, anyone who reaches
//! the DNS port can still read the endpoints of every service reachable by DNS; the server logs a
//! warning saying so when it starts.

mod cache;
mod limit;
pub mod names;
mod records;
mod serve;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use roster_common::{Error, Result};
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

/// Queries waiting at once for the first snapshot of a service; past it they get `SERVFAIL`.
pub const MAX_WAITING: usize = 1024;
/// TCP connections served at once; past it new ones are closed.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// How long a TCP connection may stay without a query.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// How the DNS interface answers. Every field's default is in its comment.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The zone answered for (`--dns-domain`). Default `roster.`.
    pub domain: String,
    /// The TTL of every record, and of negative answers, in seconds (`--dns-ttl`). Default 5.
    pub ttl_secs: u32,
    /// How long a service nobody queries stays watched (`--dns-idle-ms`). Default 5 minutes.
    pub idle: Duration,
    /// The same for a name no service was ever published to (or `idle`, if shorter), so that
    /// queries for made-up names do not hold watches long. Default 10 s.
    pub unknown_idle: Duration,
    /// Queries per second one source address may make; more are dropped
    /// (`--dns-qps-per-source`, 0 for no limit). Default 5,000.
    pub qps_per_source: u32,
    /// Services watched for DNS at once (`--dns-max-services`). Default 10,000.
    pub max_services: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            domain: "roster.".into(),
            ttl_secs: 5,
            idle: Duration::from_secs(300),
            unknown_idle: Duration::from_secs(10),
            qps_per_source: 5_000,
            max_services: 10_000,
        }
    }
}

impl DnsConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        names::Zone::new(&self.domain)?;
        if self.idle.is_zero() {
            return Err(Error::InvalidArgument(
                "--dns-idle-ms must be more than zero".into(),
            ));
        }
        if self.max_services == 0 {
            return Err(Error::InvalidArgument(
                "--dns-max-services must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// The UDP socket and TCP listener DNS is served on: one address, both protocols.
#[derive(Debug)]
pub struct DnsSockets {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl DnsSockets {
    /// Binds `addr` for UDP and TCP. With port 0, the system picks a port free for both.
    pub fn bind(addr: SocketAddr) -> Result<DnsSockets> {
        let refuse = |e: std::io::Error| {
            Error::InvalidArgument(format!("--dns {addr}: cannot listen there: {e}"))
        };
        // A port free for UDP may be taken for TCP: try a few the system picks.
        let tries = if addr.port() == 0 { 16 } else { 1 };
        let mut last = None;
        for _ in 0..tries {
            let udp = UdpSocket::bind(addr).map_err(refuse)?;
            let bound = udp.local_addr().map_err(refuse)?;
            match TcpListener::bind(bound) {
                Ok(tcp) => {
                    udp.set_nonblocking(true).map_err(refuse)?;
                    tcp.set_nonblocking(true).map_err(refuse)?;
                    return Ok(DnsSockets { udp, tcp });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(refuse(last.expect("tried at least once")))
    }

    /// The address both listen on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.udp
            .local_addr()
            .map_err(|e| Error::Internal(format!("the DNS socket's address: {e}")))
    }
}

/// Serves DNS on `sockets` until `stop`.
pub(crate) async fn run(shared: Arc<Shared>, sockets: DnsSockets, stop: CancellationToken) {
    serve::run(shared, sockets.udp, sockets.tcp, stop).await
}
