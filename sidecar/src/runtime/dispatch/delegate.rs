//! Delegation (SPEC §4, §5): building the failure envelope, publishing it durably with a
//! de-duplicating `Nats-Msg-Id`, and announcing what happened on MEND_EVENTS.
//!
//! Order, so that a crash anywhere loses and duplicates nothing: publish the envelope and await the
//! JetStream ack; announce; only then (in the caller) ack the original. A crash before the envelope is
//! stored leaves the original unacked (redelivered); a crash after it leaves the envelope stored and the
//! repeated publish is dropped by JetStream as a duplicate of the same lineage and attempt.

use std::collections::BTreeMap;

use base64::Engine as _;
use repair_rules::headers as h;
use repair_rules::identity::subjects;
use repair_rules::{ENVELOPE_VERSION, FailureEnvelope, FailureError, HistoryEntry};
use serde_json::{Value, json};

use super::binding::BindingRuntime;
use super::work::Delivery;
use crate::common::otel;
use crate::common::publish::{self, NotStored, Published, to_bytes};

/// Where a failure goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// MEND_FAILED, for the processor's rules.
    Failed,
    /// MEND_PARKED, straight to the dashboard (`Mend-Action: park`).
    Parked,
    /// MEND_PARKED, because the message cannot be delivered in its key's order: the binding's key
    /// cannot be read from it.
    Unkeyable,
    /// MEND_PARKED, because its NATS headers cannot be read (and so not passed on as they are).
    Unreadable,
    /// MEND_PARKED, because the object its payload was kept in is gone.
    PayloadGone,
}

/// Publishes the envelope of `d` with `error` to `to` and announces it. Returns once both are stored.
pub async fn failure(
    rt: &BindingRuntime,
    d: &Delivery,
    error: FailureError,
    to: Destination,
) -> Result<(), NotStored> {
    let (subject, what, reason) = match to {
        Destination::Failed => (subjects::failed(&rt.service), "delegated", None),
        Destination::Parked => (
            subjects::parked(&rt.service),
            "parked",
            Some("the app asked to park it (Mend-Action: park)".to_owned()),
        ),
        Destination::Unreadable => (
            subjects::parked(&rt.service),
            "parked",
            Some(
                "its NATS headers cannot be read, so it cannot be passed on as it was sent: its \
                 header block is kept (headers_base64); fix and resubmit, or discard it"
                    .to_owned(),
            ),
        ),
        Destination::Unkeyable => (
            subjects::parked(&rt.service),
            "parked",
            Some(
                "its key cannot be read, so it cannot be delivered in its key's order: fix it and \
                 resubmit, or discard it"
                    .to_owned(),
            ),
        ),
        Destination::PayloadGone => (
            subjects::parked(&rt.service),
            "parked",
            Some(
                "the object its payload was kept in is gone from mend_payloads: resubmit it with a \
                 payload, or discard it"
                    .to_owned(),
            ),
        ),
    };
    let mut envelope = envelope(rt, d, error, what, reason);
    let msg_id = d.meta.lineage.msg_id(d.meta.attempt, what);
    let mut headers = envelope_headers(d);
    // The delegation as a producer span of the message's trace; the processor or the dashboard
    // continues under it.
    let span = d.trace.child("delegate", otel::Kind::Producer, || {
        vec![
            otel::KeyValue::new("messaging.system", "nats"),
            otel::KeyValue::new("messaging.destination.name", subject.clone()),
            otel::KeyValue::new("mend.to", what),
            otel::KeyValue::new("mend.error.kind", envelope.error.kind.as_str()),
            otel::KeyValue::new(
                "mend.error.code",
                otel::clip(envelope.error.code.as_deref().unwrap_or("")),
            ),
        ]
    });
    span.inject_nats(&mut headers);
    let body = to_bytes(&envelope);
    match publish::durably(
        &rt.js,
        &rt.shutdown,
        &subject,
        &msg_id,
        headers.clone(),
        body,
    )
    .await?
    {
        Published::Stored { .. } => {}
        Published::TooLarge => {
            // The payload does not fit in an envelope under the server's max_payload. The envelope
            // still goes out, pointing at the original in the app stream.
            tracing::warn!(
                size = d.payload.len(),
                "Payload too large for the failure envelope; delegating a reference to it."
            );
            // Its bytes are kept as an object (once): the original may leave its stream as soon
            // as it is acked (work-queue and interest streams) or ages out.
            let object = match &d.payload_object {
                Some(object) => object.clone(),
                None => {
                    let object = crate::common::payloads::object_name(
                        &d.meta.lineage,
                        d.meta.attempt,
                        "failed",
                    );
                    crate::common::payloads::store(&rt.js, &rt.shutdown, &object, &d.payload)
                        .await?;
                    object
                }
            };
            envelope.payload = Value::Null;
            envelope.payload_base64 = None;
            envelope.payload_ref = Some(repair_rules::envelope::PayloadRef {
                stream: d.meta.lineage.stream.clone(),
                seq: d.meta.lineage.seq,
                size: d.payload.len(),
                object: Some(object),
            });
            if let Published::TooLarge = publish::durably(
                &rt.js,
                &rt.shutdown,
                &subject,
                &msg_id,
                headers.clone(),
                to_bytes(&envelope),
            )
            .await?
            {
                // Its error, history or headers have grown: they are cut to fit.
                let limit = crate::common::publish::envelope_limit(&rt.client);
                tracing::warn!(
                    limit,
                    "Envelope too large even without its payload; cutting its history and headers."
                );
                if !envelope.fit(limit)
                    || matches!(
                        publish::durably(
                            &rt.js,
                            &rt.shutdown,
                            &subject,
                            &msg_id,
                            headers,
                            to_bytes(&envelope),
                        )
                        .await?,
                        Published::TooLarge
                    )
                {
                    tracing::error!(
                        "Envelope too large even cut to its least; left unacked for redelivery."
                    );
                    return Err(NotStored::Unpublishable);
                }
            }
        }
    }
    if to == Destination::Failed {
        // A delegation is not announced on its own: its step travels in the lineage's history and
        // is announced with the transition that ends or parks the lineage (SPEC §2).
        return Ok(());
    }
    announce(
        rt,
        what,
        d,
        json!({ "error": envelope.error, "reason": envelope.reason }),
    )
    .await
}

/// Announces `kind` for delivery `d` (with `extra` data) before the caller acks the original. An
/// announcement that ends or parks the lineage (`resolved`, `parked`, `dropped`) carries the
/// lineage's unannounced steps (its delegations and repairs, from its history) as `steps`.
pub async fn announce(
    rt: &BindingRuntime,
    kind: &str,
    d: &Delivery,
    extra: Value,
) -> Result<(), NotStored> {
    let mut data = json!({
        "binding": rt.cfg.name,
        "key": d.meta.key.as_ref().map(|k| k.as_str()),
        "subject": d.meta.subject,
    });
    if let (Some(data), Value::Object(extra)) = (data.as_object_mut(), extra) {
        data.extend(extra);
    }
    if matches!(kind, "resolved" | "parked" | "dropped") {
        let steps = repair_rules::envelope::unannounced_steps(&d.history);
        if let (Some(data), false) = (data.as_object_mut(), steps.is_empty()) {
            data.insert("steps".into(), json!(steps));
        }
    }
    let event = publish::Event {
        service: &rt.service,
        source: format!("urn:mend:sidecar:{}:{}", rt.service, rt.cfg.name),
        kind,
        lineage: &d.meta.lineage,
        attempt: d.meta.attempt,
        data,
    };
    publish::announce(&rt.js, &rt.shutdown, event).await
}

pub(crate) fn envelope(
    rt: &BindingRuntime,
    d: &Delivery,
    error: FailureError,
    what: &str,
    reason: Option<String>,
) -> FailureEnvelope {
    let at = publish::now();
    let (payload, payload_base64) = repair_rules::envelope::payload_form(&d.payload);
    // The message's own headers; a retry also carries mend's, which the envelope has as fields.
    let mut headers = BTreeMap::new();
    if let Some(map) = &d.headers {
        for (name, values) in map.iter() {
            let lower = name.to_string().to_ascii_lowercase();
            if d.is_retry() && (lower.starts_with("mend-") || lower.starts_with("nats-")) {
                continue;
            }
            headers.insert(
                name.to_string(),
                values.iter().map(|v| v.as_str().to_owned()).collect(),
            );
        }
    }
    FailureEnvelope {
        version: ENVELOPE_VERSION,
        id: d.meta.lineage.to_string(),
        service: rt.service.clone(),
        binding: rt.cfg.name.clone(),
        stream: d.meta.lineage.stream.clone(),
        seq: d.meta.lineage.seq,
        subject: d.meta.subject.clone(),
        key: d.meta.key.as_ref().map(|k| k.0.clone()),
        headers,
        payload,
        payload_base64,
        payload_ref: None,
        headers_base64: d
            .unreadable
            .as_ref()
            .map(|u| base64::engine::general_purpose::STANDARD.encode(&u.raw)),
        error: error.clone(),
        attempt: d.meta.attempt,
        first_failed_at: d
            .history
            .first()
            .map_or_else(|| at.clone(), |h| h.at.clone()),
        failed_at: at.clone(),
        reason,
        history: {
            let mut history = d.history.clone();
            history.push(HistoryEntry {
                at,
                what: what.to_owned(),
                by: "sidecar".to_owned(),
                attempt: Some(d.meta.attempt),
                error: Some(error),
                note: None,
            });
            history
        },
    }
}

pub(crate) fn envelope_headers(d: &Delivery) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert(h::MEND_ID, d.meta.lineage.to_string().as_str());
    headers.insert(h::MEND_ATTEMPT, d.meta.attempt.to_string().as_str());
    headers.insert(h::MEND_SERVICE, d.meta.service.as_str());
    headers.insert(h::MEND_ORIGINAL_SUBJECT, d.meta.subject.as_str());
    if let Some(key) = &d.meta.key {
        let (name, value) = h::key_header(key);
        headers.insert(name, value.as_str());
    }
    for name in [h::TRACEPARENT, h::TRACESTATE] {
        if let Some(v) = d.headers.as_ref().and_then(|m| m.get(name)) {
            headers.insert(name, v.as_str());
        }
    }
    headers
}
