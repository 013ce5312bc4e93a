//! Bulk delivery's wire contract (SPEC §4 "Bulk delivery"): the entries of a CloudEvents JSON batch
//! (`application/cloudevents-batch+json`, structured-mode events) and the app's answer, one status
//! per entry.

use std::borrow::Cow;
use std::fmt::Write as _;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::envelope::{ErrorKind, FailureError};

/// The request's `Content-Type`.
pub const CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// What one entry says about its message, beyond the payload.
#[derive(Debug, Clone, Copy)]
pub struct EntryMeta<'a> {
    /// `Mend-Id`.
    pub id: &'a str,
    /// `urn:mend:<service>:<stream>`, as `ce-source` in single delivery.
    pub source: &'a str,
    /// The NATS subject.
    pub subject: &'a str,
    /// The key, when the binding has one.
    pub key: Option<&'a str>,
    /// RFC 3339 publish time.
    pub time: &'a str,
    pub attempt: u32,
    pub service: &'a str,
    pub repaired_by: Option<&'a str>,
    pub resubmitted_by: Option<&'a str>,
    /// The message's `Content-Type`, if it had one.
    pub content_type: Option<&'a str>,
    /// W3C trace context of the message, if it had one.
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

/// One structured-mode CloudEvent as JSON: `data` holds a JSON payload as it is (when the message's
/// content type is JSON or absent and the payload parses), `data_base64` any other.
pub fn entry(meta: &EntryMeta<'_>, payload: &[u8]) -> String {
    let mut out = String::with_capacity(payload.len() + 320);
    out.push_str("{\"specversion\":\"1.0\",\"id\":");
    push_str(&mut out, meta.id);
    out.push_str(",\"source\":");
    push_str(&mut out, meta.source);
    out.push_str(",\"type\":");
    push_str(&mut out, meta.subject);
    if let Some(key) = meta.key {
        out.push_str(",\"subject\":");
        push_str(&mut out, key);
    }
    out.push_str(",\"time\":");
    push_str(&mut out, meta.time);
    let _ = write!(out, ",\"mendattempt\":{}", meta.attempt);
    out.push_str(",\"mendservice\":");
    push_str(&mut out, meta.service);
    for (name, value) in [
        ("mendrepairedby", meta.repaired_by),
        ("mendresubmittedby", meta.resubmitted_by),
        ("traceparent", meta.traceparent),
        ("tracestate", meta.tracestate),
    ] {
        if let Some(value) = value {
            let _ = write!(out, ",\"{name}\":");
            push_str(&mut out, value);
        }
    }
    let json_type = meta.content_type.is_none_or(is_json);
    let json = if json_type {
        std::str::from_utf8(payload)
            .ok()
            .filter(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
    } else {
        None
    };
    out.push_str(",\"datacontenttype\":");
    push_str(&mut out, meta.content_type.unwrap_or("application/json"));
    match json {
        Some(raw) => {
            out.push_str(",\"data\":");
            out.push_str(raw);
        }
        None => {
            out.push_str(",\"data_base64\":\"");
            base64::engine::general_purpose::STANDARD.encode_string(payload, &mut out);
            out.push('"');
        }
    }
    out.push('}');
    out
}

/// The request body: the entries as one JSON array.
pub fn body<'a>(entries: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(b'[');
    for (i, e) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e.as_bytes());
    }
    out.push(b']');
    out
}

/// Appends `s` as a JSON string. Nearly every value (ids, subjects, keys, times) needs no escape:
/// it is copied between quotes as it is, as serde_json writes it (which escapes only `"`, `\\` and
/// control characters); only the rest goes through serde_json, into a string of its own.
fn push_str(out: &mut String, s: &str) {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // Writing a `str` as a JSON string cannot fail.
        if let Ok(quoted) = serde_json::to_string(s) {
            out.push_str(&quoted);
        }
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

/// `application/json`, `text/json` and `…+json`, parameters ignored.
fn is_json(content_type: &str) -> bool {
    let mime = content_type.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
        || mime.eq_ignore_ascii_case("text/json")
        || mime.len() > 5 && mime[mime.len() - 5..].eq_ignore_ascii_case("+json")
}

/// What the app made of one entry.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryStatus {
    /// Processed (as a 2xx).
    Success,
    /// Transient: retried with the same backoff, circuit and exhaustion rules as a single message.
    Retry,
    /// As `Mend-Action: drop`.
    Drop,
    /// A message error, with the entry's RFC 9457 problem object when it had one.
    Fail(Box<FailureError>),
    /// A status this contract does not know (the entry is retried, as a malformed answer is).
    Unknown(String),
}

/// Reads the app's 2xx answer `{"statuses": [{"id", "status", "problem"?}]}` into `(id, status)`
/// pairs, in the answer's order. An `Err` says what is wrong with a malformed answer.
pub fn statuses(body: &[u8]) -> Result<Vec<(Cow<'_, str>, EntryStatus)>, String> {
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        statuses: Vec<Status<'a>>,
    }
    #[derive(Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        id: Cow<'a, str>,
        #[serde(borrow)]
        status: Cow<'a, str>,
        #[serde(default)]
        problem: Option<Value>,
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        let start = crate::problem::cut_text(body, 120);
        format!("the answer is not {{\"statuses\": [...]}} ({e}); it began {start:?}")
    })?;
    Ok(answer
        .statuses
        .into_iter()
        .map(|s| {
            let is = |name: &str| s.status.eq_ignore_ascii_case(name);
            let status = if is("SUCCESS") {
                EntryStatus::Success
            } else if is("RETRY") {
                EntryStatus::Retry
            } else if is("DROP") {
                EntryStatus::Drop
            } else if is("FAIL") {
                EntryStatus::Fail(Box::new(failure(s.problem.as_ref())))
            } else {
                EntryStatus::Unknown(crate::problem::cut_text(s.status.as_bytes(), 64))
            };
            (s.id, status)
        })
        .collect())
}

/// The error record of a FAIL entry: its problem object read as a problem+json answer would be;
/// `status` is the object's `status` member when that is an HTTP error status.
fn failure(problem: Option<&Value>) -> FailureError {
    let status = problem
        .and_then(|p| p.get("status"))
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (400..=599).contains(s));
    match problem {
        Some(p @ Value::Object(_)) => {
            let bytes = serde_json::to_vec(p).unwrap_or_default();
            let mut error =
                crate::problem::from_answer(0, Some("application/problem+json"), &bytes);
            error.status = status;
            error
        }
        Some(other) => {
            let mut error = FailureError::bare(ErrorKind::Message, status);
            error.body = Some(crate::problem::cut_text(
                other.to_string().as_bytes(),
                crate::problem::BODY_LIMIT,
            ));
            error
        }
        None => FailureError::bare(ErrorKind::Message, status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta<'a>() -> EntryMeta<'a> {
        EntryMeta {
            id: "ORDERS:7",
            source: "urn:mend:orders:ORDERS",
            subject: "orders.created",
            key: Some("acct-\"1\""),
            time: "2026-12-05T10:00:00.000Z",
            attempt: 2,
            service: "orders",
            repaired_by: Some("amount-as-number"),
            resubmitted_by: None,
            content_type: None,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            tracestate: None,
        }
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "plain",
            "k\"1\"",
            "back\\slash",
            "tab\there",
            "nul\0",
            "bell\u{7}",
            "del\u{7f}",
            "ünïcødé ✓",
            "line\nbreak",
            "cr\r",
            "a/b",
            "\u{2028}",
        ] {
            let mut out = String::new();
            push_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s);
        }
    }

    #[test]
    fn json_payload_is_data_and_attributes_are_set() {
        let e = entry(&meta(), br#"{"amount": "12.5"}"#);
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "ORDERS:7");
        assert_eq!(v["type"], "orders.created");
        assert_eq!(v["subject"], "acct-\"1\"");
        assert_eq!(v["mendattempt"], 2);
        assert_eq!(v["mendservice"], "orders");
        assert_eq!(v["mendrepairedby"], "amount-as-number");
        assert!(v.get("mendresubmittedby").is_none());
        assert!(v["traceparent"].as_str().unwrap().starts_with("00-0af7"));
        assert!(v.get("tracestate").is_none());
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["amount"], "12.5");
        assert!(v.get("data_base64").is_none());
    }

    #[test]
    fn other_payloads_are_base64() {
        let mut m = meta();
        m.key = None;
        for (ct, payload) in [
            (None, &b"not json \xff\x00"[..]),
            (Some("text/plain"), &b"{\"a\":1}"[..]),
            (Some("application/json"), &b""[..]),
        ] {
            m.content_type = ct;
            let e = entry(&m, payload);
            let v: Value = serde_json::from_str(&e).unwrap();
            assert!(v.get("subject").is_none());
            assert!(v.get("data").is_none(), "{e}");
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(v["data_base64"].as_str().unwrap())
                .unwrap();
            assert_eq!(decoded, payload);
            assert_eq!(v["datacontenttype"], ct.unwrap_or("application/json"));
        }
        m.content_type = Some("application/cloudevents+json; charset=utf-8");
        let v: Value = serde_json::from_str(&entry(&m, b"[1,2]")).unwrap();
        assert_eq!(v["data"], serde_json::json!([1, 2]));
    }

    #[test]
    fn body_is_an_array_of_entries() {
        let a = entry(&meta(), b"1");
        let b = entry(&meta(), b"\"x\"");
        let v: Value = serde_json::from_slice(&body([a.as_str(), b.as_str()])).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[1]["data"], "x");
        assert_eq!(body(std::iter::empty::<&str>()), b"[]");
    }

    #[test]
    fn statuses_are_read() {
        let s = statuses(
            br#"{"statuses": [
                {"id": "S:1", "status": "SUCCESS"},
                {"id": "S:2", "status": "retry"},
                {"id": "S:3", "status": "DROP", "extra": true},
                {"id": "S:4", "status": "FAIL", "problem": {"title": "bad", "code": "bad_type", "field": "/amount", "status": 422}},
                {"id": "S:5", "status": "FAIL"},
                {"id": "S:6", "status": "FAIL", "problem": "plain words"},
                {"id": "S:7", "status": "MAYBE"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(s[0], ("S:1".into(), EntryStatus::Success));
        assert_eq!(s[1].1, EntryStatus::Retry);
        assert_eq!(s[2].1, EntryStatus::Drop);
        let EntryStatus::Fail(e) = &s[3].1 else {
            panic!("{:?}", s[3])
        };
        assert_eq!(e.code.as_deref(), Some("bad_type"));
        assert_eq!(e.field.as_deref(), Some("/amount"));
        assert_eq!(e.status, Some(422));
        assert_eq!(e.kind, ErrorKind::Message);
        let EntryStatus::Fail(e) = &s[4].1 else {
            panic!()
        };
        assert_eq!((e.status, e.code.as_deref()), (None, None));
        let EntryStatus::Fail(e) = &s[5].1 else {
            panic!()
        };
        assert_eq!(e.body.as_deref(), Some("\"plain words\""));
        assert_eq!(s[6].1, EntryStatus::Unknown("MAYBE".into()));
    }

    #[test]
    fn malformed_answers_say_what_is_wrong() {
        for bad in [
            &b""[..],
            b"OK",
            b"[]",
            b"{\"statuses\": {}}",
            b"{\"statuses\": [{\"id\": 1, \"status\": \"SUCCESS\"}]}",
            b"{\"statuses\": [{\"status\": \"SUCCESS\"}]}",
            b"\xff\xfe",
        ] {
            let e = statuses(bad).unwrap_err();
            assert!(e.contains("statuses"), "{e}");
        }
    }
}
