//! Deliveries the NATS client lost or could not hand over (SPEC §8.5, poison tolerance).
//!
//! async-nats 0.51 parses every message's header block inside its connection task. A block that is
//! not UTF-8 makes it drop the connection (and reconnect); a value with a bare CR trips an assertion
//! and the connection task dies. Any non-Rust producer can publish either: nats-server does not check
//! header bytes. The message is delivered all the same (the consumer counts it), together with
//! whatever else was in flight on that connection, and none of them reach mend. JetStream offers
//! them again after the ack wait, and the same happens again, forever: the poison message and every
//! message lost with it stall their keys, and every other key loses its connection every ack wait.
//!
//! So the dispatcher watches the consumer's delivery sequence ([`Tracker`]): every delivery to this
//! consumer numbers one more, and only this instance pulls it (its lease). A jump means deliveries
//! were lost on the way; the consumer's own count, ahead of what arrived and standing still, means
//! the last ones were. Those messages are read from the stream's leader with
//! `$JS.API.STREAM.MSG.GET`, which answers JSON with the header block base64-encoded, so no header
//! parser of the client is involved ([`get`]). A message whose header block the client can read is
//! delivered as usual; one it cannot ([`header_problem`]) is parked with the block's bytes
//! (`headers_base64` in the envelope), through its key's lane and hold like any failure. Either is
//! settled on an ack subject built for its delivery ([`ack_subject`]): the server finds the delivery
//! by its stream sequence.
//!
//! The app stream is pulled on a connection of its own, so a poison message takes down only that
//! connection (rebuilt when its task died), never the one that acks, publishes and holds leases.
//!
//! Once async-nats parses such headers without failing (upstream nats-io/nats.rs#1573 did this for
//! subjects), nothing is lost in transit any more and the tracker never fires; what remains is
//! parking blocks that cannot be passed on faithfully.

use std::collections::BTreeSet;
use std::str::FromStr as _;
use std::time::SystemTime;

use async_nats::{HeaderMap, HeaderName, HeaderValue, Subject};
use base64::Engine as _;
use bytes::Bytes;

/// The most stream messages one rescue reads: a bound on the work a burst of losses can cause.
pub const MAX_READ: usize = 4096;

/// A message whose NATS header block mend's NATS client cannot read.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// What is wrong with the block.
    pub why: String,
    /// The block as it was sent, starting with `NATS/1.0`.
    pub raw: Bytes,
}

/// Why async-nats cannot read `block` (a NATS header block, `NATS/1.0\r\n` and `name: value` lines),
/// or `None` if it can. It follows the client's own parser: UTF-8 as a whole, a version line, lines
/// split on LF with one trailing CR removed, `name:value` with a valid name, folded continuation
/// lines, and no CR or LF left in a value (the client asserts that, and its connection task dies).
pub fn header_problem(block: &[u8]) -> Option<String> {
    let text = match std::str::from_utf8(block) {
        Ok(text) => text,
        Err(e) => {
            return Some(format!(
                "the header block is not UTF-8 (byte 0x{:02X} at offset {})",
                block.get(e.valid_up_to()).copied().unwrap_or(0),
                e.valid_up_to()
            ));
        }
    };
    let mut lines = text.lines().peekable();
    match lines.next() {
        Some(version) if version.starts_with("NATS/1.0") => {}
        _ => return Some("the header block does not begin with NATS/1.0".to_owned()),
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Some("a header line has no `:`".to_owned());
        };
        if HeaderName::from_str(name).is_err() {
            return Some(format!("header name {name:?} is not valid"));
        }
        let mut value = value.trim_start().to_owned();
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        if value.trim_end().contains(['\r', '\n']) {
            return Some(format!("the value of header {name} holds a bare CR or LF"));
        }
    }
    None
}

/// What can be read of a header block: every `name: value` line with a valid name, the value's
/// bytes that are not UTF-8 replaced by U+FFFD and a bare CR or LF by a space. For a block the
/// client can read, this is what the client would have made of it.
pub fn lenient_headers(block: &[u8]) -> HeaderMap {
    let text = String::from_utf8_lossy(block);
    let mut headers = HeaderMap::new();
    let mut lines = text.lines().skip(1).peekable();
    while let Some(line) = lines.next() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let mut value = value.trim_start().to_owned();
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        let Ok(name) = HeaderName::from_str(name) else {
            continue;
        };
        let value = value.trim_end().replace(['\r', '\n'], " ");
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.append(name, value);
        }
    }
    headers
}

/// One message of a stream as `$JS.API.STREAM.MSG.GET` answers it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub seq: u64,
    /// The header block, if the message has headers.
    pub header_block: Option<Bytes>,
    pub payload: Bytes,
    pub time: SystemTime,
}

#[derive(serde::Deserialize)]
struct GetAnswer {
    message: Option<GetMessage>,
    error: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct GetMessage {
    subject: String,
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
    time: String,
}

/// Reads the message of `stream` at `seq`, or with `next_by_subject` the first one at or after `seq`
/// on that subject, from the stream's leader; `None` when there is none. The answer is JSON with
/// the header block in base64, parsed here, so a block the client could not parse is no obstacle.
pub async fn get(
    client: &async_nats::Client,
    stream: &str,
    seq: u64,
    next_by_subject: Option<&str>,
) -> anyhow::Result<Option<Stored>> {
    let mut request = serde_json::json!({ "seq": seq });
    if let Some(subject) = next_by_subject {
        request["next_by_subj"] = subject.into();
    }
    let answer = client
        .request(
            format!("$JS.API.STREAM.MSG.GET.{stream}"),
            Bytes::from(request.to_string()),
        )
        .await?;
    let answer: GetAnswer = serde_json::from_slice(&answer.payload)?;
    if let Some(error) = answer.error {
        // 10037: no message found.
        if error["err_code"] == 10037 {
            return Ok(None);
        }
        anyhow::bail!("stream {stream}: message {seq}: {error}");
    }
    let Some(m) = answer.message else {
        return Ok(None);
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let header_block = match m.hdrs.as_deref() {
        Some(h) if !h.is_empty() => Some(Bytes::from(b64.decode(h)?)),
        _ => None,
    };
    let payload = match m.data.as_deref() {
        Some(d) if !d.is_empty() => Bytes::from(b64.decode(d)?),
        _ => Bytes::new(),
    };
    let time = humantime::parse_rfc3339_weak(&m.time).unwrap_or_else(|_| SystemTime::now());
    Ok(Some(Stored {
        subject: m.subject,
        seq: m.seq,
        header_block,
        payload,
        time,
    }))
}

/// The ack subject of a delivery of stream sequence `sseq` to `consumer`: built like `sample` (a
/// reply subject of an earlier delivery of the same consumer, in either format of ADR-15) with the
/// delivery count and sequences replaced, else in the original nine-token format. The server finds
/// the delivery by its stream sequence and takes the consumer sequence from its own record; a nak
/// is ignored unless `cseq` is above the consumer's ack floor and at most its delivered sequence.
pub fn ack_subject(
    sample: Option<&str>,
    stream: &str,
    consumer: &str,
    delivered: u64,
    sseq: u64,
    cseq: u64,
) -> Subject {
    if let Some(sample) = sample {
        let mut tokens: Vec<String> = sample.split('.').map(str::to_owned).collect();
        let at = match tokens.len() {
            9 => Some(4),
            n if n >= 11 => Some(6),
            _ => None,
        };
        if let Some(at) = at {
            tokens[at] = delivered.to_string();
            tokens[at + 1] = sseq.to_string();
            tokens[at + 2] = cseq.to_string();
            return Subject::from(tokens.join("."));
        }
    }
    Subject::from(format!(
        "$JS.ACK.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.0.0"
    ))
}

/// Deliveries known lost, and where to look for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// Every message in `from..=to` that this instance has not seen was delivered to it and lost
    /// (first deliveries come in stream order): `count` of them.
    Range { from: u64, to: u64, count: u64 },
    /// Some deliveries between the consumer's ack floor and `to` were lost, redeliveries among them:
    /// messages the client can read come again by themselves, so only unreadable ones are looked
    /// for.
    Unreadable { to: u64 },
}

/// Follows one consumer's deliveries to this instance and says when some were lost.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The highest stream sequence received.
    high: u64,
    /// The consumer's delivery sequence of the latest delivery received (or, at start, the
    /// consumer's delivered count then); `None` while unknown (the first delivery sets it).
    last_cseq: Option<u64>,
    /// A reply subject received, as the model of built ack subjects.
    sample: Option<String>,
    /// The consumer's delivered count seen at the previous look, if ahead of what arrived.
    ahead: Option<u64>,
    /// Stream sequences rescued already (kept above the consumer's ack floor), so a message
    /// rescued and settled is not rescued again while the floor stays below it.
    rescued: BTreeSet<u64>,
}

impl Tracker {
    /// Starts after the consumer's delivered count and the stream sequence it had delivered up to
    /// (from the consumer's info at start; `None` if that could not be read).
    pub fn new(delivered: Option<(u64, u64)>) -> Self {
        Self {
            high: delivered.map_or(0, |(_, sseq)| sseq),
            last_cseq: delivered.map(|(cseq, _)| cseq),
            ..Self::default()
        }
    }

    /// The highest stream sequence received (or delivered before this instance started).
    pub fn high(&self) -> u64 {
        self.high
    }

    /// The consumer's delivery sequence of the latest delivery known, if any: a built ack subject
    /// carries it, since the server ignores a nak whose delivery sequence is outside the range of
    /// its pending deliveries (it takes the delivery's own sequence from its record otherwise).
    pub fn last_cseq(&self) -> Option<u64> {
        self.last_cseq
    }

    /// A reply subject to model built ack subjects on.
    pub fn sample(&self) -> Option<&str> {
        self.sample.as_deref()
    }

    /// A delivery arrived: stream sequence `sseq`, delivery sequence `cseq`, delivery count
    /// `delivered`. Returns what was lost before it, if anything.
    pub fn received(&mut self, sseq: u64, cseq: u64, delivered: u64, reply: &str) -> Option<Lost> {
        if self.sample.is_none() {
            self.sample = Some(reply.to_owned());
        }
        let skipped = self
            .last_cseq
            .map_or(0, |last| cseq.saturating_sub(last.saturating_add(1)));
        let lost = if skipped == 0 {
            None
        } else if delivered == 1 && sseq > self.high.saturating_add(1) {
            Some(Lost::Range {
                from: self.high + 1,
                to: sseq - 1,
                count: skipped,
            })
        } else {
            Some(Lost::Unreadable {
                to: self.high.max(sseq),
            })
        };
        self.last_cseq = Some(self.last_cseq.map_or(cseq, |last| last.max(cseq)));
        self.high = self.high.max(sseq);
        self.ahead = None;
        lost
    }

    /// A look at the consumer: it has made `cseq` deliveries, up to stream sequence `sseq`, and its
    /// ack floor is at stream sequence `floor`. Deliveries it counts that never arrived, with the
    /// count standing still since the previous look, were lost.
    pub fn looked(&mut self, cseq: u64, sseq: u64, floor: u64) -> Option<Lost> {
        self.rescued = self.rescued.split_off(&floor.saturating_add(1));
        let last = *self.last_cseq.get_or_insert(cseq);
        if cseq <= last {
            self.ahead = None;
            return None;
        }
        if self.ahead != Some(cseq) {
            // Maybe still on the way: look again.
            self.ahead = Some(cseq);
            return None;
        }
        self.ahead = None;
        let count = cseq - last;
        self.last_cseq = Some(cseq);
        let lost = if sseq > self.high {
            Lost::Range {
                from: self.high + 1,
                to: sseq,
                count,
            }
        } else {
            Lost::Unreadable { to: sseq }
        };
        self.high = self.high.max(sseq);
        Some(lost)
    }

    /// Whether `seq` was rescued already (and is above the ack floor).
    pub fn was_rescued(&self, seq: u64) -> bool {
        self.rescued.contains(&seq)
    }

    /// `seq` was rescued.
    pub fn rescued(&mut self, seq: u64) {
        self.rescued.insert(seq);
    }

    /// The stream sequences rescued (above the ack floor).
    pub fn rescued_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.rescued.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_what_the_client_cannot_parse() {
        assert_eq!(header_problem(b"NATS/1.0\r\nA: b\r\nC: d e\r\n\r\n"), None);
        assert_eq!(header_problem(b"NATS/1.0\r\nA: b\x00c\r\n\r\n"), None);
        assert!(
            header_problem(b"NATS/1.0\r\nA: caf\xe9\r\n\r\n")
                .is_some_and(|w| w.contains("not UTF-8") && w.contains("0xE9"))
        );
        assert!(
            header_problem(b"NATS/1.0\r\nA: ab\rcd\r\n\r\n").is_some_and(|w| w.contains("bare CR"))
        );
        assert!(header_problem(b"HTTP/1.1\r\n\r\n").is_some());
        assert!(header_problem(b"NATS/1.0\r\nno colon\r\n\r\n").is_some());
    }

    #[test]
    fn lenient_headers_keep_what_can_be_read() {
        let h = lenient_headers(
            b"NATS/1.0\r\nAccount-Id: caf\xe9\r\nX: ab\rcd\r\nbad line\r\nOk: yes\r\n\r\n",
        );
        assert_eq!(h.get("Account-Id").map(|v| v.as_str()), Some("caf\u{fffd}"));
        assert_eq!(h.get("X").map(|v| v.as_str()), Some("ab cd"));
        assert_eq!(h.get("Ok").map(|v| v.as_str()), Some("yes"));
    }

    #[test]
    fn ack_subjects_follow_the_sample() {
        let v1 = "$JS.ACK.ORDERS.c.1.1.1.1796374552993097760.2";
        assert_eq!(
            ack_subject(Some(v1), "ORDERS", "c", 2, 9, 7).as_str(),
            "$JS.ACK.ORDERS.c.2.9.7.1796374552993097760.2"
        );
        let v2 = "$JS.ACK.hub.ACC.ORDERS.c.1.1.1.17963.2.xyz";
        assert_eq!(
            ack_subject(Some(v2), "ORDERS", "c", 1, 5, 4).as_str(),
            "$JS.ACK.hub.ACC.ORDERS.c.1.5.4.17963.2.xyz"
        );
        assert_eq!(
            ack_subject(None, "ORDERS", "c", 1, 5, 4).as_str(),
            "$JS.ACK.ORDERS.c.1.5.4.0.0"
        );
    }

    #[test]
    fn a_jump_of_first_deliveries_names_the_lost_range() {
        let mut t = Tracker::new(Some((10, 100)));
        assert_eq!(t.received(101, 11, 1, "r"), None);
        // Deliveries 12 and 13 (stream 102, 103) never arrived.
        assert_eq!(
            t.received(104, 14, 1, "r"),
            Some(Lost::Range {
                from: 102,
                to: 103,
                count: 2
            })
        );
        // A jump to a redelivery: only unreadable messages are looked for.
        assert_eq!(
            t.received(90, 16, 2, "r"),
            Some(Lost::Unreadable { to: 104 })
        );
        // The very first delivery of a new consumer lost.
        let mut t = Tracker::new(Some((0, 0)));
        assert_eq!(
            t.received(2, 2, 1, "r"),
            Some(Lost::Range {
                from: 1,
                to: 1,
                count: 1
            })
        );
        // Unknown start: the first delivery sets it.
        let mut t = Tracker::new(None);
        assert_eq!(t.received(50, 7, 1, "r"), None);
        assert_eq!(t.received(51, 8, 1, "r"), None);
    }

    #[test]
    fn a_count_ahead_and_standing_still_is_a_lost_tail() {
        let mut t = Tracker::new(Some((10, 100)));
        assert_eq!(t.received(101, 11, 1, "r"), None);
        assert_eq!(t.looked(11, 101, 100), None);
        // Two more delivered, not arrived: maybe on the way.
        assert_eq!(t.looked(13, 103, 100), None);
        // Still not arrived, and the count stood still: lost.
        assert_eq!(
            t.looked(13, 103, 100),
            Some(Lost::Range {
                from: 102,
                to: 103,
                count: 2
            })
        );
        assert_eq!(t.looked(13, 103, 100), None);
        // A redelivery lost at the tail: its stream sequence is below what was seen.
        assert_eq!(t.looked(14, 103, 100), None);
        assert_eq!(t.looked(14, 103, 100), Some(Lost::Unreadable { to: 103 }));
        t.rescued(102);
        assert!(t.was_rescued(102));
        t.looked(14, 103, 102);
        assert!(!t.was_rescued(102), "forgotten below the ack floor");
    }
}
