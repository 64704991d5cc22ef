//! The command-line surface: help that explains, and clear errors for wrong flags and files.

mod support;

use support::run;

#[test]
fn help_names_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, _) = run(dir.path(), &["--help"]);
    assert!(ok);
    for command in [
        "certs",
        "meta",
        "data",
        "session",
        "dev",
        "publish",
        "subscribe",
        "ls",
        "cluster",
        "acl",
    ] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(command)),
            "--help lacks {command}:\n{out}"
        );
    }
    let (ok, out, _) = run(dir.path(), &["data", "--help"]);
    assert!(ok);
    for flag in [
        "--id",
        "--listen",
        "--http",
        "--meta",
        "--tls-dir",
        "--config",
        "--advertise",
    ] {
        assert!(out.contains(flag), "data --help lacks {flag}:\n{out}");
    }
    let (ok, out, _) = run(dir.path(), &["meta", "--help"]);
    assert!(ok);
    for flag in [
        "--data-dir",
        "--bootstrap",
        "--join",
        "--admin-token-file",
        "--insecure-no-auth",
    ] {
        assert!(out.contains(flag), "meta --help lacks {flag}:\n{out}");
    }
}

#[test]
fn missing_and_unknown_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (ok, _, err) = run(cwd, &["data", "--meta", "127.0.0.1:1", "--tls-dir", "tls"]);
    assert!(!ok);
    assert!(err.contains("--id is required"), "{err}");

    let (ok, _, err) = run(
        cwd,
        &[
            "data",
            "--id",
            "1",
            "--meta",
            "127.0.0.1:1",
            "--tls-dir",
            "nowhere",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("nowhere") && err.contains("roster certs"),
        "{err}"
    );

    std::fs::write(cwd.join("data.toml"), "id = 1\nmetas = [\"127.0.0.1:1\"]\n").unwrap();
    let (ok, _, err) = run(cwd, &["data", "--config", "data.toml"]);
    assert!(!ok);
    assert!(
        err.contains("unknown key `metas`") && err.contains("meta"),
        "{err}"
    );

    let (ok, _, err) = run(cwd, &["publish", "demo", "x"]);
    assert!(!ok);
    assert!(
        err.contains("no client config") && err.contains("roster dev"),
        "{err}"
    );

    let (ok, _, err) = run(
        cwd,
        &[
            "subscribe",
            "a/b",
            "--session",
            "127.0.0.1:1",
            "--ca",
            "ca.pem",
        ],
    );
    assert!(!ok);
    assert!(err.contains("ca.pem"), "{err}");

    let (ok, _, err) = run(cwd, &["dev", "--metas", "0"]);
    assert!(!ok);
    assert!(err.contains("at least one meta"), "{err}");
}

#[test]
fn certs_writes_a_pki_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (ok, _, err) = run(
        cwd,
        &["certs", "--dir", "tls", "--name", "data-0.roster-data"],
    );
    assert!(ok, "{err}");
    for file in ["ca.pem", "ca-key.pem", "node.pem", "node-key.pem"] {
        assert!(cwd.join("tls").join(file).exists(), "{file} missing");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cwd.join("tls/node-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private to their owner");
    }
    let ca = std::fs::read(cwd.join("tls/ca.pem")).unwrap();
    let (ok, _, err) = run(cwd, &["certs", "--dir", "tls"]);
    assert!(!ok);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(cwd.join("tls/ca.pem")).unwrap(),
        ca,
        "the existing CA is untouched"
    );
}

#[test]
fn access_control_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let create = |extra: &[&str]| {
        let mut args = vec![
            "acl",
            "token",
            "create",
            "--meta",
            "127.0.0.1:1",
            "--tls-dir",
            "tls",
        ];
        args.extend_from_slice(extra);
        run(cwd, &args)
    };
    let (ok, _, err) = create(&["--allow", "publish"]);
    assert!(!ok && err.contains("--namespace"), "{err}");
    let (ok, _, err) = create(&["--namespace", "prod", "--allow", "rule"]);
    assert!(!ok && err.contains("publish, subscribe, admin"), "{err}");
    let (ok, _, err) = create(&["--namespace", "prod", "--allow", "publish", "--ttl", "10y"]);
    assert!(!ok && err.contains("s, m, h, d"), "{err}");

    let (ok, token, err) = run(cwd, &["acl", "token", "generate"]);
    assert!(ok, "{err}");
    assert!(
        token.trim().starts_with("rst_") && token.trim().len() == 85,
        "{token}"
    );

    // Several initial voters need one admin token given to all of them.
    assert!(run(cwd, &["certs", "--dir", "tls"]).0);
    let bootstrap = |extra: &[&str]| {
        let mut args = vec![
            "meta",
            "--id",
            "1",
            "--tls-dir",
            "tls",
            "--data-dir",
            "m1",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--bootstrap",
            "1=127.0.0.1:7100,2=127.0.0.1:7110,3=127.0.0.1:7120",
        ];
        args.extend_from_slice(extra);
        run(cwd, &args)
    };
    let (ok, _, err) = bootstrap(&[]);
    assert!(
        !ok && err.contains("--admin-token-file") && err.contains("roster acl token generate"),
        "{err}"
    );
    let (ok, _, err) = bootstrap(&["--admin-token-file", "missing.token"]);
    assert!(!ok && err.contains("missing.token"), "{err}");
    std::fs::write(cwd.join("bad.token"), "hunter2\n").unwrap();
    let (ok, _, err) = bootstrap(&["--admin-token-file", "bad.token"]);
    assert!(
        !ok && err.contains("bad.token") && err.contains("malformed"),
        "{err}"
    );

    // A client's malformed token is refused before any connection is made.
    std::fs::write(
        cwd.join("client.toml"),
        "sessions = [\"127.0.0.1:1\"]\nca = \"tls/ca.pem\"\ntoken = \"abc\"\n",
    )
    .unwrap();
    let (ok, _, err) = run(cwd, &["ls", "--config", "client.toml"]);
    assert!(!ok && err.contains("token is malformed"), "{err}");
    std::fs::write(
        cwd.join("both.toml"),
        "sessions = [\"127.0.0.1:1\"]\nca = \"tls/ca.pem\"\ntoken = \"abc\"\ntoken-file = \"t\"\n",
    )
    .unwrap();
    let (ok, _, err) = run(cwd, &["ls", "--config", "both.toml"]);
    assert!(!ok && err.contains("not both"), "{err}");
}

/// Runs `roster ARGS...` in `cwd` with extra environment variables and the servers' start log on
/// (each server logs its whole config at info before it loads certificates).
fn run_logged(cwd: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .env_remove("ROSTER_CONFIG")
        .current_dir(cwd)
        .output()
        .expect("run roster");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each setting comes from its flag, else its `ROSTER_*` variable, else its config-file key, else
/// the server's default; the config a server starts with shows which won. Without certificates the
/// server stops right after logging it.
#[test]
fn settings_layer_flag_over_environment_over_file_over_default() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();

    std::fs::write(
        cwd.join("session.toml"),
        "id = 3\nmeta = [\"127.0.0.1:1\"]\nzone = \"z1\"\ndrain-timeout-ms = 1234\n\
         max-connections = 7\ncoalesce-ms = 20\nidle-timeout-ms = 900\n",
    )
    .unwrap();
    let (ok, log) = run_logged(
        cwd,
        &[
            "session",
            "--config",
            "session.toml",
            "--tls-dir",
            "nowhere",
            "--max-connections",
            "9",
        ],
        &[
            ("ROSTER_COALESCE_MS", "30"),
            ("ROSTER_MAX_PUBLISHER_BYTES", "999"),
        ],
    );
    assert!(!ok, "no certificates: {log}");
    for part in [
        "id: 3",
        "zone: \"z1\"",
        "drain_timeout: 1.234s",    // file
        "max_connections: 9",       // flag over file
        "window: 30ms",             // environment over file
        "max_publisher_bytes: 999", // environment
        "push_stall_timeout: 30s",  // default
        "client_grace: 1s",         // default
        "max_frame: 1048576",       // default
        "idle_timeout: 900ms",      // file, for clients and peers alike
    ] {
        assert!(log.contains(part), "session config lacks `{part}`: {log}");
    }
    assert!(
        !log.contains("2.5s"),
        "the file's idle timeout applies to clients: {log}"
    );

    std::fs::write(
        cwd.join("meta.toml"),
        "id = 2\ndata-dir = \"m\"\nlease-timeout-ms = 600\nslots = 64\nreplicas = 2\n",
    )
    .unwrap();
    let (ok, log) = run_logged(
        cwd,
        &[
            "meta",
            "--config",
            "meta.toml",
            "--tls-dir",
            "nowhere",
            "--replicas",
            "1",
        ],
        &[("ROSTER_SLOTS", "32"), ("ROSTER_SNAPSHOT_EVERY", "50")],
    );
    assert!(!ok, "no certificates: {log}");
    for part in [
        "id: 2",
        "slot_count: 32",             // environment over file
        "replicas: 1",                // flag over file
        "lease_timeout: 600ms",       // file
        "renew_interval: 200ms",      // follows a shorter lease
        "snapshot_every: 50",         // environment
        "keep_behind_snapshot: 1000", // default
        "max_frame: 67108864",        // a meta node's default
    ] {
        assert!(log.contains(part), "meta config lacks `{part}`: {log}");
    }

    std::fs::write(
        cwd.join("data.toml"),
        "id = 4\nmeta = [\"127.0.0.1:1\"]\nsession-grace-ms = 700\nkeep-alive-ms = 300\n",
    )
    .unwrap();
    let (ok, log) = run_logged(
        cwd,
        &["data", "--config", "data.toml", "--tls-dir", "nowhere"],
        &[("ROSTER_SESSION_GRACE_MS", "800")],
    );
    assert!(!ok, "no certificates: {log}");
    for part in ["id: 4", "session_grace: 800ms", "keep_alive: 300ms"] {
        assert!(log.contains(part), "data config lacks `{part}`: {log}");
    }
}

/// Every server setting has the three names scripts and manifests use: its long flag, the
/// `ROSTER_*` variable spelt like it, and the config-file key spelt like it.
#[test]
fn every_server_flag_has_its_variable_and_file_key() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    std::fs::write(cwd.join("bad.toml"), "no-such-key = 1\n").unwrap();
    for server in ["meta", "data", "session"] {
        let (ok, help, err) = run(cwd, &[server, "--help"]);
        assert!(ok, "{err}");
        // One entry per option, whether its help is on the flag's line or the next.
        let mut entries: Vec<String> = Vec::new();
        for line in help.lines() {
            if line.trim_start().starts_with('-') {
                entries.push(line.to_owned());
            } else if let Some(entry) = entries.last_mut() {
                entry.push_str(line);
            }
        }
        let mut flags = Vec::new();
        for entry in &entries {
            let flag = entry
                .split_whitespace()
                .find_map(|word| word.strip_prefix("--"))
                .unwrap_or_else(|| panic!("{server}: no long flag in `{entry}`"));
            if flag == "help" || flag == "version" {
                continue;
            }
            let env = format!("[env: ROSTER_{}=]", flag.to_uppercase().replace('-', "_"));
            assert!(
                entry.contains(&env),
                "{server} --{flag} lacks {env}: {entry}"
            );
            if flag != "config" && flag != "log-format" {
                flags.push(flag.to_owned());
            }
        }
        flags.sort();

        let (ok, _, err) = run(cwd, &[server, "--config", "bad.toml"]);
        assert!(!ok);
        let keys = err
            .split("known keys: ")
            .nth(1)
            .unwrap_or_else(|| panic!("{server}: no key list in {err}"));
        let keys: Vec<&str> = keys.trim().split(", ").collect();
        assert_eq!(keys, flags, "{server}: config-file keys and flags differ");
    }
}

/// The settings every server has show that server's own defaults in its help: where it listens and
/// its frame limit (larger for a meta node).
#[test]
fn each_server_help_shows_its_own_defaults() {
    let dir = tempfile::tempdir().unwrap();
    for (server, listen, http, max_frame) in [
        ("meta", "0.0.0.0:7100", "0.0.0.0:7180", "67108864"),
        ("data", "0.0.0.0:7200", "0.0.0.0:7280", "1048576"),
        ("session", "0.0.0.0:7300", "0.0.0.0:7380", "1048576"),
    ] {
        let (ok, help, err) = run(dir.path(), &[server, "--help"]);
        assert!(ok, "{err}");
        // Join the lines of each option so its flag and its help are on one.
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for (flag, default) in [
            ("--listen", listen),
            ("--http", http),
            ("--max-frame", max_frame),
        ] {
            let entry = help
                .split(" --")
                .find(|entry| entry.starts_with(&flag[2..]))
                .unwrap_or_else(|| panic!("{server} --help lacks {flag}: {help}"));
            assert!(
                entry.contains(&format!("[default: {default}]")),
                "{server} {flag} does not show [default: {default}]: {entry}"
            );
        }
    }
}

/// A switch (`--learner`, `--insecure-no-auth`) is on when its flag, its variable or its
/// config-file key turns it on; the file's other keys still layer under the environment.
#[test]
fn switches_come_from_the_config_file_too() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();

    std::fs::write(
        cwd.join("learner.toml"),
        "id = 5\ndata-dir = \"m5\"\njoin = \"127.0.0.1:1\"\nlearner = true\nadvertise = \"a:1\"\n",
    )
    .unwrap();
    let (ok, log) = run_logged(
        cwd,
        &["meta", "--config", "learner.toml", "--tls-dir", "nowhere"],
        &[("ROSTER_ADVERTISE", "b:2")],
    );
    assert!(!ok, "no certificates: {log}");
    for part in [
        "start: Join { addr: \"127.0.0.1:1\", learner: true }", // file
        "advertise: Some(\"b:2\")",                             // environment over file
    ] {
        assert!(log.contains(part), "meta config lacks `{part}`: {log}");
    }

    std::fs::write(
        cwd.join("open.toml"),
        "id = 1\ndata-dir = \"m1\"\nbootstrap = \"1=127.0.0.1:1\"\ninsecure-no-auth = true\n",
    )
    .unwrap();
    let (ok, log) = run_logged(
        cwd,
        &["meta", "--config", "open.toml", "--tls-dir", "nowhere"],
        &[],
    );
    assert!(!ok, "no certificates: {log}");
    assert!(log.contains("WITHOUT authentication"), "{log}");
    assert!(log.contains("admin_token: None"), "{log}");
    assert!(
        !cwd.join("m1").join("admin.token").exists(),
        "no admin token is made for a cluster without authentication"
    );
}

#[test]
fn dns_settings_are_explained_and_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (ok, out, _) = run(cwd, &["session", "--help"]);
    assert!(ok);
    for flag in [
        "--dns <ADDR>",
        "--dns-domain",
        "--dns-ttl",
        "--dns-idle-ms",
        "--dns-qps-per-source",
        "--dns-max-services",
        "[default: off]",
        "[default: roster.]",
    ] {
        assert!(out.contains(flag), "session --help lacks {flag}:\n{out}");
    }
    assert!(run(cwd, &["certs", "--dir", "tls"]).0);
    let session = |extra: &[&str]| {
        let mut args = vec![
            "session",
            "--id",
            "1",
            "--meta",
            "127.0.0.1:1",
            "--tls-dir",
            "tls",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        run(cwd, &args)
    };
    let (ok, _, err) = session(&["--dns", "localhost"]);
    assert!(!ok && err.contains("--dns"), "{err}");
    let (ok, _, err) = session(&["--dns", "127.0.0.1:0", "--dns-domain", "."]);
    assert!(
        !ok && err.contains("--dns-domain") && err.contains("root"),
        "{err}"
    );
    let (ok, _, err) = session(&["--dns", "127.0.0.1:0", "--dns-domain", "bad domain"]);
    assert!(!ok && err.contains("--dns-domain"), "{err}");
    let (ok, _, err) = session(&["--dns", "127.0.0.1:0", "--dns-idle-ms", "0"]);
    assert!(!ok && err.contains("--dns-idle-ms"), "{err}");
    // A port another process holds.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (ok, _, err) = session(&["--dns", &addr]);
    assert!(
        !ok && err.contains(&format!("--dns {addr}")) && err.contains("cannot listen"),
        "{err}"
    );
}
