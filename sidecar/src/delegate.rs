//! Delegation (SPEC §4, §5): building the failure envelope, publishing it durably with a
//! de-duplicating `Nats-Msg-Id`, and announcing what happened on MEND_EVENTS.
//!
//! Order, so that a crash anywhere loses and duplicates nothing: publish the envelope and await the
//! JetStream ack; announce; only then (in the caller) ack the original. A crash before the envelope is
//! stored leaves the original unacked (redelivered); a crash after it leaves the envelope stored and the
//! repeated publish is dropped by JetStream as a duplicate of the same lineage and attempt.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use base64::Engine;
use bytes::Bytes;
use repair_rules::headers as h;
use repair_rules::identity::subjects;
use repair_rules::{ENVELOPE_VERSION, FailureEnvelope, FailureError, HistoryEntry};
use serde_json::{Value, json};

use crate::consume::{BindingRuntime, Delivery};

/// Pause before the first retry of a failed publish; doubles up to [`PUBLISH_RETRY_MAX`].
const PUBLISH_RETRY_MIN: Duration = Duration::from_millis(100);
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Why a failure could not be handed on; either way the original stays unacked.
#[derive(Debug, thiserror::Error)]
pub enum NotStored {
    /// The sidecar is stopping before the publish was acknowledged.
    #[error("stopping before the publish was acknowledged")]
    Stopped,
    /// Even without its payload the envelope exceeds the server's max_payload (the message's
    /// headers alone are that large). It is redelivered after its ack wait and fails the same way:
    /// an operator has to look.
    #[error("the failure envelope is too large even without its payload")]
    Unpublishable,
}

/// Where a failure goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// MEND_FAILED, for the processor's rules.
    Failed,
    /// MEND_PARKED, straight to the dashboard (`Mend-Action: park`).
    Parked,
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
    };
    let mut envelope = envelope(rt, d, error, what, reason);
    let msg_id = d.meta.lineage.msg_id(d.meta.attempt, what);
    let headers = envelope_headers(d);
    let body = to_bytes(&envelope);
    match publish(rt, &subject, &msg_id, headers.clone(), body).await? {
        Published::Stored => {}
        Published::TooLarge => {
            // The payload does not fit in an envelope under the server's max_payload. The envelope
            // still goes out, pointing at the original in the app stream.
            tracing::warn!(
                size = d.msg.payload.len(),
                "Payload too large for the failure envelope; delegating a reference to it."
            );
            envelope.payload = Value::Null;
            envelope.payload_base64 = None;
            envelope.payload_ref = Some(repair_rules::envelope::PayloadRef {
                stream: d.meta.lineage.stream.clone(),
                seq: d.meta.lineage.seq,
                size: d.msg.payload.len(),
            });
            if let Published::TooLarge =
                publish(rt, &subject, &msg_id, headers, to_bytes(&envelope)).await?
            {
                tracing::error!(
                    "Envelope too large even without its payload; left unacked for redelivery."
                );
                return Err(NotStored::Unpublishable);
            }
        }
    }
    announce(
        rt,
        what,
        d,
        json!({ "error": envelope.error, "reason": envelope.reason }),
    )
    .await
}

/// Announces `kind` for delivery `d` on `mend.events.<service>.<kind>` as a CloudEvent (structured
/// JSON), stored before the caller acks the original.
pub async fn announce(
    rt: &BindingRuntime,
    kind: &str,
    d: &Delivery,
    extra: Value,
) -> Result<(), NotStored> {
    let id = d.meta.lineage.msg_id(d.meta.attempt, kind);
    let mut data = json!({
        "service": rt.service,
        "binding": rt.cfg.name,
        "id": d.meta.lineage.to_string(),
        "key": d.meta.key.as_ref().map(|k| k.as_str()),
        "subject": d.meta.subject,
        "attempt": d.meta.attempt,
    });
    if let (Some(data), Value::Object(extra)) = (data.as_object_mut(), extra) {
        data.extend(extra);
    }
    let event = json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("urn:mend:sidecar:{}:{}", rt.service, rt.cfg.name),
        "type": format!("mend.{kind}"),
        "subject": d.meta.lineage.to_string(),
        "time": now(),
        "datacontenttype": "application/json",
        "data": data,
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    headers.insert(h::MEND_ID, d.meta.lineage.to_string().as_str());
    match publish(
        rt,
        &subjects::event(&rt.service, kind),
        &id,
        headers,
        to_bytes(&event),
    )
    .await?
    {
        Published::Stored => Ok(()),
        Published::TooLarge => {
            tracing::warn!(kind, "Event too large to announce; skipped.");
            Ok(())
        }
    }
}

fn envelope(
    rt: &BindingRuntime,
    d: &Delivery,
    error: FailureError,
    what: &str,
    reason: Option<String>,
) -> FailureEnvelope {
    let at = now();
    let (payload, payload_base64) = match serde_json::from_slice::<Value>(&d.msg.payload) {
        Ok(v) => (v, None),
        Err(_) => (
            Value::Null,
            Some(base64::engine::general_purpose::STANDARD.encode(&d.msg.payload)),
        ),
    };
    let mut headers = BTreeMap::new();
    if let Some(map) = &d.msg.headers {
        for (name, values) in map.iter() {
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
        error: error.clone(),
        attempt: d.meta.attempt,
        first_failed_at: at.clone(),
        failed_at: at.clone(),
        reason,
        history: vec![HistoryEntry {
            at,
            what: what.to_owned(),
            by: "sidecar".to_owned(),
            error: Some(error),
            note: None,
        }],
    }
}

fn envelope_headers(d: &Delivery) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert(h::MEND_ID, d.meta.lineage.to_string().as_str());
    headers.insert(h::MEND_ATTEMPT, d.meta.attempt.to_string().as_str());
    headers.insert(h::MEND_SERVICE, d.meta.service.as_str());
    headers.insert(h::MEND_ORIGINAL_SUBJECT, d.meta.subject.as_str());
    if let Some(key) = &d.meta.key {
        headers.insert(h::MEND_KEY, key.as_str());
    }
    for name in [h::TRACEPARENT, h::TRACESTATE] {
        if let Some(v) = d.msg.headers.as_ref().and_then(|m| m.get(name)) {
            headers.insert(name, v.as_str());
        }
    }
    headers
}

enum Published {
    Stored,
    TooLarge,
}

/// Publishes with `msg_id` and awaits the JetStream ack, retrying with backoff (across reconnects and
/// server restarts) until it is stored or the sidecar stops.
async fn publish(
    rt: &BindingRuntime,
    subject: &str,
    msg_id: &str,
    headers: async_nats::HeaderMap,
    body: Bytes,
) -> Result<Published, NotStored> {
    let mut pause = PUBLISH_RETRY_MIN;
    loop {
        let message = PublishMessage::build()
            .payload(body.clone())
            .headers(headers.clone())
            .message_id(msg_id);
        let result = match rt.js.send_publish(subject.to_owned(), message).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => return Ok(Published::Stored),
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                return Ok(Published::TooLarge);
            }
            Err(error) => {
                tracing::warn!(%error, subject, "Publish not acknowledged; retrying.");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = rt.shutdown.cancelled() => return Err(NotStored::Stopped),
        }
        pause = (pause * 2).min(PUBLISH_RETRY_MAX);
    }
}

fn to_bytes(value: &impl serde::Serialize) -> Bytes {
    // Serializing these types cannot fail: string keys, no non-finite floats from JSON input.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// Now, RFC 3339 in UTC with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
