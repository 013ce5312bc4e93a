//! The units a binding's dispatcher schedules: a [`Delivery`] (one message to deliver, with what was
//! derived from it once) and the [`Work`] of a key's lane; how a message's key and lineage are read.

use std::time::{Instant, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use base64::Engine as _;
use bytes::Bytes;
use repair_rules::headers as h;
use repair_rules::holds::{self as protocol, Origin};
use repair_rules::identity::streams;
use repair_rules::{HistoryEntry, LineageId, MessageKey};

use super::binding::BindingRuntime;
use crate::common::{ack, otel};
use crate::runtime::config::KeySource;
use crate::runtime::headers::DeliveryMeta;

/// One message to deliver, with what the sidecar derived from it once.
pub struct Delivery {
    pub payload: Bytes,
    pub headers: Option<async_nats::HeaderMap>,
    pub meta: DeliveryMeta,
    /// The lineage's history so far (empty for an original; from `Mend-History` for a retry).
    pub history: Vec<HistoryEntry>,
    pub source: Source,
    /// Set when its NATS header block cannot be read by mend's NATS client: it is parked with the
    /// block's bytes instead of delivered (`headers` has what could be read of it).
    pub unreadable: Option<Box<crate::runtime::rescue::Unreadable>>,
    /// The object of [`buckets::PAYLOADS`] its payload was read from (a message
    /// too large for its hold queue's copy): an envelope refers to it rather than store it again.
    pub payload_object: Option<String>,
    /// Its `receive` span while it is worked on ([`Delivery::receive`]); none with traces off.
    pub trace: otel::Span,
}

/// Where a delivery came from, which says how it is settled.
pub enum Source {
    /// A consumer's message (app stream or retry subject): settled by an ack on its reply subject.
    Consumer { id: HeldId, reply: ack::Reply },
    /// A message of the key's hold queue, delivered by a release: settled by deleting it.
    Queue { seq: u64 },
}

/// Which consumer a held message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Inlet {
    App,
    Retry,
    Control,
}

/// Which message the dispatcher holds, by its stream's sequence (the streams' sequences are
/// unrelated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeldId {
    pub inlet: Inlet,
    pub seq: u64,
}

impl Delivery {
    /// The message's span (`msg`, with its lineage, key and attempt), for the steps that log: made
    /// when one runs, not for every message.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "msg",
            mend_id = %self.meta.lineage,
            key = self.meta.key.as_ref().map(|k| k.as_str()),
            attempt = self.meta.attempt,
        )
    }

    /// Starts its `receive` span (a consumer span under the message's own trace context, a new
    /// trace without one), which the delivery, delegation and holding back are children of and
    /// which ends when the message is settled. Nothing with traces off.
    pub(crate) fn receive(&mut self) {
        let (meta, headers) = (&self.meta, self.headers.as_ref());
        self.trace = otel::Span::start(
            "receive",
            otel::Kind::Consumer,
            || otel::parent_of(headers),
            || {
                let mut attributes = vec![
                    otel::KeyValue::new("messaging.system", "nats"),
                    otel::KeyValue::new("messaging.destination.name", meta.subject.clone()),
                    otel::KeyValue::new("mend.id", meta.lineage.to_string()),
                    otel::KeyValue::new("mend.attempt", i64::from(meta.attempt)),
                    otel::KeyValue::new("mend.service", meta.service.clone()),
                ];
                if let Some(key) = &meta.key {
                    attributes.push(otel::KeyValue::new("mend.key", otel::clip(key.as_str())));
                }
                attributes
            },
        );
    }

    /// Whether its headers are mend's copy rather than the app's original (a retry, or a message of
    /// a hold queue): mend's own headers in them are not the message's.
    pub fn is_retry(&self) -> bool {
        !matches!(
            self.source,
            Source::Consumer {
                id: HeldId {
                    inlet: Inlet::App,
                    ..
                },
                ..
            }
        )
    }

    /// Which side of the hold protocol it comes from.
    pub(crate) fn origin(&self) -> Origin {
        if self.is_retry() {
            Origin::Retry
        } else {
            Origin::App
        }
    }

    pub(crate) fn held_id(&self) -> Option<HeldId> {
        match &self.source {
            Source::Consumer { id, .. } => Some(*id),
            Source::Queue { .. } => None,
        }
    }
}

/// One unit of a lane's work.
// Nearly all work is messages: boxing them would cost an allocation each to save space on the rare rest.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Work {
    Message(Delivery),
    /// The next step of the key's release (or, while held, delivering its head's retry found in
    /// the queue).
    Release,
    /// A command from the dashboard for the key.
    Command {
        command: protocol::Command,
        id: HeldId,
        reply: ack::Reply,
    },
    /// Forget the key's resolved hold, its duplicate window over.
    Forget,
    /// A message of a keyed binding whose key cannot be read (and why): parked, never delivered.
    Unkeyable(Delivery, String),
}

impl Work {
    /// The stream sequence of the message it works on (0 for chores).
    pub(crate) fn seq(&self) -> u64 {
        match self {
            Work::Message(d) | Work::Unkeyable(d, _) => d.meta.lineage.seq,
            _ => 0,
        }
    }

    /// Which chore it is, if one.
    pub(crate) fn chore(&self) -> Chore {
        match self {
            Work::Release => Chore::Release,
            Work::Forget => Chore::Forget,
            _ => Chore::None,
        }
    }

    pub(crate) fn held_id(&self) -> Option<HeldId> {
        match self {
            Work::Message(d) | Work::Unkeyable(d, _) => d.held_id(),
            Work::Command { id, .. } => Some(*id),
            Work::Release | Work::Forget => None,
        }
    }

    /// The reply subject to hand the work back on at shutdown, if it came from a consumer.
    pub(crate) fn reply(&self) -> Option<&ack::Reply> {
        match self {
            Work::Message(Delivery {
                source: Source::Consumer { reply, .. },
                ..
            })
            | Work::Unkeyable(
                Delivery {
                    source: Source::Consumer { reply, .. },
                    ..
                },
                _,
            )
            | Work::Command { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

/// A finished piece of work: its key may take its next; `then` goes to the back of the key's lane.
pub(crate) struct Done {
    pub(crate) held_id: Option<HeldId>,
    pub(crate) key: Option<MessageKey>,
    /// Boxed: it is rare, and a `Done` is a message task's output, moved a few times per message.
    pub(crate) then: Option<Box<Work>>,
    /// What kind of work finished (a release step or a forget: the key's pending marker ends).
    pub(crate) was: Chore,
    /// The binding must stop: another instance changed its holds.
    pub(crate) stop: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chore {
    None,
    Release,
    Forget,
}

/// The key of `msg` per the binding's key source: `None` when the message has none (no such
/// header, no such member, or `null`: delivered unordered); an error saying why when it may have
/// one that cannot be read (a payload that is not JSON or nests deeper than the JSON reader goes, a
/// member that is an object or an array).
pub fn key_of(
    source: &KeySource,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<Option<MessageKey>, String> {
    let key = match source {
        KeySource::Header(name) => headers
            .and_then(|h| h.get(name.as_str()))
            .map(|v| v.as_str().to_owned()),
        KeySource::Json(pointer) => {
            let value = serde_json::from_slice::<serde_json::Value>(payload).map_err(|e| {
                format!("the payload is not JSON ({e}), so its key {pointer} cannot be read")
            })?;
            match value.pointer(pointer) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
                Some(other) => {
                    let what = if other.is_array() {
                        "an array"
                    } else {
                        "an object"
                    };
                    return Err(format!("its key {pointer} is {what}, not a value"));
                }
            }
        }
    };
    if key.is_none() {
        tracing::debug!("Message has no key; delivered without order.");
    }
    Ok(key.map(MessageKey))
}

/// The key a `Mend-Key-Token` stands for: a held key's (its hold entry has the key), else the key
/// the binding reads from the message itself, if its token is the one given.
pub(crate) fn key_of_token(
    rt: &BindingRuntime,
    token: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Option<MessageKey> {
    if let Some(key) = rt
        .holds
        .as_ref()
        .and_then(|holds| holds.key_of_token(token))
    {
        return Some(key);
    }
    let source = rt.cfg.key.as_ref()?;
    let key = key_of(source, headers, payload).ok()??;
    if key.token() == token {
        Some(key)
    } else {
        tracing::warn!(
            token,
            "Mend-Key-Token names no key known here; delivered without order."
        );
        None
    }
}

/// The delivery metadata and history of a message that carries its lineage in mend's headers (a
/// routed retry, or a message of a hold queue); `min_attempt` is 2 for retries, 1 for held messages.
pub(crate) fn meta_from(
    rt: &BindingRuntime,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    subject: &str,
    min_attempt: u32,
    fallback: LineageId,
) -> (DeliveryMeta, Vec<HistoryEntry>) {
    let read = h::ReadLineage::read(|name| headers?.get(name).map(|v| v.as_str()));
    let lineage = read.id.unwrap_or(fallback);
    let attempt = read.attempt.unwrap_or(min_attempt).max(min_attempt);
    let history = match read
        .history
        .as_deref()
        .map(repair_rules::envelope::read_history)
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
        key: read
            .key
            .or_else(|| key_of_token(rt, read.key_token.as_deref()?, headers, payload)),
        attempt,
        subject: read.original_subject.unwrap_or_else(|| subject.to_owned()),
        published: SystemTime::now(),
        repaired_by: read.repaired_by,
        resubmitted_by: read.resubmitted_by,
    };
    (meta, history)
}

pub(crate) fn queued_with(
    rt: &BindingRuntime,
    msg: StreamMessage,
    payload_object: Option<String>,
) -> Delivery {
    let fallback = LineageId::new(streams::HOLD, msg.sequence);
    let (meta, history) = meta_from(
        rt,
        Some(&msg.headers),
        &msg.payload,
        msg.subject.as_str(),
        1,
        fallback,
    );
    // A message whose own header block could not be read keeps that block in a header of its copy.
    let unreadable = header(&msg.headers, h::MEND_UNREADABLE_HEADERS)
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .map(|raw| {
            let why = crate::runtime::rescue::header_problem(&raw)
                .unwrap_or_else(|| "its header block was unreadable".to_owned());
            Box::new(crate::runtime::rescue::Unreadable {
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
        trace: otel::Span::none(),
    }
}

pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

/// The lineage a held message belongs to.
pub(crate) fn lineage_of(msg: &StreamMessage) -> String {
    header(&msg.headers, h::MEND_ID)
        .map(str::to_owned)
        .unwrap_or_else(|| LineageId::new(streams::HOLD, msg.sequence).to_string())
}

/// A message the dispatcher holds, and when it last told the server so.
pub(crate) struct Held {
    pub(crate) reply: ack::Reply,
    pub(crate) touched: Instant,
}
