//! `/readyz` says whether a server can do its job: a data server taking slots over is not ready
//! until they are open. Real processes; a session server is paused (SIGSTOP) so the takeover
//! cannot complete until it resumes.

mod support;

use std::time::Duration;

use support::{Cluster, http_get, wait_for, wait_ready};

#[test]
fn a_data_server_is_not_ready_while_its_slots_move() {
    // Long leases: the paused session stays a member, so the takeover waits for it. Data 1 joins
    // (and is ready) first, so it leads the slots and data 2 has something to take over.
    let mut cluster = Cluster::builder()
        .sessions(0)
        .meta_args(&["--lease-timeout-ms", "15000"])
        .start();
    wait_ready(&cluster.http("meta", 1));
    let http1 = cluster.http("data", 1);
    cluster.add("data", &[]);
    cluster.add("session", &[]);
    let (http2, session_http) = (cluster.http("data", 2), cluster.http("session", 1));
    wait_ready(&http2);
    wait_ready(&session_http);
    assert_eq!(http_get(&format!("{http2}/healthz")).unwrap().0, 200);
    let (_, body) = http_get(&format!("{http1}/admin/counts")).unwrap();
    let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        counts["leading"].as_u64() > Some(0),
        "data 1 leads slots before it leaves: {counts}"
    );

    // Pause the session, then let data 1 leave: data 2 takes its slots over and must hear from
    // every live session before serving them.
    cluster.signal("session", 1, "STOP");
    cluster.signal("data", 1, "TERM");
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
    cluster.signal("session", 1, "CONT");
    wait_for(Duration::from_secs(10), "data 2 ready again", || {
        (http_get(&format!("{http2}/readyz"))?.0 == 200).then_some(())
    });
    let (_, body) = http_get(&format!("{http2}/admin/counts")).unwrap();
    let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(counts["moving"], 0, "{counts}");
    assert_eq!(counts["leading"], 256, "data 2 leads every slot: {counts}");
}
