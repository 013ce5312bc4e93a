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

#[cfg(test)]
mod tests {
    use super::*;

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
