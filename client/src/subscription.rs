//! Subscriptions: snapshots as a `Stream`, the latest one at hand, typed events, and waiting for a
//! condition.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use roster_common::proto::{PublisherView, Snapshot};
use roster_common::{ClientId, Error, RegisterId, Result, ServiceId};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use crate::Handle;

/// Snapshots of one service, as a `Stream`: each item is newer than the last; a reader that falls
/// behind skips to the newest. Dropping the last handle of a service unsubscribes.
pub struct Subscription {
    pub(crate) handle: Handle,
    pub(crate) service: ServiceId,
    pub(crate) rx: watch::Receiver<Option<Snapshot>>,
    pub(crate) stream: WatchStream<Option<Snapshot>>,
}

impl Subscription {
    pub fn service(&self) -> &ServiceId {
        &self.service
    }

    /// The latest snapshot received (or loaded from the cache), if any yet.
    pub fn current(&self) -> Option<Snapshot> {
        self.rx.borrow().clone()
    }

    /// Waits until the current snapshot satisfies `predicate`, at most `timeout`.
    pub async fn wait_for(
        &self,
        predicate: impl Fn(&Snapshot) -> bool,
        timeout: Duration,
    ) -> Result<Snapshot> {
        let mut rx = self.rx.clone();
        let wait = async {
            loop {
                if let Some(snapshot) = rx.borrow_and_update().as_ref()
                    && predicate(snapshot)
                {
                    return Ok(snapshot.clone());
                }
                if rx.changed().await.is_err() {
                    return Err(Error::Connection("the client was closed".into()));
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            Error::Timeout(format!(
                "{}: no matching snapshot within {timeout:?}",
                self.service
            ))
        })?
    }

    /// Turns the subscription into a stream of [`Event`]s: every publisher of the first snapshot
    /// as `Added`, then the differences between consecutive snapshots.
    pub fn events(self) -> Events {
        Events {
            subscription: self,
            known: BTreeMap::new(),
            queue: VecDeque::new(),
        }
    }
}

impl Stream for Subscription {
    type Item = Snapshot;

    /// The next snapshot newer than the last one returned; `None` once the client is closed.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Snapshot>> {
        loop {
            match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Ready(Some(Some(snapshot))) => return Poll::Ready(Some(snapshot)),
                Poll::Ready(Some(None)) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.handle.release_subscription(&self.service);
    }
}

/// A change of one publisher of a subscribed service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Added(PublisherView),
    Removed(PublisherView),
    /// Same publisher (client and register id), new data, attributes or version.
    Changed {
        old: PublisherView,
        new: PublisherView,
    },
}

/// A stream of [`Event`]s of one service.
pub struct Events {
    subscription: Subscription,
    known: BTreeMap<(ClientId, RegisterId), PublisherView>,
    queue: VecDeque<Event>,
}

impl Events {
    /// The latest snapshot behind the events.
    pub fn current(&self) -> Option<Snapshot> {
        self.subscription.current()
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Poll::Ready(Some(event));
            }
            match Pin::new(&mut self.subscription).poll_next(cx) {
                Poll::Ready(Some(snapshot)) => {
                    let now: BTreeMap<_, _> = snapshot
                        .publishers
                        .into_iter()
                        .map(|p| ((p.client_id.clone(), p.register_id.clone()), p))
                        .collect();
                    let events = diff(&self.known, &now);
                    self.known = now;
                    self.queue.extend(events);
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The events that turn `old` into `new`: removals, then changes, then additions, each in key order.
pub fn diff(
    old: &BTreeMap<(ClientId, RegisterId), PublisherView>,
    new: &BTreeMap<(ClientId, RegisterId), PublisherView>,
) -> Vec<Event> {
    let mut events = Vec::new();
    for (key, p) in old {
        if !new.contains_key(key) {
            events.push(Event::Removed(p.clone()));
        }
    }
    for (key, p) in new {
        if let Some(before) = old.get(key)
            && before != p
        {
            events.push(Event::Changed {
                old: before.clone(),
                new: p.clone(),
            });
        }
    }
    for (key, p) in new {
        if !old.contains_key(key) {
            events.push(Event::Added(p.clone()));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(reg: &str, data: &str) -> ((ClientId, RegisterId), PublisherView) {
        let p = PublisherView {
            client_id: "c".into(),
            register_id: reg.into(),
            data: vec![bytes::Bytes::copy_from_slice(data.as_bytes())],
            attributes: Default::default(),
            client_version: 1,
        };
        (("c".into(), reg.into()), p)
    }

    #[test]
    fn diff_reports_removals_changes_and_additions() {
        let old: BTreeMap<_, _> = [view("a", "1"), view("b", "1")].into();
        let new: BTreeMap<_, _> = [view("b", "2"), view("c", "1")].into();
        let events = diff(&old, &new);
        assert_eq!(
            events,
            vec![
                Event::Removed(view("a", "1").1),
                Event::Changed {
                    old: view("b", "1").1,
                    new: view("b", "2").1
                },
                Event::Added(view("c", "1").1),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }
}
