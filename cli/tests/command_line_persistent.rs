//! `roster register`, `roster deregister` and the check flags: help that explains them, and wrong
//! flags refused before any cluster is contacted (none runs here).

mod support;

use support::run;

/// Runs `roster ARGS...` in an empty directory (no client config there).
fn roster(args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), args)
}

#[test]
fn help_explains_persistent_instances_and_checks() {
    let (ok, out, _) = roster(&["--help"]);
    assert!(ok);
    for command in ["register", "deregister"] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(command)),
            "--help lacks {command}:\n{out}"
        );
    }

    let (ok, out, _) = roster(&["register", "--help"]);
    assert!(ok);
    for needed in [
        "--id",
        "--attr",
        "--check",
        "--interval",
        "--timeout",
        "--rise",
        "--fall",
        "--json",
        "--session",
        "--token",
        "tcp://HOST:PORT",
        "http://HOST:PORT/PATH",
        "starts healthy",
        "until `roster deregister",
        "[default: 5s]",
        "[default: 3]",
    ] {
        assert!(
            out.contains(needed),
            "register --help lacks {needed}:\n{out}"
        );
    }

    let (ok, out, _) = roster(&["deregister", "--help"]);
    assert!(ok);
    assert!(out.contains("<SERVICE> <ID>"), "{out}");

    let (ok, out, _) = roster(&["subscribe", "--help"]);
    assert!(ok);
    assert!(out.contains("--healthy-only"), "{out}");

    let (ok, out, _) = roster(&["publish", "--help"]);
    assert!(ok);
    assert!(out.contains("--check"), "{out}");
}

#[test]
fn a_bad_check_is_refused_with_the_reason() {
    let (ok, _, err) = roster(&["register", "db", "10.0.0.9:5432", "--check", "udp://db:53"]);
    assert!(!ok);
    assert!(
        err.contains("invalid argument") && err.contains("expected `tcp`"),
        "{err}"
    );

    // A bare `tcp` check connects to the first data item, which must then be an address.
    let (ok, _, err) = roster(&["register", "db", "primary", "--check", "tcp"]);
    assert!(!ok);
    assert!(err.contains("\"primary\" is not HOST:PORT"), "{err}");

    let (ok, _, err) = roster(&[
        "register",
        "db",
        "10.0.0.9:5432",
        "--check",
        "tcp",
        "--interval",
        "1s",
        "--timeout",
        "2s",
    ]);
    assert!(!ok);
    assert!(err.contains("timeout 2000 ms"), "{err}");

    let (ok, _, err) = roster(&[
        "register",
        "db",
        "10.0.0.9:5432",
        "--check",
        "tcp",
        "--interval",
        "50ms",
    ]);
    assert!(!ok);
    assert!(err.contains("interval 50 ms"), "{err}");

    // The same for an ephemeral publisher.
    let (ok, _, err) = roster(&["publish", "db", "10.0.0.9:5432", "--check", "http://:80/"]);
    assert!(!ok);
    assert!(err.contains("no usable host"), "{err}");
}

#[test]
fn check_settings_without_a_check_are_refused() {
    for flag in [
        ["--interval", "5s"],
        ["--timeout", "1s"],
        ["--rise", "2"],
        ["--fall", "3"],
    ] {
        let (ok, _, err) = roster(&["register", "db", "10.0.0.9:5432", flag[0], flag[1]]);
        assert!(!ok, "{flag:?} was accepted");
        assert!(
            err.contains("required arguments were not provided") && err.contains("--check"),
            "{flag:?}: {err}"
        );
    }
}

#[test]
fn rise_and_fall_count_from_one_to_a_hundred() {
    for (flag, value) in [("--rise", "0"), ("--fall", "0"), ("--fall", "101")] {
        let (ok, _, err) = roster(&[
            "register",
            "db",
            "10.0.0.9:5432",
            "--check",
            "tcp",
            flag,
            value,
        ]);
        assert!(!ok, "{flag} {value} was accepted");
        assert!(
            err.contains(&format!("'{value}' for '{flag}")) && err.contains("1..=100"),
            "{err}"
        );
    }
}

#[test]
fn durations_need_a_unit() {
    let (ok, _, err) = roster(&[
        "register",
        "db",
        "10.0.0.9:5432",
        "--check",
        "tcp",
        "--interval",
        "5",
    ]);
    assert!(!ok);
    assert!(err.contains("the unit is one of ms, s, m, h, d"), "{err}");
}

#[test]
fn a_good_registration_gets_as_far_as_the_missing_config() {
    // Everything on the command line is valid: what stops it is that no cluster is configured.
    let (ok, out, err) = roster(&[
        "register",
        "db",
        "10.0.0.9:5432",
        "--id",
        "primary",
        "--attr",
        "zone=eu-1a",
        "--check",
        "tcp",
        "--interval",
        "500ms",
        "--rise",
        "1",
    ]);
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("no client config"), "{err}");

    let (ok, _, err) = roster(&["deregister", "db", "primary"]);
    assert!(!ok);
    assert!(err.contains("no client config"), "{err}");

    let (ok, _, err) = roster(&["deregister", "db"]);
    assert!(!ok);
    assert!(err.contains("<ID>"), "{err}");
}

#[test]
fn a_data_server_refuses_zero_concurrent_probes() {
    let (ok, out, _) = roster(&["data", "--help"]);
    assert!(ok);
    assert!(
        out.contains("--probe-concurrency") && out.contains("[default: 256]"),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(dir.path(), &["certs", "--dir", "tls"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(
        dir.path(),
        &[
            "data",
            "--id",
            "1",
            "--meta",
            "127.0.0.1:1",
            "--tls-dir",
            "tls",
            "--probe-concurrency",
            "0",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("--probe-concurrency must be at least 1"),
        "{err}"
    );
}
