//! Waiting between tries of an operation that must succeed (a store, a connection, a start-up step):
//! exponential backoff that ends at shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Pause before the first retry; doubles up to [`RETRY_MAX`].
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest pause between two tries.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(5);

/// Shutdown came before the next try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// Waits `pause` before the next try, then doubles it (up to [`RETRY_MAX`]); `Stopped` when
/// shutdown comes first.
pub(crate) async fn back_off(
    shutdown: &CancellationToken,
    pause: &mut Duration,
) -> Result<(), Stopped> {
    tokio::select! {
        _ = tokio::time::sleep(*pause) => {}
        _ = shutdown.cancelled() => return Err(Stopped),
    }
    *pause = (*pause * 2).min(RETRY_MAX);
    Ok(())
}
