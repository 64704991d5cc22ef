//! Who may look: the console is read-only, but it shows the cluster's topology, its services and
//! their addresses, so where the cluster checks tokens it wants one with `admin` in every
//! namespace — the permission `/admin` wants.
//!
//! **No token in a URL, none kept by the browser.** The sign-in page is a plain form that POSTs
//! the token in its body to `/ui/login`. The server checks it as `/admin` does and answers with a
//! cookie holding a random login id (32 bytes, hex) — `HttpOnly` (scripts cannot read it),
//! `SameSite=Strict` (other sites cannot make the browser send it), `Path=/ui`. The token itself
//! stays on neither side: the server keeps the login id with what the token was granted, and
//! checks on every request that the token is still valid (a revoked or expired token ends its
//! logins at once). A cookie, rather than a header set by scripts, is what lets a plain page load
//! and the browser's own `EventSource` (which cannot set headers) carry the login. Logins end
//! after [`IDLE`] without a request, after [`LIFETIME`] in any case, or on "Sign out".
//!
//! Tools may instead send `Authorization: Bearer TOKEN` with each request, as for `/admin`; that
//! is how `curl` reads `/ui/services`. A cluster created with `--insecure-no-auth` asks nothing.
//!
//! Failed sign-ins count against the source address like failed `/admin` calls (10 within 10 s
//! and it is held back), and in `roster_auth_failures_total`.
//!
//! Caveat: the admin port is plain HTTP, so the cookie is not marked `Secure`; reach the console
//! over a network you trust (or a tunnel), as with `/admin`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use roster_common::acl::{ANY_NAMESPACE, Permission, Principal, failure_reason};
use roster_common::{Error, unix_millis};

use super::html::{Viewer, esc, page};
use super::{Console, document};

/// The cookie that carries a login id.
pub const COOKIE: &str = "roster_console";
/// A login ends after this long without a request.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// A login ends this long after it began, however busy.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Logins held at once. Past it the one closest to its end is dropped (its viewer signs in again).
pub const MAX_LOGINS: usize = 1024;

struct Login {
    principal: Principal,
    idle_until: Instant,
    ends_at: Instant,
}

/// The open logins, by id. Plain data, time passed in.
#[derive(Default)]
pub struct Logins {
    by_id: HashMap<String, Login>,
}

impl Logins {
    /// Opens a login for `principal` under the fresh random `id`.
    pub fn open(&mut self, id: String, principal: Principal, now: Instant) {
        self.by_id
            .retain(|_, l| l.idle_until > now && l.ends_at > now);
        if self.by_id.len() >= MAX_LOGINS
            && let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, l)| l.idle_until.min(l.ends_at))
                .map(|(id, _)| id.clone())
        {
            self.by_id.remove(&oldest);
        }
        self.by_id.insert(
            id,
            Login {
                principal,
                idle_until: now + IDLE,
                ends_at: now + LIFETIME,
            },
        );
    }

    /// The principal of login `id` if it is open at `now`; extends its idle deadline.
    pub fn touch(&mut self, id: &str, now: Instant) -> Option<Principal> {
        let login = self.by_id.get_mut(id)?;
        if login.idle_until <= now || login.ends_at <= now {
            self.by_id.remove(id);
            return None;
        }
        login.idle_until = now + IDLE;
        Some(login.principal.clone())
    }

    pub fn close(&mut self, id: &str) {
        self.by_id.remove(id);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// Why a request may not see the console.
#[derive(Debug)]
pub enum Refusal {
    /// The server has no cluster view yet, so it cannot check tokens.
    Starting,
    /// No credentials, or a login that ended: a page sends the browser to the sign-in form.
    SignIn { ended: bool },
    /// A token that is not valid (401), lacks `admin` (403), or too many failures (429).
    Denied { status: StatusCode, message: String },
}

impl Refusal {
    /// The answer for a page at `next`: off to the sign-in form (303), or the form saying why
    /// the token was refused.
    pub fn page(self, next: &str) -> Response {
        match self {
            Refusal::Starting => starting(),
            Refusal::SignIn { ended } => {
                let to = format!(
                    "/ui/login?next={}{}",
                    super::html::encode_path(next).replace('/', "%2F"),
                    if ended { "&ended=1" } else { "" }
                );
                Redirect::to(&to).into_response()
            }
            Refusal::Denied { status, message } => {
                let body = sign_in_form(next, Some(&message));
                (
                    status,
                    document(page("Sign in", "", &Viewer::Anonymous, false, &body)),
                )
                    .into_response()
            }
        }
    }

    /// The answer for a stream: the status and a line of text.
    pub fn plain(self) -> Response {
        match self {
            Refusal::Starting => starting(),
            Refusal::SignIn { .. } => {
                (StatusCode::UNAUTHORIZED, "sign in at /ui/login\n").into_response()
            }
            Refusal::Denied { status, message } => (status, message).into_response(),
        }
    }
}

fn starting() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the session server is still starting\n",
    )
        .into_response()
}

/// Why the sign-in form is shown again, for the browser that was signed in.
pub const ENDED: &str = "Your sign-in has ended (signed out, idle for 30 minutes, or the token was \
                         revoked or expired); sign in again.";

/// The sign-in form, posting to `/ui/login` and coming back to `next`.
pub fn sign_in_form(next: &str, error: Option<&str>) -> String {
    let error = error.map_or_else(String::new, |e| {
        let class = if e == ENDED { "warn" } else { "bad" };
        format!("<p class=\"problem {class}\" role=\"alert\">{}</p>", esc(e))
    });
    format!(
        "<section class=\"card narrow\"><h1>Sign in</h1>{error}\
         <p>This cluster checks tokens. Paste a token with the <code>admin</code> permission \
         (with <code>roster dev</code>: the contents of <code>.roster/admin.token</code>).</p>\
         <form method=\"post\" action=\"/ui/login\" class=\"login\">\
         <input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <label for=\"token\">Admin token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" \
         spellcheck=\"false\" required autofocus>\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"muted\">The token is sent once, in this form's body, and exchanged for a \
         cookie that ends after 30 minutes without use. It is never put in a URL or kept by the \
         browser.</p></section>",
        next = esc(next)
    )
}

impl Console {
    /// Who is asking, or why they may not: by `Authorization: Bearer` if present, else by the
    /// login cookie. Everyone, when the cluster checks no tokens.
    pub fn access(&self, headers: &HeaderMap, source: IpAddr) -> Result<Viewer, Refusal> {
        let Some(view) = self.shared.view() else {
            return Err(Refusal::Starting);
        };
        let acl = &view.acl;
        if !acl.enabled {
            return Ok(Viewer::Open);
        }
        let now = Instant::now();
        if let Some(token) = bearer(headers) {
            let checked = self
                .failures
                .lock()
                .check(source, now)
                .and_then(|()| acl.authenticate(Some(token), unix_millis()))
                .and_then(|who| who.check(ANY_NAMESPACE, Permission::Admin).map(|()| who));
            return match checked {
                Ok(who) => Ok(Viewer::Token(token_label(&who))),
                Err(e) => Err(self.refused(e, source, now)),
            };
        }
        let Some(id) = cookie(headers, COOKIE) else {
            return Err(Refusal::SignIn { ended: false });
        };
        let Some(principal) = self.logins.lock().touch(id, now) else {
            return Err(Refusal::SignIn { ended: true });
        };
        if acl.still_valid(&principal, unix_millis()).is_err() {
            // Revoked or expired since: the login goes with it.
            self.logins.lock().close(id);
            return Err(Refusal::SignIn { ended: true });
        }
        Ok(Viewer::Token(token_label(&principal)))
    }

    /// Checks a token posted by the sign-in form; a new login's cookie on success.
    pub fn sign_in(&self, token: &str, source: IpAddr) -> Result<HeaderValue, Refusal> {
        let Some(view) = self.shared.view() else {
            return Err(Refusal::Starting);
        };
        let now = Instant::now();
        let checked = self
            .failures
            .lock()
            .check(source, now)
            .and_then(|()| view.acl.authenticate(Some(token.trim()), unix_millis()))
            .and_then(|who| who.check(ANY_NAMESPACE, Permission::Admin).map(|()| who));
        let principal = checked.map_err(|e| self.refused(e, source, now))?;
        let id = new_login_id();
        let cookie = format!(
            "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
            LIFETIME.as_secs()
        );
        tracing::info!(token = principal.token_id.as_deref().unwrap_or("-"), %source, "console sign-in");
        self.logins.lock().open(id, principal, now);
        Ok(HeaderValue::from_str(&cookie).expect("a cookie of hex digits"))
    }

    /// Ends the login named by the request's cookie; the cookie that clears it.
    pub fn sign_out(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(id) = cookie(headers, COOKIE) {
            self.logins.lock().close(id);
        }
        HeaderValue::from_static("roster_console=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0")
    }

    /// A refusal for `e`, counted, and held against `source` unless it only lacked a permission.
    fn refused(&self, e: Error, source: IpAddr, now: Instant) -> Refusal {
        let reason = failure_reason(&e);
        metrics::counter!("roster_auth_failures_total", "reason" => reason).increment(1);
        tracing::info!(%source, reason, "console access refused");
        let status = match reason {
            "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
            "permission_denied" => StatusCode::FORBIDDEN,
            _ => {
                self.failures.lock().failed(source, now);
                StatusCode::UNAUTHORIZED
            }
        };
        let message = match status {
            StatusCode::FORBIDDEN => {
                "Refused: this token lacks the admin permission in every namespace (*).".to_owned()
            }
            StatusCode::TOO_MANY_REQUESTS => {
                "Refused: too many failed sign-ins from this address; wait 10 seconds.".to_owned()
            }
            _ => format!("Refused: {e}."),
        };
        Refusal::Denied { status, message }
    }
}

/// How the page shell names a signed-in viewer.
fn token_label(principal: &Principal) -> String {
    match &principal.token_id {
        Some(id) => format!("token {id}"),
        None => "signed in".to_owned(),
    }
}

fn new_login_id() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Field `name` of an `application/x-www-form-urlencoded` body (or query string), decoded.
pub fn form_field(body: &str, name: &str) -> Option<String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| decode(k) == name)
        .map(|(_, v)| decode(v))
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where to go after signing in: a console path, never another site.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/ui/".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal() -> Principal {
        Principal::anyone()
    }

    #[test]
    fn logins_end_when_idle_or_old() {
        let start = Instant::now();
        let mut logins = Logins::default();
        logins.open("a".into(), principal(), start);
        assert!(logins.touch("a", start + IDLE / 2).is_some());
        // Touched at IDLE/2, so still open at IDLE.
        assert!(logins.touch("a", start + IDLE).is_some());
        assert!(
            logins.touch("a", start + IDLE * 3).is_none(),
            "idle too long"
        );
        assert_eq!(logins.len(), 0);

        logins.open("b".into(), principal(), start);
        let mut at = start;
        while at < start + LIFETIME - IDLE {
            at += IDLE / 2;
            assert!(logins.touch("b", at).is_some());
        }
        assert!(logins.touch("b", start + LIFETIME).is_none(), "too old");
        assert!(logins.touch("nope", start).is_none());
    }

    #[test]
    fn logins_are_bounded() {
        let start = Instant::now();
        let mut logins = Logins::default();
        for i in 0..MAX_LOGINS + 5 {
            logins.open(
                i.to_string(),
                principal(),
                start + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(logins.len(), MAX_LOGINS);
        assert!(logins.touch("0", start).is_none(), "the oldest went first");
        assert!(logins.touch(&(MAX_LOGINS + 4).to_string(), start).is_some());
    }

    #[test]
    fn forms_and_cookies_decode() {
        let body = "next=%2Fui%2Fservices&token=rst_ab%2Bc+d&empty";
        assert_eq!(form_field(body, "token").as_deref(), Some("rst_ab+c d"));
        assert_eq!(form_field(body, "next").as_deref(), Some("/ui/services"));
        assert_eq!(form_field(body, "empty").as_deref(), Some(""));
        assert_eq!(form_field(body, "missing"), None);
        assert_eq!(form_field("a=%zz%4", "a").as_deref(), Some("%zz%4"));

        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; roster_console=abc"),
        );
        assert_eq!(cookie(&headers, COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, "y"), None);
    }

    #[test]
    fn only_console_paths_are_followed_after_sign_in() {
        assert_eq!(safe_next(Some("/ui/slots")), "/ui/slots");
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/admin",
            "/ui\\x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui/");
    }
}
