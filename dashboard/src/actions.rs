//! What a person does to a parked message or a hold, shared by the web UI and the API: resubmit
//! (optionally with an edited payload), discard, release. An action on a message is first taken in
//! the store as that message's one action (a resubmission and a discard of one message cannot both
//! happen), then published, and only once JetStream has stored it is the status changed, with the
//! audit of what was sent, in one transaction. Answers say what happened: stored, not stored
//! (nothing changed), or unknown (not confirmed in time: found out later by sending the very same
//! de-duplicated message again, then recorded).

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
use crate::store::{Audit, Changed, Claim, Message, Outgoing, Plan, Status, now_ms};
use crate::trace;

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
        attempt: Some(attempt),
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
        if !h::is_carried(name) || name.eq_ignore_ascii_case("content-type") {
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
    let key = env.key.clone().map(repair_rules::MessageKey);
    h::Lineage {
        id: &env.id,
        service: &env.service,
        attempt,
        original_subject: &env.subject,
        key: key.as_ref(),
        repaired_by: None,
        resubmitted_by: Some(&h::encode_value(&who.name)),
        hold_since: None,
        history: Some(&serde_json::to_string(&sent.history).unwrap_or_default()),
    }
    .write(|name, value| headers.insert(name, value));
    // The resubmission as a producer span of the message's trace (the trace context its headers
    // carried when it failed), days later or not; its delivery continues under it.
    let span = tracing::info_span!(
        target: trace::TARGET,
        "resubmit",
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.destination.name = %subjects::retry(&env.service),
        mend.id = %env.id,
        mend.attempt = attempt,
        mend.service = %env.service,
        mend.by = %who.name,
        mend.edited = edited.is_some(),
    );
    trace::set_parent(&span, || trace::parent_in(&env.headers));
    // Linked to the attempt it follows: the span that parked it.
    if !span.is_disabled() {
        match state.store.parking_trace(&env.id, m.attempt).await {
            Ok(Some(parked)) => trace::link(
                &span,
                &parked,
                vec![opentelemetry::KeyValue::new(
                    "mend.attempt",
                    i64::from(m.attempt),
                )],
            ),
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "The parked attempt's trace is not read."),
        }
    }
    trace::inject_nats(&span, &mut headers);
    let (headers, body) =
        by_reference_if_too_large(state, &lineage, attempt, headers, body).await?;
    let plan = Plan {
        message_id: env.id.clone(),
        attempt: m.attempt,
        action: if edited.is_some() {
            "edit_and_resubmit"
        } else {
            "resubmit"
        }
        .into(),
        actor: who.name.clone(),
        note: note.map(str::to_owned),
        service: env.service.clone(),
        key: env.key.clone(),
        publish: Some(outgoing(
            subjects::retry(&env.service),
            lineage.msg_id(attempt, "retry"),
            &headers,
            &body,
        )),
        sent: Some(sent),
        before: edited.as_ref().map(|_| original.text.clone()),
        after: edited,
    };
    carry_out(state, plan).await
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
    let span = tracing::info_span!(
        target: trace::TARGET,
        "discard",
        mend.id = %env.id,
        mend.attempt = m.attempt,
        mend.service = %env.service,
        mend.by = %who.name,
    );
    trace::set_parent(&span, || trace::parent_in(&env.headers));
    let publish = env.key.as_ref().map(|key| {
        let command = json!({
            "action": "discard", "key": key, "id": env.id, "binding": env.binding,
            "subject": env.subject, "by": who.name, "note": note,
        });
        let mut headers = json_headers();
        trace::inject_nats(&span, &mut headers);
        outgoing(
            subjects::control(&env.service),
            env.lineage().msg_id(m.attempt, "discard"),
            &headers,
            command.to_string().as_bytes(),
        )
    });
    let plan = Plan {
        message_id: env.id.clone(),
        attempt: m.attempt,
        action: "discard".into(),
        actor: who.name.clone(),
        note: note.map(str::to_owned),
        service: env.service.clone(),
        key: env.key.clone(),
        publish,
        sent: None,
        before: None,
        after: None,
    };
    carry_out(state, plan).await
}

/// Carries out a person's action: takes it as the message's one action in the store, publishes
/// it, and records what was published. What the answer says is what happened:
/// - stored: the new status, with the audit of what was sent;
/// - not stored: nothing changed (503), and the message is free again;
/// - not confirmed in time: the outcome is unknown (504); the message stays taken until the
///   dashboard finds out ([`settle`]) and records it;
/// - another action pending on the message: 409, saying whose, or, when that one's outcome was
///   unknown, finding it out first and saying what it did;
/// - JetStream already held this very message (a duplicate, sent by something the store has no
///   record of): 409, nothing recorded.
async fn carry_out(state: &AppState, plan: Plan) -> Result<Message, ApiError> {
    let id = plan.message_id.clone();
    let started_at = match state.store.claim_action(&plan, now_ms()).await? {
        Claim::Taken { started_at } => started_at,
        Claim::Missing => return Err(ApiError::not_found(format!("no message {id}"))),
        Claim::Conflict { status, attempt } => {
            return Err(if status == Status::Parked {
                ApiError::conflict(format!(
                    "message {id} failed again since it was shown (attempt {attempt} now, {} then); look again",
                    plan.attempt
                ))
            } else {
                ApiError::conflict(format!("message {id} changed meanwhile: it is {status}"))
            });
        }
        Claim::Pending {
            plan: other,
            started_at,
        } => return Err(pending(state, &other, started_at).await),
    };
    if let Some(out) = &plan.publish {
        match send(state, out).await {
            Sent::Stored => {}
            Sent::Duplicate => {
                let _ = state.store.drop_action(&id, started_at).await;
                return Err(ApiError::conflict(format!(
                    "NATS already holds {} (message id {}), sent before by an action this \
                     dashboard has no record of; yours was not sent again and nothing was recorded",
                    what(&plan),
                    out.msg_id
                )));
            }
            Sent::NotStored(e) => {
                if let Err(error) = state.store.drop_action(&id, started_at).await {
                    tracing::warn!(%error, id, "Cannot let go of an action that was not sent; it is settled later.");
                }
                return Err(ApiError::unavailable(format!(
                    "NATS did not store {} on {}: {e}; nothing changed",
                    what(&plan),
                    out.subject
                )));
            }
            Sent::Unknown => {
                tracing::warn!(
                    id,
                    action = plan.action,
                    "An action's publish was not confirmed in time; its outcome is found out later."
                );
                return Err(ApiError::unknown(format!(
                    "NATS did not confirm {} within {}s: it may or may not have been stored. \
                     Message {id} stays taken by this action; within {}s the dashboard finds out \
                     and records what happened. Look again then.",
                    what(&plan),
                    state.settings.publish_timeout.as_secs(),
                    claim_ttl(state).as_secs()
                )));
            }
        }
    }
    record(state, &plan, started_at)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))
}

/// How long an action's claim on its message stands before its outcome is found out.
pub fn claim_ttl(state: &AppState) -> Duration {
    state.settings.publish_timeout.saturating_mul(3)
}

/// The answer to an action on a message another action holds: busy while that one is young;
/// once it is stale (its outcome was unknown), that outcome is found out and recorded first, and
/// the answer says what it did.
async fn pending(state: &AppState, other: &Plan, started_at: i64) -> ApiError {
    let age = Duration::from_millis(u64::try_from(now_ms() - started_at).unwrap_or(0));
    if age < claim_ttl(state) {
        return ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            format!(
                "{} by {} on message {} is under way (for {}s); look again in a moment",
                other.action,
                other.actor,
                other.message_id,
                age.as_secs()
            ),
        );
    }
    match settle(state, other, started_at).await {
        Ok(()) => ApiError::conflict(format!(
            "message {} was already acted on: {} by {}{} (its outcome was not confirmed at the \
             time, and is now); yours was not sent",
            other.message_id,
            other.action,
            other.actor,
            other
                .after
                .as_deref()
                .map(|p| format!(", sending the payload {p}"))
                .unwrap_or_default()
        )),
        Err(e) => e,
    }
}

/// Finds out what became of an action whose publish was not confirmed, and records it. While its
/// message is still where the action found it, the very same message is sent again: JetStream
/// answers a duplicate if the first was stored, or stores it now; either way it is sent, and
/// recorded as the action of the person who asked for it. A message that moved on was moved by
/// that action (only a person's action takes a parked message further), so it is recorded as is.
pub async fn settle(state: &AppState, plan: &Plan, started_at: i64) -> Result<(), ApiError> {
    let id = &plan.message_id;
    let m = state.store.get(id).await?;
    let untouched = m
        .as_ref()
        .is_some_and(|m| m.status == Status::Parked && m.attempt == plan.attempt);
    if untouched && let Some(out) = &plan.publish {
        match send(state, out).await {
            Sent::Stored | Sent::Duplicate => {}
            Sent::NotStored(e) => {
                return Err(ApiError::unavailable(format!(
                    "an earlier {} by {} on message {id} has an unknown outcome, and NATS cannot \
                     tell now: {e}; nothing was sent",
                    plan.action, plan.actor
                )));
            }
            Sent::Unknown => {
                return Err(ApiError::unknown(format!(
                    "an earlier {} by {} on message {id} has an unknown outcome, and NATS did not \
                     answer now either; nothing was sent",
                    plan.action, plan.actor
                )));
            }
        }
    }
    tracing::info!(id, action = plan.action, actor = ?plan.actor, "An action whose outcome was unknown is recorded as sent.");
    record(state, plan, started_at).await.map(|_| ())
}

/// Settles the actions whose claims are older than their time (the dashboard stopped, or NATS did
/// not confirm), every so often, so their outcome is recorded without anyone acting again.
pub async fn settle_stale(state: &AppState, shutdown: &tokio_util::sync::CancellationToken) {
    let every = claim_ttl(state);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let before = now_ms() - i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
        let stale = match state.store.stale_actions(before).await {
            Ok(stale) => stale,
            Err(error) => {
                tracing::warn!(%error, "Cannot read the actions whose outcome is unknown.");
                continue;
            }
        };
        for (plan, started_at) in stale {
            if let Err(e) = settle(state, &plan, started_at).await {
                tracing::warn!(
                    id = plan.message_id,
                    error = e.message,
                    "An action's outcome is still unknown."
                );
            }
        }
    }
}

/// Records a published action (status, audit, end of its claim) and announces it. The
/// announcement is best effort: what was sent was sent, whether or not others hear of it. Returns
/// the message as it is now.
async fn record(
    state: &AppState,
    plan: &Plan,
    started_at: i64,
) -> Result<Option<Message>, ApiError> {
    let changed = state
        .store
        .finish_action(plan, started_at, now_ms())
        .await
        .map_err(|e| {
            tracing::error!(error = %e, id = plan.message_id, "An action was sent but cannot be recorded.");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "not_recorded",
                format!(
                    "{} was sent, but the store failed to record it: {e}; it is recorded when the \
                     store answers again",
                    what(plan)
                ),
            )
        })?;
    if changed != Changed::Done {
        tracing::info!(
            id = plan.message_id,
            ?changed,
            "An action was recorded after its message moved on."
        );
    }
    let m = state.store.get(&plan.message_id).await?;
    if let Some(m) = &m {
        let env = plan.sent.as_ref().unwrap_or(&m.envelope);
        let (kind, attempt, data) = match &plan.sent {
            Some(_) => (
                "resubmitted",
                plan.attempt.saturating_add(1),
                json!({"by": plan.actor, "note": plan.note, "edited": plan.after.is_some(), "key": env.key, "subject": env.subject}),
            ),
            None => (
                "discarded",
                plan.attempt,
                json!({"by": plan.actor, "note": plan.note, "key": env.key, "subject": env.subject}),
            ),
        };
        if let Err(e) = announce(state, env, kind, attempt, data).await {
            tracing::warn!(
                id = plan.message_id,
                kind,
                error = e.message,
                "An action was recorded but not announced on MEND_EVENTS."
            );
        }
    }
    Ok(m)
}

/// A few words on what an action publishes, for answers.
fn what(plan: &Plan) -> String {
    match (&plan.sent, &plan.after) {
        (Some(_), Some(_)) => format!(
            "the edited resubmission of {} (attempt {})",
            plan.message_id,
            plan.attempt.saturating_add(1)
        ),
        (Some(_), None) => format!(
            "the resubmission of {} (attempt {})",
            plan.message_id,
            plan.attempt.saturating_add(1)
        ),
        (None, _) => format!("the discard of {}", plan.message_id),
    }
}

fn outgoing(subject: String, msg_id: String, headers: &HeaderMap, body: &[u8]) -> Outgoing {
    let headers = headers
        .iter()
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |v| (name.to_owned(), v.as_str().to_owned()))
        })
        .collect();
    Outgoing {
        subject,
        msg_id,
        headers,
        body: base64::engine::general_purpose::STANDARD.encode(body),
    }
}

/// What became of a publish.
enum Sent {
    Stored,
    /// JetStream had a message with this id already (within its duplicate window).
    Duplicate,
    /// Known not to be stored.
    NotStored(String),
    /// Not confirmed in time: it may have been stored.
    Unknown,
}

async fn send(state: &AppState, out: &Outgoing) -> Sent {
    let mut headers = HeaderMap::new();
    for (name, value) in &out.headers {
        headers.append(name.as_str(), value.as_str());
    }
    let body = match base64::engine::general_purpose::STANDARD.decode(&out.body) {
        Ok(body) => Bytes::from(body),
        Err(e) => return Sent::NotStored(format!("the kept message cannot be read: {e}")),
    };
    let message = PublishMessage::build()
        .payload(body)
        .headers(headers)
        .message_id(out.msg_id.as_str());
    let ack = async {
        state
            .js
            .send_publish(out.subject.clone(), message)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(state.settings.publish_timeout, ack).await {
        Ok(Ok(ack)) if ack.duplicate => Sent::Duplicate,
        Ok(Ok(_)) => Sent::Stored,
        Ok(Err(e)) => Sent::NotStored(e),
        Err(_) => Sent::Unknown,
    }
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
    if let Some(r) = &env.payload_ref
        && (r.stream != env.stream
            || r.seq != env.seq
            || r.object
                .as_deref()
                .is_some_and(|o| !crate::payloads::is_object_of(o, &env.lineage())))
    {
        // Only the envelope's own original, or its own lineage's objects, are read.
        return Err(ApiError::invalid(format!(
            "the envelope of {} refers to a payload of another message ({}:{}{}); it is not read",
            env.id,
            r.stream,
            r.seq,
            r.object
                .as_deref()
                .map(|o| format!(", object {o}"))
                .unwrap_or_default()
        )));
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

/// A resubmission whose payload and headers together pass the server's max_payload (a payload at the
/// limit already, read back from `mend_payloads`, or edited to grow) goes by reference: its payload
/// is kept as an object, and the retry names it in `Mend-Payload-Object` with an empty payload.
async fn by_reference_if_too_large(
    state: &AppState,
    lineage: &repair_rules::LineageId,
    attempt: u32,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<(HeaderMap, Bytes), ApiError> {
    // The header block as NATS writes it: `NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`; plus
    // room for the de-duplicating id and the reference itself.
    let header_block: usize = 12
        + headers
            .iter()
            .map(|(n, vs)| {
                let name: &str = n.as_ref();
                vs.iter()
                    .map(|v| name.len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum::<usize>();
    let room = state.client.server_info().max_payload;
    if body.len() + header_block + 256 <= room {
        return Ok((headers, body));
    }
    let name = crate::payloads::object_name(lineage, attempt, "resubmitted");
    crate::payloads::put(&state.js, &name, &body)
        .await
        .map_err(|e| {
            ApiError::unavailable(format!(
                "cannot keep the payload ({} bytes) in mend_payloads: {e:#}; nothing changed",
                body.len()
            ))
        })?;
    headers.insert(crate::payloads::MEND_PAYLOAD_OBJECT, name.as_str());
    Ok((headers, Bytes::new()))
}

/// Publishes with a de-duplicating id and waits for JetStream to store it (a release command, an
/// announcement): an error says whether anything may have changed.
async fn publish(
    state: &AppState,
    subject: String,
    msg_id: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(), ApiError> {
    let out = outgoing(subject, msg_id.to_owned(), &headers, &body);
    match send(state, &out).await {
        Sent::Stored | Sent::Duplicate => Ok(()),
        Sent::NotStored(e) => Err(ApiError::unavailable(format!(
            "NATS did not store the message on {}: {e}; nothing changed",
            out.subject
        ))),
        Sent::Unknown => Err(ApiError::unknown(format!(
            "NATS did not confirm the message on {} within {}s: it may or may not have been \
             stored; look again in a moment",
            out.subject,
            state.settings.publish_timeout.as_secs()
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
    match crate::payloads::load(&state.js, name).await {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(ApiError::new(
            StatusCode::GONE,
            "gone",
            format!("the payload {name} is no longer in the bucket mend_payloads"),
        )),
        Err(e) => Err(ApiError::unavailable(format!(
            "cannot read the payload {name}: {e:#}"
        ))),
    }
}

/// Ends every web session (an admin's choice, audited): everyone logs in again, with the users and
/// roles configured now. Returns how many sessions ended.
pub async fn end_all_sessions(
    state: &AppState,
    who: &Principal,
    note: Option<&str>,
) -> Result<u64, ApiError> {
    who.require(Role::Admin)?;
    let audit = Audit {
        actor: &who.name,
        action: "end_all_sessions",
        message_id: None,
        service: None,
        key: None,
        note,
        before: None,
        after: None,
    };
    let ended = state.store.end_all_sessions(&audit, now_ms()).await?;
    tracing::warn!(by = who.name, ended, "Every web session ended.");
    Ok(ended)
}
