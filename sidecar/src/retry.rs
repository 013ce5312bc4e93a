//! The sidecar's retry path (SPEC §1, §3): repaired and resubmitted messages arrive on
//! `mend.retry.<service>` (stream MEND_RETRY), are routed to the binding of their original message,
//! and go through that key's lane like any message. Their lineage comes from the headers: `Mend-Id`,
//! `Mend-Attempt`, `Mend-Original-Subject`, `Mend-Key`, `Mend-Repaired-By`, `Mend-Resubmitted-By`,
//! `Mend-History`. A retry that cannot be routed (no valid `Mend-Id`, or a stream no binding
//! consumes) is parked for a person, never dropped.
//!
//! Commands from the dashboard arrive on `mend.control.<service>` (stream MEND_CONTROL) as JSON
//! `{"action": "discard" | "release", "key": …, "id": <lineage>, "binding": …}` and go the same way,
//! into the lane of their key. A command that is not one is refused (terminated, logged, counted).
//!
//! Every instance of a service pulls the same two consumers. A binding's dispatcher takes routed
//! messages only while this instance holds its lease ([`Dispatchers`]); one this instance does not
//! consume now is handed back for another instance to take. A partitioned binding's retry or command
//! belongs to the partition whose subjects match its original message's subject (a command's
//! original is read from the app stream); one of another partition is forwarded to
//! `mend.retry.<service>.p<k>` / `mend.control.<service>.p<k>`, which the instance of partition `k`
//! consumes (`mend-<service>-retry-p<k>`, `mend-<service>-control-p<k>`) into the same routing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, ErrorCode, Message};
use base64::Engine;
use futures::StreamExt;
use repair_rules::headers as h;
use repair_rules::identity::subjects;
use repair_rules::{
    ENVELOPE_VERSION, ErrorKind, FailureEnvelope, FailureError, HistoryEntry, LineageId, MessageKey,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::ack;
use crate::config::BindingConfig;
use crate::consume::{self, BindingRuntime, Delivery, Held, HeldId, Inlet, Source, Work};
use crate::headers::DeliveryMeta;
use crate::lanes::Lanes;
use crate::processor::MEND_HISTORY;
use crate::publish::{self, Published, to_bytes};

/// How long a retry or command is handed back for when this instance does not consume its binding
/// now (it waits for the lease, or lost it): long enough for another instance to pull it first.
const NOT_HERE_DELAY: Duration = Duration::from_secs(1);
/// How long a command is handed back for when its partition cannot be looked up now.
const LOOKUP_RETRY_DELAY: Duration = Duration::from_secs(2);
/// Forwards of one message between partitions before it is taken as a loop (instances that disagree
/// on the partitions) and parked or refused.
const MAX_FORWARDS: usize = 4;
/// The suffix a forward adds to the message's `Nats-Msg-Id`.
const FORWARD_SUFFIX: &str = ":fwd";

/// The durable consumer of a service's retries.
pub fn consumer_name(service: &str) -> String {
    format!("mend-{service}-retry")
}

/// The durable consumer of a service's commands from the dashboard.
pub fn control_consumer_name(service: &str) -> String {
    format!("mend-{service}-control")
}

/// What the router hands a binding's dispatcher.
pub enum Inbound {
    Retry(Message),
    Control {
        msg: Message,
        key: Option<MessageKey>,
        command: repair_rules::holds::Command,
    },
}

impl Inbound {
    pub(crate) fn into_message(self) -> Message {
        match self {
            Inbound::Retry(msg) | Inbound::Control { msg, .. } => msg,
        }
    }
}

/// Which of mend's inboxes of a service a message comes from: retries or commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbox {
    Retry,
    Control,
}

impl Inbox {
    /// The subject every instance of `service` shares.
    pub fn subject(self, service: &str) -> String {
        match self {
            Inbox::Retry => subjects::retry(service),
            Inbox::Control => subjects::control(service),
        }
    }

    /// The subject of the instance of partition `partition`.
    pub fn partition_subject(self, service: &str, partition: u32) -> String {
        format!("{}.p{partition}", self.subject(service))
    }

    /// The durable consumer of the shared subject (`None`) or of a partition's.
    pub fn consumer_name(self, service: &str, partition: Option<u32>) -> String {
        let shared = match self {
            Inbox::Retry => consumer_name(service),
            Inbox::Control => control_consumer_name(service),
        };
        match partition {
            Some(p) => format!("{shared}-p{p}"),
            None => shared,
        }
    }

    fn stream(self) -> &'static str {
        match self {
            Inbox::Retry => "MEND_RETRY",
            Inbox::Control => "MEND_CONTROL",
        }
    }
}

/// Where routed messages reach each binding's dispatcher (`bindings[i]` ↔ slot `i`): a slot is open
/// while this instance holds the binding's lease and its dispatcher runs.
pub struct Dispatchers {
    slots: Vec<Mutex<Option<mpsc::Sender<Inbound>>>>,
    open: watch::Sender<usize>,
}

impl Dispatchers {
    pub fn new(bindings: usize) -> Self {
        Self {
            slots: (0..bindings).map(|_| Mutex::new(None)).collect(),
            open: watch::channel(0).0,
        }
    }

    /// Binding `i`'s dispatcher takes routed messages from now on.
    pub fn open(&self, i: usize, to: mpsc::Sender<Inbound>) {
        let was = self.slot(i).replace(to);
        if was.is_none() {
            self.open.send_modify(|n| *n += 1);
        }
    }

    /// Binding `i`'s dispatcher stopped.
    pub fn close(&self, i: usize) {
        let was = self.slot(i).take();
        if was.is_some() {
            self.open.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    fn sender(&self, i: usize) -> Option<mpsc::Sender<Inbound>> {
        self.slot(i).clone()
    }

    fn slot(&self, i: usize) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<Inbound>>> {
        // A poisoned slot only means a panic elsewhere while swapping a sender: the value is whole.
        match self.slots[i].lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Waits until some binding's dispatcher runs here (`false`: shutdown came first). An instance
    /// that consumes nothing (a standby) does not pull retries or commands at all.
    async fn any_open(&self, shutdown: &CancellationToken) -> bool {
        let mut open = self.open.subscribe();
        tokio::select! {
            result = open.wait_for(|n| *n > 0) => result.is_ok(),
            _ = shutdown.cancelled() => false,
        }
    }
}

/// A command on `mend.control.<service>`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlMessage {
    action: ControlAction,
    key: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    binding: Option<String>,
    /// The subject of the message `id` in the app stream, when the sender knows it: routes the
    /// command of a partitioned binding without reading the app stream.
    #[serde(default)]
    subject: Option<String>,
    /// The partition that owns the key, when the sender knows it (the hold entry of a key names
    /// its partition): routes the command of a partitioned binding even when the message `id` is
    /// gone from the app stream (always, once acked, on a work-queue or interest stream).
    #[serde(default)]
    partition: Option<u32>,
    /// Who asked (the dashboard's user), for the logs.
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum ControlAction {
    Discard,
    Release,
}

/// A command understood: for which binding, key and lineage, and what to do.
struct Parsed {
    binding: usize,
    key: MessageKey,
    lineage: Option<LineageId>,
    command: repair_rules::holds::Command,
    cm: ControlMessage,
}

/// Creates or updates the service's control consumer: the shared one (`partition` = `None`) or the
/// one of this instance's partition.
pub async fn bind_control(
    js: &jetstream::Context,
    service: &str,
    partition: Option<u32>,
    ack_wait: Duration,
) -> anyhow::Result<PullConsumer> {
    bind_inbox(
        js,
        Inbox::Control,
        service,
        partition,
        256,
        ack_wait,
        format!("mend sidecar of {service}: discard and release commands"),
    )
    .await
}

/// Creates or updates the service's retry consumer (shared, or of this instance's `partition`). Its
/// ack wait is the longest of the bindings': a retry waiting in a lane is kept alive on its binding's
/// cadence, which must fit inside it.
pub async fn bind(
    js: &jetstream::Context,
    service: &str,
    partition: Option<u32>,
    max_ack_pending: usize,
    ack_wait: Duration,
) -> anyhow::Result<PullConsumer> {
    bind_inbox(
        js,
        Inbox::Retry,
        service,
        partition,
        max_ack_pending,
        ack_wait,
        format!("mend sidecar of {service}: repaired and resubmitted messages"),
    )
    .await
}

async fn bind_inbox(
    js: &jetstream::Context,
    inbox: Inbox,
    service: &str,
    partition: Option<u32>,
    max_ack_pending: usize,
    ack_wait: Duration,
    description: String,
) -> anyhow::Result<PullConsumer> {
    let stream = js
        .get_stream(inbox.stream())
        .await
        .with_context(|| format!("stream {}", inbox.stream()))?;
    let name = inbox.consumer_name(service, partition);
    let (filter_subject, description) = match partition {
        Some(p) => (
            inbox.partition_subject(service, p),
            format!("{description} (partition {p})"),
        ),
        None => (inbox.subject(service), description),
    };
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(description),
            filter_subject,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: max_ack_pending as i64,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create consumer {name} on {}", inbox.stream()))
}

/// What routing needs of the sidecar.
pub struct Router {
    pub service: String,
    /// The bindings as configured (subjects with `{partition}` where partitioned).
    pub bindings: Vec<BindingConfig>,
    /// This instance's partition index.
    pub partition: u32,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub epoch: ack::Epoch,
    pub shutdown: CancellationToken,
    /// The retry consumer's ack wait.
    pub ack_wait: Duration,
    pub dispatchers: Arc<Dispatchers>,
}

/// Pulls retries (from the shared consumer or this instance's partition's) and routes each until
/// shutdown.
pub async fn route(router: Arc<Router>, consumer: PullConsumer) {
    pull_and_route(router, consumer, Inbox::Retry).await
}

/// Pulls commands (from the shared consumer or this instance's partition's) and routes each until
/// shutdown.
pub async fn route_control(router: Arc<Router>, consumer: PullConsumer) {
    pull_and_route(router, consumer, Inbox::Control).await
}

async fn pull_and_route(router: Arc<Router>, consumer: PullConsumer, inbox: Inbox) {
    loop {
        if !router.dispatchers.any_open(&router.shutdown).await {
            return;
        }
        let Some(mut messages) = crate::nats::pull(&consumer, 64, &router.shutdown).await else {
            return;
        };
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = router.shutdown.cancelled() => return,
            };
            match next {
                Some(Ok(msg)) => match inbox {
                    Inbox::Retry => route_retry(&router, msg).await,
                    Inbox::Control => route_command(&router, msg).await,
                },
                Some(Err(error)) if crate::nats::pull_went_silent(&error) => {
                    tracing::warn!(%error, ?inbox, "Pull of retries or commands went silent; pulling anew.");
                    break;
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, ?inbox, "Pull of retries or commands failed; continuing.")
                }
                None => break,
            }
        }
    }
}

/// Sends a retry to its binding's dispatcher, forwards it to its partition's instance, or parks it.
async fn route_retry(router: &Router, msg: Message) {
    let Some(i) = binding_of(&router.bindings, &msg) else {
        let detail = "no valid Mend-Id, or no binding consumes its stream";
        park_unroutable(router, msg, detail).await;
        return;
    };
    let b = &router.bindings[i];
    if b.is_partitioned() {
        let original = msg
            .headers
            .as_ref()
            .and_then(|m| m.get(h::MEND_ORIGINAL_SUBJECT))
            .map(|v| v.as_str().to_owned());
        match original.as_deref().and_then(|s| b.partition_of(s)) {
            Some(k) if k != router.partition => {
                forward(router, msg, Inbox::Retry, k).await;
                return;
            }
            Some(_) => {}
            None => {
                let detail = format!(
                    "its Mend-Original-Subject ({}) is in no partition of binding {}",
                    original.as_deref().unwrap_or("missing"),
                    b.name
                );
                park_unroutable(router, msg, &detail).await;
                return;
            }
        }
    }
    dispatch(router, i, Inbound::Retry(msg)).await;
}

/// Sends a command to its binding's dispatcher, forwards it to its partition's instance, or refuses
/// it.
async fn route_command(router: &Router, msg: Message) {
    let parsed = match parse_control(&router.bindings, &msg) {
        Ok(parsed) => parsed,
        Err(reason) => return refuse_control(router, msg, &reason).await,
    };
    let b = &router.bindings[parsed.binding];
    if b.is_partitioned() {
        match partition_of_command(router, b, &parsed).await {
            Ok(k) if k != router.partition => return forward(router, msg, Inbox::Control, k).await,
            Ok(_) => {}
            Err(Unknown::Refuse(reason)) => return refuse_control(router, msg, &reason).await,
            Err(Unknown::NotNow(error)) => {
                tracing::warn!(
                    error,
                    "Partition of a command unknown for now; it comes back."
                );
                return later(router, msg, LOOKUP_RETRY_DELAY).await;
            }
        }
    }
    let cm = &parsed.cm;
    tracing::info!(
        action = ?cm.action,
        key = cm.key,
        id = cm.id,
        by = cm.by,
        note = cm.note,
        "Command from the dashboard."
    );
    let inbound = Inbound::Control {
        msg,
        key: Some(parsed.key),
        command: parsed.command,
    };
    dispatch(router, parsed.binding, inbound).await;
}

/// Why a command's partition is not known.
enum Unknown {
    /// It cannot be known: refuse the command.
    Refuse(String),
    /// The app stream could not be read now.
    NotNow(String),
}

/// The partition a command of partitioned binding `b` belongs to: that of the subject of the
/// message it is about (given in the command, or read from the app stream by its `id`).
async fn partition_of_command(
    router: &Router,
    b: &BindingConfig,
    parsed: &Parsed,
) -> Result<u32, Unknown> {
    if let Some(p) = parsed.cm.partition {
        if p < b.partitions {
            return Ok(p);
        }
        return Err(Unknown::Refuse(format!(
            "binding {} has {} partitions, not a partition {p}",
            b.name, b.partitions
        )));
    }
    let subject = match (&parsed.cm.subject, &parsed.lineage) {
        (Some(subject), _) => subject.clone(),
        (None, Some(lineage)) => original_subject(&router.js, lineage).await?,
        (None, None) => {
            return Err(Unknown::Refuse(format!(
                "binding {} is partitioned: a command needs the `id` of a message to find the \
                 partition that owns key `{}`",
                b.name, parsed.cm.key
            )));
        }
    };
    b.partition_of(&subject).ok_or_else(|| {
        Unknown::Refuse(format!(
            "the subject {subject} of the command's message is in no partition of binding {}",
            b.name
        ))
    })
}

/// The subject of `lineage`'s original message, read from the app stream.
async fn original_subject(js: &jetstream::Context, lineage: &LineageId) -> Result<String, Unknown> {
    let gone = |why: &str| {
        Unknown::Refuse(format!(
            "cannot tell which partition owns message {lineage}: {why}"
        ))
    };
    let stream = js
        .get_stream_no_info(&lineage.stream)
        .await
        .map_err(|e| gone(&format!("{e}")))?;
    match stream.get_raw_message(lineage.seq).await {
        Ok(message) => Ok(message.subject.to_string()),
        Err(e) => match e.kind() {
            RawMessageErrorKind::NoMessageFound => Err(gone(&format!(
                "it is gone from stream {} (limits or work-queue retention removed it)",
                lineage.stream
            ))),
            RawMessageErrorKind::JetStream(js_error)
                if js_error.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Err(gone(&format!("stream {} does not exist", lineage.stream)))
            }
            RawMessageErrorKind::InvalidSubject => Err(gone(&format!("{e}"))),
            _ => Err(Unknown::NotNow(format!(
                "cannot read message {lineage} from stream {}: {e}",
                lineage.stream
            ))),
        },
    }
}

/// Hands a routed message to binding `i`'s dispatcher; while this instance does not consume the
/// binding, hands it back for another instance.
async fn dispatch(router: &Router, i: usize, inbound: Inbound) {
    let inbound = match router.dispatchers.sender(i) {
        Some(to) => match to.send(inbound).await {
            Ok(()) => return,
            // The dispatcher stopped meanwhile.
            Err(mpsc::error::SendError(inbound)) => inbound,
        },
        None => inbound,
    };
    tracing::debug!(
        binding = router.bindings[i].name,
        "This instance does not consume the binding now; handing the message back."
    );
    later(router, inbound.into_message(), NOT_HERE_DELAY).await;
}

/// The reply subject of a message the router handles itself (not a JetStream message: none).
fn reply_of(router: &Router, msg: &Message) -> Option<ack::Reply> {
    let subject = msg.reply.clone()?;
    Some(ack::Reply::new(subject, router.epoch.current()))
}

/// Hands a message back to be redelivered after `delay` (to whichever instance pulls first).
async fn later(router: &Router, msg: Message, delay: Duration) {
    if let Some(reply) = reply_of(router, &msg) {
        ack::hand_back_after(&router.client, &reply, delay).await;
    }
}

/// Publishes a retry or command to partition `k`'s own subject (with its headers and payload, and
/// the `Nats-Msg-Id` of the message plus `:fwd`), then acks it.
async fn forward(router: &Router, msg: Message, inbox: Inbox, k: u32) {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let own_id = msg
        .headers
        .as_ref()
        .and_then(|m| m.get(h::NATS_MSG_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| format!("{}:{seq}", inbox.stream()));
    if own_id.matches(FORWARD_SUFFIX).count() >= MAX_FORWARDS {
        let why = format!(
            "forwarded between partitions {MAX_FORWARDS} times: do all instances agree on the \
             binding's partitions?"
        );
        match inbox {
            Inbox::Retry => park_unroutable(router, msg, &why).await,
            Inbox::Control => refuse_control(router, msg, &why).await,
        }
        return;
    }
    let msg_id = format!("{own_id}{FORWARD_SUFFIX}");
    let subject = inbox.partition_subject(&router.service, k);
    // The publish expectations of the original were met when it was stored; its Nats-Msg-Id is
    // replaced by the forward's.
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in msg.headers.iter().flat_map(|m| m.iter()) {
        let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        if lower.starts_with("nats-expected") {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    let Some(reply) = reply_of(router, &msg) else {
        return;
    };
    match publish::durably(
        &router.js,
        &router.shutdown,
        &subject,
        &msg_id,
        headers,
        msg.payload.clone(),
    )
    .await
    {
        Ok(Published::Stored { .. }) => {
            tracing::info!(
                ?inbox,
                seq,
                partition = k,
                to = subject,
                "Forwarded to the instance of the partition that owns it."
            );
            ack::confirm(&router.client, &reply, &router.epoch, router.ack_wait).await;
        }
        Ok(Published::TooLarge) => {
            // It was stored once, so only a server whose max_payload shrank gets here.
            tracing::error!(
                ?inbox,
                seq,
                to = subject,
                "Too large to forward; it stays unacked."
            );
        }
        Err(_) => ack::hand_back(&router.client, &reply).await,
    }
}

/// The binding, key, lineage and command of a control message.
fn parse_control(bindings: &[BindingConfig], msg: &Message) -> Result<Parsed, String> {
    let cm: ControlMessage =
        serde_json::from_slice(&msg.payload).map_err(|e| format!("not a command ({e})"))?;
    let lineage = match &cm.id {
        Some(id) => Some(
            id.parse::<LineageId>()
                .map_err(|e| format!("`id` is not a message id: {e}"))?,
        ),
        None => None,
    };
    let keyed = || bindings.iter().enumerate().filter(|(_, b)| b.key.is_some());
    let i = match (&cm.binding, &lineage) {
        (Some(name), _) => bindings
            .iter()
            .position(|b| &b.name == name)
            .ok_or_else(|| format!("no binding `{name}` in this sidecar"))?,
        (None, Some(l)) => keyed()
            .find(|(_, b)| b.stream == l.stream)
            .map(|(i, _)| i)
            .ok_or_else(|| format!("no binding with a key reads stream {}", l.stream))?,
        (None, None) => {
            let mut candidates = keyed();
            match (candidates.next(), candidates.next()) {
                (Some((i, _)), None) => i,
                _ => return Err("neither `binding` nor `id` says which binding".into()),
            }
        }
    };
    let command = match (cm.action, &lineage) {
        (ControlAction::Discard, Some(l)) => repair_rules::holds::Command::Discard {
            lineage: l.to_string(),
        },
        (ControlAction::Discard, None) => return Err("a discard needs the message's `id`".into()),
        (ControlAction::Release, _) => repair_rules::holds::Command::Release,
    };
    if cm.key.is_empty() {
        return Err("`key` is empty".into());
    }
    if let Some(s) = &cm.subject
        && !repair_rules::rules::subject::is_valid_filter(s)
    {
        return Err(format!("`subject` {s:?} is not a subject"));
    }
    Ok(Parsed {
        binding: i,
        key: MessageKey(cm.key.clone()),
        lineage,
        command,
        cm,
    })
}

/// Terminates a malformed command: redelivering it would not make it one.
async fn refuse_control(router: &Router, msg: Message, reason: &str) {
    metrics::counter!(crate::telemetry::CONTROL_REFUSED, "service" => router.service.clone())
        .increment(1);
    tracing::error!(reason, payload = %String::from_utf8_lossy(&msg.payload), "Command refused.");
    if let Some(reply) = reply_of(router, &msg) {
        ack::terminate(&router.client, &reply).await;
    }
}

/// The binding whose stream the retry's lineage is from (and whose subjects match its original
/// subject, on any partition, when several bindings read that stream).
fn binding_of(bindings: &[BindingConfig], msg: &Message) -> Option<usize> {
    let headers = msg.headers.as_ref()?;
    let lineage: LineageId = headers.get(h::MEND_ID)?.as_str().parse().ok()?;
    let original = headers.get(h::MEND_ORIGINAL_SUBJECT).map(|v| v.as_str());
    let same_stream = || {
        bindings
            .iter()
            .enumerate()
            .filter(|(_, b)| b.stream == lineage.stream)
    };
    same_stream()
        .find(|(_, b)| original.is_some_and(|s| b.consumes(s)))
        .or_else(|| same_stream().next())
        .map(|(i, _)| i)
}

/// Takes a routed retry or command into its key's lane (the dispatcher calls this).
pub(crate) fn admit(
    rt: &BindingRuntime,
    inbound: Inbound,
    lanes: &mut Lanes<Work>,
    held: &mut HashMap<HeldId, Held>,
) {
    let (msg, inlet) = match &inbound {
        Inbound::Retry(msg) => (msg, Inlet::Retry),
        Inbound::Control { msg, .. } => (msg, Inlet::Control),
    };
    let Ok(info) = msg.info() else {
        tracing::error!(subject = %msg.subject, "Not a JetStream message; ignored.");
        return;
    };
    let id = HeldId {
        inlet,
        seq: info.stream_sequence,
    };
    let Some(subject) = msg.reply.clone() else {
        return;
    };
    let Some(reply) = consume::hold(rt, held, id, subject) else {
        return;
    };
    match inbound {
        Inbound::Retry(msg) => {
            let fallback = LineageId::new(rt.cfg.stream.clone(), 0);
            let (meta, history) = meta_from(
                rt,
                msg.headers.as_ref(),
                &msg.payload,
                msg.subject.as_str(),
                2,
                fallback,
            );
            let key = meta.key.clone();
            let d = Delivery {
                payload: msg.message.payload,
                headers: msg.message.headers,
                meta,
                history,
                source: Source::Consumer { id, reply },
                unreadable: None,
                payload_object: None,
            };
            // A retry may be its held key's head: it goes before the key's newer messages (which
            // would only be held behind it) and ahead of other keys' turns.
            match key {
                Some(key) => lanes.push_urgent(key, Work::Message(d)),
                None => lanes.push(None, Work::Message(d)),
            }
        }
        Inbound::Control { key, command, .. } => {
            lanes.push(key, Work::Command { command, id, reply });
        }
    }
}

/// The key a `Mend-Key-Token` stands for: a held key's (its hold entry has the key), else the key
/// the binding reads from the message itself, if its token is the one given.
fn key_of_token(
    rt: &BindingRuntime,
    token: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Option<MessageKey> {
    if let Some(key) = rt
        .holds
        .as_ref()
        .and_then(|holds| holds.key_of_token(token))
    {
        return Some(key);
    }
    let source = rt.cfg.key.as_ref()?;
    let key = consume::key_of(source, headers, payload).ok()??;
    if key.token() == token {
        Some(key)
    } else {
        tracing::warn!(
            token,
            "Mend-Key-Token names no key known here; delivered without order."
        );
        None
    }
}

/// The delivery metadata and history of a message that carries its lineage in mend's headers (a
/// routed retry, or a message of a hold queue); `min_attempt` is 2 for retries, 1 for held messages.
pub(crate) fn meta_from(
    rt: &BindingRuntime,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    subject: &str,
    min_attempt: u32,
    fallback: LineageId,
) -> (DeliveryMeta, Vec<HistoryEntry>) {
    let header = |name: &str| {
        headers
            .and_then(|m| m.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let lineage = header(h::MEND_ID)
        .and_then(|id| id.parse().ok())
        .unwrap_or(fallback);
    let attempt = header(h::MEND_ATTEMPT)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(min_attempt)
        .max(min_attempt);
    let history = match header(MEND_HISTORY).map(|h| serde_json::from_str::<Vec<HistoryEntry>>(&h))
    {
        Some(Ok(mut history)) => {
            // Whoever sent it, a history only travels on bounded.
            repair_rules::envelope::bound_history(
                &mut history,
                repair_rules::envelope::HISTORY_LIMIT,
            );
            history
        }
        Some(Err(error)) => {
            tracing::warn!(%error, %lineage, "Mend-History is not a history; starting a new one.");
            Vec::new()
        }
        None => Vec::new(),
    };
    let meta = DeliveryMeta {
        service: rt.service.clone(),
        lineage,
        key: header(h::MEND_KEY)
            .map(|k| MessageKey(h::decode_value(&k)))
            .or_else(|| key_of_token(rt, &header(h::MEND_KEY_TOKEN)?, headers, payload)),
        attempt,
        subject: header(h::MEND_ORIGINAL_SUBJECT).unwrap_or_else(|| subject.to_owned()),
        published: SystemTime::now(),
        repaired_by: header(h::MEND_REPAIRED_BY),
        resubmitted_by: header(h::MEND_RESUBMITTED_BY),
    };
    (meta, history)
}

/// Parks a retry no binding can take (`detail` says why), then acks it.
async fn park_unroutable(router: &Router, msg: Message, detail: &str) {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let id = msg
        .headers
        .as_ref()
        .and_then(|m| m.get(h::MEND_ID))
        .map(|v| v.as_str().to_owned());
    tracing::error!(
        seq,
        mend_id = id.as_deref(),
        detail,
        "A retry no binding consumes; parking it."
    );
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|m| m.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let named = id.as_deref().and_then(|i| i.parse::<LineageId>().ok());
    let is_retry = named.is_some();
    // A retry of a lineage keeps its attempt (at least 2: the original was delivery 1) and its
    // history, so the dashboard takes it as the lineage's next parking, not a copy of the first.
    let (attempt, mut history) = match &named {
        Some(_) => (
            header(h::MEND_ATTEMPT)
                .and_then(|a| a.parse::<u32>().ok())
                .unwrap_or(2)
                .max(2),
            header(MEND_HISTORY)
                .and_then(|h| serde_json::from_str::<Vec<HistoryEntry>>(&h).ok())
                .unwrap_or_default(),
        ),
        None => (1, Vec::new()),
    };
    let lineage = named.unwrap_or_else(|| LineageId::new("MEND_RETRY", seq));
    let (payload, payload_base64) = match serde_json::from_slice(&msg.payload) {
        Ok(v) => (v, None),
        Err(_) => (
            serde_json::Value::Null,
            Some(base64::engine::general_purpose::STANDARD.encode(&msg.payload)),
        ),
    };
    let mut error = FailureError::bare(ErrorKind::Message, None);
    error.title = Some("retry could not be routed".into());
    error.detail = Some(detail.to_owned());
    let at = publish::now();
    let headers = msg
        .headers
        .as_ref()
        .map(|m| {
            m.iter()
                // A retry's mend headers are its lineage, which the envelope has as fields.
                .filter(|(k, _)| {
                    let lower = k.to_string().to_ascii_lowercase();
                    !(is_retry && (lower.starts_with("mend-") || lower.starts_with("nats-")))
                })
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.iter().map(|x| x.as_str().to_owned()).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let first_failed_at = history
        .first()
        .map_or_else(|| at.clone(), |entry| entry.at.clone());
    history.push(HistoryEntry {
        at: at.clone(),
        what: "parked".into(),
        by: "sidecar".into(),
        error: None,
        note: None,
    });
    let envelope = FailureEnvelope {
        version: ENVELOPE_VERSION,
        id: lineage.to_string(),
        service: router.service.clone(),
        binding: String::new(),
        stream: lineage.stream.clone(),
        seq: lineage.seq,
        subject: header(h::MEND_ORIGINAL_SUBJECT).unwrap_or_else(|| msg.subject.to_string()),
        key: header(h::MEND_KEY).map(|k| h::decode_value(&k)),
        headers,
        payload,
        payload_base64,
        payload_ref: None,
        headers_base64: None,
        error,
        attempt,
        first_failed_at,
        failed_at: at,
        reason: Some("a retry that no binding of this sidecar can deliver".into()),
        history,
    };
    let msg_id = LineageId::new("MEND_RETRY", seq).msg_id(1, "parked");
    let mut out = async_nats::HeaderMap::new();
    out.insert("Content-Type", "application/json");
    out.insert(h::MEND_ID, envelope.id.as_str());
    let Some(reply) = reply_of(router, &msg) else {
        return;
    };
    match publish::durably(
        &router.js,
        &router.shutdown,
        &subjects::parked(&router.service),
        &msg_id,
        out,
        to_bytes(&envelope),
    )
    .await
    {
        Ok(Published::Stored { .. }) => {
            ack::confirm(&router.client, &reply, &router.epoch, router.ack_wait).await;
        }
        Ok(Published::TooLarge) | Err(_) => ack::hand_back(&router.client, &reply).await,
    }
}
