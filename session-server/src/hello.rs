//! A connection's `Hello`: who the client is, what its token allows, and what it takes.
//!
//! Until a valid `Hello` arrives, every request is refused with `HelloRequired`. `Hello` is checked
//! in this order: the protocol version and the id's shape; the token, where the cluster checks
//! tokens (`Unauthenticated` otherwise, and the connection is closed with
//! [`CLOSE_UNAUTHENTICATED`]; a source that keeps failing is refused for a while without its token
//! being looked at); the server's capacity (`LimitExceeded`, closed with [`CLOSE_FULL`]); and the
//! client id, which the connection then holds (see [`crate::clients`]): a `client_id` is only a
//! name, and what proves a connection belongs to the client of that name is the secret it
//! presents. A client that comes back within its lost connection's grace adopts that
//! connection's publishers ([`adopt`]), so they are never removed in between.
//!
//! After `Hello`, the connection watches the cluster view: when its token is revoked or expires,
//! [`rights_lost`] says so and the connection is closed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use quinn::Connection;
use roster_common::acl::{Principal, failure_reason};
use roster_common::proto::{CAPABILITY_DELTA, ClientRequest, ClientResponse};
use roster_common::{ClientId, Error, RegisterId, Result, ServiceId, rpc, unix_millis};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::hub::ConnId;
use crate::shared::Shared;
use crate::{CLOSE_FULL, CLOSE_PROTOCOL, CLOSE_UNAUTHENTICATED};

/// What a client said in its `Hello`.
pub(crate) struct Hello {
    /// The client id it proved, held for this connection.
    pub hold: IdentityHold,
    /// What its token allows.
    pub principal: Principal,
    /// It takes `Delta` pushes.
    pub deltas: bool,
}

/// A connection's hold on its client id (see [`crate::clients::Clients::claim`]); released on
/// drop.
pub(crate) struct IdentityHold {
    shared: Arc<Shared>,
    pub client_id: ClientId,
    /// Proven by the secret in `Hello`; stamped on every record the connection writes.
    pub owner: u128,
}

impl IdentityHold {
    /// Takes a hold on `client_id` for a connection that presented `secret`.
    fn claim(shared: &Arc<Shared>, client_id: ClientId, secret: &[u8]) -> Result<IdentityHold> {
        let owner = roster_common::ids::owner_of(&client_id, secret);
        if let Err(e) = shared.clients().claim(&client_id, owner) {
            metrics::counter!("roster_auth_failures_total", "reason" => "client_id_in_use")
                .increment(1);
            return Err(e);
        }
        Ok(IdentityHold {
            shared: shared.clone(),
            client_id,
            owner,
        })
    }
}

impl Drop for IdentityHold {
    fn drop(&mut self) {
        self.shared.clients().release(&self.client_id);
    }
}

/// The publishers of this client's lost connections still within their grace, now this
/// connection's: they are not removed, and the client's registering them again replaces them.
pub(crate) fn adopt(
    shared: &Shared,
    client_id: &str,
    conn: ConnId,
) -> HashMap<RegisterId, ServiceId> {
    let orphans = shared.clients().adopt(client_id);
    let mut adopted = HashMap::new();
    if orphans.is_empty() {
        return adopted;
    }
    let mut owned = shared.owned();
    for orphan in orphans {
        for (register_id, service) in orphan.publishers {
            owned.reassign(&service, client_id, &register_id, orphan.conn, conn);
            adopted.insert(register_id, service);
        }
    }
    drop(owned);
    metrics::counter!("roster_session_client_returns_total").increment(1);
    info!(
        publishers = adopted.len(),
        "the client came back within its grace; its publishers stay"
    );
    adopted
}

/// Serves requests until a valid `Hello` arrives; everything before it is refused with
/// `HelloRequired`. Returns what the client said, or `None` if the connection ended first.
pub(crate) async fn await_hello(
    shared: &Arc<Shared>,
    conn: &Connection,
    shutdown: &CancellationToken,
) -> Option<Hello> {
    let max_frame = shared.config().max_frame;
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = shutdown.cancelled() => return None,
            stream = conn.accept_bi() => stream.ok()?,
        };
        let request = rpc::read_request::<ClientRequest>(&mut recv, max_frame).await;
        let (result, hello) = match request {
            Ok(ClientRequest::Hello {
                protocol_version,
                client_id,
                capabilities,
                client_secret,
                token,
                ..
            }) => match check_hello(protocol_version, &client_id, &client_secret)
                .and_then(|()| authenticate(shared, conn, token.as_deref()))
                .and_then(|principal| {
                    check_capacity(shared)?;
                    Ok((
                        principal,
                        IdentityHold::claim(shared, client_id, &client_secret)?,
                    ))
                }) {
                Ok((principal, hold)) => {
                    // The capabilities this server grants: those asked for that it has.
                    let granted: Vec<String> = capabilities
                        .into_iter()
                        .filter(|c| c == CAPABILITY_DELTA)
                        .take(1)
                        .collect();
                    let deltas = !granted.is_empty();
                    (
                        Ok(ClientResponse::Welcome {
                            protocol_version: roster_common::proto::PROTOCOL_VERSION,
                            session_id: shared.config().id,
                            max_frame,
                            idle_timeout_ms: shared
                                .config()
                                .client_transport
                                .idle_timeout
                                .as_millis() as u64,
                            capabilities: granted,
                            max_requests: Some(shared.config().max_requests_per_connection),
                        }),
                        Some(Hello {
                            hold,
                            principal,
                            deltas,
                        }),
                    )
                }
                Err(e) => (Err(e), None),
            },
            Ok(other) => (
                Err(Error::HelloRequired(format!(
                    "got {} before Hello",
                    request_name(&other)
                ))),
                None,
            ),
            Err(e) => (Err(e), None),
        };
        roster_common::admin::count_request("session", "Hello", &result);
        if let Err(e) = &result {
            debug!(error = %e, "refused a request before Hello");
        }
        let fatal = match &result {
            Err(Error::UnsupportedVersion(_)) => {
                Some((CLOSE_PROTOCOL, &b"unsupported protocol version"[..]))
            }
            Err(Error::LimitExceeded(_)) => Some((CLOSE_FULL, &b"too many connections"[..])),
            Err(Error::Unauthenticated(_)) => {
                Some((CLOSE_UNAUTHENTICATED, &b"unauthenticated"[..]))
            }
            _ => None,
        };
        let _ = rpc::send_reply(&mut send, result, max_frame).await;
        if let Some((code, reason)) = fatal {
            // Give the reply a moment to leave before the connection goes.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            conn.close(code, reason);
            return None;
        }
        if hello.is_some() {
            return hello;
        }
    }
}

fn check_hello(protocol_version: u32, client_id: &str, secret: &[u8]) -> Result<()> {
    if protocol_version != roster_common::proto::PROTOCOL_VERSION {
        return Err(Error::UnsupportedVersion(format!(
            "client speaks version {protocol_version}; this server speaks {}",
            roster_common::proto::PROTOCOL_VERSION
        )));
    }
    roster_common::ids::check_id("client_id", client_id)?;
    if roster_common::ids::is_reserved_client_id(client_id) {
        return Err(Error::InvalidArgument(format!(
            "client_id {client_id:?}: ids starting with `~` are reserved for records the cluster \
             keeps itself"
        )));
    }
    let bounds = roster_common::ids::CLIENT_SECRET_LEN;
    if !bounds.contains(&secret.len()) {
        return Err(Error::InvalidArgument(format!(
            "client_secret must be {} to {} random bytes, the same on every connection of the \
             client (got {})",
            bounds.start(),
            bounds.end(),
            secret.len()
        )));
    }
    Ok(())
}

/// What the token of a `Hello` allows: `Unauthenticated` (counted, and held against the source
/// address) when the cluster checks tokens and this one does not pass.
fn authenticate(shared: &Shared, conn: &Connection, token: Option<&str>) -> Result<Principal> {
    let view = shared
        .view()
        .ok_or_else(|| Error::Unavailable("this session server has no cluster view yet".into()))?;
    let source = conn.remote_address().ip();
    let now = Instant::now();
    let result = shared
        .auth_failures()
        .check(source, now)
        .and_then(|()| view.acl.authenticate(token, unix_millis()));
    if let Err(e) = &result {
        let reason = failure_reason(e);
        metrics::counter!("roster_auth_failures_total", "reason" => reason).increment(1);
        if reason != "rate_limited" {
            shared.auth_failures().failed(source, now);
        }
        info!(%source, reason, "refused a client's token");
    }
    result
}

/// Resolves when `principal`'s token is revoked or expires, with the `Unauthenticated` error that
/// says which; never while the cluster does not check tokens.
pub(crate) async fn rights_lost(shared: &Shared, principal: &Principal) -> Error {
    if principal.token_id.is_none() {
        return std::future::pending().await;
    }
    let mut views = shared.views();
    loop {
        let verdict = views
            .borrow_and_update()
            .as_ref()
            .map(|view| view.acl.still_valid(principal, unix_millis()));
        if let Some(Err(lost)) = verdict {
            return lost;
        }
        // Wake just after expiry; clocks in milliseconds round down.
        let expiry = principal.expires_at_ms.map(|at| {
            std::time::Duration::from_millis(at.saturating_sub(unix_millis()).saturating_add(1))
        });
        tokio::select! {
            changed = views.changed() => if changed.is_err() {
                return std::future::pending().await;
            },
            _ = async { tokio::time::sleep(expiry.expect("guarded")).await }, if expiry.is_some() => {}
        }
    }
}

/// Refuses a connection beyond `max_connections`.
fn check_capacity(shared: &Shared) -> Result<()> {
    let connections = shared.hub().counts().connections;
    if connections >= shared.config().max_connections {
        return Err(Error::LimitExceeded(format!(
            "this session server holds its maximum of {} connections; try another",
            shared.config().max_connections
        )));
    }
    Ok(())
}

pub(crate) fn request_name(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::Hello { .. } => "Hello",
        ClientRequest::Publish { .. } => "Publish",
        ClientRequest::Unpublish { .. } => "Unpublish",
        ClientRequest::Subscribe { .. } => "Subscribe",
        ClientRequest::Unsubscribe { .. } => "Unsubscribe",
        ClientRequest::Ping {} => "Ping",
        ClientRequest::ListServices {} => "ListServices",
        ClientRequest::RegisterPersistent { .. } => "RegisterPersistent",
        ClientRequest::DeregisterPersistent { .. } => "DeregisterPersistent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_with_a_reserved_or_bad_client_id_is_refused() {
        let secret = [7u8; 32];
        let v = roster_common::proto::PROTOCOL_VERSION;
        assert!(check_hello(v, "client-1", &secret).is_ok());
        let reserved = check_hello(v, "~persistent", &secret).unwrap_err();
        assert!(matches!(reserved, Error::InvalidArgument(_)), "{reserved}");
        assert!(reserved.to_string().contains("reserved"), "{reserved}");
        assert!(matches!(
            check_hello(v, "", &secret),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            check_hello(v, "client-1", &[1u8; 4]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            check_hello(v + 1, "client-1", &secret),
            Err(Error::UnsupportedVersion(_))
        ));
    }
}
