//! One QUIC connection per peer address, dialed on first use and redialed once it breaks.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use quinn::{Connection, Endpoint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::quic;

/// The connections a server keeps to its peers.
pub struct PeerPool {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    connect_timeout: Duration,
    conns: Mutex<HashMap<String, Connection>>,
}

impl PeerPool {
    /// A pool dialing from `endpoint` with `config` (mutual TLS, ALPN `roster-peer/1`).
    pub fn new(endpoint: Endpoint, config: quinn::ClientConfig, connect_timeout: Duration) -> Self {
        PeerPool {
            endpoint,
            config,
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// A live connection to `addr`, dialing if there is none. Two callers racing to dial the same
    /// peer may both dial; the later connection replaces the earlier in the pool and both work.
    pub async fn get(&self, addr: &str) -> Result<Connection> {
        if let Some(conn) = self.conns.lock().get(addr)
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let conn = quic::connect(
            &self.endpoint,
            &self.config,
            addr,
            None,
            self.connect_timeout,
        )
        .await?;
        self.conns.lock().insert(addr.to_owned(), conn.clone());
        Ok(conn)
    }

    /// One request to `addr` on a pooled connection, answered within `timeout`.
    pub async fn call<Req, Resp>(
        &self,
        addr: &str,
        request: &Req,
        max_frame: u32,
        timeout: Duration,
    ) -> Result<Resp>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let conn = self.get(addr).await?;
        crate::rpc::call(&conn, request, max_frame, timeout).await
    }

    /// Closes every pooled connection.
    pub fn close_all(&self) {
        for (_, conn) in self.conns.lock().drain() {
            conn.close(0u32.into(), b"shutting down");
        }
    }
}
