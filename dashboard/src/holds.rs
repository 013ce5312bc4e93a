//! Held keys as the sidecars keep them (SPEC §7): the entries of the KV bucket `mend_holds` that
//! are held or releasing, with the number of messages in each key's hold queue on MEND_HOLD. Read
//! live from NATS, not from the store: the sidecars own this state.

use std::collections::HashMap;
use std::time::SystemTime;

use futures::TryStreamExt as _;
use repair_rules::MessageKey;
use repair_rules::holds::{Hold, HoldState};
use repair_rules::identity::subjects;

/// The bucket of hold entries.
pub const HOLDS_BUCKET: &str = "mend_holds";
/// The most holds one listing reads.
pub const MAX_LISTED: usize = 1000;

/// A held key.
#[derive(Debug, Clone, serde::Serialize)]
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
    pub entry: Hold,
}

/// Every held key (at most [`MAX_LISTED`]), oldest first, optionally of one service.
pub async fn list(
    js: &async_nats::jetstream::Context,
    service: Option<&str>,
) -> anyhow::Result<Vec<HeldKey>> {
    let kv = js.get_key_value(HOLDS_BUCKET).await?;
    let mut keys: Vec<String> = kv.keys().await?.try_collect().await?;
    if let Some(s) = service {
        let prefix = format!("{s}.");
        keys.retain(|k| k.starts_with(&prefix));
    }
    keys.sort();
    let mut held = Vec::new();
    for k in keys {
        let Some(value) = kv.get(&k).await? else {
            continue;
        };
        let Ok(hold) = serde_json::from_slice::<Hold>(&value) else {
            tracing::warn!(key = k, "A hold entry that is not one; skipped.");
            continue;
        };
        if hold.state == HoldState::Resolved {
            continue;
        }
        held.push(hold);
        if held.len() >= MAX_LISTED {
            break;
        }
    }
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

/// The hold of `key` of `service`, if it is held.
pub async fn find(
    js: &async_nats::jetstream::Context,
    service: &str,
    key: &str,
) -> anyhow::Result<Option<Hold>> {
    let kv = js.get_key_value(HOLDS_BUCKET).await?;
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
    let stream = js.get_stream("MEND_HOLD").await?;
    let counts: HashMap<String, usize> = stream
        .info_with_subjects(filter)
        .await?
        .try_collect()
        .await?;
    Ok(counts.into_iter().map(|(k, v)| (k, v as u64)).collect())
}
