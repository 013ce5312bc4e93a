//! The dashboard in a real browser (SPEC §9): headless Debian chromium driven by playwright-core
//! (`tests/browser/flow.mjs`, installed by `make tools`) against the real stack — nats-server,
//! sidecar, processor, dashboard (SQLite) and app. A person logs in (a wrong password first),
//! filters the messages, opens a parked head, has an edit that is not JSON refused, resubmits a
//! fixed one and sees it resolved; every page is visited, and a payload holding a `<script>` is
//! shown as text. The held messages of the fixed key then reach the app in order. Screenshots of
//! every page are left in `target/screenshots/dashboard/` for review.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mend_e2e::dashboard::{Stack, USERS, delivered, order};
use mend_e2e::js::{self};
use mend_e2e::wait;
use mend_e2e::world::TEST_TIMEOUT;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The browser flow's own deadline for each wait, and the whole run's.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const FLOW_TIMEOUT: Duration = Duration::from_secs(120);
const CHROMIUM: &str = "/usr/bin/chromium";

fn require_browser(root: &Path) {
    let missing: Vec<String> = [
        Path::new(CHROMIUM).to_path_buf(),
        root.join("tests/browser/node_modules/playwright-core"),
    ]
    .into_iter()
    .filter(|p| !p.exists())
    .map(|p| p.display().to_string())
    .collect();
    assert!(
        missing.is_empty(),
        "the browser tests need {}: run `make tools` (scripts/install-browser.sh installs Debian's \
         chromium and the pinned playwright-core)",
        missing.join(" and ")
    );
}

/// Runs `node tests/browser/<script> <config>` from the workspace root, its output streamed into
/// the test's; panics unless it exits 0.
async fn run_flow(root: &Path, script: &str, config: &Value) {
    let mut child = Command::new("node")
        .arg(format!("tests/browser/{script}"))
        .arg(config.to_string())
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run node (Node.js 20+ is needed for the browser tests: `make tools`)");
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let echo_out = tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            println!("{l}");
        }
    });
    let echo_err = tokio::spawn(async move {
        let mut lines = BufReader::new(err).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            eprintln!("{l}");
        }
    });
    let status = tokio::time::timeout(FLOW_TIMEOUT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the browser flow did not finish within {FLOW_TIMEOUT:?}"))
        .unwrap();
    let _ = echo_out.await;
    let _ = echo_err.await;
    assert!(
        status.success(),
        "the browser flow failed ({status}); its output is above, screenshots in {}",
        config["screenshots"]
    );
}

#[tokio::test]
async fn a_person_fixes_a_parked_message_in_the_browser() {
    let started = Instant::now();
    let root = mend_e2e::workspace();
    require_browser(&root);
    let shots = root.join("target/screenshots/dashboard");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();

    let stack = Stack::start(None, "").await.unwrap();
    let (world, d) = (&stack.world, &stack.dashboard);

    // b1's head names an unknown account (parked by the example rules); its later orders are held.
    // x1's head carries a script in its payload.
    let mut msgs = vec![order("b1", 0, "nobody")];
    msgs.extend((1..4).map(|n| order("b1", n, "acct-1")));
    msgs.push(mend_e2e::dashboard::order_with(
        "x1",
        0,
        "nobody",
        json!({"amount": 5, "note": "<script>alert(1)</script>"}),
    ));
    js::publish_all(&world.js, msgs).await.unwrap();
    let parked = d
        .wait_messages("status=parked", 2, TEST_TIMEOUT)
        .await
        .unwrap();
    let id_of = |key: &str| mend_e2e::dashboard::id_of_key(&parked, key);
    let (b1, x1) = (id_of("b1"), id_of("x1"));
    wait::until("b1 held with 3, x1 held", TEST_TIMEOUT, || async {
        let holds = d.ok("/api/holds").await?;
        let held = |key: &str, count: u64| {
            holds["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|h| h["key"] == key && h["count"] == count)
        };
        Ok((held("b1", 3) && held("x1", 0)).then_some(()))
    })
    .await
    .unwrap();
    assert!(delivered(&world.app.log(), "b1").is_empty());
    let ready = started.elapsed();

    let (user, password, role) = USERS[0];
    assert_eq!(role, "operator");
    let config = json!({
        "base_url": d.url,
        "user": user,
        "password": password,
        "service": "app",
        "message_id": b1,
        "fix": {"account": "acct-1"},
        "xss_message_id": x1,
        "screenshots": shots.display().to_string(),
        "timeout_ms": STEP_TIMEOUT.as_millis(),
    });
    let flow_started = Instant::now();
    run_flow(&root, "flow.mjs", &config).await;
    let flow = flow_started.elapsed();

    // What the browser did, seen through the API and by the app.
    let m = d.wait_status(&b1, "resolved", TEST_TIMEOUT).await.unwrap();
    assert_eq!(m["attempt"], 2, "{m}");
    let log = world
        .app
        .wait_for("b1 delivered in order", TEST_TIMEOUT, |log| {
            delivered(log, "b1") == [0, 1, 2, 3]
        })
        .await
        .unwrap();
    let fixed = log
        .iter()
        .find(|x| x.ok() && x.field("key") == Some(&json!("b1")) && x.field("n") == Some(&json!(0)))
        .unwrap();
    assert_eq!(fixed.mend_id(), b1);
    assert_eq!(fixed.header("mend-attempt"), Some("2"));
    assert_eq!(fixed.header("mend-resubmitted-by"), Some(user));
    assert_eq!(fixed.field("account"), Some(&json!("acct-1")));
    // The refused edit sent nothing: the head reached the app once with the fix, never broken.
    assert_eq!(
        log.iter()
            .filter(|x| x.mend_id() == b1 && x.json.is_none())
            .count(),
        0
    );
    let audit = d.ok("/api/audit").await.unwrap();
    let edits: Vec<&Value> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["message_id"] == b1.as_str())
        .collect();
    assert_eq!(edits.len(), 1, "one audited action on b1: {audit}");
    assert_eq!(edits[0]["action"], "edit_and_resubmit");
    assert_eq!(edits[0]["actor"], user);
    assert_eq!(edits[0]["note"], "fixed the account in the browser");
    let after: Value = serde_json::from_str(edits[0]["after"].as_str().unwrap()).unwrap();
    assert_eq!(after["account"], "acct-1", "{audit}");
    let x = d.ok(&format!("/api/messages/{x1}")).await.unwrap();
    assert_eq!(x["status"], "parked", "{x}");

    for name in [
        "login",
        "login-error",
        "overview",
        "messages-filtered",
        "message-detail",
        "edit-error",
        "resubmitted",
        "resolved",
        "groups",
        "holds",
        "rules",
        "jobs",
        "audit",
        "script-payload",
    ] {
        let found = std::fs::read_dir(&shots).unwrap().flatten().any(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            f.ends_with(&format!("-{name}.png")) && e.metadata().is_ok_and(|m| m.len() > 1000)
        });
        assert!(found, "no screenshot of {name} in {}", shots.display());
    }
    println!(
        "browser test: stack ready in {ready:.1?}, browser flow {flow:.1?}, total {:.1?}; screenshots in {}",
        started.elapsed(),
        shots.display()
    );
}

#[tokio::test]
async fn the_overview_charts_match_the_api_and_refresh_themselves() {
    let root = mend_e2e::workspace();
    require_browser(&root);
    let shots = root.join("target/screenshots/overview");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let stack = Stack::start(None, "").await.unwrap();
    let (world, d) = (&stack.world, &stack.dashboard);

    // This hour, through the whole loop: two heads for an unknown account, parked, with three
    // later orders of their keys held; three orders with the amount as text, parked too (the
    // example rules repair that for `orders` only).
    let mut msgs = Vec::new();
    for (key, later) in [("b1", 2), ("b3", 1)] {
        msgs.push(order(key, 0, "nobody"));
        msgs.extend((1..=later).map(|n| order(key, n, "acct-1")));
    }
    for key in ["r1", "r2", "r3"] {
        msgs.push(mend_e2e::dashboard::order_with(
            key,
            0,
            "acct-1",
            json!({"amount": "10.50"}),
        ));
    }
    js::publish_all(&world.js, msgs).await.unwrap();
    let parked = d
        .wait_messages("status=parked", 5, TEST_TIMEOUT)
        .await
        .unwrap();
    let id_of = |key: &str| mend_e2e::dashboard::id_of_key(&parked, key);
    let (r1, b3) = (id_of("r1"), id_of("b3"));
    // r1 fixed by hand, the amount made a number: resolved, and so the source of a rule draft.
    let (status, body) = d
        .post(
            &format!("/api/messages/{r1}/resubmit"),
            Some(mend_e2e::dashboard::OPERATOR_TOKEN),
            &json!({"payload": {"key": "r1", "n": 0, "account": "acct-1", "amount": 10.5}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    d.wait_status(&r1, "resolved", TEST_TIMEOUT).await.unwrap();

    // Earlier hours of another service, announced as the components announce them (repairs
    // among them: the example rules repair nothing of this app).
    let now = std::time::SystemTime::now();
    let hours_ago = |h: u64| now - Duration::from_secs(h * 3600);
    let seeded: [(&str, u64, usize); 5] = [
        ("parked", 3, 3),
        ("repaired", 3, 2),
        ("resolved", 10, 1),
        ("held", 20, 4),
        ("parked", 23, 1),
    ];
    let mut announcements = Vec::new();
    for (kind, ago, n) in seeded {
        for i in 0..n {
            let id = format!("BILLING:{ago}{i}");
            announcements.push(mend_e2e::dashboard::announcement(
                "billing",
                kind,
                &id,
                hours_ago(ago),
            ));
        }
    }
    // One older than the window, never counted.
    announcements.push(mend_e2e::dashboard::announcement(
        "billing",
        "parked",
        "BILLING:old",
        hours_ago(30),
    ));
    js::publish_all(&world.js, announcements).await.unwrap();

    // The API, checked on its own: each seeded count in its hour, the loop's in the window.
    let total = |s: &Value, kind: &str| -> i64 {
        s[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .sum()
    };
    let o = wait::until("the overview's hours", TEST_TIMEOUT, || async {
        let o = d.ok("/api/overview").await?;
        let services = o["hourly"]["services"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let of = |name: &str| services.iter().find(|s| s["service"] == name).cloned();
        let (Some(app), Some(billing)) = (of("app"), of("billing")) else {
            return Ok(None);
        };
        // `held` counts keys put on hold (b1 and b3), not the messages behind them.
        let app_done = [("parked", 5), ("repaired", 0), ("resolved", 1), ("held", 2)]
            .iter()
            .all(|(k, n)| total(&app, k) == *n);
        let billing_done = [("parked", 4), ("repaired", 2), ("resolved", 1), ("held", 4)]
            .iter()
            .all(|(k, n)| total(&billing, k) == *n);
        Ok((app_done && billing_done).then_some(o))
    })
    .await;
    let o = match o {
        Ok(o) => o,
        Err(e) => panic!(
            "{e:#}; the last overview: {}",
            d.ok("/api/overview").await.unwrap()
        ),
    };
    let from = o["hourly"]["from"].as_i64().unwrap();
    assert_eq!(o["hourly"]["hour_ms"], 3_600_000);
    let billing = o["hourly"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "billing")
        .unwrap();
    for (kind, ago, n) in seeded {
        let at = hours_ago(ago)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let slot = (at / 3_600_000 - from / 3_600_000) as usize;
        assert_eq!(
            billing[kind][slot], n as i64,
            "billing {kind} {ago} hours ago: {o}"
        );
    }
    // Two groups of two parked each: the unknown accounts (parked twice in the window) and the
    // amounts as text (three times: r1 before its fix).
    let mut groups: Vec<(i64, i64, String)> = o["top_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let parkings = g["parkings_per_hour"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .sum();
            (
                g["parked"].as_i64().unwrap(),
                parkings,
                g["trend"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        [(2, 2, "rising".to_owned()), (2, 3, "rising".to_owned())],
        "{o}"
    );
    assert_eq!(o["oldest_hold"]["service"], "app", "{o}");

    let (user, password, _) = USERS[0];
    let config = json!({
        "base_url": d.url,
        "user": user,
        "password": password,
        "token": mend_e2e::dashboard::OPERATOR_TOKEN,
        "discard_id": b3,
        "draft_id": r1,
        "draft_contains": "double(payload.amount)",
        "service": "app",
        "screenshots": shots.display().to_string(),
        "timeout_ms": STEP_TIMEOUT.as_millis(),
    });
    run_flow(&root, "overview.mjs", &config).await;

    // What the browser did: b3 discarded (its held order released and delivered).
    d.wait_status(&b3, "discarded", TEST_TIMEOUT).await.unwrap();
    world
        .app
        .wait_for("b3's held order delivered", TEST_TIMEOUT, |log| {
            delivered(log, "b3") == [1]
        })
        .await
        .unwrap();
    for name in [
        "overview-charts",
        "fixed-message",
        "rule-draft",
        "backlog-try",
    ] {
        let found = std::fs::read_dir(&shots).unwrap().flatten().any(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            f.ends_with(&format!("-{name}.png")) && e.metadata().is_ok_and(|m| m.len() > 1000)
        });
        assert!(found, "no screenshot of {name} in {}", shots.display());
    }
}
