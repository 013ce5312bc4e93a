//! A key's hold, written: a message of a held key appended to its hold queue, what a delivery did
//! to the key's hold stored, `resolved` announced.

use async_nats::HeaderMap;
use base64::Engine as _;
use repair_rules::MessageKey;
use repair_rules::headers as h;
use repair_rules::holds::{self as protocol, Change, Hold, HoldState, Outcome};
use serde_json::json;

use super::binding::BindingRuntime;
use super::delegate;
use super::settle::Settle;
use super::work::Delivery;
use crate::common::otel;
use crate::common::publish::{self};
use crate::runtime::holds::{HoldError, Holds};

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
    let object = crate::common::payloads::object_name(&d.meta.lineage, d.meta.attempt, "held");
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
    // Held back as a producer span of the message's trace: its delivery at the release continues
    // under it (the copy's trace context).
    let span = d.trace.child("hold", otel::Kind::Producer, || {
        vec![
            otel::KeyValue::new("messaging.system", "nats"),
            otel::KeyValue::new(
                "mend.head",
                hold.map_or(String::new(), |h| h.head.to_string()),
            ),
        ]
    });
    let mut headers = held_headers(d, hold.map(|h| h.since.as_str()));
    span.inject_nats(&mut headers);
    let (appended, announced) = tokio::join!(
        holds.append(key, &msg_id, headers, d.payload.clone(), Some(&object)),
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

/// Announces `resolved` for a retry that succeeded or a head whose release begins, then stores
/// what the delivery did to its key's hold. Returns whether a release begins.
///
/// The announcement goes first: once the hold remembers the lineage as resolved, a redelivery of
/// the retry (its ack lost, or the sidecar dead before it) is settled without being delivered or
/// announced again, so an announcement left for after the change could be lost for good. Announced
/// first, a change that is not stored only brings a redelivery whose announcement is a duplicate.
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
        .map_err(Settle::from)?;
    if releasing || (d.is_retry() && outcome == Outcome::Done) {
        resolved(rt, d, Some(holds.queued(key))).await?;
    }
    // The release begins in the head's trace, under its `receive`: storing the change that
    // begins it (the held messages' own deliveries are in their traces, under their holds).
    let mut span = if releasing {
        d.trace.child("release", otel::Kind::Internal, || {
            vec![otel::KeyValue::new("mend.held", holds.queued(key) as i64)]
        })
    } else {
        otel::Span::none()
    };
    let applied = holds.apply(key, change).await;
    span.status(applied.is_ok(), "the hold's change was not stored");
    applied.map_err(Settle::from)?;
    if releasing {
        tracing::info!(
            held = holds.queued(key),
            "Head resolved; releasing the key's held messages."
        );
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

pub(crate) fn begins_release(change: &Change) -> bool {
    matches!(change, Change::Create(h) | Change::Update(h) if h.state == HoldState::Releasing)
}

/// A release of an empty queue in one write: the entry goes straight to resolved (the release's
/// first step would find the queue empty and do just that). Returns the change to store and whether
/// a release begins.
pub(crate) async fn at_once_if_empty(
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
    let empty = !holds.unpurged(key) && (holds.queued(key) == 0 || !holds.has_first(key).await?);
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

/// The headers of a message's copy in a hold queue: its own (without NATS's, which would act on the
/// publish), and mend's with its lineage, so a release delivers it as it would have been delivered,
/// and the `since` of the hold it joins.
pub(crate) fn held_headers(d: &Delivery, since: Option<&str>) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(headers) = &d.headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            if !h::is_carried(name) {
                continue;
            }
            for v in values {
                out.append(name, v.as_str());
            }
        }
    }
    let m = &d.meta;
    let history =
        (!d.history.is_empty()).then(|| serde_json::to_string(&d.history).unwrap_or_default());
    h::Lineage {
        id: &m.lineage.to_string(),
        service: &m.service,
        attempt: m.attempt,
        original_subject: &m.subject,
        key: m.key.as_ref(),
        repaired_by: m.repaired_by.as_deref(),
        resubmitted_by: m.resubmitted_by.as_deref(),
        hold_since: since,
        history: history.as_deref(),
    }
    .write(|name, value| out.insert(name, value));
    if let Some(unreadable) = &d.unreadable {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&unreadable.raw);
        out.insert(h::MEND_UNREADABLE_HEADERS, b64.as_str());
    }
    out
}
