//! Bad input gets a clear error and loses nothing: bad config, a missing stream, unreachable NATS,
//! non-JSON and oversize payloads.

use bytes::Bytes;
use mend_e2e::app::Reply;
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{free_port, refused, sidecar_config};
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_exits_64_naming_file_line_and_key() -> anyhow::Result<()> {
    let config = sidecar_config(
        "x",
        "nats://127.0.0.1:1",
        "APP",
        &["app.>"],
        "http://127.0.0.1:1/",
        "concurrency = \"many\"",
    );
    let (code, log) = refused(&config, &[]).await?;
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("sidecar.toml:11: key `concurrency`"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    let good = sidecar_config(
        "x",
        "nats://127.0.0.1:1",
        "APP",
        &["app.>"],
        "http://127.0.0.1:1/",
        "",
    );
    let (code, log) = refused(&good, &[("MEND_BINDING_X_TIMEOUT", "soon")]).await?;
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("MEND_BINDING_X_TIMEOUT"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nats_exits_69_with_a_clear_error() -> anyhow::Result<()> {
    let port = free_port();
    let config = sidecar_config(
        "x",
        &format!("nats://127.0.0.1:{port}"),
        "APP",
        &["app.>"],
        "http://127.0.0.1:1/",
        "",
    );
    let (code, log) = refused(&config, &[]).await?;
    assert_eq!(code, Some(69), "{log}");
    assert!(
        log.contains(&format!(
            "cannot connect to NATS at nats://127.0.0.1:{port}"
        )),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_app_stream_exits_69_and_creates_nothing_of_the_app() -> anyhow::Result<()> {
    let w = World::new().await?;
    let config = sidecar_config(
        "x",
        &w.nats.url(),
        "NOPE",
        &["nope.>"],
        &w.app.endpoint(),
        "",
    );
    let (code, log) = refused(&config, &[]).await?;
    assert_eq!(code, Some(69), "{log}");
    assert!(log.contains("the app stream NOPE does not exist"), "{log}");
    assert!(
        w.js.get_stream("NOPE").await.is_err(),
        "mend must not create the app's stream"
    );
    // mend's own layout is there, created idempotently.
    for s in [
        "MEND_FAILED",
        "MEND_RETRY",
        "MEND_HOLD",
        "MEND_PARKED",
        "MEND_CONTROL",
        "MEND_EVENTS",
    ] {
        w.js.get_stream(s)
            .await
            .map_err(|e| anyhow::anyhow!("{s}: {e}"))?;
    }
    w.js.get_key_value("mend_holds").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_payload_is_delegated_as_base64() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| {
        if d.json.is_none() {
            Reply::Status(400)
        } else {
            Reply::Ok
        }
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(KEY_HEADER, "bin");
    headers.insert("Content-Type", "application/octet-stream");
    let raw: &[u8] = &[0xde, 0xad, 0xbe, 0xef, b'{'];
    js::publish_all(
        &w.js,
        vec![Out {
            subject: "app.raw".into(),
            headers,
            payload: Bytes::from_static(raw),
        }],
    )
    .await?;
    let _s = w.sidecar(&w.keyed_config("bin", "")).await?;
    let log = w
        .app
        .wait_for("the delivery", TEST_TIMEOUT, |log| !log.is_empty())
        .await?;
    assert_eq!(
        log[0].header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(&log[0].body[..], raw);
    w.drained("bin").await?;
    let failed = js::failed(&w.js, "bin").await?;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].payload, serde_json::Value::Null);
    assert_eq!(failed[0].payload_base64.as_deref(), Some("3q2+73s="));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_payload_is_delegated_by_reference() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| {
        if d.body.len() > 1000 {
            Reply::Status(413)
        } else {
            Reply::Ok
        }
    });
    let big = vec![b'z'; 900 * 1024]; // not JSON: base64 would exceed the 1 MiB max payload
    let msgs = vec![
        Out::keyed("app.big", KEY_HEADER, "b", serde_json::json!({"n": 0})),
        Out {
            subject: "app.big".into(),
            headers: {
                let mut h = async_nats::HeaderMap::new();
                h.insert(KEY_HEADER, "b");
                h
            },
            payload: Bytes::from(big),
        },
        // Another key: the failed big one holds key b.
        Out::keyed("app.big", KEY_HEADER, "c", serde_json::json!({"n": 2})),
    ];
    let seqs = js::publish_all(&w.js, msgs).await?;
    let s = w.sidecar(&w.keyed_config("big", "")).await?;
    w.app
        .wait_for("three deliveries", TEST_TIMEOUT, |log| log.len() >= 3)
        .await?;
    w.drained("big").await?;
    let failed = js::failed(&w.js, "big").await?;
    assert_eq!(failed.len(), 1);
    let r = failed[0]
        .payload_ref
        .as_ref()
        .expect("a reference to the payload");
    assert_eq!(
        (r.stream.as_str(), r.seq, r.size),
        ("APP", seqs[1], 900 * 1024)
    );
    assert_eq!(failed[0].error.status, Some(413));
    assert!(!s.log().contains("panicked"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_is_delivered_without_order_and_an_unreadable_one_is_parked()
-> anyhow::Result<()> {
    let w = World::new().await?;
    let json = |v: serde_json::Value| Out::keyed("app.k", "Other", "x", v);
    let raw = |bytes: Vec<u8>| Out {
        subject: "app.k".into(),
        headers: async_nats::HeaderMap::new(),
        payload: Bytes::from(bytes),
    };
    // Nested deeper than any JSON reader of the sidecar goes (serde_json stops at 128).
    let deep = format!(
        "{}{{\"account\": \"a1\"}}{}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let msgs = vec![
        json(serde_json::json!({"account": "a1", "n": 0})),
        // No key: delivered without order.
        json(serde_json::json!({"n": 1})),
        json(serde_json::json!({"account": null, "n": 2})),
        // A key that cannot be read: parked, never delivered outside its key's order.
        raw(b"not json".to_vec()),
        raw(deep.into_bytes()),
        json(serde_json::json!({"account": {"id": "a1"}, "n": 5})),
        json(serde_json::json!({"account": 7, "n": 6})),
    ];
    let seqs = js::publish_all(&w.js, msgs).await?;
    let config = sidecar_config(
        "jk",
        &w.nats.url(),
        "APP",
        &["app.>"],
        &w.app.endpoint(),
        "key = { json = \"/account\" }",
    );
    let s = w.sidecar(&config).await?;
    let log = w
        .app
        .wait_for("four deliveries", TEST_TIMEOUT, |log| log.len() >= 4)
        .await?;
    w.drained("jk").await?;
    assert_eq!(w.app.log().len(), 4, "unreadable keys are not delivered");
    let mut keyed: Vec<_> = log.iter().filter_map(|d| d.header("mend-key")).collect();
    keyed.sort();
    assert_eq!(keyed, vec!["7", "a1"]);
    let mut parked = js::parked(&w.js, "jk").await?;
    parked.sort_by_key(|e| e.seq);
    assert_eq!(
        parked.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![seqs[3], seqs[4], seqs[5]]
    );
    for e in &parked {
        assert_eq!(
            e.error.code.as_deref(),
            Some("mend_unreadable_key"),
            "{e:?}"
        );
        assert_eq!(e.key, None);
        assert!(
            e.reason
                .as_deref()
                .is_some_and(|r| r.contains("key cannot be read"))
        );
    }
    // The bytes are kept: the non-JSON payloads as base64.
    assert_eq!(parked[0].payload_base64.as_deref(), Some("bm90IGpzb24="));
    assert!(parked[1].payload_base64.is_some());
    assert!(!s.log().contains("panicked"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_no_binding_takes_is_parked_as_its_lineage_next_attempt() -> anyhow::Result<()> {
    let w = World::new().await?;
    let _s = w.sidecar(&w.keyed_config("ur", "")).await?;
    // A retry of a lineage of a stream this sidecar does not consume (a binding removed, say),
    // at its third delivery with the history so far.
    let history = serde_json::json!([
        {"at": "2026-11-22T10:00:00Z", "what": "delegated", "by": "sidecar"},
        {"at": "2026-11-22T10:00:01Z", "what": "repaired", "by": "rule:x"},
    ]);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Mend-Id", "GONE:41");
    headers.insert("Mend-Attempt", "3");
    headers.insert("Mend-Key", "acct-9");
    headers.insert("Mend-Original-Subject", "gone.created");
    headers.insert("Mend-History", history.to_string().as_str());
    headers.insert("Account-Id", "acct-9");
    w.js.publish_with_headers("mend.retry.ur", headers, r#"{"n": 1}"#.into())
        .await?
        .await?;
    let parked = mend_e2e::wait::until("the retry parked", TEST_TIMEOUT, || async {
        Ok(js::parked(&w.js, "ur").await?.pop())
    })
    .await?;
    assert_eq!(parked.id, "GONE:41");
    assert_eq!(
        parked.attempt, 3,
        "the lineage's attempt, not a first parking"
    );
    assert_eq!(parked.key.as_deref(), Some("acct-9"));
    assert_eq!(parked.subject, "gone.created");
    assert_eq!(parked.history.len(), 3);
    assert_eq!(parked.first_failed_at, "2026-11-22T10:00:00Z");
    assert_eq!(parked.history[2].what, "parked");
    assert!(parked.headers.contains_key("Account-Id"));
    assert!(!parked.headers.keys().any(|k| k.starts_with("Mend-")));
    Ok(())
}
