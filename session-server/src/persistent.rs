//! Persistent instances on their way to the meta group: the session checks who asks and what they
//! ask for (`conn.rs`), then hands the registration to any meta node, which forwards it to the
//! Raft leader. The answer comes once a quorum of the meta group has it on disk.

use roster_common::member::call_meta;
use roster_common::proto::{MetaRequest, MetaResponse, PersistentInstance};
use roster_common::{Error, RegisterId, Result, ServiceId};
use tracing::info;

use crate::shared::Shared;

/// A meta answer may carry a whole slot's set; a registration's is small, but the meta tier's
/// frames are allowed to be large.
const META_MAX_FRAME: u32 = 64 << 20;

/// Stores `instance` in the meta group.
pub(crate) async fn register(shared: &Shared, instance: PersistentInstance) -> Result<()> {
    let (service, id, by) = (
        instance.service.clone(),
        instance.id.clone(),
        instance.by.clone(),
    );
    call(shared, MetaRequest::RegisterPersistent { instance }).await?;
    info!(service = %service, id = %id, by = %by, "persistent instance registered");
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
    call(shared, request).await?;
    info!(service = %service, id = %id, by = %by, "persistent instance deregistered");
    Ok(())
}

async fn call(shared: &Shared, request: MetaRequest) -> Result<()> {
    let config = shared.config();
    match call_meta(
        shared.pool(),
        &config.metas,
        &request,
        META_MAX_FRAME,
        config.request_timeout,
    )
    .await
    {
        Ok(MetaResponse::Done {}) => Ok(()),
        Ok(other) => Err(Error::Internal(format!(
            "the meta tier answered {request} with an unexpected {other:?}",
            request = request.name()
        ))),
        // The caller must know that nothing was stored, whatever the meta tier's trouble was.
        Err(
            e @ (Error::NoQuorum(_)
            | Error::Unavailable(_)
            | Error::NotLeader { .. }
            | Error::Connection(_)
            | Error::Timeout(_)),
        ) => Err(Error::Unavailable(format!(
            "not stored: the meta tier could not take it ({e}); retry"
        ))),
        Err(e) => Err(e),
    }
}
