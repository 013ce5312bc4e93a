//! Traces over OTLP (SPEC §11), seen by a real OTLP/HTTP receiver that decodes what mend sends
//! with the official OpenTelemetry protobuf definitions: the sidecar's receive of a message is a
//! consumer span of the producer's trace, each call of the app (each try, each batch entry) a
//! client span under it, and the app is called as its child; a repaired or resubmitted message is
//! one trace across every role; without the `OTEL_*` variables nothing is started or sent.

use mend_e2e::js::{self, Out};
use mend_e2e::mend::MendProcess;
use mend_e2e::otlp::{Receiver, Span};
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT, World};
use serde_json::json;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";
const OTHER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const OTHER_SPAN: &str = "b7ad6b7169203331";

/// A keyed order carrying the producer's trace context.
fn traced(key: &str, n: u64, span: &str) -> Out {
    let mut out = Out::keyed("app.created", KEY_HEADER, key, json!({"key": key, "n": n}));
    out.headers
        .insert("traceparent", format!("00-{TRACE}-{span}-01").as_str());
    out.headers.insert("tracestate", "vendor=1");
    out
}

/// The threads of process `pid`, by name.
fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `mend <role>` with `config`, exporting its traces to `receiver`, once ready.
#[allow(clippy::unwrap_used)]
async fn traced_role(role: &str, config: &str, receiver: &Receiver) -> MendProcess {
    let env = receiver.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let p = MendProcess::start_with_env(role, config, &env)
        .await
        .unwrap();
    p.ready().await.unwrap();
    p
}

/// The one span of `spans` that `what` describes.
#[allow(clippy::unwrap_used)]
fn one<'a>(spans: &'a [Span], what: &str, f: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "one {what}: {spans:#?}");
    found[0]
}

/// The one span named `name` whose parent is `parent`.
fn under<'a>(spans: &'a [Span], parent: &Span, name: &str) -> &'a Span {
    one(spans, &format!("{name} under {}", parent.name), |s| {
        s.name == name && s.parent_span_id == parent.span_id
    })
}

/// The sidecar's `receive` of attempt `attempt` of the message in trace `trace`.
fn receive<'a>(spans: &'a [Span], trace: &str, attempt: &str) -> &'a Span {
    one(spans, &format!("receive of attempt {attempt}"), |s| {
        s.name == "receive" && s.trace_id == trace && s.attr("mend.attempt") == Some(attempt)
    })
}

#[tokio::test]
async fn the_call_of_the_app_is_a_client_span_of_the_producers_trace() {
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    let sidecar = traced_role("sidecar", &world.keyed_config("app", ""), &receiver).await;
    let pid = sidecar.pid().unwrap();
    assert!(
        threads(pid).iter().any(|t| t == "mend-otel"),
        "{:?}",
        threads(pid)
    );

    js::publish_all(&world.js, vec![traced("k1", 0, PRODUCER_SPAN)])
        .await
        .unwrap();
    let spans = receiver
        .wait_for("the message's receive", TEST_TIMEOUT, |spans| {
            spans.iter().any(|s| s.name == "receive")
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sidecar.log()));
    // The message's receive, a consumer span under the producer's; the call a client span
    // under it.
    let received = receive(&spans, TRACE, "1");
    assert_eq!(received.service, "mend-sidecar");
    assert_eq!(received.parent_span_id, PRODUCER_SPAN, "{received:?}");
    assert_eq!(received.kind, 5, "a consumer span: {received:?}");
    assert_eq!(
        received.attr("messaging.destination.name"),
        Some("app.created")
    );
    assert_eq!(received.attr("messaging.system"), Some("nats"));
    assert_eq!(received.attr("mend.key"), Some("k1"));
    assert_eq!(received.attr("mend.service"), Some("app"));
    assert!(
        received
            .attr("mend.id")
            .is_some_and(|id| id.starts_with("APP:"))
    );
    let deliver = under(&spans, received, "deliver");
    assert_eq!(deliver.trace_id, TRACE, "{deliver:?}");
    assert_eq!(deliver.kind, 3, "a client span: {deliver:?}");
    assert_eq!(deliver.attr("http.response.status_code"), Some("200"));
    assert_eq!(deliver.attr("http.request.method"), Some("POST"));
    assert_eq!(deliver.attr("mend.try"), Some("1"));
    assert_eq!(deliver.status, 1, "ok: {deliver:?}");

    // The app was called as a child of that span, in the same trace, its trace state kept.
    let log = world.app.log();
    let got = log
        .iter()
        .find(|d| d.field("key") == Some(&json!("k1")))
        .unwrap();
    assert_eq!(
        got.header("traceparent"),
        Some(format!("00-{TRACE}-{}-01", deliver.span_id).as_str())
    );
    assert_eq!(got.header("tracestate"), Some("vendor=1"));
}

#[tokio::test]
async fn without_the_otel_variables_nothing_is_started_or_sent() {
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    // Everything but an endpoint: still off.
    let env = [
        ("OTEL_SERVICE_NAME", "not-exported"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let config = world.keyed_config("app", "");
    let sidecar = MendProcess::start_with_env("sidecar", &config, &env)
        .await
        .unwrap();
    sidecar.ready().await.unwrap();
    js::publish_all(&world.js, vec![traced("k1", 0, PRODUCER_SPAN)])
        .await
        .unwrap();
    world
        .app
        .wait_for("k1 delivered", TEST_TIMEOUT, |log| {
            log.iter()
                .any(|d| d.ok() && d.field("key") == Some(&json!("k1")))
        })
        .await
        .unwrap();
    let threads = threads(sidecar.pid().unwrap());
    assert!(
        !threads.iter().any(|t| t.starts_with("mend-otel")),
        "{threads:?}"
    );
    // The message's own trace context reaches the app as it came.
    let log = world.app.log();
    let got = log
        .iter()
        .find(|d| d.field("key") == Some(&json!("k1")))
        .unwrap();
    assert_eq!(
        got.header("traceparent"),
        Some(format!("00-{TRACE}-{PRODUCER_SPAN}-01").as_str())
    );
    // No export counters either: the export was never set up.
    let metrics = reqwest::get(format!(
        "http://{}/metrics",
        mend_e2e::mend::listen_addr(&config)
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(!metrics.contains("mend_trace_spans"), "{metrics}");
    assert_eq!(receiver.requests(), 0);
}

/// The value of counter `line` (name and labels) in a /metrics text, 0 when absent.
fn counter(metrics: &str, line: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_collector_that_is_down_costs_only_counted_drops() {
    let world = World::new().await.unwrap();
    // A collector nothing listens on, and a small queue: every span is dropped, none waits.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let config = world.keyed_config("app", "");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", gone.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "8"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4"),
    ];
    let sidecar = MendProcess::start_with_env("sidecar", &config, &env)
        .await
        .unwrap();
    sidecar.ready().await.unwrap();
    let n = 300;
    js::publish_all(
        &world.js,
        (0..n)
            .map(|i| traced(&format!("k{}", i % 30), i, PRODUCER_SPAN))
            .collect(),
    )
    .await
    .unwrap();
    world
        .app
        .wait_for("every message delivered", TEST_TIMEOUT, |log| {
            log.iter().filter(|d| d.ok()).count() >= n as usize
        })
        .await
        .unwrap();
    let url = format!("http://{}/metrics", mend_e2e::mend::listen_addr(&config));
    let metrics = mend_e2e::wait::until("the drops counted", TEST_TIMEOUT, || async {
        let m = reqwest::get(&url).await?.text().await?;
        let dropped = counter(&m, "mend_trace_spans_dropped_total{reason=\"queue_full\"}")
            + counter(
                &m,
                "mend_trace_spans_dropped_total{reason=\"export_failed\"}",
            );
        Ok((dropped >= n as f64).then_some(m))
    })
    .await
    .unwrap();
    assert!(
        counter(
            &metrics,
            "mend_trace_spans_dropped_total{reason=\"queue_full\"}"
        ) > 0.0,
        "a queue of 8 overflows: {metrics}"
    );
    assert_eq!(counter(&metrics, "mend_trace_spans_exported_total"), 0.0);
}

#[tokio::test]
async fn a_collector_that_refuses_costs_only_counted_drops() {
    // A collector that answers 503: its exports fail and are counted.
    let world = World::new().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    receiver.refuse(true);
    let config = world.keyed_config("app", "");
    let endpoint = receiver.endpoint();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let sidecar = MendProcess::start_with_env("sidecar", &config, &env)
        .await
        .unwrap();
    sidecar.ready().await.unwrap();
    js::publish_all(&world.js, vec![traced("z1", 0, PRODUCER_SPAN)])
        .await
        .unwrap();
    let url = format!("http://{}/metrics", mend_e2e::mend::listen_addr(&config));
    mend_e2e::wait::until("a refused export counted", TEST_TIMEOUT, || async {
        let m = reqwest::get(&url).await?.text().await?;
        Ok((counter(
            &m,
            "mend_trace_spans_dropped_total{reason=\"export_failed\"}",
        ) >= 1.0)
            .then_some(()))
    })
    .await
    .unwrap();
    assert!(receiver.requests() >= 1);
    assert!(receiver.spans().is_empty());
}

#[tokio::test]
async fn a_repaired_failure_is_one_trace_across_sidecar_and_processor() {
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    // The app refuses an order until it is marked fixed; a rule marks it.
    world.app.script(|d| match d.json.as_ref() {
        Some(o) if o["fixed"] == true => mend_e2e::app::Reply::Ok,
        _ => mend_e2e::app::Reply::Problem(
            422,
            json!({"title": "not fixed", "code": "unfixed", "field": "/fixed"}),
        ),
    });
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("fix.toml"),
        "[[rule]]\nname = \"mark-fixed\"\nwhen = 'error.code == \"unfixed\"'\nset = { \"/fixed\" = 'true' }\n",
    )
    .unwrap();
    let sidecar = traced_role("sidecar", &world.keyed_config("app", ""), &receiver).await;
    let processor = traced_role(
        "processor",
        &mend_e2e::mend::processor_config(&world.nats.url(), rules.path(), ""),
        &receiver,
    )
    .await;

    js::publish_all(&world.js, vec![traced("k1", 0, PRODUCER_SPAN)])
        .await
        .unwrap();
    let spans = receiver
        .wait_for(
            "two deliveries and a rule's decision",
            TEST_TIMEOUT,
            |spans| {
                spans.iter().filter(|s| s.name == "receive").count() >= 2
                    && spans.iter().any(|s| s.name == "evaluate")
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", sidecar.log(), processor.log()));
    assert!(
        spans.iter().all(|s| s.trace_id == TRACE),
        "one trace: {spans:#?}"
    );
    let first_receive = receive(&spans, TRACE, "1");
    let first = under(&spans, first_receive, "deliver");
    assert_eq!(first.attr("http.response.status_code"), Some("422"));
    assert_eq!(first.status, 2, "an error: {first:?}");
    let evaluate = spans.iter().find(|s| s.name == "evaluate").unwrap();
    assert_eq!(evaluate.service, "mend-processor");
    assert_eq!(evaluate.attr("mend.rule"), Some("mark-fixed"));
    assert_eq!(evaluate.attr("mend.decision"), Some("repaired"));
    assert_eq!(evaluate.attr("mend.id"), first_receive.attr("mend.id"));
    let second_receive = receive(&spans, TRACE, "2");
    let second = under(&spans, second_receive, "deliver");
    assert_eq!(second.attr("http.response.status_code"), Some("200"));
    assert_eq!(
        second_receive.attr("mend.id"),
        first_receive.attr("mend.id")
    );
    // Who continues under whom: the producer's span → the sidecar's receive → its delegation (a
    // producer span, beside the failed call) → the processor's decision → its publish of the
    // retry (a producer span) → the sidecar's receive of the retry → its call.
    let delegate = under(&spans, first_receive, "delegate");
    let publish = spans.iter().find(|s| s.name == "publish").unwrap();
    assert_eq!(first_receive.parent_span_id, PRODUCER_SPAN);
    assert_eq!(delegate.kind, 4, "a producer span: {delegate:?}");
    assert_eq!(delegate.attr("mend.error.code"), Some("unfixed"));
    assert_eq!(
        delegate.attr("messaging.destination.name"),
        Some("mend.failed.app")
    );
    assert_eq!(evaluate.parent_span_id, delegate.span_id, "{evaluate:?}");
    assert_eq!(publish.parent_span_id, evaluate.span_id, "{publish:?}");
    assert_eq!(publish.kind, 4);
    assert_eq!(publish.attr("mend.to"), Some("retry"));
    assert_eq!(publish.attr("mend.attempt"), Some("2"));
    assert_eq!(
        second_receive.parent_span_id, publish.span_id,
        "{second_receive:?}"
    );
}

#[tokio::test]
async fn transient_answers_are_tries_of_one_receive() {
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    // Two 503s, then the app takes it.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    world.app.script(move |_| {
        if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            mend_e2e::app::Reply::Status(503)
        } else {
            mend_e2e::app::Reply::Ok
        }
    });
    let config = world.keyed_config("app", "backoff_initial = \"10ms\"\n");
    let sidecar = traced_role("sidecar", &config, &receiver).await;
    js::publish_all(&world.js, vec![traced("t1", 0, PRODUCER_SPAN)])
        .await
        .unwrap();
    let spans = receiver
        .wait_for("three tries in a receive", TEST_TIMEOUT, |spans| {
            spans.iter().any(|s| s.name == "receive")
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sidecar.log()));
    let received = receive(&spans, TRACE, "1");
    assert_eq!(received.parent_span_id, PRODUCER_SPAN);
    for (n, status, ok) in [("1", "503", 2), ("2", "503", 2), ("3", "200", 1)] {
        let tried = one(&spans, &format!("try {n}"), |s| {
            s.name == "deliver" && s.attr("mend.try") == Some(n)
        });
        assert_eq!(tried.parent_span_id, received.span_id, "{tried:?}");
        assert_eq!(tried.attr("http.response.status_code"), Some(status));
        assert_eq!(tried.status, ok, "{tried:?}");
    }
    // Each try was called with its own span as the app's parent.
    let parents: Vec<String> = world
        .app
        .log()
        .iter()
        .filter_map(|d| d.header("traceparent").map(str::to_owned))
        .collect();
    assert_eq!(parents.len(), 3, "{parents:?}");
    assert_eq!(
        parents
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3,
        "{parents:?}"
    );
}

#[tokio::test]
async fn a_batch_is_a_span_linked_with_each_entrys() {
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    let config = mend_e2e::mend::sidecar_config(
        "app",
        &world.nats.url(),
        mend_e2e::world::STREAM,
        &["app.>"],
        &world.app.batch_endpoint(),
        &format!(
            "key = {{ header = \"{KEY_HEADER}\" }}\nbatch = {{ max_messages = 10, max_wait = \"200ms\" }}"
        ),
    );
    let sidecar = traced_role("sidecar", &config, &receiver).await;
    let n = 6u64;
    js::publish_all(
        &world.js,
        (0..n)
            .map(|i| traced(&format!("b{i}"), i, PRODUCER_SPAN))
            .collect(),
    )
    .await
    .unwrap();
    let spans = receiver
        .wait_for("every message's receive", TEST_TIMEOUT, |spans| {
            spans.iter().filter(|s| s.name == "receive").count() >= n as usize
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sidecar.log()));
    let batches: Vec<&Span> = spans.iter().filter(|s| s.name == "deliver batch").collect();
    for batch in &batches {
        // A trace of its own (its entries are of many), the HTTP call's status on it.
        assert!(batch.parent_span_id.is_empty(), "{batch:?}");
        assert_ne!(batch.trace_id, TRACE);
        assert_eq!(batch.kind, 3, "{batch:?}");
        assert_eq!(batch.attr("http.response.status_code"), Some("200"));
        assert_eq!(
            batch.attr("messaging.batch.message_count"),
            Some(batch.links.len().to_string().as_str())
        );
    }
    let entries: Vec<&Span> = spans.iter().filter(|s| s.name == "deliver").collect();
    assert_eq!(entries.len(), n as usize);
    for entry in entries {
        // Under its receive, in the producer's trace; it and its batch link to each other.
        let received = spans
            .iter()
            .find(|s| s.span_id == entry.parent_span_id)
            .unwrap();
        assert_eq!(received.name, "receive");
        assert_eq!(received.parent_span_id, PRODUCER_SPAN);
        assert_eq!(entry.attr("mend.batched"), Some("true"));
        assert_eq!(entry.status, 1, "{entry:?}");
        let batch = batches
            .iter()
            .find(|b| entry.links == vec![(b.trace_id.clone(), b.span_id.clone())])
            .unwrap_or_else(|| panic!("{entry:?} links to a batch: {batches:#?}"));
        assert!(
            batch
                .links
                .contains(&(entry.trace_id.clone(), entry.span_id.clone())),
            "{batch:?}"
        );
    }
    // The app's work on each entry continues under the entry's span (its CloudEvent's
    // `traceparent`).
    let log = world.app.log();
    for entry in spans.iter().filter(|s| s.name == "deliver") {
        let parent = format!("00-{}-{}-01", entry.trace_id, entry.span_id);
        assert!(
            log.iter()
                .any(|d| d.header("traceparent") == Some(parent.as_str())),
            "{parent}"
        );
    }
}

#[tokio::test]
async fn a_parked_message_resubmitted_from_the_dashboard_continues_its_trace() {
    use mend_e2e::dashboard::{Dashboard, OPERATOR_TOKEN};
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    world
        .app
        .script(|d| mend_e2e::app::order_problem(d).unwrap_or(mend_e2e::app::Reply::Ok));
    let _sidecar = traced_role("sidecar", &world.keyed_config("app", ""), &receiver).await;
    let rules = mend_e2e::mend::example_rules();
    let config = mend_e2e::mend::processor_config(&world.nats.url(), &rules, "");
    let _processor = traced_role("processor", &config, &receiver).await;
    let env = receiver.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let db = tempfile::tempdir().unwrap();
    let d = Dashboard::start_with_env(
        &world.nats.url(),
        &format!("sqlite://{}", db.path().join("mend.db").display()),
        "",
        &env,
    )
    .await
    .unwrap();

    // An order for an account nobody knows: parked by the example rules.
    // A later order of the same key, of a trace of its own, is held behind it.
    let mut out = traced("b1", 0, PRODUCER_SPAN);
    out.payload = json!({"key": "b1", "n": 0, "account": "nobody", "amount": 10})
        .to_string()
        .into();
    let mut later = traced("b1", 1, PRODUCER_SPAN);
    later.payload = json!({"key": "b1", "n": 1, "account": "acct-1", "amount": 10})
        .to_string()
        .into();
    later.headers.insert(
        "traceparent",
        format!("00-{OTHER_TRACE}-{OTHER_SPAN}-01").as_str(),
    );
    js::publish_all(&world.js, vec![out, later]).await.unwrap();
    let parked = d
        .wait_messages("status=parked", 1, TEST_TIMEOUT)
        .await
        .unwrap();
    receiver
        .wait_for("the later order held", TEST_TIMEOUT, |spans| {
            spans.iter().any(|s| s.name == "hold")
        })
        .await
        .unwrap();
    let id = parked[0]["id"].as_str().unwrap().to_owned();
    // A person fixes it, whenever that is.
    let (status, body) = d
        .post(
            &format!("/api/messages/{id}/resubmit"),
            Some(OPERATOR_TOKEN),
            &json!({"payload": {"key": "b1", "n": 0, "account": "acct-1", "amount": 10}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    d.wait_status(&id, "resolved", TEST_TIMEOUT).await.unwrap();

    let spans = receiver
        .wait_for("the parked message's whole trip", TEST_TIMEOUT, |spans| {
            ["ingest", "resubmit", "evaluate", "delegate", "release"]
                .iter()
                .all(|n| spans.iter().any(|s| s.name == *n))
                && spans
                    .iter()
                    .filter(|s| s.name == "receive" && s.trace_id == OTHER_TRACE)
                    .count()
                    >= 2
                && spans
                    .iter()
                    .any(|s| s.name == "receive" && s.attr("mend.attempt") == Some("2"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ours: Vec<_> = spans
        .iter()
        .filter(|s| s.attr("mend.id") == Some(id.as_str()))
        .collect();
    assert!(
        ours.iter().all(|s| s.trace_id == TRACE),
        "one trace: {ours:#?}"
    );
    let find = |name: &str| *ours.iter().find(|s| s.name == name).unwrap();
    let evaluate = find("evaluate");
    assert_eq!(evaluate.attr("mend.decision"), Some("parked"));
    assert_eq!(evaluate.attr("mend.rule"), Some("unknown-account"));
    let park = ours
        .iter()
        .find(|s| s.name == "publish" && s.attr("mend.to") == Some("parked"))
        .unwrap();
    assert_eq!(park.parent_span_id, evaluate.span_id);
    let ingest = find("ingest");
    assert_eq!(ingest.service, "mend-dashboard");
    assert_eq!(ingest.parent_span_id, park.span_id, "{ingest:?}");
    // The resubmission continues the message's own trace, linked to the attempt it follows (the
    // span that parked it).
    let resubmit = find("resubmit");
    assert_eq!(resubmit.service, "mend-dashboard");
    assert_eq!(resubmit.kind, 4);
    assert_eq!(resubmit.parent_span_id, PRODUCER_SPAN, "{resubmit:?}");
    assert_eq!(
        resubmit.links,
        vec![(park.trace_id.clone(), park.span_id.clone())],
        "{resubmit:?}"
    );
    assert_eq!(resubmit.attr("mend.edited"), Some("true"));
    assert_eq!(resubmit.attr("mend.by"), Some("token:ops"));
    assert_eq!(resubmit.attr("mend.attempt"), Some("2"));
    let second = receive(&spans, TRACE, "2");
    assert_eq!(second.parent_span_id, resubmit.span_id, "{second:?}");
    let delivered = under(&spans, second, "deliver");
    assert_eq!(delivered.attr("http.response.status_code"), Some("200"));
    // The key's release begins in the head's trace, under the resubmission's receive; the held
    // order, in its own trace, was held under its receive and delivered under its hold.
    let release = under(&spans, second, "release");
    assert_eq!(second.attr("mend.key"), Some("b1"));
    assert_eq!(release.attr("mend.held"), Some("1"));
    let held_back = one(&spans, "the held order's first receive", |s| {
        s.name == "receive" && s.trace_id == OTHER_TRACE && s.parent_span_id == OTHER_SPAN
    });
    let hold = under(&spans, held_back, "hold");
    assert_eq!(hold.kind, 4);
    assert_eq!(hold.attr("mend.head"), Some(id.as_str()));
    let released = under(&spans, hold, "receive");
    let held = under(&spans, released, "deliver");
    assert_eq!(held.attr("http.response.status_code"), Some("200"));
}

#[tokio::test]
async fn a_malformed_or_oversized_trace_context_starts_a_trace_of_its_own() {
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    let _sidecar = traced_role("sidecar", &world.keyed_config("app", ""), &receiver).await;
    // Not a traceparent, an all-zero one (invalid by W3C), one of a future version with junk,
    // and a valid one with a 20 KB tracestate.
    let bad = [
        ("m1", "garbage".to_owned(), "x".to_owned()),
        (
            "m2",
            "00-00000000000000000000000000000000-0000000000000000-01".to_owned(),
            String::new(),
        ),
        (
            "m3",
            format!("ff-{TRACE}-{PRODUCER_SPAN}-01"),
            String::new(),
        ),
        (
            "m4",
            format!("00-{TRACE}-{PRODUCER_SPAN}-01"),
            format!("k={}", "v".repeat(20_000)),
        ),
    ];
    // And a key of 10,000 characters: its span's attribute is cut short, the export goes through.
    let long = format!("m5{}", "é".repeat(5_000));
    let mut msgs: Vec<Out> = vec![Out::keyed(
        "app.created",
        KEY_HEADER,
        &long,
        json!({"key": long}),
    )];
    msgs.extend(bad.iter().map(|(key, parent, state)| {
        let mut out = Out::keyed("app.created", KEY_HEADER, key, json!({"key": key}));
        out.headers.insert("traceparent", parent.as_str());
        if !state.is_empty() {
            out.headers.insert("tracestate", state.as_str());
        }
        out
    }));
    js::publish_all(&world.js, msgs).await.unwrap();
    let spans = receiver
        .wait_for("five receives", TEST_TIMEOUT, |spans| {
            spans.iter().filter(|s| s.name == "receive").count() >= 5
        })
        .await
        .unwrap();
    let clipped = one(&spans, "the long key's receive", |s| {
        s.attr("mend.key").is_some_and(|k| k.starts_with("m5"))
    })
    .attr("mend.key")
    .unwrap_or_default();
    assert!(
        clipped.len() <= 256 + 3 && clipped.ends_with('…'),
        "{clipped}"
    );
    let log = world.app.log();
    for (key, ..) in &bad {
        let got = log
            .iter()
            .find(|d| d.ok() && d.field("key") == Some(&json!(key)))
            .unwrap_or_else(|| panic!("{key} not delivered"));
        let span = spans
            .iter()
            .find(|s| got.mend_id() == s.attr("mend.id").unwrap_or_default())
            .unwrap();
        // The app is called with a valid trace context of the delivery's span.
        let deliver = under(&spans, span, "deliver");
        let parent = got.header("traceparent").unwrap_or_default();
        assert_eq!(
            parent,
            format!("00-{}-{}-01", deliver.trace_id, deliver.span_id),
            "{key}"
        );
        if *key == "m4" {
            // A valid parent is kept, whatever its state's size.
            assert_eq!(span.trace_id, TRACE);
            assert_eq!(span.parent_span_id, PRODUCER_SPAN);
        } else {
            // Anything else starts a trace of its own, without the state that came beside it.
            assert!(span.parent_span_id.is_empty(), "{key}: {span:?}");
            assert_eq!(got.header("tracestate"), None, "{key}");
            assert_ne!(span.trace_id, "0".repeat(32), "{key}");
        }
    }
}

#[tokio::test]
async fn a_parking_with_a_hostile_trace_context_is_taken_in_and_linked_only_when_valid() {
    use mend_e2e::dashboard::{Dashboard, OPERATOR_TOKEN, park_directly_with};
    let receiver = Receiver::start().await.unwrap();
    let world = World::new().await.unwrap();
    let env = receiver.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let db = tempfile::tempdir().unwrap();
    let d = Dashboard::start_with_env(
        &world.nats.url(),
        &format!("sqlite://{}", db.path().join("mend.db").display()),
        "",
        &env,
    )
    .await
    .unwrap();
    // Parkings whose NATS trace context is garbage, all zero, or valid with a 20 KB state.
    let contexts = [
        ("garbage".to_owned(), "x".to_owned()),
        (
            "00-00000000000000000000000000000000-0000000000000000-01".to_owned(),
            String::new(),
        ),
        (
            format!("00-{TRACE}-{PRODUCER_SPAN}-01"),
            format!("k={}", "v".repeat(20_000)),
        ),
    ];
    let headers = |seq: u64| {
        let (parent, state) = &contexts[usize::try_from(seq - 1).unwrap()];
        let mut h = async_nats::HeaderMap::new();
        h.insert("traceparent", parent.as_str());
        if !state.is_empty() {
            h.insert("tracestate", state.as_str());
        }
        h
    };
    park_directly_with(&world, 3, |seq| json!({"n": seq}), headers)
        .await
        .unwrap();
    d.wait_messages("status=parked", 3, TEST_TIMEOUT)
        .await
        .unwrap();
    for seq in 1..=3 {
        let (status, body) = d
            .post(
                &format!("/api/messages/ORDERS:{seq}/resubmit"),
                Some(OPERATOR_TOKEN),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let spans = receiver
        .wait_for(
            "three ingests and three resubmissions",
            TEST_TIMEOUT,
            |spans| {
                spans.iter().filter(|s| s.name == "resubmit").count() >= 3
                    && spans.iter().filter(|s| s.name == "ingest").count() >= 3
            },
        )
        .await
        .unwrap();
    for seq in 1..=3 {
        let id = format!("ORDERS:{seq}");
        let of = |name: &str| {
            one(&spans, &format!("{name} of {id}"), |s| {
                s.name == name && s.attr("mend.id") == Some(id.as_str())
            })
        };
        let (ingest, resubmit) = (of("ingest"), of("resubmit"));
        if seq == 3 {
            // A valid context: the ingest is under it, the resubmission linked to it.
            assert_eq!(ingest.parent_span_id, PRODUCER_SPAN, "{ingest:?}");
            assert_eq!(
                resubmit.links,
                vec![(TRACE.to_owned(), PRODUCER_SPAN.to_owned())]
            );
        } else {
            // Anything else: taken in all the same, a trace of its own, nothing linked.
            assert!(ingest.parent_span_id.is_empty(), "{ingest:?}");
            assert!(resubmit.links.is_empty(), "{resubmit:?}");
        }
    }
}
