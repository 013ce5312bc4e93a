//! Holding queues end to end (SPEC §7, §8 guarantees 1 and 2): real nats-server, sidecar, processor
//! and app. While a key's head is out for repair or parked, its later messages wait in the key's
//! hold queue and are released in order once the head is through.

use std::collections::{BTreeMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bytes::Bytes;
use mend_e2e::app::{Delivery, Reply};
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{example_rules, with_top_level};
use mend_e2e::wait;
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT, World, first_successes_in_order};
use serde_json::{Value, json};

const KEYS: usize = 60;
const PER_KEY: usize = 40;

/// Every 19th message has a string amount (repaired by the example rule `amount-as-number`); every
/// 13th answers 503 on its first delivery.
fn repairable(n: u64) -> bool {
    n % 19 == 4
}

fn flaky(n: u64) -> bool {
    n % 13 == 7
}

/// The orders app: a string amount is a `bad_type`, an unknown account `unknown_account`; flaky
/// messages are unavailable on their first try.
fn orders_app(d: &Delivery) -> Reply {
    if flaky(d.n()) && d.seen_before == 0 {
        return Reply::Status(503);
    }
    mend_e2e::app::order_problem(d).unwrap_or(Reply::Ok)
}

/// `KEYS` × `PER_KEY` orders, key `k<i % KEYS>`, in stream order `n = i`.
fn orders() -> Vec<Out> {
    (0..KEYS * PER_KEY)
        .map(|i| {
            let n = i as u64;
            let key = format!("k{}", i % KEYS);
            let amount = if repairable(n) {
                json!(format!("{}.50", i))
            } else {
                json!(i)
            };
            Out::keyed(
                "app.created",
                KEY_HEADER,
                &key,
                json!({"key": key, "n": n, "account": key, "amount": amount}),
            )
        })
        .collect()
}

/// Checks the guarantees on the app's log: every order succeeded, and for each key the first
/// successes are exactly its orders in stream order; repaired ones came as attempt 2 or later.
fn complete_and_in_order(log: &[Delivery]) -> anyhow::Result<()> {
    first_successes_in_order(log).map_err(anyhow::Error::msg)?;
    let mut firsts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for d in log.iter().filter(|d| d.ok()) {
        let n = d.n();
        if seen.insert(n) {
            let key = d.field("key").and_then(Value::as_str).unwrap_or("");
            firsts.entry(key.to_owned()).or_default().push(n);
        }
        if repairable(n) {
            let attempt: u32 = d.header("mend-attempt").unwrap_or("1").parse()?;
            anyhow::ensure!(attempt >= 2, "order {n} succeeded unrepaired");
        }
    }
    anyhow::ensure!(firsts.len() == KEYS, "{} keys delivered", firsts.len());
    for (key, ns) in firsts {
        let k: u64 = key.trim_start_matches('k').parse()?;
        let expect: Vec<u64> = (0..PER_KEY as u64).map(|j| j * KEYS as u64 + k).collect();
        anyhow::ensure!(ns == expect, "key {key}: {ns:?}");
    }
    Ok(())
}

/// Waits until no key is held any more and the hold queues are empty.
async fn holds_cleared(w: &World, js: &async_nats::jetstream::Context) -> anyhow::Result<()> {
    let _ = w;
    wait::until("every hold released", TEST_TIMEOUT, || async {
        let mut queues = js.get_stream("MEND_HOLD").await?;
        let queued = queues.info().await?.state.messages;
        let kv = js.get_key_value("mend_holds").await?;
        let mut held = 0;
        let keys: Vec<String> = futures::TryStreamExt::try_collect(kv.keys().await?).await?;
        for name in keys {
            if let Some(v) = kv.get(&name).await? {
                let hold: Value = serde_json::from_slice(&v)?;
                if hold["state"] != "resolved" {
                    held += 1;
                }
            }
        }
        Ok((queued == 0 && held == 0).then_some(()))
    })
    .await
}

fn all_succeeded(log: &[Delivery]) -> bool {
    let ok: HashSet<u64> = log.iter().filter(|d| d.ok()).map(Delivery::n).collect();
    ok.len() == KEYS * PER_KEY
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_keep_their_order_through_repairs_and_flaky_answers() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(orders_app);
    js::publish_all(&w.js, orders()).await?;
    let _p = w.processor(&example_rules(), "").await?;
    let s = w
        .sidecar(&w.keyed_config("orders", "backoff_initial = \"10ms\""))
        .await?;

    let log = w
        .app
        .wait_for("every order delivered", TEST_TIMEOUT, all_succeeded)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    complete_and_in_order(&log)?;
    holds_cleared(&w, &w.js).await?;

    // How many orders waited behind a repair depends on how fast repairs come back (a repair goes
    // ahead of its key's waiting orders); each that did went through after its head.
    let held = js::events(&w.js, "orders", "held").await?;
    // A message that waited behind a head first succeeded after the head did.
    let first_success = |id: &str| log.iter().position(|d| d.ok() && d.mend_id() == id);
    for e in &held {
        let (id, head) = (e["data"]["id"].as_str(), e["data"]["head"].as_str());
        let (Some(id), Some(head)) = (id, head) else {
            panic!("held event without id or head: {e}");
        };
        assert!(
            first_success(head) < first_success(id),
            "{id} went through before its head {head}"
        );
    }
    let resolved = js::events(&w.js, "orders", "resolved").await?;
    let repaired = (0..(KEYS * PER_KEY) as u64)
        .filter(|n| repairable(*n))
        .count();
    assert!(resolved.len() >= repaired, "{} resolved", resolved.len());
    // A repaired lineage's resolution carries its delegation and repair as steps, with their
    // attempts: the dashboard's timeline and rule counts come from them.
    let carried = resolved
        .iter()
        .find(|e| e["data"]["attempt"] == 2)
        .expect("a resolved repair");
    let steps: Vec<(&str, u64)> = carried["data"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["what"].as_str().unwrap_or(""),
                s["attempt"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(steps, [("delegated", 1), ("repaired", 2)], "{carried}");
    assert!(!s.log().contains("panicked"));
    Ok(())
}

/// A small deterministic generator for kill points (its seed is printed, to replay a failure).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_survives_sidecar_kills_and_a_broker_restart() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    w.app.script(orders_app);
    js::publish_all(&w.js, orders()).await?;
    let _p = w.processor(&example_rules(), "").await?;
    let config = with_top_level(
        &w.keyed_config(
            "orders",
            "backoff_initial = \"10ms\"\ntimeout = \"1s\"\nack_wait = \"2s\"\nconcurrency = 16",
        ),
        "lease_ttl = \"2s\"",
    );
    let mut s = w.sidecar(&config).await?;
    let seed = std::env::var("MEND_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("kill points from MEND_TEST_SEED={seed}");
    let mut rng = Lcg(seed);
    let total = (KEYS * PER_KEY) as u64;
    // Three kills and one broker restart, at random points of the run, in random order.
    let mut points: Vec<u64> = (0..4).map(|_| total / 10 + rng.below(total / 2)).collect();
    points.sort_unstable();
    let restart_at = rng.below(4) as usize;
    for (i, at) in points.into_iter().enumerate() {
        w.app
            .wait_for(&format!("{at} requests"), TEST_TIMEOUT, |log| {
                log.len() as u64 >= at
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
        if i == restart_at {
            eprintln!("nats-server restart at {at} requests");
            w.nats.restart().await?;
        } else {
            eprintln!("sidecar SIGKILL at {at} requests");
            s.kill().await?;
            s.restart().await?;
        }
    }
    s.ready().await?;

    let log = w
        .app
        .wait_for("every order delivered", TEST_TIMEOUT, all_succeeded)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nseed {seed}\nsidecar log:\n{}", s.log()))?;
    complete_and_in_order(&log).map_err(|e| anyhow::anyhow!("{e:#}\nseed {seed}"))?;
    let js2 = async_nats::jetstream::new(w.nats.client().await?);
    holds_cleared(&w, &js2).await?;
    Ok(())
}

/// Publishes a person's resubmission of `id` with `payload` (as the dashboard does).
async fn resubmit(w: &World, svc: &str, id: &str, key: &str, payload: Value) -> anyhow::Result<()> {
    let mut headers = HeaderMap::new();
    headers.insert("Mend-Id", id);
    headers.insert("Mend-Attempt", "2");
    headers.insert("Mend-Key", key);
    headers.insert("Mend-Original-Subject", "app.created");
    headers.insert("Mend-Resubmitted-By", "alice");
    headers.insert("Nats-Msg-Id", format!("{id}:2:resubmit").as_str());
    w.js.publish_with_headers(
        format!("mend.retry.{svc}"),
        headers,
        Bytes::from(payload.to_string()),
    )
    .await?
    .await?;
    Ok(())
}

/// Publishes a command on `mend.control.<svc>`.
async fn control(w: &World, svc: &str, command: Value) -> anyhow::Result<()> {
    w.js.publish(
        format!("mend.control.{svc}"),
        Bytes::from(command.to_string()),
    )
    .await?
    .await?;
    Ok(())
}

fn order(n: u64, key: &str, account: &str) -> Out {
    Out::keyed(
        "app.created",
        KEY_HEADER,
        key,
        json!({"key": key, "n": n, "account": account, "amount": n}),
    )
}

/// The `Mend-Id`s waiting in the hold queues of `svc`, in queue order.
async fn queued_ids(w: &World, svc: &str) -> anyhow::Result<Vec<String>> {
    let mut stream = w.js.get_stream("MEND_HOLD").await?;
    let info = stream.info().await?;
    let prefix = format!("mend.hold.{svc}.");
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return Ok(out);
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        match stream.direct_get(seq).await {
            Ok(m) if m.subject.starts_with(prefix.as_str()) => out.push(
                m.headers
                    .get("Mend-Id")
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default(),
            ),
            Ok(_) => {}
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Waits until `count` messages of `svc` wait in hold queues; returns their ids.
async fn held(w: &World, svc: &str, count: usize) -> anyhow::Result<Vec<String>> {
    wait::until(&format!("{count} held"), TEST_TIMEOUT, || async {
        let held = queued_ids(w, svc).await?;
        Ok((held.len() >= count).then_some(held))
    })
    .await
}

async fn parked(w: &World, svc: &str, count: usize) -> anyhow::Result<()> {
    wait::until(&format!("{count} parked"), TEST_TIMEOUT, || async {
        Ok((js::events(&w.js, svc, "parked").await?.len() >= count).then_some(()))
    })
    .await
}

fn successes(log: &[Delivery], key: &str) -> Vec<u64> {
    log.iter()
        .filter(|d| d.ok() && d.field("key").and_then(Value::as_str) == Some(key))
        .map(Delivery::n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_head_holds_its_key_until_resubmitted_or_discarded() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(orders_app);
    // Key a: its head is parked (unknown account); 1..3 wait. Key b flows meanwhile.
    // Key c: its head is parked; of its held messages, 5 fails again when released and becomes
    // the new head, 6 stays held until 5 is discarded too.
    let seqs = js::publish_all(
        &w.js,
        vec![
            order(0, "a", "nobody"),
            order(1, "a", "a"),
            order(2, "b", "b"),
            order(3, "a", "a"),
            order(4, "c", "nobody"),
            order(5, "c", "nobody"),
            order(6, "c", "c"),
            order(7, "a", "a"),
            order(8, "b", "b"),
        ],
    )
    .await?;
    let _p = w.processor(&example_rules(), "").await?;
    let _s = w.sidecar(&w.keyed_config("desk", "")).await?;

    let held_now = held(&w, "desk", 5).await?;
    parked(&w, "desk", 2).await?;
    let log = w
        .app
        .wait_for("key b through", TEST_TIMEOUT, |log| {
            successes(log, "b") == [2, 8]
        })
        .await?;
    assert!(successes(&log, "a").is_empty(), "key a waits behind 0");
    assert!(successes(&log, "c").is_empty(), "key c waits behind 4");
    let ids: HashSet<String> = held_now.into_iter().collect();
    for i in [1, 3, 7, 5, 6] {
        assert!(ids.contains(&format!("APP:{}", seqs[i])), "{i} held");
    }
    // The first message to wait behind each head is announced, with the head.
    let events = js::events(&w.js, "desk", "held").await?;
    assert_eq!(events.len(), 2, "{events:#?}");
    for e in &events {
        let (first, head) = if e["data"]["key"] == "a" {
            (1, 0)
        } else {
            (5, 4)
        };
        assert_eq!(e["data"]["id"], format!("APP:{}", seqs[first]));
        assert_eq!(e["data"]["head"], format!("APP:{}", seqs[head]));
    }

    // A person fixes and resubmits a's head: it is delivered, then 1, 3, 7 in order.
    let a0 = format!("APP:{}", seqs[0]);
    resubmit(
        &w,
        "desk",
        &a0,
        "a",
        json!({"key": "a", "n": 0, "account": "a", "amount": 0}),
    )
    .await?;
    let log = w
        .app
        .wait_for("key a released", TEST_TIMEOUT, |log| {
            successes(log, "a").len() >= 4
        })
        .await?;
    assert_eq!(successes(&log, "a"), [0, 1, 3, 7]);
    let resubmitted = log
        .iter()
        .find(|d| d.ok() && d.n() == 0)
        .expect("the resubmission");
    assert_eq!(resubmitted.header("mend-resubmitted-by"), Some("alice"));
    assert_eq!(resubmitted.mend_id(), a0);
    wait::until("a resolved and released", TEST_TIMEOUT, || async {
        let resolved = js::events(&w.js, "desk", "resolved").await?;
        let released = js::events(&w.js, "desk", "released").await?;
        Ok((resolved.iter().any(|e| e["data"]["id"] == a0.as_str())
            && released.iter().any(|e| e["data"]["key"] == "a"))
        .then_some(()))
    })
    .await?;

    // Discarding c's head releases c: 5 fails again and is the new head, 6 stays held.
    let c4 = format!("APP:{}", seqs[4]);
    control(
        &w,
        "desk",
        json!({"action": "discard", "id": c4, "key": "c", "by": "alice"}),
    )
    .await?;
    parked(&w, "desk", 3).await?;
    let log = w
        .app
        .wait_for("5 delivered again", TEST_TIMEOUT, |log| {
            log.iter().filter(|d| d.n() == 5).count() >= 1
        })
        .await?;
    assert!(successes(&log, "c").is_empty());
    assert!(!log.iter().any(|d| d.n() == 6), "6 waits behind 5");
    // Discarding the new head lets 6 through.
    let c5 = format!("APP:{}", seqs[5]);
    control(
        &w,
        "desk",
        json!({"action": "discard", "id": c5, "key": "c"}),
    )
    .await?;
    let log = w
        .app
        .wait_for("6 delivered", TEST_TIMEOUT, |log| {
            successes(log, "c") == [6]
        })
        .await?;
    assert_eq!(log.iter().filter(|d| d.n() == 4).count(), 1, "discarded");
    js::consumer_drained(&w.js, "APP", "mend-desk-desk", TEST_TIMEOUT).await?;
    holds_cleared(&w, &w.js).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_by_hand_delivers_the_held_messages_and_leaves_the_head_parked()
-> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(orders_app);
    let seqs = js::publish_all(
        &w.js,
        vec![
            order(0, "r", "nobody"),
            order(1, "r", "r"),
            order(2, "r", "r"),
        ],
    )
    .await?;
    let _p = w.processor(&example_rules(), "").await?;
    let s = w
        .sidecar(&w.keyed_config("rel", "hold_alert_count = 1"))
        .await?;
    held(&w, "rel", 2).await?;
    // More messages wait than the binding allows quietly: the hold is made loud, once.
    let alert = wait::until("a hold alert", TEST_TIMEOUT, || async {
        let alerts = js::events(&w.js, "rel", "hold_alert").await?;
        Ok(alerts.into_iter().next())
    })
    .await?;
    assert_eq!(alert["data"]["key"], "r");
    assert_eq!(alert["data"]["head"], format!("APP:{}", seqs[0]));
    assert_eq!(alert["data"]["held"], 2);
    assert!(s.log().contains("over its alert"), "{}", s.log());
    // A malformed command is refused and changes nothing.
    control(&w, "rel", json!({"action": "explode", "key": "r"})).await?;
    control(
        &w,
        "rel",
        json!({"action": "release", "id": format!("APP:{}", seqs[0]), "key": "r"}),
    )
    .await?;
    let log = w
        .app
        .wait_for("1 and 2 released", TEST_TIMEOUT, |log| {
            successes(log, "r") == [1, 2]
        })
        .await?;
    assert_eq!(log.iter().filter(|d| d.n() == 0).count(), 1);
    let parked = js::parked(&w.js, "rel").await?;
    assert_eq!(parked.len(), 1, "the head stays parked");
    assert!(s.log().contains("Command refused"), "{}", s.log());
    holds_cleared(&w, &w.js).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_survive_a_sidecar_restart() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(orders_app);
    let seqs = js::publish_all(
        &w.js,
        (0..20)
            .map(|n| order(n, "s", if n == 0 { "nobody" } else { "s" }))
            .collect(),
    )
    .await?;
    let _p = w.processor(&example_rules(), "").await?;
    let config = with_top_level(&w.keyed_config("keep", ""), "lease_ttl = \"2s\"");
    let mut s = w.sidecar(&config).await?;
    held(&w, "keep", 19).await?;
    js::consumer_drained(&w.js, "APP", "mend-keep-keep", TEST_TIMEOUT).await?;
    s.kill().await?;
    s.restart().await?;
    s.ready().await?;
    // The hold came back from KV: a resubmission of the head releases the queue in order.
    resubmit(
        &w,
        "keep",
        &format!("APP:{}", seqs[0]),
        "s",
        json!({"key": "s", "n": 0, "account": "s", "amount": 0}),
    )
    .await?;
    let log = w
        .app
        .wait_for("all of s", TEST_TIMEOUT, |log| {
            successes(log, "s").len() >= 20
        })
        .await?;
    assert_eq!(successes(&log, "s"), (0..20).collect::<Vec<u64>>());
    holds_cleared(&w, &w.js).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_4_and_64_kib_hold_and_release_in_order() -> anyhow::Result<()> {
    // Spelled out in hold subjects and KV keys, such keys would pass nats-server's 4 KiB control
    // line and close the sidecar's connection, and in a header JetStream's 64 KiB header limit:
    // their key tokens are digests, and a key too long for `Mend-Key` is named by `Mend-Key-Token`.
    let w = World::new().await?;
    w.app.script(orders_app);
    let p = w.processor(&example_rules(), "").await?;
    let config = mend_e2e::mend::sidecar_config(
        "orders",
        &w.nats.url(),
        "APP",
        &["app.>"],
        &w.app.endpoint(),
        "key = { json = \"/account\" }",
    );
    let s = w.sidecar(&config).await?;
    let keys = ["a".repeat(4000), "é".repeat(32 * 1024), "short".to_owned()];
    let mut msgs = Vec::new();
    for round in 0..3u64 {
        for (i, key) in keys.iter().enumerate() {
            let n = round * 10 + i as u64;
            // Each key's first order is repairable: the key is held until its repair goes through.
            let amount = if round == 0 { json!("12.5") } else { json!(3) };
            msgs.push(Out {
                subject: "app.created".into(),
                headers: HeaderMap::new(),
                payload: Bytes::from(
                    json!({"key": format!("key{i}"), "account": key, "n": n, "amount": amount})
                        .to_string(),
                ),
            });
        }
    }
    js::publish_all(&w.js, msgs).await?;
    let log = w
        .app
        .wait_for("every order delivered", TEST_TIMEOUT, |log| {
            log.iter()
                .filter(|d| d.ok())
                .map(Delivery::n)
                .collect::<HashSet<_>>()
                .len()
                == 9
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\nsidecar log:\n{}\nprocessor log:\n{}",
                s.log(),
                p.log()
            )
        })?;
    for (i, key) in keys.iter().enumerate() {
        let mine = |d: &&Delivery| d.field("key") == Some(&json!(format!("key{i}")));
        let mut seen = HashSet::new();
        let firsts: Vec<u64> = log
            .iter()
            .filter(|d| d.ok())
            .filter(mine)
            .map(Delivery::n)
            .filter(|n| seen.insert(*n))
            .collect();
        assert_eq!(
            firsts,
            vec![i as u64, 10 + i as u64, 20 + i as u64],
            "key{i}"
        );
        let repaired = log
            .iter()
            .filter(mine)
            .find(|d| d.ok() && d.n() == i as u64)
            .expect("the repaired first order");
        assert_eq!(repaired.header("mend-attempt"), Some("2"));
        let token = repair_rules::MessageKey(key.clone()).token();
        match repaired.header("mend-key") {
            Some(sent) => assert_eq!(repair_rules::headers::decode_value(sent), *key),
            None => assert_eq!(repaired.header("mend-key-token"), Some(token.as_str())),
        }
    }
    assert!(!s.log().contains("maximum control line"), "{}", s.log());
    holds_cleared(&w, &w.js).await?;
    Ok(())
}

/// The hold entry of `key` of service `svc`, if it has one.
async fn entry(w: &World, svc: &str, key: &str) -> anyhow::Result<Option<Value>> {
    let kv = w.js.get_key_value("mend_holds").await?;
    let token = repair_rules::MessageKey(key.into()).token();
    Ok(match kv.get(format!("{svc}.{token}")).await? {
        Some(v) => Some(serde_json::from_slice(&v)?),
        None => None,
    })
}

/// Waits until the hold entry of `key` is in `state`; returns it.
async fn entry_in(w: &World, svc: &str, key: &str, state: &str) -> anyhow::Result<Value> {
    wait::until(&format!("{key} {state}"), TEST_TIMEOUT, || async {
        Ok(entry(w, svc, key).await?.filter(|e| e["state"] == state))
    })
    .await
}

/// A copy appended to an earlier hold of a key and stored after that hold ended (an append of an
/// instance that had lost the key, held up on a stalled connection: its sender never acked the
/// original, which was delivered from the app stream) is skipped when the key's next hold is
/// released, not delivered a second time after the key's later messages. A key held again starts a
/// new hold (its `since`), which is what tells the copies apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_copy_of_an_earlier_hold_is_skipped_by_the_next_release() -> anyhow::Result<()> {
    const SVC: &str = "late";
    let w = World::new().await?;
    w.app.script(mend_e2e::app::failing(&[0, 10]));
    let _s = w.sidecar(&w.keyed_config(SVC, "")).await?;
    let out = |n: u64| Out::keyed("app.created", KEY_HEADER, "k", json!({"key": "k", "n": n}));
    let discard = |seq: u64| json!({"action": "discard", "key": "k", "id": format!("APP:{seq}"), "by": "test"});

    // The first hold: n0 fails, n1 waits, n0 is discarded, n1 is delivered.
    let first = js::publish_all(&w.js, vec![out(0), out(1)]).await?;
    let earlier = entry_in(&w, SVC, "k", "held").await?["since"].clone();
    held(&w, SVC, 1).await?;
    control(&w, SVC, discard(first[0])).await?;
    entry_in(&w, SVC, "k", "resolved").await?;

    // The second hold: n10 fails; it begins anew.
    let later = js::publish_all(&w.js, vec![out(10)]).await?;
    let since = entry_in(&w, SVC, "k", "held").await?["since"].clone();
    assert_ne!(since, earlier, "a new hold has its own since");

    // n1's copy for the first hold arrives late; then n11 waits behind n10.
    let mut headers = HeaderMap::new();
    headers.insert("Mend-Id", format!("APP:{}", first[1]).as_str());
    headers.insert("Mend-Service", SVC);
    headers.insert("Mend-Attempt", "1");
    headers.insert("Mend-Original-Subject", "app.created");
    headers.insert("Mend-Key", "k");
    headers.insert("Mend-Hold-Since", earlier.as_str().unwrap_or_default());
    headers.insert(KEY_HEADER, "k");
    headers.insert("Nats-Msg-Id", "late-copy-of-n1");
    let queue = format!(
        "mend.hold.{SVC}.{}",
        repair_rules::MessageKey("k".into()).token()
    );
    w.js.publish_with_headers(
        queue,
        headers,
        json!({"key": "k", "n": 1}).to_string().into(),
    )
    .await?
    .await?;
    js::publish_all(&w.js, vec![out(11)]).await?;
    held(&w, SVC, 2).await?;

    // n10 discarded: the release skips the late copy and delivers n11.
    control(&w, SVC, discard(later[0])).await?;
    w.app
        .wait_for("n11 delivered", TEST_TIMEOUT, |log| {
            log.iter().any(|d| d.ok() && d.n() == 11)
        })
        .await?;
    holds_cleared(&w, &w.js).await?;
    let log = w.app.log();
    let n1 = log.iter().filter(|d| d.n() == 1).count();
    assert_eq!(n1, 1, "n1 delivered again by a later hold");
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// A producer's message that carries mend's own `Mend-Payload-Object` (naming an object that does
/// not exist) on a held key: its copy in the hold queue does not take the header over, so its
/// release delivers its own payload instead of waiting for an object that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_payload_object_header_is_not_taken_for_mends() -> anyhow::Result<()> {
    const SVC: &str = "hostile";
    let w = World::new().await?;
    w.app.script(mend_e2e::app::failing(&[0]));
    let _s = w.sidecar(&w.keyed_config(SVC, "")).await?;
    let head = js::publish_all(
        &w.js,
        vec![Out::keyed(
            "app.created",
            KEY_HEADER,
            "k",
            json!({"key": "k", "n": 0}),
        )],
    )
    .await?;
    entry_in(&w, SVC, "k", "held").await?;
    let mut headers = HeaderMap::new();
    headers.insert(KEY_HEADER, "k");
    headers.insert("Mend-Payload-Object", "APP_999_1_held");
    w.js.publish_with_headers(
        "app.created",
        headers,
        json!({"key": "k", "n": 1, "mine": true}).to_string().into(),
    )
    .await?
    .await?;
    held(&w, SVC, 1).await?;
    control(
        &w,
        SVC,
        json!({"action": "discard", "key": "k", "id": format!("APP:{}", head[0]), "by": "test"}),
    )
    .await?;
    let log = w
        .app
        .wait_for("n1 delivered", TEST_TIMEOUT, |log| {
            log.iter().any(|d| d.ok() && d.n() == 1)
        })
        .await?;
    let n1 = log.iter().find(|d| d.n() == 1).expect("delivered");
    assert_eq!(n1.field("mine"), Some(&json!(true)), "its own payload");
    holds_cleared(&w, &w.js).await?;
    Ok(())
}

/// Another writer changed a hold this sidecar owns (the entry has a revision it did not write):
/// the write that finds it stops the binding (the message is handed back, nothing is stored over the
/// other write), the binding gives its lease up and takes it again with its holds reloaded, and the
/// key goes on in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_changed_by_another_writer_stops_the_binding_until_it_reloads() -> anyhow::Result<()>
{
    let w = World::new().await?;
    // Order 0 fails until a person resubmits it (no processor runs): it stays the key's head.
    w.app.script(|d| {
        if d.n() == 0 && d.header("mend-resubmitted-by").is_none() {
            Reply::Status(422)
        } else {
            Reply::Ok
        }
    });
    let config = with_top_level(
        &w.keyed_config("other", "backoff_initial = \"10ms\""),
        "lease_ttl = \"2s\"",
    );
    let s = w.sidecar(&config).await?;
    js::publish_all(&w.js, vec![order(0, "k1", "acct-1")]).await?;
    let kv = w.js.get_key_value("mend_holds").await?;
    let entry = format!("other.{}", repair_rules::MessageKey("k1".into()).token());
    let value = wait::until("k1 held", TEST_TIMEOUT, || async {
        Ok(kv.get(&entry).await?)
    })
    .await?;
    // The other writer: the same value again, a revision this sidecar did not write.
    kv.put(&entry, value).await?;
    js::publish_all(&w.js, vec![order(1, "k1", "acct-1")]).await?;
    // The head's resubmission goes through; storing that in the hold finds the other revision.
    let fixed = json!({"key": "k1", "n": 0, "account": "acct-1", "amount": 0});
    resubmit(&w, "other", "APP:1", "k1", fixed).await?;
    s.wait_log(
        "Another instance changed this binding's holds",
        TEST_TIMEOUT,
    )
    .await?;
    s.wait_log("The binding stopped by itself", TEST_TIMEOUT)
        .await?;
    let log = w
        .app
        .wait_for("both orders through", TEST_TIMEOUT, |log| {
            [0, 1]
                .iter()
                .all(|n| log.iter().any(|d| d.ok() && d.n() == *n))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    let first = |n: u64| log.iter().position(|d| d.ok() && d.n() == n);
    assert!(first(0) < first(1), "order 1 went before its head: {log:?}");
    Ok(())
}

/// A held key whose queue holds its head's retry when the sidecar starts (the retry had come while
/// another lineage was the head, and the sidecar stopped before it looked): the start looks into
/// that key's queue and delivers the retry, which releases the key. (Keys whose queue is empty are
/// not looked at on start; this one must be.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_retry_waiting_in_its_queue_is_delivered_on_start() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| {
        if d.n() == 0 && d.header("mend-attempt") == Some("1") {
            Reply::Status(422)
        } else {
            Reply::Ok
        }
    });
    let config = with_top_level(&w.keyed_config("start", ""), "lease_ttl = \"2s\"");
    let mut s = w.sidecar(&config).await?;
    js::publish_all(&w.js, vec![order(0, "k1", "acct-1")]).await?;
    let kv = w.js.get_key_value("mend_holds").await?;
    let token = repair_rules::MessageKey("k1".into()).token();
    let entry = format!("start.{token}");
    let value = wait::until("k1 held", TEST_TIMEOUT, || async {
        Ok(kv.get(&entry).await?)
    })
    .await?;
    let hold: Value = serde_json::from_slice(&value)?;
    s.terminate(std::time::Duration::from_secs(30)).await?;

    // The head's repair, in the key's own queue, as a sidecar appends a retry that came early.
    let mut headers = HeaderMap::new();
    headers.insert("Mend-Id", "APP:1");
    headers.insert("Mend-Attempt", "2");
    headers.insert("Mend-Service", "start");
    headers.insert("Mend-Key", "k1");
    headers.insert("Mend-Original-Subject", "app.created");
    headers.insert("Mend-Repaired-By", "amount-as-number");
    headers.insert(
        "Mend-Hold-Since",
        hold["since"].as_str().unwrap_or_default(),
    );
    headers.insert("Nats-Msg-Id", "APP:1:2:held");
    let fixed = json!({"key": "k1", "n": 0, "account": "acct-1", "amount": 10});
    w.js.publish_with_headers(
        format!("mend.hold.start.{token}"),
        headers,
        Bytes::from(fixed.to_string()),
    )
    .await?
    .await?;

    s.restart().await?;
    s.ready().await?;
    w.app
        .wait_for("the head's retry delivered", TEST_TIMEOUT, |log| {
            log.iter()
                .any(|d| d.ok() && d.n() == 0 && d.header("mend-attempt") == Some("2"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    wait::until("k1 released", TEST_TIMEOUT, || async {
        let hold: Value = match kv.get(&entry).await? {
            Some(v) => serde_json::from_slice(&v)?,
            None => return Ok(Some(())),
        };
        Ok((hold["state"] == "resolved").then_some(()))
    })
    .await?;
    Ok(())
}

/// A head's retry that went through is announced `resolved` even when its sidecar dies right after
/// it: the announcement is stored before the hold's change, since the retry, redelivered to the
/// next sidecar, finds its lineage resolved and is settled without being announced again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_is_announced_when_its_sidecar_dies_right_after_it() -> anyhow::Result<()> {
    const SVC: &str = "dies";
    let w = World::new().await?;
    w.app.script(mend_e2e::app::failing(&[0]));
    let proxy = mend_e2e::proxy::NatsProxy::start(w.nats.port()).await?;
    let direct = with_top_level(
        &w.keyed_config(SVC, "ack_wait = \"3s\"\ntimeout = \"1s\""),
        "lease_ttl = \"2s\"",
    );
    let stalled = mend_e2e::mend::SidecarToml::parse(&direct)
        .set("nats_url", proxy.url())
        .to_string();
    let mut a = w.sidecar(&stalled).await?;
    let out = Out::keyed("app.created", KEY_HEADER, "k", json!({"key": "k", "n": 0}));
    let head = format!("APP:{}", js::publish_all(&w.js, vec![out]).await?[0]);
    entry_in(&w, SVC, "k", "held").await?;

    // The head's repair comes back and goes through; the sidecar's writes stall where it
    // announces that, and it dies there.
    proxy.freeze_on(&format!("mend.events.{SVC}.resolved"));
    resubmit(&w, SVC, &head, "k", json!({"key": "k", "n": 100})).await?;
    wait::until("the announcement held up", TEST_TIMEOUT, || async {
        Ok(proxy.frozen().then_some(()))
    })
    .await?;
    a.kill().await?;

    let _b = w.sidecar(&direct).await?;
    wait::until("the resolution announced", TEST_TIMEOUT, || async {
        let resolved = js::events(&w.js, SVC, "resolved").await?;
        Ok(resolved
            .iter()
            .any(|e| e["data"]["id"] == head.as_str())
            .then_some(()))
    })
    .await?;
    holds_cleared(&w, &w.js).await?;
    Ok(())
}
