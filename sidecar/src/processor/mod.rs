//! `mend processor` (SPEC §1, §6): competing consumers on MEND_FAILED. Each failure envelope goes
//! through the rules: a repair is published to `mend.retry.<service>` (the service's sidecar delivers
//! it), anything else is parked on `mend.parked.<service>` for the dashboard. The failure is acked
//! only after that publish is stored, so a crash loses nothing; publishes carry `Nats-Msg-Id`, so a
//! repeat after a crash is dropped.
//!
//! The retry message's body is exactly what the app receives (the repaired payload); the lineage
//! travels in headers: `Mend-Id`, `Mend-Attempt`, `Mend-Repaired-By`, `Mend-Key`,
//! `Mend-Original-Subject`, `Mend-Service`, and `Mend-History` (the envelope's history as JSON), next
//! to the original message's own headers.

pub mod config;

use repair_rules::identity::{consumers, streams};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderName;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use repair_rules::headers as h;
use repair_rules::identity::subjects;
use repair_rules::rules::{Decision, Limits, ParkReason, evaluate};
use repair_rules::{ErrorKind, FailureEnvelope, FailureError, HistoryEntry, LineageId};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::RunError;
use crate::common::ack;
use crate::common::publish::{self, NotStored, Published, to_bytes};
use crate::common::rules_live::LiveRules;
use crate::common::{nats, ops, otel, role, telemetry};
use crate::processor::config::ProcessorConfig;

struct Processor {
    client: async_nats::Client,
    js: jetstream::Context,
    epoch: ack::Epoch,
    rules: Arc<LiveRules>,
    limits: Limits,
    rule_timeout: Duration,
    /// Room for rule evaluations on the blocking pool (see [`evaluate_bounded`]).
    evaluations: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
    /// Metric handles, looked up once: a labelled lookup per failure (a key built, hashed and
    /// found in the registry) was a few per cent of the processor's CPU.
    counters: Counters,
}

/// The processor's metric handles; a rule's are made on its first use.
struct Counters {
    latency: metrics::Histogram,
    per_rule: std::sync::Mutex<std::collections::HashMap<String, RuleCounters>>,
}

#[derive(Clone)]
struct RuleCounters {
    matched: metrics::Counter,
    repaired: metrics::Counter,
}

impl Counters {
    fn new() -> Self {
        Self {
            latency: metrics::histogram!(telemetry::PROCESSING_LATENCY),
            per_rule: Default::default(),
        }
    }

    fn rule(&self, rule: &str) -> RuleCounters {
        let mut per_rule = self.per_rule.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = per_rule.get(rule) {
            return c.clone();
        }
        let c = RuleCounters {
            matched: metrics::counter!(telemetry::RULE_MATCHED, "rule" => rule.to_owned()),
            repaired: metrics::counter!(telemetry::REPAIRED, "rule" => rule.to_owned()),
        };
        // Bounded by the rules ever loaded; a reload that renames rules adds a few.
        per_rule.insert(rule.to_owned(), c.clone());
        c
    }
}

/// Rule evaluations on the blocking pool at once. One that passes the time limit is answered as
/// a rule error, but its thread cannot be stopped (the CEL interpreter has no way to be
/// interrupted) and runs on; it keeps its room until it ends, so runaway rules take at most this
/// many threads, and further evaluations wait for room within the same time limit.
pub const EVALUATIONS_IN_FLIGHT: usize = 4;

const CONTENT_TYPE: HeaderName = HeaderName::from_static("Content-Type");

/// Runs the processor until `shutdown`, then finishes what is in progress.
pub async fn run(config: ProcessorConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let metrics = telemetry::metrics().map_err(RunError::Startup)?;
    let rules = Arc::new(
        LiveRules::load(&config.rules)
            .map_err(|e| RunError::Config(anyhow::anyhow!("rules: {e}")))?,
    );
    let started =
        role::connect(&config.nats_url, &config.nats, "mend-processor", &shutdown).await?;
    let Some((client, js, epoch)) = started else {
        return Ok(());
    };
    let consumer =
        match nats::when_available("consumer mend-processor on MEND_FAILED", &shutdown, || {
            bind(&js, config.concurrency, config.ack_wait)
        })
        .await
        {
            Ok(Some(consumer)) => consumer,
            Ok(None) => return Ok(()),
            Err(e) => return Err(RunError::Startup(e)),
        };

    let ready = role::readiness(&client, &shutdown, || Ok(()));
    let endpoint = ops::serve(config.listen, ready, metrics)
        .await
        .map_err(RunError::Startup)?;
    tokio::spawn({
        let (rules, shutdown) = (rules.clone(), shutdown.clone());
        async move {
            if let Err(error) = crate::common::rules_live::watch(rules, shutdown).await {
                tracing::error!(%error, "Cannot watch the rules; changes need a restart.");
            }
        }
    });
    tracing::info!(listen = %config.listen, "Processor consuming.");

    let p = Arc::new(Processor {
        client: client.clone(),
        js,
        epoch,
        rules,
        limits: config.limits(),
        rule_timeout: config.rule_timeout,
        evaluations: Arc::new(tokio::sync::Semaphore::new(EVALUATIONS_IN_FLIGHT)),
        shutdown: shutdown.clone(),
        counters: Counters::new(),
    });
    // On a runtime worker, not the thread that started the runtime: from there every failure's
    // task went through the runtime's shared queue and woke a worker, and every task's end woke
    // this thread back (thread switches fell from 9% to 3.5% of its profile once moved).
    let consuming = tokio::spawn(consume(
        p,
        consumer,
        config.concurrency,
        config.shutdown_timeout,
    ));
    let result = match consuming.await {
        Ok(result) => result,
        Err(error) => Err(anyhow::anyhow!(
            "the processor's consumer ended abnormally: {error}"
        )),
    };
    if let Err(error) = client.flush().await {
        tracing::warn!(%error, "Final flush failed; unsent acks lead to redeliveries.");
    }
    endpoint.stop().await;
    tracing::info!("Processor stopped.");
    result.map_err(RunError::Runtime)
}

async fn bind(
    js: &jetstream::Context,
    concurrency: usize,
    ack_wait: Duration,
) -> anyhow::Result<PullConsumer> {
    let stream = js
        .get_stream(streams::FAILED)
        .await
        .context("stream MEND_FAILED")?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(consumers::PROCESSOR.to_owned()),
            description: Some("mend processors (competing consumers)".into()),
            filter_subject: "mend.failed.>".into(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: (concurrency * 4) as i64,
            ..Default::default()
        })
        .await
        .context("cannot create consumer mend-processor on MEND_FAILED")
}

async fn consume(
    p: Arc<Processor>,
    consumer: PullConsumer,
    concurrency: usize,
    shutdown_timeout: Duration,
) -> anyhow::Result<()> {
    let batch = concurrency.min(256);
    let mut messages = crate::common::nats::pull(&consumer, batch, &p.shutdown).await;
    // Each failure is its own task, so every runtime worker takes a share of the work.
    let mut running = tokio::task::JoinSet::new();
    let deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(deadline);
    loop {
        let pulling = messages.is_some() && running.len() < concurrency;
        tokio::select! {
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Err(error) = done {
                    tracing::error!(%error, "A failure's task ended abnormally; it is redelivered.");
                }
            }
            _ = p.shutdown.cancelled(), if messages.is_some() => {
                messages = None;
                deadline.as_mut().reset(tokio::time::Instant::now() + shutdown_timeout);
            }
            next = async { match messages.as_mut() { Some(m) => m.next().await, None => None } }, if pulling => {
                match next {
                    Some(Ok(msg)) => {
                        let p = p.clone();
                        // Boxed: a task's future is moved into the task, then its whole stage
                        // again to take its output; a box makes each of those a pointer.
                        running.spawn(Box::pin(async move { handle(&p, msg).await }));
                    }
                    Some(Err(error)) if crate::common::nats::pull_went_silent(&error) => {
                        tracing::warn!(%error, "Pull on MEND_FAILED went silent; pulling anew.");
                        messages = crate::common::nats::pull(&consumer, batch, &p.shutdown).await;
                    }
                    Some(Err(error)) => tracing::warn!(%error, "Pull failed; continuing."),
                    None => {
                        tracing::warn!("Pull stream on MEND_FAILED ended; reopening.");
                        messages = crate::common::nats::pull(&consumer, batch, &p.shutdown).await;
                    }
                }
            }
            _ = &mut deadline, if messages.is_none() => {
                tracing::warn!(in_flight = running.len(), "Shutdown deadline reached; the rest is redelivered.");
                return Ok(());
            }
        }
        if messages.is_none() && running.is_empty() {
            return Ok(());
        }
    }
}

/// One failure: decide, publish the outcome, then ack.
async fn handle(p: &Processor, msg: Message) {
    let started = Instant::now();
    let Some(subject) = msg.reply.clone() else {
        return;
    };
    let reply = ack::Reply::new(subject, p.epoch.current());
    let parsed = serde_json::from_slice::<FailureEnvelope>(&msg.payload)
        .map_err(|e| e.to_string())
        .and_then(|envelope| envelope.check().map(|()| envelope));
    let outcome = match parsed {
        Ok(envelope) => {
            // A debug span: an enabled span formats its fields for every failure, which cost the
            // processor measurable throughput. Logs that matter name the lineage themselves.
            let span =
                tracing::debug_span!("failure", mend_id = %envelope.id, attempt = envelope.attempt);
            // The rules' decision as a span of the message's trace (when traces are exported).
            let traced = tracing::info_span!(
                target: otel::TARGET,
                "evaluate",
                mend.id = %envelope.id,
                mend.attempt = envelope.attempt,
                mend.service = %envelope.service,
                mend.rule = tracing::field::Empty,
                mend.decision = tracing::field::Empty,
                mend.reason = tracing::field::Empty,
            );
            // Under the sidecar's delegation (the envelope's NATS headers), else the message's
            // own trace context (its copy of the message's headers).
            otel::set_parent(&traced, || {
                otel::parent_of(msg.headers.as_ref()).or_else(|| otel::parent_in(&envelope.headers))
            });
            let work = async {
                let decision = decide(p, &envelope).await;
                if !traced.is_disabled() {
                    record(&traced, &decision);
                }
                act(p, &envelope, decision).await
            };
            let work = tracing::Instrument::instrument(work, traced.clone());
            tracing::Instrument::instrument(work, span).await
        }
        Err(error) => Box::pin(park_malformed(p, &msg, &error)).await,
    };
    match outcome {
        // Unconfirmed: everything the processor publishes carries a `Nats-Msg-Id`, so a lost ack
        // only brings a redelivery whose publishes are dropped as duplicates. Waiting for the
        // confirmation cost a quarter of the processor's CPU.
        Ok(()) => ack::unconfirmed(&p.client, &reply).await,
        Err(NotStored::Stopped) => ack::hand_back(&p.client, &reply).await,
        Err(NotStored::Unpublishable) => {}
    }
    p.counters.latency.record(started.elapsed().as_secs_f64());
}

/// A producer span for a message the processor publishes (`what`: `retry`, `parked`), a child of
/// the decision's span.
fn publish_span(
    subject: &str,
    envelope: &FailureEnvelope,
    attempt: u32,
    what: &str,
) -> tracing::Span {
    tracing::info_span!(
        target: otel::TARGET,
        "publish",
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.destination.name = subject,
        mend.id = %envelope.id,
        mend.attempt = attempt,
        mend.service = %envelope.service,
        mend.to = what,
    )
}

/// The decision's attributes on its span.
fn record(span: &tracing::Span, decision: &Decision) {
    match decision {
        Decision::Repaired { rule, .. } => {
            span.record("mend.rule", rule.as_str());
            span.record("mend.decision", "repaired");
        }
        Decision::Park { rule, reason, .. } => {
            if let Some(rule) = rule {
                span.record("mend.rule", rule.as_str());
            }
            span.record("mend.decision", "parked");
            span.record("mend.reason", reason.as_str());
        }
    }
}

/// The rules' decision. Rules whose cost is linear in their (bounded) input are evaluated in place;
/// rules with comprehensions run on the blocking pool under the time limit.
async fn decide(p: &Processor, envelope: &FailureEnvelope) -> Decision {
    let rules = p.rules.get();
    if rules.is_linear() {
        return evaluate(&rules, envelope, &p.limits);
    }
    let (limits, env) = (p.limits, envelope.clone());
    let work = move || evaluate(&rules, &env, &limits);
    match Box::pin(evaluate_bounded(&p.evaluations, p.rule_timeout, work)).await {
        Bounded::Done(decision) => decision,
        Bounded::Failed(error) => Decision::Park {
            rule: None,
            reason: ParkReason::RuleError,
            message: format!("rule evaluation failed: {error}"),
        },
        Bounded::TimedOut => Decision::Park {
            rule: None,
            reason: ParkReason::RuleError,
            message: format!(
                "rule evaluation took longer than {}",
                humantime::format_duration(p.rule_timeout)
            ),
        },
        Bounded::NoRoom => Decision::Park {
            rule: None,
            reason: ParkReason::RuleError,
            message: format!(
                "rule evaluation could not start within {}: {EVALUATIONS_IN_FLIGHT} earlier \
                 evaluations are still running",
                humantime::format_duration(p.rule_timeout.saturating_mul(2))
            ),
        },
    }
}

/// How a bounded evaluation ended.
#[derive(Debug, PartialEq)]
enum Bounded<T> {
    Done(T),
    /// It panicked.
    Failed(String),
    /// It did not end within the limit (it stops at its next comprehension step, holding its room
    /// until then).
    TimedOut,
    /// No room was free within the limit.
    NoRoom,
}

/// Runs `work` on the blocking pool once `room` has a place for it (waiting twice `limit` at most:
/// the places free up within `limit` of their start), and waits for it twice `limit` at most: the evaluation stops itself at `limit` (its comprehension
/// steps check the deadline), and its own answer says where. The place is given back when `work`
/// really ends, not when the caller stops waiting.
async fn evaluate_bounded<T: Send + 'static>(
    room: &Arc<tokio::sync::Semaphore>,
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Bounded<T> {
    let wait = limit.saturating_mul(2);
    let Ok(Ok(permit)) = tokio::time::timeout(wait, room.clone().acquire_owned()).await else {
        return Bounded::NoRoom;
    };
    let task = tokio::task::spawn_blocking(move || {
        let out = work();
        drop(permit);
        out
    });
    match tokio::time::timeout(limit.saturating_mul(2), task).await {
        Ok(Ok(out)) => Bounded::Done(out),
        Ok(Err(error)) => Bounded::Failed(error.to_string()),
        Err(_) => Bounded::TimedOut,
    }
}

async fn act(
    p: &Processor,
    envelope: &FailureEnvelope,
    decision: Decision,
) -> Result<(), NotStored> {
    match decision {
        Decision::Repaired { rule, payload } => {
            let counters = p.counters.rule(&rule);
            counters.matched.increment(1);
            retry(p, envelope, &rule, &payload).await?;
            counters.repaired.increment(1);
            tracing::debug!(rule, "Repaired; sent back to the service.");
            Ok(())
        }
        Decision::Park {
            rule,
            reason,
            message,
        } => {
            if let Some(rule) = &rule {
                metrics::counter!(telemetry::RULE_MATCHED, "rule" => rule.clone()).increment(1);
                if reason == ParkReason::RuleError {
                    metrics::counter!(telemetry::RULE_ERRORS, "rule" => rule.clone()).increment(1);
                }
            }
            // Boxed, as the rarer outcome: its future would otherwise make every failure's task
            // larger, copied in full when the task is spawned.
            Box::pin(park(p, envelope, rule.as_deref(), reason, &message)).await?;
            metrics::counter!(telemetry::PARKED, "reason" => reason.as_str()).increment(1);
            tracing::info!(mend_id = %envelope.id, attempt = envelope.attempt, %reason, message, "Parked for a person.");
            Ok(())
        }
    }
}

/// Publishes the repaired message to the service's retry subject.
async fn retry(
    p: &Processor,
    envelope: &FailureEnvelope,
    rule: &str,
    payload: &serde_json::Value,
) -> Result<(), NotStored> {
    // `evaluate` parks the last countable attempt, so this never saturates.
    let attempt = envelope.attempt.saturating_add(1);
    let step = HistoryEntry {
        at: publish::now(),
        what: "repaired".into(),
        by: format!("rule:{rule}"),
        attempt: Some(attempt),
        error: None,
        note: None,
    };
    let mut history =
        serde_json::to_string(&Appended(&envelope.history, &step)).unwrap_or_default();
    if history.len() > repair_rules::envelope::HISTORY_LIMIT {
        let mut bounded = envelope.history.clone();
        bounded.push(step.clone());
        repair_rules::envelope::bound_history(&mut bounded, repair_rules::envelope::HISTORY_LIMIT);
        history = serde_json::to_string(&bounded).unwrap_or_default();
    }
    let repaired_by: Vec<&str> = envelope
        .history
        .iter()
        .chain(std::iter::once(&step))
        .filter(|e| e.what == "repaired")
        .filter_map(|e| e.by.strip_prefix("rule:"))
        .collect();
    let key = envelope.key.clone().map(repair_rules::MessageKey);
    let repaired_by = repaired_by.join(",");
    // Built for each try rather than copied: the client takes the map it sends. Mend's names are
    // static, so they are neither checked nor copied again.
    let subject = subjects::retry(&envelope.service);
    let span = publish_span(&subject, envelope, attempt, "retry");
    let headers = || {
        let mut headers = async_nats::HeaderMap::new();
        for (name, values) in &envelope.headers {
            if !h::is_carried(name) || name.eq_ignore_ascii_case("content-type") {
                continue;
            }
            for v in values {
                headers.append(name.as_str(), v.as_str());
            }
        }
        headers.insert(CONTENT_TYPE, "application/json");
        h::Lineage {
            id: &envelope.id,
            service: &envelope.service,
            attempt,
            original_subject: &envelope.subject,
            key: key.as_ref(),
            repaired_by: Some(&repaired_by),
            resubmitted_by: None,
            hold_since: None,
            history: Some(&history),
        }
        .write(|name, value| headers.insert(HeaderName::from_static(name), value));
        // The sidecar delivers the retry under this span.
        otel::inject_nats(&span, &mut headers);
        headers
    };
    let lineage = envelope.lineage();
    let msg_id = lineage.msg_id(attempt, "retry");
    match publish::durably_on(
        &p.js,
        &p.client,
        &p.shutdown,
        &subject,
        &msg_id,
        headers,
        to_bytes(payload),
    )
    .await?
    {
        Published::Stored { .. } => {}
        Published::TooLarge => {
            // A repair that grew past max_payload cannot be sent back: a person decides.
            return Box::pin(park(
                p,
                envelope,
                Some(rule),
                ParkReason::RuleError,
                "the repaired message exceeds the server's max_payload",
            ))
            .await;
        }
    }
    // Not announced on its own: the step travels in the retry's history and is announced with the
    // transition that ends or parks the lineage (SPEC §2).
    Ok(())
}

/// A history with one more step, serialized as one JSON array without copying the history.
struct Appended<'a>(&'a [HistoryEntry], &'a HistoryEntry);

impl serde::Serialize for Appended<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().chain(std::iter::once(self.1)))
    }
}

/// Publishes the envelope, with its reason and history, to the dashboard, then announces `parked`.
async fn park(
    p: &Processor,
    envelope: &FailureEnvelope,
    rule: Option<&str>,
    reason: ParkReason,
    message: &str,
) -> Result<(), NotStored> {
    let mut parked = envelope.clone();
    parked.reason = Some(message.to_owned());
    parked.history.push(HistoryEntry {
        at: publish::now(),
        what: "parked".into(),
        by: rule.map_or_else(|| "processor".to_owned(), |r| format!("rule:{r}")),
        attempt: Some(envelope.attempt),
        error: None,
        note: Some(format!("{reason}: {message}")),
    });
    let lineage = envelope.lineage();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert(h::MEND_ID, envelope.id.as_str());
    headers.insert(h::MEND_ATTEMPT, envelope.attempt.to_string().as_str());
    headers.insert(h::MEND_SERVICE, envelope.service.as_str());
    let msg_id = lineage.msg_id(envelope.attempt, "parked");
    let subject = subjects::parked(&envelope.service);
    let span = publish_span(&subject, envelope, envelope.attempt, "parked");
    otel::inject_nats(&span, &mut headers);
    match publish::durably(
        &p.js,
        &p.shutdown,
        &subject,
        &msg_id,
        headers.clone(),
        to_bytes(&parked),
    )
    .await?
    {
        Published::Stored { .. } => {}
        Published::TooLarge => {
            // The parked form grew past max_payload (its history, its reason): cut to fit.
            let limit = crate::common::publish::envelope_limit(&p.client);
            tracing::warn!(
                limit,
                "Parked envelope too large; cutting its history and headers."
            );
            let fitted = parked.fit(limit)
                && matches!(
                    publish::durably(
                        &p.js,
                        &p.shutdown,
                        &subject,
                        &msg_id,
                        headers,
                        to_bytes(&parked),
                    )
                    .await?,
                    Published::Stored { .. }
                );
            if !fitted {
                tracing::error!("Parked envelope too large even cut to its least; left unacked.");
                return Err(NotStored::Unpublishable);
            }
        }
    }
    announce(
        p,
        envelope,
        "parked",
        envelope.attempt,
        json!({ "reason": reason.as_str(), "rule": rule, "message": message, "key": envelope.key,
                "subject": envelope.subject,
                "steps": repair_rules::envelope::unannounced_steps(&envelope.history) }),
    )
    .await
}

async fn announce(
    p: &Processor,
    envelope: &FailureEnvelope,
    kind: &str,
    attempt: u32,
    data: serde_json::Value,
) -> Result<(), NotStored> {
    let lineage = envelope.lineage();
    let event = publish::Event {
        service: &envelope.service,
        source: "urn:mend:processor".into(),
        kind,
        lineage: &lineage,
        attempt,
        data,
    };
    publish::announce(&p.js, &p.shutdown, event).await
}

/// A message on MEND_FAILED that is not an envelope is parked as raw bytes, never dropped.
async fn park_malformed(p: &Processor, msg: &Message, error: &str) -> Result<(), NotStored> {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let service = msg
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .unwrap_or("unknown")
        .to_owned();
    tracing::error!(%error, seq, service, "Not a failure envelope; parking the raw message.");
    let mut failure = FailureError::bare(ErrorKind::Message, None);
    failure.title = Some("malformed failure envelope".into());
    failure.detail = Some(error.to_owned());
    let envelope = FailureEnvelope::raw(
        LineageId::new(streams::FAILED, seq),
        service,
        msg.subject.to_string(),
        repair_rules::envelope::bytes_form(&msg.payload),
        failure,
        publish::now(),
    );
    park(
        p,
        &envelope,
        None,
        ParkReason::RuleError,
        "the message on MEND_FAILED is not a failure envelope",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn evaluations_past_their_limit_keep_their_room_until_they_end() {
        let room = Arc::new(tokio::sync::Semaphore::new(1));
        let limit = Duration::from_millis(100);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        // A runaway: answered as timed out, but its thread runs on and keeps the room.
        let runaway = evaluate_bounded(&room, limit, move || wait.recv().is_ok()).await;
        assert_eq!(runaway, Bounded::TimedOut);
        assert_eq!(evaluate_bounded(&room, limit, || 1).await, Bounded::NoRoom);
        // Once it ends, the room is free again.
        release.send(()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while room.available_permits() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(evaluate_bounded(&room, limit, || 2).await, Bounded::Done(2));
    }
}
