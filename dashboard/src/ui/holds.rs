//! Held keys (read live from the sidecars' bucket) and releasing one: its held messages are
//! delivered without waiting for the head, which stays parked.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use super::{Nav, age, can_act, check_csrf, error_page, non_empty, see_other};
use crate::actions;
use crate::app::{ApiError, Shared, WebUser};
use crate::auth::Role;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/holds", get(list))
        .route("/holds/release", get(to_list).post(release))
}

/// A form's address opened as a page: the page the form is on.
async fn to_list() -> Response {
    see_other("/holds")
}

/// One held key.
pub struct HoldRow {
    pub service: String,
    pub binding: String,
    pub partition: u32,
    pub key: String,
    pub head: String,
    pub state: String,
    pub count: u64,
    pub age: String,
    pub since: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "holds.html")]
pub struct HoldsPage {
    pub nav: Nav,
    pub holds: Vec<HoldRow>,
    pub can_act: bool,
    /// The next page's address, when there are more held keys.
    pub next: Option<String>,
    /// Held keys in all (of the service asked for).
    pub total: usize,
}

#[derive(Deserialize)]
struct HoldsQuery {
    service: Option<String>,
    cursor: Option<String>,
    done: Option<String>,
}

async fn list(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Query(q): Query<HoldsQuery>,
) -> Response {
    let service = q.service.as_deref().and_then(non_empty);
    let cursor = q.cursor.as_deref().and_then(non_empty);
    let listed = async {
        let page = s
            .holds
            .page(&s.js, service, crate::holds::DEFAULT_PAGE, cursor)
            .await?;
        let summary = s.holds.summary(service).await?;
        Ok::<_, crate::holds::HoldsError>((page, summary))
    };
    let (page, summary) = match listed.await {
        Ok(listed) => listed,
        Err(e) => return error_page(Some(&who), ApiError::holds(e), "/holds"),
    };
    let next = page.next_cursor.map(|c| {
        let mut url = url::form_urlencoded::Serializer::new(String::new());
        if let Some(service) = service {
            url.append_pair("service", service);
        }
        url.append_pair("cursor", &c);
        format!("/holds?{}", url.finish())
    });
    HoldsPage {
        nav: Nav::new(&who, "holds").with_done(q.done.as_deref()),
        next,
        total: summary.held_keys,
        holds: page
            .items
            .into_iter()
            .map(|h| HoldRow {
                age: age(h.age_seconds),
                service: h.service,
                binding: h.binding,
                partition: h.partition,
                key: h.key,
                head: h.head,
                state: h.state,
                count: h.count,
                since: h.since,
            })
            .collect(),
        can_act: can_act(&who),
    }
    .into_response()
}

#[derive(Deserialize)]
struct ReleaseForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    note: String,
}

async fn release(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Form(f): Form<ReleaseForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    if let Err(e) = who.require(Role::Operator) {
        return error_page(Some(&who), e, "/holds");
    }
    let hold = match crate::holds::find(&s.js, &f.service, &f.key).await {
        Ok(Some(h)) => h,
        Ok(None) => {
            return error_page(
                Some(&who),
                ApiError::not_found(format!(
                    "key {:?} of {} is not held (any more)",
                    f.key, f.service
                )),
                "/holds",
            );
        }
        Err(e) => {
            return error_page(
                Some(&who),
                ApiError::unavailable(format!("cannot read holds: {e}")),
                "/holds",
            );
        }
    };
    match actions::release(&s, &who, &hold, non_empty(&f.note)).await {
        Ok(()) => see_other("/holds?done=released"),
        Err(e) => error_page(Some(&who), e, "/holds"),
    }
}
