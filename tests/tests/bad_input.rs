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

    let good = config.replace("concurrency = \"many\"", "");
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
async fn missing_key_is_delivered_without_order_and_json_keys_work() -> anyhow::Result<()> {
    let w = World::new().await?;
    let msgs = vec![
        Out::keyed(
            "app.k",
            "Other",
            "x",
            serde_json::json!({"account": "a1", "n": 0}),
        ),
        Out::keyed("app.k", "Other", "x", serde_json::json!({"n": 1})),
        Out {
            subject: "app.k".into(),
            headers: async_nats::HeaderMap::new(),
            payload: Bytes::from_static(b"not json"),
        },
    ];
    js::publish_all(&w.js, msgs).await?;
    let config = sidecar_config(
        "jk",
        &w.nats.url(),
        "APP",
        &["app.>"],
        &w.app.endpoint(),
        "key = { json = \"/account\" }",
    );
    let _s = w.sidecar(&config).await?;
    let log = w
        .app
        .wait_for("three deliveries", TEST_TIMEOUT, |log| log.len() >= 3)
        .await?;
    w.drained("jk").await?;
    let keyed: Vec<_> = log.iter().filter_map(|d| d.header("mend-key")).collect();
    assert_eq!(keyed, vec!["a1"]);
    Ok(())
}
