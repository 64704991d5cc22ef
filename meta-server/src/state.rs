//! The meta state machine: membership, the slot table, tokens and persistent instances, changed
//! only by [`Command`]s.
//!
//! Every change of the cluster's shape is a command applied here, in order, and nothing else writes
//! this state. A command that changes the set of live data servers recomputes the slot table and
//! bumps its epoch. Applying is deterministic: the same commands in the same order give the same
//! state on any node, which is what lets a replicated log drive it.

use std::collections::{BTreeMap, BTreeSet};

use roster_common::acl::{AclView, TokenRecord};
use roster_common::proto::{ClusterView, Member, MemberKey, PersistentInstance, Role, SlotTable};
use roster_common::{InstanceId, NodeId, RegisterId, ServiceId, SlotId, Version};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::placement::place;

/// One change of the cluster's shape: the entries of the meta tier's replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the cluster: the first command of every cluster's log. Ignored once applied.
    Init {
        cluster_id: String,
        slot_count: u32,
        replicas: u32,
        /// Below this many live data servers the slot table is frozen (0: never).
        min_data_servers: u32,
        /// The bootstrap admin token: authentication is on exactly when it is given.
        #[serde(default)]
        admin_token: Option<TokenRecord>,
    },
    /// Admits `member`, replacing any other instance under the same key. `joined_at_ms` is taken
    /// from the command, so every node applying it records the same time.
    Join { member: Member },
    /// Removes the member if it is still this instance (it left, or its lease lapsed).
    Remove {
        key: MemberKey,
        instance: InstanceId,
    },
    /// Enters or leaves self-preservation: while on, session servers are not expired.
    SelfPreservation { on: bool },
    /// Places the slots again over the same data servers. After a join the newcomer holds only
    /// follower seats; this second placement, once it has caught up, hands it its share of leaders.
    Rebalance {},
    /// Adds a token (its id is new: ids are random).
    CreateToken { record: TokenRecord },
    /// Removes token `id`; `by` is who asked, for the log.
    RevokeToken { id: String, by: String },
    /// Stores or replaces a persistent instance.
    RegisterPersistent { instance: PersistentInstance },
    /// Removes the persistent instance `id` of `service`; `by` is who asked, for the log.
    DeregisterPersistent {
        service: ServiceId,
        id: RegisterId,
        by: String,
    },
}

/// What applying a command did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub changed: bool,
}

/// What the meta tier knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Empty until the cluster's `Init` is applied.
    pub cluster_id: String,
    pub members: BTreeMap<MemberKey, Member>,
    pub table: SlotTable,
    pub self_preservation: bool,
    pub min_data_servers: u32,
    /// Whether clients must authenticate, and the tokens (ordered by id).
    #[serde(default)]
    pub acl: AclView,
    /// Persistent instances by slot. A slot that ever held one keeps its entry (and its
    /// version) after the last one is removed, so versions never go back.
    #[serde(default)]
    pub persistent: BTreeMap<SlotId, PersistentSlot>,
    /// Data servers that joined or restarted since the last `Rebalance`: they are still copying
    /// into their follower seats, so no placement counts them as holding a slot they follow —
    /// they lead none that another server kept, even when two restart one after the other. A
    /// slot one of them was given to lead (no other holder was left) stays with it.
    #[serde(default)]
    pub copying: BTreeSet<NodeId>,
}

/// The persistent instances of one slot, and the version of that set: bumped by every change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentSlot {
    pub version: Version,
    pub instances: BTreeMap<ServiceId, BTreeMap<RegisterId, PersistentInstance>>,
}

impl PersistentSlot {
    pub fn count(&self) -> usize {
        self.instances.values().map(BTreeMap::len).sum()
    }

    /// Every instance, ordered by `(service, id)`.
    pub fn all(&self) -> impl Iterator<Item = &PersistentInstance> {
        self.instances.values().flat_map(BTreeMap::values)
    }
}

/// Whether two registrations of the same instance say the same thing (who registered it and when
/// do not count: registering again what is there changes nothing).
fn same_instance(a: &PersistentInstance, b: &PersistentInstance) -> bool {
    a.data == b.data && a.attributes == b.attributes && a.check == b.check
}

impl Default for MetaState {
    fn default() -> Self {
        MetaState {
            cluster_id: String::new(),
            members: BTreeMap::new(),
            table: SlotTable::empty(0, 0),
            self_preservation: false,
            min_data_servers: 0,
            acl: AclView::default(),
            persistent: BTreeMap::new(),
            copying: BTreeSet::new(),
        }
    }
}

impl MetaState {
    /// A new cluster with no members.
    pub fn new(cluster_id: String, slot_count: u32, replicas: u32) -> Self {
        let mut state = MetaState::default();
        state.apply(Command::Init {
            cluster_id,
            slot_count,
            replicas,
            min_data_servers: 0,
            admin_token: None,
        });
        state
    }

    /// Whether the cluster's `Init` has been applied.
    pub fn is_initialized(&self) -> bool {
        !self.cluster_id.is_empty()
    }

    /// Applies `command`; returns whether anything changed.
    pub fn apply(&mut self, command: Command) -> bool {
        match command {
            Command::Init {
                cluster_id,
                slot_count,
                replicas,
                min_data_servers,
                admin_token,
            } => {
                if self.is_initialized() {
                    return false;
                }
                let auth = admin_token.is_some();
                info!(cluster = %cluster_id, slots = slot_count, replicas, auth, "cluster created");
                self.cluster_id = cluster_id;
                self.table = SlotTable::empty(slot_count, replicas);
                self.min_data_servers = min_data_servers;
                self.acl = AclView {
                    enabled: auth,
                    tokens: admin_token.into_iter().collect(),
                };
                true
            }
            Command::CreateToken { record } => {
                match self.acl.tokens.binary_search_by(|t| t.id.cmp(&record.id)) {
                    Ok(_) => false,
                    Err(at) => {
                        info!(
                            token = %record.id,
                            namespaces = ?record.namespaces,
                            allow = ?record.allow,
                            expires_at_ms = ?record.expires_at_ms,
                            by = %record.created_by,
                            "token created"
                        );
                        self.acl.tokens.insert(at, record);
                        true
                    }
                }
            }
            Command::RevokeToken { id, by } => {
                match self.acl.tokens.binary_search_by(|t| t.id.as_str().cmp(&id)) {
                    Ok(at) => {
                        let record = self.acl.tokens.remove(at);
                        info!(token = %id, namespaces = ?record.namespaces, allow = ?record.allow, by = %by, "token revoked");
                        true
                    }
                    Err(_) => false,
                }
            }
            Command::RegisterPersistent { instance } => {
                let slot = self.table.slot_of(&instance.service);
                let entry = self.persistent.entry(slot).or_default();
                let by_id = entry.instances.entry(instance.service.clone()).or_default();
                if by_id
                    .get(&instance.id)
                    .is_some_and(|old| same_instance(old, &instance))
                {
                    return false;
                }
                info!(
                    service = %instance.service,
                    id = %instance.id,
                    slot,
                    check = instance.check.as_ref().map(|c| c.target.as_str()),
                    by = %instance.by,
                    "persistent instance registered"
                );
                by_id.insert(instance.id.clone(), instance);
                entry.version += 1;
                true
            }
            Command::DeregisterPersistent { service, id, by } => {
                let slot = self.table.slot_of(&service);
                let Some(entry) = self.persistent.get_mut(&slot) else {
                    return false;
                };
                let Some(by_id) = entry.instances.get_mut(&service) else {
                    return false;
                };
                if by_id.remove(&id).is_none() {
                    return false;
                }
                if by_id.is_empty() {
                    entry.instances.remove(&service);
                }
                entry.version += 1;
                info!(service = %service, id = %id, slot, by = %by, "persistent instance deregistered");
                true
            }
            Command::Rebalance {} => {
                let epoch = self.table.epoch;
                // The table has been stable for the rebalance delay: joiners have copied.
                self.copying.clear();
                self.recompute_table(None);
                self.table.epoch != epoch
            }
            Command::SelfPreservation { on } => {
                if self.self_preservation == on {
                    return false;
                }
                self.self_preservation = on;
                if on {
                    tracing::warn!(
                        "self-preservation on: session servers are not expired until their leases come back"
                    );
                } else {
                    info!("self-preservation off: session leases expire again");
                }
                true
            }
            Command::Join { member } => {
                let key = member.key();
                let previous = self.members.get(&key);
                if let Some(old) = previous
                    && old.instance == member.instance
                    && old.addr == member.addr
                    && old.zone == member.zone
                {
                    return false;
                }
                let replaced = previous.map(|old| old.instance);
                match replaced {
                    Some(old) if old != member.instance => {
                        info!(member = %key, addr = %member.addr, old_instance = old, "member restarted; replacing its old instance")
                    }
                    Some(_) => {
                        info!(member = %key, addr = %member.addr, "member changed its address")
                    }
                    None => info!(member = %key, addr = %member.addr, "member joined"),
                }
                self.members.insert(key, member.clone());
                if key.role == Role::Data {
                    // A restarted data server holds nothing: it is placed as a joiner — its slots
                    // are led by the followers that kept them, it gets follower seats to copy into,
                    // and its share of leaderships comes with the next `Rebalance`.
                    let restarted = replaced.is_some_and(|old| old != member.instance);
                    if replaced != Some(member.instance) {
                        self.copying.insert(member.id);
                    }
                    self.recompute_table(restarted.then_some(member.id));
                }
                true
            }
            Command::Remove { key, instance } => {
                match self.members.get(&key) {
                    Some(m) if m.instance == instance => {}
                    _ => return false,
                }
                self.members.remove(&key);
                info!(member = %key, "member removed");
                if key.role == Role::Data {
                    self.copying.remove(&key.id);
                    self.recompute_table(None);
                }
                true
            }
        }
    }

    fn data_nodes(&self) -> Vec<NodeId> {
        self.members
            .keys()
            .filter(|k| k.role == Role::Data)
            .map(|k| k.id)
            .collect()
    }

    /// Places the slots over the live data servers. `restarted`: a server that held seats in the
    /// table but came back empty; it is placed as holding none, and the table gets a new epoch
    /// even if nothing moves (its slots are then taken over with a new term, so versions keep
    /// growing). Those still `copying` are placed as holding none of their follower seats, but
    /// keep the slots they lead: a leadership given to a copying server was one no other holder
    /// was left for, and it took the slot over — handing it to another server that holds nothing
    /// (a second joiner, say) would open the slot without what it has.
    fn recompute_table(&mut self, restarted: Option<NodeId>) {
        let nodes = self.data_nodes();
        if (nodes.len() as u32) < self.min_data_servers {
            tracing::warn!(
                data_servers = nodes.len(),
                min = self.min_data_servers,
                "fewer live data servers than min_data_servers: the slot table stays frozen"
            );
            return;
        }
        let mut previous = self.table.clone();
        if !self.copying.is_empty() {
            for replicas in &mut previous.slots {
                let leader = replicas.first().copied();
                replicas.retain(|n| {
                    Some(*n) != restarted && (!self.copying.contains(n) || Some(*n) == leader)
                });
            }
        }
        let slots = place(
            &nodes,
            self.table.slot_count,
            self.table.replicas,
            &previous,
        );
        if restarted.is_some() || slots != self.table.slots {
            self.table.slots = slots;
            self.table.epoch += 1;
            info!(
                epoch = self.table.epoch,
                data_servers = nodes.len(),
                "new slot table"
            );
        }
    }

    /// Whether a `Rebalance` is due: placing the slots again over the same data servers would
    /// change the table (a joiner still to be handed its leaderships), or joiners are still
    /// counted as copying.
    pub fn needs_rebalance(&self) -> bool {
        let nodes = self.data_nodes();
        if nodes.is_empty() || (nodes.len() as u32) < self.min_data_servers {
            return false;
        }
        // Also to end the copying of joiners that the table leaves where they are.
        !self.copying.is_empty()
            || place(
                &nodes,
                self.table.slot_count,
                self.table.replicas,
                &self.table,
            ) != self.table.slots
    }

    /// How many persistent instances are stored.
    pub fn persistent_count(&self) -> usize {
        self.persistent.values().map(PersistentSlot::count).sum()
    }

    /// The persistent instance `id` of `service`, if stored.
    pub fn persistent_instance(
        &self,
        service: &ServiceId,
        id: &str,
    ) -> Option<&PersistentInstance> {
        self.persistent
            .get(&self.table.slot_of(service))?
            .instances
            .get(service)?
            .get(id)
    }

    /// The view members receive.
    pub fn view(&self, meta_leader: Option<String>) -> ClusterView {
        ClusterView {
            cluster_id: self.cluster_id.clone(),
            members: self.members.values().cloned().collect(),
            table: self.table.clone(),
            meta_leader,
            persistent: self
                .persistent
                .iter()
                .map(|(slot, set)| (*slot, set.version))
                .collect(),
            acl: self.acl.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(role: Role, id: NodeId, instance: InstanceId) -> Member {
        Member {
            role,
            id,
            instance,
            addr: format!("127.0.0.1:{}", 7000 + id),
            zone: String::new(),
            joined_at_ms: 0,
            version: String::new(),
        }
    }

    #[test]
    fn data_joins_and_leaves_bump_the_epoch() {
        let mut state = MetaState::new("c".into(), 16, 3);
        assert!(state.apply(Command::Join {
            member: member(Role::Data, 1, 11)
        }));
        assert_eq!(state.table.epoch, 1);
        assert!(state.table.slots.iter().all(|r| r == &vec![1]));

        assert!(state.apply(Command::Join {
            member: member(Role::Session, 1, 21)
        }));
        assert_eq!(state.table.epoch, 1, "sessions do not move slots");

        assert!(
            !state.apply(Command::Join {
                member: member(Role::Data, 1, 11)
            }),
            "re-register is a no-op"
        );
        assert!(state.apply(Command::Join {
            member: member(Role::Data, 2, 12)
        }));
        assert_eq!(state.table.epoch, 2);

        assert!(
            !state.apply(Command::Remove {
                key: MemberKey {
                    role: Role::Data,
                    id: 2
                },
                instance: 99
            }),
            "wrong instance"
        );
        assert!(state.apply(Command::Remove {
            key: MemberKey {
                role: Role::Data,
                id: 2
            },
            instance: 12
        }));
        assert_eq!(state.table.epoch, 3);
        assert!(state.table.slots.iter().all(|r| r == &vec![1]));
    }

    #[test]
    fn a_restarted_member_replaces_its_old_instance() {
        let mut state = MetaState::new("c".into(), 16, 3);
        state.apply(Command::Join {
            member: member(Role::Session, 5, 1),
        });
        assert!(state.apply(Command::Join {
            member: member(Role::Session, 5, 2)
        }));
        let view = state.view(None);
        assert_eq!(view.members.len(), 1);
        assert_eq!(view.members[0].instance, 2);
        assert!(
            !state.apply(Command::Remove {
                key: MemberKey {
                    role: Role::Session,
                    id: 5
                },
                instance: 1
            }),
            "the old instance's expiry is ignored"
        );

        state.apply(Command::Join {
            member: member(Role::Data, 1, 1),
        });
        let epoch = state.table.epoch;
        assert!(state.apply(Command::Join {
            member: member(Role::Data, 1, 2)
        }));
        assert_eq!(
            state.table.epoch,
            epoch + 1,
            "a restarted data server gets a new epoch"
        );
    }

    #[test]
    fn a_restarted_data_server_first_follows_then_leads_after_a_rebalance() {
        let mut state = MetaState::new("c".into(), 256, 3);
        for id in 1..=3 {
            state.apply(Command::Join {
                member: member(Role::Data, id, id),
            });
        }
        state.apply(Command::Rebalance {});
        let leads = |s: &MetaState, id| s.table.led_by(id).count();
        assert!(leads(&state, 2) > 0);
        let follows = |s: &MetaState, id| {
            s.table
                .slots
                .iter()
                .filter(|r| r.iter().skip(1).any(|n| *n == id))
                .count()
        };

        // Data server 2 restarts (a new instance) before its lease lapsed.
        assert!(state.apply(Command::Join {
            member: member(Role::Data, 2, 22)
        }));
        assert_eq!(
            leads(&state, 2),
            0,
            "it came back empty: it leads nothing yet"
        );
        assert!(
            follows(&state, 2) > 0,
            "it gets follower seats to copy into"
        );
        assert!(
            state.table.slots.iter().all(|r| r.len() == 3),
            "every slot keeps its replicas"
        );
        assert!(state.needs_rebalance());
        state.apply(Command::Rebalance {});
        assert!(
            (80..=90).contains(&leads(&state, 2)),
            "its share after the rebalance: {}",
            leads(&state, 2)
        );
    }

    #[test]
    fn a_restarted_sole_data_server_leads_its_empty_slots() {
        let mut state = MetaState::new("c".into(), 16, 3);
        state.apply(Command::Join {
            member: member(Role::Data, 1, 1),
        });
        let epoch = state.table.epoch;
        state.apply(Command::Join {
            member: member(Role::Data, 1, 2),
        });
        assert_eq!(state.table.epoch, epoch + 1);
        assert!(
            state.table.slots.iter().all(|r| r == &vec![1]),
            "nobody else holds them"
        );
    }

    /// Data servers 1, 2 and 3 joined, and their leaderships balanced.
    fn three_balanced_data_servers() -> MetaState {
        let mut state = MetaState::new("c".into(), 256, 3);
        for id in 1..=3 {
            state.apply(Command::Join {
                member: member(Role::Data, id, id),
            });
        }
        state.apply(Command::Rebalance {});
        assert!(!state.needs_rebalance());
        state
    }

    #[test]
    fn two_data_servers_restarting_in_turn_lead_nothing_while_the_third_kept_every_slot() {
        let mut state = three_balanced_data_servers();
        let leads = |s: &MetaState, id| s.table.led_by(id).count();

        // Both killed together: 1 comes back first and is placed to copy; then 2 comes back. The
        // slots 2 led must go to 3, which holds them, not to 1, which is still copying.
        state.apply(Command::Join {
            member: member(Role::Data, 1, 11),
        });
        assert_eq!(leads(&state, 1), 0);
        state.apply(Command::Join {
            member: member(Role::Data, 2, 22),
        });
        assert_eq!(leads(&state, 1), 0, "still copying: leads nothing");
        assert_eq!(leads(&state, 2), 0, "just restarted: leads nothing");
        assert_eq!(leads(&state, 3), 256);
        assert!(state.table.slots.iter().all(|r| r.len() == 3));

        // Once the table settled, a rebalance hands both their share again, and ends their
        // copying even where the table had nothing left to change.
        assert!(state.needs_rebalance());
        state.apply(Command::Rebalance {});
        assert!(leads(&state, 1) > 0 && leads(&state, 2) > 0);
        assert!(state.copying.is_empty());
        assert!(!state.needs_rebalance());
    }

    #[test]
    fn a_copying_server_left_alone_keeps_its_slots_when_others_come_back() {
        let mut state = three_balanced_data_servers();
        let leads = |s: &MetaState, id| s.table.led_by(id).count();

        // 2 restarts and copies; 1 and 3 die meanwhile: 2, holding nothing yet, is given every
        // slot and takes them over from the sessions.
        state.apply(Command::Join {
            member: member(Role::Data, 2, 22),
        });
        for id in [1, 3] {
            state.apply(Command::Remove {
                key: MemberKey {
                    role: Role::Data,
                    id,
                },
                instance: id,
            });
        }
        assert_eq!(leads(&state, 2), 256);
        assert!(state.copying.contains(&2));

        // 3 and 1 come back empty: 2 still leads every slot it took over, they only copy.
        state.apply(Command::Join {
            member: member(Role::Data, 3, 33),
        });
        state.apply(Command::Join {
            member: member(Role::Data, 1, 11),
        });
        assert_eq!(
            leads(&state, 2),
            256,
            "kept by the server that took them over"
        );
        assert!(state.table.slots.iter().all(|r| r.len() == 3));

        state.apply(Command::Rebalance {});
        assert!(leads(&state, 1) > 0 && leads(&state, 3) > 0);
        assert!(!state.needs_rebalance());
    }

    #[test]
    fn a_joiner_gets_its_leaderships_on_rebalance() {
        let mut state = three_balanced_data_servers();
        state.apply(Command::Join {
            member: member(Role::Data, 4, 4),
        });
        let leads = |s: &MetaState, id| s.table.led_by(id).count();
        assert_eq!(leads(&state, 4), 0, "a joiner first only follows");
        assert!(state.needs_rebalance());
        let epoch = state.table.epoch;
        assert!(state.apply(Command::Rebalance {}));
        assert_eq!(state.table.epoch, epoch + 1);
        for id in 1..=4 {
            let n = leads(&state, id);
            assert!(
                (57..=71).contains(&n),
                "data server {id} leads {n} of 256 slots"
            );
        }
        assert!(!state.needs_rebalance());
        assert!(
            !state.apply(Command::Rebalance {}),
            "a balanced table stays"
        );
    }

    #[test]
    fn tokens_are_created_and_revoked_by_commands_and_kept_in_snapshots() {
        use roster_common::acl::{Permission, generate_token};
        let admin = generate_token();
        let admin_record =
            TokenRecord::of_token(&admin, vec!["*".into()], Permission::ALL.to_vec(), None)
                .unwrap();
        let mut state = MetaState::default();
        state.apply(Command::Init {
            cluster_id: "c".into(),
            slot_count: 16,
            replicas: 1,
            min_data_servers: 0,
            admin_token: Some(admin_record.clone()),
        });
        assert!(state.acl.enabled);
        assert!(state.view(None).acl.authenticate(Some(&admin), 0).is_ok());

        let token = generate_token();
        let record =
            TokenRecord::of_token(&token, vec!["prod".into()], vec![Permission::Publish], None)
                .unwrap();
        assert!(state.apply(Command::CreateToken {
            record: record.clone()
        }));
        assert!(
            !state.apply(Command::CreateToken {
                record: record.clone()
            }),
            "an id is created once"
        );
        let ids: Vec<&str> = state.acl.tokens.iter().map(|t| t.id.as_str()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "tokens stay ordered by id");

        // What a snapshot holds comes back whole.
        let bytes = rmp_serde::to_vec_named(&state).unwrap();
        let back: MetaState = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, state);

        let revoke = |id: &str| Command::RevokeToken {
            id: id.into(),
            by: "test".into(),
        };
        assert!(state.apply(revoke(&record.id)));
        assert!(!state.apply(revoke(&record.id)), "already gone");
        assert!(state.view(None).acl.authenticate(Some(&token), 0).is_err());
        assert!(state.view(None).acl.authenticate(Some(&admin), 0).is_ok());
    }

    #[test]
    fn a_cluster_created_without_an_admin_token_checks_none() {
        let state = MetaState::new("c".into(), 16, 1);
        assert!(!state.acl.enabled);
        assert!(state.view(None).acl.authenticate(None, 0).is_ok());
    }
}
