//! Acknowledgements: the only module that talks to a message's reply subject.
//!
//! A confirmed ack is a request on the client's shared inbox (the server answers once the ack is
//! stored); it is retried briefly across a reconnect. When it cannot be confirmed the message will be
//! redelivered, which at-least-once delivery allows.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use bytes::Bytes;

use crate::telemetry;

/// How long one confirmation may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Confirmation attempts before giving up on one ack.
const CONFIRM_TRIES: u32 = 5;
/// Pause between confirmation attempts.
const CONFIRM_PAUSE: Duration = Duration::from_millis(200);

/// Acks and waits until the server has stored the ack.
pub async fn confirm(client: &Client, reply: &Subject) -> bool {
    for attempt in 1..=CONFIRM_TRIES {
        let request = client.request(reply.clone(), Bytes::from(AckKind::Ack));
        match tokio::time::timeout(CONFIRM_TIMEOUT, request).await {
            Ok(Ok(_)) => return true,
            Ok(Err(error)) => tracing::warn!(%error, attempt, "Ack not confirmed; retrying."),
            Err(_) => tracing::warn!(attempt, "Ack confirmation timed out; retrying."),
        }
        tokio::time::sleep(CONFIRM_PAUSE * attempt).await;
    }
    metrics::counter!(telemetry::ACK_UNCONFIRMED).increment(1);
    tracing::warn!("Ack could not be confirmed; the message will be redelivered.");
    false
}

/// Tells the server the message is still being worked on (resets its ack wait).
pub async fn progress(client: &Client, reply: &Subject) {
    if let Err(error) = client
        .publish(reply.clone(), Bytes::from(AckKind::Progress))
        .await
    {
        tracing::debug!(%error, "In-progress ack not sent.");
    }
}

/// Hands the message back for immediate redelivery (shutdown, not started).
pub async fn hand_back(client: &Client, reply: &Subject) {
    if let Err(error) = client
        .publish(reply.clone(), Bytes::from(AckKind::Nak(None)))
        .await
    {
        tracing::debug!(%error, "Nak not sent; the message is redelivered after its ack wait.");
    }
}
