//! Messages: the filtered list (with bulk resubmit/discard of a selection) and one message's page
//! (payload, headers, error, history, timeline; edit and resubmit, discard, try the rules).

use std::collections::HashMap;

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use super::{
    Nav, can_act, check_csrf, error_page, non_empty, pretty, query_escape, see_other,
    shown_payload, try_rules, when,
};
use crate::actions::{self, Edit};
use crate::api;
use crate::app::{ApiError, Principal, Shared, WebUser};
use crate::auth::{Role, mask};
use crate::jobs::{self, Kind};
use crate::store::{Filter, Message, Status};

/// Messages per page of the list.
const PAGE: u32 = 50;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/messages", get(list))
        .route("/messages/bulk", get(to_list).post(bulk))
        .route("/messages/{id}", get(detail))
        .route("/messages/{id}/resubmit", get(to_detail).post(resubmit))
        .route("/messages/{id}/discard", get(to_detail).post(discard))
        .route(
            "/messages/{id}/try",
            get(to_detail).post(try_rules::message),
        )
}

// A form's address opened as a page (a login in between turns a POST into a GET): the page the
// form is on.
async fn to_list() -> Response {
    see_other("/messages")
}

async fn to_detail(Path(id): Path<String>) -> Response {
    see_other(&detail_url(&id))
}

/// The page of message `id`.
pub fn detail_url(id: &str) -> String {
    format!("/messages/{}", query_escape(id))
}

/// The list with `filter`, from `cursor`.
pub fn list_url(filter: &Filter, cursor: Option<&str>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let status = filter.status.map(Status::as_str);
    for (name, value) in [
        ("service", filter.service.as_deref()),
        ("subject", filter.subject.as_deref()),
        ("status", status),
        ("code", filter.code.as_deref()),
        ("q", filter.q.as_deref()),
        ("group", filter.group.as_deref()),
        ("cursor", cursor),
    ] {
        if let Some(v) = value {
            parts.push(format!("{name}={}", query_escape(v)));
        }
    }
    if parts.is_empty() {
        "/messages".into()
    } else {
        format!("/messages?{}", parts.join("&"))
    }
}

/// An option of a select.
pub struct Opt {
    pub value: &'static str,
    pub label: &'static str,
    pub selected: bool,
}

/// The list's filters as the form shows them.
#[derive(Default)]
pub struct FilterForm {
    pub service: String,
    pub subject: String,
    pub code: String,
    pub q: String,
    pub group: String,
}

/// One row of the list.
pub struct MessageRow {
    pub id: String,
    pub status: &'static str,
    pub service: String,
    pub subject: String,
    pub key: String,
    pub code: String,
    pub title: String,
    pub attempt: u32,
    pub parked: String,
    /// The checkbox value (`<id>@<attempt shown>`) when the row can be selected.
    pub select: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "messages.html")]
pub struct MessagesPage {
    pub nav: Nav,
    pub filter: FilterForm,
    pub statuses: Vec<Opt>,
    pub rows: Vec<MessageRow>,
    /// The next page, with the same filters.
    pub next: Option<String>,
    /// The list from its start, when this page is not the first.
    pub first: Option<String>,
    /// Whether any row has a checkbox (and the bulk buttons are shown).
    pub selectable: bool,
    /// Whether any filter is set.
    pub filtered: bool,
}

impl MessagesPage {
    /// The statuses of the select, `any` first.
    pub fn status_options(selected: Option<Status>) -> Vec<Opt> {
        let mut opts = vec![Opt {
            value: "",
            label: "any",
            selected: selected.is_none(),
        }];
        opts.extend(Status::ALL.into_iter().map(|s| Opt {
            value: s.as_str(),
            label: s.as_str(),
            selected: selected == Some(s),
        }));
        opts
    }
}

/// The row of `m` (selectable when parked and `who` may act).
pub fn row_of(m: &Message, selectable: bool) -> MessageRow {
    let env = &m.envelope;
    MessageRow {
        id: m.id.clone(),
        status: m.status.as_str(),
        service: env.service.clone(),
        subject: env.subject.clone(),
        key: env.key.clone().unwrap_or_default(),
        code: env.error.code.clone().unwrap_or_default(),
        title: env.error.title.clone().unwrap_or_default(),
        attempt: m.attempt,
        parked: when(m.parked_at),
        select: (selectable && m.status == Status::Parked)
            .then(|| format!("{}@{}", m.id, m.attempt)),
    }
}

async fn list(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let f = match api::filter(&q) {
        Ok(f) => f,
        Err(e) => return error_page(Some(&who), e, "/messages"),
    };
    let cursor = q.get("cursor").map(String::as_str).and_then(non_empty);
    let mut page = match s.store.list(&f, PAGE, cursor).await {
        Ok(p) => p,
        Err(e) => return error_page(Some(&who), e.into(), "/messages"),
    };
    api::shown_page(&mut page, &f, api::masked_for(&s, &who));
    let act = can_act(&who);
    let rows: Vec<MessageRow> = page.items.iter().map(|m| row_of(m, act)).collect();
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let filtered = f.status.is_some()
        || f.service.is_some()
        || f.subject.is_some()
        || f.code.is_some()
        || f.q.is_some()
        || f.group.is_some();
    MessagesPage {
        nav: Nav::new(&who, "messages").with_done(q.get("done").map(String::as_str)),
        filter: FilterForm {
            service: text(&f.service),
            subject: text(&f.subject),
            code: text(&f.code),
            q: text(&f.q),
            group: text(&f.group),
        },
        statuses: MessagesPage::status_options(f.status),
        selectable: rows.iter().any(|r| r.select.is_some()),
        next: page.next_cursor.as_deref().map(|c| list_url(&f, Some(c))),
        first: cursor.map(|_| list_url(&f, None)),
        filtered,
        rows,
    }
    .into_response()
}

/// A selected row: `<id>@<attempt shown>`, or a bare id (its current attempt is used).
fn selected(value: &str) -> (&str, Option<u32>) {
    match value.rsplit_once('@') {
        Some((id, attempt)) => match attempt.parse() {
            Ok(a) => (id, Some(a)),
            Err(_) => (value, None),
        },
        None => (value, None),
    }
}

async fn bulk(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    };
    if let Err(page) = check_csrf(&who, field("csrf")) {
        return *page;
    }
    if let Err(e) = who.require(Role::Operator) {
        return error_page(Some(&who), e, "/messages");
    }
    let kind = match field("action") {
        "resubmit" => Kind::Resubmit,
        "discard" => Kind::Discard,
        other => {
            return error_page(
                Some(&who),
                ApiError::bad_request(format!(
                    "the action `{other}` is neither resubmit nor discard"
                )),
                "/messages",
            );
        }
    };
    let mut members: Vec<(String, u32)> = Vec::new();
    for (name, value) in &fields {
        if name != "id" {
            continue;
        }
        let (id, seen) = selected(value);
        if members.iter().any(|(m, _)| m == id) {
            continue;
        }
        let attempt = match seen {
            Some(a) => a,
            None => match s.store.get(id).await {
                Ok(Some(m)) => m.attempt,
                Ok(None) => {
                    return error_page(
                        Some(&who),
                        ApiError::not_found(format!("no message {id}")),
                        "/messages",
                    );
                }
                Err(e) => return error_page(Some(&who), e.into(), "/messages"),
            },
        };
        members.push((id.to_owned(), attempt));
    }
    if members.is_empty() {
        return error_page(
            Some(&who),
            ApiError::bad_request("no message was selected: tick the parked messages to act on"),
            "/messages",
        );
    }
    let note = non_empty(field("note")).map(str::to_owned);
    let p = jobs::start(s.clone(), who, kind, None, members, note, None);
    see_other(&super::jobs::job_url(&p.id))
}

/// A label and a value of the error.
pub struct Field {
    pub name: &'static str,
    pub value: String,
}

/// A step of the envelope's history.
pub struct HistoryRow {
    pub at: String,
    pub what: String,
    pub by: String,
    pub error: String,
    pub note: String,
}

/// A stored announcement about the message.
pub struct EventRow {
    pub at: String,
    pub kind: String,
    pub attempt: u32,
    pub source: String,
    pub rule: String,
    pub data: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "message.html")]
pub struct MessagePage {
    pub nav: Nav,
    pub id: String,
    pub status: &'static str,
    pub service: String,
    pub binding: String,
    pub subject: String,
    pub key: Option<String>,
    pub attempt: u32,
    pub group: String,
    pub reason: Option<String>,
    pub parked_at: String,
    pub updated_at: String,
    pub first_failed_at: String,
    pub failed_at: String,
    pub error: Vec<Field>,
    pub error_body: Option<String>,
    pub headers: Vec<(String, String)>,
    /// What the payload is (JSON, text, bytes, read from the stream).
    pub payload_kind: String,
    /// The payload as shown (masked for viewers), if it could be read.
    pub payload: Option<String>,
    /// Why the payload is not shown, or a remark on it.
    pub payload_note: Option<String>,
    pub history: Vec<HistoryRow>,
    pub timeline: Vec<EventRow>,
    /// Parked, and the reader may act: the resubmit and discard forms are shown.
    pub actionable: bool,
    /// The edit textarea's text (`None`: the payload cannot be edited as text; plain resubmit).
    pub edit: Option<String>,
    /// Why the last edit was refused.
    pub edit_error: Option<String>,
    /// The resubmit form's note, kept when the edit was refused.
    pub note: String,
    /// Whether the reader may try a draft rule file.
    pub can_draft: bool,
    pub rules_loaded: bool,
    /// Resolved by an edited resubmission: the rule drafted from the fix (the try form starts with
    /// it), or why no rule redoes it.
    pub rule_draft: Option<String>,
    pub no_draft: Option<String>,
}

/// The payload of a message as the page shows it.
struct PayloadView {
    kind: String,
    shown: Option<String>,
    note: Option<String>,
    /// The editable text (never masked), when it can be edited as text.
    edit: Option<String>,
}

async fn payload_view(s: &Shared, m: &Message, masked: &[String]) -> PayloadView {
    let env = &m.envelope;
    if let Some(b64) = &env.payload_base64 {
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64);
        return match decoded.as_deref().map(std::str::from_utf8) {
            Ok(Ok(text)) => PayloadView {
                kind: "text (not JSON)".into(),
                shown: Some(shown_payload_text(text, masked)),
                note: None,
                edit: Some(text.to_owned()),
            },
            Ok(Err(_)) => PayloadView {
                kind: "bytes (not text), base64".into(),
                shown: Some(if masked.is_empty() {
                    b64.clone()
                } else {
                    super::WITHHELD.into()
                }),
                note: Some("Bytes that are not text cannot be edited here; they can be resubmitted as they are.".into()),
                edit: None,
            },
            Err(e) => PayloadView {
                kind: "bytes".into(),
                shown: None,
                note: Some(format!("the stored payload is not base64: {e}")),
                edit: None,
            },
        };
    }
    if let Some(r) = &env.payload_ref {
        let kind = match &r.object {
            Some(object) => format!(
                "kept as {object} in the bucket mend_payloads ({} bytes, too large for the envelope)",
                r.size
            ),
            None => format!(
                "read from stream {} at sequence {} ({} bytes, too large for the envelope)",
                r.stream, r.seq, r.size
            ),
        };
        return match actions::payload_text(s, env).await {
            Ok(p) if p.is_json => {
                let edit = serde_json::from_str::<Value>(&p.text)
                    .map(|v| pretty(&v))
                    .unwrap_or(p.text.clone());
                PayloadView {
                    kind: format!("JSON, {kind}"),
                    shown: Some(shown_payload(&p.text, masked)),
                    note: None,
                    edit: Some(edit),
                }
            }
            Ok(p) => PayloadView {
                kind,
                shown: Some(shown_payload_text(&p.text, masked)),
                note: None,
                edit: Some(p.text),
            },
            Err(e) => PayloadView {
                kind,
                shown: None,
                note: Some(e.message),
                edit: None,
            },
        };
    }
    let mut shown = env.payload.clone();
    if !masked.is_empty() {
        mask(&mut shown, masked);
    }
    PayloadView {
        kind: "JSON".into(),
        shown: Some(pretty(&shown)),
        note: None,
        edit: Some(pretty(&env.payload)),
    }
}

/// Text that is not JSON: shown as it is, or withheld from a masked reader.
fn shown_payload_text(text: &str, masked: &[String]) -> String {
    if masked.is_empty() {
        text.to_owned()
    } else {
        super::WITHHELD.into()
    }
}

fn error_summary(e: &repair_rules::FailureError) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(status) = e.status {
        parts.push(status.to_string());
    }
    parts.push(e.kind.as_str().to_owned());
    if let Some(code) = &e.code {
        parts.push(code.clone());
    }
    let mut text = parts.join(" ");
    if let Some(title) = &e.title {
        text.push_str(": ");
        text.push_str(title);
    }
    if let Some(field) = &e.field {
        text.push_str(&format!(" ({field})"));
    }
    text
}

/// A refused edit: why, the person's text and note.
pub struct Refused {
    pub message: String,
    pub text: String,
    pub note: String,
}

/// The page of message `id` for `who`; with the refused edit, if any.
pub async fn detail_page(
    s: &Shared,
    who: &Principal,
    id: &str,
    refused: Option<Refused>,
) -> Result<MessagePage, ApiError> {
    let m = s
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    let mut timeline = s.store.timeline(id).await?;
    let masked = api::masked_for(s, who);
    let view = payload_view(s, &m, masked).await;
    let (rule_draft, no_draft) = if m.status == Status::Resolved {
        match crate::drafts::of(&s.store, &m, masked).await {
            Ok(text) => (Some(text), None),
            // Resolved without an edit: nothing to draft from.
            Err(e) if e.status == axum::http::StatusCode::CONFLICT => (None, None),
            Err(e) => (None, Some(e.message)),
        }
    } else {
        (None, None)
    };
    let mut m = m;
    api::redact_message(&mut m, &mut timeline, masked);
    let env = &m.envelope;
    let e = &env.error;
    let mut error = vec![Field {
        name: "kind",
        value: e.kind.as_str().into(),
    }];
    let optional: [(&'static str, Option<String>); 6] = [
        ("status", e.status.map(|s| s.to_string())),
        ("type", e.type_uri.clone()),
        ("code", e.code.clone()),
        ("field", e.field.clone()),
        ("title", e.title.clone()),
        ("detail", e.detail.clone()),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            error.push(Field { name, value });
        }
    }
    let headers = env
        .headers
        .iter()
        .flat_map(|(name, values)| values.iter().map(move |v| (name.clone(), v.clone())))
        .collect();
    let history = env
        .history
        .iter()
        .map(|h| HistoryRow {
            at: h.at.clone(),
            what: h.what.clone(),
            by: h.by.clone(),
            error: h.error.as_ref().map(error_summary).unwrap_or_default(),
            note: h.note.clone().unwrap_or_default(),
        })
        .collect();
    let timeline = timeline
        .iter()
        .map(|ev| EventRow {
            at: when(ev.at),
            kind: ev.kind.clone(),
            attempt: ev.attempt,
            source: ev.source.clone(),
            rule: ev.rule.clone().unwrap_or_default(),
            data: event_data(&ev.data),
        })
        .collect();
    let actionable = m.status == Status::Parked && can_act(who);
    let (edit, edit_error, note) = match refused {
        Some(r) => (Some(r.text), Some(r.message), r.note),
        None => (view.edit.filter(|_| actionable), None, String::new()),
    };
    Ok(MessagePage {
        nav: Nav::new(who, "messages"),
        id: m.id.clone(),
        status: m.status.as_str(),
        service: env.service.clone(),
        binding: env.binding.clone(),
        subject: env.subject.clone(),
        key: env.key.clone(),
        attempt: m.attempt,
        group: m.group_id.clone(),
        reason: env.reason.clone(),
        parked_at: when(m.parked_at),
        updated_at: when(m.updated_at),
        first_failed_at: env.first_failed_at.clone(),
        failed_at: env.failed_at.clone(),
        error,
        error_body: e.body.clone(),
        headers,
        payload_kind: view.kind,
        payload: view.shown,
        payload_note: view.note,
        history,
        timeline,
        actionable,
        edit,
        edit_error,
        note,
        can_draft: can_act(who),
        rules_loaded: (s.rules)().is_some(),
        rule_draft,
        no_draft,
    })
}

/// An announcement's data, without what the row already says.
fn event_data(data: &str) -> String {
    match serde_json::from_str::<Value>(data) {
        Ok(Value::Object(mut map)) => {
            for k in ["service", "id", "attempt"] {
                map.remove(k);
            }
            map.retain(|_, v| !v.is_null());
            if map.is_empty() {
                String::new()
            } else {
                Value::Object(map).to_string()
            }
        }
        Ok(Value::Null) => String::new(),
        Ok(v) => v.to_string(),
        Err(_) => data.to_owned(),
    }
}

#[derive(Deserialize)]
struct DoneQuery {
    done: Option<String>,
}

async fn detail(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Query(q): Query<DoneQuery>,
) -> Response {
    match detail_page(&s, &who, &id, None).await {
        Ok(mut page) => {
            page.nav = page.nav.with_done(q.done.as_deref());
            page.into_response()
        }
        Err(e) => error_page(Some(&who), e, "/messages"),
    }
}

/// The attempt a form says the person saw (empty: none).
pub fn seen_attempt(text: &str) -> Result<Option<u32>, ApiError> {
    match non_empty(text) {
        None => Ok(None),
        Some(t) => t
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("attempt `{t}` is not a number"))),
    }
}

#[derive(Deserialize)]
struct ResubmitForm {
    #[serde(default)]
    csrf: String,
    /// The edit textarea; absent from the plain resubmit form.
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    attempt: String,
    #[serde(default)]
    note: String,
}

/// What the form's text asks: `None` when it is the payload as it is (for JSON, the same value
/// however it is indented), else the text as an edit.
async fn edit_of(s: &Shared, id: &str, text: &str) -> Result<Option<Edit>, ApiError> {
    let m = s
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    let original = actions::payload_text(s, &m.envelope).await?;
    let same = if original.is_json {
        match (
            serde_json::from_str::<Value>(text),
            serde_json::from_str::<Value>(&original.text),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    } else {
        text == original.text.replace("\r\n", "\n")
    };
    Ok((!same).then(|| Edit::Text(text.to_owned())))
}

async fn resubmit(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Form(f): Form<ResubmitForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    let back = detail_url(&id);
    let seen = match seen_attempt(&f.attempt) {
        Ok(a) => a,
        Err(e) => return error_page(Some(&who), e, &back),
    };
    if let Err(e) = who.require(Role::Operator) {
        return error_page(Some(&who), e, &back);
    }
    // Browsers send a textarea's line breaks as CRLF.
    let text = f.payload.map(|t| t.replace("\r\n", "\n"));
    let edit = match &text {
        None => None,
        Some(t) => match edit_of(&s, &id, t).await {
            Ok(edit) => edit,
            Err(e) => return error_page(Some(&who), e, &back),
        },
    };
    match actions::resubmit(&s, &who, &id, seen, edit, non_empty(&f.note)).await {
        Ok(_) => see_other(&format!("{back}?done=resubmitted")),
        Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
            let refused = Refused {
                message: e.message,
                text: text.unwrap_or_default(),
                note: f.note,
            };
            match detail_page(&s, &who, &id, Some(refused)).await {
                Ok(page) => (StatusCode::UNPROCESSABLE_ENTITY, page).into_response(),
                Err(e) => error_page(Some(&who), e, &back),
            }
        }
        Err(e) => error_page(Some(&who), e, &back),
    }
}

#[derive(Deserialize)]
struct DiscardForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    attempt: String,
    #[serde(default)]
    note: String,
}

async fn discard(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Form(f): Form<DiscardForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    let back = detail_url(&id);
    let seen = match seen_attempt(&f.attempt) {
        Ok(a) => a,
        Err(e) => return error_page(Some(&who), e, &back),
    };
    match actions::discard(&s, &who, &id, seen, non_empty(&f.note)).await {
        Ok(_) => see_other(&format!("{back}?done=discarded")),
        Err(e) => error_page(Some(&who), e, &back),
    }
}
