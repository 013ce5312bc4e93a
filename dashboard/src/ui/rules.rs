//! The loaded rules with what they did, and a dry-run of them (or a draft) on a message or a group.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};

use super::try_rules::{self, TryForm};
use super::{Nav, can_act, check_csrf, error_page, non_empty};
use crate::app::{ApiError, Shared, WebUser};

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/rules", get(list))
        .route("/rules/try", get(to_list).post(try_one))
}

/// A form's address opened as a page: the page the form is on.
async fn to_list() -> Response {
    super::see_other("/rules")
}

/// One loaded rule.
pub struct RuleRow {
    pub name: String,
    /// `file:line`.
    pub origin: String,
    pub service: String,
    pub subject: String,
    /// The park reason, for a rule that parks.
    pub park: Option<String>,
    pub repaired: i64,
    pub parked: i64,
    /// Repairs whose retry failed again.
    pub failed: i64,
}

/// A group to pick in the try form.
pub struct GroupOpt {
    pub id: String,
    pub label: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "rules.html")]
pub struct RulesPage {
    pub nav: Nav,
    /// `None`: the dashboard has no `rules` configured.
    pub rules: Option<Vec<RuleRow>>,
    pub groups: Vec<GroupOpt>,
    pub can_draft: bool,
}

async fn list(State(s): State<Shared>, WebUser(who): WebUser) -> Response {
    let counts = match s.store.overview(0).await {
        Ok(o) => o.rules,
        Err(e) => return error_page(Some(&who), e.into(), "/"),
    };
    let groups = match s.store.groups().await {
        Ok(g) => g,
        Err(e) => return error_page(Some(&who), e.into(), "/"),
    };
    let count = |rule: &str, kind: &str| {
        counts
            .iter()
            .find(|(r, k, _)| r == rule && k == kind)
            .map_or(0, |(_, _, n)| *n)
    };
    let rules = (s.rules)().map(|set| {
        set.rules
            .iter()
            .map(|r| RuleRow {
                name: r.name.clone(),
                origin: format!("{}:{}", r.origin.0, r.origin.1),
                service: r.service.clone().unwrap_or_default(),
                subject: r.subject.clone().unwrap_or_default(),
                park: r.park.clone(),
                repaired: count(&r.name, "repaired"),
                parked: count(&r.name, "parked"),
                failed: count(&r.name, "failed"),
            })
            .collect()
    });
    RulesPage {
        nav: Nav::new(&who, "rules"),
        rules,
        groups: groups
            .into_iter()
            .map(|g| GroupOpt {
                label: format!(
                    "{} · {} · {} ({} parked)",
                    g.service,
                    g.subject,
                    g.error_code
                        .or(g.error_title)
                        .unwrap_or_else(|| g.error_kind.clone()),
                    g.count
                ),
                id: g.id,
            })
            .collect(),
        can_draft: can_act(&who),
    }
    .into_response()
}

async fn try_one(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Form(f): Form<TryForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    if non_empty(&f.backlog).is_some() {
        return on_backlog(&s, &who, &f).await;
    }
    match (non_empty(&f.id), non_empty(&f.group)) {
        (Some(id), _) => try_rules::on_message(&s, &who, id, &f.rules).await,
        (None, Some(group)) => try_rules::on_group(&s, &who, group, &f.rules).await,
        (None, None) => error_page(
            Some(&who),
            ApiError::bad_request("say which message (its id) or which group to try the rules on"),
            "/rules",
        ),
    }
}

/// One example of a backlog dry-run.
pub struct ExampleRow {
    pub outcome: String,
    pub id: String,
    /// The rule and the repair's changes, or the park message.
    pub text: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "backlog.html")]
pub struct BacklogPage {
    pub nav: Nav,
    /// `the parked backlog` or `the parked backlog of orders`.
    pub target: String,
    pub service: String,
    /// The draft rule file tried (empty: the loaded rules).
    pub draft: String,
    pub error: Option<String>,
    pub summary: String,
    pub outcomes: Vec<(String, usize)>,
    /// Per rule, its outcomes in words.
    pub rules: Vec<(String, String)>,
    pub examples: Vec<ExampleRow>,
    pub next_cursor: Option<String>,
}

/// The rules (or a draft) on the parked backlog (of one service), a bounded slice at a time.
async fn on_backlog(s: &Shared, who: &crate::app::Principal, f: &TryForm) -> Response {
    let service = non_empty(&f.service).map(str::to_owned);
    let draft = non_empty(&f.rules)
        .map(|d| d.replace("\r\n", "\n"))
        .unwrap_or_default();
    let mut page = BacklogPage {
        nav: Nav::new(who, "rules"),
        target: match &service {
            Some(s) => format!("the parked backlog of {s}"),
            None => "the parked backlog".into(),
        },
        service: service.clone().unwrap_or_default(),
        draft: draft.clone(),
        error: None,
        summary: String::new(),
        outcomes: Vec::new(),
        rules: Vec::new(),
        examples: Vec::new(),
        next_cursor: None,
    };
    if !draft.is_empty() && !can_act(who) {
        return error_page(
            Some(who),
            ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden",
                "trying a draft rule file needs the operator role; the loaded rules can be tried",
            ),
            "/rules",
        );
    }
    let rules = match crate::api::rules_to_try(s, Some(&draft)) {
        Ok(r) => r,
        Err(e) => {
            page.error = Some(e.message);
            return page.into_response();
        }
    };
    let scope = crate::backlog::Scope {
        service,
        ..Default::default()
    };
    let cursor = non_empty(&f.cursor).map(str::to_owned);
    match crate::backlog::try_rules(s, who, rules, &scope, cursor).await {
        Ok(a) => fill(&mut page, a),
        Err(e) => {
            // A crafted cursor is the caller's (400), a store that fails is not (503).
            let status = e.status;
            page.error = Some(e.message);
            return (status, page).into_response();
        }
    }
    page.into_response()
}

fn fill(page: &mut BacklogPage, a: crate::backlog::Answer) {
    let words = |per: &std::collections::BTreeMap<String, usize>| {
        let parts: Vec<String> = per.iter().map(|(o, n)| format!("{o} {n}")).collect();
        parts.join(", ")
    };
    page.rules = a
        .rules
        .iter()
        .map(|(r, per)| (r.clone(), words(per)))
        .collect();
    page.examples = a
        .examples
        .iter()
        .flat_map(|(outcome, list)| {
            list.iter().map(move |e| ExampleRow {
                outcome: outcome.clone(),
                id: e.id.clone(),
                text: e.describe(),
            })
        })
        .collect();
    page.outcomes = a.outcomes.into_iter().collect();
    page.summary = a.summary;
    page.next_cursor = a.next_cursor;
}
