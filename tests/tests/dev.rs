//! `mend dev` end to end (SPEC §1): the real binary starts its own nats-server (found in the
//! project's `.tools/`), the demo app, the sidecar, the processor and the dashboard, on free ports.
//! Messages are seen delivered, repaired, parked and held through the dashboard API; a parked head
//! resubmitted once its account exists is resolved and releases its key; SIGINT stops everything
//! and leaves no process and no temp folder behind. Also: what `mend dev` says when it cannot
//! start, and `--nats-url`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use mend_e2e::mend::{MendProcess, free_port};
use mend_e2e::nats::NatsServer;
use mend_e2e::wait;
use serde_json::{Value, json};

/// Generous: the whole loop runs on two shared cores beside the rest of the suite.
const LIMIT: Duration = Duration::from_secs(90);
/// The demo app opens a new account this long after its first order.
use mend::dev::demo::ACCOUNT_OPENS_AFTER;

struct Dev {
    process: MendProcess,
    base: String,
    http: reqwest::Client,
}

impl Dev {
    /// `mend dev --listen <free port> <args…>`, waiting for it to print the dashboard's URL.
    async fn start(args: &[&str]) -> Dev {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec!["dev", "--listen", &listen, "--status-every", "1s"];
        all.extend_from_slice(args);
        let process = MendProcess::run(&all, &[("MEND_LOG", "warn")]).unwrap();
        let base = format!("http://{listen}");
        process
            .wait_log(&format!("Dashboard: {base}/"), LIMIT)
            .await
            .unwrap();
        Dev {
            process,
            base,
            http: reqwest::Client::new(),
        }
    }

    /// `GET path` without any login (the dashboard is open under `mend dev`).
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self.http.get(format!("{}{path}", self.base)).send().await?;
        anyhow::ensure!(r.status().is_success(), "GET {path}: {}", r.status());
        Ok(r.json().await?)
    }

    /// Waits until the demo delivered (its status line), and the dashboard's API shows repairs by
    /// the example rules, a parked message and a held key.
    async fn whole_loop_seen(&self) {
        wait::until("delivered, repaired, parked and held", LIMIT, || async {
            let o = self.get("/api/overview").await?;
            let repaired = o["rules_last_24h"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["kind"] == "repaired" && r["count"].as_i64() > Some(0));
            let parked = self.get("/api/messages?status=parked").await?["items"]
                .as_array()
                .is_some_and(|a| !a.is_empty());
            let held = self.get("/api/holds").await?["items"]
                .as_array()
                .is_some_and(|a| a.iter().any(|h| h["count"].as_u64() > Some(0)));
            Ok((self.delivered() > 0 && repaired && parked && held).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\nlog:\n{}", self.process.log()));
    }

    /// Waits until a line of its output `says` so.
    async fn status_says(&self, what: &str, says: impl Fn(&str) -> bool) {
        wait::until(what, LIMIT, || async {
            Ok(self.process.log().lines().any(&says).then_some(()))
        })
        .await
        .unwrap();
    }

    /// Ctrl-C: `mend dev` exits successfully, its app never saw an account's events out of order;
    /// returns its log.
    async fn interrupt(&mut self) -> String {
        self.process.signal("INT").unwrap();
        let status = self.process.wait_exit(LIMIT).await.unwrap();
        let log = self.process.log();
        assert!(status.success(), "{status}\n{log}");
        assert!(!log.contains("OUT OF ORDER"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
        log
    }

    /// The largest `delivered N` of the status lines so far.
    fn delivered(&self) -> u64 {
        self.process
            .log()
            .lines()
            .filter_map(|l| l.split("delivered ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .max()
            .unwrap_or(0)
    }
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so read after the last ')'.
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The live processes whose command line contains `text` (a nats-server by its store folder).
fn processes_with(text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(text) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// The store folder of the nats-server `mend dev` said it started.
fn store_of(log: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.starts_with("nats-server "))
        .unwrap_or_else(|| panic!("no nats-server line in:\n{log}"));
    line.rsplit("storing in ").next().unwrap().trim().to_owned()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test]
async fn mend_dev_with_batch_delivers_in_batches_through_the_whole_loop() {
    mend_e2e::init();
    let mut dev = Dev::start(&["--rate", "40", "--batch", "20"]).await;
    let log = dev.process.log();
    let data = PathBuf::from(store_of(&log))
        .parent()
        .unwrap()
        .to_path_buf();
    let sidecar = std::fs::read_to_string(data.join("sidecar.toml")).unwrap();
    assert!(
        sidecar.contains("max_messages = 20") && sidecar.contains("/events/batch"),
        "{sidecar}"
    );
    dev.whole_loop_seen().await;
    // The demo app's busy database answered RETRY for some entries; they went through in place.
    dev.status_says("a RETRY retried", |l| {
        l.contains("503s retried") && !l.contains("503s retried 0")
    })
    .await;
    dev.interrupt().await;
}

#[tokio::test]
async fn mend_dev_runs_the_whole_loop_and_stops_cleanly_on_sigint() {
    mend_e2e::init();
    let mut dev = Dev::start(&["--rate", "40"]).await;
    let log = dev.process.log();
    // It found the project's pinned nats-server (not an older one on PATH) and started it.
    assert!(
        log.lines()
            .any(|l| l.starts_with("nats-server ") && l.contains(".tools/venv/bin/nats-server")),
        "{log}"
    );
    let store = store_of(&log);
    let data = PathBuf::from(&store).parent().unwrap().to_path_buf();
    assert!(data.join("sidecar.toml").is_file());
    assert!(data.join("rules/orders.toml").is_file());
    let mend_pid = dev.process.pid().unwrap();
    assert_eq!(
        children(mend_pid),
        processes_with(&store),
        "nats-server is its one child"
    );
    let nats_pid = processes_with(&store)[0];

    // Delivered (the status line), repaired by the example rules, parked, held: all through the
    // dashboard's API.
    dev.whole_loop_seen().await;
    // Repaired messages reached the app marked as such.
    let status = dev.process.log();
    let line = status
        .lines()
        .rev()
        .find(|l| l.contains("delivered"))
        .unwrap();
    assert!(line.contains("parked") && line.contains("held"), "{line}");

    // The first new account's order is parked (unknown account) with its account's later events
    // held behind it. Once the account is open, resubmitting it delivers it and releases the key.
    let head = wait::until("the new account's order parked", LIMIT, || async {
        let items = dev.get("/api/messages?status=parked&q=acct-new-1").await?;
        Ok(items["items"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["key"] == "acct-new-1").cloned()))
    })
    .await
    .unwrap();
    let seen = tokio::time::Instant::now();
    assert_eq!(head["error"]["code"], "unknown_account", "{head}");
    let id = head["id"].as_str().unwrap().to_owned();
    wait::until("acct-new-1 held", LIMIT, || async {
        let holds = dev.get("/api/holds").await?;
        Ok(holds["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| h["key"] == "acct-new-1" && h["head"] == id.as_str())
            .then_some(()))
    })
    .await
    .unwrap();
    // The account opens ACCOUNT_OPENS_AFTER after the app first saw the order, which was before
    // the dashboard showed it.
    tokio::time::sleep_until(seen + ACCOUNT_OPENS_AFTER + Duration::from_secs(1)).await;
    let r = dev
        .http
        .post(format!("{}/api/messages/{id}/resubmit", dev.base))
        .json(&json!({"note": "account opened"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    wait::until("the head resolved and its key released", LIMIT, || async {
        let m = dev.get(&format!("/api/messages/{id}")).await?;
        let holds = dev.get("/api/holds").await?;
        let still_held = holds["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| h["key"] == "acct-new-1");
        Ok((m["status"] == "resolved" && !still_held).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nlog:\n{}", dev.process.log()));
    dev.status_says("the resubmission counted by the app", |l| {
        l.contains("resubmitted 1") || l.contains("resubmitted 2")
    })
    .await;

    // Ctrl-C: everything stops, nothing is left.
    let log = dev.interrupt().await;
    assert!(log.contains("Stopped; removed"), "{log}");
    assert!(!alive(nats_pid), "nats-server {nats_pid} outlived mend dev");
    assert!(children(mend_pid).is_empty());
    assert!(!data.exists(), "{} was not removed", data.display());
}

#[tokio::test]
async fn mend_dev_uses_a_given_nats_server_and_keeps_its_data_folder() {
    mend_e2e::init();
    let nats = NatsServer::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let kept = data.path().join("demo");
    let mut dev = Dev::start(&[
        "--nats-url",
        &nats.url(),
        "--rate",
        "20",
        "--data",
        kept.to_str().unwrap(),
    ])
    .await;
    assert!(!dev.process.log().contains("storing in"), "started its own");
    assert!(children(dev.process.pid().unwrap()).is_empty());
    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    let mut stream = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.subjects, ["orders.>"]);
    wait::until("delivered", LIMIT, || async {
        Ok((dev.delivered() > 0).then_some(()))
    })
    .await
    .unwrap();
    dev.process.signal("TERM").unwrap();
    let status = dev.process.wait_exit(LIMIT).await.unwrap();
    assert!(status.success(), "{status}\n{}", dev.process.log());
    assert!(kept.join("mend.db").is_file());
    assert!(kept.join("dashboard.toml").is_file());
    assert!(dev.process.log().contains("everything is kept in"));
    // The given server keeps running, with mend's streams on it.
    assert!(js.get_stream("MEND_FAILED").await.is_ok());
}

/// Runs `mend dev` expecting it to refuse to start; its exit code and output.
async fn refused(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let port = free_port().to_string();
    let mut all = vec!["dev", "--listen"];
    let listen = format!("127.0.0.1:{port}");
    all.push(&listen);
    all.extend_from_slice(args);
    let mut p = MendProcess::run(&all, env).unwrap();
    let status = p.wait_exit(LIMIT).await.unwrap();
    (status.code(), p.log())
}

#[tokio::test]
async fn mend_dev_says_clearly_why_it_cannot_start() {
    mend_e2e::init();
    // A nats-server too old for mend.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("nats-server");
    std::fs::write(&old, "#!/bin/sh\necho 'nats-server: v2.9.10'\n").unwrap();
    std::process::Command::new("chmod")
        .args(["+x", old.to_str().unwrap()])
        .status()
        .unwrap();
    let (code, out) = refused(&["--nats-server", old.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(69), "{out}");
    assert!(
        out.contains("2.9.10") && out.contains("2.11 or newer"),
        "{out}"
    );

    // No server at the given URL.
    let port = free_port();
    let (code, out) = refused(&["--nats-url", &format!("nats://127.0.0.1:{port}")], &[]).await;
    assert_eq!(code, Some(69), "{out}");
    assert!(out.contains("cannot start"), "{out}");

    // The given server has a stream ORDERS of its own: not touched, and said so.
    let nats = NatsServer::start().await.unwrap();
    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    mend_e2e::js::app_stream(&js, "ORDERS", &["shop.orders.>"])
        .await
        .unwrap();
    let (code, out) = refused(&["--nats-url", &nats.url()], &[]).await;
    assert_eq!(code, Some(69), "{out}");
    assert!(out.contains("already has a stream ORDERS"), "{out}");
    let mut s = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(s.info().await.unwrap().config.subjects, ["shop.orders.>"]);

    // The dashboard's port is taken: the roles stop, and so does the nats-server it started.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut p = MendProcess::run(&["dev", "--listen", &addr], &[]).unwrap();
    let status = p.wait_exit(LIMIT).await.unwrap();
    let out = p.log();
    assert_eq!(status.code(), Some(69), "{out}");
    assert!(out.contains(&addr), "{out}");
    let store = store_of(&out);
    assert!(
        processes_with(&store).is_empty(),
        "nats-server outlived mend dev"
    );
    assert!(!std::path::Path::new(&store).exists());
}

#[tokio::test]
async fn a_sigkilled_mend_dev_leaves_no_nats_server_behind() {
    mend_e2e::init();
    let mut dev = Dev::start(&["--rate", "0"]).await;
    let store = store_of(&dev.process.log());
    assert_eq!(processes_with(&store).len(), 1);
    dev.process.kill().await.unwrap();
    wait::until("nats-server gone", LIMIT, || async {
        Ok(processes_with(&store).is_empty().then_some(()))
    })
    .await
    .unwrap();
    // A SIGKILLed mend dev cannot remove its temporary folder; the test does.
    let _ = std::fs::remove_dir_all(PathBuf::from(&store).parent().unwrap());
}

/// `mend dev` asks for no login, so a page of another site the user has open could make the
/// browser post a change to it (a POST without a body needs no preflight). Changes a browser sends
/// for another origin are refused; the same request from curl (no `Origin`) or the dashboard's own
/// pages goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mend_devs_open_api_refuses_changes_from_other_sites() {
    let dev = Dev::start(&[]).await;
    let url = format!("{}/api/holds/orders/acct-x/release", dev.base);
    let post = |headers: &[(&str, &str)]| {
        let mut r = dev.http.post(&url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let evil = post(&[("origin", "http://evil.example")]).await.unwrap();
    assert_eq!(evil.status(), reqwest::StatusCode::FORBIDDEN);
    let evil = post(&[("sec-fetch-site", "cross-site")]).await.unwrap();
    assert_eq!(evil.status(), reqwest::StatusCode::FORBIDDEN);
    let own_origin = dev.base.clone();
    let own = post(&[
        ("origin", own_origin.as_str()),
        ("sec-fetch-site", "same-origin"),
    ])
    .await
    .unwrap();
    assert_ne!(own.status(), reqwest::StatusCode::FORBIDDEN);
    let curl = post(&[]).await.unwrap();
    assert_ne!(curl.status(), reqwest::StatusCode::FORBIDDEN);
    assert_eq!(dev.get("/api/overview").await.map(|_| ()).ok(), Some(()));
}
