//! The last stage of every piece of work on a consumer's message: ack (confirmed or not), hand back
//! or leave it, as the work's [`Settle`] says.

use tracing::Instrument;

use super::binding::BindingRuntime;
use super::work::{Delivery, Source};
use crate::common::ack;
use crate::common::publish::NotStored;
use crate::runtime::holds::HoldError;

/// How a piece of work on a consumer's message ended, which says how to settle the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done with it: ack, confirmed before the key's next message.
    Ack,
    /// Done with it, and a lost ack would do no harm (its effects are stored under de-duplicating
    /// ids): ack without waiting for the confirmation.
    AckPlain,
    /// Not done before shutdown (or this instance no longer owns the key): hand it back.
    HandBack,
    /// It cannot be finished now: left unacked, redelivered after its ack wait.
    Leave,
    /// Another instance changed this binding's holds: hand it back, and the binding stops (its
    /// dispatcher stops it, told by [`StopBinding`]).
    StopBinding,
}

/// What settling tells the work that settled: the binding must stop (see [`Settle::StopBinding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StopBinding;

impl From<NotStored> for Settle {
    fn from(e: NotStored) -> Self {
        match e {
            NotStored::Stopped => Settle::HandBack,
            // An immediate redelivery would fail the same way at once.
            NotStored::Unpublishable => Settle::Leave,
        }
    }
}

/// What a failed hold operation means for the message being worked on.
impl From<HoldError> for Settle {
    fn from(error: HoldError) -> Self {
        match error {
            HoldError::Stopped => Settle::HandBack,
            HoldError::Conflict { .. } => {
                tracing::error!(%error, "Another instance changed this binding's holds.");
                Settle::StopBinding
            }
            HoldError::Unstorable { .. } => {
                tracing::error!(%error, "Hold not stored; the message stays unacked.");
                Settle::Leave
            }
        }
    }
}

/// Acks, hands back or leaves a consumer's message; a queued message is settled by its release.
pub(crate) async fn settle(
    rt: &BindingRuntime,
    d: &Delivery,
    how: Settle,
) -> Result<(), StopBinding> {
    match &d.source {
        // An ack logs only when the server does not answer; the other ways log what they do, in
        // the message's span.
        Source::Consumer { reply, .. } if how == Settle::Ack => settle_reply(rt, reply, how).await,
        Source::Consumer { reply, .. } => settle_reply(rt, reply, how).instrument(d.span()).await,
        Source::Queue { .. } if how == Settle::StopBinding => Err(StopBinding),
        Source::Queue { .. } => Ok(()),
    }
}

/// Acks, hands back or leaves the consumer's message with this reply subject.
pub(crate) async fn settle_reply(
    rt: &BindingRuntime,
    reply: &ack::Reply,
    how: Settle,
) -> Result<(), StopBinding> {
    match how {
        Settle::Ack => {
            ack::confirm(&rt.client, reply, &rt.epoch, rt.cfg.ack_wait).await;
        }
        Settle::AckPlain => Box::pin(ack::unconfirmed(&rt.client, reply)).await,
        Settle::HandBack => {
            tracing::warn!("Not finished; handing the message back.");
            Box::pin(ack::hand_back(&rt.client, reply)).await;
        }
        Settle::Leave => {}
        Settle::StopBinding => {
            Box::pin(ack::hand_back(&rt.client, reply)).await;
            return Err(StopBinding);
        }
    }
    Ok(())
}
