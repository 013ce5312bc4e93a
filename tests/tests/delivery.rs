//! Delivery to the app: every message once, per-key order, confirmed acks (SPEC §4, §7, §8).

use std::collections::HashMap;

use mend_e2e::world::{TEST_TIMEOUT, World, first_successes_in_order};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_over_100_keys_delivered_once_in_key_order() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.publish_keyed(10_000, 100).await?;
    let _sidecar = w.sidecar(&w.keyed_config("bulk", "")).await?;

    let log = w
        .app
        .wait_for("10k successful deliveries", TEST_TIMEOUT, |log| {
            log.iter().filter(|d| d.ok()).count() >= 10_000
        })
        .await?;
    w.drained("bulk").await?;

    let mut times: HashMap<u64, usize> = HashMap::new();
    for d in w.app.log().iter().filter(|d| d.ok()) {
        *times
            .entry(d.field("n").and_then(|v| v.as_u64()).unwrap())
            .or_default() += 1;
    }
    assert_eq!(times.len(), 10_000, "every message delivered");
    assert!(times.values().all(|&t| t == 1), "each exactly once");
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;

    let d = &log[0];
    assert_eq!(d.header("ce-specversion"), Some("1.0"));
    assert_eq!(d.header("mend-service"), Some("bulk"));
    assert_eq!(d.header("mend-attempt"), Some("1"));
    assert!(d.mend_id().starts_with("APP:"));
    assert_eq!(d.header("ce-id"), Some(d.mend_id()));
    assert_eq!(d.header("mend-key"), d.header("account-id"));
    assert_eq!(d.header("ce-subject"), d.header("account-id"));
    assert_eq!(d.header("ce-type"), Some("app.created"));
    assert_eq!(d.header("content-type"), Some("application/json"));
    Ok(())
}
