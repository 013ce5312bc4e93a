//! A retry no binding can take is parked for a person, never dropped.

use repair_rules::identity::streams;

use async_nats::jetstream::Message;
use repair_rules::headers as h;
use repair_rules::identity::subjects;
use repair_rules::{ErrorKind, FailureEnvelope, FailureError, HistoryEntry, LineageId};

use super::inbox::{Router, reply_of};
use crate::common::ack;
use crate::common::publish::{self, Published, to_bytes};

/// Parks a retry no binding can take (`detail` says why), then acks it.
pub(crate) async fn park_unroutable(router: &Router, msg: Message, detail: &str) {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let id = msg
        .headers
        .as_ref()
        .and_then(|m| m.get(h::MEND_ID))
        .map(|v| v.as_str().to_owned());
    tracing::error!(
        seq,
        mend_id = id.as_deref(),
        detail,
        "A retry no binding consumes; parking it."
    );
    let read = h::ReadLineage::read(|name| msg.headers.as_ref()?.get(name).map(|v| v.as_str()));
    let is_retry = read.id.is_some();
    let lineage = read
        .id
        .clone()
        .unwrap_or_else(|| LineageId::new(streams::RETRY, seq));
    let mut error = FailureError::bare(ErrorKind::Message, None);
    error.title = Some("retry could not be routed".into());
    error.detail = Some(detail.to_owned());
    let at = publish::now();
    let mut envelope = FailureEnvelope::raw(
        lineage,
        router.service.clone(),
        read.original_subject
            .clone()
            .unwrap_or_else(|| msg.subject.to_string()),
        repair_rules::envelope::payload_form(&msg.payload),
        error,
        at.clone(),
    );
    envelope.reason = Some("a retry that no binding of this sidecar can deliver".into());
    envelope.key = read.key.clone().map(|k| k.0);
    envelope.headers = msg
        .headers
        .as_ref()
        .map(|m| {
            m.iter()
                // A retry's mend headers are its lineage, which the envelope has as fields.
                .filter(|(k, _)| !is_retry || h::is_carried(k.as_ref()))
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.iter().map(|x| x.as_str().to_owned()).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // A retry of a lineage keeps its attempt (at least 2: the original was delivery 1) and its
    // history, so the dashboard takes it as the lineage's next parking, not a copy of the first.
    if is_retry {
        envelope.attempt = read.attempt.unwrap_or(2).max(2);
        envelope.history = read
            .history
            .as_deref()
            .and_then(|text| repair_rules::envelope::read_history(text).ok())
            .unwrap_or_default();
        if let Some(first) = envelope.history.first() {
            envelope.first_failed_at = first.at.clone();
        }
    }
    envelope.history.push(HistoryEntry {
        at,
        what: "parked".into(),
        by: "sidecar".into(),
        attempt: Some(envelope.attempt),
        error: None,
        note: None,
    });
    let msg_id = LineageId::new(streams::RETRY, seq).msg_id(1, "parked");
    let mut out = async_nats::HeaderMap::new();
    out.insert("Content-Type", "application/json");
    out.insert(h::MEND_ID, envelope.id.as_str());
    let Some(reply) = reply_of(router, &msg) else {
        return;
    };
    match publish::durably(
        &router.js,
        &router.shutdown,
        &subjects::parked(&router.service),
        &msg_id,
        out,
        to_bytes(&envelope),
    )
    .await
    {
        Ok(Published::Stored { .. }) => {
            ack::confirm(&router.client, &reply, &router.epoch, router.ack_wait).await;
        }
        Ok(Published::TooLarge) | Err(_) => ack::hand_back(&router.client, &reply).await,
    }
}
