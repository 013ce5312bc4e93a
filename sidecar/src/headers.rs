//! The HTTP headers of an app call (SPEC §4): the message's own NATS headers, `Content-Type`,
//! CloudEvents 1.0 binary-mode headers and the Mend-* headers.

use std::time::SystemTime;

use repair_rules::headers as h;
use repair_rules::{LineageId, MessageKey};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

/// What the sidecar knows about one delivery, beyond the payload.
#[derive(Debug, Clone)]
pub struct DeliveryMeta {
    pub service: String,
    pub lineage: LineageId,
    pub key: Option<MessageKey>,
    pub attempt: u32,
    pub subject: String,
    pub published: SystemTime,
    pub repaired_by: Option<String>,
    pub resubmitted_by: Option<String>,
}

/// Headers that describe a connection, not a message: never forwarded from NATS.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The headers of the app call for a message with `meta` and NATS headers `nats`.
pub fn app_request(meta: &DeliveryMeta, nats: Option<&async_nats::HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(16);
    let mut content_type = None;
    if let Some(nats) = nats {
        for (name, values) in nats.iter() {
            let lower = name.to_string().to_ascii_lowercase();
            if HOP_BY_HOP.contains(&lower.as_str())
                || lower.starts_with("mend-")
                || lower.starts_with("ce-")
            {
                continue;
            }
            let Ok(http_name) = HeaderName::from_bytes(lower.as_bytes()) else {
                tracing::debug!(header = %name, "NATS header is not a valid HTTP header name; not forwarded");
                continue;
            };
            for value in values {
                match HeaderValue::from_str(value.as_str()) {
                    Ok(v) if http_name == CONTENT_TYPE => content_type = Some(v),
                    Ok(v) => {
                        out.append(http_name.clone(), v);
                    }
                    Err(_) => {
                        tracing::debug!(header = %name, "NATS header value is not valid in HTTP; not forwarded");
                    }
                }
            }
        }
    }
    out.insert(
        CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/json")),
    );
    let id = meta.lineage.to_string();
    put(&mut out, "ce-specversion", "1.0");
    put(&mut out, "ce-id", &id);
    put(
        &mut out,
        "ce-source",
        &format!("urn:mend:{}:{}", meta.service, meta.lineage.stream),
    );
    put(&mut out, "ce-type", &meta.subject);
    put(
        &mut out,
        "ce-time",
        &humantime::format_rfc3339_millis(meta.published).to_string(),
    );
    put(&mut out, h::MEND_ID, &id);
    put(&mut out, h::MEND_SERVICE, &meta.service);
    put(&mut out, h::MEND_ATTEMPT, &meta.attempt.to_string());
    put(&mut out, h::MEND_ORIGINAL_SUBJECT, &meta.subject);
    if let Some(key) = &meta.key {
        put(&mut out, "ce-subject", key.as_str());
        put(&mut out, h::MEND_KEY, key.as_str());
    }
    if let Some(rules) = &meta.repaired_by {
        put(&mut out, h::MEND_REPAIRED_BY, rules);
    }
    if let Some(user) = &meta.resubmitted_by {
        put(&mut out, h::MEND_RESUBMITTED_BY, user);
    }
    out
}

/// Sets a header whose value may come from outside (a key, a subject), percent-encoded as the
/// CloudEvents HTTP binding requires: everything outside printable ASCII, plus `"` and `%`.
fn put(map: &mut HeaderMap, name: &'static str, value: &str) {
    let needs = |b: u8| !(0x21..=0x7e).contains(&b) || b == b'"' || b == b'%';
    let value = if value.bytes().any(needs) {
        let mut encoded = String::with_capacity(value.len() + 8);
        for b in value.bytes() {
            if needs(b) {
                encoded.push_str(&format!("%{b:02X}"));
            } else {
                encoded.push(b as char);
            }
        }
        encoded
    } else {
        value.to_owned()
    };
    // Only printable ASCII is left, which is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&value) {
        map.insert(HeaderName::from_static(lower_static(name)), value);
    }
}

/// Header names are declared in their canonical case; HTTP/1 maps want them lower-case.
fn lower_static(name: &'static str) -> &'static str {
    match name {
        h::MEND_ID => "mend-id",
        h::MEND_KEY => "mend-key",
        h::MEND_SERVICE => "mend-service",
        h::MEND_ATTEMPT => "mend-attempt",
        h::MEND_REPAIRED_BY => "mend-repaired-by",
        h::MEND_RESUBMITTED_BY => "mend-resubmitted-by",
        h::MEND_ORIGINAL_SUBJECT => "mend-original-subject",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> DeliveryMeta {
        DeliveryMeta {
            service: "orders".into(),
            lineage: LineageId::new("ORDERS", 7),
            key: Some(MessageKey("acct-ü".into())),
            attempt: 1,
            subject: "orders.created".into(),
            published: SystemTime::UNIX_EPOCH,
            repaired_by: None,
            resubmitted_by: None,
        }
    }

    #[test]
    fn cloudevents_and_mend_headers() {
        let mut nats = async_nats::HeaderMap::new();
        nats.insert("Account-Id", "acct-7");
        nats.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        nats.insert("Mend-Id", "FORGED:1");
        nats.insert("Content-Length", "99");
        nats.insert("Content-Type", "text/plain");
        let out = app_request(&meta(), Some(&nats));
        assert_eq!(out["ce-specversion"], "1.0");
        assert_eq!(out["ce-id"], "ORDERS:7");
        assert_eq!(out["ce-type"], "orders.created");
        assert_eq!(out["ce-time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(out["ce-source"], "urn:mend:orders:ORDERS");
        assert_eq!(out["mend-id"], "ORDERS:7");
        assert_eq!(out["mend-attempt"], "1");
        assert_eq!(out["mend-service"], "orders");
        assert_eq!(out["mend-key"], "acct-%C3%BC");
        assert_eq!(out["account-id"], "acct-7");
        assert_eq!(out["content-type"], "text/plain");
        assert!(out["traceparent"].to_str().unwrap().starts_with("00-0af7"));
        assert!(!out.contains_key("content-length"));
        assert_eq!(out.get_all("mend-id").iter().count(), 1);
    }

    #[test]
    fn json_is_the_default_content_type() {
        let out = app_request(&meta(), None);
        assert_eq!(out["content-type"], "application/json");
    }
}
