//! Who may do what: tokens, what each allows in which namespaces, and the checks every server runs.
//!
//! A token is `rst_<id>_<secret>`: `id` is 16 hex digits, public, and names the token in lists,
//! logs and revocations; `secret` is 64 hex digits (256 random bits) and is never stored. The meta
//! group keeps, per token, the SHA-256 of its secret and what it grants ([`TokenRecord`]), in its
//! replicated state; every member receives them with the [`crate::proto::ClusterView`] ([`AclView`])
//! and checks tokens locally, comparing hashes in constant time. A secret of 256 random bits needs
//! no slow hash: nobody can search that space, so a plain digest at rest is enough.
//!
//! A token grants [`Permission`]s in namespaces (`*` is every namespace). A cluster created
//! without authentication has [`AclView::enabled`] false: then every connection may do everything.
//!
//! [`FailureLimiter`] is the per-source brake on guessing: after [`FAILURES_ALLOWED`] failed
//! authentications within [`FAILURE_WINDOW`], a source is refused until the window has passed.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::Error;

/// The namespace pattern that matches every namespace.
pub const ANY_NAMESPACE: &str = "*";
const TOKEN_PREFIX: &str = "rst_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;
/// Failed authentications a source address may make within [`FAILURE_WINDOW`].
pub const FAILURES_ALLOWED: u32 = 10;
/// The window [`FAILURES_ALLOWED`] counts in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(10);
/// Source addresses the limiter remembers at most (the oldest windows are dropped first).
const LIMITER_CAPACITY: usize = 4096;

/// What a token may do in its namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Register, update and remove publishers.
    Publish,
    /// Subscribe to services and list them.
    Subscribe,
    /// Read the HTTP admin API.
    Admin,
}

impl Permission {
    pub const ALL: [Permission; 3] = [
        Permission::Publish,
        Permission::Subscribe,
        Permission::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Permission::Publish => "publish",
            Permission::Subscribe => "subscribe",
            Permission::Admin => "admin",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Permission {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown permission {s:?}: choose from publish, subscribe, admin"
                ))
            })
    }
}

/// A token held in memory or a config: shown as `Secret(..)` by `Debug`, so logging a config that
/// holds one does not leak it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Secret(text)
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Secret(text.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One token as the meta group stores it: never the secret, only its digest.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the secret (see [`hash_secret`]).
    pub hash: Bytes,
    /// Namespaces it applies to; `*` is all.
    pub namespaces: Vec<String>,
    pub allow: Vec<Permission>,
    /// Unix milliseconds after which it is refused; `None` never expires.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub created_at_ms: u64,
    /// Who asked for it, as they said (the peer protocol only admits holders of a node
    /// certificate).
    #[serde(default)]
    pub created_by: String,
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The digest is not secret, but it has no business in logs either.
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("namespaces", &self.namespaces)
            .field("allow", &self.allow)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

impl TokenRecord {
    /// The record of `token` (as produced by [`generate_token`]) granting `allow` in `namespaces`.
    pub fn of_token(
        token: &str,
        namespaces: Vec<String>,
        allow: Vec<Permission>,
        expires_at_ms: Option<u64>,
    ) -> Result<Self, Error> {
        let (id, secret) = parse_token(token)?;
        let mut allow = allow;
        allow.sort();
        allow.dedup();
        Ok(TokenRecord {
            id: id.to_owned(),
            hash: Bytes::copy_from_slice(&hash_secret(secret)),
            namespaces,
            allow,
            expires_at_ms,
            description: String::new(),
            created_at_ms: 0,
            created_by: String::new(),
        })
    }

    /// What lists show of it.
    pub fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            namespaces: self.namespaces.clone(),
            allow: self.allow.clone(),
            expires_at_ms: self.expires_at_ms,
            description: self.description.clone(),
            created_at_ms: self.created_at_ms,
            created_by: self.created_by.clone(),
        }
    }

    fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }
}

/// A token as `roster acl token list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub namespaces: Vec<String>,
    pub allow: Vec<Permission>,
    pub expires_at_ms: Option<u64>,
    pub description: String,
    pub created_at_ms: u64,
    pub created_by: String,
}

/// The access rules every member receives with the cluster view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclView {
    /// False for a cluster created with `--insecure-no-auth`: no token is asked for.
    pub enabled: bool,
    /// Ordered by id.
    pub tokens: Vec<TokenRecord>,
}

/// Why an authentication failed: the label of `roster_auth_failures_total`.
pub fn failure_reason(e: &Error) -> &'static str {
    match e {
        Error::Unauthenticated(m) if m.starts_with(MISSING) => "missing_token",
        Error::Unauthenticated(m) if m.starts_with(EXPIRED) => "expired_token",
        Error::Unauthenticated(m) if m.starts_with(RATE_LIMITED) => "rate_limited",
        Error::Unauthenticated(_) => "invalid_token",
        Error::PermissionDenied(_) => "permission_denied",
        _ => "other",
    }
}

const MISSING: &str = "this cluster requires a token";
const EXPIRED: &str = "token expired";
const RATE_LIMITED: &str = "too many failed authentications";

impl AclView {
    /// Who presents `token` at `now_ms`: `Unauthenticated` when the token is missing, malformed,
    /// unknown (or revoked), wrong or expired. With authentication off, everyone may do anything.
    pub fn authenticate(&self, token: Option<&str>, now_ms: u64) -> Result<Principal, Error> {
        if !self.enabled {
            return Ok(Principal::anyone());
        }
        let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
            Error::Unauthenticated(format!(
                "{MISSING}: set `token` or `token-file` in client.toml, ROSTER_TOKEN, or --token"
            ))
        })?;
        let invalid =
            || Error::Unauthenticated("the token is not valid (unknown, revoked or wrong)".into());
        let (id, secret) = parse_token(token).map_err(|_| invalid())?;
        let record = self.find(id).ok_or_else(invalid)?;
        // The same work whether or not the digest matches.
        if !bool::from(record.hash.as_ref().ct_eq(&hash_secret(secret))) {
            return Err(invalid());
        }
        if record.is_expired(now_ms) {
            return Err(Error::Unauthenticated(format!("{EXPIRED}: token {id}")));
        }
        Ok(Principal {
            token_id: Some(record.id.clone()),
            namespaces: record.namespaces.clone(),
            allow: record.allow.clone(),
            expires_at_ms: record.expires_at_ms,
        })
    }

    fn find(&self, id: &str) -> Option<&TokenRecord> {
        self.tokens
            .binary_search_by(|t| t.id.as_str().cmp(id))
            .ok()
            .map(|at| &self.tokens[at])
    }

    /// Whether what `principal` was granted still holds at `now_ms`: `Unauthenticated` once its
    /// token is revoked or expired.
    pub fn still_valid(&self, principal: &Principal, now_ms: u64) -> Result<(), Error> {
        let Some(id) = &principal.token_id else {
            return Ok(());
        };
        if !self.enabled {
            return Ok(());
        }
        match self.find(id) {
            None => Err(Error::Unauthenticated(format!("token {id} was revoked"))),
            Some(record) if record.is_expired(now_ms) => {
                Err(Error::Unauthenticated(format!("{EXPIRED}: token {id}")))
            }
            Some(_) => Ok(()),
        }
    }
}

/// What an authenticated connection may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// `None` when authentication is off.
    pub token_id: Option<String>,
    pub namespaces: Vec<String>,
    pub allow: Vec<Permission>,
    pub expires_at_ms: Option<u64>,
}

impl Principal {
    /// Everything, for clusters without authentication.
    pub fn anyone() -> Self {
        Principal {
            token_id: None,
            namespaces: vec![ANY_NAMESPACE.to_owned()],
            allow: Permission::ALL.to_vec(),
            expires_at_ms: None,
        }
    }

    /// Whether it holds `permission` in `namespace`.
    pub fn may(&self, namespace: &str, permission: Permission) -> bool {
        self.allow.contains(&permission)
            && self
                .namespaces
                .iter()
                .any(|n| n == ANY_NAMESPACE || n == namespace)
    }

    /// `PermissionDenied` naming the namespace and permission unless it [`may`](Self::may).
    pub fn check(&self, namespace: &str, permission: Permission) -> Result<(), Error> {
        if self.may(namespace, permission) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "token {} has no {permission} permission in namespace {namespace:?}",
            self.token_id.as_deref().unwrap_or("-")
        )))
    }
}

/// A new random token: `rst_<16 hex id>_<64 hex secret>`.
pub fn generate_token() -> String {
    let id: [u8; ID_HEX / 2] = rand::random();
    let secret: [u8; SECRET_HEX / 2] = rand::random();
    format!("{TOKEN_PREFIX}{}_{}", hex(&id), hex(&secret))
}

/// The id of a well-formed token; `InvalidArgument` naming `what` ("the admin token") otherwise.
pub fn token_id<'a>(what: &str, token: &'a str) -> Result<&'a str, Error> {
    parse_token(token).map(|(id, _)| id).map_err(|_| {
        Error::InvalidArgument(format!(
            "{what} is malformed: a token is {TOKEN_PREFIX}<{ID_HEX} hex digits>_<{SECRET_HEX} hex \
             digits> (made by `roster acl token create` or `roster acl token generate`)"
        ))
    })
}

/// Splits a token into its id and secret, refusing anything not shaped like [`generate_token`]'s.
fn parse_token(token: &str) -> Result<(&str, &str), Error> {
    let malformed = || {
        Error::InvalidArgument(format!(
            "a token is {TOKEN_PREFIX}<{ID_HEX} hex digits>_<{SECRET_HEX} hex digits>"
        ))
    };
    let rest = token
        .trim()
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(malformed)?;
    let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !is_hex(id, ID_HEX) || !is_hex(secret, SECRET_HEX) {
        return Err(malformed());
    }
    Ok((id, secret))
}

/// The digest stored for a secret.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"roster-token/1\0");
    context.update(secret.as_bytes());
    let digest = context.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Failed authentications per source address, and whether a source must wait. Decides only;
/// takes `now` from the caller.
#[derive(Debug, Default)]
pub struct FailureLimiter {
    /// Per source: failures in the current window and when that window started.
    sources: HashMap<IpAddr, (u32, Instant)>,
}

impl FailureLimiter {
    /// `Unauthenticated` (a rate-limit message) while `source` has used up its failures.
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Result<(), Error> {
        match self.sources.get(&source) {
            Some(&(count, since)) if now.duration_since(since) < FAILURE_WINDOW => {
                if count >= FAILURES_ALLOWED {
                    let wait = FAILURE_WINDOW - now.duration_since(since);
                    return Err(Error::Unauthenticated(format!(
                        "{RATE_LIMITED} from {source}: retry in {} s",
                        wait.as_secs().max(1)
                    )));
                }
                Ok(())
            }
            Some(_) => {
                self.sources.remove(&source);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts one failure of `source`.
    pub fn failed(&mut self, source: IpAddr, now: Instant) {
        if self.sources.len() >= LIMITER_CAPACITY && !self.sources.contains_key(&source) {
            self.sources
                .retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
            if self.sources.len() >= LIMITER_CAPACITY
                && let Some(oldest) = self
                    .sources
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(ip, _)| *ip)
            {
                self.sources.remove(&oldest);
            }
        }
        let entry = self.sources.entry(source).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(records: Vec<TokenRecord>) -> AclView {
        let mut tokens = records;
        tokens.sort_by(|a, b| a.id.cmp(&b.id));
        AclView {
            enabled: true,
            tokens,
        }
    }

    #[test]
    fn a_token_authenticates_with_what_it_grants() {
        let token = generate_token();
        let record = TokenRecord::of_token(
            &token,
            vec!["prod".into()],
            vec![Permission::Subscribe, Permission::Publish],
            None,
        )
        .unwrap();
        assert_eq!(
            record.allow,
            vec![Permission::Publish, Permission::Subscribe]
        );
        let acl = view(vec![record]);
        let who = acl.authenticate(Some(&token), 0).unwrap();
        assert_eq!(
            who.token_id.as_deref(),
            Some(token_id("t", &token).unwrap())
        );
        assert!(who.check("prod", Permission::Publish).is_ok());
        let denied = who.check("dev", Permission::Subscribe).unwrap_err();
        assert!(
            matches!(&denied, Error::PermissionDenied(m) if m.contains("subscribe") && m.contains("\"dev\"")),
            "{denied}"
        );
        assert!(who.check("prod", Permission::Admin).is_err());
    }

    #[test]
    fn missing_wrong_unknown_and_expired_tokens_are_refused() {
        let token = generate_token();
        let record = TokenRecord::of_token(
            &token,
            vec!["*".into()],
            vec![Permission::Admin],
            Some(1_000),
        )
        .unwrap();
        let acl = view(vec![record]);
        let reason = |t: Option<&str>, now| failure_reason(&acl.authenticate(t, now).unwrap_err());
        assert_eq!(reason(None, 0), "missing_token");
        assert_eq!(reason(Some(""), 0), "missing_token");
        assert_eq!(reason(Some("hunter2"), 0), "invalid_token");
        let id = token_id("t", &token).unwrap();
        let wrong = format!("{TOKEN_PREFIX}{id}_{}", "0".repeat(SECRET_HEX));
        assert_eq!(reason(Some(&wrong), 0), "invalid_token");
        assert_eq!(reason(Some(&generate_token()), 0), "invalid_token");
        assert!(acl.authenticate(Some(&token), 999).is_ok());
        assert_eq!(reason(Some(&token), 1_000), "expired_token");
    }

    #[test]
    fn revocation_and_expiry_end_what_was_granted() {
        let token = generate_token();
        let record = TokenRecord::of_token(
            &token,
            vec!["*".into()],
            vec![Permission::Publish],
            Some(50),
        )
        .unwrap();
        let acl = view(vec![record]);
        let who = acl.authenticate(Some(&token), 0).unwrap();
        assert!(acl.still_valid(&who, 10).is_ok());
        assert!(acl.still_valid(&who, 50).is_err());
        let revoked = view(vec![]);
        let e = revoked.still_valid(&who, 0).unwrap_err();
        assert!(
            matches!(&e, Error::Unauthenticated(m) if m.contains("revoked")),
            "{e}"
        );
    }

    #[test]
    fn without_authentication_anyone_may_do_anything() {
        let acl = AclView::default();
        let who = acl.authenticate(None, 0).unwrap();
        for p in Permission::ALL {
            assert!(who.may("any", p));
        }
        assert!(acl.still_valid(&who, u64::MAX).is_ok());
    }

    #[test]
    fn malformed_tokens_are_not_parsed() {
        for bad in [
            "",
            "rst_",
            "rst_abc_def",
            &format!("rst_{}_{}", "g".repeat(16), "0".repeat(64)),
            &format!("rst_{}_{}", "0".repeat(16), "0".repeat(63)),
            &format!("rst_{}_{}", "A".repeat(16), "0".repeat(64)),
        ] {
            assert!(parse_token(bad).is_err(), "{bad:?}");
        }
        assert!(parse_token(&generate_token()).is_ok());
    }

    #[test]
    fn a_source_that_keeps_failing_waits_out_the_window() {
        let mut limiter = FailureLimiter::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let start = Instant::now();
        for _ in 0..FAILURES_ALLOWED {
            assert!(limiter.check(ip, start).is_ok());
            limiter.failed(ip, start);
        }
        let e = limiter
            .check(ip, start + Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(failure_reason(&e), "rate_limited");
        assert!(
            limiter.check(other, start).is_ok(),
            "other sources are not held back"
        );
        assert!(limiter.check(ip, start + FAILURE_WINDOW).is_ok());
    }

    #[test]
    fn the_limiter_forgets_the_oldest_sources_first() {
        let mut limiter = FailureLimiter::default();
        let start = Instant::now();
        for i in 0..LIMITER_CAPACITY as u32 + 10 {
            let ip = IpAddr::from(i.to_be_bytes());
            limiter.failed(ip, start + Duration::from_millis(u64::from(i)));
        }
        assert!(limiter.sources.len() <= LIMITER_CAPACITY);
        assert!(
            !limiter
                .sources
                .contains_key(&IpAddr::from(0u32.to_be_bytes()))
        );
    }
}
