//! One message to the app: the call, transient failures retried in place (backoff, `Retry-After`,
//! the circuit), and what a final answer asks for (nothing, delegation, drop or park).

use std::time::Instant;

use repair_rules::holds::Outcome;
use repair_rules::{ErrorKind, FailureError};

use tracing::Instrument;

use super::binding::{BindingRuntime, UNREADABLE_HEADERS};
use super::delegate;
use super::delegate::Destination;
use super::settle::Settle;
use super::work::Delivery;
use crate::common::otel;
use crate::runtime::deliver::Answer;
use crate::runtime::headers::{self};

/// Delivers a message to the app (retrying transient failures in place) and finishes what its
/// answer asks for: nothing, an envelope for the processor or the dashboard, or a `dropped`
/// announcement. It is not settled here. `id` is its Mend-Id (`d.meta.lineage`, formatted once by
/// the caller).
pub(crate) async fn deliver(
    rt: &BindingRuntime,
    d: &Delivery,
    id: &str,
) -> Result<Outcome, Settle> {
    if d.unreadable.is_some() {
        return Box::pin(unreadable(rt, d).instrument(d.span())).await;
    }
    let mut tries = 0;
    // Calls made (each try's span says which it was).
    let mut tried = 0u32;
    let mut pause = rt.cfg.backoff_initial;
    // Made at the first transient answer: what follows logs.
    let mut span = None;
    loop {
        let started = Instant::now();
        tried += 1;
        let answer = call(rt, d, id, tried).await;
        rt.metrics.latency.record(started.elapsed().as_secs_f64());
        let (status, retry_after, cause) = match answer {
            Answer::Transient {
                status,
                retry_after,
                cause,
            } => (status, retry_after, cause),
            Answer::Processed => {
                rt.circuit.answered();
                rt.metrics.delivered.increment(1);
                return Ok(Outcome::Done);
            }
            // Boxed: delegation is the larger and rarer part of a delivery's future.
            answer => {
                rt.circuit.answered();
                return Box::pin(finish(rt, d, answer).instrument(d.span())).await;
            }
        };
        let span = span.get_or_insert_with(|| d.span());
        rt.metrics.failed_transient.increment(1);
        // The circuit logs when it opens: in the message's span.
        if span.in_scope(|| rt.circuit.transient()) {
            tries += 1;
        }
        if tries >= rt.cfg.transient_tries {
            rt.metrics.failed_exhausted.increment(1);
            let mut error = FailureError::bare(ErrorKind::TransientExhausted, status);
            error.detail = Some(format!("{cause} ({tries} tries)"));
            let finish = finish(rt, d, Answer::Rejected(error)).instrument(span.clone());
            return Box::pin(finish).await;
        }
        let delay = retry_after.unwrap_or(pause).min(rt.cfg.backoff_max);
        pause = (pause * 2).min(rt.cfg.backoff_max);
        span.in_scope(|| {
            tracing::warn!(
                cause,
                tries,
                delay_ms = delay.as_millis() as u64,
                "Transient failure; will retry."
            );
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = rt.shutdown.cancelled() => return Err(Settle::HandBack),
        }
    }
}

/// A message whose NATS headers cannot be passed on as they are: parked for a person.
async fn unreadable(rt: &BindingRuntime, d: &Delivery) -> Result<Outcome, Settle> {
    let why = d
        .unreadable
        .as_ref()
        .map(|u| u.why.clone())
        .unwrap_or_default();
    // Its headers cannot be passed on as they are: a person decides.
    tracing::warn!(why, "NATS headers unreadable; parking the message.");
    let mut error = FailureError::bare(ErrorKind::Message, None);
    error.code = Some(UNREADABLE_HEADERS.to_owned());
    error.title = Some("the message's NATS headers cannot be read".to_owned());
    error.detail = Some(why);
    Box::pin(delegate::failure(rt, d, error, Destination::Unreadable)).await?;
    rt.metrics.parked.increment(1);
    Ok(Outcome::Unresolved)
}

/// One call of the app for `d` (Mend-Id `id`), its `tried`th: its own request, or its entry in
/// the next batch.
async fn call(rt: &BindingRuntime, d: &Delivery, id: &str, tried: u32) -> Answer {
    match &rt.batcher {
        Some(batcher) => {
            // The entry's part of the batch as a client span under its `receive`, linked from the
            // batch's own span (which carries the HTTP status).
            let mut span = d.trace.child("deliver", otel::Kind::Client, || {
                vec![
                    otel::KeyValue::new("mend.try", i64::from(tried)),
                    otel::KeyValue::new("mend.batched", true),
                ]
            });
            let (nats, payload) = (d.headers.as_ref(), &d.payload);
            // The app's work on the entry continues under the entry's span.
            let trace = span.traceparent();
            let trace = trace.as_ref().map(|(p, s)| (p.as_str(), s.as_deref()));
            let entry = headers::batch_entry(&rt.fixed_headers, id, &d.meta, nats, payload, trace);
            let (answer, batch) = batcher.call(id.to_owned(), entry, span.context()).await;
            if let Some(batch) = batch {
                span.link(&batch, Vec::new());
            }
            span.status(answer.is_success(), answer.kind());
            answer
        }
        None => {
            // The call as a client span under the message's `receive` (when traces are on), the
            // app's work under it.
            let mut span = d.trace.child("deliver", otel::Kind::Client, || {
                vec![
                    otel::KeyValue::new("http.request.method", "POST"),
                    otel::KeyValue::new("mend.try", i64::from(tried)),
                ]
            });
            // Built per try (retries are rare): reqwest takes the map, and a clone would cost as
            // much.
            let mut headers = headers::app_request(&rt.fixed_headers, &d.meta, d.headers.as_ref());
            otel::inject_http(&span, &mut headers);
            let (status, answer) = rt.app.call(headers, d.payload.clone()).await;
            if span.is_some() {
                if let Some(status) = status {
                    span.set(otel::KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    ));
                }
                span.status(answer.is_success(), answer.kind());
            }
            answer
        }
    }
}

/// Finishes a message the app answered for good.
pub(crate) async fn finish(
    rt: &BindingRuntime,
    d: &Delivery,
    answer: Answer,
) -> Result<Outcome, Settle> {
    match answer {
        Answer::Processed => {
            rt.metrics.delivered.increment(1);
            Ok(Outcome::Done)
        }
        Answer::Rejected(error) => {
            if error.kind == ErrorKind::Message {
                rt.metrics.failed_message.increment(1);
            }
            tracing::info!(
                status = error.status,
                code = error.code.as_deref(),
                "App rejected the message; delegating."
            );
            delegate::failure(rt, d, error, Destination::Failed).await?;
            rt.metrics.delegated.increment(1);
            Ok(Outcome::Unresolved)
        }
        Answer::Drop => {
            tracing::info!("App asked to drop the message.");
            delegate::announce(rt, "dropped", d, serde_json::json!({})).await?;
            rt.metrics.dropped.increment(1);
            Ok(Outcome::Done)
        }
        Answer::Park(error) => {
            tracing::info!("App asked to park the message.");
            delegate::failure(rt, d, error, Destination::Parked).await?;
            rt.metrics.parked.increment(1);
            Ok(Outcome::Unresolved)
        }
        // Handled by the caller's retry loop.
        Answer::Transient { .. } => Err(Settle::Leave),
    }
}
