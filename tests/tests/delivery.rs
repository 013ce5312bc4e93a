//! Delivery to the app: every message once, per-key order, confirmed acks (SPEC §4, §7, §8).

use std::collections::HashMap;
use std::time::Duration;

use mend_e2e::app::Reply;
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{metric, sidecar_config};
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT, World, first_successes_in_order};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_over_100_keys_delivered_once_in_key_order() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.publish_keyed(10_000, 100).await?;
    let _sidecar = w.sidecar(&w.keyed_config("bulk", "")).await?;

    let log = w.app.wait_for_successes(10_000, TEST_TIMEOUT).await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_in_flight_per_key_and_up_to_concurrency_without_a_key() -> anyhow::Result<()> {
    // Keyed, one key: never two at once, whatever the concurrency.
    let w = World::new().await?;
    w.app.script(|_| Reply::Slow(Duration::from_millis(50)));
    w.publish_keyed(12, 1).await?;
    let _s = w.sidecar(&w.keyed_config("one", "concurrency = 8")).await?;
    w.app
        .wait_for("12 deliveries", TEST_TIMEOUT, |log| log.len() >= 12)
        .await?;
    assert_eq!(w.app.max_in_flight(), 1);

    // No key: up to `concurrency` at once, never more.
    let w = World::new().await?;
    w.app.script(|_| Reply::Slow(Duration::from_millis(300)));
    w.publish_keyed(24, 24).await?;
    let config = sidecar_config(
        "free",
        &w.nats.url(),
        "APP",
        &["app.>"],
        &w.app.endpoint(),
        "concurrency = 8",
    );
    let _s = w.sidecar(&config).await?;
    let log = w
        .app
        .wait_for("24 deliveries", TEST_TIMEOUT, |log| log.len() >= 24)
        .await?;
    assert_eq!(w.app.max_in_flight(), 8);
    assert!(log.iter().all(|d| d.header("mend-key").is_none()));
    w.drained("free").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_filter_subjects() -> anyhow::Result<()> {
    let w = World::new().await?;
    let msgs = ["app.a", "app.b", "app.c", "app.a.deeper"]
        .iter()
        .enumerate()
        .map(|(i, s)| Out::keyed(s, KEY_HEADER, "k", json!({"key": "k", "n": i})))
        .collect();
    js::publish_all(&w.js, msgs).await?;
    let config = sidecar_config(
        "subj",
        &w.nats.url(),
        "APP",
        &["app.a", "app.b"],
        &w.app.endpoint(),
        "",
    );
    let _s = w.sidecar(&config).await?;
    w.drained("subj").await?;
    let mut subjects: Vec<String> = w
        .app
        .log()
        .iter()
        .filter_map(|d| d.header("ce-type").map(String::from))
        .collect();
    subjects.sort(); // no key: the two run concurrently, in either order
    assert_eq!(subjects, ["app.a", "app.b"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_messages_are_kept_alive_past_the_ack_wait() -> anyhow::Result<()> {
    let w = World::new().await?;
    // The first message of the key answers 503 (Retry-After: 1s) four times: about 4 s in retry,
    // twice the ack wait, with the key's later messages queued behind it.
    w.app.script(
        |d| match (d.field("n").and_then(|v| v.as_u64()), d.seen_before) {
            (Some(0), 0..=3) => Reply::RetryAfter(503, 1),
            _ => Reply::Ok,
        },
    );
    w.publish_keyed(3, 1).await?;
    let config = w.keyed_config("alive", "ack_wait = \"2s\"\ntimeout = \"500ms\"");
    let _s = w.sidecar(&config).await?;
    let log = w.app.wait_for_successes(3, TEST_TIMEOUT).await?;
    w.drained("alive").await?;
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    // The server redelivered nothing the sidecar was holding (it counts every such redelivery).
    let redelivered = metric(&config, "alive", "mend_redelivered_while_buffered_total").await?;
    assert_eq!(
        redelivered,
        Some(0.0),
        "in-progress acks keep waiting messages alive"
    );
    assert!(js::failed(&w.js, "alive").await?.is_empty());
    Ok(())
}
