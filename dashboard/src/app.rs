//! The dashboard's web app: settings, shared state, who is asking (sessions, bearer tokens), the
//! security headers every answer carries, and the JSON error shape of SPEC §9.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use repair_rules::rules::RuleSet;

use crate::auth::{LoginLimiter, Role, Tokens};
use crate::jobs::Jobs;
use crate::store::{Store, StoreError, now_ms};

/// The name of the session cookie.
pub const SESSION_COOKIE: &str = "mend_session";

/// A web user from the config.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// Argon2 PHC string.
    pub password_hash: String,
}

/// Everything the dashboard is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Where the operations endpoints are served apart from the UI and the API (else beside them).
    pub ops_listen: Option<SocketAddr>,
    pub users: Vec<User>,
    pub tokens: Tokens,
    /// JSON Pointers of payload fields masked for viewers.
    pub mask: Vec<String>,
    pub session_ttl: Duration,
    /// How long announcements are kept for timelines and rule counts.
    pub events_retention: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Messages per second a bulk resubmission sends after its canary.
    pub bulk_rate: u32,
    /// How long a bulk resubmission waits for its canary's outcome.
    pub canary_timeout: Duration,
    /// The memory all password checks at once may take, in KiB.
    pub login_memory_kib: u32,
    /// Proxies whose `X-Forwarded-For` names the client (and whose `X-Forwarded-Proto` is believed).
    pub trusted_proxies: crate::auth::TrustedProxies,
    /// Cookies always carry `Secure` (the dashboard is only reached over TLS).
    pub secure_cookies: bool,
    /// How long a person's action waits for JetStream's confirmation (its claim on the message
    /// lasts three times as long).
    pub publish_timeout: Duration,
    /// `mend dev`: no login; everyone acts as this role.
    pub anonymous: Option<Role>,
    /// How long a parked failure or an announcement taken by a dashboard may stay unacked before
    /// NATS offers it again (to this or another dashboard).
    pub ack_wait: Duration,
}

/// The loaded rules, for dry-runs (`None`: no rules configured).
pub type RulesSource = Arc<dyn Fn() -> Option<Arc<RuleSet>> + Send + Sync>;

/// What every handler shares.
pub struct AppState {
    pub settings: Settings,
    pub store: Store,
    pub js: async_nats::jetstream::Context,
    pub client: async_nats::Client,
    pub rules: RulesSource,
    /// Failed logins per client address and name.
    pub limiter: LoginLimiter,
    /// Failed logins per client address, whatever the name.
    pub address_limiter: LoginLimiter,
    /// The memory bound of password checks at once.
    pub password_checks: crate::auth::PasswordChecks,
    pub jobs: Jobs,
    /// Places for dry-run evaluations ([`crate::api::DRY_RUNS_IN_FLIGHT`]).
    pub dry_runs: Arc<tokio::sync::Semaphore>,
    /// The held keys, followed from the sidecars' bucket.
    pub holds: crate::holds::HoldsCache,
}

pub type Shared = Arc<AppState>;

/// Who is asking, and how.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// The session's CSRF token (web sessions only).
    pub csrf: Option<String>,
    /// The session id (web sessions only), to log out.
    pub session: Option<String>,
}

impl Principal {
    /// `Ok` when the principal's role includes `needed`, else a 403.
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role.allows(needed) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this needs the {needed} role; {} is {}",
                    self.name, self.role
                ),
            ))
        }
    }

    /// Whether payload fields are masked for this principal.
    pub fn masked(&self) -> bool {
        self.role == Role::Viewer
    }
}

/// An API caller: a bearer token (or anyone under `mend dev`). 401 otherwise.
pub struct ApiCaller(pub Principal);

impl FromRequestParts<Shared> for ApiCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        if let Some(role) = state.settings.anonymous {
            // No token is asked for, so a page on another site the user has open could make the
            // browser send a change here (a POST without a body needs no preflight). Browsers say
            // where a request comes from; a change from another origin is refused.
            if !parts.method.is_safe() && from_another_origin(&parts.headers) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "a change from a page of another origin is refused",
                ));
            }
            return Ok(ApiCaller(anonymous(role)));
        }
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(token) = presented else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an API token is required: Authorization: Bearer <token>",
            ));
        };
        match state.settings.tokens.check(token) {
            Some((name, role)) => Ok(ApiCaller(Principal {
                name: format!("token:{name}"),
                role,
                csrf: None,
                session: None,
            })),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the API token is not valid",
            )),
        }
    }
}

/// A web user with a live session (or anyone under `mend dev`); others are sent to the login page.
pub struct WebUser(pub Principal);

impl FromRequestParts<Shared> for WebUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        if let Some(role) = state.settings.anonymous {
            let mut p = anonymous(role);
            // Forms still carry a token; without sessions it is fixed per process.
            p.csrf = Some(state.dev_csrf());
            return Ok(WebUser(p));
        }
        let to_login = || {
            let next = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into());
            let location = format!("/login?next={}", crate::ui::query_escape(&next));
            (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
        };
        let Some(id) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(to_login());
        };
        match state.store.session(&id, now_ms()).await {
            Ok(Some(s)) => {
                // The user as configured now, not as at login: a removed user's sessions end, a
                // demoted one acts with the new role from the next request on.
                let Some(user) = state.settings.users.iter().find(|u| u.name == s.username) else {
                    let _ = state.store.delete_session(&id).await;
                    return Err(to_login());
                };
                Ok(WebUser(Principal {
                    name: s.username,
                    role: user.role,
                    csrf: Some(s.csrf),
                    session: Some(id),
                }))
            }
            Ok(None) => Err(to_login()),
            Err(e) => Err(ApiError::from(e).into_response()),
        }
    }
}

impl AppState {
    /// The CSRF token of forms under `mend dev` (no sessions there).
    pub fn dev_csrf(&self) -> String {
        static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        TOKEN.get_or_init(crate::auth::new_secret).clone()
    }
}

/// Whether a browser sent this request for a page of another origin: `Sec-Fetch-Site` says so, or
/// `Origin` names another host than the one asked. Clients that are not browsers (curl, scripts)
/// send neither and are let through.
fn from_another_origin(headers: &axum::http::HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, host) {
        (Some(o), Some(h)) => !o.eq_ignore_ascii_case(h),
        _ => true,
    }
}

fn anonymous(role: Role) -> Principal {
    Principal {
        name: "dev".into(),
        role,
        csrf: None,
        session: None,
    }
}

/// The value of cookie `name`.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

impl AppState {
    /// Whether cookies get the `Secure` flag: always with `secure_cookies`, else when a trusted proxy
    /// says the browser reached it over TLS (`X-Forwarded-Proto: https`). From any other peer the
    /// header is the client's own say and is ignored.
    pub fn cookies_secure(&self, peer: std::net::IpAddr, headers: &HeaderMap) -> bool {
        self.settings.secure_cookies
            || (self.settings.trusted_proxies.trusts(peer)
                && headers
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.eq_ignore_ascii_case("https")))
    }
}

/// An error answer: `{"error": {"code": …, "message": …}}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// What a listing of held keys could not do.
    pub fn holds(e: crate::holds::HoldsError) -> Self {
        match e {
            crate::holds::HoldsError::BadCursor(_) => Self::bad_request(e.to_string()),
            crate::holds::HoldsError::NotReady => Self::unavailable(e.to_string()),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// An action whose publish was not confirmed in time: it may or may not have been stored.
    pub fn unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let (true, StoreError::Corrupt(what)) = (crate::store::is_bad_cursor(&e), &e) {
            return ApiError::bad_request(what.clone());
        }
        tracing::error!(error = %e, "Store error.");
        ApiError::unavailable(format!("the store failed: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

/// The Content-Security-Policy of every page: only our own scripts, styles and forms.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers to every answer and gives API errors of the layers below (an
/// oversize body, an unknown route) the JSON shape.
pub async fn security(State(_state): State<Shared>, req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let mut res = next.run(req).await;
    if api
        && res
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|v| v != "application/json")
    {
        let status = res.status();
        let shaped = match status {
            StatusCode::PAYLOAD_TOO_LARGE => Some(ApiError::new(
                status,
                "too_large",
                "the request body is larger than max_body_bytes",
            )),
            StatusCode::NOT_FOUND => Some(ApiError::not_found("no such route")),
            StatusCode::METHOD_NOT_ALLOWED => Some(ApiError::new(
                status,
                "method_not_allowed",
                "this route does not take that method",
            )),
            s if s.is_client_error() => Some(ApiError::bad_request(format!(
                "the request was refused ({})",
                s.canonical_reason().unwrap_or("client error")
            ))),
            _ => None,
        };
        if let Some(e) = shaped {
            res = e.into_response();
        }
    }
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}
