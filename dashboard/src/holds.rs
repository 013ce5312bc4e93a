//! Held keys as the sidecars keep them (SPEC §7): the entries of the KV bucket `mend_holds` that
//! are held or releasing, with the number of messages in each key's hold queue on MEND_HOLD.
//!
//! The sidecars own this state; the dashboard follows it. [`HoldsCache`] watches the bucket (one
//! ordered consumer: the last entry of every key, then each change as it is written) into memory,
//! indexed oldest first, so a page of holds costs a look-up in memory and one count per listed key,
//! whatever the number of held keys (at 100k held keys, reading every entry per page load took
//! 0.4 s).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use futures::{StreamExt as _, TryStreamExt as _};
use repair_rules::MessageKey;
use repair_rules::holds::{Hold, HoldState};
use repair_rules::identity::{buckets, streams, subjects};
use tokio_util::sync::CancellationToken;

/// The most holds one page lists.
pub const MAX_PAGE: usize = 1000;

/// The holds one page lists unless asked for another number.
pub const DEFAULT_PAGE: usize = 100;

/// How long a request waits for the first full read of the bucket (at start-up, or after the
/// watch was lost) before it is answered 503.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Hold queues counted at once for one page.
const COUNTS_IN_FLIGHT: usize = 16;

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
}

/// One page of held keys, oldest first.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<HeldKey>,
    /// Where the next page starts, when there is one.
    pub next_cursor: Option<String>,
}

/// Held keys in all, and the oldest hold's `since`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub held_keys: usize,
    pub oldest_since: Option<String>,
}

/// Why the holds cannot be listed.
#[derive(Debug, thiserror::Error)]
pub enum HoldsError {
    #[error("the held keys are still being read from {bucket} (the dashboard started or lost its watch)", bucket = buckets::HOLDS)]
    NotReady,
    #[error("cursor `{0}` is not one this dashboard gave")]
    BadCursor(String),
}

/// Where a hold sits in the order of the listing: oldest first, then by service and key.
type Place = (String, String, String);

#[derive(Default)]
struct Known {
    /// By KV key (`<service>.<keytoken>`).
    holds: HashMap<String, Hold>,
    order: BTreeSet<Place>,
    /// A complete read of the bucket is in.
    ready: bool,
}

impl Known {
    fn place(hold: &Hold) -> Place {
        (hold.since.clone(), hold.service.clone(), hold.key.clone())
    }

    /// Takes in the entry of `kv_key`: a hold that is held or releasing, or none (resolved,
    /// deleted, purged, unreadable).
    fn set(&mut self, kv_key: &str, hold: Option<Hold>) {
        if let Some(old) = self.holds.remove(kv_key) {
            self.order.remove(&Self::place(&old));
        }
        if let Some(hold) = hold {
            self.order.insert(Self::place(&hold));
            self.holds.insert(kv_key.to_owned(), hold);
        }
    }

    fn by_place(&self, place: &Place) -> Option<&Hold> {
        let token = MessageKey(place.2.clone()).token();
        self.holds.get(&subjects::hold_entry(&place.1, &token))
    }
}

/// The held keys, followed from the bucket in the background (see the module's documentation).
#[derive(Clone)]
pub struct HoldsCache {
    known: Arc<RwLock<Known>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl HoldsCache {
    /// Starts following `mend_holds` until `shutdown`. Until the first full read is in, listings
    /// wait for it (at most [`READY_WAIT`]).
    pub fn start(js: async_nats::jetstream::Context, shutdown: CancellationToken) -> Self {
        let known = Arc::new(RwLock::new(Known::default()));
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        tokio::spawn(follow(js, known.clone(), ready_tx, shutdown));
        Self { known, ready }
    }

    async fn wait_ready(&self) -> Result<(), HoldsError> {
        let mut ready = self.ready.clone();
        match tokio::time::timeout(READY_WAIT, ready.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(HoldsError::NotReady),
        }
    }

    /// Held keys in all (of `service`, when given) and the oldest hold's `since`.
    pub async fn summary(&self, service: Option<&str>) -> Result<Summary, HoldsError> {
        self.wait_ready().await?;
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut summary = Summary::default();
        for place in &known.order {
            if service.is_some_and(|s| s != place.1) {
                continue;
            }
            if summary.oldest_since.is_none() {
                summary.oldest_since = Some(place.0.clone());
            }
            summary.held_keys += 1;
        }
        Ok(summary)
    }

    /// Up to `limit` held keys (of `service`, when given), oldest first, after `cursor`, each
    /// with its hold queue's count.
    pub async fn page(
        &self,
        js: &async_nats::jetstream::Context,
        service: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page, HoldsError> {
        let after = cursor.map(decode_cursor).transpose()?;
        self.wait_ready().await?;
        let limit = limit.clamp(1, MAX_PAGE);
        let (holds, more) = {
            let known = self.known.read().unwrap_or_else(|p| p.into_inner());
            let range = match &after {
                Some(after) => known
                    .order
                    .range((
                        std::ops::Bound::Excluded(after.clone()),
                        std::ops::Bound::Unbounded,
                    ))
                    .collect::<Vec<_>>(),
                None => known.order.iter().collect(),
            };
            let mut matching = range
                .into_iter()
                .filter(|p| service.is_none_or(|s| s == p.1))
                .filter_map(|p| known.by_place(p).cloned());
            let holds: Vec<Hold> = matching.by_ref().take(limit).collect();
            (holds, matching.next().is_some())
        };
        let next_cursor = match holds.last() {
            Some(last) if more => Some(encode_cursor(&Known::place(last))),
            _ => None,
        };
        let now = SystemTime::now();
        let items = futures::stream::iter(holds)
            .map(|hold| async move {
                let count = queue_count(js, &hold).await;
                held_key(hold, count, now)
            })
            .buffered(COUNTS_IN_FLIGHT)
            .collect()
            .await;
        Ok(Page { items, next_cursor })
    }
}

fn held_key(hold: Hold, count: u64, now: SystemTime) -> HeldKey {
    let age_seconds = humantime::parse_rfc3339_weak(&hold.since)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .map_or(0, |d| d.as_secs());
    HeldKey {
        state: match hold.state {
            HoldState::Held => "held".into(),
            HoldState::Releasing => "releasing".into(),
            HoldState::Resolved => "resolved".into(),
        },
        age_seconds,
        count,
        service: hold.service,
        binding: hold.binding,
        partition: hold.partition,
        key: hold.key,
        head: hold.head,
        since: hold.since,
    }
}

fn encode_cursor(place: &Place) -> String {
    let json = serde_json::to_vec(&[&place.0, &place.1, &place.2]).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_cursor(cursor: &str) -> Result<Place, HoldsError> {
    let bad = || HoldsError::BadCursor(cursor.chars().take(64).collect());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let [since, service, key]: [String; 3] = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    Ok((since, service, key))
}

/// Messages in the hold queue of `hold` (0 when it cannot be counted now: a listing does not fail
/// for a count).
async fn queue_count(js: &async_nats::jetstream::Context, hold: &Hold) -> u64 {
    let subject = subjects::hold(&hold.service, &MessageKey(hold.key.clone()).token());
    let counted = async {
        let stream = js.get_stream(streams::HOLD).await?;
        let mut subjects = stream.info_with_subjects(subject.as_str()).await?;
        anyhow::Ok(subjects.try_next().await?.map_or(0, |(_, n)| n as u64))
    };
    counted.await.unwrap_or_else(|error| {
        tracing::warn!(%error, subject, "Cannot count a hold queue.");
        0
    })
}

/// Follows the bucket until `shutdown`: reads it whole, then takes in each change; when the watch
/// fails (the bucket is not there yet, the connection or the stream's leader went), it starts over,
/// keeping what it had until a new full read is in.
async fn follow(
    js: async_nats::jetstream::Context,
    known: Arc<RwLock<Known>>,
    ready: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut wait = Duration::from_millis(200);
    loop {
        let run = watch_once(&js, &known, &ready, &shutdown);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = run => outcome,
        };
        match outcome {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, "Following the held keys failed; starting over.");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

async fn watch_once(
    js: &async_nats::jetstream::Context,
    known: &RwLock<Known>,
    ready: &tokio::sync::watch::Sender<bool>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let kv = js.get_key_value(buckets::HOLDS).await?;
    let mut watch = kv.watch_with_history(">").await?;
    // A full read is in when the watch delivers an entry with nothing after it (`delta` 0), or at
    // once when the bucket holds nothing (the watch would deliver nothing until a change).
    let empty = js
        .get_stream(format!("KV_{}", buckets::HOLDS))
        .await?
        .info()
        .await?
        .state
        .messages
        == 0;
    let mut fresh: Option<Known> = Some(Known::default());
    let swap = |fresh: &mut Option<Known>| {
        if let Some(mut full) = fresh.take() {
            full.ready = true;
            *known.write().unwrap_or_else(|p| p.into_inner()) = full;
            ready.send_replace(true);
        }
    };
    if empty {
        swap(&mut fresh);
    }
    loop {
        let entry = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = watch.try_next() => next?,
        };
        let Some(entry) = entry else {
            anyhow::bail!("the watch of {} ended", buckets::HOLDS);
        };
        let hold = match entry.operation {
            async_nats::jetstream::kv::Operation::Put => {
                match serde_json::from_slice::<Hold>(&entry.value) {
                    Ok(hold) if hold.state != HoldState::Resolved => Some(hold),
                    Ok(_) => None,
                    Err(_) => {
                        tracing::warn!(key = entry.key, "A hold entry that is not one; skipped.");
                        None
                    }
                }
            }
            _ => None,
        };
        match &mut fresh {
            Some(building) => {
                building.set(&entry.key, hold);
                if entry.delta == 0 {
                    swap(&mut fresh);
                }
            }
            None => known
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .set(&entry.key, hold),
        }
    }
}

/// The hold of `key` of `service`, if it is held: read from the bucket, not the cache (an action
/// is taken on what the sidecars have now).
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

/// Messages in every hold queue (delivered ones of a release may count until they are purged).
pub async fn held_messages(js: &async_nats::jetstream::Context) -> anyhow::Result<u64> {
    Ok(js
        .get_stream(streams::HOLD)
        .await?
        .info()
        .await?
        .state
        .messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(service: &str, key: &str, since: &str) -> Hold {
        Hold {
            service: service.into(),
            binding: service.into(),
            partition: 0,
            key: key.into(),
            head: format!("X:{key}"),
            state: HoldState::Held,
            since: since.into(),
            resolved: Vec::new(),
        }
    }

    #[test]
    fn a_changed_hold_moves_in_the_order_and_a_resolved_one_leaves_it() {
        let mut known = Known::default();
        let entry = |h: &Hold| subjects::hold_entry(&h.service, &MessageKey(h.key.clone()).token());
        let a = hold("s", "a", "2026-12-01T00:00:02Z");
        let b = hold("s", "b", "2026-12-01T00:00:01Z");
        known.set(&entry(&a), Some(a.clone()));
        known.set(&entry(&b), Some(b.clone()));
        let keys: Vec<&str> = known.order.iter().map(|p| p.2.as_str()).collect();
        assert_eq!(keys, ["b", "a"]);
        // b held again later: it moves behind a, and its old place is gone.
        let b2 = hold("s", "b", "2026-12-01T00:00:03Z");
        known.set(&entry(&b2), Some(b2.clone()));
        let keys: Vec<&str> = known.order.iter().map(|p| p.2.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(known.holds.len(), 2);
        known.set(&entry(&a), None);
        assert_eq!(known.order.len(), 1);
        assert_eq!(known.holds.len(), 1);
        assert_eq!(known.by_place(&Known::place(&b2)), Some(&b2));
    }

    #[test]
    fn cursors_round_trip_and_made_up_ones_are_refused() {
        let place: Place = ("2026-12-01T00:00:02Z".into(), "s".into(), "k\n\"x".into());
        assert_eq!(decode_cursor(&encode_cursor(&place)).unwrap(), place);
        assert!(matches!(
            decode_cursor("not-a-cursor!"),
            Err(HoldsError::BadCursor(_))
        ));
        assert!(matches!(
            decode_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("[1]")),
            Err(HoldsError::BadCursor(_))
        ));
    }
}
