//! The audit log: every human action, newest first, with an edit's payload before and after; and,
//! for admins, ending every web session.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use super::{Nav, check_csrf, error_page, non_empty, query_escape, see_other, shown_payload, when};
use crate::api;
use crate::app::{Shared, WebUser};
use crate::auth::Role;

/// Records per page.
const PAGE: u32 = 50;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/audit", get(list))
        .route("/sessions/end", get(to_list).post(end_sessions))
}

/// One audit record.
pub struct AuditRow {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub message_id: Option<String>,
    pub service: String,
    pub key: String,
    pub note: String,
    /// An edit's payload before and after (masked for viewers).
    pub before: Option<String>,
    pub after: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "audit.html")]
pub struct AuditPage {
    pub nav: Nav,
    pub rows: Vec<AuditRow>,
    pub next: Option<String>,
    pub first: bool,
    /// An admin may end every session.
    pub is_admin: bool,
}

#[derive(Deserialize)]
struct AuditQuery {
    cursor: Option<String>,
}

async fn list(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Query(q): Query<AuditQuery>,
) -> Response {
    let cursor = q.cursor.as_deref().and_then(non_empty);
    let mut page = match s.store.audit(PAGE, cursor).await {
        Ok(p) => p,
        Err(e) => return error_page(Some(&who), e.into(), "/audit"),
    };
    let masked = api::masked_for(&s, &who);
    if let Err(e) = api::shown_audit(&s, &mut page.items, masked).await {
        return error_page(Some(&who), e, "/audit");
    }
    AuditPage {
        is_admin: who.role == Role::Admin,
        nav: Nav::new(&who, "audit"),
        rows: page
            .items
            .into_iter()
            .map(|a| AuditRow {
                at: when(a.at),
                actor: a.actor,
                action: a.action,
                message_id: a.message_id,
                service: a.service.unwrap_or_default(),
                key: a.key.unwrap_or_default(),
                note: a.note.unwrap_or_default(),
                before: a.before.as_deref().map(|t| shown_payload(t, masked)),
                after: a.after.as_deref().map(|t| shown_payload(t, masked)),
            })
            .collect(),
        next: page
            .next_cursor
            .map(|c| format!("/audit?cursor={}", query_escape(&c))),
        first: cursor.is_none(),
    }
    .into_response()
}

/// A form's address opened as a page: the page the form is on.
async fn to_list() -> Response {
    see_other("/audit")
}

#[derive(Deserialize)]
struct EndSessionsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    note: String,
}

/// Ends every web session, this one too: back to the login page.
async fn end_sessions(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Form(f): Form<EndSessionsForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    match crate::actions::end_all_sessions(&s, &who, non_empty(&f.note)).await {
        Ok(_) => see_other("/login"),
        Err(e) => error_page(Some(&who), e, "/audit"),
    }
}
