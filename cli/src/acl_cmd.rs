//! `roster acl token create|list|revoke|generate`: the cluster's tokens.
//!
//! Like `roster cluster`, these speak the peer protocol to a meta node with the cluster's node
//! certificate: holding that certificate is what makes an operator. A created token is printed
//! once, on standard output alone (so `TOKEN=$(roster acl token create ...)` works); the meta group
//! keeps only its digest.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use roster_common::acl::{Permission, TokenInfo, generate_token};
use roster_common::proto::{MetaRequest, MetaResponse};
use roster_common::unix_millis;

use crate::cluster_cmd::{MetaTarget, ask, done};

/// Arguments of `roster acl`.
#[derive(Args, Debug)]
pub struct AclArgs {
    #[command(flatten)]
    target: MetaTarget,
    #[command(subcommand)]
    command: AclCommand,
}

#[derive(Subcommand, Debug)]
enum AclCommand {
    /// Tokens: what clients present to session servers, and operators to `/admin`.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token; it is printed once, on standard output, and never shown again.
    Create {
        /// Namespaces it applies to, comma-separated or repeated; `*` is every namespace.
        #[arg(
            long = "namespace",
            value_name = "NS",
            value_delimiter = ',',
            required = true
        )]
        namespaces: Vec<String>,
        /// What it allows there: publish, subscribe, admin (comma-separated).
        #[arg(
            long,
            value_name = "PERM[,PERM...]",
            value_delimiter = ',',
            required = true
        )]
        allow: Vec<Permission>,
        /// Lifetime, e.g. 90s, 30m, 12h, 7d [default: never expires].
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// A note kept with the token (who uses it, what for).
        #[arg(long, value_name = "TEXT", default_value = "")]
        description: String,
    },
    /// List the tokens (ids and grants; never secrets).
    List,
    /// Revoke token ID: connections that presented it are closed within about a second.
    Revoke { id: String },
    /// Print a new random token without contacting the cluster: the bootstrap admin token to put
    /// in the file (or Kubernetes Secret) every initial meta node is given with
    /// --admin-token-file.
    Generate,
}

/// A lifetime like `90s`, `30m`, `12h` or `7d` (a duration as the client commands take them, of at
/// least a second).
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = crate::client_cmd::parse_duration(text)?;
    if ttl < Duration::from_secs(1) {
        return Err(format!("{text:?}: a token lives at least 1s"));
    }
    Ok(ttl)
}

/// Who runs this command, for the meta group's log.
fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown user".into());
    format!("{user} (roster acl)")
}

pub async fn run(args: AclArgs) -> anyhow::Result<()> {
    let AclCommand::Token(command) = args.command;
    let json = args.target.json;
    if let TokenCommand::Generate = command {
        println!("{}", generate_token());
        return Ok(());
    }
    let config = args.target.config()?;
    let timeout = Duration::from_secs(10);
    match command {
        TokenCommand::Create {
            namespaces,
            allow,
            ttl,
            description,
        } => {
            let request = MetaRequest::CreateToken {
                namespaces,
                allow,
                ttl_ms: ttl.map(|t| t.as_millis() as u64),
                description,
                by: operator(),
            };
            let MetaResponse::TokenCreated { token, info } =
                ask(&config, &request, timeout).await?
            else {
                bail!("unexpected answer to CreateToken");
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"token": token, "info": info_json(&info)})
                );
            } else {
                println!("{token}");
                eprintln!(
                    "created token {} ({} in {}, {}); it is shown only this once",
                    info.id,
                    names(&info.allow),
                    info.namespaces.join(","),
                    expiry(info.expires_at_ms)
                );
            }
        }
        TokenCommand::List => {
            let MetaResponse::Tokens { enabled, tokens } =
                ask(&config, &MetaRequest::ListTokens {}, timeout).await?
            else {
                bail!("unexpected answer to ListTokens");
            };
            if json {
                let tokens: Vec<_> = tokens.iter().map(info_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"auth": enabled, "tokens": tokens})
                    )?
                );
            } else {
                if !enabled {
                    println!(
                        "authentication is off: this cluster was created with --insecure-no-auth"
                    );
                }
                println!(
                    "{:<18} {:<24} {:<26} {:<16} {:<20} DESCRIPTION",
                    "ID", "NAMESPACES", "ALLOW", "EXPIRES", "CREATED BY"
                );
                for t in &tokens {
                    println!(
                        "{:<18} {:<24} {:<26} {:<16} {:<20} {}",
                        t.id,
                        t.namespaces.join(","),
                        names(&t.allow),
                        expiry(t.expires_at_ms),
                        t.created_by,
                        t.description
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let request = MetaRequest::RevokeToken {
                id: id.clone(),
                by: operator(),
            };
            ask(&config, &request, timeout).await?;
            done(json, &format!("token {id} revoked"));
        }
        TokenCommand::Generate => unreachable!("answered above"),
    }
    Ok(())
}

fn names(allow: &[Permission]) -> String {
    allow.iter().map(|p| p.name()).collect::<Vec<_>>().join(",")
}

/// `never`, `expired`, or how long is left.
fn expiry(expires_at_ms: Option<u64>) -> String {
    let Some(at) = expires_at_ms else {
        return "never".into();
    };
    let now = unix_millis();
    if at <= now {
        return "expired".into();
    }
    let left = (at - now) / 1000;
    match left {
        0..120 => format!("in {left}s"),
        120..7200 => format!("in {}m", left / 60),
        7200..172_800 => format!("in {}h", left / 3600),
        _ => format!("in {}d", left / 86_400),
    }
}

fn info_json(info: &TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": info.id,
        "namespaces": info.namespaces,
        "allow": info.allow,
        "expires_at_ms": info.expires_at_ms,
        "expired": info.expires_at_ms.is_some_and(|at| at <= unix_millis()),
        "description": info.description,
        "created_at_ms": info.created_at_ms,
        "created_by": info.created_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_with_their_unit() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "h",
            "10",
            "10y",
            "-5s",
            "99999999999999999999d",
            "500ms",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }
}
