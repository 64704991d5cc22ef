//! The web console on a session server's HTTP admin port, read as `curl` would: `roster dev`
//! prints where it is; its pages are rendered whole on the server (the services list names what
//! exists); without a token they send the browser to the sign-in form and show nothing, a wrong
//! token is refused, a token without `admin` forbidden; signing in gives an HttpOnly cookie, not
//! the token, and signing out ends it; live updates are server-sent events. A cluster created
//! with `--insecure-no-auth` asks nothing. (The browser tests are in console/.)

mod support;

use std::path::Path;
use std::time::Duration;

use support::{START, roster, run, wait_for};

/// One answer: status, the headers we look at, and the body (at most 64 KiB of it).
struct Answer {
    status: u16,
    location: String,
    set_cookie: String,
    content_type: String,
    body: String,
}

/// A request to the console at `base` (`http://HOST:PORT`), never following redirects.
fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let response = match (method, body) {
        ("POST", Some(body)) => {
            let mut request = agent.post(url);
            for (k, v) in headers {
                request = request.header(*k, *v);
            }
            request
                .header("Content-Type", "application/x-www-form-urlencoded")
                .send(body)
        }
        _ => {
            let mut request = agent.get(url);
            for (k, v) in headers {
                request = request.header(*k, *v);
            }
            request.call()
        }
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (location, set_cookie, content_type) = (
        header("location"),
        header("set-cookie"),
        header("content-type"),
    );
    let status = response.status().as_u16();
    let mut body = String::new();
    if !content_type.starts_with("text/event-stream") {
        body = response
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
    }
    Answer {
        status,
        location,
        set_cookie,
        content_type,
        body,
    }
}

fn get(url: &str, token: Option<&str>) -> Answer {
    match token {
        Some(token) => call(
            "GET",
            url,
            &[("Authorization", &format!("Bearer {token}"))],
            None,
        ),
        None => call("GET", url, &[], None),
    }
}

/// Starts `roster dev --dir d EXTRA...` in `cwd`; returns it and the console's base URL.
fn dev(cwd: &Path, extra: &[&str]) -> (support::Proc, String) {
    let mut args = vec!["dev", "--dir", "d"];
    args.extend(extra);
    let dev = roster("roster dev", cwd, &args);
    // The console line comes last, after the ready line.
    dev.line_matching(START, "roster dev ready", |l| {
        l.contains("roster dev ready")
    });
    let line = dev.line_matching(START, "console=", |l| l.contains("console="));
    let url = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("console="))
        .expect("a console URL")
        .to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/ui/"),
        "{line}"
    );
    (dev, url.trim_end_matches("/ui/").to_owned())
}

#[test]
fn the_console_shows_the_cluster_to_an_admin_token_and_nothing_to_anyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (_dev, base) = dev(cwd, &[]);
    let admin = std::fs::read_to_string(cwd.join("d/admin.token")).unwrap();
    let admin = admin.trim();
    let config = std::fs::read_to_string(cwd.join("d/client.toml")).unwrap();
    let client = config
        .lines()
        .find_map(|l| l.strip_prefix("token = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("client.toml holds a token");
    let (ok, _, err) = run(
        cwd,
        &[
            "register",
            "console-demo",
            "10.0.0.1:7",
            "--id",
            "db-1",
            "--config",
            "d/client.toml",
        ],
    );
    assert!(ok, "roster register: {err}");
    let services = format!("{base}/ui/services");

    // Nobody: sent to the sign-in form, and nothing of the cluster shown.
    let nobody = get(&services, None);
    assert_eq!(nobody.status, 303);
    assert_eq!(nobody.location, "/ui/login?next=%2Fui%2Fservices");
    assert!(!nobody.body.contains("console-demo"));
    let form = get(&format!("{base}{}", nobody.location), None);
    assert_eq!(form.status, 200);
    assert!(form.body.contains("action=\"/ui/login\"") && !form.body.contains("console-demo"));
    assert_eq!(get(&format!("{base}/ui/live/overview"), None).status, 401);

    // A wrong token is refused, a token without admin forbidden.
    let wrong = format!("rst_0123456789abcdef_{}", "0".repeat(64));
    let refused = get(&services, Some(&wrong));
    assert_eq!(refused.status, 401);
    assert!(!refused.body.contains("console-demo"));
    assert_eq!(get(&services, Some(client)).status, 403);
    assert_eq!(get(&format!("{base}/ui/slots"), Some(client)).status, 403);

    // The admin token: the list is in the page as fetched, with a link to each service.
    let listed = wait_for(START, "console-demo listed", || {
        let page = get(&services, Some(admin));
        (page.status == 200 && page.body.contains("console-demo")).then_some(page)
    });
    assert!(listed.content_type.starts_with("text/html"));
    assert!(
        listed
            .body
            .contains("href=\"/ui/services/default/DEFAULT/console-demo\"")
    );
    let service = get(
        &format!("{base}/ui/services/default/DEFAULT/console-demo"),
        Some(admin),
    );
    assert_eq!(service.status, 200);
    for shown in ["db-1", "10.0.0.1:7", "persistent"] {
        assert!(service.body.contains(shown), "{shown} in {}", service.body);
    }
    for (path, shown) in [
        ("/ui/", "Meta group"),
        ("/ui/slots", "data-slot=\"255\""),
        ("/ui/events", "Watching cluster"),
    ] {
        let page = get(&format!("{base}{path}"), Some(admin));
        assert_eq!(page.status, 200, "{path}");
        assert!(
            page.body.contains(shown),
            "{shown} in {path}: {}",
            page.body
        );
    }
    let live = get(&format!("{base}/ui/live/overview"), Some(admin));
    assert_eq!(
        (live.status, live.content_type.as_str()),
        (200, "text/event-stream")
    );
    let css = get(&format!("{base}/ui/assets/console.css"), None);
    assert_eq!(
        (css.status, css.content_type.as_str()),
        (200, "text/css; charset=utf-8")
    );

    // Signing in: a cookie holding a login id, not the token; signing out ends it.
    let signed = call(
        "POST",
        &format!("{base}/ui/login"),
        &[],
        Some(&format!("next=%2Fui%2Fslots&token={admin}")),
    );
    assert_eq!(
        (signed.status, signed.location.as_str()),
        (303, "/ui/slots")
    );
    let cookie = signed.set_cookie.split(';').next().unwrap().to_owned();
    assert!(
        cookie.starts_with("roster_console=") && !cookie.contains(admin),
        "{cookie}"
    );
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(
            signed.set_cookie.contains(attribute),
            "{}",
            signed.set_cookie
        );
    }
    let with_cookie = [("Cookie", cookie.as_str())];
    let slots = call("GET", &format!("{base}/ui/slots"), &with_cookie, None);
    assert_eq!(slots.status, 200);
    assert!(slots.body.contains("data-slot=\"0\""));
    let out = call("POST", &format!("{base}/ui/logout"), &with_cookie, Some(""));
    assert_eq!(out.status, 303);
    let after = call("GET", &format!("{base}/ui/slots"), &with_cookie, None);
    assert_eq!(
        (after.status, after.location.as_str()),
        (303, "/ui/login?next=%2Fui%2Fslots&ended=1")
    );
    let bad_sign_in = call(
        "POST",
        &format!("{base}/ui/login"),
        &[],
        Some(&format!("token={client}")),
    );
    assert_eq!(bad_sign_in.status, 403);
    assert!(bad_sign_in.set_cookie.is_empty());
}

#[test]
fn a_cluster_without_authentication_shows_the_console_to_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, base) = dev(dir.path(), &["--insecure-no-auth"]);
    let overview = get(&format!("{base}/ui/"), None);
    assert_eq!(overview.status, 200);
    assert!(overview.body.contains("authentication off"));
    let services = get(&format!("{base}/ui/services"), None);
    assert_eq!(services.status, 200);
    let sign_in = get(&format!("{base}/ui/login"), None);
    assert_eq!((sign_in.status, sign_in.location.as_str()), (303, "/ui/"));
}
