//! `make demo`: mend on this machine, nothing to set up. Starts a throw-away nats-server, an orders
//! app that fails realistically (a string amount, a missing currency, an unknown account, an
//! intermittent 503), the sidecar in front of it, the processor with the example rules, and a
//! producer; prints what happens every few seconds. Ctrl-C stops everything.

use std::time::Duration;

use async_nats::jetstream;
use mend_e2e::app::{FakeApp, Reply};
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{MendProcess, sidecar_config};
use mend_e2e::nats::NatsServer;
use serde_json::{Value, json};

/// Orders per second from the producer.
const RATE: u64 = 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = nats.client().await?;
    let js = jetstream::new(client);
    js::app_stream(&js, "ORDERS", &["orders.>"]).await?;

    let app = FakeApp::start().await?;
    app.script(orders_app);
    let config = sidecar_config(
        "orders",
        &nats.url(),
        "ORDERS",
        &["orders.>"],
        &app.endpoint(),
        "key = { json = \"/account\" }\nconcurrency = 16",
    );
    let listen = mend_e2e::mend::listen_addr(&config);
    let mut sidecar = MendProcess::start("sidecar", &config).await?;
    sidecar.ready().await?;
    let mut processor = MendProcess::start(
        "processor",
        &mend_e2e::mend::processor_config(&nats.url(), &mend_e2e::mend::example_rules(), ""),
    )
    .await?;
    processor.ready().await?;
    println!(
        "mend demo: nats-server at {}, sidecar metrics at http://{listen}/metrics",
        nats.url()
    );
    println!(
        "Repairs use examples/rules/orders.toml; parked failures wait in MEND_PARKED (the dashboard comes later)."
    );
    println!("Ctrl-C to stop.\n");

    let producer = tokio::spawn({
        let js = js.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            for n in 0u64.. {
                tick.tick().await;
                let order = order(n);
                let out = Out {
                    subject: "orders.created".into(),
                    headers: Default::default(),
                    payload: order.to_string().into(),
                };
                if let Err(e) = js::publish_all(&js, vec![out]).await {
                    eprintln!("publish failed: {e:#}");
                }
            }
        }
    });

    let mut every = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            _ = every.tick() => {
                let log = app.log();
                let delivered = log.iter().filter(|d| d.ok()).count();
                let repaired = log.iter().filter(|d| d.ok() && d.header("mend-repaired-by").is_some()).count();
                let transient = log.iter().filter(|d| d.status == 503).count();
                let parked = js::parked(&js, "orders").await.map(|v| v.len()).unwrap_or(0);
                println!("delivered {delivered:>6}   of which repaired {repaired:>5}   retried after 503 {transient:>5}   parked {parked:>4}");
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    producer.abort();
    let status = sidecar.terminate(Duration::from_secs(30)).await?;
    processor.terminate(Duration::from_secs(30)).await?;
    println!(
        "\nsidecar and processor stopped ({status}); nats-server and its temp store are removed."
    );
    Ok(())
}

/// The n-th order: mostly good, some with the mistakes real producers make.
fn order(n: u64) -> Value {
    let account = format!("acct-{}", n % 25);
    match n % 50 {
        7 => json!({"order": n, "account": account, "amount": "12.50", "currency": "EUR"}),
        19 => json!({"order": n, "account": account, "amount": 9.99}),
        33 => json!({"order": n, "account": "acct-unknown", "amount": 5, "currency": "USD"}),
        _ => {
            json!({"order": n, "account": account, "amount": (n % 90) as f64 + 0.5, "currency": "USD"})
        }
    }
}

/// The orders service: validates an order, and is briefly unwell now and then.
fn orders_app(d: &mend_e2e::app::Delivery) -> Reply {
    let Some(o) = d.json.as_ref() else {
        return Reply::Problem(400, json!({"title": "not JSON", "code": "not_json"}));
    };
    if o["amount"].is_string() {
        return Reply::Problem(
            422,
            json!({"title": "amount must be a number", "code": "bad_type", "field": "/amount"}),
        );
    }
    if o.get("currency").is_none() {
        return Reply::Problem(
            422,
            json!({"title": "currency is required", "code": "missing_field", "field": "/currency"}),
        );
    }
    if o["account"] == "acct-unknown" {
        return Reply::Problem(
            422,
            json!({"title": "no such account", "code": "unknown_account", "field": "/account"}),
        );
    }
    if o["order"].as_u64().unwrap_or(0) % 17 == 3 && d.seen_before == 0 {
        return Reply::RetryAfter(503, 0);
    }
    Reply::Ok
}
