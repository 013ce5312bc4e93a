//! Holds at scale: the held keys a run starts with, and the floor of their release.
//!
//! [`Seeded`] writes K held keys as a sidecar leaves them (an entry in `mend_holds` saying `held`,
//! its head out for repair, one message waiting in the key's hold queue) and, later, each head's
//! retry. [`run`] is the floor of the release: a hand-written client that does, per key, the broker
//! and HTTP work mend's release does and nothing else, into the same streams and bucket (so the
//! dashboard, when it runs, follows it alike): the retry pulled and POSTed; the queue's first
//! message read; `resolved` announced and the entry written `releasing` (both awaited, in that
//! order) before the retry's confirmed ack; the held message POSTed; the queue read again (empty);
//! the queue purged up to what was delivered; the entry written `resolved`; `released` announced.
//! 64 keys at once, as the sidecar's `concurrency`. No JSON tree, no lanes, no metrics, no logs:
//! what it reaches is what this machine allows for that work.

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use mend_e2e::js::{self, Out};
use repair_rules::MessageKey;
use repair_rules::headers::Lineage;
use repair_rules::holds::{Hold, HoldState};
use repair_rules::identity::{buckets, streams, subjects};

use super::{CpuWatch, FloorRun, IN_FLIGHT, Monitored, NoopApp, app_headers};

/// K keys of `service` held, each with one message waiting.
pub struct Seeded {
    service: String,
    k: usize,
    since: String,
    /// Each entry's revision as written.
    revisions: HashMap<String, u64>,
}

impl Seeded {
    /// Writes the entries and the held messages: key `k<i>`'s head is `<SERVICE>:<i+1>`, its
    /// waiting message `<SERVICE>:<K+i+1>`.
    pub async fn write(js: &jetstream::Context, service: &str, k: usize) -> anyhow::Result<Self> {
        let kv = js.get_key_value(buckets::HOLDS).await?;
        let mut seeded = Self {
            service: service.to_owned(),
            k,
            since: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            revisions: HashMap::with_capacity(k),
        };
        let mut puts = FuturesUnordered::new();
        for i in 0..k {
            let key = key_of(i);
            let hold = seeded.hold(&key, i, HoldState::Held);
            let entry = subjects::hold_entry(service, &key.token());
            let kv = kv.clone();
            puts.push(async move {
                let revision = kv.put(&entry, serde_json::to_vec(&hold)?.into()).await?;
                anyhow::Ok((entry, revision))
            });
            if puts.len() >= 256
                && let Some(done) = puts.next().await
            {
                let (entry, revision) = done?;
                seeded.revisions.insert(entry, revision);
            }
        }
        while let Some(done) = puts.next().await {
            let (entry, revision) = done?;
            seeded.revisions.insert(entry, revision);
        }
        let waiting: Vec<Out> = (0..k)
            .map(|i| Out {
                subject: subjects::hold(service, &key_of(i).token()),
                headers: seeded.headers(i, &seeded.lineage(k + i + 1), 1, Some(&seeded.since)),
                payload: body(i),
            })
            .collect();
        js::publish_all(js, waiting).await?;
        Ok(seeded)
    }

    /// Every head's retry, as the processor publishes it.
    pub fn retries(&self) -> Vec<Out> {
        (0..self.k)
            .map(|i| Out {
                subject: subjects::retry(&self.service),
                headers: self.headers(i, &self.lineage(i + 1), 2, None),
                payload: body(i),
            })
            .collect()
    }

    fn lineage(&self, seq: usize) -> String {
        format!("{}:{seq}", self.service.to_uppercase())
    }

    fn hold(&self, key: &MessageKey, i: usize, state: HoldState) -> Hold {
        Hold {
            service: self.service.clone(),
            binding: self.service.clone(),
            partition: 0,
            key: key.0.clone(),
            head: self.lineage(i + 1),
            state,
            since: self.since.clone(),
            resolved: Vec::new(),
        }
    }

    fn headers(
        &self,
        i: usize,
        id: &str,
        attempt: u32,
        hold_since: Option<&str>,
    ) -> async_nats::HeaderMap {
        let key = key_of(i);
        let mut h = async_nats::HeaderMap::new();
        h.insert("Account-Id", key.0.as_str());
        h.insert("Content-Type", "application/json");
        Lineage {
            id,
            service: &self.service,
            attempt,
            original_subject: &format!("{}.m", self.service),
            key: Some(&key),
            repaired_by: (attempt > 1).then_some("amount-as-number"),
            resubmitted_by: None,
            hold_since,
            history: None,
        }
        .write(|name, value| h.insert(name, value));
        h
    }
}

fn key_of(i: usize) -> MessageKey {
    MessageKey(format!("k{i}"))
}

fn body(i: usize) -> Bytes {
    Bytes::from(format!(r#"{{"key":"k{i}","amount":12.5}}"#))
}

/// Releases every key of `seeded` by hand once each head's retry is published.
pub async fn run(
    nats: &Monitored,
    js: &jetstream::Context,
    client: &async_nats::Client,
    app: &NoopApp,
    seeded: &Seeded,
) -> anyhow::Result<FloorRun> {
    let service = seeded.service.as_str();
    let kv = js.get_key_value(buckets::HOLDS).await?;
    let queues = js.get_stream(streams::HOLD).await?;
    let retries =
        super::holds_floor::filtered(js, streams::RETRY, &subjects::retry(service)).await?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()?;
    let source = reqwest::header::HeaderValue::from_str(&format!("urn:mend:floor:{service}"))?;

    let watch = CpuWatch::start([
        ("nats-server", nats.server.pid()),
        ("bench (hand-written releaser)", Some(std::process::id())),
        ("app", app.pid()),
    ]);
    let started = Instant::now();
    js::publish_all(js, seeded.retries()).await?;

    let release = |m: jetstream::Message| {
        let (http, client, js, kv, queues, source) = (
            http.clone(),
            client.clone(),
            js.clone(),
            kv.clone(),
            queues.clone(),
            source.clone(),
        );
        let url = app.url.clone();
        async move {
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.to_string())
                    .context(format!("a retry without {name}"))
            };
            let (id, key) = (header("Mend-Id")?, MessageKey(header("Account-Id")?));
            let i: usize = key.0[1..].parse()?;
            let token = key.token();
            let entry = subjects::hold_entry(service, &token);
            let queue = subjects::hold(service, &token);
            let mut revision = *seeded.revisions.get(&entry).context("an unseeded key")?;
            post(&http, &url, &id, &source, &m).await?;

            let held = queues
                .get_first_raw_message_by_subject(queue.as_str(), 1)
                .await?;
            announce(&js, service, &id, 2, "resolved", r#""held":1"#).await?;
            let releasing = seeded.hold(&key, i, HoldState::Releasing);
            revision = kv
                .update(&entry, serde_json::to_vec(&releasing)?.into(), revision)
                .await?;
            let reply = m.reply.clone().context("a retry without a reply subject")?;
            client.request(reply, Bytes::from(AckKind::Ack)).await?;

            let held_id = held
                .headers
                .get("Mend-Id")
                .map(|v| v.to_string())
                .unwrap_or_default();
            let as_message = async_nats::Message {
                subject: held.subject.clone(),
                reply: None,
                payload: held.payload.clone(),
                headers: Some(held.headers.clone()),
                status: None,
                description: None,
                length: 0,
            };
            post(&http, &url, &held_id, &source, &as_message).await?;
            match queues
                .get_first_raw_message_by_subject(queue.as_str(), held.sequence + 1)
                .await
            {
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(e.into()),
                Ok(_) => anyhow::bail!("a second message in the queue of {key:?}"),
            }
            queues
                .purge()
                .filter(queue.as_str())
                .sequence(held.sequence + 1)
                .await?;
            let resolved = seeded.hold(&key, i, HoldState::Resolved);
            kv.update(&entry, serde_json::to_vec(&resolved)?.into(), revision)
                .await?;
            let data = format!(
                r#""binding":"{service}","key":"{}","head":"{id}","since":"{}""#,
                key.0, seeded.since
            );
            announce(&js, service, &id, 0, "released", &data).await?;
            anyhow::Ok(())
        }
    };

    let mut pulled = retries
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await?;
    let mut running = FuturesUnordered::new();
    let mut done = 0usize;
    while done < seeded.k {
        tokio::select! {
            Some(end) = running.next(), if !running.is_empty() => {
                let () = end?;
                done += 1;
            }
            m = pulled.next(), if running.len() < IN_FLIGHT => {
                let m = m.context("retries ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                running.push(release(m));
            }
        }
    }
    let took = started.elapsed();
    let cpu = watch.used();
    Ok(FloorRun { took, cpu })
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    source: &reqwest::header::HeaderValue,
    m: &async_nats::Message,
) -> anyhow::Result<()> {
    let status = http
        .post(url)
        .headers(app_headers(id, source, m))
        .body(m.payload.clone())
        .send()
        .await?
        .status();
    anyhow::ensure!(status.is_success(), "the app answered {status}");
    Ok(())
}

/// A mend-shaped event about `id`, stored (awaited) under a de-duplicating id.
async fn announce(
    js: &jetstream::Context,
    service: &str,
    id: &str,
    attempt: u32,
    kind: &str,
    data: &str,
) -> anyhow::Result<()> {
    let msg_id = format!("{id}:{attempt}:{kind}");
    let now = humantime::format_rfc3339_millis(SystemTime::now());
    let body = format!(
        r#"{{"specversion":"1.0","id":"{msg_id}","source":"urn:mend:floor:{service}","type":"mend.{kind}","subject":"{id}","time":"{now}","datacontenttype":"application/json","data":{{"service":"{service}","id":"{id}","attempt":{attempt},{data}}}}}"#
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    headers.insert("Mend-Id", id);
    super::holds_floor::publish(js, subjects::event(service, kind), msg_id, headers, body).await
}
