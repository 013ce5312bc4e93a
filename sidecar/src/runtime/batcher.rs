//! Bulk delivery (SPEC §4 "Bulk delivery"): messages of a binding sent to the app many at a time.
//!
//! Each message is still its key's lane's work, with everything single delivery does around the call
//! (transient retries, the circuit, delegation, holds, the confirmed ack); only the call is shared.
//! A lane hands its entry to the binding's [`Batcher`] and waits for the answer to that entry. The
//! batcher's task fills a batch with what the lanes hand it, sends it when it holds `max_messages`
//! or `max_wait` after its first entry, and keeps up to `concurrency` batches in flight. A key has
//! one message in flight at a time, so a batch holds at most one message per key and per-key order is
//! exactly as in single delivery.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use metrics::Histogram;
use repair_rules::batch::{self, EntryStatus};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::common::otel;
use crate::common::telemetry as t;
use crate::runtime::config::BatchConfig;
use crate::runtime::deliver::{self, Answer, App, Reply};

/// The most of an answer that is read: 1,000 entries with problem objects of a few KiB each.
pub const ANSWER_LIMIT: usize = 16 * 1024 * 1024;

/// A batch's entries stop short of this many bytes (an entry this large on its own travels alone):
/// a request body an app's server takes (many refuse bodies over 1 or 2 MiB, with a 413 that would
/// count as a message error of every entry), and a bound on what one batch holds.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// An entry handed to the batcher and where its answer goes.
struct Pending {
    id: String,
    entry: String,
    /// The context of the entry's `deliver` span (traces on): the batch's span links to it.
    trace: Option<opentelemetry::Context>,
    /// The entry's answer, and the context of the batch's span (traces on).
    answer: oneshot::Sender<(Answer, Option<opentelemetry::Context>)>,
}

/// The batching side of one binding's app: entries in, one answer per entry out.
#[derive(Debug, Clone)]
pub struct Batcher {
    entries: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("id", &self.id).finish()
    }
}

/// Histograms of a binding's batches.
#[derive(Clone)]
pub struct BatchMetrics {
    size: Histogram,
    latency: Histogram,
}

impl BatchMetrics {
    pub fn new(service: &str, binding: &str) -> Self {
        let l = [
            ("service", service.to_owned()),
            ("binding", binding.to_owned()),
        ];
        Self {
            size: metrics::histogram!(t::BATCH_SIZE, &l),
            latency: metrics::histogram!(t::BATCH_LATENCY, &l),
        }
    }
}

impl Batcher {
    /// Starts the batching task of a binding; it ends when the last `Batcher` handle is dropped.
    /// `keyed`: the binding has a key (a lineage then has one message in flight).
    pub fn start(
        app: App,
        cfg: BatchConfig,
        concurrency: usize,
        keyed: bool,
        metrics: BatchMetrics,
    ) -> Self {
        let (entries, rx) = mpsc::channel(cfg.max_messages * concurrency.max(1));
        let slots = Arc::new(Semaphore::new(concurrency.max(1)));
        tokio::spawn(fill(rx, app, cfg, keyed, slots, metrics));
        Self { entries }
    }

    /// Sends the entry `entry` of the message with Mend-Id `id` in the next batch and returns what
    /// the app answered for it. `trace`: the entry's span, which the batch's links to; the
    /// batch's span context comes back with the answer, for the entry's span to link to.
    pub async fn call(
        &self,
        id: String,
        entry: String,
        trace: Option<opentelemetry::Context>,
    ) -> (Answer, Option<opentelemetry::Context>) {
        let (answer, answered) = oneshot::channel();
        if self
            .entries
            .send(Pending {
                id,
                entry,
                trace,
                answer,
            })
            .await
            .is_err()
        {
            return (transient("the binding's batching stopped".into()), None);
        }
        answered
            .await
            .unwrap_or_else(|_| (transient("the batch was given up".into()), None))
    }
}

/// The batching loop: waits for a free batch slot, then for a first entry, then for more until the
/// batch is full (`max_messages`, or [`MAX_BATCH_BYTES`]) or `max_wait` has passed since the
/// first, and sends it in a task of its own.
async fn fill(
    mut rx: mpsc::Receiver<Pending>,
    app: App,
    cfg: BatchConfig,
    keyed: bool,
    slots: Arc<Semaphore>,
    metrics: BatchMetrics,
) {
    // Entries left for the next batch: one that would have passed the byte limit, and (unkeyed
    // bindings only: with a key, a lineage has one message in flight) one whose Mend-Id the batch
    // held already, a redelivery beside its retry.
    let mut next: VecDeque<Pending> = VecDeque::new();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut carried = std::mem::take(&mut next);
        let first = match carried.pop_front() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let deadline = tokio::time::Instant::now() + cfg.max_wait;
        let mut ids = HashSet::new();
        if !keyed {
            ids.insert(first.id.clone());
        }
        let mut bytes = first.entry.len();
        let mut entries = Vec::with_capacity(cfg.max_messages);
        entries.push(first);
        while entries.len() < cfg.max_messages {
            let p = match carried.pop_front() {
                Some(p) => p,
                None => match next_entry(&mut rx, deadline).await {
                    Some(p) => p,
                    None => break,
                },
            };
            if bytes + p.entry.len() > MAX_BATCH_BYTES {
                next.push_back(p);
                break;
            }
            if !keyed && !ids.insert(p.id.clone()) {
                next.push_back(p);
                continue;
            }
            bytes += p.entry.len();
            entries.push(p);
        }
        // What was carried and not taken goes first next time, in its order.
        next.extend(carried);
        let (app, metrics) = (app.clone(), metrics.clone());
        tokio::spawn(async move {
            send(&app, entries, &metrics).await;
            drop(permit);
        });
    }
}

/// The next entry handed in before `deadline`; `None` once it has passed or no lane is left.
async fn next_entry(
    rx: &mut mpsc::Receiver<Pending>,
    deadline: tokio::time::Instant,
) -> Option<Pending> {
    match rx.try_recv() {
        Ok(p) => Some(p),
        Err(mpsc::error::TryRecvError::Disconnected) => None,
        Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
            got = rx.recv() => got,
            _ = tokio::time::sleep_until(deadline) => None,
        },
    }
}

/// Sends one batch and hands each entry its answer.
async fn send(app: &App, entries: Vec<Pending>, metrics: &BatchMetrics) {
    let body = batch::body(entries.iter().map(|p| p.entry.as_str()));
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(batch::CONTENT_TYPE));
    metrics.size.record(entries.len() as f64);
    // With traces on, the call is a client span of its own trace linked to each entry's `deliver`
    // (a batch has no one parent: its entries are of many traces), and the app's work is under it.
    // Links past the SDK's limit per span (`OTEL_SPAN_LINK_COUNT_LIMIT`, 128) are dropped; each
    // entry's span links back to the batch's in any case.
    let mut span = if entries.iter().any(|p| p.trace.is_some()) {
        otel::Span::start(
            "deliver batch",
            otel::Kind::Client,
            || None,
            || {
                vec![
                    otel::KeyValue::new("http.request.method", "POST"),
                    otel::KeyValue::new("messaging.batch.message_count", entries.len() as i64),
                ]
            },
        )
    } else {
        otel::Span::none()
    };
    let batch_cx = span.context();
    for p in &entries {
        if let Some(cx) = &p.trace {
            span.link(cx, vec![otel::KeyValue::new("mend.id", p.id.clone())]);
        }
    }
    otel::inject_http(&span, &mut headers);
    let started = Instant::now();
    let reply = app.post(headers, Bytes::from(body), ANSWER_LIMIT).await;
    metrics.latency.record(started.elapsed().as_secs_f64());
    if span.is_some() {
        match &reply {
            Ok(reply) => {
                let status = reply.status.as_u16();
                span.set(otel::KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                span.status(reply.status.is_success(), "the app's answer is not a 2xx");
            }
            Err(answer) => span.status(false, answer.kind()),
        }
    }
    drop(span);
    let mut answers = match answers(&reply, entries.len()) {
        Ok(answers) => answers,
        Err(all) => {
            for p in entries {
                let _ = p.answer.send(((*all).clone(), batch_cx.clone()));
            }
            return;
        }
    };
    let mut missing = 0usize;
    for p in entries {
        let answer = match answers.remove(p.id.as_str()) {
            Some(EntryStatus::Success) => Answer::Processed,
            Some(EntryStatus::Drop) => Answer::Drop,
            Some(EntryStatus::Fail(error)) => Answer::Rejected(*error),
            Some(EntryStatus::Retry) => transient("the app answered RETRY for it".into()),
            Some(EntryStatus::Unknown(status)) => {
                tracing::warn!(
                    id = p.id,
                    status,
                    "The app answered an unknown status for an entry; it will be retried."
                );
                transient(format!(
                    "the app answered the unknown status {status:?} for it"
                ))
            }
            None => {
                missing += 1;
                transient("the app's answer had no status for it".into())
            }
        };
        let _ = p.answer.send((answer, batch_cx.clone()));
    }
    if missing > 0 {
        tracing::warn!(
            missing,
            "The app's answer had no status for some entries; they will be retried."
        );
    }
    if !answers.is_empty() {
        tracing::warn!(
            unknown = answers.len(),
            "The app's answer had statuses for ids not in the batch; ignored."
        );
    }
}

/// The statuses of a batch by Mend-Id (the first for an id counts; ids borrowed from the answer),
/// or the one answer every entry gets: a transient failure to call, a non-2xx answer classified as
/// for a single message, or a malformed answer (transient, and logged with what was wrong).
fn answers(
    reply: &Result<Reply, Answer>,
    entries: usize,
) -> Result<HashMap<Cow<'_, str>, EntryStatus>, Box<Answer>> {
    let reply = reply.as_ref().map_err(|a| Box::new(a.clone()))?;
    if !reply.status.is_success() {
        if let Some(cause) = reply.unread.clone() {
            return Err(Box::new(Answer::Transient {
                status: Some(reply.status.as_u16()),
                retry_after: None,
                cause,
            }));
        }
        let body = &reply.body[..reply.body.len().min(64 * 1024)];
        return Err(Box::new(deliver::classify(
            reply.status,
            &reply.headers,
            body,
        )));
    }
    let what = if let Some(cause) = &reply.unread {
        cause.clone()
    } else if reply.truncated {
        format!("the answer is larger than {} MiB", ANSWER_LIMIT >> 20)
    } else {
        match batch::statuses(&reply.body) {
            Ok(list) => {
                let mut by_id = HashMap::with_capacity(entries);
                for (id, status) in list {
                    by_id.entry(id).or_insert(status);
                }
                return Ok(by_id);
            }
            Err(what) => what,
        }
    };
    tracing::warn!(
        status = reply.status.as_u16(),
        entries,
        what,
        "The app's answer to a batch is malformed; its entries will be retried."
    );
    Err(Box::new(Answer::Transient {
        status: Some(reply.status.as_u16()),
        retry_after: None,
        cause: format!("malformed batch answer: {what}"),
    }))
}

fn transient(cause: String) -> Answer {
    Answer::Transient {
        status: None,
        retry_after: None,
        cause,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;
    use std::io::Write as _;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::runtime::config::SidecarConfig;

    /// An app on loopback that answers each entry of a batch with SUCCESS, plus an answer for an
    /// id the batch did not hold, and records the ids of every batch.
    async fn recording_app() -> (String, Arc<Mutex<Vec<Vec<String>>>>) {
        let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/batch",
            axum::routing::post(move |body: Bytes| {
                let record = record.clone();
                async move {
                    let entries: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                    let ids: Vec<String> = entries
                        .iter()
                        .map(|e| e["id"].as_str().unwrap().to_owned())
                        .collect();
                    let mut statuses: Vec<_> = ids
                        .iter()
                        .map(|id| serde_json::json!({"id": id, "status": "SUCCESS"}))
                        .collect();
                    statuses.push(serde_json::json!({"id": "NOT:1", "status": "FAIL"}));
                    record.lock().unwrap().push(ids);
                    axum::Json(serde_json::json!({ "statuses": statuses }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/batch"), seen)
    }

    /// A batcher of an unkeyed binding with one batch in flight, up to `max` entries a batch.
    fn batcher(endpoint: &str, max: usize) -> Batcher {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(
            f,
            r#"
service  = "orders"
nats_url = "nats://127.0.0.1:4222"
[[binding]]
name     = "orders"
stream   = "ORDERS"
subjects = ["orders.>"]
endpoint = "{endpoint}"
batch    = {{ max_messages = {max}, max_wait = "50ms" }}
"#
        )
        .unwrap();
        let c = SidecarConfig::load(f.path(), []).unwrap();
        let b = &c.bindings[0];
        let app = App::new(b).unwrap();
        Batcher::start(app, b.batch.unwrap(), 1, false, BatchMetrics::new("t", "t"))
    }

    // A redelivery beside its own retry (unkeyed): the same Mend-Id twice while a batch fills. The
    // second waits for the next batch; before, it was drawn again and again within the same batch
    // and the batcher never yielded. That spin starves its runtime (a time-out inside it never
    // fires), so the scenario runs on a runtime of its own thread, watched from the test's. An
    // answer for an id not in the batch is ignored.
    #[test]
    fn a_mend_id_twice_waits_for_the_next_batch() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let outcome = rt.block_on(async {
                let (endpoint, seen) = recording_app().await;
                let batcher = batcher(&endpoint, 4);
                let call = |id: &'static str| {
                    let entry = format!(r#"{{"id":"{id}"}}"#);
                    let call = batcher.call(id.to_owned(), entry, None);
                    async move { call.await.0 }
                };
                let answers =
                    futures::future::join_all([call("S:1"), call("S:1"), call("S:2"), call("S:3")])
                        .await;
                let seen = seen.lock().unwrap().clone();
                (answers, seen)
            });
            let _ = tx.send(outcome);
        });
        let (answers, seen) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the batcher answers every call");
        assert!(
            answers.iter().all(|a| *a == Answer::Processed),
            "{answers:?}"
        );
        let mut all: Vec<&String> = seen.iter().flatten().collect();
        all.sort();
        assert_eq!(all, ["S:1", "S:1", "S:2", "S:3"], "{seen:?}");
        for batch in &seen {
            let mut ids = batch.clone();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), batch.len(), "an id twice in one batch: {seen:?}");
        }
        assert!(seen.len() >= 2, "{seen:?}");
    }

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
            truncated: false,
            unread: None,
        }
    }

    #[test]
    fn a_non_2xx_answer_is_every_entrys() {
        let Err(all) = answers(&Ok(reply(503, "")), 3) else {
            panic!()
        };
        assert!(matches!(
            *all,
            Answer::Transient {
                status: Some(503),
                ..
            }
        ));
        let Err(all) = answers(&Ok(reply(422, "no")), 3) else {
            panic!()
        };
        assert!(matches!(*all, Answer::Rejected(_)));
    }

    #[test]
    fn malformed_and_oversized_answers_are_transient() {
        let Err(all) = answers(&Ok(reply(200, "OK")), 2) else {
            panic!()
        };
        let Answer::Transient { cause, .. } = *all else {
            panic!()
        };
        assert!(cause.starts_with("malformed batch answer"), "{cause}");
        let mut big = reply(200, "{");
        big.truncated = true;
        let Err(all) = answers(&Ok(big), 2) else {
            panic!()
        };
        let Answer::Transient { cause, .. } = *all else {
            panic!()
        };
        assert!(cause.contains("larger than 16 MiB"), "{cause}");
    }

    #[test]
    fn the_first_status_of_an_id_counts() {
        let r = Ok(reply(
            200,
            r#"{"statuses":[{"id":"S:1","status":"DROP"},{"id":"S:1","status":"SUCCESS"}]}"#,
        ));
        let a = answers(&r, 1).unwrap();
        assert_eq!(a["S:1"], EntryStatus::Drop);
    }
}
