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

/// Header values that are the same for every message of a binding, made once.
#[derive(Debug, Clone)]
pub struct BindingHeaders {
    source: HeaderValue,
    service: HeaderValue,
    /// `source` as text, for the entries of a batch.
    source_text: String,
}

impl BindingHeaders {
    pub fn new(service: &str, stream: &str) -> Self {
        let source_text = format!("urn:mend:{service}:{stream}");
        Self {
            source: encode(&source_text),
            service: encode(service),
            source_text,
        }
    }
}

/// The message with Mend-Id `id` as one entry of a bulk delivery (SPEC §4 "Bulk delivery"): a structured-mode
/// CloudEvent with the attributes of the binary-mode headers of [`app_request`] and the message's
/// W3C trace context, or `trace` instead when given (the entry's span, with traces on). Its other
/// NATS headers are not carried.
pub fn batch_entry(
    fixed: &BindingHeaders,
    id: &str,
    meta: &DeliveryMeta,
    nats: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    trace: Option<(&str, Option<&str>)>,
) -> String {
    // The three headers an entry carries, found in one pass over the message's headers.
    let [mut content_type, mut traceparent, mut tracestate] = [None::<&str>; 3];
    for (name, values) in nats.into_iter().flat_map(|h| h.iter()) {
        let name: &str = name.as_ref();
        let slot = if name.eq_ignore_ascii_case("content-type") {
            &mut content_type
        } else if name.eq_ignore_ascii_case(h::TRACEPARENT) {
            &mut traceparent
        } else if name.eq_ignore_ascii_case(h::TRACESTATE) {
            &mut tracestate
        } else {
            continue;
        };
        if slot.is_none() {
            *slot = values.first().map(|v| v.as_str());
        }
    }
    if let Some((parent, state)) = trace {
        (traceparent, tracestate) = (Some(parent), state);
    }
    let time = humantime::format_rfc3339_millis(meta.published).to_string();
    repair_rules::batch::entry(
        &repair_rules::batch::EntryMeta {
            id,
            source: &fixed.source_text,
            subject: &meta.subject,
            key: meta.key.as_ref().map(|k| k.as_str()),
            time: &time,
            attempt: meta.attempt,
            service: &meta.service,
            repaired_by: meta.repaired_by.as_deref(),
            resubmitted_by: meta.resubmitted_by.as_deref(),
            content_type,
            traceparent,
            tracestate,
        },
        payload,
    )
}

/// The headers of the app call for a message with `meta` and NATS headers `nats`.
pub fn app_request(
    fixed: &BindingHeaders,
    meta: &DeliveryMeta,
    nats: Option<&async_nats::HeaderMap>,
) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(32);
    let mut content_type = None;
    if let Some(nats) = nats {
        for (name, values) in nats.iter() {
            let name: &str = name.as_ref();
            if HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
                || starts_with_ignore_case(name, "mend-")
                || starts_with_ignore_case(name, "ce-")
            {
                continue;
            }
            let Ok(http_name) = HeaderName::from_bytes(name.as_bytes()) else {
                tracing::debug!(
                    header = name,
                    "NATS header is not a valid HTTP header name; not forwarded"
                );
                continue;
            };
            for value in values {
                match HeaderValue::from_str(value.as_str()) {
                    Ok(v) if http_name == CONTENT_TYPE => content_type = Some(v),
                    Ok(v) => {
                        out.append(http_name.clone(), v);
                    }
                    Err(_) => {
                        tracing::debug!(
                            header = name,
                            "NATS header value is not valid in HTTP; not forwarded"
                        );
                    }
                }
            }
        }
    }
    out.insert(
        CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/json")),
    );
    // Each value is made once and shared by its CloudEvents and Mend-* twin (a cheap clone).
    let id = encode(&meta.lineage.to_string());
    let subject = encode(&meta.subject);
    out.insert(
        HeaderName::from_static("ce-specversion"),
        HeaderValue::from_static("1.0"),
    );
    out.insert(HeaderName::from_static("ce-id"), id.clone());
    out.insert(HeaderName::from_static("ce-source"), fixed.source.clone());
    out.insert(HeaderName::from_static("ce-type"), subject.clone());
    out.insert(
        HeaderName::from_static("ce-time"),
        encode(&humantime::format_rfc3339_millis(meta.published).to_string()),
    );
    out.insert(HeaderName::from_static(h::http::MEND_ID), id);
    out.insert(
        HeaderName::from_static(h::http::MEND_SERVICE),
        fixed.service.clone(),
    );
    out.insert(
        HeaderName::from_static(h::http::MEND_ATTEMPT),
        HeaderValue::from(meta.attempt),
    );
    out.insert(
        HeaderName::from_static(h::http::MEND_ORIGINAL_SUBJECT),
        subject,
    );
    if let Some(key) = &meta.key {
        match h::key_header(key) {
            (h::MEND_KEY, _) => {
                let key = encode(key.as_str());
                out.insert(HeaderName::from_static("ce-subject"), key.clone());
                out.insert(HeaderName::from_static(h::http::MEND_KEY), key);
            }
            (_, token) => {
                out.insert(
                    HeaderName::from_static(h::http::MEND_KEY_TOKEN),
                    encode(&token),
                );
            }
        }
    }
    if let Some(rules) = &meta.repaired_by {
        out.insert(
            HeaderName::from_static(h::http::MEND_REPAIRED_BY),
            encode(rules),
        );
    }
    if let Some(user) = &meta.resubmitted_by {
        out.insert(
            HeaderName::from_static(h::http::MEND_RESUBMITTED_BY),
            encode(user),
        );
    }
    out
}

fn starts_with_ignore_case(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// A header value from text that may come from outside (a key, a subject), percent-encoded as the
/// CloudEvents HTTP binding requires (see [`h::encode_value`]).
fn encode(value: &str) -> HeaderValue {
    // Only printable ASCII is left, which is always a valid header value.
    HeaderValue::from_str(&h::encode_value(value)).unwrap_or(HeaderValue::from_static(""))
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
        let out = app_request(
            &BindingHeaders::new("orders", "ORDERS"),
            &meta(),
            Some(&nats),
        );
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
        let out = app_request(&BindingHeaders::new("orders", "ORDERS"), &meta(), None);
        assert_eq!(out["content-type"], "application/json");
    }
}
