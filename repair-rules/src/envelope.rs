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
    /// An envelope for bytes that mend must park but cannot read as a message of a lineage (not an
    /// envelope, a retry no binding takes): lineage `lineage` at attempt 1, no key or headers, the
    /// payload in the form given ([`payload_form`] or [`bytes_form`]), failed now (`at`).
    pub fn raw(
        lineage: LineageId,
        service: String,
        subject: String,
        (payload, payload_base64): (Value, Option<String>),
        error: FailureError,
        at: String,
    ) -> Self {
        Self {
            version: ENVELOPE_VERSION,
            id: lineage.to_string(),
            service,
            binding: String::new(),
            stream: lineage.stream,
            seq: lineage.seq,
            subject,
            key: None,
            headers: BTreeMap::new(),
            payload,
            payload_base64,
            payload_ref: None,
            headers_base64: None,
            error,
            attempt: 1,
            first_failed_at: at.clone(),
            failed_at: at,
            reason: None,
            history: Vec::new(),
        }
    }

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

/// Where a payload too large for an envelope can be read: the object `object` of the object store
/// bucket `mend_payloads` when set (its bytes as they were), else the original message in its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef {
    pub stream: String,
    pub seq: u64,
    /// The payload's size in bytes.
    pub size: usize,
    /// The payload's object in the bucket `mend_payloads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
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

/// The most bytes a history keeps when it travels (`Mend-History`) or is stored in an envelope:
/// its first step and the newest that fit, the ones between counted in one `omitted` step.
pub const HISTORY_LIMIT: usize = 16 * 1024;

/// The most bytes kept of an error's `title`, `detail` or `body`.
pub const ERROR_TEXT_LIMIT: usize = 4096;

/// The most bytes kept of an error's `type`, `code` or `field`.
pub const ERROR_MEMBER_LIMIT: usize = 1024;

/// `text` cut to at most `limit` bytes on a character boundary, marked with `…` when cut.
fn cut(text: &mut String, limit: usize) {
    if text.len() <= limit {
        return;
    }
    let mut end = limit.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
}

impl FailureError {
    /// Cuts every text member to its limit, so an app's (or a hand-made history's) error cannot
    /// grow an envelope or a header without bound.
    pub fn bound(&mut self) {
        for (member, limit) in [
            (&mut self.type_uri, ERROR_MEMBER_LIMIT),
            (&mut self.code, ERROR_MEMBER_LIMIT),
            (&mut self.field, ERROR_MEMBER_LIMIT),
            (&mut self.title, ERROR_TEXT_LIMIT),
            (&mut self.detail, ERROR_TEXT_LIMIT),
            (&mut self.body, ERROR_TEXT_LIMIT),
        ] {
            if let Some(text) = member {
                cut(text, limit);
            }
        }
    }

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
    /// The attempt the step belongs to: the one that failed (`delegated`, `parked`), the one it
    /// made (`repaired`, `resubmitted`). Absent in histories written before it was recorded; see
    /// [`attempts`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl HistoryEntry {
    /// A step `what` by `by` at attempt `attempt`, now-stamped by the caller (`at`).
    pub fn new(at: String, what: &str, by: String, attempt: u32) -> Self {
        Self {
            at,
            what: what.to_owned(),
            by,
            attempt: Some(attempt),
            error: None,
            note: None,
        }
    }
}

/// The steps of an automatic repair, which are not announced on their own: a lineage's `delegated`
/// and `repaired` steps travel in its history and are announced, with their attempts, in the
/// `steps` of the announcement that ends or parks it (SPEC §2).
pub const UNANNOUNCED: [&str; 2] = ["delegated", "repaired"];

/// Each step of `history` with its attempt: recorded, or, for a step written without one, counted
/// from the steps before it (attempt 1 first; a `repaired` or `resubmitted` step makes the next
/// attempt, every other step belongs to the current one).
pub fn attempts(history: &[HistoryEntry]) -> impl Iterator<Item = (u32, &HistoryEntry)> {
    let mut current = 1u32;
    history.iter().map(move |entry| {
        let makes_next = matches!(entry.what.as_str(), "repaired" | "resubmitted");
        let attempt = entry.attempt.unwrap_or(if makes_next {
            current.saturating_add(1)
        } else {
            current
        });
        current = attempt;
        (attempt, entry)
    })
}

/// The unannounced steps of `history` ([`UNANNOUNCED`]), each with its attempt set.
pub fn unannounced_steps(history: &[HistoryEntry]) -> Vec<HistoryEntry> {
    attempts(history)
        .filter(|(_, e)| UNANNOUNCED.contains(&e.what.as_str()))
        .map(|(attempt, e)| HistoryEntry {
            attempt: Some(attempt),
            ..e.clone()
        })
        .collect()
}

/// The header an envelope made to fit names the headers it left out in (a `Mend-` header, so a
/// resubmission does not send it on).
pub use crate::headers::MEND_OMITTED_HEADERS as OMITTED_HEADERS;

/// What an `omitted` step is called in a history.
pub const OMITTED: &str = "omitted";

/// A payload as an envelope keeps it: its JSON value when the bytes are JSON (and no base64), else
/// null and the bytes as base64 (`payload` / `payload_base64`, SPEC §5).
pub fn payload_form(bytes: &[u8]) -> (Value, Option<String>) {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => (value, None),
        Err(_) => bytes_form(bytes),
    }
}

/// A payload kept as bytes whatever they are: null and the bytes as base64 (what is kept of a
/// message that was not what its stream should hold).
pub fn bytes_form(bytes: &[u8]) -> (Value, Option<String>) {
    use base64::Engine as _;
    (
        Value::Null,
        Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
    )
}

/// A history read from `Mend-History` text, bounded whoever wrote it: a history only travels on
/// bounded. The text's length bounds its size, so measuring it step by step is needed only past
/// [`HISTORY_LIMIT`] (rarely).
pub fn read_history(text: &str) -> Result<Vec<HistoryEntry>, serde_json::Error> {
    let mut history: Vec<HistoryEntry> = serde_json::from_str(text)?;
    if text.len() > HISTORY_LIMIT {
        bound_history(&mut history, HISTORY_LIMIT);
    } else {
        bound_steps(&mut history);
    }
    Ok(history)
}

/// Cuts each step's error, note and names to their limits (what [`bound_history`] does first; enough
/// alone for a history read from JSON text no longer than the history limit).
pub fn bound_steps(history: &mut [HistoryEntry]) {
    for entry in history.iter_mut() {
        if let Some(error) = &mut entry.error {
            error.bound();
        }
        if let Some(note) = &mut entry.note {
            cut(note, ERROR_TEXT_LIMIT);
        }
        cut(&mut entry.what, ERROR_MEMBER_LIMIT);
        cut(&mut entry.by, ERROR_MEMBER_LIMIT);
        cut(&mut entry.at, ERROR_MEMBER_LIMIT);
    }
}

/// Keeps `history` under `limit` bytes of JSON: each step's error and note cut to their limits,
/// then the first step and the newest steps that fit, the ones between replaced by a single
/// `omitted` step that counts them (and those an earlier cut counted). A history always keeps
/// its first and its newest step.
pub fn bound_history(history: &mut Vec<HistoryEntry>, limit: usize) {
    bound_steps(history);
    let size = |e: &HistoryEntry| serde_json::to_vec(e).map_or(0, |v| v.len() + 1);
    let total: usize = history.iter().map(size).sum::<usize>() + 2;
    if total <= limit || history.len() <= 2 {
        return;
    }
    // Steps counted by an earlier cut are counted again.
    let omitted_before: u64 = history
        .iter()
        .filter(|e| e.what == OMITTED && e.by == "mend")
        .filter_map(|e| e.note.as_deref()?.split(' ').next()?.parse::<u64>().ok())
        .sum();
    let first = history.remove(0);
    // Room for the first step, the marker and the brackets.
    let mut room = limit.saturating_sub(size(&first) + 160);
    let mut kept = Vec::new();
    while let Some(last) = history.pop() {
        let s = size(&last);
        if !kept.is_empty() && s > room {
            history.push(last);
            break;
        }
        room = room.saturating_sub(s);
        kept.push(last);
    }
    let dropped = history
        .iter()
        .filter(|e| !(e.what == OMITTED && e.by == "mend"))
        .count() as u64;
    let at = history
        .last()
        .map_or_else(|| first.at.clone(), |e| e.at.clone());
    let mut bounded = vec![first];
    let omitted = dropped + omitted_before;
    if omitted > 0 {
        bounded.push(HistoryEntry {
            at,
            what: OMITTED.to_owned(),
            by: "mend".to_owned(),
            attempt: None,
            error: None,
            note: Some(format!(
                "{omitted} steps left out to keep the history under {limit} bytes"
            )),
        });
    }
    bounded.extend(
        kept.into_iter()
            .rev()
            .filter(|e| !(e.what == OMITTED && e.by == "mend")),
    );
    *history = bounded;
}

impl FailureEnvelope {
    /// Shrinks the envelope until its JSON is at most `limit` bytes, where it can: its error cut,
    /// its history bounded (to [`HISTORY_LIMIT`], then to its first and newest step), header
    /// values cut, its reason cut. The payload is left as it is (a caller moves it out first).
    /// Returns whether it fits now.
    pub fn fit(&mut self, limit: usize) -> bool {
        let fits = |e: &FailureEnvelope| serde_json::to_vec(e).is_ok_and(|v| v.len() <= limit);
        self.error.bound();
        bound_history(&mut self.history, HISTORY_LIMIT);
        if let Some(reason) = &mut self.reason {
            cut(reason, ERROR_TEXT_LIMIT);
        }
        if fits(self) {
            return true;
        }
        for values in self.headers.values_mut() {
            for v in values.iter_mut() {
                cut(v, ERROR_MEMBER_LIMIT);
            }
        }
        if fits(self) {
            return true;
        }
        // The first headers up to a quarter of the limit stay; the others are counted.
        let mut room = limit / 4;
        let mut left_out = 0usize;
        self.headers.retain(|name, values| {
            let size = name.len() + values.iter().map(|v| v.len() + 4).sum::<usize>() + 8;
            if size <= room {
                room -= size;
                true
            } else {
                left_out += values.len();
                false
            }
        });
        if left_out > 0 {
            self.headers.insert(
                OMITTED_HEADERS.to_owned(),
                vec![format!(
                    "{left_out} header values left out to fit the envelope"
                )],
            );
        }
        if fits(self) {
            return true;
        }
        bound_history(&mut self.history, 0);
        fits(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: usize, detail_len: usize) -> HistoryEntry {
        let mut error = FailureError::bare(ErrorKind::Message, Some(422));
        error.detail = Some("é".repeat(detail_len / 2));
        HistoryEntry {
            at: format!("2026-11-22T10:00:{i:02}Z"),
            what: if i.is_multiple_of(2) {
                "delegated"
            } else {
                "repaired"
            }
            .into(),
            by: format!("step-{i}"),
            attempt: None,
            error: Some(error),
            note: None,
        }
    }

    #[test]
    fn steps_written_without_an_attempt_are_counted_from_the_steps_before_them() {
        let at = |s: u32| format!("2026-11-22T10:00:{s:02}Z");
        let mut history = vec![
            HistoryEntry::new(at(0), "delegated", "sidecar".into(), 1),
            HistoryEntry::new(at(1), "repaired", "rule:a".into(), 2),
            HistoryEntry::new(at(2), "delegated", "sidecar".into(), 2),
            HistoryEntry::new(at(3), "parked", "processor".into(), 2),
            HistoryEntry::new(at(4), "resubmitted", "ann".into(), 3),
            HistoryEntry::new(at(5), "delegated", "sidecar".into(), 3),
            HistoryEntry::new(at(6), "repaired", "rule:b".into(), 4),
        ];
        let recorded: Vec<u32> = attempts(&history).map(|(a, _)| a).collect();
        assert_eq!(recorded, [1, 2, 2, 2, 3, 3, 4]);
        for e in &mut history {
            e.attempt = None;
        }
        let counted: Vec<u32> = attempts(&history).map(|(a, _)| a).collect();
        assert_eq!(counted, recorded);
        // A recorded attempt resets the count for the steps after it.
        history[4].attempt = Some(7);
        let counted: Vec<u32> = attempts(&history).map(|(a, _)| a).collect();
        assert_eq!(counted, [1, 2, 2, 2, 7, 7, 8]);
        let steps = unannounced_steps(&history);
        let kinds: Vec<(&str, Option<u32>)> =
            steps.iter().map(|e| (e.what.as_str(), e.attempt)).collect();
        assert_eq!(
            kinds,
            [
                ("delegated", Some(1)),
                ("repaired", Some(2)),
                ("delegated", Some(2)),
                ("delegated", Some(7)),
                ("repaired", Some(8))
            ]
        );
    }

    fn json_len(history: &[HistoryEntry]) -> usize {
        serde_json::to_vec(history).unwrap().len()
    }

    fn omitted_count(history: &[HistoryEntry]) -> u64 {
        let marker = history.iter().find(|e| e.what == OMITTED).unwrap();
        marker
            .note
            .as_deref()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A history grown past any message size is cut to its first step, a count of what was left
    /// out, and its newest steps; cutting again counts what earlier cuts left out.
    #[test]
    fn a_grown_history_keeps_its_first_and_newest_steps_within_the_limit() {
        let mut history: Vec<HistoryEntry> = (0..500).map(|i| step(i, 64 * 1024)).collect();
        assert!(json_len(&history) > 1024 * 1024);
        bound_history(&mut history, HISTORY_LIMIT);
        assert!(
            json_len(&history) <= HISTORY_LIMIT,
            "{}",
            json_len(&history)
        );
        assert_eq!(history[0].by, "step-0");
        assert_eq!(history.last().unwrap().by, "step-499");
        let kept = history.iter().filter(|e| e.by.starts_with("step-")).count() as u64;
        assert_eq!(omitted_count(&history), 500 - kept);
        // Each step's error was cut to its limit.
        let detail = history[0].error.as_ref().unwrap().detail.as_ref().unwrap();
        assert!(detail.len() <= ERROR_TEXT_LIMIT && detail.ends_with('…'));

        history.extend((500..600).map(|i| step(i, 8 * 1024)));
        bound_history(&mut history, HISTORY_LIMIT);
        assert!(json_len(&history) <= HISTORY_LIMIT);
        assert_eq!(history.iter().filter(|e| e.what == OMITTED).count(), 1);
        let kept = history.iter().filter(|e| e.by.starts_with("step-")).count() as u64;
        assert_eq!(omitted_count(&history), 600 - kept);
        assert_eq!(history.last().unwrap().by, "step-599");

        let mut short: Vec<HistoryEntry> = (0..3).map(|i| step(i, 10)).collect();
        let before = short.clone();
        bound_history(&mut short, HISTORY_LIMIT);
        assert_eq!(short, before, "a history within the limit is left as it is");
    }

    /// An envelope whose error, history and headers have grown is made to fit.
    #[test]
    fn an_envelope_grown_past_the_limit_is_made_to_fit() {
        let mut env = FailureEnvelope {
            version: ENVELOPE_VERSION,
            id: "S:1".into(),
            service: "orders".into(),
            binding: "orders".into(),
            stream: "S".into(),
            seq: 1,
            subject: "app.x".into(),
            key: Some("k".into()),
            headers: (0..64)
                .map(|i| (format!("X-{i}"), vec!["v".repeat(32 * 1024)]))
                .collect(),
            headers_base64: None,
            payload: Value::Null,
            payload_base64: None,
            payload_ref: None,
            error: step(0, 2 * 1024 * 1024).error.unwrap(),
            attempt: 300,
            first_failed_at: "2026-11-22T10:00:00Z".into(),
            failed_at: "2026-11-22T10:00:00Z".into(),
            reason: Some("r".repeat(1024 * 1024)),
            history: (0..300).map(|i| step(i, 16 * 1024)).collect(),
        };
        assert!(serde_json::to_vec(&env).unwrap().len() > 4 * 1024 * 1024);
        assert!(env.fit(64 * 1024));
        assert!(serde_json::to_vec(&env).unwrap().len() <= 64 * 1024);
        assert_eq!(env.history.last().unwrap().by, "step-299");
        assert!(env.fit(64 * 1024), "fitting again changes nothing");
    }

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
