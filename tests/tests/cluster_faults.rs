//! The data path on a three-node JetStream cluster under faults (SPEC §7, §8 guarantees 1, 2 and 6;
//! issue 12): while orders flow through the sidecar, the processor and the app, with repairs, holds
//! and parked heads, the leader of the app stream, of MEND_HOLD, of MEND_FAILED and of each bucket
//! is SIGKILLed and restarted; and a follower of MEND_HOLD is paused (SIGSTOP) and resumed again and
//! again while long hold queues are released. Every run ends with every order delivered (the parked
//! ones after a person's resubmission), each parked once, every key's first successes in stream
//! order, and no hold left behind. One more run kills the leader of the sidecar's retry consumer
//! right after the sidecar asked it for retries: the retries must flow again soon after the
//! election, not once the lost pull request expires.
//!
//! `MEND_TEST_KEEP_LOGS=1` writes every run's logs to a file (a failing run always does).
//!
//! A parked head holds its key until a person acts; here a desk task stands in for the dashboard's
//! operator: it reads MEND_PARKED (no dashboard consumes it in these runs) and resubmits each parked
//! order with its account fixed, as the dashboard's resubmit does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use futures::TryStreamExt;
use mend_e2e::app::{Delivery, FakeApp, Reply};
use mend_e2e::cluster::Cluster;
use mend_e2e::mend::{MendProcess, example_rules, processor_config, sidecar_config};
use mend_e2e::wait;
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT, first_successes_in_order};
use repair_rules::FailureEnvelope;
use serde_json::{Value, json};

/// mend's streams and buckets as R3, on every role.
const R3: &str = "[nats]\nreplicas = 3\n";
/// The service; the example rules apply to "orders" only.
const SERVICE: &str = "orders";
/// The sidecar's durable consumer on the app stream.
const CONSUMER: &str = "mend-orders-orders";
/// Short timings, so a delivery whose ack was lost in a fault comes back soon.
const BINDING: &str = "timeout = \"2s\"\nack_wait = \"4s\"\nconcurrency = 8\nbackoff_initial = \"20ms\"\nbackoff_max = \"1s\"";
/// How long the roles may take to start against a fresh cluster.
const START_LIMIT: Duration = Duration::from_secs(90);
/// How long one publish, resubmission or fault step may take (an election takes ≈ 4–7 s).
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// Deliveries the app must see with a node down before it is restarted.
const PROGRESS_WHILE_DOWN: usize = 30;
/// How long that progress, or a step of the pause run, may take: an election, and a pull whose
/// consumer moved to a new leader may idle until its request expires (≈ 35 s).
const PROGRESS_LIMIT: Duration = Duration::from_secs(90);

/// Keys and orders per key of a run with a leader kill.
const KEYS: u64 = 8;
const PER_KEY: u64 = 30;

/// One order as published: `n` is its place in the app stream.
#[derive(Debug, Clone)]
struct Order {
    n: u64,
    key: String,
    account: String,
    amount: Value,
}

impl Order {
    fn new(n: u64, key: &str, parked: bool, repairable: bool) -> Self {
        Self {
            n,
            key: key.to_owned(),
            account: if parked { "nobody" } else { key }.to_owned(),
            amount: if repairable {
                json!(format!("{n}.50"))
            } else {
                json!(n)
            },
        }
    }

    fn parked(&self) -> bool {
        self.account == "nobody"
    }

    fn repairable(&self) -> bool {
        self.amount.is_string()
    }

    fn json(&self) -> Value {
        json!({"key": self.key, "n": self.n, "account": self.account, "amount": self.amount})
    }
}

/// `KEYS × PER_KEY` orders over keys `k<n % KEYS>`: every 17th (from 5) has the unknown account
/// `nobody` (parked, its key held behind it until the desk resubmits it), every 7th (from 2) of the
/// others a string amount (repaired by the processor; its key held until the repair is through).
fn mixed_orders() -> Vec<Order> {
    (0..KEYS * PER_KEY)
        .map(|n| {
            let parked = n % 17 == 5;
            let repairable = !parked && n % 7 == 2;
            Order::new(n, &format!("k{}", n % KEYS), parked, repairable)
        })
        .collect()
}

/// The orders app: a string amount is a `bad_type`, the account `nobody` an `unknown_account`.
fn orders_app(d: &Delivery) -> Reply {
    mend_e2e::app::order_problem(d).unwrap_or(Reply::Ok)
}

/// How many distinct orders succeeded.
fn succeeded(log: &[Delivery]) -> usize {
    log.iter()
        .filter(|d| d.ok())
        .map(Delivery::n)
        .collect::<HashSet<_>>()
        .len()
}

/// A client of the whole cluster that notices a paused node within a few seconds (async-nats pings
/// once a minute by default) and moves to another node.
async fn test_client(cluster: &Cluster) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .ping_interval(Duration::from_secs(1))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(cluster.server_addrs()?)
        .await
        .with_context(|| format!("cannot connect to {}", cluster.seed_list()))
}

/// Publishes with `Nats-Msg-Id: id` until the stream acknowledges it, retrying with the same id
/// (stored once) while a leader is elected or a node is paused; fails after [`STEP_LIMIT`].
async fn publish_stored(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    headers: HeaderMap,
    payload: Bytes,
) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + STEP_LIMIT;
    let mut backoff = Duration::from_millis(25);
    let mut tries = 0;
    loop {
        tries += 1;
        let message = PublishMessage::build()
            .payload(payload.clone())
            .headers(headers.clone())
            .message_id(id);
        let acked = match js.send_publish(subject.to_owned(), message).await {
            Ok(ack) => ack.await.map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::Error::from(e)),
        };
        let error = match acked {
            Ok(ack) => return Ok(ack.sequence),
            Err(e) => e,
        };
        if tokio::time::Instant::now() + backoff >= deadline {
            bail!("{id} on {subject} not stored after {tries} tries: {error:#}");
        }
        // A bounded retry of a publish the cluster could not take yet.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Publishes `orders` one after the other on `app.created` (so their stream order is theirs),
/// each stored exactly once through elections.
async fn publish_orders(js: &jetstream::Context, orders: &[Order]) -> anyhow::Result<()> {
    for o in orders {
        let mut headers = HeaderMap::new();
        headers.insert(KEY_HEADER, o.key.as_str());
        let payload = Bytes::from(o.json().to_string());
        publish_stored(
            js,
            "app.created",
            &format!("order-{}", o.n),
            headers,
            payload,
        )
        .await?;
    }
    Ok(())
}

/// What the desk saw and did.
#[derive(Default)]
struct DeskState {
    /// Every parked envelope read from MEND_PARKED, in stream order.
    parked: Vec<FailureEnvelope>,
    /// Lineages resubmitted, with when.
    resubmitted: BTreeMap<String, Duration>,
    /// Resubmissions that could not be stored.
    errors: Vec<String>,
    /// The last error reading MEND_PARKED (retried).
    read_error: Option<String>,
}

/// An operator at the dashboard, standing in for it: reads each envelope parked for `orders` from
/// MEND_PARKED and, once armed, resubmits it to `mend.retry.orders` with the account fixed (the
/// headers the dashboard's resubmit sends: same `Mend-Id`, attempt + 1, `Mend-Resubmitted-By`).
struct Desk {
    state: Arc<Mutex<DeskState>>,
    armed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Desk {
    fn start(js: jetstream::Context, started: Instant) -> Self {
        let state = Arc::new(Mutex::new(DeskState::default()));
        let armed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(desk(js, state.clone(), armed.clone(), started));
        Self { state, armed, task }
    }

    /// From now on, parked orders are resubmitted (those parked before, too).
    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Away from the desk: parked orders wait.
    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    fn parked_count(&self) -> usize {
        self.lock().parked.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeskState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn summary(&self) -> String {
        let s = self.lock();
        let parked: Vec<String> = s
            .parked
            .iter()
            .map(|e| format!("{} (n {}, key {:?})", e.id, e.payload["n"], e.key))
            .collect();
        format!(
            "parked ({}): {parked:?}\nresubmitted ({}): {:?}\nresubmission errors: {:?}\nlast read error: {:?}",
            s.parked.len(),
            s.resubmitted.len(),
            s.resubmitted,
            s.errors,
            s.read_error
        )
    }
}

impl Drop for Desk {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn desk(
    js: jetstream::Context,
    state: Arc<Mutex<DeskState>>,
    armed: Arc<AtomicBool>,
    started: Instant,
) {
    let lock = || {
        state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut next = 1;
    let mut waiting: Vec<FailureEnvelope> = Vec::new();
    loop {
        match read_parked(&js, &mut next).await {
            Ok(new) => {
                lock().parked.extend(new.iter().cloned());
                waiting.extend(new);
            }
            Err(e) => lock().read_error = Some(format!("{e:#}")),
        }
        if armed.load(Ordering::SeqCst) {
            for env in waiting.drain(..) {
                match resubmit(&js, &env).await {
                    Ok(()) => {
                        lock().resubmitted.insert(env.id.clone(), started.elapsed());
                    }
                    Err(e) => lock().errors.push(format!("{}: {e:#}", env.id)),
                }
            }
        }
        // A person looks again shortly (a bounded poll of state the test is not told about).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The envelopes stored on MEND_PARKED from sequence `next` on, read from the stream's leader;
/// `next` moves past each one read.
async fn read_parked(
    js: &jetstream::Context,
    next: &mut u64,
) -> anyhow::Result<Vec<FailureEnvelope>> {
    let mut out = Vec::new();
    let mut parked = js.get_stream("MEND_PARKED").await?;
    let info = parked.info().await?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    *next = (*next).max(first);
    while *next <= last {
        match parked.get_raw_message(*next).await {
            Ok(m) => {
                if m.subject.as_str() == format!("mend.parked.{SERVICE}") {
                    out.push(serde_json::from_slice(&m.payload).context("envelope JSON")?);
                }
            }
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => {
                if out.is_empty() {
                    return Err(e.into());
                }
                return Ok(out);
            }
        }
        *next += 1;
    }
    Ok(out)
}

/// Resubmits a parked order with its account fixed, as the dashboard would.
async fn resubmit(js: &jetstream::Context, env: &FailureEnvelope) -> anyhow::Result<()> {
    let key = env.key.clone().context("a parked order without a key")?;
    let attempt = env.attempt + 1;
    let mut payload = env.payload.clone();
    payload["account"] = json!(key);
    let mut headers = HeaderMap::new();
    headers.insert(KEY_HEADER, key.as_str());
    headers.insert("Content-Type", "application/json");
    headers.insert("Mend-Id", env.id.as_str());
    headers.insert("Mend-Service", env.service.as_str());
    headers.insert("Mend-Attempt", attempt.to_string().as_str());
    headers.insert("Mend-Resubmitted-By", "desk");
    headers.insert("Mend-Original-Subject", env.subject.as_str());
    headers.insert("Mend-Key", key.as_str());
    publish_stored(
        js,
        &format!("mend.retry.{}", env.service),
        &env.lineage().msg_id(attempt, "retry"),
        headers,
        Bytes::from(payload.to_string()),
    )
    .await
    .map(|_| ())
}

/// One run: a cluster, the app stream `APP` (R3, `app.>`), the orders app, a sidecar and a
/// processor with R3 streams and buckets, and the desk.
struct Run {
    cluster: Cluster,
    js: jetstream::Context,
    app: FakeApp,
    sidecar: MendProcess,
    processor: MendProcess,
    desk: Desk,
    started: Instant,
    timeline: Vec<String>,
    name: &'static str,
}

impl Run {
    async fn start(name: &'static str) -> anyhow::Result<Self> {
        mend_e2e::init();
        let started = Instant::now();
        let cluster = Cluster::start().await?;
        let js = jetstream::new(test_client(&cluster).await?);
        mend_e2e::cluster::r3_stream(&js, "APP", &["app.>"]).await?;
        let app = FakeApp::start().await?;
        app.script(orders_app);
        let seeds = cluster.seed_list();
        let sidecar_cfg = format!(
            "{}{R3}",
            sidecar_config(
                SERVICE,
                &seeds,
                "APP",
                &["app.>"],
                &app.endpoint(),
                &format!("key = {{ header = \"{KEY_HEADER}\" }}\n{BINDING}"),
            )
        );
        let sidecar = MendProcess::start("sidecar", &sidecar_cfg).await?;
        let processor_cfg = processor_config(
            &seeds,
            &example_rules(),
            &format!("ack_wait = \"4s\"\n{R3}"),
        );
        let processor = MendProcess::start("processor", &processor_cfg).await?;
        let desk = Desk::start(js.clone(), started);
        let mut run = Self {
            cluster,
            js,
            app,
            sidecar,
            processor,
            desk,
            started,
            timeline: Vec::new(),
            name,
        };
        let ready = tokio::try_join!(
            run.sidecar.wait_log("Sidecar consuming", START_LIMIT),
            run.processor.wait_log("Processor consuming", START_LIMIT),
        );
        if let Err(e) = ready {
            return Err(run.fail(e));
        }
        run.note("sidecar and processor consuming");
        Ok(run)
    }

    fn note(&mut self, what: &str) {
        let line = format!("{:>7.2?} {what}", self.started.elapsed());
        eprintln!("[{}] {line}", self.name);
        self.timeline.push(line);
    }

    /// Writes every log of the run to a file; says where, and gives the app's log in brief.
    fn save(&self) -> (String, Vec<String>) {
        let log = self.app.log();
        let app: Vec<String> = log
            .iter()
            .map(|d| {
                format!(
                    "{:>8.3?} {} n={} {} attempt={}",
                    d.at.duration_since(self.started),
                    d.status,
                    d.n(),
                    d.mend_id(),
                    d.header("mend-attempt").unwrap_or("?")
                )
            })
            .collect();
        let full = format!(
            "==== timeline ====\n{}\n==== desk ====\n{}\n==== app ({} requests) ====\n{}\n==== sidecar ====\n{}\n==== processor ====\n{}\n==== cluster ====\n{}",
            self.timeline.join("\n"),
            self.desk.summary(),
            log.len(),
            app.join("\n"),
            self.sidecar.log(),
            self.processor.log(),
            self.cluster.logs()
        );
        let file = std::env::temp_dir().join(format!(
            "mend-cluster-faults-{}-{}.log",
            self.name,
            std::process::id()
        ));
        let saved = match std::fs::write(&file, &full) {
            Ok(()) => format!("full logs in {}", file.display()),
            Err(w) => format!("full logs not saved: {w}"),
        };
        (saved, app)
    }

    /// `e` with what is needed to tell what happened: the timeline, the desk, the app's log in
    /// brief, every process's log. The full logs also go to a file named in the message.
    fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        let tail = |log: String, lines: usize| {
            let all: Vec<&str> = log.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        let (saved, app) = self.save();
        anyhow::anyhow!(
            "{e:#}\n{saved}\n==== timeline ====\n{}\n==== desk ====\n{}\n==== app: last 40 of {} requests ====\n{}\n==== sidecar (tail) ====\n{}\n==== processor (tail) ====\n{}\n==== cluster ====\n{}",
            self.timeline.join("\n"),
            self.desk.summary(),
            app.len(),
            tail(app.join("\n"), 40),
            tail(self.sidecar.log(), 250),
            tail(self.processor.log(), 80),
            self.cluster.logs()
        )
    }

    /// Waits until a key is held with messages waiting in its hold queue and more than `parked`
    /// heads have been parked: the run is in the middle of everything.
    async fn wait_busy(&mut self, parked: usize) -> anyhow::Result<()> {
        let js = self.js.clone();
        let result = wait::until(
            "held messages behind a newly parked head",
            TEST_TIMEOUT,
            || async {
                let queued = js
                    .get_stream("MEND_HOLD")
                    .await?
                    .info()
                    .await?
                    .state
                    .messages;
                Ok((queued > 0 && self.desk.parked_count() > parked).then_some(queued))
            },
        )
        .await;
        match result {
            Ok(queued) => {
                self.note(&format!(
                    "busy: {queued} held messages, {} parked, {} requests",
                    self.desk.parked_count(),
                    self.app.log().len()
                ));
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Waits until the app has had `more` requests beyond `from`.
    async fn wait_progress(&mut self, what: &str, from: usize, more: usize) -> anyhow::Result<()> {
        let at = from + more;
        let waited = self
            .app
            .wait_for(what, PROGRESS_LIMIT, |log| log.len() >= at)
            .await;
        match waited {
            Ok(_) => {
                self.note(what);
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// One round of a leader kill: with the desk away, `before` is published until keys are held
    /// behind newly parked heads; then the leader of `stream` is SIGKILLed, the desk comes back
    /// (releases begin) and `during` is published while it is down; once the flow went on
    /// without it, it is restarted.
    async fn kill_round(
        &mut self,
        stream: &str,
        before: &[Order],
        during: &[Order],
    ) -> anyhow::Result<()> {
        self.desk.disarm();
        let parked = self.desk.parked_count();
        if let Err(e) = publish_orders(&self.js, before).await {
            return Err(self.fail(e));
        }
        self.note(&format!("{} orders published", before.len()));
        self.wait_busy(parked).await?;
        let killed = match self.cluster.kill_leader_of(stream).await {
            Ok(i) => i,
            Err(e) => return Err(self.fail(e)),
        };
        let from = self.app.log().len();
        self.note(&format!(
            "SIGKILLed n{killed}, the leader of {stream} ({from} requests so far)"
        ));
        self.desk.arm();
        if let Err(e) = publish_orders(&self.js, during).await {
            return Err(self.fail(e));
        }
        self.note(&format!("{} more orders published", during.len()));
        self.wait_progress(
            &format!("{PROGRESS_WHILE_DOWN} requests with n{killed} down"),
            from,
            PROGRESS_WHILE_DOWN,
        )
        .await?;
        if let Err(e) = self.cluster.restart(killed).await {
            return Err(self.fail(e));
        }
        let leader = self.cluster.stream_leader(stream).await.unwrap_or_default();
        self.note(&format!(
            "n{killed} restarted and current; {stream} led by {leader}"
        ));
        Ok(())
    }

    /// Waits for the end of the run and checks it; on failure, everything needed to diagnose it.
    async fn finish(&mut self, orders: &[Order]) -> anyhow::Result<()> {
        let result = self.check_end(orders).await;
        match result {
            Ok(()) => {
                self.note("every guarantee held");
                if std::env::var_os("MEND_TEST_KEEP_LOGS").is_some() {
                    eprintln!("[{}] {}", self.name, self.save().0);
                }
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn check_end(&mut self, orders: &[Order]) -> anyhow::Result<()> {
        let total = orders.len();
        self.app
            .wait_for("every order delivered", TEST_TIMEOUT, |log| {
                succeeded(log) >= total
            })
            .await?;
        self.note("every order delivered");
        holds_cleared(&self.js).await?;
        self.note("no hold left");
        drained(&self.js).await?;
        let log = self.app.log();
        check_deliveries(&log, orders)?;
        let parked = self.desk.lock().parked.clone();
        check_parked(&parked, orders)?;
        let errors = self.desk.lock().errors.clone();
        anyhow::ensure!(errors.is_empty(), "resubmissions not stored: {errors:?}");
        for (role, p) in [("sidecar", &self.sidecar), ("processor", &self.processor)] {
            anyhow::ensure!(!p.log().contains("panicked"), "the {role} panicked");
        }
        let redelivered = log.iter().filter(|d| d.ok()).count() - succeeded(&log);
        self.note(&format!(
            "{} requests, {} orders, {} successes repeated (at-least-once), {} parked",
            log.len(),
            total,
            redelivered,
            parked.len()
        ));
        Ok(())
    }
}

/// Waits until no key is held any more (every entry of `mend_holds` is resolved or gone) and
/// MEND_HOLD is empty, reading from the leaders (a replica may lag).
async fn holds_cleared(js: &jetstream::Context) -> anyhow::Result<()> {
    let last = Mutex::new(String::new());
    let cleared = wait::until("every hold released", TEST_TIMEOUT, || {
        let last = &last;
        async move {
            let queued = js
                .get_stream("MEND_HOLD")
                .await?
                .info()
                .await?
                .state
                .messages;
            let bucket = js.get_stream("KV_mend_holds").await?;
            let mut subjects = bucket
                .info_with_subjects(format!("$KV.mend_holds.{SERVICE}.>"))
                .await?;
            let mut names = Vec::new();
            while let Some((subject, _)) = subjects.try_next().await? {
                names.push(subject);
            }
            let mut held = Vec::new();
            for subject in names {
                let entry = match bucket.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => m,
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if entry.payload.is_empty() {
                    continue; // deleted or purged
                }
                let hold: Value = serde_json::from_slice(&entry.payload)?;
                if hold["state"] != "resolved" {
                    held.push(hold);
                }
            }
            *last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                format!("{queued} messages in MEND_HOLD; unresolved: {held:?}");
            Ok((queued == 0 && held.is_empty()).then_some(()))
        }
    })
    .await;
    let last = last
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cleared.map_err(|e| anyhow::anyhow!("{e:#}; last seen: {last}"))
}

/// Waits until the sidecar's consumer has nothing pending or unacked.
async fn drained(js: &jetstream::Context) -> anyhow::Result<()> {
    wait::until(&format!("{CONSUMER} drained"), TEST_TIMEOUT, || async {
        let app = js.get_stream("APP").await?;
        let mut consumer: jetstream::consumer::PullConsumer = app
            .get_consumer(CONSUMER)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = consumer.info().await?;
        Ok((info.num_pending == 0 && info.num_ack_pending == 0).then_some(()))
    })
    .await
}

/// Per key, the first successes are exactly its orders in stream order; a repairable order went
/// through repaired, a parked one as the desk's resubmission, and nothing went through as it was
/// published when it should not have.
fn check_deliveries(log: &[Delivery], orders: &[Order]) -> anyhow::Result<()> {
    first_successes_in_order(log).map_err(anyhow::Error::msg)?;
    let by_n: HashMap<u64, &Order> = orders.iter().map(|o| (o.n, o)).collect();
    let mut firsts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for d in log.iter().filter(|d| d.ok()) {
        let n = d.n();
        let order = by_n
            .get(&n)
            .with_context(|| format!("a success of no order: {:?}", d.json))?;
        let key = d.field("key").and_then(Value::as_str).unwrap_or("");
        anyhow::ensure!(key == order.key, "order {n} delivered with key {key:?}");
        if seen.insert(n) {
            firsts.entry(key.to_owned()).or_default().push(n);
        }
        let attempt: u32 = d.header("mend-attempt").unwrap_or("1").parse()?;
        if order.repairable() {
            anyhow::ensure!(
                attempt >= 2 && d.header("mend-repaired-by").is_some(),
                "order {n} succeeded unrepaired (attempt {attempt})"
            );
        }
        if order.parked() {
            anyhow::ensure!(
                d.header("mend-resubmitted-by") == Some("desk"),
                "parked order {n} succeeded without the desk's resubmission"
            );
        }
    }
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for o in orders {
        expected.entry(o.key.clone()).or_default().push(o.n);
    }
    for (key, want) in &expected {
        let got = firsts.get(key).map(Vec::as_slice).unwrap_or_default();
        anyhow::ensure!(
            got == want.as_slice(),
            "key {key}: first successes {got:?}, stream order {want:?}"
        );
    }
    Ok(())
}

/// Each order of the account `nobody` was parked exactly once, and no other order was.
fn check_parked(parked: &[FailureEnvelope], orders: &[Order]) -> anyhow::Result<()> {
    let mut times: BTreeMap<u64, usize> = BTreeMap::new();
    for env in parked {
        let n = env.payload["n"]
            .as_u64()
            .with_context(|| format!("parked envelope {} without n", env.id))?;
        *times.entry(n).or_default() += 1;
    }
    let want: BTreeMap<u64, usize> = orders
        .iter()
        .filter(|o| o.parked())
        .map(|o| (o.n, 1))
        .collect();
    anyhow::ensure!(
        times == want,
        "parked (order → times) {times:?}, expected each of {:?} once",
        want.keys().collect::<Vec<_>>()
    );
    Ok(())
}

/// A run of mixed orders in two rounds of [`Run::kill_round`], a quarter of them published before
/// each kill and a quarter while the leader of `stream` is down; the second round kills the
/// stream's new leader.
async fn leader_killed_and_restarted(stream: &str, name: &'static str) -> anyhow::Result<()> {
    let mut run = Run::start(name).await?;
    let orders = mixed_orders();
    let quarter = orders.len() / 4;
    let (first, rest) = orders.split_at(quarter);
    let (second, rest) = rest.split_at(quarter);
    let (third, fourth) = rest.split_at(quarter);
    run.kill_round(stream, first, second).await?;
    run.kill_round(stream, third, fourth).await?;
    run.finish(&orders).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_stream_leader_killed_and_restarted() -> anyhow::Result<()> {
    leader_killed_and_restarted("APP", "app").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_queue_leader_killed_and_restarted() -> anyhow::Result<()> {
    leader_killed_and_restarted("MEND_HOLD", "hold").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_stream_leader_killed_and_restarted() -> anyhow::Result<()> {
    leader_killed_and_restarted("MEND_FAILED", "failed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_bucket_leader_killed_and_restarted() -> anyhow::Result<()> {
    leader_killed_and_restarted("KV_mend_holds", "holds-kv").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_bucket_leader_killed_and_restarted() -> anyhow::Result<()> {
    leader_killed_and_restarted("KV_mend_leases", "leases-kv").await
}

/// Long keys of the pause run, and the orders held behind each one's parked head. While a resumed
/// node catches up, the releases run unpaced (300 deliveries in under a second were seen), so the
/// queues hold enough for every pause to find releases still going.
const LONG_KEYS: u64 = 4;
const LONG: u64 = 400;
/// Successes between two changes of the pause run (pause a follower, resume it).
const PAUSE_STEP: usize = 50;
/// Pauses of the pause run; after them the releases finish undisturbed.
const PAUSES: usize = 6;

/// `LONG_KEYS` keys `l<i>`, each with a parked head (account `nobody`) and `LONG` orders behind it
/// (every 9th repairable), interleaved.
fn long_orders() -> Vec<Order> {
    (0..LONG_KEYS * (LONG + 1))
        .map(|n| {
            let parked = n < LONG_KEYS;
            let repairable = !parked && n % 9 == 4;
            Order::new(n, &format!("l{}", n % LONG_KEYS), parked, repairable)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_queue_follower_paused_and_resumed_during_long_releases() -> anyhow::Result<()> {
    let mut run = Run::start("pause").await?;
    let orders = long_orders();
    if let Err(e) = publish_orders(&run.js, &orders).await {
        return Err(run.fail(e));
    }
    let total = orders.len();
    run.note(&format!("{total} orders published"));
    // Everything behind the heads waits in the hold queues (the repairable ones too: a message of
    // a held key is queued as it came), and every head is parked.
    let behind = LONG_KEYS * LONG;
    let js = run.js.clone();
    let filled = wait::until("every hold queue filled", TEST_TIMEOUT, || async {
        let queued = js
            .get_stream("MEND_HOLD")
            .await?
            .info()
            .await?
            .state
            .messages;
        Ok((queued >= behind && run.desk.parked_count() >= LONG_KEYS as usize).then_some(()))
    })
    .await;
    if let Err(e) = filled {
        return Err(run.fail(e));
    }
    run.note(&format!("{behind} held behind {LONG_KEYS} parked heads"));
    run.desk.arm();

    let mut pauses = 0;
    loop {
        let done = succeeded(&run.app.log());
        if done >= total || pauses == PAUSES {
            break;
        }
        let followers = match run.cluster.follower_indexes("MEND_HOLD").await {
            Ok(f) if !f.is_empty() => f,
            Ok(_) => return Err(run.fail(anyhow::anyhow!("MEND_HOLD has no followers"))),
            Err(e) => return Err(run.fail(e)),
        };
        let node = followers[pauses % followers.len()];
        if let Err(e) = run.cluster.pause(node).await {
            return Err(run.fail(e));
        }
        pauses += 1;
        run.note(&format!(
            "paused n{node}, a follower of MEND_HOLD ({done} of {total} delivered)"
        ));
        let at = (done + PAUSE_STEP).min(total);
        let went_on = run
            .app
            .wait_for(
                &format!("{at} delivered with n{node} paused"),
                PROGRESS_LIMIT,
                |log| succeeded(log) >= at,
            )
            .await;
        let resumed = run.cluster.resume(node).await;
        if let Err(e) = went_on.map(|_| ()).and(resumed) {
            return Err(run.fail(e));
        }
        let done = succeeded(&run.app.log());
        run.note(&format!("resumed n{node} ({done} of {total} delivered)"));
        // One fault at a time: the resumed node catches up while the release goes on.
        let at = (done + PAUSE_STEP / 2).min(total);
        let caught_up = async {
            run.app
                .wait_for(
                    &format!("{at} delivered after resuming n{node}"),
                    PROGRESS_LIMIT,
                    |log| succeeded(log) >= at,
                )
                .await?;
            wait::until(&format!("n{node} current again"), STEP_LIMIT, || async {
                Ok(run.cluster.node(node).healthy().await?.then_some(()))
            })
            .await
        }
        .await;
        if let Err(e) = caught_up {
            return Err(run.fail(e));
        }
    }
    if pauses < PAUSES {
        let e = anyhow::anyhow!("the releases were over after {pauses} pauses: make them longer");
        return Err(run.fail(e));
    }
    run.finish(&orders).await
}

/// The sidecar's retry consumer (shared, not partitioned).
const RETRY_CONSUMER: &str = "mend-orders-retry";

/// The leader of consumer `consumer` of `stream` (`n<i>`), asked of the stream's leader.
async fn consumer_leader(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> anyhow::Result<Option<String>> {
    let s = js.get_stream(stream).await?;
    let mut c: jetstream::consumer::PullConsumer = s
        .get_consumer(consumer)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = c.info().await?;
    Ok(info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .filter(|l| !l.is_empty()))
}

/// The client port of the sidecar's main NATS connection (the one its retries are pulled on) as
/// it is now: its latest "connected successfully server=<port>" outside a binding (each binding
/// pulls its app stream on a connection of its own, logged in the binding's span).
fn main_connection_port(log: &str) -> Option<u16> {
    let plain = strip_ansi(log);
    let line = plain
        .lines()
        .rev()
        .find(|l| l.contains("connected successfully") && !l.contains("binding{"))?;
    let port = line.split("server=").nth(1)?;
    port.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How soon a retry must go through after the leader of the retry consumer was killed: an
/// election (≈ 4–7 s here) and twice the pull heartbeat (5 s) in which the sidecar notices that its
/// pull went silent (sidecar/src/nats.rs `PULL_HEARTBEAT`), with a margin. A pull request that
/// waited on the killed leader is gone with it; one that is not replaced idles until its expiry.
const RETRY_AFTER_KILL: Duration = Duration::from_secs(20);

/// A head parked with orders held behind it; the sidecar's retry consumer is led by a node the
/// sidecar is not connected to (so its connection survives), and right after the sidecar asked
/// that leader for more retries (a pull request, seen on its subject) the node is SIGKILLed. The
/// head's resubmission must go through, and its key be released, soon after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_flow_soon_after_their_consumers_leader_is_killed() -> anyhow::Result<()> {
    let mut run = Run::start("retry-leader").await?;
    let orders: Vec<Order> = (0..6).map(|n| Order::new(n, "r0", n == 0, false)).collect();
    if let Err(e) = publish_orders(&run.js, &orders).await {
        return Err(run.fail(e));
    }
    let js = run.js.clone();
    let held = wait::until("5 held behind a parked head", TEST_TIMEOUT, || async {
        let queued = js
            .get_stream("MEND_HOLD")
            .await?
            .info()
            .await?
            .state
            .messages;
        Ok((queued >= 5 && run.desk.parked_count() >= 1).then_some(()))
    })
    .await;
    if let Err(e) = held {
        return Err(run.fail(e));
    }
    run.note("5 held behind the parked head");

    let Some(port) = main_connection_port(&run.sidecar.log()) else {
        let e = anyhow::anyhow!("no connection of the sidecar in its log");
        return Err(run.fail(e));
    };
    let Some(connected) = run.cluster.nodes().iter().position(|n| n.port() == port) else {
        let e = anyhow::anyhow!("the sidecar is connected to port {port}, no node's");
        return Err(run.fail(e));
    };
    // The consumer's leader moves off the sidecar's node if it is there (a step-down, as
    // `nats consumer cluster step-down` does).
    let stepdown = format!("$JS.API.CONSUMER.LEADER.STEPDOWN.MEND_RETRY.{RETRY_CONSUMER}");
    let connected_name = run.cluster.node(connected).name().to_owned();
    let leader = wait::until(
        "a retry consumer leader off the sidecar's node",
        STEP_LIMIT,
        || {
            let (js, stepdown, connected_name) = (&js, &stepdown, &connected_name);
            async move {
                let Some(leader) = consumer_leader(js, "MEND_RETRY", RETRY_CONSUMER).await? else {
                    return Ok(None);
                };
                if leader == *connected_name {
                    let _ = js.client().request(stepdown.clone(), Bytes::new()).await;
                    return Ok(None);
                }
                Ok(Some(leader))
            }
        },
    )
    .await;
    let leader = match leader.and_then(|l| run.cluster.index_of(&l)) {
        Ok(i) => i,
        Err(e) => return Err(run.fail(e)),
    };
    run.note(&format!(
        "sidecar on n{connected}; {RETRY_CONSUMER} led by n{leader}"
    ));

    // The next pull request of the sidecar's retry loop (one per expiry when idle, 30 s).
    let mut requests = match js
        .client()
        .subscribe(format!(
            "$JS.API.CONSUMER.MSG.NEXT.MEND_RETRY.{RETRY_CONSUMER}"
        ))
        .await
    {
        Ok(s) => s,
        Err(e) => return Err(run.fail(e.into())),
    };
    let request = tokio::time::timeout(STEP_LIMIT, futures::StreamExt::next(&mut requests)).await;
    if !matches!(request, Ok(Some(_))) {
        let e = anyhow::anyhow!("no pull request for retries within {STEP_LIMIT:?}");
        return Err(run.fail(e));
    }
    if let Err(e) = run.cluster.kill(leader).await {
        return Err(run.fail(e));
    }
    let killed_at = Instant::now();
    run.note(&format!(
        "a pull request for retries seen; SIGKILLed n{leader}, the leader of {RETRY_CONSUMER}"
    ));
    run.desk.arm();
    let through = run
        .app
        .wait_for("the head's resubmission delivered", TEST_TIMEOUT, |log| {
            log.iter().any(|d| d.ok() && d.n() == 0)
        })
        .await;
    if let Err(e) = through {
        return Err(run.fail(e));
    }
    let took = killed_at.elapsed();
    run.note(&format!(
        "the head's resubmission delivered {took:.1?} after the kill"
    ));
    if took > RETRY_AFTER_KILL {
        let e = anyhow::anyhow!(
            "the head's resubmission went through {took:.1?} after the retry consumer's leader \
             was killed (allowed: {RETRY_AFTER_KILL:?}); the sidecar's retry pull idled meanwhile"
        );
        return Err(run.fail(e));
    }
    if let Err(e) = run.cluster.restart(leader).await {
        return Err(run.fail(e));
    }
    run.finish(&orders).await
}
