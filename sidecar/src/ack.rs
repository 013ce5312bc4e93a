//! Acknowledgements: the only module that talks to a message's reply subject.
//!
//! A confirmed ack is a request on the client's shared inbox (the server answers once the ack is
//! stored); it is retried briefly across a reconnect. When it cannot be confirmed the message will be
//! redelivered, which at-least-once delivery allows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use bytes::Bytes;
use tokio::time::Instant;

use crate::telemetry;

/// Longest wait for one confirmation.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between confirmation attempts.
const CONFIRM_PAUSE: Duration = Duration::from_millis(100);

/// The reply subject of a message's latest delivery. A redelivery (after a server restart, say)
/// replaces it: the server may no longer answer acks sent to an older delivery's subject.
#[derive(Debug, Clone)]
pub struct Reply(Arc<Mutex<Subject>>);

impl Reply {
    pub fn new(subject: Subject) -> Self {
        Self(Arc::new(Mutex::new(subject)))
    }

    /// The subject to ack on now.
    pub fn current(&self) -> Subject {
        match self.0.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A newer delivery of the same message arrived.
    pub fn redelivered(&self, subject: Subject) {
        match self.0.lock() {
            Ok(mut s) => *s = subject,
            Err(poisoned) => *poisoned.into_inner() = subject,
        }
    }
}

/// Acks and waits until the server has stored the ack, retrying (on the latest delivery's subject)
/// for up to `budget`; after that the message will be redelivered, which at-least-once allows.
pub async fn confirm(client: &Client, reply: &Reply, budget: Duration) -> bool {
    let give_up = Instant::now() + budget;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let request = client.request(reply.current(), Bytes::from(AckKind::Ack));
        match tokio::time::timeout(CONFIRM_TIMEOUT, request).await {
            Ok(Ok(_)) => return true,
            Ok(Err(error)) => tracing::debug!(%error, attempt, "Ack not confirmed; retrying."),
            Err(_) => tracing::debug!(attempt, "Ack confirmation timed out; retrying."),
        }
        if Instant::now() + CONFIRM_PAUSE >= give_up {
            break;
        }
        tokio::time::sleep(CONFIRM_PAUSE).await;
    }
    metrics::counter!(telemetry::ACK_UNCONFIRMED).increment(1);
    tracing::warn!(
        attempt,
        "Ack could not be confirmed; the message will be redelivered."
    );
    false
}

/// Tells the server the message is still being worked on (resets its ack wait).
pub async fn progress(client: &Client, reply: &Reply) {
    if let Err(error) = client
        .publish(reply.current(), Bytes::from(AckKind::Progress))
        .await
    {
        tracing::debug!(%error, "In-progress ack not sent.");
    }
}

/// Hands the message back for immediate redelivery (shutdown, not started).
pub async fn hand_back(client: &Client, reply: &Reply) {
    if let Err(error) = client
        .publish(reply.current(), Bytes::from(AckKind::Nak(None)))
        .await
    {
        tracing::debug!(%error, "Nak not sent; the message is redelivered after its ack wait.");
    }
}
