//! Holding a lease: renewing it every `ttl / 6` until it is lost or given up, and deleting it on
//! release.

use repair_rules::identity::buckets;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::value::{Stopped, describe};
use crate::common::backoff::{RETRY_MIN, back_off};

/// What the heartbeat keeps.
pub(crate) struct Held {
    pub(crate) kv: kv::Store,
    pub(crate) key: String,
    /// Our value, rewritten unchanged by every renewal.
    pub(crate) value: Bytes,
    /// The revision our last stored write produced.
    pub(crate) revision: u64,
    /// When that write was sent, or earlier (which only shortens the lease).
    pub(crate) sent: Instant,
    pub(crate) ttl: Duration,
}

impl Held {
    /// Until when this instance may consume: two thirds of the ttl after our last stored write was
    /// sent (no waiter takes over before a full ttl).
    pub(crate) fn valid_until(&self) -> Instant {
        self.sent + self.ttl * 2 / 3
    }

    /// When the next renewal is due.
    pub(crate) fn renew_at(&self) -> Instant {
        self.sent + self.ttl / 6
    }

    /// Whether `entry` is our value, so written by us.
    pub(crate) fn is_ours(&self, entry: &kv::Entry) -> bool {
        entry.operation == Operation::Put && entry.value == self.value
    }
}

/// How the heartbeat ended.
pub(crate) enum Ending {
    /// Asked to stop while it held the lease.
    Released(Held),
    /// Another instance wrote the entry: it is not ours to delete.
    Taken,
    /// Renewals failed until the lease ran out; the entry may still be ours.
    Expired(Held),
}

/// What a renewal found.
pub(crate) enum Renewal {
    Renewed,
    Stopped,
    Taken(String),
    Expired,
}

/// Renews the lease every `ttl / 6` until it is lost or `stop` is cancelled.
pub(crate) async fn heartbeat(
    mut held: Held,
    lost: CancellationToken,
    stop: CancellationToken,
) -> Ending {
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(held.renew_at()) => {}
            _ = stop.cancelled() => return Ending::Released(held),
        }
        match renew(&mut held, &stop).await {
            Renewal::Renewed => {}
            Renewal::Stopped => return Ending::Released(held),
            Renewal::Taken(by) => {
                lost.cancel();
                tracing::warn!(by, "Lease lost: another instance took it; stopping.");
                return Ending::Taken;
            }
            Renewal::Expired => {
                lost.cancel();
                tracing::error!("Lease lost: renewals failed until it ran out; stopping.");
                return Ending::Expired(held);
            }
        }
    }
}

/// One renewal: rewrites our value on our revision, retrying until it is stored, the entry turns
/// out not to be ours, the lease runs out, or `stop` is cancelled.
pub(crate) async fn renew(held: &mut Held, stop: &CancellationToken) -> Renewal {
    let first = Instant::now();
    let tries = async {
        let mut pause = RETRY_MIN;
        loop {
            let at = Instant::now();
            match held
                .kv
                .update(held.key.as_str(), held.value.clone(), held.revision)
                .await
            {
                // Every try is on the same revision, so the one answered is the one stored.
                Ok(revision) => return Tried::Stored(revision, at),
                Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                    match crate::common::nats::leader_entry(&held.kv, held.key.as_str()).await {
                        // An earlier try was stored and its answer lost; which one is unknown, so
                        // take the earliest send time.
                        Ok(Some(entry))
                            if held.is_ours(&entry) && entry.revision > held.revision =>
                        {
                            return Tried::Stored(entry.revision, first);
                        }
                        // A direct get may be answered by a lagging replica: the revision we know
                        // is not news, so ask again.
                        Ok(Some(entry)) if entry.revision <= held.revision => {
                            tracing::debug!(
                                revision = entry.revision,
                                "Stale lease entry read; retrying."
                            );
                        }
                        Ok(entry) => return Tried::Taken(describe(entry.as_ref())),
                        Err(error) => {
                            tracing::warn!(%error, "Lease entry unreadable; retrying.");
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "Lease not renewed; retrying."),
            }
            if back_off(stop, &mut pause).await.is_err() {
                return Tried::Stopped;
            }
        }
    };
    let outcome = tokio::select! {
        outcome = tokio::time::timeout_at(held.valid_until(), tries) => outcome,
        _ = stop.cancelled() => return Renewal::Stopped,
    };
    match outcome {
        Ok(Tried::Stored(revision, at)) => {
            held.revision = revision;
            held.sent = at;
            Renewal::Renewed
        }
        Ok(Tried::Taken(by)) => Renewal::Taken(by),
        Ok(Tried::Stopped) => Renewal::Stopped,
        Err(_elapsed) => Renewal::Expired,
    }
}

/// How the tries of one renewal ended (before the lease ran out).
pub(crate) enum Tried {
    Stored(u64, Instant),
    Taken(String),
    Stopped,
}

/// Deletes our entry with a compare-and-set, retrying until a waiter could take over anyway.
pub(crate) async fn delete(held: Held) {
    let key = held.key.as_str();
    let mut revision = held.revision;
    // Nothing cancels these pauses: the deadline below bounds them.
    let never = CancellationToken::new();
    let deleting = async {
        let mut pause = RETRY_MIN;
        loop {
            match held.kv.delete_expect_revision(key, Some(revision)).await {
                Ok(()) => return,
                Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                    match crate::common::nats::leader_entry(&held.kv, key).await {
                        // A renewal still in flight when the heartbeat stopped was stored.
                        Ok(Some(entry)) if held.is_ours(&entry) && entry.revision > revision => {
                            revision = entry.revision;
                            continue;
                        }
                        // Read from a lagging replica: ask again.
                        Ok(Some(entry)) if entry.revision <= revision => {}
                        // Deleted by an earlier try, or not ours any more.
                        Ok(_) => return,
                        Err(error) => {
                            tracing::warn!(
                                %error,
                                lease = key,
                                "Lease entry unreadable; retrying."
                            );
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, lease = key, "Lease not released; retrying."),
            }
            let _ = back_off(&never, &mut pause).await;
        }
    };
    match tokio::time::timeout_at(held.sent + held.ttl, deleting).await {
        Ok(()) => tracing::info!(lease = key, "Lease released."),
        Err(_) => tracing::warn!(lease = key, "Lease not released; it expires by itself."),
    }
}

/// Opens the bucket, retrying while NATS is unreachable.
pub(crate) async fn open(
    js: &Context,
    key: &str,
    shutdown: &CancellationToken,
) -> Result<kv::Store, Stopped> {
    let mut pause = RETRY_MIN;
    loop {
        let opened = tokio::select! {
            opened = js.get_key_value(buckets::LEASES) => opened,
            _ = shutdown.cancelled() => return Err(Stopped),
        };
        match opened {
            Ok(kv) => return Ok(kv),
            Err(error) => {
                tracing::warn!(
                    %error,
                    lease = key,
                    bucket = buckets::LEASES,
                    "Lease bucket unavailable; retrying."
                )
            }
        }
        back_off(shutdown, &mut pause).await.map_err(|_| Stopped)?;
    }
}
