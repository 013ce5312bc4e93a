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

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::Client;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Stream as PullStream;
use async_nats::jetstream::{self, Message};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
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
use crate::rescue;
use crate::telemetry as t;

/// Messages held per unit of concurrency (the consumer's max ack pending is the product): enough that
/// `concurrency` distinct keys are usually among them.
pub const BUFFER_PER_SLOT: usize = 16;
/// The error code of a message parked because its key cannot be read.
pub const UNREADABLE_KEY: &str = "mend_unreadable_key";
/// The error code of a message parked because its NATS headers cannot be read.
pub const UNREADABLE_HEADERS: &str = "mend_unreadable_headers";
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
    /// Opens the app stream's own connection ([`Puller`]).
    pub connector: Arc<crate::nats::Connector>,
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
    /// Set when its NATS header block cannot be read by mend's NATS client: it is parked with the
    /// block's bytes instead of delivered (`headers` has what could be read of it).
    pub unreadable: Option<Box<crate::rescue::Unreadable>>,
    /// The object of [`crate::payloads::PAYLOADS_BUCKET`] its payload was read from (a message
    /// too large for its hold queue's copy): an envelope refers to it rather than store it again.
    pub payload_object: Option<String>,
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
    /// The stream sequence of the message it works on (0 for chores).
    fn seq(&self) -> u64 {
        match self {
            Work::Message(d) | Work::Unkeyable(d, _) => d.meta.lineage.seq,
            _ => 0,
        }
    }

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
///
/// The same holding back keeps the lanes waiting while deliveries lost on the way are read from
/// the stream ([`Lost`]): a lost message goes into its lane before its key's newer ones.
struct Quarantine {
    /// Until when the previous run's unacked messages are waited for; `None` once they are in (or
    /// when not waiting for them).
    until: Option<Instant>,
    expected: u64,
    redelivered: u64,
    /// Whether lost deliveries are being read.
    rescuing: bool,
    held_back: Vec<(Option<MessageKey>, Work)>,
}

impl Quarantine {
    fn rescue_only() -> Self {
        Self {
            until: None,
            expected: 0,
            redelivered: 0,
            rescuing: true,
            held_back: Vec::new(),
        }
    }
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

/// How often the consumer's delivered count is compared with what arrived (lost deliveries).
const LOOK_EVERY: Duration = Duration::from_secs(1);
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
    let (mut quarantine, delivered) = quarantine_on_start(&rt, &consumer).await;
    let mut lost = Lost::new(delivered);
    let mut look = tokio::time::interval(LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut puller = Puller::new(
        rt.connector.clone(),
        &rt.cfg.stream,
        &consumer.cached_info().name,
    );
    let batch = max_held.min(PULL_BATCH);
    let mut info_consumer = consumer.clone();
    let mut messages = puller.open(batch, &rt.shutdown).await;
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
                // What the pull brought and the loop has not taken yet enters its lane, to be
                // handed back below; what was delivered but never arrived is handed back by its
                // stream sequence once the pull has stopped.
                while let Some(Some(next)) = messages.as_mut().and_then(|m| m.next().now_or_never()) {
                    if let Ok(msg) = next {
                        admit(&rt, msg, &mut lanes, &mut held, &mut quarantine, &mut lost);
                    }
                }
                messages = None;
                hand_back_unarrived(&rt, &puller, &mut info_consumer, &lost.tracker).await;
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
                lost.search = None;
                release_now(&mut quarantine, &mut lanes);
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
                Some(Ok(msg)) => admit(&rt, msg, &mut lanes, &mut held, &mut quarantine, &mut lost),
                Some(Err(error)) if crate::nats::pull_went_silent(&error) => {
                    tracing::warn!(%error, binding = %rt.cfg.name, "Pull went silent; pulling anew.");
                    messages = puller.open(batch, &rt.shutdown).await;
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, binding = %rt.cfg.name, "Pull failed; continuing.");
                }
                None => {
                    tracing::warn!(binding = %rt.cfg.name, "Pull stream ended; reopening.");
                    messages = puller.open(batch, &rt.shutdown).await;
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
            _ = async {
                match quarantine.as_ref().and_then(|q| q.until) {
                    Some(until) => tokio::time::sleep_until(until.into()).await,
                    None => std::future::pending().await,
                }
            }, if quarantine.as_ref().is_some_and(|q| q.until.is_some()) => {
                if let Some(q) = quarantine.as_mut() {
                    q.until = None;
                }
                release(&mut quarantine, &mut lanes);
            }
            found = async {
                match lost.search.as_mut() {
                    Some(search) => search.await,
                    None => std::future::pending().await,
                }
            }, if lost.search.is_some() => {
                lost.search = None;
                for d in found {
                    let Some(id) = d.held_id() else { continue };
                    lost.tracker.rescued(id.seq);
                    // Arrived by itself meanwhile: the one held stays.
                    if held.contains_key(&id) {
                        continue;
                    }
                    if let Source::Consumer { reply, .. } = &d.source {
                        held.insert(id, Held { reply: reply.clone(), touched: Instant::now() });
                    }
                    enter(&rt, d, false, &mut lanes, &mut quarantine);
                }
                if lost.waiting.is_empty() {
                    if let Some(q) = quarantine.as_mut() {
                        q.rescuing = false;
                    }
                    release(&mut quarantine, &mut lanes);
                }
            }
            _ = look.tick(), if pulling && lost.search.is_none() => {
                match info_consumer.info().await {
                    Ok(info) => {
                        if let Some(found) = lost.tracker.looked(
                            info.delivered.consumer_sequence,
                            info.delivered.stream_sequence,
                            info.ack_floor.stream_sequence,
                        ) {
                            lost.begin(found, &mut quarantine);
                        }
                    }
                    Err(error) => tracing::debug!(%error, "Consumer state unavailable."),
                }
            }
            _ = async { if let Some(d) = deadline.as_mut() { d.await } }, if deadline.is_some() => {
                tracing::warn!(in_flight = running.len(), "Shutdown deadline reached; handing back in-flight messages.");
                for h in held.values() {
                    ack::hand_back(&rt.client, &h.reply).await;
                }
                return;
            }
        }
        if !stopping {
            lost.next_search(&rt, &consumer, &held);
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

/// Most deliveries handed back by their stream sequence when a pull stops: more are left to their
/// ack wait.
const HAND_BACK_UNARRIVED_MAX: u64 = 10_000;

/// Once the pull has stopped (its subscription dropped), hands back what the consumer delivered
/// to this instance that never arrived: first deliveries come in stream order, so every stream
/// sequence past the highest one received, up to the consumer's delivered sequence, was on its way
/// (a sequence the consumer does not hold pending is ignored by the server). Without this, such
/// messages would wait out their ack wait before another instance (or the next run) gets them.
async fn hand_back_unarrived(
    rt: &BindingRuntime,
    puller: &Puller,
    consumer: &mut PullConsumer,
    tracker: &rescue::Tracker,
) {
    // The flush's answer comes after the server has taken the unsubscribe: nothing more is sent.
    if let Some(client) = &puller.client {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await;
    }
    let info = match tokio::time::timeout(FLUSH_TIMEOUT, consumer.info()).await {
        Ok(Ok(info)) => info.clone(),
        _ => {
            tracing::debug!(
                "Consumer state unavailable; unarrived deliveries wait for their ack wait."
            );
            return;
        }
    };
    let to = info.delivered.stream_sequence;
    let from = tracker.high().saturating_add(1);
    if to < from || info.num_ack_pending == 0 {
        return;
    }
    let to = to.min(from.saturating_add(HAND_BACK_UNARRIVED_MAX - 1));
    tracing::info!(
        from,
        to,
        "Handing back deliveries that were still on their way."
    );
    for sseq in from..=to {
        let subject = rescue::ack_subject(
            tracker.sample(),
            &rt.cfg.stream,
            &info.name,
            1,
            sseq,
            info.delivered.consumer_sequence,
        );
        ack::hand_back(&rt.client, &ack::Reply::new(subject, rt.epoch.current())).await;
    }
}

/// The start-up quarantine, if the consumer has unacked messages, and where the consumer's
/// deliveries stand (its delivered count and stream sequence; `None` if unknown).
async fn quarantine_on_start(
    rt: &BindingRuntime,
    consumer: &PullConsumer,
) -> (Option<Quarantine>, Option<(u64, u64)>) {
    let mut consumer = consumer.clone();
    let (unacked, delivered) = match consumer.info().await {
        Ok(info) => (
            info.num_ack_pending as u64,
            Some((
                info.delivered.consumer_sequence,
                info.delivered.stream_sequence,
            )),
        ),
        Err(error) => {
            tracing::warn!(%error, "Consumer state unknown; holding back new messages for one ack wait.");
            (u64::MAX, None)
        }
    };
    if unacked == 0 {
        return (None, delivered);
    }
    tracing::info!(
        unacked,
        "Unacked messages of a previous run: they come first, then newer ones, in stream order."
    );
    let quarantine = Quarantine {
        until: Some(Instant::now() + rt.cfg.ack_wait + Duration::from_secs(1)),
        expected: unacked,
        redelivered: 0,
        rescuing: false,
        held_back: Vec::new(),
    };
    (Some(quarantine), delivered)
}

/// Ends holding back once neither the previous run's messages nor lost deliveries are waited for:
/// everything held back enters its lane in stream order.
fn release(quarantine: &mut Option<Quarantine>, lanes: &mut crate::lanes::Lanes<Work>) {
    if quarantine
        .as_ref()
        .is_none_or(|q| q.until.is_some() || q.rescuing)
    {
        return;
    }
    let Some(mut q) = quarantine.take() else {
        return;
    };
    q.held_back.sort_by_key(|(_, work)| work.seq());
    tracing::info!(
        released = q.held_back.len(),
        redelivered = q.redelivered,
        "Hold-back over."
    );
    for (key, work) in q.held_back {
        lanes.push(key, work);
    }
}

/// Ends holding back at once (shutdown): everything held back enters its lane, to be handed back.
fn release_now(quarantine: &mut Option<Quarantine>, lanes: &mut crate::lanes::Lanes<Work>) {
    if let Some(q) = quarantine.as_mut() {
        q.until = None;
        q.rescuing = false;
    }
    release(quarantine, lanes);
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
    lost: &mut Lost,
) {
    let (seq, cseq, published, delivered) = match msg.info() {
        Ok(info) => (
            info.stream_sequence,
            info.consumer_sequence,
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
    let delivered = u64::try_from(delivered).unwrap_or(1);
    if let Some(found) = lost
        .tracker
        .received(seq, cseq, delivered, subject.as_str())
    {
        lost.begin(found, quarantine);
    }
    let Some(reply) = hold(rt, held, held_id, subject) else {
        return;
    };
    let meta = DeliveryMeta {
        service: rt.service.clone(),
        lineage: LineageId::new(rt.cfg.stream.clone(), seq),
        key: None,
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
        unreadable: None,
        payload_object: None,
    };
    let redelivery = delivered > 1;
    enter(rt, d, redelivery, lanes, quarantine);
}

/// Puts a message of the app stream into its key's lane, or holds it back while the lanes wait for
/// earlier messages (the previous run's, or deliveries being rescued).
fn enter(
    rt: &BindingRuntime,
    mut d: Delivery,
    redelivery: bool,
    lanes: &mut crate::lanes::Lanes<Work>,
    quarantine: &mut Option<Quarantine>,
) {
    let keyed = rt
        .cfg
        .key
        .as_ref()
        .map(|source| key_of(source, d.headers.as_ref(), &d.payload));
    // A keyed binding fails closed: a message whose key cannot be read is never delivered outside
    // its key's order; it goes to a person.
    let (key, work) = match keyed {
        None | Some(Ok(None)) => (None, None),
        Some(Ok(Some(key))) => (Some(key), None),
        Some(Err(why)) => (None, Some(why)),
    };
    d.meta.key = key.clone();
    let work = match work {
        Some(why) => Work::Unkeyable(d, why),
        None => Work::Message(d),
    };
    match quarantine {
        Some(q) => {
            if redelivery {
                q.redelivered += 1;
            }
            q.held_back.push((key, work));
            if q.redelivered >= q.expected {
                q.until = None;
            }
            release(quarantine, lanes);
        }
        None => lanes.push(key, work),
    }
}

/// Deliveries lost on the way (see [`crate::rescue`]): the tracker of the consumer's deliveries,
/// losses waiting to be looked for, and the search under way.
pub(crate) struct Lost {
    tracker: rescue::Tracker,
    waiting: VecDeque<rescue::Lost>,
    search: Option<Pin<Box<dyn Future<Output = Vec<Delivery>> + Send>>>,
}

impl Lost {
    fn new(delivered: Option<(u64, u64)>) -> Self {
        Self {
            tracker: rescue::Tracker::new(delivered),
            waiting: VecDeque::new(),
            search: None,
        }
    }

    /// Deliveries were lost: the lanes wait (newer messages are held back) until they are found.
    fn begin(&mut self, found: rescue::Lost, quarantine: &mut Option<Quarantine>) {
        tracing::warn!(
            ?found,
            "Deliveries lost on the way (a message the NATS client could not \
            read?); reading them from the stream."
        );
        self.waiting.push_back(found);
        match quarantine {
            Some(q) => q.rescuing = true,
            None => *quarantine = Some(Quarantine::rescue_only()),
        }
    }

    /// Starts looking for the next loss, if none is being looked for.
    fn next_search(
        &mut self,
        rt: &Arc<BindingRuntime>,
        consumer: &PullConsumer,
        held: &HashMap<HeldId, Held>,
    ) {
        if self.search.is_some() {
            return;
        }
        let Some(lost) = self.waiting.pop_front() else {
            return;
        };
        let mut skip: HashSet<u64> = held
            .keys()
            .filter(|id| id.inlet == Inlet::App)
            .map(|id| id.seq)
            .collect();
        skip.extend(self.tracker.rescued_seqs());
        let sample = self.tracker.sample().map(str::to_owned);
        let cseq = self.tracker.last_cseq().unwrap_or(0);
        self.search = Some(Box::pin(search(
            rt.clone(),
            consumer.clone(),
            lost,
            skip,
            (sample, cseq),
        )));
    }
}

/// Reads the messages of a loss from the stream's leader, as deliveries settled on built ack
/// subjects: every unseen one of a [`rescue::Lost::Range`], the unreadable ones of a
/// [`rescue::Lost::Unreadable`] (the others come again by themselves). Gives up (logged) when the
/// stream cannot be read; the messages then come again after their ack wait.
async fn search(
    rt: Arc<BindingRuntime>,
    mut consumer: PullConsumer,
    lost: rescue::Lost,
    skip: HashSet<u64>,
    (sample, cseq): (Option<String>, u64),
) -> Vec<Delivery> {
    let (from, to, count, unreadable_only) = match lost {
        rescue::Lost::Range { from, to, count } => (from, to, count, false),
        rescue::Lost::Unreadable { to } => match consumer.info().await {
            Ok(info) => (
                info.ack_floor.stream_sequence.saturating_add(1),
                to,
                u64::MAX,
                true,
            ),
            Err(error) => {
                tracing::warn!(%error, "Consumer state unknown; lost deliveries not looked for.");
                return Vec::new();
            }
        },
    };
    let name = consumer.cached_info().name.clone();
    // With one filter subject the server skips the stream's other subjects.
    let by_subject = match rt.cfg.subjects.as_slice() {
        [one] => Some(one.as_str()),
        _ => None,
    };
    let mut found = Vec::new();
    let (mut seq, mut reads, mut failures) = (from, 0, 0);
    while seq <= to && reads < rescue::MAX_READ && (found.len() as u64) < count {
        if rt.shutdown.is_cancelled() {
            break;
        }
        reads += 1;
        let m = match rescue::get(&rt.client, &rt.cfg.stream, seq, by_subject).await {
            Ok(Some(m)) => m,
            Ok(None) if by_subject.is_some() => break,
            Ok(None) => {
                seq += 1;
                continue;
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, seq, "Cannot read a lost delivery yet.");
                if failures >= 5 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        seq = m.seq + 1;
        let ours = rt
            .cfg
            .subjects
            .iter()
            .any(|f| repair_rules::rules::subject::matches(f, &m.subject));
        if m.seq > to || !ours || skip.contains(&m.seq) {
            if m.seq > to {
                break;
            }
            continue;
        }
        let problem = m.header_block.as_deref().and_then(rescue::header_problem);
        if unreadable_only && problem.is_none() {
            continue;
        }
        let headers = m.header_block.as_deref().map(rescue::lenient_headers);
        let unreadable = match (problem, m.header_block) {
            (Some(why), Some(raw)) => Some(Box::new(rescue::Unreadable { why, raw })),
            _ => None,
        };
        tracing::warn!(
            seq = m.seq,
            unreadable = unreadable.as_ref().map(|u| u.why.as_str()),
            "Lost delivery read from the stream."
        );
        let reply = ack::Reply::new(
            rescue::ack_subject(sample.as_deref(), &rt.cfg.stream, &name, 1, m.seq, cseq),
            rt.epoch.current(),
        );
        found.push(Delivery {
            payload: m.payload,
            headers,
            meta: DeliveryMeta {
                service: rt.service.clone(),
                lineage: LineageId::new(rt.cfg.stream.clone(), m.seq),
                key: None,
                attempt: 1,
                subject: m.subject,
                published: m.time,
                repaired_by: None,
                resubmitted_by: None,
            },
            history: Vec::new(),
            source: Source::Consumer {
                id: HeldId {
                    inlet: Inlet::App,
                    seq: m.seq,
                },
                reply,
            },
            unreadable,
            payload_object: None,
        });
    }
    found
}

/// The app stream's own connection. A message whose header block the NATS client cannot parse
/// takes down the connection it arrives on (see [`crate::rescue`]): on this one, that costs only the
/// pull, never the acks, publishes and leases of the main connection. When the connection's task
/// died, a new connection replaces it.
pub struct Puller {
    connector: Arc<crate::nats::Connector>,
    stream: String,
    consumer: String,
    client: Option<Client>,
}

/// How long a connection may take to answer a flush before it counts as dead.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

impl Puller {
    pub fn new(connector: Arc<crate::nats::Connector>, stream: &str, consumer: &str) -> Self {
        Self {
            connector,
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            client: None,
        }
    }

    /// Opens a pull stream (`batch` messages per request) on the pull connection, connecting anew
    /// when it died, retrying with backoff until it opens or `shutdown` is cancelled (then `None`).
    pub async fn open(&mut self, batch: usize, shutdown: &CancellationToken) -> Option<PullStream> {
        let mut pause = crate::publish::RETRY_MIN;
        loop {
            if let Some(client) = &self.client {
                let flushed = tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await;
                if !matches!(flushed, Ok(Ok(()))) {
                    tracing::warn!("The app stream's connection does not answer; connecting anew.");
                    self.client = None;
                }
            }
            if self.client.is_none() {
                match self.connector.connect().await {
                    Ok(client) => self.client = Some(client),
                    Err(error) => tracing::warn!(%error, "Cannot connect for the app stream yet."),
                }
            }
            if let Some(client) = &self.client {
                let js = jetstream::new(client.clone());
                let consumer = js
                    .get_stream_no_info(&self.stream)
                    .await
                    .map_err(anyhow::Error::from);
                let consumer = match consumer {
                    Ok(stream) => stream
                        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                            &self.consumer,
                        )
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}")),
                    Err(e) => Err(e),
                };
                let opened = match consumer {
                    Ok(consumer) => consumer
                        .stream()
                        .max_messages_per_batch(batch)
                        .heartbeat(crate::nats::PULL_HEARTBEAT)
                        .messages()
                        .await
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(stream) => return Some(stream),
                    Err(error) => {
                        tracing::warn!(error = format!("{error:#}"), "Cannot pull yet; retrying.")
                    }
                }
            }
            if crate::publish::back_off(shutdown, &mut pause)
                .await
                .is_err()
            {
                return None;
            }
        }
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
pub fn key_of(
    source: &KeySource,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<Option<MessageKey>, String> {
    let key = match source {
        KeySource::Header(name) => headers
            .and_then(|h| h.get(name.as_str()))
            .map(|v| v.as_str().to_owned()),
        KeySource::Json(pointer) => {
            let value = serde_json::from_slice::<serde_json::Value>(payload).map_err(|e| {
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
        tracing::debug!("Message has no key; delivered without order.");
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
    if let Some(unreadable) = &d.unreadable {
        // Its headers cannot be passed on as they are: a person decides.
        tracing::warn!(
            why = unreadable.why,
            "NATS headers unreadable; parking the message."
        );
        let mut error = FailureError::bare(ErrorKind::Message, None);
        error.code = Some(UNREADABLE_HEADERS.to_owned());
        error.title = Some("the message's NATS headers cannot be read".to_owned());
        error.detail = Some(unreadable.why.clone());
        delegate::failure(rt, d, error, Destination::Unreadable).await?;
        rt.metrics.parked.increment(1);
        return Ok(Outcome::Unresolved);
    }
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
