//! How the sidecar handles the app's answers: message errors delegated with a complete envelope,
//! transient failures retried in place, an app that is down, timeouts, `Mend-Action` (SPEC §4, §5).

use anyhow::Context as _;
use std::time::Duration;

use mend_e2e::app::Reply;
use mend_e2e::js::{self, Out};
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT, World, first_successes_in_order};
use repair_rules::ErrorKind;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_errors_are_delegated_with_complete_envelopes() -> anyhow::Result<()> {
    let w = World::new().await?;
    let long_text = "x".repeat(6000);
    let text = long_text.clone();
    w.app.script(move |d| match d.n() {
        3 => Reply::Problem(
            422,
            json!({"type": "https://example.com/probs/bad-type", "title": "amount must be a number",
                   "status": 422, "detail": "amount was \"12.50\"", "code": "bad_type", "field": "/amount"}),
        ),
        7 => Reply::Text(500, text.clone()),
        _ => Reply::Ok,
    });
    let mut msgs: Vec<Out> = (0..200)
        .map(|i| {
            // Each failing message has a key of its own: a failure holds its key's later messages.
            let key = if i == 3 || i == 7 {
                format!("bad-{i}")
            } else {
                format!("k{}", i % 10)
            };
            Out::keyed(
                "app.created",
                KEY_HEADER,
                &key,
                json!({"key": key, "n": i, "amount": "12.50"}),
            )
        })
        .collect();
    msgs[3].headers.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    let seqs = js::publish_all(&w.js, msgs).await?;
    let _sidecar = w.sidecar(&w.keyed_config("errs", "")).await?;

    let log = w.app.wait_for_successes(198, TEST_TIMEOUT).await?;
    w.drained("errs").await?;
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;

    let mut failed = js::failed(&w.js, "errs").await?;
    failed.sort_by_key(|e| e.seq);
    assert_eq!(failed.len(), 2, "{failed:#?}");
    let p = &failed[0];
    assert_eq!(p.version, 1);
    assert_eq!(p.id, format!("APP:{}", seqs[3]));
    assert_eq!((p.stream.as_str(), p.seq), ("APP", seqs[3]));
    assert_eq!((p.service.as_str(), p.binding.as_str()), ("errs", "errs"));
    assert_eq!(p.subject, "app.created");
    assert_eq!(p.key.as_deref(), Some("bad-3"));
    assert_eq!(p.headers.get(KEY_HEADER), Some(&vec!["bad-3".to_string()]));
    assert!(p.headers.contains_key("traceparent"));
    assert_eq!(
        p.payload,
        json!({"key": "bad-3", "n": 3, "amount": "12.50"})
    );
    assert_eq!(p.payload_base64, None);
    assert_eq!(p.attempt, 1);
    let e = &p.error;
    assert_eq!(e.kind, ErrorKind::Message);
    assert_eq!(e.status, Some(422));
    assert_eq!(e.code.as_deref(), Some("bad_type"));
    assert_eq!(e.field.as_deref(), Some("/amount"));
    assert_eq!(e.title.as_deref(), Some("amount must be a number"));
    assert_eq!(e.detail.as_deref(), Some("amount was \"12.50\""));
    assert_eq!(
        e.type_uri.as_deref(),
        Some("https://example.com/probs/bad-type")
    );
    assert_eq!(e.body, None);
    assert!(!p.first_failed_at.is_empty() && p.failed_at == p.first_failed_at);
    assert_eq!(p.history.len(), 1);
    assert_eq!(
        (p.history[0].what.as_str(), p.history[0].by.as_str()),
        ("delegated", "sidecar")
    );

    let t = &failed[1];
    assert_eq!(t.seq, seqs[7]);
    assert_eq!(t.error.status, Some(500));
    assert_eq!(t.error.code, None);
    assert_eq!(t.error.body.as_deref(), Some(&long_text[..4096]));

    // A delegation is not announced on its own (its step travels in the history, with its attempt,
    // and is announced with the transition that ends or parks the lineage).
    assert_eq!(p.history[0].attempt, Some(1));
    assert!(js::events(&w.js, "errs", "delegated").await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_message_does_not_block_other_keys() -> anyhow::Result<()> {
    let w = World::new().await?;
    // The first message of key "slow" keeps the app busy (then fails); other keys go on meanwhile.
    w.app.script(|d| match d.n() {
        0 if d.seen_before == 0 => Reply::Slow(Duration::from_millis(1500)),
        0 => Reply::Status(422),
        _ => Reply::Ok,
    });
    let msgs = (0..50)
        .map(|i| {
            let key = if i == 0 {
                "slow".to_string()
            } else {
                format!("k{}", i % 5)
            };
            Out::keyed("app.created", KEY_HEADER, &key, json!({"key": key, "n": i}))
        })
        .collect();
    js::publish_all(&w.js, msgs).await?;
    let _sidecar = w
        .sidecar(&w.keyed_config(
            "resp",
            "timeout = \"1s\"\nack_wait = \"3s\"\ntransient_tries = 2",
        ))
        .await?;
    w.app.wait_for_successes(49, TEST_TIMEOUT).await?;
    let log = w
        .app
        .wait_for("key `slow` rejected", TEST_TIMEOUT, |log| {
            log.iter().any(|d| d.status == 422)
        })
        .await?;
    let rejected = log.iter().find(|d| d.status == 422).unwrap().at;
    let last_ok = log.iter().filter(|d| d.ok()).map(|d| d.at).max().unwrap();
    assert!(
        last_ok < rejected,
        "every other key was delivered while key `slow` was stuck"
    );
    mend_e2e::wait::until("the delegation", TEST_TIMEOUT, || async {
        Ok((js::failed(&w.js, "resp").await?.len() == 1).then_some(()))
    })
    .await?;
    w.drained("resp").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_twice_then_ok_is_delivered_in_order_not_delegated() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| match (d.n(), d.seen_before) {
        (4, 0) => Reply::Status(503),
        (4, 1) => Reply::RetryAfter(503, 0),
        _ => Reply::Ok,
    });
    let msgs = (0..20)
        .map(|i| {
            Out::keyed(
                "app.created",
                KEY_HEADER,
                "one",
                json!({"key": "one", "n": i}),
            )
        })
        .collect();
    js::publish_all(&w.js, msgs).await?;
    let _sidecar = w
        .sidecar(&w.keyed_config("flaky", "backoff_initial = \"20ms\""))
        .await?;
    let log = w.app.wait_for_successes(20, TEST_TIMEOUT).await?;
    w.drained("flaky").await?;
    let statuses: Vec<(u64, u16)> = log.iter().map(|d| (d.n(), d.status)).collect();
    assert_eq!(&statuses[3..7], &[(3, 200), (4, 503), (4, 503), (4, 200)]);
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    assert!(
        js::failed(&w.js, "flaky").await?.is_empty(),
        "nothing delegated"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_is_transient() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| match (d.n(), d.seen_before) {
        (1, 0) => Reply::Slow(Duration::from_millis(1500)),
        _ => Reply::Ok,
    });
    let msgs = (0..3)
        .map(|i| Out::keyed("app.created", KEY_HEADER, "t", json!({"key": "t", "n": i})))
        .collect();
    js::publish_all(&w.js, msgs).await?;
    let _sidecar = w
        .sidecar(&w.keyed_config(
            "slow",
            "timeout = \"500ms\"\nack_wait = \"2s\"\nbackoff_initial = \"20ms\"",
        ))
        .await?;
    let log = w
        .app
        .wait_for("3 successes after a timeout", TEST_TIMEOUT, |log| {
            log.iter()
                .filter(|d| d.ok() && d.seen_before == 0 || d.n() == 1 && d.seen_before == 1)
                .count()
                >= 3
        })
        .await?;
    w.drained("slow").await?;
    assert!(
        js::failed(&w.js, "slow").await?.is_empty(),
        "a timeout is not delegated"
    );
    let retried = log
        .iter()
        .find(|d| d.n() == 1 && d.seen_before == 1)
        .unwrap();
    let third = log.iter().find(|d| d.n() == 2).unwrap();
    assert!(retried.at < third.at, "key order kept across the timeout");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_limit_turns_into_transient_exhausted() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| {
        if d.n() == 0 {
            Reply::Status(429)
        } else {
            Reply::Ok
        }
    });
    let msgs = (0..2)
        .map(|i| Out::keyed("app.created", KEY_HEADER, "x", json!({"key": "x", "n": i})))
        .collect();
    js::publish_all(&w.js, msgs).await?;
    let _sidecar = w
        .sidecar(&w.keyed_config("exh", "transient_tries = 3\nbackoff_initial = \"10ms\""))
        .await?;
    // Exhausted, message 0 is delegated and holds its key: message 1 waits behind it.
    mend_e2e::wait::until("message 1 held", TEST_TIMEOUT, || async {
        Ok((!js::events(&w.js, "exh", "held").await?.is_empty()).then_some(()))
    })
    .await?;
    w.drained("exh").await?;
    assert!(!w.app.log().iter().any(|d| d.n() == 1));
    let failed = js::failed(&w.js, "exh").await?;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].error.kind, ErrorKind::TransientExhausted);
    assert_eq!(failed[0].error.status, Some(429));
    assert_eq!(w.app.log().iter().filter(|d| d.n() == 0).count(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_down_for_ten_seconds_delegates_nothing() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    w.publish_keyed(300, 30).await?;
    w.app.down().await?;
    let config = w.keyed_config(
        "down",
        "transient_tries = 2\nbackoff_initial = \"50ms\"\nbackoff_max = \"500ms\"",
    );
    let sidecar = w.sidecar(&config).await?;
    let metrics_url = format!(
        "http://{}/metrics",
        config
            .lines()
            .find_map(|l| l.strip_prefix("listen = "))
            .unwrap()
            .trim_matches('"')
    );
    let went_down = tokio::time::Instant::now();
    mend_e2e::wait::until("the circuit to open", TEST_TIMEOUT, || async {
        let text = reqwest::get(&metrics_url).await?.text().await?;
        Ok(text
            .lines()
            .any(|l| l.starts_with("mend_circuit_open{") && l.ends_with(" 1"))
            .then_some(()))
    })
    .await
    .with_context(|| format!("sidecar log:\n{}", sidecar.log()))?;
    // The scenario itself: the app stays down for ten seconds.
    tokio::time::sleep_until(went_down + Duration::from_secs(10)).await;
    assert!(
        js::failed(&w.js, "down").await?.is_empty(),
        "nothing delegated while down"
    );
    w.app.up().await?;
    let log = w.app.wait_for_successes(300, TEST_TIMEOUT).await?;
    w.drained("down").await?;
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    assert!(
        js::failed(&w.js, "down").await?.is_empty(),
        "nothing delegated after"
    );
    assert!(
        sidecar.log().contains("pulling resumed"),
        "{}",
        sidecar.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mend_action_drop_and_park() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| match d.n() {
        1 => Reply::Action(200, "drop"),
        2 => Reply::Action(422, "park"),
        _ => Reply::Ok,
    });
    let seqs = w.publish_keyed(4, 1).await?;
    let _sidecar = w.sidecar(&w.keyed_config("act", "")).await?;
    // A drop finishes its message; a park holds the key: the last message waits behind it.
    let held = mend_e2e::wait::until("the last message held", TEST_TIMEOUT, || async {
        let held = js::events(&w.js, "act", "held").await?;
        Ok((!held.is_empty()).then_some(held))
    })
    .await?;
    w.drained("act").await?;
    assert_eq!(held.len(), 1, "{held:#?}");
    assert_eq!(held[0]["data"]["id"], format!("APP:{}", seqs[3]));
    assert_eq!(held[0]["data"]["head"], format!("APP:{}", seqs[2]));
    assert_eq!(held[0]["data"]["key"], "k0");
    assert!(
        !w.app.log().iter().any(|d| d.n() == 3),
        "held, not delivered"
    );
    assert!(
        js::failed(&w.js, "act").await?.is_empty(),
        "neither goes to the rules"
    );
    let dropped = js::events(&w.js, "act", "dropped").await?;
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0]["data"]["id"], format!("APP:{}", seqs[1]));
    let parked = js::parked(&w.js, "act").await?;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].seq, seqs[2]);
    assert!(parked[0].reason.as_deref().unwrap_or("").contains("park"));
    assert_eq!(parked[0].error.status, Some(422));
    assert_eq!(js::events(&w.js, "act", "parked").await?.len(), 1);
    Ok(())
}
