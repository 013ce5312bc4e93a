//! Holding queues at work (SPEC §7): a message of a held key goes to the key's hold queue; the
//! head's success, its discard or a release by hand starts a release that delivers the queue in
//! order, one message per step of the key's lane; a held message that fails becomes the new head.
//! The decisions are `repair_rules::holds`; the storage is [`crate::runtime::holds`]; the order of the steps,
//! and what a crash between two of them leaves, is written down in ARCHITECTURE.md.

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use repair_rules::headers as h;
use repair_rules::holds::{
    self as protocol, Change, Hold, HoldState, Origin, Outcome, ReleaseStep,
};
use repair_rules::{LineageId, MessageKey};
use serde_json::json;

use super::attempt::deliver;
use super::binding::BindingRuntime;
use super::hold::{begins_release, commit, resolved};
use super::settle::{Settle, StopBinding, settle_reply};
use super::work::{Delivery, Work, header, lineage_of, queued_with};
use crate::common::ack;
use crate::common::publish::{self};
use crate::runtime::holds::{HoldError, Holds};

/// Held messages a release delivers in one turn of its key's lane. A turn per message would make a
/// release wait for every other key with work between two of its messages; a bounded batch keeps
/// the key's own newer messages (waiting behind it in memory) and the other keys moving.
pub(crate) const RELEASE_BATCH: usize = 64;

/// One turn of the work on a key's hold: while releasing, the next held messages; while held, the
/// head's retry if one waits in the queue. Returns the next turn, if there is one.
pub(crate) async fn step(
    rt: &BindingRuntime,
    holds: &Holds,
    key: &MessageKey,
) -> Result<Option<Work>, StopBinding> {
    for _ in 0..RELEASE_BATCH {
        // Stopping, or the lease is lost: another instance may own the key from now on. The
        // release resumes wherever the key is consumed next (its entry says `releasing`).
        if rt.shutdown.is_cancelled() {
            return Ok(None);
        }
        let Some(next) = one_step(rt, holds, key).await? else {
            return Ok(None);
        };
        let releasing = holds
            .get(key)
            .is_some_and(|h| h.state == HoldState::Releasing);
        if !releasing || rt.shutdown.is_cancelled() {
            return Ok(Some(next));
        }
    }
    Ok(Some(Work::Release))
}

async fn one_step(
    rt: &BindingRuntime,
    holds: &Holds,
    key: &MessageKey,
) -> Result<Option<Work>, StopBinding> {
    let Some(hold) = holds.get(key) else {
        return Ok(None);
    };
    let result = match hold.state {
        HoldState::Resolved => Ok(None),
        HoldState::Held => head_retry(rt, holds, key, &hold).await,
        HoldState::Releasing => release_next(rt, holds, key, &hold).await,
    };
    let how = match result {
        Ok(next) => return Ok(next),
        Err(Stop::Hold(error)) => Settle::from(error),
        Err(Stop::Delivery(how)) => how,
    };
    match how {
        Settle::StopBinding => Err(StopBinding),
        Settle::Leave => {
            tracing::error!(
                "A held message could not be finished; its key's release resumes at the next start."
            );
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Why a release step stopped.
pub(crate) enum Stop {
    Hold(HoldError),
    Delivery(Settle),
}

impl From<HoldError> for Stop {
    fn from(e: HoldError) -> Self {
        Stop::Hold(e)
    }
}

impl From<Settle> for Stop {
    fn from(e: Settle) -> Self {
        Stop::Delivery(e)
    }
}

pub(crate) async fn release_next(
    rt: &BindingRuntime,
    holds: &Holds,
    key: &MessageKey,
    hold: &Hold,
) -> Result<Option<Work>, Stop> {
    let first = holds.first(key).await?;
    let found = first.as_ref().map(|m| (m.sequence, lineage_of(m)));
    let since = first
        .as_ref()
        .and_then(|m| header(&m.headers, h::MEND_HOLD_SINCE));
    let step = protocol::release_step(hold, found.as_ref().map(|(s, l)| (*s, l.as_str(), since)));
    match step {
        ReleaseStep::Finish => {
            // Nothing is left after the read position; what is before it goes now, and nothing
            // after it (see `Holds::purge_done`).
            holds.purge_done(key).await?;
            holds
                .apply(key, Change::Update(protocol::finished(hold)))
                .await?;
            rt.metrics.releases.increment(1);
            tracing::info!(
                head = hold.head,
                "Release finished; the key is no longer held."
            );
            released(rt, key, hold).await?;
            Ok(None)
        }
        ReleaseStep::Skip(seq) => {
            tracing::debug!(
                seq,
                "A resolved lineage's copy, or an earlier hold's, in the queue; skipped."
            );
            holds.advance(key, seq).await?;
            Ok(Some(Work::Release))
        }
        ReleaseStep::Deliver(seq) => {
            let Some(msg) = first else {
                return Ok(None);
            };
            let mut d = queued(rt, msg).await?;
            d.receive();
            let lineage = d.meta.lineage.to_string();
            let (outcome, ()) = tokio::join!(deliver(rt, &d, &lineage), holds.prefetch(key, seq));
            let outcome = outcome?;
            let change = protocol::after_release_delivery(hold, &lineage, outcome);
            holds.apply(key, change).await?;
            if outcome == Outcome::Unresolved {
                tracing::info!(
                    mend_id = lineage,
                    "A held message failed: it is the key's new head."
                );
                // The delivered messages before it and its own copy leave the queue now.
                holds.purge_through(key, seq).await?;
            } else {
                if d.meta.attempt > 1 {
                    // A repair or resubmission that had waited in the queue.
                    resolved(rt, &d, None).await?;
                }
                holds.advance(key, seq).await?;
                if let Some(object) = &d.payload_object {
                    crate::common::payloads::forget(&rt.js, object).await;
                }
            }
            Ok(Some(Work::Release))
        }
    }
}

/// While a key is held: a retry of its head that waits in its queue (it arrived before its lineage
/// became the head) is delivered as the head's retry; nothing else would deliver it.
pub(crate) async fn head_retry(
    rt: &BindingRuntime,
    holds: &Holds,
    key: &MessageKey,
    hold: &Hold,
) -> Result<Option<Work>, Stop> {
    let mut from = None;
    loop {
        let Some(msg) = holds.next(key, from).await? else {
            return Ok(None);
        };
        let seq = msg.sequence;
        let lineage = lineage_of(&msg);
        let attempt = header(&msg.headers, h::MEND_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        if !protocol::is_head_retry(hold, &lineage, attempt) {
            from = Some(seq + 1);
            continue;
        }
        tracing::info!(
            mend_id = lineage,
            attempt,
            "The head's retry waited in its own queue; delivering it."
        );
        let mut d = queued(rt, msg).await?;
        d.receive();
        let outcome = deliver(rt, &d, &d.meta.lineage.to_string()).await?;
        let change = protocol::after_delivery(Some(hold), Origin::Retry, &lineage, outcome, || {
            holds.fresh(key)
        });
        let releasing = commit(rt, holds, key, &d, outcome, change).await?;
        holds.remove(key, seq).await?;
        return Ok(releasing.then_some(Work::Release));
    }
}

/// Announces that a key's release is over.
pub(crate) async fn released(
    rt: &BindingRuntime,
    key: &MessageKey,
    hold: &Hold,
) -> Result<(), Settle> {
    let head = hold
        .head
        .parse::<LineageId>()
        .unwrap_or_else(|_| LineageId::new(rt.cfg.stream.clone(), 0));
    let event = publish::Event {
        service: &rt.service,
        source: format!("urn:mend:sidecar:{}:{}", rt.service, rt.cfg.name),
        kind: "released",
        lineage: &head,
        attempt: hold.resolved.len() as u32,
        data: json!({
            "binding": rt.cfg.name,
            "key": key.as_str(),
            "head": hold.head,
            "since": hold.since,
        }),
    };
    publish::announce(&rt.js, &rt.shutdown, event)
        .await
        .map_err(Settle::from)
}

/// Applies a command from the dashboard to the key's hold, then acks it.
pub(crate) async fn command(
    rt: &BindingRuntime,
    key: Option<&MessageKey>,
    command: protocol::Command,
    reply: &ack::Reply,
) -> Result<Option<Work>, StopBinding> {
    rt.metrics.commands.increment(1);
    let (how, then) = match (key, &rt.holds) {
        (Some(key), Some(holds)) => {
            let change =
                protocol::after_command(holds.get(key).as_ref(), &command, holds.fresh(key));
            let releasing = begins_release(&change);
            match holds.apply(key, change).await {
                Ok(()) => {
                    if releasing {
                        tracing::info!(
                            key = key.as_str(),
                            ?command,
                            "Releasing the key by command."
                        );
                    }
                    (Settle::Ack, releasing.then_some(Work::Release))
                }
                Err(error) => (Settle::from(error), None),
            }
        }
        _ => {
            tracing::warn!(binding = %rt.cfg.name, ?command, "A command for a binding without keys: nothing is held; acked.");
            (Settle::Ack, None)
        }
    };
    settle_reply(rt, reply, how).await?;
    Ok(then)
}

/// A message of a hold queue as a delivery; its lineage and attempt come from its headers, its
/// payload from the object its copy names, if it names one.
pub(crate) async fn queued(rt: &BindingRuntime, mut msg: StreamMessage) -> Result<Delivery, Stop> {
    let mut payload_object = None;
    if let Some(object) = header(&msg.headers, h::MEND_PAYLOAD_OBJECT) {
        let object = object.to_owned();
        match crate::common::payloads::load(&rt.js, &object).await {
            Ok(Some(bytes)) => msg.payload = bytes,
            Ok(None) => {
                tracing::error!(
                    object,
                    "The payload object of a held message is gone; the release waits for it."
                );
                return Err(Stop::Delivery(Settle::Leave));
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    object,
                    "Payload object not read yet."
                );
                return Err(Stop::Delivery(Settle::Leave));
            }
        }
        let mut headers = HeaderMap::new();
        for (name, values) in msg.headers.iter() {
            let name: &str = name.as_ref();
            if !name.eq_ignore_ascii_case(h::MEND_PAYLOAD_OBJECT) {
                for v in values {
                    headers.append(name, v.as_str());
                }
            }
        }
        msg.headers = headers;
        payload_object = Some(object);
    }
    Ok(queued_with(rt, msg, payload_object))
}
