//! The dashboard end to end (SPEC §9): real nats-server, sidecar, processor, dashboard (SQLite) and
//! app. Parked messages reach the API; a fixed and resubmitted head of a held key is delivered,
//! then its held messages in order, and the status becomes `resolved`; discarding a head releases
//! its key; bulk resubmission goes canary first; bad requests are refused and change nothing; a
//! dashboard killed during ingest loses and duplicates nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mend_e2e::app::Reply;
use mend_e2e::dashboard::{
    ADMIN_TOKEN, Dashboard, OPERATOR_TOKEN, Stack, VIEWER_TOKEN, delivered, order, park_directly,
};
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{MendProcess, example_rules, processor_config};
use mend_e2e::wait;
use mend_e2e::world::{TEST_TIMEOUT, World};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Waits until key `key` of service `app` is held with `count` messages waiting.
async fn wait_held(d: &Dashboard, key: &str, count: u64) -> anyhow::Result<Value> {
    wait::until(
        &format!("{key} held with {count}"),
        TEST_TIMEOUT,
        || async {
            let holds = d.ok("/api/holds").await?;
            Ok(holds["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|h| h["key"] == key && h["count"] == count)
                .cloned())
        },
    )
    .await
}

#[tokio::test]
async fn fixed_and_resubmitted_head_is_delivered_then_its_held_messages_in_order() {
    let s = Stack::start(None, "").await.unwrap();
    let (world, d) = (&s.world, &s.dashboard);
    let mut msgs = vec![order("k1", 0, "nobody")];
    msgs.extend((1..5).map(|n| order("k1", n, "acct-1")));
    msgs.extend((0..3).map(|n| order("k2", n, "acct-2")));
    js::publish_all(&world.js, msgs).await.unwrap();

    let parked = d
        .wait_messages("status=parked", 1, TEST_TIMEOUT)
        .await
        .unwrap();
    let m = &parked[0];
    let id = m["id"].as_str().unwrap().to_owned();
    assert_eq!(m["service"], "app");
    assert_eq!(m["key"], "k1");
    assert_eq!(m["subject"], "app.created");
    assert_eq!(m["payload"]["account"], "nobody");
    assert_eq!(m["error"]["code"], "unknown_account");
    assert!(
        m["reason"].as_str().unwrap().contains("account not found"),
        "{m}"
    );
    assert!(m["history"].as_array().unwrap().len() >= 2, "{m}");
    let hold = wait_held(d, "k1", 4).await.unwrap();
    assert_eq!(hold["head"], id.as_str());
    // Other keys go on; k1's later messages wait.
    world
        .app
        .wait_for("k2 delivered", TEST_TIMEOUT, |log| {
            delivered(log, "k2") == [0, 1, 2]
        })
        .await
        .unwrap();
    assert!(delivered(&world.app.log(), "k1").is_empty());

    // Fix the account and resubmit.
    let (status, body) = d
        .post(
            &format!("/api/messages/{id}/resubmit"),
            Some(OPERATOR_TOKEN),
            &json!({"payload": {"key": "k1", "n": 0, "account": "acct-1", "amount": 10}, "note": "right account"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    // Resolved already, when the retry went through before the answer.
    assert!(
        body["status"] == "resubmitted" || body["status"] == "resolved",
        "{body}"
    );
    assert_eq!(body["attempt"], 2);
    assert_eq!(body["payload"]["account"], "acct-1", "shown as sent");

    let log = world
        .app
        .wait_for("k1 delivered in order", TEST_TIMEOUT, |log| {
            delivered(log, "k1") == [0, 1, 2, 3, 4]
        })
        .await
        .unwrap();
    let fixed = log
        .iter()
        .find(|x| x.ok() && x.field("key") == Some(&json!("k1")) && x.n() == 0)
        .unwrap();
    assert_eq!(fixed.mend_id(), id);
    assert_eq!(fixed.header("mend-attempt"), Some("2"));
    assert_eq!(fixed.header("mend-resubmitted-by"), Some("token:ops"));
    assert_eq!(fixed.field("account"), Some(&json!("acct-1")));

    let m = d.wait_status(&id, "resolved", TEST_TIMEOUT).await.unwrap();
    let kinds: Vec<&str> = m["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"resubmitted") && kinds.contains(&"resolved"),
        "{kinds:?}"
    );

    let audit = d.ok("/api/audit").await.unwrap();
    let a = &audit["items"][0];
    assert_eq!(a["action"], "edit_and_resubmit");
    assert_eq!(a["actor"], "token:ops");
    assert_eq!(a["message_id"], id.as_str());
    assert_eq!(a["note"], "right account");
    assert!(a["before"].as_str().unwrap().contains("nobody"), "{a}");
    assert!(a["after"].as_str().unwrap().contains("acct-1"), "{a}");
    // The hold is gone once released.
    wait::until("k1 no longer held", TEST_TIMEOUT, || async {
        let holds = d.ok("/api/holds").await?;
        Ok(holds["items"]
            .as_array()
            .is_some_and(|a| a.is_empty())
            .then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn discarding_a_head_releases_its_key_and_release_gives_up_order() {
    let s = Stack::start(None, "").await.unwrap();
    let (world, d) = (&s.world, &s.dashboard);
    let mut msgs = vec![order("k3", 0, "nobody")];
    msgs.extend((1..3).map(|n| order("k3", n, "acct-3")));
    msgs.push(order("k4", 0, "nobody"));
    msgs.extend((1..3).map(|n| order("k4", n, "acct-4")));
    js::publish_all(&world.js, msgs).await.unwrap();
    let parked = d
        .wait_messages("status=parked", 2, TEST_TIMEOUT)
        .await
        .unwrap();
    let id_of = |key: &str| mend_e2e::dashboard::id_of_key(&parked, key);
    wait_held(d, "k3", 2).await.unwrap();
    wait_held(d, "k4", 2).await.unwrap();

    // Discard k3's head: its held messages are delivered, the head never is.
    let (status, body) = d
        .post(
            &format!("/api/messages/{}/discard", id_of("k3")),
            Some(OPERATOR_TOKEN),
            &json!({"note": "duplicate order"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "discarded");
    world
        .app
        .wait_for("k3 released", TEST_TIMEOUT, |log| {
            delivered(log, "k3") == [1, 2]
        })
        .await
        .unwrap();

    // Release k4 by hand: its held messages go, the head stays parked.
    let (status, body) = d
        .post(
            "/api/holds/app/k4/release",
            Some(OPERATOR_TOKEN),
            &json!({"note": "order does not matter here"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    world
        .app
        .wait_for("k4 released", TEST_TIMEOUT, |log| {
            delivered(log, "k4") == [1, 2]
        })
        .await
        .unwrap();
    let m = d
        .ok(&format!("/api/messages/{}", id_of("k4")))
        .await
        .unwrap();
    assert_eq!(m["status"], "parked");
    let audit = d.ok("/api/audit").await.unwrap();
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["release", "discard"]);
    // A key that is not held cannot be released.
    let (status, body) = d
        .post(
            "/api/holds/app/k9/release",
            Some(OPERATOR_TOKEN),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Discarding what is no longer parked is a conflict.
    let (status, body) = d
        .post(
            &format!("/api/messages/{}/discard", id_of("k3")),
            Some(OPERATOR_TOKEN),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
}

#[tokio::test]
async fn group_resubmission_goes_canary_first() {
    let s = Stack::start(None, "bulk_rate = 50\ncanary_timeout = \"30s\"")
        .await
        .unwrap();
    let (world, d) = (&s.world, &s.dashboard);
    // The accounts do not exist yet: all four are parked alike (one group).
    let fixed = Arc::new(AtomicBool::new(false));
    let f = fixed.clone();
    world.app.script(move |d| {
        if f.load(Ordering::SeqCst) && d.field("account") == Some(&json!("nobody")) {
            return Reply::Ok;
        }
        mend_e2e::app::order_problem(d).unwrap_or(Reply::Ok)
    });
    let msgs = (0..4)
        .map(|i| order(&format!("g{i}"), 0, "nobody"))
        .collect();
    js::publish_all(&world.js, msgs).await.unwrap();
    d.wait_messages("status=parked", 4, TEST_TIMEOUT)
        .await
        .unwrap();
    let groups = d.ok("/api/groups").await.unwrap();
    assert_eq!(groups["items"].as_array().unwrap().len(), 1, "{groups}");
    let group = groups["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(groups["items"][0]["count"], 4);

    // While the app still fails them, the canary fails again and the rest are not sent.
    let done = d.resubmit_group(&group, &json!({})).await.unwrap();
    assert_eq!(done["state"], "canary_failed", "{done}");
    assert_eq!(done["done"], 1);
    let resubmitted = world
        .app
        .log()
        .iter()
        .filter(|x| x.header("mend-resubmitted-by").is_some())
        .count();
    assert_eq!(resubmitted, 1, "only the canary was sent");
    d.wait_messages("status=parked", 4, TEST_TIMEOUT)
        .await
        .unwrap();

    // Once the accounts exist, the canary goes through and so do the rest.
    fixed.store(true, Ordering::SeqCst);
    let done = d
        .resubmit_group(&group, &json!({"note": "accounts created"}))
        .await
        .unwrap();
    assert_eq!(done["state"], "finished", "{done}");
    assert_eq!(done["done"], 4, "{done}");
    d.wait_messages("status=resolved", 4, TEST_TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let s = Stack::start(None, "max_body_bytes = 4096\nmask = [\"/account\"]")
        .await
        .unwrap();
    let (world, d) = (&s.world, &s.dashboard);
    let id = d
        .park_one(&world.js, order("k5", 0, "nobody"))
        .await
        .unwrap();
    let resubmit = format!("/api/messages/{id}/resubmit");
    let retry_seq = || async {
        let info = world
            .js
            .get_stream("MEND_RETRY")
            .await?
            .info()
            .await?
            .clone();
        anyhow::Ok(info.state.last_sequence)
    };
    let before = retry_seq().await.unwrap();

    // No token, a wrong token: 401 in the API's error shape.
    let (status, body) = d.get("/api/messages", None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = d.get("/api/messages", Some("not-a-token")).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A viewer may read (masked) but not act.
    let (status, m) = d
        .get(&format!("/api/messages/{id}"), Some(VIEWER_TOKEN))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(m["payload"]["account"], "***", "masked for viewers");
    assert_eq!(m["payload"]["key"], "k5");
    let m = d.ok(&format!("/api/messages/{id}")).await.unwrap();
    assert_eq!(m["payload"]["account"], "nobody", "operators see it");
    let (status, body) = d
        .post(&resubmit, Some(VIEWER_TOKEN), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    // A body that is not JSON, one with unknown fields, one too large.
    let res = d
        .http
        .post(format!("{}{resubmit}", d.url))
        .bearer_auth(OPERATOR_TOKEN)
        .header("content-type", "application/json")
        .body("{\"payload\": {\"account\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    let (status, _) = d
        .post(&resubmit, Some(OPERATOR_TOKEN), &json!({"paylod": {}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = d
        .post(
            &resubmit,
            Some(OPERATOR_TOKEN),
            &json!({"payload": {"pad": "x".repeat(8000)}}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "too_large");
    // A message failed again since the caller saw it: 409.
    let (status, _) = d
        .post(&resubmit, Some(OPERATOR_TOKEN), &json!({"attempt": 7}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    // Bad filters and cursors, unknown messages and routes.
    for (path, code) in [
        ("/api/messages?status=lost", StatusCode::BAD_REQUEST),
        ("/api/messages?cursor=abc", StatusCode::BAD_REQUEST),
        ("/api/messages?limit=0", StatusCode::BAD_REQUEST),
        ("/api/messages/APP:999999", StatusCode::NOT_FOUND),
        ("/api/nothing", StatusCode::NOT_FOUND),
    ] {
        let (status, body) = d.get(path, Some(OPERATOR_TOKEN)).await.unwrap();
        assert_eq!(status, code, "{path}: {body}");
        assert!(body["error"]["message"].is_string(), "{path}: {body}");
    }
    // Nothing was published and nothing changed.
    assert_eq!(retry_seq().await.unwrap(), before);
    let m = d.ok(&format!("/api/messages/{id}")).await.unwrap();
    assert_eq!(
        (m["status"].as_str(), m["attempt"].as_u64()),
        (Some("parked"), Some(1))
    );
    let audit = d.ok("/api/audit").await.unwrap();
    assert!(audit["items"].as_array().unwrap().is_empty(), "{audit}");
    // Every answer carries the security headers.
    let res = d
        .http
        .get(format!("{}/api/messages", d.url))
        .send()
        .await
        .unwrap();
    let csp = res.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    // Dry-runs: the loaded rules (none here) or a draft; a draft is for operators only, since it
    // could copy a masked field into an unmasked one.
    let try_path = format!("/api/messages/{id}/try");
    let draft = json!({"rules": "[[rule]]\nname = \"hold-it\"\nwhen = 'payload.account == \"nobody\"'\npark = \"a person decides\"\n"});
    let (status, _) = d.post(&try_path, Some(VIEWER_TOKEN), &draft).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = d
        .post(&try_path, Some(OPERATOR_TOKEN), &draft)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["decision"].as_str(), body["rule"].as_str()),
        (Some("parked"), Some("hold-it"))
    );
    let (status, body) = d
        .post(&try_path, Some(OPERATOR_TOKEN), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "no rules configured: {body}");
    let (status, body) = d
        .post(
            &try_path,
            Some(OPERATOR_TOKEN),
            &json!({"rules": "[[rule]]\nname = 1"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        retry_seq().await.unwrap(),
        before,
        "a dry-run sends nothing"
    );
    // An admin can do what an operator can; the audit shows viewers masked payloads.
    let (status, body) = d
        .post(
            &resubmit,
            Some(ADMIN_TOKEN),
            &json!({"payload": {"key": "k5", "n": 0, "account": "acct-5", "amount": 10}}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(retry_seq().await.unwrap() > before);
    let (_, audit) = d.get("/api/audit", Some(VIEWER_TOKEN)).await.unwrap();
    let a = &audit["items"][0];
    assert_eq!(a["actor"], "token:admin");
    for side in ["before", "after"] {
        let text = a[side].as_str().unwrap();
        assert!(
            text.contains("***") && !text.contains("nobody") && !text.contains("acct-5"),
            "{side}: {text}"
        );
    }
    let audit = d.ok("/api/audit").await.unwrap();
    assert!(
        audit["items"][0]["after"]
            .as_str()
            .unwrap()
            .contains("acct-5")
    );
}

#[tokio::test]
async fn a_dashboard_killed_during_ingest_loses_and_duplicates_nothing() {
    let world = World::new().await.unwrap();
    // The processor lays out mend's streams; its failures are parked envelopes made by hand here.
    let processor = MendProcess::start(
        "processor",
        &processor_config(&world.nats.url(), &example_rules(), ""),
    )
    .await
    .unwrap();
    processor.ready().await.unwrap();
    const N: usize = 400;
    let envelopes: Vec<Out> = (0..N)
        .map(|i| Out {
            subject: "mend.parked.orders".into(),
            headers: Default::default(),
            payload: bytes::Bytes::from(
                json!({
                    "version": 1, "id": format!("ORDERS:{i}"), "service": "orders", "binding": "orders",
                    "stream": "ORDERS", "seq": i, "subject": "orders.created", "key": format!("a{}", i % 7),
                    "headers": {}, "payload": {"n": i}, "payload_base64": null,
                    "error": {"kind": "message", "status": 422, "code": "unknown_account", "title": "no such account"},
                    "attempt": 1, "first_failed_at": "2026-11-23T10:00:00Z", "failed_at": "2026-11-23T10:00:00Z",
                    "reason": "rule_park: account not found", "history": [],
                })
                .to_string(),
            ),
        })
        .collect();
    js::publish_all(&world.js, envelopes).await.unwrap();
    // One line that is not an envelope: kept raw, not dropped.
    js::publish_all(
        &world.js,
        vec![Out {
            subject: "mend.parked.orders".into(),
            headers: Default::default(),
            payload: bytes::Bytes::from_static(b"not json at all"),
        }],
    )
    .await
    .unwrap();

    // What the killed dashboard had taken but not stored comes back after the ack wait.
    let mut d = Dashboard::start(&world.nats.url(), "ack_wait = \"2s\"")
        .await
        .unwrap();
    wait::until("some ingested", TEST_TIMEOUT, || async {
        let page = d.ok("/api/messages?limit=50").await?;
        Ok((page["items"].as_array().map_or(0, Vec::len) >= 20).then_some(()))
    })
    .await
    .unwrap();
    d.process.kill().await.unwrap();
    d.process.restart().await.unwrap();
    d.process.ready().await.unwrap();
    let all = d
        .wait_messages("service=orders", N + 1, TEST_TIMEOUT)
        .await
        .unwrap();
    let mut ids: Vec<&str> = all.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N + 1, "every parking once");
    let raw = all
        .iter()
        .find(|m| m["id"].as_str().unwrap().starts_with("MEND_PARKED:"))
        .unwrap();
    assert!(raw["payload_base64"].is_string(), "{raw}");
    assert_eq!(raw["error"]["title"], "malformed parked message");
    js::consumer_drained(
        &world.js,
        "MEND_PARKED",
        "mend-dashboard-parked",
        TEST_TIMEOUT,
    )
    .await
    .unwrap();
    // The operations endpoints answer on the dashboard's address.
    let ready = d
        .http
        .get(format!("{}/readyz", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let metrics = d
        .http
        .get(format!("{}/metrics", d.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("mend_dashboard_ingested_total{what=\"parked\"}"),
        "{metrics}"
    );
    let groups = d.ok("/api/groups").await.unwrap();
    let counts: Vec<i64> = groups["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["count"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [N as i64, 1]);
}

#[tokio::test]
async fn refuses_to_start_without_credentials_or_with_a_bad_hash() {
    let world = World::new().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("m.db").display());
    let open = format!(
        "nats_url = \"{}\"\ndatabase_url = \"{db}\"\nlisten = \"127.0.0.1:{}\"\n",
        world.nats.url(),
        mend_e2e::mend::free_port()
    );
    let mut p = MendProcess::start("dashboard", &open).await.unwrap();
    let status = p.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(64), "{}", p.log());
    assert!(p.log().contains("mend hash-password"), "{}", p.log());

    let bad = format!(
        "{open}\n[[user]]\nname = \"eve\"\nrole = \"admin\"\npassword_hash = \"plain-text\"\n"
    );
    let mut p = MendProcess::start("dashboard", &bad).await.unwrap();
    let status = p.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(64));
    assert!(
        p.log().contains("user \"eve\" password_hash"),
        "{}",
        p.log()
    );

    let role = format!(
        "{open}\n[[api_token]]\nname = \"x\"\nrole = \"root\"\nsha256 = \"{}\"\n",
        "a".repeat(64)
    );
    let mut p = MendProcess::start("dashboard", &role).await.unwrap();
    let status = p.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(64));
    assert!(p.log().contains("role"), "{}", p.log());
}

#[tokio::test]
async fn hash_password_reads_stdin_and_prints_a_hash_that_verifies() {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(mend_e2e::mend::mend_bin().unwrap())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"correct horse\n").await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let hash = hash.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(mend_dashboard::auth::verify_password(hash, "correct horse"));
    assert!(!mend_dashboard::auth::verify_password(
        hash,
        "correct horse "
    ));

    let out = tokio::process::Command::new(mend_e2e::mend::mend_bin().unwrap())
        .arg("hash-password")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

/// A lineage at the last attempt a `u32` counts cannot be resubmitted: `attempt + 1` would wrap
/// to 0 (or panic), and the dashboard answers 409 with the reason instead.
#[tokio::test]
async fn the_last_countable_attempt_is_not_resubmitted() {
    let world = World::new().await.unwrap();
    let processor = MendProcess::start(
        "processor",
        &processor_config(&world.nats.url(), &example_rules(), ""),
    )
    .await
    .unwrap();
    processor.ready().await.unwrap();
    let last = u64::from(u32::MAX);
    let envelope = json!({
        "version": 1, "id": "ORDERS:9", "service": "orders", "binding": "orders",
        "stream": "ORDERS", "seq": 9, "subject": "orders.created", "key": "a1",
        "headers": {}, "payload": {"n": 9}, "payload_base64": null,
        "error": {"kind": "message", "status": 422, "code": "unknown_account"},
        "attempt": last, "first_failed_at": "2026-11-23T10:00:00Z", "failed_at": "2026-11-23T10:00:00Z",
        "reason": "attempts exhausted", "history": [],
    });
    js::publish_all(
        &world.js,
        vec![Out {
            subject: "mend.parked.orders".into(),
            headers: Default::default(),
            payload: bytes::Bytes::from(envelope.to_string()),
        }],
    )
    .await
    .unwrap();
    let d = Dashboard::start(&world.nats.url(), "").await.unwrap();
    d.wait_messages("service=orders", 1, TEST_TIMEOUT)
        .await
        .unwrap();
    let (status, body) = d
        .post(
            "/api/messages/ORDERS:9/resubmit",
            Some(OPERATOR_TOKEN),
            &json!({"attempt": last}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let m = d.ok("/api/messages/ORDERS:9").await.unwrap();
    assert_eq!(m["status"], "parked", "{m}");
    assert_eq!(m["attempt"], last, "{m}");
}

/// The payloads stored on `subject` of `stream`, as JSON.
async fn stored(world: &World, stream: &str, subject: &str) -> anyhow::Result<Vec<Value>> {
    Ok(js::read_all(&world.js, stream, subject)
        .await?
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap_or(Value::Null))
        .collect())
}

#[tokio::test]
async fn an_edit_whose_confirmation_is_late_is_found_out_and_nothing_is_sent_over_it() {
    let world = World::new().await.unwrap();
    // The dashboard reaches NATS through a proxy that can hold its writes back, as a stuck network
    // does: the publish is sent, but its confirmation does not come in time.
    let proxy = mend_e2e::proxy::NatsProxy::start(world.nats.port())
        .await
        .unwrap();
    let d = Dashboard::start(&proxy.url(), "publish_timeout = \"1s\"")
        .await
        .unwrap();
    park_directly(&world, 1, |seq| json!({"n": seq}))
        .await
        .unwrap();
    d.wait_messages("service=orders", 1, TEST_TIMEOUT)
        .await
        .unwrap();
    proxy.freeze_on("mend.retry.orders");
    let path = "/api/messages/ORDERS:1/resubmit";
    let (status, body) = d
        .post(
            path,
            Some(OPERATOR_TOKEN),
            &json!({"attempt": 1, "payload": {"n": 1, "edit": "first"}}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "outcome_unknown", "{body}");
    // While its outcome is unknown, the message is taken: a changed edit and a discard are refused.
    let (status, body) = d
        .post(
            path,
            Some(OPERATOR_TOKEN),
            &json!({"attempt": 1, "payload": {"n": 1, "edit": "second"}}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("busy")),
        "{body}"
    );
    let (status, body) = d
        .post(
            "/api/messages/ORDERS:1/discard",
            Some(OPERATOR_TOKEN),
            &json!({"attempt": 1}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(proxy.frozen());
    // The network recovers: the first edit is stored late. The dashboard finds that out by itself
    // and records the first edit, the one actually sent.
    proxy.thaw();
    let m = d
        .wait_status("ORDERS:1", "resubmitted", TEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(m["attempt"], 2, "{m}");
    let audit = d.ok("/api/audit").await.unwrap();
    let first = &audit["items"][0];
    assert_eq!(first["action"], "edit_and_resubmit", "{audit}");
    assert!(
        first["after"]
            .as_str()
            .unwrap_or_default()
            .contains("first"),
        "the audit records what was sent: {audit}"
    );
    assert_eq!(audit["items"].as_array().map(Vec::len), Some(1), "{audit}");
    // Asked again with the second edit, the dashboard sends nothing over the first.
    let (status, body) = d
        .post(
            path,
            Some(OPERATOR_TOKEN),
            &json!({"attempt": 1, "payload": {"n": 1, "edit": "second"}}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let retries = stored(&world, "MEND_RETRY", "mend.retry.orders")
        .await
        .unwrap();
    assert_eq!(retries, [json!({"n": 1, "edit": "first"})]);
}

#[tokio::test]
async fn a_resubmission_and_a_discard_of_one_message_at_once_cannot_both_happen() {
    let world = World::new().await.unwrap();
    let n = 16;
    let d = Dashboard::start(&world.nats.url(), "").await.unwrap();
    park_directly(&world, n, |seq| json!({"n": seq}))
        .await
        .unwrap();
    d.wait_messages("service=orders", n as usize, TEST_TIMEOUT)
        .await
        .unwrap();
    let mut resubmitted = 0;
    let mut discarded = 0;
    for seq in 1..=n {
        let (resubmit, discard, body) = (
            format!("/api/messages/ORDERS:{seq}/resubmit"),
            format!("/api/messages/ORDERS:{seq}/discard"),
            json!({"attempt": 1}),
        );
        let (a, b) = tokio::join!(
            d.post(&resubmit, Some(OPERATOR_TOKEN), &body),
            d.post(&discard, Some(OPERATOR_TOKEN), &body),
        );
        let ((sa, ba), (sb, bb)) = (a.unwrap(), b.unwrap());
        match (sa, sb) {
            (StatusCode::OK, StatusCode::CONFLICT) => resubmitted += 1,
            (StatusCode::CONFLICT, StatusCode::OK) => discarded += 1,
            other => panic!("ORDERS:{seq}: {other:?} {ba} {bb}"),
        }
    }
    let retries = stored(&world, "MEND_RETRY", "mend.retry.orders")
        .await
        .unwrap();
    let discards = stored(&world, "MEND_CONTROL", "mend.control.orders")
        .await
        .unwrap();
    assert_eq!(
        (retries.len(), discards.len()),
        (resubmitted, discarded),
        "exactly what was answered was sent"
    );
    let audit = d.ok("/api/audit?limit=100").await.unwrap();
    assert_eq!(
        audit["items"].as_array().map(Vec::len),
        Some(n as usize),
        "{audit}"
    );
}

/// The held keys are followed from the bucket (not read per request): listed oldest first over
/// every entry, page by page, and a change to an entry shows without a restart.
#[tokio::test]
async fn the_held_keys_list_is_oldest_first_over_every_entry_page_by_page() {
    let mut world = World::new().await.unwrap();
    let d = Dashboard::start(&world.nats.url(), "").await.unwrap();
    let kv = world.js.get_key_value("mend_holds").await.unwrap();
    let n = 1200;
    let entry = |key: &str, since: &str, state: &str| {
        json!({
            "service": "app", "binding": "app", "partition": 0, "key": key, "head": format!("APP:{key}"),
            "state": state, "since": since, "resolved": [],
        })
        .to_string()
    };
    let token = |key: &str| repair_rules::MessageKey(key.to_owned()).token();
    let mut puts = Vec::new();
    for i in 0..n {
        let key = format!("k{i:05}");
        puts.push((token(&key), entry(&key, "2026-12-02T00:00:00Z", "held")));
    }
    // The oldest hold's key sorts last; a resolved entry is not listed.
    puts.push((
        token("zz-oldest"),
        entry("zz-oldest", "2026-11-01T00:00:00Z", "held"),
    ));
    puts.push((
        token("zz-done"),
        entry("zz-done", "2026-10-01T00:00:00Z", "resolved"),
    ));
    for chunk in puts.chunks(100) {
        let acks = chunk
            .iter()
            .map(|(t, v)| kv.put(format!("app.{t}"), v.clone().into()));
        for ack in futures::future::join_all(acks).await {
            ack.unwrap();
        }
    }
    // Every held key, in pages of 500, each once, the oldest first.
    let listed = wait::until("every held key listed", TEST_TIMEOUT, || {
        let d = &d;
        async move {
            let mut keys = Vec::new();
            let mut path = "/api/holds?service=app&limit=500".to_owned();
            loop {
                let page = d.ok(&path).await?;
                let items = page["items"].as_array().cloned().unwrap_or_default();
                anyhow::ensure!(items.len() <= 500, "a page over its limit");
                keys.extend(
                    items
                        .iter()
                        .map(|h| h["key"].as_str().unwrap_or("").to_owned()),
                );
                match page["next_cursor"].as_str() {
                    Some(c) => path = format!("/api/holds?service=app&limit=500&cursor={c}"),
                    None => break,
                }
            }
            Ok((keys.len() > n).then_some(keys))
        }
    })
    .await
    .unwrap();
    assert_eq!(listed.len(), n + 1);
    assert_eq!(listed[0], "zz-oldest");
    assert!(!listed.iter().any(|k| k == "zz-done"));
    let distinct: std::collections::HashSet<&String> = listed.iter().collect();
    assert_eq!(distinct.len(), n + 1, "a key listed twice");
    let overview = d.ok("/api/overview").await.unwrap();
    assert_eq!(overview["held_keys"], n + 1, "{overview}");

    // Followed: the oldest resolved, a new one held; no restart.
    kv.put(
        format!("app.{}", token("zz-oldest")),
        entry("zz-oldest", "2026-11-01T00:00:00Z", "resolved").into(),
    )
    .await
    .unwrap();
    kv.put(
        format!("app.{}", token("new")),
        entry("new", "2026-10-15T00:00:00Z", "held").into(),
    )
    .await
    .unwrap();
    wait::until("the changes followed", TEST_TIMEOUT, || {
        let d = &d;
        async move {
            let page = d.ok("/api/holds?limit=1").await?;
            Ok((page["items"][0]["key"] == "new").then_some(()))
        }
    })
    .await
    .unwrap();
    // A cursor this dashboard did not give, and a limit out of range, are the caller's errors.
    for path in [
        "/api/holds?cursor=not-one",
        "/api/holds?limit=0",
        "/api/holds?limit=1001",
    ] {
        let (status, body) = d.get(path, Some(OPERATOR_TOKEN)).await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{path}: {body}");
    }

    // The server restarts under the dashboard: its watch is lost and taken up again, and what is
    // written afterwards is followed too.
    world.nats.restart().await.unwrap();
    wait::until("a hold written after the restart", TEST_TIMEOUT, || {
        let (d, js) = (&d, world.js.clone());
        let value = entry("after-restart", "2026-09-01T00:00:00Z", "held");
        async move {
            // Written until it lands (the connection may still be coming back).
            let Ok(kv) = js.get_key_value("mend_holds").await else {
                return Ok(None);
            };
            if kv
                .put(format!("app.{}", token("after-restart")), value.into())
                .await
                .is_err()
            {
                return Ok(None);
            }
            let page = d.ok("/api/holds?limit=1").await?;
            Ok((page["items"][0]["key"] == "after-restart").then_some(()))
        }
    })
    .await
    .unwrap();
    let overview = d.ok("/api/overview").await.unwrap();
    assert_eq!(overview["held_keys"], n + 2, "{overview}");
}
