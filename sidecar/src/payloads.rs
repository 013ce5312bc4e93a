//! Payloads too large to travel in a message of mend's own (a hold queue's copy of a message at
//! the server's `max_payload`, an envelope's payload): kept in the object store bucket
//! `mend_payloads`, in chunks well under any `max_payload`, and named where the message would
//! have carried them (the `Mend-Payload-Object` header of a hold copy, `payload_ref.object` of an
//! envelope). Bytes are kept as they were; a person or a release reads them back.

use async_nats::jetstream::{self, object_store};
use bytes::Bytes;
use repair_rules::LineageId;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::publish::{self, NotStored};

/// The object store bucket of large payloads.
pub const PAYLOADS_BUCKET: &str = "mend_payloads";

/// In a hold queue, the header of a copy whose payload is kept in [`PAYLOADS_BUCKET`] (the copy's
/// own payload is then empty).
pub const MEND_PAYLOAD_OBJECT: &str = "Mend-Payload-Object";

/// Chunks are far below any `max_payload` a server is likely to set.
const CHUNK: usize = 32 * 1024;

/// The object name of the payload of `lineage` at `attempt` (`purpose`: `held`, `failed`…).
/// Object names allow only `[-/_=.a-zA-Z0-9]`: a stream name with other characters is hex-encoded.
pub fn object_name(lineage: &LineageId, attempt: u32, purpose: &str) -> String {
    let stream = &lineage.stream;
    let plain = stream
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let stream = if plain {
        stream.clone()
    } else {
        let hex: String = stream.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x{hex}")
    };
    format!("{stream}/{}/{attempt}/{purpose}", lineage.seq)
}

/// Stores `bytes` as `name`, retrying with backoff until stored or `shutdown` is cancelled.
pub async fn store(
    js: &jetstream::Context,
    shutdown: &CancellationToken,
    name: &str,
    bytes: &Bytes,
) -> Result<(), NotStored> {
    let mut pause = publish::RETRY_MIN;
    loop {
        let stored = async {
            let bucket = js.get_object_store(PAYLOADS_BUCKET).await?;
            let meta = object_store::ObjectMetadata {
                name: name.to_owned(),
                chunk_size: Some(CHUNK),
                ..Default::default()
            };
            bucket.put(meta, &mut bytes.as_ref()).await?;
            anyhow::Ok(())
        };
        match stored.await {
            Ok(()) => return Ok(()),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                name,
                "Large payload not stored yet; retrying."
            ),
        }
        publish::back_off(shutdown, &mut pause).await?;
    }
}

/// The bytes stored as `name`; `None` if there is no such object.
pub async fn load(js: &jetstream::Context, name: &str) -> anyhow::Result<Option<Bytes>> {
    let bucket = js.get_object_store(PAYLOADS_BUCKET).await?;
    let mut object = match bucket.get(name).await {
        Ok(object) => object,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await?;
    Ok(Some(Bytes::from(bytes)))
}

/// Deletes `name`, if it is there; a failure is only logged (it costs storage, nothing else).
pub async fn forget(js: &jetstream::Context, name: &str) {
    let deleted = async {
        let bucket = js.get_object_store(PAYLOADS_BUCKET).await?;
        bucket.delete(name).await?;
        anyhow::Ok(())
    };
    if let Err(error) = deleted.await {
        tracing::debug!(
            error = format!("{error:#}"),
            name,
            "Large payload not deleted."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_use_only_the_allowed_characters() {
        let plain = object_name(&LineageId::new("ORDERS_1", 42), 3, "held");
        assert_eq!(plain, "ORDERS_1/42/3/held");
        let odd = object_name(&LineageId::new("Bestellungen·ü", 7), 1, "failed");
        assert!(odd.starts_with('x'), "{odd}");
        assert!(
            odd.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
            "{odd}"
        );
    }
}
