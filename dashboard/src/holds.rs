//! Held keys as the sidecars keep them (SPEC §7): the entries of the KV bucket `mend_holds` that
//! are held or releasing, with the number of messages in each key's hold queue on MEND_HOLD. Read
//! live from NATS, not from the store: the sidecars own this state.

use repair_rules::identity::{buckets, streams};
use std::collections::HashMap;
use std::time::SystemTime;

use futures::TryStreamExt as _;
use repair_rules::MessageKey;
use repair_rules::holds::{Hold, HoldState};
use repair_rules::identity::subjects;

/// The most holds one listing reads.
pub const MAX_LISTED: usize = 1000;

/// A held key.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct HeldKey {
    pub service: String,
    pub binding: String,
    pub partition: u32,
    pub key: String,
    /// The lineage whose resolution releases the key.
    pub head: String,
    /// `held` or `releasing`.
    pub state: String,
    pub since: String,
    pub age_seconds: u64,
    /// Messages waiting in the key's hold queue (during a release, delivered ones may still count
    /// until they are purged).
    pub count: u64,
    #[serde(skip)]
    #[schema(ignore)]
    pub entry: Hold,
}

/// Every held key (at most [`MAX_LISTED`]), oldest first, optionally of one service.
pub async fn list(
    js: &async_nats::jetstream::Context,
    service: Option<&str>,
) -> anyhow::Result<Vec<HeldKey>> {
    if service.is_some_and(|s| !repair_rules::identity::is_subject_token(s)) {
        // Not a service name: it has no holds (and would not make a subject filter).
        return Ok(Vec::new());
    }
    let mut held = current_holds(js, service).await?;
    // The oldest first, and at most MAX_LISTED of them.
    held.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.key.cmp(&b.key)));
    held.truncate(MAX_LISTED);
    let counts = queue_counts(js, service).await.unwrap_or_else(|error| {
        tracing::warn!(%error, "Cannot count hold queues.");
        HashMap::new()
    });
    let now = SystemTime::now();
    let mut out: Vec<HeldKey> = held
        .into_iter()
        .map(|hold| {
            let subject = subjects::hold(&hold.service, &MessageKey(hold.key.clone()).token());
            let age_seconds = humantime::parse_rfc3339_weak(&hold.since)
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0, |d| d.as_secs());
            HeldKey {
                service: hold.service.clone(),
                binding: hold.binding.clone(),
                partition: hold.partition,
                key: hold.key.clone(),
                head: hold.head.clone(),
                state: match hold.state {
                    HoldState::Held => "held".into(),
                    HoldState::Releasing => "releasing".into(),
                    HoldState::Resolved => "resolved".into(),
                },
                since: hold.since.clone(),
                age_seconds,
                count: counts.get(&subject).copied().unwrap_or(0),
                entry: hold,
            }
        })
        .collect();
    out.sort_by_key(|h| std::cmp::Reverse(h.age_seconds));
    Ok(out)
}

/// The held and releasing entries of `mend_holds` (of `service`, when given), read in one go: an
/// ordered consumer delivering each key's last entry, until the last of them (its `delta` is 0),
/// rather than one request per key.
async fn current_holds(
    js: &async_nats::jetstream::Context,
    service: Option<&str>,
) -> anyhow::Result<Vec<Hold>> {
    let filter = match service {
        Some(s) => format!("$KV.{}.{s}.>", buckets::HOLDS),
        None => format!("$KV.{}.>", buckets::HOLDS),
    };
    // Nothing to wait for when no key is there: a watch would deliver nothing and never end.
    let stream = js.get_stream(format!("KV_{}", buckets::HOLDS)).await?;
    let mut subjects = stream.info_with_subjects(filter).await?;
    if subjects.try_next().await?.is_none() {
        return Ok(Vec::new());
    }
    let kv = js.get_key_value(buckets::HOLDS).await?;
    let mut watch = kv
        .watch_with_history(service.map_or_else(|| ">".to_owned(), |s| format!("{s}.>")))
        .await?;
    let mut held = Vec::new();
    let read = async {
        while let Some(entry) = watch.try_next().await? {
            if entry.operation == async_nats::jetstream::kv::Operation::Put {
                match serde_json::from_slice::<Hold>(&entry.value) {
                    Ok(hold) if hold.state != HoldState::Resolved => held.push(hold),
                    Ok(_) => {}
                    Err(_) => {
                        tracing::warn!(key = entry.key, "A hold entry that is not one; skipped.")
                    }
                }
            }
            if entry.delta == 0 {
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .map_err(|_| anyhow::anyhow!("reading the hold entries took longer than 10 s"))??;
    Ok(held)
}

/// The hold of `key` of `service`, if it is held.
pub async fn find(
    js: &async_nats::jetstream::Context,
    service: &str,
    key: &str,
) -> anyhow::Result<Option<Hold>> {
    if !repair_rules::identity::is_subject_token(service) {
        return Ok(None);
    }
    let kv = js.get_key_value(buckets::HOLDS).await?;
    let entry = subjects::hold_entry(service, &MessageKey(key.to_owned()).token());
    let Some(value) = kv.get(&entry).await? else {
        return Ok(None);
    };
    let hold: Hold = serde_json::from_slice(&value)?;
    Ok((hold.state != HoldState::Resolved).then_some(hold))
}

async fn queue_counts(
    js: &async_nats::jetstream::Context,
    service: Option<&str>,
) -> anyhow::Result<HashMap<String, u64>> {
    let filter = match service {
        Some(s) => format!("mend.hold.{s}.>"),
        None => "mend.hold.>".into(),
    };
    let stream = js.get_stream(streams::HOLD).await?;
    let counts: HashMap<String, usize> = stream
        .info_with_subjects(filter)
        .await?
        .try_collect()
        .await?;
    Ok(counts.into_iter().map(|(k, v)| (k, v as u64)).collect())
}
