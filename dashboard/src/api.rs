//! The JSON API (SPEC §9), under `/api`, for bearer tokens: the same capabilities as the web UI.
//! Lists answer `{"items": [...], "next_cursor": ...}`; errors `{"error": {"code", "message"}}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use repair_rules::rules::{Decision, Limits, RuleSet, evaluate};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::actions::{self, Edit};
use crate::app::{ApiCaller, ApiError, Principal, Shared};
use crate::auth::{Role, mask};
use crate::jobs::{self, Kind};
use crate::store::{Event, Filter, MAX_PAGE, Message, Status, now_ms};

/// The routes under `/api`.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/messages", get(list))
        .route("/api/messages/{id}", get(one))
        .route("/api/messages/{id}/resubmit", post(resubmit))
        .route("/api/messages/{id}/discard", post(discard))
        .route("/api/messages/{id}/try", post(try_rules))
        .route("/api/messages/{id}/rule-draft", get(rule_draft))
        .route("/api/groups", get(groups))
        .route("/api/groups/{id}/resubmit", post(group_resubmit))
        .route("/api/groups/{id}/discard", post(group_discard))
        .route("/api/groups/{id}/try", post(group_try))
        .route("/api/bulk", post(bulk))
        .route("/api/jobs", get(jobs_list))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/stop", post(job_stop))
        .route("/api/holds", get(holds))
        .route("/api/holds/{service}/{key}/release", post(release))
        .route("/api/rules", get(rules))
        .route("/api/rules/try", post(rules_try))
        .route("/api/audit", get(audit))
        .route("/api/sessions/end", post(end_sessions))
        .route("/api/openapi.json", get(crate::openapi::document))
}

/// A JSON body (an empty one is `T::default()`), whose problems answer in the API's error shape.
pub struct Body<T>(pub T);

impl<T, S> FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("application/json")
            });
        let bytes = bytes::Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "the request body is larger than max_body_bytes",
                )
            } else {
                ApiError::bad_request(format!("cannot read the body: {}", e.body_text()))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(T::default()));
        }
        if json_type == Some(false) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON (Content-Type: application/json)",
            ));
        }
        serde_json::from_slice(&bytes).map(Body).map_err(|e| {
            ApiError::bad_request(format!("the body is not what this route takes: {e}"))
        })
    }
}

/// A message as the API shows it; payload fields are masked for viewers.
pub fn message_json(m: &Message, masked: &[String]) -> Value {
    let env = &m.envelope;
    let mut payload = env.payload.clone();
    if !masked.is_empty() {
        mask(&mut payload, masked);
    }
    let mut v = json!({
        "id": m.id,
        "status": m.status,
        "service": env.service,
        "binding": env.binding,
        "subject": env.subject,
        "key": env.key,
        "attempt": m.attempt,
        "payload": payload,
        "payload_base64": if masked.is_empty() { json!(env.payload_base64) } else { Value::Null },
        "payload_ref": env.payload_ref,
        "headers": env.headers,
        "error": env.error,
        "reason": env.reason,
        "history": env.history,
        "group": m.group_id,
        "first_failed_at": env.first_failed_at,
        "failed_at": env.failed_at,
        "parked_at": m.parked_at,
        "updated_at": m.updated_at,
    });
    // What the masked fields hold is hidden wherever else it shows (an echoed error, a key).
    crate::auth::redact(&mut v, &crate::auth::masked_values(&env.payload, masked));
    v
}

/// `m` and its `timeline` as `masked` lets them be shown: the payload's masked fields, and their
/// values wherever else they appear (key, headers, error, reason, history, announcements).
pub fn redact_message(m: &mut Message, timeline: &mut [Event], masked: &[String]) {
    if masked.is_empty() {
        return;
    }
    let secrets = crate::auth::masked_values(&m.envelope.payload, masked);
    if let Ok(mut v) = serde_json::to_value(&m.envelope) {
        if let Some(payload) = v.get_mut("payload") {
            mask(payload, masked);
        }
        crate::auth::redact(&mut v, &secrets);
        if let Ok(env) = serde_json::from_value(v) {
            m.envelope = env;
        }
    }
    redact_events(timeline, &secrets);
}

/// Announcements with the `secrets` (see [`crate::auth::masked_values`]) hidden.
pub fn redact_events(timeline: &mut [Event], secrets: &[String]) {
    for ev in timeline {
        let mut v = json!([ev.source, ev.rule, ev.data]);
        crate::auth::redact(&mut v, secrets);
        if let Value::Array(parts) = v {
            ev.source = parts[0].as_str().unwrap_or_default().to_owned();
            ev.rule = parts[1].as_str().map(str::to_owned);
            ev.data = parts[2].as_str().unwrap_or_default().to_owned();
        }
    }
}

fn event_json(e: &Event) -> Value {
    json!({
        "id": e.id,
        "kind": e.kind,
        "attempt": e.attempt,
        "at": e.at,
        "source": e.source,
        "rule": e.rule,
        "data": serde_json::from_str::<Value>(&e.data).unwrap_or(Value::Null),
    })
}

/// The pointers to mask for `who`.
pub fn masked_for<'a>(state: &'a Shared, who: &Principal) -> &'a [String] {
    if who.masked() {
        &state.settings.mask
    } else {
        &[]
    }
}

/// `page` as a `masked` caller may see it: each message redacted ([`redact_message`]), and those it
/// matched only through what masking hides dropped. The search column holds the whole message, so
/// `q` would otherwise tell a viewer what a masked field holds ("4111" matches, so the card starts
/// with 4111). A page may come back shorter; its cursor still continues the list.
pub fn shown_page(page: &mut crate::store::Page<Message>, f: &Filter, masked: &[String]) {
    if masked.is_empty() {
        return;
    }
    for m in &mut page.items {
        redact_message(m, &mut [], masked);
    }
    if let Some(q) = f.q.as_deref() {
        let q = q.to_lowercase();
        page.items
            .retain(|m| crate::store::search_text(&m.envelope).contains(&q));
    }
}

type Params = Query<HashMap<String, String>>;

fn limit(q: &HashMap<String, String>) -> Result<u32, ApiError> {
    match q.get("limit") {
        None => Ok(50),
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be 1..={MAX_PAGE}, not `{l}`"))
            }),
    }
}

/// The list filters from query parameters.
pub fn filter(q: &HashMap<String, String>) -> Result<Filter, ApiError> {
    let text = |k: &str| {
        q.get(k)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let status = match text("status") {
        None => None,
        Some(s) => Some(s.parse::<Status>().map_err(ApiError::bad_request)?),
    };
    Ok(Filter {
        status,
        service: text("service"),
        subject: text("subject"),
        code: text("code"),
        q: text("q"),
        group: text("group"),
    })
}

#[utoipa::path(
    get, path = "/api/overview", tag = "overview",
    responses(
        (status = 200, description = "Counts per service and status, the oldest parked message, held keys, rule outcomes of the last 24 hours; per service the parked, repaired, resolved and held per hour over the last 24 hours, the largest failure groups with their trend, the oldest hold", body = crate::openapi::OverviewView),
        crate::openapi::Unauthorized,
        crate::openapi::Unavailable
    )
)]
async fn overview(
    State(s): State<Shared>,
    ApiCaller(_who): ApiCaller,
) -> Result<Json<Value>, ApiError> {
    let since = now_ms() - 24 * 3600 * 1000;
    let o = s.store.overview(since).await?;
    let holds = s.holds.summary(None).await.map_err(ApiError::holds)?;
    let held_messages = crate::holds::held_messages(&s.js)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot count held messages: {e}")))?;
    let live = crate::overview::live(&s).await?;
    Ok(Json(json!({
        "hourly": live.hourly,
        "top_groups": live.top_groups,
        "oldest_hold": live.oldest_hold,
        "counts": o.counts.iter().map(|(service, status, n)| json!({"service": service, "status": status, "count": n})).collect::<Vec<_>>(),
        "oldest_parked": o.oldest_parked.map(|(id, at)| json!({"id": id, "parked_at": at})),
        "held_keys": holds.held_keys,
        "held_messages": held_messages,
        "rules_last_24h": o.rules.iter().map(|(rule, kind, n)| json!({"rule": rule, "kind": kind, "count": n})).collect::<Vec<_>>(),
    })))
}

#[utoipa::path(
    get, path = "/api/messages", tag = "messages",
    params(
        ("status" = Option<crate::store::Status>, Query, description = "Only messages with this status"),
        ("service" = Option<String>, Query, description = "Only this service's"),
        ("subject" = Option<String>, Query, description = "Only this subject's"),
        ("code" = Option<String>, Query, description = "Only failures with this error code"),
        ("group" = Option<String>, Query, description = "Only this failure group's"),
        ("q" = Option<String>, Query, description = "Text in the subject, key, error or payload"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200, description = "Page size (50)"),
        ("cursor" = Option<String>, Query, description = "Where the previous page ended"),
    ),
    responses(
        (status = 200, description = "Newest parking first", body = crate::openapi::Page<crate::openapi::MessageView>),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Unavailable
    )
)]
async fn list(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Query(q): Params,
) -> Result<Json<Value>, ApiError> {
    let f = filter(&q)?;
    let mut page = s
        .store
        .list(&f, limit(&q)?, q.get("cursor").map(String::as_str))
        .await?;
    let masked = masked_for(&s, &who);
    shown_page(&mut page, &f, masked);
    Ok(Json(json!({
        "items": page.items.iter().map(|m| message_json(m, masked)).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor,
    })))
}

#[utoipa::path(
    get, path = "/api/messages/{id}", tag = "messages",
    params(("id" = String, Path, description = "The message's Mend-Id")),
    responses(
        (status = 200, description = "The message with its timeline", body = crate::openapi::MessageView),
        crate::openapi::Unauthorized,
        crate::openapi::NotFound,
        crate::openapi::Unavailable
    )
)]
async fn one(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let m = s
        .store
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    let mut timeline = s.store.timeline(&id).await?;
    let masked = masked_for(&s, &who);
    let mut v = message_json(&m, masked);
    redact_events(
        &mut timeline,
        &crate::auth::masked_values(&m.envelope.payload, masked),
    );
    v["timeline"] = timeline.iter().map(event_json).collect();
    Ok(Json(v))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ResubmitBody {
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    note: Option<String>,
    /// The attempt the caller saw; a message that failed again since is a 409.
    #[serde(default)]
    attempt: Option<u32>,
}

#[utoipa::path(
    post, path = "/api/messages/{id}/resubmit", tag = "messages",
    params(("id" = String, Path, description = "The message's Mend-Id")),
    request_body(content = Option<ResubmitBody>, description = "All optional: an edited payload, a note, the attempt the caller saw"),
    responses(
        (status = 200, description = "Resubmitted: the retry is stored and the action recorded", body = crate::openapi::MessageView),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::Conflict,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Invalid,
        crate::openapi::Unavailable,
        crate::openapi::OutcomeUnknown,
        crate::openapi::Gone
    )
)]
async fn resubmit(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
    Body(b): Body<ResubmitBody>,
) -> Result<Json<Value>, ApiError> {
    let m = actions::resubmit(
        &s,
        &who,
        &id,
        b.attempt,
        b.payload.map(Edit::Json),
        b.note.as_deref(),
    )
    .await?;
    Ok(Json(message_json(&m, masked_for(&s, &who))))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NoteBody {
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    attempt: Option<u32>,
}

#[utoipa::path(
    post, path = "/api/messages/{id}/discard", tag = "messages",
    params(("id" = String, Path, description = "The message's Mend-Id")),
    request_body(content = Option<NoteBody>, description = "All optional: a note, the attempt the caller saw"),
    responses(
        (status = 200, description = "Discarded; a head's key is released", body = crate::openapi::MessageView),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::Conflict,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Invalid,
        crate::openapi::Unavailable,
        crate::openapi::OutcomeUnknown
    )
)]
async fn discard(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
    Body(b): Body<NoteBody>,
) -> Result<Json<Value>, ApiError> {
    let m = actions::discard(&s, &who, &id, b.attempt, b.note.as_deref()).await?;
    Ok(Json(message_json(&m, masked_for(&s, &who))))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TryBody {
    /// A draft rule file (TOML) to try instead of the loaded rules.
    #[serde(default)]
    rules: Option<String>,
}

/// The rules to try: a draft, or the loaded ones.
pub fn rules_to_try(s: &Shared, draft: Option<&str>) -> Result<Arc<RuleSet>, ApiError> {
    match draft.filter(|d| !d.trim().is_empty()) {
        Some(text) => RuleSet::parse([("draft", text)])
            .map(Arc::new)
            .map_err(|e| ApiError::invalid(format!("the draft rules do not load: {e}"))),
        None => (s.rules)().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_rules",
                "no rules are configured (`rules` in dashboard.toml); send a draft",
            )
        }),
    }
}

/// How long one dry-run evaluation may take.
pub const DRY_RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Dry-run evaluations at once, over every user: each takes a thread of the blocking pool, and a
/// draft is anyone's (operator's) code.
pub const DRY_RUNS_IN_FLIGHT: usize = 4;

/// What `rules` decide for `m`, as JSON; evaluated off the async threads, at most
/// [`DRY_RUNS_IN_FLIGHT`] at once, each stopping itself at [`DRY_RUN_LIMIT`] (its comprehension
/// steps check the deadline, and its answer says so). A place is waited for, and the evaluation
/// waited on, twice the limit at most; a place is held until its evaluation really ends.
pub async fn dry_run(s: &Shared, rules: Arc<RuleSet>, m: &Message) -> Value {
    let env = m.envelope.clone();
    let id = m.id.clone();
    let wait = DRY_RUN_LIMIT.saturating_mul(2);
    let Ok(Ok(place)) = tokio::time::timeout(wait, s.dry_runs.clone().acquire_owned()).await else {
        return json!({"id": id, "decision": "error", "message": format!(
            "{DRY_RUNS_IN_FLIGHT} dry-runs are running; none ended within {}s: try again",
            wait.as_secs()
        )});
    };
    let evaluation = tokio::task::spawn_blocking(move || {
        let limits = Limits {
            time_limit: Some(DRY_RUN_LIMIT),
            ..Limits::default()
        };
        evaluate(&rules, &env, &limits)
    });
    // The place is given back once the thread is done with the evaluation (and free for the next
    // one), whether or not this answer still waits for it.
    let work = tokio::spawn(async move {
        let out = evaluation.await;
        drop(place);
        out
    });
    let decision = match tokio::time::timeout(wait, work).await {
        Ok(Ok(Ok(d))) => d,
        Ok(Ok(Err(e))) | Ok(Err(e)) => {
            return json!({"id": id, "decision": "error", "message": format!("evaluation failed: {e}")});
        }
        Err(_) => {
            return json!({"id": id, "decision": "error", "message": format!(
                "evaluation took longer than {}s", wait.as_secs()
            )});
        }
    };
    match decision {
        Decision::Repaired { rule, payload } => {
            json!({"id": id, "decision": "repaired", "rule": rule, "payload": payload})
        }
        Decision::Park {
            rule,
            reason,
            message,
        } => {
            json!({"id": id, "decision": "parked", "rule": rule, "reason": reason.as_str(), "message": message})
        }
    }
}

/// [`dry_run`] as `masked` lets it be shown: the repaired payload's masked fields hidden, and what
/// the message's masked fields hold hidden wherever else it appears (a rule's message, a payload
/// that copied a masked value elsewhere).
pub async fn dry_run_shown(
    s: &Shared,
    rules: Arc<RuleSet>,
    m: &Message,
    masked: &[String],
) -> Value {
    let mut v = dry_run(s, rules, m).await;
    if !masked.is_empty() {
        if let Some(p) = v.get_mut("payload") {
            mask(p, masked);
        }
        crate::auth::redact(
            &mut v,
            &crate::auth::masked_values(&m.envelope.payload, masked),
        );
    }
    v
}

#[utoipa::path(
    post, path = "/api/messages/{id}/try", tag = "rules",
    params(("id" = String, Path, description = "The message's Mend-Id")),
    request_body(content = Option<TryBody>, description = "Optional: a draft rule file (TOML) instead of the loaded rules (operators)"),
    responses(
        (status = 200, description = "What the rules would do", body = crate::openapi::DryRun),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::Conflict,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Invalid,
        crate::openapi::Unavailable
    )
)]
async fn try_rules(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
    Body(b): Body<TryBody>,
) -> Result<Json<Value>, ApiError> {
    draft_allowed(&who, b.rules.as_deref())?;
    let rules = rules_to_try(&s, b.rules.as_deref())?;
    let m = s
        .store
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    Ok(Json(
        dry_run_shown(&s, rules, &m, masked_for(&s, &who)).await,
    ))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RulesTryBody {
    /// A draft rule file (TOML) to try instead of the loaded rules (operators).
    #[serde(default)]
    rules: Option<String>,
    /// One message (its Mend-Id) …
    #[serde(default)]
    message: Option<String>,
    /// … or one failure group's parked messages …
    #[serde(default)]
    group: Option<String>,
    /// … or the whole parked backlog, optionally of one service.
    #[serde(default)]
    service: Option<String>,
    /// Where an earlier answer stopped (its `next_cursor`).
    #[serde(default)]
    cursor: Option<String>,
}

#[utoipa::path(
    post, path = "/api/rules/try", tag = "rules",
    request_body(content = Option<RulesTryBody>, description = "The rules (or a draft) and where to try them: a message, a group, or the parked backlog (of one service)"),
    responses(
        (status = 200, description = "Counts per outcome and per rule, a few examples of each outcome; `next_cursor` continues where the request's bound stopped it", body = Object),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::Conflict,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Invalid,
        crate::openapi::Unavailable
    )
)]
async fn rules_try(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Body(b): Body<RulesTryBody>,
) -> Result<Json<crate::backlog::Answer>, ApiError> {
    draft_allowed(&who, b.rules.as_deref())?;
    let scopes = [&b.message, &b.group]
        .iter()
        .filter(|x| x.is_some())
        .count();
    if scopes > 1 || (b.message.is_some() && b.service.is_some()) {
        return Err(ApiError::bad_request(
            "give one scope: `message`, or `group`, or the backlog (optionally of one `service`)",
        ));
    }
    if let Some(c) = &b.cursor
        && c.parse::<i64>().is_err()
    {
        return Err(ApiError::bad_request(format!(
            "`cursor` {c:?} is not one this API gave"
        )));
    }
    let rules = rules_to_try(&s, b.rules.as_deref())?;
    let scope = crate::backlog::Scope {
        message: b.message,
        group: b.group,
        service: b.service,
    };
    Ok(Json(
        crate::backlog::try_rules(&s, &who, rules, &scope, b.cursor).await?,
    ))
}

#[utoipa::path(
    get, path = "/api/messages/{id}/rule-draft", tag = "rules",
    params(("id" = String, Path, description = "The message's Mend-Id")),
    responses(
        (status = 200, description = "A rule file (TOML) that would have made the person's fix: it passes `mend rules check` and repairs this message into the edited payload", content_type = "application/toml", body = String),
        crate::openapi::Unauthorized,
        crate::openapi::NotFound,
        crate::openapi::Conflict,
        crate::openapi::Invalid,
        crate::openapi::Unavailable
    )
)]
async fn rule_draft(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let m = s
        .store
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    let text = crate::drafts::of(&s.store, &m, masked_for(&s, &who)).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/toml; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(
    get, path = "/api/groups", tag = "groups",
    responses(
        (status = 200, description = "Parked messages grouped by service, subject and error", body = crate::openapi::Page<crate::store::Group>),
        crate::openapi::Unauthorized,
        crate::openapi::Unavailable
    )
)]
async fn groups(
    State(s): State<Shared>,
    ApiCaller(_who): ApiCaller,
) -> Result<Json<Value>, ApiError> {
    let groups = s.store.groups().await?;
    Ok(Json(json!({"items": groups, "next_cursor": null})))
}

async fn group_members(s: &Shared, id: &str) -> Result<Vec<(String, u32)>, ApiError> {
    let members = s.store.group_members(id).await?;
    if members.is_empty() {
        return Err(ApiError::not_found(format!(
            "no parked messages in group {id}"
        )));
    }
    Ok(members)
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct GroupResubmitBody {
    #[serde(default)]
    note: Option<String>,
    /// A draft rule file (TOML): each message is repaired by it first and resubmitted with the
    /// repaired payload (an edit, audited); a message it does not repair stays parked.
    #[serde(default)]
    rules: Option<String>,
}

#[utoipa::path(
    post, path = "/api/groups/{id}/resubmit", tag = "groups",
    params(("id" = String, Path, description = "The failure group")),
    request_body(content = Option<GroupResubmitBody>, description = "Optional: a note, and a draft rule file to repair each message with first"),
    responses(
        (status = 202, description = "A bulk job started, canary first", body = crate::jobs::Progress),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Invalid,
        crate::openapi::Unavailable
    )
)]
async fn group_resubmit(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
    Body(b): Body<GroupResubmitBody>,
) -> Result<Response, ApiError> {
    who.require(Role::Operator)?;
    let repair = match b.rules.as_deref().filter(|r| !r.trim().is_empty()) {
        Some(draft) => Some(rules_to_try(&s, Some(draft))?),
        None => None,
    };
    let members = group_members(&s, &id).await?;
    let p = jobs::start(
        s.clone(),
        who,
        Kind::Resubmit,
        Some(id),
        members,
        b.note,
        repair,
    );
    Ok((StatusCode::ACCEPTED, Json(json!(p))).into_response())
}

#[utoipa::path(
    post, path = "/api/groups/{id}/discard", tag = "groups",
    params(("id" = String, Path, description = "The failure group")),
    request_body(content = Option<NoteBody>, description = "Optional: a note"),
    responses(
        (status = 202, description = "A bulk job started", body = crate::jobs::Progress),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Unavailable
    )
)]
async fn group_discard(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
    Body(b): Body<NoteBody>,
) -> Result<Response, ApiError> {
    group_job(s, who, id, Kind::Discard, b.note).await
}

/// Starts a bulk job over a group's parked messages: 202 with its progress.
async fn group_job(
    s: Shared,
    who: Principal,
    group: String,
    kind: Kind,
    note: Option<String>,
) -> Result<Response, ApiError> {
    who.require(Role::Operator)?;
    let members = group_members(&s, &group).await?;
    let p = jobs::start(s.clone(), who, kind, Some(group), members, note, None);
    Ok((StatusCode::ACCEPTED, Json(json!(p))).into_response())
}

#[utoipa::path(
    post, path = "/api/groups/{id}/try", tag = "rules",
    params(("id" = String, Path, description = "The failure group")),
    request_body(content = Option<TryBody>, description = "Optional: a draft rule file (TOML) instead of the loaded rules (operators)"),
    responses(
        (status = 200, description = "What the rules would do with each parked message of the group", body = crate::openapi::Page<crate::openapi::DryRun>),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::Conflict,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Invalid,
        crate::openapi::Unavailable
    )
)]
async fn group_try(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
    Body(b): Body<TryBody>,
) -> Result<Json<Value>, ApiError> {
    draft_allowed(&who, b.rules.as_deref())?;
    let rules = rules_to_try(&s, b.rules.as_deref())?;
    let page = s
        .store
        .list(
            &Filter {
                group: Some(id.clone()),
                status: Some(Status::Parked),
                ..Default::default()
            },
            MAX_PAGE,
            None,
        )
        .await?;
    if page.items.is_empty() {
        return Err(ApiError::not_found(format!(
            "no parked messages in group {id}"
        )));
    }
    let mut items = Vec::with_capacity(page.items.len());
    for m in &page.items {
        items.push(dry_run_shown(&s, rules.clone(), m, masked_for(&s, &who)).await);
    }
    Ok(Json(json!({"items": items, "next_cursor": null})))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    #[serde(default)]
    action: Option<Kind>,
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    note: Option<String>,
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "resubmit" => Ok(Kind::Resubmit),
            "discard" => Ok(Kind::Discard),
            other => Err(serde::de::Error::custom(format!(
                "action `{other}` is not resubmit or discard"
            ))),
        }
    }
}

#[utoipa::path(
    post, path = "/api/bulk", tag = "groups",
    request_body(content = BulkBody, description = "The action and the messages"),
    responses(
        (status = 202, description = "A bulk job started, canary first", body = crate::jobs::Progress),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Unavailable
    )
)]
async fn bulk(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Body(b): Body<BulkBody>,
) -> Result<Response, ApiError> {
    who.require(Role::Operator)?;
    let Some(action) = b.action else {
        return Err(ApiError::bad_request(
            "`action` is required: resubmit or discard",
        ));
    };
    if b.ids.is_empty() {
        return Err(ApiError::bad_request("`ids` is empty"));
    }
    let mut members = Vec::with_capacity(b.ids.len());
    for id in &b.ids {
        let m = s
            .store
            .get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
        members.push((m.id, m.attempt));
    }
    let p = jobs::start(s.clone(), who, action, None, members, b.note, None);
    Ok((StatusCode::ACCEPTED, Json(json!(p))).into_response())
}

#[utoipa::path(
    get, path = "/api/jobs", tag = "groups",
    responses(
        (status = 200, description = "This dashboard's bulk jobs", body = crate::openapi::Page<crate::jobs::Progress>),
        crate::openapi::Unauthorized
    )
)]
async fn jobs_list(State(s): State<Shared>, ApiCaller(_who): ApiCaller) -> Json<Value> {
    Json(json!({"items": s.jobs.all(), "next_cursor": null}))
}

#[utoipa::path(
    get, path = "/api/jobs/{id}", tag = "groups",
    params(("id" = String, Path, description = "The job")),
    responses(
        (status = 200, description = "The job's progress", body = crate::jobs::Progress),
        crate::openapi::Unauthorized,
        crate::openapi::NotFound
    )
)]
async fn job(
    State(s): State<Shared>,
    ApiCaller(_who): ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.jobs
        .get(&id)
        .map(|p| Json(json!(p)))
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

#[utoipa::path(
    post, path = "/api/jobs/{id}/stop", tag = "groups",
    params(("id" = String, Path, description = "The job")),
    responses(
        (status = 200, description = "Stopped: nothing more is sent", body = crate::jobs::Progress),
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound
    )
)]
async fn job_stop(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    who.require(Role::Operator)?;
    if !s.jobs.stop(&id) {
        return Err(ApiError::not_found(format!("no job {id}")));
    }
    s.jobs
        .get(&id)
        .map(|p| Json(json!(p)))
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

#[utoipa::path(
    get, path = "/api/holds", tag = "holds",
    params(
        ("service" = Option<String>, Query, description = "Only this service's"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size (100)"),
        ("cursor" = Option<String>, Query, description = "Where the previous page ended"),
    ),
    responses(
        (status = 200, description = "Held keys, oldest first", body = crate::openapi::Page<crate::holds::HeldKey>),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Unavailable
    )
)]
async fn holds(
    State(s): State<Shared>,
    ApiCaller(_who): ApiCaller,
    Query(q): Params,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.get("limit") {
        None => crate::holds::DEFAULT_PAGE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=crate::holds::MAX_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit must be 1..={}, not `{l}`",
                    crate::holds::MAX_PAGE
                ))
            })?,
    };
    let service = q
        .get("service")
        .map(String::as_str)
        .filter(|s| !s.is_empty());
    let cursor = q
        .get("cursor")
        .map(String::as_str)
        .filter(|c| !c.is_empty());
    let page = s
        .holds
        .page(&s.js, service, limit, cursor)
        .await
        .map_err(ApiError::holds)?;
    Ok(Json(
        json!({"items": page.items, "next_cursor": page.next_cursor}),
    ))
}

#[utoipa::path(
    post, path = "/api/holds/{service}/{key}/release", tag = "holds",
    params(
        ("service" = String, Path, description = "The service"),
        ("key" = String, Path, description = "The held key"),
    ),
    request_body(content = Option<NoteBody>, description = "Optional: a note"),
    responses(
        (status = 200, description = "The release command is stored", body = crate::openapi::Released),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::NotFound,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Unavailable,
        crate::openapi::OutcomeUnknown
    )
)]
async fn release(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path((service, key)): Path<(String, String)>,
    Body(b): Body<NoteBody>,
) -> Result<Json<Value>, ApiError> {
    who.require(Role::Operator)?;
    let note = b.note;
    let hold = crate::holds::find(&s.js, &service, &key)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read holds: {e}")))?
        .ok_or_else(|| ApiError::not_found(format!("key {key:?} of {service} is not held")))?;
    actions::release(&s, &who, &hold, note.as_deref()).await?;
    Ok(Json(
        json!({"service": service, "key": key, "head": hold.head, "released": true}),
    ))
}

#[utoipa::path(
    get, path = "/api/rules", tag = "rules",
    responses(
        (status = 200, description = "The loaded rules and what each did", body = crate::openapi::RulesPage),
        crate::openapi::Unauthorized,
        crate::openapi::Unavailable
    )
)]
async fn rules(
    State(s): State<Shared>,
    ApiCaller(_who): ApiCaller,
) -> Result<Json<Value>, ApiError> {
    let counts = s.store.overview(0).await?.rules;
    let count = |rule: &str, kind: &str| {
        counts
            .iter()
            .find(|(r, k, _)| r == rule && k == kind)
            .map_or(0, |(_, _, n)| *n)
    };
    let loaded = (s.rules)();
    let items: Vec<Value> = loaded
        .iter()
        .flat_map(|set| set.rules.iter())
        .map(|r| {
            json!({
                "name": r.name,
                "service": r.service,
                "subject": r.subject,
                "park": r.park,
                "repaired": count(&r.name, "repaired"),
                "parked": count(&r.name, "parked"),
                "failed": count(&r.name, "failed"),
            })
        })
        .collect();
    Ok(Json(
        json!({"items": items, "next_cursor": null, "loaded": loaded.is_some()}),
    ))
}

#[utoipa::path(
    get, path = "/api/audit", tag = "audit",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200, description = "Page size (50)"),
        ("cursor" = Option<String>, Query, description = "Where the previous page ended"),
    ),
    responses(
        (status = 200, description = "Every human action, newest first", body = crate::openapi::Page<crate::store::AuditRecord>),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Unavailable
    )
)]
async fn audit(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Query(q): Params,
) -> Result<Json<Value>, ApiError> {
    let mut page = s
        .store
        .audit(limit(&q)?, q.get("cursor").map(String::as_str))
        .await?;
    shown_audit(&s, &mut page.items, masked_for(&s, &who)).await?;
    Ok(Json(
        json!({"items": page.items, "next_cursor": page.next_cursor}),
    ))
}

/// `POST /api/sessions/end` (admin; optional `note`): ends every web session.
#[utoipa::path(
    post, path = "/api/sessions/end", tag = "audit",
    request_body(content = Option<NoteBody>, description = "Optional: a note"),
    responses(
        (status = 200, description = "Every web session ended", body = crate::openapi::SessionsEnded),
        crate::openapi::BadRequest,
        crate::openapi::Unauthorized,
        crate::openapi::Forbidden,
        crate::openapi::TooLarge,
        crate::openapi::NotJson,
        crate::openapi::Unavailable
    )
)]
async fn end_sessions(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Body(b): Body<NoteBody>,
) -> Result<Json<Value>, ApiError> {
    let ended = crate::actions::end_all_sessions(&s, &who, b.note.as_deref()).await?;
    Ok(Json(json!({"ended": ended})))
}

/// Audit records as `masked` lets them be shown: an edit's payloads with the masked fields hidden,
/// and what the message's masked fields hold hidden in the key, the note and the payloads (a key
/// that is a card number shows in the audit log too).
pub async fn shown_audit(
    s: &Shared,
    items: &mut [crate::store::AuditRecord],
    masked: &[String],
) -> Result<(), ApiError> {
    if masked.is_empty() {
        return Ok(());
    }
    let mut secrets: HashMap<String, Vec<String>> = HashMap::new();
    for a in items.iter_mut() {
        a.before = a.before.as_deref().map(|t| masked_text(t, masked));
        a.after = a.after.as_deref().map(|t| masked_text(t, masked));
        let Some(id) = a.message_id.clone() else {
            continue;
        };
        if !secrets.contains_key(&id) {
            let found = s
                .store
                .get(&id)
                .await?
                .map(|m| crate::auth::masked_values(&m.envelope.payload, masked))
                .unwrap_or_default();
            secrets.insert(id.clone(), found);
        }
        let Some(found) = secrets.get(&id).filter(|f| !f.is_empty()) else {
            continue;
        };
        let mut v = json!([a.key, a.note, a.before, a.after]);
        crate::auth::redact(&mut v, found);
        let text = |i: usize| v[i].as_str().map(str::to_owned);
        (a.key, a.note, a.before, a.after) = (text(0), text(1), text(2), text(3));
    }
    Ok(())
}

/// A payload kept as text, masked: JSON with the masked fields hidden; other text withheld, as its
/// fields cannot be told apart.
fn masked_text(text: &str, masked: &[String]) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(mut v) => {
            mask(&mut v, masked);
            v.to_string()
        }
        Err(_) => "(withheld)".into(),
    }
}

/// A draft rule file may be tried by operators only: a draft could copy a masked field into an
/// unmasked one.
fn draft_allowed(who: &Principal, draft: Option<&str>) -> Result<(), ApiError> {
    if draft.is_some_and(|d| !d.trim().is_empty()) {
        who.require(Role::Operator)?;
    }
    Ok(())
}
