//! Dry-runs: the loaded rules (or a draft rule file) against one message or a whole group, each
//! result shown before anything is resubmitted. Nothing is published.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::messages::detail_url;
use super::{Nav, can_act, check_csrf, error_page, non_empty, pretty, query_escape};
use crate::api;
use crate::app::{ApiError, Principal, Shared, WebUser};
use crate::auth::mask;
use crate::store::{Filter, MAX_PAGE, Status};

/// One message's dry-run.
pub struct TryRow {
    pub id: String,
    /// `repaired`, `parked` or `error`.
    pub decision: String,
    pub rule: String,
    pub reason: String,
    pub message: String,
    /// The repaired payload, indented (masked for viewers).
    pub payload: Option<String>,
}

/// A repaired payload offered for resubmission.
pub struct Offer {
    pub id: String,
    pub attempt: u32,
    pub payload: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "try.html")]
pub struct TryPage {
    pub nav: Nav,
    /// What was tried on: `message ORDERS:12` or `group ab12…`.
    pub target: String,
    /// Where the form posts to try again.
    pub action: String,
    pub back: String,
    /// The draft rule file tried (empty: the loaded rules).
    pub draft: String,
    pub can_draft: bool,
    pub rules_loaded: bool,
    /// Why nothing could be tried.
    pub error: Option<String>,
    pub results: Vec<TryRow>,
    /// One message: its result is shown open.
    pub single: bool,
    /// The group has more parked messages than were tried.
    pub more: bool,
    pub offer: Option<Offer>,
}

impl TryPage {
    pub fn count(&self, decision: &str) -> usize {
        self.results
            .iter()
            .filter(|r| r.decision == decision)
            .count()
    }
}

#[derive(Deserialize)]
pub struct TryForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub rules: String,
    /// `/rules/try`: a message id…
    #[serde(default)]
    pub id: String,
    /// …or a group…
    #[serde(default)]
    pub group: String,
    /// …or (when set) the whole parked backlog, of `service` when given, from `cursor` on.
    #[serde(default)]
    pub backlog: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub cursor: String,
}

/// A dry-run result of [`api::dry_run`] as a row (its payload masked with `masked`).
pub fn row_of(v: &Value, masked: &[String]) -> TryRow {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let payload = v.get("payload").map(|p| {
        let mut p = p.clone();
        if !masked.is_empty() {
            mask(&mut p, masked);
        }
        pretty(&p)
    });
    TryRow {
        id: text("id"),
        decision: text("decision"),
        rule: text("rule"),
        reason: text("reason"),
        message: text("message"),
        payload,
    }
}

fn page(
    s: &Shared,
    who: &Principal,
    section: &'static str,
    target: String,
    action: String,
    back: String,
) -> TryPage {
    TryPage {
        nav: Nav::new(who, section),
        target,
        action,
        back,
        draft: String::new(),
        can_draft: can_act(who),
        rules_loaded: (s.rules)().is_some(),
        error: None,
        results: Vec::new(),
        single: false,
        more: false,
        offer: None,
    }
}

/// The rules to try for `who`: a draft needs the operator role (it could copy masked fields into
/// the result). A draft that does not load, or no rules at all, is said on the page.
fn rules_for(
    s: &Shared,
    who: &Principal,
    draft: &str,
    page: &mut TryPage,
) -> Result<Option<std::sync::Arc<repair_rules::rules::RuleSet>>, ApiError> {
    if non_empty(draft).is_some() {
        if !can_act(who) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "trying a draft rule file needs the operator role (a draft could copy masked \
                     payload fields into its result); {} is {}. The loaded rules can be tried.",
                    who.name, who.role
                ),
            ));
        }
        page.draft = draft.replace("\r\n", "\n");
    }
    match api::rules_to_try(s, Some(&page.draft)) {
        Ok(r) => Ok(Some(r)),
        Err(e)
            if e.status == StatusCode::UNPROCESSABLE_ENTITY || e.status == StatusCode::CONFLICT =>
        {
            page.error = Some(e.message);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn refused(page: TryPage) -> Response {
    let status = if page.draft.is_empty() {
        StatusCode::CONFLICT
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (status, page).into_response()
}

/// Tries the rules (or `draft`) on message `id`.
pub async fn on_message(s: &Shared, who: &Principal, id: &str, draft: &str) -> Response {
    let back = detail_url(id);
    let mut page = page(
        s,
        who,
        "messages",
        format!("message {id}"),
        format!("{back}/try"),
        back.clone(),
    );
    let rules = match rules_for(s, who, draft, &mut page) {
        Ok(Some(r)) => r,
        Ok(None) => return refused(page),
        Err(e) => return error_page(Some(who), e, &back),
    };
    let m = match s.store.get(id).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return error_page(
                Some(who),
                ApiError::not_found(format!("no message {id}")),
                "/messages",
            );
        }
        Err(e) => return error_page(Some(who), e.into(), &back),
    };
    let masked = api::masked_for(s, who);
    let v = api::dry_run_shown(s, rules, &m, masked).await;
    if m.status == Status::Parked
        && can_act(who)
        && masked.is_empty()
        && v.get("decision").and_then(Value::as_str) == Some("repaired")
        && let Some(p) = v.get("payload")
    {
        page.offer = Some(Offer {
            id: m.id.clone(),
            attempt: m.attempt,
            payload: pretty(p),
        });
    }
    page.results.push(row_of(&v, masked));
    page.single = true;
    page.into_response()
}

/// Tries the rules (or `draft`) on the parked messages of group `group` (at most a page of them).
pub async fn on_group(s: &Shared, who: &Principal, group: &str, draft: &str) -> Response {
    let mut page = page(
        s,
        who,
        "groups",
        format!("group {group}"),
        format!("/groups/{}/try", query_escape(group)),
        "/groups".into(),
    );
    let rules = match rules_for(s, who, draft, &mut page) {
        Ok(Some(r)) => r,
        Ok(None) => return refused(page),
        Err(e) => return error_page(Some(who), e, "/groups"),
    };
    let filter = Filter {
        group: Some(group.to_owned()),
        status: Some(Status::Parked),
        ..Default::default()
    };
    let list = match s.store.list(&filter, MAX_PAGE, None).await {
        Ok(l) => l,
        Err(e) => return error_page(Some(who), e.into(), "/groups"),
    };
    if list.items.is_empty() {
        return error_page(
            Some(who),
            ApiError::not_found(format!("no parked messages in group {group}")),
            "/groups",
        );
    }
    let masked = api::masked_for(s, who);
    for m in &list.items {
        let v = api::dry_run_shown(s, rules.clone(), m, masked).await;
        page.results.push(row_of(&v, masked));
    }
    page.more = list.next_cursor.is_some();
    page.into_response()
}

/// `POST /messages/{id}/try`
pub(super) async fn message(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Form(f): Form<TryForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    on_message(&s, &who, &id, &f.rules).await
}

/// `POST /groups/{id}/try`
pub(super) async fn group(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Form(f): Form<TryForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    on_group(&s, &who, &id, &f.rules).await
}
