//! What every role does at start: connect to NATS and make sure mend's layout exists, and say
//! when it is ready.

use std::sync::Arc;

use async_nats::Client;
use async_nats::connection::State;
use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::RunError;
use crate::common::ack::Epoch;
use crate::common::config::NatsConfig;
use crate::common::nats::{self, ConnectError};
use crate::common::ops::ReadyCheck;

/// Connects as `name` and creates mend's layout; `None` when shutdown came first.
pub async fn connect(
    url: &str,
    cfg: &NatsConfig,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<(Client, jetstream::Context, Epoch)>, RunError> {
    match nats::start(url, cfg, name, shutdown).await {
        Ok(started) => Ok(Some(started)),
        Err(ConnectError::Stopped) => Ok(None),
        Err(e) => Err(RunError::Startup(e.into())),
    }
}

/// `/readyz` of a role: not while shutting down or while NATS is not connected, else as `more`
/// says.
pub fn readiness(
    client: &Client,
    shutdown: &CancellationToken,
    more: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) -> ReadyCheck {
    let (client, shutdown) = (client.clone(), shutdown.clone());
    Arc::new(move || {
        if shutdown.is_cancelled() {
            Err("shutting down".into())
        } else if client.connection_state() != State::Connected {
            Err("NATS is not connected".into())
        } else {
            more()
        }
    })
}
