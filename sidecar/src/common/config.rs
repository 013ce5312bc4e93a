//! What every role's configuration shares (SPEC §10): the `[nats]` table, the defaults and the
//! value checks that more than one role's file uses. Each role's file is read by its own module
//! (`runtime::config`, `processor::config`, `dashboard::config`) through [`envcfg`](super::envcfg).

use std::path::PathBuf;
use std::time::Duration;

use repair_rules::identity::is_subject_token;
use serde::Deserialize;

/// Connection options shared by every role, and how mend's streams are created.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// A `.creds` file (JWT + NKey seed).
    pub creds: Option<PathBuf>,
    /// A file holding an NKey seed.
    pub nkey_seed_file: Option<PathBuf>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// PEM file of root certificates to trust.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse a connection that is not TLS.
    #[serde(default)]
    pub tls_required: bool,
    /// How long the first connection may take before start-up fails.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Replicas of the streams and bucket mend creates (1, 3 or 5).
    #[serde(default = "default_replicas", deserialize_with = "replicas")]
    pub replicas: usize,
    /// How long MEND_EVENTS keeps announcements.
    #[serde(default = "default_events_max_age", with = "humantime_serde")]
    pub events_max_age: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            creds: None,
            nkey_seed_file: None,
            token: None,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            connect_timeout: default_connect_timeout(),
            replicas: default_replicas(),
            events_max_age: default_events_max_age(),
        }
    }
}

pub(crate) fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}
pub(crate) const fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(20)
}
pub(crate) const fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(crate) const fn default_replicas() -> usize {
    1
}
pub(crate) const fn default_events_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
pub(crate) const fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

pub(crate) fn token<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if is_subject_token(&s) {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "{s:?} must be one subject token: letters, digits, '-' and '_' only"
        )))
    }
}

pub(crate) fn concurrency<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if (1..=10_000).contains(&n) {
        Ok(n)
    } else {
        Err(serde::de::Error::custom(format!(
            "{n} is out of range 1..=10000"
        )))
    }
}

pub(crate) fn positive_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(n)
}

pub(crate) fn replicas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if (1..=5).contains(&n) {
        Ok(n)
    } else {
        Err(serde::de::Error::custom(format!(
            "{n} replicas: must be 1 to 5"
        )))
    }
}
