//! The sidecar's retry path (SPEC §1, §3): repaired and resubmitted messages arrive on
//! `mend.retry.<service>` (stream MEND_RETRY), are routed to the binding of their original message,
//! and go through that key's lane like any message. Their lineage comes from the headers: `Mend-Id`,
//! `Mend-Attempt`, `Mend-Original-Subject`, `Mend-Key`, `Mend-Repaired-By`, `Mend-Resubmitted-By`,
//! `Mend-History`. A retry that cannot be routed (no valid `Mend-Id`, or a stream no binding
//! consumes) is parked for a person, never dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::{self, Message};
use base64::Engine;
use futures::StreamExt;
use repair_rules::headers as h;
use repair_rules::identity::subjects;
use repair_rules::rules::subject;
use repair_rules::{
    ENVELOPE_VERSION, ErrorKind, FailureEnvelope, FailureError, HistoryEntry, LineageId, MessageKey,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack;
use crate::config::BindingConfig;
use crate::consume::{self, BindingRuntime, Delivery, Held, HeldId};
use crate::headers::DeliveryMeta;
use crate::lanes::Lanes;
use crate::processor::MEND_HISTORY;
use crate::publish::{self, Published, to_bytes};

/// The durable consumer of a service's retries.
pub fn consumer_name(service: &str) -> String {
    format!("mend-{service}-retry")
}

/// Creates or updates the service's retry consumer. Its ack wait is the longest of the bindings':
/// a retry waiting in a lane is kept alive on its binding's cadence, which must fit inside it.
pub async fn bind(
    js: &jetstream::Context,
    service: &str,
    max_ack_pending: usize,
    ack_wait: Duration,
) -> anyhow::Result<PullConsumer> {
    let stream = js
        .get_stream("MEND_RETRY")
        .await
        .context("stream MEND_RETRY")?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(consumer_name(service)),
            description: Some(format!(
                "mend sidecar of {service}: repaired and resubmitted messages"
            )),
            filter_subject: subjects::retry(service),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: max_ack_pending as i64,
            ..Default::default()
        })
        .await
        .with_context(|| {
            format!(
                "cannot create consumer {} on MEND_RETRY",
                consumer_name(service)
            )
        })
}

/// What routing needs of the sidecar.
pub struct Router {
    pub service: String,
    pub bindings: Vec<BindingConfig>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub epoch: ack::Epoch,
    pub shutdown: CancellationToken,
    /// The retry consumer's ack wait.
    pub ack_wait: Duration,
}

/// Pulls retries and hands each to its binding's dispatcher (`to[i]` for `bindings[i]`) until
/// shutdown.
pub async fn route(router: Arc<Router>, consumer: PullConsumer, to: Vec<mpsc::Sender<Message>>) {
    loop {
        let Some(mut messages) = crate::nats::pull(&consumer, 64, &router.shutdown).await else {
            return;
        };
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = router.shutdown.cancelled() => return,
            };
            match next {
                Some(Ok(msg)) => match binding_of(&router.bindings, &msg) {
                    Some(i) => {
                        if to[i].send(msg).await.is_err() {
                            return;
                        }
                    }
                    None => park_unroutable(&router, msg).await,
                },
                Some(Err(error)) => tracing::warn!(%error, "Pull of retries failed; continuing."),
                None => break,
            }
        }
    }
}

/// The binding whose stream the retry's lineage is from (and whose subjects match its original
/// subject, when several bindings read that stream).
fn binding_of(bindings: &[BindingConfig], msg: &Message) -> Option<usize> {
    let headers = msg.headers.as_ref()?;
    let lineage: LineageId = headers.get(h::MEND_ID)?.as_str().parse().ok()?;
    let original = headers.get(h::MEND_ORIGINAL_SUBJECT).map(|v| v.as_str());
    let same_stream = || {
        bindings
            .iter()
            .enumerate()
            .filter(|(_, b)| b.stream == lineage.stream)
    };
    same_stream()
        .find(|(_, b)| original.is_some_and(|s| b.subjects.iter().any(|f| subject::matches(f, s))))
        .or_else(|| same_stream().next())
        .map(|(i, _)| i)
}

/// Takes a routed retry into its key's lane (the dispatcher calls this).
pub(crate) fn admit(
    rt: &BindingRuntime,
    msg: Message,
    lanes: &mut Lanes<Delivery>,
    held: &mut HashMap<HeldId, Held>,
) {
    let Ok(info) = msg.info() else {
        tracing::error!(subject = %msg.subject, "Not a JetStream message; ignored.");
        return;
    };
    let seq = info.stream_sequence;
    let Some(subject) = msg.reply.clone() else {
        return;
    };
    let Some(reply) = consume::hold(rt, held, HeldId { retry: true, seq }, subject) else {
        return;
    };
    let (meta, history) = meta_of(rt, &msg);
    let key = meta.key.clone();
    lanes.push(key, consume::retry_delivery(msg, meta, history, seq, reply));
}

/// The delivery metadata and history of a routed retry (its `Mend-Id` was checked by routing).
fn meta_of(rt: &BindingRuntime, msg: &Message) -> (DeliveryMeta, Vec<HistoryEntry>) {
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|m| m.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let lineage = header(h::MEND_ID)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| LineageId::new(rt.cfg.stream.clone(), 0));
    let attempt = header(h::MEND_ATTEMPT)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(2)
        .max(2);
    let history = match header(MEND_HISTORY).map(|h| serde_json::from_str::<Vec<HistoryEntry>>(&h))
    {
        Some(Ok(history)) => history,
        Some(Err(error)) => {
            tracing::warn!(%error, %lineage, "Mend-History is not a history; starting a new one.");
            Vec::new()
        }
        None => Vec::new(),
    };
    let meta = DeliveryMeta {
        service: rt.service.clone(),
        lineage,
        key: header(h::MEND_KEY).map(|k| MessageKey(h::decode_value(&k))),
        attempt,
        subject: header(h::MEND_ORIGINAL_SUBJECT).unwrap_or_else(|| msg.subject.to_string()),
        published: SystemTime::now(),
        repaired_by: header(h::MEND_REPAIRED_BY),
        resubmitted_by: header(h::MEND_RESUBMITTED_BY),
    };
    (meta, history)
}

/// Parks a retry no binding can take, then acks it.
async fn park_unroutable(router: &Router, msg: Message) {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let id = msg
        .headers
        .as_ref()
        .and_then(|m| m.get(h::MEND_ID))
        .map(|v| v.as_str().to_owned());
    tracing::error!(
        seq,
        mend_id = id.as_deref(),
        "A retry no binding consumes; parking it."
    );
    let lineage = id
        .as_deref()
        .and_then(|i| i.parse::<LineageId>().ok())
        .unwrap_or_else(|| LineageId::new("MEND_RETRY", seq));
    let (payload, payload_base64) = match serde_json::from_slice(&msg.payload) {
        Ok(v) => (v, None),
        Err(_) => (
            serde_json::Value::Null,
            Some(base64::engine::general_purpose::STANDARD.encode(&msg.payload)),
        ),
    };
    let mut error = FailureError::bare(ErrorKind::Message, None);
    error.title = Some("retry could not be routed".into());
    error.detail = Some("no valid Mend-Id, or no binding consumes its stream".into());
    let at = publish::now();
    let headers = msg
        .headers
        .as_ref()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.iter().map(|x| x.as_str().to_owned()).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let envelope = FailureEnvelope {
        version: ENVELOPE_VERSION,
        id: lineage.to_string(),
        service: router.service.clone(),
        binding: String::new(),
        stream: lineage.stream.clone(),
        seq: lineage.seq,
        subject: msg.subject.to_string(),
        key: None,
        headers,
        payload,
        payload_base64,
        payload_ref: None,
        error,
        attempt: 1,
        first_failed_at: at.clone(),
        failed_at: at.clone(),
        reason: Some("a retry that no binding of this sidecar can deliver".into()),
        history: vec![HistoryEntry {
            at,
            what: "parked".into(),
            by: "sidecar".into(),
            error: None,
            note: None,
        }],
    };
    let msg_id = LineageId::new("MEND_RETRY", seq).msg_id(1, "parked");
    let mut out = async_nats::HeaderMap::new();
    out.insert("Content-Type", "application/json");
    out.insert(h::MEND_ID, envelope.id.as_str());
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let reply = ack::Reply::new(reply, router.epoch.current());
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
        Ok(Published::Stored) => {
            ack::confirm(&router.client, &reply, &router.epoch, router.ack_wait).await;
        }
        Ok(Published::TooLarge) | Err(_) => ack::hand_back(&router.client, &reply).await,
    }
}
