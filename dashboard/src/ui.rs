//! The web UI (SPEC §9): server-rendered askama pages that work without JavaScript. Every form that
//! changes something carries the session's CSRF token; every page is escaped by askama.
//!
//! Pages: the overview and login here; `messages` (list, bulk, detail, resubmit, discard),
//! `try_rules` (dry-runs on a message or a group), `groups`, `jobs`, `holds`, `rules`, `audit`.
//! Every action goes through `actions` or `jobs` (so it is audited) after `check_csrf`; a finished
//! action redirects with `?done=<what>`, shown as a fixed text ([`done_text`]).

use std::net::SocketAddr;

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use crate::app::{ApiError, Principal, SESSION_COOKIE, Shared, WebUser, cookie};
use crate::auth::{Role, new_secret, secrets_equal};
use crate::store::{Session, now_ms};

mod audit;
mod groups;
mod holds;
mod jobs;
mod messages;
mod rules;
mod try_rules;

pub use audit::AuditPage;
pub use groups::GroupsPage;
pub use holds::HoldsPage;
pub use jobs::{JobPage, JobRow, JobsPage};
pub use messages::{MessagePage, MessagesPage};
pub use rules::RulesPage;
pub use try_rules::TryPage;

/// The cookie carrying the login form's CSRF token (before there is a session).
const LOGIN_CSRF_COOKIE: &str = "mend_login";

/// The routes of the web UI.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_form).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/static/mend.css", get(css))
        .route("/static/live.js", get(live_js))
        .merge(messages::routes())
        .merge(groups::routes())
        .merge(jobs::routes())
        .merge(holds::routes())
        .merge(rules::routes())
        .merge(audit::routes())
}

/// What the page frame needs: who is logged in, the CSRF token for its forms, the current page.
pub struct Nav {
    pub who: Option<String>,
    pub role: String,
    pub csrf: String,
    pub page: &'static str,
    pub can_logout: bool,
    pub flash: Option<String>,
}

impl Nav {
    pub fn new(who: &Principal, page: &'static str) -> Nav {
        Nav {
            who: Some(who.name.clone()),
            role: who.role.to_string(),
            csrf: who.csrf.clone().unwrap_or_default(),
            page,
            can_logout: who.session.is_some(),
            flash: None,
        }
    }

    /// The frame with the fixed text of a finished action (`?done=…`), never the text given.
    pub fn with_done(mut self, done: Option<&str>) -> Nav {
        self.flash = done.and_then(done_text).map(str::to_owned);
        self
    }

    pub fn anonymous() -> Nav {
        Nav {
            who: None,
            role: String::new(),
            csrf: String::new(),
            page: "",
            can_logout: false,
            flash: None,
        }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub nav: Nav,
    pub title: String,
    pub message: String,
    pub back: String,
}

/// An error as a page, with the status of the API's error.
pub fn error_page(who: Option<&Principal>, e: ApiError, back: &str) -> Response {
    let nav = match who {
        Some(w) => Nav::new(w, ""),
        None => Nav::anonymous(),
    };
    let title = match e.status {
        _ if e.code == "csrf" => "Form expired",
        _ if e.code == "no_rules" => "No rules loaded",
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::CONFLICT => "Changed meanwhile",
        StatusCode::UNPROCESSABLE_ENTITY => "Not accepted",
        StatusCode::PAYLOAD_TOO_LARGE => "Too large",
        StatusCode::TOO_MANY_REQUESTS => "Too many attempts",
        s if s.is_server_error() => "Not available",
        _ => "Not accepted",
    };
    let page = ErrorPage {
        nav,
        title: title.into(),
        message: e.message,
        back: back.into(),
    };
    (e.status, page).into_response()
}

/// Any path nothing else answers: a JSON 404 under `/api`, a page elsewhere.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    let e = ApiError::not_found(format!("nothing at {}", uri.path()));
    if uri.path().starts_with("/api/") {
        e.into_response()
    } else {
        error_page(None, e, "/")
    }
}

/// Checks a form's CSRF token against the session's; a 403 page otherwise.
pub fn check_csrf(who: &Principal, given: &str) -> Result<(), Box<Response>> {
    match &who.csrf {
        Some(expected) if !given.is_empty() && secrets_equal(expected, given) => Ok(()),
        _ => Err(Box::new(error_page(
            Some(who),
            ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "the form's security token is missing or stale; reload the page and try again",
            ),
            "/",
        ))),
    }
}

/// Percent-encodes `s` for a query string or a path segment.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The fixed flash text of a finished action named in `?done=`.
pub fn done_text(done: &str) -> Option<&'static str> {
    Some(match done {
        "resubmitted" => {
            "Resubmitted: the message is on its way back to its service. Its status changes when the outcome is known."
        }
        "discarded" => {
            "Discarded. If it was the head of a held key, the key's held messages are released."
        }
        "released" => {
            "Released: the key's held messages are delivered without waiting for the head, which stays parked."
        }
        "stopped" => "Stop requested: the job stops before its next message.",
        _ => return None,
    })
}

/// Whether `who` may act (resubmit, discard, release, run bulk jobs).
pub fn can_act(who: &Principal) -> bool {
    who.role.allows(Role::Operator)
}

/// A 303 to `location` (a path of this site).
pub fn see_other(location: &str) -> Response {
    Redirect::to(location).into_response()
}

/// JSON as indented text.
pub fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// `text` for a page: indented when it is JSON; for a masked reader, its masked fields hidden,
/// and text that is not JSON (whose fields cannot be told apart) withheld.
pub fn shown_payload(text: &str, masked: &[String]) -> String {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(mut v) => {
            if !masked.is_empty() {
                crate::auth::mask(&mut v, masked);
            }
            pretty(&v)
        }
        Err(_) if masked.is_empty() => text.to_owned(),
        Err(_) => WITHHELD.to_owned(),
    }
}

/// What a masked reader sees instead of a payload that is not JSON.
pub const WITHHELD: &str =
    "(withheld: the payload is not JSON, so its masked fields cannot be hidden)";

/// A form field: `None` when empty or only spaces.
pub fn non_empty(s: &str) -> Option<&str> {
    let t = s.trim();
    (!t.is_empty()).then_some(t)
}

/// A time in epoch ms as UTC text.
pub fn when(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A duration in seconds, short (`3m 20s`).
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The overview's in-place refresh (the page also works, by a plain reload, without it).
async fn live_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../static/live.js"),
    )
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../static/mend.css"),
    )
}

#[derive(Template, WebTemplate)]
#[template(path = "login.html")]
struct LoginPage {
    nav: Nav,
    csrf: String,
    next: String,
    username: String,
    error: Option<String>,
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Where to go after logging in: only a path of this site.
/// Where a login may send the browser next: a path (and query) on this dashboard, else `/`. The
/// value is resolved as a browser resolves a `Location` (WHATWG URL parsing: tabs and newlines
/// dropped anywhere, `\\` taken for `/`, leading spaces and controls trimmed) against a base nobody
/// owns, and only kept if it stays on that base's origin; what is sent back is the resolved path,
/// percent-encoded, never the text as given. So `/\t/evil.example`, `/\\evil.example` or
/// `\n//evil.example` cannot become `//evil.example`.
pub(crate) fn safe_next(next: Option<&str>) -> String {
    let Some(next) = next.filter(|n| n.starts_with('/') && !n.chars().any(char::is_control)) else {
        return "/".into();
    };
    let Ok(base) = url::Url::parse("http://dashboard.invalid/") else {
        return "/".into();
    };
    match base.join(next) {
        Ok(to) if to.origin() == base.origin() => match to.query() {
            Some(query) => format!("{}?{query}", to.path()),
            None => to.path().to_owned(),
        },
        _ => "/".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_stays_on_this_dashboard() {
        for (given, expected) in [
            ("/messages?status=parked", "/messages?status=parked"),
            ("/messages/APP:1", "/messages/APP:1"),
            ("/a b", "/a%20b"),
            ("/../../x", "/x"),
        ] {
            assert_eq!(safe_next(Some(given)), expected, "{given:?}");
        }
        for hostile in [
            "//evil.example/x",
            "/\t/evil.example/x",
            "/\n/evil.example/x",
            "/\r/evil.example",
            "/\\evil.example",
            "\\/evil.example",
            "/\t\\evil.example",
            "\t//evil.example",
            " //evil.example",
            "https://evil.example/",
            "javascript:alert(1)",
            "/\u{0}/evil.example",
            "/\u{7f}/evil.example",
            "evil.example",
            "",
        ] {
            let to = safe_next(Some(hostile));
            assert!(
                to.starts_with('/') && !to.starts_with("//") && !to.contains('\\'),
                "{hostile:?} → {to:?}"
            );
            assert!(
                !to.contains("evil.example") || to.starts_with("/evil.example"),
                "{hostile:?} → {to:?}"
            );
        }
        assert_eq!(safe_next(None), "/");
    }
}

fn login_page(
    status: StatusCode,
    secure: bool,
    next: String,
    username: String,
    error: Option<String>,
) -> Response {
    let csrf = new_secret();
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!(
        "{LOGIN_CSRF_COOKIE}={csrf}; HttpOnly; SameSite=Strict; Path=/login; Max-Age=3600{secure}"
    );
    let page = LoginPage {
        nav: Nav::anonymous(),
        csrf,
        next,
        username,
        error,
    };
    (status, [(header::SET_COOKIE, cookie)], page).into_response()
}

async fn login_form(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if s.settings.anonymous.is_some() {
        return Redirect::to(&next).into_response();
    }
    let secure = s.cookies_secure(peer.ip(), &headers);
    login_page(StatusCode::OK, secure, next, String::new(), None)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

async fn login(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = safe_next(Some(&f.next));
    let secure = s.cookies_secure(peer.ip(), &headers);
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if expected.is_empty() || !secrets_equal(&expected, &f.csrf) {
        return login_page(
            StatusCode::FORBIDDEN,
            secure,
            next,
            f.username,
            Some("The form expired; please log in again.".into()),
        );
    }
    // Failures count per client address and name, and per client address over all names (a
    // spray of names); behind a trusted proxy the address is the client's, not the proxy's.
    let client = s.settings.trusted_proxies.client_ip(
        peer.ip(),
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let key = format!("{client}|{}", f.username);
    let address = client.to_string();
    let now = std::time::Instant::now();
    let allowed = s
        .limiter
        .check(&key, now)
        .and_then(|()| s.address_limiter.check(&address, now));
    if let Err(wait) = allowed {
        return login_page(
            StatusCode::TOO_MANY_REQUESTS,
            secure,
            next,
            f.username,
            Some(format!(
                "Too many failed attempts; try again in {}.",
                age(wait.as_secs().max(1))
            )),
        );
    }
    let user = s
        .settings
        .users
        .iter()
        .find(|u| u.name == f.username)
        .cloned();
    // Hashing takes tens of milliseconds and megabytes: off the async threads, within the memory
    // bound of all checks at once. An unknown user is checked against a fixed hash so both cases
    // take as long.
    let phc = user
        .as_ref()
        .map_or_else(|| dummy_hash().to_owned(), |u| u.password_hash.clone());
    let checked = s
        .password_checks
        .verify(phc, f.password.clone(), LOGIN_CHECK_WAIT)
        .await;
    let Some(matches) = checked else {
        tracing::warn!(client = %client, "Login refused: too many password checks at once.");
        let mut page = login_page(
            StatusCode::TOO_MANY_REQUESTS,
            secure,
            next,
            f.username,
            Some("Too many logins at once; try again in a moment.".into()),
        );
        page.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return page;
    };
    let Some(user) = user.filter(|_| matches) else {
        s.limiter.failed(&key, now);
        s.address_limiter.failed(&address, now);
        // Quoted and escaped (Debug): a name with a newline or an escape sequence cannot forge or
        // hide log lines.
        tracing::warn!(user = ?f.username, client = %client, peer = %peer.ip(), "Failed login.");
        return login_page(
            StatusCode::UNAUTHORIZED,
            secure,
            next,
            f.username,
            Some("Wrong name or password.".into()),
        );
    };
    s.limiter.succeeded(&key);
    let id = new_secret();
    let ttl = s.settings.session_ttl;
    let session = Session {
        username: user.name.clone(),
        role: user.role.to_string(),
        csrf: new_secret(),
        expires_at: now_ms() + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2),
    };
    if let Err(e) = s.store.create_session(&id, &session).await {
        return error_page(None, e.into(), "/login");
    }
    tracing::info!(user = user.name, "Logged in.");
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        ttl.as_secs()
    );
    let clear = format!("{LOGIN_CSRF_COOKIE}=; HttpOnly; SameSite=Strict; Path=/login; Max-Age=0");
    // Appended, not inserted: both cookies must reach the browser.
    (
        StatusCode::SEE_OTHER,
        AppendHeaders([
            (header::SET_COOKIE, cookie),
            (header::SET_COOKIE, clear),
            (header::LOCATION, next),
        ]),
    )
        .into_response()
}

/// An Argon2 hash of a random password, to spend the same time on unknown users.
/// How long a login waits for room among the password checks under way before it is refused.
const LOGIN_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| crate::auth::hash_password(&new_secret()).unwrap_or_default())
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    if let Some(id) = &who.session
        && let Err(e) = s.store.delete_session(id).await
    {
        return error_page(Some(&who), e.into(), "/");
    }
    let clear = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, clear),
            (header::LOCATION, "/login".to_owned()),
        ],
    )
        .into_response()
}

struct CountRow {
    service: String,
    parked: i64,
    resubmitted: i64,
    resolved: i64,
    discarded: i64,
}

struct RuleRow {
    rule: String,
    repaired: i64,
    parked: i64,
    per_hour: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "overview.html")]
struct OverviewPage {
    nav: Nav,
    parked: i64,
    held_keys: usize,
    held_messages: u64,
    oldest: String,
    oldest_id: Option<String>,
    counts: Vec<CountRow>,
    rules: Vec<RuleRow>,
    /// Seconds between two refreshes of the page.
    refresh: u64,
    /// When the figures were read (UTC, `HH:MM:SS`).
    read_at: String,
    charts: Vec<crate::overview::Chart>,
    /// Services with a chart in the API but not on the page.
    more_services: usize,
    groups: Vec<GroupRow>,
    oldest_hold: Option<HoldRow>,
}

struct GroupRow {
    g: crate::overview::GroupTrend,
    spark: crate::overview::Sparkline,
    arrow: &'static str,
}

struct HoldRow {
    h: crate::overview::OldestHold,
    age: String,
}

/// `?refresh=N`: the overview's refresh period in seconds.
#[derive(Deserialize)]
struct OverviewQuery {
    refresh: Option<String>,
}

/// The overview refreshes itself this often by default, and within these bounds when asked.
const REFRESH_DEFAULT: u64 = 15;
const REFRESH_BOUNDS: (u64, u64) = (2, 3600);
/// Charts on the overview at most (the busiest services).
const MOST_CHARTS: usize = 12;

async fn overview(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Query(q): Query<OverviewQuery>,
) -> Response {
    // A refresh period that is not a number is the default; one out of bounds is brought in.
    let refresh = q
        .refresh
        .and_then(|r| r.trim().parse::<u64>().ok())
        .map_or(REFRESH_DEFAULT, |r| {
            r.clamp(REFRESH_BOUNDS.0, REFRESH_BOUNDS.1)
        });
    let since = now_ms() - 24 * 3600 * 1000;
    let o = match s.store.overview(since).await {
        Ok(o) => o,
        Err(e) => return error_page(Some(&who), e.into(), "/"),
    };
    let live = match crate::overview::live(&s).await {
        Ok(live) => live,
        Err(e) => return error_page(Some(&who), e, "/"),
    };
    let held_keys = match s.holds.summary(None).await {
        Ok(summary) => summary.held_keys,
        Err(error) => {
            tracing::warn!(%error, "Cannot list held keys for the overview.");
            0
        }
    };
    let held_messages = crate::holds::held_messages(&s.js)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "Cannot count held messages for the overview.");
            0
        });
    let mut counts: Vec<CountRow> = Vec::new();
    for (service, status, n) in &o.counts {
        if counts.last().is_none_or(|r| &r.service != service) {
            counts.push(CountRow {
                service: service.clone(),
                parked: 0,
                resubmitted: 0,
                resolved: 0,
                discarded: 0,
            });
        }
        if let Some(row) = counts.last_mut() {
            match status.as_str() {
                "parked" => row.parked = *n,
                "resubmitted" => row.resubmitted = *n,
                "resolved" => row.resolved = *n,
                "discarded" => row.discarded = *n,
                _ => {}
            }
        }
    }
    let mut rules: Vec<RuleRow> = Vec::new();
    for (rule, kind, n) in &o.rules {
        if rules.last().is_none_or(|r| &r.rule != rule) {
            rules.push(RuleRow {
                rule: rule.clone(),
                repaired: 0,
                parked: 0,
                per_hour: String::new(),
            });
        }
        if let Some(row) = rules.last_mut() {
            match kind.as_str() {
                "repaired" => row.repaired = *n,
                "parked" => row.parked = *n,
                _ => {}
            }
        }
    }
    for r in &mut rules {
        r.per_hour = format!("{:.1}", r.repaired as f64 / 24.0);
    }
    let (oldest, oldest_id) = match &o.oldest_parked {
        Some((id, at)) => (
            age(u64::try_from((now_ms() - at) / 1000).unwrap_or(0)),
            Some(id.clone()),
        ),
        None => ("–".into(), None),
    };
    // The busiest services first, a page's worth of them; the API has every one.
    let mut busiest: Vec<&crate::overview::ServiceHours> = live.hourly.services.iter().collect();
    busiest.sort_by_key(|svc| std::cmp::Reverse(svc.total()));
    let more_services = busiest.len().saturating_sub(MOST_CHARTS);
    let charts = busiest
        .into_iter()
        .take(MOST_CHARTS)
        .enumerate()
        .map(|(n, svc)| crate::overview::chart(live.hourly.from, svc, n))
        .collect();
    let groups = live
        .top_groups
        .into_iter()
        .map(|g| GroupRow {
            spark: crate::overview::sparkline(&g),
            arrow: match g.trend.as_str() {
                "rising" => "↑",
                "falling" => "↓",
                _ => "→",
            },
            g,
        })
        .collect();
    let read_at = now_ms();
    OverviewPage {
        nav: Nav::new(&who, "overview"),
        parked: counts.iter().map(|c| c.parked).sum(),
        held_keys,
        held_messages,
        oldest,
        oldest_id,
        counts,
        rules,
        refresh,
        read_at: format!(
            "{:02}:{:02}:{:02}",
            read_at / 3_600_000 % 24,
            read_at / 60_000 % 60,
            read_at / 1000 % 60
        ),
        charts,
        more_services,
        groups,
        oldest_hold: live.oldest_hold.map(|h| HoldRow {
            age: age(h.age_seconds),
            h,
        }),
    }
    .into_response()
}
