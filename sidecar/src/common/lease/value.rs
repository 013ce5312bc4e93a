//! A lease's entry: its key, its value (owner, nonce, ttl) and how values are told apart; the
//! bounds of a ttl.

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::common::publish;

/// The shortest ttl: a shorter one is raised to it, because a renewal must be answered within half
/// the ttl.
pub const MIN_TTL: Duration = Duration::from_millis(500);

/// The longest ttl: a longer one is lowered to it (and so is a holder's ttl read from the bucket),
/// which keeps every deadline representable.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Stopping before the lease was acquired.
#[derive(Debug, thiserror::Error)]
#[error("stopping before the lease was acquired")]
pub struct Stopped;

/// The lease's value in the bucket. Read leniently: a missing field is empty, so a value written by
/// hand still names its owner in the logs.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Value {
    pub(crate) owner: String,
    /// Drawn per acquisition: makes the value ours alone.
    pub(crate) nonce: String,
    pub(crate) ttl_ms: u64,
    /// When it was acquired (RFC 3339), for people reading the bucket.
    pub(crate) acquired: String,
}

/// How many of a waiter's writes it remembers. Forgetting one is safe: if it was stored after all,
/// it looks like another holder's entry, which is taken over after the ttl.
pub(crate) const WRITES_REMEMBERED: usize = 16;

/// A waiter's recent writes (creates and takeovers), with when each was sent.
#[derive(Default)]
pub(crate) struct Writes(std::collections::VecDeque<(Bytes, Instant)>);

impl Writes {
    /// Remembers a write of an earlier acquisition, sent so long ago that it vouches for nothing:
    /// seeing it stored only says that nobody wrote since.
    pub(crate) fn earlier(&mut self, value: Bytes, ttl: Duration) {
        let now = Instant::now();
        self.0
            .push_back((value, now.checked_sub(ttl).unwrap_or(now)));
    }

    /// Notes that `value` is about to be sent; returns the send time.
    pub(crate) fn sending(&mut self, value: &Bytes) -> Instant {
        if self.0.len() == WRITES_REMEMBERED {
            self.0.pop_front();
        }
        let at = Instant::now();
        self.0.push_back((value.clone(), at));
        at
    }

    /// When `value` was sent, if it is one of ours (the earliest, if it was sent twice).
    pub(crate) fn sent(&self, value: &Bytes) -> Option<Instant> {
        self.0.iter().find(|(v, _)| v == value).map(|(_, at)| *at)
    }
}

/// The entry's key. Service and binding names are subject tokens (checked by `config`); any other
/// byte is written as `=XX`, which no token contains, so distinct names never share a key.
pub fn lease_key(service: &str, binding: &str, partition: u32) -> String {
    format!("{}.{}.{partition}", key_token(service), key_token(binding))
}

pub(crate) fn key_token(name: &str) -> String {
    if name.is_empty() {
        return "=".to_owned();
    }
    let mut token = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            token.push(char::from(b));
        } else {
            token.push_str(&format!("={b:02X}"));
        }
    }
    token
}

/// A nonce unique to this acquisition: a NUID, as the client draws for its inboxes.
pub(crate) fn nonce(js: &Context) -> String {
    let inbox = js.client().new_inbox();
    inbox.rsplit('.').next().unwrap_or(&inbox).to_owned()
}

pub(crate) fn encode(owner: &str, nonce: &str, ttl: Duration) -> Bytes {
    publish::to_bytes(&Value {
        owner: owner.to_owned(),
        nonce: nonce.to_owned(),
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        acquired: publish::now(),
    })
}

pub(crate) fn decode(value: &[u8]) -> Option<Value> {
    serde_json::from_slice(value).ok()
}

/// Who holds an entry, for logs.
pub(crate) fn describe(entry: Option<&kv::Entry>) -> String {
    match entry {
        Some(e) if e.operation == Operation::Put => {
            decode(&e.value).map_or_else(|| "(unreadable)".to_owned(), |v| v.owner)
        }
        _ => "(nobody: the entry was deleted)".to_owned(),
    }
}
