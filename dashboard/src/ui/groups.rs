//! Failure groups: parked messages of the same service, subject and error kind, code and title,
//! with bulk resubmit (canary first) and discard of a whole group, and a dry-run of the rules.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use super::{Nav, age, can_act, check_csrf, error_page, non_empty, see_other, try_rules, when};
use crate::app::{ApiError, Shared, WebUser};
use crate::auth::Role;
use crate::jobs::{self, Kind};
use crate::store::now_ms;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/groups", get(list))
        .route("/groups/{id}/resubmit", get(to_list).post(resubmit))
        .route("/groups/{id}/discard", get(to_list).post(discard))
        .route("/groups/{id}/try", get(to_list).post(try_rules::group))
}

/// A form's address opened as a page: the page the form is on.
async fn to_list() -> Response {
    see_other("/groups")
}

/// One failure group.
pub struct GroupRow {
    pub id: String,
    pub service: String,
    pub subject: String,
    pub kind: String,
    pub code: String,
    pub title: String,
    pub count: i64,
    pub oldest: String,
    pub age: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "groups.html")]
pub struct GroupsPage {
    pub nav: Nav,
    pub groups: Vec<GroupRow>,
    pub can_act: bool,
    pub rules_loaded: bool,
}

#[derive(Deserialize)]
struct DoneQuery {
    done: Option<String>,
}

async fn list(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Query(q): Query<DoneQuery>,
) -> Response {
    let groups = match s.store.groups().await {
        Ok(g) => g,
        Err(e) => return error_page(Some(&who), e.into(), "/"),
    };
    let now = now_ms();
    GroupsPage {
        nav: Nav::new(&who, "groups").with_done(q.done.as_deref()),
        groups: groups
            .into_iter()
            .map(|g| GroupRow {
                oldest: when(g.oldest_parked_at),
                age: age(u64::try_from((now - g.oldest_parked_at) / 1000).unwrap_or(0)),
                id: g.id,
                service: g.service,
                subject: g.subject,
                kind: g.error_kind,
                code: g.error_code.unwrap_or_default(),
                title: g.error_title.unwrap_or_default(),
                count: g.count,
            })
            .collect(),
        can_act: can_act(&who),
        rules_loaded: (s.rules)().is_some(),
    }
    .into_response()
}

#[derive(Deserialize)]
struct NoteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    note: String,
    /// A draft rule file to repair each message with first (resubmission only).
    #[serde(default)]
    rules: String,
}

async fn start(
    s: Shared,
    who: crate::app::Principal,
    kind: Kind,
    id: String,
    f: NoteForm,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    if let Err(e) = who.require(Role::Operator) {
        return error_page(Some(&who), e, "/groups");
    }
    let members = match s.store.group_members(&id).await {
        Ok(m) => m,
        Err(e) => return error_page(Some(&who), e.into(), "/groups"),
    };
    if members.is_empty() {
        return error_page(
            Some(&who),
            ApiError::not_found(format!("no parked messages in group {id}")),
            "/groups",
        );
    }
    let repair = match non_empty(&f.rules).filter(|_| kind == Kind::Resubmit) {
        Some(draft) => match crate::api::rules_to_try(&s, Some(draft)) {
            Ok(rules) => Some(rules),
            Err(e) => return error_page(Some(&who), e, "/groups"),
        },
        None => None,
    };
    let note = non_empty(&f.note).map(str::to_owned);
    let p = jobs::start(s.clone(), who, kind, Some(id), members, note, repair);
    see_other(&super::jobs::job_url(&p.id))
}

async fn resubmit(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Form(f): Form<NoteForm>,
) -> Response {
    start(s, who, Kind::Resubmit, id, f).await
}

async fn discard(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Form(f): Form<NoteForm>,
) -> Response {
    start(s, who, Kind::Discard, id, f).await
}
