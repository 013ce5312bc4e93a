//! The sidecar's retry path (SPEC §1, §3): repaired and resubmitted messages arrive on
//! `mend.retry.<service>` (stream MEND_RETRY), are routed to the binding of their original message,
//! and go through that key's lane like any message. Their lineage comes from the headers: `Mend-Id`,
//! `Mend-Attempt`, `Mend-Original-Subject`, `Mend-Key`, `Mend-Repaired-By`, `Mend-Resubmitted-By`,
//! `Mend-History`. A retry that cannot be routed (no valid `Mend-Id`, or a stream no binding
//! consumes) is parked for a person, never dropped.
//!
//! Commands from the dashboard arrive on `mend.control.<service>` (stream MEND_CONTROL) as JSON
//! `{"action": "discard" | "release", "key": …, "id": <lineage>, "binding": …}` and go the same way,
//! into the lane of their key. A command that is not one is refused (terminated, logged, counted).

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
use crate::consume::{self, BindingRuntime, Delivery, Held, HeldId, Inlet, Source, Work};
use crate::headers::DeliveryMeta;
use crate::lanes::Lanes;
use crate::processor::MEND_HISTORY;
use crate::publish::{self, Published, to_bytes};

/// The durable consumer of a service's retries.
pub fn consumer_name(service: &str) -> String {
    format!("mend-{service}-retry")
}

/// The durable consumer of a service's commands from the dashboard.
pub fn control_consumer_name(service: &str) -> String {
    format!("mend-{service}-control")
}

/// What the router hands a binding's dispatcher.
pub enum Inbound {
    Retry(Message),
    Control {
        msg: Message,
        key: Option<MessageKey>,
        command: repair_rules::holds::Command,
    },
}

/// A command on `mend.control.<service>`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlMessage {
    action: ControlAction,
    key: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    binding: Option<String>,
    /// Who asked (the dashboard's user), for the logs.
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum ControlAction {
    Discard,
    Release,
}

/// Creates or updates the service's control consumer.
pub async fn bind_control(
    js: &jetstream::Context,
    service: &str,
    ack_wait: Duration,
) -> anyhow::Result<PullConsumer> {
    let stream = js
        .get_stream("MEND_CONTROL")
        .await
        .context("stream MEND_CONTROL")?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(control_consumer_name(service)),
            description: Some(format!(
                "mend sidecar of {service}: discard and release commands"
            )),
            filter_subject: subjects::control(service),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: 256,
            ..Default::default()
        })
        .await
        .with_context(|| {
            format!(
                "cannot create consumer {} on MEND_CONTROL",
                control_consumer_name(service)
            )
        })
}

/// Pulls commands and hands each to the dispatcher of its binding until shutdown.
pub async fn route_control(
    router: Arc<Router>,
    consumer: PullConsumer,
    to: Vec<mpsc::Sender<Inbound>>,
) {
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
                Some(Ok(msg)) => match parse_control(&router.bindings, &msg) {
                    Ok((i, key, command)) => {
                        let inbound = Inbound::Control { msg, key, command };
                        if to[i].send(inbound).await.is_err() {
                            return;
                        }
                    }
                    Err(reason) => refuse_control(&router, msg, &reason).await,
                },
                Some(Err(error)) => tracing::warn!(%error, "Pull of commands failed; continuing."),
                None => break,
            }
        }
    }
}

/// The binding, key and command of a control message.
fn parse_control(
    bindings: &[BindingConfig],
    msg: &Message,
) -> Result<(usize, Option<MessageKey>, repair_rules::holds::Command), String> {
    let cm: ControlMessage =
        serde_json::from_slice(&msg.payload).map_err(|e| format!("not a command ({e})"))?;
    let lineage = match &cm.id {
        Some(id) => Some(
            id.parse::<LineageId>()
                .map_err(|e| format!("`id` is not a message id: {e}"))?,
        ),
        None => None,
    };
    let keyed = || bindings.iter().enumerate().filter(|(_, b)| b.key.is_some());
    let i = match (&cm.binding, &lineage) {
        (Some(name), _) => bindings
            .iter()
            .position(|b| &b.name == name)
            .ok_or_else(|| format!("no binding `{name}` in this sidecar"))?,
        (None, Some(l)) => keyed()
            .find(|(_, b)| b.stream == l.stream)
            .map(|(i, _)| i)
            .ok_or_else(|| format!("no binding with a key reads stream {}", l.stream))?,
        (None, None) => {
            let mut candidates = keyed();
            match (candidates.next(), candidates.next()) {
                (Some((i, _)), None) => i,
                _ => return Err("neither `binding` nor `id` says which binding".into()),
            }
        }
    };
    let command = match (cm.action, lineage) {
        (ControlAction::Discard, Some(l)) => repair_rules::holds::Command::Discard {
            lineage: l.to_string(),
        },
        (ControlAction::Discard, None) => return Err("a discard needs the message's `id`".into()),
        (ControlAction::Release, _) => repair_rules::holds::Command::Release,
    };
    if cm.key.is_empty() {
        return Err("`key` is empty".into());
    }
    tracing::info!(
        action = ?cm.action,
        key = cm.key,
        id = cm.id,
        by = cm.by,
        note = cm.note,
        "Command from the dashboard."
    );
    Ok((i, Some(MessageKey(cm.key)), command))
}

/// Terminates a malformed command: redelivering it would not make it one.
async fn refuse_control(router: &Router, msg: Message, reason: &str) {
    metrics::counter!(crate::telemetry::CONTROL_REFUSED, "service" => router.service.clone())
        .increment(1);
    tracing::error!(reason, payload = %String::from_utf8_lossy(&msg.payload), "Command refused.");
    if let Err(error) = msg.ack_with(jetstream::AckKind::Term).await {
        tracing::warn!(%error, "Refused command not terminated; it comes back.");
    }
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
pub async fn route(router: Arc<Router>, consumer: PullConsumer, to: Vec<mpsc::Sender<Inbound>>) {
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
                        if to[i].send(Inbound::Retry(msg)).await.is_err() {
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

/// Takes a routed retry or command into its key's lane (the dispatcher calls this).
pub(crate) fn admit(
    rt: &BindingRuntime,
    inbound: Inbound,
    lanes: &mut Lanes<Work>,
    held: &mut HashMap<HeldId, Held>,
) {
    let (msg, inlet) = match &inbound {
        Inbound::Retry(msg) => (msg, Inlet::Retry),
        Inbound::Control { msg, .. } => (msg, Inlet::Control),
    };
    let Ok(info) = msg.info() else {
        tracing::error!(subject = %msg.subject, "Not a JetStream message; ignored.");
        return;
    };
    let id = HeldId {
        inlet,
        seq: info.stream_sequence,
    };
    let Some(subject) = msg.reply.clone() else {
        return;
    };
    let Some(reply) = consume::hold(rt, held, id, subject) else {
        return;
    };
    match inbound {
        Inbound::Retry(msg) => {
            let fallback = LineageId::new(rt.cfg.stream.clone(), 0);
            let (meta, history) =
                meta_from(rt, msg.headers.as_ref(), msg.subject.as_str(), 2, fallback);
            let key = meta.key.clone();
            let d = Delivery {
                payload: msg.message.payload,
                headers: msg.message.headers,
                meta,
                history,
                source: Source::Consumer { id, reply },
            };
            lanes.push(key, Work::Message(d));
        }
        Inbound::Control { key, command, .. } => {
            lanes.push(key, Work::Command { command, id, reply });
        }
    }
}

/// The delivery metadata and history of a message that carries its lineage in mend's headers (a
/// routed retry, or a message of a hold queue); `min_attempt` is 2 for retries, 1 for held messages.
pub(crate) fn meta_from(
    rt: &BindingRuntime,
    headers: Option<&async_nats::HeaderMap>,
    subject: &str,
    min_attempt: u32,
    fallback: LineageId,
) -> (DeliveryMeta, Vec<HistoryEntry>) {
    let header = |name: &str| {
        headers
            .and_then(|m| m.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let lineage = header(h::MEND_ID)
        .and_then(|id| id.parse().ok())
        .unwrap_or(fallback);
    let attempt = header(h::MEND_ATTEMPT)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(min_attempt)
        .max(min_attempt);
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
        subject: header(h::MEND_ORIGINAL_SUBJECT).unwrap_or_else(|| subject.to_owned()),
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
        Ok(Published::Stored { .. }) => {
            ack::confirm(&router.client, &reply, &router.epoch, router.ack_wait).await;
        }
        Ok(Published::TooLarge) | Err(_) => ack::hand_back(&router.client, &reply).await,
    }
}
