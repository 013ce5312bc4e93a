//! Where routed messages come from and go to: the inboxes of a service (retries, commands) and
//! their consumers, what the router hands a binding's dispatcher ([`Inbound`]), the dispatchers
//! open here ([`Dispatchers`]), and the [`Router`] they share.

use repair_rules::identity::streams;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::{self, Message};
use repair_rules::MessageKey;
use repair_rules::identity::{consumers, subjects};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::common::ack;
use crate::runtime::config::BindingConfig;

/// The durable consumer of a service's retries.
pub fn consumer_name(service: &str) -> String {
    consumers::retry(service)
}

/// The durable consumer of a service's commands from the dashboard.
pub fn control_consumer_name(service: &str) -> String {
    consumers::control(service)
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

    pub(crate) fn stream(self) -> &'static str {
        match self {
            Inbox::Retry => streams::RETRY,
            Inbox::Control => streams::CONTROL,
        }
    }
}

/// Where routed messages reach each binding's dispatcher (`bindings[i]` ↔ slot `i`): a slot is open
/// while this instance holds the binding's lease and its dispatcher runs.
pub struct Dispatchers {
    pub(crate) slots: Vec<Mutex<Option<mpsc::Sender<Inbound>>>>,
    pub(crate) open: watch::Sender<usize>,
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

    pub(crate) fn sender(&self, i: usize) -> Option<mpsc::Sender<Inbound>> {
        self.slot(i).clone()
    }

    pub(crate) fn slot(
        &self,
        i: usize,
    ) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<Inbound>>> {
        // A poisoned slot only means a panic elsewhere while swapping a sender: the value is whole.
        match self.slots[i].lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Waits until some binding's dispatcher runs here (`false`: shutdown came first). An instance
    /// that consumes nothing (a standby) does not pull retries or commands at all.
    pub(crate) async fn any_open(&self, shutdown: &CancellationToken) -> bool {
        let mut open = self.open.subscribe();
        tokio::select! {
            result = open.wait_for(|n| *n > 0) => result.is_ok(),
            _ = shutdown.cancelled() => false,
        }
    }
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

pub(crate) async fn bind_inbox(
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

/// The reply subject of a message the router handles itself (not a JetStream message: none).
pub(crate) fn reply_of(router: &Router, msg: &Message) -> Option<ack::Reply> {
    let subject = msg.reply.clone()?;
    Some(ack::Reply::new(subject, router.epoch.current()))
}
