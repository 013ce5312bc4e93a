//! One piece of a key's lane, run: a message (delivered, held or settled as its key's hold says), a
//! release step, a command, forgetting a resolved hold, or parking a message whose key cannot be
//! read.

use std::sync::Arc;

use repair_rules::holds::{self as protocol, Outcome, Route};
use repair_rules::{ErrorKind, FailureError, MessageKey};
use tracing::Instrument;

use super::attempt::deliver;
use super::binding::{BindingRuntime, PAYLOAD_GONE, UNREADABLE_KEY};
use super::delegate;
use super::delegate::Destination;
use super::hold::{commit, hold_back, resolved};
use super::release;
use super::settle::{Settle, StopBinding, settle};
use super::work::{Delivery, Done, Work};

/// Runs one piece of a lane's work. Returns when the key may take its next, with what follows:
/// the key's next work, and whether the binding must stop. Every piece but a message is boxed: a
/// future is as large as its largest branch, and each message's is moved into place.
pub(crate) async fn process(rt: Arc<BindingRuntime>, key: Option<MessageKey>, work: Work) -> Done {
    let held_id = work.held_id();
    let was = work.chore();
    let next = match work {
        // No span around the whole message: each step that may log runs in the message's span
        // (`Delivery::span`), made only then. A span per message, made, formatted, entered on
        // every poll and closed, was ~15% of the sidecar's CPU with bulk delivery.
        Work::Message(d) => message(&rt, key.as_ref(), d).await,
        Work::Release => match (&rt.holds, &key) {
            (Some(holds), Some(key)) => {
                let span = tracing::info_span!("release", key = key.as_str());
                Box::pin(release::step(&rt, holds, key).instrument(span)).await
            }
            _ => Ok(None),
        },
        Work::Command { command, reply, .. } => {
            Box::pin(release::command(&rt, key.as_ref(), command, &reply)).await
        }
        Work::Forget => {
            if let (Some(holds), Some(key)) = (&rt.holds, &key) {
                Box::pin(holds.forget(key, crate::common::nats::DUPLICATE_WINDOW)).await;
            }
            Ok(None)
        }
        Work::Unkeyable(d, why) => Box::pin(park_unkeyable(&rt, d, why)).await,
    };
    let (then, stop) = match next {
        Ok(then) => (then.map(Box::new), false),
        Err(StopBinding) => (None, true),
    };
    Done {
        held_id,
        key,
        then,
        was,
        stop,
    }
}

/// A message of a keyed binding whose key cannot be read is never delivered outside its key's
/// order: it is parked for a person.
async fn park_unkeyable(
    rt: &BindingRuntime,
    mut d: Delivery,
    why: String,
) -> Result<Option<Work>, StopBinding> {
    d.receive();
    tracing::warn!(mend_id = %d.meta.lineage, why, "Key unreadable; parking the message.");
    let mut error = FailureError::bare(ErrorKind::Message, None);
    error.code = Some(UNREADABLE_KEY.to_owned());
    error.title = Some("the message's key cannot be read".to_owned());
    error.detail = Some(why);
    park(rt, &d, error, Destination::Unkeyable).await?;
    Ok(None)
}

/// Parks a message that cannot be delivered as it is, then settles it.
async fn park(
    rt: &BindingRuntime,
    d: &Delivery,
    error: FailureError,
    why: Destination,
) -> Result<(), StopBinding> {
    let how = match delegate::failure(rt, d, error, why).await {
        Ok(()) => {
            rt.metrics.parked.increment(1);
            Settle::Ack
        }
        Err(e) => e.into(),
    };
    settle(rt, d, how).await
}

/// A message from the app stream or the retry subject: delivered, held or settled as its key's hold
/// says, then acked. Returns the key's follow-up work (a release once its head is through).
async fn message(
    rt: &BindingRuntime,
    key: Option<&MessageKey>,
    mut d: Delivery,
) -> Result<Option<Work>, StopBinding> {
    d.receive();
    let d = if d.payload_object.is_some() && d.payload.is_empty() {
        let span = d.span();
        match Box::pin(referenced_payload(rt, d).instrument(span)).await? {
            Some(d) => d,
            None => return Ok(None),
        }
    } else {
        d
    };
    let lineage = d.meta.lineage.to_string();
    let (Some(key), Some(holds)) = (key, rt.holds.as_ref()) else {
        let how = match deliver(rt, &d, &lineage).await {
            Ok(Outcome::Done) if d.is_retry() => {
                match Box::pin(resolved(rt, &d, None).instrument(d.span())).await {
                    Ok(()) => Settle::Ack,
                    Err(how) => how,
                }
            }
            Ok(_) => Settle::Ack,
            Err(how) => how,
        };
        settle(rt, &d, how).await?;
        return Ok(None);
    };
    let hold = holds.get(key);
    let origin = d.origin();
    let (how, then) = match protocol::route(hold.as_ref(), origin, &lineage) {
        Route::Settle => {
            d.span().in_scope(|| {
                tracing::info!(
                    "A copy of a lineage this key has resolved already, or its held head's original: settled."
                );
            });
            (Settle::Ack, None)
        }
        // The rarer steps are boxed: a future is as large as its largest step, and every message's
        // is moved into place (holding back alone is ~8 KiB).
        Route::Hold => (
            Box::pin(hold_back(rt, holds, key, &d, hold.as_ref()).instrument(d.span())).await,
            None,
        ),
        Route::Deliver => match deliver(rt, &d, &lineage).await {
            Err(how) => (how, None),
            Ok(outcome) => {
                let fresh = || holds.fresh(key);
                let change =
                    protocol::after_delivery(hold.as_ref(), origin, &lineage, outcome, fresh);
                if matches!(change, protocol::Change::Keep) && !d.is_retry() {
                    // Nothing to store or announce (a free key's message went through).
                    (Settle::Ack, None)
                } else {
                    let commit = commit(rt, holds, key, &d, outcome, change);
                    match Box::pin(commit.instrument(d.span())).await {
                        Ok(releasing) => (Settle::Ack, releasing.then_some(Work::Release)),
                        Err(how) => (how, None),
                    }
                }
            }
        },
    };
    settle(rt, &d, how).await?;
    Ok(then)
}

/// A retry whose payload is kept as an object (a resubmission too large to publish) with its bytes
/// read back; `None` when it was settled instead: parked if the object is gone, left for
/// redelivery if the sidecar stops before it could be read.
async fn referenced_payload(
    rt: &BindingRuntime,
    mut d: Delivery,
) -> Result<Option<Delivery>, StopBinding> {
    let Some(object) = d.payload_object.clone().filter(|_| d.payload.is_empty()) else {
        return Ok(Some(d));
    };
    let mut pause = crate::common::backoff::RETRY_MIN;
    loop {
        match crate::common::payloads::load(&rt.js, &object).await {
            Ok(Some(bytes)) => {
                d.payload = bytes;
                return Ok(Some(d));
            }
            Ok(None) => {
                tracing::error!(object, "The payload object of a retry is gone; parking it.");
                let mut error = FailureError::bare(ErrorKind::Message, None);
                error.code = Some(PAYLOAD_GONE.to_owned());
                error.title = Some(format!("the payload object {object} is gone"));
                d.payload_object = None;
                park(rt, &d, error, Destination::PayloadGone).await?;
                return Ok(None);
            }
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                object,
                "Payload object of a retry not read yet; retrying."
            ),
        }
        if crate::common::backoff::back_off(&rt.shutdown, &mut pause)
            .await
            .is_err()
        {
            settle(rt, &d, Settle::Leave).await?;
            return Ok(None);
        }
    }
}
