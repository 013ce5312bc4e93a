//! Poison tolerance (SPEC §8.5): messages published by a raw-protocol producer with header bytes
//! mend's NATS client cannot read. Each ends parked with its header block kept, its key held
//! behind it, and every other key (and the messages lost in transit with it) keeps flowing long
//! before any ack wait runs out.

use std::time::Duration;

use base64::Engine as _;
use mend_e2e::js::{self, Out};
use mend_e2e::world::{KEY_HEADER, World};
use serde_json::json;

/// Far longer than the test may take: nothing may wait for a redelivery.
const ACK_WAIT: &str = "ack_wait = \"120s\"";
/// How long everything may take.
const PROMPT: Duration = Duration::from_secs(30);

fn keyed(key: &str, n: u64) -> Out {
    Out::keyed("app.created", KEY_HEADER, key, json!({"key": key, "n": n}))
}

/// Waits until the messages of keys k1..k6 (`n` 1 to 6) were delivered; `logs` says why not.
async fn others_delivered(w: &World, logs: &dyn Fn() -> String) -> anyhow::Result<()> {
    w.app
        .wait_for("every other key delivered", PROMPT, |log| {
            (1..=6u64).all(|n| {
                log.iter()
                    .any(|d| d.ok() && d.field("n") == Some(&json!(n)))
            })
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))?;
    Ok(())
}

/// Waits until a message of key `key` of service `orders` is parked; its envelope.
async fn parked_of(
    w: &World,
    key: &str,
    logs: &dyn Fn() -> String,
) -> anyhow::Result<repair_rules::envelope::FailureEnvelope> {
    mend_e2e::wait::until(&format!("{key} parked"), PROMPT, || async {
        let parked = js::parked(&w.js, "orders").await?;
        Ok(parked.into_iter().find(|e| e.key.as_deref() == Some(key)))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_headers_are_parked_and_nothing_else_stalls() -> anyhow::Result<()> {
    let w = World::new().await?;
    let s = w.sidecar(&w.keyed_config("px", ACK_WAIT)).await?;
    let port = w.nats.port();
    js::publish_all(&w.js, vec![keyed("k1", 0)]).await?;
    w.app
        .wait_for("the first delivery", PROMPT, |log| !log.is_empty())
        .await?;

    // A value that is not UTF-8 (Latin-1 é): the client drops its connection on it.
    js::publish_raw(
        port,
        "app.created",
        &[b"Account-Id: k1", b"Customer: Jos\xe9"],
        br#"{"key": "k1", "n": 1}"#,
    )
    .await?;
    let after = js::publish_all(&w.js, vec![keyed("k1", 2), keyed("k2", 3)]).await?;
    // A bare CR inside a value: the client's connection task panics on it.
    js::publish_raw(
        port,
        "app.created",
        &[b"Account-Id: k3", b"Note: ab\rcd"],
        br#"{"key": "k3", "n": 4}"#,
    )
    .await?;
    js::publish_all(&w.js, vec![keyed("k3", 5), keyed("k4", 6), keyed("k5", 7)]).await?;

    // Every other key flows, well within the ack wait.
    let log = w
        .app
        .wait_for("k2, k4 and k5 delivered", PROMPT, |log| {
            [3, 6, 7]
                .iter()
                .all(|n| log.iter().any(|d| d.field("n") == Some(&json!(n))))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    let ns: Vec<_> = log.iter().filter_map(|d| d.field("n").cloned()).collect();
    for poisoned in [1, 4] {
        assert!(
            !ns.contains(&json!(poisoned)),
            "a poison message was delivered: {ns:?}"
        );
    }

    // Both are parked with their header blocks, and their keys hold what came after them.
    let parked = mend_e2e::wait::until("two parked", PROMPT, || async {
        let p = js::parked(&w.js, "px").await?;
        Ok((p.len() >= 2).then_some(p))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    for (e, key, raw) in [
        (&parked[0], "k1", &b"Customer: Jos\xe9"[..]),
        (&parked[1], "k3", &b"Note: ab\rcd"[..]),
    ] {
        assert_eq!(e.key.as_deref(), Some(key));
        assert_eq!(e.error.code.as_deref(), Some("mend_unreadable_headers"));
        let block = b64.decode(e.headers_base64.as_deref().expect("header block"))?;
        assert!(block.windows(raw.len()).any(|w| w == raw), "{block:?}");
        assert_eq!(e.headers["Account-Id"], vec![key.to_owned()]);
        assert!(e.payload["n"].is_u64());
    }
    // k1's and k3's later messages wait behind their parked heads.
    assert!(!ns.contains(&json!(2)) && !ns.contains(&json!(5)), "{ns:?}");
    let queue = format!(
        "mend.hold.px.{}",
        repair_rules::MessageKey("k1".into()).token()
    );
    mend_e2e::wait::until("k1's later message in its hold queue", PROMPT, || async {
        let held = js::read_all(&w.js, "MEND_HOLD", &queue).await?;
        anyhow::ensure!(held.len() <= 1, "{} copies held", held.len());
        Ok((held.len() == 1).then_some(()))
    })
    .await?;
    assert_eq!(after.len(), 2);
    js::consumer_drained(&w.js, "APP", "mend-px-px", PROMPT).await?;
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{}", s.log());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_cr_kills_only_the_pull_connection_which_is_rebuilt() -> anyhow::Result<()> {
    let w = World::new().await?;
    let s = w.sidecar(&w.keyed_config("cr", ACK_WAIT)).await?;
    js::publish_all(&w.js, vec![keyed("a", 0)]).await?;
    w.app
        .wait_for("the first delivery", PROMPT, |log| !log.is_empty())
        .await?;
    // Alone on an idle connection: it reaches the client, whose connection task dies on it.
    js::publish_raw(
        w.nats.port(),
        "app.created",
        &[b"Account-Id: b", b"Note: line\rbreak"],
        br#"{"key": "b", "n": 1}"#,
    )
    .await?;
    let parked = mend_e2e::wait::until("the poison parked", PROMPT, || async {
        Ok(js::parked(&w.js, "cr").await?.pop())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    assert_eq!(
        parked.error.code.as_deref(),
        Some("mend_unreadable_headers")
    );
    assert!(
        parked
            .error
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("bare CR")),
        "{parked:?}"
    );
    // A header value with a NUL is readable: delivered like any message.
    js::publish_raw(
        w.nats.port(),
        "app.created",
        &[b"Account-Id: c", b"Note: nul\x00here"],
        br#"{"key": "c", "n": 2}"#,
    )
    .await?;
    // The sidecar pulls again (a new connection) and the acks of the main one went on.
    js::publish_all(&w.js, (3..13).map(|n| keyed(&format!("k{n}"), n)).collect()).await?;
    w.app
        .wait_for("everything else delivered", PROMPT, |log| {
            (2..13).all(|n| log.iter().any(|d| d.field("n") == Some(&json!(n))))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", s.log()))?;
    js::consumer_drained(&w.js, "APP", "mend-cr-cr", PROMPT).await?;
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{}", s.log());
    }
    assert!(
        s.log().contains("connecting anew") || s.log().contains("Deliveries lost"),
        "{}",
        s.log()
    );
    Ok(())
}

/// An app error that fills its 64 KiB answer, twice in one lineage: error and history together
/// would pass the server's max_payload (128 KiB here) in the envelope, even with the payload left
/// out. They are cut to fit, so the message is repaired, fails again and is parked like any other,
/// and every other key keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grown_errors_and_history_are_cut_to_fit_and_the_message_parks() -> anyhow::Result<()> {
    let nats = mend_e2e::nats::NatsServer::start_with_max_payload(128 * 1024).await?;
    let w = World::with_server(nats).await?;
    let huge = "x".repeat(60 * 1024);
    w.app.script(move |d| {
        if d.field("key") != Some(&json!("big")) {
            return mend_e2e::app::Reply::Ok;
        }
        // First the amount (the example rules repair it), then the account (they park it).
        let code = if d.field("amount").is_some_and(|a| a.is_string()) {
            "bad_type"
        } else {
            "unknown_account"
        };
        mend_e2e::app::Reply::Problem(
            422,
            json!({"title": "rejected", "code": code, "field": "/amount", "detail": huge}),
        )
    });
    let config =
        mend_e2e::mend::processor_config(&w.nats.url(), &mend_e2e::mend::example_rules(), "");
    let p = mend_e2e::mend::MendProcess::start("processor", &config).await?;
    p.ready().await?;
    let s = w.sidecar(&w.keyed_config("orders", ACK_WAIT)).await?;
    let big = Out::keyed(
        "app.created",
        KEY_HEADER,
        "big",
        json!({"key": "big", "n": 0, "account": "big", "amount": "12.5"}),
    );
    let others: Vec<Out> = (1..=6).map(|n| keyed(&format!("k{n}"), n)).collect();
    js::publish_all(&w.js, std::iter::once(big).chain(others).collect()).await?;

    let logs = || format!("sidecar log:\n{}\nprocessor log:\n{}", s.log(), p.log());
    others_delivered(&w, &logs).await?;
    let parked = parked_of(&w, "big", &logs).await?;
    assert_eq!(parked.error.code.as_deref(), Some("unknown_account"));
    let detail = parked.error.detail.as_deref().unwrap_or_default();
    assert!(
        detail.len() <= repair_rules::envelope::ERROR_TEXT_LIMIT && detail.ends_with('…'),
        "{} bytes",
        detail.len()
    );
    let steps: Vec<&str> = parked.history.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(steps, ["delegated", "repaired", "delegated", "parked"]);
    assert_eq!(
        parked.payload["amount"],
        json!(12.5),
        "the repaired payload is kept"
    );
    Ok(())
}

/// A message at the server's max_payload (128 KiB here) on a held key has no room for the headers
/// of its hold queue's copy: its payload is kept as an object and the copy names it. It is acked
/// at once like any held message (the key's later messages do not overtake it), and its release
/// delivers it with its bytes intact, in order; the object goes once it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_at_max_payload_on_a_held_key_is_held_and_released_intact() -> anyhow::Result<()>
{
    const MAX: usize = 128 * 1024;
    let nats = mend_e2e::nats::NatsServer::start_with_max_payload(MAX).await?;
    let w = World::with_server(nats).await?;
    w.app.script(|d| {
        if d.field("n") == Some(&json!(0)) {
            mend_e2e::app::Reply::Status(422)
        } else {
            mend_e2e::app::Reply::Ok
        }
    });
    let s = w.sidecar(&w.keyed_config("mx", ACK_WAIT)).await?;
    let head = js::publish_all(&w.js, vec![keyed("big", 0)]).await?[0];
    mend_e2e::wait::until("the head delegated", PROMPT, || async {
        Ok((js::failed(&w.js, "mx").await?.len() == 1).then_some(()))
    })
    .await?;

    // The whole message (its header block and payload) is exactly max_payload.
    let mut big = keyed("big", 1);
    let header_block = format!("NATS/1.0\r\n{KEY_HEADER}: big\r\n\r\n").len();
    let pad = MAX - header_block - br#"{"key":"big","n":1,"pad":""}"#.len();
    big.payload = bytes::Bytes::from(serde_json::to_vec(
        &json!({"key": "big", "n": 1, "pad": "p".repeat(pad)}),
    )?);
    assert_eq!(big.payload.len() + header_block, MAX);
    let sent = big.payload.clone();
    let seqs = js::publish_all(&w.js, vec![big, keyed("big", 2), keyed("k1", 3)]).await?;
    let logs = || format!("sidecar log:\n{}", s.log());
    w.app
        .wait_for("another key delivered", PROMPT, |log| {
            log.iter().any(|d| d.field("n") == Some(&json!(3)))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))?;
    // Every message was taken: the large one is held like the other.
    js::consumer_drained(&w.js, "APP", "mend-mx-mx", PROMPT)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))?;

    let discard =
        json!({"action": "discard", "key": "big", "id": format!("APP:{head}"), "by": "test"});
    w.js.publish("mend.control.mx", discard.to_string().into())
        .await?
        .await?;
    let log = w
        .app
        .wait_for("the held messages released", PROMPT, |log| {
            log.iter().any(|d| d.field("n") == Some(&json!(2)))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))?;
    let big_ones: Vec<u64> = log
        .iter()
        .filter(|d| d.field("key") == Some(&json!("big")) && d.ok())
        .map(|d| d.field("n").and_then(|n| n.as_u64()).unwrap_or(u64::MAX))
        .collect();
    assert_eq!(big_ones, [1, 2], "in order, once each");
    let delivered = log
        .iter()
        .find(|d| d.field("n") == Some(&json!(1)))
        .expect("the large message");
    assert_eq!(delivered.body, sent, "its bytes intact");
    assert!(
        s.log().contains("its payload is kept as an object"),
        "{}",
        logs()
    );
    // Once delivered, its object is deleted.
    let bucket = w.js.get_object_store("mend_payloads").await?;
    let name = format!("APP/{}/1/held", seqs[0]);
    mend_e2e::wait::until("the payload object deleted", PROMPT, || async {
        Ok(bucket.get(&name).await.is_err().then_some(()))
    })
    .await?;
    Ok(())
}

/// A retry whose `Mend-History` has grown to over 50 KiB (a long-lived lineage, or a producer that
/// wrote it) on a server whose max_payload is 64 KiB: with the app's error it would no longer fit
/// in an envelope. The history travels on cut to its first step, an `omitted` step that counts the
/// steps left out, and its newest steps; the message is parked like any other, and every other key
/// keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_grown_past_max_payload_is_cut_and_the_message_parks() -> anyhow::Result<()> {
    let nats = mend_e2e::nats::NatsServer::start_with_max_payload(64 * 1024).await?;
    let w = World::with_server(nats).await?;
    let detail = "y".repeat(8 * 1024);
    w.app.script(move |d| {
        if d.field("key") != Some(&json!("old")) {
            return mend_e2e::app::Reply::Ok;
        }
        mend_e2e::app::Reply::Problem(
            422,
            json!({"title": "rejected", "code": "unknown_account", "detail": detail}),
        )
    });
    let config =
        mend_e2e::mend::processor_config(&w.nats.url(), &mend_e2e::mend::example_rules(), "");
    let p = mend_e2e::mend::MendProcess::start("processor", &config).await?;
    p.ready().await?;
    let s = w.sidecar(&w.keyed_config("orders", ACK_WAIT)).await?;

    let step = |i: usize| {
        json!({"at": "2026-12-01T00:00:00Z", "what": "repaired", "by": format!("rule-{i}"),
               "note": "n".repeat(300)})
    };
    let history: Vec<serde_json::Value> = (0..150).map(step).collect();
    let history = serde_json::to_string(&history)?;
    assert!(history.len() > 50 * 1024 && history.len() < 62 * 1024);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Mend-Id", "APP:999");
    headers.insert("Mend-Attempt", "7");
    headers.insert("Mend-Key", "old");
    headers.insert("Mend-Original-Subject", "app.created");
    headers.insert("Mend-History", history.as_str());
    headers.insert("Nats-Msg-Id", "APP:999:7:repaired");
    let payload = json!({"key": "old", "n": 0, "account": "old", "amount": 1});
    w.js.publish_with_headers("mend.retry.orders", headers, payload.to_string().into())
        .await?
        .await?;
    let others: Vec<Out> = (1..=6).map(|n| keyed(&format!("k{n}"), n)).collect();
    js::publish_all(&w.js, others).await?;

    let logs = || format!("sidecar log:\n{}\nprocessor log:\n{}", s.log(), p.log());
    others_delivered(&w, &logs).await?;
    let parked = parked_of(&w, "old", &logs).await?;
    let size = serde_json::to_vec(&parked.history)?.len();
    assert!(
        size <= 2 * repair_rules::envelope::HISTORY_LIMIT,
        "{size} bytes of history"
    );
    let steps: Vec<&str> = parked.history.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(steps.first(), Some(&"repaired"), "{steps:?}");
    assert!(
        steps.contains(&repair_rules::envelope::OMITTED),
        "{steps:?}"
    );
    assert_eq!(&steps[steps.len() - 2..], ["delegated", "parked"]);
    assert_eq!(parked.payload["account"], "old", "the payload is kept");
    Ok(())
}

/// A message at max_payload (128 KiB here) on a work-queue stream fails and is parked by
/// reference: its bytes are kept in `mend_payloads`, as its original leaves the stream once acked.
/// The dashboard shows it and resubmits it unedited: the retry, too large to publish with its
/// headers, goes by reference as well, and the app receives the original bytes as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_message_at_max_payload_is_resubmitted_intact_from_a_work_queue()
-> anyhow::Result<()> {
    use async_nats::jetstream::stream;
    const MAX: usize = 128 * 1024;
    let nats = mend_e2e::nats::NatsServer::start_with_max_payload(MAX).await?;
    let w = World::with_server(nats).await?;
    w.js.create_stream(stream::Config {
        name: "WQ".to_owned(),
        subjects: vec!["wq.>".to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await?;
    w.app.script(|d| {
        if d.header("mend-attempt") == Some("1") {
            mend_e2e::app::Reply::Problem(422, json!({"title": "no", "code": "unknown_account"}))
        } else {
            mend_e2e::app::Reply::Ok
        }
    });
    let config =
        mend_e2e::mend::processor_config(&w.nats.url(), &mend_e2e::mend::example_rules(), "");
    let p = mend_e2e::mend::MendProcess::start("processor", &config).await?;
    p.ready().await?;
    let config = mend_e2e::mend::sidecar_config(
        "wq",
        &w.nats.url(),
        "WQ",
        &["wq.>"],
        &w.app.endpoint(),
        &format!("key = {{ header = \"{KEY_HEADER}\" }}\n{ACK_WAIT}"),
    );
    let s = w.sidecar(&config).await?;
    let dashboard = mend_e2e::dashboard::Dashboard::start(&w.nats.url(), "").await?;

    let mut big = Out::keyed("wq.created", KEY_HEADER, "big", json!({}));
    let header_block = format!("NATS/1.0\r\n{KEY_HEADER}: big\r\n\r\n").len();
    let pad = MAX - header_block - br#"{"key":"big","pad":""}"#.len();
    big.payload = bytes::Bytes::from(serde_json::to_vec(
        &json!({"key": "big", "pad": "p".repeat(pad)}),
    )?);
    let sent = big.payload.clone();
    js::publish_all(&w.js, vec![big]).await?;
    let logs = || format!("sidecar log:\n{}\nprocessor log:\n{}", s.log(), p.log());
    let parked = dashboard
        .wait_messages("status=parked", 1, PROMPT)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))?;
    let id = parked[0]["id"].as_str().unwrap_or_default().to_owned();
    assert!(
        parked[0]["payload_ref"]["object"].is_string(),
        "{}",
        parked[0]
    );
    mend_e2e::wait::until("the original gone from the work queue", PROMPT, || async {
        let mut wq = w.js.get_stream("WQ").await?;
        Ok((wq.info().await?.state.messages == 0).then_some(()))
    })
    .await?;

    let (status, body) = dashboard
        .post(
            &format!("/api/messages/{id}/resubmit"),
            Some(mend_e2e::dashboard::OPERATOR_TOKEN),
            &json!({"note": "as it was"}),
        )
        .await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let log = w
        .app
        .wait_for("attempt 2 delivered", PROMPT, |log| {
            log.iter()
                .any(|d| d.ok() && d.header("mend-attempt") == Some("2"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))?;
    let second = log
        .iter()
        .find(|d| d.header("mend-attempt") == Some("2"))
        .expect("attempt 2");
    assert_eq!(second.body, sent, "its bytes intact");
    assert!(second.header("mend-payload-object").is_none());
    Ok(())
}
