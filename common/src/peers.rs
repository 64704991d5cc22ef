//! One QUIC connection per peer address, dialed on first use and redialed once it breaks; and a
//! fault table that makes chosen peers unreachable or slow, for tests that partition servers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use quinn::{Connection, Endpoint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::quic;

type ConnMap = Mutex<HashMap<String, Connection>>;
type Conns = Arc<ConnMap>;

/// What happens to a pool's calls to one peer address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every dial and call fails at once with [`Error::Connection`], as if the peer were
    /// unreachable; connections already open to it are closed when the fault is set.
    Drop,
    /// Every dial and call waits this long first.
    Delay(Duration),
}

/// Faults by peer address, shared by the pools given it ([`PeerPool::with_faults`]). Empty, it
/// costs a pool one relaxed atomic load per call.
#[derive(Default)]
pub struct FaultTable {
    any: AtomicBool,
    faults: Mutex<HashMap<String, Fault>>,
    /// The connections of every pool given this table, closed towards a peer when it is dropped.
    pools: Mutex<Vec<Weak<ConnMap>>>,
}

impl std::fmt::Debug for FaultTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultTable")
            .field("faults", &*self.faults.lock())
            .finish()
    }
}

impl FaultTable {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Makes `addr` unreachable: calls to it fail, and open connections to it are closed (as
    /// their idle timeout would close them once no packet gets through).
    pub fn drop_calls(&self, addr: &str) {
        self.set(addr, Some(Fault::Drop));
        self.pools.lock().retain(|pool| {
            let Some(conns) = pool.upgrade() else {
                return false;
            };
            if let Some(conn) = conns.lock().remove(addr) {
                conn.close(0u32.into(), b"unreachable");
            }
            true
        });
    }

    /// Delays every call to `addr` by `delay`.
    pub fn delay_calls(&self, addr: &str, delay: Duration) {
        self.set(addr, Some(Fault::Delay(delay)));
    }

    /// Calls to `addr` go through again.
    pub fn heal(&self, addr: &str) {
        self.set(addr, None);
    }

    /// Every peer is reachable again.
    pub fn heal_all(&self) {
        let mut faults = self.faults.lock();
        faults.clear();
        self.any.store(false, Ordering::Release);
    }

    /// The fault set for `addr`, if any.
    pub fn fault(&self, addr: &str) -> Option<Fault> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.faults.lock().get(addr).copied()
    }

    fn set(&self, addr: &str, fault: Option<Fault>) {
        let mut faults = self.faults.lock();
        match fault {
            Some(fault) => faults.insert(addr.to_owned(), fault),
            None => faults.remove(addr),
        };
        self.any.store(!faults.is_empty(), Ordering::Release);
    }

    /// Applies the fault for `addr`: fails for a dropped peer, waits for a delayed one.
    async fn apply(&self, addr: &str) -> Result<()> {
        match self.fault(addr) {
            None => Ok(()),
            Some(Fault::Drop) => Err(Error::Connection(format!(
                "peer {addr} is unreachable (dropped by the fault table)"
            ))),
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }
}

/// The connections a server keeps to its peers.
pub struct PeerPool {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    connect_timeout: Duration,
    conns: Conns,
    faults: Option<Arc<FaultTable>>,
}

impl PeerPool {
    /// A pool dialing from `endpoint` with `config` (mutual TLS, ALPN `roster-peer/1`).
    pub fn new(endpoint: Endpoint, config: quinn::ClientConfig, connect_timeout: Duration) -> Self {
        PeerPool {
            endpoint,
            config,
            connect_timeout,
            conns: Conns::default(),
            faults: None,
        }
    }

    /// This pool obeys `faults` (when given): see [`FaultTable`].
    pub fn with_faults(mut self, faults: Option<Arc<FaultTable>>) -> Self {
        if let Some(table) = &faults {
            table.pools.lock().push(Arc::downgrade(&self.conns));
        }
        self.faults = faults;
        self
    }

    /// A live connection to `addr`, dialing if there is none. Two callers racing to dial the same
    /// peer may both dial, but both get the connection pooled first; the other is closed unused.
    /// So every caller rides the one pooled connection, and closing it (a fault, a shutdown)
    /// reaches all of them.
    pub async fn get(&self, addr: &str) -> Result<Connection> {
        if let Some(faults) = &self.faults {
            faults.apply(addr).await?;
        }
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
        // A peer dropped while it was being dialed stays unreachable.
        if let Some(faults) = &self.faults
            && faults.fault(addr) == Some(Fault::Drop)
        {
            conn.close(0u32.into(), b"unreachable");
            return faults.apply(addr).await.map(|()| conn);
        }
        let mut conns = self.conns.lock();
        if let Some(pooled) = conns.get(addr)
            && pooled.close_reason().is_none()
        {
            let pooled = pooled.clone();
            drop(conns);
            conn.close(0u32.into(), b"dialed twice");
            return Ok(pooled);
        }
        conns.insert(addr.to_owned(), conn.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_set_per_address_and_healed() {
        let table = FaultTable::new();
        assert_eq!(table.fault("10.0.0.1:1"), None);
        table.drop_calls("10.0.0.1:1");
        table.delay_calls("10.0.0.2:1", Duration::from_millis(5));
        assert_eq!(table.fault("10.0.0.1:1"), Some(Fault::Drop));
        assert_eq!(
            table.fault("10.0.0.2:1"),
            Some(Fault::Delay(Duration::from_millis(5)))
        );
        assert_eq!(table.fault("10.0.0.3:1"), None);
        table.heal("10.0.0.1:1");
        assert_eq!(table.fault("10.0.0.1:1"), None);
        assert!(table.any.load(Ordering::Relaxed));
        table.heal_all();
        assert!(!table.any.load(Ordering::Relaxed));
        assert_eq!(table.fault("10.0.0.2:1"), None);
    }

    #[tokio::test]
    async fn a_dropped_peer_fails_like_an_unreachable_one() {
        let table = FaultTable::new();
        table.drop_calls("127.0.0.1:9");
        let err = table.apply("127.0.0.1:9").await.unwrap_err();
        assert!(matches!(err, Error::Connection(_)), "{err:?}");
        assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
        assert!(table.apply("127.0.0.1:10").await.is_ok());
    }

    #[tokio::test]
    async fn callers_racing_to_dial_a_peer_all_get_the_pooled_connection() {
        crate::install_crypto_provider();
        let identity = crate::tls::Pki::generate(&[])
            .unwrap()
            .node_identity()
            .unwrap();
        let (server, _, addr) = peer(&identity);
        let (endpoint, config, _) = peer(&identity);
        let pool = PeerPool::new(endpoint, config, Duration::from_secs(10));
        let dials = (0..8).map(|_| pool.get(&addr));
        let conns: Vec<Connection> = futures_util::future::join_all(dials)
            .await
            .into_iter()
            .collect::<Result<_>>()
            .unwrap();
        let pooled = pool.get(&addr).await.unwrap();
        for conn in &conns {
            assert_eq!(conn.stable_id(), pooled.stable_id());
            assert!(conn.close_reason().is_none());
        }
        pool.close_all();
        server.close(0u32.into(), b"done");
    }

    /// A peer endpoint on a loopback port of its own, holding every connection it accepts.
    fn peer(identity: &crate::tls::NodeIdentity) -> (Endpoint, quinn::ClientConfig, String) {
        let socket = quic::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let settings = quic::TransportSettings::default();
        let (endpoint, client) = quic::peer_endpoint(socket, identity, &settings).unwrap();
        let addr = endpoint.local_addr().unwrap().to_string();
        let server = endpoint.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(incoming) = server.accept().await {
                if let Ok(conn) = incoming.await {
                    held.push(conn);
                }
            }
        });
        (endpoint, client, addr)
    }

    #[tokio::test]
    async fn a_pool_obeys_its_table_over_real_connections() {
        crate::install_crypto_provider();
        let identity = crate::tls::Pki::generate(&[])
            .unwrap()
            .node_identity()
            .unwrap();
        let (server, _, addr) = peer(&identity);
        let (endpoint, config, _) = peer(&identity);
        let table = FaultTable::new();
        // A long dial timeout: a dropped peer must fail at once, not when a dial gives up.
        let pool = PeerPool::new(endpoint, config, Duration::from_secs(30))
            .with_faults(Some(table.clone()));

        let first = pool.get(&addr).await.unwrap();
        assert_eq!(
            pool.get(&addr).await.unwrap().stable_id(),
            first.stable_id()
        );

        // Dropped: the pooled connection is closed and every call fails at once.
        table.drop_calls(&addr);
        assert!(
            first.close_reason().is_some(),
            "the pooled connection is closed"
        );
        let start = std::time::Instant::now();
        let err = pool.get(&addr).await.unwrap_err();
        assert!(matches!(err, Error::Connection(_)), "{err:?}");
        assert!(err.to_string().contains(&addr), "{err}");
        let err = pool
            .call::<_, ()>(&addr, &(), 1 << 10, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connection(_)), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );

        // Delayed: calls go through, each after the delay.
        let delay = Duration::from_millis(100);
        table.delay_calls(&addr, delay);
        let start = std::time::Instant::now();
        let second = pool.get(&addr).await.unwrap();
        assert!(start.elapsed() >= delay, "{:?}", start.elapsed());
        assert_ne!(second.stable_id(), first.stable_id());

        // Healed: straight through, on the same connection.
        table.heal(&addr);
        assert_eq!(table.fault(&addr), None);
        assert_eq!(
            pool.get(&addr).await.unwrap().stable_id(),
            second.stable_id()
        );
        pool.close_all();
        server.close(0u32.into(), b"done");
    }
}
