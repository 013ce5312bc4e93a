//! Holding queues at work (SPEC §7): a message of a held key goes to the key's hold queue; the
//! head's success, its discard or a release by hand starts a release that delivers the queue in
//! order, one message per step of the key's lane; a held message that fails becomes the new head.
//! The decisions are `repair_rules::holds`; the storage is [`crate::holds`]; the order of the steps,
//! and what a crash between two of them leaves, is written down in ARCHITECTURE.md.

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use base64::Engine as _;
use repair_rules::headers as h;
use repair_rules::holds::{
    self as protocol, Change, Hold, HoldState, Origin, Outcome, ReleaseStep,
};
use repair_rules::{LineageId, MessageKey};
use serde_json::json;

use crate::ack;
use crate::consume::{self, BindingRuntime, Delivery, Settle, Source, Work};
use crate::delegate;
use crate::holds::{HoldError, Holds};
use crate::processor::MEND_HISTORY;
use crate::publish;

/// Appends a message of a held key to the key's hold queue; the first to wait behind a head is
/// announced `held` (with the head; `released` gives the count at the end). The caller acks it.
pub(crate) async fn hold_back(
    rt: &BindingRuntime,
    holds: &Holds,
    key: &MessageKey,
    d: &Delivery,
    hold: Option<&Hold>,
) -> Settle {
    let msg_id = d.meta.lineage.msg_id(d.meta.attempt, "held");
    let object = crate::payloads::object_name(&d.meta.lineage, d.meta.attempt, "held");
    let first = holds.queued(key) == 0;
    let announce = async {
        if !first {
            return Ok(());
        }
        let data = json!({ "head": hold.map(|h| h.head.as_str()) });
        delegate::announce(rt, "held", d, data).await
    };
    // Both stored before the ack; at once, as neither depends on the other. (Should the append
    // fail, the message is not acked and comes back; the repeated announcement is a duplicate.)
    let (appended, announced) = tokio::join!(
        holds.append(
            key,
            &msg_id,
            held_headers(d),
            d.payload.clone(),
            Some(&object),
        ),
        announce,
    );
    if let Err(error) = appended {
        if matches!(error, publish::NotStored::Unpublishable) {
            tracing::error!(
                size = d.payload.len(),
                "The message does not fit in the hold queue; it stays unacked."
            );
        }
        return error.into();
    }
    tracing::debug!("Key held: message appended to its hold queue.");
    match announced {
        // Its copy is stored under a de-duplicating id: a lost ack only brings a redelivery.
        Ok(()) => Settle::AckPlain,
        Err(error) => error.into(),
    }
}

/// Stores what a delivery did to its key's hold, and announces `resolved` for a retry that
/// succeeded or a head whose release begins. Returns whether a release begins.
pub(crate) async fn commit(
    rt: &BindingRuntime,
    holds: &Holds,
    key: &MessageKey,
    d: &Delivery,
    outcome: Outcome,
    change: Change,
) -> Result<bool, Settle> {
    let (change, releasing) = at_once_if_empty(rt, holds, key, change)
        .await
        .map_err(|e| Settle::from_hold(rt, e))?;
    holds
        .apply(key, change)
        .await
        .map_err(|e| Settle::from_hold(rt, e))?;
    if releasing {
        tracing::info!(
            held = holds.queued(key),
            "Head resolved; releasing the key's held messages."
        );
    }
    if releasing || (d.is_retry() && outcome == Outcome::Done) {
        resolved(rt, d, Some(holds.queued(key))).await?;
    }
    Ok(releasing)
}

/// Announces that the lineage of `d` is resolved (a retry went through, or a head was released).
pub(crate) async fn resolved(
    rt: &BindingRuntime,
    d: &Delivery,
    held: Option<u64>,
) -> Result<(), Settle> {
    delegate::announce(rt, "resolved", d, json!({ "held": held }))
        .await
        .map_err(Settle::from)
}

fn begins_release(change: &Change) -> bool {
    matches!(change, Change::Create(h) | Change::Update(h) if h.state == HoldState::Releasing)
}

/// A release of an empty queue in one write: the entry goes straight to resolved (the release's
/// first step would find the queue empty and do just that). Returns the change to store and whether
/// a release begins.
async fn at_once_if_empty(
    rt: &BindingRuntime,
    holds: &Holds,
    key: &MessageKey,
    change: Change,
) -> Result<(Change, bool), HoldError> {
    if !begins_release(&change) {
        return Ok((change, false));
    }
    // The count never falls short of the queue (see `Holds::queued`), so zero means empty; any
    // other count is checked.
    let empty =
        !holds.unpurged(key) && (holds.queued(key) == 0 || holds.first(key).await?.is_none());
    if !empty {
        return Ok((change, true));
    }
    holds.emptied(key);
    rt.metrics.releases.increment(1);
    let change = match change {
        Change::Create(h) => Change::Create(protocol::finished(&h)),
        Change::Update(h) => Change::Update(protocol::finished(&h)),
        Change::Keep => Change::Keep,
    };
    Ok((change, false))
}

/// Held messages a release delivers in one turn of its key's lane. A turn per message would make a
/// release wait for every other key with work between two of its messages; a bounded batch keeps
/// the key's own newer messages (waiting behind it in memory) and the other keys moving.
const RELEASE_BATCH: usize = 64;

/// One turn of the work on a key's hold: while releasing, the next held messages; while held, the
/// head's retry if one waits in the queue. Returns the next turn, if there is one.
pub(crate) async fn step(rt: &BindingRuntime, holds: &Holds, key: &MessageKey) -> Option<Work> {
    for _ in 0..RELEASE_BATCH {
        // Stopping, or the lease is lost: another instance may own the key from now on. The
        // release resumes wherever the key is consumed next (its entry says `releasing`).
        if rt.shutdown.is_cancelled() {
            return None;
        }
        let next = one_step(rt, holds, key).await?;
        let releasing = holds
            .get(key)
            .is_some_and(|h| h.state == HoldState::Releasing);
        if !releasing || rt.shutdown.is_cancelled() {
            return Some(next);
        }
    }
    Some(Work::Release)
}

async fn one_step(rt: &BindingRuntime, holds: &Holds, key: &MessageKey) -> Option<Work> {
    let hold = holds.get(key)?;
    let result = match hold.state {
        HoldState::Resolved => Ok(None),
        HoldState::Held => head_retry(rt, holds, key, &hold).await,
        HoldState::Releasing => release_next(rt, holds, key, &hold).await,
    };
    match result {
        Ok(next) => next,
        Err(Stop::Hold(error)) => {
            Settle::from_hold(rt, error);
            None
        }
        Err(Stop::Delivery(how)) => {
            if how == Settle::Leave {
                tracing::error!(
                    "A held message could not be finished; its key's release resumes at the next start."
                );
            }
            None
        }
    }
}

/// Why a release step stopped.
enum Stop {
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

async fn release_next(
    rt: &BindingRuntime,
    holds: &Holds,
    key: &MessageKey,
    hold: &Hold,
) -> Result<Option<Work>, Stop> {
    let first = holds.first(key).await?;
    let found = first.as_ref().map(|m| (m.sequence, lineage_of(m)));
    match protocol::release_step(hold, found.as_ref().map(|(s, l)| (*s, l.as_str()))) {
        ReleaseStep::Finish => {
            // Nothing is left after the read position; what is before it goes now.
            if holds.unpurged(key) {
                holds.purge(key).await?;
            } else {
                holds.emptied(key);
            }
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
            tracing::debug!(seq, "A resolved lineage's copy in the queue; skipped.");
            holds.advance(key, seq).await?;
            Ok(Some(Work::Release))
        }
        ReleaseStep::Deliver(seq) => {
            let Some(msg) = first else {
                return Ok(None);
            };
            let d = queued(rt, msg).await?;
            let lineage = d.meta.lineage.to_string();
            let (outcome, ()) = tokio::join!(consume::deliver(rt, &d), holds.prefetch(key, seq));
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
                    crate::payloads::forget(&rt.js, object).await;
                }
            }
            Ok(Some(Work::Release))
        }
    }
}

/// While a key is held: a retry of its head that waits in its queue (it arrived before its lineage
/// became the head) is delivered as the head's retry; nothing else would deliver it.
async fn head_retry(
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
        let d = queued(rt, msg).await?;
        let outcome = consume::deliver(rt, &d).await?;
        let change = protocol::after_delivery(
            Some(hold),
            Origin::Retry,
            &lineage,
            outcome,
            holds.fresh(key),
        );
        let releasing = commit(rt, holds, key, &d, outcome, change).await?;
        holds.remove(key, seq).await?;
        return Ok(releasing.then_some(Work::Release));
    }
}

/// Announces that a key's release is over.
async fn released(rt: &BindingRuntime, key: &MessageKey, hold: &Hold) -> Result<(), Settle> {
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
) -> Option<Work> {
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
                Err(error) => (Settle::from_hold(rt, error), None),
            }
        }
        _ => {
            tracing::warn!(binding = %rt.cfg.name, ?command, "A command for a binding without keys: nothing is held; acked.");
            (Settle::Ack, None)
        }
    };
    consume::settle_reply(rt, reply, how).await;
    then
}

/// A message of a hold queue as a delivery; its lineage and attempt come from its headers, its
/// payload from the object its copy names, if it names one.
async fn queued(rt: &BindingRuntime, mut msg: StreamMessage) -> Result<Delivery, Stop> {
    let mut payload_object = None;
    if let Some(object) = header(&msg.headers, crate::payloads::MEND_PAYLOAD_OBJECT) {
        let object = object.to_owned();
        match crate::payloads::load(&rt.js, &object).await {
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
            if !name.eq_ignore_ascii_case(crate::payloads::MEND_PAYLOAD_OBJECT) {
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

fn queued_with(
    rt: &BindingRuntime,
    msg: StreamMessage,
    payload_object: Option<String>,
) -> Delivery {
    let fallback = LineageId::new("MEND_HOLD", msg.sequence);
    let (meta, history) = crate::retry::meta_from(
        rt,
        Some(&msg.headers),
        &msg.payload,
        msg.subject.as_str(),
        1,
        fallback,
    );
    // A message whose own header block could not be read keeps that block in a header of its copy.
    let unreadable = header(&msg.headers, MEND_UNREADABLE_HEADERS)
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .map(|raw| {
            let why = crate::rescue::header_problem(&raw)
                .unwrap_or_else(|| "its header block was unreadable".to_owned());
            Box::new(crate::rescue::Unreadable {
                why,
                raw: raw.into(),
            })
        });
    Delivery {
        payload: msg.payload,
        headers: Some(msg.headers),
        meta,
        history,
        source: Source::Queue { seq: msg.sequence },
        unreadable,
        payload_object,
    }
}

/// In a hold queue, the header block (base64) of a message whose own headers could not be read.
const MEND_UNREADABLE_HEADERS: &str = "Mend-Unreadable-Headers";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

/// The lineage a held message belongs to.
fn lineage_of(msg: &StreamMessage) -> String {
    header(&msg.headers, h::MEND_ID)
        .map(str::to_owned)
        .unwrap_or_else(|| LineageId::new("MEND_HOLD", msg.sequence).to_string())
}

/// The headers of a message's copy in a hold queue: its own (without NATS's, which would act on the
/// publish), and mend's with its lineage, so a release delivers it as it would have been delivered.
fn held_headers(d: &Delivery) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(headers) = &d.headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            let lower = name.to_ascii_lowercase();
            if lower.starts_with("nats-") || lower.starts_with("mend-") {
                continue;
            }
            for v in values {
                out.append(name, v.as_str());
            }
        }
    }
    let m = &d.meta;
    out.insert(h::MEND_ID, m.lineage.to_string().as_str());
    out.insert(h::MEND_SERVICE, m.service.as_str());
    out.insert(h::MEND_ATTEMPT, m.attempt.to_string().as_str());
    out.insert(h::MEND_ORIGINAL_SUBJECT, m.subject.as_str());
    if let Some(key) = &m.key {
        let (name, value) = h::key_header(key);
        out.insert(name, value.as_str());
    }
    if let Some(by) = &m.repaired_by {
        out.insert(h::MEND_REPAIRED_BY, by.as_str());
    }
    if let Some(by) = &m.resubmitted_by {
        out.insert(h::MEND_RESUBMITTED_BY, by.as_str());
    }
    if let Some(unreadable) = &d.unreadable {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&unreadable.raw);
        out.insert(MEND_UNREADABLE_HEADERS, b64.as_str());
    }
    if !d.history.is_empty() {
        out.insert(
            MEND_HISTORY,
            serde_json::to_string(&d.history)
                .unwrap_or_default()
                .as_str(),
        );
    }
    out
}
