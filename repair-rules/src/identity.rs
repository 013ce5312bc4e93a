//! Identities: the lineage id, message keys, and the subjects of the NATS layout (SPEC §2, §3).

use std::fmt;
use std::str::FromStr;

/// The lineage id of a message: the stream and sequence of the original. It stays the same through
/// every repair, resubmission and redelivery (`Mend-Id`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LineageId {
    pub stream: String,
    pub seq: u64,
}

impl LineageId {
    pub fn new(stream: impl Into<String>, seq: u64) -> Self {
        Self {
            stream: stream.into(),
            seq,
        }
    }

    /// The `Nats-Msg-Id` of a message mend publishes for this lineage: the same lineage, attempt and
    /// purpose always give the same id, so a publish repeated after a crash is de-duplicated.
    pub fn msg_id(&self, attempt: u32, purpose: &str) -> String {
        format!("{self}:{attempt}:{purpose}")
    }
}

impl fmt::Display for LineageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.stream, self.seq)
    }
}

/// Why a text is not a lineage id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseLineageError(pub String);

impl fmt::Display for ParseLineageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a lineage id of the form <stream>:<sequence>",
            self.0
        )
    }
}

impl std::error::Error for ParseLineageError {}

impl FromStr for LineageId {
    type Err = ParseLineageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseLineageError(s.to_owned());
        let (stream, seq) = s.rsplit_once(':').ok_or_else(bad)?;
        if stream.is_empty() {
            return Err(bad());
        }
        let seq = seq.parse::<u64>().map_err(|_| bad())?;
        Ok(Self::new(stream, seq))
    }
}

/// The business key of a message (an account, an order): messages of one key keep their order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageKey(pub String);

impl MessageKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Keys up to this many bytes are spelled out in their token; longer ones get a digest (SPEC §8.5),
/// which keeps hold subjects and KV keys far below nats-server's 4 KiB control line.
pub const MAX_SPELLED_KEY_BYTES: usize = 256;

impl MessageKey {
    /// The key's `<keytoken>` (SPEC §2): one subject token and a valid KV key for any key, the empty
    /// one included, at most 344 characters.
    /// - A key of up to [`MAX_SPELLED_KEY_BYTES`] bytes: `K` followed by its UTF-8 bytes in
    ///   unpadded base64url (reversible: [`MessageKey::from_token`]).
    /// - A longer key: `H` followed by the SHA-256 of its bytes in unpadded base64url. The key itself
    ///   travels in `Mend-Key` and in the hold entry.
    pub fn token(&self) -> String {
        use base64::Engine as _;
        use sha2::Digest as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        if self.0.len() > MAX_SPELLED_KEY_BYTES {
            let mut token = String::with_capacity(44);
            token.push('H');
            b64.encode_string(sha2::Sha256::digest(self.0.as_bytes()), &mut token);
            return token;
        }
        let mut token = String::with_capacity(1 + self.0.len().div_ceil(3) * 4);
        token.push('K');
        b64.encode_string(self.0.as_bytes(), &mut token);
        token
    }

    /// The key a spelled-out [`MessageKey::token`] stands for; `None` for a digest token or text
    /// that is not a token.
    pub fn from_token(token: &str) -> Option<Self> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.strip_prefix('K')?)
            .ok()?;
        String::from_utf8(bytes).ok().map(MessageKey)
    }
}

impl fmt::Display for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Subjects of the NATS layout (SPEC §2). `service` must be a single subject token.
/// The streams mend creates (SPEC §2); each takes the subjects `mend.<name>.>`.
pub mod streams {
    /// Failure envelopes from sidecars to processors (work queue).
    pub const FAILED: &str = "MEND_FAILED";
    /// Repaired and resubmitted messages back to their service's sidecar (work queue).
    pub const RETRY: &str = "MEND_RETRY";
    /// Holding queues of held keys, one subject per key.
    pub const HOLD: &str = "MEND_HOLD";
    /// Failures waiting for a person, read by the dashboard (work queue).
    pub const PARKED: &str = "MEND_PARKED";
    /// Commands from the dashboard to a service's sidecars (work queue).
    pub const CONTROL: &str = "MEND_CONTROL";
    /// Announcements (limits, kept for `events_max_age`).
    pub const EVENTS: &str = "MEND_EVENTS";
}

/// The key-value buckets and the object store mend creates (SPEC §2).
pub mod buckets {
    /// One entry per held key: the hold's state.
    pub const HOLDS: &str = "mend_holds";
    /// One entry per (service, binding, partition): which sidecar consumes it.
    pub const LEASES: &str = "mend_leases";
    /// Payloads too large to copy where mend must (object store).
    pub const PAYLOADS: &str = "mend_payloads";
}

/// The durable consumers mend creates on its own streams.
pub mod consumers {
    /// The processors' shared consumer of MEND_FAILED.
    pub const PROCESSOR: &str = "mend-processor";
    /// The dashboard's consumer of MEND_PARKED.
    pub const DASHBOARD_PARKED: &str = "mend-dashboard-parked";
    /// The dashboard's consumer of MEND_EVENTS.
    pub const DASHBOARD_EVENTS: &str = "mend-dashboard-events";

    /// A sidecar's consumer of an app stream: binding `binding` of `service`.
    pub fn binding(service: &str, binding: &str) -> String {
        format!("mend-{service}-{binding}")
    }
    /// The consumer of partition `partition` of a partitioned binding.
    pub fn binding_partition(service: &str, binding: &str, partition: u32) -> String {
        format!("mend-{service}-{binding}-p{partition}")
    }
    /// The consumer of a service's retries every instance shares.
    pub fn retry(service: &str) -> String {
        format!("mend-{service}-retry")
    }
    /// The consumer of a service's commands every instance shares.
    pub fn control(service: &str) -> String {
        format!("mend-{service}-control")
    }
}

pub mod subjects {
    /// Where a sidecar delegates failures of `service`.
    pub fn failed(service: &str) -> String {
        format!("mend.failed.{service}")
    }
    /// Where repaired and resubmitted messages of `service` go back to its sidecar.
    pub fn retry(service: &str) -> String {
        format!("mend.retry.{service}")
    }
    /// Where unrepairable failures of `service` wait for a person.
    pub fn parked(service: &str) -> String {
        format!("mend.parked.{service}")
    }
    /// Commands from the dashboard to the sidecar of `service`.
    pub fn control(service: &str) -> String {
        format!("mend.control.{service}")
    }
    /// The holding queue of one key of `service` (`token` from [`super::MessageKey::token`]).
    pub fn hold(service: &str, token: &str) -> String {
        format!("mend.hold.{service}.{token}")
    }
    /// The key of a hold in the KV bucket `mend_holds`.
    pub fn hold_entry(service: &str, token: &str) -> String {
        format!("{service}.{token}")
    }
    /// Announcements of `kind` about `service`.
    pub fn event(service: &str, kind: &str) -> String {
        format!("mend.events.{service}.{kind}")
    }
}

/// Whether `token` can stand as one NATS subject token (a service or binding name).
pub fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineage_round_trips_and_rejects_garbage() {
        let id: LineageId = "ORDERS:1042".parse().unwrap();
        assert_eq!(id, LineageId::new("ORDERS", 1042));
        assert_eq!(id.to_string(), "ORDERS:1042");
        assert_eq!(id.msg_id(1, "failed"), "ORDERS:1042:1:failed");
        for bad in ["", "ORDERS", ":12", "ORDERS:x", "ORDERS:-1"] {
            assert!(bad.parse::<LineageId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn key_tokens_are_subject_and_kv_safe_and_reversible() {
        for key in [
            "acct-7",
            "",
            "a.b c*>",
            "ключ",
            "line\nbreak",
            "K",
            "%2F/==",
        ] {
            let k = MessageKey(key.to_owned());
            let token = k.token();
            assert!(is_subject_token(&token), "{token}");
            assert_eq!(MessageKey::from_token(&token), Some(k), "{key}");
        }
        assert_eq!(MessageKey("acct-7".into()).token(), "KYWNjdC03");
        assert_eq!(
            subjects::hold("orders", "KYWNjdC03"),
            "mend.hold.orders.KYWNjdC03"
        );
        for bad in ["", "YWNj", "K!", "K_w"] {
            assert_eq!(MessageKey::from_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn long_keys_get_short_digest_tokens() {
        let at_limit = MessageKey("k".repeat(MAX_SPELLED_KEY_BYTES));
        assert!(at_limit.token().starts_with('K'));
        assert_eq!(MessageKey::from_token(&at_limit.token()), Some(at_limit));
        for len in [MAX_SPELLED_KEY_BYTES + 1, 4096, 64 * 1024] {
            let key = MessageKey("é".repeat(len / 2 + 1));
            let token = key.token();
            assert!(token.starts_with('H'), "{token}");
            assert_eq!(token.len(), 44);
            assert!(is_subject_token(&token), "{token}");
            assert_eq!(MessageKey::from_token(&token), None);
            let other = MessageKey(format!("{}x", key.0));
            assert_ne!(other.token(), token);
            assert_eq!(key.token(), token, "deterministic");
        }
    }

    #[test]
    fn subject_tokens() {
        assert!(is_subject_token("orders-v2_eu"));
        for bad in ["", "a.b", "a b", "a*", "a>", "ü"] {
            assert!(!is_subject_token(bad), "{bad}");
        }
    }
}
