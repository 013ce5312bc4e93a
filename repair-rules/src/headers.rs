//! Header names of the mend contract (SPEC §3, §4), declared once so no role spells them twice.

/// The lineage id `<stream>:<sequence>` of the original message; the app's idempotency key.
pub const MEND_ID: &str = "Mend-Id";
/// The business key of the message, when its binding has one (percent-encoded, see
/// [`encode_value`]), if it fits in [`MAX_KEY_HEADER_BYTES`]; a longer key is named by
/// [`MEND_KEY_TOKEN`] instead.
pub const MEND_KEY: &str = "Mend-Key";
/// The key token (`H` + SHA-256) of a key too long for [`MEND_KEY`]: JetStream refuses header blocks
/// over 64 KiB and many HTTP servers headers over a few KiB. The key itself travels in the failure
/// envelope, the hold entry and the message.
pub const MEND_KEY_TOKEN: &str = "Mend-Key-Token";
/// The longest `Mend-Key` value (after percent-encoding).
pub const MAX_KEY_HEADER_BYTES: usize = 4096;

/// How a key is named in headers: `(MEND_KEY, encoded key)` when it fits, else
/// `(MEND_KEY_TOKEN, its digest token)`.
pub fn key_header(key: &crate::MessageKey) -> (&'static str, String) {
    let encoded = encode_value(key.as_str());
    if encoded.len() <= MAX_KEY_HEADER_BYTES {
        (MEND_KEY, encoded.into_owned())
    } else {
        (MEND_KEY_TOKEN, key.token())
    }
}
/// The service whose sidecar delivered the message.
pub const MEND_SERVICE: &str = "Mend-Service";
/// How many deliveries of this lineage the app has seen, counting this one (1 for the original).
pub const MEND_ATTEMPT: &str = "Mend-Attempt";
/// Rule names that repaired this lineage, comma-separated.
pub const MEND_REPAIRED_BY: &str = "Mend-Repaired-By";
/// The dashboard user who resubmitted this lineage.
pub const MEND_RESUBMITTED_BY: &str = "Mend-Resubmitted-By";
/// The subject the original message was published on.
pub const MEND_ORIGINAL_SUBJECT: &str = "Mend-Original-Subject";
/// On a copy in a hold queue: the `since` of the hold it was appended to (see
/// `holds::release_step`). Never sent to the app.
/// A lineage's history on a retry: the envelope's `history` as JSON.
pub const MEND_HISTORY: &str = "Mend-History";
/// On a hold copy or a retry whose payload is kept in the object store `mend_payloads`: the
/// object's name (the message body is then empty).
pub const MEND_PAYLOAD_OBJECT: &str = "Mend-Payload-Object";
/// On a hold queue copy of a message whose own header block could not be read: that block, base64.
pub const MEND_UNREADABLE_HEADERS: &str = "Mend-Unreadable-Headers";
/// On an envelope's kept headers when some were left out to fit: the names left out (a `Mend-`
/// header, so a resubmission does not send it on).
pub const MEND_OMITTED_HEADERS: &str = "Mend-Omitted-Headers";
pub const MEND_HOLD_SINCE: &str = "Mend-Hold-Since";
/// The app's instruction on an answer: `drop` or `park`.
pub const MEND_ACTION: &str = "Mend-Action";
/// JetStream's de-duplication id; every message mend publishes carries one.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context, propagated from the message to the app call and onward.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace context vendor state.
pub const TRACESTATE: &str = "tracestate";

/// A header value from text that may come from outside (a key from a payload, a subject): everything
/// outside printable ASCII, plus `"` and `%`, is percent-encoded, as the CloudEvents HTTP binding
/// requires. Text without such bytes is returned as it is. Used for `Mend-Key` on NATS and HTTP.
pub fn encode_value(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |b: u8| !(0x21..=0x7e).contains(&b) || b == b'"' || b == b'%';
    if !text.bytes().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut encoded = String::with_capacity(text.len() + 8);
    for b in text.bytes() {
        if needs(b) {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            encoded.push('%');
            encoded.push(HEX[usize::from(b >> 4)] as char);
            encoded.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            encoded.push(b as char);
        }
    }
    std::borrow::Cow::Owned(encoded)
}

/// The text of a value written by [`encode_value`]. A `%` not followed by two hex digits stays as it
/// is; bytes that do not form UTF-8 become U+FFFD.
pub fn decode_value(value: &str) -> String {
    let bytes = value.as_bytes();
    if !bytes.contains(&b'%') {
        return value.to_owned();
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether an app's header travels on what mend sends back for a lineage (a retry, a resubmission,
/// a hold queue copy): every header but mend's own (`Mend-*`, written afresh) and the server's
/// (`Nats-*`).
pub fn is_carried(name: &str) -> bool {
    let starts = |prefix: &str| {
        name.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    !starts("mend-") && !starts("nats-")
}

/// The lineage headers of a message mend sends back to a service: a retry (the processor), a
/// resubmission (the dashboard), a hold queue copy (the sidecar). Written by [`Lineage::write`] and
/// read back by [`ReadLineage::read`], the only two places that spell them.
#[derive(Debug, Clone, Copy)]
pub struct Lineage<'a> {
    /// `Mend-Id`: the lineage id `<stream>:<sequence>`.
    pub id: &'a str,
    /// `Mend-Service`.
    pub service: &'a str,
    /// `Mend-Attempt`: the attempt this delivery will be.
    pub attempt: u32,
    /// `Mend-Original-Subject`: the subject the original was published on.
    pub original_subject: &'a str,
    /// `Mend-Key` (or `Mend-Key-Token` for a key too long for a header, see [`key_header`]).
    pub key: Option<&'a crate::MessageKey>,
    /// `Mend-Repaired-By`: rule names, comma-separated.
    pub repaired_by: Option<&'a str>,
    /// `Mend-Resubmitted-By`: who resubmitted it, as sent (percent-encoded, see [`encode_value`]).
    pub resubmitted_by: Option<&'a str>,
    /// `Mend-Hold-Since`: on a hold queue copy, the `since` of the hold it joined.
    pub hold_since: Option<&'a str>,
    /// `Mend-History`: the lineage's history as JSON (bounded by whoever wrote it).
    pub history: Option<&'a str>,
}

impl Lineage<'_> {
    /// Hands each header to `put` (name, value); a header map's insert, say.
    pub fn write(&self, mut put: impl FnMut(&'static str, &str)) {
        put(MEND_ID, self.id);
        put(MEND_SERVICE, self.service);
        put(MEND_ATTEMPT, &self.attempt.to_string());
        put(MEND_ORIGINAL_SUBJECT, self.original_subject);
        if let Some(key) = self.key {
            let (name, value) = key_header(key);
            put(name, &value);
        }
        if let Some(by) = self.repaired_by {
            put(MEND_REPAIRED_BY, by);
        }
        if let Some(by) = self.resubmitted_by {
            put(MEND_RESUBMITTED_BY, by);
        }
        if let Some(since) = self.hold_since {
            put(MEND_HOLD_SINCE, since);
        }
        if let Some(history) = self.history {
            put(MEND_HISTORY, history);
        }
    }
}

/// The lineage headers found on a message, as [`Lineage::write`] wrote them; each is `None` when
/// missing or (for the id and the attempt) unreadable, and the reader decides what stands in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadLineage {
    pub id: Option<crate::LineageId>,
    pub service: Option<String>,
    pub attempt: Option<u32>,
    pub original_subject: Option<String>,
    /// The key from `Mend-Key`, decoded.
    pub key: Option<crate::MessageKey>,
    /// `Mend-Key-Token`: names a key too long for a header; the reader finds the key itself.
    pub key_token: Option<String>,
    pub repaired_by: Option<String>,
    pub resubmitted_by: Option<String>,
    pub hold_since: Option<String>,
    /// The history's JSON text, unparsed (see [`crate::envelope::read_history`]).
    pub history: Option<String>,
}

impl ReadLineage {
    /// Reads the lineage headers through `get` (a header map's lookup by name).
    pub fn read<'h>(get: impl Fn(&str) -> Option<&'h str>) -> Self {
        let text = |name: &str| get(name).map(str::to_owned);
        Self {
            id: get(MEND_ID).and_then(|id| id.parse().ok()),
            service: text(MEND_SERVICE),
            attempt: get(MEND_ATTEMPT).and_then(|a| a.parse().ok()),
            original_subject: text(MEND_ORIGINAL_SUBJECT),
            key: get(MEND_KEY).map(|k| crate::MessageKey(decode_value(k))),
            key_token: text(MEND_KEY_TOKEN),
            repaired_by: text(MEND_REPAIRED_BY),
            resubmitted_by: text(MEND_RESUBMITTED_BY),
            hold_since: text(MEND_HOLD_SINCE),
            history: text(MEND_HISTORY),
        }
    }
}

/// The same headers on HTTP (SPEC §4), as the lowercase names an HTTP/2 or header-map library
/// requires; each is its NATS name lowercased (a test checks it).
pub mod http {
    pub const MEND_ID: &str = "mend-id";
    pub const MEND_KEY: &str = "mend-key";
    pub const MEND_KEY_TOKEN: &str = "mend-key-token";
    pub const MEND_SERVICE: &str = "mend-service";
    pub const MEND_ATTEMPT: &str = "mend-attempt";
    pub const MEND_REPAIRED_BY: &str = "mend-repaired-by";
    pub const MEND_RESUBMITTED_BY: &str = "mend-resubmitted-by";
    pub const MEND_ORIGINAL_SUBJECT: &str = "mend-original-subject";
    pub const MEND_ACTION: &str = "mend-action";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_names_are_the_nats_names_lowercased() {
        for (nats, http) in [
            (MEND_ID, http::MEND_ID),
            (MEND_KEY, http::MEND_KEY),
            (MEND_KEY_TOKEN, http::MEND_KEY_TOKEN),
            (MEND_SERVICE, http::MEND_SERVICE),
            (MEND_ATTEMPT, http::MEND_ATTEMPT),
            (MEND_REPAIRED_BY, http::MEND_REPAIRED_BY),
            (MEND_RESUBMITTED_BY, http::MEND_RESUBMITTED_BY),
            (MEND_ORIGINAL_SUBJECT, http::MEND_ORIGINAL_SUBJECT),
            (MEND_ACTION, http::MEND_ACTION),
        ] {
            assert_eq!(nats.to_ascii_lowercase(), http);
        }
    }

    #[test]
    fn lineage_headers_round_trip() {
        let key = crate::MessageKey("acct 7%".into());
        let long = crate::MessageKey("k".repeat(5000));
        for key in [None, Some(&key), Some(&long)] {
            let written = Lineage {
                id: "ORDERS:42",
                service: "orders",
                attempt: 3,
                original_subject: "orders.created",
                key,
                repaired_by: Some("amount-as-number,trim"),
                resubmitted_by: Some("ana%20b"),
                hold_since: Some("2026-12-04T10:00:00.000001Z"),
                history: Some(r#"[{"at":"t","what":"repaired","by":"rule:r"}]"#),
            };
            let mut map = std::collections::HashMap::new();
            written.write(|name, value| {
                assert!(map.insert(name, value.to_owned()).is_none(), "{name} twice");
            });
            let read = ReadLineage::read(|name| map.get(name).map(String::as_str));
            assert_eq!(read.id, Some(crate::LineageId::new("ORDERS", 42)));
            assert_eq!(read.service.as_deref(), Some("orders"));
            assert_eq!(read.attempt, Some(3));
            assert_eq!(read.original_subject.as_deref(), Some("orders.created"));
            match key {
                Some(k) if k.as_str().len() > MAX_KEY_HEADER_BYTES => {
                    assert_eq!(read.key, None);
                    assert_eq!(read.key_token, Some(k.token()));
                }
                _ => {
                    assert_eq!(read.key.as_ref(), key);
                    assert_eq!(read.key_token, None);
                }
            }
            assert_eq!(read.repaired_by.as_deref(), written.repaired_by);
            assert_eq!(read.resubmitted_by.as_deref(), written.resubmitted_by);
            assert_eq!(read.hold_since.as_deref(), written.hold_since);
            assert_eq!(read.history.as_deref(), written.history);
        }
        let none = ReadLineage::read(|_| None);
        assert_eq!(none, ReadLineage::default());
        let bad = ReadLineage::read(|name| match name {
            MEND_ID => Some("not a lineage"),
            MEND_ATTEMPT => Some("-1"),
            _ => None,
        });
        assert_eq!((bad.id, bad.attempt), (None, None));
    }

    #[test]
    fn carried_headers_leave_out_mend_and_nats_ones() {
        for name in ["traceparent", "Content-Type", "X-Mend", "mend", "nats"] {
            assert!(is_carried(name), "{name}");
        }
        for name in [
            "Mend-Id",
            "MEND-KEY",
            "mend-history",
            "Nats-Msg-Id",
            "nats-expected-stream",
        ] {
            assert!(!is_carried(name), "{name}");
        }
    }

    #[test]
    fn values_round_trip_and_plain_text_is_untouched() {
        for text in [
            "acct-7",
            "a b",
            "ключ",
            "50%",
            "line\r\nbreak",
            "\"q\"",
            "",
            "%zz",
        ] {
            let encoded = encode_value(text);
            assert!(
                encoded.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "{encoded}"
            );
            assert_eq!(decode_value(&encoded), text);
        }
        assert!(matches!(
            encode_value("acct-7"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(encode_value("a b\n"), "a%20b%0A");
        assert_eq!(decode_value("100%"), "100%");
    }
}
