//! The processor's configuration (SPEC §10): `processor.toml` with `MEND_*` environment overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::common::config::{
    NatsConfig, concurrency, default_ack_wait, default_nats_url, default_shutdown_timeout,
    positive_u32,
};
use crate::common::envcfg::{self, ConfigError};

/// The whole `processor.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    #[serde(default = "default_nats_url")]
    pub nats_url: String,
    /// A rule file or a directory of `*.toml` rule files; relative to the config file's folder.
    pub rules: PathBuf,
    /// Repairs of one lineage before it is parked.
    #[serde(default = "default_max_repairs", deserialize_with = "positive_u32")]
    pub max_repairs: u32,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[serde(default = "default_processor_listen")]
    pub listen: SocketAddr,
    /// Failures worked on at once by this processor.
    #[serde(
        default = "default_processor_concurrency",
        deserialize_with = "concurrency"
    )]
    pub concurrency: usize,
    /// Longest evaluation of the rules on one failure; past it the failure is parked.
    #[serde(default = "default_rule_timeout", with = "humantime_serde")]
    pub rule_timeout: Duration,
    /// Payloads larger than this (as JSON) are parked without evaluating rules.
    #[serde(default = "default_rule_payload_limit")]
    pub max_payload_bytes: usize,
    /// How long a graceful shutdown waits for failures in progress.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// The ack wait of the processors' consumer: a crashed processor's failures are redelivered
    /// to another after it.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    #[serde(default)]
    pub nats: NatsConfig,
}

impl ProcessorConfig {
    /// Reads `path` with `MEND_*` overrides; a relative `rules` path is taken from the config's folder.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config: Self = envcfg::load(path, env, &[])?;
        if config.rules.is_relative()
            && let Some(dir) = path.parent()
        {
            config.rules = dir.join(&config.rules);
        }
        Ok(config)
    }

    /// The evaluation limits of this processor.
    pub fn limits(&self) -> repair_rules::rules::Limits {
        repair_rules::rules::Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_repairs: self.max_repairs,
            // Comprehensions stop at it (the evaluation's own deadline, not only the wait for it).
            time_limit: Some(self.rule_timeout),
        }
    }
}

const fn default_max_repairs() -> u32 {
    3
}
fn default_processor_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9465))
}
/// Failures in flight per processor: its work is mostly waiting for publish acks, so many in flight
/// let the client batch writes (`make bench`: about 19k/s at 64, 21k/s at 256 on 2 cores).
const fn default_processor_concurrency() -> usize {
    256
}
const fn default_rule_timeout() -> Duration {
    Duration::from_secs(1)
}
const fn default_rule_payload_limit() -> usize {
    256 * 1024
}
