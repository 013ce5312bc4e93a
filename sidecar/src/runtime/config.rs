//! The sidecar's configuration (SPEC §10): `sidecar.toml` with `MEND_*` environment overrides, parsed
//! once into typed values. Every error names the file, line and key (or the environment variable).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::common::config::{
    NatsConfig, concurrency, default_ack_wait, default_nats_url, default_shutdown_timeout,
    positive_u32, token,
};
use crate::common::envcfg::{self, ConfigError};

/// The whole `sidecar.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// The service name: one subject token; names the mend subjects of this service.
    #[serde(deserialize_with = "token")]
    pub service: String,
    /// The NATS server(s), comma-separated.
    #[serde(default = "default_nats_url")]
    pub nats_url: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How long a graceful shutdown waits for in-flight deliveries before handing them back.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long a binding's lease outlives its last renewal (1s to 24h): one sidecar at a time
    /// consumes a (binding, partition), and a standby takes over from a crashed one after about this
    /// long. A sidecar that loses its lease stops consuming within half of it.
    #[serde(default = "default_lease_ttl", deserialize_with = "lease_ttl")]
    pub lease_ttl: Duration,
    /// This instance's partition index (a StatefulSet ordinal, say): the partition it consumes of
    /// every binding with `partitions` above 1. `mend sidecar --partition N` overrides it.
    #[serde(default)]
    pub partition: u32,
    /// NATS authentication, TLS and the layout of mend's streams.
    #[serde(default)]
    pub nats: NatsConfig,
    /// The app streams this sidecar consumes and where it delivers them.
    #[serde(rename = "binding")]
    pub bindings: Vec<BindingConfig>,
}

/// One app stream consumed by the sidecar and the endpoint it is delivered to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    /// Names the durable consumer `mend-<service>-<name>`.
    #[serde(deserialize_with = "token")]
    pub name: String,
    /// The app's stream; it must exist (mend never creates or changes it).
    pub stream: String,
    /// Filter subjects of the consumer. With `partitions` above 1, each holds the token
    /// `{partition}`, replaced by the instance's partition index.
    #[serde(deserialize_with = "subject_filters")]
    pub subjects: Vec<String>,
    /// How many partitions the app stream's subjects are split into (1 to 1024), usually by a stream
    /// subject transform with `{{partition(N, …)}}`. Each partition has its own consumer
    /// (`mend-<service>-<name>-p<index>`) and lease, consumed by the instance with that `partition`.
    #[serde(default = "default_partitions", deserialize_with = "partitions")]
    pub partitions: u32,
    /// Where the business key comes from; without one, messages are delivered fully concurrently.
    pub key: Option<KeySource>,
    /// The app's HTTP endpoint.
    #[serde(deserialize_with = "endpoint")]
    pub endpoint: reqwest::Url,
    /// Keys (or, without a key, messages) in flight at once.
    #[serde(default = "default_concurrency", deserialize_with = "concurrency")]
    pub concurrency: usize,
    /// Per app call.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Bulk delivery (SPEC §4): many messages per app call, at most one per key. Off when absent.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
    /// The consumer's ack wait; mend keeps waiting messages alive with in-progress acks.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Transient answers to one message (while the app answers others) before it is delegated as
    /// `transient_exhausted`.
    #[serde(default = "default_transient_tries", deserialize_with = "positive_u32")]
    pub transient_tries: u32,
    /// First delay of the exponential backoff between transient tries.
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest delay between transient tries (and the cap on an app's `Retry-After`).
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A hold older than this is made loud: a `hold_alert` event, a warning, `mend_hold_alerts`.
    #[serde(default = "default_hold_alert_age", with = "humantime_serde")]
    pub hold_alert_age: Duration,
    /// A hold with more messages waiting than this is made loud the same way.
    #[serde(
        default = "default_hold_alert_count",
        deserialize_with = "positive_u32"
    )]
    pub hold_alert_count: u32,
}

/// A binding's bulk delivery: a batch is sent when it holds `max_messages` or `max_wait` after its
/// first message; `concurrency` batches at most are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Messages per batch (1 to [`MAX_BATCH`]).
    #[serde(
        default = "default_batch_messages",
        deserialize_with = "batch_messages"
    )]
    pub max_messages: usize,
    /// How long a batch waits for more messages after its first (at most 10s).
    #[serde(default = "default_batch_wait", deserialize_with = "batch_wait")]
    pub max_wait: Duration,
}

/// The most messages one batch may hold.
pub const MAX_BATCH: usize = 1000;

/// Where a binding's business key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum KeySource {
    /// A NATS header of the message.
    Header(String),
    /// A JSON Pointer into the payload.
    Json(#[serde(deserialize_with = "json_pointer")] String),
}

impl SidecarConfig {
    /// Reads `path`, applies overrides from `env` (the process environment in production) and checks
    /// what no single key can: unique bindings, an ack wait longer than a call.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_for(path, env, None)
    }

    /// [`SidecarConfig::load`], with the partition index given on the command line (which wins over
    /// the file and `MEND_PARTITION`).
    pub fn load_for(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
        partition: Option<u32>,
    ) -> Result<Self, ConfigError> {
        let mut config: Self = envcfg::load(path, env, &["binding"])?;
        if let Some(partition) = partition {
            config.partition = partition;
        }
        config.validate(path, partition.is_some())?;
        Ok(config)
    }

    fn validate(&self, path: &Path, partition_from_flag: bool) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if self.bindings.is_empty() {
            return Err(invalid(
                "binding".into(),
                "at least one [[binding]] is required".into(),
            ));
        }
        for (i, b) in self.bindings.iter().enumerate() {
            if self.bindings[..i].iter().any(|o| o.name == b.name) {
                return Err(invalid(
                    format!("binding.name = {:?}", b.name),
                    "binding names must be unique".into(),
                ));
            }
            if b.ack_wait < b.timeout + Duration::from_secs(1) {
                return Err(invalid(
                    format!("binding {:?} ack_wait", b.name),
                    format!(
                        "ack_wait ({}) must exceed timeout ({}) by at least 1s",
                        humantime::format_duration(b.ack_wait),
                        humantime::format_duration(b.timeout)
                    ),
                ));
            }
            if b.backoff_initial > b.backoff_max || b.backoff_initial.is_zero() {
                return Err(invalid(
                    format!("binding {:?} backoff_initial", b.name),
                    "backoff_initial must be above zero and at most backoff_max".into(),
                ));
            }
            for s in &b.subjects {
                let tokens = s.split('.');
                let exact = tokens.clone().filter(|t| *t == PARTITION_TOKEN).count();
                let inside = tokens.filter(|t| t.contains(PARTITION_TOKEN)).count();
                let problem = if inside != exact || exact > 1 {
                    Some(format!(
                        "{s:?}: `{PARTITION_TOKEN}` may appear once, as a whole token"
                    ))
                } else if exact == 0 && b.partitions > 1 {
                    Some(format!(
                        "{s:?} has no token `{PARTITION_TOKEN}`: with partitions = {}, every \
                         subject needs exactly one (for example \"orders.{PARTITION_TOKEN}.>\")",
                        b.partitions
                    ))
                } else {
                    None
                };
                if let Some(message) = problem {
                    return Err(invalid(format!("binding {:?} subjects", b.name), message));
                }
            }
            if b.partitions > 1 && self.partition >= b.partitions {
                let from = if partition_from_flag {
                    " (from --partition)"
                } else {
                    ""
                };
                return Err(invalid(
                    "partition".into(),
                    format!(
                        "{}{from} is not a partition of binding {:?}, which has partitions = {} \
                         (0 to {})",
                        self.partition,
                        b.name,
                        b.partitions,
                        b.partitions - 1
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The token of a binding's subjects that stands for the partition index.
pub const PARTITION_TOKEN: &str = "{partition}";

impl BindingConfig {
    /// The durable consumer of this binding (of an unpartitioned one; see
    /// [`BindingConfig::partition_consumer_name`]).
    pub fn consumer_name(&self, service: &str) -> String {
        repair_rules::identity::consumers::binding(service, &self.name)
    }

    /// Messages in flight at once: `concurrency`, or with bulk delivery `concurrency` batches of
    /// `max_messages` (each message still one of its key's lane).
    pub fn slots(&self) -> usize {
        self.concurrency * self.batch.map_or(1, |b| b.max_messages)
    }

    /// Whether the binding is split into partitions, each consumed by its own instance.
    pub fn is_partitioned(&self) -> bool {
        self.partitions > 1
    }

    /// The partition of this binding that the instance with index `instance` consumes: its index
    /// when the binding is partitioned, else 0.
    pub fn partition_for(&self, instance: u32) -> u32 {
        if self.is_partitioned() { instance } else { 0 }
    }

    /// The durable consumer of partition `partition` of this binding:
    /// `mend-<service>-<name>-p<partition>` when partitioned, else [`BindingConfig::consumer_name`].
    pub fn partition_consumer_name(&self, service: &str, partition: u32) -> String {
        if self.is_partitioned() {
            repair_rules::identity::consumers::binding_partition(service, &self.name, partition)
        } else {
            self.consumer_name(service)
        }
    }

    /// The filter subjects of partition `partition`: `{partition}` replaced by its index.
    pub fn partition_subjects(&self, partition: u32) -> Vec<String> {
        self.subjects
            .iter()
            .map(|s| fill_partition(s, partition))
            .collect()
    }

    /// This binding as partition `partition` consumes it: its subjects are that partition's.
    pub fn for_partition(&self, partition: u32) -> Self {
        Self {
            subjects: self.partition_subjects(partition),
            ..self.clone()
        }
    }

    /// Which partition of this binding a message on `subject` belongs to: the first whose filter
    /// subjects match it. `None` when no partition's do.
    pub fn partition_of(&self, subject: &str) -> Option<u32> {
        if !self.is_partitioned() {
            return self
                .partition_subjects(0)
                .iter()
                .any(|f| repair_rules::rules::subject::matches(f, subject))
                .then_some(0);
        }
        let tokens: Vec<&str> = subject.split('.').collect();
        self.subjects.iter().find_map(|filter| {
            // The subject's token in the place of `{partition}` names the only candidate.
            let at = filter.split('.').position(|t| t == PARTITION_TOKEN)?;
            let k: u32 = tokens.get(at)?.parse().ok()?;
            let canonical = k < self.partitions && tokens[at] == k.to_string();
            (canonical
                && repair_rules::rules::subject::matches(&fill_partition(filter, k), subject))
            .then_some(k)
        })
    }

    /// Whether a message on `subject` is one this binding consumes (on any partition).
    pub fn consumes(&self, subject: &str) -> bool {
        self.partition_of(subject).is_some()
    }
}

/// `filter` with its `{partition}` token replaced by `partition`.
fn fill_partition(filter: &str, partition: u32) -> String {
    filter
        .split('.')
        .map(|t| {
            if t == PARTITION_TOKEN {
                std::borrow::Cow::Owned(partition.to_string())
            } else {
                std::borrow::Cow::Borrowed(t)
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
/// Long enough that a renewal may wait out a leader election of the leases bucket (half the ttl).
const fn default_lease_ttl() -> Duration {
    Duration::from_secs(30)
}
const fn default_partitions() -> u32 {
    1
}
const fn default_concurrency() -> usize {
    64
}
const fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
const fn default_batch_messages() -> usize {
    100
}
const fn default_batch_wait() -> Duration {
    Duration::from_millis(2)
}
const fn default_transient_tries() -> u32 {
    10
}
const fn default_backoff_initial() -> Duration {
    Duration::from_millis(100)
}
const fn default_backoff_max() -> Duration {
    Duration::from_secs(10)
}
const fn default_hold_alert_age() -> Duration {
    Duration::from_secs(3600)
}
const fn default_hold_alert_count() -> u32 {
    1000
}

fn subject_filters<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let subjects = Vec::<String>::deserialize(d)?;
    if subjects.is_empty() {
        return Err(serde::de::Error::custom("at least one subject is required"));
    }
    for s in &subjects {
        let tokens: Vec<&str> = s.split('.').collect();
        let bad_token = tokens.iter().enumerate().any(|(i, t)| {
            t.is_empty()
                || t.chars().any(|c| c.is_whitespace())
                || (t.contains('*') && *t != "*")
                || (t.contains('>') && (*t != ">" || i + 1 != tokens.len()))
        });
        if bad_token {
            return Err(serde::de::Error::custom(format!(
                "{s:?} is not a valid NATS subject filter"
            )));
        }
    }
    Ok(subjects)
}

fn endpoint<'de, D: serde::Deserializer<'de>>(d: D) -> Result<reqwest::Url, D::Error> {
    let s = String::deserialize(d)?;
    let url = reqwest::Url::parse(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a URL: {e}")))?;
    if url.scheme() != "http" {
        return Err(serde::de::Error::custom(format!(
            "{s:?}: only http:// endpoints are supported (the app runs beside the sidecar)"
        )));
    }
    Ok(url)
}

fn lease_ttl<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let ttl: Duration = humantime_serde::deserialize(d)?;
    if (Duration::from_secs(1)..=crate::common::lease::MAX_TTL).contains(&ttl) {
        Ok(ttl)
    } else {
        Err(serde::de::Error::custom(format!(
            "{} is out of range: a lease lasts 1s to 24h",
            humantime::format_duration(ttl)
        )))
    }
}

fn partitions<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if (1..=1024).contains(&n) {
        Ok(n)
    } else {
        Err(serde::de::Error::custom(format!(
            "{n} is out of range 1..=1024"
        )))
    }
}

fn batch_messages<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if (1..=MAX_BATCH).contains(&n) {
        Ok(n)
    } else {
        Err(serde::de::Error::custom(format!(
            "{n} is out of range 1..={MAX_BATCH}"
        )))
    }
}

fn batch_wait<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let wait: Duration = humantime_serde::deserialize(d)?;
    if wait <= Duration::from_secs(10) {
        Ok(wait)
    } else {
        Err(serde::de::Error::custom(format!(
            "{} is out of range: a batch waits at most 10s",
            humantime::format_duration(wait)
        )))
    }
}

fn json_pointer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.starts_with('/') {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "{s:?} is not a JSON Pointer (it must start with '/')"
        )))
    }
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

    const GOOD: &str = r#"
service  = "orders"
nats_url = "nats://127.0.0.1:4222"
listen   = "127.0.0.1:9464"

[[binding]]
name        = "orders"
stream      = "ORDERS"
subjects    = ["orders.>"]
key         = { header = "Account-Id" }
endpoint    = "http://127.0.0.1:8080/events"
concurrency = 64
timeout     = "10s"
"#;

    #[test]
    fn spec_example_loads_with_defaults() {
        let f = write(GOOD);
        let c = SidecarConfig::load(f.path(), []).unwrap();
        assert_eq!(c.service, "orders");
        let b = &c.bindings[0];
        assert_eq!(b.key, Some(KeySource::Header("Account-Id".into())));
        assert_eq!(b.timeout, Duration::from_secs(10));
        assert_eq!(b.ack_wait, Duration::from_secs(30));
        assert_eq!(b.consumer_name(&c.service), "mend-orders-orders");
        assert_eq!(c.nats.replicas, 1);
    }

    #[test]
    fn batch_is_off_by_default_and_checked() {
        let f = write(GOOD);
        let c = SidecarConfig::load(f.path(), []).unwrap();
        assert_eq!(c.bindings[0].batch, None);
        assert_eq!(c.bindings[0].slots(), 64);
        let f = write(&format!(
            "{GOOD}batch = {{ max_messages = 100, max_wait = \"5ms\" }}\n"
        ));
        let c = SidecarConfig::load(f.path(), []).unwrap();
        let batch = c.bindings[0].batch.unwrap();
        assert_eq!(batch.max_messages, 100);
        assert_eq!(batch.max_wait, Duration::from_millis(5));
        assert_eq!(c.bindings[0].slots(), 6400);
        let f = write(&format!("{GOOD}batch = {{}}\n"));
        let c = SidecarConfig::load(f.path(), []).unwrap();
        assert_eq!(
            c.bindings[0].batch,
            Some(BatchConfig {
                max_messages: 100,
                max_wait: Duration::from_millis(2)
            })
        );
        for (bad, says) in [
            ("batch = { max_messages = 0 }", "out of range 1..=1000"),
            ("batch = { max_messages = 1001 }", "out of range 1..=1000"),
            ("batch = { max_wait = \"11s\" }", "at most 10s"),
            ("batch = { max_mesages = 10 }", "max_mesages"),
        ] {
            let f = write(&format!("{GOOD}{bad}\n"));
            let e = SidecarConfig::load(f.path(), []).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(":14:"), "{bad}: {e}");
        }
        let f = write(&format!("{GOOD}batch = {{}}\n"));
        let env = [("MEND_BINDING_ORDERS_BATCH_MAX_MESSAGES", "7")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = SidecarConfig::load(f.path(), env).unwrap();
        assert_eq!(c.bindings[0].batch.unwrap().max_messages, 7);
    }

    #[test]
    fn env_overrides_top_level_nested_and_binding_keys() {
        let f = write(GOOD);
        let env = [
            ("MEND_NATS_URL", "nats://10.0.0.1:4222"),
            ("MEND_NATS_REPLICAS", "3"),
            ("MEND_NATS_TOKEN", "s3cret"),
            ("MEND_BINDING_ORDERS_CONCURRENCY", "8"),
            ("MEND_BINDING_ORDERS_TIMEOUT", "2s"),
            ("MEND_UNRELATED", "x"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = SidecarConfig::load(f.path(), env).unwrap();
        assert_eq!(c.nats_url, "nats://10.0.0.1:4222");
        assert_eq!(c.nats.replicas, 3);
        assert_eq!(c.nats.token.as_deref(), Some("s3cret"));
        assert_eq!(c.bindings[0].concurrency, 8);
        assert_eq!(c.bindings[0].timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let f = write(GOOD);
        let env = [(
            "MEND_BINDING_ORDERS_CONCURRENCY".to_string(),
            "lots".to_string(),
        )];
        let e = SidecarConfig::load(f.path(), env).unwrap_err().to_string();
        assert!(e.contains("MEND_BINDING_ORDERS_CONCURRENCY"), "{e}");
    }

    fn error_of(text: &str) -> String {
        let f = write(text);
        let e = SidecarConfig::load(f.path(), []).unwrap_err().to_string();
        assert!(
            e.contains(&f.path().display().to_string()),
            "no file name in {e}"
        );
        e
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = error_of(&GOOD.replace("concurrency = 64", "concurency = 64"));
        assert!(e.contains(":12:"), "{e}");
        assert!(e.contains("concurency"), "{e}");
    }

    #[test]
    fn bad_values_name_line_and_key() {
        for (from, to, line, key) in [
            (
                "timeout     = \"10s\"",
                "timeout     = \"ten\"",
                ":13:",
                "timeout",
            ),
            ("concurrency = 64", "concurrency = 0", ":12:", "concurrency"),
            (
                "concurrency = 64",
                "concurrency = \"x\"",
                ":12:",
                "concurrency",
            ),
            (
                "http://127.0.0.1:8080/events",
                "ftp://x/events",
                ":11:",
                "endpoint",
            ),
            ("[\"orders.>\"]", "[\"orders.>.x\"]", ":9:", "subjects"),
            (
                "{ header = \"Account-Id\" }",
                "{ json = \"account\" }",
                ":10:",
                "key",
            ),
            (
                "service  = \"orders\"",
                "service  = \"or.ders\"",
                ":2:",
                "service",
            ),
            (
                "listen   = \"127.0.0.1:9464\"",
                "listen   = \"nowhere\"",
                ":4:",
                "listen",
            ),
        ] {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{from}");
            let e = error_of(&text);
            assert!(e.contains(line) && e.contains(key), "{to}: {e}");
        }
    }

    #[test]
    fn syntax_error_is_located() {
        let e = error_of(&GOOD.replace("name        = \"orders\"", "name = orders"));
        assert!(e.contains(":7:"), "{e}");
    }

    #[test]
    fn cross_key_checks() {
        let e = error_of(&format!("{GOOD}ack_wait = \"5s\"\n"));
        assert!(e.contains("ack_wait"), "{e}");
        let e = error_of(&format!(
            "{GOOD}\n[[binding]]\nname = \"orders\"\nstream = \"X\"\nsubjects = [\"x\"]\nendpoint = \"http://a/\"\n"
        ));
        assert!(e.contains("unique"), "{e}");
        let e = error_of("service = \"orders\"\nbinding = []\n");
        assert!(e.contains("at least one"), "{e}");
        let f = write("");
        let e = SidecarConfig::load(f.path(), []).unwrap_err().to_string();
        assert!(e.contains("service"), "{e}");
    }

    #[test]
    fn lease_ttl_and_partition_defaults_file_and_env() {
        let f = write(GOOD);
        let c = SidecarConfig::load(f.path(), []).unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(30));
        assert_eq!(c.partition, 0);
        assert_eq!(c.bindings[0].partitions, 1);
        assert!(!c.bindings[0].is_partitioned());

        let text = GOOD.replace("listen ", "lease_ttl = \"3s\"\nlisten ");
        let f = write(&text);
        assert_eq!(
            SidecarConfig::load(f.path(), []).unwrap().lease_ttl,
            Duration::from_secs(3)
        );
        let env = [("MEND_LEASE_TTL", "2s"), ("MEND_PARTITION", "1")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let partitioned = GOOD
            .replace("[\"orders.>\"]", "[\"orders.{partition}.>\"]")
            .replace("concurrency = 64", "concurrency = 64\npartitions = 2");
        let f = write(&partitioned);
        let c = SidecarConfig::load(f.path(), env).unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(2));
        assert_eq!(c.partition, 1);
        let b = &c.bindings[0];
        assert_eq!(
            b.partition_consumer_name("orders", 1),
            "mend-orders-orders-p1"
        );
        assert_eq!(b.for_partition(1).subjects, ["orders.1.>"]);
        assert_eq!(b.partition_of("orders.1.k7.created"), Some(1));
        assert_eq!(b.partition_of("orders.0.k7"), Some(0));
        assert_eq!(b.partition_of("orders.2.k7"), None, "only 0 and 1 exist");
        assert_eq!(
            b.partition_of("orders.01.k7"),
            None,
            "not an index as the server writes it"
        );
        assert_eq!(b.partition_of("orders.1"), None);
        assert_eq!(b.partition_of("other.1.x"), None);

        // The flag wins over the file and the environment, and is checked like them.
        let f = write(&partitioned);
        let env = [("MEND_PARTITION".to_string(), "1".to_string())];
        let c = SidecarConfig::load_for(f.path(), env, Some(0)).unwrap();
        assert_eq!(c.partition, 0);
        let e = SidecarConfig::load_for(f.path(), [], Some(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("partition") && e.contains("--partition"), "{e}");
    }

    #[test]
    fn bad_lease_and_partition_values_are_located_or_named() {
        let e = error_of(&GOOD.replace("listen ", "lease_ttl = \"500ms\"\nlisten "));
        assert!(e.contains(":4:") && e.contains("lease_ttl"), "{e}");
        let e = error_of(&GOOD.replace("listen ", "lease_ttl = \"soon\"\nlisten "));
        assert!(e.contains(":4:") && e.contains("lease_ttl"), "{e}");
        let e = error_of(&GOOD.replace("listen ", "partition = -1\nlisten "));
        assert!(e.contains(":4:") && e.contains("partition"), "{e}");
        let e = error_of(&GOOD.replace("concurrency = 64", "partitions = 0"));
        assert!(e.contains(":12:") && e.contains("partitions"), "{e}");
        let e = error_of(&GOOD.replace("concurrency = 64", "partitions = 1025"));
        assert!(e.contains(":12:") && e.contains("partitions"), "{e}");

        let e = error_of(&GOOD.replace("concurrency = 64", "partitions = 2"));
        assert!(e.contains("subjects") && e.contains("{partition}"), "{e}");
        let e = error_of(
            &GOOD
                .replace("[\"orders.>\"]", "[\"orders.{partition}.{partition}\"]")
                .replace("concurrency = 64", "partitions = 2"),
        );
        assert!(e.contains("subjects") && e.contains("once"), "{e}");
        let e = error_of(
            &GOOD
                .replace("[\"orders.>\"]", "[\"orders.p{partition}.>\"]")
                .replace("concurrency = 64", "partitions = 2"),
        );
        assert!(e.contains("subjects") && e.contains("whole token"), "{e}");
        let e = error_of(
            &GOOD
                .replace("listen ", "partition = 2\nlisten ")
                .replace("[\"orders.>\"]", "[\"orders.{partition}.>\"]")
                .replace("concurrency = 64", "partitions = 2"),
        );
        assert!(e.contains("partition: 2 is not a partition"), "{e}");
        // An unpartitioned binding consumes partition 0 whatever the instance's index.
        let f = write(&GOOD.replace("listen ", "partition = 5\nlisten "));
        let c = SidecarConfig::load(f.path(), []).unwrap();
        assert_eq!(c.bindings[0].partition_for(c.partition), 0);
        assert_eq!(
            c.bindings[0].partition_consumer_name("orders", 0),
            "mend-orders-orders"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let e = SidecarConfig::load(Path::new("/nonexistent/sidecar.toml"), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/sidecar.toml"), "{e}");
    }
}
