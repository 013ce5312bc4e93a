//! Bulk delivery (SPEC §4 "Bulk delivery"): many messages per app call as a CloudEvents JSON batch,
//! at most one per key, with one status per entry; everything else as in single delivery.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mend_e2e::app::{BatchReply, Delivery, Reply, order_problem};
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{example_rules, metric, sidecar_config, with_top_level};
use mend_e2e::wait;
use mend_e2e::world::{KEY_HEADER, STREAM, TEST_TIMEOUT, World, first_successes_in_order};
use serde_json::{Value, json};

/// A keyed sidecar of service `svc` delivering to the app's batch endpoint, with `extra` binding
/// keys (among them its `batch`).
fn batch_config(w: &World, svc: &str, extra: &str) -> String {
    sidecar_config(
        svc,
        &w.nats.url(),
        STREAM,
        &["app.>"],
        &w.app.batch_endpoint(),
        &format!("key = {{ header = \"{KEY_HEADER}\" }}\n{extra}"),
    )
}

/// How often each `n` succeeded.
fn successes(log: &[Delivery]) -> HashMap<u64, usize> {
    let mut times = HashMap::new();
    for d in log.iter().filter(|d| d.ok()) {
        *times.entry(d.n()).or_default() += 1;
    }
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_over_100_keys_in_batches_once_and_in_key_order() -> anyhow::Result<()>
{
    let w = World::new().await?;
    w.publish_keyed(10_000, 100).await?;
    let config = batch_config(
        &w,
        "bulk",
        "concurrency = 4\nbatch = { max_messages = 100, max_wait = \"5ms\" }",
    );
    let _sidecar = w.sidecar(&config).await?;
    let log = w.app.wait_for_successes(10_000, TEST_TIMEOUT).await?;
    w.drained("bulk").await?;

    let times = successes(&w.app.log());
    assert_eq!(times.len(), 10_000, "every message delivered");
    assert!(times.values().all(|&t| t == 1), "each exactly once");
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;

    // Batches, never two messages of one key in one, never more than max_messages.
    let (batches, largest) = w.app.batches();
    assert!(largest > 1 && largest <= 100, "largest batch {largest}");
    assert!(batches < 10_000, "{batches} batches for 10k messages");
    let mut keys_per_batch: HashMap<usize, HashSet<String>> = HashMap::new();
    for d in &log {
        let (number, _) = d.batch.as_ref().expect("every delivery came in a batch");
        let key = d.header("mend-key").unwrap_or_default().to_owned();
        assert!(
            keys_per_batch
                .entry(*number)
                .or_default()
                .insert(key.clone()),
            "batch {number} held key {key} twice"
        );
    }
    // The entry is a structured-mode CloudEvent.
    let (_, entry) = log[0].batch.as_ref().unwrap();
    assert_eq!(entry["specversion"], "1.0");
    assert!(entry["id"].as_str().unwrap().starts_with("APP:"));
    assert_eq!(entry["source"], "urn:mend:bulk:APP");
    assert_eq!(entry["type"], "app.created");
    assert_eq!(entry["subject"], entry["data"]["key"]);
    assert_eq!(entry["mendattempt"], 1);
    assert_eq!(entry["mendservice"], "bulk");
    assert_eq!(entry["datacontenttype"], "application/json");
    assert!(entry["time"].as_str().unwrap().ends_with('Z'));
    assert!(entry.get("data_base64").is_none());

    // Per-entry metrics as for single delivery, plus the batches' size and latency.
    assert_eq!(
        metric(&config, "bulk", "mend_delivered_total").await?,
        Some(10_000.0)
    );
    assert_eq!(
        metric(&config, "bulk", "mend_batch_size_sum").await?,
        Some(10_000.0)
    );
    assert_eq!(
        metric(&config, "bulk", "mend_batch_latency_seconds_count").await?,
        Some(batches as f64)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_statuses_in_one_answer_each_end_as_the_contract_says() -> anyhow::Result<()> {
    let w = World::new().await?;
    let retried = Arc::new(AtomicBool::new(false));
    let retried_once = retried.clone();
    w.app.script(move |d| match d.n() {
        1 if !retried_once.swap(true, Ordering::SeqCst) => Reply::Status(503),
        2 => Reply::Action(200, "drop"),
        _ => order_problem(d).unwrap_or(Reply::Ok),
    });
    let order = |n: u64, key: &str, amount: Value| {
        Out::keyed(
            "app.created",
            KEY_HEADER,
            key,
            json!({"key": key, "n": n, "amount": amount, "currency": "EUR"}),
        )
    };
    let mut traced = order(5, "ke", json!(5));
    traced.headers.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    js::publish_all(
        &w.js,
        vec![
            order(0, "ka", json!(1)),
            order(1, "kb", json!(2)),
            order(2, "kc", json!(3)),
            // Fails with a problem (bad_type on /amount); the example rules repair it.
            order(3, "kd", json!("12.5")),
            // Waits behind its key's head.
            order(4, "kd", json!(4)),
            traced,
        ],
    )
    .await?;
    // Service `orders`: the example rules' filter. A long max_wait: the first five keys' messages travel together.
    let config = batch_config(
        &w,
        "orders",
        "backoff_initial = \"10ms\"\nbatch = { max_messages = 10, max_wait = \"300ms\" }",
    );
    let s = w.sidecar(&config).await?;
    // FAIL with a problem: delegated with the problem's members (the processor starts after).
    let failed = wait::until("the failed entry delegated", TEST_TIMEOUT, || async {
        let failed = js::failed(&w.js, "orders").await?;
        Ok((!failed.is_empty()).then_some(failed))
    })
    .await?;
    assert_eq!(failed.len(), 1, "only the failed entry is delegated");
    assert_eq!(failed[0].error.code.as_deref(), Some("bad_type"));
    assert_eq!(failed[0].error.field.as_deref(), Some("/amount"));
    assert_eq!(failed[0].error.status, Some(422));
    let p = w.processor(&example_rules(), "").await?;
    let log = w
        .app
        .wait_for(
            "every order but the dropped one processed",
            TEST_TIMEOUT,
            |log| {
                let ok: HashSet<u64> = log
                    .iter()
                    .filter(|d| d.ok() && d.status == 200 && d.n() != 2)
                    .map(Delivery::n)
                    .collect();
                [0, 1, 3, 4, 5].iter().all(|n| ok.contains(n))
            },
        )
        .await
        .map_err(|e| {
            let seen: Vec<(u64, u16)> = w.app.log().iter().map(|d| (d.n(), d.status)).collect();
            anyhow::anyhow!(
                "{e:#}\napp: {seen:?}\nsidecar log:\n{}\nprocessor log:\n{}",
                s.log(),
                p.log()
            )
        })?;
    w.drained("orders").await?;

    // The first batch held the first message of each of the five keys, and only those.
    let first: HashSet<u64> = log
        .iter()
        .filter(|d| d.batch.as_ref().is_some_and(|(b, _)| *b == 0))
        .map(Delivery::n)
        .collect();
    assert_eq!(first, HashSet::from([0, 1, 2, 3, 5]), "the first batch");
    let of = |n: u64| log.iter().filter(|d| d.n() == n).collect::<Vec<_>>();
    // SUCCESS: once.
    assert_eq!(of(0).len(), 1);
    // RETRY: again, in place (same attempt), then SUCCESS.
    let b = of(1);
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].status, 503);
    assert_eq!(b[1].header("mend-attempt"), Some("1"));
    // DROP: once, announced as dropped, never delegated.
    assert_eq!(of(2).len(), 1);
    let dropped = js::events(&w.js, "orders", "dropped").await?;
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["data"]["id"], of(2)[0].mend_id());
    // FAIL: repaired, delivered as attempt 2; its key's next message waited behind it.
    let d = of(3);
    let repaired = d.iter().find(|d| d.ok()).expect("the repair delivered");
    assert_eq!(repaired.header("mend-attempt"), Some("2"));
    assert_eq!(
        repaired.header("mend-repaired-by"),
        Some("amount-as-number")
    );
    assert_eq!(repaired.field("amount"), Some(&json!(12.5)));
    let pos = |d: &Delivery| log.iter().position(|l| std::ptr::eq(l, d));
    let next = of(4);
    assert_eq!(next.len(), 1);
    assert!(
        pos(next[0]) > pos(repaired),
        "the held message went after its head"
    );
    let held = js::events(&w.js, "orders", "held").await?;
    assert!(
        held.iter().any(|e| e["data"]["id"] == next[0].mend_id()),
        "{held:?}"
    );
    wait::until("the key's hold resolved", TEST_TIMEOUT, || async {
        let resolved = js::events(&w.js, "orders", "resolved").await?;
        Ok(resolved
            .iter()
            .any(|e| e["data"]["id"] == repaired.mend_id())
            .then_some(()))
    })
    .await?;
    // The message's trace context travels in its entry.
    let (_, entry) = of(5)[0].batch.clone().unwrap();
    assert_eq!(
        entry["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(
        metric(&config, "orders", "mend_dropped_total").await?,
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_a_malformed_answer_and_a_missing_entry_are_retried_in_place() -> anyhow::Result<()> {
    let w = World::new().await?;
    // The first batch gets a 503 for all its entries; the second an answer that is not the
    // contract's; after that, entry n = 7 is left out of one answer.
    w.app
        .batch_script(|batch| match batch[0].batch.as_ref().map(|(b, _)| *b) {
            Some(0) => Some(BatchReply::Body(503, "busy".into())),
            Some(1) => Some(BatchReply::Body(200, "OK".into())),
            _ => None,
        });
    let missed = Arc::new(AtomicUsize::new(0));
    let missed_in = missed.clone();
    w.app.script(move |d| {
        if d.n() == 7 && missed_in.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::Missing
        } else {
            Reply::Ok
        }
    });
    w.publish_keyed(20, 20).await?;
    let config = batch_config(
        &w,
        "inplace",
        "backoff_initial = \"10ms\"\nbatch = { max_messages = 50, max_wait = \"50ms\" }",
    );
    let s = w.sidecar(&config).await?;
    w.app
        .wait_for("all 20 processed", TEST_TIMEOUT, |log| {
            successes(log).len() == 20
        })
        .await?;
    w.drained("inplace").await?;
    let times = successes(&w.app.log());
    assert!(
        times.values().all(|&t| t == 1),
        "each processed once: {times:?}"
    );
    assert_eq!(w.app.log().iter().filter(|d| d.n() == 7).count(), 4);
    assert!(
        js::failed(&w.js, "inplace").await?.is_empty(),
        "nothing delegated"
    );
    let log = s.log();
    assert!(
        log.contains("malformed") && log.contains("it began \\\"OK\\\""),
        "the malformed answer is logged with what was wrong:\n{log}"
    );
    assert!(log.contains("no status for some entries"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_times_out_is_sent_again() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.batch_script(|batch| {
        (batch[0].batch.as_ref().map(|(b, _)| *b) == Some(0))
            .then_some(BatchReply::Slow(Duration::from_millis(1500)))
    });
    w.publish_keyed(10, 10).await?;
    let config = batch_config(
        &w,
        "slow",
        "timeout = \"1s\"\nack_wait = \"3s\"\nbackoff_initial = \"10ms\"\n\
         batch = { max_messages = 20, max_wait = \"100ms\" }",
    );
    let s = w.sidecar(&config).await?;
    let log = w
        .app
        .wait_for(
            "every message answered after the time-out",
            Duration::from_secs(20),
            |log| {
                let later: HashSet<u64> = log
                    .iter()
                    .filter(|d| d.ok() && d.batch.as_ref().is_some_and(|(b, _)| *b > 0))
                    .map(Delivery::n)
                    .collect();
                later.len() == 10
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    w.drained("slow").await?;
    // The timed-out batch held all ten (the app never finished it: the sidecar hung up, and its
    // handler was dropped); each came again in a later batch, none delegated.
    assert!(w.app.batches().0 >= 2);
    for d in log.iter().filter(|d| d.ok()) {
        assert_eq!(d.seen_before, 1, "{} sent again once", d.n());
    }
    assert!(js::failed(&w.js, "slow").await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_down_for_10_s_delays_batches_and_delegates_nothing() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    w.app.down().await?;
    w.publish_keyed(500, 25).await?;
    let config = batch_config(
        &w,
        "outage",
        "backoff_initial = \"50ms\"\nbackoff_max = \"1s\"\ntransient_tries = 3\n\
         batch = { max_messages = 100, max_wait = \"5ms\" }",
    );
    let s = w.sidecar(&config).await?;
    wait::until("the circuit open", TEST_TIMEOUT, || async {
        Ok((metric(&config, "outage", "mend_circuit_open").await? == Some(1.0)).then_some(()))
    })
    .await?;
    // The outage itself: ten seconds of refused connections, well past 3 tries of each message.
    tokio::time::sleep(Duration::from_secs(10)).await;
    w.app.up().await?;
    let log = w
        .app
        .wait_for("all 500 processed", TEST_TIMEOUT, |log| {
            successes(log).len() == 500
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    w.drained("outage").await?;
    assert!(successes(&log).values().all(|&t| t == 1));
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    assert!(
        js::failed(&w.js, "outage").await?.is_empty(),
        "an outage delegates nothing"
    );
    assert_eq!(
        metric(&config, "outage", "mend_circuit_open").await?,
        Some(0.0)
    );
    Ok(())
}

/// Messages with n % 97 == 5 fail (FAIL, no processor: they hold their key, which is their own).
fn failing(n: u64) -> bool {
    n % 97 == 5
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_three_times_with_batches_in_flight_loses_nothing_and_delegates_once()
-> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| {
        if failing(d.n()) {
            Reply::Problem(422, json!({"code": "nope"}))
        } else {
            Reply::Ok
        }
    });
    let total = 5_000u64;
    w.publish_with_keys(total as usize, |i| {
        if failing(i as u64) {
            format!("f{i}")
        } else {
            format!("k{}", i % 50)
        }
    })
    .await?;
    let config = with_top_level(
        &batch_config(
            &w,
            "crash",
            "timeout = \"1s\"\nack_wait = \"2s\"\nconcurrency = 4\n\
             batch = { max_messages = 20, max_wait = \"2ms\" }",
        ),
        "lease_ttl = \"2s\"",
    );
    let mut sidecar = w.sidecar(&config).await?;
    w.survives_three_kills(&mut sidecar, "crash", total, failing)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_binary_and_long_keyed_messages_travel_in_batches_an_app_takes() -> anyhow::Result<()>
{
    let w = World::new().await?;
    // Twelve messages of ~300 KiB on twelve keys: all in one batch would be ~3.6 MiB, over the
    // 2 MiB an axum app (as the test app) takes by default; its 413 would delegate every entry.
    let pad = "x".repeat(300 * 1024);
    let mut msgs: Vec<Out> = (0..12)
        .map(|i| {
            let key = format!("k{i}");
            Out::keyed(
                "app.created",
                KEY_HEADER,
                &key,
                json!({"key": key, "n": i, "pad": pad}),
            )
        })
        .collect();
    // One at the server's size limit leaves room for small ones only; one not JSON (bytes of every value) as
    // data_base64; one whose key is 60 KiB long (near the server's 64 KiB for headers) as its entry's subject.
    let limit = "y".repeat(1_040_000);
    msgs.push(Out::keyed(
        "app.created",
        KEY_HEADER,
        "big",
        json!({"key": "big", "n": 12, "pad": limit}),
    ));
    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let mut raw = Out::keyed("app.created", KEY_HEADER, "raw", json!(null));
    raw.payload = bytes::Bytes::from(binary.clone());
    raw.headers
        .insert("Content-Type", "application/octet-stream");
    msgs.push(raw);
    let long_key = "L".repeat(60 * 1024);
    msgs.push(Out::keyed(
        "app.created",
        KEY_HEADER,
        &long_key,
        json!({"key": long_key, "n": 14}),
    ));
    js::publish_all(&w.js, msgs).await?;
    let config = batch_config(
        &w,
        "large",
        "batch = { max_messages = 100, max_wait = \"500ms\" }",
    );
    let s = w.sidecar(&config).await?;
    let log = w
        .app
        .wait_for_successes(15, TEST_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    w.drained("large").await?;
    assert!(
        log.iter().all(|d| d.ok()),
        "no entry refused or retried: {:?}",
        log.iter().map(|d| d.status).collect::<Vec<_>>()
    );
    assert!(js::failed(&w.js, "large").await?.is_empty());
    // No batch passed 1 MiB of entries: at most three of the 300 KiB ones went together, and none
    // went with the one at the size limit.
    let mut per_batch: HashMap<usize, Vec<u64>> = HashMap::new();
    for d in &log {
        let (b, _) = d.batch.as_ref().expect("in a batch");
        per_batch.entry(*b).or_default().push(d.n());
    }
    for ns in per_batch.values() {
        let large = ns.iter().filter(|n| **n < 12).count();
        assert!(large <= 3, "a batch of {ns:?}");
        if ns.contains(&12) {
            assert_eq!(large, 0, "the message at the limit had no room: {ns:?}");
        }
    }
    let raw = log
        .iter()
        .find(|d| d.header("mend-key") == Some("raw"))
        .expect("the binary message");
    let (_, entry) = raw.batch.as_ref().unwrap();
    assert_eq!(entry["datacontenttype"], "application/octet-stream");
    assert!(entry.get("data").is_none());
    assert_eq!(
        raw.body.as_ref(),
        binary.as_slice(),
        "data_base64 carries the bytes"
    );
    let long = log
        .iter()
        .find(|d| d.n() == 14)
        .expect("the long key's message");
    let (_, entry) = long.batch.as_ref().unwrap();
    assert_eq!(entry["subject"].as_str().map(str::len), Some(60 * 1024));
    Ok(())
}
