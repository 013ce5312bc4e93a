//! The dashboard's web pages over plain HTTP (SPEC §9 security): login with sessions and rate
//! limiting, cookies' flags, CSRF tokens on every form, roles, escaping, body limits, and an
//! invalid JSON edit that sends nothing; and the whole loop on PostgreSQL.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mend_e2e::dashboard::{Dashboard, OPERATOR_TOKEN, Stack, browser, hidden, login, login_token};
use mend_e2e::js::{self, Out};
use mend_e2e::postgres::Postgres;
use mend_e2e::world::TEST_TIMEOUT;
use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};
use serde_json::json;

async fn stack(database_url: Option<&str>, extra: &str) -> Stack {
    Stack::start(database_url, extra).await.unwrap()
}

fn order(key: &str, n: u64, account: &str, note: &str) -> Out {
    mend_e2e::dashboard::order_with(key, n, account, json!({"note": note}))
}

#[tokio::test]
async fn login_sessions_and_rate_limiting() {
    // Behind a trusted proxy (on loopback here), whose X-Forwarded-Proto is believed.
    let s = stack(None, "trusted_proxies = [\"127.0.0.0/8\"]").await;
    let d = &s.dashboard;
    // Pages need a login; the login page remembers where to go.
    let res = browser()
        .get(format!("{}/messages?status=parked", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let to = res.headers()[LOCATION].to_str().unwrap();
    assert!(to.starts_with("/login?next="), "{to}");

    // A login form posted without its token is refused.
    let client = browser();
    let res = client
        .post(format!("{}/login", d.url))
        .form(&[
            ("username", "alice"),
            ("password", "alice-password"),
            ("csrf", "made-up"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);

    // A wrong password, then the right one: a session cookie, HttpOnly and SameSite=Strict, and
    // Secure only behind TLS.
    let res = login(d, &client, "alice", "wrong").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.text().await.unwrap().contains("Wrong name or password"));
    let res = login(d, &client, "alice", "alice-password").await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()[LOCATION], "/messages");
    let cookie = res
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("mend_session="))
        .expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "{cookie}");
    let page = client
        .get(format!("{}/messages", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("alice"));

    let tls = browser();
    let csrf = login_token(d, &tls).await;
    let res = tls
        .post(format!("{}/login", d.url))
        .header("x-forwarded-proto", "https")
        .form(&[
            ("username", "alice"),
            ("password", "alice-password"),
            ("csrf", &csrf),
        ])
        .send()
        .await
        .unwrap();
    let cookie = res.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(cookie.contains("; Secure"), "{cookie}");

    // Logging out ends the session on the server too.
    let html = client
        .get(format!("{}/", d.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = hidden(&html, "csrf").unwrap();
    let res = client
        .post(format!("{}/logout", d.url))
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let res = client
        .get(format!("{}/messages", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER, "logged out");

    // Five wrong passwords lock the name out for a while, even with the right one.
    let guesser = browser();
    for _ in 0..5 {
        let res = login(d, &guesser, "victor", "guess").await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    let res = login(d, &guesser, "victor", "victor-password").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        res.text()
            .await
            .unwrap()
            .contains("Too many failed attempts")
    );
}

#[tokio::test]
async fn forms_need_their_token_and_role_and_payloads_are_escaped() {
    let s = stack(None, "max_body_bytes = 4096").await;
    let (world, d) = (&s.world, &s.dashboard);
    let id = d
        .park_one(
            &world.js,
            order("w1", 0, "nobody", "<script>alert(1)</script>"),
        )
        .await
        .unwrap();
    let detail = format!("{}/messages/{id}", d.url);

    let operator = browser();
    assert_eq!(
        login(d, &operator, "alice", "alice-password")
            .await
            .status(),
        StatusCode::SEE_OTHER
    );
    let html = operator
        .get(&detail)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = html.find("alert(1)").map_or(0, |i| i.saturating_sub(60));
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;")
            || html.contains("&#60;script&#62;alert(1)&#60;"),
        "the payload is shown escaped: {}",
        &html[at..(at + 160).min(html.len())]
    );
    assert!(!html.contains("<script>alert"), "never as markup");
    let csrf = hidden(&html, "csrf").unwrap();

    // No token, a wrong token: 403, nothing changes.
    for token in ["", "forged"] {
        let res = operator
            .post(format!("{detail}/discard"))
            .form(&[("csrf", token), ("note", "x"), ("attempt", "1")])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "csrf {token:?}");
    }
    // A viewer with a valid token of their own may not act.
    let viewer = browser();
    assert_eq!(
        login(d, &viewer, "victor", "victor-password")
            .await
            .status(),
        StatusCode::SEE_OTHER
    );
    let vhtml = viewer
        .get(&detail)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!vhtml.contains("/discard\""), "no action forms for viewers");
    let vcsrf = hidden(&vhtml, "csrf").unwrap();
    let res = viewer
        .post(format!("{detail}/discard"))
        .form(&[("csrf", vcsrf.as_str()), ("note", "x"), ("attempt", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    // An edit that is not JSON is refused with the error, keeping the text; nothing is sent.
    let before = world
        .js
        .get_stream("MEND_RETRY")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let res = operator
        .post(format!("{detail}/resubmit"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("attempt", "1"),
            ("payload", "{\"account\": acct-1}"),
            ("note", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let page = res.text().await.unwrap();
    assert!(
        page.contains("role=\"alert\"") && page.contains("not valid JSON"),
        "{page}"
    );
    assert!(page.contains("acct-1}"), "the person's text is kept");
    // Too large a form: 413.
    let res = operator
        .post(format!("{detail}/resubmit"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("attempt", "1"),
            ("payload", &"x".repeat(10_000)),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let m = d.ok(&format!("/api/messages/{id}")).await.unwrap();
    assert_eq!(m["status"], "parked");
    let after = world
        .js
        .get_stream("MEND_RETRY")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert_eq!(after, before, "nothing was published");
    let audit = d.ok("/api/audit").await.unwrap();
    assert!(audit["items"].as_array().unwrap().is_empty());

    // With the token, the fixed edit goes through and the message is resolved.
    let res = operator
        .post(format!("{detail}/resubmit"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("attempt", "1"),
            (
                "payload",
                "{\"key\": \"w1\", \"n\": 0, \"account\": \"acct-1\", \"amount\": 10}",
            ),
            ("note", "fixed the account"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    d.wait_status(&id, "resolved", TEST_TIMEOUT).await.unwrap();
    let audit = d.ok("/api/audit").await.unwrap();
    assert_eq!(audit["items"][0]["actor"], "alice");
    assert_eq!(audit["items"][0]["action"], "edit_and_resubmit");
}

#[tokio::test]
async fn the_whole_loop_on_postgresql() {
    let pg = Postgres::start().await.unwrap();
    let url = pg.database("mend").await.unwrap();
    let s = stack(Some(&url), "").await;
    let (world, d) = (&s.world, &s.dashboard);
    let mut msgs = vec![order("p1", 0, "nobody", "")];
    msgs.extend((1..4).map(|n| order("p1", n, "acct-1", "")));
    js::publish_all(&world.js, msgs).await.unwrap();
    let parked = d
        .wait_messages("status=parked", 1, TEST_TIMEOUT)
        .await
        .unwrap();
    let id = parked[0]["id"].as_str().unwrap().to_owned();
    let (status, body) = d
        .post(
            &format!("/api/messages/{id}/resubmit"),
            Some(OPERATOR_TOKEN),
            &json!({"payload": {"key": "p1", "n": 0, "account": "acct-1", "amount": 10}}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    world
        .app
        .wait_for("p1 in order", TEST_TIMEOUT, |log| {
            let ns: Vec<u64> = log
                .iter()
                .filter(|x| x.ok())
                .filter_map(|x| x.field("n").and_then(serde_json::Value::as_u64))
                .collect();
            ns == [0, 1, 2, 3]
        })
        .await
        .unwrap();
    d.wait_status(&id, "resolved", TEST_TIMEOUT).await.unwrap();
    // A second dashboard on the same database shares the store and the consumers.
    let second = Dashboard::start_on(&world.nats.url(), &url, "")
        .await
        .unwrap();
    let m = second.ok(&format!("/api/messages/{id}")).await.unwrap();
    assert_eq!(m["status"], "resolved");
}

/// A crafted `next` never sends a browser off the dashboard after a genuine login: browsers drop
/// tabs and newlines anywhere in a `Location` and read `\` as `/`, so `/\t/evil.example` is
/// `//evil.example` to them.
#[tokio::test]
async fn a_login_never_redirects_off_the_dashboard() {
    let s = stack(None, "").await;
    let d = &s.dashboard;
    for (query, given) in [
        ("%2F%09%2Fevil.example%2Fx", "/\t/evil.example/x"),
        ("%2F%0A%2Fevil.example", "/\n/evil.example"),
        ("%2F%5Cevil.example", "/\\evil.example"),
        ("%2F%0D%5C%2Fevil.example", "/\r\\/evil.example"),
    ] {
        let client = browser();
        let page = client
            .get(format!("{}/login?next={query}", d.url))
            .send()
            .await
            .unwrap();
        let html = page.text().await.unwrap();
        let csrf = hidden(&html, "csrf").expect("a CSRF field");
        let kept = hidden(&html, "next").expect("a next field");
        assert!(
            !kept.contains("evil.example"),
            "{query}: the form keeps {kept:?}"
        );
        // The form as a crafted page would post it.
        let res = client
            .post(format!("{}/login", d.url))
            .form(&[
                ("username", "alice"),
                ("password", "alice-password"),
                ("csrf", &csrf),
                ("next", given),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "{query}");
        let to = res.headers()[LOCATION].to_str().unwrap().to_owned();
        assert!(
            to.starts_with('/')
                && !to.starts_with("//")
                && !to.contains(['\\', '\t', '\n', '\r'])
                && !to.contains("evil.example"),
            "{query}: Location {to:?}"
        );
    }
}

/// The peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Forty logins at once with made-up names and wrong passwords (each argon2 check allocates
/// 19 MiB): the checks under way stay within the configured memory (`login_memory_mib`, 64 here),
/// logins that find no room within a moment are answered 429 with Retry-After, and the dashboard's
/// peak memory grows by about that bound (61 MiB here), not by forty checks' worth (764 MiB without
/// the bound). A real login goes through afterwards.
#[tokio::test]
async fn a_login_flood_stays_within_its_memory_bound() {
    // From forty addresses (through a trusted proxy), so no per-address limit steps in.
    let s = stack(
        None,
        "login_memory_mib = 64\ntrusted_proxies = [\"127.0.0.0/8\"]",
    )
    .await;
    let d = &s.dashboard;
    let pid = d.process.pid().unwrap();
    let before = peak_rss_kib(pid);
    let floods = (0..40).map(|i| {
        let url = d.url.clone();
        async move {
            let client = browser();
            let csrf = login_token(d, &client).await;
            let res = client
                .post(format!("{url}/login"))
                .header("x-forwarded-for", format!("198.18.0.{i}"))
                .form(&[
                    ("username", format!("nobody-{i}").as_str()),
                    ("password", "wrong"),
                    ("csrf", &csrf),
                ])
                .send()
                .await
                .unwrap();
            let retry = res.headers().get("retry-after").is_some();
            (res.status(), retry)
        }
    });
    let answers = futures::future::join_all(floods).await;
    for (status, retry) in &answers {
        assert!(
            *status == StatusCode::UNAUTHORIZED
                || (*status == StatusCode::TOO_MANY_REQUESTS && *retry),
            "{answers:?}"
        );
    }
    let grown_mib = peak_rss_kib(pid).saturating_sub(before) / 1024;
    assert!(grown_mib < 160, "peak memory grew by {grown_mib} MiB");
    assert_eq!(
        login_from(d, "198.51.100.1", "alice", "alice-password").await,
        StatusCode::SEE_OTHER
    );
}

/// Logs in as `user` with `X-Forwarded-For: forwarded_for`; the answer's status.
async fn login_from(d: &Dashboard, forwarded_for: &str, user: &str, password: &str) -> StatusCode {
    let client = browser();
    let csrf = login_token(d, &client).await;
    client
        .post(format!("{}/login", d.url))
        .header("x-forwarded-for", forwarded_for)
        .form(&[("username", user), ("password", password), ("csrf", &csrf)])
        .send()
        .await
        .unwrap()
        .status()
}

/// Behind a trusted proxy every client arrives from the proxy's address: the login limits count
/// the client's address from `X-Forwarded-For`, so wrong passwords from one client do not lock
/// the user out for the others; a spray of names from one address is limited too. From a peer
/// that is not a trusted proxy the header is ignored, so a client cannot dodge its limit with it.
#[tokio::test]
async fn login_limits_follow_the_client_behind_a_trusted_proxy() {
    let s = stack(None, "trusted_proxies = [\"127.0.0.0/8\"]").await;
    let d = &s.dashboard;
    for _ in 0..5 {
        let status = login_from(d, "203.0.113.7", "alice", "wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        login_from(d, "203.0.113.7", "alice", "alice-password").await,
        StatusCode::TOO_MANY_REQUESTS,
        "the client that failed is limited"
    );
    assert_eq!(
        login_from(d, "10.9.8.7, 198.51.100.9", "alice", "alice-password").await,
        StatusCode::SEE_OTHER,
        "another client is not locked out"
    );
    // One address trying many names.
    for i in 0..30 {
        let status = login_from(d, "192.0.2.44", &format!("name-{i}"), "wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    assert_eq!(
        login_from(d, "192.0.2.44", "alice", "alice-password").await,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Without the setting, the header is the client's own say: ignored.
    let plain = Dashboard::start(&s.world.nats.url(), "").await.unwrap();
    for i in 0..5 {
        let status = login_from(&plain, &format!("203.0.113.{i}"), "alice", "wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        login_from(&plain, "198.51.100.200", "alice", "alice-password").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Nor is X-Forwarded-Proto: no Secure cookie on a client's say-so; `secure_cookies` sets it.
    let login_cookie = |d: &Dashboard| {
        let url = format!("{}/login", d.url);
        async move {
            let res = browser()
                .get(url)
                .header("x-forwarded-proto", "https")
                .send()
                .await
                .unwrap();
            res.headers()[SET_COOKIE].to_str().unwrap().to_owned()
        }
    };
    assert!(!login_cookie(&plain).await.contains("Secure"));
    let secure = Dashboard::start(&s.world.nats.url(), "secure_cookies = true")
        .await
        .unwrap();
    let res = browser()
        .get(format!("{}/login", secure.url))
        .send()
        .await
        .unwrap();
    assert!(
        res.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
    assert!(
        login_cookie(d).await.contains("; Secure"),
        "from a trusted proxy"
    );
}

/// Sessions follow the configured users: a dashboard whose config (on the same session store)
/// demotes alice shows her session as a viewer's, and one without her sends her to the login page.
/// An admin ends every session (audited); the next request of any of them goes to the login page.
#[tokio::test]
async fn sessions_follow_the_configured_users_and_can_all_be_ended() {
    use mend_e2e::dashboard::{ADMIN_TOKEN, dashboard_config};
    use mend_e2e::mend::{MendProcess, listen_addr};
    let s = stack(None, "").await;
    let nats = s.world.nats.url();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("mend.db").display());
    let first = Dashboard::start_on(&nats, &db, "").await.unwrap();
    let alice = browser();
    let victor = browser();
    let res = login(&first, &alice, "alice", "alice-password").await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let res = login(&first, &victor, "victor", "victor-password").await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let audit = |url: String, client: &reqwest::Client| {
        let client = client.clone();
        async move { client.get(format!("{url}/audit")).send().await.unwrap() }
    };
    let html = audit(first.url.clone(), &alice).await.text().await.unwrap();
    assert!(html.contains("alice (operator)"), "{html}");

    // The same store, alice demoted: her session is a viewer's now.
    let config = dashboard_config(&nats, &db, "");
    let demoted =
        MendProcess::start_with_env("dashboard", &config, &[("MEND_USER_ALICE_ROLE", "viewer")])
            .await
            .unwrap();
    demoted.ready().await.unwrap();
    let url = format!("http://{}", listen_addr(&config));
    let html = audit(url, &alice).await.text().await.unwrap();
    assert!(html.contains("alice (viewer)"), "{html}");
    drop(demoted);

    // Alice removed from the config: her session ends.
    let mut config: toml::Table = dashboard_config(&nats, &db, "").parse().unwrap();
    if let Some(toml::Value::Array(users)) = config.get_mut("user") {
        users.retain(|u| u.get("name").and_then(toml::Value::as_str) != Some("alice"));
    }
    let without_alice = config.to_string();
    let removed = MendProcess::start("dashboard", &without_alice)
        .await
        .unwrap();
    removed.ready().await.unwrap();
    let res = audit(format!("http://{}", listen_addr(&without_alice)), &alice).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert!(
        res.headers()[LOCATION]
            .to_str()
            .unwrap()
            .starts_with("/login")
    );
    drop(removed);

    // Victor's session lives on until an admin ends every session; only an admin may.
    assert_eq!(
        audit(first.url.clone(), &victor).await.status(),
        StatusCode::OK
    );
    let (status, _) = first
        .post("/api/sessions/end", Some(OPERATOR_TOKEN), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = first
        .post(
            "/api/sessions/end",
            Some(ADMIN_TOKEN),
            &json!({"note": "rotation"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["ended"].as_u64().unwrap() >= 1, "{body}");
    let res = audit(first.url.clone(), &victor).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let (_, log) = first.get("/api/audit", Some(ADMIN_TOKEN)).await.unwrap();
    assert!(
        log["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "end_all_sessions" && a["note"] == "rotation"),
        "{log}"
    );
}

/// An envelope on MEND_PARKED is written by whoever may publish there: one whose `payload_ref`
/// names another stream's message (or another lineage's object) is shown without that payload, and
/// never resubmitted with it.
#[tokio::test]
async fn an_envelope_cannot_point_the_dashboard_at_another_message() {
    use repair_rules::{ENVELOPE_VERSION, ErrorKind, FailureEnvelope, FailureError};
    let s = stack(None, "").await;
    let d = &s.dashboard;
    let js = &s.world.js;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SECRETS".into(),
        subjects: vec!["secrets.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("secrets.db", "top-secret-password".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let envelope = FailureEnvelope {
        version: ENVELOPE_VERSION,
        id: "APP:777".into(),
        service: "app".into(),
        binding: "app".into(),
        stream: "APP".into(),
        seq: 777,
        subject: "app.created".into(),
        key: None,
        headers: Default::default(),
        payload: serde_json::Value::Null,
        payload_base64: None,
        payload_ref: Some(repair_rules::envelope::PayloadRef {
            stream: "SECRETS".into(),
            seq: 1,
            size: 19,
            object: None,
        }),
        headers_base64: None,
        error: FailureError::bare(ErrorKind::Message, Some(422)),
        attempt: 1,
        first_failed_at: "2026-12-04T10:00:00Z".into(),
        failed_at: "2026-12-04T10:00:00Z".into(),
        reason: Some("crafted".into()),
        history: Vec::new(),
    };
    js.publish(
        "mend.parked.app",
        serde_json::to_vec(&envelope).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    d.wait_messages("status=parked", 1, TEST_TIMEOUT)
        .await
        .unwrap();
    let alice = browser();
    login(d, &alice, "alice", "alice-password").await;
    let page = alice
        .get(format!("{}/messages/APP%3A777", d.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("top-secret-password"), "{page}");
    let (status, body) = d
        .post(
            "/api/messages/APP:777/resubmit",
            Some(OPERATOR_TOKEN),
            &json!({"note": "as it was"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("another message"), "{body}");
}

/// A user name with a newline and an escape sequence cannot forge or hide a line of the dashboard's
/// log: it is logged quoted and escaped.
#[tokio::test]
async fn a_crafted_user_name_cannot_forge_a_log_line() {
    let s = stack(None, "").await;
    let d = &s.dashboard;
    let forged = "mallory\n2026-01-01T00:00:00.000000Z  INFO mend: Logged in. user=alice\u{1b}[2K";
    let res = login(d, &browser(), forged, "wrong").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    d.process
        .wait_log("Failed login.", TEST_TIMEOUT)
        .await
        .unwrap();
    let log = d.process.log();
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01T00:00:00")),
        "{log}"
    );
    // (The log's own colours are escape sequences too; the name's is not among them.)
    assert!(!log.contains("\u{1b}[2K"), "{log}");
}

#[tokio::test]
async fn the_operations_endpoints_can_be_kept_off_the_address_people_reach() {
    let world = mend_e2e::world::World::new().await.unwrap();
    let ops = mend_e2e::mend::free_port();
    let d = Dashboard::start(
        &world.nats.url(),
        &format!("ops_listen = \"127.0.0.1:{ops}\""),
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    for path in ["/metrics", "/readyz", "/healthz"] {
        let public = http.get(format!("{}{path}", d.url)).send().await.unwrap();
        assert_eq!(
            public.status(),
            StatusCode::NOT_FOUND,
            "{path} on the public address"
        );
        let apart = http
            .get(format!("http://127.0.0.1:{ops}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(apart.status(), StatusCode::OK, "{path} on ops_listen");
    }
    // The UI and the API stay where they were.
    let (status, _) = d.get("/api/overview", Some(OPERATOR_TOKEN)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_overview_draws_any_service_name_escaped_and_bounds_itself() {
    let world = mend_e2e::world::World::new().await.unwrap();
    let d = Dashboard::start(&world.nats.url(), "").await.unwrap();
    // Service names are whatever the announcements carry: markup, quotes, NUL, 10,000 characters;
    // and more services than one page draws.
    let long = "s".repeat(10_000);
    let mut names: Vec<String> = vec![
        "<script>alert(1)</script>".into(),
        "a\"b'c&d".into(),
        "nul\0in".into(),
        long.clone(),
    ];
    names.extend((0..14).map(|i| format!("quiet-{i:02}")));
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        // The first four are the busiest (3 each), the quiet ones have one each.
        let n = if i < 4 { 3 } else { 1 };
        for j in 0..n {
            out.push(mend_e2e::dashboard::announcement(
                name,
                "parked",
                &format!("X:{i}-{j}"),
                now,
            ));
        }
    }
    js::publish_all(&world.js, out).await.unwrap();
    let o = mend_e2e::wait::until("every service's hours", TEST_TIMEOUT, || async {
        let o = d.ok("/api/overview").await?;
        let n = o["hourly"]["services"].as_array().map_or(0, Vec::len);
        Ok((n == names.len()).then_some(o))
    })
    .await
    .unwrap();
    let services: Vec<&str> = o["hourly"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    // A NUL is kept as U+FFFD in the store's columns (as for every other text column).
    assert!(services.contains(&"nul\u{FFFD}in"), "{:?}", &services[..4]);
    assert!(services.contains(&long.as_str()));

    let web = mend_e2e::dashboard::logged_in(&d, "alice").await;
    let page = mend_e2e::dashboard::page_text(&d, &web, "/").await;
    assert!(
        !page.contains("<script>alert"),
        "markup from a service name"
    );
    assert!(
        page.contains("&#60;script&#62;alert(1)&#60;/script&#62;")
            || page.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
    );
    assert!(!page.contains("a\"b'c"), "quotes from a service name");
    assert!(page.contains(&long), "the long name is shown whole");
    // Twelve charts, the busiest first; the rest said in a line.
    assert_eq!(page.matches("<svg class=\"hours\"").count(), 12, "{page}");
    assert!(
        page.contains("6 quieter services are not drawn here"),
        "{page}"
    );
    assert!(page.find("alert(1)") < page.find("quiet-"));

    // The refresh period: a number within 2 s and 1 h, anything else the default (15 s).
    for (asked, got) in [
        ("", "15"),
        ("?refresh=5", "5"),
        ("?refresh=0", "2"),
        ("?refresh=86400", "3600"),
        ("?refresh=-1", "15"),
        ("?refresh=abc", "15"),
        ("?refresh=99999999999999999999999", "15"),
        ("?refresh=%00", "15"),
        ("?refresh=1&refresh=2", "15"),
    ] {
        let res = web.get(format!("{}/{asked}", d.url)).send().await.unwrap();
        let status = res.status();
        let page = res.text().await.unwrap();
        if asked.contains('&') {
            // A repeated parameter is a bad request or the first/last value; never a crash.
            assert!(
                status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
                "{asked}: {status}"
            );
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{asked}");
        assert!(
            page.contains(&format!("<meta http-equiv=\"refresh\" content=\"{got}\">"))
                && page.contains(&format!("data-live=\"{got}\"")),
            "{asked}: not {got}"
        );
    }
    // The script the page uses is served as a script, from the dashboard itself.
    let res = web
        .get(format!("{}/static/live.js", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
}
