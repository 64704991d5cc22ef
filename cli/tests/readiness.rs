//! `/readyz` says whether a server can do its job: a data server taking slots over is not ready
//! until they are open. Real processes; a session server is paused (SIGSTOP) so the takeover
//! cannot complete until it resumes.

mod support;

use std::time::Duration;

use support::{http_get, run, start_meta, start_server, wait_for};

const START: Duration = Duration::from_secs(20);

#[test]
fn a_data_server_is_not_ready_while_its_slots_move() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (ok, _, err) = run(cwd, &["certs", "--dir", "tls"]);
    assert!(ok, "{err}");
    // Long leases: the paused session stays a member, so the takeover waits for it.
    let (_meta, meta_addr, meta_http) = start_meta(cwd, &["--lease-timeout-ms", "15000"]);
    let server = |role: &str, id: &str| {
        let (p, _, http) = start_server(cwd, role, id, &["--meta", &meta_addr]);
        (p, http)
    };
    let ready = |what: &str, http: &str| {
        wait_for(START, &format!("{what} ready"), || {
            (http_get(&format!("{http}/readyz"))?.0 == 200).then_some(())
        });
    };
    // Data 1 joins first, so it leads the slots and data 2 has something to take over.
    let (data1, http1) = server("data", "1");
    ready("meta", &meta_http);
    ready("data 1", &http1);
    let (_data2, http2) = server("data", "2");
    let (session, session_http) = server("session", "1");
    ready("data 2", &http2);
    ready("session", &session_http);
    assert_eq!(http_get(&format!("{http2}/healthz")).unwrap().0, 200);
    let (_, body) = http_get(&format!("{http1}/admin/counts")).unwrap();
    let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        counts["leading"].as_u64() > Some(0),
        "data 1 leads slots before it leaves: {counts}"
    );

    // Pause the session, then let data 1 leave: data 2 takes its slots over and must hear from
    // every live session before serving them.
    session.signal("STOP");
    data1.signal("TERM");
    let moving = wait_for(Duration::from_secs(10), "data 2 not ready", || {
        let (status, _) = http_get(&format!("{http2}/readyz"))?;
        if status != 503 {
            return None;
        }
        let (_, body) = http_get(&format!("{http2}/admin/counts"))?;
        let counts: serde_json::Value = serde_json::from_str(&body).ok()?;
        counts["moving"].as_u64()
    });
    assert!(moving > 0, "not ready because slots are moving");
    assert_eq!(
        http_get(&format!("{http2}/healthz")).unwrap().0,
        200,
        "alive while not ready"
    );

    // The session resumes, reports what it holds, and the slots open.
    session.signal("CONT");
    wait_for(Duration::from_secs(10), "data 2 ready again", || {
        (http_get(&format!("{http2}/readyz"))?.0 == 200).then_some(())
    });
    let (_, body) = http_get(&format!("{http2}/admin/counts")).unwrap();
    let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(counts["moving"], 0, "{counts}");
    assert_eq!(counts["leading"], 256, "data 2 leads every slot: {counts}");
}
