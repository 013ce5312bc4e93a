//! `make bench`: how fast the sidecar delivers, against what this machine allows, in one run on one
//! nats-server.
//!
//! (a) a raw async-nats pull consumer that acks each message with no work (the broker's limit here);
//! (b) a minimal hand-written loop doing the sidecar's essential work: pull, POST to a no-op HTTP app
//!     with the headers SPEC §4 requires, 64 keys in flight, per-key order, confirmed ack (the limit
//!     for this work on this machine);
//! (c) the sidecar doing the same through its full code path;
//! (d) the loop of (b) one message at a time (what a naive consumer does);
//! (e) the sidecar in batch mode (bulk delivery: 100 per batch, 64 batches in flight) and (f) a
//!     hand-written batching loop doing the same essential work (`batch.rs`).
//! Then the latency the sidecar adds over (b) with one message in flight, and the sidecar's peak RSS.
//! Then repairs (the processor alone, against its broker work done by a hand-written client, and the
//! whole loop), holds (the sidecar with 5% repairable failures against 0%, the processor running for
//! both; what one repaired failure costs: messages stored in mend's streams and buckets, messages
//! mend's processes sent to the server, CPU of each process), the release of a 10k-message hold,
//! and holds at scale (a sidecar starting with 100,000 held keys; the dashboard's holds pages; the
//! release of every key against a hand-written client doing the same work).
//! The no-op app is a separate process (this binary with `--serve-app`), as a real app is, for every
//! run alike.
//!
//! Usage: `mend-bench [--messages N] [--keys K]` (defaults 200000, 1000);
//! `mend-bench --processor-only R --messages M`: only the processor, R rounds of M envelopes;
//! `mend-bench --holds-only R --messages M`: only the holds runs, R rounds, and the 10k hold;
//! `mend-bench --batch-only R`: (a) once, then R alternating rounds of (c), (e) and (f), and the
//! holds runs in batch mode;
//! `mend-bench --held-keys K`: only holds at scale: a sidecar starting with K held keys (time to
//! ready, memory, how soon a message of another key gets through) and the dashboard's holds pages.

mod batch;
mod holds_floor;
mod release_floor;
mod traces_floor;

use std::collections::{HashMap, HashSet, VecDeque};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use axum::routing::post;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{MendProcess, example_rules, processor_config, sidecar_config};
use mend_e2e::nats::NatsServer;
use repair_rules::identity::streams;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const IN_FLIGHT: usize = 64;
/// The binding keys of the sidecar runs: keyed by account, [`IN_FLIGHT`] messages at once.
const KEYED: &str = "key = { header = \"Account-Id\" }\nconcurrency = 64";
const LATENCY_SAMPLES: usize = 1000;
/// Alternating rounds of (b) and (c).
const ROUNDS: usize = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--serve-app") {
        return serve_app().await;
    }
    let (mut n, mut keys, mut processor_rounds, mut holds_rounds, mut held_keys) =
        (200_000usize, 1000usize, 0usize, 0usize, 0usize);
    let mut batch_rounds = 0usize;
    let mut traces_rounds = 0usize;
    while let Some(a) = args.next() {
        let v = args.next().context("a value after the flag")?.parse()?;
        match a.as_str() {
            "--messages" => n = v,
            "--keys" => keys = v,
            "--processor-only" => processor_rounds = v,
            "--holds-only" => holds_rounds = v,
            "--held-keys" => held_keys = v,
            "--batch-only" => batch_rounds = v,
            "--traces-only" => traces_rounds = v,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    if processor_rounds > 0 {
        return processor_only(n, processor_rounds).await;
    }
    if holds_rounds > 0 {
        return holds_only(n, keys, holds_rounds).await;
    }
    if held_keys > 0 {
        return holds_at_scale(held_keys).await;
    }
    if batch_rounds > 0 {
        return batch_only(n, keys, batch_rounds).await;
    }
    if traces_rounds > 0 {
        return traces_only(n, keys, traces_rounds).await;
    }
    let monitored = Monitored::start().await?;
    let nats = &monitored.server;
    let client = nats.client().await?;
    let js = jetstream::new(client.clone());
    let app = NoopApp::start().await?;

    js::app_stream(&js, "BENCH", &["bench.>"]).await?;
    eprintln!("publishing {n} messages of 256 bytes over {keys} keys ...");
    js::publish_all(&js, messages("bench.m", n, keys)).await?;

    let a = rate(n, raw(&js, n).await?);
    eprintln!("(a) raw pull + ack: {a:.0} msg/s");
    // (b) and (c) alternate, so drift on the machine hits both alike; medians are reported.
    let receiver = mend_e2e::otlp::Receiver::start_discarding().await?;
    let (mut bs, mut cs, mut gs, mut hs, mut rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0u64);
    for round in 0..ROUNDS {
        let (b, h) = loop_and_floor(&js, &client, &app, n, round, &receiver).await?;
        eprintln!("(b) hand-written loop, 64 keys in flight: {b:.0} msg/s");
        eprintln!("(h) the loop of (b) with the same spans as (g), through the SDK: {h:.0} msg/s");
        hs.push(h);
        let (took, peak) = sidecar_run(nats, &js, &app, &format!("bench{round}")).await?;
        let c = rate(n, took);
        eprintln!(
            "(c) mend sidecar: {c:.0} msg/s, peak RSS {:.1} MiB",
            peak as f64 / 1024.0
        );
        let (took, _) =
            sidecar_traced(nats, &js, &app, &format!("traced{round}"), &receiver).await?;
        let g = rate(n, took);
        eprintln!("(g) mend sidecar, traces exported: {g:.0} msg/s");
        bs.push(b);
        cs.push(c);
        gs.push(g);
        rss = rss.max(peak);
    }
    let (b, c, g, floor) = (
        median(&mut bs),
        median(&mut cs),
        median(&mut gs),
        median(&mut hs),
    );
    let n_d = n.min(20_000);
    let d = rate(
        n_d,
        looped(&js, &client, &app.url, "BENCH", "loop1", n_d, 1).await?,
    );
    eprintln!("(d) one at a time: {d:.0} msg/s (over {n_d} messages)");
    let bulk = batch::bulk_rounds(&monitored, &js, &client, &app, n, keys, ROUNDS).await?;

    // Latency with one message in flight: the hand-written loop, then the sidecar.
    js::app_stream(&js, "LATLOOP", &["latloop.>"]).await?;
    let loop_lat = {
        let (js2, c2, url) = (js.clone(), client.clone(), app.url.clone());
        let task = tokio::spawn(async move {
            looped(&js2, &c2, &url, "LATLOOP", "latloop", LATENCY_SAMPLES, 1).await
        });
        let lat = latency(&js, &app, "latloop.m").await?;
        task.await??;
        lat
    };
    js::app_stream(&js, "LAT", &["lat.>"]).await?;
    let config = sidecar_config(
        "lat",
        &nats.url(),
        "LAT",
        &["lat.>"],
        &app.url,
        "key = { header = \"Account-Id\" }",
    );
    let sidecar = MendProcess::start("sidecar", &config).await?;
    sidecar.ready().await?;
    let side_lat = latency(&js, &app, "lat.m").await?;
    drop(sidecar);

    // Repairs: the processor on its own, then the whole loop app → sidecar → processor → sidecar → app.
    // Alternating rounds, medians, of n envelopes: one short run of each swung the ratio by ±0.07
    // (a processor's first tenth of a second, its pulls and threads getting going, weighed on it).
    let m = n.max(1000);
    let rounds = processor_medians(nats, &js, &client, m, ROUNDS).await?;
    let (processor_rate, processor_cpu) = (rounds.rate, rounds.cpu);
    let (floor_rate, floor_server) = (rounds.floor, rounds.floor_server);
    let processor = MendProcess::start(
        "processor",
        &processor_config(&nats.url(), &example_rules(), "concurrency = 64"),
    )
    .await?;
    processor.ready().await?;
    let k = (n / 40).max(500);
    let (loop_took, mut loaded_rt, mut single_rt) = repair_loop(nats, &js, &app, k).await?;
    let loop_rate = rate(k, loop_took);
    loaded_rt.sort();
    single_rt.sort();

    drop(processor);
    // Holds: the same workload with no failures and with 5% repairable ones, alternating; each run
    // is its own service, repaired by the example rules without their service filter.
    let (_rules_dir, rules) = any_service_rules()?;
    let processor = MendProcess::start(
        "processor",
        &processor_config(&nats.url(), &rules, "concurrency = 64"),
    )
    .await?;
    processor.ready().await?;
    let h = n.min(50_000);
    let (mut clean, mut failing, mut costs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut floor_clean, mut floor_failing) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let others = [("processor", processor.pid()), ("app", app.pid())];
        let c0 = holds_run(&monitored, &js, &app, h, keys, 0, round, &others, false).await?;
        let c5 = holds_run(&monitored, &js, &app, h, keys, 5, round, &others, false).await?;
        let (r0, r5) = (rate(h, c0.took), rate(h, c5.took));
        eprintln!("holds: 0% failures {r0:.0} msg/s, 5% repairable failures {r5:.0} msg/s");
        eprintln!("  {}", per_failure(&c0, &c5));
        let (f0, f5) = floor_pair(&monitored, &js, &client, &app, h, keys, round, false).await?;
        clean.push(r0);
        failing.push(r5);
        floor_clean.push(f0);
        floor_failing.push(f5);
        costs.push((r5 / r0, per_failure(&c0, &c5)));
    }
    let (r0, r5) = (median(&mut clean), median(&mut failing));
    let (f0, f5) = (median(&mut floor_clean), median(&mut floor_failing));
    // The cost of the round whose ratio is the median.
    costs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let cost = costs
        .get(costs.len() / 2)
        .map(|(_, c)| c.clone())
        .unwrap_or_default();
    drop(processor);
    let (append_rate, release_rate) = big_hold(nats, &js, &app, 10_000).await?;
    eprintln!("10k hold: appended {append_rate:.0} msg/s, released {release_rate:.0} msg/s");

    let p = |v: &[Duration], q: f64| v[((v.len() - 1) as f64 * q) as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "\nmend benchmark: {n} messages, 256-byte JSON, {keys} keys, one nats-server (file storage), {} cores; (b) and (c) are medians of {ROUNDS} alternating runs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| run | msgs/s |\n|---|---|");
    println!("| (a) raw pull consumer, ack, no work | {a:.0} |");
    println!(
        "| (b) hand-written loop: HTTP, 64 keys in flight, key order, confirmed ack | {b:.0} |"
    );
    println!("| (c) mend sidecar, full code path | {c:.0} |");
    println!("| (d) hand-written loop, one message at a time | {d:.0} |");
    println!(
        "| (e) mend sidecar, batch mode ({} per batch, {} batches in flight at most) | {:.0} |",
        batch::BATCH,
        batch::BATCHES_IN_FLIGHT,
        bulk.e
    );
    println!(
        "| (f) hand-written batching loop: the same batches, key order, statuses, confirmed acks | {:.0} |",
        bulk.f
    );
    println!(
        "| (g) mend sidecar as (c), its spans (a receive and a deliver per message) exported over OTLP to a receiver on loopback | {g:.0} |"
    );
    println!(
        "| (h) the loop of (b) with the spans of (g), made and exported by the OpenTelemetry SDK directly | {floor:.0} |"
    );
    println!(
        "\nc/b = {:.2} (target >= 0.8)   c/d = {:.1} (target >= 3)   g/c = {:.2} (traces on against off, target >= 0.9; their floor h/b = {:.2}, g/c against it {:.2})",
        c / b,
        c / d,
        g / c,
        floor / b,
        (g / c) / (floor / b)
    );
    bulk.print(a, c);
    println!(
        "latency publish -> app, one in flight: loop p50 {:.3} ms p99 {:.3} ms; sidecar p50 {:.3} ms p99 {:.3} ms",
        ms(p(&loop_lat, 0.5)),
        ms(p(&loop_lat, 0.99)),
        ms(p(&side_lat, 0.5)),
        ms(p(&side_lat, 0.99))
    );
    println!(
        "added by the sidecar: p50 {:.3} ms, p99 {:.3} ms (target p99 <= 1 ms)",
        ms(p(&side_lat, 0.5)) - ms(p(&loop_lat, 0.5)),
        ms(p(&side_lat, 0.99)) - ms(p(&loop_lat, 0.99))
    );
    println!(
        "sidecar peak RSS: {:.1} MiB (target <= 40 MiB)",
        rss as f64 / 1024.0
    );
    println!(
        "\nrepairs (example rules): processor alone {processor_rate:.0} envelopes/s (target >= 20000; median of {ROUNDS} rounds of {m}), \
         {processor_cpu:.0} µs of processor CPU per envelope; \
         whole loop {loop_rate:.0} repairs/s (over {k})"
    );
    println!(
        "the processor's broker work alone (publishes and acks, no parsing, no rules): {floor_rate:.0} envelopes/s, \
         {floor_server:.0} µs of server CPU per envelope; processor/floor {:.2}",
        processor_rate / floor_rate
    );
    println!(
        "repair round trip, app failure -> repaired delivery: one at a time p50 {:.2} ms p99 {:.2} ms (target p50 <= 10 ms); \
         under load p50 {:.2} ms p99 {:.2} ms",
        ms(p(&single_rt, 0.5)),
        ms(p(&single_rt, 0.99)),
        ms(p(&loaded_rt, 0.5)),
        ms(p(&loaded_rt, 0.99))
    );
    println!(
        "holds ({h} messages, {keys} keys, processor running): 0% failures {r0:.0} msg/s, \
         5% repairable failures {r5:.0} msg/s, ratio {:.2} (target >= 0.8)",
        r5 / r0
    );
    println!(
        "holds floor (a hand-written sidecar and repairer doing the same broker work, nothing else): \
         0% {f0:.0} msg/s, 5% {f5:.0} msg/s, its ratio {:.2}; mend at 5% against the floor at 5%: {:.2} (target >= 0.8)",
        f5 / f0,
        r5 / f5
    );
    println!("{cost} (the round of the median ratio)");
    println!(
        "a 10000-message hold: appended at {append_rate:.0} msg/s, released at {release_rate:.0} msg/s"
    );
    holds_at_scale(100_000).await
}

/// `--traces-only R`: R alternating rounds of (c) and (g); the medians and their ratio.
async fn traces_only(n: usize, keys: usize, rounds: usize) -> anyhow::Result<()> {
    let monitored = Monitored::start().await?;
    let nats = &monitored.server;
    let js = jetstream::new(nats.client().await?);
    let app = NoopApp::start().await?;
    js::app_stream(&js, "BENCH", &["bench.>"]).await?;
    js::publish_all(&js, messages("bench.m", n, keys)).await?;
    let receiver = mend_e2e::otlp::Receiver::start_discarding().await?;
    let client = nats.client().await?;
    let (mut bs, mut hs, mut cs, mut gs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (b, h) = loop_and_floor(&js, &client, &app, n, round, &receiver).await?;
        bs.push(b);
        hs.push(h);
        let (took, _) = sidecar_run(nats, &js, &app, &format!("bench{round}")).await?;
        cs.push(rate(n, took));
        let (took, _) =
            sidecar_traced(nats, &js, &app, &format!("traced{round}"), &receiver).await?;
        gs.push(rate(n, took));
        eprintln!(
            "(b) {b:.0} msg/s, (h) {h:.0} msg/s, (c) {:.0} msg/s, (g) {:.0} msg/s",
            cs[cs.len() - 1],
            gs[gs.len() - 1]
        );
    }
    let (b, h, c, g) = (
        median(&mut bs),
        median(&mut hs),
        median(&mut cs),
        median(&mut gs),
    );
    let (requests, bytes) = receiver.received();
    println!(
        "(c) {c:.0} msg/s, (g) traces exported {g:.0} msg/s: g/c = {:.2} (target >= 0.9); the \
         floor, (b) {b:.0} msg/s and (h) with the same spans through the SDK {h:.0} msg/s: h/b = \
         {:.2}; g/c against h/b = {:.2}; the receiver took {requests} exports, {:.1} MiB",
        g / c,
        h / b,
        (g / c) / (h / b),
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// `--batch-only R`: (a) once, R rounds of (c), then R alternating rounds of (e) and (f) and the
/// holds runs in batch mode.
async fn batch_only(n: usize, keys: usize, rounds: usize) -> anyhow::Result<()> {
    let monitored = Monitored::start().await?;
    let nats = &monitored.server;
    let client = nats.client().await?;
    let js = jetstream::new(client.clone());
    let app = NoopApp::start().await?;
    js::app_stream(&js, "BENCH", &["bench.>"]).await?;
    js::publish_all(&js, messages("bench.m", n, keys)).await?;
    let a = rate(n, raw(&js, n).await?);
    eprintln!("(a) raw pull + ack: {a:.0} msg/s");
    let mut cs = Vec::new();
    for round in 0..rounds {
        let (took, _) = sidecar_run(nats, &js, &app, &format!("bench{round}")).await?;
        cs.push(rate(n, took));
        eprintln!("(c) mend sidecar: {:.0} msg/s", rate(n, took));
    }
    let c = median(&mut cs);
    let bulk = batch::bulk_rounds(&monitored, &js, &client, &app, n, keys, rounds).await?;
    println!(
        "(a) {a:.0} msg/s, (c) {c:.0} msg/s, (e) {:.0} msg/s, (f) {:.0} msg/s ({n} messages, {keys} keys)",
        bulk.e, bulk.f
    );
    bulk.print(a, c);
    Ok(())
}

/// `--holds-only R`: only the holds runs, R rounds of `--messages` each, and the 10k hold.
async fn holds_only(n: usize, keys: usize, rounds: usize) -> anyhow::Result<()> {
    let monitored = Monitored::start().await?;
    let nats = &monitored.server;
    let client = nats.client().await?;
    let js = jetstream::new(client.clone());
    let app = NoopApp::start().await?;
    let (_rules_dir, rules) = any_service_rules()?;
    let processor = MendProcess::start(
        "processor",
        &processor_config(&nats.url(), &rules, "concurrency = 64"),
    )
    .await?;
    processor.ready().await?;
    for round in 0..rounds {
        let others = [("processor", processor.pid()), ("app", app.pid())];
        let c0 = holds_run(&monitored, &js, &app, n, keys, 0, round, &others, false).await?;
        let c5 = holds_run(&monitored, &js, &app, n, keys, 5, round, &others, false).await?;
        let (r0, r5) = (rate(n, c0.took), rate(n, c5.took));
        println!(
            "0% failures {r0:.0} msg/s, 5% repairable {r5:.0} msg/s, ratio {:.2}",
            r5 / r0
        );
        println!("{}", per_failure(&c0, &c5));
        let (f0, f5) = floor_pair(&monitored, &js, &client, &app, n, keys, round, false).await?;
        println!(
            "floor (hand-written, the same broker work): 0% {f0:.0} msg/s, 5% {f5:.0} msg/s, ratio {:.2}; \
             mend at 5% against it: {:.2}",
            f5 / f0,
            r5 / f5
        );
    }
    drop(processor);
    let (append_rate, release_rate) = big_hold(nats, &js, &app, 10_000).await?;
    println!("10k hold: appended {append_rate:.0} msg/s, released {release_rate:.0} msg/s");
    Ok(())
}

/// The floor of a holds round: the hand-written sidecar and repairer at 0% and at 5% (msg/s).
#[allow(clippy::too_many_arguments)]
async fn floor_pair(
    nats: &Monitored,
    js: &jetstream::Context,
    client: &async_nats::Client,
    app: &NoopApp,
    n: usize,
    keys: usize,
    round: usize,
    batched: bool,
) -> anyhow::Result<(f64, f64)> {
    let f0 = holds_floor::run(nats, js, client, app, n, keys, 0, round, batched).await?;
    let f5 = holds_floor::run(nats, js, client, app, n, keys, 5, round, batched).await?;
    let per = |run: &FloorRun| per_unit(&run.cpu, n);
    eprintln!(
        "  floor: 0% {:.0} msg/s (CPU µs per message: {}), 5% {:.0} msg/s ({})",
        rate(n, f0.took),
        per(&f0),
        rate(n, f5.took),
        per(&f5)
    );
    Ok((rate(n, f0.took), rate(n, f5.took)))
}

/// `--held-keys K`: K keys held (entries in `mend_holds`, as a sidecar writes them, each with its
/// head out for repair and one message waiting in its hold queue) when a sidecar starts. Prints how
/// long it takes to be ready (it loads every hold first), its memory then and a minute on, how soon
/// a message of a key that is not held gets through, what the dashboard's overview and holds pages
/// take to answer, and how fast every key is released once its head's retry comes back, against
/// a hand-written client releasing as many keys with the same work (`release_floor`).
async fn holds_at_scale(k: usize) -> anyhow::Result<()> {
    let nats = Monitored::start().await?;
    let client = nats.server.client().await?;
    let js = jetstream::new(client.clone());
    let app = NoopApp::start().await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    mend::common::nats::ensure_layout(&js, &Default::default(), &shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    js::app_stream(&js, "HELD", &["held.>"]).await?;
    let service = "held";
    let started = Instant::now();
    let seeded = release_floor::Seeded::write(&js, service, k).await?;
    eprintln!(
        "{k} hold entries and {k} held messages written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let config = sidecar_config(
        service,
        &nats.server.url(),
        "HELD",
        &["held.>"],
        &app.url,
        KEYED,
    );
    let started = Instant::now();
    let sidecar = MendProcess::start("sidecar", &config).await?;
    sidecar
        .wait_log("Sidecar consuming", Duration::from_secs(3600))
        .await?;
    let ready = started.elapsed();
    let rss_ready = sidecar.pid().and_then(peak_rss_kib).unwrap_or(0);
    // A message of a key that is not held, published now: how soon it is through.
    let published = Instant::now();
    js::publish_all(&js, messages("held.free", 1, 1)).await?;
    let consumer = format!("mend-{service}-{service}");
    mend_e2e::wait::until(
        "the free key's message through",
        Duration::from_secs(600),
        || async {
            let info = consumer_info(&js, "HELD", &consumer).await?;
            let through = info.num_pending == 0
                && info.num_ack_pending == 0
                && info.delivered.stream_sequence >= 1;
            Ok(through.then_some(()))
        },
    )
    .await?;
    let free_key = published.elapsed();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let rss_later = sidecar.pid().and_then(peak_rss_kib).unwrap_or(0);

    // The dashboard: its first answer waits for its first read of the bucket; later ones are
    // served from what it follows.
    let started = Instant::now();
    let dashboard = mend_e2e::dashboard::Dashboard::start(&nats.server.url(), "").await?;
    let first = dashboard.ok("/api/holds").await?;
    let first_answer = started.elapsed();
    anyhow::ensure!(
        first["items"].as_array().map_or(0, Vec::len) == mend_dashboard::holds::DEFAULT_PAGE,
        "the first page of holds is not full: {first}"
    );
    let mut pages = vec![format!(
        "first answer {:.0} ms after start (its read of {k} entries)",
        first_answer.as_secs_f64() * 1e3
    )];
    let mut slowest = Duration::ZERO;
    let cursor = first["next_cursor"].as_str().unwrap_or_default().to_owned();
    for path in [
        "/api/overview".to_owned(),
        "/api/holds".to_owned(),
        format!("/api/holds?cursor={cursor}"),
        format!("/api/holds?service={service}&limit=1000"),
    ] {
        let mut took = Vec::new();
        let mut body = serde_json::Value::Null;
        for _ in 0..5 {
            let t = Instant::now();
            body = dashboard.ok(&path).await?;
            took.push(t.elapsed());
        }
        let worst = took.iter().max().copied().unwrap_or_default();
        slowest = slowest.max(worst);
        let what = match body["items"].as_array() {
            Some(items) => format!("{} listed", items.len()),
            None => format!("{} held keys", body["held_keys"]),
        };
        let path = path.split("cursor=").next().unwrap_or_default();
        pages.push(format!(
            "{path}{} worst of 5 {:.0} ms ({what})",
            if path.ends_with('?') {
                "cursor=…"
            } else {
                ""
            },
            worst.as_secs_f64() * 1e3
        ));
    }
    anyhow::ensure!(
        first["items"][0]["count"] == 1,
        "a held key's queue is not counted: {}",
        first["items"][0]
    );

    // Every head's retry comes back: each key's retry is delivered, then its waiting message.
    let watch = CpuWatch::start([
        ("sidecar", sidecar.pid()),
        ("nats-server", nats.server.pid()),
        ("app", app.pid()),
    ]);
    let started = Instant::now();
    let retries = seeded.retries();
    js::publish_all(&js, retries).await?;
    let retry = format!("mend-{service}-retry");
    mend_e2e::wait::until("every hold released", Duration::from_secs(1800), || async {
        let held = js
            .get_stream("MEND_HOLD")
            .await?
            .info()
            .await?
            .state
            .messages;
        let info = consumer_info(&js, "MEND_RETRY", &retry).await?;
        Ok((held == 0 && info.num_pending == 0 && info.num_ack_pending == 0).then_some(()))
    })
    .await?;
    let released = started.elapsed();
    let release_cpu = per_unit(&watch.used(), k);
    let overview = dashboard.ok("/api/overview").await?;
    drop(sidecar);

    // The floor of the release: the same keys held for another service, released by hand into the
    // same streams and bucket, once the dashboard follows the new holds.
    let floor_seeded = release_floor::Seeded::write(&js, "floor", k).await?;
    mend_e2e::wait::until(
        "the dashboard following the floor's holds",
        Duration::from_secs(600),
        || async {
            let overview = dashboard.ok("/api/overview").await?;
            Ok((overview["held_keys"].as_u64() >= Some(k as u64)).then_some(()))
        },
    )
    .await?;
    let floor = release_floor::run(&nats, &js, &client, &app, &floor_seeded).await?;
    let floor_rate = k as f64 / floor.took.as_secs_f64();
    let floor_cpu = per_unit(&floor.cpu, k);
    let mend_rate = k as f64 / released.as_secs_f64();
    println!(
        "{k} held keys (one message waiting each): sidecar ready after {:.1} s (every hold loaded), peak RSS {:.1} MiB then, \
         {:.1} MiB a minute on (targets <= 10 s, <= 80 MiB); a message of a free key through {:.0} ms after it was published; \
         dashboard: {}; slowest page {:.0} ms (target <= 200 ms); every head's retry and every waiting message delivered, \
         every hold removed in {:.1} s: {:.0} keys released per second (target >= 5000; CPU µs per key: {}); then the overview counts {} held keys; \
         the release's floor (a hand-written client doing the same reads, POSTs, writes and acks per key): {floor_rate:.0} keys/s \
         (CPU µs per key: {}); mend against it {:.2} (target >= 0.8)",
        ready.as_secs_f64(),
        rss_ready as f64 / 1024.0,
        rss_later as f64 / 1024.0,
        free_key.as_secs_f64() * 1e3,
        pages.join(", "),
        slowest.as_secs_f64() * 1e3,
        released.as_secs_f64(),
        mend_rate,
        release_cpu,
        overview["held_keys"],
        floor_cpu,
        mend_rate / floor_rate
    );
    shutdown.cancel();
    Ok(())
}

/// A sidecar on a fresh stream of `n` messages over `keys` keys, `percent` of them with a string
/// amount (a 422 the processor repairs): from ready until every message is through (consumed, no
/// failure or retry waiting, every hold queue empty). Returns, and prints per message, what the run
/// cost from the sidecar's readiness on: the CPU time of the sidecar, nats-server and `others`
/// (name, pid), the messages stored in mend's streams, and the messages mend's processes sent to the
/// server (from its monitoring endpoint): where a failure's cost goes on a machine they all share.
#[allow(clippy::too_many_arguments)]
async fn holds_run(
    nats: &Monitored,
    js: &jetstream::Context,
    app: &NoopApp,
    n: usize,
    keys: usize,
    percent: usize,
    round: usize,
    others: &[(&str, Option<u32>)],
    batched: bool,
) -> anyhow::Result<RunCost> {
    let mode = if batched { "B" } else { "" };
    let name = format!("HOLDS{percent}R{round}{mode}");
    let subject = format!("holds{percent}r{round}{}", mode.to_lowercase());
    js::app_stream(js, &name, &[&format!("{subject}.>")]).await?;
    let (msgs, failures) = holds_messages(&format!("{subject}.m"), n, keys, percent);
    js::publish_all(js, msgs).await?;
    let service = name.to_lowercase();
    let config = sidecar_config(
        &service,
        &nats.server.url(),
        &name,
        &[&format!("{subject}.>")],
        &if batched {
            batch::batch_url(app)
        } else {
            app.url.clone()
        },
        &if batched {
            batch::batch_binding()
        } else {
            KEYED.to_owned()
        },
    );
    let mut sidecar = MendProcess::start("sidecar", &config).await?;
    sidecar.ready().await?;
    let mut pids = vec![
        ("sidecar", sidecar.pid()),
        ("nats-server", nats.server.pid()),
    ];
    pids.extend_from_slice(others);
    pids.push(("bench (polling)", Some(std::process::id())));
    let watch = CpuWatch::start(pids);
    let stored_before = stored(js).await?;
    let sent_before = nats.sent_by_mend().await?;
    let started = Instant::now();
    let consumer = format!("mend-{service}-{service}");
    let mut consumed = None;
    loop {
        let (all, stream_done) = through(js, &name, &consumer, &service).await?;
        if stream_done && consumed.is_none() {
            consumed = Some(started.elapsed());
        }
        if all {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "holds run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let cpu = watch.used();
    let stored_after = stored(js).await?;
    let sent_after = nats.sent_by_mend().await?;
    let cost = RunCost {
        took,
        failures,
        stored: MEND_STREAMS
            .iter()
            .zip(stored_after.iter().zip(&stored_before))
            .map(|(name, (a, b))| (*name, a.saturating_sub(*b)))
            .collect(),
        sent: sent_by_role(&sent_before, &sent_after),
        cpu,
    };
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let mut line = format!(
        "  {percent}% failures: stream consumed after {:.2} s, all through after {:.2} s; CPU µs per message:",
        consumed.unwrap_or(took).as_secs_f64(),
        took.as_secs_f64(),
    );
    for (name, d) in &cost.cpu {
        line.push_str(&format!(" {name} {:.0},", per(*d)));
    }
    line.push_str(&format!(
        " messages stored in mend's streams {}, sent to the server by mend {}",
        cost.stored.iter().map(|(_, n)| n).sum::<u64>(),
        cost.sent.iter().map(|(_, n)| n).sum::<u64>()
    ));
    eprintln!("{line}");
    sidecar.terminate(Duration::from_secs(30)).await?;
    Ok(cost)
}

/// `n` messages over `keys` keys, `percent` of them with a string amount (the no-op app answers
/// 422, the example rules repair it), spread over keys and time; and how many that is.
fn holds_messages(subject: &str, n: usize, keys: usize, percent: usize) -> (Vec<Out>, usize) {
    let mut msgs = messages(subject, n, keys);
    let mut failures = 0;
    for (i, m) in msgs.iter_mut().enumerate() {
        // Spread over keys and time (a plain `i % 20` would pick whole keys).
        let draw = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 100;
        if draw < percent as u64 {
            failures += 1;
            let key = format!("k{}", i % keys.max(1));
            m.payload = Bytes::from(
                serde_json::json!({"key": key, "n": i, "amount": "12.50", "pad": "x".repeat(200)})
                    .to_string(),
            );
        }
    }
    (msgs, failures)
}

/// What a holds run cost.
struct RunCost {
    took: Duration,
    /// Messages that failed once and were repaired.
    failures: usize,
    /// Messages stored in each of mend's streams (how far its sequence moved: work-queue streams
    /// delete what is acked, so their message count says nothing).
    stored: Vec<(&'static str, u64)>,
    /// Messages mend's processes sent to the server (publishes, acks, API requests), per role.
    sent: Vec<(String, u64)>,
    /// CPU time per process.
    cpu: Vec<(String, Duration)>,
}

/// mend's streams and the streams behind its buckets.
const MEND_STREAMS: [&str; 9] = [
    streams::FAILED,
    streams::RETRY,
    streams::HOLD,
    streams::PARKED,
    streams::CONTROL,
    streams::EVENTS,
    "KV_mend_holds",
    "KV_mend_leases",
    "OBJ_mend_payloads",
];

/// The last sequence of each of [`MEND_STREAMS`] (0 for one not there).
async fn stored(js: &jetstream::Context) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    for name in MEND_STREAMS {
        let last = match js.get_stream(name).await {
            Ok(mut s) => s.info().await?.state.last_sequence,
            Err(_) => 0,
        };
        out.push(last);
    }
    Ok(out)
}

/// The bench's nats-server with its monitoring endpoint.
struct Monitored {
    server: NatsServer,
    monitor: String,
}

impl Monitored {
    async fn start() -> anyhow::Result<Self> {
        let port = mend_e2e::mend::free_port();
        let server = NatsServer::start_with(&["-m", &port.to_string()]).await?;
        Ok(Self {
            server,
            monitor: format!("http://127.0.0.1:{port}"),
        })
    }

    /// Messages each open connection of mend's processes has sent to the server so far, by
    /// connection id: (connection name, count). mend names its connections `mend-…`.
    async fn sent_by_mend(&self) -> anyhow::Result<HashMap<u64, (String, u64)>> {
        let url = format!("{}/connz?limit=1024", self.monitor);
        let connz: serde_json::Value = reqwest::get(url).await?.json().await?;
        Ok(connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let name = c["name"].as_str()?;
                name.starts_with("mend-").then(|| {
                    let cid = c["cid"].as_u64().unwrap_or(0);
                    (cid, (name.to_owned(), c["in_msgs"].as_u64().unwrap_or(0)))
                })
            })
            .collect())
    }
}

/// Messages sent between two looks, summed per role (`mend-sidecar-…` is the sidecar).
fn sent_by_role(
    before: &HashMap<u64, (String, u64)>,
    after: &HashMap<u64, (String, u64)>,
) -> Vec<(String, u64)> {
    let mut by_role: Vec<(String, u64)> = Vec::new();
    for (cid, (name, count)) in after {
        let earlier = before.get(cid).map_or(0, |(_, c)| *c);
        let role = if name.starts_with("mend-sidecar") {
            "sidecar"
        } else {
            name.trim_start_matches("mend-")
        };
        match by_role.iter_mut().find(|(r, _)| r == role) {
            Some((_, n)) => *n += count.saturating_sub(earlier),
            None => by_role.push((role.to_owned(), count.saturating_sub(earlier))),
        }
    }
    by_role.sort();
    by_role
}

/// What one repaired failure costs beyond a message that goes through at once: the run with
/// failures less the run without, over its failures.
fn per_failure(clean: &RunCost, failing: &RunCost) -> String {
    let f = failing.failures.max(1) as f64;
    let extra = |a: u64, b: u64| (a as f64 - b as f64) / f;
    let stored: Vec<String> = failing
        .stored
        .iter()
        .zip(&clean.stored)
        .map(|((name, a), (_, b))| (name, extra(*a, *b)))
        .filter(|(_, v)| v.abs() >= 0.05)
        .map(|(name, v)| format!("{name} {v:.1}"))
        .collect();
    let total_stored: f64 = failing
        .stored
        .iter()
        .zip(&clean.stored)
        .map(|((_, a), (_, b))| extra(*a, *b))
        .sum();
    let count =
        |v: &[(String, u64)], role: &str| v.iter().find(|(r, _)| r == role).map_or(0, |(_, n)| *n);
    let mut roles: Vec<&String> = failing.sent.iter().map(|(r, _)| r).collect();
    roles.dedup();
    let sent: Vec<String> = roles
        .iter()
        .map(|r| {
            format!(
                "{r} {:.1}",
                extra(count(&failing.sent, r), count(&clean.sent, r))
            )
        })
        .collect();
    let total_sent: f64 = roles
        .iter()
        .map(|r| extra(count(&failing.sent, r), count(&clean.sent, r)))
        .sum();
    let cpu: Vec<String> = failing
        .cpu
        .iter()
        .zip(&clean.cpu)
        .map(|((name, a), (_, b))| {
            format!(
                "{name} {:.0}",
                (a.as_secs_f64() - b.as_secs_f64()) * 1e6 / f
            )
        })
        .collect();
    let cpu_total: f64 = failing
        .cpu
        .iter()
        .zip(&clean.cpu)
        .filter(|(name, _)| !name.0.starts_with("bench"))
        .map(|((_, a), (_, b))| (a.as_secs_f64() - b.as_secs_f64()) * 1e6 / f)
        .sum();
    format!(
        "per repaired failure (over {} failures): messages stored in mend's streams {total_stored:.1} ({}); \
         messages sent to the server by mend {total_sent:.1} ({}); CPU µs {cpu_total:.0} without the bench ({})",
        failing.failures,
        stored.join(", "),
        sent.join(", "),
        cpu.join(", ")
    )
}

/// Whether everything of the stream is through: the consumer has nothing pending or unacked, and no
/// failure, retry or held message of `service` waits anywhere. The second flag says the consumer is
/// done (the stream is consumed).
async fn through(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    service: &str,
) -> anyhow::Result<(bool, bool)> {
    let info = consumer_info(js, stream, consumer).await?;
    if info.num_pending > 0 || info.num_ack_pending > 0 {
        return Ok((false, false));
    }
    for (s, filter) in [
        ("MEND_FAILED", format!("mend.failed.{service}")),
        ("MEND_RETRY", format!("mend.retry.{service}")),
        ("MEND_HOLD", format!("mend.hold.{service}.>")),
    ] {
        let mut counts = js.get_stream(s).await?.info_with_subjects(filter).await?;
        while let Some((_, count)) = counts.try_next().await? {
            if count > 0 {
                return Ok((false, true));
            }
        }
    }
    Ok((true, true))
}

/// The example rules without their `service` filters, in a temporary folder (kept alive by the
/// returned handle), so every bench run can be a service of its own.
fn any_service_rules() -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = tempfile::tempdir()?;
    for entry in std::fs::read_dir(example_rules())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("service"))
                .collect();
            std::fs::write(
                dir.path().join(path.file_name().context("a file name")?),
                kept.join("\n"),
            )?;
        }
    }
    let path = dir.path().to_path_buf();
    Ok((dir, path))
}

/// One key held behind a failure with `m` messages waiting: how fast they were appended to its hold
/// queue, and how fast they were released once the processor repaired the head (msg/s).
async fn big_hold(
    nats: &NatsServer,
    js: &jetstream::Context,
    app: &NoopApp,
    m: usize,
) -> anyhow::Result<(f64, f64)> {
    js::app_stream(js, "BIGHOLD", &["bighold.>"]).await?;
    let mut msgs = messages("bighold.m", m + 1, 1);
    msgs[0].payload =
        Bytes::from(serde_json::json!({"key": "k0", "n": 0, "amount": "12.50"}).to_string());
    js::publish_all(js, msgs).await?;
    let config = sidecar_config(
        "bighold",
        &nats.url(),
        "BIGHOLD",
        &["bighold.>"],
        &app.url,
        KEYED,
    );
    let mut sidecar = MendProcess::start("sidecar", &config).await?;
    sidecar.ready().await?;
    let started = Instant::now();
    let hold = js.get_stream("MEND_HOLD").await?;
    loop {
        if hold.clone().info().await?.state.messages >= m as u64 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "hold did not fill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let appended = rate(m, started.elapsed());
    let (_rules_dir, rules) = any_service_rules()?;
    let processor =
        MendProcess::start("processor", &processor_config(&nats.url(), &rules, "")).await?;
    processor.ready().await?;
    let started = Instant::now();
    loop {
        if through(js, "BIGHOLD", "mend-bighold-bighold", "bighold")
            .await?
            .0
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "hold not released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let released = rate(m, started.elapsed());
    sidecar.terminate(Duration::from_secs(30)).await?;
    Ok((appended, released))
}

/// An envelope the example rule `amount-as-number` repairs.
fn repairable(seq: usize) -> Out {
    let env = serde_json::json!({
        "version": 1, "id": format!("BENCHF:{seq}"), "service": "orders", "binding": "orders",
        "stream": "BENCHF", "seq": seq, "subject": "orders.created", "key": format!("k{}", seq % 1000),
        "headers": {"Account-Id": [format!("k{}", seq % 1000)]},
        "payload": {"account": "acct-7", "amount": "12.50", "pad": "x".repeat(120)}, "payload_base64": null,
        "error": {"kind": "message", "status": 422, "code": "bad_type", "field": "/amount",
                  "title": "amount must be a number", "detail": null, "body": null},
        "attempt": 1, "first_failed_at": "2026-11-22T10:00:00Z", "failed_at": "2026-11-22T10:00:00Z",
        "history": [{"at": "2026-11-22T10:00:00Z", "what": "delegated", "by": "sidecar"}],
    });
    Out {
        subject: "mend.failed.orders".into(),
        headers: Default::default(),
        payload: Bytes::from(env.to_string()),
    }
}

/// A processor working through `m` waiting failures: from ready to drained, the CPU time the
/// processor used (start-up included) and the server's over the run. Its repairs are purged.
async fn processor_alone(
    nats: &NatsServer,
    js: &jetstream::Context,
    m: usize,
    round: usize,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    // Fresh lineages each round, so no publish is dropped as a duplicate of an earlier round's.
    js::publish_all(js, (round * m..(round + 1) * m).map(repairable).collect()).await?;
    let p = MendProcess::start(
        "processor",
        &processor_config(&nats.url(), &example_rules(), ""),
    )
    .await?;
    p.ready().await?;
    let server_cpu = nats.pid().and_then(cpu_time).unwrap_or_default();
    eprintln!("the processor: running");
    let started = Instant::now();
    // Looked at every 5 ms (the harness's usual 50 ms was up to 5% of a run), as the floor counts
    // its own ends exactly.
    let mut consumer: PullConsumer = js
        .get_stream("MEND_FAILED")
        .await?
        .get_consumer("mend-processor")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    loop {
        let info = consumer.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the processor did not drain MEND_FAILED"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let cpu = p.pid().and_then(cpu_time).unwrap_or_default();
    let server = nats.pid().and_then(cpu_time).unwrap_or_default();
    drop(p);
    js.get_stream("MEND_RETRY").await?.purge().await?;
    Ok((took, cpu, server.saturating_sub(server_cpu)))
}

/// The processor's broker work with nothing else, hand-written: `m` envelopes waiting on a work queue,
/// 256 in flight; each is answered with a publish of a repaired message (10 headers naming its own
/// lineage, key and history, as each of the processor's retries must, in a map built for it;
/// awaited, with a `Nats-Msg-Id`; a repair is not announced on its own), then an unconfirmed ack: the
/// ceiling this machine and server put on any processor that keeps SPEC §6's order of steps. No JSON
/// is parsed and no rule runs. Returns the duration and the server's and this process's CPU time
/// over the run.
async fn processor_floor(
    nats: &NatsServer,
    js: &jetstream::Context,
    client: &async_nats::Client,
    m: usize,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    use async_nats::jetstream::stream::RetentionPolicy;
    floor_streams(
        js,
        &[
            ("FLOOR_FAILED", "floor.failed.>", RetentionPolicy::WorkQueue),
            ("FLOOR_RETRY", "floor.retry.>", RetentionPolicy::WorkQueue),
        ],
    )
    .await?;
    js::publish_all(
        js,
        (0..m)
            .map(|i| Out {
                subject: "floor.failed.orders".into(),
                ..repairable(i)
            })
            .collect(),
    )
    .await?;
    let c = js
        .get_stream("FLOOR_FAILED")
        .await?
        .create_consumer(pull::Config {
            durable_name: Some("floor".into()),
            filter_subject: "floor.failed.>".into(),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await?;
    let repaired = Bytes::from(format!(
        r#"{{"account":"acct-7","amount":12.5,"currency":"USD","pad":"{}"}}"#,
        "x".repeat(120)
    ));
    let server_cpu = nats.pid().and_then(cpu_time).unwrap_or_default();
    let own_cpu = cpu_time(std::process::id()).unwrap_or_default();
    eprintln!("the processor's floor: running");
    let started = Instant::now();
    let mut msgs = c.stream().max_messages_per_batch(256).messages().await?;
    let mut running = tokio::task::JoinSet::new();
    let mut done = 0usize;
    while done < m {
        if running.len() < 256 && done + running.len() < m {
            let msg = msgs
                .next()
                .await
                .context("stream ended")?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (js, client, repaired) = (js.clone(), client.clone(), repaired.clone());
            running.spawn(async move {
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                // Each retry carries its own lineage, as the processor's do (an id, key and
                // history of its own), in a map built for it; nothing is read from the envelope.
                let (id, key) = (format!("BENCHF:{seq}"), format!("k{}", seq % 1000));
                let history = format!(
                    r#"[{{"at":"2026-11-22T10:00:00Z","what":"delegated","by":"sidecar"}},{{"at":"{}","what":"repaired","by":"rule:amount-as-number","attempt":2}}]"#,
                    humantime::format_rfc3339_millis(std::time::SystemTime::now())
                );
                let mut headers = async_nats::HeaderMap::new();
                for (k, v) in [
                    ("Account-Id", key.as_str()),
                    ("Content-Type", "application/json"),
                    ("Mend-Id", id.as_str()),
                    ("Mend-Service", "orders"),
                    ("Mend-Attempt", "2"),
                    ("Mend-Repaired-By", "amount-as-number"),
                    ("Mend-Original-Subject", "orders.created"),
                    ("Mend-Key", key.as_str()),
                    ("Mend-History", history.as_str()),
                ] {
                    headers.insert(k, v);
                }
                holds_floor::publish(
                    &js,
                    "floor.retry.orders".into(),
                    format!("{id}:2:retry"),
                    headers,
                    repaired,
                )
                .await?;
                if let Some(reply) = msg.reply.clone() {
                    client.publish(reply, Bytes::new()).await?;
                }
                anyhow::Ok(())
            });
        } else {
            running.join_next().await.context("no task")???;
            done += 1;
        }
    }
    let took = started.elapsed();
    let server = nats.pid().and_then(cpu_time).unwrap_or_default();
    let own = cpu_time(std::process::id()).unwrap_or_default();
    js.get_stream("FLOOR_RETRY").await?.purge().await?;
    Ok((
        took,
        server.saturating_sub(server_cpu),
        own.saturating_sub(own_cpu),
    ))
}

/// `--processor-only R`: the processor alone, R rounds of `--messages` envelopes each, then the median.
async fn processor_only(m: usize, rounds: usize) -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = nats.client().await?;
    let js = jetstream::new(client.clone());
    // A first processor lays out mend's streams.
    MendProcess::start(
        "processor",
        &processor_config(&nats.url(), &example_rules(), ""),
    )
    .await?
    .ready()
    .await?;
    let r = processor_medians(&nats, &js, &client, m, rounds).await?;
    println!(
        "processor alone (example rules): median {:.0} envelopes/s, {:.1} µs of processor CPU and {:.1} µs of server CPU per envelope, over {rounds} rounds of {m} (target >= 20000)",
        r.rate, r.cpu, r.server
    );
    println!(
        "its broker work alone (no parsing, no rules): {:.0} envelopes/s, {:.1} µs of server CPU per envelope; processor/floor {:.2}",
        r.floor,
        r.floor_server,
        r.rate / r.floor
    );
    Ok(())
}

/// Medians of alternating rounds of the processor's floor and the processor, `m` envelopes each.
struct ProcessorRounds {
    rate: f64,
    /// Processor CPU µs per envelope.
    cpu: f64,
    /// Server CPU µs per envelope with the processor.
    server: f64,
    floor: f64,
    /// Server CPU µs per envelope with the floor.
    floor_server: f64,
}

async fn processor_medians(
    nats: &NatsServer,
    js: &jetstream::Context,
    client: &async_nats::Client,
    m: usize,
    rounds: usize,
) -> anyhow::Result<ProcessorRounds> {
    let (mut rates, mut cpus, mut servers) = (Vec::new(), Vec::new(), Vec::new());
    let (mut floors, mut floor_servers) = (Vec::new(), Vec::new());
    let per = |d: Duration| d.as_secs_f64() * 1e6 / m as f64;
    for round in 0..rounds {
        // Which goes first alternates: the server's cost per envelope drifts up over a run (its
        // streams' state grows), and the second of a pair would always bear more of it.
        let floor_first = round % 2 == 0;
        let mut floor_run = None;
        if floor_first {
            floor_run = Some(processor_floor(nats, js, client, m).await?);
        }
        let (took, cpu, server) = processor_alone(nats, js, m, round).await?;
        if !floor_first {
            floor_run = Some(processor_floor(nats, js, client, m).await?);
        }
        let (r, c, s) = (rate(m, took), per(cpu), per(server));
        let (took, server, own) = floor_run.context("the floor's run")?;
        let (f, fs) = (rate(m, took), per(server));
        eprintln!(
            "round {round}: floor {f:.0} envelopes/s, server {fs:.1} µs CPU each, client {:.1} µs CPU each",
            per(own)
        );
        eprintln!(
            "round {round}: processor {r:.0} envelopes/s, {c:.1} µs CPU each, server {s:.1} µs CPU each"
        );
        rates.push(r);
        cpus.push(c);
        servers.push(s);
        floors.push(f);
        floor_servers.push(fs);
    }
    Ok(ProcessorRounds {
        rate: median(&mut rates),
        cpu: median(&mut cpus),
        server: median(&mut servers),
        floor: median(&mut floors),
        floor_server: median(&mut floor_servers),
    })
}

/// `k` orders with string amounts through the whole loop (sidecar and processor running), then 200
/// one at a time. Returns the bulk's duration and the round trips under load and one at a time.
async fn repair_loop(
    nats: &NatsServer,
    js: &jetstream::Context,
    app: &NoopApp,
    k: usize,
) -> anyhow::Result<(Duration, Vec<Duration>, Vec<Duration>)> {
    js::app_stream(js, "REPAIR", &["repair.>"]).await?;
    let config = sidecar_config(
        "orders",
        &nats.url(),
        "REPAIR",
        &["repair.>"],
        &app.url,
        "key = { header = \"Account-Id\" }",
    );
    let sidecar = MendProcess::start("sidecar", &config).await?;
    sidecar.ready().await?;
    let order = |i: usize| {
        let key = format!("k{}", i % 100);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Account-Id", key.as_str());
        let body = serde_json::json!({"account": key, "n": i, "amount": "12.50"}).to_string();
        Out {
            subject: "repair.m".into(),
            headers,
            payload: Bytes::from(body),
        }
    };
    let mut rx = app.repaired.lock().await;
    let started = Instant::now();
    js::publish_all(js, (0..k).map(order).collect()).await?;
    let mut loaded = Vec::with_capacity(k);
    while loaded.len() < k {
        let rt = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await?
            .context("app gone")?;
        loaded.push(rt);
    }
    let took = started.elapsed();
    let mut single = Vec::new();
    for i in 0..200 {
        js::publish_all(js, vec![order(k + i)]).await?;
        single.push(
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await?
                .context("app gone")?,
        );
    }
    drop(sidecar);
    Ok((took, loaded, single))
}

/// (c): a sidecar for `service` on BENCH from the first message to the last ack; its peak RSS (KiB).
async fn sidecar_run(
    nats: &NatsServer,
    js: &jetstream::Context,
    app: &NoopApp,
    service: &str,
) -> anyhow::Result<(Duration, u64)> {
    sidecar_through(nats, js, app, service, &app.url, KEYED).await
}

/// A sidecar of `service` over stream BENCH delivering to `endpoint` with binding keys `binding`:
/// how long it took to drain the stream, and its peak RSS (KiB). Prints the CPU per message of
/// the sidecar, nats-server and the app.
async fn sidecar_through(
    nats: &NatsServer,
    js: &jetstream::Context,
    app: &NoopApp,
    service: &str,
    endpoint: &str,
    binding: &str,
) -> anyhow::Result<(Duration, u64)> {
    sidecar_through_with(nats, js, app, service, endpoint, binding, &[]).await
}

/// (b) and (h), the floor of traces' cost: the hand-written loop without spans, then with the
/// spans of [`traces_floor`] exported to `receiver`; their rates.
async fn loop_and_floor(
    js: &jetstream::Context,
    client: &async_nats::Client,
    app: &NoopApp,
    n: usize,
    round: usize,
    receiver: &mend_e2e::otlp::Receiver,
) -> anyhow::Result<(f64, f64)> {
    let name = format!("loop64-{round}");
    let b = looped(js, client, &app.url, "BENCH", &name, n, IN_FLIGHT).await?;
    let floor = traces_floor::Floor::start(&receiver.endpoint())?;
    let name = format!("floor64-{round}");
    let h = looped_traced(
        js,
        client,
        &app.url,
        ("BENCH", &name),
        n,
        IN_FLIGHT,
        Some(&floor.tracer),
    )
    .await?;
    // Its exports run on this runtime: the wait for the last one must not hold a worker.
    tokio::task::spawn_blocking(move || floor.stop()).await?;
    Ok((rate(n, b), rate(n, h)))
}

/// (g): (c) with traces exported to `receiver` (a loopback OTLP receiver).
async fn sidecar_traced(
    nats: &NatsServer,
    js: &jetstream::Context,
    app: &NoopApp,
    service: &str,
    receiver: &mend_e2e::otlp::Receiver,
) -> anyhow::Result<(Duration, u64)> {
    let endpoint = receiver.endpoint();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    sidecar_through_with(nats, js, app, service, &app.url, KEYED, &env).await
}

/// [`sidecar_through`] with `env` added to the sidecar's environment.
async fn sidecar_through_with(
    nats: &NatsServer,
    js: &jetstream::Context,
    app: &NoopApp,
    service: &str,
    endpoint: &str,
    binding: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Duration, u64)> {
    let config = sidecar_config(
        service,
        &nats.url(),
        "BENCH",
        &["bench.>"],
        endpoint,
        binding,
    );
    let mut sidecar = MendProcess::start_with_env("sidecar", &config, env).await?;
    sidecar.ready().await?;
    let watch = CpuWatch::start([
        ("sidecar", sidecar.pid()),
        ("nats-server", nats.pid()),
        ("app", app.pid()),
    ]);
    let started = Instant::now();
    js::consumer_drained(
        js,
        "BENCH",
        &format!("mend-{service}-{service}"),
        Duration::from_secs(600),
    )
    .await?;
    let took = started.elapsed();
    let n = js.get_stream("BENCH").await?.info().await?.state.messages as usize;
    eprintln!(
        "  {service}: CPU µs per message: {}",
        per_unit(&watch.used(), n)
    );
    let peak = sidecar.pid().and_then(peak_rss_kib).unwrap_or(0);
    sidecar.terminate(Duration::from_secs(30)).await?;
    Ok((took, peak))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

fn messages(subject: &str, n: usize, keys: usize) -> Vec<Out> {
    (0..n)
        .map(|i| {
            let key = format!("k{}", i % keys.max(1));
            let mut body = serde_json::json!({"key": key, "n": i, "pad": ""}).to_string();
            let pad = 256usize.saturating_sub(body.len());
            body = serde_json::json!({"key": key, "n": i, "pad": "x".repeat(pad)}).to_string();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Account-Id", key.as_str());
            Out {
                subject: subject.to_owned(),
                headers,
                payload: Bytes::from(body),
            }
        })
        .collect()
}

async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> anyhow::Result<PullConsumer> {
    let s = js.get_stream(stream).await?;
    Ok(s.create_consumer(pull::Config {
        durable_name: Some(name.to_owned()),
        ack_policy: AckPolicy::Explicit,
        max_ack_pending: 1024,
        ..Default::default()
    })
    .await?)
}

/// (a): pull and ack, nothing else.
async fn raw(js: &jetstream::Context, n: usize) -> anyhow::Result<Duration> {
    let c = consumer(js, "BENCH", "raw").await?;
    let started = Instant::now();
    let mut msgs = c.stream().max_messages_per_batch(500).messages().await?;
    for _ in 0..n {
        let m = msgs
            .next()
            .await
            .context("stream ended")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(started.elapsed())
}

/// (b) and (d): pull, POST, per-key order, confirmed ack, `in_flight` keys at once.
async fn looped(
    js: &jetstream::Context,
    client: &async_nats::Client,
    url: &str,
    stream: &str,
    name: &str,
    n: usize,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    looped_traced(js, client, url, (stream, name), n, in_flight, None).await
}

/// [`looped`], with the spans of [`traces_floor`] per message when `tracer` is given.
async fn looped_traced(
    js: &jetstream::Context,
    client: &async_nats::Client,
    url: &str,
    (stream, name): (&str, &str),
    n: usize,
    in_flight: usize,
    tracer: Option<&opentelemetry_sdk::trace::SdkTracer>,
) -> anyhow::Result<Duration> {
    let c = consumer(js, stream, name).await?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(in_flight)
        .build()?;
    let started = Instant::now();
    let mut msgs = c.stream().max_messages_per_batch(256).messages().await?;
    let mut lanes = KeyLanes::default();
    let mut running = FuturesUnordered::new();
    let mut done = 0usize;
    let source = reqwest::header::HeaderValue::from_str(&format!("urn:mend:bench:{stream}"))?;
    let deliver = |key: String, m: jetstream::Message| {
        let (http, client, url, source) =
            (http.clone(), client.clone(), url.to_owned(), source.clone());
        let stream = stream.to_owned();
        let tracer = tracer.cloned();
        async move {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let id = format!("{stream}:{seq}");
            let mut h = app_headers(&id, &source, &m);
            let spans = tracer
                .as_ref()
                .map(|t| traces_floor::begin(t, &m, &id, &key, &mut h));
            let req = http.post(url).headers(h).body(m.payload.clone());
            let status = req.send().await.map(|r| r.status()).ok();
            let ok = status.is_some_and(|s| s.is_success());
            let receive = spans.map(|(receive, deliver)| {
                traces_floor::answered(deliver, status.map(|s| s.as_u16()));
                receive
            });
            if let Some(reply) = m.reply.clone() {
                let _ = client.request(reply, Bytes::from(AckKind::Ack)).await;
            }
            if let Some(receive) = receive {
                traces_floor::settled(receive);
            }
            (key, ok)
        }
    };
    while done < n {
        tokio::select! {
            Some((key, _ok)) = running.next(), if !running.is_empty() => {
                done += 1;
                lanes.finish(key);
            }
            m = msgs.next(), if lanes.queued < 1024 => {
                let m = m.context("stream ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                lanes.push(account_id(&m), m);
            }
        }
        while running.len() < in_flight {
            let Some((key, m)) = lanes.start() else { break };
            running.push(deliver(key, m));
        }
    }
    Ok(started.elapsed())
}

/// The streams of a hand-written floor (name, subjects, retention), as mend's are made: file
/// storage, a 10-minute duplicate window, direct gets allowed.
async fn floor_streams(
    js: &jetstream::Context,
    streams: &[(&str, &str, jetstream::stream::RetentionPolicy)],
) -> anyhow::Result<()> {
    for (name, subject, retention) in streams {
        js.get_or_create_stream(jetstream::stream::Config {
            name: (*name).into(),
            subjects: vec![(*subject).into()],
            retention: *retention,
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(600),
            allow_direct: true,
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// The state of consumer `name` of `stream`, asked of the server now.
async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> anyhow::Result<jetstream::consumer::Info> {
    let mut c: PullConsumer = js
        .get_stream(stream)
        .await?
        .get_consumer(name)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(c.info().await?.clone())
}

/// The key a bench message carries (`Account-Id`).
fn account_id(m: &async_nats::Message) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get("Account-Id"))
        .map(|v| v.to_string())
        .unwrap_or_default()
}

/// The per-key lanes of a hand-written loop: a key's messages one at a time, in arrival order;
/// keys served in the order they became ready.
struct KeyLanes<M> {
    lanes: HashMap<String, VecDeque<M>>,
    ready: VecDeque<String>,
    busy: HashSet<String>,
    /// Messages waiting in the lanes (not started).
    queued: usize,
}

impl<M> Default for KeyLanes<M> {
    fn default() -> Self {
        Self {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            busy: HashSet::new(),
            queued: 0,
        }
    }
}

impl<M> KeyLanes<M> {
    fn push(&mut self, key: String, m: M) {
        self.queued += 1;
        let lane = self.lanes.entry(key.clone()).or_default();
        lane.push_back(m);
        if lane.len() == 1 && !self.busy.contains(&key) {
            self.ready.push_back(key);
        }
    }

    /// The next message whose key is free, its key now busy.
    fn start(&mut self) -> Option<(String, M)> {
        loop {
            let key = self.ready.pop_front()?;
            if let Some(m) = self.lanes.get_mut(&key).and_then(VecDeque::pop_front) {
                self.queued -= 1;
                self.busy.insert(key.clone());
                return Some((key, m));
            }
        }
    }

    /// `key` is free again: its next message may start.
    fn finish(&mut self, key: String) {
        self.busy.remove(&key);
        match self.lanes.get(&key) {
            Some(lane) if !lane.is_empty() => self.ready.push_back(key),
            _ => {
                self.lanes.remove(&key);
            }
        }
    }
}

/// The headers SPEC §4 asks of any deliverer for message `m` of lineage `id`: the message's own,
/// CloudEvents, Mend-*, built as cheaply as we know how (static names, each value made once). A
/// retry (it has `Mend-Id`) keeps its lineage's.
fn app_headers(
    id: &str,
    source: &reqwest::header::HeaderValue,
    m: &async_nats::Message,
) -> reqwest::header::HeaderMap {
    use reqwest::header::{HeaderMap, HeaderName as N, HeaderValue as V};
    let id = V::from_str(id).unwrap_or(V::from_static(""));
    let subject = V::from_str(m.subject.as_str()).unwrap_or(V::from_static(""));
    let mut h = HeaderMap::with_capacity(32);
    h.insert(
        N::from_static("content-type"),
        V::from_static("application/json"),
    );
    h.insert(N::from_static("ce-specversion"), V::from_static("1.0"));
    h.insert(N::from_static("ce-id"), id.clone());
    h.insert(N::from_static("ce-source"), source.clone());
    h.insert(N::from_static("ce-type"), subject.clone());
    h.insert(N::from_static("mend-id"), id);
    h.insert(N::from_static("mend-service"), V::from_static("bench"));
    h.insert(N::from_static("mend-attempt"), V::from_static("1"));
    h.insert(N::from_static("mend-original-subject"), subject);
    if let Some(nats) = &m.headers {
        for (k, vs) in nats.iter() {
            if let (Ok(k), Ok(v)) = (
                N::from_bytes(k.to_string().as_bytes()),
                V::from_str(vs[0].as_str()),
            ) {
                h.insert(k, v);
            }
        }
        if let Some(key) = nats
            .get("Account-Id")
            .and_then(|k| V::from_str(k.as_str()).ok())
        {
            h.insert(N::from_static("ce-subject"), key.clone());
            h.insert(N::from_static("mend-key"), key);
        }
    }
    h
}

/// Publishes one message at a time on `subject` and measures publish → app receipt.
async fn latency(
    js: &jetstream::Context,
    app: &NoopApp,
    subject: &str,
) -> anyhow::Result<Vec<Duration>> {
    let mut rx = app.lat.lock().await;
    let mut out = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Account-Id", format!("k{}", i % 10).as_str());
        headers.insert("Lat", "1");
        let sent = SystemTime::now();
        js.publish_with_headers(subject.to_owned(), headers, Bytes::from_static(b"{}"))
            .await?
            .await?;
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await?
            .context("app gone")?;
        out.push(got.duration_since(sent).unwrap_or_default());
    }
    out.sort();
    Ok(out)
}

/// The no-op app, running as a child process; receipt times of latency probes come back on its stdout.
struct NoopApp {
    url: String,
    pid: Option<u32>,
    lat: tokio::sync::Mutex<mpsc::UnboundedReceiver<SystemTime>>,
    /// Repair round trips the app saw: from its failure answer to the repaired delivery.
    repaired: tokio::sync::Mutex<mpsc::UnboundedReceiver<Duration>>,
    _child: tokio::process::Child,
}

impl NoopApp {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    async fn start() -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--serve-app")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("app stdout")?).lines();
        let url = lines.next_line().await?.context("app did not start")?;
        let pid = child.id();
        let (tx, rx) = mpsc::unbounded_channel();
        let (rt_tx, rt_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let nanos = |p: &str| line.strip_prefix(p).and_then(|n| n.parse::<u64>().ok());
                if let Some(n) = nanos("lat ") {
                    let _ = tx.send(UNIX_EPOCH + Duration::from_nanos(n));
                } else if let Some(n) = nanos("rt ") {
                    let _ = rt_tx.send(Duration::from_nanos(n));
                }
            }
        });
        Ok(Self {
            url,
            pid,
            lat: tokio::sync::Mutex::new(rx),
            repaired: tokio::sync::Mutex::new(rt_rx),
            _child: child,
        })
    }
}

/// `--serve-app`: the no-op app. It answers 200, except that an order whose `amount` is a string
/// gets a 422 `bad_type` problem (what the example rules repair). It prints its URL, then the receipt
/// time of each request with a `Lat` header, and for each repaired delivery the time since it
/// answered that lineage's failure (`rt <nanos>`).
async fn serve_app() -> anyhow::Result<()> {
    use axum::http::{HeaderMap, StatusCode};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let failed_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let router = axum::Router::new().route(
        "/events",
        post(move |headers: HeaderMap, body: Bytes| {
            let failed_at = failed_at.clone();
            async move {
                if headers.contains_key("lat") {
                    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
                    println!("lat {nanos}");
                }
                let id = headers.get("mend-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let string_amount = body.windows(10).any(|w| w == b"\"amount\":\"");
                if string_amount {
                    failed_at.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
                    let problem = r#"{"title":"amount must be a number","code":"bad_type","field":"/amount"}"#;
                    return (StatusCode::UNPROCESSABLE_ENTITY, [("content-type", "application/problem+json")], problem);
                }
                if headers.contains_key("mend-repaired-by") {
                    let at = failed_at.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    if let Some(at) = at {
                        println!("rt {}", at.elapsed().as_nanos());
                    }
                }
                (StatusCode::OK, [("content-type", "text/plain")], "")
            }
        }),
    );
    let router = router.route(
        "/batch",
        post(|body: Bytes| async move {
            let (status, answer) = batch::answer_batch(&body);
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                [("content-type", "application/json")],
                answer,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("http://{}/events", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}

/// What a hand-written floor's run took, and the CPU time of each process over it.
pub struct FloorRun {
    pub took: Duration,
    pub cpu: Vec<(String, Duration)>,
}

/// CPU µs per unit of work, per process: `name µs, …`.
fn per_unit(cpu: &[(String, Duration)], units: usize) -> String {
    cpu.iter()
        .map(|(name, d)| format!("{name} {:.0}", d.as_secs_f64() * 1e6 / units as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CPU time named processes use from a moment on.
struct CpuWatch {
    pids: Vec<(String, Option<u32>)>,
    before: Vec<Duration>,
}

impl CpuWatch {
    fn start<'a>(pids: impl IntoIterator<Item = (&'a str, Option<u32>)>) -> Self {
        let pids: Vec<(String, Option<u32>)> = pids
            .into_iter()
            .map(|(name, pid)| (name.to_owned(), pid))
            .collect();
        let before = pids
            .iter()
            .map(|(_, pid)| pid.and_then(cpu_time).unwrap_or_default())
            .collect();
        Self { pids, before }
    }

    /// What each process used since the start, by name.
    fn used(&self) -> Vec<(String, Duration)> {
        self.pids
            .iter()
            .zip(&self.before)
            .map(|((name, pid), before)| {
                let after = pid.and_then(cpu_time).unwrap_or_default();
                (name.clone(), after.saturating_sub(*before))
            })
            .collect()
    }
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    Some(Duration::from_millis(ticks * 10))
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
