//! The chart's Grafana dashboard against a real scrape: every metric its queries read is one that
//! mend's roles export, seen in their `/metrics` after traffic that delivers, repairs, parks, holds,
//! breaks a rule and exports traces.

use mend_e2e::app::Reply;
use mend_e2e::dashboard::{Dashboard, order};
use mend_e2e::js;
use mend_e2e::mend::{MendProcess, processor_config};
use mend_e2e::otlp::Receiver;
use mend_e2e::world::{TEST_TIMEOUT, World};
use serde_json::{Value, json};

/// The metric names in a PromQL expression (`mend_…`, a histogram's `_bucket` kept).
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("mend_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

#[tokio::test]
async fn every_metric_the_grafana_dashboard_reads_is_exported() {
    let file = mend_e2e::workspace().join("helm/mend/dashboards/mend.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut wanted: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .flat_map(|t| metrics_in(t["expr"].as_str().unwrap_or_default()))
        .collect();
    wanted.sort();
    wanted.dedup();
    assert!(wanted.len() >= 15, "{wanted:?}");

    // Traffic: delivered orders, an amount as text repaired by a rule, an unknown account parked
    // with a later order of its key held; traces exported.
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    world.app.script(|d| match d.json.as_ref() {
        Some(o) if o["amount"].is_string() => Reply::Problem(
            422,
            json!({"title": "amount must be a number", "code": "bad_type", "field": "/amount"}),
        ),
        Some(o) if o["boom"] == true => {
            Reply::Problem(422, json!({"title": "boom", "code": "boom"}))
        }
        Some(o) if o["account"] == "nobody" => Reply::Problem(
            422,
            json!({"title": "no such account", "code": "unknown_account"}),
        ),
        _ => Reply::Ok,
    });
    let env = receiver.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sidecar_config = world.keyed_config("app", "");
    let sidecar = MendProcess::start_with_env("sidecar", &sidecar_config, &env)
        .await
        .unwrap();
    sidecar.ready().await.unwrap();
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("rules.toml"),
        "[[rule]]\nname = \"amount\"\nwhen = 'error.code == \"bad_type\"'\nset = { \"/amount\" = 'double(payload.amount)' }\n\n\
         [[rule]]\nname = \"broken\"\nwhen = 'error.code == \"boom\"'\nset = { \"/n\" = 'int(payload.nope)' }\n\n\
         [[rule]]\nname = \"account\"\nwhen = 'error.code == \"unknown_account\"'\npark = \"needs a person\"\n",
    )
    .unwrap();
    let processor_config = processor_config(&world.nats.url(), rules.path(), "");
    let processor = MendProcess::start_with_env("processor", &processor_config, &env)
        .await
        .unwrap();
    processor.ready().await.unwrap();
    let d = Dashboard::start(&world.nats.url(), "").await.unwrap();
    let mut msgs = vec![
        order("ok", 0, "acct-1"),
        order("h1", 0, "nobody"),
        order("h1", 1, "acct-1"),
    ];
    msgs.push(mend_e2e::dashboard::order_with(
        "r1",
        0,
        "acct-1",
        json!({"amount": "1.5"}),
    ));
    // A rule that fails on this one (it reads a field the order does not have): a rule error.
    msgs.push(mend_e2e::dashboard::order_with(
        "e1",
        0,
        "acct-1",
        json!({"boom": true}),
    ));
    js::publish_all(&world.js, msgs).await.unwrap();
    d.wait_messages("status=parked", 2, TEST_TIMEOUT)
        .await
        .unwrap();

    let scrape = |url: String| async move { reqwest::get(url).await?.text().await };
    let addrs = [
        mend_e2e::mend::listen_addr(&sidecar_config),
        mend_e2e::mend::listen_addr(&processor_config),
    ];
    let missing = mend_e2e::wait::until("every metric the dashboard reads", TEST_TIMEOUT, || {
        let (addrs, wanted, base) = (addrs.clone(), wanted.clone(), d.url.clone());
        async move {
            let mut text = String::new();
            for a in addrs {
                text.push_str(&scrape(format!("http://{a}/metrics")).await?);
            }
            text.push_str(&scrape(format!("{base}/metrics")).await?);
            let missing: Vec<String> = wanted
                .into_iter()
                .filter(|m| {
                    !text.lines().any(|l| {
                        l.strip_prefix(m.as_str())
                            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    })
                })
                .collect();
            Ok(missing.is_empty().then_some(missing))
        }
    })
    .await;
    if let Err(e) = missing {
        let mut text = String::new();
        for a in &addrs {
            text.push_str(&scrape(format!("http://{a}/metrics")).await.unwrap());
        }
        let absent: Vec<&String> = wanted
            .iter()
            .filter(|m| !text.contains(m.as_str()))
            .collect();
        panic!("{e:#}: not exported: {absent:?}");
    }
}
