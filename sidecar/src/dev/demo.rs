//! The demo service of `mend dev`: an orders and payments app that fails the way real ones do, and
//! the producer that feeds its stream.
//!
//! The app (HTTP, behind the sidecar) refuses
//! - an amount sent as a string (`bad_type` on `/amount`: the example rules repair it),
//! - a missing currency (`missing_field` on `/currency`: repaired),
//! - an account it does not know yet (`unknown_account`: parked for a person). A new account opens
//!   [`ACCOUNT_OPENS_AFTER`] after its first order, so resubmitting that order from the dashboard
//!   later goes through, and the account's orders held behind it follow in order,
//! - and now and then answers 503 once (its database is "busy"): retried in place, never delegated.
//!
//! It takes one event per request (`/events`) or CloudEvents JSON batches (`/events/batch`, for
//! `mend dev --batch N`), with one status per entry: the same refusals as FAIL with their problem
//! object, a busy database as RETRY.
//!
//! It counts what it processed and checks that each account's events arrive in the order they were
//! produced, which is what mend's holding queues promise.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use repair_rules::headers as h;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The demo's service name, app stream and subjects.
pub const SERVICE: &str = "orders";
pub const STREAM: &str = "ORDERS";
pub const SUBJECTS: &str = "orders.>";
/// How long a new account takes to open after its first order.
pub const ACCOUNT_OPENS_AFTER: Duration = Duration::from_secs(20);
/// The accounts that exist from the start.
const ACCOUNTS: u64 = 12;

/// What the app has done so far.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events processed (2xx).
    pub delivered: AtomicU64,
    /// ... of which carried `Mend-Repaired-By` (repaired by a rule).
    pub repaired: AtomicU64,
    /// ... of which carried `Mend-Resubmitted-By` (resubmitted from the dashboard).
    pub resubmitted: AtomicU64,
    /// 503 answers (each retried in place by the sidecar).
    pub unavailable: AtomicU64,
    /// Events of an account that arrived after a later one of the same account.
    pub out_of_order: AtomicU64,
    /// Events processed a second time (at-least-once delivery after a crash).
    pub duplicates: AtomicU64,
}

#[derive(Default)]
struct Books {
    /// New accounts: when each opens.
    opening: HashMap<String, Instant>,
    /// The number (`n`) of the last event processed per account.
    last: HashMap<String, u64>,
    /// Lineages answered 503 once already.
    unwell: HashSet<String>,
}

#[derive(Clone)]
struct App {
    stats: Arc<Stats>,
    books: Arc<Mutex<Books>>,
}

/// The running app.
pub struct DemoApp {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl DemoApp {
    /// Serves the app on a free loopback port: `POST /events` and `POST /events/batch`.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot listen for the demo app")?;
        let addr = listener.local_addr()?;
        let app = App {
            stats: Arc::default(),
            books: Arc::default(),
        };
        let stats = app.stats.clone();
        let router = Router::new()
            .route("/events", post(handle))
            .route("/events/batch", post(handle_batch))
            .with_state(app);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            }
        });
        Ok(Self {
            addr,
            stats,
            stop,
            task,
        })
    }

    /// Where the sidecar delivers: one event per request, or (`batch`) CloudEvents JSON batches.
    pub fn endpoint(&self, batch: bool) -> String {
        let path = if batch { "/events/batch" } else { "/events" };
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        if let Ok(Err(e)) = self.task.await {
            tracing::warn!(error = %e, "The demo app failed.");
        }
    }
}

/// What the app makes of one event.
enum Verdict {
    Processed,
    /// A message error, as an RFC 9457 problem object.
    Problem(Value),
    /// The database is busy: try again in a second.
    Busy,
}

fn problem(status: StatusCode, code: &str, title: &str, field: Option<&str>) -> Verdict {
    let mut body = json!({"type": format!("https://demo.mend.dev/problems/{code}"), "title": title, "status": status.as_u16(), "code": code});
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    Verdict::Problem(body)
}

/// `POST /events`: one event per request (SPEC §4).
async fn handle(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let id = headers
        .get(h::MEND_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let verdict = match serde_json::from_slice::<Value>(&body) {
        Ok(event) => judge(
            &app,
            &event,
            id,
            headers.contains_key(h::MEND_REPAIRED_BY),
            headers.contains_key(h::MEND_RESUBMITTED_BY),
        ),
        Err(_) => problem(
            StatusCode::BAD_REQUEST,
            "not_json",
            "the event is not JSON",
            None,
        ),
    };
    match verdict {
        Verdict::Processed => StatusCode::NO_CONTENT.into_response(),
        Verdict::Problem(body) => (
            StatusCode::from_u16(body["status"].as_u64().unwrap_or(422) as u16)
                .unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            body.to_string(),
        )
            .into_response(),
        Verdict::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            "the database is busy; try again",
        )
            .into_response(),
    }
}

/// `POST /events/batch`: a CloudEvents JSON batch (SPEC §4 "Bulk delivery"), one status per entry.
async fn handle_batch(State(app): State<App>, body: Bytes) -> Response {
    let Ok(Value::Array(entries)) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not a CloudEvents JSON batch").into_response();
    };
    let statuses: Vec<Value> = entries
        .iter()
        .map(|entry| {
            let id = entry["id"].as_str().unwrap_or_default();
            let verdict = match entry.get("data") {
                Some(event) => judge(
                    &app,
                    event,
                    id,
                    entry.get("mendrepairedby").is_some(),
                    entry.get("mendresubmittedby").is_some(),
                ),
                None => problem(
                    StatusCode::BAD_REQUEST,
                    "not_json",
                    "the event is not JSON",
                    None,
                ),
            };
            match verdict {
                Verdict::Processed => json!({"id": id, "status": "SUCCESS"}),
                Verdict::Problem(problem) => {
                    json!({"id": id, "status": "FAIL", "problem": problem})
                }
                Verdict::Busy => json!({"id": id, "status": "RETRY"}),
            }
        })
        .collect();
    axum::Json(json!({ "statuses": statuses })).into_response()
}

/// The app's business logic for one event with Mend-Id `id`.
fn judge(app: &App, event: &Value, id: &str, repaired: bool, resubmitted: bool) -> Verdict {
    let Some(account) = event["account"].as_str().map(str::to_owned) else {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "account is required",
            Some("/account"),
        );
    };
    if event["amount"].is_string() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_type",
            "amount must be a number",
            Some("/amount"),
        );
    }
    if !event["amount"].is_number() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "amount is required",
            Some("/amount"),
        );
    }
    if event.get("currency").is_none() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "currency is required",
            Some("/currency"),
        );
    }
    let n = event["n"].as_u64().unwrap_or(0);
    {
        let mut books = app.books.lock().unwrap_or_else(|p| p.into_inner());
        if account.starts_with("acct-new-") {
            let opens = *books
                .opening
                .entry(account.clone())
                .or_insert_with(|| Instant::now() + ACCOUNT_OPENS_AFTER);
            if Instant::now() < opens {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_account",
                    "no such account",
                    Some("/account"),
                );
            }
        }
        // The database is busy now and then: one 503 for about one event in thirteen.
        if busy(id) && books.unwell.insert(id.to_owned()) {
            app.stats.unavailable.fetch_add(1, Ordering::Relaxed);
            return Verdict::Busy;
        }
        books.unwell.remove(id);
        let last = books.last.entry(account.clone()).or_insert(0);
        if n == *last && n != 0 {
            app.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        } else if n < *last {
            app.stats.out_of_order.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                account,
                n,
                last = *last,
                "An event arrived after a later one."
            );
        } else {
            *last = n;
        }
    }
    app.stats.delivered.fetch_add(1, Ordering::Relaxed);
    if repaired {
        app.stats.repaired.fetch_add(1, Ordering::Relaxed);
    }
    if resubmitted {
        app.stats.resubmitted.fetch_add(1, Ordering::Relaxed);
    }
    Verdict::Processed
}

/// Whether the "database" is busy for this lineage (deterministic: about one in thirteen).
fn busy(id: &str) -> bool {
    let seq = id.rsplit(':').next().and_then(|s| s.parse::<u64>().ok());
    seq.is_some_and(|s| s % 13 == 5)
}

/// The `i`-th event of the producer: mostly good orders and payments of the known accounts, with
/// the mistakes real producers make, and now and then a new account whose first order comes before
/// the account is opened (and two more events for it right behind).
pub fn event(i: u64, counters: &mut HashMap<String, u64>) -> (String, Value) {
    let account = match i % 40 {
        29 | 31 | 36 => format!("acct-new-{}", i / 40 + 1),
        _ => format!("acct-{}", (i * 7) % ACCOUNTS + 1),
    };
    let n = counters.entry(account.clone()).or_insert(0);
    *n += 1;
    let subject = if i % 3 == 2 {
        "orders.paid"
    } else {
        "orders.created"
    };
    let cents = (i * 37) % 9000 + 100;
    let amount = cents as f64 / 100.0;
    let mut event = json!({"order": format!("o-{i}"), "account": account, "n": *n, "amount": amount, "currency": "USD"});
    match i % 40 {
        // An amount as text, as a form or a spreadsheet sends it.
        7 => event["amount"] = json!(format!("{amount:.2}")),
        // A client that forgot the currency.
        19 => {
            if let Some(o) = event.as_object_mut() {
                o.remove("currency");
            }
        }
        _ => {}
    }
    (subject.to_owned(), event)
}

/// Publishes `rate` events per second until `stop`; a failed publish is logged and the event
/// skipped (the stream is the producer's, and the demo goes on).
pub async fn produce(js: jetstream::Context, rate: u32, stop: CancellationToken) {
    if rate == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counters = HashMap::new();
    for i in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let (subject, event) = event(i, &mut counters);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        let sent = async {
            js.publish_with_headers(subject, headers, Bytes::from(event.to_string()))
                .await?
                .await
                .map_err(anyhow::Error::from)
        };
        let sent = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), sent) => r,
            _ = stop.cancelled() => return,
        };
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "The producer could not publish an event."),
            Err(_) => tracing::warn!("The producer's publish was not confirmed within 5s."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_mixes_good_events_with_each_kind_of_mistake() {
        let mut counters = HashMap::new();
        let events: Vec<(String, Value)> = (0..80).map(|i| event(i, &mut counters)).collect();
        let strings = events.iter().filter(|(_, e)| e["amount"].is_string());
        assert_eq!(strings.count(), 2);
        let no_currency = events.iter().filter(|(_, e)| e.get("currency").is_none());
        assert_eq!(no_currency.count(), 2);
        let new: Vec<&Value> = events
            .iter()
            .filter(|(_, e)| e["account"] == "acct-new-1")
            .map(|(_, e)| e)
            .collect();
        assert_eq!(
            new.len(),
            3,
            "a new account's first order and two behind it"
        );
        assert_eq!(
            new.iter().map(|e| e["n"].as_u64()).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3)]
        );
        assert!(events.iter().any(|(s, _)| s == "orders.paid"));
        assert!(events.iter().any(|(s, _)| s == "orders.created"));
    }

    #[test]
    fn about_one_lineage_in_thirteen_is_busy() {
        let busy = (1..=1300).filter(|s| busy(&format!("ORDERS:{s}"))).count();
        assert_eq!(busy, 100);
        assert!(!busy_id_without_sequence());
    }

    fn busy_id_without_sequence() -> bool {
        busy("") || busy("garbage")
    }
}
