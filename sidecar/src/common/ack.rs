//! Acknowledgements: the only module that talks to a message's reply subject.
//!
//! A confirmed ack is a request on the client's shared inbox: the server answers once the ack is
//! stored. Two cases get a plain ack instead, because no answer will come: a delivery made before
//! the client reconnected (a restarted server applies such acks but does not confirm them), and a
//! request the server received without answering. Unconfirmed, a message may be redelivered, which
//! at-least-once delivery allows; it never holds its key's lane for longer than one timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use bytes::Bytes;
use tokio::time::Instant;

use crate::common::telemetry;

/// Longest wait for one confirmation. The server answers in well under a millisecond when it answers
/// at all; when it does not, waiting longer does not help.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts while the client cannot reach the server.
const CONFIRM_PAUSE: Duration = Duration::from_millis(100);

/// Counts the client's (re)connections.
#[derive(Debug, Clone, Default)]
pub struct Epoch(Arc<AtomicU64>);

impl Epoch {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// The client connected (again).
    pub fn connected(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// The reply subject of a message's latest delivery and the connection epoch it came on. A
/// redelivery replaces both: the server may no longer answer acks sent to an older delivery's subject.
#[derive(Debug, Clone)]
pub struct Reply(Arc<Mutex<(Subject, u64)>>);

impl Reply {
    pub fn new(subject: Subject, epoch: u64) -> Self {
        Self(Arc::new(Mutex::new((subject, epoch))))
    }

    /// The subject to ack on now, and the epoch of that delivery.
    pub fn current(&self) -> (Subject, u64) {
        match self.0.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A newer delivery of the same message arrived.
    pub fn redelivered(&self, subject: Subject, epoch: u64) {
        match self.0.lock() {
            Ok(mut s) => *s = (subject, epoch),
            Err(poisoned) => *poisoned.into_inner() = (subject, epoch),
        }
    }
}

/// Acks and waits until the server has stored the ack; while the client cannot reach the server it
/// retries for up to `budget`. Returns whether the ack was confirmed.
pub async fn confirm(client: &Client, reply: &Reply, epoch: &Epoch, budget: Duration) -> bool {
    let give_up = Instant::now() + budget;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let (subject, delivered_on) = reply.current();
        if delivered_on != epoch.current() {
            tracing::debug!("Delivered before a reconnect: plain ack.");
            return Box::pin(plain(client, subject)).await;
        }
        // One timer per ack: ours bounds the whole request (handing it to the connection too), so
        // the client's own request timeout is switched off.
        let request = async_nats::Request::new()
            .payload(Bytes::from(AckKind::Ack))
            .timeout(None);
        let request = Box::pin(client.send_request(subject.clone(), request));
        match tokio::time::timeout(CONFIRM_TIMEOUT, request).await {
            Ok(Ok(_)) => return true,
            Ok(Err(error)) => tracing::debug!(%error, attempt, "Ack not confirmed; retrying."),
            Err(_) => {
                tracing::warn!("Ack confirmation not answered; acked without waiting.");
                return Box::pin(plain(client, subject)).await;
            }
        }
        if Instant::now() + CONFIRM_PAUSE >= give_up {
            break;
        }
        tokio::time::sleep(CONFIRM_PAUSE).await;
    }
    metrics::counter!(telemetry::ACK_UNCONFIRMED).increment(1);
    tracing::warn!(
        attempt,
        "Ack could not be sent; the message will be redelivered."
    );
    false
}

async fn plain(client: &Client, subject: Subject) -> bool {
    metrics::counter!(telemetry::ACK_UNCONFIRMED).increment(1);
    if let Err(error) = client.publish(subject, Bytes::from(AckKind::Ack)).await {
        tracing::warn!(%error, "Ack not sent; the message will be redelivered.");
    }
    false
}

/// Acks without waiting for the server to store the ack: for work whose effects are idempotent (its
/// publishes carry a `Nats-Msg-Id`), a lost ack only costs a redelivery whose publishes are dropped as
/// duplicates.
pub async fn unconfirmed(client: &Client, reply: &Reply) {
    let not_sent = "Ack not sent; the message will be redelivered.";
    send(client, reply.current().0, AckKind::Ack, not_sent).await;
}

/// Tells the server the message is still being worked on (resets its ack wait).
pub async fn progress(client: &Client, reply: &Reply) {
    let not_sent = "In-progress ack not sent.";
    send(client, reply.current().0, AckKind::Progress, not_sent).await;
}

/// Hands the message back for immediate redelivery (shutdown, not started).
pub async fn hand_back(client: &Client, reply: &Reply) {
    let not_sent = "Nak not sent; the message is redelivered after its ack wait.";
    send(client, reply.current().0, AckKind::Nak(None), not_sent).await;
}

/// Hands the message back for redelivery after `delay` (to whichever instance pulls it first).
pub async fn hand_back_after(client: &Client, reply: &Reply, delay: Duration) {
    let not_sent = "Nak not sent; the message is redelivered after its ack wait.";
    send(
        client,
        reply.current().0,
        AckKind::Nak(Some(delay)),
        not_sent,
    )
    .await;
}

/// Tells the server never to redeliver the message (it can never be processed).
pub async fn terminate(client: &Client, reply: &Reply) {
    let not_sent = "Term not sent; the message comes back after its ack wait.";
    send(client, reply.current().0, AckKind::Term, not_sent).await;
}

/// Sends `kind` on a reply subject without waiting for an answer; a failure is only logged, since
/// the server redelivers an unanswered message anyway.
async fn send(client: &Client, subject: Subject, kind: AckKind, not_sent: &'static str) {
    if let Err(error) = client.publish(subject, Bytes::from(kind)).await {
        tracing::debug!(%error, "{not_sent}");
    }
}
