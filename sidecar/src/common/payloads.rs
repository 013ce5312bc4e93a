//! Payloads too large to travel in a message of mend's own (a hold queue's copy of a message at
//! the server's `max_payload`, an envelope's payload, a resubmission's): kept in the object store
//! bucket `mend_payloads` and named where the message would have carried them (the
//! `Mend-Payload-Object` header, `payload_ref.object` of an envelope). The names and the reading
//! are shared with the dashboard ([`mend_dashboard::payloads`]); this adds retries and the sidecar's
//! logging.

use async_nats::jetstream;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use mend_dashboard::payloads::{load, object_name};

use crate::common::publish::NotStored;

/// Stores `bytes` as `name`, retrying with backoff until stored or `shutdown` is cancelled.
pub async fn store(
    js: &jetstream::Context,
    shutdown: &CancellationToken,
    name: &str,
    bytes: &Bytes,
) -> Result<(), NotStored> {
    let mut pause = crate::common::backoff::RETRY_MIN;
    loop {
        match mend_dashboard::payloads::put(js, name, bytes).await {
            Ok(()) => return Ok(()),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                name,
                "Large payload not stored yet; retrying."
            ),
        }
        crate::common::backoff::back_off(shutdown, &mut pause).await?;
    }
}

/// Deletes `name`, if it is there; a failure is only logged (it costs storage, nothing else).
pub async fn forget(js: &jetstream::Context, name: &str) {
    if let Err(error) = mend_dashboard::payloads::delete(js, name).await {
        tracing::debug!(
            error = format!("{error:#}"),
            name,
            "Large payload not deleted."
        );
    }
}
