//! Rule drafts (SPEC §9 "a rule from a fix"): a message whose edited resubmission resolved offers a
//! rule file that would have made the same repair ([`repair_rules::rules::draft`]).

use repair_rules::envelope::FailureEnvelope;
use serde_json::Value;

use crate::app::ApiError;
use crate::store::{Message, Status, Store};

/// The rule draft of message `m`, as a caller who sees `masked` hidden sees it (masked values are
/// masked in the payloads before drafting, so the draft never shows them).
pub async fn of(store: &Store, m: &Message, masked: &[String]) -> Result<String, ApiError> {
    if m.status != Status::Resolved {
        return Err(ApiError::conflict(format!(
            "{} is {}: a rule draft is offered once an edited resubmission resolved it",
            m.id,
            m.status.as_str()
        )));
    }
    let last = store.last_resubmission(&m.id).await?;
    let Some((before, after)) = last.and_then(|l| l.edit) else {
        return Err(ApiError::conflict(format!(
            "{} was resolved without an edit of its payload: there is no fix to draft a rule from",
            m.id
        )));
    };
    let read = |text: &str, what: &str| {
        serde_json::from_str::<Value>(text).map_err(|e| {
            ApiError::conflict(format!(
                "the payload {what} the edit of {} is not JSON ({e}): no rule can redo it",
                m.id
            ))
        })
    };
    let (mut before, mut after) = (read(&before, "before")?, read(&after, "after")?);
    crate::auth::mask(&mut before, masked);
    crate::auth::mask(&mut after, masked);
    let envelope = FailureEnvelope {
        payload: before,
        ..m.envelope.clone()
    };
    repair_rules::rules::draft::draft(&envelope, &after, &group_name(&envelope))
        .map_err(|why| ApiError::invalid(format!("no rule draft for {}: {why}", m.id)))
}

/// A failure group's name: service, subject and the error's code (or title, or kind).
pub fn group_name(envelope: &FailureEnvelope) -> String {
    let e = &envelope.error;
    let what = e
        .code
        .as_deref()
        .or(e.title.as_deref())
        .unwrap_or(e.kind.as_str());
    format!("{} {} {what}", envelope.service, envelope.subject)
}
