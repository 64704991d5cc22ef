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
mod tests;
