//! A programmable HTTP app standing in for the user's service: records every delivery with its
//! headers, and answers each one as the test's script says. It can go down and come back on the
//! same port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// What the app answers to one delivery.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200.
    Ok,
    /// This status with an empty body.
    Status(u16),
    /// `application/problem+json` with this status and body.
    Problem(u16, Value),
    /// `text/plain` with this status and body.
    Text(u16, String),
    /// This status with `Retry-After: secs`.
    RetryAfter(u16, u64),
    /// Wait this long, then 200 (longer than the sidecar's timeout makes a timeout).
    Slow(Duration),
    /// This status with `Mend-Action: action`.
    Action(u16, &'static str),
    /// In a batch: the entry is left out of the answer (single delivery: a 500).
    Missing,
}

/// How the app answers a whole batch, instead of one status per entry.
#[derive(Debug, Clone)]
pub enum BatchReply {
    /// This status and body (`text/plain`) for the whole batch.
    Body(u16, String),
    /// Wait this long, then answer entry by entry.
    Slow(Duration),
}

/// One request the app received.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body as JSON, when it is.
    pub json: Option<Value>,
    /// The status the app answered (for an entry of a batch: 200 for SUCCESS, the reply's own
    /// status otherwise, or the whole batch's non-2xx status; 0 when it was left out of the answer
    /// or the whole batch got a 2xx answer without statuses).
    pub status: u16,
    /// For an entry of a batch: the batch's number (from 0) and the entry as it came.
    pub batch: Option<(usize, Value)>,
    /// How many times this `Mend-Id` had been delivered before (0 for the first).
    pub seen_before: usize,
    pub at: Instant,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn mend_id(&self) -> &str {
        self.header("mend-id").unwrap_or("")
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    /// A field of the JSON body.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.json.as_ref()?.get(name)
    }
    /// The body's number `n` (the test messages' position in their key's order); `u64::MAX` when
    /// it has none.
    pub fn n(&self) -> u64 {
        self.field("n").and_then(Value::as_u64).unwrap_or(u64::MAX)
    }
}

/// A script that answers 422 to the messages whose JSON `n` is one of `failing`, 200 to the rest.
pub fn failing(failing: &'static [u64]) -> impl Fn(&Delivery) -> Reply + Send + Sync + 'static {
    move |d| {
        let n = d.field("n").and_then(Value::as_u64);
        if n.is_some_and(|n| failing.contains(&n)) {
            Reply::Status(422)
        } else {
            Reply::Status(200)
        }
    }
}

/// How the demo orders service answers an order, if it rejects it: a string `amount` is a
/// `bad_type` on `/amount` (the example rules repair it), the account `nobody` is
/// `unknown_account` (they park it); a body that is not JSON is a 400. `None`: the order is fine.
pub fn order_problem(d: &Delivery) -> Option<Reply> {
    let Some(order) = d.json.as_ref() else {
        return Some(Reply::Status(400));
    };
    if order["amount"].is_string() {
        return Some(Reply::Problem(
            422,
            serde_json::json!({"title": "amount must be a number", "code": "bad_type", "field": "/amount"}),
        ));
    }
    if order["account"] == "nobody" {
        return Some(Reply::Problem(
            422,
            serde_json::json!({"title": "no such account", "code": "unknown_account"}),
        ));
    }
    None
}

type Script = dyn Fn(&Delivery) -> Reply + Send + Sync;
type BatchScript = dyn Fn(&[Delivery]) -> Option<BatchReply> + Send + Sync;

struct Shared {
    log: Mutex<Vec<Delivery>>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: Mutex<(usize, usize)>,
    seen: Mutex<HashMap<String, usize>>,
    script: Mutex<Arc<Script>>,
    batch_script: Mutex<Arc<BatchScript>>,
    /// Batches received, and the most entries one had.
    batches: Mutex<(usize, usize)>,
    changed: watch::Sender<usize>,
}

pub struct FakeApp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    /// While down: the port, bound but not listening, so connections are refused and no other
    /// process of a parallel test run is given the port meanwhile.
    reserved: Option<tokio::net::TcpSocket>,
}

impl FakeApp {
    /// Starts an app that answers 200 to everything.
    pub async fn start() -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            in_flight: Mutex::new((0, 0)),
            seen: Mutex::new(HashMap::new()),
            script: Mutex::new(Arc::new(|_: &Delivery| Reply::Ok)),
            batch_script: Mutex::new(Arc::new(|_: &[Delivery]| None)),
            batches: Mutex::new((0, 0)),
            changed: watch::channel(0).0,
        });
        let mut app = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shared,
            server: None,
            reserved: None,
        };
        app.up().await?;
        Ok(app)
    }

    /// Replaces how the app answers.
    pub fn script(&self, f: impl Fn(&Delivery) -> Reply + Send + Sync + 'static) {
        *self.shared.script.lock().unwrap() = Arc::new(f);
    }

    /// Replaces how the app answers a whole batch (`None`: entry by entry, by the script).
    pub fn batch_script(
        &self,
        f: impl Fn(&[Delivery]) -> Option<BatchReply> + Send + Sync + 'static,
    ) {
        *self.shared.batch_script.lock().unwrap() = Arc::new(f);
    }

    /// The endpoint URL for a binding.
    pub fn endpoint(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// The endpoint URL for a binding with bulk delivery: each entry of a batch is logged as a
    /// delivery (its attributes as the headers single delivery would have had) and answered by the
    /// script: 2xx is SUCCESS, a transient status RETRY, `Mend-Action: drop` DROP, a problem or other
    /// status FAIL (with the problem object), [`Reply::Missing`] no status.
    pub fn batch_endpoint(&self) -> String {
        format!("http://{}/batch", self.addr)
    }

    /// Batches received so far, and the most entries one had.
    pub fn batches(&self) -> (usize, usize) {
        *self.shared.batches.lock().unwrap()
    }

    /// The most requests the app was answering at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.in_flight.lock().unwrap().1
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Delivery> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Waits until `check` holds on the log, re-checking on every new delivery.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&[Delivery]) -> bool,
    ) -> anyhow::Result<Vec<Delivery>> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            {
                let log = self.shared.log.lock().unwrap();
                if check(&log) {
                    return Ok(log.clone());
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let n = self.shared.log.lock().unwrap().len();
                    anyhow::bail!(
                        "timed out after {limit:?} waiting for {what} ({n} requests so far)"
                    )
                }
            }
        }
    }

    /// Waits until `n` deliveries were answered with success (redeliveries counted each time).
    pub async fn wait_for_successes(
        &self,
        n: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<Delivery>> {
        let what = format!("{n} successful deliveries");
        self.wait_for(&what, limit, |log| {
            log.iter().filter(|d| d.ok()).count() >= n
        })
        .await
    }

    /// Stops answering: the port refuses connections until [`FakeApp::up`].
    pub async fn down(&mut self) -> anyhow::Result<()> {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(());
            task.await?;
        }
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(self.addr)
            .context("cannot keep the app's port while it is down")?;
        self.reserved = Some(socket);
        Ok(())
    }

    /// Starts answering again on the same port.
    pub async fn up(&mut self) -> anyhow::Result<()> {
        self.reserved = None;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        let listener = socket.listen(1024).context("app listen")?;
        self.addr = listener.local_addr()?;
        let router = Router::new()
            .route("/events", post(handle))
            .route("/batch", post(handle_batch))
            .with_state(self.shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        self.server = Some((stop, task));
        Ok(())
    }
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    {
        let mut f = shared.in_flight.lock().unwrap();
        f.0 += 1;
        f.1 = f.1.max(f.0);
    }
    let id = headers
        .get("mend-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let seen_before = {
        let mut seen = shared.seen.lock().unwrap();
        let n = seen.entry(id).or_insert(0);
        *n += 1;
        *n - 1
    };
    let mut delivery = Delivery {
        json: serde_json::from_slice(&body).ok(),
        headers,
        body,
        status: 0,
        batch: None,
        seen_before,
        at: Instant::now(),
    };
    let script = shared.script.lock().unwrap().clone();
    let reply = script(&delivery);
    if let Reply::Slow(d) = &reply {
        tokio::time::sleep(*d).await;
    }
    let response = match reply {
        Reply::Ok | Reply::Slow(_) => StatusCode::OK.into_response(),
        Reply::Status(s) => status(s).into_response(),
        Reply::Problem(s, body) => (
            status(s),
            [("content-type", "application/problem+json")],
            body.to_string(),
        )
            .into_response(),
        Reply::Text(s, body) => (status(s), [("content-type", "text/plain")], body).into_response(),
        Reply::RetryAfter(s, secs) => {
            let mut r = status(s).into_response();
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
            r
        }
        Reply::Action(s, action) => {
            let mut r = status(s).into_response();
            r.headers_mut()
                .insert("mend-action", HeaderValue::from_static(action));
            r
        }
        Reply::Missing => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    delivery.status = response.status().as_u16();
    shared.in_flight.lock().unwrap().0 -= 1;
    let n = {
        let mut log = shared.log.lock().unwrap();
        log.push(delivery);
        log.len()
    };
    shared.changed.send_replace(n);
    response
}

/// One entry of a batch as a delivery: its attributes as the headers single delivery has.
fn entry_delivery(shared: &Shared, batch: usize, entry: Value) -> Delivery {
    let mut headers = HeaderMap::new();
    let attr = |name: &str| match &entry[name] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    for (header, attribute) in [
        ("mend-id", "id"),
        ("ce-id", "id"),
        ("mend-key", "subject"),
        ("ce-subject", "subject"),
        ("ce-type", "type"),
        ("mend-original-subject", "type"),
        ("mend-attempt", "mendattempt"),
        ("mend-service", "mendservice"),
        ("mend-repaired-by", "mendrepairedby"),
        ("mend-resubmitted-by", "mendresubmittedby"),
        ("content-type", "datacontenttype"),
        ("traceparent", "traceparent"),
        ("tracestate", "tracestate"),
    ] {
        if let Some(v) = attr(attribute).and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(header, v);
        }
    }
    let body = match (&entry["data"], entry["data_base64"].as_str()) {
        (Value::Null, Some(b64)) => {
            use base64::Engine as _;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap_or_default(),
            )
        }
        (data, _) => Bytes::from(data.to_string()),
    };
    let id = attr("id").unwrap_or_default();
    let seen_before = {
        let mut seen = shared.seen.lock().unwrap();
        let n = seen.entry(id).or_insert(0);
        *n += 1;
        *n - 1
    };
    Delivery {
        json: serde_json::from_slice(&body).ok(),
        headers,
        body,
        status: 0,
        batch: Some((batch, entry)),
        seen_before,
        at: Instant::now(),
    }
}

async fn handle_batch(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if headers.get("content-type").and_then(|v| v.to_str().ok())
        != Some("application/cloudevents-batch+json")
    {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not a CloudEvents batch",
        )
            .into_response();
    }
    let Ok(Value::Array(entries)) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not a JSON array").into_response();
    };
    let number = {
        let mut b = shared.batches.lock().unwrap();
        b.0 += 1;
        b.1 = b.1.max(entries.len());
        b.0 - 1
    };
    {
        let mut f = shared.in_flight.lock().unwrap();
        f.0 += 1;
        f.1 = f.1.max(f.0);
    }
    let mut deliveries: Vec<Delivery> = entries
        .into_iter()
        .map(|e| entry_delivery(&shared, number, e))
        .collect();
    let whole = shared.batch_script.lock().unwrap().clone()(&deliveries);
    let response = match whole {
        Some(BatchReply::Body(s, text)) => {
            // A 2xx body that is not the contract's processed nothing.
            for d in &mut deliveries {
                d.status = if (200..300).contains(&s) { 0 } else { s };
            }
            Some((status(s), [("content-type", "text/plain")], text).into_response())
        }
        Some(BatchReply::Slow(pause)) => {
            tokio::time::sleep(pause).await;
            None
        }
        None => None,
    };
    let response = response.unwrap_or_else(|| {
        let script = shared.script.lock().unwrap().clone();
        let mut statuses = Vec::new();
        for d in &mut deliveries {
            let id = d.mend_id().to_owned();
            let (code, entry) = match script(d) {
                Reply::Ok | Reply::Slow(_) => (200, serde_json::json!({"id": id, "status": "SUCCESS"})),
                Reply::Status(s) if (200..300).contains(&s) => {
                    (s, serde_json::json!({"id": id, "status": "SUCCESS"}))
                }
                Reply::Status(s) | Reply::RetryAfter(s, _)
                    if [408, 425, 429, 502, 503, 504].contains(&s) =>
                {
                    (s, serde_json::json!({"id": id, "status": "RETRY"}))
                }
                Reply::Action(s, "drop") => (s, serde_json::json!({"id": id, "status": "DROP"})),
                Reply::Problem(s, mut problem) => {
                    // The problem object carries its status, as RFC 9457 suggests.
                    if let Some(members) = problem.as_object_mut() {
                        members.entry("status").or_insert(s.into());
                    }
                    (s, serde_json::json!({"id": id, "status": "FAIL", "problem": problem}))
                }
                Reply::Status(s) | Reply::RetryAfter(s, _) | Reply::Action(s, _) => (
                    s,
                    serde_json::json!({"id": id, "status": "FAIL", "problem": {"status": s}}),
                ),
                Reply::Text(s, text) => (
                    s,
                    serde_json::json!({"id": id, "status": "FAIL", "problem": {"status": s, "detail": text}}),
                ),
                Reply::Missing => (0, Value::Null),
            };
            d.status = code;
            if !entry.is_null() {
                statuses.push(entry);
            }
        }
        axum::Json(serde_json::json!({ "statuses": statuses })).into_response()
    });
    shared.in_flight.lock().unwrap().0 -= 1;
    let n = {
        let mut log = shared.log.lock().unwrap();
        log.extend(deliveries);
        log.len()
    };
    shared.changed.send_replace(n);
    response
}

fn status(s: u16) -> StatusCode {
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
