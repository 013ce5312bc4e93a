//! Payloads too large to travel in a message of mend's own, kept in the object store bucket
//! `mend_payloads` (SPEC §4): a hold queue's copy of a message at the server's `max_payload`, an
//! envelope's payload, a resubmission's. Written and read by the sidecar and by the dashboard, so
//! both use these. Bytes are kept as they were.

use async_nats::jetstream::{self, object_store};
use bytes::Bytes;
use repair_rules::LineageId;
use repair_rules::identity::buckets;
use tokio::io::AsyncReadExt;

/// The header of a message whose payload is kept in [`buckets::PAYLOADS`] under the name it gives
/// (the message's own payload is then empty): a hold queue's copy, or a resubmission too large to
/// publish. Only mend's own streams are read for it (a producer's is never taken over).
pub use repair_rules::headers::MEND_PAYLOAD_OBJECT;

/// Chunks are far below any `max_payload` a server is likely to set.
const CHUNK: usize = 32 * 1024;

/// The object name of the payload of `lineage` at `attempt` (`purpose`: `held`, `failed`,
/// `resubmitted`…). Object names allow only `[-/_=.a-zA-Z0-9]`: a stream name with other characters
/// is hex-encoded.
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

/// Whether `name` is an object of `lineage` (any attempt, any purpose): the only objects an envelope
/// of that lineage may name. Anyone who can publish on MEND_PARKED can write an envelope, so its
/// `payload_ref` is not taken as given.
pub fn is_object_of(name: &str, lineage: &LineageId) -> bool {
    // `<stream>/<seq>/`: everything before the attempt is the lineage's.
    let own = object_name(lineage, 0, "x");
    let prefix = &own[..own.len() - "0/x".len()];
    name.starts_with(prefix) && !name.contains("..")
}

/// Stores `bytes` as `name` (one try).
pub async fn put(js: &jetstream::Context, name: &str, bytes: &Bytes) -> anyhow::Result<()> {
    let bucket = js.get_object_store(buckets::PAYLOADS).await?;
    let meta = object_store::ObjectMetadata {
        name: name.to_owned(),
        chunk_size: Some(CHUNK),
        ..Default::default()
    };
    bucket.put(meta, &mut bytes.as_ref()).await?;
    Ok(())
}

/// The bytes stored as `name`; `None` if there is no such object.
pub async fn load(js: &jetstream::Context, name: &str) -> anyhow::Result<Option<Bytes>> {
    let bucket = js.get_object_store(buckets::PAYLOADS).await?;
    let mut object = match bucket.get(name).await {
        Ok(object) => object,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await?;
    Ok(Some(Bytes::from(bytes)))
}

/// Deletes `name`, if it is there.
pub async fn delete(js: &jetstream::Context, name: &str) -> anyhow::Result<()> {
    let bucket = js.get_object_store(buckets::PAYLOADS).await?;
    bucket.delete(name).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_names_only_its_own_lineages_objects() {
        let lineage = LineageId::new("ORDERS", 42);
        assert!(is_object_of("ORDERS/42/3/failed", &lineage));
        assert!(is_object_of(
            &object_name(&lineage, 9, "resubmitted"),
            &lineage
        ));
        assert!(!is_object_of("ORDERS/421/1/failed", &lineage));
        assert!(!is_object_of("SECRETS/42/1/failed", &lineage));
        assert!(!is_object_of("ORDERS/4/1/failed", &lineage));
    }

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
