//! The routing loops: each retry or command to the dispatcher of its binding here, handed back
//! when this instance does not consume that binding now, forwarded to the instance of its
//! partition.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use repair_rules::LineageId;
use repair_rules::headers as h;
use tokio::sync::mpsc;

use super::control::{Unknown, parse_control, partition_of_command, refuse_control};
use super::inbox::{Inbound, Inbox, Router, reply_of};
use super::park::park_unroutable;
use crate::common::ack;
use crate::common::publish::{self, Published};
use crate::runtime::config::BindingConfig;

/// How long a retry or command is handed back for when this instance does not consume its binding
/// now (it waits for the lease, or lost it): long enough for another instance to pull it first.
pub(crate) const NOT_HERE_DELAY: Duration = Duration::from_secs(1);

/// How long a command is handed back for when its partition cannot be looked up now.
pub(crate) const LOOKUP_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Forwards of one message between partitions before it is taken as a loop (instances that disagree
/// on the partitions) and parked or refused.
pub(crate) const MAX_FORWARDS: usize = 4;

/// The suffix a forward adds to the message's `Nats-Msg-Id`.
pub(crate) const FORWARD_SUFFIX: &str = ":fwd";

/// Pulls retries (from the shared consumer or this instance's partition's) and routes each until
/// shutdown.
pub async fn route(router: Arc<Router>, consumer: PullConsumer) {
    pull_and_route(router, consumer, Inbox::Retry).await
}

/// Pulls commands (from the shared consumer or this instance's partition's) and routes each until
/// shutdown.
pub async fn route_control(router: Arc<Router>, consumer: PullConsumer) {
    pull_and_route(router, consumer, Inbox::Control).await
}

pub(crate) async fn pull_and_route(router: Arc<Router>, consumer: PullConsumer, inbox: Inbox) {
    loop {
        if !router.dispatchers.any_open(&router.shutdown).await {
            return;
        }
        let Some(mut messages) = crate::common::nats::pull(&consumer, 64, &router.shutdown).await
        else {
            return;
        };
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = router.shutdown.cancelled() => return,
            };
            match next {
                Some(Ok(msg)) => match inbox {
                    Inbox::Retry => route_retry(&router, msg).await,
                    Inbox::Control => route_command(&router, msg).await,
                },
                Some(Err(error)) if crate::common::nats::pull_went_silent(&error) => {
                    tracing::warn!(%error, ?inbox, "Pull of retries or commands went silent; pulling anew.");
                    break;
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, ?inbox, "Pull of retries or commands failed; continuing.")
                }
                None => break,
            }
        }
    }
}

/// Sends a retry to its binding's dispatcher, forwards it to its partition's instance, or parks it.
pub(crate) async fn route_retry(router: &Router, msg: Message) {
    let Some(i) = binding_of(&router.bindings, &msg) else {
        let detail = "no valid Mend-Id, or no binding consumes its stream";
        park_unroutable(router, msg, detail).await;
        return;
    };
    let b = &router.bindings[i];
    if b.is_partitioned() {
        let original = msg
            .headers
            .as_ref()
            .and_then(|m| m.get(h::MEND_ORIGINAL_SUBJECT))
            .map(|v| v.as_str().to_owned());
        match original.as_deref().and_then(|s| b.partition_of(s)) {
            Some(k) if k != router.partition => {
                forward(router, msg, Inbox::Retry, k).await;
                return;
            }
            Some(_) => {}
            None => {
                let detail = format!(
                    "its Mend-Original-Subject ({}) is in no partition of binding {}",
                    original.as_deref().unwrap_or("missing"),
                    b.name
                );
                park_unroutable(router, msg, &detail).await;
                return;
            }
        }
    }
    dispatch(router, i, Inbound::Retry(msg)).await;
}

/// Sends a command to its binding's dispatcher, forwards it to its partition's instance, or refuses
/// it.
pub(crate) async fn route_command(router: &Router, msg: Message) {
    let parsed = match parse_control(&router.bindings, &msg) {
        Ok(parsed) => parsed,
        Err(reason) => return refuse_control(router, msg, &reason).await,
    };
    let b = &router.bindings[parsed.binding];
    if b.is_partitioned() {
        match partition_of_command(router, b, &parsed).await {
            Ok(k) if k != router.partition => return forward(router, msg, Inbox::Control, k).await,
            Ok(_) => {}
            Err(Unknown::Refuse(reason)) => return refuse_control(router, msg, &reason).await,
            Err(Unknown::NotNow(error)) => {
                tracing::warn!(
                    error,
                    "Partition of a command unknown for now; it comes back."
                );
                return later(router, msg, LOOKUP_RETRY_DELAY).await;
            }
        }
    }
    let cm = &parsed.cm;
    // Escaped (Debug): whoever may publish commands cannot forge log lines with a newline.
    tracing::info!(
        action = ?cm.action,
        key = ?cm.key,
        id = ?cm.id,
        by = ?cm.by,
        note = ?cm.note,
        "Command from the dashboard."
    );
    let inbound = Inbound::Control {
        msg,
        key: Some(parsed.key),
        command: parsed.command,
    };
    dispatch(router, parsed.binding, inbound).await;
}

/// Hands a routed message to binding `i`'s dispatcher; while this instance does not consume the
/// binding, hands it back for another instance.
pub(crate) async fn dispatch(router: &Router, i: usize, inbound: Inbound) {
    let inbound = match router.dispatchers.sender(i) {
        Some(to) => match to.send(inbound).await {
            Ok(()) => return,
            // The dispatcher stopped meanwhile.
            Err(mpsc::error::SendError(inbound)) => inbound,
        },
        None => inbound,
    };
    tracing::debug!(
        binding = router.bindings[i].name,
        "This instance does not consume the binding now; handing the message back."
    );
    later(router, inbound.into_message(), NOT_HERE_DELAY).await;
}

/// Hands a message back to be redelivered after `delay` (to whichever instance pulls first).
pub(crate) async fn later(router: &Router, msg: Message, delay: Duration) {
    if let Some(reply) = reply_of(router, &msg) {
        ack::hand_back_after(&router.client, &reply, delay).await;
    }
}

/// Publishes a retry or command to partition `k`'s own subject (with its headers and payload, and
/// the `Nats-Msg-Id` of the message plus `:fwd`), then acks it.
pub(crate) async fn forward(router: &Router, msg: Message, inbox: Inbox, k: u32) {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let own_id = msg
        .headers
        .as_ref()
        .and_then(|m| m.get(h::NATS_MSG_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| format!("{}:{seq}", inbox.stream()));
    if own_id.matches(FORWARD_SUFFIX).count() >= MAX_FORWARDS {
        let why = format!(
            "forwarded between partitions {MAX_FORWARDS} times: do all instances agree on the \
             binding's partitions?"
        );
        match inbox {
            Inbox::Retry => park_unroutable(router, msg, &why).await,
            Inbox::Control => refuse_control(router, msg, &why).await,
        }
        return;
    }
    let msg_id = format!("{own_id}{FORWARD_SUFFIX}");
    let subject = inbox.partition_subject(&router.service, k);
    // The publish expectations of the original were met when it was stored; its Nats-Msg-Id is
    // replaced by the forward's.
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in msg.headers.iter().flat_map(|m| m.iter()) {
        let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        if lower.starts_with("nats-expected") {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    let Some(reply) = reply_of(router, &msg) else {
        return;
    };
    match publish::durably(
        &router.js,
        &router.shutdown,
        &subject,
        &msg_id,
        headers,
        msg.payload.clone(),
    )
    .await
    {
        Ok(Published::Stored { .. }) => {
            tracing::info!(
                ?inbox,
                seq,
                partition = k,
                to = subject,
                "Forwarded to the instance of the partition that owns it."
            );
            ack::confirm(&router.client, &reply, &router.epoch, router.ack_wait).await;
        }
        Ok(Published::TooLarge) => {
            // It was stored once, so only a server whose max_payload shrank gets here.
            tracing::error!(
                ?inbox,
                seq,
                to = subject,
                "Too large to forward; it stays unacked."
            );
        }
        Err(_) => ack::hand_back(&router.client, &reply).await,
    }
}

/// The binding whose stream the retry's lineage is from (and whose subjects match its original
/// subject, on any partition, when several bindings read that stream).
pub(crate) fn binding_of(bindings: &[BindingConfig], msg: &Message) -> Option<usize> {
    let headers = msg.headers.as_ref()?;
    let lineage: LineageId = headers.get(h::MEND_ID)?.as_str().parse().ok()?;
    let original = headers.get(h::MEND_ORIGINAL_SUBJECT).map(|v| v.as_str());
    let same_stream = || {
        bindings
            .iter()
            .enumerate()
            .filter(|(_, b)| b.stream == lineage.stream)
    };
    same_stream()
        .find(|(_, b)| original.is_some_and(|s| b.consumes(s)))
        .or_else(|| same_stream().next())
        .map(|(i, _)| i)
}
