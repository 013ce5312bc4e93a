//! The holding-queue protocol of one key (SPEC §7), without I/O: what a sidecar does with a message
//! of a key given the key's hold, what the hold becomes after an outcome, and the next step of a
//! release. The sidecar performs the steps against NATS (KV `mend_holds`, stream MEND_HOLD); the model
//! in `tests/hold_model.rs` performs them against in-memory stores, with crashes between any two
//! steps, and checks the guarantees of SPEC §8.
//!
//! The order of the steps, which the sidecar and the model both follow, is what makes a crash at any
//! point recoverable:
//! - A failure: publish the envelope, then create the hold, then ack the message.
//! - A later message of a held key: append it to the hold queue, then ack it.
//! - The head's success (or its discard, or a release by hand): mark the hold `releasing`, then ack.
//! - A release, one held message at a time: deliver it, then delete it from the queue; when the queue
//!   is empty, purge the key's subject, then mark the hold resolved. A held message that fails:
//!   publish its envelope, make it the head (held again), then delete it from the queue.
//! - A retry that succeeds while its key is not held marks its lineage resolved too.
//! - A resolved entry is deleted once JetStream's duplicate window has passed.
//!
//! Why resolved entries: a failure's envelope is published with a `Nats-Msg-Id` of its lineage and
//! attempt. If the original's ack is lost (a crash between the publish and the ack), the original
//! comes back; should its lineage have been repaired and resolved meanwhile, failing it again would
//! publish an envelope JetStream drops as a duplicate and hold the key behind a head nobody repairs.
//! The entry recognises such a stale original, which is then acked without a delivery.

use serde::{Deserialize, Serialize};

/// A hold as stored in KV `mend_holds` under `<service>.<keytoken>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub service: String,
    pub binding: String,
    /// The binding's partition whose sidecar owns the key (0 for an unpartitioned binding).
    #[serde(default)]
    pub partition: u32,
    /// The key itself (the KV key holds its token).
    pub key: String,
    /// The lineage id whose resolution releases the key (while held or releasing), or the last one
    /// resolved (once resolved).
    pub head: String,
    pub state: HoldState,
    /// When the key became held (RFC 3339): the start of this hold, reset when a resolved entry is
    /// held again. Copies in the hold queue carry it (`Mend-Hold-Since`), which tells a copy of an
    /// earlier hold, stored late, from this hold's.
    pub since: String,
    /// Lineages of this key resolved lately, newest last (at most [`RESOLVED_KEPT`]): a stale copy of
    /// one of them (its ack lost in a crash) is settled, not delivered again behind the key's order.
    #[serde(default)]
    pub resolved: Vec<String>,
}

/// How many resolved lineages a hold entry remembers.
pub const RESOLVED_KEPT: usize = 64;

/// Where a key's hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    /// Later messages of the key wait in its hold queue until the head is resolved.
    Held,
    /// The head is resolved; the held messages are being delivered.
    Releasing,
    /// Not held. The entry remembers the last resolved lineage for as long as JetStream de-duplicates
    /// (so a stale redelivery of its original, whose re-delegation would be de-duplicated into
    /// nothing, is recognised and settled), then it is deleted.
    Resolved,
}

impl Hold {
    /// Whether later messages of the key wait.
    pub fn is_held(&self) -> bool {
        self.state != HoldState::Resolved
    }

    fn with(&self, head: &str, state: HoldState) -> Hold {
        Hold {
            head: head.to_owned(),
            state,
            ..self.clone()
        }
    }

    /// The same entry, remembering `lineage` as resolved.
    fn resolving(mut self, lineage: &str) -> Hold {
        if !self.resolved.iter().any(|r| r == lineage) {
            self.resolved.push(lineage.to_owned());
        }
        let excess = self.resolved.len().saturating_sub(RESOLVED_KEPT);
        self.resolved.drain(..excess);
        self
    }
}

/// Where a message comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The app stream.
    App,
    /// `mend.retry.<service>`: a repair or a resubmission.
    Retry,
}

/// What to do with a message of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Deliver it to the app.
    Deliver,
    /// Append it to the key's hold queue, then ack it.
    Hold,
    /// It is the head's original, or a copy of the lineage just resolved, redelivered after a crash or
    /// a lost ack: it was taken care of already; ack it.
    Settle,
}

/// Where a message of a key goes, given the key's hold entry. A retry of the head is delivered
/// although the key is held; anything else of a held key waits in its queue.
pub fn route(hold: Option<&Hold>, origin: Origin, lineage: &str) -> Route {
    match hold {
        None => Route::Deliver,
        // A copy of a lineage resolved already, or the head's original again (a stale copy whose ack
        // was lost): it was taken care of.
        Some(h) if h.resolved.iter().any(|r| r == lineage) => Route::Settle,
        Some(h) if h.head == lineage && origin == Origin::App => Route::Settle,
        Some(h) if !h.is_held() || h.head == lineage => Route::Deliver,
        Some(_) => Route::Hold,
    }
}

/// How a delivery ended, as far as holds are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The app took it (2xx) or asked to drop it: the lineage is finished.
    Done,
    /// It went to the processor (MEND_FAILED) or straight to the dashboard (MEND_PARKED): a person or
    /// a rule still has to resolve it, so its key is held behind it.
    Unresolved,
}

/// A change to a key's hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Keep,
    /// Create the hold (only if there is none: the KV create fails on an existing key).
    Create(Hold),
    /// Replace the hold (compare-and-set on the revision read).
    Update(Hold),
}

/// What the hold becomes after a delivery of `lineage` from `origin` ended with `outcome`. `fresh`
/// makes the entry to create when the key has none (its `head` is `lineage`); it is called only
/// then, or for a new hold's time: a free key's message that went through (most of them) needs
/// neither.
pub fn after_delivery(
    hold: Option<&Hold>,
    origin: Origin,
    lineage: &str,
    outcome: Outcome,
    fresh: impl FnOnce() -> Hold,
) -> Change {
    match (hold, outcome) {
        (None, Outcome::Done) if origin == Origin::App => Change::Keep,
        // A retry resolves its lineage: remembered, so its original's stale redelivery is settled.
        (None, Outcome::Done) => Change::Create(
            fresh()
                .with(lineage, HoldState::Resolved)
                .resolving(lineage),
        ),
        (None, Outcome::Unresolved) => Change::Create(fresh().with(lineage, HoldState::Held)),
        (Some(h), Outcome::Done) if h.is_held() && h.head == lineage => {
            Change::Update(h.with(lineage, HoldState::Releasing).resolving(lineage))
        }
        (Some(h), Outcome::Done) if !h.is_held() && origin == Origin::Retry => {
            Change::Update(h.with(lineage, HoldState::Resolved).resolving(lineage))
        }
        // A new hold of the key: it begins now (its copies are told from an earlier hold's by it).
        (Some(h), Outcome::Unresolved) if !h.is_held() => Change::Update(Hold {
            since: fresh().since,
            ..h.with(lineage, HoldState::Held)
        }),
        // A failed retry of the head stays the head; nothing else of a held key is delivered.
        _ => Change::Keep,
    }
}

/// What the hold becomes after a held message of `lineage`, delivered during a release, ended with
/// `outcome`: a failure makes it the new head and stops the release.
pub fn after_release_delivery(hold: &Hold, lineage: &str, outcome: Outcome) -> Change {
    match outcome {
        Outcome::Done => Change::Keep,
        Outcome::Unresolved => Change::Update(hold.with(lineage, HoldState::Held)),
    }
}

/// A command for a key from the dashboard (`mend.control.<service>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A person discarded `lineage`; when it is the head, the key's held messages are released.
    Discard { lineage: String },
    /// A person releases the key's held messages whatever its head.
    Release,
}

/// What the hold becomes on `command`; `fresh` is the entry to create when the key has none. A
/// discarded lineage of a key that is not held is remembered as resolved, so a stale redelivery of
/// its original is settled rather than delivered and held behind a head nobody will resolve.
pub fn after_command(hold: Option<&Hold>, command: &Command, fresh: Hold) -> Change {
    match (hold, command) {
        (None, Command::Discard { lineage }) => {
            Change::Create(fresh.with(lineage, HoldState::Resolved).resolving(lineage))
        }
        (Some(h), Command::Discard { lineage }) if !h.is_held() => {
            Change::Update(h.with(lineage, HoldState::Resolved).resolving(lineage))
        }
        (Some(h), Command::Discard { lineage }) if h.resolved.iter().any(|r| r == lineage) => {
            Change::Keep
        }
        (Some(h), Command::Discard { lineage })
            if h.state == HoldState::Held && &h.head == lineage =>
        {
            Change::Update(h.with(lineage, HoldState::Releasing).resolving(lineage))
        }
        // A discarded lineage that is not the head of a held or releasing key: a copy of it may wait
        // in the key's queue (its failure was parked, then a crash came before it became the head).
        // Remembered as resolved, the release skips that copy; otherwise it would be delivered, fail
        // again, be made the head, and its envelope, de-duplicated, would never come back to anyone.
        (Some(h), Command::Discard { lineage }) => Change::Update(h.clone().resolving(lineage)),
        (Some(h), Command::Release) if h.state == HoldState::Held => {
            Change::Update(h.with(&h.head, HoldState::Releasing))
        }
        (_, Command::Release) => Change::Keep,
    }
}

/// The next step of a release, given the first message left in the key's hold queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseStep {
    /// Deliver the held message at this sequence, then delete it from the queue.
    Deliver(u64),
    /// Delete it without delivering: it is the resolved head's own copy, left by a crash.
    Skip(u64),
    /// The queue is empty: purge the key's subject, then mark the hold resolved.
    Finish,
}

/// The entry a finished release leaves: resolved, remembering its head.
pub fn finished(hold: &Hold) -> Hold {
    hold.with(&hold.head, HoldState::Resolved)
}

/// The next step of the release of `hold` (state `releasing`); `first` is the first message left in
/// its queue: its sequence, lineage and the `since` of the hold it was appended to (when its copy
/// says). Skipped: copies of lineages resolved already (the head's own, left by a crash), and copies
/// appended to another hold of the key, an earlier one: an append by an instance that had lost the
/// key, held up on its way and stored after the hold was released. Its sender never saw it stored,
/// so never acked its original, which was delivered from the app stream instead.
pub fn release_step(hold: &Hold, first: Option<(u64, &str, Option<&str>)>) -> ReleaseStep {
    match first {
        None => ReleaseStep::Finish,
        Some((seq, lineage, _)) if hold.resolved.iter().any(|r| r == lineage) => {
            ReleaseStep::Skip(seq)
        }
        Some((seq, _, Some(since))) if since != hold.since => ReleaseStep::Skip(seq),
        Some((seq, _, _)) => ReleaseStep::Deliver(seq),
    }
}

/// Whether a message waiting in the queue of a `held` key is a retry of its head: one that arrived
/// before its lineage became the head (a repair or resubmission of a message that was itself held).
/// It is delivered as the head's retry; nothing else would ever deliver it.
pub fn is_head_retry(hold: &Hold, lineage: &str, attempt: u32) -> bool {
    hold.state == HoldState::Held && attempt > 1 && hold.head == lineage
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(head: &str, state: HoldState) -> Hold {
        Hold {
            service: "orders".into(),
            binding: "orders".into(),
            partition: 0,
            key: "acct-7".into(),
            head: head.into(),
            state,
            since: "2026-11-23T10:00:00Z".into(),
            resolved: Vec::new(),
        }
    }

    /// `hold(head, state)` remembering `lineages` as resolved.
    fn done(head: &str, state: HoldState, lineages: &[&str]) -> Hold {
        Hold {
            resolved: lineages.iter().map(|l| l.to_string()).collect(),
            ..hold(head, state)
        }
    }

    #[test]
    fn routes() {
        use HoldState::*;
        assert_eq!(route(None, Origin::App, "A:1"), Route::Deliver);
        let h = hold("A:1", Held);
        assert_eq!(route(Some(&h), Origin::Retry, "A:1"), Route::Deliver);
        assert_eq!(route(Some(&h), Origin::App, "A:1"), Route::Settle);
        assert_eq!(route(Some(&h), Origin::App, "A:2"), Route::Hold);
        assert_eq!(route(Some(&h), Origin::Retry, "A:0"), Route::Hold);
        let done = done("A:1", Resolved, &["A:1"]);
        assert_eq!(route(Some(&done), Origin::App, "A:1"), Route::Settle);
        assert_eq!(route(Some(&done), Origin::App, "A:2"), Route::Deliver);
        assert_eq!(route(Some(&done), Origin::Retry, "A:0"), Route::Deliver);
        assert_eq!(route(Some(&done), Origin::Retry, "A:1"), Route::Settle);
    }

    #[test]
    fn the_head_resolving_starts_a_release_and_a_failure_during_it_is_the_new_head() {
        use HoldState::*;
        let fresh = hold("", Held);
        let h = hold("A:1", Held);
        assert_eq!(
            after_delivery(Some(&h), Origin::Retry, "A:1", Outcome::Done, || fresh
                .clone()),
            Change::Update(done("A:1", Releasing, &["A:1"]))
        );
        assert_eq!(
            after_delivery(None, Origin::App, "A:1", Outcome::Unresolved, || fresh
                .clone()),
            Change::Create(hold("A:1", Held))
        );
        assert_eq!(
            after_delivery(None, Origin::App, "A:1", Outcome::Done, || fresh.clone()),
            Change::Keep
        );
        assert_eq!(
            after_delivery(None, Origin::Retry, "A:1", Outcome::Done, || fresh.clone()),
            Change::Create(done("A:1", Resolved, &["A:1"]))
        );
        assert_eq!(
            after_delivery(
                Some(&done("A:0", Resolved, &["A:0"])),
                Origin::App,
                "A:4",
                Outcome::Unresolved,
                || fresh
            ),
            Change::Update(done("A:4", Held, &["A:0"]))
        );
        assert_eq!(
            after_release_delivery(&hold("A:1", Releasing), "A:3", Outcome::Unresolved),
            Change::Update(hold("A:3", Held))
        );
        assert_eq!(
            release_step(&done("A:3", Releasing, &["A:3"]), Some((9, "A:3", None))),
            ReleaseStep::Skip(9)
        );
        let since = hold("A:3", Releasing).since;
        assert_eq!(
            release_step(&hold("A:3", Releasing), Some((11, "A:5", Some(&since)))),
            ReleaseStep::Deliver(11)
        );
        assert_eq!(
            release_step(
                &hold("A:3", Releasing),
                Some((12, "A:6", Some("2026-11-23T09:00:00Z")))
            ),
            ReleaseStep::Skip(12),
            "a copy appended to an earlier hold of the key"
        );
        assert!(is_head_retry(&hold("A:3", Held), "A:3", 2));
        assert!(!is_head_retry(&hold("A:3", Held), "A:3", 1));
        assert!(!is_head_retry(&hold("A:3", Releasing), "A:3", 2));
        assert_eq!(
            release_step(&hold("A:3", Releasing), Some((10, "A:4", None))),
            ReleaseStep::Deliver(10)
        );
        assert_eq!(
            release_step(&hold("A:3", Releasing), None),
            ReleaseStep::Finish
        );
        assert_eq!(finished(&hold("A:3", Releasing)), hold("A:3", Resolved));
    }

    #[test]
    fn commands() {
        use HoldState::*;
        let h = hold("A:1", Held);
        let fresh = || hold("", Held);
        let discard = |l: &str| Command::Discard { lineage: l.into() };
        assert_eq!(
            after_command(Some(&h), &discard("A:1"), fresh()),
            Change::Update(done("A:1", Releasing, &["A:1"]))
        );
        assert_eq!(
            after_command(Some(&h), &discard("A:2"), fresh()),
            Change::Update(done("A:1", Held, &["A:2"])),
            "a discarded lineage waiting behind the head is remembered, so the release skips it"
        );
        assert_eq!(
            after_command(Some(&done("A:1", Held, &["A:2"])), &discard("A:2"), fresh()),
            Change::Keep
        );
        assert_eq!(
            after_command(Some(&hold("A:1", Releasing)), &discard("A:3"), fresh()),
            Change::Update(done("A:1", Releasing, &["A:3"]))
        );
        assert_eq!(
            after_command(Some(&h), &Command::Release, fresh()),
            Change::Update(hold("A:1", Releasing))
        );
        assert_eq!(
            after_command(None, &Command::Release, fresh()),
            Change::Keep
        );
        assert_eq!(
            after_command(Some(&hold("A:1", Resolved)), &Command::Release, fresh()),
            Change::Keep
        );
        assert_eq!(
            after_command(None, &discard("A:5"), fresh()),
            Change::Create(done("A:5", Resolved, &["A:5"]))
        );
    }

    #[test]
    fn the_entry_is_json_with_a_snake_case_state() {
        let v = serde_json::to_value(hold("A:1", HoldState::Releasing)).unwrap_or_default();
        assert_eq!(v["state"], "releasing");
        assert_eq!(v["head"], "A:1");
    }
}
