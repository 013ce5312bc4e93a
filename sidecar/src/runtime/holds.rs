//! The holds of one binding (SPEC §2, §7): entries in the KV bucket `mend_holds` and hold queues on
//! MEND_HOLD. What to do is decided by `repair_rules::holds`; this module does it.
//!
//! One sidecar owns a binding's holds (its lease), so the entries are cached in memory after one load
//! at start, and every write is a compare-and-set on the revision last seen. A write that finds another
//! revision means another instance wrote: it is reported as a conflict, never overwritten. Writes are
//! retried, across reconnects and server restarts, until they are stored or the sidecar stops; a
//! retried write whose first attempt was stored is recognised as done.
//!
//! The dispatcher runs the work of one key at a time (its lane), so two operations on one key never
//! overlap; operations on different keys do. The cache sits behind a lock that is never held across
//! I/O.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::context::Context;
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use bytes::Bytes;
use futures::StreamExt;
use repair_rules::MessageKey;
use repair_rules::holds::{Change, Hold, HoldState};
use repair_rules::identity::subjects;
use tokio_util::sync::CancellationToken;

use crate::common::publish::{self, NotStored, Published};
use crate::common::subject_counts;
use repair_rules::identity::{buckets, streams};

/// Why a hold operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("stopping before the hold was stored")]
    Stopped,
    /// Another instance changed the entry: this one no longer owns the key.
    #[error("the hold of key `{key}` was changed by another instance")]
    Conflict { key: String },
    /// The entry or a held message cannot be stored at all (for example larger than the server's
    /// max_payload).
    #[error("the hold of key `{key}` cannot be stored: {message}")]
    Unstorable { key: String, message: String },
}

/// A hold as cached: without what every entry of the binding shares (its service and binding) or
/// what the map's key repeats (the key), rebuilt into a [`Hold`] when asked for. The repeats took
/// ~15 MiB at 100k held keys.
struct Cached {
    partition: u32,
    /// Left by an earlier run held with messages waiting: still to look for its head's retry in
    /// its queue (see [`Holds::take_looks`]).
    look: bool,
    head: String,
    state: HoldState,
    since: String,
    resolved: Vec<String>,
    revision: u64,
    /// When this revision was written.
    written: SystemTime,
}

impl Cached {
    fn new(hold: Hold, revision: u64, written: SystemTime) -> Self {
        Self {
            partition: hold.partition,
            look: false,
            head: hold.head,
            state: hold.state,
            since: hold.since,
            resolved: hold.resolved,
            revision,
            written,
        }
    }

    fn hold(&self, service: &str, binding: &str, key: &MessageKey) -> Hold {
        Hold {
            service: service.to_owned(),
            binding: binding.to_owned(),
            partition: self.partition,
            key: key.0.clone(),
            head: self.head.clone(),
            state: self.state,
            since: self.since.clone(),
            resolved: self.resolved.clone(),
        }
    }

    fn is_held(&self) -> bool {
        self.state != HoldState::Resolved
    }
}

/// What is cached of a binding's holds.
#[derive(Default)]
struct State {
    entries: HashMap<MessageKey, Cached>,
    /// Messages in each key's hold queue (loaded at start, then counted).
    queued: HashMap<MessageKey, u64>,
    /// Per key being released, the stream sequence its queue is known to start at (everything
    /// before it was removed): looking up a subject's first message after many deletions makes the
    /// server scan past them, looking up the next from a sequence does not.
    start: HashMap<MessageKey, u64>,
    /// Per key being released, its next message, read while the previous one was being removed.
    /// Only a message is kept, never "empty": a message appended after the read would be missed.
    next: HashMap<MessageKey, StreamMessage>,
    /// Per key being released, messages done with since the last purge.
    done: HashMap<MessageKey, u64>,
    /// Every look left by the load has been taken: [`Holds::take_looks`] walks the entries no more
    /// (it is asked each time the dispatcher has room for a look).
    looked: bool,
}

impl State {
    /// Caches what was written to the entry of `key`. A look still owed to the key stays owed: a
    /// change to the hold (a person's resubmission, say) does not take its head's retry out of the
    /// queue.
    fn cache(&mut self, key: &MessageKey, mut cached: Cached) {
        if let Some(old) = self.entries.get(key) {
            cached.look = old.look;
        }
        self.entries.insert(key.clone(), cached);
    }
}

/// A release purges the messages it is done with this many at a time.
pub const PURGE_EVERY: u64 = 64;

/// Hold entries read at once when a binding's holds are loaded.
const LOAD_READS: usize = 64;

/// The holds of one binding.
pub struct Holds {
    service: String,
    binding: String,
    partition: u32,
    js: Context,
    kv: kv::Store,
    queues: Stream,
    shutdown: CancellationToken,
    state: Mutex<State>,
}

/// Figures for the metrics of a binding's holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Keys held or releasing.
    pub keys: u64,
    /// Messages waiting in hold queues.
    pub messages: u64,
    /// When the oldest hold began.
    pub oldest: Option<SystemTime>,
}

impl Holds {
    /// Loads the entries of a binding's partition from `mend_holds` (other partitions' keys belong to
    /// other instances).
    pub async fn load(
        js: &Context,
        service: &str,
        binding: &str,
        partition: u32,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let kv = js.get_key_value(buckets::HOLDS).await?;
        let queues = js.get_stream(streams::HOLD).await?;
        // The entries' names from the bucket stream's subjects: stream info is answered by the
        // leader, while listing keys through a consumer may be served by a lagging replica.
        let names = subject_counts::read(
            js,
            &kv.stream.cached_info().config.name,
            &format!("{}{service}.>", kv.prefix),
        )
        .await?;
        // Sized once: grown by doubling, the map's last growth held both tables at once.
        let mut entries = HashMap::with_capacity(names.len());
        // Read from the leader, LOAD_READS at a time (one by one, 100k entries took 13 s). Each
        // name is made when its read starts, so no list of every name is kept.
        let kv_prefix = kv.prefix.as_str();
        let named = (0..names.len()).filter_map(|i| {
            let (subject, _) = names.get(i)?;
            subject.strip_prefix(kv_prefix).map(str::to_owned)
        });
        let mut read = futures::stream::iter(named)
            .map(|name| {
                let kv = &kv;
                async move {
                    let entry = crate::common::nats::leader_entry(kv, name.as_str()).await;
                    (name, entry)
                }
            })
            .buffer_unordered(LOAD_READS);
        while let Some((name, entry)) = read.next().await {
            let Some(entry) = entry? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let mut hold: Hold = match serde_json::from_slice(&entry.value) {
                Ok(hold) => hold,
                Err(error) => {
                    tracing::error!(%error, entry = name, "Unreadable hold entry; left alone.");
                    continue;
                }
            };
            if hold.binding != binding || hold.partition != partition {
                continue;
            }
            let key = MessageKey(std::mem::take(&mut hold.key));
            entries.insert(
                key,
                Cached::new(hold, entry.revision, SystemTime::from(entry.created)),
            );
        }
        drop(read);
        drop(names);
        if entries.capacity() > 2 * entries.len() {
            // Most entries were other partitions' or bindings'.
            entries.shrink_to_fit();
        }
        // How many messages each key's queue holds, from the stream's per-subject counts. A
        // spelled-out token gives its key back; a long key's token is a digest, so only those are
        // mapped back through the entries (a map of every token cost ~8 MiB at 100k held keys).
        let digests: HashMap<String, MessageKey> = entries
            .keys()
            .filter(|k| k.0.len() > repair_rules::identity::MAX_SPELLED_KEY_BYTES)
            .map(|k| (k.token(), k.clone()))
            .collect();
        let mut queued = HashMap::with_capacity(entries.len());
        let prefix = subjects::hold(service, "");
        let counts = subject_counts::read(js, streams::HOLD, &format!("{prefix}>")).await?;
        for (subject, count) in counts.iter() {
            let Some(token) = subject.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let key = match MessageKey::from_token(token) {
                Some(key) => Some(key),
                None => digests.get(token).cloned(),
            };
            let Some(key) = key else { continue };
            if let Some(cached) = entries.get_mut(&key) {
                cached.look = cached.state == HoldState::Held && count > 0;
                queued.insert(key, count);
            }
        }
        Ok(Self {
            service: service.to_owned(),
            binding: binding.to_owned(),
            partition,
            js: js.clone(),
            kv,
            queues,
            shutdown: shutdown.clone(),
            state: Mutex::new(State {
                entries,
                queued,
                start: HashMap::new(),
                next: HashMap::new(),
                done: HashMap::new(),
                looked: false,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The key whose token is `token`, if it has an entry (long keys' tokens are digests).
    pub fn key_of_token(&self, token: &str) -> Option<MessageKey> {
        self.state()
            .entries
            .keys()
            .find(|k| k.token() == token)
            .cloned()
    }

    /// The entry of `key`, if it has one.
    pub fn get(&self, key: &MessageKey) -> Option<Hold> {
        self.state()
            .entries
            .get(key)
            .map(|c| c.hold(&self.service, &self.binding, key))
    }

    /// The keys whose entry is in `state`.
    pub fn keys_in(&self, state: HoldState) -> Vec<MessageKey> {
        self.state()
            .entries
            .iter()
            .filter(|(_, c)| c.state == state)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Up to `n` of the keys an earlier run left held with messages waiting, each given once: they
    /// look for their head's retry in their queue. Taken in batches rather than listed at start, so
    /// 100k such keys cost no list of 100k keys.
    pub fn take_looks(&self, n: usize) -> Vec<MessageKey> {
        let mut state = self.state();
        if state.looked {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (key, c) in state.entries.iter_mut() {
            if out.len() >= n {
                return out;
            }
            if std::mem::take(&mut c.look) && c.state == HoldState::Held {
                out.push(key.clone());
            }
        }
        // The walk reached the end: only the load sets a look, so none is left.
        state.looked = true;
        out
    }

    /// The queue of `key` was found empty: its count starts again from zero.
    pub fn emptied(&self, key: &MessageKey) {
        let mut state = self.state();
        state.queued.remove(key);
        state.start.remove(key);
        state.next.remove(key);
        state.done.remove(key);
    }

    /// Whether a release delivered or skipped messages of `key` that are not purged yet.
    pub fn unpurged(&self, key: &MessageKey) -> bool {
        self.state().done.get(key).is_some_and(|n| *n > 0)
    }

    /// Messages in the hold queue of `key`, as far as this instance counted: never fewer than there
    /// are (the count is read at load; a repeated append that JetStream found a duplicate counts
    /// too; only confirmed removals and purges take away), so zero means empty.
    pub fn queued(&self, key: &MessageKey) -> u64 {
        self.state().queued.get(key).copied().unwrap_or(0)
    }

    /// The held keys whose hold began more than `age` ago or has more than `count` messages
    /// waiting, with their entry and how many wait.
    pub fn over(&self, age: Duration, count: u64) -> Vec<(MessageKey, Hold, u64)> {
        let now = SystemTime::now();
        let state = self.state();
        state
            .entries
            .iter()
            .filter(|(_, c)| c.is_held())
            .filter_map(|(k, c)| {
                let queued = state.queued.get(k).copied().unwrap_or(0);
                let old = humantime::parse_rfc3339_weak(&c.since)
                    .ok()
                    .and_then(|since| now.duration_since(since).ok())
                    .is_some_and(|held| held > age);
                (old || queued > count)
                    .then(|| (k.clone(), c.hold(&self.service, &self.binding, k), queued))
            })
            .collect()
    }

    /// The figures for the metrics.
    pub fn stats(&self) -> Stats {
        let state = self.state();
        let held = state.entries.values().filter(|c| c.is_held());
        let mut stats = Stats::default();
        for c in held {
            stats.keys += 1;
            let since = humantime::parse_rfc3339_weak(&c.since).ok();
            stats.oldest = match (stats.oldest, since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        stats.messages = state.queued.values().sum();
        stats
    }

    /// A fresh entry for `key` (its head and state are set by the decision that creates it).
    pub fn fresh(&self, key: &MessageKey) -> Hold {
        Hold {
            service: self.service.clone(),
            binding: self.binding.clone(),
            partition: self.partition,
            key: key.0.clone(),
            head: String::new(),
            state: repair_rules::holds::HoldState::Held,
            // To the microsecond: it tells this hold's copies from an earlier hold's of the key.
            since: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            resolved: Vec::new(),
        }
    }

    /// Stores `change` to the entry of `key`.
    pub async fn apply(&self, key: &MessageKey, change: Change) -> Result<(), HoldError> {
        let (hold, expected) = match change {
            Change::Keep => return Ok(()),
            Change::Create(hold) => (hold, None),
            Change::Update(hold) => {
                let revision = self.state().entries.get(key).map(|c| c.revision);
                (hold, revision)
            }
        };
        let name = subjects::hold_entry(&self.service, &key.token());
        let value = Bytes::from(
            serde_json::to_vec(&hold).map_err(|e| HoldError::Unstorable {
                key: key.0.clone(),
                message: e.to_string(),
            })?,
        );
        let mut pause = crate::common::backoff::RETRY_MIN;
        loop {
            let written = match expected {
                None => self
                    .kv
                    .create(&name, value.clone())
                    .await
                    .map_err(|e| (e.kind() == CreateErrorKind::AlreadyExists, e.to_string())),
                Some(revision) => self
                    .kv
                    .update(&name, value.clone(), revision)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
            };
            match written {
                Ok(revision) => {
                    let written = SystemTime::now();
                    self.state()
                        .cache(key, Cached::new(hold, revision, written));
                    return Ok(());
                }
                Err((true, _)) => {
                    // Either an earlier try of this write was stored and its answer lost, or
                    // another instance wrote.
                    match crate::common::nats::leader_entry(&self.kv, name.as_str()).await {
                        Ok(Some(entry)) if entry.value == value => {
                            self.state().cache(
                                key,
                                Cached::new(hold, entry.revision, SystemTime::from(entry.created)),
                            );
                            return Ok(());
                        }
                        Ok(_) => {
                            return Err(HoldError::Conflict { key: key.0.clone() });
                        }
                        Err(error) => {
                            tracing::warn!(%error, entry = name, "Hold entry unreadable; retrying.");
                        }
                    }
                }
                Err((false, error)) => {
                    tracing::warn!(%error, entry = name, "Hold not stored; retrying.");
                }
            }
            self.pause(&mut pause).await?;
        }
    }

    /// The keys whose entries are resolved and were written more than `older_than` ago (JetStream's
    /// duplicate window: after it no stale copy of their lineages can slip through de-duplication).
    pub fn expired(&self, older_than: Duration) -> Vec<MessageKey> {
        let now = SystemTime::now();
        self.state()
            .entries
            .iter()
            .filter(|(_, c)| !c.is_held() && c.written + older_than <= now)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Forgets the entry of `key` if it is resolved and was written more than `older_than` ago. An
    /// entry changed meanwhile by another instance is left alone. Returns whether it was forgotten.
    pub async fn forget(&self, key: &MessageKey, older_than: Duration) -> bool {
        let revision = {
            let state = self.state();
            match state.entries.get(key) {
                Some(c) if !c.is_held() && c.written + older_than <= SystemTime::now() => {
                    c.revision
                }
                _ => return false,
            }
        };
        let name = subjects::hold_entry(&self.service, &key.token());
        match self.kv.purge_expect_revision(&name, Some(revision)).await {
            Ok(()) => {
                let mut state = self.state();
                state.entries.remove(key);
                state.start.remove(key);
                state.next.remove(key);
                state.done.remove(key);
                state.queued.remove(key);
                true
            }
            Err(error) => {
                tracing::debug!(%error, entry = name, "Resolved hold not forgotten; later.");
                false
            }
        }
    }

    /// Appends a message to the hold queue of `key`, de-duplicated by `msg_id`. A message too
    /// large for the queue has its payload kept as the object `by_reference`, if given.
    pub async fn append(
        &self,
        key: &MessageKey,
        msg_id: &str,
        headers: HeaderMap,
        payload: Bytes,
        by_reference: Option<&str>,
    ) -> Result<(), NotStored> {
        let subject = subjects::hold(&self.service, &key.token());
        let mut published = publish::durably(
            &self.js,
            &self.shutdown,
            &subject,
            msg_id,
            headers.clone(),
            payload.clone(),
        )
        .await?;
        if let (Published::TooLarge, Some(object)) = (&published, by_reference) {
            // At the server's max_payload already, the message has no room for a copy's headers:
            // its payload is kept as an object, and the copy names it.
            tracing::warn!(
                size = payload.len(),
                object,
                "Message too large for its hold queue; its payload is kept as an object."
            );
            crate::common::payloads::store(&self.js, &self.shutdown, object, &payload).await?;
            let mut headers = headers;
            headers.insert(repair_rules::headers::MEND_PAYLOAD_OBJECT, object);
            published = publish::durably(
                &self.js,
                &self.shutdown,
                &subject,
                msg_id,
                headers,
                Bytes::new(),
            )
            .await?;
        }
        match published {
            // Counted even as a duplicate: the first try may have been stored with its answer lost,
            // and a count too high only costs a look at the queue.
            Published::Stored { .. } => {
                *self.state().queued.entry(key.clone()).or_default() += 1;
                Ok(())
            }
            Published::TooLarge => Err(NotStored::Unpublishable),
        }
    }

    /// The first message left in the hold queue of `key`.
    pub async fn first(&self, key: &MessageKey) -> Result<Option<StreamMessage>, HoldError> {
        let start = {
            let mut state = self.state();
            if let Some(next) = state.next.remove(key) {
                return Ok(Some(next));
            }
            state.start.get(key).copied()
        };
        self.next(key, start).await
    }

    /// Whether the queue of `key` has a message at the release's read position, read once: the
    /// release's next [`Holds::first`] takes it without reading again.
    pub async fn has_first(&self, key: &MessageKey) -> Result<bool, HoldError> {
        let Some(msg) = self.first(key).await? else {
            return Ok(false);
        };
        self.state().next.insert(key.clone(), msg);
        Ok(true)
    }

    /// The first message of the hold queue of `key` at or after stream sequence `from`.
    pub async fn next(
        &self,
        key: &MessageKey,
        from: Option<u64>,
    ) -> Result<Option<StreamMessage>, HoldError> {
        let subject = subjects::hold(&self.service, &key.token());
        let mut pause = crate::common::backoff::RETRY_MIN;
        loop {
            // From the stream's leader: a replica that is behind could say "nothing more" while a
            // held message is stored, and the release would then purge it or resolve the key.
            let found = self
                .queues
                .get_first_raw_message_by_subject(subject.as_str(), from.unwrap_or(1).max(1))
                .await;
            match found {
                Ok(msg) => return Ok(Some(msg)),
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
                Err(error) => {
                    tracing::warn!(%error, subject, "Hold queue unreadable; retrying.");
                }
            }
            self.pause(&mut pause).await?;
        }
    }

    /// Reads the message of the hold queue of `key` after `seq` ahead of the release's next step
    /// (while the current one is being delivered).
    pub async fn prefetch(&self, key: &MessageKey, seq: u64) {
        {
            // Nothing counted after the one being delivered: nothing to read ahead (the next step
            // reads for itself: a copy appended late by an instance that lost the key is not
            // counted, so the count may not say "empty").
            let state = self.state();
            let queued = state.queued.get(key).copied().unwrap_or(0);
            let done = state.done.get(key).copied().unwrap_or(0);
            if queued <= done + 1 {
                return;
            }
        }
        let subject = subjects::hold(&self.service, &key.token());
        // One try: on failure, the next step reads it again.
        if let Ok(next) = self
            .queues
            .get_first_raw_message_by_subject(subject.as_str(), seq + 1)
            .await
        {
            self.state().next.insert(key.clone(), next);
        }
    }

    /// The release is done with the first message of the queue of `key`, at `seq` (delivered or
    /// skipped): the queue starts after it. The done messages are purged [`PURGE_EVERY`] at a time
    /// (a crash before that only delivers them again, in order, which at-least-once allows).
    pub async fn advance(&self, key: &MessageKey, seq: u64) -> Result<(), HoldError> {
        let due = {
            let mut state = self.state();
            let start = state.start.entry(key.clone()).or_insert(0);
            *start = (*start).max(seq + 1);
            if state.next.get(key).is_some_and(|m| m.sequence <= seq) {
                state.next.remove(key);
            }
            let done = state.done.entry(key.clone()).or_insert(0);
            *done += 1;
            *done >= PURGE_EVERY
        };
        if due {
            self.purge_through(key, seq).await?;
        }
        Ok(())
    }

    /// Removes every message of the queue of `key` up to and including `seq`.
    pub async fn purge_through(&self, key: &MessageKey, seq: u64) -> Result<(), HoldError> {
        let subject = subjects::hold(&self.service, &key.token());
        let mut pause = crate::common::backoff::RETRY_MIN;
        loop {
            match self
                .queues
                .purge()
                .filter(subject.as_str())
                .sequence(seq + 1)
                .await
            {
                Ok(purged) => {
                    let mut state = self.state();
                    if let Some(n) = state.queued.get_mut(key) {
                        *n = n.saturating_sub(purged.purged);
                    }
                    state.done.remove(key);
                    let start = state.start.entry(key.clone()).or_insert(0);
                    *start = (*start).max(seq + 1);
                    if state.next.get(key).is_some_and(|m| m.sequence <= seq) {
                        state.next.remove(key);
                    }
                    return Ok(());
                }
                Err(error) => tracing::warn!(%error, subject, "Hold queue not purged; retrying."),
            }
            self.pause(&mut pause).await?;
        }
    }

    /// Removes a delivered message from the hold queue of `key` (already gone counts as removed).
    pub async fn remove(&self, key: &MessageKey, seq: u64) -> Result<(), HoldError> {
        // Not erased: a secure erase overwrites the record on disk and costs milliseconds, and a
        // delivered message is no secret. async-nats's `delete_message` always erases.
        let subject = format!(
            "STREAM.MSG.DELETE.{}",
            self.queues.cached_info().config.name
        );
        let request = serde_json::json!({ "seq": seq, "no_erase": true });
        let mut pause = crate::common::backoff::RETRY_MIN;
        loop {
            let answer: Result<serde_json::Value, _> =
                self.js.request(subject.clone(), &request).await;
            match answer {
                Ok(v) if v["success"] == true => {
                    let mut state = self.state();
                    if let Some(n) = state.queued.get_mut(key) {
                        *n = n.saturating_sub(1);
                    }
                    if state.next.get(key).is_some_and(|m| m.sequence == seq) {
                        state.next.remove(key);
                    }
                    return Ok(());
                }
                // 10057: no message found (removed by an earlier try whose answer was lost).
                Ok(v) if v["error"]["err_code"] == 10057 => return Ok(()),
                Ok(v) => {
                    tracing::warn!(error = %v["error"], seq, "Held message not removed; retrying.")
                }
                Err(error) => tracing::warn!(%error, seq, "Held message not removed; retrying."),
            }
            self.pause(&mut pause).await?;
        }
    }

    /// The release of `key` found its queue empty after its read position: removes what the release
    /// is done with (everything before that position) and nothing after it. A purge of the whole
    /// subject would also take a message appended after the read, and the instance that sent this
    /// purge may have lost the key meanwhile (its publish held up on a stalled connection, stored
    /// once the connection moves again): the next owner's held messages would be gone. So every
    /// removal names the last sequence it may take.
    pub async fn purge_done(&self, key: &MessageKey) -> Result<(), HoldError> {
        let start = self.state().start.get(key).copied();
        if let Some(read) = start.and_then(|s| s.checked_sub(1)).filter(|s| *s > 0)
            && self.unpurged(key)
        {
            self.purge_through(key, read).await?;
        }
        self.emptied(key);
        Ok(())
    }

    async fn pause(&self, pause: &mut Duration) -> Result<(), HoldError> {
        crate::common::backoff::back_off(&self.shutdown, pause)
            .await
            .map_err(|_| HoldError::Stopped)
    }
}
