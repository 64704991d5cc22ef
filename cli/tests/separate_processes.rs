//! Each tier as its own process, wired as the README shows: a killed session server's lease lapses,
//! the meta server removes it, and the data server drops its clients' publishers; subscribers on
//! another session see them go.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Cluster, http_status, roster, wait_ready};

const START: Duration = Duration::from_secs(30);

/// Configuration layers: file, then `ROSTER_*` environment, then flags, later winning.
#[test]
fn settings_come_from_file_environment_and_flags_in_that_order() {
    let cluster = Cluster::builder().datas(0).sessions(0).start();
    let (cwd, meta_addr) = (cluster.cwd(), cluster.meta_list());
    std::fs::write(
        cwd.join("data.toml"),
        format!("id = 5\nmeta = [\"{meta_addr}\"]\ntls-dir = \"tls\"\nlisten = \"127.0.0.1:1\"\nhttp = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    // The file says id 5 and port 1; the environment says id 7; the flag says port 0.
    let data = support::roster_with_env(
        "data from file",
        cwd,
        &["data", "--config", "data.toml", "--listen", "127.0.0.1:0"],
        &[("ROSTER_ID", "7")],
    );
    let line = data.line_matching(START, "its listen line", |l| l.contains("listening:"));
    assert!(
        line.contains("roster data 7 "),
        "the environment wins over the file: {line}"
    );
    assert!(
        !line.contains("quic=127.0.0.1:1 "),
        "the flag wins over the file: {line}"
    );
    let http = line.split("http=").nth(1).unwrap().trim().to_owned();
    wait_ready(&http);
}

fn publisher_count(line: &str) -> usize {
    let v: Value = serde_json::from_str(line).unwrap();
    v["publishers"].as_array().unwrap().len()
}

#[test]
fn a_killed_session_servers_publishers_are_dropped_after_its_lease_lapses() {
    // Started ready: the data server and both sessions answer /readyz.
    let mut cluster = Cluster::builder()
        .sessions(2)
        .data_args(&["--session-grace-ms", "500"])
        .start();
    let cwd = cluster.cwd().to_owned();
    let cwd = cwd.as_path();
    assert_eq!(http_status(&cluster.http("meta", 1), "/healthz", None), 200);
    assert_eq!(http_status(&cluster.http("data", 1), "/nope", None), 404);

    let via1 = cluster.client_toml("via1", &[&cluster.addr("session", 1)], "");
    let via2 = cluster.client_toml("via2", &[&cluster.addr("session", 2)], "");
    let sub = roster(
        "subscribe via 2",
        cwd,
        &["subscribe", "--config", &via2, "web"],
    );
    sub.line_matching(START, "the initial snapshot", |l| publisher_count(l) == 0);
    let _publisher = roster(
        "publish via 1",
        cwd,
        &["publish", "--config", &via1, "web", "10.0.0.1:80"],
    );
    sub.line_matching(START, "the publisher through the other session", |l| {
        publisher_count(l) == 1
    });

    // The publisher's session dies without a word. Its lease (3 s) lapses, the meta removes it, the
    // data server waits out session_grace (0.5 s) and drops what that session owned.
    let start = Instant::now();
    cluster.signal("session", 1, "KILL");
    sub.line_matching(Duration::from_secs(10), "the empty snapshot", |l| {
        publisher_count(l) == 0
    });
    let took = start.elapsed();
    println!("publishers of a killed session dropped after {took:?}");
    assert!(
        took >= Duration::from_millis(2500),
        "dropped before the lease could lapse ({took:?})"
    );

    // Every survivor stops cleanly on SIGTERM.
    drop(sub);
    for (role, id) in [("session", 2), ("data", 1), ("meta", 1)] {
        let mut proc = cluster.take(role, id);
        proc.signal("TERM");
        assert!(
            proc.wait_exit(Duration::from_secs(10)),
            "{} exits 0 on SIGTERM",
            proc.name
        );
    }
}

/// The session's count of client connections, from its admin port.
fn connections(http: &str) -> Option<u64> {
    let (status, body) = support::http_get(&format!("{http}/admin/connections"))?;
    let v: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    v["count"].as_u64()
}

/// A client whose connection is lost (its process stopped, the session's idle timeout ends the
/// connection) and whose same client id connects again within the client grace keeps its
/// publishers — even one it has not registered again — and subscribers never see them go. A
/// client that does not come back loses its publisher once the grace has passed.
#[test]
fn a_client_that_comes_back_within_the_grace_keeps_its_publishers() {
    const GRACE: Duration = Duration::from_secs(4);
    let grace = GRACE.as_millis().to_string();
    let cluster = Cluster::builder()
        .session_args(&["--client-grace-ms", &grace])
        .start();
    let cwd = cluster.cwd();
    let (session_addr, session_http) = (cluster.addr("session", 1), cluster.http("session", 1));

    let watcher = cluster.client_toml("watcher", &[&session_addr], "");
    // The returning client keeps its secret in a file, so its next process is the same client.
    let returning = cluster.client_toml(
        "returning",
        &[&session_addr],
        "client_id = \"returning-client\"\nclient_secret_file = \"returning.secret\"\n",
    );
    let leaving = cluster.client_toml(
        "leaving",
        &[&session_addr],
        "client_id = \"leaving-client\"\n",
    );
    let sub = roster(
        "subscribe",
        cwd,
        &["subscribe", "--config", &watcher, "web"],
    );
    sub.line_matching(START, "the initial snapshot", |l| publisher_count(l) == 0);
    let first = roster(
        "returning client",
        cwd,
        &[
            "publish",
            "--config",
            &returning,
            "--register-id",
            "web-a",
            "web",
            "10.0.0.1:80",
        ],
    );
    let leaver = roster(
        "leaving client",
        cwd,
        &["publish", "--config", &leaving, "web", "10.0.0.9:80"],
    );
    sub.line_matching(START, "both publishers", |l| publisher_count(l) == 2);

    // Both clients freeze: no packet leaves them, and the session's idle timeout ends their
    // connections.
    first.signal("STOP");
    leaver.signal("STOP");
    let frozen = Instant::now();
    support::wait_for(START, "the frozen connections to time out", || {
        (connections(&session_http)? == 1).then_some(())
    });
    let lost = Instant::now();
    // The same client, as a new process, within the grace: it publishes another instance, and
    // takes the first one over without registering it again.
    let again = roster(
        "returning client again",
        cwd,
        &[
            "publish",
            "--config",
            &returning,
            "--register-id",
            "web-b",
            "web",
            "10.0.0.2:80",
        ],
    );
    // Until the client that stays away loses its publisher, every snapshot still holds the one
    // that came back.
    let after = sub.line_matching(START, "the leaving client's publisher gone", |l| {
        assert!(
            l.contains("10.0.0.1:80"),
            "the returning client's publisher disappeared: {l}"
        );
        !l.contains("10.0.0.9:80")
    });
    assert!(
        after.contains("10.0.0.2:80") && publisher_count(&after) == 2,
        "once the grace is over: the instance taken over and the one published again: {after}"
    );
    let gone_after = lost.elapsed();
    println!(
        "connections lost {:?} after freezing; the absent client's publisher went {gone_after:?} later",
        lost - frozen
    );
    assert!(
        gone_after >= GRACE - Duration::from_millis(500),
        "removed {gone_after:?} after the connection was lost, before the grace passed"
    );
    drop(again);
    first.signal("KILL");
    leaver.signal("KILL");
}

/// The attack a registry on a shared network must stop: a client copies another client's id
/// (subscribers see it in every snapshot) into its own config and publishes under the same
/// register id. It is refused with PermissionDenied on the victim's session server and through
/// another one, and no subscriber ever sees its address under the victim's id.
#[test]
fn a_copied_client_id_cannot_replace_anothers_publisher() {
    // Authentication on: the impostor holds a valid token too; only the id is copied.
    let cluster = Cluster::builder().auth(true).sessions(2).start();
    let cwd = cluster.cwd();
    let (session1, session2) = (cluster.addr("session", 1), cluster.addr("session", 2));
    let token = cluster.create_token("default", "publish,subscribe", &[]);
    let client_config = |name: &str, session: &str, extra: &str| {
        cluster.client_toml(name, &[session], &format!("token = \"{token}\"\n{extra}"))
    };

    let watcher = client_config("watcher", &session2, "");
    let sub = roster(
        "subscribe",
        cwd,
        &["subscribe", "--config", &watcher, "web"],
    );
    sub.line_matching(START, "the initial snapshot", |l| publisher_count(l) == 0);
    // Its processes share a secret file: each of them is the victim.
    let victim = client_config(
        "victim",
        &session1,
        "client_id = \"victim\"\nclient_secret_file = \"victim.secret\"\n",
    );
    let publish = |config: &str, register_id: &str, addr: &str| {
        vec![
            "publish".to_owned(),
            "--config".to_owned(),
            config.to_owned(),
            "--register-id".to_owned(),
            register_id.to_owned(),
            "web".to_owned(),
            addr.to_owned(),
        ]
    };
    let args = publish(&victim, "web-a", "10.0.0.1:80");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _victim = roster("victim", cwd, &args);
    sub.line_matching(START, "the victim's publisher", |l| {
        l.contains("10.0.0.1:80")
    });

    for (name, session) in [("impostor-same", &session1), ("impostor-other", &session2)] {
        let config = client_config(name, session, "client_id = \"victim\"\n");
        let args = publish(&config, "web-a", "6.6.6.6:66");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = support::run_within(cwd, &args, START);
        assert!(!ok, "{name}: the impostor's publish must fail");
        assert!(
            err.contains("permission denied"),
            "{name}: the impostor is told why: {err}"
        );
    }

    // The victim carries on: its second publisher arrives, its first never left, and no snapshot
    // ever held the impostor's address.
    let args = publish(&victim, "web-b", "10.0.0.2:80");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _second = roster("victim again", cwd, &args);
    sub.line_matching(START, "both of the victim's publishers", |l| {
        assert!(!l.contains("6.6.6.6"), "a subscriber saw the impostor: {l}");
        assert!(
            l.contains("10.0.0.1:80"),
            "the victim's publisher left: {l}"
        );
        l.contains("10.0.0.2:80")
    });
}
