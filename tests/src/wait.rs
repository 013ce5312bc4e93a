//! Waiting for a condition with a deadline: the condition is re-checked whenever something it
//! depends on changes (a `watch` tick), or on a short poll for state outside the test process.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;

/// Poll interval for conditions on state the test cannot be notified about (server-side counts).
const POLL: Duration = Duration::from_millis(50);

/// Re-checks `check` until it yields `Some`, failing with `what` after `limit`.
pub async fn until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("timed out after {limit:?} waiting for {what}; last error: {e:#}"),
                None => bail!("timed out after {limit:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
