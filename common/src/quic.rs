//! QUIC endpoints: sockets with large buffers, transport settings, and dialing by address text.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{Error, Result};

/// Socket buffer size asked of the kernel. The default (~208 KiB) drops datagrams during bursts of
/// handshakes or closes; the kernel caps the request at `net.core.{r,w}mem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Keep-alive and idle settings of a QUIC link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportSettings {
    /// How often an otherwise idle connection sends a keep-alive. Default 1 s.
    pub keep_alive: Duration,
    /// How long without any packet from the peer before the connection is declared dead. Each side
    /// proposes one and the smaller wins. Default 4 s, so a dead peer is detected within 5 s.
    pub idle_timeout: Duration,
    /// Concurrent requests (bidirectional streams) a peer may have open. Default 256.
    pub max_concurrent_requests: u32,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(4),
            max_concurrent_requests: 256,
        }
    }
}

impl TransportSettings {
    /// The quinn transport for this side. `accept_uni` says whether the peer may open
    /// unidirectional streams to us (clients accept the server's push stream; servers accept none).
    pub fn transport(&self, accept_uni: bool) -> Result<Arc<TransportConfig>> {
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            Error::InvalidArgument(format!("idle timeout {:?} is too large", self.idle_timeout))
        })?;
        if self.keep_alive >= self.idle_timeout {
            return Err(Error::InvalidArgument(format!(
                "keep-alive interval {:?} must be shorter than the idle timeout {:?}",
                self.keep_alive, self.idle_timeout
            )));
        }
        let mut transport = TransportConfig::default();
        transport
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(idle))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_requests))
            .max_concurrent_uni_streams(VarInt::from_u32(if accept_uni { 8 } else { 0 }));
        Ok(Arc::new(transport))
    }
}

/// A quinn server configuration from a rustls one.
pub fn server_config(
    tls: rustls::ServerConfig,
    settings: &TransportSettings,
) -> Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| Error::InvalidArgument(format!("TLS configuration unfit for QUIC: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(settings.transport(false)?);
    Ok(config)
}

/// A quinn client configuration from a rustls one. `accept_uni` as in
/// [`TransportSettings::transport`].
pub fn client_config(
    tls: rustls::ClientConfig,
    settings: &TransportSettings,
    accept_uni: bool,
) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| Error::InvalidArgument(format!("TLS configuration unfit for QUIC: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(settings.transport(accept_uni)?);
    Ok(config)
}

/// Binds a UDP socket with large buffers.
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let fail = |e: std::io::Error| Error::InvalidArgument(format!("cannot bind UDP {addr}: {e}"));
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    if addr.is_ipv6() {
        // Dual-stack where the system allows it; failing that, IPv6 only is still correct.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel may cap these, which only costs burst tolerance.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into()).map_err(fail)?;
    Ok(socket.into())
}

/// An endpoint on `socket`, accepting connections when `server` is given. Its tasks run on the
/// Tokio runtime of the caller.
pub fn endpoint(socket: UdpSocket, server: Option<quinn::ServerConfig>) -> Result<Endpoint> {
    endpoint_on(socket, server, Arc::new(TokioRuntime))
}

/// An endpoint whose I/O and connection tasks run on `runtime`.
pub fn endpoint_on(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
    runtime: Arc<dyn quinn::Runtime>,
) -> Result<Endpoint> {
    Endpoint::new(EndpointConfig::default(), server, socket, runtime)
        .map_err(|e| Error::InvalidArgument(format!("cannot start QUIC endpoint: {e}")))
}

/// An endpoint that only dials out, bound to an ephemeral port of the address family of `peer`.
pub fn client_endpoint(peer: SocketAddr) -> Result<Endpoint> {
    endpoint(bind_udp(unspecified_like(peer))?, None)
}

/// The unspecified address (port 0) of `peer`'s address family.
pub fn unspecified_like(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    }
}

/// The address to advertise for a server bound to `socket`: `configured` if given, else the socket's
/// own address, which must then be a specific IP (peers cannot dial `0.0.0.0`).
pub fn advertised_addr(configured: Option<&str>, socket: &UdpSocket) -> Result<String> {
    if let Some(addr) = configured {
        return Ok(addr.to_owned());
    }
    let local = socket
        .local_addr()
        .map_err(|e| Error::InvalidArgument(format!("cannot read the listen address: {e}")))?;
    if local.ip().is_unspecified() {
        return Err(Error::InvalidArgument(format!(
            "listening on {local}, which others cannot dial: set --advertise to this server's reachable host:port"
        )));
    }
    Ok(local.to_string())
}

/// The host part of `host:port`, `[v6]:port` or a bare host: the name TLS checks the certificate for.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Resolves `addr` (`host:port`) to its first socket address.
pub async fn resolve(addr: &str) -> Result<SocketAddr> {
    let mut found = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Connection(format!("cannot resolve {addr}: {e}")))?;
    found
        .next()
        .ok_or_else(|| Error::Connection(format!("{addr} resolves to no address")))
}

/// Resolves `addr` (`host:port`) to every socket address it names, in the resolver's order.
pub async fn resolve_all(addr: &str) -> Result<Vec<SocketAddr>> {
    let found: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Connection(format!("cannot resolve {addr}: {e}")))?
        .collect();
    if found.is_empty() {
        return Err(Error::Connection(format!("{addr} resolves to no address")));
    }
    Ok(found)
}

/// Dials `addr`, checking the server's certificate for `server_name` (the host part of `addr` when
/// not given), within `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    config: &quinn::ClientConfig,
    addr: &str,
    server_name: Option<&str>,
    timeout: Duration,
) -> Result<Connection> {
    let socket_addr = resolve(addr).await?;
    let name = server_name.unwrap_or_else(|| host_of(addr));
    connect_to(endpoint, config, socket_addr, name, timeout).await
}

/// Dials the resolved `socket_addr`, checking the server's certificate for `name`, within
/// `timeout`.
pub async fn connect_to(
    endpoint: &Endpoint,
    config: &quinn::ClientConfig,
    socket_addr: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Connection> {
    let connecting = endpoint
        .connect_with(config.clone(), socket_addr, name)
        .map_err(|e| Error::Connection(format!("cannot dial {socket_addr}: {e}")))?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(Error::Connection(format!(
            "cannot connect to {socket_addr}: {e}"
        ))),
        Err(_) => Err(Error::Timeout(format!(
            "no QUIC handshake with {socket_addr} within {timeout:?}"
        ))),
    }
}

/// A server endpoint on `socket` speaking `roster-peer/1` with mutual TLS, and the client
/// configuration it dials other peers with.
pub fn peer_endpoint(
    socket: UdpSocket,
    identity: &crate::tls::NodeIdentity,
    settings: &TransportSettings,
) -> Result<(Endpoint, quinn::ClientConfig)> {
    let alpn = crate::proto::ALPN_PEER;
    let server = server_config(crate::tls::peer_server(identity, alpn)?, settings)?;
    let client = client_config(crate::tls::peer_client(identity, alpn)?, settings, false)?;
    let mut endpoint = endpoint(socket, Some(server))?;
    endpoint.set_default_client_config(client.clone());
    Ok((endpoint, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("meta-0.roster-meta:7000"), "meta-0.roster-meta");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn keep_alive_must_be_shorter_than_idle_timeout() {
        let bad = TransportSettings {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            ..TransportSettings::default()
        };
        assert!(matches!(
            bad.transport(false),
            Err(Error::InvalidArgument(_))
        ));
        assert!(TransportSettings::default().transport(true).is_ok());
    }
}
