//! Persistent instances on their way to the meta group. The session checks who asks (`publish` in
//! the service's namespace, in `conn.rs`) and what they ask for ([`check_instance`]: the same
//! bounds as a publish), then hands the registration to any meta node, which passes it to the Raft
//! leader. The answer comes once a quorum of the meta group has it on disk; the slot leader of the
//! instance's service then serves it like any publisher (`docs/ARCHITECTURE.md`).
//!
//! Nothing is kept here: a registration is not bound to the connection that made it, and a session
//! that fails mid-call leaves the client to retry, which is harmless (an identical registration
//! changes nothing).

use roster_common::member::call_meta;
use roster_common::proto::{MetaRequest, MetaResponse, PersistentInstance, publisher_size};
use roster_common::{Error, RegisterId, Result, ServiceId};
use tracing::info;

use crate::shared::Shared;

/// Refuses an instance the cluster would not serve: a bad id, no data, data and attributes over
/// `max_bytes` (`--max-publisher-bytes`, counted as for a publish), a check that cannot run. All
/// are `InvalidArgument`, as the meta group answers them.
pub(crate) fn check_instance(instance: &PersistentInstance, max_bytes: usize) -> Result<()> {
    roster_common::ids::check_id("id", &instance.id)?;
    if instance.data.is_empty() {
        return Err(Error::InvalidArgument(
            "a persistent instance needs at least one data item".into(),
        ));
    }
    let size = publisher_size(&instance.data, &instance.attributes);
    if size > max_bytes {
        return Err(Error::InvalidArgument(format!(
            "persistent instance of {size} bytes exceeds the limit of {max_bytes} bytes"
        )));
    }
    if let Some(check) = &instance.check {
        check.validate(&instance.data)?;
    }
    Ok(())
}

/// Stores `instance` in the meta group.
pub(crate) async fn register(shared: &Shared, instance: PersistentInstance) -> Result<()> {
    let (service, id, by) = (
        instance.service.clone(),
        instance.id.clone(),
        instance.by.clone(),
    );
    let result = call(shared, &MetaRequest::RegisterPersistent { instance }).await;
    answer("registration", result)?;
    info!(%service, %id, %by, "persistent instance registered");
    Ok(())
}

/// Removes the persistent instance `id` of `service`; `NotFound` if there is none.
pub(crate) async fn deregister(
    shared: &Shared,
    service: ServiceId,
    id: RegisterId,
    by: String,
) -> Result<()> {
    let request = MetaRequest::DeregisterPersistent {
        service: service.clone(),
        id: id.clone(),
        by: by.clone(),
    };
    answer("deregistration", call(shared, &request).await)?;
    info!(%service, %id, %by, "persistent instance deregistered");
    Ok(())
}

async fn call(shared: &Shared, request: &MetaRequest) -> Result<MetaResponse> {
    let config = shared.config();
    call_meta(
        shared.pool(),
        &config.metas,
        request,
        config.max_frame,
        config.request_timeout,
    )
    .await
}

/// What the client is told of the meta tier's answer to a `what`. The meta tier's own refusals
/// (`NotFound`, `InvalidArgument`, `LimitExceeded`) reach the client as they are; its trouble
/// becomes `Unavailable`, saying whether the change was stored.
fn answer(what: &str, result: Result<MetaResponse>) -> Result<()> {
    match result {
        Ok(MetaResponse::Done {}) => Ok(()),
        Ok(other) => Err(Error::Internal(format!(
            "the meta tier answered the {what} with an unexpected {other:?}"
        ))),
        // Nothing was committed: no meta node took it, or none had a quorum.
        Err(
            e @ (Error::NoQuorum(_)
            | Error::Unavailable(_)
            | Error::NotLeader { .. }
            | Error::Connection(_)),
        ) => Err(Error::Unavailable(format!(
            "the {what} was not stored: the meta tier could not take it ({e}); retry"
        ))),
        // It may have been committed after all: retrying is safe either way.
        Err(e @ Error::Timeout(_)) => Err(Error::Unavailable(format!(
            "the {what} may not have been stored: the meta tier did not answer in time ({e}); \
             retry"
        ))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use roster_common::health::CheckSpec;

    use super::*;

    fn instance(id: &str, data: &[&str]) -> PersistentInstance {
        PersistentInstance {
            service: "ns/g/db".parse().unwrap(),
            id: id.into(),
            data: data
                .iter()
                .map(|d| Bytes::copy_from_slice(d.as_bytes()))
                .collect(),
            attributes: Default::default(),
            check: Some(CheckSpec::new("tcp")),
            registered_ms: 1,
            by: "t1".into(),
        }
    }

    fn refusal(result: Result<()>) -> String {
        match result {
            Err(e @ Error::InvalidArgument(_)) => e.to_string(),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn an_instance_is_checked_like_a_publish() {
        assert!(check_instance(&instance("db-1", &["10.0.0.1:5432"]), 1024).is_ok());
        assert!(refusal(check_instance(&instance("", &["10.0.0.1:5432"]), 1024)).contains("id"));
        assert!(refusal(check_instance(&instance("db-1", &[]), 1024)).contains("data item"));
        let big = "x".repeat(2000);
        assert!(refusal(check_instance(&instance("db-1", &[&big]), 1024)).contains("limit"));
        // A bare `tcp` check needs HOST:PORT as the first data item.
        let bad_check = refusal(check_instance(&instance("db-1", &["not an address"]), 1024));
        assert!(bad_check.contains("check"), "{bad_check}");
        let mut no_check = instance("db-1", &["anything"]);
        no_check.check = None;
        assert!(check_instance(&no_check, 1024).is_ok());
    }

    #[test]
    fn the_meta_tiers_answer_says_whether_anything_was_stored() {
        assert!(answer("registration", Ok(MetaResponse::Done {})).is_ok());
        let not_stored = answer(
            "registration",
            Err(Error::NoQuorum("no leader elected".into())),
        )
        .unwrap_err();
        assert!(matches!(&not_stored, Error::Unavailable(m) if m.contains("was not stored")));
        let unreachable =
            answer("registration", Err(Error::Connection("refused".into()))).unwrap_err();
        assert!(matches!(&unreachable, Error::Unavailable(m) if m.contains("was not stored")));
        let timed_out = answer("registration", Err(Error::Timeout("5 s".into()))).unwrap_err();
        assert!(matches!(&timed_out, Error::Unavailable(m) if m.contains("may not have been")));
        let missing = answer("deregistration", Err(Error::NotFound("db-1".into()))).unwrap_err();
        assert!(matches!(missing, Error::NotFound(_)));
        let full = answer("registration", Err(Error::LimitExceeded("max".into()))).unwrap_err();
        assert!(matches!(full, Error::LimitExceeded(_)));
    }
}
