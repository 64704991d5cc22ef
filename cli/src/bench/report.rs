//! The human-readable table `roster bench` prints after its JSON report.

/// Prints the figures of one report, one per line.
pub(super) fn print_table(report: &serde_json::Value) {
    let f = |v: &serde_json::Value| match v {
        serde_json::Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if x.fract() == 0.0 {
                format!("{x}")
            } else {
                format!("{x:.3}")
            }
        }
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let r = report;
    println!(
        "target                     {}",
        r["target"].as_str().unwrap_or("?")
    );
    println!(
        "instances                  {}",
        f(&r["parameters"]["instances"])
    );
    println!(
        "registration /s            {}",
        f(&r["initial_load"]["per_second"])
    );
    println!(
        "convergence s              {}",
        f(&r["subscribe"]["convergence_seconds"])
    );
    println!(
        "subscribe notified         {} of {}",
        f(&r["subscribe"]["notifications_seen"]),
        f(&r["subscribe"]["notifications_expected"])
    );
    println!(
        "churn notified             {} of {}",
        f(&r["churn"]["notifications_seen"]),
        f(&r["churn"]["notifications_expected"])
    );
    for p in ["p50", "p99", "max"] {
        println!(
            "notify latency {p:<4} ms      {}",
            f(&r["churn"]["latency_ms"][p])
        );
    }
    println!(
        "push bytes / notification  {} (changed instance: {} bytes)",
        f(&r["churn"]["push_bytes_per_notification"]),
        f(&r["churn"]["changed_instance_bytes"])
    );
    println!(
        "server CPU ms / change     {}",
        f(&r["churn"]["server_cpu_ms_per_change"])
    );
    println!(
        "failure detected s         {}",
        f(&r["failure"]["detect_seconds"])
    );
    println!(
        "client reconnects          {}",
        f(&r["clients"]["reconnects"])
    );
    println!("spurious removals          {}", f(&r["spurious_removals"]));
    println!(
        "server RSS total KiB       {}",
        f(&r["server_rss_kib_total"])
    );
    println!(
        "server bytes / instance    {}",
        f(&r["server_bytes_per_instance"])
    );
    if let Some(servers) = r["servers"].as_array() {
        for s in servers {
            println!(
                "  {:<12} rss {:>8} KiB  peak {:>8} KiB  cpu {:>7} s",
                s["name"].as_str().unwrap_or("?"),
                f(&s["rss_kib"]),
                f(&s["peak_rss_kib"]),
                f(&s["cpu_seconds"])
            );
        }
    }
}
