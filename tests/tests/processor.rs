//! `mend processor` on its own: failure envelopes in, repairs out on `mend.retry.<service>` with the
//! lineage in headers, everything else parked with its reason (SPEC §5, §6).

use bytes::Bytes;
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{MendProcess, example_rules, processor_config};
use mend_e2e::nats::NatsServer;
use mend_e2e::wait;
use mend_e2e::world::TEST_TIMEOUT;
use repair_rules::FailureEnvelope;
use serde_json::{Value, json};

fn envelope(seq: u64, payload: Value, code: &str, field: &str) -> Value {
    json!({
        "version": 1, "id": format!("ORDERS:{seq}"), "service": "orders", "binding": "orders",
        "stream": "ORDERS", "seq": seq, "subject": "orders.created", "key": "acct-7",
        "headers": {"Account-Id": ["acct-7"], "traceparent": ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]},
        "payload": payload, "payload_base64": null,
        "error": {"kind": "message", "status": 422, "code": code, "field": field,
                  "title": "t", "detail": null, "body": null},
        "attempt": 1, "first_failed_at": "2026-11-22T10:00:00Z", "failed_at": "2026-11-22T10:00:00Z",
        "history": [{"at": "2026-11-22T10:00:00Z", "what": "delegated", "by": "sidecar",
                     "error": {"kind": "message", "status": 422, "code": code}}],
    })
}

fn failed(body: Bytes) -> Out {
    Out {
        subject: "mend.failed.orders".into(),
        headers: Default::default(),
        payload: body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairs_go_back_on_the_retry_subject_and_the_rest_is_parked() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = nats.client().await?;
    let js = async_nats::jetstream::new(client);
    let p = MendProcess::start(
        "processor",
        &processor_config(&nats.url(), &example_rules(), ""),
    )
    .await?;
    p.ready().await?;

    let inputs = vec![
        failed(
            envelope(
                1,
                json!({"account": "acct-7", "amount": "12.50"}),
                "bad_type",
                "/amount",
            )
            .to_string()
            .into(),
        ),
        failed(
            envelope(
                2,
                json!({"account": "nobody", "amount": 1}),
                "unknown_account",
                "/account",
            )
            .to_string()
            .into(),
        ),
        failed(
            envelope(3, json!({"amount": 1}), "something_new", "/x")
                .to_string()
                .into(),
        ),
        failed(Bytes::from_static(b"{not an envelope")),
        // A key may hold anything (it comes from a payload field): it travels percent-encoded.
        failed({
            let mut e = envelope(
                4,
                json!({"account": "acct-7", "amount": "1"}),
                "bad_type",
                "/amount",
            );
            e["key"] = json!("line\nbreak ü");
            e.to_string().into()
        }),
        // A header no NATS message can carry: hand-made, so parked raw instead of acted on.
        failed({
            let mut e = envelope(5, json!({"amount": "1"}), "bad_type", "/amount");
            e["headers"]["X-Injected"] = json!(["a\r\nNats-Msg-Id: forged"]);
            e.to_string().into()
        }),
    ];
    js::publish_all(&js, inputs).await?;

    let retries = wait::until("two retries", TEST_TIMEOUT, || {
        let js = js.clone();
        async move {
            let r = js::read_all(&js, "MEND_RETRY", "mend.retry.orders").await?;
            Ok((r.len() >= 2).then_some(r))
        }
    })
    .await?;
    assert_eq!(retries.len(), 2);
    let r = retries
        .iter()
        .find(|r| r.headers.get("Mend-Id").map(|v| v.as_str()) == Some("ORDERS:1"))
        .expect("retry of ORDERS:1");
    let odd_key = retries
        .iter()
        .find(|r| r.headers.get("Mend-Id").map(|v| v.as_str()) == Some("ORDERS:4"))
        .expect("retry of ORDERS:4");
    assert_eq!(
        odd_key.headers.get("Mend-Key").map(|v| v.as_str()),
        Some("line%0Abreak%20%C3%BC")
    );
    let body: Value = serde_json::from_slice(&r.payload)?;
    assert_eq!(
        body,
        json!({"account": "acct-7", "amount": 12.5, "currency": "USD"})
    );
    let header = |n: &str| r.headers.get(n).map(|v| v.as_str().to_owned());
    assert_eq!(header("Mend-Id").as_deref(), Some("ORDERS:1"));
    assert_eq!(header("Mend-Attempt").as_deref(), Some("2"));
    assert_eq!(
        header("Mend-Repaired-By").as_deref(),
        Some("amount-as-number")
    );
    assert_eq!(header("Mend-Key").as_deref(), Some("acct-7"));
    assert_eq!(
        header("Mend-Original-Subject").as_deref(),
        Some("orders.created")
    );
    assert_eq!(header("Account-Id").as_deref(), Some("acct-7"));
    assert!(header("traceparent").is_some());
    assert_eq!(header("Nats-Msg-Id").as_deref(), Some("ORDERS:1:2:retry"));
    let history: Vec<repair_rules::HistoryEntry> =
        serde_json::from_str(&header("Mend-History").unwrap())?;
    assert_eq!(history.len(), 2);
    assert_eq!(
        (history[1].what.as_str(), history[1].by.as_str()),
        ("repaired", "rule:amount-as-number")
    );

    let parked: Vec<FailureEnvelope> = wait::until("four parked", TEST_TIMEOUT, || {
        let js = js.clone();
        async move {
            let p = js::parked(&js, "orders").await?;
            Ok((p.len() >= 4).then_some(p))
        }
    })
    .await?;
    let by_seq = |s: u64| parked.iter().find(|e| e.seq == s && e.stream == "ORDERS");
    let unknown = by_seq(2).expect("unknown account parked");
    assert_eq!(
        unknown.reason.as_deref(),
        Some("account not found: needs a person")
    );
    assert_eq!(
        unknown.history.last().map(|h| h.by.as_str()),
        Some("rule:unknown-account")
    );
    assert_eq!(
        by_seq(3).and_then(|e| e.reason.as_deref()),
        Some("no rule matched")
    );
    let raw: Vec<&FailureEnvelope> = parked
        .iter()
        .filter(|e| e.stream == "MEND_FAILED")
        .collect();
    assert_eq!(raw.len(), 2, "{raw:?}");
    assert!(
        raw.iter()
            .any(|e| e.payload_base64.as_deref() == Some("e25vdCBhbiBlbnZlbG9wZQ=="))
    );
    assert!(
        raw.iter().any(|e| e
            .error
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("line break")),
        "{raw:?}"
    );

    // Repairs are not announced on their own: each travels in its retry's history, with the attempt
    // it made, to be announced with the transition that ends or parks the lineage.
    assert!(js::events(&js, "orders", "repaired").await?.is_empty());
    assert_eq!(history[1].attempt, Some(2));
    let parked_events = js::events(&js, "orders", "parked").await?;
    assert_eq!(parked_events.len(), 4);
    // A parking carries the lineage's delegation as a step, with its attempt.
    let of_unknown = parked_events
        .iter()
        .find(|e| e["data"]["id"] == "ORDERS:2")
        .expect("parked event of ORDERS:2");
    assert_eq!(of_unknown["data"]["steps"][0]["what"], "delegated");
    assert_eq!(of_unknown["data"]["steps"][0]["attempt"], 1);
    js::consumer_drained(&js, "MEND_FAILED", "mend-processor", TEST_TIMEOUT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_refuse_to_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("r.toml"),
        "[[rule]]\nname = \"a\"\nwhen = 'x ==='\npark = \"y\"\n",
    )?;
    let mut p = MendProcess::start(
        "processor",
        &processor_config("nats://127.0.0.1:1", dir.path(), ""),
    )
    .await?;
    let status = p.wait_exit(std::time::Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(64), "{}", p.log());
    assert!(
        p.log()
            .contains("r.toml:3: rule `a`: key `when`: invalid CEL"),
        "{}",
        p.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_changes_behaviour_and_a_broken_edit_does_not() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rules.toml");
    let rule = |note: &str| format!("[[rule]]\nname = \"r\"\nwhen = 'true'\npark = \"{note}\"\n");
    std::fs::write(&file, rule("v1"))?;
    let config = processor_config(&nats.url(), dir.path(), "");
    let p = MendProcess::start("processor", &config).await?;
    p.ready().await?;

    // Parks envelope `seq` and returns the reason it was parked with.
    let park = |seq: u64| {
        let js = js.clone();
        async move {
            let env = envelope(seq, json!({}), "c", "/x");
            js::publish_all(&js, vec![failed(env.to_string().into())]).await?;
            wait::until(&format!("envelope {seq} parked"), TEST_TIMEOUT, || {
                let js = js.clone();
                async move {
                    let parked = js::parked(&js, "orders").await?;
                    Ok(parked
                        .into_iter()
                        .find(|e| e.seq == seq)
                        .and_then(|e| e.reason))
                }
            })
            .await
        }
    };
    assert_eq!(park(1).await?, "v1");

    std::fs::write(&file, rule("v2"))?;
    p.wait_log("Rules reloaded", TEST_TIMEOUT).await?;
    assert_eq!(park(2).await?, "v2", "the edit is live without a restart");

    std::fs::write(
        &file,
        "[[rule]]\nname = \"r\"\nwhen = 'true &&'\npark = \"v3\"\n",
    )?;
    p.wait_log("Rules edit refused", TEST_TIMEOUT).await?;
    assert!(
        p.log()
            .contains("rules.toml:3: rule `r`: key `when`: invalid CEL"),
        "{}",
        p.log()
    );
    assert_eq!(park(3).await?, "v2", "the previous rules stay live");

    let metrics_url = format!("http://{}/metrics", mend_e2e::mend::listen_addr(&config));
    let lines = [
        "mend_rules_reloads_total{result=\"ok\"} 1",
        "mend_rules_reloads_total{result=\"refused\"} 1",
        "mend_parked_total{reason=\"rule_park\"} 3",
        "mend_rule_matched_total{rule=\"r\"} 3",
        "mend_rules_loaded 1",
    ];
    // A park is counted once its publish is stored, so just after the parked copy can be read:
    // wait for the counters rather than read them once.
    let _ = wait::until("the counters of three parks", TEST_TIMEOUT, || {
        let url = metrics_url.clone();
        async move {
            let text = reqwest::get(&url).await?.text().await?;
            Ok(lines.iter().all(|l| text.contains(l)).then_some(()))
        }
    })
    .await;
    let metrics = reqwest::get(&metrics_url).await?.text().await?;
    for line in lines {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert_eq!(
        metrics.matches("mend_rules_info{digest=").count(),
        2,
        "{metrics}"
    );
    Ok(())
}

/// `n` failures for service `svc`: even seqs are repairable string amounts, odd ones unknown accounts.
fn mixed_failures(svc: &str, n: u64) -> Vec<Out> {
    (1..=n)
        .map(|seq| {
            let mut env = if seq % 2 == 0 {
                envelope(seq, json!({"amount": "1.50"}), "bad_type", "/amount")
            } else {
                envelope(
                    seq,
                    json!({"account": "nobody"}),
                    "unknown_account",
                    "/account",
                )
            };
            env["service"] = json!(svc);
            Out {
                subject: format!("mend.failed.{svc}"),
                headers: Default::default(),
                payload: env.to_string().into(),
            }
        })
        .collect()
}

/// Retries and parkings of `svc` per lineage seq, once every one of `n` lineages has an outcome.
async fn outcomes(
    js: &async_nats::jetstream::Context,
    svc: &str,
    n: u64,
) -> anyhow::Result<std::collections::BTreeMap<u64, Vec<&'static str>>> {
    wait::until("an outcome for every failure", TEST_TIMEOUT, || {
        let js = js.clone();
        async move {
            let mut seen: std::collections::BTreeMap<u64, Vec<&'static str>> = Default::default();
            for m in js::read_all(&js, "MEND_RETRY", &format!("mend.retry.{svc}")).await? {
                let id = m
                    .headers
                    .get("Mend-Id")
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                let seq: u64 = id
                    .rsplit(':')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                seen.entry(seq).or_default().push("retry");
            }
            for e in js::parked(&js, svc).await? {
                seen.entry(e.seq).or_default().push("parked");
            }
            Ok((seen.len() as u64 >= n).then_some(seen))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_parks_nothing_twice() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let n = 1500;
    let mut p = MendProcess::start(
        "processor",
        &processor_config(
            &nats.url(),
            &example_rules(),
            "concurrency = 8\nack_wait = \"2s\"",
        ),
    )
    .await?;
    p.ready().await?;
    js::publish_all(&js, mixed_failures("orders", n)).await?;
    for round in 1..=3u64 {
        p.ready().await?;
        let target = round * n / 5;
        wait::until("some progress", TEST_TIMEOUT, || {
            let js = js.clone();
            async move {
                let s = js
                    .get_stream("MEND_FAILED")
                    .await?
                    .info()
                    .await?
                    .state
                    .messages;
                Ok((s <= n - target).then_some(()))
            }
        })
        .await?;
        p.kill().await?;
        p.restart().await?;
    }
    p.ready().await?;
    let seen = outcomes(&js, "orders", n).await?;
    for (seq, what) in &seen {
        let expect = if seq % 2 == 0 { "retry" } else { "parked" };
        assert_eq!(what, &vec![expect], "lineage {seq}");
    }
    assert_eq!(seen.len() as u64, n);
    js::consumer_drained(&js, "MEND_FAILED", "mend-processor", TEST_TIMEOUT).await?;
    Ok(())
}

fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processors_share_the_work_without_duplicates() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let configs = [
        processor_config(&nats.url(), &example_rules(), "concurrency = 4"),
        processor_config(&nats.url(), &example_rules(), "concurrency = 4"),
    ];
    let a = MendProcess::start("processor", &configs[0]).await?;
    let b = MendProcess::start("processor", &configs[1]).await?;
    a.ready().await?;
    b.ready().await?;
    let n = 2000;
    js::publish_all(&js, mixed_failures("orders", n)).await?;
    let seen = outcomes(&js, "orders", n).await?;
    assert!(
        seen.values().all(|w| w.len() == 1),
        "one outcome per failure"
    );
    js::consumer_drained(&js, "MEND_FAILED", "mend-processor", TEST_TIMEOUT).await?;

    let mut handled = Vec::new();
    for config in &configs {
        let url = format!("http://{}/metrics", mend_e2e::mend::listen_addr(config));
        let m = reqwest::get(&url).await?.text().await?;
        handled.push(counter(&m, "mend_repaired_total") + counter(&m, "mend_parked_total"));
    }
    assert!(
        handled.iter().all(|&h| h > 0.0),
        "both took part: {handled:?}"
    );
    assert_eq!(
        handled.iter().sum::<f64>(),
        n as f64,
        "no failure handled twice: {handled:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_rule_is_cut_off_and_the_failure_parked() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let dir = tempfile::tempdir()?;
    // About eight million steps: far past the time limit, though CEL has no loops.
    let list = format!(
        "[{}]",
        (1..=200)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    std::fs::write(
        dir.path().join("slow.toml"),
        format!(
            "[[rule]]\nname = \"slow\"\nwhen = '{list}.map(a, {list}.map(b, {list}.map(c, a + b + c))).size() > 0'\npark = \"never reached\"\n"
        ),
    )?;
    let config = processor_config(&nats.url(), dir.path(), "rule_timeout = \"100ms\"");
    let p = MendProcess::start("processor", &config).await?;
    p.ready().await?;
    // More runaway failures than evaluations may run at once: each evaluation must really stop at
    // its limit to give its place to the next (else: "could not start within 100ms").
    let n = 8;
    let failures = (1..=n)
        .map(|seq| failed(envelope(seq, json!({}), "c", "/x").to_string().into()))
        .collect();
    js::publish_all(&js, failures).await?;
    let reasons = wait::until("the failures parked", TEST_TIMEOUT, || {
        let js = js.clone();
        async move {
            let parked = js::parked(&js, "orders").await?;
            Ok((parked.len() == n as usize).then(|| {
                parked
                    .into_iter()
                    .filter_map(|e| e.reason)
                    .collect::<Vec<_>>()
            }))
        }
    })
    .await?;
    for reason in &reasons {
        assert!(reason.contains("took longer than"), "{reasons:?}");
    }
    // The processor stays responsive meanwhile.
    let health = reqwest::get(format!(
        "http://{}/healthz",
        mend_e2e::mend::listen_addr(&config)
    ))
    .await?;
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!(
        "http://{}/readyz",
        mend_e2e::mend::listen_addr(&config)
    ))
    .await?;
    assert_eq!(ready.status(), 200);
    Ok(())
}
