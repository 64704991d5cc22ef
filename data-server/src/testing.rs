//! What the tests of the shell's tasks share: a data server's state without its request front,
//! leading every slot of a small table, with a view the test sets; and a peer endpoint with the
//! same certificates, for a test to play a meta node on.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quinn::Endpoint;
use roster_common::peers::PeerPool;
use roster_common::proto::{ClusterView, SlotTable};
use roster_common::quic::{self, TransportSettings};
use roster_common::tls::{NodeIdentity, Pki};
use roster_common::{SlotId, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::DataConfig;
use crate::interest::Interests;
use crate::shared::Shared;
use crate::store::Store;

/// Slots in the test table.
pub(crate) const SLOTS: u32 = 8;

/// A data server's state leading every slot, and the sender of its view.
pub(crate) struct Node {
    pub(crate) shared: Arc<Shared>,
    pub(crate) view_tx: watch::Sender<Option<Arc<ClusterView>>>,
}

/// A certificate authority and node identity every endpoint of a test shares.
pub(crate) fn identity() -> NodeIdentity {
    Pki::generate(&[]).unwrap().node_identity().unwrap()
}

/// A peer endpoint on 127.0.0.1, port chosen by the system.
pub(crate) fn endpoint(identity: &NodeIdentity) -> (Endpoint, quinn::ClientConfig) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    quic::peer_endpoint(socket, identity, &TransportSettings::default()).unwrap()
}

/// The view of a one-server cluster leading all [`SLOTS`], with `persistent` versions.
pub(crate) fn view(persistent: BTreeMap<SlotId, Version>) -> ClusterView {
    ClusterView {
        cluster_id: "test".into(),
        members: Vec::new(),
        table: SlotTable {
            epoch: 1,
            slot_count: SLOTS,
            replicas: 1,
            slots: vec![vec![1]; SLOTS as usize],
        },
        meta_leader: None,
        acl: Default::default(),
        persistent,
    }
}

/// Data server 1 leading every slot of `view`'s table, its slots open; its meta tier is `metas`.
pub(crate) fn node(identity: &NodeIdentity, metas: Vec<String>, view: ClusterView) -> Node {
    let (endpoint, client) = endpoint(identity);
    let mut config = DataConfig::new(1, metas);
    config.request_timeout = Duration::from_secs(2);
    let mut store = Store::new(1);
    let now = Instant::now();
    store.apply_table(&view.table, now);
    store.open_ready(&Default::default(), now, Duration::ZERO);
    let (view_tx, view_rx) = watch::channel(Some(Arc::new(view)));
    let shared = Arc::new(Shared {
        pool: Arc::new(PeerPool::new(endpoint, client, config.request_timeout)),
        config,
        instance: 1,
        store: Mutex::new(store),
        interests: Mutex::new(Interests::default()),
        view: view_rx,
        ready_tx: watch::channel(false).0,
        replicators: Mutex::new(HashMap::new()),
        repairs: Mutex::new(BTreeMap::new()),
        admitted: Mutex::new(None),
    });
    Node { shared, view_tx }
}

/// Waits until `done` holds, checking every few milliseconds; panics naming `what` after
/// `deadline`.
pub(crate) async fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A port on 127.0.0.1 nobody listens on: bound, then let go.
pub(crate) async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Answers every connection with `status`, after reading the request head; returns the
/// address and the request heads seen, one per connection, as they arrive.
pub(crate) async fn http_responder(
    status: u16,
) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            // Never waits: a test that stopped reading loses the heads, not the answers.
            let _ = seen_tx.try_send(String::from_utf8_lossy(&head).into_owned());
            let answer = format!(
                "HTTP/1.1 {status} Whatever\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    (addr, seen_rx)
}
