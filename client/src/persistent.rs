//! Persistent instances: registered by [`Client::register_persistent`], removed by
//! [`Client::deregister_persistent`].
//!
//! Unlike a [`crate::Publication`], a persistent instance is not the client's: the meta group
//! stores it, no connection holds it, and it stays through the end of this client and through
//! restarts of every server until someone deregisters it. So the SDK keeps no state for it and
//! registers nothing again after a reconnect; each call is one request, sent again on the next
//! connection if the one it went out on breaks. Registering the same id again replaces the
//! instance (and, with identical content, changes nothing), so a resend is harmless; a resent
//! deregistration may find the instance already gone, which counts as done.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;

use bytes::Bytes;
use roster_common::health::CheckSpec;
use roster_common::proto::{ClientRequest, ClientResponse};
use roster_common::{Error, RegisterId, Result, ServiceId, ids};

use crate::Client;

/// A persistent instance to register: made by [`Client::register_persistent`], registered when
/// awaited (or by [`PersistentBuilder::send`]).
#[must_use = "nothing is registered until it is awaited"]
pub struct PersistentBuilder<'a> {
    client: &'a Client,
    service: Result<ServiceId>,
    id: RegisterId,
    data: Vec<Bytes>,
    attributes: BTreeMap<String, String>,
    check: Option<CheckSpec>,
}

impl<'a> PersistentBuilder<'a> {
    pub(crate) fn new(
        client: &'a Client,
        service: Result<ServiceId>,
        id: RegisterId,
        data: Vec<Bytes>,
    ) -> Self {
        PersistentBuilder {
            client,
            service,
            id,
            data,
            attributes: BTreeMap::new(),
            check: None,
        }
    }

    /// Adds an attribute (zone, weight, version …) that subscribers see with the data.
    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Replaces the attributes.
    pub fn attributes(mut self, attributes: BTreeMap<String, String>) -> Self {
        self.attributes = attributes;
        self
    }

    /// Has the registry check the instance (see [`CheckSpec`]): the data server leading its slot
    /// probes it every interval and marks it unhealthy after `fall` failed probes in a row,
    /// healthy again after `rise` good ones. It starts healthy. Subscribers see the verdict in
    /// each publisher's `health`; healthy-only subscribers ([`crate::SubscribeOptions`]) are not
    /// shown unhealthy instances. A bad check is refused with [`Error::InvalidArgument`].
    pub fn check(mut self, check: CheckSpec) -> Self {
        self.check = Some(check);
        self
    }

    /// The request this registration sends.
    pub(crate) fn into_request(self) -> Result<ClientRequest> {
        ids::check_id("id", &self.id)?;
        Ok(ClientRequest::RegisterPersistent {
            service: self.service?,
            id: self.id,
            data: self.data,
            attributes: self.attributes,
            check: self.check,
        })
    }

    /// Registers the instance, replacing any of the same service and id. Returns once a quorum
    /// of the meta group has it on disk.
    pub async fn send(self) -> Result<()> {
        let inner = &self.client.handle.inner;
        let request = self.into_request()?;
        // Resending is safe: the same content again changes nothing.
        let (result, _) = inner.call_noting_resends(&request).await;
        expect_stored(result)
    }
}

impl<'a> IntoFuture for PersistentBuilder<'a> {
    type Output = Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// Removes the persistent instance `id` of `service`.
pub(crate) async fn deregister(client: &Client, service: &str, id: RegisterId) -> Result<()> {
    let service: ServiceId = service.parse()?;
    let request = ClientRequest::DeregisterPersistent { service, id };
    let (result, resent) = client.handle.inner.call_noting_resends(&request).await;
    match result {
        // The first attempt's connection broke after it was sent; it may be what removed it.
        Err(Error::NotFound(_)) if resent => Ok(()),
        other => expect_stored(other),
    }
}

/// A change the meta group has on disk is answered `Accepted { durable: true }`.
fn expect_stored(result: Result<ClientResponse>) -> Result<()> {
    match result? {
        ClientResponse::Accepted { durable: true } => Ok(()),
        ClientResponse::Accepted { durable: false } => Err(Error::Unavailable(
            "the session server accepted the change without confirming it is stored".into(),
        )),
        other => Err(Error::UnexpectedMessage(format!(
            "expected Accepted, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_durable_acceptance_counts_as_stored() {
        assert!(expect_stored(Ok(ClientResponse::Accepted { durable: true })).is_ok());
        assert!(matches!(
            expect_stored(Ok(ClientResponse::Accepted { durable: false })),
            Err(Error::Unavailable(_))
        ));
        assert!(matches!(
            expect_stored(Ok(ClientResponse::Done {})),
            Err(Error::UnexpectedMessage(_))
        ));
        assert!(matches!(
            expect_stored(Err(Error::NotFound("gone".into()))),
            Err(Error::NotFound(_))
        ));
    }
}
