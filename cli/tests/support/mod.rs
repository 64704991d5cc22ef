//! Running `roster` processes in tests: spawn, read their output lines with deadlines, signal them,
//! and kill whatever is left when the test ends.

#![allow(dead_code)]

mod cluster;
pub mod targets;

#[allow(unused_imports)]
pub use cluster::{Builder, Cluster, Server, wait_ready};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `roster` child process whose stdout lines arrive on a channel. Killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
}

/// Starts `roster ARGS...` in `cwd`.
pub fn roster(name: &str, cwd: &Path, args: &[&str]) -> Proc {
    roster_with_env(name, cwd, args, &[])
}

/// Starts `roster ARGS...` in `cwd` with extra environment variables.
pub fn roster_with_env(name: &str, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
    spawn(env!("CARGO_BIN_EXE_roster"), name, cwd, args, env)
}

/// Starts `PROGRAM ARGS...` in `cwd` (for running `roster` under a wrapper such as `ip netns exec`).
pub fn spawn_program(program: &str, name: &str, cwd: &Path, args: &[&str]) -> Proc {
    spawn(program, name, cwd, args, &[])
}

fn spawn(program: &str, name: &str, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
    // Servers log warnings only, unless RUST_LOG says otherwise.
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,openraft=off".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc {
        name: name.to_owned(),
        child,
        lines,
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line satisfying `pred`, failing the test after `deadline`.
    pub fn line_matching(
        &self,
        deadline: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no line with {what} within {deadline:?}; saw {seen:#?}",
                        self.name
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{}: exited before printing {what}; saw {seen:#?}",
                        self.name
                    )
                }
            }
        }
    }

    /// Sends `signal` (a name `kill` understands: INT, TERM, KILL).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Waits for the process to exit, failing after `deadline`; returns whether it succeeded.
    pub fn wait_exit(&mut self, deadline: Duration) -> bool {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            assert!(
                start.elapsed() < deadline,
                "{} did not exit within {deadline:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs to completion (with a deadline) and returns (success, stdout lines).
    pub fn finish(mut self, deadline: Duration) -> (bool, Vec<String>) {
        let ok = self.wait_exit(deadline);
        let lines = self.lines.try_iter().collect();
        (ok, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `roster ARGS...` to completion and returns (success, stdout, stderr).
pub fn run(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run roster");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback UDP address that was free a moment ago (for configurations that must name their
/// addresses before the servers start, like a meta group's bootstrap voters).
pub fn free_udp_addr() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    socket.local_addr().expect("local addr").to_string()
}

/// `n` free loopback addresses for a meta group's initial voters, and the `--bootstrap` list
/// naming them `1=ADDR,2=ADDR,...`.
pub fn voters(n: usize) -> (Vec<String>, String) {
    let addrs: Vec<String> = (0..n).map(|_| free_udp_addr()).collect();
    let list = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    (addrs, list)
}

/// `roster cluster status --json` against `metas`, or `None` if no meta node answered.
pub fn cluster_status(cwd: &Path, metas: &[&str], local: bool) -> Option<serde_json::Value> {
    let list = metas.join(",");
    let mut args = vec![
        "cluster",
        "status",
        "--json",
        "--meta",
        &list,
        "--tls-dir",
        "tls",
    ];
    if local {
        args.push("--local");
    }
    let (ok, out, _) = run(cwd, &args);
    if !ok {
        return None;
    }
    serde_json::from_str(&out).ok()
}

/// How long a cluster may take to start and a server to become ready.
pub const START: Duration = Duration::from_secs(60);

/// Polls `check` every 20 ms until it returns `Some`, failing the test after `deadline`. The one
/// way these tests wait for a condition (see [`wait_explained`] for its core).
pub fn wait_for<T>(deadline: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    wait_explained(deadline, what, || check().ok_or_else(String::new))
}

/// As [`wait_for`], with `check` saying, while the condition does not hold, where things stand:
/// its last word is in the failure.
pub fn wait_explained<T>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        let state = match check() {
            Ok(value) => return value,
            Err(state) => state,
        };
        if start.elapsed() >= deadline {
            let state = if state.is_empty() {
                state
            } else {
                format!(": {state}")
            };
            panic!("timed out after {deadline:?} waiting for {what}{state}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one peer request to the meta node at `addr` with the node certificate in `tls_dir`.
pub fn meta_call(
    tls_dir: &Path,
    addr: &str,
    request: &roster_common::proto::MetaRequest,
) -> roster_common::Result<roster_common::proto::MetaResponse> {
    MetaClient::connect(tls_dir, addr)?.call(request)
}

/// Runs `roster ARGS...` to completion within `deadline` (killing it and failing the test
/// otherwise) and returns (success, stdout, stderr).
pub fn run_within(cwd: &Path, args: &[&str], deadline: Duration) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run roster");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("roster {args:?} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A lasting peer connection to one meta node, for tests that send many requests.
pub struct MetaClient {
    runtime: tokio::runtime::Runtime,
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl MetaClient {
    pub fn connect(tls_dir: &Path, addr: &str) -> roster_common::Result<Self> {
        use roster_common::{quic, tls};
        roster_common::install_crypto_provider();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (endpoint, conn) = runtime.block_on(async {
            let identity = tls::NodeIdentity::load(tls_dir)?;
            let config = quic::client_config(
                tls::peer_client(&identity, roster_common::proto::ALPN_PEER)?,
                &quic::TransportSettings::default(),
                false,
            )?;
            let endpoint = quic::client_endpoint(quic::resolve(addr).await?)?;
            let conn =
                quic::connect(&endpoint, &config, addr, None, Duration::from_secs(3)).await?;
            Ok::<_, roster_common::Error>((endpoint, conn))
        })?;
        Ok(MetaClient {
            runtime,
            _endpoint: endpoint,
            conn,
        })
    }

    pub fn call(
        &self,
        request: &roster_common::proto::MetaRequest,
    ) -> roster_common::Result<roster_common::proto::MetaResponse> {
        self.runtime.block_on(roster_common::rpc::call(
            &self.conn,
            request,
            16 << 20,
            Duration::from_secs(5),
        ))
    }
}

/// `GET http://{url}`: the status and body, or `None` if nothing answered within a second.
pub fn http_get(url: &str) -> Option<(u16, String)> {
    http_get_with(url, None)
}

/// As [`http_get`], with `Authorization: Bearer TOKEN` when given.
pub fn http_get_with(url: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut request = ureq::get(&format!("http://{url}"));
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(1)))
        .build()
        .call()
        .ok()?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().ok()?;
    Some((status, body))
}

/// The status of `GET http://ADDR/PATH`, with `Authorization: Bearer TOKEN` when given; 0 when
/// nothing answers.
pub fn http_status(addr: &str, path: &str, token: Option<&str>) -> u16 {
    http_get_with(&format!("{addr}{path}"), token).map_or(0, |(status, _)| status)
}

/// The `quic=` and `http=` addresses a server prints when it starts.
pub fn listening(line: &str) -> (String, String) {
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_owned()
    };
    (field("quic="), field("http="))
}

/// How long a server may take to print where it listens.
pub(crate) const LISTEN_WITHIN: Duration = Duration::from_secs(30);

/// Creates a token with `roster acl token create` against the meta nodes `metas`, allowing `allow`
/// (e.g. `publish,subscribe`) in `namespace`, with the extra flags `extra` (`--ttl 5s`).
pub fn create_token(
    cwd: &Path,
    metas: &str,
    namespace: &str,
    allow: &str,
    extra: &[&str],
) -> String {
    let mut args = vec![
        "acl",
        "token",
        "create",
        "--meta",
        metas,
        "--tls-dir",
        "tls",
        "--namespace",
        namespace,
        "--allow",
        allow,
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = run(cwd, &args);
    assert!(ok, "roster acl token create: {err}");
    let token = out.trim().to_owned();
    assert!(token.starts_with("rst_"), "{out:?}");
    token
}

/// Asks the DNS server at `addr` over UDP for `name` of type `qtype`; the answer's response code
/// and answer count.
pub fn dns_query(addr: &str, name: &str, qtype: &str) -> (String, usize) {
    use hickory_resolver::proto::op::{Message, Query};
    use hickory_resolver::proto::rr::{Name, RecordType};
    let qtype: RecordType = qtype.parse().expect("a record type");
    let mut message = Message::query();
    message.metadata.id = rand_id();
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket
        .send_to(&message.to_vec().unwrap(), addr)
        .expect("send a DNS query");
    let mut buf = vec![0u8; 65_535];
    let (len, _) = socket.recv_from(&mut buf).expect("a DNS answer");
    let answer = Message::from_vec(&buf[..len]).expect("a DNS message");
    (
        answer.metadata.response_code.to_string(),
        answer.answers.len(),
    )
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        & 0xffff) as u16
}

/// Where a `roster dev` or `roster session` line says DNS is served.
pub fn dns_addr(line: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("dns="))
        .map(str::to_owned)
}
