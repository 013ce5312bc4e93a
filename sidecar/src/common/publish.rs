//! Publishing that survives crashes and reconnects, shared by every role: a message is published with
//! a de-duplicating `Nats-Msg-Id` and retried until JetStream acknowledges it; announcements go to
//! MEND_EVENTS as CloudEvents (structured JSON).

use std::time::SystemTime;

use async_nats::jetstream::Context;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use repair_rules::LineageId;
use repair_rules::headers as h;
use repair_rules::identity::subjects;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::common::backoff::{RETRY_MIN, Stopped, back_off};

/// Why something could not be handed on; either way the message being worked on stays unacked.
#[derive(Debug, thiserror::Error)]
pub enum NotStored {
    /// Stopping before the publish was acknowledged.
    #[error("stopping before the publish was acknowledged")]
    Stopped,
    /// The message exceeds the server's max_payload even in its smallest form. It is redelivered
    /// after its ack wait and fails the same way: an operator has to look.
    #[error("the message is too large to publish")]
    Unpublishable,
}

impl From<Stopped> for NotStored {
    fn from(_: Stopped) -> Self {
        NotStored::Stopped
    }
}

/// The outcome of one durable publish.
pub enum Published {
    /// Stored; `duplicate` when JetStream had it already (the same `Nats-Msg-Id` in its window).
    Stored { duplicate: bool },
    /// Over the server's max_payload: the caller may try a smaller form.
    TooLarge,
}

/// Publishes with `msg_id` and awaits the JetStream ack, retrying with backoff (across reconnects and
/// server restarts) until it is stored or `shutdown` is cancelled.
pub async fn durably(
    js: &Context,
    shutdown: &CancellationToken,
    subject: &str,
    msg_id: &str,
    headers: async_nats::HeaderMap,
    body: Bytes,
) -> Result<Published, NotStored> {
    durably_with(js, shutdown, subject, msg_id, || headers.clone(), body).await
}

/// [`durably`] with the headers built by `headers` for each try: a caller that builds them anyway
/// saves a copy of the whole map per publish (the client takes the map it sends).
pub async fn durably_with(
    js: &Context,
    shutdown: &CancellationToken,
    subject: &str,
    msg_id: &str,
    headers: impl Fn() -> async_nats::HeaderMap,
    body: Bytes,
) -> Result<Published, NotStored> {
    durably_on(js, &js.client(), shutdown, subject, msg_id, headers, body).await
}

/// [`durably_with`] for a caller that holds `js`'s client: `Context::client` clones it (a few
/// atomic counts up and down), which was ~2.5% of the processor's CPU at one call per failure.
pub async fn durably_on(
    js: &Context,
    client: &async_nats::Client,
    shutdown: &CancellationToken,
    subject: &str,
    msg_id: &str,
    headers: impl Fn() -> async_nats::HeaderMap,
    body: Bytes,
) -> Result<Published, NotStored> {
    let mut pause = RETRY_MIN;
    loop {
        // While the connection is down, nothing is handed to the client: it would keep every try
        // and send them all once it reconnects, also after this publish was given up (a binding
        // that lost its lease stops retrying; what it queued would still land).
        if client.connection_state() != async_nats::connection::State::Connected {
            // Looked at often, so the publish goes out soon after the connection is back.
            let mut poll = RETRY_MIN;
            back_off(shutdown, &mut poll).await?;
            continue;
        }
        let message = PublishMessage::build()
            .payload(body.clone())
            .headers(headers())
            .message_id(msg_id);
        let result = match js.send_publish(subject.to_owned(), message).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => {
                return Ok(Published::Stored {
                    duplicate: ack.duplicate,
                });
            }
            Err(e)
                if e.kind() == PublishErrorKind::MaxPayloadExceeded || refused_as_too_large(&e) =>
            {
                return Ok(Published::TooLarge);
            }
            Err(error) => tracing::warn!(%error, subject, "Publish not acknowledged; retrying."),
        }
        back_off(shutdown, &mut pause).await?;
    }
}

/// JetStream's refusals of a message for its size, which no retry changes: a header block over
/// 64 KiB (10097), a message over the stream's own `max_msg_size` (10054).
fn refused_as_too_large(error: &async_nats::jetstream::context::PublishError) -> bool {
    crate::common::nats::api_error(error)
        .is_some_and(|api| matches!(api.error_code().0, 10054 | 10097))
}

/// One announcement on `mend.events.<service>.<kind>`.
pub struct Event<'a> {
    pub service: &'a str,
    /// Who announces, as a URI reference (`urn:mend:sidecar:orders:orders`).
    pub source: String,
    pub kind: &'a str,
    pub lineage: &'a LineageId,
    pub attempt: u32,
    /// The event's `data` (an object); `service`, `id` and `attempt` are added, so it must not hold them.
    pub data: Value,
}

/// Announces `event`, stored before the caller acks what it worked on. Its CloudEvents `id` is
/// `<lineage>:<attempt>:<kind>`, also its `Nats-Msg-Id`, so a repeat after a crash is dropped.
pub async fn announce(
    js: &Context,
    shutdown: &CancellationToken,
    event: Event<'_>,
) -> Result<(), NotStored> {
    let id = event.lineage.msg_id(event.attempt, event.kind);
    let lineage = event.lineage.to_string();
    let body = CloudEvent {
        specversion: "1.0",
        id: &id,
        source: &event.source,
        kind: format!("mend.{}", event.kind),
        subject: &lineage,
        time: now(),
        datacontenttype: "application/json",
        data: EventData {
            service: event.service,
            id: &lineage,
            attempt: event.attempt,
            extra: match &event.data {
                Value::Object(extra) => Some(extra),
                _ => None,
            },
        },
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    headers.insert(h::MEND_ID, lineage.as_str());
    let subject = subjects::event(event.service, event.kind);
    match durably(js, shutdown, &subject, &id, headers, to_bytes(&body)).await? {
        Published::Stored { .. } => Ok(()),
        Published::TooLarge => {
            tracing::warn!(kind = event.kind, "Event too large to announce; skipped.");
            Ok(())
        }
    }
}

/// A CloudEvents 1.0 event in the structured JSON format, written without building a JSON tree.
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: String,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: EventData<'a>,
}

/// An event's `data`: the lineage's service, id and attempt, then the announcer's fields.
#[derive(Serialize)]
struct EventData<'a> {
    service: &'a str,
    id: &'a str,
    attempt: u32,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    extra: Option<&'a serde_json::Map<String, Value>>,
}

/// JSON bytes of a value that always serializes (string keys, finite numbers from JSON input).
pub fn to_bytes(value: &impl serde::Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// Now, RFC 3339 in UTC with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The most bytes an envelope may take on `client`'s server: its max_payload, less room for the
/// envelope's NATS headers (a key header takes up to 4 KiB).
pub fn envelope_limit(client: &async_nats::Client) -> usize {
    client
        .server_info()
        .max_payload
        .saturating_sub(repair_rules::headers::MAX_KEY_HEADER_BYTES + 4096)
}
