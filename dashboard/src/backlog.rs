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
) -> Result<Value, ApiError> {
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
        return Ok(report.json(None, started));
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
        let spent = report.cut || started.elapsed() >= BUDGET || report.tried >= MOST;
        if cursor.is_none() || spent {
            return Ok(report.json(cursor, started));
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
            if report.tried >= MOST || started.elapsed() >= BUDGET {
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

/// Counts and examples.
#[derive(Debug, Default)]
struct Report {
    tried: usize,
    /// Per outcome (`repaired`, `parked`, `no_rule`, `error`): how many.
    outcomes: BTreeMap<&'static str, usize>,
    /// Per rule: per outcome, how many.
    rules: BTreeMap<String, BTreeMap<&'static str, usize>>,
    examples: BTreeMap<&'static str, Vec<Value>>,
    /// The last page was cut short by the budget.
    cut: bool,
}

impl Report {
    fn add(&mut self, m: &Message, decision: &Decision, masked: &[String]) {
        self.tried += 1;
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
        *self.outcomes.entry(outcome).or_default() += 1;
        if let Some(rule) = rule {
            *self
                .rules
                .entry(rule.clone())
                .or_default()
                .entry(outcome)
                .or_default() += 1;
        }
        let examples = self.examples.entry(outcome).or_default();
        if examples.len() < EXAMPLES {
            examples.push(example(m, decision, masked));
        }
    }

    fn json(self, next_cursor: Option<String>, started: Instant) -> Value {
        let count = |o: &str| self.outcomes.get(o).copied().unwrap_or(0);
        let summary = format!(
            "would repair {} of {}, park {}{}{}",
            count("repaired"),
            self.tried,
            count("parked") + count("no_rule") + count("error"),
            if count("error") > 0 {
                format!(" ({} on a rule error)", count("error"))
            } else {
                String::new()
            },
            if next_cursor.is_some() {
                " so far (more to try: continue with next_cursor)"
            } else {
                ""
            }
        );
        json!({
            "summary": summary,
            "tried": self.tried,
            "outcomes": self.outcomes,
            "rules": self.rules,
            "examples": self.examples,
            "took_ms": started.elapsed().as_millis() as u64,
            "next_cursor": next_cursor,
        })
    }
}

/// One example: the message, what decided it, and for a repair the payload's changes (masked as
/// the caller sees the message).
fn example(m: &Message, decision: &Decision, masked: &[String]) -> Value {
    let mut before = m.envelope.payload.clone();
    match decision {
        Decision::Repaired { rule, payload } => {
            let mut after = payload.clone();
            mask(&mut before, masked);
            mask(&mut after, masked);
            let changes: Vec<Value> = repair_rules::rules::draft::changes(&before, &after)
                .into_iter()
                .map(|(path, b, a)| json!({"path": path, "before": b, "after": a}))
                .collect();
            let mut v = json!({"id": m.id, "rule": rule, "changes": changes});
            crate::auth::redact(
                &mut v,
                &crate::auth::masked_values(&m.envelope.payload, masked),
            );
            v
        }
        Decision::Park {
            rule,
            reason,
            message,
        } => {
            let mut v =
                json!({"id": m.id, "rule": rule, "reason": reason.as_str(), "message": message});
            crate::auth::redact(
                &mut v,
                &crate::auth::masked_values(&m.envelope.payload, masked),
            );
            v
        }
    }
}
