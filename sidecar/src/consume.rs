//! One binding's dispatcher: pull from the durable consumer, put each message in its key's lane,
//! deliver to the app, and finish each message exactly one way: confirmed ack, delegation, drop or
//! park (SPEC §4, §7); a message of a held key goes to the key's hold queue instead.
//!
//! The dispatcher owns all scheduling state in one task; the work of the lanes runs as futures it
//! polls (no task per message). A lane's work is a message (from the app stream or the retry
//! subject), a step of a hold's release, a command from the dashboard, or forgetting a resolved hold:
//! everything that touches a key's hold goes through the key's lane, one at a time. Every message the
//! dispatcher holds, queued or in flight, is kept alive with in-progress acks, so the server never
//! redelivers a message that is merely waiting for its key's turn.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::Client;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Stream as PullStream;
use async_nats::jetstream::{self, Message};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use metrics::{Counter, Gauge, Histogram};
use repair_rules::holds::{self as protocol, HoldState, Origin, Outcome, Route};
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
use crate::holds::{HoldError, Holds};
use crate::publish::NotStored;
use crate::telemetry as t;

/// Messages held per unit of concurrency (the consumer's max ack pending is the product): enough that
/// `concurrency` distinct keys are usually among them.
pub const BUFFER_PER_SLOT: usize = 16;
/// The error code of a message parked because its key cannot be read.
pub const UNREADABLE_KEY: &str = "mend_unreadable_key";
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
    /// The binding's holds (bindings with a key only).
    pub holds: Option<Holds>,
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
    pub held_keys: Gauge,
    pub held_messages: Gauge,
    pub hold_oldest_age: Gauge,
    pub hold_alerts: Gauge,
    pub releases: Counter,
    pub commands: Counter,
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
            held_keys: metrics::gauge!(t::HELD_KEYS, &l),
            held_messages: metrics::gauge!(t::HELD_MESSAGES, &l),
            hold_oldest_age: metrics::gauge!(t::HOLD_OLDEST_AGE, &l),
            hold_alerts: metrics::gauge!(t::HOLD_ALERTS, &l),
            releases: metrics::counter!(t::RELEASES, &l),
            commands: metrics::counter!(t::CONTROL_COMMANDS, &l),
        }
    }
}

impl BindingRuntime {
    /// The consumer's max ack pending, derived from the binding's concurrency.
    pub fn max_ack_pending(cfg: &BindingConfig) -> usize {
        cfg.concurrency * BUFFER_PER_SLOT
    }
}

/// One message to deliver, with what the sidecar derived from it once.
pub struct Delivery {
    pub payload: Bytes,
    pub headers: Option<async_nats::HeaderMap>,
    pub meta: DeliveryMeta,
    /// The lineage's history so far (empty for an original; from `Mend-History` for a retry).
    pub history: Vec<HistoryEntry>,
    pub source: Source,
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
    fn origin(&self) -> Origin {
        if self.is_retry() {
            Origin::Retry
        } else {
            Origin::App
        }
    }

    fn held_id(&self) -> Option<HeldId> {
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
    fn held_id(&self) -> Option<HeldId> {
        match self {
            Work::Message(d) | Work::Unkeyable(d, _) => d.held_id(),
            Work::Command { id, .. } => Some(*id),
            Work::Release | Work::Forget => None,
        }
    }

    /// The reply subject to hand the work back on at shutdown, if it came from a consumer.
    fn reply(&self) -> Option<&ack::Reply> {
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

/// A finished piece of work: its key may take its next; `then` goes to the back of the key's lane.
struct Done {
    held_id: Option<HeldId>,
    key: Option<MessageKey>,
    then: Option<Work>,
    /// What kind of work finished (a release step or a forget: the key's pending marker ends).
    was: Chore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chore {
    None,
    Release,
    Forget,
}

/// Releases and forgets scheduled per key, so a key's lane has at most one of each.
#[derive(Default)]
struct Chores {
    releasing: HashSet<MessageKey>,
    forgetting: HashSet<MessageKey>,
}

impl Chores {
    /// Queues `work` for `key` unless the same chore is queued already.
    fn push(&mut self, lanes: &mut crate::lanes::Lanes<Work>, key: MessageKey, work: Work) {
        let fresh = match &work {
            Work::Release => self.releasing.insert(key.clone()),
            Work::Forget => self.forgetting.insert(key.clone()),
            _ => true,
        };
        if fresh {
            match work {
                // A release unblocks its key: its turn comes before the key's newer messages.
                Work::Release => lanes.push_urgent(key, work),
                work => lanes.push(Some(key), work),
            }
        }
    }

    /// A piece of work finished: its follow-up, if any, goes to the back of the key's lane.
    fn done(&mut self, lanes: &mut crate::lanes::Lanes<Work>, done: Done) {
        let Some(key) = done.key else { return };
        match (done.was, done.then) {
            (Chore::Release, Some(Work::Release)) => lanes.push_urgent(key, Work::Release),
            (was, then) => {
                match was {
                    Chore::Release => self.releasing.remove(&key),
                    Chore::Forget => self.forgetting.remove(&key),
                    Chore::None => false,
                };
                if let Some(work) = then {
                    self.push(lanes, key, work);
                }
            }
        }
    }
}

/// How often the hold gauges are set.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// How often resolved holds are checked for being old enough to forget.
const FORGET_EVERY: Duration = Duration::from_secs(30);

type Running = FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>;

/// Runs the binding until shutdown: stop pulling, hand back what has not started, finish what is in
/// flight within the shutdown timeout, hand back the rest.
pub async fn run(
    rt: Arc<BindingRuntime>,
    consumer: PullConsumer,
    mut retries: Option<mpsc::Receiver<crate::retry::Inbound>>,
) {
    let max_held = BindingRuntime::max_ack_pending(&rt.cfg);
    let mut lanes: crate::lanes::Lanes<Work> = crate::lanes::Lanes::new(rt.cfg.concurrency);
    let mut chores = Chores::default();
    // Holds left by an earlier run: releases in progress resume; held keys look for their head's
    // retry in their queue.
    if let Some(holds) = &rt.holds {
        for (key, state) in holds.keys() {
            if state != HoldState::Resolved {
                chores.push(&mut lanes, key, Work::Release);
            }
        }
    }
    let mut alerted: HashSet<MessageKey> = HashSet::new();
    let mut gauges = tokio::time::interval(GAUGES_EVERY);
    gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut forget = tokio::time::interval(FORGET_EVERY);
    forget.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                if let Some(id) = done.held_id {
                    held.remove(&id);
                }
                lanes.done(done.key.as_ref());
                chores.done(&mut lanes, done);
            }
            _ = rt.shutdown.cancelled(), if !stopping => {
                stopping = true;
                messages = None;
                // Retries and commands routed here and not yet taken go back at once too.
                if let Some(mut inbound) = retries.take() {
                    inbound.close();
                    while let Ok(routed) = inbound.try_recv() {
                        if let Some(reply) = routed.into_message().message.reply {
                            let reply = ack::Reply::new(reply, rt.epoch.current());
                            ack::hand_back(&rt.client, &reply).await;
                        }
                    }
                }
                release(&mut quarantine, &mut lanes);
                for work in lanes.drain_queued() {
                    if let Some(id) = work.held_id() {
                        held.remove(&id);
                    }
                    if let Some(reply) = work.reply() {
                        ack::hand_back(&rt.client, reply).await;
                    }
                }
                tracing::info!(in_flight = running.len(), binding = %rt.cfg.name,
                    "Stopping: pulling stopped, finishing in-flight deliveries.");
                deadline = Some(Box::pin(tokio::time::sleep(rt.shutdown_timeout)));
            }
            // Retries are not held to the app stream's budget: they are the heads of their lineages,
            // and the retry consumer's own max ack pending bounds them.
            retry = async { match retries.as_mut() { Some(r) => r.recv().await, None => None } },
                if !stopping && retries.is_some() => match retry {
                Some(inbound) => crate::retry::admit(&rt, inbound, &mut lanes, &mut held),
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
            _ = gauges.tick() => hold_metrics(&rt, &mut alerted),
            _ = forget.tick(), if !stopping => {
                if let Some(holds) = &rt.holds {
                    for key in holds.expired(crate::nats::DUPLICATE_WINDOW) {
                        chores.push(&mut lanes, key, Work::Forget);
                    }
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
        if stopping {
            // Nothing new starts once stopping (shutdown, or the lease lost): follow-up work of
            // what finished (a release's next turn) is left to whoever consumes the key next, and
            // a message queued meanwhile is handed back.
            for work in lanes.drain_queued() {
                if let Some(id) = work.held_id() {
                    held.remove(&id);
                }
                if let Some(reply) = work.reply() {
                    ack::hand_back(&rt.client, reply).await;
                }
            }
        } else {
            while let Some((key, work)) = lanes.start_next() {
                running.push(Box::pin(process(rt.clone(), key, work)));
            }
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
fn release(quarantine: &mut Option<Quarantine>, lanes: &mut crate::lanes::Lanes<Work>) {
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
        lanes.push(key, Work::Message(d));
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
    lanes: &mut crate::lanes::Lanes<Work>,
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
    let held_id = HeldId {
        inlet: Inlet::App,
        seq,
    };
    let Some(reply) = hold(rt, held, held_id, subject) else {
        return;
    };
    let (key, unkeyable) = match rt.cfg.key.as_ref().map(|source| key_of(source, &msg)) {
        None | Some(Ok(None)) => (None, None),
        Some(Ok(Some(key))) => (Some(key), None),
        Some(Err(why)) => (None, Some(why)),
    };
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
        payload: msg.message.payload,
        headers: msg.message.headers,
        meta,
        history: Vec::new(),
        source: Source::Consumer { id: held_id, reply },
    };
    // A keyed binding fails closed: a message whose key cannot be read is never delivered outside
    // its key's order; it goes to a person.
    if let Some(why) = unkeyable {
        lanes.push(None, Work::Unkeyable(d, why));
        return;
    }
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
        None => lanes.push(key, Work::Message(d)),
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

/// The key of `msg` per the binding's key source: `None` when the message has none (no such
/// header, no such member, or `null`: delivered unordered); an error saying why when it may have
/// one that cannot be read (a payload that is not JSON or nests deeper than the JSON reader goes, a
/// member that is an object or an array).
pub fn key_of(source: &KeySource, msg: &Message) -> Result<Option<MessageKey>, String> {
    let key = match source {
        KeySource::Header(name) => msg
            .headers
            .as_ref()
            .and_then(|h| h.get(name.as_str()))
            .map(|v| v.as_str().to_owned()),
        KeySource::Json(pointer) => {
            let value = serde_json::from_slice::<serde_json::Value>(&msg.payload).map_err(|e| {
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
        tracing::debug!(subject = %msg.subject, "Message has no key; delivered without order.");
    }
    Ok(key.map(MessageKey))
}

/// Runs one piece of a lane's work. Returns when the key may take its next.
async fn process(rt: Arc<BindingRuntime>, key: Option<MessageKey>, work: Work) -> Done {
    let held_id = work.held_id();
    let (then, was) = match work {
        Work::Message(d) => {
            let span = tracing::info_span!(
                "msg",
                mend_id = %d.meta.lineage,
                key = d.meta.key.as_ref().map(|k| k.as_str()),
                attempt = d.meta.attempt,
            );
            (
                message(&rt, key.as_ref(), d).instrument(span).await,
                Chore::None,
            )
        }
        Work::Release => {
            let then = match (&rt.holds, &key) {
                (Some(holds), Some(key)) => {
                    let span = tracing::info_span!("release", key = key.as_str());
                    crate::release::step(&rt, holds, key).instrument(span).await
                }
                _ => None,
            };
            (then, Chore::Release)
        }
        Work::Command { command, reply, .. } => (
            crate::release::command(&rt, key.as_ref(), command, &reply).await,
            Chore::None,
        ),
        Work::Forget => {
            if let (Some(holds), Some(key)) = (&rt.holds, &key) {
                holds.forget(key, crate::nats::DUPLICATE_WINDOW).await;
            }
            (None, Chore::Forget)
        }
        Work::Unkeyable(d, why) => {
            tracing::warn!(mend_id = %d.meta.lineage, why, "Key unreadable; parking the message.");
            let mut error = FailureError::bare(ErrorKind::Message, None);
            error.code = Some(UNREADABLE_KEY.to_owned());
            error.title = Some("the message's key cannot be read".to_owned());
            error.detail = Some(why);
            let how = match delegate::failure(&rt, &d, error, Destination::Unkeyable).await {
                Ok(()) => {
                    rt.metrics.parked.increment(1);
                    Settle::Ack
                }
                Err(e) => e.into(),
            };
            settle(&rt, &d, how).await;
            (None, Chore::None)
        }
    };
    Done {
        held_id,
        key,
        then,
        was,
    }
}

/// How a piece of work on a consumer's message ended, which says how to settle the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done with it: ack, confirmed before the key's next message.
    Ack,
    /// Done with it, and a lost ack would do no harm (its effects are stored under de-duplicating
    /// ids): ack without waiting for the confirmation.
    AckPlain,
    /// Not done before shutdown (or this instance no longer owns the key): hand it back.
    HandBack,
    /// It cannot be finished now: left unacked, redelivered after its ack wait.
    Leave,
}

impl From<NotStored> for Settle {
    fn from(e: NotStored) -> Self {
        match e {
            NotStored::Stopped => Settle::HandBack,
            // An immediate redelivery would fail the same way at once.
            NotStored::Unpublishable => Settle::Leave,
        }
    }
}

impl Settle {
    /// What a failed hold operation means for the message being worked on.
    pub(crate) fn from_hold(rt: &BindingRuntime, error: HoldError) -> Self {
        match error {
            HoldError::Stopped => Settle::HandBack,
            HoldError::Conflict { .. } => {
                tracing::error!(%error, "Another instance changed this binding's holds; stopping the binding.");
                rt.shutdown.cancel();
                Settle::HandBack
            }
            HoldError::Unstorable { .. } => {
                tracing::error!(%error, "Hold not stored; the message stays unacked.");
                Settle::Leave
            }
        }
    }
}

/// Acks, hands back or leaves a consumer's message; a queued message is settled by its release.
pub(crate) async fn settle(rt: &BindingRuntime, d: &Delivery, how: Settle) {
    if let Source::Consumer { reply, .. } = &d.source {
        settle_reply(rt, reply, how).await;
    }
}

/// Acks, hands back or leaves the consumer's message with this reply subject.
pub(crate) async fn settle_reply(rt: &BindingRuntime, reply: &ack::Reply, how: Settle) {
    match how {
        Settle::Ack => {
            ack::confirm(&rt.client, reply, &rt.epoch, rt.cfg.ack_wait).await;
        }
        Settle::AckPlain => ack::unconfirmed(&rt.client, reply).await,
        Settle::HandBack => {
            tracing::warn!("Not finished; handing the message back.");
            ack::hand_back(&rt.client, reply).await;
        }
        Settle::Leave => {}
    }
}

/// A message from the app stream or the retry subject: delivered, held or settled as its key's hold
/// says, then acked. Returns the key's follow-up work (a release once its head is through).
async fn message(rt: &BindingRuntime, key: Option<&MessageKey>, d: Delivery) -> Option<Work> {
    let (Some(key), Some(holds)) = (key, rt.holds.as_ref()) else {
        let how = match deliver(rt, &d).await {
            Ok(Outcome::Done) if d.is_retry() => match crate::release::resolved(rt, &d, None).await
            {
                Ok(()) => Settle::Ack,
                Err(how) => how,
            },
            Ok(_) => Settle::Ack,
            Err(how) => how,
        };
        settle(rt, &d, how).await;
        return None;
    };
    let hold = holds.get(key);
    let lineage = d.meta.lineage.to_string();
    let origin = d.origin();
    let (how, then) = match protocol::route(hold.as_ref(), origin, &lineage) {
        Route::Settle => {
            tracing::info!(
                "A copy of a lineage this key has resolved already, or its held head's original: settled."
            );
            (Settle::Ack, None)
        }
        Route::Hold => (
            crate::release::hold_back(rt, holds, key, &d, hold.as_ref()).await,
            None,
        ),
        Route::Deliver => match deliver(rt, &d).await {
            Err(how) => (how, None),
            Ok(outcome) => {
                let fresh = holds.fresh(key);
                let change =
                    protocol::after_delivery(hold.as_ref(), origin, &lineage, outcome, fresh);
                match crate::release::commit(rt, holds, key, &d, outcome, change).await {
                    Ok(releasing) => (Settle::Ack, releasing.then_some(Work::Release)),
                    Err(how) => (how, None),
                }
            }
        },
    };
    settle(rt, &d, how).await;
    then
}

/// Delivers a message to the app (retrying transient failures in place) and finishes what its
/// answer asks for: nothing, an envelope for the processor or the dashboard, or a `dropped`
/// announcement. It is not settled here.
pub(crate) async fn deliver(rt: &BindingRuntime, d: &Delivery) -> Result<Outcome, Settle> {
    let mut tries = 0;
    let mut pause = rt.cfg.backoff_initial;
    loop {
        // Built per try (retries are rare): reqwest takes the map, and a clone would cost as much.
        let headers = headers::app_request(&rt.fixed_headers, &d.meta, d.headers.as_ref());
        let started = Instant::now();
        let answer = rt.app.call(headers, d.payload.clone()).await;
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
            _ = rt.shutdown.cancelled() => return Err(Settle::HandBack),
        }
    }
}

/// Finishes a message the app answered for good.
async fn finish(rt: &BindingRuntime, d: &Delivery, answer: Answer) -> Result<Outcome, Settle> {
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

/// Sets the hold gauges from the binding's holds, and makes a hold over the binding's alert age or
/// count loud once (until it is back under both): a warning and a `hold_alert` event.
fn hold_metrics(rt: &Arc<BindingRuntime>, alerted: &mut HashSet<MessageKey>) {
    let Some(holds) = &rt.holds else { return };
    let over = holds.over(rt.cfg.hold_alert_age, u64::from(rt.cfg.hold_alert_count));
    rt.metrics.hold_alerts.set(over.len() as f64);
    let now: HashSet<MessageKey> = over.iter().map(|(k, _, _)| k.clone()).collect();
    alerted.retain(|k| now.contains(k));
    for (key, hold, queued) in over {
        if !alerted.insert(key.clone()) {
            continue;
        }
        tracing::warn!(
            key = key.as_str(),
            head = hold.head,
            since = hold.since,
            held = queued,
            "A hold is over its alert age or count: its key waits for a person or a repair."
        );
        let rt = rt.clone();
        tokio::spawn(async move {
            let head = hold
                .head
                .parse::<LineageId>()
                .unwrap_or_else(|_| LineageId::new(rt.cfg.stream.clone(), 0));
            let event = crate::publish::Event {
                service: &rt.service,
                source: format!("urn:mend:sidecar:{}:{}", rt.service, rt.cfg.name),
                kind: "hold_alert",
                lineage: &head,
                attempt: 0,
                data: serde_json::json!({
                    "binding": rt.cfg.name,
                    "key": key.as_str(),
                    "head": hold.head,
                    "since": hold.since,
                    "held": queued,
                    "alert_age_seconds": rt.cfg.hold_alert_age.as_secs(),
                    "alert_count": rt.cfg.hold_alert_count,
                }),
            };
            if let Err(error) = crate::publish::announce(&rt.js, &rt.shutdown, event).await {
                tracing::debug!(?error, "hold_alert not announced before shutdown.");
            }
        });
    }
    let stats = holds.stats();
    rt.metrics.held_keys.set(stats.keys as f64);
    rt.metrics.held_messages.set(stats.messages as f64);
    let age = stats
        .oldest
        .and_then(|since| SystemTime::now().duration_since(since).ok())
        .unwrap_or_default();
    rt.metrics.hold_oldest_age.set(age.as_secs_f64());
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
