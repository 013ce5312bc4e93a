//! A rule from a fix (SPEC §9), end to end: real nats-server, sidecar, processor (rules in a folder
//! of the test's own, reloaded on change), dashboard (SQLite) and app. A parked message fixed by
//! hand and resolved offers a rule draft; the draft passes `mend rules check`, and once in the
//! processor's rules the next message failing the same way is repaired by it and delivered.

use mend_e2e::app::Reply;
use mend_e2e::dashboard::{
    Dashboard, OPERATOR_TOKEN, USERS, VIEWER_TOKEN, browser, delivered, login, order_with,
};
use mend_e2e::js;
use mend_e2e::mend::{MendProcess, example_rules, mend_bin, processor_config};
use mend_e2e::world::{TEST_TIMEOUT, World};
use reqwest::StatusCode;
use serde_json::json;

/// `GET /api/messages/{id}/rule-draft` with `token`: the status and the body as text.
#[allow(clippy::unwrap_used)]
async fn draft(d: &Dashboard, id: &str, token: &str) -> (StatusCode, String) {
    let res = d
        .http
        .get(format!("{}/api/messages/{id}/rule-draft", d.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status();
    if status == StatusCode::OK {
        let kind = res.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("application/toml"), "{kind}");
    }
    (status, res.text().await.unwrap())
}

/// Parks the order `n` of key `key` for `account` (the app knows no `nobody`; the example rules
/// park it), fixes it by hand with `fixed` and waits until it resolved; its id.
#[allow(clippy::unwrap_used)]
async fn fixed_by_hand(
    world: &World,
    d: &Dashboard,
    key: &str,
    extra: serde_json::Value,
    fixed: serde_json::Value,
) -> String {
    let id = d
        .park_one(&world.js, order_with(key, 0, "nobody", extra))
        .await
        .unwrap();
    // Not resolved yet: no draft.
    let (status, body) = draft(d, &id, OPERATOR_TOKEN).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = d
        .post(
            &format!("/api/messages/{id}/resubmit"),
            Some(OPERATOR_TOKEN),
            &json!({ "payload": fixed }),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    d.wait_status(&id, "resolved", TEST_TIMEOUT).await.unwrap();
    id
}

#[tokio::test]
async fn a_fix_by_hand_becomes_a_rule_that_repairs_the_next_such_failure() {
    let world = World::new().await.unwrap();
    world
        .app
        .script(|d| mend_e2e::app::order_problem(d).unwrap_or(Reply::Ok));
    let _sidecar = world.sidecar(&world.keyed_config("app", "")).await.unwrap();
    let rules = tempfile::tempdir().unwrap();
    std::fs::copy(
        example_rules().join("orders.toml"),
        rules.path().join("orders.toml"),
    )
    .unwrap();
    let processor = MendProcess::start(
        "processor",
        &processor_config(&world.nats.url(), rules.path(), ""),
    )
    .await
    .unwrap();
    processor.ready().await.unwrap();
    let d = Dashboard::start(&world.nats.url(), "mask = [\"/card\"]")
        .await
        .unwrap();

    // A person fixes the account (a value of this message's own: a literal), and the currency's
    // case on the way (a transform), and resubmits.
    let id = fixed_by_hand(
        &world,
        &d,
        "k1",
        json!({"currency": "usd", "card": "4111-1111"}),
        json!({"key": "k1", "n": 0, "account": "acct-1", "amount": 10, "currency": "USD", "card": "4111-1111"}),
    )
    .await;
    let (status, text) = draft(&d, &id, OPERATOR_TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        text.contains("name    = \"fix-app-app-created-unknown-account\""),
        "{text}"
    );
    assert!(text.contains("service = \"app\""), "{text}");
    assert!(text.contains("subject = \"app.created\""), "{text}");
    assert!(text.contains("error.code == \"unknown_account\""), "{text}");
    assert!(text.contains("'payload.currency.upperAscii()'"), "{text}");
    assert!(text.contains("specific to that message"), "{text}");
    assert!(text.contains("[[rule.test]]"), "{text}");
    // A viewer sees the masked field masked in the draft too.
    let (status, viewed) = draft(&d, &id, VIEWER_TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{viewed}");
    assert!(text.contains("4111-1111"), "{text}");
    assert!(!viewed.contains("4111-1111"), "{viewed}");

    // The message's page shows the draft, and the try form starts with it.
    let web = browser();
    let (user, password, _) = USERS[0];
    login(&d, &web, user, password).await;
    let page = web
        .get(format!("{}/messages/{id}", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("A rule from this fix"), "{html}");
    let in_form = html
        .split("<textarea id=\"rules\"")
        .nth(1)
        .unwrap_or_default();
    assert!(
        in_form.contains("fix-app-app-created-unknown-account"),
        "{html}"
    );

    // The draft passes `mend rules check` beside the rules it joins (first: the example rules
    // would park such a message).
    std::fs::write(rules.path().join("00-draft.toml"), &text).unwrap();
    let check = std::process::Command::new(mend_bin().unwrap())
        .args(["rules", "check", &rules.path().display().to_string()])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{said}");
    processor
        .wait_log("Rules reloaded", TEST_TIMEOUT)
        .await
        .unwrap();

    // The next such failure: repaired by the draft, delivered, never parked.
    js::publish_all(
        &world.js,
        vec![order_with("k2", 0, "nobody", json!({"currency": "eur"}))],
    )
    .await
    .unwrap();
    let log = world
        .app
        .wait_for("k2 repaired and delivered", TEST_TIMEOUT, |log| {
            delivered(log, "k2") == [0]
        })
        .await
        .unwrap();
    let repaired = log
        .iter()
        .find(|x| x.ok() && x.field("key") == Some(&json!("k2")))
        .unwrap();
    assert_eq!(repaired.field("account"), Some(&json!("acct-1")));
    assert_eq!(repaired.field("currency"), Some(&json!("EUR")));
    assert_eq!(
        repaired.header("mend-repaired-by"),
        Some("fix-app-app-created-unknown-account")
    );
    let parked = d.ok("/api/messages?status=parked").await.unwrap();
    assert_eq!(parked["items"], json!([]), "{parked}");

    let (status, _) = draft(&d, "APP:999999", OPERATOR_TOKEN).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
