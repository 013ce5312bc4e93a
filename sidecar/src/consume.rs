//! One binding's dispatcher: pull from the durable consumer, put each message in its key's lane,
//! deliver to the app, and finish each message exactly one way: confirmed ack, delegation, drop or
//! park (SPEC §4, §7).
//!
//! The dispatcher owns all scheduling state in one task; deliveries run as futures it polls (no task
//! per message). Every message it holds, queued or in flight, is kept alive with in-progress acks, so
//! the server never redelivers a message that is merely waiting for its key's turn.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::Client;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Stream as PullStream;
use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use metrics::{Counter, Gauge, Histogram};
use repair_rules::{ErrorKind, FailureError, HistoryEntry, LineageId, MessageKey};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ack;
use crate::circuit::Circuit;
use crate::config::{BindingConfig, KeySource};
use crate::delegate::{self, Destination};
use crate::deliver::{Answer, App};
use crate::headers::{self, DeliveryMeta};
use crate::telemetry as t;

/// Messages held per unit of concurrency (the consumer's max ack pending is the product): enough that
/// `concurrency` distinct keys are usually among them.
pub const BUFFER_PER_SLOT: usize = 16;
/// Messages asked for per pull request, at most.
const PULL_BATCH: usize = 256;

/// Everything the deliveries of one binding share.
pub struct BindingRuntime {
    pub service: String,
    pub cfg: BindingConfig,
    pub app: App,
    /// Request header values shared by every message of the binding.
    pub fixed_headers: headers::BindingHeaders,
    pub client: Client,
    pub js: jetstream::Context,
    /// Which connection of the client deliveries came on.
    pub epoch: ack::Epoch,
    pub circuit: Circuit,
    pub shutdown: CancellationToken,
    pub shutdown_timeout: Duration,
    pub metrics: BindingMetrics,
}

/// Metric handles of one binding, labelled once.
pub struct BindingMetrics {
    pub delivered: Counter,
    pub failed_transient: Counter,
    pub failed_message: Counter,
    pub failed_exhausted: Counter,
    pub delegated: Counter,
    pub dropped: Counter,
    pub parked: Counter,
    pub redelivered: Counter,
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub latency: Histogram,
    pub pending: Gauge,
    pub ack_pending: Gauge,
    pub circuit: Gauge,
}

impl BindingMetrics {
    pub fn new(service: &str, binding: &str) -> Self {
        let l = [
            ("service", service.to_owned()),
            ("binding", binding.to_owned()),
        ];
        let failed = |kind: &'static str| {
            let mut labels = l.to_vec();
            labels.push(("kind", kind.to_owned()));
            metrics::counter!(t::FAILED, &labels)
        };
        Self {
            delivered: metrics::counter!(t::DELIVERED, &l),
            failed_transient: failed("transient"),
            failed_message: failed("message"),
            failed_exhausted: failed("transient_exhausted"),
            delegated: metrics::counter!(t::DELEGATED, &l),
            dropped: metrics::counter!(t::DROPPED, &l),
            parked: metrics::counter!(t::PARKED_BY_APP, &l),
            redelivered: metrics::counter!(t::REDELIVERED_WHILE_BUFFERED, &l),
            in_flight: metrics::gauge!(t::IN_FLIGHT, &l),
            queued: metrics::gauge!(t::QUEUED, &l),
            latency: metrics::histogram!(t::APP_LATENCY, &l),
            pending: metrics::gauge!(t::CONSUMER_PENDING, &l),
            ack_pending: metrics::gauge!(t::CONSUMER_ACK_PENDING, &l),
            circuit: metrics::gauge!(t::CIRCUIT_OPEN, &l),
        }
    }
}

impl BindingRuntime {
    /// The consumer's max ack pending, derived from the binding's concurrency.
    pub fn max_ack_pending(cfg: &BindingConfig) -> usize {
        cfg.concurrency * BUFFER_PER_SLOT
    }
}

/// One message from the app stream, with what the sidecar derived from it once.
pub struct Delivery {
    pub msg: Message,
    pub meta: DeliveryMeta,
    /// The lineage's history so far (empty for an original; from `Mend-History` for a retry).
    pub history: Vec<HistoryEntry>,
    held_id: HeldId,
    reply: ack::Reply,
}

/// Which message the dispatcher holds: a message of the app stream or of the retry stream, by that
/// stream's sequence (the two sequences are unrelated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeldId {
    pub retry: bool,
    pub seq: u64,
}

impl Delivery {
    /// Whether this is a retry (a repair or resubmission) rather than an original.
    pub fn is_retry(&self) -> bool {
        self.held_id.retry
    }
}

/// A message the dispatcher holds, and when it last told the server so.
pub(crate) struct Held {
    reply: ack::Reply,
    touched: Instant,
}

/// After a crash, the previous instance's unacked messages come back only when their ack wait runs
/// out, while newer messages would be delivered at once: that would break per-key order. So on start,
/// while the consumer has unacked messages, newly pulled messages are held back until as many
/// redeliveries have arrived (or one ack wait has passed), then released in stream order.
struct Quarantine {
    until: Instant,
    expected: u64,
    redelivered: u64,
    held_back: Vec<(Option<MessageKey>, Delivery)>,
}

/// A finished delivery: its key may take its next message.
struct Done {
    held_id: HeldId,
    key: Option<MessageKey>,
}

type Running = FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>;

/// Runs the binding until shutdown: stop pulling, hand back what has not started, finish what is in
/// flight within the shutdown timeout, hand back the rest.
pub async fn run(
    rt: Arc<BindingRuntime>,
    consumer: PullConsumer,
    mut retries: Option<mpsc::Receiver<Message>>,
) {
    let max_held = BindingRuntime::max_ack_pending(&rt.cfg);
    let mut lanes: crate::lanes::Lanes<Delivery> = crate::lanes::Lanes::new(rt.cfg.concurrency);
    let mut held: HashMap<HeldId, Held> = HashMap::new();
    let mut running: Running = FuturesUnordered::new();
    let keepalive_every = rt.cfg.ack_wait / 4;
    let mut keepalive = tokio::time::interval(keepalive_every);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quarantine = quarantine_on_start(&rt, &consumer).await;
    let mut messages = crate::nats::pull(&consumer, max_held.min(PULL_BATCH), &rt.shutdown).await;
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut stopping = false;

    loop {
        let pulling =
            !stopping && messages.is_some() && held.len() < max_held && !rt.circuit.is_open();
        tokio::select! {
            Some(done) = running.next(), if !running.is_empty() => {
                held.remove(&done.held_id);
                lanes.done(done.key.as_ref());
            }
            _ = rt.shutdown.cancelled(), if !stopping => {
                stopping = true;
                messages = None;
                release(&mut quarantine, &mut lanes);
                for d in lanes.drain_queued() {
                    held.remove(&d.held_id);
                    ack::hand_back(&rt.client, &d.reply).await;
                }
                tracing::info!(in_flight = running.len(), binding = %rt.cfg.name,
                    "Stopping: pulling stopped, finishing in-flight deliveries.");
                deadline = Some(Box::pin(tokio::time::sleep(rt.shutdown_timeout)));
            }
            // Retries are not held to the app stream's budget: they are the heads of their lineages,
            // and the retry consumer's own max ack pending bounds them.
            retry = async { match retries.as_mut() { Some(r) => r.recv().await, None => None } },
                if !stopping && retries.is_some() => match retry {
                Some(msg) => crate::retry::admit(&rt, msg, &mut lanes, &mut held),
                None => retries = None,
            },
            next = next_message(&mut messages), if pulling => match next {
                Some(Ok(msg)) => admit(&rt, msg, &mut lanes, &mut held, &mut quarantine),
                Some(Err(error)) => {
                    tracing::warn!(%error, binding = %rt.cfg.name, "Pull failed; continuing.");
                }
                None => {
                    tracing::warn!(binding = %rt.cfg.name, "Pull stream ended; reopening.");
                    messages = crate::nats::pull(&consumer, max_held.min(PULL_BATCH), &rt.shutdown).await;
                }
            },
            _ = keepalive.tick() => {
                let stale = Instant::now() - rt.cfg.ack_wait / 3;
                for h in held.values_mut().filter(|h| h.touched <= stale) {
                    ack::progress(&rt.client, &h.reply).await;
                    h.touched = Instant::now();
                }
            }
            _ = async { if let Some(q) = &quarantine { tokio::time::sleep_until(q.until.into()).await } },
                if quarantine.is_some() => {
                release(&mut quarantine, &mut lanes);
            }
            _ = async { if let Some(d) = deadline.as_mut() { d.await } }, if deadline.is_some() => {
                tracing::warn!(in_flight = running.len(), "Shutdown deadline reached; handing back in-flight messages.");
                for h in held.values() {
                    ack::hand_back(&rt.client, &h.reply).await;
                }
                return;
            }
        }
        while let Some((key, d)) = lanes.start_next() {
            running.push(Box::pin(process(rt.clone(), key, d)));
        }
        rt.metrics.in_flight.set(running.len() as f64);
        rt.metrics
            .queued
            .set(held.len().saturating_sub(running.len()) as f64);
        if stopping && running.is_empty() {
            return;
        }
    }
}

async fn quarantine_on_start(rt: &BindingRuntime, consumer: &PullConsumer) -> Option<Quarantine> {
    let mut consumer = consumer.clone();
    let unacked = match consumer.info().await {
        Ok(info) => info.num_ack_pending as u64,
        Err(error) => {
            tracing::warn!(%error, "Consumer state unknown; holding back new messages for one ack wait.");
            u64::MAX
        }
    };
    if unacked == 0 {
        return None;
    }
    tracing::info!(
        unacked,
        "Unacked messages of a previous run: they come first, then newer ones, in stream order."
    );
    Some(Quarantine {
        until: Instant::now() + rt.cfg.ack_wait + Duration::from_secs(1),
        expected: unacked,
        redelivered: 0,
        held_back: Vec::new(),
    })
}

/// Ends the start-up quarantine: everything held back enters its lane in stream order.
fn release(quarantine: &mut Option<Quarantine>, lanes: &mut crate::lanes::Lanes<Delivery>) {
    let Some(mut q) = quarantine.take() else {
        return;
    };
    q.held_back.sort_by_key(|(_, d)| d.meta.lineage.seq);
    tracing::info!(
        released = q.held_back.len(),
        redelivered = q.redelivered,
        "Start-up hold-back over."
    );
    for (key, d) in q.held_back {
        lanes.push(key, d);
    }
}

async fn next_message(
    messages: &mut Option<PullStream>,
) -> Option<Result<Message, async_nats::jetstream::consumer::pull::MessagesError>> {
    match messages {
        Some(m) => m.next().await,
        None => std::future::pending().await,
    }
}

/// Takes a pulled message into its key's lane, unless the sidecar already holds it (a redelivery
/// of a message still waiting: the original stays where it is).
fn admit(
    rt: &BindingRuntime,
    msg: Message,
    lanes: &mut crate::lanes::Lanes<Delivery>,
    held: &mut HashMap<HeldId, Held>,
    quarantine: &mut Option<Quarantine>,
) {
    let (seq, published, delivered) = match msg.info() {
        Ok(info) => (
            info.stream_sequence,
            SystemTime::from(info.published),
            info.delivered,
        ),
        Err(error) => {
            tracing::error!(%error, subject = %msg.subject, "Not a JetStream message; ignored.");
            return;
        }
    };
    let Some(subject) = msg.reply.clone() else {
        return;
    };
    let held_id = HeldId { retry: false, seq };
    let Some(reply) = hold(rt, held, held_id, subject) else {
        return;
    };
    let key = rt.cfg.key.as_ref().and_then(|source| key_of(source, &msg));
    let meta = DeliveryMeta {
        service: rt.service.clone(),
        lineage: LineageId::new(rt.cfg.stream.clone(), seq),
        key: key.clone(),
        attempt: 1,
        subject: msg.subject.to_string(),
        published,
        repaired_by: None,
        resubmitted_by: None,
    };
    let d = Delivery {
        msg,
        meta,
        history: Vec::new(),
        held_id,
        reply,
    };
    match quarantine {
        Some(q) => {
            if delivered > 1 {
                q.redelivered += 1;
            }
            q.held_back.push((key, d));
            if q.redelivered >= q.expected {
                release(quarantine, lanes);
            }
        }
        None => lanes.push(key, d),
    }
}

/// Starts holding `id`, kept alive from now on; `None` if it is held already (a redelivery: the one
/// held stays where it is and acks on the newest reply subject).
pub(crate) fn hold(
    rt: &BindingRuntime,
    held: &mut HashMap<HeldId, Held>,
    id: HeldId,
    subject: async_nats::Subject,
) -> Option<ack::Reply> {
    if let Some(h) = held.get_mut(&id) {
        rt.metrics.redelivered.increment(1);
        h.reply.redelivered(subject, rt.epoch.current());
        h.touched = Instant::now();
        return None;
    }
    let reply = ack::Reply::new(subject, rt.epoch.current());
    held.insert(
        id,
        Held {
            reply: reply.clone(),
            touched: Instant::now(),
        },
    );
    Some(reply)
}

/// A message of the retry stream, ready for its key's lane.
pub(crate) fn retry_delivery(
    msg: Message,
    meta: DeliveryMeta,
    history: Vec<HistoryEntry>,
    seq: u64,
    reply: ack::Reply,
) -> Delivery {
    Delivery {
        msg,
        meta,
        history,
        held_id: HeldId { retry: true, seq },
        reply,
    }
}

/// The key of `msg` per the binding's key source; a message without one is delivered unordered.
pub fn key_of(source: &KeySource, msg: &Message) -> Option<MessageKey> {
    let key = match source {
        KeySource::Header(name) => msg
            .headers
            .as_ref()
            .and_then(|h| h.get(name.as_str()))
            .map(|v| v.as_str().to_owned()),
        KeySource::Json(pointer) => serde_json::from_slice::<serde_json::Value>(&msg.payload)
            .ok()
            .and_then(|v| match v.pointer(pointer)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                serde_json::Value::Bool(b) => Some(b.to_string()),
                _ => None,
            }),
    };
    if key.is_none() {
        tracing::debug!(subject = %msg.subject, "Message has no key; delivered without order.");
    }
    key.map(MessageKey)
}

/// Delivers one message and finishes it. Returns when the key may take its next message.
async fn process(rt: Arc<BindingRuntime>, key: Option<MessageKey>, d: Delivery) -> Done {
    let span = tracing::info_span!(
        "msg",
        mend_id = %d.meta.lineage,
        key = d.meta.key.as_ref().map(|k| k.as_str()),
        attempt = d.meta.attempt,
    );
    let held_id = d.held_id;
    deliver(&rt, &d).instrument(span).await;
    Done { held_id, key }
}

async fn deliver(rt: &BindingRuntime, d: &Delivery) {
    let mut tries = 0;
    let mut pause = rt.cfg.backoff_initial;
    loop {
        // Built per try (retries are rare): reqwest takes the map, and a clone would cost as much.
        let headers = headers::app_request(&rt.fixed_headers, &d.meta, d.msg.headers.as_ref());
        let started = Instant::now();
        let answer = rt.app.call(headers, d.msg.payload.clone()).await;
        rt.metrics.latency.record(started.elapsed().as_secs_f64());
        let (status, retry_after, cause) = match answer {
            Answer::Transient {
                status,
                retry_after,
                cause,
            } => (status, retry_after, cause),
            answer => {
                rt.circuit.answered();
                return finish(rt, d, answer).await;
            }
        };
        rt.metrics.failed_transient.increment(1);
        if rt.circuit.transient() {
            tries += 1;
        }
        if tries >= rt.cfg.transient_tries {
            rt.metrics.failed_exhausted.increment(1);
            let mut error = FailureError::bare(ErrorKind::TransientExhausted, status);
            error.detail = Some(format!("{cause} ({tries} tries)"));
            return finish(rt, d, Answer::Rejected(error)).await;
        }
        let delay = retry_after.unwrap_or(pause).min(rt.cfg.backoff_max);
        pause = (pause * 2).min(rt.cfg.backoff_max);
        tracing::warn!(
            cause,
            tries,
            delay_ms = delay.as_millis() as u64,
            "Transient failure; will retry."
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = rt.shutdown.cancelled() => {
                ack::hand_back(&rt.client, &d.reply).await;
                return;
            }
        }
    }
}

/// Finishes a message the app answered for good.
async fn finish(rt: &BindingRuntime, d: &Delivery, answer: Answer) {
    let finished = match answer {
        Answer::Processed => {
            rt.metrics.delivered.increment(1);
            Ok(())
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
            let r = delegate::failure(rt, d, error, Destination::Failed).await;
            if r.is_ok() {
                rt.metrics.delegated.increment(1);
            }
            r
        }
        Answer::Drop => {
            tracing::info!("App asked to drop the message.");
            let r = delegate::announce(rt, "dropped", d, serde_json::json!({})).await;
            if r.is_ok() {
                rt.metrics.dropped.increment(1);
            }
            r
        }
        Answer::Park(error) => {
            tracing::info!("App asked to park the message.");
            let r = delegate::failure(rt, d, error, Destination::Parked).await;
            if r.is_ok() {
                rt.metrics.parked.increment(1);
            }
            r
        }
        Answer::Transient { .. } => return,
    };
    match finished {
        Ok(()) => {
            ack::confirm(&rt.client, &d.reply, &rt.epoch, rt.cfg.ack_wait).await;
        }
        Err(crate::publish::NotStored::Stopped) => {
            tracing::warn!("Not finished before shutdown; handing the message back.");
            ack::hand_back(&rt.client, &d.reply).await;
        }
        // Left unacked, not handed back: an immediate redelivery would fail the same way at once.
        Err(crate::publish::NotStored::Unpublishable) => {}
    }
}

/// Keeps the consumer metrics current: lag and unacked messages, from the server's view.
pub async fn watch_consumer(rt: Arc<BindingRuntime>, mut consumer: PullConsumer) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = rt.shutdown.cancelled() => return,
        }
        match consumer.info().await {
            Ok(info) => {
                rt.metrics.pending.set(info.num_pending as f64);
                rt.metrics.ack_pending.set(info.num_ack_pending as f64);
            }
            Err(error) => tracing::debug!(%error, "Consumer info unavailable."),
        }
    }
}
