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
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use mend_e2e::js;

use super::batch::{self, BATCH, BATCHES_IN_FLIGHT};
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

/// What the hand-written sidecar's deliveries share.
#[derive(Clone)]
struct Side {
    client: async_nats::Client,
    js: jetstream::Context,
    kv: jetstream::kv::Store,
    svc: String,
    stream: String,
}

impl Side {
    /// The lineage id of `m`: its stream sequence, or a retry's Mend-Id.
    fn id(&self, m: &jetstream::Message, retry: bool) -> String {
        match m.headers.as_ref().and_then(|h| h.get("Mend-Id")) {
            Some(id) if retry => id.to_string(),
            _ => format!(
                "{}:{}",
                self.stream,
                m.info().map(|i| i.stream_sequence).unwrap_or(0)
            ),
        }
    }

    /// What follows the app's answer for one message (`ok`: processed), then its confirmed ack.
    async fn after(
        self,
        key: String,
        m: jetstream::Message,
        id: String,
        retry: bool,
        ok: bool,
    ) -> anyhow::Result<(String, End)> {
        let (svc, js) = (&self.svc, &self.js);
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
                    js,
                    format!("hf.failed.{svc}"),
                    format!("{id}:1:failed"),
                    h,
                    body,
                )
                .await?;
                let since = humantime::format_rfc3339_micros(SystemTime::now());
                let hold =
                    format!(r#"{{"head":"{id}","state":"held","since":"{since}","key":"{key}"}}"#);
                self.kv.put(&entry, hold.into()).await?;
                End::Held
            }
            (true, true) => {
                let hold = format!(r#"{{"head":"{id}","state":"resolved","key":"{key}"}}"#);
                self.kv.put(&entry, hold.into()).await?;
                let now = humantime::format_rfc3339_millis(SystemTime::now());
                let event = format!(
                    r#"{{"specversion":"1.0","id":"{id}:2:resolved","source":"urn:mend:bench","type":"mend.resolved","subject":"{id}","time":"{now}","datacontenttype":"application/json","data":{{"service":"{svc}","id":"{id}","attempt":2,"key":"{key}","steps":[{{"what":"delegated","attempt":1}},{{"what":"repaired","attempt":2}}]}}}}"#
                );
                let mut h = async_nats::HeaderMap::new();
                h.insert("Content-Type", "application/cloudevents+json");
                h.insert("Mend-Id", id.as_str());
                publish(
                    js,
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
            self.client
                .request(reply, Bytes::from(AckKind::Ack))
                .await?;
        }
        anyhow::Ok((key, end))
    }
}

/// A message to deliver: its key, itself, and whether it is a repaired retry.
type Next = (String, jetstream::Message, bool);

/// How each message of a delivery (one, or a batch) ended, by key.
type Ends = anyhow::Result<Vec<(String, End)>>;

/// The holds workload of `holds_run` (`n` messages over `keys` keys, `percent` repairable
/// failures), done by hand; `batched`: in batches as (e) sends them (up to 100 entries, 64 batches
/// in flight, a retry in the next batch), each entry's follow-up as a single message's.
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
    batched: bool,
) -> anyhow::Result<FloorRun> {
    let mode = if batched { "b" } else { "" };
    let svc = format!("hf{percent}r{round}{mode}");
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
    let side = Side {
        client: client.clone(),
        js: js.clone(),
        kv,
        svc: svc.clone(),
        stream: stream.clone(),
    };
    let single = |(key, m, retry): Next| {
        let (http, side, url, source) =
            (http.clone(), side.clone(), app.url.clone(), source.clone());
        async move {
            let id = side.id(&m, retry);
            let ok = http
                .post(&url)
                .headers(app_headers(&id, &source, &m))
                .body(m.payload.clone())
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            Ok(vec![side.after(key, m, id, retry, ok).await?])
        }
    };
    let batch_url = batch::batch_url(app);
    let batch = |group: Vec<Next>| {
        let (http, side, url) = (http.clone(), side.clone(), batch_url.clone());
        async move {
            let ids: Vec<String> = group
                .iter()
                .map(|(_, m, retry)| side.id(m, *retry))
                .collect();
            let entries = group
                .iter()
                .zip(&ids)
                .map(|((key, m, _), id)| (id.as_str(), key.as_str(), m));
            let ok = batch::post(&http, &url, entries, &ids).await;
            let after = group
                .into_iter()
                .zip(ids)
                .zip(ok)
                .map(|(((key, m, retry), id), ok)| side.clone().after(key, m, id, retry, ok));
            futures::future::join_all(after)
                .await
                .into_iter()
                .collect::<anyhow::Result<Vec<_>>>()
        }
    };

    let pulled = if batched { 1024 } else { 256 };
    let mut originals = originals
        .stream()
        .max_messages_per_batch(pulled)
        .messages()
        .await?;
    let mut retries = retries
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await?;
    let (per, in_flight, waiting) = if batched {
        (BATCH, BATCHES_IN_FLIGHT, BATCH * BATCHES_IN_FLIGHT * 2)
    } else {
        (1, IN_FLIGHT, 1024)
    };
    let mut lanes = KeyLanes::default();
    let mut running: FuturesUnordered<BoxFuture<'_, Ends>> = FuturesUnordered::new();
    let mut repaired: Vec<Next> = Vec::new();
    let mut done = 0usize;
    while done < n {
        tokio::select! {
            Some(ends) = running.next(), if !running.is_empty() => {
                for (key, end) in ends? {
                    match end {
                        End::Held => {}
                        End::Done | End::Resolved => {
                            done += 1;
                            lanes.finish(key);
                        }
                    }
                }
            }
            m = retries.next() => {
                let m = m.context("retries ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                // The head's retry goes next (its key is held, busy, for it): at once one by one,
                // in the next batch in batch mode.
                let next = (account_id(&m), m, true);
                if batched {
                    repaired.push(next);
                } else {
                    running.push(Box::pin(single(next)));
                }
            }
            m = originals.next(), if lanes.queued < waiting => {
                let m = m.context("stream ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                lanes.push(account_id(&m), m);
            }
        }
        while running.len() < in_flight {
            let mut group: Vec<Next> = repaired.drain(..repaired.len().min(per)).collect();
            while group.len() < per {
                let Some((key, m)) = lanes.start() else { break };
                group.push((key, m, false));
            }
            match group.len() {
                0 => break,
                _ if batched => running.push(Box::pin(batch(group))),
                _ => {
                    for next in group {
                        running.push(Box::pin(single(next)));
                    }
                }
            }
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
