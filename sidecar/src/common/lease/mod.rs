//! Single-owner leases (SPEC §7): one sidecar at a time owns a (service, binding, partition). The
//! lease is an entry `<service>.<binding>.<partition>` in the KV bucket `mend_leases`, whose value
//! is JSON `{"owner", "nonce", "ttl_ms", "acquired"}`. A binding's dispatcher takes the lease with
//! [`Lease::acquire`] before it consumes, stops consuming at once when [`Lease::lost`] fires, and
//! hands the lease on with [`Lease::release`] when it stops gracefully.
//!
//! # Why it is safe without synchronised clocks
//! Nobody compares wall clocks across machines; every duration below is measured on the measuring
//! instance's own monotonic clock, and the entry's revision (a JetStream sequence, strictly
//! increasing) is the only thing instances compare.
//!
//! - **Holding.** The holder renews every `ttl / 6` by rewriting its own value with a
//!   compare-and-set on the revision it last wrote. Its lease is valid until `2 × ttl / 3` after
//!   the *send time* of the write that produced that revision (a write is stored after it is sent,
//!   so this never overestimates). A renewal may so take half the ttl (15 s with the default 30 s):
//!   longer than a JetStream leader election of the bucket, which takes seconds. When renewals
//!   keep failing (NATS unreachable) until then, or a renewal finds that the entry is no longer its
//!   value (another instance took it, or it was deleted), the lease is lost: [`Lease::lost`] fires
//!   and the heartbeat stops. Lease never re-acquires by itself; the caller may call
//!   [`Lease::acquire`] again, and hand it the lost lease ([`Lease::expired`]): if the entry still
//!   holds our last write, nobody took it meanwhile and it is taken back at once.
//! - **Waiting.** A waiter polls the entry every `ttl / 4`. An absent, deleted or purged entry is
//!   taken with `create`, which fails if someone else created it first. A live entry's revision is
//!   remembered with the instant it was first *read* (after the answer arrived, so after the
//!   revision was stored). Once that revision has stayed unchanged for the holder's ttl (from its
//!   value, or the waiter's own, whichever is larger), the waiter takes over with `update` on
//!   exactly that revision, which fails if the holder renewed meanwhile.
//! - **Together.** Say a takeover on revision `r` succeeds. Then `r` was still the last revision,
//!   so the old holder's last stored write was `r`, sent no later than the waiter first read it.
//!   The old holder stopped `2 × ttl / 3` after that send; the waiter starts a full ttl after its first
//!   read. Two instances never consume at once, with a margin of `ttl / 3` for the old holder to
//!   notice and stop (rate differences between monotonic clocks must stay well under 1.5×).
//! - **Lost answers.** A write whose answer was lost may still have been stored. The value carries
//!   a nonce drawn per acquisition, so reading the entry tells without doubt whether it is ours: a
//!   renewal that fails with a wrong last revision reads the entry, and the same value means the
//!   earlier try was stored (its send time, the earliest of the renewal's tries, is used); waiting
//!   recognises its own create or takeover the same way. A write still in flight after the lease
//!   was given up can only look like a renewal, which delays a waiter but never lets two consume.
//! - **Stale reads.** A direct get may be answered by a lagging replica. Every decision that
//!   matters is a compare-and-set on the leader; a read counts as news of our own write only when
//!   it shows a revision newer than the one we know.
//! - **Release** stops the heartbeat and deletes the entry with a compare-and-set on our revision,
//!   so a waiter creates it on its next poll. A dropped `Lease` (a crash, in effect) stops the
//!   heartbeat without deleting: the entry stays until a waiter takes over after the ttl.
//!
//! A ttl must be comfortably longer than a leader election: a renewal answered more than `ttl / 2`
//! after it was due loses the lease.

mod heartbeat;
mod value;

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::common::backoff::{RETRY_MIN, back_off};
use heartbeat::{Ending, Held, delete, heartbeat, open};
pub use value::{MAX_TTL, MIN_TTL, Stopped, lease_key};
use value::{Writes, decode, encode, nonce};

/// The lease of one (service, binding, partition), held by this instance until it is lost,
/// released or dropped. Dropping it stops the heartbeat without giving the entry up, like a crash.
pub struct Lease {
    key: String,
    lost: CancellationToken,
    /// Tells the heartbeat to stop and hand back what it holds.
    stop: CancellationToken,
    heartbeat: Option<JoinHandle<Ending>>,
}

/// A lease that ran out because its renewals were not answered in time (say, while its bucket's
/// stream elected a leader): handed to [`Lease::acquire_noting`], it lets this instance take the
/// lease back at once if the entry still holds its last write.
pub struct Reclaim {
    value: Bytes,
}

/// A live entry a waiter is watching.
struct Watched {
    revision: u64,
    /// When this revision was first read (after the answer arrived).
    since: Instant,
    /// The longer of the holder's ttl and ours.
    ttl: Duration,
    owner: String,
}

impl Lease {
    /// Waits until this instance owns the lease of (`service`, `binding`, `partition`), then keeps
    /// it alive with a heartbeat task (renewing every `ttl / 6`). `owner` names this instance for
    /// people (host and pid, say); a nonce drawn here makes the value unique. Returns `Stopped` if
    /// `shutdown` is cancelled first. Logs once, at info, that it waits and who holds the lease.
    pub async fn acquire(
        js: &Context,
        service: &str,
        binding: &str,
        partition: u32,
        owner: &str,
        ttl: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Lease, Stopped> {
        let mut ignore = |_: &str| {};
        Self::acquire_noting(
            js,
            service,
            binding,
            partition,
            owner,
            ttl,
            shutdown,
            &mut ignore,
            None,
        )
        .await
    }

    /// [`Lease::acquire`], telling `waiting` who holds the lease whenever a new holder is seen
    /// (for readiness probes and the like). `reclaim`: this instance's lease of the same key that
    /// ran out; if the entry still holds its last write, the lease is taken back with a
    /// compare-and-set on that revision instead of waiting a ttl.
    #[allow(clippy::too_many_arguments)]
    pub async fn acquire_noting(
        js: &Context,
        service: &str,
        binding: &str,
        partition: u32,
        owner: &str,
        ttl: Duration,
        shutdown: &CancellationToken,
        waiting: &mut (dyn FnMut(&str) + Send),
        reclaim: Option<Reclaim>,
    ) -> Result<Lease, Stopped> {
        let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        let key = lease_key(service, binding, partition);
        let kv = open(js, &key, shutdown).await?;
        let nonce = nonce(js);
        let poll = ttl / 4;
        // Our recent writes, with when each was sent: a stored one is recognised by its value.
        let mut writes = Writes::default();
        if let Some(reclaim) = reclaim {
            writes.earlier(reclaim.value, ttl);
        }
        let mut watched: Option<Watched> = None;
        let mut announced = false;
        let mut pause = RETRY_MIN;
        loop {
            let read = tokio::select! {
                read = crate::common::nats::leader_entry(&kv, key.as_str()) => read,
                _ = shutdown.cancelled() => return Err(Stopped),
            };
            let entry = match read {
                Ok(entry) => {
                    pause = RETRY_MIN;
                    entry.filter(|e| e.operation == Operation::Put)
                }
                Err(error) => {
                    tracing::warn!(%error, lease = key, "Lease entry unreadable; retrying.");
                    back_off(shutdown, &mut pause).await.map_err(|_| Stopped)?;
                    continue;
                }
            };
            let Some(entry) = entry else {
                // Free: absent, deleted or purged.
                watched = None;
                let value = encode(owner, &nonce, ttl);
                let at = writes.sending(&value);
                match kv.create(key.as_str(), value.clone()).await {
                    Ok(revision) => {
                        tracing::info!(lease = key, owner, "Lease acquired.");
                        return Ok(Lease::start(kv, key, value, revision, at, ttl));
                    }
                    Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {
                        // Someone else was first, or our own create was stored and its answer
                        // lost: the next read tells.
                        tracing::debug!(lease = key, "Lease created by another first.");
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, lease = key, "Lease not created; retrying.");
                        back_off(shutdown, &mut pause).await.map_err(|_| Stopped)?;
                        continue;
                    }
                }
            };
            if let Some(at) = writes.sent(&entry.value) {
                // One of our writes was stored and its answer lost. Its send time vouches for the
                // lease only until it is due for renewal; past that, renew before consuming.
                if Instant::now() < at + ttl / 6 {
                    tracing::info!(lease = key, owner, "Lease acquired.");
                    return Ok(Lease::start(kv, key, entry.value, entry.revision, at, ttl));
                }
                let at = Instant::now();
                match kv
                    .update(key.as_str(), entry.value.clone(), entry.revision)
                    .await
                {
                    Ok(revision) => {
                        tracing::info!(lease = key, owner, "Lease acquired.");
                        return Ok(Lease::start(kv, key, entry.value, revision, at, ttl));
                    }
                    // Taken meanwhile, or this write too was stored unanswered: read again.
                    Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => continue,
                    Err(error) => {
                        tracing::warn!(%error, lease = key, "Lease not renewed; retrying.");
                        back_off(shutdown, &mut pause).await.map_err(|_| Stopped)?;
                        continue;
                    }
                }
            }
            if watched.as_ref().map(|w| w.revision) != Some(entry.revision) {
                let holder = decode(&entry.value);
                let holder_ttl = holder
                    .as_ref()
                    .map_or(ttl, |h| Duration::from_millis(h.ttl_ms).min(MAX_TTL));
                let holder = holder.map_or_else(|| "(unreadable)".to_owned(), |h| h.owner);
                if !announced {
                    tracing::info!(lease = key, holder, "Waiting for the lease.");
                    announced = true;
                } else if watched.as_ref().is_none_or(|w| w.owner != holder) {
                    tracing::debug!(lease = key, holder, "The lease has a new holder.");
                }
                waiting(&holder);
                watched = Some(Watched {
                    revision: entry.revision,
                    since: Instant::now(),
                    ttl: holder_ttl.max(ttl),
                    owner: holder,
                });
            }
            if let Some(w) = watched.as_ref().filter(|w| w.since.elapsed() >= w.ttl) {
                let value = encode(owner, &nonce, ttl);
                let at = writes.sending(&value);
                match kv.update(key.as_str(), value.clone(), w.revision).await {
                    Ok(revision) => {
                        tracing::info!(
                            lease = key,
                            owner,
                            from = w.owner,
                            "Lease taken over: its holder stopped renewing."
                        );
                        return Ok(Lease::start(kv, key, value, revision, at, ttl));
                    }
                    Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                        // Renewed or taken meanwhile (or our own try was stored): read again.
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, lease = key, "Lease not taken over; retrying.");
                        back_off(shutdown, &mut pause).await.map_err(|_| Stopped)?;
                        continue;
                    }
                }
            }
            let next = match &watched {
                Some(w) => (w.since + w.ttl).min(Instant::now() + poll),
                None => Instant::now() + poll,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = shutdown.cancelled() => return Err(Stopped),
            }
        }
    }

    /// After the lease was lost: what lets [`Lease::acquire_noting`] take it back at once, if it
    /// ran out (renewals unanswered) rather than being taken or given up.
    pub async fn expired(mut self) -> Option<Reclaim> {
        let heartbeat = self.heartbeat.take()?;
        match heartbeat.await {
            Ok(Ending::Expired(held)) => Some(Reclaim { value: held.value }),
            Ok(Ending::Released(_) | Ending::Taken) | Err(_) => None,
        }
    }

    /// Cancelled when the lease is lost (another instance took it, or renewals failed long enough
    /// that another could take it); also by [`Lease::release`] and by dropping the lease, since it
    /// means "no longer held". The holder must stop consuming at once when it fires.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Gives the lease up on graceful shutdown: stops the heartbeat, then deletes the entry with a
    /// compare-and-set on our revision so a waiting instance takes over at once. If NATS cannot be
    /// reached, it stops trying when a waiter could take over anyway.
    pub async fn release(mut self) {
        self.lost.cancel();
        self.stop.cancel();
        let Some(heartbeat) = self.heartbeat.take() else {
            return;
        };
        let held = match heartbeat.await {
            Ok(Ending::Released(held) | Ending::Expired(held)) => held,
            Ok(Ending::Taken) => return,
            Err(error) => {
                tracing::error!(
                    %error,
                    lease = self.key,
                    "Lease heartbeat failed; the lease expires by itself."
                );
                return;
            }
        };
        delete(held).await;
    }

    /// Starts the heartbeat of a lease just acquired with the write of `revision`, sent at `sent`.
    fn start(
        kv: kv::Store,
        key: String,
        value: Bytes,
        revision: u64,
        sent: Instant,
        ttl: Duration,
    ) -> Lease {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let held = Held {
            kv,
            key: key.clone(),
            value,
            revision,
            sent,
            ttl,
        };
        let span = tracing::info_span!("lease", lease = key);
        let heartbeat = tokio::spawn(heartbeat(held, lost.clone(), stop.clone()).instrument(span));
        Lease {
            key,
            lost,
            stop,
            heartbeat: Some(heartbeat),
        }
    }
}

impl Drop for Lease {
    /// Stops the heartbeat without deleting the entry (a waiter takes over after the ttl).
    fn drop(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        self.lost.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_tokens_and_never_collide() {
        assert_eq!(lease_key("orders", "orders-v2", 3), "orders.orders-v2.3");
        assert_eq!(lease_key("a.b", "c", 0), "a=2Eb.c.0");
        assert_ne!(lease_key("a.b", "c", 0), lease_key("a", "b.c", 0));
        assert_eq!(lease_key("", "x", 1), "=.x.1");
    }
}
