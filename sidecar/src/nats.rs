//! Connecting to NATS and creating mend's streams and buckets (SPEC §2), shared by every role.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions};
use tracing::info;

use crate::config::NatsConfig;

/// The oldest nats-server mend runs against (multiple filter subjects, per-key TTL in KV).
pub const MIN_SERVER: (u64, u64) = (2, 11);
/// How long JetStream remembers a `Nats-Msg-Id`: a publish repeated after a crash within this window
/// is dropped as a duplicate. It must outlast a crashed sidecar's ack wait, so config checks that.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);
/// The key-value bucket of held keys.
pub const HOLDS_BUCKET: &str = "mend_holds";

/// Why start-up could not reach a usable NATS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
}

/// Connects with the configured auth and TLS; after the first connection the client reconnects by
/// itself forever.
/// Every (re)connection bumps `epoch`.
pub async fn connect(
    url: &str,
    cfg: &NatsConfig,
    name: &str,
    epoch: &crate::ack::Epoch,
) -> Result<Client, ConnectError> {
    let mut opts = ConnectOptions::new()
        .name(name)
        .connection_timeout(cfg.connect_timeout)
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
    let client = opts
        .connect(url)
        .await
        .map_err(|source| ConnectError::Connect {
            url: url.to_owned(),
            source,
        })?;
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

/// The start of every role: connect, then make sure mend's streams and bucket exist.
pub async fn start(
    url: &str,
    cfg: &NatsConfig,
    name: &str,
) -> Result<(Client, jetstream::Context, crate::ack::Epoch), ConnectError> {
    let epoch = crate::ack::Epoch::default();
    let client = connect(url, cfg, name, &epoch).await?;
    let js = jetstream::new(client.clone());
    ensure_layout(&js, cfg).await?;
    Ok((client, js, epoch))
}

/// Idle heartbeat of pull requests: a silent server is noticed within twice this.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

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

/// Whether a server version like `2.15.1` (or `2.11.0-beta`) is at least `min`.
pub fn version_at_least(version: &str, min: (u64, u64)) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= min
}

/// Creates mend's streams and buckets (holds, leases) if missing; leaves existing ones alone.
pub async fn ensure_layout(js: &jetstream::Context, cfg: &NatsConfig) -> Result<(), ConnectError> {
    use stream::RetentionPolicy::{Limits, WorkQueue};
    let streams = [
        ("MEND_FAILED", "mend.failed.>", WorkQueue, Duration::ZERO),
        ("MEND_RETRY", "mend.retry.>", WorkQueue, Duration::ZERO),
        ("MEND_HOLD", "mend.hold.>", Limits, Duration::ZERO),
        ("MEND_PARKED", "mend.parked.>", WorkQueue, Duration::ZERO),
        ("MEND_CONTROL", "mend.control.>", WorkQueue, Duration::ZERO),
        ("MEND_EVENTS", "mend.events.>", Limits, cfg.events_max_age),
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
        js.get_or_create_stream(config)
            .await
            .map_err(|e| ConnectError::Layout {
                what: format!("stream {name}"),
                message: e.to_string(),
            })?;
    }
    for bucket in [HOLDS_BUCKET, crate::lease::LEASES_BUCKET] {
        if js.get_key_value(bucket).await.is_err() {
            js.create_key_value(jetstream::kv::Config {
                bucket: bucket.to_owned(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ConnectError::Layout {
                what: format!("key-value bucket {bucket}"),
                message: e.to_string(),
            })?;
        }
    }
    Ok(())
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
