//! A cluster of `roster` processes in one working directory: built with [`Cluster::builder`],
//! addressed by role and id, and killed, signalled and restarted by the tests. Every process is
//! killed when the cluster is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roster_client::ClientConfig;

use super::{LISTEN_WITHIN, listening, spawn_program, wait_for};
use super::{Proc, START, cluster_status, create_token, free_udp_addr, http_status, roster, run};

/// What [`Cluster::builder`] starts.
pub struct Builder {
    dir: Option<PathBuf>,
    metas: usize,
    datas: usize,
    sessions: usize,
    auth: bool,
    first_meta_id: u64,
    picked_session_ports: bool,
    meta_addrs: Option<Vec<String>>,
    meta_wraps: Vec<Vec<String>>,
    cert_names: Vec<String>,
    meta_args: Vec<String>,
    data_args: Vec<String>,
    session_args: Vec<String>,
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

impl Builder {
    /// How many meta nodes form the bootstrapped group (default 1).
    pub fn metas(mut self, n: usize) -> Self {
        self.metas = n;
        self
    }

    /// How many data servers (default 1).
    pub fn datas(mut self, n: usize) -> Self {
        self.datas = n;
        self
    }

    /// How many session servers (default 1).
    pub fn sessions(mut self, n: usize) -> Self {
        self.sessions = n;
        self
    }

    /// Whether the cluster checks tokens (default no: `--insecure-no-auth`). With auth, every meta
    /// node is given the admin token written to `admin.token` ([`Cluster::admin_token`]).
    pub fn auth(mut self, on: bool) -> Self {
        self.auth = on;
        self
    }

    /// Runs in `dir` (which may already hold `tls/` and other clusters' files) instead of a new
    /// temporary directory.
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// The id of the first meta node (default 1), for a second cluster in the same directory.
    pub fn first_meta_id(mut self, id: u64) -> Self {
        self.first_meta_id = id;
        self
    }

    /// Session servers listen on addresses picked before they start (default: port 0), so a
    /// restarted one comes back where its clients look for it.
    pub fn picked_session_ports(mut self) -> Self {
        self.picked_session_ports = true;
        self
    }

    /// The meta nodes listen on `addrs` (one node each) instead of free loopback addresses.
    pub fn meta_addrs(mut self, addrs: Vec<String>) -> Self {
        self.metas = addrs.len();
        self.meta_addrs = Some(addrs);
        self
    }

    /// Meta node `i` (counting from 0) runs under the command `wraps[i]` (`ip netns exec NS`).
    pub fn meta_wraps(mut self, wraps: Vec<Vec<String>>) -> Self {
        self.meta_wraps = wraps;
        self
    }

    /// Extra `--name`s (host names or IP addresses) the node certificate is valid for.
    pub fn cert_names(mut self, names: &[&str]) -> Self {
        self.cert_names = owned(names);
        self
    }

    /// Extra flags for every meta node.
    pub fn meta_args(mut self, args: &[&str]) -> Self {
        self.meta_args = owned(args);
        self
    }

    /// Extra flags for every data server.
    pub fn data_args(mut self, args: &[&str]) -> Self {
        self.data_args = owned(args);
        self
    }

    /// Extra flags for every session server.
    pub fn session_args(mut self, args: &[&str]) -> Self {
        self.session_args = owned(args);
        self
    }

    /// Writes certificates (unless `tls/` exists), starts the meta group, then the data and session
    /// servers, and waits until each data and session server is ready.
    pub fn start(self) -> Cluster {
        let (temp, cwd) = match &self.dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temp = tempfile::tempdir().expect("temp dir");
                let cwd = temp.path().to_owned();
                (Some(temp), cwd)
            }
        };
        if !cwd.join("tls").exists() {
            let mut args = vec!["certs", "--dir", "tls"];
            for name in &self.cert_names {
                args.extend(["--name", name.as_str()]);
            }
            let (ok, _, err) = run(&cwd, &args);
            assert!(ok, "roster certs: {err}");
        }
        let admin_token = self.auth.then(|| {
            let (ok, token, err) = run(&cwd, &["acl", "token", "generate"]);
            assert!(ok, "{err}");
            let token = token.trim().to_owned();
            std::fs::write(cwd.join("admin.token"), format!("{token}\n")).unwrap();
            token
        });
        let addrs: Vec<String> = match self.meta_addrs {
            Some(addrs) => addrs,
            None => (0..self.metas).map(|_| free_udp_addr()).collect(),
        };
        let first = self.first_meta_id;
        let voters = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", first + i as u64))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            servers: BTreeMap::new(),
            cwd,
            admin_token,
            meta_addrs: addrs.clone(),
            _dir: temp,
        };
        let mut meta_args = vec!["--bootstrap".to_owned(), voters];
        if self.auth {
            meta_args.extend(owned(&["--admin-token-file", "admin.token"]));
        } else {
            meta_args.push("--insecure-no-auth".to_owned());
        }
        meta_args.extend(self.meta_args);
        for (i, addr) in addrs.iter().enumerate() {
            let wrap = self.meta_wraps.get(i).cloned().unwrap_or_default();
            let how = How::new(addr.clone(), meta_args.clone()).wrapped(wrap);
            cluster.spawn("meta", first + i as u64, how);
        }
        for id in 1..=self.datas as u64 {
            let how = How::new("127.0.0.1:0".into(), self.data_args.clone());
            cluster.spawn("data", id, how);
        }
        for id in 1..=self.sessions as u64 {
            let listen = if self.picked_session_ports {
                free_udp_addr()
            } else {
                "127.0.0.1:0".into()
            };
            cluster.spawn("session", id, How::new(listen, self.session_args.clone()));
        }
        for server in cluster.servers.values().filter(|s| s.role != "meta") {
            wait_ready(&server.http);
        }
        cluster
    }
}

/// Waits until `GET http://HTTP/readyz` answers 200.
pub fn wait_ready(http: &str) {
    wait_for(START, &format!("{http} ready"), || {
        (http_status(http, "/readyz", None) == 200).then_some(())
    });
}

/// How one server is started, kept for its restart: what `--listen` says, the `--meta` list (every
/// meta node's when `None`), a command it runs under (`ip netns exec NS`), and its other flags.
#[derive(Clone)]
struct How {
    listen: String,
    metas: Option<String>,
    wrap: Vec<String>,
    args: Vec<String>,
}

impl How {
    fn new(listen: String, args: Vec<String>) -> Self {
        How {
            listen,
            metas: None,
            wrap: Vec::new(),
            args,
        }
    }

    fn wrapped(mut self, wrap: Vec<String>) -> Self {
        self.wrap = wrap;
        self
    }
}

/// One server of a [`Cluster`]: where it listens and its process, while it runs.
pub struct Server {
    pub role: &'static str,
    pub id: u64,
    /// The QUIC address it printed (for meta nodes, the address chosen for it).
    pub quic: String,
    /// Its HTTP admin address.
    pub http: String,
    /// A meta node's data directory, relative to the cluster's directory.
    pub data_dir: Option<String>,
    /// How it was started: kept by a restart.
    how: How,
    proc: Option<Proc>,
}

impl Server {
    /// Its process; fails the test if it is not running.
    pub fn proc(&self) -> &Proc {
        self.proc
            .as_ref()
            .unwrap_or_else(|| panic!("{} {} is not running", self.role, self.id))
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        let (role, id) = (self.role, self.id);
        self.proc
            .as_mut()
            .unwrap_or_else(|| panic!("{role} {id} is not running"))
    }

    /// Takes its process out (to signal it and wait for its exit); a restart starts a new one.
    pub fn take(&mut self) -> Proc {
        let (role, id) = (self.role, self.id);
        self.proc
            .take()
            .unwrap_or_else(|| panic!("{role} {id} is not running"))
    }

    pub fn running(&self) -> bool {
        self.proc.is_some()
    }
}

/// The processes of one cluster. Dropping it kills them.
pub struct Cluster {
    servers: BTreeMap<(&'static str, u64), Server>,
    cwd: PathBuf,
    /// The admin token every meta node was given, when the cluster checks tokens.
    pub admin_token: Option<String>,
    meta_addrs: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// One meta node, one data server and one session server, without authentication, in a new
    /// temporary directory, unless told otherwise.
    pub fn builder() -> Builder {
        Builder {
            dir: None,
            metas: 1,
            datas: 1,
            sessions: 1,
            auth: false,
            first_meta_id: 1,
            picked_session_ports: false,
            meta_addrs: None,
            meta_wraps: Vec::new(),
            cert_names: Vec::new(),
            meta_args: Vec::new(),
            data_args: Vec::new(),
            session_args: Vec::new(),
        }
    }

    /// The working directory every process runs in (`tls/` holds the certificates).
    pub fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// The CA clients trust.
    pub fn ca(&self) -> PathBuf {
        self.cwd.join("tls/ca.pem")
    }

    /// Every meta node's address, started or added, running or not.
    pub fn meta_addrs(&self) -> Vec<String> {
        self.meta_addrs.clone()
    }

    /// The `--meta` list: every meta node's address, comma-separated.
    pub fn meta_list(&self) -> String {
        self.meta_addrs.join(",")
    }

    /// The addresses of the meta nodes now running.
    pub fn live_metas(&self) -> Vec<String> {
        self.of("meta")
            .filter(|s| s.running())
            .map(|s| s.quic.clone())
            .collect()
    }

    /// The QUIC addresses of every session server, in id order.
    pub fn session_addrs(&self) -> Vec<String> {
        self.of("session").map(|s| s.quic.clone()).collect()
    }

    /// The servers of `role`, in id order.
    pub fn of(&self, role: &str) -> impl Iterator<Item = &Server> {
        self.servers.values().filter(move |s| s.role == role)
    }

    /// Every server, metas first.
    pub fn servers_mut(&mut self) -> impl Iterator<Item = &mut Server> {
        let order = |role: &str| ["meta", "data", "session"].iter().position(|r| *r == role);
        let mut all: Vec<&mut Server> = self.servers.values_mut().collect();
        all.sort_by_key(|s| (order(s.role), s.id));
        all.into_iter()
    }

    pub fn server(&self, role: &str, id: u64) -> &Server {
        self.servers
            .iter()
            .find(|((r, i), _)| *r == role && *i == id)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no {role} {id}"))
    }

    fn server_mut(&mut self, role: &str, id: u64) -> &mut Server {
        self.servers
            .iter_mut()
            .find(|((r, i), _)| *r == role && *i == id)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no {role} {id}"))
    }

    /// The HTTP admin address of `role` `id`.
    pub fn http(&self, role: &str, id: u64) -> String {
        self.server(role, id).http.clone()
    }

    /// The QUIC address of `role` `id`.
    pub fn addr(&self, role: &str, id: u64) -> String {
        self.server(role, id).quic.clone()
    }

    pub fn proc(&self, role: &str, id: u64) -> &Proc {
        self.server(role, id).proc()
    }

    /// Sends `signal` (INT, TERM, KILL, STOP, CONT) to `role` `id`.
    pub fn signal(&self, role: &str, id: u64, signal: &str) {
        self.proc(role, id).signal(signal);
    }

    /// Takes the process of `role` `id` out of the cluster (to signal it and wait for its exit);
    /// [`Cluster::restart`] starts it again.
    pub fn take(&mut self, role: &str, id: u64) -> Proc {
        self.server_mut(role, id).take()
    }

    /// `kill -9` of `role` `id`, waiting (up to 10 s) until it is gone.
    pub fn kill(&mut self, role: &str, id: u64) {
        let mut proc = self.take(role, id);
        proc.signal("KILL");
        let _ = proc.wait_exit(Duration::from_secs(10));
    }

    /// Starts `role` `id` again with the flags it had: a meta node on its address and data
    /// directory, a session server on its address if it was picked, a data server on port 0.
    pub fn restart(&mut self, role: &str, id: u64) {
        let server = self.server(role, id);
        assert!(!server.running(), "{role} {id} is still running");
        let (role, how) = (server.role, server.how.clone());
        self.spawn(role, id, how);
    }

    /// Starts another server of `role` with the next free id and `extra` flags (for a meta node:
    /// on a new address, with its own data directory and no `--bootstrap`, so `extra` says
    /// `--join`). Returns its id. Does not wait for readiness.
    pub fn add(&mut self, role: &'static str, extra: &[&str]) -> u64 {
        let listen = if role == "meta" {
            let addr = free_udp_addr();
            self.meta_addrs.push(addr.clone());
            addr
        } else {
            "127.0.0.1:0".into()
        };
        self.add_how(role, How::new(listen, owned(extra)))
    }

    /// Starts another data or session server, as [`Cluster::add`] does, but under the command
    /// `wrap` (`ip netns exec NS`), listening on `listen` and told of the meta nodes `metas`.
    pub fn add_wrapped(
        &mut self,
        role: &'static str,
        wrap: Vec<String>,
        listen: &str,
        metas: &str,
        extra: &[&str],
    ) -> u64 {
        assert_ne!(role, "meta", "add_wrapped starts data and session servers");
        let mut how = How::new(listen.to_owned(), owned(extra)).wrapped(wrap);
        how.metas = Some(metas.to_owned());
        self.add_how(role, how)
    }

    fn add_how(&mut self, role: &'static str, how: How) -> u64 {
        let id = self.of(role).map(|s| s.id).max().unwrap_or(0) + 1;
        self.spawn(role, id, how);
        id
    }

    fn spawn(&mut self, role: &'static str, id: u64, how: How) {
        let id_text = id.to_string();
        let meta_list = how.metas.clone().unwrap_or_else(|| self.meta_list());
        let listen = how.listen.clone();
        let data_dir = (role == "meta").then(|| format!("meta-{id}"));
        let mut full = vec![
            role,
            "--id",
            &id_text,
            "--listen",
            &listen,
            "--http",
            "127.0.0.1:0",
            "--tls-dir",
            "tls",
        ];
        match &data_dir {
            Some(dir) => full.extend(["--data-dir", dir.as_str()]),
            None => full.extend(["--meta", meta_list.as_str()]),
        }
        full.extend(how.args.iter().map(String::as_str));
        let name = format!("{role} {id}");
        let proc = match how.wrap.split_first() {
            None => roster(&name, &self.cwd, &full),
            Some((program, wrap)) => {
                let mut line: Vec<&str> = wrap.iter().map(String::as_str).collect();
                line.push(env!("CARGO_BIN_EXE_roster"));
                line.extend(full);
                spawn_program(program, &name, &self.cwd, &line)
            }
        };
        let line = proc.line_matching(LISTEN_WITHIN, "its listen line", |l| {
            l.contains("listening:")
        });
        let (quic, http) = listening(&line);
        let quic = if role == "meta" { listen.clone() } else { quic };
        self.servers.insert(
            (role, id),
            Server {
                role,
                id,
                quic,
                http,
                data_dir,
                how,
                proc: Some(proc),
            },
        );
    }

    /// `roster cluster status --json` from the running meta nodes.
    pub fn status(&self) -> Option<serde_json::Value> {
        let metas = self.live_metas();
        let metas: Vec<&str> = metas.iter().map(String::as_str).collect();
        cluster_status(&self.cwd, &metas, false)
    }

    /// Waits until the meta tier lists `datas` data servers and `sessions` session servers;
    /// returns that status.
    pub fn wait_members(&self, datas: usize, sessions: usize) -> serde_json::Value {
        wait_for(
            START,
            &format!("{datas} data servers and {sessions} sessions registered"),
            || {
                let status = self.status()?;
                let leases = status["leases"].as_array()?;
                let count = |role: &str| leases.iter().filter(|l| l["role"] == role).count();
                (count("data") == datas && count("session") == sessions).then_some(status)
            },
        )
    }

    /// Waits until the meta tier no longer lists session server `id`: its lease lapsed, or it left.
    pub fn wait_session_gone(&self, id: u64) {
        wait_for(START, &format!("session {id} out of the view"), || {
            let status = self.status()?;
            let leases = status["leases"].as_array()?;
            (!leases
                .iter()
                .any(|l| l["role"] == "session" && l["id"] == id))
            .then_some(())
        });
    }

    /// A token from `roster acl token create` for `namespace`, allowing `allow`.
    pub fn create_token(&self, namespace: &str, allow: &str, extra: &[&str]) -> String {
        create_token(&self.cwd, &self.meta_list(), namespace, allow, extra)
    }

    /// A client config naming every session server, trusting the cluster's CA, with `token`.
    pub fn client_config(&self, token: Option<&str>) -> ClientConfig {
        let mut config = ClientConfig::new(self.session_addrs(), self.ca());
        config.token = token.map(Into::into);
        config
    }

    /// Writes `NAME.toml` for `roster` client commands: `sessions`, the CA, and `extra` lines;
    /// returns its file name.
    pub fn client_toml(&self, name: &str, sessions: &[&str], extra: &str) -> String {
        let file = format!("{name}.toml");
        let list = sessions
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            self.cwd.join(&file),
            format!("sessions = [{list}]\nca = \"tls/ca.pem\"\n{extra}"),
        )
        .unwrap();
        file
    }
}
