//! The floor of the holds runs: a hand-written sidecar (the loop of (b)) and a hand-written repairer
//! that do, per message and per repaired failure, the broker work mend does and nothing else, on the
//! same messages: per failure an envelope stored on a work queue and a hold entry written (both
//! awaited) before the original's confirmed ack; the repairer's retry (awaited) and unconfirmed ack;
//! at the retry's success the hold entry written and one announcement stored (both awaited) before
//! its confirmed ack; the key's later messages wait until then. No JSON tree is built, no rule runs,
//! nothing is traced or counted. What it reaches is what this machine allows for that work.

use std::time::{Instant, SystemTime};

use anyhow::Context;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use mend_e2e::js;

use super::{
    CpuWatch, FloorRun, IN_FLIGHT, KeyLanes, Monitored, NoopApp, account_id, app_headers, consumer,
    floor_streams, holds_messages,
};

/// How one piece of work on a key ended.
enum End {
    /// Delivered: the key's next message may go.
    Done,
    /// Failed and handed to the repairer: the key waits for the retry.
    Held,
    /// The retry went through: the key's next message may go.
    Resolved,
}

/// The holds workload of `holds_run` (`n` messages over `keys` keys, `percent` repairable
/// failures), done by hand.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    nats: &Monitored,
    js: &jetstream::Context,
    client: &async_nats::Client,
    app: &NoopApp,
    n: usize,
    keys: usize,
    percent: usize,
    round: usize,
) -> anyhow::Result<FloorRun> {
    let svc = format!("hf{percent}r{round}");
    let stream = svc.to_uppercase();
    floor_streams(
        js,
        &[
            ("HF_FAILED", "hf.failed.>", RetentionPolicy::WorkQueue),
            ("HF_RETRY", "hf.retry.>", RetentionPolicy::WorkQueue),
            ("HF_EVENTS", "hf.events.>", RetentionPolicy::Limits),
        ],
    )
    .await?;
    let kv = match js.get_key_value("hf_holds").await {
        Ok(kv) => kv,
        Err(_) => {
            js.create_key_value(jetstream::kv::Config {
                bucket: "hf_holds".into(),
                history: 1,
                storage: StorageType::File,
                ..Default::default()
            })
            .await?
        }
    };
    js::app_stream(js, &stream, &[&format!("{svc}.>")]).await?;
    let (msgs, _) = holds_messages(&format!("{svc}.m"), n, keys, percent);
    js::publish_all(js, msgs).await?;
    let originals = consumer(js, &stream, "floor").await?;
    let failed = filtered(js, "HF_FAILED", &format!("hf.failed.{svc}")).await?;
    let retries = filtered(js, "HF_RETRY", &format!("hf.retry.{svc}")).await?;

    let watch = CpuWatch::start([
        ("nats-server", nats.server.pid()),
        (
            "bench (hand-written sidecar and repairer)",
            Some(std::process::id()),
        ),
        ("app", app.pid()),
    ]);
    let started = Instant::now();
    let repairer = tokio::spawn(repair(js.clone(), client.clone(), failed, svc.clone()));
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()?;
    let source = reqwest::header::HeaderValue::from_str(&format!("urn:mend:bench:{stream}"))?;
    let deliver = |key: String, m: jetstream::Message, retry: bool| {
        let (http, client, js, kv, source) = (
            http.clone(),
            client.clone(),
            js.clone(),
            kv.clone(),
            source.clone(),
        );
        let (url, svc, stream) = (app.url.clone(), svc.clone(), stream.clone());
        async move {
            let id = match m.headers.as_ref().and_then(|h| h.get("Mend-Id")) {
                Some(id) if retry => id.to_string(),
                _ => format!(
                    "{stream}:{}",
                    m.info().map(|i| i.stream_sequence).unwrap_or(0)
                ),
            };
            let ok = http
                .post(&url)
                .headers(app_headers(&id, &source, &m))
                .body(m.payload.clone())
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            let entry = format!("{svc}.{key}");
            let end = match (ok, retry) {
                (true, false) => End::Done,
                (false, false) => {
                    let body = format!(
                        r#"{{"version":1,"id":"{id}","service":"{svc}","key":"{key}","error":{{"kind":"message","status":422,"code":"bad_type","field":"/amount","title":"amount must be a number"}},"attempt":1,"payload":{}}}"#,
                        String::from_utf8_lossy(&m.payload)
                    );
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Mend-Id", id.as_str());
                    h.insert("Account-Id", key.as_str());
                    publish(
                        &js,
                        format!("hf.failed.{svc}"),
                        format!("{id}:1:failed"),
                        h,
                        body,
                    )
                    .await?;
                    let since = humantime::format_rfc3339_micros(SystemTime::now());
                    let hold = format!(
                        r#"{{"head":"{id}","state":"held","since":"{since}","key":"{key}"}}"#
                    );
                    kv.put(&entry, hold.into()).await?;
                    End::Held
                }
                (true, true) => {
                    let hold = format!(r#"{{"head":"{id}","state":"resolved","key":"{key}"}}"#);
                    kv.put(&entry, hold.into()).await?;
                    let now = humantime::format_rfc3339_millis(SystemTime::now());
                    let event = format!(
                        r#"{{"specversion":"1.0","id":"{id}:2:resolved","source":"urn:mend:bench","type":"mend.resolved","subject":"{id}","time":"{now}","datacontenttype":"application/json","data":{{"service":"{svc}","id":"{id}","attempt":2,"key":"{key}","steps":[{{"what":"delegated","attempt":1}},{{"what":"repaired","attempt":2}}]}}}}"#
                    );
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Content-Type", "application/cloudevents+json");
                    h.insert("Mend-Id", id.as_str());
                    publish(
                        &js,
                        format!("hf.events.{svc}.resolved"),
                        format!("{id}:2:resolved"),
                        h,
                        event,
                    )
                    .await?;
                    End::Resolved
                }
                (false, true) => anyhow::bail!("a repaired message failed again"),
            };
            if let Some(reply) = m.reply.clone() {
                client.request(reply, Bytes::from(AckKind::Ack)).await?;
            }
            anyhow::Ok((key, end))
        }
    };

    let mut originals = originals
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await?;
    let mut retries = retries
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await?;
    let mut lanes = KeyLanes::default();
    let mut running = FuturesUnordered::new();
    let mut done = 0usize;
    while done < n {
        tokio::select! {
            Some(end) = running.next(), if !running.is_empty() => {
                let (key, end): (String, End) = end?;
                match end {
                    End::Held => {}
                    End::Done | End::Resolved => {
                        done += 1;
                        lanes.finish(key);
                    }
                }
            }
            m = retries.next() => {
                let m = m.context("retries ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                // The head's retry goes at once: its key is held (busy) for it.
                running.push(deliver(account_id(&m), m, true));
            }
            m = originals.next(), if lanes.queued < 1024 => {
                let m = m.context("stream ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                lanes.push(account_id(&m), m);
            }
        }
        while running.len() < IN_FLIGHT {
            let Some((key, m)) = lanes.start() else { break };
            running.push(deliver(key, m, false));
        }
    }
    let took = started.elapsed();
    repairer.abort();
    let cpu = watch.used();
    Ok(FloorRun { took, cpu })
}

/// A durable pull consumer of `stream` on `subject` alone.
pub async fn filtered(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let name = subject.replace('.', "-");
    Ok(js
        .get_stream(stream)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(name),
            filter_subject: subject.to_owned(),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await?)
}

/// A JetStream publish under a de-duplicating id, its ack awaited.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    id: String,
    headers: async_nats::HeaderMap,
    body: impl Into<Bytes>,
) -> anyhow::Result<()> {
    let message = jetstream::message::PublishMessage::build()
        .payload(body.into())
        .headers(headers)
        .message_id(id);
    js.send_publish(subject, message).await?.await?;
    Ok(())
}

/// The hand-written repairer: each envelope's payload with its amount made a number, published as
/// the retry (awaited), then an unconfirmed ack; 256 at once.
async fn repair(
    js: jetstream::Context,
    client: async_nats::Client,
    failed: jetstream::consumer::PullConsumer,
    svc: String,
) -> anyhow::Result<()> {
    let mut msgs = failed
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await?;
    let mut running = tokio::task::JoinSet::new();
    loop {
        if running.len() >= 256 {
            running.join_next().await.context("no task")???;
            continue;
        }
        let m = msgs
            .next()
            .await
            .context("envelopes ended")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (js, client, subject) = (js.clone(), client.clone(), format!("hf.retry.{svc}"));
        running.spawn(async move {
            let body = &m.payload[..];
            let at = body
                .windows(10)
                .position(|w| w == b"\"payload\":")
                .context("an envelope without a payload")?;
            let payload = String::from_utf8_lossy(&body[at + 10..body.len() - 1])
                .replace(r#""amount":"12.50""#, r#""amount":12.5"#);
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Mend-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            let key = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Account-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in [
                ("Account-Id", key.as_str()),
                ("Content-Type", "application/json"),
                ("Mend-Id", id.as_str()),
                ("Mend-Attempt", "2"),
                ("Mend-Repaired-By", "amount-as-number"),
                ("Mend-Key", key.as_str()),
            ] {
                h.insert(k, v);
            }
            publish(&js, subject, format!("{id}:2:retry"), h, payload).await?;
            if let Some(reply) = m.reply.clone() {
                client.publish(reply, Bytes::new()).await?;
            }
            anyhow::Ok(())
        });
    }
}
