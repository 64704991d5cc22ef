//! What the application reads: one service's publishers at one version.
//!
//! A [`Snapshot`] is shared, not copied: its publishers live in a persistent ordered map, so
//! cloning a snapshot costs a pointer, applying a delta to it costs O(k log n) for k changed
//! publishers of n, and the snapshot before the delta stays valid for whoever still holds it — the
//! two share everything the delta did not touch. Every reader of a subscription gets the same
//! snapshot, however many there are.
//!
//! A snapshot made by applying a delta keeps the events that delta caused, with the publishers it
//! was applied to: [`diff`] between the two hands them out as they are, so a reader that keeps up
//! gets its events for what the delta carried. Between any other two snapshots (a reader that
//! skipped versions, a full snapshot) it walks only the parts they do not share.

use std::fmt;
use std::sync::Arc;

use equivalent::{Comparable, Equivalent};
use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use roster_common::proto::{self, Delta, PublisherView};
use roster_common::{ServiceId, Version};

/// A publisher's identity inside the map: the publisher itself, compared by client and register
/// id only. Key and value share one allocation, so copying a node of the map (a delta applied to
/// a shared snapshot copies the nodes on its path) costs reference counts, and a put allocates
/// nothing beyond the publisher.
#[derive(Clone, Debug)]
struct Key(Arc<PublisherView>);

impl Key {
    fn ids(&self) -> Ids<'_> {
        Ids(&self.0.client_id, &self.0.register_id)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.ids() == other.ids()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.ids().cmp(&other.ids())
    }
}

/// A publisher's identity, borrowed: what a removal or a `get` looks a publisher up by, without
/// building one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Ids<'a>(&'a str, &'a str);

impl Equivalent<Key> for Ids<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *self == key.ids()
    }
}

impl Comparable<Key> for Ids<'_> {
    fn compare(&self, key: &Key) -> std::cmp::Ordering {
        self.cmp(&key.ids())
    }
}

/// The publishers of a snapshot, ordered by `(client_id, register_id)`. Cloning is O(1).
#[derive(Clone, Default, PartialEq)]
pub struct Publishers(OrdMap<Key, Arc<PublisherView>>);

impl Publishers {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every publisher, in `(client_id, register_id)` order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &PublisherView> + '_ {
        self.0.values().map(|p| &**p)
    }

    /// The publishers not marked unhealthy — healthy, or not checked — in the same order. Their
    /// checks' verdicts are in each publisher's [`PublisherView::health`].
    pub fn healthy(&self) -> impl DoubleEndedIterator<Item = &PublisherView> + '_ {
        self.iter()
            .filter(|p| p.health.as_ref().is_none_or(|h| h.healthy))
    }

    /// Every publisher, shared: cloning one costs a pointer.
    pub fn iter_shared(&self) -> impl DoubleEndedIterator<Item = &Arc<PublisherView>> + '_ {
        self.0.values()
    }

    /// The publisher `register_id` of client `client_id`.
    pub fn get(&self, client_id: &str, register_id: &str) -> Option<&PublisherView> {
        self.0.get(&Ids(client_id, register_id)).map(|p| &**p)
    }

    /// Adds or replaces `view`; the publisher it replaces, if any.
    fn insert(&mut self, view: Arc<PublisherView>) -> Option<Arc<PublisherView>> {
        self.0.insert(Key(view.clone()), view)
    }

    fn remove(&mut self, client_id: &str, register_id: &str) -> Option<Arc<PublisherView>> {
        self.0.remove(&Ids(client_id, register_id))
    }
}

impl FromIterator<PublisherView> for Publishers {
    fn from_iter<I: IntoIterator<Item = PublisherView>>(iter: I) -> Self {
        let mut out = Publishers::default();
        for view in iter {
            out.insert(Arc::new(view));
        }
        out
    }
}

impl<'a> IntoIterator for &'a Publishers {
    type Item = &'a PublisherView;
    type IntoIter = Box<dyn DoubleEndedIterator<Item = &'a PublisherView> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl fmt::Debug for Publishers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// All live publishers of one service at one version, as the registry last told this client:
/// ephemeral publishers and persistent instances ([`PublisherView::persistent`]) alike, each
/// with its check's verdict when it is checked ([`PublisherView::health`]).
#[derive(Clone)]
pub struct Snapshot {
    pub service: ServiceId,
    pub version: Version,
    pub publishers: Publishers,
    /// The delta this snapshot was made by, when it was.
    made_by: Option<Arc<Step>>,
}

/// A delta applied: the publishers it was applied to, and the events it caused.
struct Step {
    base: Publishers,
    events: Vec<Event>,
}

impl PartialEq for Snapshot {
    /// Same service, version and publishers, however each was made.
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service
            && self.version == other.version
            && self.publishers == other.publishers
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("service", &self.service)
            .field("version", &self.version)
            .field("publishers", &self.publishers)
            .finish()
    }
}

impl Snapshot {
    pub fn new(service: ServiceId, version: Version, publishers: Publishers) -> Self {
        Snapshot {
            service,
            version,
            publishers,
            made_by: None,
        }
    }

    /// From a snapshot as it travels.
    pub fn from_wire(snapshot: proto::Snapshot) -> Self {
        Snapshot::new(
            snapshot.service,
            snapshot.version,
            snapshot.publishers.into_iter().collect(),
        )
    }

    /// As it travels (a copy of every publisher).
    pub fn to_wire(&self) -> proto::Snapshot {
        proto::Snapshot {
            service: self.service.clone(),
            version: self.version,
            publishers: self.publishers.iter().cloned().collect(),
        }
    }

    /// Applies `delta` if it starts from this version; false (and nothing changed) otherwise.
    /// The events it causes are kept with the result for [`diff`] — unless the delta names a
    /// publisher twice (which servers never do), when `diff` works them out instead.
    pub fn apply(&mut self, delta: Delta) -> bool {
        if delta.base != self.version || delta.version <= delta.base {
            return false;
        }
        let base = self.publishers.clone();
        let once = names_each_once(&delta);
        let mut events = Vec::with_capacity(delta.removed.len() + delta.put.len());
        for id in delta.removed {
            if let Some(old) = self.publishers.remove(&id.client_id, &id.register_id) {
                events.push(Event::Removed(old));
            }
        }
        let puts = events.len();
        for view in delta.put {
            let new = Arc::new(view);
            match self.publishers.insert(new.clone()) {
                Some(old) if old == new => {}
                Some(old) => events.push(Event::Changed { old, new }),
                None => events.push(Event::Added(new)),
            }
        }
        self.version = delta.version;
        self.made_by = once.then(|| {
            // Changes before additions, each kind still in order.
            events[puts..].sort_by_key(|e| matches!(e, Event::Added(_)));
            Arc::new(Step { base, events })
        });
        true
    }
}

/// Whether `delta` names each publisher once: each list strictly ordered, as servers send them,
/// and no publisher in both.
fn names_each_once(delta: &Delta) -> bool {
    let put = || delta.put.iter().map(|p| Ids(&p.client_id, &p.register_id));
    let removed = || {
        delta
            .removed
            .iter()
            .map(|p| Ids(&p.client_id, &p.register_id))
    };
    if !strictly_ordered(put()) || !strictly_ordered(removed()) {
        return false;
    }
    // Both ordered: walk them side by side.
    let (mut put, mut removed) = (put().peekable(), removed().peekable());
    while let (Some(p), Some(r)) = (put.peek(), removed.peek()) {
        match p.cmp(r) {
            std::cmp::Ordering::Less => put.next(),
            std::cmp::Ordering::Greater => removed.next(),
            std::cmp::Ordering::Equal => return false,
        };
    }
    true
}

fn strictly_ordered<'a>(mut ids: impl Iterator<Item = Ids<'a>>) -> bool {
    let Some(mut last) = ids.next() else {
        return true;
    };
    ids.all(|id| std::mem::replace(&mut last, id) < id)
}

/// A change of one publisher of a subscribed service. The publishers are shared with the
/// snapshots they come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Added(Arc<PublisherView>),
    Removed(Arc<PublisherView>),
    /// Same publisher (client and register id), new data, attributes, version or health.
    Changed {
        old: Arc<PublisherView>,
        new: Arc<PublisherView>,
    },
}

/// The events that turn `old` into `new`: removals, then changes, then additions, each in
/// `(client_id, register_id)` order. When `new` was made by one delta applied to `old`, those are
/// the delta's events as they were found; otherwise only what the two do not share is visited.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Event> {
    if let Some(step) = &new.made_by
        && step.base.0.ptr_eq(&old.publishers.0)
    {
        return step.events.clone();
    }
    walk(old, new)
}

/// The events between any two snapshots, from what they do not share.
fn walk(old: &Snapshot, new: &Snapshot) -> Vec<Event> {
    let mut removed = Vec::new();
    let mut changed = Vec::new();
    let mut added = Vec::new();
    for item in old.publishers.0.diff(&new.publishers.0) {
        match item {
            DiffItem::Add(_, p) => added.push(Event::Added(p.clone())),
            DiffItem::Remove(_, p) => removed.push(Event::Removed(p.clone())),
            DiffItem::Update {
                old: (_, before),
                new: (_, after),
            } => changed.push(Event::Changed {
                old: before.clone(),
                new: after.clone(),
            }),
        }
    }
    removed.extend(changed);
    removed.extend(added);
    removed
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use roster_common::proto::PublisherId;

    use super::*;

    fn view(reg: &str, data: &str) -> PublisherView {
        PublisherView {
            health: None,
            persistent: false,
            client_id: "c".into(),
            register_id: reg.into(),
            data: vec![Bytes::copy_from_slice(data.as_bytes())],
            attributes: Default::default(),
            client_version: 1,
        }
    }

    fn snapshot(version: Version, views: &[PublisherView]) -> Snapshot {
        Snapshot::new(
            "demo".parse().unwrap(),
            version,
            views.iter().cloned().collect(),
        )
    }

    #[test]
    fn a_delta_applies_only_on_its_base_and_leaves_the_old_snapshot_intact() {
        let old = snapshot(3, &[view("a", "1"), view("b", "1")]);
        let mut new = old.clone();
        let delta = Delta {
            service: old.service.clone(),
            base: 3,
            version: 5,
            put: vec![view("b", "2"), view("c", "1")],
            removed: vec![PublisherId {
                client_id: "c".into(),
                register_id: "a".into(),
            }],
        };
        assert!(!new.clone().apply(Delta {
            base: 2,
            ..delta.clone()
        }));
        assert!(new.apply(delta));
        assert_eq!(new.version, 5);
        assert_eq!(
            new.publishers.iter().cloned().collect::<Vec<_>>(),
            vec![view("b", "2"), view("c", "1")]
        );
        assert_eq!(old.publishers.len(), 2, "the old snapshot is untouched");
        assert_eq!(
            diff(&old, &new),
            vec![
                Event::Removed(view("a", "1").into()),
                Event::Changed {
                    old: view("b", "1").into(),
                    new: view("b", "2").into()
                },
                Event::Added(view("c", "1").into()),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn a_health_change_is_a_change_and_unhealthy_publishers_are_set_apart() {
        use roster_common::health::Health;

        let persistent = PublisherView {
            client_id: roster_common::ids::PERSISTENT_CLIENT_ID.into(),
            persistent: true,
            health: Some(Health::unchecked()),
            ..view("db", "10.0.0.9:5432")
        };
        let old = snapshot(1, &[view("a", "1"), persistent.clone()]);
        let failing = PublisherView {
            health: Some(Health {
                healthy: false,
                checked_ms: 7,
                failure: Some("connection refused".into()),
            }),
            ..persistent.clone()
        };
        let mut new = old.clone();
        assert!(new.apply(Delta {
            service: old.service.clone(),
            base: 1,
            version: 2,
            put: vec![failing.clone()],
            removed: vec![],
        }));
        assert_eq!(
            diff(&old, &new),
            vec![Event::Changed {
                old: persistent.clone().into(),
                new: failing.into()
            }]
        );
        let names = |s: &Snapshot| -> Vec<String> {
            s.publishers
                .healthy()
                .map(|p| p.register_id.clone())
                .collect()
        };
        assert_eq!(names(&old), ["a", "db"], "unchecked counts as healthy");
        assert_eq!(names(&new), ["a"]);
        assert_eq!(new.publishers.len(), 2, "marked, not removed");
    }

    #[test]
    fn the_diff_of_a_large_snapshot_after_one_change_is_that_change() {
        let views: Vec<PublisherView> = (0..10_000)
            .map(|i| view(&format!("p{i:05}"), "x"))
            .collect();
        let old = snapshot(1, &views);
        let mut new = old.clone();
        assert!(new.apply(Delta {
            service: old.service.clone(),
            base: 1,
            version: 2,
            put: vec![view("p05000", "y")],
            removed: vec![],
        }));
        assert_eq!(
            diff(&old, &new),
            vec![Event::Changed {
                old: view("p05000", "x").into(),
                new: view("p05000", "y").into()
            }]
        );
        assert_eq!(
            new.publishers.get("c", "p05000"),
            Some(&view("p05000", "y"))
        );
        assert_eq!(new.to_wire().publishers.len(), 10_000);
    }

    mod deltas {
        use proptest::prelude::*;

        use super::*;

        fn publishers() -> impl Strategy<Value = Vec<PublisherView>> {
            proptest::collection::btree_map("[a-d]", "[a-c]", 0..20)
                .prop_map(|m| m.into_iter().map(|(reg, data)| view(&reg, &data)).collect())
        }

        proptest! {
            /// The events a delta is applied with are exactly what comparing the two snapshots
            /// finds — for deltas as servers send them and for any others.
            #[test]
            fn a_deltas_events_are_the_difference_it_makes(
                before in publishers(),
                put in proptest::collection::vec(("[a-d]", "[a-c]"), 0..6),
                removed in proptest::collection::vec("[a-d]", 0..4),
                as_servers_send in any::<bool>(),
            ) {
                let old = snapshot(1, &before);
                let mut put: Vec<PublisherView> =
                    put.iter().map(|(reg, data)| view(reg, data)).collect();
                let mut removed: Vec<PublisherId> = removed
                    .into_iter()
                    .map(|register_id| PublisherId { client_id: "c".into(), register_id })
                    .collect();
                if as_servers_send {
                    put.sort_by(|a, b| a.register_id.cmp(&b.register_id));
                    put.dedup_by(|a, b| a.register_id == b.register_id);
                    removed.sort();
                    removed.dedup();
                    removed.retain(|r| put.iter().all(|p| p.register_id != r.register_id));
                }
                let mut new = old.clone();
                let delta = Delta {
                    service: old.service.clone(),
                    base: 1,
                    version: 2,
                    put,
                    removed,
                };
                let applied = new.apply(delta);
                prop_assert!(applied);
                if as_servers_send {
                    prop_assert!(new.made_by.is_some(), "the events are kept");
                }
                let events = diff(&old, &new);
                prop_assert_eq!(&events, &walk(&old, &new));
                // From an equal snapshot that is not the one the delta was applied to, the same
                // events, worked out.
                let other = snapshot(1, &before);
                prop_assert_eq!(diff(&other, &new), events);
            }
        }
    }
}
