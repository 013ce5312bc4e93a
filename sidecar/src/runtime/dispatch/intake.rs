//! Messages entering the dispatcher: pulled from the app stream or routed (retries, commands),
//! held (kept alive until settled) and put into their key's lane.

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use async_nats::jetstream::Message;
use repair_rules::LineageId;

use super::binding::BindingRuntime;
use super::holdback::{Quarantine, end_hold_back};
use super::lost::Lost;
use super::work::{Delivery, Held, HeldId, Inlet, Source, Work, key_of, meta_from};
use crate::common::{ack, otel};
use crate::runtime::headers::DeliveryMeta;
use crate::runtime::lanes::Lanes;
use crate::runtime::router::Inbound;

/// Starts holding `id`, kept alive from now on; `None` if it is held already (a redelivery: the one
/// held stays where it is and acks on the newest reply subject).
pub(crate) fn hold(
    rt: &BindingRuntime,
    held: &mut HashMap<HeldId, Held>,
    id: HeldId,
    subject: async_nats::Subject,
) -> Option<ack::Reply> {
    if let Some(h) = held.get_mut(&id) {
        rt.metrics.redelivered.increment(1);
        h.reply.redelivered(subject, rt.epoch.current());
        h.touched = Instant::now();
        return None;
    }
    let reply = ack::Reply::new(subject, rt.epoch.current());
    held.insert(
        id,
        Held {
            reply: reply.clone(),
            touched: Instant::now(),
        },
    );
    Some(reply)
}

/// Takes a pulled message into its key's lane, unless the sidecar already holds it (a redelivery
/// of a message still waiting: the original stays where it is).
pub(crate) fn admit(
    rt: &BindingRuntime,
    msg: Message,
    lanes: &mut crate::runtime::lanes::Lanes<Work>,
    held: &mut HashMap<HeldId, Held>,
    quarantine: &mut Option<Quarantine>,
    lost: &mut Lost,
) {
    let (seq, cseq, published, delivered) = match msg.info() {
        Ok(info) => (
            info.stream_sequence,
            info.consumer_sequence,
            SystemTime::from(info.published),
            info.delivered,
        ),
        Err(error) => {
            tracing::error!(%error, subject = %msg.subject, "Not a JetStream message; ignored.");
            return;
        }
    };
    let Some(subject) = msg.reply.clone() else {
        return;
    };
    let held_id = HeldId {
        inlet: Inlet::App,
        seq,
    };
    let delivered = u64::try_from(delivered).unwrap_or(1);
    if let Some(found) = lost
        .tracker
        .received(seq, cseq, delivered, subject.as_str())
    {
        lost.begin(found, quarantine);
    }
    let Some(reply) = hold(rt, held, held_id, subject) else {
        return;
    };
    let meta = DeliveryMeta {
        service: rt.service.clone(),
        lineage: LineageId::new(rt.cfg.stream.clone(), seq),
        key: None,
        attempt: 1,
        subject: msg.subject.as_str().to_owned(),
        published,
        repaired_by: None,
        resubmitted_by: None,
    };
    let d = Delivery {
        payload: msg.message.payload,
        headers: msg.message.headers,
        meta,
        history: Vec::new(),
        source: Source::Consumer { id: held_id, reply },
        unreadable: None,
        payload_object: None,
        trace: otel::Span::none(),
    };
    let redelivery = delivered > 1;
    enter(rt, d, redelivery, lanes, quarantine);
}

/// Puts a message of the app stream into its key's lane, or holds it back while the lanes wait for
/// earlier messages (the previous run's, or deliveries being rescued).
pub(crate) fn enter(
    rt: &BindingRuntime,
    mut d: Delivery,
    redelivery: bool,
    lanes: &mut crate::runtime::lanes::Lanes<Work>,
    quarantine: &mut Option<Quarantine>,
) {
    let keyed = rt
        .cfg
        .key
        .as_ref()
        .map(|source| key_of(source, d.headers.as_ref(), &d.payload));
    // A keyed binding fails closed: a message whose key cannot be read is never delivered outside
    // its key's order; it goes to a person.
    let (key, work) = match keyed {
        None | Some(Ok(None)) => (None, None),
        Some(Ok(Some(key))) => (Some(key), None),
        Some(Err(why)) => (None, Some(why)),
    };
    d.meta.key = key.clone();
    let work = match work {
        Some(why) => Work::Unkeyable(d, why),
        None => Work::Message(d),
    };
    match quarantine {
        Some(q) => {
            if redelivery {
                q.redelivered += 1;
            }
            q.held_back.push((key, work));
            if q.redelivered >= q.expected {
                q.until = None;
            }
            end_hold_back(quarantine, lanes);
        }
        None => lanes.push(key, work),
    }
}

/// Takes a routed retry or command into its key's lane (the dispatcher calls this).
pub(crate) fn admit_routed(
    rt: &BindingRuntime,
    inbound: Inbound,
    lanes: &mut Lanes<Work>,
    held: &mut HashMap<HeldId, Held>,
) {
    let (msg, inlet) = match &inbound {
        Inbound::Retry(msg) => (msg, Inlet::Retry),
        Inbound::Control { msg, .. } => (msg, Inlet::Control),
    };
    let Ok(info) = msg.info() else {
        tracing::error!(subject = %msg.subject, "Not a JetStream message; ignored.");
        return;
    };
    let id = HeldId {
        inlet,
        seq: info.stream_sequence,
    };
    let Some(subject) = msg.reply.clone() else {
        return;
    };
    let Some(reply) = hold(rt, held, id, subject) else {
        return;
    };
    match inbound {
        Inbound::Retry(msg) => {
            let fallback = LineageId::new(rt.cfg.stream.clone(), 0);
            let (meta, history) = meta_from(
                rt,
                msg.headers.as_ref(),
                &msg.payload,
                msg.subject.as_str(),
                2,
                fallback,
            );
            let key = meta.key.clone();
            // A resubmission too large to publish names the object its payload is kept in.
            let payload_object = msg
                .headers
                .as_ref()
                .and_then(|m| m.get(repair_rules::headers::MEND_PAYLOAD_OBJECT))
                .filter(|_| msg.payload.is_empty())
                .map(|v| v.as_str().to_owned());
            let d = Delivery {
                payload: msg.message.payload,
                headers: msg.message.headers,
                meta,
                history,
                source: Source::Consumer { id, reply },
                unreadable: None,
                payload_object,
                trace: otel::Span::none(),
            };
            // A retry may be its held key's head: it goes before the key's newer messages (which
            // would only be held behind it) and ahead of other keys' turns.
            match key {
                Some(key) => lanes.push_urgent(key, Work::Message(d)),
                None => lanes.push(None, Work::Message(d)),
            }
        }
        Inbound::Control { key, command, .. } => {
            lanes.push(key, Work::Command { command, id, reply });
        }
    }
}
