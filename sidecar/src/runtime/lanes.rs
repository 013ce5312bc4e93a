//! Per-key lanes (SPEC §7): messages of one key go to the app one at a time in arrival (stream)
//! order; different keys, and messages without a key, run concurrently up to `concurrency`.
//!
//! Pure bookkeeping with no I/O, owned by one binding's dispatcher. A key's next message starts only
//! after [`Lanes::done`] for the previous one, which the dispatcher calls after the confirmed ack.
//! Keys waiting for a slot are served round-robin, so one busy key cannot starve the others.

use std::collections::{HashMap, VecDeque};

use repair_rules::MessageKey;

/// The scheduling state of one binding.
#[derive(Debug)]
pub struct Lanes<M> {
    concurrency: usize,
    in_flight: usize,
    lanes: HashMap<MessageKey, Lane<M>>,
    /// Keys with queued messages and none in flight, in the order they became startable.
    ready: VecDeque<MessageKey>,
    unkeyed: VecDeque<M>,
    /// Alternates between keyed and unkeyed work when both wait.
    prefer_unkeyed: bool,
}

#[derive(Debug)]
struct Lane<M> {
    queue: VecDeque<M>,
    busy: bool,
}

impl<M> Lanes<M> {
    pub fn new(concurrency: usize) -> Self {
        Self {
            concurrency: concurrency.max(1),
            in_flight: 0,
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            unkeyed: VecDeque::new(),
            prefer_unkeyed: false,
        }
    }

    /// Queues `msg` behind the earlier messages of its key.
    pub fn push(&mut self, key: Option<MessageKey>, msg: M) {
        let Some(key) = key else {
            self.unkeyed.push_back(msg);
            return;
        };
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            queue: VecDeque::new(),
            busy: false,
        });
        lane.queue.push_back(msg);
        if !lane.busy && lane.queue.len() == 1 {
            self.ready.push_back(key);
        }
    }

    /// Queues `msg` ahead of the other waiting messages of its key, and the key ahead of the other
    /// keys waiting for a slot: for work that unblocks its key (a retry of a held key's head, the
    /// next turn of its release), which would otherwise wait for every other key's turn.
    pub fn push_urgent(&mut self, key: MessageKey, msg: M) {
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            queue: VecDeque::new(),
            busy: false,
        });
        lane.queue.push_front(msg);
        if !lane.busy {
            // It may be in `ready` further back too; `start_next` skips such stale entries.
            self.ready.push_front(key);
        }
    }

    /// The next message that may start now, if a slot is free and one waits.
    pub fn start_next(&mut self) -> Option<(Option<MessageKey>, M)> {
        if self.in_flight >= self.concurrency {
            return None;
        }
        let take_unkeyed =
            !self.unkeyed.is_empty() && (self.ready.is_empty() || self.prefer_unkeyed);
        self.prefer_unkeyed = !self.prefer_unkeyed;
        if take_unkeyed {
            let msg = self.unkeyed.pop_front()?;
            self.in_flight += 1;
            return Some((None, msg));
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            if lane.busy {
                continue;
            }
            let Some(msg) = lane.queue.pop_front() else {
                continue;
            };
            lane.busy = true;
            self.in_flight += 1;
            return Some((Some(key), msg));
        }
        if !self.unkeyed.is_empty() {
            let msg = self.unkeyed.pop_front()?;
            self.in_flight += 1;
            return Some((None, msg));
        }
        None
    }

    /// The message in flight for `key` is finished (acked or delegated): the key's next may start.
    pub fn done(&mut self, key: Option<&MessageKey>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(key) = key else { return };
        let Some(lane) = self.lanes.get_mut(key) else {
            return;
        };
        lane.busy = false;
        if lane.queue.is_empty() {
            self.lanes.remove(key);
        } else {
            self.ready.push_back(key.clone());
        }
    }

    /// Messages started and not yet done.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Removes and returns every message not yet started (on shutdown, to hand them back).
    pub fn drain_queued(&mut self) -> Vec<M> {
        let mut out: Vec<M> = self.unkeyed.drain(..).collect();
        for lane in self.lanes.values_mut() {
            out.extend(lane.queue.drain(..));
        }
        self.lanes.retain(|_, lane| lane.busy);
        self.ready.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Option<MessageKey> {
        Some(MessageKey(s.into()))
    }

    #[test]
    fn one_at_a_time_per_key_in_order() {
        let mut l = Lanes::new(8);
        for i in 0..3 {
            l.push(k("a"), i);
        }
        assert_eq!(l.start_next(), Some((k("a"), 0)));
        assert_eq!(l.start_next(), None, "a is busy");
        l.done(k("a").as_ref());
        assert_eq!(l.start_next(), Some((k("a"), 1)));
        l.done(k("a").as_ref());
        assert_eq!(l.start_next(), Some((k("a"), 2)));
        l.done(k("a").as_ref());
        assert_eq!(l.start_next(), None);
        assert!(l.lanes.is_empty());
    }

    #[test]
    fn concurrency_caps_keys_and_unkeyed() {
        let mut l = Lanes::new(2);
        l.push(k("a"), 1);
        l.push(k("b"), 2);
        l.push(k("c"), 3);
        l.push(None, 4);
        let first = [l.start_next(), l.start_next()];
        assert!(first.iter().all(Option::is_some));
        assert_eq!(l.start_next(), None);
        assert_eq!(l.in_flight(), 2);
        let (key, _) = first[0].clone().unwrap();
        l.done(key.as_ref());
        assert!(l.start_next().is_some());
    }

    #[test]
    fn busy_key_goes_round_robin() {
        let mut l = Lanes::new(1);
        l.push(k("a"), 1);
        l.push(k("a"), 2);
        l.push(k("b"), 3);
        assert_eq!(l.start_next(), Some((k("a"), 1)));
        l.done(k("a").as_ref());
        assert_eq!(
            l.start_next(),
            Some((k("b"), 3)),
            "b waited longer than a's second"
        );
        l.done(k("b").as_ref());
        assert_eq!(l.start_next(), Some((k("a"), 2)));
    }

    #[test]
    fn urgent_work_goes_first_and_stale_ready_entries_are_skipped() {
        let mut l = Lanes::new(1);
        l.push(k("a"), 1);
        l.push(k("b"), 2);
        l.push(k("b"), 3);
        l.push_urgent(MessageKey("b".into()), 9);
        assert_eq!(l.start_next(), Some((k("b"), 9)), "b's urgent work first");
        l.done(k("b").as_ref());
        assert_eq!(l.start_next(), Some((k("a"), 1)));
        l.done(k("a").as_ref());
        assert_eq!(l.start_next(), Some((k("b"), 2)));
        l.done(k("b").as_ref());
        assert_eq!(l.start_next(), Some((k("b"), 3)));
        l.done(k("b").as_ref());
        assert_eq!(l.start_next(), None, "no stale entry starts anything");
        // Urgent work for a busy key waits for it, then goes before its queue.
        l.push(k("c"), 4);
        l.push(k("c"), 5);
        assert_eq!(l.start_next(), Some((k("c"), 4)));
        l.push_urgent(MessageKey("c".into()), 8);
        assert_eq!(l.start_next(), None, "c is busy");
        l.done(k("c").as_ref());
        assert_eq!(l.start_next(), Some((k("c"), 8)));
    }

    #[test]
    fn drain_returns_everything_not_started() {
        let mut l = Lanes::new(1);
        l.push(k("a"), 1);
        l.push(k("a"), 2);
        l.push(None, 3);
        let started = l.start_next().unwrap();
        let mut rest = l.drain_queued();
        rest.sort();
        let mut expect = vec![1, 2, 3];
        expect.retain(|x| *x != started.1);
        assert_eq!(rest, expect);
        assert_eq!(l.start_next(), None);
    }
}
