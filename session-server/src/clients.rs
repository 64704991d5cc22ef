//! The clients known to one session server: which owner holds each client id, and the publishers
//! of lost connections waiting out their grace.
//!
//! A `client_id` is only a name. The owner — derived from the id and the secret a client presents
//! in `Hello` — is what proves a connection belongs to the client of that name. While connections
//! (live, or lost and within their grace) hold a client id here, a connection proving another
//! owner is refused. When a connection is lost, its publishers become an [`Orphan`] of its client
//! for `client_grace`: the same client saying `Hello` again within it adopts them, so they are
//! never removed in between; otherwise the connection's cleanup reclaims them and removes them.
//!
//! No I/O and no clock here: `conn` and `hello` decide when.

use std::collections::HashMap;

use roster_common::{ClientId, Error, RegisterId, Result, ServiceId};

use crate::hub::ConnId;

/// The publishers of a lost connection, waiting `client_grace` for their client to come back.
#[derive(Debug)]
pub(crate) struct Orphan {
    pub conn: ConnId,
    pub publishers: HashMap<RegisterId, ServiceId>,
}

/// A client id in use here: the owner its connections proved, and how many of them hold it.
#[derive(Debug)]
struct Identity {
    owner: u128,
    holds: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Clients {
    identities: HashMap<ClientId, Identity>,
    orphans: HashMap<ClientId, Vec<Orphan>>,
}

impl Clients {
    /// Takes a hold on `client_id` for a connection that proved `owner`: refused with
    /// `PermissionDenied` while connections with another owner hold it. Every successful claim
    /// is matched by one [`Clients::release`].
    pub fn claim(&mut self, client_id: &ClientId, owner: u128) -> Result<()> {
        let identity = self
            .identities
            .entry(client_id.clone())
            .or_insert(Identity { owner, holds: 0 });
        if identity.owner != owner {
            return Err(Error::PermissionDenied(format!(
                "client_id {client_id:?} is in use on this session server by a client with \
                 another secret; a client presents the same secret on every connection"
            )));
        }
        identity.holds += 1;
        Ok(())
    }

    /// Gives back one hold on `client_id`; the id is free once no hold is left.
    pub fn release(&mut self, client_id: &str) {
        if let Some(identity) = self.identities.get_mut(client_id) {
            identity.holds -= 1;
            if identity.holds == 0 {
                self.identities.remove(client_id);
            }
        }
    }

    /// Keeps the publishers of `client_id`'s lost connection `conn` for its grace.
    pub fn orphan(&mut self, client_id: &ClientId, orphan: Orphan) {
        self.orphans
            .entry(client_id.clone())
            .or_default()
            .push(orphan);
    }

    /// Every orphan of `client_id`, for a new connection of that client to adopt.
    pub fn adopt(&mut self, client_id: &str) -> Vec<Orphan> {
        self.orphans.remove(client_id).unwrap_or_default()
    }

    /// The grace of `client_id`'s lost connection `conn` is over: its publishers, unless a new
    /// connection of the client adopted them meanwhile.
    pub fn reclaim(
        &mut self,
        client_id: &str,
        conn: ConnId,
    ) -> Option<HashMap<RegisterId, ServiceId>> {
        let mine = self.orphans.get_mut(client_id)?;
        let at = mine.iter().position(|o| o.conn == conn)?;
        let orphan = mine.swap_remove(at);
        if mine.is_empty() {
            self.orphans.remove(client_id);
        }
        Some(orphan.publishers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orphan(conn: ConnId, register_id: &str) -> Orphan {
        Orphan {
            conn,
            publishers: HashMap::from([(
                register_id.to_owned(),
                ServiceId::new("default", "DEFAULT", "svc").unwrap(),
            )]),
        }
    }

    #[test]
    fn a_client_id_is_held_by_one_owner_until_every_hold_is_released() {
        let mut clients = Clients::default();
        let id: ClientId = "app-1".into();
        clients.claim(&id, 7).unwrap();
        clients.claim(&id, 7).unwrap();
        let refused = clients.claim(&id, 8).unwrap_err();
        assert!(matches!(refused, Error::PermissionDenied(_)), "{refused}");
        clients.release(&id);
        assert!(clients.claim(&id, 8).is_err(), "one hold is left");
        clients.release(&id);
        clients.release(&id);
        clients
            .claim(&id, 8)
            .expect("free once every hold is released");
    }

    #[test]
    fn an_orphan_goes_to_whoever_comes_first_the_client_or_the_grace() {
        let mut clients = Clients::default();
        let id: ClientId = "app-1".into();
        clients.orphan(&id, orphan(1, "a"));
        clients.orphan(&id, orphan(2, "b"));

        // The client comes back: it adopts both; the graces that end later find nothing.
        let adopted = clients.adopt(&id);
        assert_eq!(adopted.len(), 2);
        assert!(clients.reclaim(&id, 1).is_none());

        // Lost again and not back: the grace reclaims exactly that connection's publishers.
        clients.orphan(&id, orphan(3, "c"));
        clients.orphan(&id, orphan(4, "d"));
        let reclaimed = clients.reclaim(&id, 3).expect("still an orphan");
        assert!(reclaimed.contains_key("c"));
        assert!(clients.reclaim(&id, 3).is_none(), "reclaimed once");
        assert_eq!(clients.adopt(&id).len(), 1, "connection 4's are left");
        assert!(clients.adopt(&id).is_empty());
    }
}
