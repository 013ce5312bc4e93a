//! Checks of an app stream before any lease: it exists, and its subject transform splits it into
//! as many partitions as the binding says.

use crate::RunError;
use crate::common::nats;
use crate::runtime::config::BindingConfig;
use anyhow::Context as _;
use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

/// Refuses to start when a binding's app stream is missing, or is partitioned into another number
/// of partitions than the binding says; waits while JetStream cannot answer (`None`: shutdown came
/// first).
pub(crate) async fn check_app_stream(
    js: &jetstream::Context,
    b: &BindingConfig,
    shutdown: &CancellationToken,
) -> Result<Option<()>, RunError> {
    let what = format!("binding {}: the app stream {}", b.name, b.stream);
    let found = nats::when_available(&what, shutdown, || async { Ok(js.get_stream(&b.stream).await?) })
        .await
        .with_context(|| {
            format!(
                "binding {}: the app stream {} does not exist or cannot be read (mend never creates the app's streams)",
                b.name, b.stream
            )
        })
        .map_err(RunError::Startup)?;
    let Some(app_stream) = found else {
        return Ok(None);
    };
    if !b.is_partitioned() {
        return Ok(Some(()));
    }
    let transform = app_stream.cached_info().config.subject_transform.as_ref();
    let counts = transform.map_or_else(Vec::new, |t| partition_counts(&t.destination));
    if counts.is_empty() {
        tracing::warn!(binding = %b.name, stream = %b.stream, partitions = b.partitions,
            "The app stream has no subject transform with {{{{partition(N, …)}}}}: producers must \
             put the partition number into the subject themselves.");
    } else if counts.iter().any(|&n| n != b.partitions) {
        return Err(RunError::Config(anyhow::anyhow!(
            "binding {}: partitions = {}, but stream {} maps subjects into {} partitions (subject transform {:?})",
            b.name,
            b.partitions,
            b.stream,
            counts[0],
            transform
                .map(|t| t.destination.as_str())
                .unwrap_or_default()
        )));
    }
    Ok(Some(()))
}

/// The partition counts `N` of the `{{partition(N, …)}}` mapping functions in a transform's
/// destination.
pub(crate) fn partition_counts(destination: &str) -> Vec<u32> {
    let lower = destination.to_ascii_lowercase();
    lower
        .match_indices("partition(")
        .filter_map(|(at, found)| {
            let rest = &lower[at + found.len()..];
            rest.split(',').next()?.trim().parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn partition_counts_of_transforms() {
        assert_eq!(
            partition_counts("orders.{{partition(4,1)}}.{{wildcard(1)}}.{{wildcard(2)}}"),
            [4]
        );
        assert_eq!(partition_counts("o.{{ Partition( 8 , 1, 2) }}.x"), [8]);
        assert!(partition_counts("o.{{wildcard(1)}}").is_empty());
    }
}
