//! Dry-runs at scale (SPEC §9 "a rule from a fix"): the loaded rules or a draft tried on one parked
//! message, its failure group, or the whole parked backlog (optionally of one service), before
//! anyone ships or resubmits anything. The answer counts the outcomes and the rules that decided
//! them ("would repair 37 of 40, park 3"), with a few examples of each outcome (a repaired one with
//! its payload's changes).
//!
//! Bounded: one request reads the backlog a page at a time, in the store's list order, and stops
//! after [`BUDGET`] or [`MOST`] messages; the answer's `next_cursor` continues where it stopped.
//! The rules run off the async threads, a page per blocking task holding one of the dashboard's
//! dry-run places, each evaluation stopping itself at [`DRY_RUN_LIMIT`]. The store's reads do not
//! wait for the ingest's writes (SQLite in WAL mode, PostgreSQL's MVCC), so ingest goes on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use repair_rules::rules::{Decision, Limits, ParkReason, RuleSet, evaluate};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{DRY_RUN_LIMIT, masked_for};
use crate::app::{ApiError, Principal, Shared};
use crate::auth::mask;
use crate::store::{Filter, MAX_PAGE, Message, Status};

/// How long one request tries rules, at most (the page under way finishes its evaluation).
pub const BUDGET: Duration = Duration::from_secs(5);
/// Messages one request tries, at most.
pub const MOST: usize = 5_000;
/// Examples kept per outcome.
pub const EXAMPLES: usize = 3;

/// Where to try the rules.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub message: Option<String>,
    pub group: Option<String>,
    pub service: Option<String>,
}

/// What the rules decide over `scope`, from `cursor` on; see the module's description.
pub async fn try_rules(
    s: &Shared,
    who: &Principal,
    rules: Arc<RuleSet>,
    scope: &Scope,
    cursor: Option<String>,
) -> Result<Answer, ApiError> {
    let masked = masked_for(s, who).to_vec();
    let mut report = Report::default();
    let started = Instant::now();
    if let Some(id) = &scope.message {
        let m = s
            .store
            .get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
        let (report, _) = evaluate_page(s, rules, vec![m], masked, report, started).await?;
        return Ok(report.finish(None, started));
    }
    let filter = Filter {
        status: Some(Status::Parked),
        service: scope.service.clone(),
        group: scope.group.clone(),
        ..Default::default()
    };
    let mut cursor = cursor;
    loop {
        let page = s.store.list(&filter, MAX_PAGE, cursor.as_deref()).await?;
        let (next, items) = (page.next_cursor, page.items);
        // A list continues below a row: from this page's first row on is `first + 1`.
        let first = items.first().map(|m| m.row_id.saturating_add(1));
        let (r, last) =
            evaluate_page(s, rules.clone(), items, masked.clone(), report, started).await?;
        report = r;
        cursor = if report.cut {
            // Cut short inside the page: continue after the last one tried.
            last.or(first).map(|row| row.to_string())
        } else {
            next
        };
        let spent = report.cut || started.elapsed() >= BUDGET || report.answer.tried >= MOST;
        if cursor.is_none() || spent {
            return Ok(report.finish(cursor, started));
        }
    }
}

/// Evaluates `items` in one blocking task holding a dry-run place, until the budget is spent
/// (`cut`); the report, and the row of the last message tried.
async fn evaluate_page(
    s: &Shared,
    rules: Arc<RuleSet>,
    items: Vec<Message>,
    masked: Vec<String>,
    mut report: Report,
    started: Instant,
) -> Result<(Report, Option<i64>), ApiError> {
    let wait = DRY_RUN_LIMIT.saturating_mul(2);
    let Ok(Ok(place)) = tokio::time::timeout(wait, s.dry_runs.clone().acquire_owned()).await else {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "other dry-runs hold every place; try again",
        ));
    };
    let task = tokio::task::spawn_blocking(move || {
        let limits = Limits {
            time_limit: Some(DRY_RUN_LIMIT),
            ..Limits::default()
        };
        report.cut = false;
        let mut last = None;
        for m in &items {
            if report.answer.tried >= MOST || started.elapsed() >= BUDGET {
                report.cut = true;
                break;
            }
            let decision = evaluate(&rules, &m.envelope, &limits);
            report.add(m, &decision, &masked);
            last = Some(m.row_id);
        }
        drop(place);
        (report, last)
    });
    task.await
        .map_err(|e| ApiError::invalid(format!("the dry-run failed: {e}")))
}

/// Counts and examples, as the API answers them (`POST /api/rules/try`); the rules page shows it
/// and `mend rules try --dashboard` reads and sums it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Answer {
    /// "would repair 37 of 40, park 3"
    pub summary: String,
    pub tried: usize,
    /// Per outcome (`repaired`, `parked`, `no_rule`, `error`): how many.
    pub outcomes: BTreeMap<String, usize>,
    /// Per rule: per outcome, how many.
    pub rules: BTreeMap<String, BTreeMap<String, usize>>,
    /// A few per outcome.
    pub examples: BTreeMap<String, Vec<Example>>,
    pub took_ms: u64,
    /// Where the next request goes on, if the bound stopped this one.
    pub next_cursor: Option<String>,
}

/// One example of an outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Example {
    pub id: String,
    pub rule: Option<String>,
    /// A repair: what it changed, by JSON Pointer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<Change>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One place a repair changed (`None`: absent on that side).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    pub path: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

impl Example {
    /// In words: `by rule: /a: "x" → 1; …`, or the park message.
    pub fn describe(&self) -> String {
        match &self.changes {
            Some(changes) => {
                let parts: Vec<String> = changes
                    .iter()
                    .map(|c| {
                        let show = |v: &Option<Value>| {
                            v.as_ref().map_or("(absent)".to_owned(), Value::to_string)
                        };
                        format!("{}: {} → {}", c.path, show(&c.before), show(&c.after))
                    })
                    .collect();
                format!(
                    "by {}: {}",
                    self.rule.as_deref().unwrap_or("?"),
                    parts.join("; ")
                )
            }
            None => self.message.clone().unwrap_or_default(),
        }
    }
}

impl Answer {
    /// Adds a later answer of the same try (its counts, examples up to [`EXAMPLES`], its cursor).
    pub fn merge(&mut self, later: Answer) {
        self.tried += later.tried;
        for (o, n) in later.outcomes {
            *self.outcomes.entry(o).or_default() += n;
        }
        for (rule, per) in later.rules {
            let mine = self.rules.entry(rule).or_default();
            for (o, n) in per {
                *mine.entry(o).or_default() += n;
            }
        }
        for (o, list) in later.examples {
            let mine = self.examples.entry(o).or_default();
            let room = EXAMPLES.saturating_sub(mine.len());
            mine.extend(list.into_iter().take(room));
        }
        self.took_ms += later.took_ms;
        self.next_cursor = later.next_cursor;
        self.summary = self.summarise();
    }

    fn count(&self, outcome: &str) -> usize {
        self.outcomes.get(outcome).copied().unwrap_or(0)
    }

    fn summarise(&self) -> String {
        let errors = self.count("error");
        format!(
            "would repair {} of {}, park {}{}{}",
            self.count("repaired"),
            self.tried,
            self.tried - self.count("repaired"),
            if errors > 0 {
                format!(" ({errors} on a rule error)")
            } else {
                String::new()
            },
            if self.next_cursor.is_some() {
                " so far (more to try: continue with next_cursor)"
            } else {
                ""
            }
        )
    }
}

/// Counts and examples being gathered.
#[derive(Debug, Default)]
struct Report {
    answer: Answer,
    /// The last page was cut short by the budget.
    cut: bool,
}

impl Report {
    fn add(&mut self, m: &Message, decision: &Decision, masked: &[String]) {
        let a = &mut self.answer;
        a.tried += 1;
        let (outcome, rule) = match decision {
            Decision::Repaired { rule, .. } => ("repaired", Some(rule)),
            Decision::Park { rule, reason, .. } => (
                match reason {
                    ParkReason::NoRule => "no_rule",
                    ParkReason::RuleError => "error",
                    // A rule's `park`, or a limit (repairs, size) that parks it whatever the rules.
                    _ => "parked",
                },
                rule.as_ref(),
            ),
        };
        *a.outcomes.entry(outcome.to_owned()).or_default() += 1;
        if let Some(rule) = rule {
            *a.rules
                .entry(rule.clone())
                .or_default()
                .entry(outcome.to_owned())
                .or_default() += 1;
        }
        let examples = a.examples.entry(outcome.to_owned()).or_default();
        if examples.len() < EXAMPLES {
            examples.push(example(m, decision, masked));
        }
    }

    fn finish(self, next_cursor: Option<String>, started: Instant) -> Answer {
        let mut a = self.answer;
        a.next_cursor = next_cursor;
        a.took_ms = started.elapsed().as_millis() as u64;
        a.summary = a.summarise();
        a
    }
}

/// One example: the message, what decided it, and for a repair the payload's changes (masked as
/// the caller sees the message).
fn example(m: &Message, decision: &Decision, masked: &[String]) -> Example {
    let mut v = match decision {
        Decision::Repaired { rule, payload } => {
            let (mut before, mut after) = (m.envelope.payload.clone(), payload.clone());
            mask(&mut before, masked);
            mask(&mut after, masked);
            let changes: Vec<Value> = repair_rules::rules::draft::changes(&before, &after)
                .into_iter()
                .map(|(path, b, a)| json!({"path": path, "before": b, "after": a}))
                .collect();
            json!({"id": m.id, "rule": rule, "changes": changes})
        }
        Decision::Park {
            rule,
            reason,
            message,
        } => json!({"id": m.id, "rule": rule, "reason": reason.as_str(), "message": message}),
    };
    // What a masked field holds, wherever else it shows (a rule's message, a copied value).
    crate::auth::redact(
        &mut v,
        &crate::auth::masked_values(&m.envelope.payload, masked),
    );
    serde_json::from_value(v).unwrap_or_else(|_| Example {
        id: m.id.clone(),
        rule: None,
        changes: None,
        reason: None,
        message: None,
    })
}
