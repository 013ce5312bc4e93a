//! The dashboard's web pages over plain HTTP (SPEC §9 security): login with sessions and rate
//! limiting, cookies' flags, CSRF tokens on every form, roles, escaping, body limits, and an
//! invalid JSON edit that sends nothing; and the whole loop on PostgreSQL.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mend_e2e::dashboard::{Dashboard, OPERATOR_TOKEN, Stack};
use mend_e2e::js::{self, Out};
use mend_e2e::postgres::Postgres;
use mend_e2e::world::TEST_TIMEOUT;
use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};
use serde_json::json;

/// The value of the hidden field `name` in a page's first form that has it.
fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_owned())
}

/// A browser-like client: keeps cookies, does not follow redirects.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs `client` in as `user`; returns the login answer.
async fn login(
    d: &Dashboard,
    client: &reqwest::Client,
    user: &str,
    password: &str,
) -> reqwest::Response {
    let page = client.get(format!("{}/login", d.url)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    let csrf = hidden(&html, "csrf").expect("the login form has a CSRF field");
    client
        .post(format!("{}/login", d.url))
        .form(&[
            ("username", user),
            ("password", password),
            ("csrf", &csrf),
            ("next", "/messages"),
        ])
        .send()
        .await
        .unwrap()
}

async fn stack(database_url: Option<&str>, extra: &str) -> Stack {
    Stack::start(database_url, extra).await.unwrap()
}

fn order(key: &str, n: u64, account: &str, note: &str) -> Out {
    mend_e2e::dashboard::order(key, n, account, json!({"note": note}))
}

#[tokio::test]
async fn login_sessions_and_rate_limiting() {
    let s = stack(None, "").await;
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
    let html = tls
        .get(format!("{}/login", d.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = hidden(&html, "csrf").unwrap();
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
    js::publish_all(
        &world.js,
        vec![order("w1", 0, "nobody", "<script>alert(1)</script>")],
    )
    .await
    .unwrap();
    let parked = d
        .wait_messages("status=parked", 1, TEST_TIMEOUT)
        .await
        .unwrap();
    let id = parked[0]["id"].as_str().unwrap().to_owned();
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
