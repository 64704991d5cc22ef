//! Minting tokens: what an operator's `CreateToken` becomes in the replicated log.
//!
//! The meta leader draws the token, keeps only its digest ([`TokenRecord`]) and hands the token
//! back once. Checks here refuse requests that could only be mistakes: no namespace, no permission,
//! a namespace no service can have, a lifetime under a second.

use std::time::Duration;

use roster_common::acl::{Permission, TokenRecord, generate_token};
use roster_common::{Error, Result};

/// The longest description kept with a token.
const MAX_DESCRIPTION: usize = 256;
/// The shortest lifetime a token may be given.
const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest namespace a token may name.
const MAX_NAMESPACE_LEN: usize = 128;
/// The most namespaces one token may name.
const MAX_NAMESPACES: usize = 64;

/// What an operator asked for.
pub struct TokenRequest {
    pub namespaces: Vec<String>,
    pub allow: Vec<Permission>,
    pub ttl_ms: Option<u64>,
    pub description: String,
    pub by: String,
}

/// A new token and the record the log keeps of it, created at `now_ms`.
pub fn mint(request: TokenRequest, now_ms: u64) -> Result<(String, TokenRecord)> {
    let TokenRequest {
        mut namespaces,
        allow,
        ttl_ms,
        description,
        by,
    } = request;
    if namespaces.is_empty() || namespaces.len() > MAX_NAMESPACES {
        return Err(Error::InvalidArgument(format!(
            "a token names 1 to {MAX_NAMESPACES} namespaces (`*` for all)"
        )));
    }
    for namespace in &namespaces {
        // A service's namespace is what precedes the first `/` of its id.
        let possible = !namespace.is_empty()
            && namespace.len() <= MAX_NAMESPACE_LEN
            && !namespace.contains('/')
            && !namespace.chars().any(char::is_control);
        if !possible {
            return Err(Error::InvalidArgument(format!(
                "no service can be in namespace {namespace:?}: a namespace is 1 to \
                 {MAX_NAMESPACE_LEN} bytes without `/` or control characters (`*`: all)"
            )));
        }
    }
    namespaces.sort();
    namespaces.dedup();
    if allow.is_empty() {
        return Err(Error::InvalidArgument(
            "a token allows at least one of publish, subscribe, admin".into(),
        ));
    }
    if let Some(ttl) = ttl_ms
        && ttl < MIN_TTL.as_millis() as u64
    {
        return Err(Error::InvalidArgument(format!(
            "a token's lifetime is at least {MIN_TTL:?}"
        )));
    }
    if description.len() > MAX_DESCRIPTION || description.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "a description is at most {MAX_DESCRIPTION} bytes of printable text"
        )));
    }
    let token = generate_token();
    let expires_at_ms = ttl_ms.map(|ttl| now_ms.saturating_add(ttl));
    let mut record = TokenRecord::of_token(&token, namespaces, allow, expires_at_ms)?;
    record.description = description;
    record.created_at_ms = now_ms;
    record.created_by = clean_name(&by);
    Ok((token, record))
}

/// Who asked, as they said, cut to something a log line can carry.
pub fn clean_name(by: &str) -> String {
    let name: String = by.chars().filter(|c| !c.is_control()).take(128).collect();
    if name.is_empty() {
        "unnamed operator".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(namespaces: &[&str], allow: &[Permission]) -> TokenRequest {
        TokenRequest {
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            allow: allow.to_vec(),
            ttl_ms: None,
            description: String::new(),
            by: "alice".into(),
        }
    }

    #[test]
    fn a_token_is_minted_with_only_its_digest_kept() {
        let (token, record) = mint(
            TokenRequest {
                ttl_ms: Some(60_000),
                description: "payments".into(),
                ..request(&["prod", "prod", "dev"], &[Permission::Publish])
            },
            1_000,
        )
        .unwrap();
        assert_eq!(
            record.id,
            roster_common::acl::token_id("t", &token).unwrap()
        );
        assert_eq!(record.namespaces, vec!["dev", "prod"]);
        assert_eq!(record.expires_at_ms, Some(61_000));
        assert_eq!(record.created_by, "alice");
        let secret = token.rsplit('_').next().unwrap();
        assert!(
            !record
                .hash
                .windows(8)
                .any(|w| secret.as_bytes().windows(8).any(|s| s == w)),
            "the secret is not stored"
        );
    }

    #[test]
    fn requests_that_can_only_be_mistakes_are_refused() {
        let p = [Permission::Subscribe];
        assert!(mint(request(&[], &p), 0).is_err());
        assert!(mint(request(&["prod"], &[]), 0).is_err());
        assert!(mint(request(&["a/b"], &p), 0).is_err());
        assert!(
            mint(
                TokenRequest {
                    ttl_ms: Some(10),
                    ..request(&["*"], &p)
                },
                0
            )
            .is_err()
        );
        assert!(
            mint(
                TokenRequest {
                    description: "a\nb".into(),
                    ..request(&["*"], &p)
                },
                0
            )
            .is_err()
        );
        assert!(mint(request(&["*"], &p), 0).is_ok());
    }
}
