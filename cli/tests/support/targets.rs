//! Real listeners for health checks to probe: a TCP acceptor or a small HTTP server that can be told
//! to answer another status or to stop listening, and that records when each probe arrived (and,
//! over HTTP, which path it asked for).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A listener on 127.0.0.1 that counts the connections it accepts. With `http`, each connection
/// is read up to the end of its request head and answered with the current status.
pub struct Target {
    pub addr: SocketAddr,
    status: Arc<AtomicU16>,
    stopped: Arc<AtomicBool>,
    probes: Probes,
}

/// Each probe's arrival and, over HTTP, its request path (empty for a TCP connect).
type Probes = Arc<Mutex<Vec<(Instant, String)>>>;

impl Target {
    /// A TCP acceptor: a probe is a connection.
    pub fn tcp() -> Self {
        Self::start(false)
    }

    /// An HTTP server answering 200 until told otherwise.
    pub fn http() -> Self {
        Self::start(true)
    }

    fn start(http: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a probe target");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let stopped = Arc::new(AtomicBool::new(false));
        let probes: Probes = Arc::new(Mutex::new(Vec::new()));
        let (s, st, p) = (status.clone(), stopped.clone(), probes.clone());
        std::thread::spawn(move || {
            // Polling accept lets the thread drop the listener (so connections are refused) as
            // soon as the test stops it.
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) if http => {
                        let status = s.load(Ordering::Relaxed);
                        let (arrived, p) = (Instant::now(), p.clone());
                        std::thread::spawn(move || {
                            if let Some(path) = answer(conn, status) {
                                p.lock().unwrap().push((arrived, path));
                            }
                        });
                    }
                    Ok(_) => p.lock().unwrap().push((Instant::now(), String::new())),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Target {
            addr,
            status,
            stopped,
            probes,
        }
    }

    /// `host:port` of the listener.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// The URL of an HTTP target.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers `status` from now on.
    pub fn answer_with(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    /// Stops listening: connections are refused from now on.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// When each probe arrived, in order.
    pub fn probes(&self) -> Vec<Instant> {
        let mut at: Vec<Instant> = self.probes.lock().unwrap().iter().map(|p| p.0).collect();
        at.sort();
        at
    }

    /// When each HTTP probe of `path` arrived, in order.
    pub fn probes_of(&self, path: &str) -> Vec<Instant> {
        let probes = self.probes.lock().unwrap();
        let mut at: Vec<Instant> = probes.iter().filter(|p| p.1 == path).map(|p| p.0).collect();
        at.sort();
        at
    }

    /// The paths HTTP probes asked for since `since`, each once.
    pub fn paths_since(&self, since: Instant) -> std::collections::HashSet<String> {
        let probes = self.probes.lock().unwrap();
        probes
            .iter()
            .filter(|p| p.0 >= since)
            .map(|p| p.1.clone())
            .collect()
    }

    pub fn probe_count(&self) -> usize {
        self.probes.lock().unwrap().len()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one request head and answers `status`; returns the request's path, or `None` when no
/// complete request arrived.
fn answer(mut conn: TcpStream, status: u16) -> Option<String> {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let reason = if status < 400 { "OK" } else { "Failing" };
    let _ = conn.write_all(
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    let head = String::from_utf8_lossy(&head);
    let path = head.lines().next()?.split_whitespace().nth(1)?;
    Some(path.to_owned())
}

/// An address on 127.0.0.1 nobody listens on (bound, then released).
pub fn dead_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}
