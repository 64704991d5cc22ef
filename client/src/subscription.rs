//! Subscriptions: snapshots as a `Stream`, the latest one at hand, typed events, and waiting for a
//! condition.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use roster_common::{Error, Result, ServiceId};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use crate::Handle;
use crate::snapshot::{Event, Snapshot, diff};

/// How a subscription is served, for [`crate::Client::subscribe_with`]. The default is what
/// [`crate::Client::subscribe`] does: every publisher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Be shown only the publishers that are healthy or not checked, filtered by the session
    /// server — unless more than its protection threshold (half, by default) of the service's
    /// publishers are unhealthy: then every publisher is shown, the unhealthy ones marked in their
    /// `health`, so that a checker cut off from the network cannot empty a service. A snapshot of
    /// a healthy-only subscription holding an unhealthy publisher means that protection applies.
    ///
    /// Such a subscription is pushed the whole filtered set on every change of the service, not
    /// what changed: for very large services subscribe to every publisher and filter on
    /// [`crate::PublisherView::health`] instead.
    pub healthy_only: bool,
}

/// Snapshots of one service, as a `Stream`: each item is newer than the last; a reader that falls
/// behind skips to the newest. Items are shared, not copied (see [`Snapshot`]): every reader of a
/// service gets the same one. Dropping the last handle of a service unsubscribes.
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
    /// as `Added`, then the differences between consecutive snapshots read — computed from the
    /// parts they do not share, so an event costs what changed, not the service's size. A reader
    /// that falls behind gets the net change since what it last read.
    pub fn events(self) -> Events {
        Events {
            subscription: self,
            known: None,
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

/// A stream of [`Event`]s of one service, from the differences between the snapshots it reads.
pub struct Events {
    subscription: Subscription,
    known: Option<Snapshot>,
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
                    let events = match &self.known {
                        Some(known) => diff(known, &snapshot),
                        None => snapshot
                            .publishers
                            .iter_shared()
                            .cloned()
                            .map(Event::Added)
                            .collect(),
                    };
                    self.known = Some(snapshot);
                    self.queue.extend(events);
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
