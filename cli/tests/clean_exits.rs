//! Servers exit when told, whatever else is stopping: `roster dev` killed with SIGKILL leaves no
//! server behind (they are told by the kernel, and their logs now go to a pipe nobody reads), and
//! every process of a 3/3/2 cluster sent SIGTERM at once — with clients connected, so the session
//! servers drain with nowhere to send them — exits with status 0 within `drain_timeout` + 5 s.

mod support;

use std::time::{Duration, Instant};

use roster_client::{Client, ClientConfig};
use support::{Cluster, Proc, roster, wait_for};

const START: Duration = Duration::from_secs(60);
const DRAIN: Duration = Duration::from_secs(2);

/// The ids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if stat_field(pid, 4).is_some_and(|ppid| ppid == parent.to_string()) {
            out.push(pid);
        }
    }
    out
}

/// Field `n` of `/proc/PID/stat` (1-based, as in proc(5): 3 is the state, 4 the parent).
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(n - 3).map(str::to_owned)
}

/// Whether `pid` has exited: gone, or a zombie its new parent has not reaped yet.
fn exited(pid: u32) -> bool {
    stat_field(pid, 3).is_none_or(|state| state == "Z")
}

#[test]
fn a_killed_roster_dev_leaves_no_server_behind() {
    let dir = tempfile::tempdir().unwrap();
    let dev = roster("roster dev", dir.path(), &["dev", "--metas", "3"]);
    dev.line_matching(START, "ready", |l| l.contains("roster dev ready"));
    let servers = children_of(dev.pid());
    assert_eq!(servers.len(), 5, "3 meta, 1 data, 1 session: {servers:?}");
    dev.signal("KILL");
    let killed = Instant::now();
    wait_for(
        Duration::from_secs(10),
        "every server of the killed roster dev to exit",
        || servers.iter().all(|pid| exited(*pid)).then_some(()),
    );
    println!(
        "every server exited {:?} after roster dev was killed",
        killed.elapsed()
    );
}

#[test]
fn every_server_of_a_cluster_stops_cleanly_when_all_get_sigterm_at_once() {
    let drain_ms = DRAIN.as_millis().to_string();
    let mut cluster = Cluster::builder()
        .metas(3)
        .datas(3)
        .sessions(2)
        .session_args(&["--drain-timeout-ms", &drain_ms])
        .start();
    let sessions = cluster.session_addrs();

    // Clients on both sessions: draining asks them to move, and there is nowhere to go.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let clients = runtime.block_on(async {
        let mut clients = Vec::new();
        for i in 0..4 {
            let config = ClientConfig::new(sessions.clone(), cluster.ca());
            let client = Client::connect(config).await.unwrap();
            let publication = client
                .publish("exits/svc/a", vec![format!("10.0.0.{i}:80").into()])
                .await
                .unwrap();
            clients.push((client, publication));
        }
        clients
    });

    let mut procs: Vec<(String, Proc)> = cluster
        .servers_mut()
        .map(|s| (format!("{} {}", s.role, s.id), s.take()))
        .collect();
    assert_eq!(procs.len(), 8);
    let pids: Vec<String> = procs.iter().map(|(_, p)| p.pid().to_string()).collect();
    let mut kill = std::process::Command::new("kill");
    kill.arg("-TERM").args(&pids);
    let sent = Instant::now();
    assert!(kill.status().unwrap().success());
    let deadline = DRAIN + Duration::from_secs(5);
    for (name, proc) in &mut procs {
        let left = deadline.saturating_sub(sent.elapsed());
        assert!(proc.wait_exit(left), "{name} exited with a failure status");
    }
    println!(
        "all eight servers exited with status 0 within {:?} of SIGTERM",
        sent.elapsed()
    );
    runtime.block_on(async move { drop(clients) });
}
