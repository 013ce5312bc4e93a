//! Deliveries lost on the way (see [`crate::runtime::rescue`]): found by the consumer's sequences,
//! read from the stream's leader; and, when the pull stops, deliveries still on their way handed
//! back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use repair_rules::LineageId;

use super::binding::BindingRuntime;
use super::holdback::Quarantine;
use super::pull::{FLUSH_TIMEOUT, Puller};
use super::work::{Delivery, Held, HeldId, Inlet, Source};
use crate::common::{ack, otel};
use crate::runtime::headers::DeliveryMeta;
use crate::runtime::rescue;

/// Deliveries lost on the way (see [`crate::runtime::rescue`]): the tracker of the consumer's deliveries,
/// losses waiting to be looked for, and the search under way.
pub(crate) struct Lost {
    pub(crate) tracker: rescue::Tracker,
    pub(crate) waiting: VecDeque<rescue::Lost>,
    pub(crate) search: Option<Pin<Box<dyn Future<Output = Vec<Delivery>> + Send>>>,
}

impl Lost {
    pub(crate) fn new(delivered: Option<(u64, u64)>) -> Self {
        Self {
            tracker: rescue::Tracker::new(delivered),
            waiting: VecDeque::new(),
            search: None,
        }
    }

    /// Deliveries were lost: the lanes wait (newer messages are held back) until they are found.
    pub(crate) fn begin(&mut self, found: rescue::Lost, quarantine: &mut Option<Quarantine>) {
        tracing::warn!(
            ?found,
            "Deliveries lost on the way (a message the NATS client could not \
            read?); reading them from the stream."
        );
        self.waiting.push_back(found);
        match quarantine {
            Some(q) => q.rescuing = true,
            None => *quarantine = Some(Quarantine::rescue_only()),
        }
    }

    /// Starts looking for the next loss, if none is being looked for.
    pub(crate) fn next_search(
        &mut self,
        rt: &Arc<BindingRuntime>,
        consumer: &PullConsumer,
        held: &HashMap<HeldId, Held>,
    ) {
        if self.search.is_some() {
            return;
        }
        let Some(lost) = self.waiting.pop_front() else {
            return;
        };
        let mut skip: HashSet<u64> = held
            .keys()
            .filter(|id| id.inlet == Inlet::App)
            .map(|id| id.seq)
            .collect();
        skip.extend(self.tracker.rescued_seqs());
        let sample = self.tracker.sample().map(str::to_owned);
        let cseq = self.tracker.last_cseq().unwrap_or(0);
        self.search = Some(Box::pin(search(
            rt.clone(),
            consumer.clone(),
            lost,
            skip,
            (sample, cseq),
        )));
    }
}

/// Reads the messages of a loss from the stream's leader, as deliveries settled on built ack
/// subjects: every unseen one of a [`rescue::Lost::Range`], the unreadable ones of a
/// [`rescue::Lost::Unreadable`] (the others come again by themselves). Gives up (logged) when the
/// stream cannot be read; the messages then come again after their ack wait.
pub(crate) async fn search(
    rt: Arc<BindingRuntime>,
    mut consumer: PullConsumer,
    lost: rescue::Lost,
    skip: HashSet<u64>,
    (sample, cseq): (Option<String>, u64),
) -> Vec<Delivery> {
    let (from, to, count, unreadable_only) = match lost {
        rescue::Lost::Range { from, to, count } => (from, to, count, false),
        rescue::Lost::Unreadable { to } => match consumer.info().await {
            Ok(info) => (
                info.ack_floor.stream_sequence.saturating_add(1),
                to,
                u64::MAX,
                true,
            ),
            Err(error) => {
                tracing::warn!(%error, "Consumer state unknown; lost deliveries not looked for.");
                return Vec::new();
            }
        },
    };
    let name = consumer.cached_info().name.clone();
    // With one filter subject the server skips the stream's other subjects.
    let by_subject = match rt.cfg.subjects.as_slice() {
        [one] => Some(one.as_str()),
        _ => None,
    };
    let mut found = Vec::new();
    let (mut seq, mut reads, mut failures) = (from, 0, 0);
    while seq <= to && reads < rescue::MAX_READ && (found.len() as u64) < count {
        if rt.shutdown.is_cancelled() {
            break;
        }
        reads += 1;
        let m = match rescue::get(&rt.client, &rt.cfg.stream, seq, by_subject).await {
            Ok(Some(m)) => m,
            Ok(None) if by_subject.is_some() => break,
            Ok(None) => {
                seq += 1;
                continue;
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, seq, "Cannot read a lost delivery yet.");
                if failures >= 5 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        seq = m.seq + 1;
        let ours = rt
            .cfg
            .subjects
            .iter()
            .any(|f| repair_rules::rules::subject::matches(f, &m.subject));
        if m.seq > to || !ours || skip.contains(&m.seq) {
            if m.seq > to {
                break;
            }
            continue;
        }
        let problem = m.header_block.as_deref().and_then(rescue::header_problem);
        if unreadable_only && problem.is_none() {
            continue;
        }
        let headers = m.header_block.as_deref().map(rescue::lenient_headers);
        let unreadable = match (problem, m.header_block) {
            (Some(why), Some(raw)) => Some(Box::new(rescue::Unreadable { why, raw })),
            _ => None,
        };
        tracing::warn!(
            seq = m.seq,
            unreadable = unreadable.as_ref().map(|u| u.why.as_str()),
            "Lost delivery read from the stream."
        );
        let reply = ack::Reply::new(
            rescue::ack_subject(sample.as_deref(), &rt.cfg.stream, &name, 1, m.seq, cseq),
            rt.epoch.current(),
        );
        found.push(Delivery {
            payload: m.payload,
            headers,
            meta: DeliveryMeta {
                service: rt.service.clone(),
                lineage: LineageId::new(rt.cfg.stream.clone(), m.seq),
                key: None,
                attempt: 1,
                subject: m.subject,
                published: m.time,
                repaired_by: None,
                resubmitted_by: None,
            },
            history: Vec::new(),
            source: Source::Consumer {
                id: HeldId {
                    inlet: Inlet::App,
                    seq: m.seq,
                },
                reply,
            },
            unreadable,
            payload_object: None,
            trace: otel::Span::none(),
        });
    }
    found
}

/// Most deliveries handed back by their stream sequence when a pull stops: more are left to their
/// ack wait.
pub(crate) const HAND_BACK_UNARRIVED_MAX: u64 = 10_000;

/// Once the pull has stopped (its subscription dropped), hands back what the consumer delivered
/// to this instance that never arrived: first deliveries come in stream order, so every stream
/// sequence past the highest one received, up to the consumer's delivered sequence, was on its way
/// (a sequence the consumer does not hold pending is ignored by the server). Without this, such
/// messages would wait out their ack wait before another instance (or the next run) gets them.
pub(crate) async fn hand_back_unarrived(
    rt: &BindingRuntime,
    puller: &Puller,
    consumer: &mut PullConsumer,
    tracker: &rescue::Tracker,
) {
    // The flush's answer comes after the server has taken the unsubscribe: nothing more is sent.
    if let Some(client) = &puller.client {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await;
    }
    let info = match tokio::time::timeout(FLUSH_TIMEOUT, consumer.info()).await {
        Ok(Ok(info)) => info.clone(),
        _ => {
            tracing::debug!(
                "Consumer state unavailable; unarrived deliveries wait for their ack wait."
            );
            return;
        }
    };
    let to = info.delivered.stream_sequence;
    let from = tracker.high().saturating_add(1);
    if to < from || info.num_ack_pending == 0 {
        return;
    }
    let to = to.min(from.saturating_add(HAND_BACK_UNARRIVED_MAX - 1));
    tracing::info!(
        from,
        to,
        "Handing back deliveries that were still on their way."
    );
    for sseq in from..=to {
        let subject = rescue::ack_subject(
            tracker.sample(),
            &rt.cfg.stream,
            &info.name,
            1,
            sseq,
            info.delivered.consumer_sequence,
        );
        ack::hand_back(&rt.client, &ack::Reply::new(subject, rt.epoch.current())).await;
    }
}
