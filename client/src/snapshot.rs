//! What the application reads: one service's publishers at one version.
//!
//! A [`Snapshot`] is shared, not copied: its publishers live in a persistent ordered map, so
//! cloning a snapshot costs a pointer, applying a delta to it costs O(k log n) for k changed
//! publishers of n, and the snapshot before the delta stays valid for whoever still holds it — the
//! two share everything the delta did not touch. Every reader of a subscription gets the same
//! snapshot, however many there are, and [`diff`] walks only the parts two snapshots do not share,
//! so the events between consecutive versions cost what changed.

use std::fmt;
use std::sync::Arc;

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
    fn ids(&self) -> (&str, &str) {
        (&self.0.client_id, &self.0.register_id)
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

/// A key to look a publisher up by (a removal, a `get`).
fn key(client_id: &str, register_id: &str) -> Key {
    Key(Arc::new(PublisherView {
        health: None,
        persistent: false,
        client_id: client_id.to_owned(),
        register_id: register_id.to_owned(),
        data: Vec::new(),
        attributes: Default::default(),
        client_version: 0,
    }))
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
        self.0.get(&key(client_id, register_id)).map(|p| &**p)
    }

    fn insert(&mut self, view: PublisherView) {
        let view = Arc::new(view);
        self.0.insert(Key(view.clone()), view);
    }
}

impl FromIterator<PublisherView> for Publishers {
    fn from_iter<I: IntoIterator<Item = PublisherView>>(iter: I) -> Self {
        let mut out = Publishers::default();
        for view in iter {
            out.insert(view);
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
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub service: ServiceId,
    pub version: Version,
    pub publishers: Publishers,
}

impl Snapshot {
    /// From a snapshot as it travels.
    pub fn from_wire(snapshot: proto::Snapshot) -> Self {
        Snapshot {
            service: snapshot.service,
            version: snapshot.version,
            publishers: snapshot.publishers.into_iter().collect(),
        }
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
    pub(crate) fn apply(&mut self, delta: Delta) -> bool {
        if delta.base != self.version || delta.version <= delta.base {
            return false;
        }
        for id in delta.removed {
            self.publishers
                .0
                .remove(&key(&id.client_id, &id.register_id));
        }
        for view in delta.put {
            self.publishers.insert(view);
        }
        self.version = delta.version;
        true
    }
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
/// `(client_id, register_id)` order. Visits only what the two snapshots do not share.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Event> {
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
        Snapshot {
            service: "demo".parse().unwrap(),
            version,
            publishers: views.iter().cloned().collect(),
        }
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
}
