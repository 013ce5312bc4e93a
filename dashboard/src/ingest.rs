//! Ingest (SPEC §9): durable consumers on MEND_PARKED and MEND_EVENTS feeding the store. A message
//! is acked only after the transaction that stored it has committed, so a crash redelivers it, and
//! the store recognises what it has already taken in: nothing is lost and nothing doubled.
//!
//! Several dashboards on one PostgreSQL share the two durable consumers (competing consumers).

use repair_rules::identity::{consumers, streams};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, Message};
use futures::{FutureExt as _, StreamExt as _};
use repair_rules::{ErrorKind, FailureEnvelope, FailureError, HistoryEntry};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::store::{Event, Store, now_ms};

/// Announcements stored in one transaction at most.
const EVENTS_BATCH: usize = 256;
/// Pause before a message the store could not take is offered again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Creates (or updates) the two durable consumers. `ack_wait`: how long a message may stay unacked
/// (a slow database, a crashed dashboard) before the server offers it again.
pub async fn bind(
    js: &jetstream::Context,
    ack_wait: Duration,
) -> anyhow::Result<(PullConsumer, PullConsumer)> {
    let parked = js
        .get_stream(streams::PARKED)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(consumers::DASHBOARD_PARKED.into()),
            description: Some("mend dashboards: parked failures into the store".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await?;
    let events = js
        .get_stream(streams::EVENTS)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(consumers::DASHBOARD_EVENTS.into()),
            description: Some("mend dashboards: announcements into the store".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: 4096,
            ..Default::default()
        })
        .await?;
    Ok((parked, events))
}

/// Takes in parked failures until `shutdown`.
pub async fn parked(consumer: PullConsumer, store: Store, shutdown: CancellationToken) {
    let mut messages = None;
    loop {
        let stream = match &mut messages {
            Some(s) => s,
            None => match open(&consumer, 64, &shutdown).await {
                Some(s) => messages.insert(s),
                None => return,
            },
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = stream.next() => next,
        };
        let msg = match next {
            Some(Ok(msg)) => msg,
            Some(Err(error)) => {
                tracing::warn!(%error, "Pulling parked failures failed; continuing.");
                // A silent pull (its consumer's leader gone) is replaced at once.
                if error.kind() == pull::MessagesErrorKind::MissingHeartbeat {
                    messages = None;
                }
                continue;
            }
            None => {
                messages = None;
                continue;
            }
        };
        let envelope = envelope_of(&msg);
        // Taking it in as a span of its trace, under whoever parked it (the processor's publish).
        let span = tracing::info_span!(
            target: crate::trace::TARGET,
            "ingest",
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.destination.name = %msg.subject,
            mend.id = %envelope.id,
            mend.attempt = envelope.attempt,
            mend.service = %envelope.service,
        );
        // Whoever parked it (kept, valid only, for its resubmission's link to this attempt).
        let parker = crate::trace::parent_of(msg.headers.as_ref());
        let kept = parker.as_ref().map(crate::trace::traceparent);
        crate::trace::set_parent(&span, || {
            parker.or_else(|| crate::trace::parent_in(&envelope.headers))
        });
        let stored = store.ingest_traced(&envelope, now_ms(), kept.as_deref());
        let stored = tracing::Instrument::instrument(stored, span);
        match stored.await {
            Ok(outcome) => {
                tracing::debug!(mend_id = %envelope.id, ?outcome, "Parked failure stored.");
                metrics::counter!("mend_dashboard_ingested_total", "what" => "parked").increment(1);
                ack(&msg, AckKind::Ack).await;
            }
            Err(error) => {
                tracing::error!(%error, mend_id = %envelope.id, "Cannot store a parked failure; it is offered again.");
                metrics::counter!("mend_dashboard_ingest_errors_total", "what" => "parked")
                    .increment(1);
                ack(&msg, AckKind::Nak(Some(RETRY_AFTER))).await;
            }
        }
    }
}

/// Takes in announcements until `shutdown`, up to [`EVENTS_BATCH`] per transaction.
pub async fn events(consumer: PullConsumer, store: Store, shutdown: CancellationToken) {
    let mut messages = None;
    loop {
        let stream = match &mut messages {
            Some(s) => s,
            None => match open(&consumer, EVENTS_BATCH, &shutdown).await {
                Some(s) => messages.insert(s),
                None => return,
            },
        };
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = stream.next() => next,
        };
        let mut batch = Vec::new();
        let mut next = first;
        let ended = loop {
            match next {
                Some(Ok(msg)) => batch.push(msg),
                Some(Err(error)) if error.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
                    tracing::warn!(%error, "Pulling announcements went silent; pulling anew.");
                    break true;
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "Pulling announcements failed; continuing.")
                }
                None => break true,
            }
            if batch.len() >= EVENTS_BATCH {
                break false;
            }
            // What has arrived already joins the batch; nothing more is waited for.
            match stream.next().now_or_never() {
                Some(more) => next = more,
                None => break false,
            }
        };
        if ended {
            messages = None;
        }
        let mut parsed = Vec::with_capacity(batch.len());
        let mut stored = Vec::with_capacity(batch.len());
        for msg in batch {
            match events_of(&msg.payload) {
                Ok(evs) => {
                    parsed.push(evs);
                    stored.push(msg);
                }
                Err(error) => {
                    // Not something any mend component sends: logged, counted and dropped.
                    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                    tracing::warn!(%error, seq, subject = %msg.subject, "Not a mend announcement; skipped.");
                    metrics::counter!("mend_dashboard_ingest_errors_total", "what" => "event")
                        .increment(1);
                    ack(&msg, AckKind::Term).await;
                }
            }
        }
        if parsed.is_empty() {
            continue;
        }
        let all: Vec<Event> = parsed.iter().flatten().cloned().collect();
        match store.ingest_events(&all, now_ms()).await {
            Ok(new) => {
                metrics::counter!("mend_dashboard_ingested_total", "what" => "event")
                    .increment(new as u64);
                for msg in &stored {
                    ack(msg, AckKind::Ack).await;
                }
            }
            Err(error) if stored.len() > 1 => {
                // One bad announcement must not hold back the others: each is tried alone.
                tracing::warn!(%error, count = stored.len(), "A batch of announcements was not stored; storing them one by one.");
                for (evs, msg) in parsed.iter().zip(&stored) {
                    store_alone(&store, evs, msg).await;
                }
            }
            Err(error) => {
                tracing::error!(%error, "Cannot store an announcement; it is offered again.");
                for msg in &stored {
                    ack(msg, AckKind::Nak(Some(RETRY_AFTER))).await;
                }
            }
        }
    }
}

/// Stores one announcement of a batch that failed. If the store answers but refuses this one, it
/// is terminated with a logged record of what it was (never offered again, never holding back the
/// rest); if the store does not answer at all, it is offered again later.
async fn store_alone(store: &Store, evs: &[Event], msg: &Message) {
    let Some(ev) = evs.last() else {
        ack(msg, AckKind::Ack).await;
        return;
    };
    match store.ingest_events(evs, now_ms()).await {
        Ok(new) => {
            metrics::counter!("mend_dashboard_ingested_total", "what" => "event")
                .increment(new as u64);
            ack(msg, AckKind::Ack).await;
        }
        Err(error) if store.ping().await.is_ok() => {
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            tracing::error!(
                %error,
                seq,
                subject = %msg.subject,
                event = ev.id,
                message = ev.message_id,
                kind = ev.kind,
                "An announcement the store refuses; dropped (MEND_EVENTS keeps it until it ages out)."
            );
            metrics::counter!("mend_dashboard_ingest_errors_total", "what" => "event").increment(1);
            ack(msg, AckKind::Term).await;
        }
        Err(error) => {
            tracing::error!(%error, "Cannot store an announcement; it is offered again.");
            ack(msg, AckKind::Nak(Some(RETRY_AFTER))).await;
        }
    }
}

async fn open(
    consumer: &PullConsumer,
    batch: usize,
    shutdown: &CancellationToken,
) -> Option<pull::Stream> {
    let mut pause = Duration::from_millis(100);
    loop {
        match consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
        {
            Ok(s) => return Some(s),
            Err(error) => tracing::warn!(%error, "Cannot pull yet; retrying."),
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return None,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

async fn ack(msg: &Message, kind: AckKind) {
    if let Err(error) = msg.ack_with(kind).await {
        tracing::warn!(%error, "Ack not sent; the message will be redelivered.");
    }
}

/// The envelope in a message on MEND_PARKED. Anything else is kept as a raw envelope of its own
/// (`MEND_PARKED:<seq>`), so a person sees it instead of it being dropped.
pub fn envelope_of(msg: &Message) -> FailureEnvelope {
    let parsed = serde_json::from_slice::<FailureEnvelope>(&msg.payload)
        .map_err(|e| e.to_string())
        .and_then(|e| e.check().map(|()| e));
    match parsed {
        Ok(envelope) => envelope,
        Err(error) => {
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            tracing::error!(%error, seq, "Not a failure envelope on MEND_PARKED; kept raw.");
            let service = msg
                .subject
                .as_str()
                .strip_prefix("mend.parked.")
                .filter(|s| !s.is_empty() && !s.contains('.'))
                .unwrap_or("unknown")
                .to_owned();
            let mut failure = FailureError::bare(ErrorKind::Message, None);
            failure.title = Some("malformed parked message".into());
            failure.detail = Some(error);
            let at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            let mut envelope = FailureEnvelope::raw(
                repair_rules::LineageId::new(streams::PARKED, seq),
                service,
                msg.subject.to_string(),
                repair_rules::envelope::bytes_form(&msg.payload),
                failure,
                at.clone(),
            );
            envelope.reason = Some("the message on MEND_PARKED is not a failure envelope".into());
            envelope.history.push(HistoryEntry {
                at,
                what: "parked".into(),
                by: "dashboard".into(),
                attempt: None,
                error: None,
                note: Some("kept raw: not a failure envelope".into()),
            });
            envelope
        }
    }
}

/// A CloudEvent as mend components write it (structured JSON).
#[derive(Deserialize)]
struct CloudEvent {
    id: String,
    source: String,
    #[serde(rename = "type")]
    kind: String,
    time: Option<String>,
    data: EventData,
}

#[derive(Deserialize)]
struct EventData {
    service: String,
    id: String,
    attempt: u32,
    #[serde(default)]
    rule: Option<String>,
}

/// The announcements in a message on MEND_EVENTS: the steps it carries (`steps`: the delegations
/// and repairs of the lineage, which are not announced on their own, SPEC §2), each stored as the
/// announcement it stands for (`<lineage>:<attempt>:<kind>`, so one carried twice is stored
/// once), then the announcement itself.
pub fn events_of(payload: &[u8]) -> Result<Vec<Event>, String> {
    let main = event_of(payload)?;
    let data: serde_json::Value = serde_json::from_str(&main.data).unwrap_or_default();
    let Some(steps) = data.get("steps").and_then(serde_json::Value::as_array) else {
        return Ok(vec![main]);
    };
    let mut out = Vec::with_capacity(steps.len() + 1);
    for step in steps {
        let Ok(step) = serde_json::from_value::<HistoryEntry>(step.clone()) else {
            tracing::warn!(event = main.id, "A carried step that is not one; skipped.");
            continue;
        };
        let Some(attempt) = step.attempt else {
            continue;
        };
        if !repair_rules::envelope::UNANNOUNCED.contains(&step.what.as_str()) {
            continue;
        }
        let rule = step.by.strip_prefix("rule:").map(str::to_owned);
        let source = match (
            step.what.as_str(),
            data.get("binding").and_then(|b| b.as_str()),
        ) {
            ("repaired", _) => "urn:mend:processor".to_owned(),
            (_, Some(binding)) => format!("urn:mend:sidecar:{}:{binding}", main.service),
            _ => main.source.clone(),
        };
        let mut step_data = serde_json::json!({
            "service": main.service,
            "id": main.message_id,
            "attempt": attempt,
            "key": data.get("key"),
            "subject": data.get("subject"),
            "carried_by": main.id,
        });
        if let Some(error) = &step.error {
            step_data["error"] = serde_json::json!(error);
        }
        if let Some(rule) = &rule {
            step_data["rule"] = serde_json::json!(rule);
        }
        out.push(Event {
            id: format!("{}:{attempt}:{}", main.message_id, step.what),
            message_id: main.message_id.clone(),
            service: main.service.clone(),
            kind: step.what.clone(),
            attempt,
            at: epoch_ms(Some(&step.at)).unwrap_or(main.at),
            rule,
            source,
            data: step_data.to_string(),
        });
    }
    out.push(main);
    Ok(out)
}

/// `time` (RFC 3339) as epoch milliseconds.
fn epoch_ms(time: Option<&str>) -> Option<i64> {
    time.and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The announcement in a message on MEND_EVENTS, without the steps it carries.
pub fn event_of(payload: &[u8]) -> Result<Event, String> {
    let ce: CloudEvent = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let kind = ce
        .kind
        .strip_prefix("mend.")
        .filter(|k| !k.is_empty())
        .ok_or_else(|| format!("type `{}` is not a mend.* type", ce.kind))?
        .to_owned();
    let data: serde_json::Value = serde_json::from_slice(payload)
        .ok()
        .and_then(|mut v: serde_json::Value| v.get_mut("data").map(serde_json::Value::take))
        .unwrap_or_default();
    let at = epoch_ms(ce.time.as_deref()).unwrap_or_else(now_ms);
    Ok(Event {
        id: ce.id,
        message_id: ce.data.id,
        service: ce.data.service,
        kind,
        attempt: ce.data.attempt,
        at,
        rule: ce.data.rule,
        source: ce.source,
        data: data.to_string(),
    })
}
