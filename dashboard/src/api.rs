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
        .route("/api/audit", get(audit))
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
    json!({
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
    })
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

async fn overview(
    State(s): State<Shared>,
    ApiCaller(_who): ApiCaller,
) -> Result<Json<Value>, ApiError> {
    let since = now_ms() - 24 * 3600 * 1000;
    let o = s.store.overview(since).await?;
    let holds = crate::holds::list(&s.js, None)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read holds: {e}")))?;
    Ok(Json(json!({
        "counts": o.counts.iter().map(|(service, status, n)| json!({"service": service, "status": status, "count": n})).collect::<Vec<_>>(),
        "oldest_parked": o.oldest_parked.map(|(id, at)| json!({"id": id, "parked_at": at})),
        "held_keys": holds.len(),
        "held_messages": holds.iter().map(|h| h.count).sum::<u64>(),
        "rules_last_24h": o.rules.iter().map(|(rule, kind, n)| json!({"rule": rule, "kind": kind, "count": n})).collect::<Vec<_>>(),
    })))
}

async fn list(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Query(q): Params,
) -> Result<Json<Value>, ApiError> {
    let f = filter(&q)?;
    let page = s
        .store
        .list(&f, limit(&q)?, q.get("cursor").map(String::as_str))
        .await?;
    let masked = masked_for(&s, &who);
    Ok(Json(json!({
        "items": page.items.iter().map(|m| message_json(m, masked)).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor,
    })))
}

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
    let timeline = s.store.timeline(&id).await?;
    let mut v = message_json(&m, masked_for(&s, &who));
    v["timeline"] = timeline.iter().map(event_json).collect();
    Ok(Json(v))
}

#[derive(Deserialize, Default)]
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoteBody {
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    attempt: Option<u32>,
}

async fn discard(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
    Body(b): Body<NoteBody>,
) -> Result<Json<Value>, ApiError> {
    let m = actions::discard(&s, &who, &id, b.attempt, b.note.as_deref()).await?;
    Ok(Json(message_json(&m, masked_for(&s, &who))))
}

#[derive(Deserialize, Default)]
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

/// What `rules` decide for `m`, as JSON; evaluated off the async threads, under a time limit.
pub async fn dry_run(rules: Arc<RuleSet>, m: &Message) -> Value {
    let env = m.envelope.clone();
    let id = m.id.clone();
    let work = tokio::task::spawn_blocking(move || evaluate(&rules, &env, &Limits::default()));
    let decision = match tokio::time::timeout(std::time::Duration::from_secs(2), work).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            return json!({"id": id, "decision": "error", "message": format!("evaluation failed: {e}")});
        }
        Err(_) => {
            return json!({"id": id, "decision": "error", "message": "evaluation took longer than 2s"});
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
    let mut v = dry_run(rules, &m).await;
    if who.masked()
        && let Some(p) = v.get_mut("payload")
    {
        mask(p, &s.settings.mask);
    }
    Ok(Json(v))
}

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

async fn group_resubmit(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Path(id): Path<String>,
    Body(b): Body<NoteBody>,
) -> Result<Response, ApiError> {
    group_job(s, who, id, Kind::Resubmit, b.note).await
}

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
    let p = jobs::start(s.clone(), who, kind, Some(group), members, note);
    Ok((StatusCode::ACCEPTED, Json(json!(p))).into_response())
}

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
        let mut v = dry_run(rules.clone(), m).await;
        if who.masked()
            && let Some(p) = v.get_mut("payload")
        {
            mask(p, &s.settings.mask);
        }
        items.push(v);
    }
    Ok(Json(json!({"items": items, "next_cursor": null})))
}

#[derive(Deserialize, Default)]
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
    let p = jobs::start(s.clone(), who, action, None, members, b.note);
    Ok((StatusCode::ACCEPTED, Json(json!(p))).into_response())
}

async fn jobs_list(State(s): State<Shared>, ApiCaller(_who): ApiCaller) -> Json<Value> {
    Json(json!({"items": s.jobs.all(), "next_cursor": null}))
}

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

async fn holds(
    State(s): State<Shared>,
    ApiCaller(_who): ApiCaller,
    Query(q): Params,
) -> Result<Json<Value>, ApiError> {
    let list = crate::holds::list(&s.js, q.get("service").map(String::as_str))
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read holds: {e}")))?;
    Ok(Json(json!({"items": list, "next_cursor": null})))
}

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

async fn audit(
    State(s): State<Shared>,
    ApiCaller(who): ApiCaller,
    Query(q): Params,
) -> Result<Json<Value>, ApiError> {
    let mut page = s
        .store
        .audit(limit(&q)?, q.get("cursor").map(String::as_str))
        .await?;
    let masked = masked_for(&s, &who);
    if !masked.is_empty() {
        for a in &mut page.items {
            a.before = a.before.as_deref().map(|t| masked_text(t, masked));
            a.after = a.after.as_deref().map(|t| masked_text(t, masked));
        }
    }
    Ok(Json(
        json!({"items": page.items, "next_cursor": page.next_cursor}),
    ))
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
