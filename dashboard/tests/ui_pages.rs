//! The web UI without NATS: pages rendered from their template structs, and the whole router served
//! in-process over a SQLite store with a NATS client that never connects (nothing here publishes:
//! every request either reads the store, is refused before publishing, or is a dry-run).

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use mend_dashboard::app::AppState;
use mend_dashboard::auth::{LoginLimiter, Role, Tokens, hash_password};
use mend_dashboard::jobs::{JobState, Jobs, Kind, Progress};
use mend_dashboard::store::{Status, Store, now_ms};
use mend_dashboard::ui::{JobPage, Nav, done_text, query_escape};
use mend_dashboard::{Settings, User};
use repair_rules::rules::RuleSet;
use repair_rules::{ENVELOPE_VERSION, ErrorKind, FailureEnvelope, FailureError, HistoryEntry};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Template structs

fn nav() -> Nav {
    Nav {
        who: Some("olga".into()),
        role: "operator".into(),
        csrf: "tok".into(),
        page: "jobs",
        can_logout: true,
        flash: None,
    }
}

fn progress(state: JobState, finished: bool) -> Progress {
    Progress {
        id: "job1".into(),
        kind: Kind::Resubmit,
        group: Some("g<1>".into()),
        by: "olga".into(),
        state,
        total: 10,
        done: 3,
        skipped: 1,
        failed: 0,
        not_repaired: 0,
        canary: Some("ORDERS:7".into()),
        message: None,
        started_at: now_ms(),
        finished_at: finished.then(now_ms),
    }
}

#[test]
fn a_running_job_refreshes_itself_and_offers_stop() {
    let job = mend_dashboard::ui::JobRow::of(&progress(JobState::Canary, false));
    let html = JobPage {
        nav: nav(),
        job,
        can_stop: true,
    }
    .render()
    .unwrap();
    assert!(html.contains(r#"<meta http-equiv="refresh" content="2">"#));
    assert!(html.contains(r#"action="/jobs/job1/stop""#));
    assert!(html.contains(r#"<input type="hidden" name="csrf" value="tok">"#));
    assert!(html.contains(r#"<progress max="10" value="4">"#));
    assert!(html.contains("/messages/ORDERS%3A7"));
    assert!(html.contains("g&#60;1&#62;"), "the group is escaped");

    let job = mend_dashboard::ui::JobRow::of(&progress(JobState::Finished, true));
    let html = JobPage {
        nav: nav(),
        job,
        can_stop: false,
    }
    .render()
    .unwrap();
    assert!(!html.contains("http-equiv"));
    assert!(!html.contains("/stop"));
}

#[test]
fn flashes_are_fixed_texts() {
    assert!(done_text("resubmitted").is_some());
    assert!(done_text("discarded").is_some());
    assert!(done_text("released").is_some());
    assert!(done_text("stopped").is_some());
    assert!(done_text("<script>").is_none());
    let nav = nav().with_done(Some("anything else"));
    assert!(nav.flash.is_none());
}

// ---------------------------------------------------------------------------------------------
// The router, in-process

struct Dashboard {
    addr: SocketAddr,
    store: Store,
    _dir: tempfile::TempDir,
}

const RULES: &str = r#"
[[rule]]
name = "amount-as-number"
when = 'error.code == "bad_type" && type(payload.amount) == string'
set  = { "/amount" = 'double(payload.amount)' }
"#;

async fn dashboard(rules: Option<&str>) -> Dashboard {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/ui.db", dir.path().display()))
        .await
        .unwrap();
    // Never connects (nothing listens on port 1); requests here publish nothing.
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect("127.0.0.1:1")
        .await
        .unwrap();
    let users = vec![
        User {
            name: "olga".into(),
            role: Role::Operator,
            password_hash: hash_password("olga-pw").unwrap(),
        },
        User {
            name: "vera".into(),
            role: Role::Viewer,
            password_hash: hash_password("vera-pw").unwrap(),
        },
    ];
    let rules = rules.map(|text| Arc::new(RuleSet::parse([("test.toml", text)]).unwrap()));
    let holds = mend_dashboard::holds::HoldsCache::start(
        async_nats::jetstream::new(client.clone()),
        tokio_util::sync::CancellationToken::new(),
    );
    let state = Arc::new(AppState {
        settings: Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            ops_listen: None,
            users,
            tokens: Tokens::default(),
            mask: vec!["/card".into()],
            session_ttl: Duration::from_secs(3600),
            events_retention: Duration::from_secs(86400),
            max_body_bytes: 1 << 20,
            bulk_rate: 10,
            canary_timeout: Duration::from_secs(5),
            login_memory_kib: 64 * 1024,
            trusted_proxies: Default::default(),
            secure_cookies: false,
            publish_timeout: Duration::from_secs(10),
            anonymous: None,
            ack_wait: Duration::from_secs(60),
        },
        store: store.clone(),
        js: async_nats::jetstream::new(client.clone()),
        client,
        rules: Arc::new(move || rules.clone()),
        limiter: LoginLimiter::default(),
        address_limiter: LoginLimiter::default(),
        password_checks: mend_dashboard::auth::PasswordChecks::new(64 * 1024),
        jobs: Jobs::default(),
        dry_runs: Arc::new(tokio::sync::Semaphore::new(
            mend_dashboard::api::DRY_RUNS_IN_FLIGHT,
        )),
        holds,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = mend_dashboard::router(state);
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Dashboard {
        addr,
        store,
        _dir: dir,
    }
}

fn envelope(seq: u64, code: &str, payload: serde_json::Value) -> FailureEnvelope {
    let mut error = FailureError::bare(ErrorKind::Message, Some(422));
    error.code = Some(code.to_owned());
    error.title = Some(format!("{code} <title>"));
    FailureEnvelope {
        version: ENVELOPE_VERSION,
        id: format!("ORDERS:{seq}"),
        service: "orders".into(),
        binding: "orders".into(),
        stream: "ORDERS".into(),
        seq,
        subject: "orders.created".into(),
        key: Some(format!("acct-{seq}")),
        headers: [(
            "Trace".to_owned(),
            vec!["<script>alert(1)</script>".to_owned()],
        )]
        .into_iter()
        .collect(),
        payload,
        payload_base64: None,
        payload_ref: None,
        headers_base64: None,
        error,
        attempt: 1,
        first_failed_at: "2026-11-23T10:00:00Z".into(),
        failed_at: "2026-11-23T10:00:00Z".into(),
        reason: Some("no_rule: no rule matched".into()),
        history: vec![HistoryEntry {
            at: "2026-11-23T10:00:00Z".into(),
            what: "parked".into(),
            by: "processor".into(),
            attempt: None,
            error: None,
            note: None,
        }],
    }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find(r#"name="csrf" value=""#)
            .expect("a csrf field")
            + 19;
        let end = self.body[at..].find('"').unwrap();
        self.body[at..at + end].to_owned()
    }
}

fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// One HTTP/1.1 request on its own connection.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: &str,
    body: Option<String>,
) -> Answer {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !cookie.is_empty() {
        req.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    let body = body.unwrap_or_default();
    if method == "POST" {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// Logs in; the session cookie.
async fn login(d: &Dashboard, user: &str, password: &str) -> String {
    let page = http(d.addr, "GET", "/login?next=%2Fmessages", "", None).await;
    assert_eq!(page.status, 200);
    let login_cookie = page.cookies()[0].split(';').next().unwrap().to_owned();
    let done = http(
        d.addr,
        "POST",
        "/login",
        &login_cookie,
        Some(form(&[
            ("csrf", &page.csrf()),
            ("next", "/messages"),
            ("username", user),
            ("password", password),
        ])),
    )
    .await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(done.header("location"), Some("/messages"));
    let cookies = done.cookies();
    // Both the session and the clearing of the login form's cookie reach the browser.
    assert!(
        cookies.iter().any(|c| c.starts_with("mend_login=;")),
        "{cookies:?}"
    );
    let session = cookies
        .iter()
        .find(|c| c.starts_with("mend_session="))
        .expect("a session cookie");
    assert!(session.contains("HttpOnly") && session.contains("SameSite=Strict"));
    session.split(';').next().unwrap().to_owned()
}

async fn seed(d: &Dashboard) {
    let payload =
        json!({"amount": "12.5", "card": "4111-1111", "note": "</textarea><script>x</script>"});
    for seq in 1..=3 {
        d.store
            .ingest_parked(&envelope(seq, "bad_type", payload.clone()), now_ms())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn pages_need_a_login() {
    let d = dashboard(None).await;
    let a = http(d.addr, "GET", "/messages?status=parked", "", None).await;
    assert_eq!(a.status, 303);
    assert_eq!(
        a.header("location"),
        Some("/login?next=%2Fmessages%3Fstatus%3Dparked")
    );
}

#[tokio::test]
async fn the_list_links_filters_and_offers_selection_to_operators() {
    let d = dashboard(None).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let a = http(
        d.addr,
        "GET",
        "/messages?status=parked&service=orders",
        &olga,
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-security-policy")
            .unwrap()
            .contains("script-src 'self'")
    );
    assert!(
        a.body
            .contains(r#"<span class="status status-parked">parked</span>"#)
    );
    assert!(
        a.body
            .contains(r#"<a href="/messages/ORDERS%3A2">ORDERS:2</a>"#)
    );
    assert!(
        a.body
            .contains(r#"<input type="checkbox" name="id" value="ORDERS:2@1""#)
    );
    assert!(a.body.contains(r#"<option value="parked" selected>"#));
    assert!(
        a.body
            .contains(r#"value="resubmit">Resubmit selected</button>"#)
    );
    assert!(
        a.body.contains("bad_type &#60;title&#62;"),
        "titles are escaped"
    );
    assert!(!a.body.contains("style="), "no inline styles (CSP)");

    let vera = login(&d, "vera", "vera-pw").await;
    let a = http(d.addr, "GET", "/messages", &vera, None).await;
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("checkbox"));
    assert!(!a.body.contains("Resubmit selected"));

    let a = http(d.addr, "GET", "/messages?status=lost", &olga, None).await;
    assert_eq!(a.status, 400);
    assert!(a.body.contains(r#"class="error" role="alert""#));
}

#[tokio::test]
async fn the_detail_masks_for_viewers_and_escapes_everything() {
    let d = dashboard(None).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let a = http(d.addr, "GET", "/messages/ORDERS%3A1", &olga, None).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("4111-1111"));
    assert!(a.body.contains(r#"<textarea id="payload" name="payload""#));
    assert!(
        a.body
            .contains(r#"<input type="hidden" name="attempt" value="1">"#)
    );
    assert!(a.body.contains(r#"action="/messages/ORDERS%3A1/discard""#));
    assert!(
        !a.body.contains("<script>"),
        "payload and headers are escaped"
    );
    assert!(a.body.contains("&#60;/textarea&#62;&#60;script&#62;"));

    let vera = login(&d, "vera", "vera-pw").await;
    let a = http(d.addr, "GET", "/messages/ORDERS%3A1", &vera, None).await;
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("4111-1111"), "masked for viewers");
    assert!(a.body.contains("&#34;card&#34;: &#34;***&#34;"));
    assert!(!a.body.contains("/resubmit\""));
    assert!(!a.body.contains("/discard\""));

    let a = http(d.addr, "GET", "/messages/ORDERS%3A99", &olga, None).await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn a_bad_json_edit_is_refused_on_the_page_and_nothing_changes() {
    let d = dashboard(None).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let page = http(d.addr, "GET", "/messages/ORDERS%3A1", &olga, None).await;
    let draft = "{\r\n  \"amount\": 12.5,,\r\n  \"x\": \"<b>\"\r\n}";
    let a = http(
        d.addr,
        "POST",
        "/messages/ORDERS%3A1/resubmit",
        &olga,
        Some(form(&[
            ("csrf", &page.csrf()),
            ("attempt", "1"),
            ("payload", draft),
            ("note", "fixing <it>"),
        ])),
    )
    .await;
    assert_eq!(a.status, 422, "{}", a.body);
    assert!(
        a.body
            .contains(r#"<p class="error" role="alert">The payload is not valid JSON: "#)
    );
    assert!(a.body.contains(
        "\n{\n  &#34;amount&#34;: 12.5,,\n  &#34;x&#34;: &#34;&#60;b&#62;&#34;\n}</textarea>"
    ));
    assert!(a.body.contains(r#"value="fixing &#60;it&#62;""#));
    let m = d.store.get("ORDERS:1").await.unwrap().unwrap();
    assert_eq!(m.status, Status::Parked);
    assert!(d.store.audit(10, None).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn forms_without_the_token_and_viewers_are_refused() {
    let d = dashboard(None).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    for (path, body) in [
        ("/messages/ORDERS%3A1/discard", form(&[("note", "x")])),
        ("/messages/ORDERS%3A1/resubmit", form(&[("csrf", "forged")])),
        (
            "/messages/bulk",
            form(&[("id", "ORDERS:1"), ("action", "discard")]),
        ),
        ("/groups/abc/discard", String::new()),
        (
            "/holds/release",
            form(&[("service", "orders"), ("key", "acct-1")]),
        ),
        ("/jobs/abc/stop", String::new()),
        ("/rules/try", form(&[("id", "ORDERS:1")])),
    ] {
        let a = http(d.addr, "POST", path, &olga, Some(body)).await;
        assert_eq!(a.status, 403, "{path}: {}", a.body);
        assert!(a.body.contains("Form expired"), "{path}");
    }

    let vera = login(&d, "vera", "vera-pw").await;
    let csrf = http(d.addr, "GET", "/messages", &vera, None).await.csrf();
    for (path, body) in [
        (
            "/messages/ORDERS%3A1/discard",
            form(&[("csrf", &csrf), ("note", "x")]),
        ),
        ("/messages/ORDERS%3A1/resubmit", form(&[("csrf", &csrf)])),
        (
            "/messages/bulk",
            form(&[("csrf", &csrf), ("id", "ORDERS:1"), ("action", "discard")]),
        ),
        ("/groups/abc/resubmit", form(&[("csrf", &csrf)])),
        ("/jobs/abc/stop", form(&[("csrf", &csrf)])),
    ] {
        let a = http(d.addr, "POST", path, &vera, Some(body)).await;
        assert_eq!(a.status, 403, "{path}: {}", a.body);
        assert!(a.body.contains("Not allowed"), "{path}");
    }
    assert_eq!(
        d.store.get("ORDERS:1").await.unwrap().unwrap().status,
        Status::Parked
    );
    assert!(d.store.audit(10, None).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn the_rules_are_tried_without_sending_anything() {
    let d = dashboard(Some(RULES)).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let csrf = http(d.addr, "GET", "/rules", &olga, None).await.csrf();

    let a = http(
        d.addr,
        "POST",
        "/messages/ORDERS%3A1/try",
        &olga,
        Some(form(&[("csrf", &csrf)])),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.body
            .contains(r#"<span class="decision decision-repaired">repaired</span>"#)
    );
    assert!(a.body.contains("&#34;amount&#34;: 12.5"));
    assert!(a.body.contains("Resubmit with the repaired payload"));

    let group = d.store.get("ORDERS:1").await.unwrap().unwrap().group_id;
    let draft = "[[rule]]\nname = \"park-all\"\nwhen = 'true'\npark = \"not today\"\n";
    let a = http(
        d.addr,
        "POST",
        &format!("/groups/{group}/try"),
        &olga,
        Some(form(&[("csrf", &csrf), ("rules", draft)])),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body.matches("decision-parked").count(), 3);
    assert!(a.body.contains("not today"));

    let a = http(
        d.addr,
        "POST",
        "/rules/try",
        &olga,
        Some(form(&[
            ("csrf", &csrf),
            ("id", "ORDERS:2"),
            ("rules", "[[rule]]\nname = "),
        ])),
    )
    .await;
    assert_eq!(a.status, 422);
    assert!(
        a.body
            .contains(r#"class="error" role="alert">the draft rules do not load"#)
    );
    assert!(a.body.contains("name = </textarea>"), "the draft is kept");

    let vera = login(&d, "vera", "vera-pw").await;
    let csrf = http(d.addr, "GET", "/rules", &vera, None).await.csrf();
    let a = http(
        d.addr,
        "POST",
        "/messages/ORDERS%3A1/try",
        &vera,
        Some(form(&[("csrf", &csrf)])),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("decision-repaired"));
    assert!(
        !a.body.contains("4111-1111"),
        "the repaired payload is masked"
    );
    assert!(!a.body.contains("Resubmit with"));
    let a = http(
        d.addr,
        "POST",
        "/messages/ORDERS%3A1/try",
        &vera,
        Some(form(&[("csrf", &csrf), ("rules", draft)])),
    )
    .await;
    assert_eq!(a.status, 403, "viewers try the loaded rules only");
}

#[tokio::test]
async fn the_other_pages_render() {
    let d = dashboard(None).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let a = http(d.addr, "GET", "/groups", &olga, None).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("Resubmit group (canary first)"));
    assert!(
        a.body.contains("&amp;status=parked\">3 parked</a>")
            || a.body.contains("&#38;status=parked\">3 parked</a>")
    );
    let a = http(d.addr, "GET", "/rules", &olga, None).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("No rules are configured for the dashboard"));
    let a = http(d.addr, "GET", "/jobs", &olga, None).await;
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("http-equiv"));
    let a = http(d.addr, "GET", "/jobs/nope", &olga, None).await;
    assert_eq!(a.status, 404);
    let a = http(d.addr, "GET", "/audit", &olga, None).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("No action has been taken yet."));
    let a = http(
        d.addr,
        "GET",
        "/messages/ORDERS%3A1?done=%3Cb%3E",
        &olga,
        None,
    )
    .await;
    assert!(!a.body.contains("class=\"flash\""), "only known flashes");
    let a = http(
        d.addr,
        "GET",
        "/messages/ORDERS%3A1?done=discarded",
        &olga,
        None,
    )
    .await;
    assert!(
        a.body
            .contains("<p class=\"flash\" role=\"status\">Discarded.")
    );
    // A form's address opened as a page (after a login) leads back to the form's page.
    let a = http(d.addr, "GET", "/messages/ORDERS%3A1/resubmit", &olga, None).await;
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/messages/ORDERS%3A1"));
}

/// A viewer's text search cannot find what masking hides: `q=4111` would tell a viewer how the
/// masked card number starts. Unmasked fields are found as before; an operator finds both.
#[tokio::test]
async fn a_viewers_search_does_not_see_through_masks() {
    let d = dashboard(None).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let vera = login(&d, "vera", "vera-pw").await;
    let found = |body: &str| body.contains(r#"<a href="/messages/ORDERS%3A1">ORDERS:1</a>"#);
    let a = http(d.addr, "GET", "/messages?q=4111", &olga, None).await;
    assert!(found(&a.body), "an operator finds the card");
    let a = http(d.addr, "GET", "/messages?q=4111", &vera, None).await;
    assert_eq!(a.status, 200);
    assert!(!found(&a.body), "a viewer does not");
    let a = http(d.addr, "GET", "/messages?q=12.5", &vera, None).await;
    assert!(found(&a.body), "unmasked fields are found");
}

/// What a masked field holds is hidden wherever else it shows on the message's page: the key, an
/// app error that echoes it, a header, a history note. An operator sees it all.
#[tokio::test]
async fn masked_values_do_not_leak_through_the_rest_of_the_message() {
    let d = dashboard(None).await;
    let mut env = envelope(
        9,
        "declined",
        json!({"card": "5500-0000-9999", "amount": 1}),
    );
    env.key = Some("5500-0000-9999".into());
    env.error.detail = Some("card 5500-0000-9999 was declined".into());
    env.headers
        .insert("Card".into(), vec!["5500-0000-9999".into()]);
    env.history[0].note = Some("tried 5500-0000-9999".into());
    d.store.ingest_parked(&env, now_ms()).await.unwrap();
    let olga = login(&d, "olga", "olga-pw").await;
    let vera = login(&d, "vera", "vera-pw").await;
    let a = http(d.addr, "GET", "/messages/ORDERS%3A9", &olga, None).await;
    assert!(a.body.contains("card 5500-0000-9999 was declined"));
    let a = http(d.addr, "GET", "/messages/ORDERS%3A9", &vera, None).await;
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("5500-0000-9999"), "{}", a.body);
    assert!(a.body.contains("card *** was declined"));
    // Nor in the list, nor through a search.
    let a = http(d.addr, "GET", "/messages", &vera, None).await;
    assert!(a.body.contains("ORDERS:9") && !a.body.contains("5500-0000-9999"));
    let a = http(d.addr, "GET", "/messages?q=5500-0000", &vera, None).await;
    assert!(
        !a.body.contains("ORDERS:9"),
        "found through the key or the error"
    );
}

#[tokio::test]
async fn a_dry_run_does_not_show_a_viewer_what_masked_fields_hold() {
    // A loaded rule that copies the masked card number into another field of its repair.
    let d = dashboard(Some(
        r#"
[[rule]]
name = "memo-from-card"
when = 'error.code == "bad_type"'
set  = { "/memo" = '"card " + payload.card' }
"#,
    ))
    .await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let csrf = http(d.addr, "GET", "/rules", &olga, None).await.csrf();
    let a = http(
        d.addr,
        "POST",
        "/messages/ORDERS%3A1/try",
        &olga,
        Some(form(&[("csrf", &csrf)])),
    )
    .await;
    assert!(a.body.contains("card 4111-1111"), "{}", a.body);
    let vera = login(&d, "vera", "vera-pw").await;
    let csrf = http(d.addr, "GET", "/rules", &vera, None).await.csrf();
    for path in ["/messages/ORDERS%3A1/try", "/groups/GROUP/try"] {
        let path = path.replace("GROUP", &group_of(&d, "ORDERS:1").await);
        let a = http(d.addr, "POST", &path, &vera, Some(form(&[("csrf", &csrf)]))).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        assert!(a.body.contains("decision-repaired"), "{path}: {}", a.body);
        assert!(!a.body.contains("4111-1111"), "{path}: {}", a.body);
    }
}

/// The failure group of message `id`.
async fn group_of(d: &Dashboard, id: &str) -> String {
    d.store.get(id).await.unwrap().unwrap().group_id
}

/// The threads of this process that are running or ready to run now (state `R`), by id: a thread
/// parked in the blocking pool, or waiting on SQLite, is not one of them.
fn busy_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // `pid (comm) S …`: the state follows the last `)`, as comm may hold anything.
            let (_, rest) = stat.rsplit_once(')')?;
            rest.trim_start()
                .starts_with('R')
                .then(|| t.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_of_a_costly_draft_at_once_keep_a_bounded_number_of_threads_at_work() {
    let d = dashboard(None).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let csrf = http(d.addr, "GET", "/rules", &olga, None).await.csrf();
    // Eight million steps of nested comprehensions: far longer than a dry-run may take.
    let list: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let draft = format!(
        "[[rule]]\nname = \"slow\"\nwhen = 'size([{l}].map(x, [{l}].map(y, [{l}].filter(z, x + y == z)))) > 0'\nset = {{ \"/n\" = '1' }}\n",
        l = list.join(",")
    );
    let started = std::time::Instant::now();
    let tries = (0..12).map(|_| {
        let body = form(&[("csrf", &csrf), ("rules", &draft)]);
        let olga = olga.clone();
        let addr = d.addr;
        tokio::spawn(async move {
            http(addr, "POST", "/messages/ORDERS%3A1/try", &olga, Some(body)).await
        })
    });
    let tries: Vec<_> = tries.collect();
    // Threads at work for a while: running (or waiting for a core) in five samples in a row, 100
    // ms. An evaluation's thread is busy for its whole two seconds; threads that only pass
    // through the state (a worker, SQLite's, any thread waiting for a core of a loaded machine)
    // are not, for that long.
    let mut streaks: std::collections::HashMap<String, u32> = Default::default();
    let mut most = 0;
    while tries.iter().any(|t| !t.is_finished()) {
        let now = busy_threads();
        streaks.retain(|tid, _| now.contains(tid));
        for tid in now {
            *streaks.entry(tid).or_default() += 1;
        }
        most = most.max(streaks.values().filter(|n| **n >= 5).count());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let mut stopped = 0;
    for t in tries {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200);
        stopped += usize::from(a.body.contains("time limit"));
    }
    // The evaluations themselves stop at the limit (2 s), so their places free up for the next:
    // more of them reach their limit than there are places.
    assert!(
        stopped > mend_dashboard::api::DRY_RUNS_IN_FLIGHT,
        "{stopped} of 12 evaluations were stopped at their time limit"
    );
    assert!(
        took < std::time::Duration::from_secs(15),
        "12 dry-runs took {took:?}"
    );
    // Counted are the threads at work, not those the blocking pool keeps idle between two
    // evaluations (it may start a new one before the last one's thread is back in the pool): the
    // evaluations, and one more at most (an evaluation's thread finishing as the next starts).
    // Without the bound, 12 evaluations run at once.
    assert!(
        most <= mend_dashboard::api::DRY_RUNS_IN_FLIGHT + 1,
        "{most} threads at work at most during 12 dry-runs at once"
    );
}

#[tokio::test]
async fn a_patch_bomb_in_a_draft_is_stopped_at_the_size_limit() {
    let d = dashboard(None).await;
    seed(&d).await;
    let olga = login(&d, "olga", "olga-pw").await;
    let csrf = http(d.addr, "GET", "/rules", &olga, None).await.csrf();
    // Copied out and back in, 31 times (63 operations, within the 64 allowed): `/a` would double
    // each time, to 2^31 times its size.
    let mut ops =
        vec!["{ op = \"add\", path = \"/a\", value = { x = \"0123456789\" } }".to_owned()];
    ops.extend((0..31).flat_map(|i| {
        [
            "{ op = \"copy\", from = \"/a\", path = \"/b\" }".to_owned(),
            format!("{{ op = \"copy\", from = \"/b\", path = \"/a/k{i}\" }}"),
        ]
    }));
    let draft = format!(
        "[[rule]]\nname = \"bomb\"\nwhen = 'true'\npatch = [{}]\n",
        ops.join(", ")
    );
    let started = std::time::Instant::now();
    let a = http(
        d.addr,
        "POST",
        "/messages/ORDERS%3A1/try",
        &olga,
        Some(form(&[("csrf", &csrf), ("rules", &draft)])),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("decision-parked"), "{}", a.body);
    assert!(
        a.body.contains("over the rules&#39; limit of 262144"),
        "{}",
        a.body
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn the_audit_log_shows_a_viewer_nothing_of_what_masked_fields_hold() {
    let d = dashboard(None).await;
    let mut env = envelope(
        9,
        "declined",
        json!({"card": "5500-0000-9999", "amount": 1}),
    );
    env.key = Some("5500-0000-9999".into());
    d.store.ingest_parked(&env, now_ms()).await.unwrap();
    d.store
        .record(
            &mend_dashboard::store::Audit {
                actor: "olga",
                action: "edit_and_resubmit",
                message_id: Some("ORDERS:9"),
                service: Some("orders"),
                key: Some("5500-0000-9999"),
                note: Some("card 5500-0000-9999 fixed"),
                before: Some(r#"{"card":"5500-0000-9999","amount":"1"}"#),
                after: Some(r#"{"card":"5500-0000-9999","amount":1,"memo":"5500-0000-9999"}"#),
            },
            now_ms(),
        )
        .await
        .unwrap();
    let olga = login(&d, "olga", "olga-pw").await;
    let a = http(d.addr, "GET", "/audit", &olga, None).await;
    assert!(a.body.contains("card 5500-0000-9999 fixed"), "{}", a.body);
    let vera = login(&d, "vera", "vera-pw").await;
    let a = http(d.addr, "GET", "/audit", &vera, None).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("edit_and_resubmit"), "{}", a.body);
    assert!(!a.body.contains("5500-0000-9999"), "{}", a.body);
}
