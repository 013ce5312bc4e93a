//! Connecting to NATS and creating mend's streams and buckets (SPEC §2), shared by every role.

use repair_rules::identity::{buckets, streams};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions, ServerAddr};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::common::config::NatsConfig;

/// The oldest nats-server mend runs against (multiple filter subjects, per-key TTL in KV).
pub const MIN_SERVER: (u64, u64) = (2, 11);
/// How long JetStream remembers a `Nats-Msg-Id`: a publish repeated after a crash within this window
/// is dropped as a duplicate. It must outlast a crashed sidecar's ack wait, so config checks that.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How often the client pings its server. A server that stops answering without closing the
/// connection (a paused or partitioned cluster node) is noticed after two unanswered pings, and
/// the client moves to another server of the cluster; async-nats's default is a minute.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Why start-up could not reach a usable NATS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{url}` is not a NATS URL or a comma-separated seed list of them: {message}")]
    BadUrl { url: String, message: String },
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("nats-server {version} at {url} is too old: mend needs {}.{} or newer", MIN_SERVER.0, MIN_SERVER.1)]
    TooOld { url: String, version: String },
    #[error("nats-server at {url} has JetStream disabled; mend needs it (start it with -js)")]
    NoJetStream { url: String },
    #[error("cannot create {what}: {message}")]
    Layout { what: String, message: String },
    #[error("stopped before start-up was done")]
    Stopped,
}

/// The servers of `url`: one NATS URL, or a comma-separated seed list of them (`nats://a:4222,
/// nats://b:4222`), the NATS convention for a cluster. async-nats parses a string as one address, so
/// the list is split here; after connecting, the client also learns the cluster's other servers.
pub fn seed_list(url: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let bad = |message: String| ConnectError::BadUrl {
        url: url.to_owned(),
        message,
    };
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| bad(format!("{s}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(bad("no server given".to_owned()));
    }
    Ok(servers)
}

/// Connects with the configured auth and TLS; after the first connection the client reconnects by
/// itself forever.
/// Every (re)connection bumps `epoch`.
pub async fn connect(
    url: &str,
    cfg: &NatsConfig,
    name: &str,
    epoch: &crate::common::ack::Epoch,
) -> Result<Client, ConnectError> {
    let mut opts = ConnectOptions::new()
        .name(name)
        .connection_timeout(cfg.connect_timeout)
        .ping_interval(PING_INTERVAL)
        .max_reconnects(None);
    if let Some(path) = &cfg.creds {
        opts = ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| ConnectError::Credentials {
                path: path.display().to_string(),
                source,
            })?
            .name(name)
            .connection_timeout(cfg.connect_timeout)
            .ping_interval(PING_INTERVAL)
            .max_reconnects(None);
    }
    if let Some(path) = &cfg.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|source| ConnectError::Credentials {
            path: path.display().to_string(),
            source,
        })?;
        opts = opts.nkey(seed.trim().to_owned());
    }
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &cfg.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    let epoch = epoch.clone();
    opts = opts.event_callback(move |event| {
        let epoch = epoch.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    epoch.connected();
                    info!("NATS connected");
                }
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS disconnected; reconnecting")
                }
                other => tracing::debug!(event = %other, "NATS event"),
            }
        }
    });
    let servers = seed_list(url)?;
    // A server restarting (or a cluster coming up) refuses connections for a moment: the first
    // connection is retried until `connect_timeout` has passed, as the config promises.
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let mut pause = Duration::from_millis(100);
    let client = loop {
        match opts.clone().connect(servers.clone()).await {
            Ok(client) => break client,
            Err(source) if tokio::time::Instant::now() + pause >= deadline => {
                return Err(ConnectError::Connect {
                    url: url.to_owned(),
                    source,
                });
            }
            Err(error) => {
                tracing::warn!(%error, "NATS not reachable yet; retrying.");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    };
    let info = client.server_info();
    if !version_at_least(&info.version, MIN_SERVER) {
        return Err(ConnectError::TooOld {
            url: url.to_owned(),
            version: info.version,
        });
    }
    if !info.jetstream {
        return Err(ConnectError::NoJetStream {
            url: url.to_owned(),
        });
    }
    Ok(client)
}

/// What it takes to open another connection like a role's own (the sidecar pulls each app stream
/// on a connection of its own).
#[derive(Debug, Clone)]
pub struct Connector {
    pub url: String,
    pub cfg: NatsConfig,
    pub name: String,
}

impl Connector {
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        connect(
            &self.url,
            &self.cfg,
            &self.name,
            &crate::common::ack::Epoch::default(),
        )
        .await
    }
}

/// The start of every role: connect, then make sure mend's streams and buckets exist, waiting while
/// a cluster elects its leaders (`Stopped` if `shutdown` comes first).
pub async fn start(
    url: &str,
    cfg: &NatsConfig,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<(Client, jetstream::Context, crate::common::ack::Epoch), ConnectError> {
    let epoch = crate::common::ack::Epoch::default();
    let client = connect(url, cfg, name, &epoch).await?;
    let js = jetstream::new(client.clone());
    ensure_layout(&js, cfg, shutdown).await?;
    Ok((client, js, epoch))
}

/// JetStream error codes that mean "not now" rather than "no": the cluster has no leader for the
/// asset yet, or its peers are not all known yet (right after a cluster starts).
const UNAVAILABLE_CODES: [jetstream::ErrorCode; 7] = [
    jetstream::ErrorCode::CLUSTER_INCOMPLETE,
    jetstream::ErrorCode::CLUSTER_NO_PEERS,
    jetstream::ErrorCode::CLUSTER_NOT_ASSIGNED,
    jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE,
    jetstream::ErrorCode::CLUSTER_NOT_LEADER,
    jetstream::ErrorCode::STREAM_OFFLINE,
    jetstream::ErrorCode::CONSUMER_OFFLINE,
];

/// The JetStream API's own answer inside `error`, if the failure is one (and not a time-out, a
/// missing responder or a lost connection).
pub fn api_error(error: &(dyn std::error::Error + 'static)) -> Option<jetstream::Error> {
    use async_nats::jetstream::context::{
        CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind,
    };
    use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(js) = e.downcast_ref::<jetstream::Error>() {
            return Some(js.clone());
        }
        // The kinds carry the API's answer in themselves, not as a source.
        let found = if let Some(e) = e.downcast_ref::<CreateStreamError>() {
            match e.kind() {
                CreateStreamErrorKind::JetStream(js) => Some(js),
                _ => None,
            }
        } else if let Some(e) = e.downcast_ref::<GetStreamError>() {
            match e.kind() {
                GetStreamErrorKind::JetStream(js) => Some(js),
                _ => None,
            }
        } else if let Some(e) = e.downcast_ref::<ConsumerError>() {
            match e.kind() {
                ConsumerErrorKind::JetStream(js) => Some(js),
                _ => None,
            }
        } else {
            None
        };
        if found.is_some() {
            return found;
        }
        next = e.source();
    }
    None
}

/// Whether a failed JetStream API call may succeed later without anyone changing anything: a
/// time-out, no responders, a lost connection, or an answer that says the cluster is electing or
/// catching up. Anything else is a refusal (a bad name, a conflicting config, a missing stream).
pub fn is_unavailable(error: &(dyn std::error::Error + 'static)) -> bool {
    match api_error(error) {
        None => true,
        Some(api) => {
            api.code() == 503 || api.code() == 504 || UNAVAILABLE_CODES.contains(&api.error_code())
        }
    }
}

/// Runs a start-up step (creating or binding something on JetStream) until it succeeds: while
/// JetStream cannot answer (a cluster electing its leaders, a restarting server), it retries with
/// backoff and says what it waits for; a refusal is returned at once. `Ok(None)` when `shutdown`
/// comes first.
pub async fn when_available<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut step: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut pause = crate::common::backoff::RETRY_MIN;
    let mut tries = 0u32;
    loop {
        let result = tokio::select! {
            result = step() => result,
            _ = shutdown.cancelled() => return Ok(None),
        };
        match result {
            Ok(value) => {
                if tries > 0 {
                    info!(what, tries = tries + 1, "JetStream answered.");
                }
                return Ok(Some(value));
            }
            Err(error) if is_unavailable(error.as_ref()) => {
                tries += 1;
                tracing::warn!(
                    what,
                    error = format!("{error:#}"),
                    retry_in_ms = pause.as_millis() as u64,
                    "Waiting for JetStream (a cluster electing its leaders?)."
                );
            }
            Err(error) => return Err(error),
        }
        if crate::common::backoff::back_off(shutdown, &mut pause)
            .await
            .is_err()
        {
            return Ok(None);
        }
    }
}

/// Idle heartbeat of pull requests: a silent server is noticed within twice this.
pub(crate) const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// Whether a pull stream's error says its request went silent (missed idle heartbeats): the
/// consumer's leader that held the request is gone (killed, or moved in an election). async-nats
/// reports it and waits for the request to expire (30 s) before it asks again, so the caller opens
/// a new pull at once instead.
pub fn pull_went_silent(error: &jetstream::consumer::pull::MessagesError) -> bool {
    error.kind() == jetstream::consumer::pull::MessagesErrorKind::MissingHeartbeat
}

/// Opens a pull stream on `consumer` (`batch` messages per request), retrying with backoff while
/// NATS is unreachable, until it opens or `shutdown` is cancelled (then `None`).
pub async fn pull(
    consumer: &jetstream::consumer::PullConsumer,
    batch: usize,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<jetstream::consumer::pull::Stream> {
    let mut pause = Duration::from_millis(100);
    loop {
        let opened = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await;
        match opened {
            Ok(stream) => return Some(stream),
            Err(error) => tracing::warn!(%error, "Cannot pull yet; retrying."),
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return None,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// The latest entry of `key` in a key-value bucket, read from the bucket stream's leader.
///
/// async-nats reads entries with a direct get when the bucket allows it (every bucket it creates
/// does), and any replica may answer a direct get, also one that is behind the leader: a hold entry
/// or lease written a moment ago could look absent or old. `$JS.API.STREAM.MSG.GET` is answered by
/// the leader alone.
pub async fn leader_entry(
    kv: &jetstream::kv::Store,
    key: &str,
) -> Result<Option<jetstream::kv::Entry>, jetstream::stream::LastRawMessageError> {
    use jetstream::kv::Operation;
    use jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{key}", kv.prefix);
    let message = match kv.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let operation = match message
        .headers
        .get("KV-Operation")
        .map(|v| v.as_str())
        .or_else(|| {
            message
                .headers
                .get("Nats-Marker-Reason")
                .map(|v| v.as_str())
        }) {
        Some("DEL" | "Remove") => Operation::Delete,
        Some("PURGE" | "Purge" | "MaxAge") => Operation::Purge,
        _ => Operation::Put,
    };
    Ok(Some(jetstream::kv::Entry {
        bucket: kv.name.clone(),
        key: key.to_owned(),
        value: message.payload,
        revision: message.sequence,
        delta: 0,
        created: message.time,
        operation,
        seen_current: false,
    }))
}

/// Whether a server version like `2.15.1` (or `2.11.0-beta`) is at least `min`.
pub fn version_at_least(version: &str, min: (u64, u64)) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= min
}

/// Creates mend's streams and buckets (holds, leases) if missing; leaves existing ones alone. Waits
/// while JetStream cannot answer.
pub async fn ensure_layout(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    shutdown: &CancellationToken,
) -> Result<(), ConnectError> {
    use stream::RetentionPolicy::{Limits, WorkQueue};
    let streams = [
        (streams::FAILED, "mend.failed.>", WorkQueue, Duration::ZERO),
        (streams::RETRY, "mend.retry.>", WorkQueue, Duration::ZERO),
        (streams::HOLD, "mend.hold.>", Limits, Duration::ZERO),
        (streams::PARKED, "mend.parked.>", WorkQueue, Duration::ZERO),
        (
            streams::CONTROL,
            "mend.control.>",
            WorkQueue,
            Duration::ZERO,
        ),
        (streams::EVENTS, "mend.events.>", Limits, cfg.events_max_age),
    ];
    for (name, subject, retention, max_age) in streams {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            retention,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            duplicate_window: if max_age.is_zero() {
                DUPLICATE_WINDOW
            } else {
                DUPLICATE_WINDOW.min(max_age)
            },
            allow_direct: true,
            ..Default::default()
        };
        create(&format!("stream {name}"), shutdown, || async {
            Ok(js.get_or_create_stream(config.clone()).await?)
        })
        .await?;
    }
    for bucket in [buckets::HOLDS, buckets::LEASES] {
        let what = format!("key-value bucket {bucket}");
        let config = jetstream::kv::Config {
            bucket: bucket.to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        };
        let step = || async {
            match js.get_key_value(bucket).await {
                Ok(_) => Ok(()),
                // Not there (or not answering): creating it says which, and is idempotent.
                Err(_) => Ok(js.create_key_value(config.clone()).await.map(|_| ())?),
            }
        };
        create(&what, shutdown, step).await?;
    }
    let bucket = buckets::PAYLOADS;
    let config = jetstream::object_store::Config {
        bucket: bucket.to_owned(),
        description: Some("mend: payloads too large for a hold queue or an envelope".to_owned()),
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        ..Default::default()
    };
    let step = || async {
        match js.get_object_store(bucket).await {
            Ok(_) => Ok(()),
            Err(_) => Ok(js.create_object_store(config.clone()).await.map(|_| ())?),
        }
    };
    create(&format!("object store {bucket}"), shutdown, step).await?;
    Ok(())
}

/// One part of the layout, created once JetStream answers.
async fn create<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    step: F,
) -> Result<T, ConnectError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    when_available(what, shutdown, step)
        .await
        .map_err(|e| ConnectError::Layout {
            what: what.to_owned(),
            message: format!("{e:#}"),
        })?
        .ok_or(ConnectError::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(version_at_least("2.15.1", MIN_SERVER));
        assert!(version_at_least("2.11.0-RC.1", MIN_SERVER));
        assert!(version_at_least("3.0.0", MIN_SERVER));
        assert!(!version_at_least("2.9.10", MIN_SERVER));
        assert!(!version_at_least("2.10.22", MIN_SERVER));
        assert!(!version_at_least("garbage", MIN_SERVER));
    }
}
