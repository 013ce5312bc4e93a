//! A model of the holding-queue protocol of one key, checked over random interleavings of arrivals,
//! app answers, repairs, parkings, resubmissions, discards and sidecar crashes (SPEC §7, §8).
//!
//! The sidecar of the model takes its decisions from `repair_rules::holds`, the same functions the
//! real sidecar uses, and performs the same steps in the same order against in-memory stand-ins: the
//! app stream and the retry and control subjects (work queues with acks, redelivered until acked), the
//! KV hold, the hold queue (de-duplicated appends), MEND_FAILED (de-duplicated envelopes), the
//! processor, and a person at the dashboard. A crash can strike between any two steps; what was not
//! acked comes back, what was stored stays. When the schedule runs out, everything is drained without
//! crashes and the guarantees are checked:
//! - nothing lost: every message not discarded by the person reached the app with a 2xx;
//! - per-key order: the first successful deliveries follow the stream order;
//! - nothing stuck: no hold, held message, failure or unacked message is left.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::{BTreeMap, HashSet, VecDeque};

use proptest::prelude::*;
use repair_rules::holds::{
    Change, Command, Hold, HoldState, Origin, Outcome, ReleaseStep, Route, after_command,
    after_delivery, after_release_delivery, finished, is_head_retry, release_step, route,
};

/// How the app answers one delivery of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    /// A failure a rule repairs.
    Repairable,
    /// A failure no rule repairs: parked for the person.
    Unrepairable,
}

/// The processor parks a lineage once it reached this attempt (`max_repairs`).
const MAX_ATTEMPT: u32 = 4;

#[derive(Debug, Clone)]
struct Msg {
    n: usize,
    attempt: u32,
    /// Resubmitted by the person with a fix: the app takes it.
    fixed: bool,
}

struct Crash;

#[derive(Default)]
struct Model {
    /// Per message, the app's answers to its successive deliveries (then 2xx).
    answers: Vec<Vec<Answer>>,
    delivered: Vec<usize>,
    app_acked: Vec<bool>,
    retries: Vec<(Msg, bool)>,
    retry_ids: HashSet<(usize, u32)>,
    controls: Vec<(Command, bool)>,
    failed: VecDeque<(Msg, Answer)>,
    failed_ids: HashSet<(usize, u32)>,
    parked: VecDeque<Msg>,
    hold: Option<Hold>,
    queue: BTreeMap<u64, Msg>,
    queue_ids: HashSet<(usize, u32)>,
    next_seq: u64,
    /// The sidecar's memory of a release (lost in a crash): where the queue's undone part starts,
    /// and how many done messages wait to be purged.
    cursor: Option<u64>,
    done: u32,
    /// The app's successful deliveries, in order.
    successes: Vec<usize>,
    discarded: HashSet<usize>,
    /// Steps left before the sidecar crashes.
    crash_in: Option<u32>,
    crashes: u32,
}

fn lineage(n: usize) -> String {
    format!("APP:{n}")
}

fn fresh(n: usize) -> Hold {
    Hold {
        service: "orders".into(),
        binding: "orders".into(),
        partition: 0,
        key: "acct-7".into(),
        head: lineage(n),
        state: HoldState::Held,
        since: "2026-11-23T10:00:00Z".into(),
        resolved: Vec::new(),
    }
}

impl Model {
    fn new(answers: Vec<Vec<Answer>>) -> Self {
        let n = answers.len();
        Self {
            delivered: vec![0; n],
            app_acked: vec![false; n],
            answers,
            next_seq: 1,
            ..Self::default()
        }
    }

    /// A point between two steps of the sidecar, where it may crash.
    fn step(&mut self) -> Result<(), Crash> {
        match &mut self.crash_in {
            Some(0) => {
                self.crash_in = None;
                self.crashes += 1;
                Err(Crash)
            }
            Some(k) => {
                *k -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn app(&mut self, m: &Msg) -> Answer {
        let answer = if m.fixed {
            Answer::Ok
        } else {
            let i = self.delivered[m.n];
            self.answers[m.n].get(i).copied().unwrap_or(Answer::Ok)
        };
        self.delivered[m.n] += 1;
        if answer == Answer::Ok {
            self.successes.push(m.n);
        }
        answer
    }

    fn publish_failed(&mut self, m: &Msg, answer: Answer) {
        if self.failed_ids.insert((m.n, m.attempt)) {
            self.failed.push_back((m.clone(), answer));
        }
    }

    fn append(&mut self, m: &Msg) {
        if self.queue_ids.insert((m.n, m.attempt)) {
            self.queue.insert(self.next_seq, m.clone());
            self.next_seq += 1;
        }
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Keep => {}
            Change::Create(h) => {
                if self.hold.is_none() {
                    self.hold = Some(h);
                }
            }
            Change::Update(h) => self.hold = Some(h),
        }
    }

    /// A message from the app stream or the retry subject, through the key's lane.
    fn sidecar_message(&mut self, m: &Msg, origin: Origin) -> Result<(), Crash> {
        match route(self.hold.as_ref(), origin, &lineage(m.n)) {
            Route::Settle => {}
            Route::Hold => {
                self.append(m);
                self.step()?;
            }
            Route::Deliver => {
                let answer = self.app(m);
                self.step()?;
                let outcome = if answer == Answer::Ok {
                    Outcome::Done
                } else {
                    self.publish_failed(m, answer);
                    self.step()?;
                    Outcome::Unresolved
                };
                let change =
                    after_delivery(self.hold.as_ref(), origin, &lineage(m.n), outcome, || {
                        fresh(m.n)
                    });
                if change != Change::Keep {
                    self.apply(change);
                    self.step()?;
                }
            }
        }
        match origin {
            Origin::App => self.app_acked[m.n] = true,
            Origin::Retry => {
                if let Some(r) = self
                    .retries
                    .iter_mut()
                    .find(|(r, acked)| !acked && r.n == m.n && r.attempt == m.attempt)
                {
                    r.1 = true;
                }
            }
        }
        Ok(())
    }

    /// The release of the key's held messages, one at a time; while the key is held again, the
    /// head's retries that wait in the queue.
    fn sidecar_release(&mut self) -> Result<(), Crash> {
        loop {
            let hold = self.hold.clone().expect("a hold");
            let (seq, m, head_retry) = match hold.state {
                HoldState::Resolved => return Ok(()),
                HoldState::Held => {
                    let found = self
                        .queue
                        .iter()
                        .find(|(_, m)| is_head_retry(&hold, &lineage(m.n), m.attempt));
                    match found {
                        Some((s, m)) => (*s, m.clone(), true),
                        None => return Ok(()),
                    }
                }
                HoldState::Releasing => {
                    let first = self
                        .queue
                        .range(self.cursor.unwrap_or(0)..)
                        .next()
                        .map(|(s, m)| (*s, lineage(m.n)));
                    match release_step(&hold, first.as_ref().map(|(s, l)| (*s, l.as_str(), None))) {
                        ReleaseStep::Finish => {
                            self.queue.clear();
                            self.step()?;
                            self.hold = Some(finished(&hold));
                            return self.step();
                        }
                        ReleaseStep::Skip(seq) => {
                            self.advance(seq)?;
                            continue;
                        }
                        ReleaseStep::Deliver(seq) => (seq, self.queue[&seq].clone(), false),
                    }
                }
            };
            let answer = self.app(&m);
            self.step()?;
            let outcome = if answer == Answer::Ok {
                Outcome::Done
            } else {
                self.publish_failed(&m, answer);
                self.step()?;
                Outcome::Unresolved
            };
            let change = if head_retry {
                after_delivery(Some(&hold), Origin::Retry, &lineage(m.n), outcome, || {
                    fresh(m.n)
                })
            } else {
                after_release_delivery(&hold, &lineage(m.n), outcome)
            };
            if change != Change::Keep {
                self.apply(change);
                self.step()?;
            }
            if head_retry {
                self.queue.remove(&seq);
                self.step()?;
            } else if outcome == Outcome::Unresolved {
                // Purged through the new head's copy.
                self.queue.retain(|s, _| *s > seq);
                self.done = 0;
                self.step()?;
            } else {
                self.advance(seq)?;
            }
        }
    }

    /// A release is done with the message at `seq`: the queue's undone part starts after it; done
    /// messages are purged two at a time (the sidecar: `PURGE_EVERY`).
    fn advance(&mut self, seq: u64) -> Result<(), Crash> {
        self.cursor = Some(seq + 1);
        self.done += 1;
        if self.done >= 2 {
            self.queue.retain(|s, _| *s > seq);
            self.done = 0;
            self.step()?;
        }
        Ok(())
    }

    fn sidecar_control(&mut self, i: usize) -> Result<(), Crash> {
        let change = after_command(self.hold.as_ref(), &self.controls[i].0, fresh(0));
        if change != Change::Keep {
            self.apply(change);
            self.step()?;
        }
        self.controls[i].1 = true;
        Ok(())
    }

    fn processor(&mut self) {
        let Some((m, answer)) = self.failed.pop_front() else {
            return;
        };
        if answer == Answer::Repairable && m.attempt < MAX_ATTEMPT {
            let retry = Msg {
                attempt: m.attempt + 1,
                ..m
            };
            if self.retry_ids.insert((retry.n, retry.attempt)) {
                self.retries.push((retry, false));
            }
        } else {
            self.parked.push_back(m);
        }
    }

    fn person(&mut self, discard: bool) {
        let Some(m) = self.parked.pop_front() else {
            return;
        };
        if discard {
            self.discarded.insert(m.n);
            self.controls.push((
                Command::Discard {
                    lineage: lineage(m.n),
                },
                false,
            ));
        } else {
            let retry = Msg {
                attempt: m.attempt + 1,
                fixed: true,
                ..m
            };
            if self.retry_ids.insert((retry.n, retry.attempt)) {
                self.retries.push((retry, false));
            }
        }
    }

    /// The sidecar's next job for the key's lane, if any: a release in progress comes first.
    fn sidecar_job(&self, pick: usize) -> Option<Job> {
        if let Some(h) = &self.hold {
            let head_retry_waits = self
                .queue
                .values()
                .any(|m| is_head_retry(h, &lineage(m.n), m.attempt));
            if h.state == HoldState::Releasing || head_retry_waits {
                return Some(Job::Release);
            }
        }
        let mut jobs = Vec::new();
        if let Some(n) = self.app_acked.iter().position(|a| !a) {
            jobs.push(Job::App(n));
        }
        if let Some(i) = self.retries.iter().position(|(_, acked)| !acked) {
            jobs.push(Job::Retry(i));
        }
        if let Some(i) = self.controls.iter().position(|(_, acked)| !acked) {
            jobs.push(Job::Control(i));
        }
        (!jobs.is_empty()).then(|| jobs[pick % jobs.len()])
    }

    fn run_sidecar(&mut self, job: Job) {
        let result = match job {
            Job::Release => self.sidecar_release(),
            Job::App(n) => self.sidecar_message(
                &Msg {
                    n,
                    attempt: 1,
                    fixed: false,
                },
                Origin::App,
            ),
            Job::Retry(i) => {
                let m = self.retries[i].0.clone();
                self.sidecar_message(&m, Origin::Retry)
            }
            Job::Control(i) => self.sidecar_control(i),
        };
        // A crash loses only what the sidecar held in memory: unacked messages come back, and a
        // release starts again from the first message left in the queue.
        if result.is_err() {
            self.cursor = None;
            self.done = 0;
        }
    }

    fn quiet(&self) -> bool {
        self.sidecar_job(0).is_none() && self.failed.is_empty() && self.parked.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
enum Job {
    Release,
    App(usize),
    Retry(usize),
    Control(usize),
}

/// One move of the schedule: who acts, and whether the sidecar crashes during its job.
#[derive(Debug, Clone, Copy)]
struct Move {
    actor: u8,
    pick: u8,
    crash_after: Option<u8>,
    discard: bool,
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => Just(Answer::Ok),
        2 => Just(Answer::Repairable),
        1 => Just(Answer::Unrepairable),
    ]
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    prop::collection::vec(
        (
            0u8..4,
            any::<u8>(),
            prop::option::weighted(0.15, 0u8..8),
            prop::bool::weighted(0.3),
        )
            .prop_map(|(actor, pick, crash_after, discard)| Move {
                actor,
                pick,
                crash_after,
                discard,
            }),
        0..120,
    )
}

fn check(answers: Vec<Vec<Answer>>, schedule: Vec<Move>) -> Result<(), TestCaseError> {
    let count = answers.len();
    let mut m = Model::new(answers);
    for mv in schedule {
        match mv.actor {
            0 | 1 => {
                if let Some(job) = m.sidecar_job(usize::from(mv.pick)) {
                    m.crash_in = mv.crash_after.map(u32::from);
                    m.run_sidecar(job);
                    m.crash_in = None;
                }
            }
            2 => m.processor(),
            _ => m.person(mv.discard),
        }
    }
    // Drain: no more crashes or discards; the person resubmits what is parked.
    let mut rounds = 0;
    while !m.quiet() {
        rounds += 1;
        prop_assert!(rounds < 100_000, "no progress");
        if let Some(job) = m.sidecar_job(rounds) {
            m.run_sidecar(job);
        }
        m.processor();
        m.person(false);
    }

    let mut first = Vec::new();
    let mut seen = HashSet::new();
    for &n in &m.successes {
        if seen.insert(n) {
            first.push(n);
        }
    }
    let mut sorted = first.clone();
    sorted.sort_unstable();
    prop_assert_eq!(
        &first,
        &sorted,
        "first successes out of order: {:?}",
        m.successes
    );
    for n in 0..count {
        prop_assert!(
            seen.contains(&n) || m.discarded.contains(&n),
            "message {} lost; successes {:?}",
            n,
            m.successes
        );
    }
    prop_assert!(
        m.hold.as_ref().is_none_or(|h| !h.is_held()),
        "hold left: {:?}",
        m.hold
    );
    prop_assert!(m.queue.is_empty(), "held messages left: {:?}", m.queue);
    Ok(())
}

proptest! {
    // 3000 interleavings in `make test`; PROPTEST_CASES=300000 for a deeper search.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
    ))]

    #[test]
    fn holds_keep_order_and_lose_nothing_through_crashes(
        answers in prop::collection::vec(prop::collection::vec(answer(), 0..4), 1..8),
        schedule in moves(),
    ) {
        check(answers, schedule)?;
    }
}

/// The model finds what it is for: without the hold, a repaired message overtakes later ones.
#[test]
fn the_model_catches_a_protocol_that_delivers_past_a_held_key() {
    let mut m = Model::new(vec![vec![Answer::Repairable], vec![]]);
    // Message 0 fails and is delegated; forget the hold, as a protocol without holds would.
    m.run_sidecar(Job::App(0));
    m.hold = None;
    m.run_sidecar(Job::App(1));
    m.processor();
    let job = m.sidecar_job(0).unwrap();
    m.run_sidecar(job);
    assert_eq!(m.successes, [1, 0], "the model sees the reordering");
}
