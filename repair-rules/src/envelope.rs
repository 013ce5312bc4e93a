//! The failure envelope (SPEC §5): what a sidecar delegates, the processor repairs or parks, and the
//! dashboard shows. Versioned JSON; `id`, `stream` and `seq` always name the original message.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::{LineageId, is_subject_token};

/// The envelope format version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// A message the app failed on, with everything needed to repair, park or resubmit it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureEnvelope {
    pub version: u32,
    /// The lineage id `<stream>:<seq>` of the original message (`Mend-Id`).
    pub id: String,
    pub service: String,
    pub binding: String,
    pub stream: String,
    pub seq: u64,
    pub subject: String,
    pub key: Option<String>,
    /// The message's NATS headers, each name with all its values.
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
    /// The message's NATS header block as it was sent (base64), when it cannot be read as NATS
    /// headers (a value that is not UTF-8, or holds a bare CR or LF); `headers` then has what could
    /// be read of it, with unreadable bytes replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_base64: Option<String>,
    /// The payload as a JSON value when it is JSON (then `payload_base64` is null).
    #[serde(default)]
    pub payload: Value,
    /// The raw payload bytes, base64, when the payload is not JSON.
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Set instead of `payload` when the payload was too large to travel in the envelope: the
    /// original message stays in the app stream at this place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_ref: Option<PayloadRef>,
    pub error: FailureError,
    /// How many deliveries of this lineage the app has seen.
    pub attempt: u32,
    pub first_failed_at: String,
    pub failed_at: String,
    /// Why the envelope was parked, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
}

impl FailureEnvelope {
    /// The lineage this envelope belongs to.
    pub fn lineage(&self) -> LineageId {
        LineageId::new(self.stream.clone(), self.seq)
    }

    /// Whether the envelope can be acted on: its service is one subject token, `id` is the lineage of
    /// `stream` and `seq`, its subject is a NATS subject, and its headers could have come from a NATS
    /// message. A sidecar only writes such envelopes; anything else was hand-made and is parked raw.
    pub fn check(&self) -> Result<(), String> {
        if !is_subject_token(&self.service) {
            return Err(format!("service `{}` is not a subject token", self.service));
        }
        let names_lineage = self
            .id
            .rsplit_once(':')
            .is_some_and(|(stream, seq)| stream == self.stream && seq == self.seq.to_string());
        if !names_lineage {
            return Err(format!(
                "id `{}` is not the lineage `<stream>:<seq>` of stream `{}` and seq {}",
                self.id, self.stream, self.seq
            ));
        }
        if self.stream.is_empty() || !self.stream.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("stream `{}` is not a stream name", self.stream));
        }
        if self.subject.is_empty()
            || self.subject.chars().any(char::is_whitespace)
            || self.subject.split('.').any(str::is_empty)
        {
            return Err(format!("subject `{}` is not a NATS subject", self.subject));
        }
        for (name, values) in &self.headers {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(format!("header name `{name}` is not valid in NATS"));
            }
            if values.iter().any(|v| v.contains(['\r', '\n'])) {
                return Err(format!("header `{name}` has a line break in a value"));
            }
        }
        Ok(())
    }
}

/// Where a payload too large for an envelope can be read: the original message in its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef {
    pub stream: String,
    pub seq: u64,
    /// The payload's size in bytes.
    pub size: usize,
}

/// What kind of failure the app reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The app rejected the message (any non-transient, non-2xx answer).
    Message,
    /// The app kept answering transiently for this message while answering others.
    TransientExhausted,
}

impl ErrorKind {
    /// The name in the envelope (`message`, `transient_exhausted`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Message => "message",
            ErrorKind::TransientExhausted => "transient_exhausted",
        }
    }
}

/// The app's error, parsed from an RFC 9457 problem+json body where there was one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureError {
    pub kind: ErrorKind,
    /// The HTTP status of the app's answer; null when there was none (a timeout, a refused connection).
    pub status: Option<u16>,
    /// The problem `type` URI.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_uri: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    /// A JSON Pointer to the offending field of the payload.
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
    /// The answer's body as text, cut at 4 KiB, when it was not problem+json.
    #[serde(default)]
    pub body: Option<String>,
}

impl FailureError {
    /// An error record with only a kind and status set.
    pub fn bare(kind: ErrorKind, status: Option<u16>) -> Self {
        Self {
            kind,
            status,
            type_uri: None,
            code: None,
            field: None,
            title: None,
            detail: None,
            body: None,
        }
    }
}

/// One step in the life of a lineage: delegated, repaired, parked, resubmitted…
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: String,
    pub what: String,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of SPEC §5 (without its comments) reads into the type and writes back the same JSON.
    #[test]
    fn spec_example_round_trips() {
        let text = r#"{ "version": 1, "id": "ORDERS:1042", "service": "orders", "binding": "orders",
          "stream": "ORDERS", "seq": 1042, "subject": "orders.created", "key": "acct-7",
          "headers": {"Account-Id": ["acct-7"]},
          "payload": {"account": "acct-7", "amount": "12.50"},
          "payload_base64": null,
          "error": {"kind": "message", "status": 422, "code": "bad_type", "field": "/amount",
                    "title": "amount must be a number", "detail": "...", "body": null},
          "attempt": 1, "first_failed_at": "2026-11-22T10:00:00Z", "failed_at": "2026-11-22T10:00:00Z",
          "history": [{"at": "2026-11-22T10:00:00Z", "what": "delegated", "by": "sidecar",
                       "error": {"kind": "message", "status": 422, "code": "bad_type", "field": "/amount",
                                 "title": "amount must be a number", "detail": "...", "body": null}},
                      {"at": "2026-11-22T10:00:01Z", "what": "repaired", "by": "rule:amount-as-number"}] }"#;
        let env: FailureEnvelope = serde_json::from_str(text).unwrap();
        assert_eq!(env.lineage(), LineageId::new("ORDERS", 1042));
        assert_eq!(env.error.kind, ErrorKind::Message);
        assert_eq!(env.error.field.as_deref(), Some("/amount"));
        assert_eq!(env.history.len(), 2);
        let back: Value = serde_json::to_value(&env).unwrap();
        let orig: Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, orig);
        assert_eq!(env.check(), Ok(()));

        // Hand-made envelopes that cannot be acted on say why.
        let broken = |f: &dyn Fn(&mut FailureEnvelope)| {
            let mut e = env.clone();
            f(&mut e);
            e.check().unwrap_err()
        };
        assert!(broken(&|e| e.service = "a.b".into()).contains("service"));
        assert!(broken(&|e| e.id = "ORDERS:1".into()).contains("lineage"));
        assert!(broken(&|e| e.subject = "orders..x".into()).contains("subject"));
        assert!(broken(&|e| e.subject = "orders x".into()).contains("subject"));
        assert!(
            broken(&|e| {
                e.headers.insert("Bad:Name".into(), vec!["v".into()]);
            })
            .contains("header name")
        );
        assert!(
            broken(&|e| {
                e.headers.insert("X".into(), vec!["a\r\nb".into()]);
            })
            .contains("line break")
        );
        // A key may hold anything: it travels percent-encoded.
        let mut keyed = env.clone();
        keyed.key = Some("line\nbreak ünïcode".into());
        assert_eq!(keyed.check(), Ok(()));
    }

    #[test]
    fn transient_exhausted_is_snake_case() {
        let e = FailureError::bare(ErrorKind::TransientExhausted, Some(503));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "transient_exhausted");
        assert_eq!(v["status"], 503);
        assert!(v.get("type").is_none());
    }
}
