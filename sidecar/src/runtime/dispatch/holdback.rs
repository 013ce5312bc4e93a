//! Holding back newly pulled messages while earlier ones are still to come: a previous run's
//! unacked messages after a restart, or deliveries lost on the way while they are read.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use repair_rules::MessageKey;

use super::binding::BindingRuntime;
use super::work::Work;

/// After a crash, the previous instance's unacked messages come back only when their ack wait runs
/// out, while newer messages would be delivered at once: that would break per-key order. So on start,
/// while the consumer has unacked messages, newly pulled messages are held back until as many
/// redeliveries have arrived (or one ack wait has passed), then released in stream order.
///
/// The same holding back keeps the lanes waiting while deliveries lost on the way are read from
/// the stream ([`Lost`]): a lost message goes into its lane before its key's newer ones.
pub(crate) struct Quarantine {
    /// Until when the previous run's unacked messages are waited for; `None` once they are in (or
    /// when not waiting for them).
    pub(crate) until: Option<Instant>,
    pub(crate) expected: u64,
    pub(crate) redelivered: u64,
    /// Whether lost deliveries are being read.
    pub(crate) rescuing: bool,
    pub(crate) held_back: Vec<(Option<MessageKey>, Work)>,
}

impl Quarantine {
    pub(crate) fn rescue_only() -> Self {
        Self {
            until: None,
            expected: 0,
            redelivered: 0,
            rescuing: true,
            held_back: Vec::new(),
        }
    }
}

/// The start-up quarantine, if the consumer has unacked messages, and where the consumer's
/// deliveries stand (its delivered count and stream sequence; `None` if unknown).
pub(crate) async fn quarantine_on_start(
    rt: &BindingRuntime,
    consumer: &PullConsumer,
) -> (Option<Quarantine>, Option<(u64, u64)>) {
    let mut consumer = consumer.clone();
    let (unacked, delivered) = match consumer.info().await {
        Ok(info) => (
            info.num_ack_pending as u64,
            Some((
                info.delivered.consumer_sequence,
                info.delivered.stream_sequence,
            )),
        ),
        Err(error) => {
            tracing::warn!(%error, "Consumer state unknown; holding back new messages for one ack wait.");
            (u64::MAX, None)
        }
    };
    if unacked == 0 {
        return (None, delivered);
    }
    tracing::info!(
        unacked,
        "Unacked messages of a previous run: they come first, then newer ones, in stream order."
    );
    let quarantine = Quarantine {
        until: Some(Instant::now() + rt.cfg.ack_wait + Duration::from_secs(1)),
        expected: unacked,
        redelivered: 0,
        rescuing: false,
        held_back: Vec::new(),
    };
    (Some(quarantine), delivered)
}

/// Ends holding back once neither the previous run's messages nor lost deliveries are waited for:
/// everything held back enters its lane in stream order.
pub(crate) fn end_hold_back(
    quarantine: &mut Option<Quarantine>,
    lanes: &mut crate::runtime::lanes::Lanes<Work>,
) {
    if quarantine
        .as_ref()
        .is_none_or(|q| q.until.is_some() || q.rescuing)
    {
        return;
    }
    let Some(mut q) = quarantine.take() else {
        return;
    };
    q.held_back.sort_by_key(|(_, work)| work.seq());
    tracing::info!(
        released = q.held_back.len(),
        redelivered = q.redelivered,
        "Hold-back over."
    );
    for (key, work) in q.held_back {
        lanes.push(key, work);
    }
}

/// Ends holding back at once (shutdown): everything held back enters its lane, to be handed back.
pub(crate) fn end_hold_back_now(
    quarantine: &mut Option<Quarantine>,
    lanes: &mut crate::runtime::lanes::Lanes<Work>,
) {
    if let Some(q) = quarantine.as_mut() {
        q.until = None;
        q.rescuing = false;
    }
    end_hold_back(quarantine, lanes);
}
