//! The dashboard's store (SPEC §9): parked messages, their statuses and timelines, the audit log and
//! web sessions, in SQLite (the embedded default) or PostgreSQL, through one code path (`sqlx::Any`).
//!
//! The SQL is the same on both: `$n` placeholders, `ON CONFLICT … DO NOTHING`, times as epoch
//! milliseconds, JSON as text. Each backend has its own migrations (`migrations/sqlite`,
//! `migrations/postgres`), embedded in the binary and applied at start.
//!
//! Everything that changes a message's status is one transaction, and the callers that consume
//! NATS ack only after it commits, so a crash anywhere redelivers rather than loses; redelivered
//! parkings and events are recognised by their keys (`parkings (id, attempt)`, `events.event_id`).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use repair_rules::{FailureEnvelope, FailureError};
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The most a list answers at once.
pub const MAX_PAGE: u32 = 200;
/// Searchable text kept per message (lowercased subject, key, error and payload).
const SEARCH_LIMIT: usize = 64 * 1024;

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database_url `{0}` is neither sqlite:… nor postgres://…")]
    BadUrl(String),
    #[error("cannot open the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot bring the database schema up to date: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data cannot be read: {0}")]
    Corrupt(String),
}

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A message's status (SPEC §9).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Parked,
    Resubmitted,
    Resolved,
    Discarded,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Parked,
        Status::Resubmitted,
        Status::Resolved,
        Status::Discarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Parked => "parked",
            Status::Resubmitted => "resubmitted",
            Status::Resolved => "resolved",
            Status::Discarded => "discarded",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status `{s}` (parked, resubmitted, resolved, discarded)")
            })
    }
}

/// A parked lineage as the dashboard shows it: its latest envelope and where it stands.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its place in the store's lists (a list's cursor continues after it).
    pub row_id: i64,
    pub id: String,
    pub status: Status,
    /// The latest attempt: the parked one, or the resubmitted one after a resubmission.
    pub attempt: u32,
    pub group_id: String,
    pub parked_at: i64,
    pub updated_at: i64,
    pub envelope: FailureEnvelope,
}

/// What taking in a parking did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// A lineage seen for the first time.
    New,
    /// A later attempt of a lineage already here (it failed again): parked again.
    Reparked,
    /// This parking was taken in before (a redelivery).
    Duplicate,
    /// An earlier attempt than the one stored, arriving late: recorded, status unchanged.
    Stale,
}

/// One announcement from MEND_EVENTS, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The CloudEvents id (`<lineage>:<attempt>:<kind>`), unique.
    pub id: String,
    /// The lineage (`Mend-Id`) it is about.
    pub message_id: String,
    pub service: String,
    /// The kind without the `mend.` prefix (`delegated`, `repaired`, `resolved`, …).
    pub kind: String,
    pub attempt: u32,
    /// Epoch milliseconds.
    pub at: i64,
    /// The rule, for `repaired` and `parked` by a rule.
    pub rule: Option<String>,
    pub source: String,
    /// The event's `data` as JSON text.
    pub data: String,
}

/// Filters of the message list; empty ones do not filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub status: Option<Status>,
    pub service: Option<String>,
    pub subject: Option<String>,
    pub code: Option<String>,
    /// Text contained (case-insensitively) in the subject, key, error or payload.
    pub q: Option<String>,
    pub group: Option<String>,
}

/// One page of a list, newest first; `next_cursor` continues it.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Parked messages that failed alike: same service, subject and error kind, code and title.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Group {
    pub id: String,
    pub service: String,
    pub subject: String,
    pub error_kind: String,
    pub error_code: Option<String>,
    pub error_title: Option<String>,
    pub count: i64,
    pub oldest_parked_at: i64,
}

/// An audit record of one human action.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub message_id: Option<String>,
    pub service: Option<String>,
    pub key: Option<String>,
    pub note: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// A message's last resubmission (see [`Store::last_resubmission`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LastResubmission {
    pub actor: String,
    /// The payload before and after the person's edit (JSON text); `None` when it was not edited.
    pub edit: Option<(String, String)>,
}

/// An audit record to write.
#[derive(Debug, Clone, Default)]
pub struct Audit<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub message_id: Option<&'a str>,
    pub service: Option<&'a str>,
    pub key: Option<&'a str>,
    pub note: Option<&'a str>,
    pub before: Option<&'a str>,
    pub after: Option<&'a str>,
}

/// What a status change found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    Done,
    /// No such message.
    Missing,
    /// The message is not in the expected state (someone else acted first).
    Conflict(Status),
}

/// A person's action on a parked message, taken in the store before anything is published (one
/// action per message at a time), and what is recorded once JetStream has stored its publish.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub message_id: String,
    /// The parked attempt acted on.
    pub attempt: u32,
    /// The audit action: `resubmit`, `edit_and_resubmit` or `discard`.
    pub action: String,
    pub actor: String,
    pub note: Option<String>,
    pub service: String,
    pub key: Option<String>,
    /// The message published (none: a discard of a message without a key publishes nothing).
    pub publish: Option<Outgoing>,
    /// The envelope as resubmitted (resubmissions): what the dashboard shows from then on.
    pub sent: Option<FailureEnvelope>,
    /// The payload before and after an edit, as audited.
    pub before: Option<String>,
    pub after: Option<String>,
}

/// A message to publish with a de-duplicating id, kept so that the very same message can be sent
/// again to learn whether the first one was stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub headers: Vec<(String, String)>,
    /// The payload, base64.
    pub body: String,
}

/// What [`Store::claim_action`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The action is this request's; `started_at` identifies the claim.
    Taken { started_at: i64 },
    /// No such message.
    Missing,
    /// The message is not parked at the attempt acted on.
    Conflict { status: Status, attempt: u32 },
    /// Another action on the message was taken, at `started_at`, and its outcome is not recorded.
    Pending { plan: Box<Plan>, started_at: i64 },
}

/// The overview's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Overview {
    /// (service, status, count)
    pub counts: Vec<(String, String, i64)>,
    /// The oldest parked message: (id, parked_at).
    pub oldest_parked: Option<(String, i64)>,
    /// (rule, event kind, count) over the window asked for; kind `failed` counts repairs whose
    /// retry failed again.
    pub rules: Vec<(String, String, i64)>,
}

/// A web session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub username: String,
    pub role: String,
    pub csrf: String,
    pub expires_at: i64,
}

/// The store: a connection pool and which backend it is.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens `url` (`sqlite://path`, `sqlite::memory:` is refused, or `postgres://…`), creating a
    /// SQLite file if missing, and applies the migrations.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        let pool = match backend {
            Backend::Sqlite => {
                if url.contains(":memory:") || url.contains("mode=memory") {
                    // Each pooled connection would get its own empty database.
                    return Err(StoreError::BadUrl(format!(
                        "{url} (an in-memory SQLite database is not shared across connections; use a file)"
                    )));
                }
                let url = if url.contains("mode=") {
                    url.to_owned()
                } else if url.contains('?') {
                    format!("{url}&mode=rwc")
                } else {
                    format!("{url}?mode=rwc")
                };
                let pool = AnyPoolOptions::new()
                    .max_connections(4)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query("PRAGMA busy_timeout = 10000")
                                .execute(&mut *conn)
                                .await?;
                            sqlx::query("PRAGMA synchronous = NORMAL")
                                .execute(&mut *conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await
                    .map_err(StoreError::Connect)?;
                // Readers do not wait for writers (ingest) and vice versa; kept in the file.
                sqlx::query("PRAGMA journal_mode = WAL")
                    .fetch_optional(&pool)
                    .await?;
                pool
            }
            Backend::Postgres => AnyPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(StoreError::Connect)?,
        };
        match backend {
            Backend::Sqlite => SQLITE.run(&pool).await?,
            Backend::Postgres => POSTGRES.run(&pool).await?,
        }
        Ok(Store { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The trace context parking `attempt` of message `id` came with, if one was kept.
    pub async fn parking_trace(
        &self,
        id: &str,
        attempt: u32,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT trace_parent FROM parkings WHERE id = $1 AND attempt = $2")
            .bind(clean(id))
            .bind(i64::from(attempt))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()?
            .flatten())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Takes in one parking (an envelope from MEND_PARKED) in one transaction.
    pub async fn ingest_parked(
        &self,
        envelope: &FailureEnvelope,
        now: i64,
    ) -> Result<Ingested, StoreError> {
        self.ingest_traced(envelope, now, None).await
    }

    /// [`Store::ingest_parked`], keeping the trace context the parking came with (a W3C
    /// `traceparent` mend made valid) for the link of its resubmission.
    pub async fn ingest_traced(
        &self,
        envelope: &FailureEnvelope,
        now: i64,
        trace_parent: Option<&str>,
    ) -> Result<Ingested, StoreError> {
        let text = serde_json::to_string(envelope)
            .map_err(|e| StoreError::Corrupt(format!("envelope {}: {e}", envelope.id)))?;
        let mut tx = self.pool.begin().await?;
        let taken = sqlx::query(
            "INSERT INTO parkings (id, attempt, parked_at, trace_parent) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(clean(&envelope.id))
        .bind(i64::from(envelope.attempt))
        .bind(now)
        .bind(trace_parent.map(clean))
        .execute(&mut *tx)
        .await?;
        if taken.rows_affected() == 0 {
            tx.commit().await?;
            return Ok(Ingested::Duplicate);
        }
        let stored: Option<i64> = sqlx::query("SELECT attempt FROM messages WHERE id = $1")
            .bind(clean(&envelope.id))
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
        let outcome = match stored {
            None => Ingested::New,
            Some(attempt) if i64::from(envelope.attempt) >= attempt => Ingested::Reparked,
            Some(_) => Ingested::Stale,
        };
        if outcome != Ingested::Stale {
            // New, or a later attempt parked again (its first parking time stays).
            let e = &envelope.error;
            sqlx::query(
                "INSERT INTO messages (id, service, binding, subject, msg_key, status, attempt, \
                 error_kind, error_code, error_title, error_status, group_id, reason, envelope, \
                 search, parked_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, 'parked', $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15) \
                 ON CONFLICT (id) DO UPDATE SET status = 'parked', attempt = excluded.attempt, \
                 subject = excluded.subject, msg_key = excluded.msg_key, \
                 error_kind = excluded.error_kind, error_code = excluded.error_code, \
                 error_title = excluded.error_title, error_status = excluded.error_status, \
                 group_id = excluded.group_id, reason = excluded.reason, \
                 envelope = excluded.envelope, search = excluded.search, \
                 updated_at = excluded.updated_at",
            )
            .bind(clean(&envelope.id))
            .bind(clean(&envelope.service))
            .bind(clean(&envelope.binding))
            .bind(clean(&envelope.subject))
            .bind(clean_opt(envelope.key.as_deref()))
            .bind(i64::from(envelope.attempt))
            .bind(e.kind.as_str())
            .bind(clean_opt(e.code.as_deref()))
            .bind(clean_opt(e.title.as_deref()))
            .bind(e.status.map(i64::from))
            .bind(clean(&group_id(envelope)))
            .bind(clean_opt(envelope.reason.as_deref()))
            .bind(&text)
            .bind(clean(&search_text(envelope)))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// Takes in announcements in one transaction: each is stored once, and `resolved` moves its
    /// lineage to `resolved` when it is parked or resubmitted at an earlier attempt (or, once
    /// resubmitted, at that attempt). Returns how many were new.
    pub async fn ingest_events(&self, events: &[Event], now: i64) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut new = 0;
        for ev in events {
            let taken = sqlx::query(
                "INSERT INTO events (event_id, message_id, service, kind, attempt, at, rule, source, data) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            )
            .bind(clean(&ev.id))
            .bind(clean(&ev.message_id))
            .bind(clean(&ev.service))
            .bind(clean(&ev.kind))
            .bind(i64::from(ev.attempt))
            .bind(ev.at)
            .bind(clean_opt(ev.rule.as_deref()))
            .bind(clean(&ev.source))
            .bind(clean(&ev.data))
            .execute(&mut *tx)
            .await?;
            if taken.rows_affected() == 0 {
                continue;
            }
            new += 1;
            if ev.kind == "resolved" {
                sqlx::query(
                    "UPDATE messages SET status = 'resolved', updated_at = $3 WHERE id = $1 AND \
                     ((status = 'parked' AND attempt < $2) OR (status = 'resubmitted' AND attempt <= $2))",
                )
                .bind(clean(&ev.message_id))
                .bind(i64::from(ev.attempt))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(new)
    }

    /// Drops announcements older than `before` (epoch ms). Returns how many.
    pub async fn prune_events(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM events WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// One message by its lineage id.
    pub async fn get(&self, id: &str) -> Result<Option<Message>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!("{MESSAGE_COLUMNS} WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| message(&r)).transpose()
    }

    /// A page of messages matching `filter`, newest parking first, after `cursor`.
    pub async fn list(
        &self,
        filter: &Filter,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Page<Message>, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Arg> = Vec::new();
        let mut add = |clause: &str, arg: Arg| {
            args.push(arg);
            clauses.push(clause.replace('?', &format!("${}", args.len())));
        };
        if let Some(status) = filter.status {
            add("status = ?", Arg::Text(status.as_str().to_owned()));
        }
        if let Some(service) = &filter.service {
            add("service = ?", Arg::Text(service.clone()));
        }
        if let Some(subject) = &filter.subject {
            add("subject = ?", Arg::Text(subject.clone()));
        }
        if let Some(code) = &filter.code {
            add("error_code = ?", Arg::Text(code.clone()));
        }
        if let Some(group) = &filter.group {
            add("group_id = ?", Arg::Text(group.clone()));
        }
        if let Some(q) = filter.q.as_deref().filter(|q| !q.trim().is_empty()) {
            add(
                "search LIKE ? ESCAPE '\\'",
                Arg::Text(format!("%{}%", like_escape(&q.trim().to_lowercase()))),
            );
        }
        if let Some(cursor) = cursor {
            add("row_id < ?", Arg::Int(parse_cursor(cursor)?));
        }
        let mut sql = MESSAGE_COLUMNS.to_owned();
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY row_id DESC LIMIT {}", limit + 1));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for arg in args {
            query = match arg {
                Arg::Text(t) => query.bind(t),
                Arg::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        let more = rows.len() > limit as usize;
        let mut items = Vec::with_capacity(rows.len().min(limit as usize));
        let mut last = None;
        for row in rows.iter().take(limit as usize) {
            last = Some(row.try_get::<i64, _>("row_id")?);
            items.push(message(row)?);
        }
        Ok(Page {
            items,
            next_cursor: if more {
                last.map(|r| r.to_string())
            } else {
                None
            },
        })
    }

    /// The message's timeline: stored announcements about `id`, by attempt, then in the order of
    /// the flow (delegated, repaired or parked, resubmitted, resolved, …), then by time.
    pub async fn timeline(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT event_id, message_id, service, kind, attempt, at, rule, source, data FROM events \
             WHERE message_id = $1 ORDER BY at, event_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let mut events = rows
            .iter()
            .map(|r| {
                Ok(Event {
                    id: r.try_get("event_id")?,
                    message_id: r.try_get("message_id")?,
                    service: r.try_get("service")?,
                    kind: r.try_get("kind")?,
                    attempt: to_u32(r.try_get("attempt")?)?,
                    at: r.try_get("at")?,
                    rule: r.try_get("rule")?,
                    source: r.try_get("source")?,
                    data: r.try_get("data")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Components stamp their own clocks: within an attempt, the order of the flow wins.
        events.sort_by_key(|e| (e.attempt, step_rank(&e.kind), e.at));
        Ok(events)
    }

    /// Takes `plan` as the one action on its message (parked at `plan.attempt`) until its outcome
    /// is recorded ([`Store::finish_action`]) or known not to have happened
    /// ([`Store::drop_action`]). Another action taken already is answered, whatever its age.
    pub async fn claim_action(&self, plan: &Plan, now: i64) -> Result<Claim, StoreError> {
        let text = serde_json::to_string(plan)
            .map_err(|e| StoreError::Corrupt(format!("action on {}: {e}", plan.message_id)))?;
        // One statement, which takes the write lock first: two requests at once cannot both see
        // the message free (on SQLite a read-then-write transaction would fail with "locked").
        let taken = sqlx::query(
            "INSERT INTO actions (message_id, started_at, plan) SELECT $1, $2, $3 \
             WHERE EXISTS (SELECT 1 FROM messages WHERE id = $1 AND status = 'parked' \
             AND attempt = $4) ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(&plan.message_id)
        .bind(now)
        .bind(&text)
        .bind(i64::from(plan.attempt))
        .execute(&self.pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(Claim::Taken { started_at: now });
        }
        let mut tx = self.pool.begin().await?;
        if let Some(pending) = pending_action(&mut tx, &plan.message_id).await? {
            return Ok(pending);
        }
        let row = sqlx::query("SELECT status, attempt FROM messages WHERE id = $1")
            .bind(&plan.message_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(Claim::Missing);
        };
        let status: Status = row
            .try_get::<String, _>(0)?
            .parse()
            .map_err(StoreError::Corrupt)?;
        let attempt = u32::try_from(row.try_get::<i64, _>(1)?).unwrap_or(u32::MAX);
        Ok(Claim::Conflict { status, attempt })
    }

    /// Lets go of an action whose publish is known not to have been stored.
    pub async fn drop_action(&self, message_id: &str, started_at: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM actions WHERE message_id = $1 AND started_at = $2")
            .bind(message_id)
            .bind(started_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Actions taken before `before` whose outcome was never recorded (their publish was not
    /// confirmed in time, or the dashboard stopped): each with when it was taken.
    pub async fn stale_actions(&self, before: i64) -> Result<Vec<(Plan, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT plan, started_at FROM actions WHERE started_at < $1 ORDER BY started_at LIMIT 100",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get(0)?;
                let plan = serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("a pending action: {e}")))?;
                Ok((plan, r.try_get(1)?))
            })
            .collect()
    }

    /// Records the outcome of `plan`, whose publish JetStream stored: the message's new status (when
    /// it is still where the action found it), the audit record of what was published, and the end
    /// of the claim, in one transaction. The audit is written even when the message moved on
    /// meanwhile (a retry resolved or failed again before this ran): what was sent was sent.
    pub async fn finish_action(
        &self,
        plan: &Plan,
        started_at: i64,
        now: i64,
    ) -> Result<Changed, StoreError> {
        let id = plan.message_id.as_str();
        let mut tx = self.pool.begin().await?;
        let changed = match (&plan.sent, plan.action.as_str()) {
            (_, "discard") => sqlx::query(
                "UPDATE messages SET status = 'discarded', updated_at = $3 \
                 WHERE id = $1 AND status = 'parked' AND attempt = $2",
            )
            .bind(id)
            .bind(i64::from(plan.attempt))
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            (Some(sent), _) => resubmitted(&mut tx, id, plan.attempt, sent, now).await?,
            (None, other) => {
                return Err(StoreError::Corrupt(format!(
                    "action {other} on {id} has no envelope to record"
                )));
            }
        };
        let audit = Audit {
            actor: &plan.actor,
            action: &plan.action,
            message_id: Some(id),
            service: Some(&plan.service),
            key: plan.key.as_deref(),
            note: plan.note.as_deref(),
            before: plan.before.as_deref(),
            after: plan.after.as_deref(),
        };
        insert_audit(&mut tx, &audit, now).await?;
        sqlx::query("DELETE FROM actions WHERE message_id = $1 AND started_at = $2")
            .bind(id)
            .bind(started_at)
            .execute(&mut *tx)
            .await?;
        let status: Option<String> = sqlx::query("SELECT status FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        tx.commit().await?;
        Ok(match (changed, status) {
            (_, None) => Changed::Missing,
            (0, Some(s)) => Changed::Conflict(s.parse().map_err(StoreError::Corrupt)?),
            _ => Changed::Done,
        })
    }

    /// Records a human action that changed no message row (a hold released, a login).
    pub async fn record(&self, audit: &Audit<'_>, now: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_audit(&mut tx, audit, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A page of the audit log, newest first.
    pub async fn audit(
        &self,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Page<AuditRecord>, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let before = match cursor {
            Some(c) => parse_cursor(c)?,
            None => i64::MAX,
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT row_id, at, actor, action, message_id, service, msg_key, note, before_payload, \
             after_payload FROM audit WHERE row_id < $1 ORDER BY row_id DESC LIMIT {}",
            limit + 1
        )))
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        let more = rows.len() > limit as usize;
        let items = rows
            .iter()
            .take(limit as usize)
            .map(|r| {
                Ok(AuditRecord {
                    seq: r.try_get("row_id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    message_id: r.try_get("message_id")?,
                    service: r.try_get("service")?,
                    key: r.try_get("msg_key")?,
                    note: r.try_get("note")?,
                    before: r.try_get("before_payload")?,
                    after: r.try_get("after_payload")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next_cursor = if more {
            items.last().map(|a| a.seq.to_string())
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    /// The last resubmission of message `id` (`resubmit` or `edit_and_resubmit`) with the payload
    /// before and after its edit (`None` for a resubmission as it was).
    pub async fn last_resubmission(
        &self,
        id: &str,
    ) -> Result<Option<LastResubmission>, StoreError> {
        let row = sqlx::query(
            "SELECT actor, action, before_payload, after_payload FROM audit \
             WHERE message_id = $1 AND action IN ('resubmit', 'edit_and_resubmit') \
             ORDER BY row_id DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let action: String = r.try_get("action")?;
            let before: Option<String> = r.try_get("before_payload")?;
            let after: Option<String> = r.try_get("after_payload")?;
            Ok(LastResubmission {
                actor: r.try_get("actor")?,
                edit: (action == "edit_and_resubmit")
                    .then_some(())
                    .and(before.zip(after)),
            })
        })
        .transpose()
    }

    /// Parked messages grouped by service, subject and error kind, code and title, largest first.
    pub async fn groups(&self) -> Result<Vec<Group>, StoreError> {
        self.largest_groups(i64::MAX).await
    }

    /// The `n` failure groups with the most parked messages (as [`Store::groups`]).
    pub async fn largest_groups(&self, n: i64) -> Result<Vec<Group>, StoreError> {
        let rows = sqlx::query(
            "SELECT group_id, service, subject, error_kind, error_code, error_title, COUNT(*) AS n, \
             MIN(parked_at) AS oldest FROM messages WHERE status = 'parked' \
             GROUP BY group_id, service, subject, error_kind, error_code, error_title \
             ORDER BY n DESC, oldest ASC LIMIT $1",
        )
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Group {
                    id: r.try_get("group_id")?,
                    service: r.try_get("service")?,
                    subject: r.try_get("subject")?,
                    error_kind: r.try_get("error_kind")?,
                    error_code: r.try_get("error_code")?,
                    error_title: r.try_get("error_title")?,
                    count: r.try_get("n")?,
                    oldest_parked_at: r.try_get("oldest")?,
                })
            })
            .collect()
    }

    /// The ids and attempts of a group's parked messages, oldest first.
    pub async fn group_members(&self, group: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, attempt FROM messages WHERE group_id = $1 AND status = 'parked' ORDER BY row_id",
        )
        .bind(group)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, to_u32(r.try_get("attempt")?)?)))
            .collect()
    }

    /// Counts by service and status, the oldest parked message, and rule outcomes since `since`.
    pub async fn overview(&self, since: i64) -> Result<Overview, StoreError> {
        let counts = sqlx::query(
            "SELECT service, status, COUNT(*) AS n FROM messages GROUP BY service, status \
             ORDER BY service, status",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("service")?, r.try_get("status")?, r.try_get("n")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
        let oldest_parked = sqlx::query(
            "SELECT id, parked_at FROM messages WHERE status = 'parked' \
             ORDER BY parked_at ASC, row_id ASC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| Ok::<_, StoreError>((r.try_get("id")?, r.try_get("parked_at")?)))
        .transpose()?;
        let rules = sqlx::query(
            "SELECT rule, kind, COUNT(*) AS n FROM events WHERE rule IS NOT NULL AND at >= $1 \
             GROUP BY rule, kind ORDER BY rule, kind",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("rule")?, r.try_get("kind")?, r.try_get("n")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
        // A repair that failed again: the retry a rule produced (attempt a) was delegated again.
        let failed = sqlx::query(
            "SELECT r.rule AS rule, COUNT(*) AS n FROM events r JOIN events d \
             ON d.message_id = r.message_id AND d.attempt = r.attempt AND d.kind = 'delegated' \
             WHERE r.kind = 'repaired' AND r.rule IS NOT NULL AND r.at >= $1 \
             GROUP BY r.rule ORDER BY r.rule",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let mut rules = rules;
        for r in &failed {
            rules.push((r.try_get("rule")?, "failed".to_owned(), r.try_get("n")?));
        }
        rules.sort();
        Ok(Overview {
            counts,
            oldest_parked,
            rules,
        })
    }

    /// Announcements of the overview's kinds (parked, repaired, resolved, held) since `since`:
    /// (service, kind, hour as epoch milliseconds divided by `HOUR_MS`, count).
    pub async fn hourly(&self, since: i64) -> Result<Vec<(String, String, i64, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT service, kind, at / 3600000 AS hour, COUNT(*) AS n FROM events \
             WHERE kind IN ('parked', 'repaired', 'resolved', 'held') AND at >= $1 \
             GROUP BY service, kind, at / 3600000",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("service")?,
                    r.try_get("kind")?,
                    r.try_get("hour")?,
                    r.try_get("n")?,
                ))
            })
            .collect()
    }

    /// Parkings since `since` of the messages now in `groups` (five at most: more are left out):
    /// (group, hour, count), the hour as in [`Store::hourly`].
    pub async fn group_parkings(
        &self,
        groups: &[String],
        since: i64,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        // Five places, the unused ones bound to "" (no group has an empty id).
        let mut query = sqlx::query(
            "SELECT m.group_id AS group_id, e.at / 3600000 AS hour, COUNT(*) AS n \
             FROM events e JOIN messages m ON m.id = e.message_id \
             WHERE e.kind = 'parked' AND e.at >= $1 AND m.group_id IN ($2, $3, $4, $5, $6) \
             GROUP BY m.group_id, e.at / 3600000",
        )
        .bind(since);
        for i in 0..5 {
            query = query.bind(groups.get(i).cloned().unwrap_or_default());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("group_id")?, r.try_get("hour")?, r.try_get("n")?)))
            .collect()
    }

    /// Stores a session under the SHA-256 of its id.
    pub async fn create_session(&self, id: &str, session: &Session) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sessions (id_hash, username, role, csrf, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(sha256_hex(id))
        .bind(&session.username)
        .bind(&session.role)
        .bind(&session.csrf)
        .bind(session.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The session `id` if it exists and has not expired at `now`.
    pub async fn session(&self, id: &str, now: i64) -> Result<Option<Session>, StoreError> {
        let row = sqlx::query(
            "SELECT username, role, csrf, expires_at FROM sessions WHERE id_hash = $1 AND expires_at > $2",
        )
        .bind(sha256_hex(id))
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Session {
                username: r.try_get("username")?,
                role: r.try_get("role")?,
                csrf: r.try_get("csrf")?,
                expires_at: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    /// Ends the session `id`.
    pub async fn delete_session(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
            .bind(sha256_hex(id))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends every session, with `audit` in the same transaction; how many there were.
    pub async fn end_all_sessions(&self, audit: &Audit<'_>, now: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM sessions")
            .execute(&mut *tx)
            .await?;
        insert_audit(&mut tx, audit, now).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Drops sessions expired at `now`.
    pub async fn prune_sessions(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

const MESSAGE_COLUMNS: &str =
    "SELECT row_id, id, status, attempt, group_id, parked_at, updated_at, envelope FROM messages";

enum Arg {
    Text(String),
    Int(i64),
}

fn message(row: &AnyRow) -> Result<Message, StoreError> {
    let id: String = row.try_get("id")?;
    let text: String = row.try_get("envelope")?;
    let envelope: FailureEnvelope = serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt(format!("the envelope of {id}: {e}")))?;
    let status: String = row.try_get("status")?;
    Ok(Message {
        row_id: row.try_get("row_id")?,
        status: status.parse().map_err(StoreError::Corrupt)?,
        attempt: to_u32(row.try_get("attempt")?)?,
        group_id: row.try_get("group_id")?,
        parked_at: row.try_get("parked_at")?,
        updated_at: row.try_get("updated_at")?,
        envelope,
        id,
    })
}

/// Ends a status change: with its audit record when a row changed, else rolled back with why.
/// The action pending on `message_id`, if any.
async fn pending_action(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    message_id: &str,
) -> Result<Option<Claim>, StoreError> {
    let row = sqlx::query("SELECT plan, started_at FROM actions WHERE message_id = $1")
        .bind(message_id)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| {
        let text: String = r.try_get(0)?;
        let plan = serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("the action pending on {message_id}: {e}")))?;
        Ok(Claim::Pending {
            plan: Box::new(plan),
            started_at: r.try_get(1)?,
        })
    })
    .transpose()
}

/// Moves the message resubmitted at `attempt` on; how many rows changed.
async fn resubmitted(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    attempt: u32,
    sent: &FailureEnvelope,
    now: i64,
) -> Result<u64, StoreError> {
    let text = serde_json::to_string(sent)
        .map_err(|e| StoreError::Corrupt(format!("envelope {id}: {e}")))?;
    // The retry may go through, and its `resolved` be taken in, before this runs.
    let done = sqlx::query(
        "UPDATE messages SET status = CASE WHEN status = 'resolved' THEN 'resolved' \
         ELSE 'resubmitted' END, attempt = $3, updated_at = $4, envelope = $5, search = $6 \
         WHERE id = $1 AND status IN ('parked', 'resolved') AND attempt = $2",
    )
    .bind(id)
    .bind(i64::from(attempt))
    .bind(i64::from(attempt) + 1)
    .bind(now)
    .bind(&text)
    .bind(search_text(sent))
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() > 0 {
        return Ok(done.rows_affected());
    }
    // Or the retry failed again and its new parking was taken in first: the row is at the retry's
    // attempt already (only a resubmission takes a parked message to the next attempt). The
    // resubmission happened all the same; the row keeps what came after it.
    let later = sqlx::query(
        "SELECT attempt FROM messages WHERE id = $1 AND attempt = $2 AND status = 'parked'",
    )
    .bind(id)
    .bind(i64::from(attempt) + 1)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(u64::from(later.is_some()))
}

async fn insert_audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    a: &Audit<'_>,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit (at, actor, action, message_id, service, msg_key, note, before_payload, \
         after_payload) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(now)
    .bind(clean(a.actor))
    .bind(a.action)
    .bind(clean_opt(a.message_id))
    .bind(clean_opt(a.service))
    .bind(clean_opt(a.key))
    .bind(clean_opt(a.note))
    .bind(clean_opt(a.before))
    .bind(clean_opt(a.after))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Where an announcement kind stands in the flow of one attempt.
fn step_rank(kind: &str) -> u8 {
    match kind {
        "delegated" => 0,
        "repaired" => 1,
        "parked" => 2,
        "held" => 3,
        "resubmitted" => 4,
        "discarded" => 5,
        "resolved" => 6,
        "released" => 7,
        _ => 8,
    }
}

fn to_u32(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("attempt {v} out of range")))
}

fn parse_cursor(cursor: &str) -> Result<i64, StoreError> {
    cursor
        .parse::<i64>()
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| StoreError::Corrupt(format!("cursor `{cursor}` is not one this API gave")))
}

/// Whether `e` is a cursor the caller made up (a 400, not a 500).
pub fn is_bad_cursor(e: &StoreError) -> bool {
    matches!(e, StoreError::Corrupt(m) if m.starts_with("cursor "))
}

fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The failure group of an envelope: service, subject and error kind, code and title.
pub fn group_id(envelope: &FailureEnvelope) -> String {
    let e: &FailureError = &envelope.error;
    let mut h = Sha256::new();
    for part in [
        envelope.service.as_str(),
        envelope.subject.as_str(),
        e.kind.as_str(),
        e.code.as_deref().unwrap_or(""),
        e.title.as_deref().unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn search_text(envelope: &FailureEnvelope) -> String {
    let e = &envelope.error;
    let mut text = String::new();
    for part in [
        Some(envelope.subject.as_str()),
        envelope.key.as_deref(),
        e.code.as_deref(),
        e.title.as_deref(),
        e.detail.as_deref(),
        envelope.reason.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        text.push_str(part);
        text.push('\n');
    }
    text.push_str(&envelope.payload.to_string());
    let mut text = text.to_lowercase();
    if text.len() > SEARCH_LIMIT {
        let mut end = SEARCH_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Now, in epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Text as a column can hold it: PostgreSQL refuses a NUL in `TEXT` (the whole insert fails, and a
/// parked message or an announcement would be offered again forever). A NUL is shown as U+FFFD in
/// the columns that list, filter and search; the envelope itself is stored as JSON text, where a
/// NUL is escaped, so what is resubmitted keeps every byte.
fn clean(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

fn clean_opt(text: Option<&str>) -> Option<String> {
    text.map(clean)
}
