//! The API's OpenAPI 3.1 document (SPEC §9), generated from the handlers' annotations and the types
//! below by `utoipa`, served at `GET /api/openapi.json`. The types here describe answers the
//! handlers build as JSON; `tests/tests/api_fuzz.rs` has schemathesis check every answer against
//! them, for every role, so the document cannot drift from what the API does.

use axum::Json;
use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::jobs::Progress;
use crate::store::{AuditRecord, Group, Status};

/// An error: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The error answers routes document, one type each, so a route lists the ones it gives by name.
macro_rules! error_responses {
    ($($name:ident = $status:literal, $description:literal;)*) => {$(
        #[doc = $description]
        #[derive(utoipa::IntoResponses)]
        #[response(status = $status, description = $description)]
        pub struct $name(pub ErrorBody);
    )*};
}

error_responses! {
    BadRequest = 400, "A parameter or the body is not what this route takes";
    Unauthorized = 401, "No valid API token";
    Forbidden = 403, "The token's role may not do this";
    NotFound = 404, "No such thing";
    Conflict = 409, "The message is not where the caller saw it, or another action is under way";
    Gone = 410, "The payload is no longer where its envelope says";
    TooLarge = 413, "The body is larger than max_body_bytes";
    NotJson = 415, "The body is not JSON";
    Invalid = 422, "The body is JSON but not valid here (an edit that is not JSON, a draft that does not load)";
    Unavailable = 503, "NATS or the store cannot be reached; nothing changed";
    OutcomeUnknown = 504, "NATS did not confirm in time; the outcome is unknown and is found out later";
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable word: `bad_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `busy`,
    /// `no_rules`, `too_large`, `unsupported_media_type`, `invalid`, `gone`, `unavailable`,
    /// `outcome_unknown`, `not_recorded`.
    pub code: String,
    /// What went wrong and what changed, for a person.
    pub message: String,
}

/// A page of a list: `next_cursor` continues it (`cursor=`), null at the end.
#[derive(Serialize, ToSchema)]
pub struct Page<T: ToSchema> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A parked message (its latest parking) and its status. Payload fields configured as masked are
/// hidden from viewers, and so are their values wherever else they appear.
#[derive(Serialize, ToSchema)]
pub struct MessageView {
    /// Its `Mend-Id` lineage.
    pub id: String,
    pub status: Status,
    pub service: String,
    pub binding: String,
    pub subject: String,
    pub key: Option<String>,
    pub attempt: u32,
    /// The payload as JSON (null when it is not JSON or kept elsewhere).
    pub payload: Value,
    /// The payload's bytes, base64, when they are not JSON.
    pub payload_base64: Option<String>,
    /// Where a payload too large for the envelope is kept.
    pub payload_ref: Option<Value>,
    /// The message's headers: each name with its values.
    pub headers: Value,
    /// The failure (SPEC §5): kind, status, code, title, detail, field, body.
    pub error: Value,
    pub reason: Option<String>,
    /// Steps of the lineage: what happened, when and by whom.
    pub history: Vec<Value>,
    /// Its failure group.
    pub group: String,
    pub first_failed_at: String,
    pub failed_at: String,
    /// Epoch milliseconds.
    pub parked_at: i64,
    pub updated_at: i64,
    /// Announcements about the message (`GET /api/messages/{id}` only).
    #[schema(required = false)]
    pub timeline: Option<Vec<EventView>>,
}

/// An announcement about a message (MEND_EVENTS).
#[derive(Serialize, ToSchema)]
pub struct EventView {
    pub id: String,
    pub kind: String,
    pub attempt: u32,
    pub at: i64,
    pub source: String,
    pub rule: Option<String>,
    pub data: Value,
}

/// What the rules would do with a message.
#[derive(Serialize, ToSchema)]
pub struct DryRun {
    pub id: String,
    /// `repaired`, `parked` or `error`.
    pub decision: String,
    #[schema(required = false)]
    pub rule: Option<String>,
    /// The repaired payload.
    #[schema(required = false)]
    pub payload: Option<Value>,
    #[schema(required = false)]
    pub reason: Option<String>,
    #[schema(required = false)]
    pub message: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ServiceCount {
    pub service: String,
    pub status: String,
    pub count: i64,
}

#[derive(Serialize, ToSchema)]
pub struct OldestParked {
    pub id: String,
    pub parked_at: i64,
}

#[derive(Serialize, ToSchema)]
pub struct RuleCount {
    pub rule: String,
    /// `repaired`, `parked` or `failed`.
    pub kind: String,
    pub count: i64,
}

/// The overview's figures.
#[derive(Serialize, ToSchema)]
pub struct OverviewView {
    pub counts: Vec<ServiceCount>,
    pub oldest_parked: Option<OldestParked>,
    pub held_keys: u64,
    pub held_messages: u64,
    pub rules_last_24h: Vec<RuleCount>,
    pub hourly: crate::overview::Hourly,
    /// The failure groups with the most parked messages (five at most), largest first.
    pub top_groups: Vec<crate::overview::GroupTrend>,
    pub oldest_hold: Option<crate::overview::OldestHold>,
}

/// A loaded rule and what it did.
#[derive(Serialize, ToSchema)]
pub struct RuleView {
    pub name: String,
    pub service: Option<String>,
    pub subject: Option<String>,
    pub park: bool,
    pub repaired: i64,
    pub parked: i64,
    pub failed: i64,
}

#[derive(Serialize, ToSchema)]
pub struct RulesPage {
    pub items: Vec<RuleView>,
    pub next_cursor: Option<String>,
    /// Whether the dashboard has rules configured.
    pub loaded: bool,
}

/// A release command sent.
#[derive(Serialize, ToSchema)]
pub struct Released {
    pub service: String,
    pub key: String,
    pub head: String,
    pub released: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SessionsEnded {
    pub ended: u64,
}

/// Declares the bearer-token scheme every route takes.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token from the dashboard's `[[api_token]]`; its role (viewer, \
                         operator, admin) decides what it may do.",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mend dashboard API",
        description = "Parked failures, their repair and resubmission, holds, rules and the audit \
                       log (SPEC §9). Every route takes a bearer token; errors answer \
                       `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        crate::api::overview,
        crate::api::list,
        crate::api::one,
        crate::api::resubmit,
        crate::api::discard,
        crate::api::try_rules,
        crate::api::rule_draft,
        crate::api::groups,
        crate::api::group_resubmit,
        crate::api::group_discard,
        crate::api::group_try,
        crate::api::bulk,
        crate::api::jobs_list,
        crate::api::job,
        crate::api::job_stop,
        crate::api::holds,
        crate::api::release,
        crate::api::rules,
        crate::api::rules_try,
        crate::api::audit,
        crate::api::end_sessions,
        document,
    ),
    components(schemas(ErrorBody, MessageView, Group, AuditRecord, Progress, crate::holds::HeldKey, crate::overview::Hourly, crate::overview::ServiceHours, crate::overview::GroupTrend, crate::overview::OldestHold)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// The OpenAPI document of the API.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    security(()),
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
