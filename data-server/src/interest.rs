//! Which sessions want to hear about which services, and the channel to each session's watch stream.
//!
//! Each event is the change itself (the publisher put or removed, and the versions before and
//! after), so a session applies it to its copy of the datum without fetching.
//!
//! Overflow policy: each session's notification queue holds [`NOTIFY_QUEUE`] events. A session that
//! falls that far behind is detached: its queue is dropped, which ends its watch stream; the session
//! reconnects the stream, registers its interest again and refetches, so it resyncs rather than
//! slowing the data server down.

use std::collections::{HashMap, HashSet};

use roster_common::proto::DataEvent;
use roster_common::{InstanceId, NodeId, ServiceId};
use tokio::sync::mpsc;

use crate::store::Change;

/// Notifications queued per session before it is detached: a burst of this many changes (a
/// few MiB of publishers) while the session's stream is slow is absorbed; beyond it the session
/// resyncs by fetching.
pub const NOTIFY_QUEUE: usize = 32_768;

struct Watcher {
    /// The session server's id (its instance is the key).
    session: NodeId,
    /// Identifies one attachment, so a stale stream's cleanup cannot detach its replacement.
    stream: u64,
    tx: mpsc::Sender<DataEvent>,
    services: HashSet<ServiceId>,
}

/// Interest of every attached session.
#[derive(Default)]
pub struct Interests {
    watchers: HashMap<InstanceId, Watcher>,
    by_service: HashMap<ServiceId, HashSet<InstanceId>>,
    next_stream: u64,
}

impl Interests {
    /// Attaches the watch stream of session server `session` (this incarnation: `instance`),
    /// replacing (and so ending) an earlier one. Interest starts empty. Returns the attachment's
    /// stream id and the queue to drain into the stream.
    pub fn attach(
        &mut self,
        session: NodeId,
        instance: InstanceId,
    ) -> (u64, mpsc::Receiver<DataEvent>) {
        self.detach_any(instance);
        let (tx, rx) = mpsc::channel(NOTIFY_QUEUE);
        self.next_stream += 1;
        let stream = self.next_stream;
        self.watchers.insert(
            instance,
            Watcher {
                session,
                stream,
                tx,
                services: HashSet::new(),
            },
        );
        (stream, rx)
    }

    /// Detaches `instance` if `stream` is still its current attachment.
    pub fn detach(&mut self, instance: InstanceId, stream: u64) {
        if self
            .watchers
            .get(&instance)
            .is_some_and(|w| w.stream == stream)
        {
            self.detach_any(instance);
        }
    }

    fn detach_any(&mut self, instance: InstanceId) {
        if let Some(watcher) = self.watchers.remove(&instance) {
            for service in watcher.services {
                if let Some(set) = self.by_service.get_mut(&service) {
                    set.remove(&instance);
                    if set.is_empty() {
                        self.by_service.remove(&service);
                    }
                }
            }
        }
    }

    /// The session servers with a watch stream attached: id and instance.
    pub fn attached(&self) -> impl Iterator<Item = (NodeId, InstanceId)> + '_ {
        self.watchers
            .iter()
            .map(|(instance, w)| (w.session, *instance))
    }

    /// Registers or drops interest; false if the session has no attached watch stream.
    pub fn set(&mut self, instance: InstanceId, services: &[ServiceId], on: bool) -> bool {
        let Some(watcher) = self.watchers.get_mut(&instance) else {
            return false;
        };
        for service in services {
            if on {
                watcher.services.insert(service.clone());
                self.by_service
                    .entry(service.clone())
                    .or_default()
                    .insert(instance);
            } else {
                watcher.services.remove(service);
                if let Some(set) = self.by_service.get_mut(service) {
                    set.remove(&instance);
                    if set.is_empty() {
                        self.by_service.remove(service);
                    }
                }
            }
        }
        true
    }

    /// Queues a `Changed` event for every session interested in the changed service; sessions whose
    /// queue is full are detached (see the module docs). Returns how many were detached.
    pub fn notify(&mut self, change: &Change) -> usize {
        let Some(sessions) = self.by_service.get(&change.service) else {
            return 0;
        };
        let mut overflowed = Vec::new();
        for instance in sessions {
            let watcher = &self.watchers[instance];
            let event = DataEvent::Changed {
                service: change.service.clone(),
                version: change.version,
                prev: Some(change.prev),
                change: Some(change.change.clone()),
            };
            if watcher.tx.try_send(event).is_err() {
                overflowed.push(*instance);
            }
        }
        for instance in &overflowed {
            self.detach_any(*instance);
        }
        overflowed.len()
    }
}

#[cfg(test)]
mod tests {
    use roster_common::Version;
    use roster_common::proto::{PublisherChange, PublisherId};

    use super::*;

    fn svc(name: &str) -> ServiceId {
        name.parse().unwrap()
    }

    fn removal(service: &str, version: Version) -> Change {
        Change {
            service: svc(service),
            prev: version.saturating_sub(1),
            version,
            change: PublisherChange::Remove(PublisherId {
                client_id: "c".into(),
                register_id: "r".into(),
            }),
        }
    }

    fn event(service: &str, version: Version) -> DataEvent {
        let change = removal(service, version);
        DataEvent::Changed {
            service: change.service,
            version,
            prev: Some(change.prev),
            change: Some(change.change),
        }
    }

    #[test]
    fn only_interested_sessions_hear_of_changes() {
        let mut interests = Interests::default();
        let (_, mut rx1) = interests.attach(1, 1);
        let (_, mut rx2) = interests.attach(2, 2);
        assert!(interests.set(1, &[svc("a")], true));
        assert!(interests.set(2, &[svc("b")], true));
        assert!(
            !interests.set(3, &[svc("a")], true),
            "no watch stream, no interest"
        );
        interests.notify(&removal("a", 7));
        assert_eq!(rx1.try_recv().unwrap(), event("a", 7));
        assert!(rx2.try_recv().is_err());
        interests.set(1, &[svc("a")], false);
        interests.notify(&removal("a", 8));
        assert!(rx1.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_detaches_the_session() {
        let mut interests = Interests::default();
        let (_, mut rx) = interests.attach(1, 1);
        interests.set(1, &[svc("a")], true);
        for v in 0..NOTIFY_QUEUE as u64 {
            assert_eq!(interests.notify(&removal("a", v)), 0);
        }
        assert_eq!(interests.notify(&removal("a", 1 << 40)), 1);
        assert!(!interests.set(1, &[svc("b")], true), "detached");
        let mut drained = 0;
        while rx.try_recv().is_ok() {
            drained += 1;
        }
        assert_eq!(drained, NOTIFY_QUEUE);
        assert!(rx.is_closed() || rx.try_recv().is_err());
    }

    #[test]
    fn a_stale_stream_cannot_detach_its_replacement() {
        let mut interests = Interests::default();
        let (old, _rx_old) = interests.attach(1, 1);
        let (_new, _rx_new) = interests.attach(1, 1);
        interests.detach(1, old);
        assert!(interests.set(1, &[svc("a")], true));
    }
}
