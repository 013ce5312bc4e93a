//! The whole loop: app → sidecar → MEND_FAILED → processor → `mend.retry.<service>` → sidecar → app,
//! or to the dashboard's MEND_PARKED (SPEC §1, §6).

use mend_e2e::app::Reply;
use mend_e2e::js::{self, Out};
use mend_e2e::mend::example_rules;
use mend_e2e::wait;
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT, World};
use serde_json::json;

/// The orders app: a string amount is a `bad_type`, an unknown account is `unknown_account`.
fn orders_app(d: &mend_e2e::app::Delivery) -> Reply {
    mend_e2e::app::order_problem(d).unwrap_or(Reply::Ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_string_amount_is_repaired_and_delivered_under_the_same_mend_id() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(orders_app);
    let order = |n: u64, account: &str, amount: serde_json::Value| {
        Out::keyed(
            "app.created",
            KEY_HEADER,
            account,
            json!({"key": account, "n": n, "account": account, "amount": amount}),
        )
    };
    let seqs = js::publish_all(
        &w.js,
        vec![
            order(0, "acct-7", json!(5)),
            order(1, "acct-7", json!("12.50")),
            order(2, "nobody", json!(1)),
            order(3, "acct-8", json!(2)),
        ],
    )
    .await?;
    let _p = w.processor(&example_rules(), "").await?;
    let _s = w.sidecar(&w.keyed_config("orders", "")).await?;

    let log = w
        .app
        .wait_for("the repaired order", TEST_TIMEOUT, |log| {
            log.iter()
                .any(|d| d.ok() && d.field("n") == Some(&json!(1)))
        })
        .await?;
    let id = format!("APP:{}", seqs[1]);
    let tries: Vec<_> = log.iter().filter(|d| d.mend_id() == id).collect();
    assert_eq!(tries.len(), 2, "original, then the repair");
    assert_eq!(tries[0].header("mend-attempt"), Some("1"));
    assert_eq!(tries[0].status, 422);
    let repaired = tries[1];
    assert_eq!(repaired.status, 200);
    assert_eq!(repaired.header("mend-attempt"), Some("2"));
    assert_eq!(
        repaired.header("mend-repaired-by"),
        Some("amount-as-number")
    );
    assert_eq!(repaired.header("mend-key"), Some("acct-7"));
    assert_eq!(repaired.header("ce-id"), Some(id.as_str()));
    assert_eq!(repaired.header("ce-type"), Some("app.created"));
    assert_eq!(
        repaired.header("account-id"),
        Some("acct-7"),
        "the message's own headers travel along"
    );
    assert!(
        repaired.header("mend-history").is_none(),
        "mend's bookkeeping stays out of the app call"
    );
    assert_eq!(
        repaired.json,
        Some(
            json!({"key": "acct-7", "n": 1, "account": "acct-7", "amount": 12.5, "currency": "USD"})
        )
    );

    let parked = wait::until("the unknown account parked", TEST_TIMEOUT, || {
        let js = w.js.clone();
        async move {
            let p = js::parked(&js, "orders").await?;
            Ok((!p.is_empty()).then_some(p))
        }
    })
    .await?;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].id, format!("APP:{}", seqs[2]));
    assert_eq!(
        parked[0].reason.as_deref(),
        Some("account not found: needs a person")
    );
    let whats: Vec<&str> = parked[0].history.iter().map(|h| h.what.as_str()).collect();
    assert_eq!(whats, ["delegated", "parked"]);

    w.drained("orders").await?;
    js::consumer_drained(&w.js, "MEND_FAILED", "mend-processor", TEST_TIMEOUT).await?;
    js::consumer_drained(&w.js, "MEND_RETRY", "mend-orders-retry", TEST_TIMEOUT).await?;
    Ok(())
}

/// A key taken from the payload may hold anything, line breaks included; it travels percent-encoded in
/// `Mend-Key` (NATS and HTTP alike) and comes back as the same key, so the repaired message keeps its
/// lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_a_line_break_survives_the_loop() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(orders_app);
    let key = "line\nbreak 100%";
    let order = |n: u64, amount: serde_json::Value| Out {
        subject: "app.created".into(),
        headers: Default::default(),
        payload: json!({"key": key, "n": n, "account": "acct-7", "amount": amount})
            .to_string()
            .into(),
    };
    js::publish_all(&w.js, vec![order(0, json!("3")), order(1, json!(4))]).await?;
    let _p = w.processor(&example_rules(), "").await?;
    let config = mend_e2e::mend::sidecar_config(
        "orders",
        &w.nats.url(),
        mend_e2e::world::STREAM,
        &["app.>"],
        &w.app.endpoint(),
        "key = { json = \"/key\" }",
    );
    let _s = w.sidecar(&config).await?;
    let log = w
        .app
        .wait_for("the repaired order", TEST_TIMEOUT, |log| {
            log.iter()
                .any(|d| d.ok() && d.field("n") == Some(&json!(0)))
        })
        .await?;
    let repaired = log
        .iter()
        .find(|d| d.ok() && d.field("n") == Some(&json!(0)))
        .expect("repaired");
    assert_eq!(repaired.header("mend-attempt"), Some("2"));
    assert_eq!(repaired.header("mend-key"), Some("line%0Abreak%20100%25"));
    w.drained("orders").await?;
    js::consumer_drained(&w.js, "MEND_RETRY", "mend-orders-retry", TEST_TIMEOUT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_that_do_not_help_end_parked() -> anyhow::Result<()> {
    let w = World::new().await?;
    // The app never accepts these: every delivery fails with the same code.
    w.app
        .script(|_| Reply::Problem(422, json!({"title": "no", "code": "stubborn"})));
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("rules.toml"),
        r#"
[[rule]]
name = "same-each-time"
when = 'error.code == "stubborn" && payload.case == "same"'
set  = { "/touched" = 'attempt' }

[[rule]]
name = "first"
when = 'payload.case == "many" && attempt == 1'
set  = { "/t1" = 'true' }

[[rule]]
name = "second"
when = 'payload.case == "many" && attempt == 2'
set  = { "/t2" = 'true' }

[[rule]]
name = "third"
when = 'payload.case == "many" && attempt == 3'
set  = { "/t3" = 'true' }
"#,
    )?;
    let _p = w.processor(dir.path(), "max_repairs = 2").await?;
    js::publish_all(
        &w.js,
        vec![
            Out::keyed("app.x", KEY_HEADER, "a", json!({"case": "same"})),
            Out::keyed("app.x", KEY_HEADER, "b", json!({"case": "many"})),
        ],
    )
    .await?;
    let _s = w.sidecar(&w.keyed_config("stub", "")).await?;
    let parked = wait::until("both parked", TEST_TIMEOUT, || {
        let js = w.js.clone();
        async move {
            let p = js::parked(&js, "stub").await?;
            Ok((p.len() >= 2).then_some(p))
        }
    })
    .await?;
    let case = |c: &str| parked.iter().find(|e| e.payload["case"] == c).expect(c);
    let same = case("same");
    assert_eq!(same.attempt, 2, "one repair, then the same failure");
    assert!(
        same.reason
            .as_deref()
            .unwrap_or("")
            .contains("already repaired this lineage"),
        "{:?}",
        same.reason
    );
    let many = case("many");
    assert_eq!(many.attempt, 3, "max_repairs = 2 repairs, then parked");
    assert!(
        many.reason
            .as_deref()
            .unwrap_or("")
            .contains("max_repairs = 2"),
        "{:?}",
        many.reason
    );
    let whats: Vec<&str> = many.history.iter().map(|h| h.what.as_str()).collect();
    assert_eq!(
        whats,
        [
            "delegated",
            "repaired",
            "delegated",
            "repaired",
            "delegated",
            "parked"
        ]
    );
    assert_eq!(
        many.payload,
        json!({"case": "many", "t1": true, "t2": true})
    );
    // Every try of a lineage reached the app under one Mend-Id.
    let log = w.app.log();
    let ids: std::collections::HashSet<&str> = log.iter().map(|d| d.mend_id()).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(log.len(), 5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_consumer_waits_as_long_as_the_longest_binding() -> anyhow::Result<()> {
    let w = World::new().await?;
    let _s = w
        .sidecar(&w.keyed_config("slowacks", "ack_wait = \"75s\""))
        .await?;
    let stream = w.js.get_stream("MEND_RETRY").await?;
    let mut c: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer("mend-slowacks-retry")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = c.info().await?;
    assert_eq!(info.config.ack_wait, std::time::Duration::from_secs(75));
    assert_eq!(info.config.filter_subject, "mend.retry.slowacks");
    Ok(())
}
