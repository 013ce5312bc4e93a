//! JetStream helpers for tests: create the app's stream, publish, read mend's streams, consumer state.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::future::try_join_all;
use repair_rules::FailureEnvelope;

/// Creates the app's own stream (file storage), as a service owner would.
pub async fn app_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[&str],
) -> anyhow::Result<()> {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Creates the app's own stream with a subject transform (`source` → `destination`), as a service
/// owner partitioning its stream with `{{partition(N, …)}}` would.
pub async fn app_stream_with_transform(
    js: &jetstream::Context,
    name: &str,
    subjects: &[&str],
    source: &str,
    destination: &str,
) -> anyhow::Result<()> {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        storage: stream::StorageType::File,
        subject_transform: Some(stream::SubjectTransform {
            source: source.to_owned(),
            destination: destination.to_owned(),
        }),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// One message to publish.
pub struct Out {
    pub subject: String,
    pub headers: async_nats::HeaderMap,
    pub payload: Bytes,
}

impl Out {
    /// A JSON message with a key header.
    pub fn keyed(subject: &str, header: &str, key: &str, json: serde_json::Value) -> Self {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(header, key);
        Self {
            subject: subject.to_owned(),
            headers,
            payload: Bytes::from(json.to_string()),
        }
    }
}

/// Publishes all messages, in order, awaiting every JetStream ack (acks are awaited in windows so
/// large batches stay fast). Returns their stream sequences.
pub async fn publish_all(js: &jetstream::Context, msgs: Vec<Out>) -> anyhow::Result<Vec<u64>> {
    let mut seqs = Vec::with_capacity(msgs.len());
    let mut window = Vec::new();
    for m in msgs {
        window.push(
            js.publish_with_headers(m.subject, m.headers, m.payload)
                .await
                .context("publish")?,
        );
        if window.len() == 512 {
            for ack in try_join_all(window.drain(..).map(|f| f.into_future())).await? {
                seqs.push(ack.sequence);
            }
        }
    }
    for ack in try_join_all(window.drain(..).map(|f| f.into_future())).await? {
        seqs.push(ack.sequence);
    }
    Ok(seqs)
}

/// Every message currently stored in `stream` on `subject` (read directly, leaving them in place).
pub async fn read_all(
    js: &jetstream::Context,
    stream_name: &str,
    subject: &str,
) -> anyhow::Result<Vec<async_nats::jetstream::message::StreamMessage>> {
    let mut stream = js.get_stream(stream_name).await?;
    let info = stream.info().await?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return Ok(out);
    }
    for seq in first..=last {
        match stream.direct_get(seq).await {
            Ok(m) if m.subject.as_str() == subject => out.push(m),
            Ok(_) => {}
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The failure envelopes of `service` in MEND_FAILED.
pub async fn failed(
    js: &jetstream::Context,
    service: &str,
) -> anyhow::Result<Vec<FailureEnvelope>> {
    envelopes(js, "MEND_FAILED", &format!("mend.failed.{service}")).await
}

/// The envelopes of `service` in MEND_PARKED.
pub async fn parked(
    js: &jetstream::Context,
    service: &str,
) -> anyhow::Result<Vec<FailureEnvelope>> {
    envelopes(js, "MEND_PARKED", &format!("mend.parked.{service}")).await
}

async fn envelopes(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> anyhow::Result<Vec<FailureEnvelope>> {
    read_all(js, stream, subject)
        .await?
        .into_iter()
        .map(|m| serde_json::from_slice(&m.payload).context("envelope JSON"))
        .collect()
}

/// The events of `kind` announced for `service`, as JSON.
pub async fn events(
    js: &jetstream::Context,
    service: &str,
    kind: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    read_all(js, "MEND_EVENTS", &format!("mend.events.{service}.{kind}"))
        .await?
        .into_iter()
        .map(|m| serde_json::from_slice(&m.payload).context("event JSON"))
        .collect()
}

/// Waits until the consumer has nothing pending and nothing unacknowledged.
pub async fn consumer_drained(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let s = js.get_stream(stream).await?;
    crate::wait::until(&format!("consumer {consumer} drained"), limit, || {
        let s = s.clone();
        async move {
            let mut c: jetstream::consumer::PullConsumer = s
                .get_consumer(consumer)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let info = c.info().await?;
            Ok((info.num_pending == 0 && info.num_ack_pending == 0).then_some(()))
        }
    })
    .await
}

/// Publishes one message the way any producer may, on a raw protocol connection (`HPUB`) of its
/// own: `header_lines` go into the header block as they are (`name: value\r\n` each, any bytes),
/// which no NATS client library would let through. Returns once the server answered a PING after
/// it, so the message is in the stream when the subject is bound to one.
pub async fn publish_raw(
    port: u16,
    subject: &str,
    header_lines: &[&[u8]],
    payload: &[u8],
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut conn = BufReader::new(stream);
    let mut line = String::new();
    conn.read_line(&mut line).await?; // INFO
    anyhow::ensure!(
        line.starts_with("INFO"),
        "no INFO from the server: {line:?}"
    );
    let mut block = b"NATS/1.0\r\n".to_vec();
    for h in header_lines {
        block.extend_from_slice(h);
        block.extend_from_slice(b"\r\n");
    }
    block.extend_from_slice(b"\r\n");
    let mut out =
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n"
            .to_vec();
    out.extend_from_slice(
        format!(
            "HPUB {subject} {} {}\r\n",
            block.len(),
            block.len() + payload.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&block);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    conn.get_mut().write_all(&out).await?;
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            anyhow::bail!("the server closed the raw connection");
        }
        if line.starts_with("-ERR") {
            anyhow::bail!("the server refused the raw publish: {line}");
        }
        if line.starts_with("PONG") {
            return Ok(());
        }
    }
}
