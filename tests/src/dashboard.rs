//! Running `mend dashboard` for a test: its config (a SQLite file in a temp dir, or a given
//! database URL; API tokens and users of every role), the process, and a small JSON API client.

use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::Value;

use crate::app::{Delivery, Reply};
use crate::js::Out;
use crate::mend::{MendProcess, example_rules, free_port, processor_config};
use crate::world::{KEY_HEADER, World};

/// API tokens the test config accepts, by role.
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";
pub const VIEWER_TOKEN: &str = "test-viewer-token-0123456789";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// Web users of the test config (name, password, role).
pub const USERS: [(&str, &str, &str); 2] = [
    ("alice", "alice-password", "operator"),
    ("victor", "victor-password", "viewer"),
];

/// The lowercase hex SHA-256 of `token`.
pub fn sha256_hex(token: &str) -> String {
    mend_dashboard::auth::token_digest(token)
}

/// Password hashes of [`USERS`], made once per test binary (hashing takes tens of milliseconds).
fn user_hashes() -> &'static [String] {
    static HASHES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    HASHES.get_or_init(|| {
        USERS
            .iter()
            .map(|(_, pw, _)| mend_dashboard::auth::hash_password(pw).expect("hash"))
            .collect()
    })
}

/// A dashboard config on `database_url` with the test tokens and users, plus `extra` top-level keys.
pub fn dashboard_config(nats_url: &str, database_url: &str, extra: &str) -> String {
    let mut c = toml::Table::new();
    c.insert("nats_url".into(), nats_url.into());
    c.insert("database_url".into(), database_url.into());
    c.insert("listen".into(), format!("127.0.0.1:{}", free_port()).into());
    c.insert("shutdown_timeout".into(), "10s".into());
    let extra: toml::Table = extra
        .parse()
        .unwrap_or_else(|e| panic!("not TOML ({e}): {extra}"));
    c.extend(extra);
    let tokens = [
        ("ops", "operator", OPERATOR_TOKEN),
        ("viewer", "viewer", VIEWER_TOKEN),
        ("admin", "admin", ADMIN_TOKEN),
    ]
    .map(|(name, role, token)| {
        toml::Value::Table(toml::Table::from_iter([
            ("name".to_owned(), name.into()),
            ("role".to_owned(), role.into()),
            ("sha256".to_owned(), sha256_hex(token).into()),
        ]))
    });
    append(&mut c, "api_token", tokens);
    let users = USERS
        .iter()
        .zip(user_hashes())
        .map(|((name, _, role), hash)| {
            toml::Value::Table(toml::Table::from_iter([
                ("name".to_owned(), (*name).into()),
                ("role".to_owned(), (*role).into()),
                ("password_hash".to_owned(), hash.as_str().into()),
            ]))
        });
    append(&mut c, "user", users);
    c.to_string()
}

/// Appends `items` to the array of tables `key` of `config` (created when missing).
fn append(config: &mut toml::Table, key: &str, items: impl IntoIterator<Item = toml::Value>) {
    let entry = config
        .entry(key)
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    if let toml::Value::Array(array) = entry {
        array.extend(items);
    }
}

/// A running dashboard and a client for its API.
pub struct Dashboard {
    pub process: MendProcess,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

impl Dashboard {
    /// Starts a dashboard on a fresh SQLite file, with `extra` top-level config keys.
    pub async fn start(nats_url: &str, extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = format!("sqlite://{}", dir.path().join("mend.db").display());
        let mut d = Self::start_on(nats_url, &db, extra).await?;
        d._dir = Some(dir);
        Ok(d)
    }

    /// Starts a dashboard on `database_url`.
    pub async fn start_on(nats_url: &str, database_url: &str, extra: &str) -> anyhow::Result<Self> {
        Self::start_with_env(nats_url, database_url, extra, &[]).await
    }

    /// Starts a dashboard on `database_url` with `env` added to its environment.
    pub async fn start_with_env(
        nats_url: &str,
        database_url: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let config = dashboard_config(nats_url, database_url, extra);
        let url = format!("http://{}", crate::mend::listen_addr(&config));
        let process = MendProcess::start_with_env("dashboard", &config, env).await?;
        process.ready().await?;
        Ok(Self {
            process,
            url,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            _dir: None,
        })
    }

    /// `GET path` with `token`; the status and the JSON body (`Null` when not JSON).
    pub async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        let status = res.status();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// `POST path` with a JSON `body` and `token`.
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self.http.post(format!("{}{path}", self.url)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        let status = res.status();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// `GET path` as the operator, which must answer 200.
    pub async fn ok(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(path, Some(OPERATOR_TOKEN)).await?;
        anyhow::ensure!(status == StatusCode::OK, "GET {path}: {status} {body}");
        Ok(body)
    }

    /// The messages listed for `query` (e.g. `status=parked`), every page.
    pub async fn messages(&self, query: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/api/messages?{query}&limit=200&cursor={c}"),
                None => format!("/api/messages?{query}&limit=200"),
            };
            let page = self.ok(&path).await?;
            out.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
    }

    /// Waits until `query` lists exactly `n` messages; returns them.
    /// Publishes `out`, which the app and the example rules park, waits until it is the one parked
    /// message here and returns its id.
    pub async fn park_one(
        &self,
        js: &async_nats::jetstream::Context,
        out: Out,
    ) -> anyhow::Result<String> {
        crate::js::publish_all(js, vec![out]).await?;
        let parked = self
            .wait_messages("status=parked", 1, crate::world::TEST_TIMEOUT)
            .await?;
        parked[0]["id"]
            .as_str()
            .map(str::to_owned)
            .context("a parked message without an id")
    }

    /// Resubmits failure group `group` (a bulk job, `body` as the API takes it) and waits until the
    /// job ends; returns the job.
    pub async fn resubmit_group(&self, group: &str, body: &Value) -> anyhow::Result<Value> {
        let (status, job) = self
            .post(
                &format!("/api/groups/{group}/resubmit"),
                Some(OPERATOR_TOKEN),
                body,
            )
            .await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED, "{status} {job}");
        let id = job["id"]
            .as_str()
            .context("a job without an id")?
            .to_owned();
        crate::wait::until("the job ends", crate::world::TEST_TIMEOUT, || async {
            let j = self.ok(&format!("/api/jobs/{id}")).await?;
            Ok(j["finished_at"].is_number().then_some(j))
        })
        .await
    }

    pub async fn wait_messages(
        &self,
        query: &str,
        n: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        crate::wait::until(&format!("{n} messages for {query}"), limit, || async {
            let items = self.messages(query).await?;
            Ok((items.len() == n).then_some(items))
        })
        .await
    }

    /// Waits until message `id` has `status`; returns it.
    pub async fn wait_status(
        &self,
        id: &str,
        status: &str,
        limit: Duration,
    ) -> anyhow::Result<Value> {
        crate::wait::until(&format!("{id} {status}"), limit, || async {
            let (code, m) = self
                .get(&format!("/api/messages/{id}"), Some(OPERATOR_TOKEN))
                .await?;
            Ok((code == StatusCode::OK && m["status"] == status).then_some(m))
        })
        .await
        .with_context(|| format!("dashboard log:\n{}", self.process.log()))
    }
}

/// The whole loop for dashboard tests: a world whose app is the orders service (the account
/// `nobody` is unknown, so the example rules park it), a sidecar keyed by `Account-Id`, a
/// processor with the example rules, and a dashboard (`extra` config keys; on `database_url`, else
/// a temp SQLite file).
pub struct Stack {
    pub world: World,
    pub sidecar: MendProcess,
    pub processor: MendProcess,
    pub dashboard: Dashboard,
}

impl Stack {
    pub async fn start(database_url: Option<&str>, extra: &str) -> anyhow::Result<Stack> {
        let world = World::new().await?;
        world
            .app
            .script(|d| crate::app::order_problem(d).unwrap_or(Reply::Ok));
        let sidecar = world.sidecar(&world.keyed_config("app", "")).await?;
        let processor = MendProcess::start(
            "processor",
            &processor_config(&world.nats.url(), &example_rules(), ""),
        )
        .await?;
        processor.ready().await?;
        let dashboard = match database_url {
            Some(url) => Dashboard::start_on(&world.nats.url(), url, extra).await?,
            None => Dashboard::start(&world.nats.url(), extra).await?,
        };
        Ok(Stack {
            world,
            sidecar,
            processor,
            dashboard,
        })
    }
}

/// An order of key `key` (header and field), number `n`, for `account`.
pub fn order(key: &str, n: u64, account: &str) -> Out {
    order_with(key, n, account, Value::Null)
}

/// [`order`] with `extra` fields.
pub fn order_with(key: &str, n: u64, account: &str, extra: Value) -> Out {
    let mut body = serde_json::json!({"key": key, "n": n, "account": account, "amount": 10});
    if let (Some(b), Value::Object(more)) = (body.as_object_mut(), extra) {
        b.extend(more);
    }
    Out::keyed("app.created", KEY_HEADER, key, body)
}

/// The `n` of every successful delivery of `key`, in the order the app saw them.
pub fn delivered(log: &[Delivery], key: &str) -> Vec<u64> {
    log.iter()
        .filter(|d| d.ok() && d.field("key").and_then(Value::as_str) == Some(key))
        .map(|d| d.field("n").and_then(Value::as_u64).unwrap_or(u64::MAX))
        .collect()
}

// Helpers of the web tests: they unwrap, as tests do.
/// The value of the hidden field `name` in a page's first form that has it.
pub fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_owned())
}

/// Opens the login page with `client` (which keeps its cookie) and returns the form's CSRF token.
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub async fn login_token(d: &Dashboard, client: &reqwest::Client) -> String {
    let page = client.get(format!("{}/login", d.url)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    hidden(&html, "csrf").expect("the login form has a CSRF field")
}

/// A browser-like client: keeps cookies, does not follow redirects.
#[allow(clippy::unwrap_used)]
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs `client` in as `user`; returns the login answer.
#[allow(clippy::unwrap_used)]
pub async fn login(
    d: &Dashboard,
    client: &reqwest::Client,
    user: &str,
    password: &str,
) -> reqwest::Response {
    let csrf = login_token(d, client).await;
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

/// Parks `n` messages of service `orders` (ids `ORDERS:1..=n`, keys `a1..`, payload `payload(seq)`,
/// error code `unknown_account`) straight on MEND_PARKED, as the processor would (the stream is
/// there once a mend role has started).
pub async fn park_directly(
    world: &World,
    n: u64,
    payload: impl Fn(u64) -> Value,
) -> anyhow::Result<()> {
    park_directly_with(world, n, payload, |_| async_nats::HeaderMap::new()).await
}

/// [`park_directly`], each parking with the NATS headers `headers` gives for its seq.
pub async fn park_directly_with(
    world: &World,
    n: u64,
    payload: impl Fn(u64) -> Value,
    headers: impl Fn(u64) -> async_nats::HeaderMap,
) -> anyhow::Result<()> {
    let outs = (1..=n)
        .map(|seq| {
            let envelope = serde_json::json!({
                "version": 1, "id": format!("ORDERS:{seq}"), "service": "orders", "binding": "orders",
                "stream": "ORDERS", "seq": seq, "subject": "orders.created", "key": format!("a{seq}"),
                "headers": {}, "payload": payload(seq), "payload_base64": null,
                "error": {"kind": "message", "status": 422, "code": "unknown_account"},
                "attempt": 1, "first_failed_at": "2026-11-23T10:00:00Z",
                "failed_at": "2026-11-23T10:00:00Z", "reason": "no_rule", "history": [],
            });
            Out {
                subject: "mend.parked.orders".into(),
                headers: headers(seq),
                payload: bytes::Bytes::from(envelope.to_string()),
            }
        })
        .collect();
    crate::js::publish_all(&world.js, outs).await?;
    Ok(())
}

/// A browser-like client logged in as `user` of [`USERS`] (by name).
#[allow(clippy::unwrap_used)]
pub async fn logged_in(d: &Dashboard, user: &str) -> reqwest::Client {
    let client = browser();
    let (_, password, _) = USERS.iter().find(|(n, _, _)| *n == user).unwrap();
    login(d, &client, user, password).await;
    client
}

/// The text of page `path` as `client` gets it.
#[allow(clippy::unwrap_used)]
pub async fn page_text(d: &Dashboard, client: &reqwest::Client, path: &str) -> String {
    let res = client.get(format!("{}{path}", d.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "GET {path}");
    res.text().await.unwrap()
}

/// An announcement of `kind` for message `id` of `service` made `at`, as mend's components write
/// them on MEND_EVENTS (a structured CloudEvent).
pub fn announcement(service: &str, kind: &str, id: &str, at: std::time::SystemTime) -> Out {
    let event = serde_json::json!({
        "specversion": "1.0",
        "id": format!("{id}:1:{kind}"),
        "source": "urn:mend:test",
        "type": format!("mend.{kind}"),
        "time": humantime::format_rfc3339_millis(at).to_string(),
        "datacontenttype": "application/json",
        "data": {"service": service, "id": id, "attempt": 1},
    });
    // The subject's service token is what a subject can carry; the service is the data's.
    let token: String = service
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(64)
        .collect();
    let token = if token.is_empty() { "_".into() } else { token };
    Out {
        subject: format!("mend.events.{token}.{kind}"),
        headers: async_nats::HeaderMap::new(),
        payload: event.to_string().into(),
    }
}

/// The id of the message of key `key` among `messages` (as the API lists them); panics when none
/// has that key.
#[allow(clippy::unwrap_used)]
pub fn id_of_key(messages: &[Value], key: &str) -> String {
    messages
        .iter()
        .find(|m| m["key"] == key)
        .and_then(|m| m["id"].as_str())
        .unwrap_or_else(|| panic!("no message of key {key} in {messages:?}"))
        .to_owned()
}
