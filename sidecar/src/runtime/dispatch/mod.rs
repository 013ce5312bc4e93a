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
//!
//! Stages, each using only those listed before it: [`binding`] (what they share), [`work`] (the
//! units of work), [`settle`], [`delegate`], [`attempt`] (the app call), [`hold`], [`release`],
//! [`message`] (one piece of work run), [`holdback`], [`pull`], [`lost`], [`intake`], [`chores`];
//! this module's [`run`] is the loop over them.

pub mod attempt;
pub mod binding;
pub mod chores;
pub mod delegate;
pub mod hold;
pub mod holdback;
pub mod intake;
pub mod lost;
pub mod message;
pub mod pull;
pub mod release;
pub mod settle;
pub mod work;

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{MessagesError, Stream as PullStream};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use repair_rules::MessageKey;
use repair_rules::holds::HoldState;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior, Sleep};
use tracing::Instrument;

use crate::common::ack;
use crate::runtime::lanes::Lanes;
use crate::runtime::router::Inbound;
use binding::BindingRuntime;
use chores::{Chores, FORGET_EVERY, GAUGES_EVERY, LOOK_EVERY, hold_metrics};
use holdback::{Quarantine, end_hold_back, end_hold_back_now, quarantine_on_start};
use intake::{admit, admit_routed, enter};
use lost::{Lost, hand_back_unarrived};
use message::process;
use pull::{BULK_PULL_BATCH, PULL_BATCH, Puller, next_message};
use work::{Delivery, Done, Held, HeldId, Source, Work};

/// The lanes' work in progress, polled by the dispatcher's task.
type Running = FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>;

/// Finished work taken in one turn of the dispatcher's loop, at most: each turn (the select over a
/// dozen sources, starting work, the gauges) costs about as much as a message's intake, and with
/// bulk delivery a batch's messages finish together. Polling with `now_or_never` loses no wake-up:
/// the next turn's select polls every source again with the task's own waker.
const EVENTS_PER_TURN: usize = 64;

/// Start-up looks (see `Dispatcher::looks`) at work at once. All at once, 100k held keys with a
/// message waiting each took 230 MiB and held a free key's message up for 6 s; a few at a time,
/// they go on beside the flow of messages.
const LOOKS_AT_ONCE: usize = 8;

/// Start-up looks taken from the holds at a time (each take walks the binding's entries once).
const LOOKS_TAKEN: usize = 1024;

/// Runs the binding until shutdown (or a lost lease): stop pulling, hand back what has not
/// started, finish what is in flight within the shutdown timeout, hand back the rest.
pub async fn run(
    rt: Arc<BindingRuntime>,
    consumer: PullConsumer,
    retries: Option<mpsc::Receiver<Inbound>>,
) {
    Dispatcher::start(rt, consumer, retries).await.run().await;
}

/// Everything one binding's dispatcher owns; only its task touches it.
struct Dispatcher {
    rt: Arc<BindingRuntime>,
    consumer: PullConsumer,
    /// The consumer, for its state (lost deliveries, handing back at the end).
    info_consumer: PullConsumer,
    /// Per key, the work waiting for its turn; at most `concurrency` keys at work.
    lanes: Lanes<Work>,
    chores: Chores,
    /// Every consumer's message the dispatcher holds (queued or at work), kept alive until settled.
    held: HashMap<HeldId, Held>,
    running: Running,
    /// With bulk delivery, the work started in one turn runs as a task of its own (see [`group`]);
    /// aborted when the dispatcher is dropped.
    groups: JoinSet<()>,
    /// Each grouped piece of work's [`Done`], sent as it finishes.
    finished_tx: mpsc::UnboundedSender<Done>,
    finished_rx: mpsc::UnboundedReceiver<Done>,
    /// Grouped pieces of work not finished yet.
    grouped: usize,
    /// While set, newly pulled messages are held back (see [`holdback`]).
    quarantine: Option<Quarantine>,
    lost: Lost,
    puller: Puller,
    messages: Option<PullStream>,
    /// Messages asked for per pull request.
    batch: usize,
    /// The consumer's max ack pending: no pulling while this many are held.
    max_held: usize,
    /// Retries and commands the router hands this binding.
    retries: Option<mpsc::Receiver<Inbound>>,
    /// Holds made loud already (until they are back under the alert age and count).
    alerted: HashSet<MessageKey>,
    /// Held keys left by an earlier run whose queue holds messages, still to look for their head's
    /// retry there, taken from the holds [`LOOKS_TAKEN`] at a time and started a few at a time (see
    /// [`LOOKS_AT_ONCE`]).
    looks: VecDeque<MessageKey>,
    timers: Timers,
    /// Once stopping: when the in-flight work is given up.
    deadline: Option<Pin<Box<Sleep>>>,
    stopping: bool,
}

struct Timers {
    keepalive: Interval,
    gauges: Interval,
    forget: Interval,
    look: Interval,
}

impl Timers {
    fn new(rt: &BindingRuntime) -> Self {
        let every = |period| {
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        };
        Self {
            keepalive: every(rt.cfg.ack_wait / 4),
            gauges: every(GAUGES_EVERY),
            forget: every(FORGET_EVERY),
            look: every(LOOK_EVERY),
        }
    }
}

impl Dispatcher {
    /// Resumes the binding's holds, looks whether a previous run left messages unacked (they come
    /// first) and opens the pull.
    async fn start(
        rt: Arc<BindingRuntime>,
        consumer: PullConsumer,
        retries: Option<mpsc::Receiver<Inbound>>,
    ) -> Self {
        let max_held = BindingRuntime::max_ack_pending(&rt.cfg);
        let mut lanes = Lanes::new(rt.cfg.slots());
        let mut chores = Chores::default();
        // Holds left by an earlier run: releases in progress resume; held keys whose queue holds
        // messages look for their head's retry there, a few at a time beside the flow of messages
        // (`looks`). A held key whose queue is empty (the counts come from the stream when the
        // holds are loaded) waits for its head's retry or a command: looking would cost a read per
        // key (100k held keys took 226 MiB and held a free key's message up for 3 s).
        if let Some(holds) = &rt.holds {
            for key in holds.keys_in(HoldState::Releasing) {
                chores.push(&mut lanes, key, Work::Release);
            }
        }
        let (quarantine, delivered) = quarantine_on_start(&rt, &consumer).await;
        let mut puller = Puller::new(
            rt.connector.clone(),
            &rt.cfg.stream,
            &consumer.cached_info().name,
        );
        let per_pull = if rt.cfg.batch.is_some() {
            BULK_PULL_BATCH
        } else {
            PULL_BATCH
        };
        let batch = max_held.min(per_pull);
        let messages = puller.open(batch, &rt.shutdown).await;
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        Self {
            timers: Timers::new(&rt),
            info_consumer: consumer.clone(),
            consumer,
            lanes,
            chores,
            held: HashMap::new(),
            running: FuturesUnordered::new(),
            groups: JoinSet::new(),
            finished_tx,
            finished_rx,
            grouped: 0,
            quarantine,
            lost: Lost::new(delivered),
            puller,
            messages,
            batch,
            max_held,
            retries,
            looks: VecDeque::new(),
            alerted: HashSet::new(),
            deadline: None,
            stopping: false,
            rt,
        }
    }

    /// The loop: each turn handles one event, then starts the work the lanes allow.
    async fn run(mut self) {
        loop {
            let pulling = self.may_pull();
            tokio::select! {
                Some(done) = self.running.next(), if !self.running.is_empty() => {
                    self.finished(done);
                    // What else finished meanwhile, in the same turn (see `EVENTS_PER_TURN`).
                    for _ in 1..EVENTS_PER_TURN {
                        match self.running.next().now_or_never() {
                            Some(Some(done)) => self.finished(done),
                            _ => break,
                        }
                    }
                }
                Some(done) = self.finished_rx.recv(), if self.grouped > 0 => {
                    self.grouped -= 1;
                    self.finished(done);
                    for _ in 1..EVENTS_PER_TURN {
                        match self.finished_rx.try_recv() {
                            Ok(done) => {
                                self.grouped -= 1;
                                self.finished(done);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Some(ended) = self.groups.join_next(), if !self.groups.is_empty() => {
                    self.ended(ended);
                    while let Some(ended) = self.groups.try_join_next() {
                        self.ended(ended);
                    }
                }
                _ = self.rt.shutdown.cancelled(), if !self.stopping => self.stop().await,
                // Retries are not held to the app stream's budget: they are the heads of their
                // lineages, and the retry consumer's own max ack pending bounds them.
                routed = recv(&mut self.retries), if !self.stopping && self.retries.is_some() => {
                    match routed {
                        Some(inbound) => admit_routed(&self.rt, inbound, &mut self.lanes, &mut self.held),
                        None => self.retries = None,
                    }
                }
                next = next_message(&mut self.messages), if pulling => self.pulled(next).await,
                _ = self.timers.keepalive.tick() => self.keep_alive().await,
                _ = self.timers.gauges.tick() => hold_metrics(&self.rt, &mut self.alerted),
                _ = self.timers.forget.tick(), if !self.stopping => self.forget_expired(),
                _ = hold_back_ends(&self.quarantine), if self.quarantine.as_ref().is_some_and(|q| q.until.is_some()) => {
                    if let Some(q) = self.quarantine.as_mut() {
                        q.until = None;
                    }
                    end_hold_back(&mut self.quarantine, &mut self.lanes);
                }
                found = search(&mut self.lost.search), if self.lost.search.is_some() => self.found(found),
                _ = self.timers.look.tick(), if pulling && self.lost.search.is_none() => self.look().await,
                _ = until(&mut self.deadline), if self.deadline.is_some() => {
                    tracing::warn!(in_flight = self.in_flight(), "Shutdown deadline reached; handing back in-flight messages.");
                    for h in self.held.values() {
                        ack::hand_back(&self.rt.client, &h.reply).await;
                    }
                    return;
                }
            }
            if !self.stopping {
                self.lost.next_search(&self.rt, &self.consumer, &self.held);
            }
            self.start_work().await;
            let in_flight = self.in_flight();
            self.rt.metrics.in_flight.set(in_flight as f64);
            let queued = self.held.len().saturating_sub(in_flight);
            self.rt.metrics.queued.set(queued as f64);
            if self.stopping && in_flight == 0 {
                return;
            }
        }
    }

    /// Whether the loop takes what the pull brings: not once stopping, nor while the consumer's max
    /// ack pending are held, nor while the app's circuit is open.
    fn may_pull(&self) -> bool {
        !self.stopping
            && self.messages.is_some()
            && self.held.len() < self.max_held
            && !self.rt.circuit.is_open()
    }

    /// Pieces of work under way.
    fn in_flight(&self) -> usize {
        self.running.len() + self.grouped
    }

    /// A group's task ended. Its work's `Done`s came before (a piece that panicked gives one too, see
    /// [`caught`]); a task cancelled (only when the runtime shuts down) or failed outside its
    /// pieces leaves work that never reports: the binding stops and starts again from its holds.
    fn ended(&mut self, ended: Result<(), tokio::task::JoinError>) {
        if let Err(error) = ended {
            tracing::error!(%error, "A group of messages' work ended early; the binding starts again.");
            self.rt.shutdown.cancel();
        }
    }

    /// A piece of work finished: its key may take its next; the binding stops if the work says so.
    fn finished(&mut self, done: Done) {
        if let Some(id) = done.held_id {
            self.held.remove(&id);
        }
        if done.stop {
            tracing::error!("Another instance changed this binding's holds; stopping the binding.");
            self.rt.shutdown.cancel();
        }
        self.lanes.done(done.key.as_ref());
        self.chores.done(&mut self.lanes, done);
    }

    /// A pulled message into its key's lane (see [`intake::admit`]).
    fn admit(&mut self, msg: Message) {
        admit(
            &self.rt,
            msg,
            &mut self.lanes,
            &mut self.held,
            &mut self.quarantine,
            &mut self.lost,
        );
    }

    /// A message from the pull (or why none came).
    async fn pulled(&mut self, next: Option<Result<Message, MessagesError>>) {
        match next {
            Some(Ok(msg)) => self.admit(msg),
            Some(Err(error)) if crate::common::nats::pull_went_silent(&error) => {
                tracing::warn!(%error, binding = %self.rt.cfg.name, "Pull went silent; pulling anew.");
                self.messages = self.puller.open(self.batch, &self.rt.shutdown).await;
            }
            Some(Err(error)) => {
                tracing::warn!(%error, binding = %self.rt.cfg.name, "Pull failed; continuing.");
            }
            None => {
                tracing::warn!(binding = %self.rt.cfg.name, "Pull stream ended; reopening.");
                self.messages = self.puller.open(self.batch, &self.rt.shutdown).await;
            }
        }
    }

    /// Tells the server that every message held for a while is still being worked on.
    async fn keep_alive(&mut self) {
        let stale = Instant::now() - self.rt.cfg.ack_wait / 3;
        for h in self.held.values_mut().filter(|h| h.touched <= stale) {
            ack::progress(&self.rt.client, &h.reply).await;
            h.touched = Instant::now();
        }
    }

    /// Schedules forgetting the holds resolved longer ago than the duplicate window.
    fn forget_expired(&mut self) {
        if let Some(holds) = &self.rt.holds {
            for key in holds.expired(crate::common::nats::DUPLICATE_WINDOW) {
                self.chores.push(&mut self.lanes, key, Work::Forget);
            }
        }
    }

    /// Compares the consumer's delivered count with what arrived: deliveries lost on the way?
    async fn look(&mut self) {
        match self.info_consumer.info().await {
            Ok(info) => {
                if let Some(found) = self.lost.tracker.looked(
                    info.delivered.consumer_sequence,
                    info.delivered.stream_sequence,
                    info.ack_floor.stream_sequence,
                ) {
                    self.lost.begin(found, &mut self.quarantine);
                }
            }
            Err(error) => tracing::debug!(%error, "Consumer state unavailable."),
        }
    }

    /// Lost deliveries read from the stream: each enters its lane (unless it arrived meanwhile);
    /// holding back ends once no loss is waited for.
    fn found(&mut self, found: Vec<Delivery>) {
        self.lost.search = None;
        for d in found {
            let Some(id) = d.held_id() else { continue };
            self.lost.tracker.rescued(id.seq);
            // Arrived by itself meanwhile: the one held stays.
            if self.held.contains_key(&id) {
                continue;
            }
            if let Source::Consumer { reply, .. } = &d.source {
                let held = Held {
                    reply: reply.clone(),
                    touched: Instant::now(),
                };
                self.held.insert(id, held);
            }
            enter(&self.rt, d, false, &mut self.lanes, &mut self.quarantine);
        }
        if self.lost.waiting.is_empty() {
            if let Some(q) = self.quarantine.as_mut() {
                q.rescuing = false;
            }
            end_hold_back(&mut self.quarantine, &mut self.lanes);
        }
    }

    /// Shutdown or a lost lease: stop pulling; hand back what the pull brought, what was on its
    /// way, what the router handed over and what waits in the lanes; in-flight work gets until the
    /// shutdown timeout.
    async fn stop(&mut self) {
        self.stopping = true;
        // What the pull brought and the loop has not taken yet enters its lane, to be handed back
        // below; what was delivered but never arrived is handed back by its stream sequence once
        // the pull has stopped.
        while let Some(Some(next)) = self.messages.as_mut().and_then(|m| m.next().now_or_never()) {
            if let Ok(msg) = next {
                self.admit(msg);
            }
        }
        self.messages = None;
        hand_back_unarrived(
            &self.rt,
            &self.puller,
            &mut self.info_consumer,
            &self.lost.tracker,
        )
        .await;
        // Retries and commands routed here and not yet taken go back at once too.
        if let Some(mut inbound) = self.retries.take() {
            inbound.close();
            while let Ok(routed) = inbound.try_recv() {
                if let Some(reply) = routed.into_message().message.reply {
                    let reply = ack::Reply::new(reply, self.rt.epoch.current());
                    ack::hand_back(&self.rt.client, &reply).await;
                }
            }
        }
        self.lost.search = None;
        end_hold_back_now(&mut self.quarantine, &mut self.lanes);
        self.hand_back_queued().await;
        tracing::info!(in_flight = self.in_flight(), binding = %self.rt.cfg.name,
            "Stopping: pulling stopped, finishing in-flight deliveries.");
        self.deadline = Some(Box::pin(tokio::time::sleep(self.rt.shutdown_timeout)));
    }

    /// Starts the work whose keys' turn it is. Nothing new starts once stopping (shutdown, or the
    /// lease lost): follow-up work of what finished (a release's next turn) is left to whoever
    /// consumes the key next, and a message queued meanwhile is handed back.
    async fn start_work(&mut self) {
        if self.stopping {
            self.hand_back_queued().await;
        } else if !self.rt.shutdown.is_cancelled() {
            while self.chores.releasing.len() < LOOKS_AT_ONCE {
                if self.looks.is_empty()
                    && let Some(holds) = &self.rt.holds
                {
                    self.looks.extend(holds.take_looks(LOOKS_TAKEN));
                }
                let Some(key) = self.looks.pop_front() else {
                    break;
                };
                self.chores.push(&mut self.lanes, key, Work::Release);
            }
            if self.rt.batcher.is_some() {
                self.start_grouped();
            } else {
                while let Some((key, work)) = self.lanes.start_next() {
                    self.running
                        .push(Box::pin(process(self.rt.clone(), key, work)));
                }
            }
        }
    }

    /// With bulk delivery, the work whose keys' turn it is starts as one task (see [`group`]).
    fn start_grouped(&mut self) {
        let work = FuturesUnordered::new();
        while let Some((key, one)) = self.lanes.start_next() {
            let fallback = (one.held_id(), key.clone(), one.chore());
            // Boxed: a message's future is kilobytes large, and `caught` and the group move what
            // they hold; boxed, only the pointer moves.
            let one = Box::pin(process(self.rt.clone(), key, one));
            work.push(caught(one, fallback));
        }
        if !work.is_empty() {
            self.grouped += work.len();
            let finished = self.finished_tx.clone();
            self.groups.spawn(group(work, finished).in_current_span());
        }
    }

    async fn hand_back_queued(&mut self) {
        for work in self.lanes.drain_queued() {
            if let Some(id) = work.held_id() {
                self.held.remove(&id);
            }
            if let Some(reply) = work.reply() {
                ack::hand_back(&self.rt.client, reply).await;
            }
        }
    }
}

/// With bulk delivery, the work started in one turn of the dispatcher runs as a task of its own
/// (in the dispatcher's `JoinSet`), which reports each piece's [`Done`] as it finishes. Thousands
/// of messages are in flight: polled inside the dispatcher's task, their entries, answers and acks
/// all ran on one thread (the dispatcher's task took two thirds of the sidecar's CPU, with a core
/// left idle); as a task each, spawning, waking and joining a task per message (and moving its
/// kilobytes-large future in and out of the task's cell) cost a fifth of it. The work started
/// together is mostly the next messages of the keys whose entries one batch answered, whose answers
/// and acks come together too: one wake-up of the group's task serves them all.
async fn group(
    mut work: FuturesUnordered<impl Future<Output = Done> + Send>,
    finished: mpsc::UnboundedSender<Done>,
) {
    while let Some(done) = work.next().await {
        // The dispatcher is gone only when the binding stopped.
        let _ = finished.send(done);
    }
}

/// A piece of grouped work: one that panicked stops the binding, which starts again from its
/// holds, as after another instance's change: its `Done` is made from `fallback` (the work's held
/// message, key and kind).
async fn caught(
    work: Pin<Box<impl Future<Output = Done> + Send>>,
    fallback: (Option<HeldId>, Option<MessageKey>, work::Chore),
) -> Done {
    match std::panic::AssertUnwindSafe(work).catch_unwind().await {
        Ok(done) => done,
        Err(_) => {
            tracing::error!("A message's work failed; the binding starts again.");
            let (held_id, key, was) = fallback;
            Done {
                held_id,
                key,
                then: None,
                was,
                stop: true,
            }
        }
    }
}

async fn recv(retries: &mut Option<mpsc::Receiver<Inbound>>) -> Option<Inbound> {
    match retries.as_mut() {
        Some(r) => r.recv().await,
        None => None,
    }
}

/// Waits until the start-up holding back ends by time.
async fn hold_back_ends(quarantine: &Option<Quarantine>) {
    match quarantine.as_ref().and_then(|q| q.until) {
        Some(until) => tokio::time::sleep_until(until.into()).await,
        None => std::future::pending().await,
    }
}

async fn search(
    search: &mut Option<Pin<Box<dyn Future<Output = Vec<Delivery>> + Send>>>,
) -> Vec<Delivery> {
    match search.as_mut() {
        Some(search) => search.await,
        None => std::future::pending().await,
    }
}

async fn until(deadline: &mut Option<Pin<Box<Sleep>>>) {
    if let Some(d) = deadline.as_mut() {
        d.await
    }
}
