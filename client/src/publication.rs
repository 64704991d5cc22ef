//! Publications: [`PublishBuilder`] sets one up, [`Publication`] is one registration of the client
//! — updated, unpublished, or removed in the background when dropped. The registry entry that
//! lets the client register it again after a reconnect lives in `Inner::registry`.

use std::collections::BTreeMap;

use bytes::Bytes;
use roster_common::health::CheckSpec;
use roster_common::proto::{ClientRequest, ClientResponse};
use roster_common::{Error, RegisterId, Result, ServiceId, ids};
use tracing::debug;

use crate::{Client, Handle, PublicationState};

/// Sets up a publication: made by [`Client::publisher`], sent by [`PublishBuilder::publish`].
pub struct PublishBuilder<'a> {
    client: &'a Client,
    service: Result<ServiceId>,
    register_id: Option<RegisterId>,
    attributes: BTreeMap<String, String>,
    check: Option<CheckSpec>,
}

impl<'a> PublishBuilder<'a> {
    pub(crate) fn new(client: &'a Client, service: Result<ServiceId>) -> Self {
        PublishBuilder {
            client,
            service,
            register_id: None,
            attributes: BTreeMap::new(),
            check: None,
        }
    }

    /// The register id, e.g. the instance's own name: 1 to 256 bytes, unique among this client's
    /// publications (publishing a second one under an id in use fails with `InvalidArgument`;
    /// update the first instead). By default the client picks one (`p1`, `p2` …).
    pub fn register_id(mut self, register_id: impl Into<String>) -> Self {
        self.register_id = Some(register_id.into());
        self
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

    /// Has the registry check the instance while it is published (see [`CheckSpec`]): the data
    /// server leading its slot probes it every interval and marks it unhealthy after `fall`
    /// failed probes in a row, healthy again after `rise` good ones. It starts healthy, and is
    /// marked, never removed: it still goes away only when unpublished or when this client does.
    /// Subscribers see the verdict in its `health`; healthy-only subscribers
    /// ([`crate::SubscribeOptions`]) are not shown it while it is unhealthy. The check is sent
    /// again with every re-registration on a new session server. A bad check fails the publish
    /// with [`Error::InvalidArgument`].
    pub fn check(mut self, check: CheckSpec) -> Self {
        self.check = Some(check);
        self
    }

    /// Publishes `data` (typically one `host:port`). Returns once the session server accepted it
    /// (see [`Publication::is_durable`]), or at once, not durable, while no session server is
    /// reachable.
    pub async fn publish(self, data: Vec<Bytes>) -> Result<Publication> {
        let service = self.service?;
        let inner = &self.client.handle.inner;
        let register_id = {
            let mut registry = inner.registry.lock();
            let register_id = match self.register_id {
                Some(id) => {
                    ids::check_id("register_id", &id)?;
                    if registry.publications.contains_key(&id) {
                        return Err(Error::InvalidArgument(format!(
                            "register id {id:?} is already published by this client; update that \
                             publication instead"
                        )));
                    }
                    id
                }
                None => inner.new_register_id("p", &registry),
            };
            // Reserved now, so two publishes cannot take the same id.
            registry.publications.insert(
                register_id.clone(),
                PublicationState {
                    service: service.clone(),
                    data: Vec::new(),
                    attributes: self.attributes.clone(),
                    client_version: 0,
                    check: self.check.clone(),
                },
            );
            register_id
        };
        let mut publication = Publication {
            handle: self.client.handle.clone(),
            register_id,
            service,
            attributes: self.attributes,
            check: self.check,
            durable: false,
            active: false,
        };
        publication.update(data).await?;
        publication.active = true;
        Ok(publication)
    }
}

/// One registration of this client. Dropping it unpublishes in the background: the removals of
/// publications dropped together are sent side by side, up to 32 at a time, without holding up
/// anything else of the client; [`crate::Client::close`] sends what is still queued for up to a
/// second (the close itself removes the rest, as it removes every publication of the client).
pub struct Publication {
    handle: Handle,
    register_id: RegisterId,
    service: ServiceId,
    attributes: BTreeMap<String, String>,
    check: Option<CheckSpec>,
    durable: bool,
    active: bool,
}

impl Publication {
    pub fn service(&self) -> &ServiceId {
        &self.service
    }

    pub fn register_id(&self) -> &str {
        &self.register_id
    }

    /// Whether the last change has reached the registry's data tier.
    ///
    /// `true`: the slot leader applied it; subscribers are being told. `false`: it is accepted but
    /// held on the way — by the session server, because no data server could take it yet (the
    /// data tier is restarting or its slot is moving), or by this client, because no session
    /// server was reachable. Either keeps retrying on its own and the change lands when the tier
    /// comes back; nothing is lost unless this client also goes away meanwhile. Care when the
    /// publication must be visible before going on (a rolling deploy that waits for its instance
    /// to be discoverable): then wait for a subscriber to see it rather than trusting the return
    /// of `publish`. `is_durable` is not updated when the held change lands later.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Replaces the published data.
    pub async fn update(&mut self, data: Vec<Bytes>) -> Result<()> {
        let inner = &self.handle.inner;
        let request = {
            let mut registry = inner.registry.lock();
            let state = registry
                .publications
                .entry(self.register_id.clone())
                .or_insert_with(|| PublicationState {
                    service: self.service.clone(),
                    data: Vec::new(),
                    attributes: self.attributes.clone(),
                    client_version: 0,
                    check: self.check.clone(),
                });
            state.client_version += 1;
            state.data = data;
            publish_request(&self.register_id, state)
        };
        match inner.call(&request).await {
            Ok(ClientResponse::Accepted { durable }) => {
                self.durable = durable;
                Ok(())
            }
            Ok(other) => Err(Error::UnexpectedMessage(format!(
                "expected Accepted, got {other:?}"
            ))),
            Err(e) if e.is_retryable() => {
                // Held by the client: registered on the next connection.
                debug!(error = %e, "publication will be registered on reconnect");
                self.durable = false;
                Ok(())
            }
            Err(e) => {
                if !self.active {
                    inner.registry.lock().publications.remove(&self.register_id);
                }
                Err(e)
            }
        }
    }

    /// Removes the registration and waits for the session server to accept the removal.
    pub async fn unpublish(mut self) -> Result<()> {
        self.active = false;
        let inner = self.handle.inner.clone();
        inner.registry.lock().publications.remove(&self.register_id);
        // The service lets a session server this publication never went through remove it (the
        // one that held it may have just died).
        let request = ClientRequest::Unpublish {
            register_id: self.register_id.clone(),
            service: Some(self.service.clone()),
        };
        match inner.call(&request).await {
            Ok(ClientResponse::Accepted { .. }) => Ok(()),
            // From servers that do not take the service: not registered where we are now.
            Err(Error::NotFound(_)) => Ok(()),
            Ok(other) => Err(Error::UnexpectedMessage(format!(
                "expected Accepted, got {other:?}"
            ))),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        // Still registered (not unpublished, and not refused): remove it in the background. This
        // also covers a publish abandoned half way, which the server may have taken.
        let registered = self
            .handle
            .inner
            .registry
            .lock()
            .publications
            .remove(&self.register_id)
            .is_some();
        if registered {
            let _ = self
                .handle
                .inner
                .background_tx
                .send(ClientRequest::Unpublish {
                    register_id: self.register_id.clone(),
                    service: Some(self.service.clone()),
                });
        }
    }
}

pub(crate) fn publish_request(register_id: &str, state: &PublicationState) -> ClientRequest {
    ClientRequest::Publish {
        register_id: register_id.to_owned(),
        service: state.service.clone(),
        data: state.data.clone(),
        attributes: state.attributes.clone(),
        client_version: state.client_version,
        check: state.check.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registration_carries_the_check() {
        let mut state = PublicationState {
            service: "demo".parse().unwrap(),
            data: vec![Bytes::from_static(b"10.0.0.7:8080")],
            attributes: BTreeMap::new(),
            client_version: 3,
            check: Some(CheckSpec::new("tcp")),
        };
        let ClientRequest::Publish {
            check,
            client_version,
            ..
        } = publish_request("p1", &state)
        else {
            panic!("not a Publish");
        };
        assert_eq!(check, Some(CheckSpec::new("tcp")));
        assert_eq!(client_version, 3);
        state.check = None;
        assert!(matches!(
            publish_request("p1", &state),
            ClientRequest::Publish { check: None, .. }
        ));
    }
}
