//! Watching a service without a connection: for the web console and the DNS interface.
//!
//! A console page showing a service, or a DNS query for one, wants what a subscriber gets — this
//! session registered with the slot leader and told of every change — but not push frames. So it
//! subscribes under a connection number that is never attached: the service is wanted (the
//! caller tells the link manager, as for a client's first subscriber), its datum is fetched and
//! kept current here, and since no connection is attached under that number nothing is ever due
//! to it. The console reads [`Hub::version`] to learn that something changed; DNS reads the
//! publishers themselves ([`Hub::publishers`]). Such a watcher counts as one subscriber.

use bytes::Bytes;
use roster_common::{ServiceId, Version};

use super::{ConnId, Hub};

/// The register id of a watch without a connection.
const WATCH_REGISTER_ID: &str = "watch";

impl Hub {
    /// Watches `service` under `watcher`, a connection number no client uses. True: nobody here
    /// subscribed to it before, so interest must be registered (`LinkEvent::Want`).
    pub fn watch(&mut self, watcher: ConnId, service: ServiceId) -> bool {
        self.subscribe(watcher, WATCH_REGISTER_ID.to_owned(), service)
            .first
    }

    /// Ends `watcher`'s watch; the service if nobody here subscribes to it any more (interest
    /// may go: `LinkEvent::Unwant`).
    pub fn unwatch(&mut self, watcher: ConnId) -> Option<ServiceId> {
        self.unsubscribe(watcher, WATCH_REGISTER_ID)
    }

    /// The cached datum of `service`: its version and every publisher, MessagePack-encoded as it
    /// is pushed (`PublisherView`), in `(client_id, register_id)` order. `None` until the datum
    /// is here (or when nobody here subscribes to the service).
    pub fn publishers(&self, service: &ServiceId) -> Option<(Version, Vec<Bytes>)> {
        let datum = self.services.get(service)?.datum.as_ref()?;
        Some((datum.version(), datum.encoded().cloned().collect()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use tokio::sync::Notify;

    use super::*;
    use crate::hub::Pacing;
    use crate::hub::{Applied, Change, Fetched, Op};

    #[test]
    fn a_watch_keeps_the_datum_current_and_is_pushed_nothing() {
        let mut hub = Hub::new(1 << 20, Pacing::NONE);
        let service: ServiceId = "demo".parse().unwrap();
        let now = Instant::now();
        assert!(hub.watch(1_000, service.clone()), "first watcher");
        assert!(hub.is_wanted(&service));
        assert!(!hub.fetched(
            Fetched {
                service: service.clone(),
                version: 5,
                entries: BTreeMap::new(),
            },
            now
        ));
        let change = Change {
            service: service.clone(),
            prev: 5,
            version: 6,
            op: Op::Put(("c".into(), "p1".into()), Bytes::from_static(b"\x80")),
        };
        assert_eq!(hub.apply(change, now), Applied::Done);
        assert_eq!(hub.version(&service), Some(6));
        assert_eq!(
            hub.publishers(&service),
            Some((6, vec![Bytes::from_static(b"\x80")]))
        );
        assert_eq!(hub.publishers(&"other".parse().unwrap()), None);
        assert_eq!(hub.pending(), 0, "nothing is due to anyone");
        assert_eq!(hub.rescan(), 0);

        // A client subscribing beside it is pushed as usual; the watch going leaves it wanted.
        hub.attach(7, true, Arc::new(Notify::new()));
        assert!(!hub.subscribe(7, "s".into(), service.clone()).first);
        assert_eq!(
            hub.take_pushes(7, now, Duration::from_millis(1))
                .unwrap()
                .frames
                .len(),
            1
        );
        assert_eq!(hub.unwatch(1_000), None);
        assert!(hub.is_wanted(&service));
        assert_eq!(hub.unsubscribe(7, "s"), Some(service));
    }
}
