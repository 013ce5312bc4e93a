//! Bulk delivery in `make bench`: (e) the sidecar in batch mode and (f) a hand-written batching loop
//! doing the same essential work, on the stream and keys of (c); and the no-op app's batch endpoint.
//!
//! (f) pulls, keeps per-key order (one message of a key per batch, the next only after the previous
//! was acked), builds each entry as a structured-mode CloudEvent (the attributes SPEC §4 names, the
//! JSON payload checked and put in `data`), POSTs up to 100 at once as
//! `application/cloudevents-batch+json`, up to 64 batches in flight, reads the per-entry statuses
//! and confirms the ack of each processed entry.

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use mend_e2e::mend::MendProcess;
use mend_e2e::nats::NatsServer;
use serde::Deserialize;

use super::{CpuWatch, KeyLanes, NoopApp, account_id, per_unit};

/// Messages per batch and batches in flight, for (e) and (f).
pub const BATCH: usize = 100;
pub const BATCHES_IN_FLIGHT: usize = 64;

/// The binding keys of a sidecar in batch mode as (e) runs it.
pub fn batch_binding() -> String {
    format!(
        "key = {{ header = \"Account-Id\" }}\nconcurrency = {BATCHES_IN_FLIGHT}\n\
         batch = {{ max_messages = {BATCH}, max_wait = \"2ms\" }}"
    )
}

/// The no-op app's batch endpoint beside its single one.
pub fn batch_url(app: &NoopApp) -> String {
    app.url.replace("/events", "/batch")
}

/// (e): the sidecar in batch mode over stream BENCH, as service `service`; what it took and its
/// peak RSS (KiB).
pub async fn sidecar_batched(
    nats: &NatsServer,
    js: &jetstream::Context,
    app: &NoopApp,
    service: &str,
) -> anyhow::Result<(Duration, u64)> {
    super::sidecar_through(nats, js, app, service, &batch_url(app), &batch_binding()).await
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    statuses: Vec<Status<'a>>,
}

#[derive(Deserialize)]
struct Status<'a> {
    #[serde(borrow)]
    id: &'a str,
    #[serde(borrow)]
    status: &'a str,
}

/// (f): the hand-written batching loop over `n` messages of stream BENCH, consumer `name`.
#[allow(clippy::too_many_arguments)]
pub async fn looped_batches(
    js: &jetstream::Context,
    client: &async_nats::Client,
    url: &str,
    nats_pid: Option<u32>,
    app_pid: Option<u32>,
    name: &str,
    n: usize,
) -> anyhow::Result<Duration> {
    // As many messages held as the sidecar's binding allows (twice its messages in flight).
    let held = BATCH * BATCHES_IN_FLIGHT * 2;
    let c: PullConsumer = js
        .get_stream("BENCH")
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: held as i64,
            ..Default::default()
        })
        .await?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(BATCHES_IN_FLIGHT)
        .build()?;
    let watch = CpuWatch::start([
        ("bench (hand-written loop)", Some(std::process::id())),
        ("nats-server", nats_pid),
        ("app", app_pid),
    ]);
    let started = Instant::now();
    let mut msgs = c.stream().max_messages_per_batch(1024).messages().await?;
    let mut lanes = KeyLanes::default();
    let mut running = FuturesUnordered::new();
    let mut done = 0usize;
    let send = |batch: Vec<(String, jetstream::Message)>| {
        let (http, client, url) = (http.clone(), client.clone(), url.to_owned());
        async move {
            let ids: Vec<String> = batch
                .iter()
                .map(|(_, m)| format!("BENCH:{}", m.info().map(|i| i.stream_sequence).unwrap_or(0)))
                .collect();
            let entries = batch
                .iter()
                .zip(&ids)
                .map(|((key, m), id)| (id.as_str(), key.as_str(), m));
            let ok = post(&http, &url, entries, &ids).await;
            let acks = batch
                .iter()
                .zip(&ok)
                .filter(|(_, ok)| **ok)
                .map(|((_, m), _)| {
                    let client = client.clone();
                    let reply = m.reply.clone();
                    async move {
                        if let Some(reply) = reply {
                            let _ = client.request(reply, Bytes::from(AckKind::Ack)).await;
                        }
                    }
                });
            futures::future::join_all(acks).await;
            batch.into_iter().map(|(key, _)| key).collect::<Vec<_>>()
        }
    };
    while done < n {
        tokio::select! {
            Some(keys) = running.next(), if !running.is_empty() => {
                let keys: Vec<String> = keys;
                done += keys.len();
                for key in keys {
                    lanes.finish(key);
                }
            }
            m = msgs.next(), if lanes.queued < held => {
                let m = m.context("stream ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                lanes.push(account_id(&m), m);
            }
        }
        while running.len() < BATCHES_IN_FLIGHT {
            let mut batch = Vec::with_capacity(BATCH);
            while batch.len() < BATCH {
                let Some(next) = lanes.start() else { break };
                batch.push(next);
            }
            if batch.is_empty() {
                break;
            }
            running.push(send(batch));
        }
    }
    let took = started.elapsed();
    eprintln!("  (f) CPU µs per message: {}", per_unit(&watch.used(), n));
    Ok(took)
}

/// POSTs one batch of `entries` (lineage id, key, message) to `url`; which of them (`ids`, in the
/// same order) the app processed.
pub async fn post<'a>(
    http: &reqwest::Client,
    url: &str,
    entries: impl ExactSizeIterator<Item = (&'a str, &'a str, &'a jetstream::Message)>,
    ids: &[String],
) -> Vec<bool> {
    let mut body = String::with_capacity(entries.len() * 600);
    body.push('[');
    for (i, (id, key, m)) in entries.enumerate() {
        if i > 0 {
            body.push(',');
        }
        entry(&mut body, id, key, m);
    }
    body.push(']');
    let answer = http
        .post(url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(body)
        .send()
        .await;
    let text = match answer {
        Ok(r) if r.status().is_success() => r.bytes().await.unwrap_or_default(),
        _ => Bytes::new(),
    };
    processed(&text, ids)
}

/// Which of the entries `ids` the app's answer `text` says were processed (SUCCESS).
fn processed(text: &[u8], ids: &[String]) -> Vec<bool> {
    match serde_json::from_slice::<Answer>(text) {
        Ok(a) => ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                // In the batch's order, as apps answer; else looked for.
                let status = a.statuses.get(i).filter(|s| s.id == id.as_str());
                status
                    .or_else(|| a.statuses.iter().find(|s| s.id == id.as_str()))
                    .is_some_and(|s| s.status == "SUCCESS")
            })
            .collect(),
        Err(_) => vec![false; ids.len()],
    }
}

/// One structured-mode CloudEvent for message `m` of lineage `id`, appended to `out`.
fn entry(out: &mut String, id: &str, key: &str, m: &jetstream::Message) {
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let time = humantime::format_rfc3339_millis(
        m.info()
            .map(|i| SystemTime::from(i.published))
            .unwrap_or(SystemTime::UNIX_EPOCH),
    );
    let _ = write!(
        out,
        "{{\"specversion\":\"1.0\",\"id\":{},\"source\":\"urn:mend:bench:BENCH\",\"type\":{},\
         \"subject\":{},\"time\":\"{time}\",\"mendattempt\":1,\"mendservice\":\"bench\",\
         \"datacontenttype\":\"application/json\",",
        quoted(id),
        quoted(m.subject.as_str()),
        quoted(key),
    );
    let json = std::str::from_utf8(&m.payload)
        .ok()
        .filter(|t| serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok());
    match json {
        Some(data) => {
            out.push_str("\"data\":");
            out.push_str(data);
        }
        None => out.push_str("\"data\":null"),
    }
    out.push('}');
}

/// The no-op app's answer to a batch: each entry SUCCESS, except an order whose `amount` is a
/// string, which is FAIL with the `bad_type` problem the example rules repair.
pub fn answer_batch(body: &[u8]) -> (u16, String) {
    #[derive(Deserialize)]
    struct Entry<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
        #[serde(default)]
        data: Option<Order>,
    }
    #[derive(Deserialize)]
    struct Order {
        #[serde(default)]
        amount: Option<serde_json::Value>,
    }
    let Ok(entries) = serde_json::from_slice::<Vec<Entry>>(body) else {
        return (400, "not a CloudEvents JSON batch".into());
    };
    let mut out = String::with_capacity(entries.len() * 48 + 16);
    out.push_str("{\"statuses\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let id = serde_json::to_string(&e.id).unwrap_or_default();
        let string_amount = e
            .data
            .as_ref()
            .is_some_and(|d| d.amount.as_ref().is_some_and(|a| a.is_string()));
        if string_amount {
            let _ = write!(
                out,
                "{{\"id\":{id},\"status\":\"FAIL\",\"problem\":{{\"title\":\"amount must be a number\",\"code\":\"bad_type\",\"field\":\"/amount\",\"status\":422}}}}"
            );
        } else {
            let _ = write!(out, "{{\"id\":{id},\"status\":\"SUCCESS\"}}");
        }
    }
    out.push_str("]}");
    (200, out)
}

/// What the batch rounds measured: medians of (e) and (f), (e)'s peak RSS, and the holds runs in
/// batch mode and their floor (0% and 5% failures, msg/s).
pub struct Bulk {
    pub e: f64,
    pub f: f64,
    pub rss: u64,
    pub holds: (f64, f64),
    pub floor: (f64, f64),
    pub keys: usize,
}

impl Bulk {
    /// The ratios of the targets, against (a) and (c) of the same run.
    pub fn print(&self, a: f64, c: f64) {
        println!(
            "batch mode: e/c = {:.1} (target >= 3; the hand-written loop's own f/c {:.1})   \
             e/f = {:.2} (target >= 0.8)   e/a = {:.2} \
             (target >= 0.5, {} keys; the hand-written loop's own f/a {:.2})   (e) peak RSS {:.1} MiB",
            self.e / c,
            self.f / c,
            self.e / self.f,
            self.e / a,
            self.keys,
            self.f / a,
            self.rss as f64 / 1024.0
        );
        // Where the loop itself falls short of a target, that target is past this machine's floor
        // for the work in this run: the sidecar's ratio is then read against the loop's.
        let against = |what: &str, target: f64, ours: f64, floor: f64| {
            if ours >= target {
                format!("{what} met")
            } else if floor < target {
                format!(
                    "{what} past the floor in this run (the loop's own {floor:.2}): the sidecar's is {:.2} of the loop's",
                    ours / floor
                )
            } else {
                format!("{what} not met (the loop's own {floor:.2})")
            }
        };
        println!(
            "batch mode against its floor: {}; {}",
            against("e >= 3 x c", 3.0, self.e / c, self.f / c),
            against("e >= 0.5 x a", 0.5, self.e / a, self.f / a),
        );
        let ((r0, r5), (f0, f5)) = (self.holds, self.floor);
        println!(
            "holds in batch mode (processor running): 0% failures {r0:.0} msg/s, 5% repairable \
             failures {r5:.0} msg/s, ratio {:.2}",
            r5 / r0
        );
        println!(
            "holds floor in batch mode (the hand-written sidecar and repairer sending the same \
             batches): 0% {f0:.0} msg/s, 5% {f5:.0} msg/s, its ratio {:.2}; mend at 5% against \
             the floor at 5%: {:.2} (target >= 0.8, as single delivery)",
            f5 / f0,
            r5 / f5
        );
    }
}

/// `rounds` alternating rounds of (e) and (f) over the n messages of stream BENCH, then the holds
/// runs in batch mode (with a processor of their own), medians of each.
#[allow(clippy::too_many_arguments)]
pub async fn bulk_rounds(
    monitored: &super::Monitored,
    js: &jetstream::Context,
    client: &async_nats::Client,
    app: &NoopApp,
    n: usize,
    keys: usize,
    rounds: usize,
) -> anyhow::Result<Bulk> {
    let nats = &monitored.server;
    let url = batch_url(app);
    let (mut es, mut fs, mut rss) = (Vec::new(), Vec::new(), 0u64);
    for round in 0..rounds {
        let (loop_name, service) = (format!("batchloop{round}"), format!("bulk{round}"));
        let run_f = || looped_batches(js, client, &url, nats.pid(), app.pid(), &loop_name, n);
        let run_e = || sidecar_batched(nats, js, app, &service);
        let (e, f) = if round % 2 == 0 {
            let f = run_f().await?;
            (run_e().await?, f)
        } else {
            let e = run_e().await?;
            (e, run_f().await?)
        };
        let (e_rate, f_rate) = (super::rate(n, e.0), super::rate(n, f));
        eprintln!(
            "(e) mend sidecar, batch mode: {e_rate:.0} msg/s, peak RSS {:.1} MiB; \
             (f) hand-written batching loop: {f_rate:.0} msg/s",
            e.1 as f64 / 1024.0
        );
        es.push(e_rate);
        fs.push(f_rate);
        rss = rss.max(e.1);
    }
    let (_rules_dir, rules) = super::any_service_rules()?;
    let processor = MendProcess::start(
        "processor",
        &mend_e2e::mend::processor_config(&nats.url(), &rules, "concurrency = 64"),
    )
    .await?;
    processor.ready().await?;
    let h = n.min(50_000);
    let (mut clean, mut failing) = (Vec::new(), Vec::new());
    let (mut floor_clean, mut floor_failing) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let others = [("processor", processor.pid()), ("app", app.pid())];
        let c0 = super::holds_run(monitored, js, app, h, keys, 0, round, &others, true).await?;
        let c5 = super::holds_run(monitored, js, app, h, keys, 5, round, &others, true).await?;
        let (r0, r5) = (super::rate(h, c0.took), super::rate(h, c5.took));
        eprintln!("holds in batch mode: 0% failures {r0:.0} msg/s, 5% {r5:.0} msg/s");
        eprintln!("  {}", super::per_failure(&c0, &c5));
        let (f0, f5) = super::floor_pair(monitored, js, client, app, h, keys, round, true).await?;
        clean.push(r0);
        failing.push(r5);
        floor_clean.push(f0);
        floor_failing.push(f5);
    }
    Ok(Bulk {
        e: super::median(&mut es),
        f: super::median(&mut fs),
        rss,
        holds: (super::median(&mut clean), super::median(&mut failing)),
        floor: (
            super::median(&mut floor_clean),
            super::median(&mut floor_failing),
        ),
        keys,
    })
}
