//! Commands from the dashboard: parsed (or refused), and the partition whose instance must apply
//! one found from its original message's subject.

use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, ErrorCode, Message};
use repair_rules::{LineageId, MessageKey};

use super::inbox::{Router, reply_of};
use crate::common::ack;
use crate::runtime::config::BindingConfig;

/// A command on `mend.control.<service>`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ControlMessage {
    pub(crate) action: ControlAction,
    pub(crate) key: String,
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) binding: Option<String>,
    /// The subject of the message `id` in the app stream, when the sender knows it: routes the
    /// command of a partitioned binding without reading the app stream.
    #[serde(default)]
    pub(crate) subject: Option<String>,
    /// The partition that owns the key, when the sender knows it (the hold entry of a key names
    /// its partition): routes the command of a partitioned binding even when the message `id` is
    /// gone from the app stream (always, once acked, on a work-queue or interest stream).
    #[serde(default)]
    pub(crate) partition: Option<u32>,
    /// Who asked (the dashboard's user), for the logs.
    #[serde(default)]
    pub(crate) by: Option<String>,
    #[serde(default)]
    pub(crate) note: Option<String>,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ControlAction {
    Discard,
    Release,
}

/// A command understood: for which binding, key and lineage, and what to do.
pub(crate) struct Parsed {
    pub(crate) binding: usize,
    pub(crate) key: MessageKey,
    pub(crate) lineage: Option<LineageId>,
    pub(crate) command: repair_rules::holds::Command,
    pub(crate) cm: ControlMessage,
}

/// The binding, key, lineage and command of a control message.
pub(crate) fn parse_control(bindings: &[BindingConfig], msg: &Message) -> Result<Parsed, String> {
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
    let command = match (cm.action, &lineage) {
        (ControlAction::Discard, Some(l)) => repair_rules::holds::Command::Discard {
            lineage: l.to_string(),
        },
        (ControlAction::Discard, None) => return Err("a discard needs the message's `id`".into()),
        (ControlAction::Release, _) => repair_rules::holds::Command::Release,
    };
    if cm.key.is_empty() {
        return Err("`key` is empty".into());
    }
    if let Some(s) = &cm.subject
        && !repair_rules::rules::subject::is_valid_filter(s)
    {
        return Err(format!("`subject` {s:?} is not a subject"));
    }
    Ok(Parsed {
        binding: i,
        key: MessageKey(cm.key.clone()),
        lineage,
        command,
        cm,
    })
}

/// Terminates a malformed command: redelivering it would not make it one.
pub(crate) async fn refuse_control(router: &Router, msg: Message, reason: &str) {
    metrics::counter!(crate::common::telemetry::CONTROL_REFUSED, "service" => router.service.clone())
        .increment(1);
    tracing::error!(reason, payload = %String::from_utf8_lossy(&msg.payload), "Command refused.");
    if let Some(reply) = reply_of(router, &msg) {
        ack::terminate(&router.client, &reply).await;
    }
}

/// Why a command's partition is not known.
pub(crate) enum Unknown {
    /// It cannot be known: refuse the command.
    Refuse(String),
    /// The app stream could not be read now.
    NotNow(String),
}

/// The partition a command of partitioned binding `b` belongs to: that of the subject of the
/// message it is about (given in the command, or read from the app stream by its `id`).
pub(crate) async fn partition_of_command(
    router: &Router,
    b: &BindingConfig,
    parsed: &Parsed,
) -> Result<u32, Unknown> {
    if let Some(p) = parsed.cm.partition {
        if p < b.partitions {
            return Ok(p);
        }
        return Err(Unknown::Refuse(format!(
            "binding {} has {} partitions, not a partition {p}",
            b.name, b.partitions
        )));
    }
    let subject = match (&parsed.cm.subject, &parsed.lineage) {
        (Some(subject), _) => subject.clone(),
        (None, Some(lineage)) => original_subject(&router.js, lineage).await?,
        (None, None) => {
            return Err(Unknown::Refuse(format!(
                "binding {} is partitioned: a command needs the `id` of a message to find the \
                 partition that owns key `{}`",
                b.name, parsed.cm.key
            )));
        }
    };
    b.partition_of(&subject).ok_or_else(|| {
        Unknown::Refuse(format!(
            "the subject {subject} of the command's message is in no partition of binding {}",
            b.name
        ))
    })
}

/// The subject of `lineage`'s original message, read from the app stream.
pub(crate) async fn original_subject(
    js: &jetstream::Context,
    lineage: &LineageId,
) -> Result<String, Unknown> {
    let gone = |why: &str| {
        Unknown::Refuse(format!(
            "cannot tell which partition owns message {lineage}: {why}"
        ))
    };
    let stream = js
        .get_stream_no_info(&lineage.stream)
        .await
        .map_err(|e| gone(&format!("{e}")))?;
    match stream.get_raw_message(lineage.seq).await {
        Ok(message) => Ok(message.subject.to_string()),
        Err(e) => match e.kind() {
            RawMessageErrorKind::NoMessageFound => Err(gone(&format!(
                "it is gone from stream {} (limits or work-queue retention removed it)",
                lineage.stream
            ))),
            RawMessageErrorKind::JetStream(js_error)
                if js_error.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Err(gone(&format!("stream {} does not exist", lineage.stream)))
            }
            RawMessageErrorKind::InvalidSubject => Err(gone(&format!("{e}"))),
            _ => Err(Unknown::NotNow(format!(
                "cannot read message {lineage} from stream {}: {e}",
                lineage.stream
            ))),
        },
    }
}
