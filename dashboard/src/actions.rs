//! What a person does to a parked message or a hold, shared by the web UI and the API: resubmit
//! (optionally with an edited payload), discard, release. Each publishes first and waits for
//! JetStream to store it; only then does the status change, with its audit record, in one
//! transaction. A publish that is not confirmed changes nothing and says so.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use axum::http::StatusCode;
use base64::Engine as _;
use bytes::Bytes;
use repair_rules::headers as h;
use repair_rules::holds::Hold;
use repair_rules::identity::subjects;
use repair_rules::{FailureEnvelope, HistoryEntry};
use serde_json::{Value, json};

use crate::app::{ApiError, AppState, Principal};
use crate::auth::Role;
use crate::store::{Audit, Changed, Message, Status, now_ms};

/// Header carrying a lineage's history on a retry (as the processor sends it).
pub const MEND_HISTORY: &str = "Mend-History";
/// How long a publish may wait for JetStream's confirmation.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// A new payload for a resubmission.
#[derive(Debug, Clone)]
pub enum Edit {
    /// A JSON value (the API's `payload`).
    Json(Value),
    /// Text from the edit form: parsed as JSON when the message was JSON, sent as it is otherwise.
    Text(String),
}

/// Resubmits parked message `id` (at the attempt the person saw, when given) to its service's retry
/// subject with the same `Mend-Id`, attempt + 1 and `Mend-Resubmitted-By`.
pub async fn resubmit(
    state: &AppState,
    who: &Principal,
    id: &str,
    seen_attempt: Option<u32>,
    edit: Option<Edit>,
    note: Option<&str>,
) -> Result<Message, ApiError> {
    who.require(Role::Operator)?;
    let m = parked(state, id, seen_attempt).await?;
    let env = &m.envelope;
    let original = payload_text(state, env).await?;
    let (body, edited, is_json) = match edit {
        None => (original.bytes.clone(), None, original.is_json),
        Some(Edit::Json(v)) => {
            let text = v.to_string();
            (Bytes::from(text.clone()), Some(text), true)
        }
        Some(Edit::Text(t)) => {
            if original.is_json {
                let v: Value = serde_json::from_str(&t).map_err(|e| {
                    ApiError::invalid(format!(
                        "The payload is not valid JSON: {e}. Nothing was sent."
                    ))
                })?;
                let text = v.to_string();
                (Bytes::from(text.clone()), Some(text), true)
            } else {
                (Bytes::from(t.clone()), Some(t), false)
            }
        }
    };
    let attempt = m.attempt.checked_add(1).ok_or_else(|| {
        ApiError::conflict(format!(
            "attempt {} of {id} is the last one counted; it cannot be resubmitted",
            m.attempt
        ))
    })?;
    let lineage = env.lineage();
    let step = HistoryEntry {
        at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        what: "resubmitted".into(),
        by: who.name.clone(),
        error: None,
        note: note.map(str::to_owned),
    };
    // The envelope as resubmitted: what the dashboard shows from now on.
    let mut sent = env.clone();
    sent.history.push(step);
    repair_rules::envelope::bound_history(&mut sent.history, repair_rules::envelope::HISTORY_LIMIT);
    if let Some(text) = &edited {
        if is_json {
            sent.payload = serde_json::from_str(text).unwrap_or(Value::Null);
            sent.payload_base64 = None;
        } else {
            sent.payload = Value::Null;
            sent.payload_base64 = Some(base64::engine::general_purpose::STANDARD.encode(text));
        }
        sent.payload_ref = None;
    }
    let mut headers = HeaderMap::new();
    for (name, values) in &env.headers {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("mend-") || lower.starts_with("nats-") || lower == "content-type" {
            continue;
        }
        for v in values {
            headers.append(name.as_str(), v.as_str());
        }
    }
    if is_json {
        headers.insert("Content-Type", "application/json");
    } else if let Some(ct) = env
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .and_then(|(_, v)| v.first())
    {
        headers.insert("Content-Type", ct.as_str());
    }
    headers.insert(h::MEND_ID, env.id.as_str());
    headers.insert(h::MEND_SERVICE, env.service.as_str());
    headers.insert(h::MEND_ATTEMPT, attempt.to_string().as_str());
    headers.insert(h::MEND_RESUBMITTED_BY, h::encode_value(&who.name).as_ref());
    headers.insert(h::MEND_ORIGINAL_SUBJECT, env.subject.as_str());
    if let Some(key) = &env.key {
        let (name, value) = h::key_header(&repair_rules::MessageKey(key.clone()));
        headers.insert(name, value.as_str());
    }
    headers.insert(
        MEND_HISTORY,
        serde_json::to_string(&sent.history)
            .unwrap_or_default()
            .as_str(),
    );
    publish(
        state,
        subjects::retry(&env.service),
        &lineage.msg_id(attempt, "retry"),
        headers,
        body,
    )
    .await?;
    announce(
        state,
        env,
        "resubmitted",
        attempt,
        json!({"by": who.name, "note": note, "edited": edited.is_some(), "key": env.key, "subject": env.subject}),
    )
    .await?;
    let audit = Audit {
        actor: &who.name,
        action: if edited.is_some() {
            "edit_and_resubmit"
        } else {
            "resubmit"
        },
        message_id: Some(&env.id),
        service: Some(&env.service),
        key: env.key.as_deref(),
        note,
        before: edited.as_ref().map(|_| original.text.as_str()),
        after: edited.as_deref(),
    };
    let change = state
        .store
        .mark_resubmitted(&env.id, m.attempt, &sent, &audit, now_ms())
        .await?;
    changed(state, change, id).await
}

/// Discards parked message `id` with a note. A head of a held key is discarded on its sidecar
/// (`mend.control.<service>`), which releases the key's held messages.
pub async fn discard(
    state: &AppState,
    who: &Principal,
    id: &str,
    seen_attempt: Option<u32>,
    note: Option<&str>,
) -> Result<Message, ApiError> {
    who.require(Role::Operator)?;
    let m = parked(state, id, seen_attempt).await?;
    let env = &m.envelope;
    if let Some(key) = &env.key {
        let command = json!({
            "action": "discard", "key": key, "id": env.id, "binding": env.binding,
            "subject": env.subject, "by": who.name, "note": note,
        });
        publish(
            state,
            subjects::control(&env.service),
            &env.lineage().msg_id(m.attempt, "discard"),
            json_headers(),
            Bytes::from(command.to_string()),
        )
        .await?;
    }
    announce(
        state,
        env,
        "discarded",
        m.attempt,
        json!({"by": who.name, "note": note, "key": env.key, "subject": env.subject}),
    )
    .await?;
    let audit = Audit {
        actor: &who.name,
        action: "discard",
        message_id: Some(&env.id),
        service: Some(&env.service),
        key: env.key.as_deref(),
        note,
        before: None,
        after: None,
    };
    let change = state
        .store
        .mark_discarded(&env.id, m.attempt, &audit, now_ms())
        .await?;
    changed(state, change, id).await
}

/// Releases a held key: its held messages are delivered without waiting for the head, which stays
/// parked (an explicit, audited choice to give up order for that key).
pub async fn release(
    state: &AppState,
    who: &Principal,
    hold: &Hold,
    note: Option<&str>,
) -> Result<(), ApiError> {
    who.require(Role::Operator)?;
    // The hold names the partition that owns the key: the sidecars need not look the head up in
    // the app stream, where it may be gone.
    let command = json!({
        "action": "release", "key": hold.key, "id": hold.head, "binding": hold.binding,
        "partition": hold.partition, "by": who.name, "note": note,
    });
    // Each click is its own command; releasing a key that is no longer held changes nothing.
    let msg_id = format!("release:{}:{}:{}", hold.service, hold.head, now_ms());
    publish(
        state,
        subjects::control(&hold.service),
        &msg_id,
        json_headers(),
        Bytes::from(command.to_string()),
    )
    .await?;
    state
        .store
        .record(
            &Audit {
                actor: &who.name,
                action: "release",
                message_id: Some(&hold.head),
                service: Some(&hold.service),
                key: Some(&hold.key),
                note,
                before: None,
                after: None,
            },
            now_ms(),
        )
        .await?;
    Ok(())
}

/// The message, which must be parked (at `seen_attempt`, when given).
async fn parked(
    state: &AppState,
    id: &str,
    seen_attempt: Option<u32>,
) -> Result<Message, ApiError> {
    let m = state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    if m.status != Status::Parked {
        return Err(ApiError::conflict(format!(
            "message {id} is {}, not parked",
            m.status
        )));
    }
    if let Some(seen) = seen_attempt
        && seen != m.attempt
    {
        return Err(ApiError::conflict(format!(
            "message {id} failed again since it was shown (attempt {} now, {seen} then); look again",
            m.attempt
        )));
    }
    Ok(m)
}

/// The message after its status change, or why the change did not happen.
async fn changed(state: &AppState, c: Changed, id: &str) -> Result<Message, ApiError> {
    match c {
        Changed::Done => state
            .store
            .get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no message {id}"))),
        Changed::Missing => Err(ApiError::not_found(format!("no message {id}"))),
        Changed::Conflict(now) => Err(ApiError::conflict(format!(
            "message {id} changed meanwhile: it is {now}"
        ))),
    }
}

/// A message's payload as it would be sent again.
pub struct Payload {
    pub bytes: Bytes,
    /// Shown in the UI and audit: the JSON, the text, or base64 of bytes that are not text.
    pub text: String,
    pub is_json: bool,
}

/// The payload of `env`: the JSON in it, its raw bytes, or, for one too large for the envelope,
/// the original message read back from the app stream.
pub async fn payload_text(state: &AppState, env: &FailureEnvelope) -> Result<Payload, ApiError> {
    if let Some(b64) = &env.payload_base64 {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::invalid(format!("the stored payload is not base64: {e}")))?;
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t.to_owned(),
            Err(_) => b64.clone(),
        };
        return Ok(Payload {
            bytes: Bytes::from(bytes),
            text,
            is_json: false,
        });
    }
    if let Some(object) = env.payload_ref.as_ref().and_then(|r| r.object.as_deref()) {
        let bytes = read_object(state, object).await?;
        let is_json = serde_json::from_slice::<Value>(&bytes).is_ok();
        return Ok(Payload {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            is_json,
        });
    }
    if let Some(r) = &env.payload_ref {
        let stream = state.js.get_stream(&r.stream).await.map_err(|e| {
            ApiError::unavailable(format!(
                "cannot read stream {} for the payload: {e}",
                r.stream
            ))
        })?;
        let raw = stream.get_raw_message(r.seq).await.map_err(|e| {
            ApiError::new(
                StatusCode::GONE,
                "gone",
                format!(
                    "the original message {}:{} is no longer in its stream: {e}",
                    r.stream, r.seq
                ),
            )
        })?;
        let bytes = raw.payload;
        let is_json = serde_json::from_slice::<Value>(&bytes).is_ok();
        return Ok(Payload {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            is_json,
        });
    }
    let text = env.payload.to_string();
    Ok(Payload {
        bytes: Bytes::from(text.clone()),
        text,
        is_json: true,
    })
}

fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers
}

/// Publishes with a de-duplicating id and waits for JetStream to store it.
async fn publish(
    state: &AppState,
    subject: String,
    msg_id: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(), ApiError> {
    let message = PublishMessage::build()
        .payload(body)
        .headers(headers)
        .message_id(msg_id);
    let stored = async {
        state
            .js
            .send_publish(subject.clone(), message)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(PUBLISH_TIMEOUT, stored).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ApiError::unavailable(format!(
            "NATS did not store the message on {subject}: {e}; nothing changed"
        ))),
        Err(_) => Err(ApiError::unavailable(format!(
            "NATS did not confirm the message on {subject} within {}s; nothing changed",
            PUBLISH_TIMEOUT.as_secs()
        ))),
    }
}

/// Announces a person's action on MEND_EVENTS (CloudEvents, as every mend component does).
async fn announce(
    state: &AppState,
    env: &FailureEnvelope,
    kind: &str,
    attempt: u32,
    data: Value,
) -> Result<(), ApiError> {
    let lineage = env.lineage();
    let id = lineage.msg_id(attempt, kind);
    let mut data = data;
    if let Value::Object(map) = &mut data {
        map.insert("service".into(), json!(env.service));
        map.insert("id".into(), json!(env.id));
        map.insert("attempt".into(), json!(attempt));
    }
    let event = json!({
        "specversion": "1.0",
        "id": id,
        "source": "urn:mend:dashboard",
        "type": format!("mend.{kind}"),
        "subject": env.id,
        "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "datacontenttype": "application/json",
        "data": data,
    });
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    headers.insert(h::MEND_ID, env.id.as_str());
    publish(
        state,
        subjects::event(&env.service, kind),
        &id,
        headers,
        Bytes::from(event.to_string()),
    )
    .await
}

/// The bytes of the object `name` of the bucket `mend_payloads` (a payload too large for its
/// envelope).
async fn read_object(state: &AppState, name: &str) -> Result<Bytes, ApiError> {
    use tokio::io::AsyncReadExt;
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::unavailable(format!("cannot read the payload {name}: {e}"))
    };
    let bucket = state
        .js
        .get_object_store("mend_payloads")
        .await
        .map_err(|e| unavailable(&e))?;
    let mut object = match bucket.get(name).await {
        Ok(object) => object,
        Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return Err(ApiError::new(
                StatusCode::GONE,
                "gone",
                format!("the payload {name} is no longer in the bucket mend_payloads"),
            ));
        }
        Err(e) => return Err(unavailable(&e)),
    };
    let mut bytes = Vec::new();
    object
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(Bytes::from(bytes))
}
