//! Work the dispatcher schedules itself: a key's release steps and forgetting resolved holds (one of
//! each per key at a time), and the gauges of holds and of the consumer.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::PullConsumer;
use repair_rules::{LineageId, MessageKey};

use super::binding::BindingRuntime;
use super::work::{Chore, Done, Work};

/// Releases and forgets scheduled per key, so a key's lane has at most one of each.
#[derive(Default)]
pub(crate) struct Chores {
    pub(crate) releasing: HashSet<MessageKey>,
    pub(crate) forgetting: HashSet<MessageKey>,
}

impl Chores {
    /// Queues `work` for `key` unless the same chore is queued already.
    pub(crate) fn push(
        &mut self,
        lanes: &mut crate::runtime::lanes::Lanes<Work>,
        key: MessageKey,
        work: Work,
    ) {
        let fresh = match &work {
            Work::Release => self.releasing.insert(key.clone()),
            Work::Forget => self.forgetting.insert(key.clone()),
            _ => true,
        };
        if fresh {
            match work {
                // A release unblocks its key: its turn comes before the key's newer messages.
                Work::Release => lanes.push_urgent(key, work),
                work => lanes.push(Some(key), work),
            }
        }
    }

    /// A piece of work finished: its follow-up, if any, goes to the back of the key's lane.
    pub(crate) fn done(&mut self, lanes: &mut crate::runtime::lanes::Lanes<Work>, done: Done) {
        let Some(key) = done.key else { return };
        match (done.was, done.then.map(|then| *then)) {
            (Chore::Release, Some(Work::Release)) => lanes.push_urgent(key, Work::Release),
            (was, then) => {
                match was {
                    Chore::Release => self.releasing.remove(&key),
                    Chore::Forget => self.forgetting.remove(&key),
                    Chore::None => false,
                };
                if let Some(work) = then {
                    self.push(lanes, key, work);
                }
            }
        }
    }
}

/// How often the consumer's delivered count is compared with what arrived (lost deliveries).
pub(crate) const LOOK_EVERY: Duration = Duration::from_secs(1);

/// How often the hold gauges are set.
pub(crate) const GAUGES_EVERY: Duration = Duration::from_secs(1);

/// How often resolved holds are checked for being old enough to forget.
pub(crate) const FORGET_EVERY: Duration = Duration::from_secs(30);

/// Sets the hold gauges from the binding's holds, and makes a hold over the binding's alert age or
/// count loud once (until it is back under both): a warning and a `hold_alert` event.
pub(crate) fn hold_metrics(rt: &Arc<BindingRuntime>, alerted: &mut HashSet<MessageKey>) {
    let Some(holds) = &rt.holds else { return };
    let over = holds.over(rt.cfg.hold_alert_age, u64::from(rt.cfg.hold_alert_count));
    rt.metrics.hold_alerts.set(over.len() as f64);
    let now: HashSet<MessageKey> = over.iter().map(|(k, _, _)| k.clone()).collect();
    alerted.retain(|k| now.contains(k));
    for (key, hold, queued) in over {
        if !alerted.insert(key.clone()) {
            continue;
        }
        tracing::warn!(
            key = key.as_str(),
            head = hold.head,
            since = hold.since,
            held = queued,
            "A hold is over its alert age or count: its key waits for a person or a repair."
        );
        let rt = rt.clone();
        tokio::spawn(async move {
            let head = hold
                .head
                .parse::<LineageId>()
                .unwrap_or_else(|_| LineageId::new(rt.cfg.stream.clone(), 0));
            let event = crate::common::publish::Event {
                service: &rt.service,
                source: format!("urn:mend:sidecar:{}:{}", rt.service, rt.cfg.name),
                kind: "hold_alert",
                lineage: &head,
                attempt: 0,
                data: serde_json::json!({
                    "binding": rt.cfg.name,
                    "key": key.as_str(),
                    "head": hold.head,
                    "since": hold.since,
                    "held": queued,
                    "alert_age_seconds": rt.cfg.hold_alert_age.as_secs(),
                    "alert_count": rt.cfg.hold_alert_count,
                }),
            };
            if let Err(error) = crate::common::publish::announce(&rt.js, &rt.shutdown, event).await
            {
                tracing::debug!(?error, "hold_alert not announced before shutdown.");
            }
        });
    }
    let stats = holds.stats();
    rt.metrics.held_keys.set(stats.keys as f64);
    rt.metrics.held_messages.set(stats.messages as f64);
    let age = stats
        .oldest
        .and_then(|since| SystemTime::now().duration_since(since).ok())
        .unwrap_or_default();
    rt.metrics.hold_oldest_age.set(age.as_secs_f64());
}

/// Keeps the consumer metrics current: lag and unacked messages, from the server's view.
pub async fn watch_consumer(rt: Arc<BindingRuntime>, mut consumer: PullConsumer) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = rt.shutdown.cancelled() => return,
        }
        match consumer.info().await {
            Ok(info) => {
                rt.metrics.pending.set(info.num_pending as f64);
                rt.metrics.ack_pending.set(info.num_ack_pending as f64);
            }
            Err(error) => tracing::debug!(%error, "Consumer info unavailable."),
        }
    }
}
