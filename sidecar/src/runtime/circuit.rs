//! The app-health circuit of one binding (SPEC §4, guarantee 4): when every call fails transiently the
//! app is down, not the messages. Then the sidecar stops pulling, the messages in flight keep retrying
//! with backoff (they are the probes), and their tries do not count towards `transient_exhausted`.
//! Any non-transient answer closes the circuit.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use metrics::Gauge;

/// Consecutive transient answers, across all messages, that open the circuit.
pub const OPEN_AFTER: u32 = 5;

#[derive(Debug)]
pub struct Circuit {
    consecutive: AtomicU32,
    open: AtomicBool,
    gauge: Gauge,
}

impl Circuit {
    pub fn new(gauge: Gauge) -> Self {
        gauge.set(0.0);
        Self {
            consecutive: AtomicU32::new(0),
            open: AtomicBool::new(false),
            gauge,
        }
    }

    /// Records a transient answer; returns whether it counts as a try of that message.
    pub fn transient(&self) -> bool {
        let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= OPEN_AFTER && !self.open.swap(true, Ordering::AcqRel) {
            self.gauge.set(1.0);
            tracing::warn!(
                consecutive = n,
                "The app looks down: stopped pulling, probing with backoff."
            );
        }
        !self.is_open()
    }

    /// Records an answer that was not transient: the app is up.
    pub fn answered(&self) {
        self.consecutive.store(0, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            self.gauge.set(0.0);
            tracing::info!("The app answers again: pulling resumed.");
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_transients_and_closes_on_an_answer() {
        let c = Circuit::new(Gauge::noop());
        for _ in 1..OPEN_AFTER {
            assert!(c.transient(), "counts while closed");
        }
        assert!(!c.transient(), "the opening try does not count");
        assert!(c.is_open());
        assert!(!c.transient());
        c.answered();
        assert!(!c.is_open());
        assert!(c.transient());
    }
}
