//! A rule from a fix (SPEC §9), end to end: real nats-server, sidecar, processor (rules in a folder
//! of the test's own, reloaded on change), dashboard (SQLite) and app. A parked message fixed by
//! hand and resolved offers a rule draft; the draft passes `mend rules check`, and once in the
//! processor's rules the next message failing the same way is repaired by it and delivered.

use mend_e2e::app::Reply;
use mend_e2e::dashboard::{
    Dashboard, OPERATOR_TOKEN, VIEWER_TOKEN, delivered, hidden, logged_in, order_with, page_text,
    park_directly,
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
    let web = logged_in(&d, "alice").await;
    let html = page_text(&d, &web, &format!("/messages/{id}")).await;
    assert!(html.contains("A rule from this fix"), "{html}");
    let in_form = html
        .split("<textarea id=\"rules\"")
        .nth(1)
        .unwrap_or_default();
    assert!(
        in_form.contains("fix-app-app-created-unknown-account"),
        "{html}"
    );

    // Three more such failures, resubmitted as a group with the draft's repair first: two have a
    // currency (repaired, the canary first), one has none (the draft's `set` fails: left parked).
    let more = [
        ("k4", json!({"currency": "gbp"})),
        ("k5", json!({"currency": "chf"})),
        ("k6", json!({})),
    ];
    js::publish_all(
        &world.js,
        more.iter()
            .map(|(k, extra)| order_with(k, 0, "nobody", extra.clone()))
            .collect(),
    )
    .await
    .unwrap();
    d.wait_messages("status=parked", 3, TEST_TIMEOUT)
        .await
        .unwrap();
    let groups = d.ok("/api/groups").await.unwrap();
    let group = groups["items"][0]["id"].as_str().unwrap().to_owned();
    let job = d
        .resubmit_group(&group, &json!({"rules": text, "note": "drafted"}))
        .await
        .unwrap();
    assert_eq!(job["state"], "finished", "{job}");
    assert_eq!(
        (job["done"].clone(), job["not_repaired"].clone()),
        (json!(2), json!(1)),
        "{job}"
    );
    let log = world
        .app
        .wait_for("k4 and k5 delivered", TEST_TIMEOUT, |log| {
            delivered(log, "k4") == [0] && delivered(log, "k5") == [0]
        })
        .await
        .unwrap();
    let k5 = log
        .iter()
        .find(|x| x.ok() && x.field("key") == Some(&json!("k5")))
        .unwrap();
    assert_eq!(k5.field("currency"), Some(&json!("CHF")));
    assert_eq!(k5.field("account"), Some(&json!("acct-1")));
    let audit = d.ok("/api/audit").await.unwrap();
    assert!(
        audit["items"].as_array().unwrap().iter().any(|a| a["action"] == "edit_and_resubmit"
            && a["note"].as_str().unwrap_or("").starts_with("repaired with the draft rule `fix-app-app-created-unknown-account` first; drafted")),
        "{audit}"
    );
    let parked = d
        .wait_messages("status=parked", 1, TEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(parked[0]["key"], "k6");
    let k6 = parked[0]["id"].as_str().unwrap().to_owned();

    // On the groups page, the same with another draft for the one left: it is repaired and resolves.
    let html = page_text(&d, &web, "/groups").await;
    assert!(html.contains("Repair with a draft rule first"), "{html}");
    let csrf = hidden(&html, "csrf").unwrap();
    let second = r#"
[[rule]]
name = "known-account"
when = 'error.code == "unknown_account"'
set  = { "/account" = '"acct-6"' }
"#;
    let started = web
        .post(format!("{}/groups/{group}/resubmit", d.url))
        .form(&[
            ("csrf", csrf.as_str()),
            ("note", "by form"),
            ("rules", second),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::SEE_OTHER);
    world
        .app
        .wait_for("k6 delivered", TEST_TIMEOUT, |log| {
            delivered(log, "k6") == [0]
        })
        .await
        .unwrap();
    let resolved = d.wait_status(&k6, "resolved", TEST_TIMEOUT).await.unwrap();
    assert_eq!(resolved["payload"]["account"], "acct-6", "{resolved}");
    d.wait_messages("status=parked", 0, TEST_TIMEOUT)
        .await
        .unwrap();

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

/// `POST /api/rules/try` with `body` and `token`.
#[allow(clippy::unwrap_used)]
async fn try_rules(
    d: &Dashboard,
    token: &str,
    body: serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    d.post("/api/rules/try", Some(token), &body).await.unwrap()
}

/// Every answer of a dry-run over the scope `body`, following `next_cursor`.
#[allow(clippy::unwrap_used)]
async fn try_all(d: &Dashboard, token: &str, body: serde_json::Value) -> Vec<serde_json::Value> {
    let mut answers = Vec::new();
    let mut body = body;
    loop {
        let (status, a) = try_rules(d, token, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{a}");
        let next = a["next_cursor"].clone();
        answers.push(a);
        if next.is_null() {
            return answers;
        }
        body["cursor"] = next;
        assert!(answers.len() < 100, "{answers:?}");
    }
}

fn total(answers: &[serde_json::Value], outcome: &str) -> u64 {
    answers
        .iter()
        .map(|a| a["outcomes"][outcome].as_u64().unwrap_or(0))
        .sum()
}

const ACCOUNT_RULE: &str = r#"
[[rule]]
name    = "account-tidy"
service = "orders"
when    = 'error.code == "unknown_account" && has(payload.account) && payload.account != "nobody"'
set     = { "/account" = 'payload.account.trim().lowerAscii()', "/card" = 'payload.card.trim()' }
"#;

#[tokio::test]
async fn rules_tried_on_a_backlog_of_thousands_count_each_outcome_within_their_bound() {
    let world = World::new().await.unwrap();
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("tidy.toml"), ACCOUNT_RULE).unwrap();
    let d = Dashboard::start(
        &world.nats.url(),
        &format!("mask = [\"/card\"]\nrules = \"{}\"", rules.path().display()),
    )
    .await
    .unwrap();
    // 3,000 parked: two in three with an account the rule tidies, one in three `nobody`.
    let n = 3000;
    park_directly(&world, n, |seq| {
        let account = if seq % 3 == 0 {
            "nobody".to_owned()
        } else {
            format!(" Acct-{seq} ")
        };
        json!({"n": seq, "account": account, "card": format!(" 4111-{seq:04} ")})
    })
    .await
    .unwrap();
    mend_e2e::wait::until("3000 parked", TEST_TIMEOUT, || async {
        let groups = d.ok("/api/groups").await?;
        Ok((groups["items"][0]["count"] == n).then_some(()))
    })
    .await
    .unwrap();

    // An operator tries a draft (the same rule under another name) on the whole backlog.
    let draft = ACCOUNT_RULE.replace("account-tidy", "account-tidy-draft");
    let answers = try_all(&d, OPERATOR_TOKEN, json!({"rules": draft})).await;
    assert_eq!(total(&answers, "repaired"), 2000, "{answers:?}");
    assert_eq!(total(&answers, "no_rule"), 1000, "{answers:?}");
    let tried: u64 = answers.iter().map(|a| a["tried"].as_u64().unwrap()).sum();
    assert_eq!(tried, n);
    let last = answers.last().unwrap();
    if answers.len() == 1 {
        assert_eq!(
            last["summary"], "would repair 2000 of 3000, park 1000",
            "{last}"
        );
        assert_eq!(
            last["rules"]["account-tidy-draft"]["repaired"], 2000,
            "{last}"
        );
    }
    let example = &answers[0]["examples"]["repaired"][0];
    let changes = example["changes"].as_array().unwrap();
    let account = changes.iter().find(|c| c["path"] == "/account").unwrap();
    let seq: u64 = example["id"].as_str().unwrap()[7..].parse().unwrap();
    assert_eq!(account["before"], format!(" Acct-{seq} "), "{example}");
    assert_eq!(account["after"], format!("acct-{seq}"), "{example}");
    assert_eq!(
        answers[0]["examples"]["repaired"].as_array().unwrap().len(),
        3
    );
    assert_eq!(
        answers[0]["examples"]["no_rule"].as_array().unwrap().len(),
        3
    );
    let card = changes.iter().find(|c| c["path"] == "/card").unwrap();
    assert_eq!(card["after"], format!("4111-{seq:04}"), "operators see it");

    // A viewer tries the loaded rules, not a draft, and sees masked values masked.
    let (status, body) = try_rules(&d, VIEWER_TOKEN, json!({"rules": draft})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let viewed = try_all(&d, VIEWER_TOKEN, json!({"service": "orders"})).await;
    assert_eq!(total(&viewed, "repaired"), 2000, "{viewed:?}");
    let shown = viewed[0]["examples"].to_string();
    assert!(!shown.contains("4111-"), "{shown}");

    // The same on the rules page.
    let web = logged_in(&d, "alice").await;
    let html = page_text(&d, &web, "/rules").await;
    let csrf = hidden(&html, "csrf").unwrap();
    let page = web
        .post(format!("{}/rules/try", d.url))
        .form(&[
            ("csrf", csrf.as_str()),
            ("backlog", "on"),
            ("service", "orders"),
            ("rules", draft.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("would repair 2000 of 3000, park 1000"),
        "{html}"
    );
    assert!(html.contains("account-tidy-draft"), "{html}");
    // A crafted cursor in the form is refused with a clear error; nothing is tried.
    for cursor in [
        "not-a-cursor",
        "-1",
        "99999999999999999999999",
        "\u{0}",
        &"9".repeat(5000),
    ] {
        let page = web
            .post(format!("{}/rules/try", d.url))
            .form(&[
                ("csrf", csrf.as_str()),
                ("backlog", "on"),
                ("cursor", cursor),
                ("rules", draft.as_str()),
            ])
            .send()
            .await
            .unwrap();
        let status = page.status();
        let html = page.text().await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{cursor:.20}: {html}");
        assert!(html.contains("cursor"), "{cursor:.20}: {html}");
        assert!(!html.contains("would repair"), "{cursor:.20}: {html}");
    }

    // From a service owner's laptop: the local files against the backlog, through the API.
    let mine = tempfile::tempdir().unwrap();
    std::fs::write(mine.path().join("draft.toml"), &draft).unwrap();
    let token = mine.path().join("token");
    std::fs::write(&token, format!("{OPERATOR_TOKEN}\n")).unwrap();
    let cli = |files: &std::path::Path, url: &str, token: &std::path::Path| {
        let out = std::process::Command::new(mend_bin().unwrap())
            .args(["rules", "try"])
            .arg(files)
            .args(["--dashboard", url, "--token-file"])
            .arg(token)
            .args(["--service", "orders"])
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), said)
    };
    let (code, said) = cli(mine.path(), &d.url, &token);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("On the parked backlog of orders: would repair 2000 of 3000, park 1000"),
        "{said}"
    );
    assert!(
        said.contains("rule `account-tidy-draft`: repaired 2000"),
        "{said}"
    );
    let wrong = mine.path().join("wrong-token");
    std::fs::write(&wrong, "not-a-token").unwrap();
    let (code, said) = cli(mine.path(), &d.url, &wrong);
    assert_eq!(code, Some(69), "{said}");
    assert!(said.contains("401"), "{said}");
    let (code, said) = cli(mine.path(), "http://127.0.0.1:9", &token);
    assert_eq!(code, Some(69), "{said}");
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("b.toml"),
        "[[rule]]\nname = \"b\"\nwhen = 'true &&'\npark = \"x\"\n",
    )
    .unwrap();
    let (code, said) = cli(broken.path(), &d.url, &token);
    assert_eq!(code, Some(1), "{said}");

    // One message, one group, a service with nothing parked; a scope that is two scopes.
    let (_, one) = try_rules(&d, OPERATOR_TOKEN, json!({"message": "ORDERS:3"})).await;
    assert_eq!(one["tried"], 1, "{one}");
    assert_eq!(one["outcomes"]["no_rule"], 1, "{one}");
    let group = d.ok("/api/groups").await.unwrap()["items"][0]["id"].clone();
    let by_group = try_all(&d, OPERATOR_TOKEN, json!({"group": group})).await;
    assert_eq!(total(&by_group, "repaired"), 2000);
    let (_, none) = try_rules(&d, OPERATOR_TOKEN, json!({"service": "nothing"})).await;
    assert_eq!(none["summary"], "would repair 0 of 0, park 0", "{none}");
    let (status, body) = try_rules(
        &d,
        OPERATOR_TOKEN,
        json!({"message": "ORDERS:3", "group": group}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn a_costly_rule_on_the_backlog_is_tried_a_bounded_slice_at_a_time() {
    let world = World::new().await.unwrap();
    let d = Dashboard::start(&world.nats.url(), "").await.unwrap();
    // Each evaluation of this rule runs into the dry-run's time limit.
    let n = 6;
    let list: Vec<u64> = (0..4000).collect();
    park_directly(&world, n, |seq| json!({"n": seq, "list": list}))
        .await
        .unwrap();
    mend_e2e::wait::until("6 parked", TEST_TIMEOUT, || async {
        let groups = d.ok("/api/groups").await?;
        Ok((groups["items"][0]["count"] == n).then_some(()))
    })
    .await
    .unwrap();
    let costly = r#"
[[rule]]
name = "costly"
when = 'payload.list.all(x, payload.list.exists(y, y == x))'
park = "never reached"
"#;
    let answers = try_all(&d, OPERATOR_TOKEN, json!({"rules": costly})).await;
    assert!(answers.len() > 1, "the budget splits the work: {answers:?}");
    let tried: u64 = answers.iter().map(|a| a["tried"].as_u64().unwrap()).sum();
    assert_eq!(tried, n, "each message once, over the answers: {answers:?}");
    assert_eq!(total(&answers, "error"), n, "{answers:?}");
    for a in &answers {
        // The budget, and at most one evaluation's time limit past it.
        assert!(a["took_ms"].as_u64().unwrap() <= 5_000 + 2_500, "{a}");
    }
}

/// The app of [`every_recognised_transform_drafts_a_rule_that_repairs_the_next_failure`]: a
/// payload's `case` names what it insists on; anything else is answered with a problem whose code
/// names the case (`bad_<case>`) and whose field is the member at fault.
fn strict(d: &mend_e2e::app::Delivery) -> Reply {
    let Some(p) = d.json.as_ref() else {
        return Reply::Status(400);
    };
    let case = p["case"].as_str().unwrap_or_default();
    let (ok, field) = match case {
        "int" => (p["qty"].is_i64(), "/qty"),
        "double" => (p["price"].is_f64(), "/price"),
        "trim" => (
            p["name"]
                .as_str()
                .is_some_and(|n| n == n.trim() && !n.is_empty()),
            "/name",
        ),
        "lower" => (
            p["email"]
                .as_str()
                .is_some_and(|e| e == e.to_ascii_lowercase()),
            "/email",
        ),
        "upper" => (
            p["currency"]
                .as_str()
                .is_some_and(|c| c == c.to_ascii_uppercase()),
            "/currency",
        ),
        "constant" => (p["region"] == "eu", "/region"),
        "remove" => (p.get("debug").is_none(), "/debug"),
        "move" => (
            p.get("acct").is_none() && p["customer"]["account"].is_string(),
            "/acct",
        ),
        "literal" => (p["account"] != "nobody", "/account"),
        _ => (true, ""),
    };
    if ok {
        Reply::Ok
    } else {
        Reply::Problem(
            422,
            json!({"title": format!("{case} refused"), "code": format!("bad_{case}"), "field": field}),
        )
    }
}

#[tokio::test]
async fn every_recognised_transform_drafts_a_rule_that_repairs_the_next_failure() {
    use mend_e2e::world::KEY_HEADER;
    let world = World::new().await.unwrap();
    world.app.script(strict);
    let _sidecar = world.sidecar(&world.keyed_config("app", "")).await.unwrap();
    // The processor starts with one rule that never matches: every failure is parked.
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("00-none.toml"),
        "[[rule]]\nname = \"none\"\nwhen = 'false'\npark = \"never\"\n",
    )
    .unwrap();
    let config = processor_config(&world.nats.url(), rules.path(), "");
    let processor = MendProcess::start("processor", &config).await.unwrap();
    processor.ready().await.unwrap();
    let d = Dashboard::start(&world.nats.url(), "").await.unwrap();

    // (case, what fails, the person's fix, the next failure, what it must become, in the draft)
    let cases = [
        (
            "int",
            json!({"qty": "7"}),
            json!({"qty": 7}),
            json!({"qty": "12"}),
            json!({"qty": 12}),
            "int(payload.qty)",
        ),
        (
            "double",
            json!({"price": "2.50"}),
            json!({"price": 2.5}),
            json!({"price": "0.75"}),
            json!({"price": 0.75}),
            "double(payload.price)",
        ),
        (
            "trim",
            json!({"name": "  bob "}),
            json!({"name": "bob"}),
            json!({"name": "\tann  "}),
            json!({"name": "ann"}),
            "trim()",
        ),
        (
            "lower",
            json!({"email": "Bob@X.COM"}),
            json!({"email": "bob@x.com"}),
            json!({"email": "Ann@Y.org"}),
            json!({"email": "ann@y.org"}),
            "lowerAscii()",
        ),
        (
            "upper",
            json!({"currency": "usd"}),
            json!({"currency": "USD"}),
            json!({"currency": "chf"}),
            json!({"currency": "CHF"}),
            "upperAscii()",
        ),
        (
            "constant",
            json!({"region": "?"}),
            json!({"region": "eu"}),
            json!({"region": "??"}),
            json!({"region": "eu"}),
            "\"eu\"",
        ),
        (
            "remove",
            json!({"debug": {"trace": true}}),
            json!({}),
            json!({"debug": [1, 2]}),
            json!({}),
            "op = \"remove\"",
        ),
        (
            "move",
            json!({"acct": "a1"}),
            json!({"customer": {"account": "a1"}}),
            json!({"acct": "b7"}),
            json!({"customer": {"account": "b7"}}),
            "op = \"move\"",
        ),
        (
            "literal",
            json!({"account": "nobody"}),
            json!({"account": "acct-9"}),
            json!({"account": "nobody"}),
            json!({"account": "acct-9"}),
            "specific to that message",
        ),
    ];
    let body = |case: &str, key: &str, fields: &serde_json::Value| {
        let mut b = json!({"case": case, "key": key});
        b.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        b
    };
    let out = |case: &str, key: &str, fields: &serde_json::Value| {
        js::Out::keyed("app.created", KEY_HEADER, key, body(case, key, fields))
    };

    // Each first failure parked, fixed by hand, resolved; its draft into the rules folder.
    js::publish_all(
        &world.js,
        cases
            .iter()
            .map(|(case, broken, ..)| out(case, &format!("{case}-1"), broken))
            .collect(),
    )
    .await
    .unwrap();
    let parked = d
        .wait_messages("status=parked", cases.len(), TEST_TIMEOUT)
        .await
        .unwrap();
    for (case, _, fixed, _, _, expected) in &cases {
        let key = format!("{case}-1");
        let id = mend_e2e::dashboard::id_of_key(&parked, &key);
        let (status, answer) = d
            .post(
                &format!("/api/messages/{id}/resubmit"),
                Some(OPERATOR_TOKEN),
                &json!({"payload": body(case, &key, fixed)}),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{case}: {answer}");
        d.wait_status(&id, "resolved", TEST_TIMEOUT).await.unwrap();
        let (status, text) = draft(&d, &id, OPERATOR_TOKEN).await;
        assert_eq!(status, StatusCode::OK, "{case}: {text}");
        assert!(text.contains(expected), "{case}: no {expected} in\n{text}");
        assert!(
            text.contains(&format!("error.code == \"bad_{case}\"")),
            "{case}: {text}"
        );
        std::fs::write(rules.path().join(format!("{case}.toml")), &text).unwrap();
    }

    // Every draft passes `mend rules check`, and the processor takes them all.
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
    let metrics = format!("http://{}/metrics", mend_e2e::mend::listen_addr(&config));
    let loaded = format!("mend_rules_loaded {}", cases.len() + 1);
    mend_e2e::wait::until("every draft loaded", TEST_TIMEOUT, || {
        let (metrics, loaded) = (metrics.clone(), loaded.clone());
        async move {
            let text = reqwest::get(&metrics).await?.text().await?;
            Ok(text.lines().any(|l| l == loaded).then_some(()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", processor.log()));

    // The next failure of each kind: repaired by its draft, delivered as the app wants it, and
    // never parked.
    js::publish_all(
        &world.js,
        cases
            .iter()
            .map(|(case, _, _, next, ..)| out(case, &format!("{case}-2"), next))
            .collect(),
    )
    .await
    .unwrap();
    let log = world
        .app
        .wait_for(
            "every second failure repaired and delivered",
            TEST_TIMEOUT,
            |log| {
                cases.iter().all(|(case, ..)| {
                    let key = format!("{case}-2");
                    log.iter()
                        .any(|x| x.ok() && x.field("key") == Some(&json!(key)))
                })
            },
        )
        .await
        .unwrap();
    for (case, _, _, _, repaired, _) in &cases {
        let key = format!("{case}-2");
        let got = log
            .iter()
            .find(|x| x.ok() && x.field("key") == Some(&json!(key)))
            .unwrap();
        assert_eq!(
            got.json.as_ref(),
            Some(&body(case, &key, repaired)),
            "{case}"
        );
        let by = got.header("mend-repaired-by").unwrap_or_default();
        assert_eq!(by, format!("fix-app-app-created-bad-{case}"), "{case}");
    }
    let parked = d.ok("/api/messages?status=parked").await.unwrap();
    assert_eq!(parked["items"], json!([]), "{parked}");
}
