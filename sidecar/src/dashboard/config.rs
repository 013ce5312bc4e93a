//! The dashboard's configuration (SPEC §10): `dashboard.toml` with `MEND_*` environment overrides
//! (`MEND_USER_<NAME>_PASSWORD_HASH`, …).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::common::config::{NatsConfig, default_nats_url, default_shutdown_timeout, positive_u32};
use crate::common::envcfg::{self, ConfigError};

/// The whole `dashboard.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    #[serde(default = "default_nats_url")]
    pub nats_url: String,
    /// `sqlite://path` (created if missing; relative to the working directory) or `postgres://…`.
    #[serde(default = "default_database_url")]
    pub database_url: String,
    /// Where the web UI, the API and (without `ops_listen`) `/healthz`, `/readyz`, `/metrics` are
    /// served.
    #[serde(default = "default_dashboard_listen")]
    pub listen: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served instead, apart from the UI and the API:
    /// for probes and scrapers that cannot log in, off the address people reach.
    #[serde(default)]
    pub ops_listen: Option<SocketAddr>,
    /// The processor's rules (a file or a directory), for dry-runs; relative to the config's folder.
    pub rules: Option<PathBuf>,
    /// Web logins.
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    /// Bearer tokens of the API.
    #[serde(default, rename = "api_token")]
    pub api_tokens: Vec<TokenConfig>,
    /// JSON Pointers of payload fields hidden from viewers (`*` matches any key or index).
    #[serde(default)]
    pub mask: Vec<String>,
    /// How long a login lasts.
    #[serde(default = "default_session_ttl", with = "humantime_serde")]
    pub session_ttl: Duration,
    /// The memory all password checks at once may take, in MiB (each argon2 check allocates its
    /// memory cost, 19 MiB with `mend hash-password`'s defaults); logins beyond it wait a moment,
    /// then are answered 429.
    #[serde(
        default = "default_login_memory_mib",
        deserialize_with = "positive_u32"
    )]
    pub login_memory_mib: u32,
    /// Proxies (addresses or CIDR networks) in front of the dashboard whose `X-Forwarded-For` names
    /// the client, for the login limits; from anyone else the header is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Cookies always carry `Secure`: set it when the dashboard is only reached over TLS and no
    /// trusted proxy says so in `X-Forwarded-Proto`.
    #[serde(default)]
    pub secure_cookies: bool,
    /// How long a person's action waits for JetStream to confirm its publish; past it, the action's
    /// outcome is unknown, and the message stays taken by it for three times as long, then the
    /// dashboard finds out (by sending the same de-duplicated message again) and records it.
    #[serde(default = "default_publish_timeout", with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// How long announcements are kept for timelines and rule counts.
    #[serde(default = "default_events_retention", with = "humantime_serde")]
    pub events_retention: Duration,
    /// The largest request body accepted (an edited payload, a draft rule).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Messages per second a bulk resubmission or discard sends (after the canary).
    #[serde(default = "default_bulk_rate", deserialize_with = "positive_u32")]
    pub bulk_rate: u32,
    /// How long a bulk resubmission waits for its canary's outcome.
    #[serde(default = "default_canary_timeout", with = "humantime_serde")]
    pub canary_timeout: Duration,
    /// The ack wait of the dashboards' consumers: what a crashed dashboard had taken but not stored
    /// is offered again after it.
    #[serde(default = "default_dashboard_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long a graceful shutdown waits.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(default)]
    pub nats: NatsConfig,
}

/// A `[[user]]` of the dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub role: mend_dashboard::auth::Role,
    /// Argon2 PHC string from `mend hash-password`.
    pub password_hash: String,
}

/// An `[[api_token]]` of the dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub role: mend_dashboard::auth::Role,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

impl DashboardConfig {
    /// Reads `path` with `MEND_*` overrides (`MEND_USER_<NAME>_PASSWORD_HASH`, …) and checks the
    /// users, tokens and masks; a relative `rules` path is taken from the config's folder.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config: Self = envcfg::load(path, env, &["user", "api_token"])?;
        if let Some(rules) = &config.rules
            && rules.is_relative()
            && let Some(dir) = path.parent()
        {
            config.rules = Some(dir.join(rules));
        }
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        mend_dashboard::auth::TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|m| invalid("trusted_proxies".into(), m))?;
        for (i, u) in self.users.iter().enumerate() {
            if u.name.trim().is_empty() {
                return Err(invalid("user.name".into(), "a user needs a name".into()));
            }
            if self.users[..i].iter().any(|o| o.name == u.name) {
                return Err(invalid(
                    format!("user.name = {:?}", u.name),
                    "user names must be unique".into(),
                ));
            }
            mend_dashboard::auth::check_hash(&u.password_hash).map_err(|m| {
                invalid(
                    format!("user {:?} password_hash", u.name),
                    format!("{m} (make one with `mend hash-password`)"),
                )
            })?;
        }
        self.tokens()
            .map_err(|e| invalid("api_token".into(), e.to_string()))?;
        for (i, m) in self.mask.iter().enumerate() {
            mend_dashboard::auth::check_pointer(m).map_err(|e| invalid(format!("mask[{i}]"), e))?;
        }
        if self.ack_wait < Duration::from_secs(1) {
            return Err(invalid("ack_wait".into(), "must be at least 1s".into()));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid(
                "max_body_bytes".into(),
                "must be at least 1024".into(),
            ));
        }
        // An action's unknown outcome is found out by sending the same message again within
        // JetStream's duplicate window, after three times this: it must fit well inside.
        if !(Duration::from_millis(100)..=Duration::from_secs(180)).contains(&self.publish_timeout)
        {
            return Err(invalid(
                "publish_timeout".into(),
                "must be 100ms to 3m (three times it must fit in JetStream's 10-minute duplicate window)"
                    .into(),
            ));
        }
        if self.ops_listen == Some(self.listen) {
            return Err(invalid(
                "ops_listen".into(),
                "must be another address than `listen`".into(),
            ));
        }
        Ok(())
    }

    /// The API tokens, checked.
    pub fn tokens(&self) -> Result<mend_dashboard::auth::Tokens, mend_dashboard::auth::AuthError> {
        mend_dashboard::auth::Tokens::new(
            self.api_tokens
                .iter()
                .map(|t| (t.name.clone(), t.role, t.sha256.as_str())),
        )
    }

    /// Whether anyone can log in or call the API.
    pub fn has_credentials(&self) -> bool {
        !self.users.is_empty() || !self.api_tokens.is_empty()
    }
}

fn default_database_url() -> String {
    "sqlite://mend.db".into()
}
fn default_dashboard_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
const fn default_publish_timeout() -> Duration {
    Duration::from_secs(10)
}

const fn default_login_memory_mib() -> u32 {
    64
}

const fn default_session_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}
const fn default_events_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
const fn default_max_body_bytes() -> usize {
    1024 * 1024
}
const fn default_bulk_rate() -> u32 {
    20
}
const fn default_dashboard_ack_wait() -> Duration {
    Duration::from_secs(30)
}
const fn default_canary_timeout() -> Duration {
    Duration::from_secs(60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn dashboard_publish_timeout_and_ops_listen_are_checked() {
        let base = "listen = \"127.0.0.1:8080\"\n[[api_token]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\n";
        let load = |extra: &str| {
            let f = write(&format!("{extra}\n{base}"));
            DashboardConfig::load(f.path(), []).map_err(|e| e.to_string())
        };
        let c = load("publish_timeout = \"2s\"\nops_listen = \"127.0.0.1:9466\"").unwrap();
        assert_eq!(c.publish_timeout, Duration::from_secs(2));
        for bad in ["publish_timeout = \"0s\"", "publish_timeout = \"5m\""] {
            let e = load(bad).unwrap_err();
            assert!(e.contains("publish_timeout"), "{bad}: {e}");
        }
        let e = load("ops_listen = \"127.0.0.1:8080\"").unwrap_err();
        assert!(e.contains("ops_listen"), "{e}");
    }
}
