//! The app stream's pull, on its own connection.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::consumer::pull::Stream as PullStream;
use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Messages asked for per pull request, at most.
pub(crate) const PULL_BATCH: usize = 256;
/// ... with bulk delivery, where thousands of messages may be in flight: fewer, larger pulls cost
/// the server less per message.
pub(crate) const BULK_PULL_BATCH: usize = 1024;

/// The app stream's own connection. A message whose header block the NATS client cannot parse
/// takes down the connection it arrives on (see [`crate::runtime::rescue`]): on this one, that costs only the
/// pull, never the acks, publishes and leases of the main connection. When the connection's task
/// died, a new connection replaces it.
pub struct Puller {
    pub(crate) connector: Arc<crate::common::nats::Connector>,
    pub(crate) stream: String,
    pub(crate) consumer: String,
    pub(crate) client: Option<Client>,
}

/// How long a connection may take to answer a flush before it counts as dead.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

impl Puller {
    pub fn new(
        connector: Arc<crate::common::nats::Connector>,
        stream: &str,
        consumer: &str,
    ) -> Self {
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
        let mut pause = crate::common::backoff::RETRY_MIN;
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
                        .heartbeat(crate::common::nats::PULL_HEARTBEAT)
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
            if crate::common::backoff::back_off(shutdown, &mut pause)
                .await
                .is_err()
            {
                return None;
            }
        }
    }
}

pub(crate) async fn next_message(
    messages: &mut Option<PullStream>,
) -> Option<Result<Message, async_nats::jetstream::consumer::pull::MessagesError>> {
    match messages {
        Some(m) => m.next().await,
        None => std::future::pending().await,
    }
}
