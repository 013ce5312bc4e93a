//! Bulk actions on a failure group or a selection (SPEC §9): a resubmission goes canary first (one
//! message, then its outcome is awaited), then the rest at `bulk_rate` per second; a discard goes
//! at that rate at once. Progress can be watched and the job stopped. Jobs live in the dashboard
//! that started them; every message they touch is audited like a single action. A resubmission
//! may repair each message with a draft rule file first (the canary is the first it repairs; what
//! it does not repair stays parked).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use repair_rules::rules::{Decision, Limits, RuleSet, evaluate};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::actions::{self, Edit};
use crate::app::{Principal, Shared};
use crate::store::{Status, now_ms};

/// What a bulk job does to each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Resubmit,
    Discard,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// The canary was resubmitted; its outcome is awaited.
    Canary,
    Running,
    Finished,
    Stopped,
    /// The canary failed again (or had no outcome in time): the rest were not sent.
    CanaryFailed,
}

/// A job's progress, as the API and the UI show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Progress {
    pub id: String,
    pub kind: Kind,
    pub group: Option<String>,
    pub by: String,
    pub state: JobState,
    pub total: usize,
    pub done: usize,
    /// Messages no longer parked when their turn came (someone else acted).
    pub skipped: usize,
    pub failed: usize,
    /// With a draft to repair with first: messages it did not repair (left parked).
    pub not_repaired: usize,
    pub canary: Option<String>,
    /// The last problem, if any.
    pub message: Option<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

struct Job {
    progress: Mutex<Progress>,
    stop: CancellationToken,
}

/// How long a finished job stays listed.
pub const FINISHED_KEPT: Duration = Duration::from_secs(24 * 3600);
/// How many finished jobs stay listed at most.
pub const MAX_FINISHED: usize = 100;

/// The jobs of this dashboard.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

impl Jobs {
    /// The progress of job `id`.
    pub fn get(&self, id: &str) -> Option<Progress> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.get(id).map(|j| snapshot(j))
    }

    /// Every job, newest first.
    pub fn all(&self) -> Vec<Progress> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Progress> = jobs.values().map(|j| snapshot(j)).collect();
        all.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
        all
    }

    /// Adds a job, first forgetting finished jobs that ended more than [`FINISHED_KEPT`] ago and,
    /// beyond [`MAX_FINISHED`], the oldest finished ones: a dashboard that runs for months keeps
    /// a bounded list. Running jobs are always kept.
    fn insert(&self, id: String, job: Arc<Job>, now: i64) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let kept_since = now - i64::try_from(FINISHED_KEPT.as_millis()).unwrap_or(i64::MAX);
        jobs.retain(|_, j| snapshot(j).finished_at.is_none_or(|at| at >= kept_since));
        let mut finished: Vec<(i64, String)> = jobs
            .iter()
            .filter_map(|(id, j)| snapshot(j).finished_at.map(|at| (at, id.clone())))
            .collect();
        if finished.len() > MAX_FINISHED {
            finished.sort();
            let excess = finished.len() - MAX_FINISHED;
            for (_, id) in finished.into_iter().take(excess) {
                jobs.remove(&id);
            }
        }
        jobs.insert(id, job);
    }

    /// Asks job `id` to stop; false if there is no such job.
    pub fn stop(&self, id: &str) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match jobs.get(id) {
            Some(j) => {
                j.stop.cancel();
                true
            }
            None => false,
        }
    }
}

fn snapshot(job: &Job) -> Progress {
    job.progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn update(job: &Job, f: impl FnOnce(&mut Progress)) {
    f(&mut job.progress.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Starts a bulk job over `members` (id, attempt shown), returns its first progress.
pub fn start(
    state: Shared,
    who: Principal,
    kind: Kind,
    group: Option<String>,
    members: Vec<(String, u32)>,
    note: Option<String>,
    repair: Option<Arc<RuleSet>>,
) -> Progress {
    let id = crate::auth::new_secret()[..12].to_owned();
    let progress = Progress {
        id: id.clone(),
        kind,
        group,
        by: who.name.clone(),
        state: if kind == Kind::Resubmit {
            JobState::Canary
        } else {
            JobState::Running
        },
        total: members.len(),
        done: 0,
        skipped: 0,
        failed: 0,
        not_repaired: 0,
        canary: None,
        message: None,
        started_at: now_ms(),
        finished_at: None,
    };
    let job = Arc::new(Job {
        progress: Mutex::new(progress.clone()),
        stop: CancellationToken::new(),
    });
    state.jobs.insert(id, job.clone(), now_ms());
    tokio::spawn(run(state, who, kind, members, note, repair, job));
    progress
}

async fn run(
    state: Shared,
    who: Principal,
    kind: Kind,
    members: Vec<(String, u32)>,
    note: Option<String>,
    repair: Option<Arc<RuleSet>>,
    job: Arc<Job>,
) {
    let rate = state.settings.bulk_rate.max(1);
    let pause = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut rest = members.as_slice();
    // With a draft, the canary is the first message it repairs.
    let mut canary_edit = None;
    if let Some(rules) = &repair {
        while let Some(((id, _), others)) = rest.split_first() {
            match repaired(&state, rules, id, note.as_deref()).await {
                Ok(Some(edit)) => {
                    canary_edit = Some(edit);
                    break;
                }
                Ok(None) => update(&job, |p| p.not_repaired += 1),
                Err(e) => update(&job, |p| {
                    p.failed += 1;
                    p.message = Some(format!("{id}: {}", e.message));
                }),
            }
            rest = others;
        }
        if rest.is_empty() {
            return finish(
                &job,
                JobState::Finished,
                Some("the draft repairs none of the group's messages: nothing was sent".into()),
            );
        }
    }
    if kind == Kind::Resubmit
        && let Some(((canary, attempt), others)) = rest.split_first()
    {
        update(&job, |p| p.canary = Some(canary.clone()));
        let (edit, canary_note) = match canary_edit {
            Some((edit, note)) => (Some(edit), Some(note)),
            None => (None, note.clone()),
        };
        match actions::resubmit(
            &state,
            &who,
            canary,
            Some(*attempt),
            edit,
            canary_note.as_deref(),
        )
        .await
        {
            Ok(_) => {}
            Err(e) => {
                return finish(&job, JobState::CanaryFailed, Some(e.message));
            }
        }
        update(&job, |p| p.done = 1);
        match canary_outcome(&state, canary, *attempt, &job.stop).await {
            Ok(()) => {}
            Err((state, why)) => return finish(&job, state, Some(why)),
        }
        update(&job, |p| p.state = JobState::Running);
        rest = others;
    }
    for (id, attempt) in rest {
        if job.stop.is_cancelled() {
            return finish(&job, JobState::Stopped, None);
        }
        let result = match kind {
            Kind::Resubmit => match &repair {
                Some(rules) => match repaired(&state, rules, id, note.as_deref()).await {
                    Ok(Some((edit, note))) => {
                        actions::resubmit(&state, &who, id, Some(*attempt), Some(edit), Some(&note))
                            .await
                            .map(drop)
                    }
                    Ok(None) => {
                        update(&job, |p| p.not_repaired += 1);
                        continue;
                    }
                    Err(e) => Err(e),
                },
                None => actions::resubmit(&state, &who, id, Some(*attempt), None, note.as_deref())
                    .await
                    .map(drop),
            },
            Kind::Discard => actions::discard(&state, &who, id, Some(*attempt), note.as_deref())
                .await
                .map(drop),
        };
        match result {
            Ok(()) => update(&job, |p| p.done += 1),
            Err(e) if e.status == axum::http::StatusCode::CONFLICT => {
                update(&job, |p| p.skipped += 1)
            }
            Err(e) => update(&job, |p| {
                p.failed += 1;
                p.message = Some(format!("{id}: {}", e.message));
            }),
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = job.stop.cancelled() => return finish(&job, JobState::Stopped, None),
        }
    }
    finish(&job, JobState::Finished, None);
}

/// Message `id` repaired by the draft `rules` (evaluated off the async threads, within the
/// dry-run limit): the edit to resubmit and its note (the rule named, then the person's), or `None`
/// when the draft does not repair it.
async fn repaired(
    state: &Shared,
    rules: &Arc<RuleSet>,
    id: &str,
    note: Option<&str>,
) -> Result<Option<(Edit, String)>, crate::app::ApiError> {
    let m = state
        .store
        .get(id)
        .await?
        .ok_or_else(|| crate::app::ApiError::not_found(format!("no message {id}")))?;
    let rules = rules.clone();
    let decision = tokio::task::spawn_blocking(move || {
        let limits = Limits {
            time_limit: Some(crate::api::DRY_RUN_LIMIT),
            ..Limits::default()
        };
        evaluate(&rules, &m.envelope, &limits)
    })
    .await
    .map_err(|e| crate::app::ApiError::invalid(format!("the draft's evaluation failed: {e}")))?;
    Ok(match decision {
        Decision::Repaired { rule, payload } => {
            let said = match note {
                Some(n) => format!("repaired with the draft rule `{rule}` first; {n}"),
                None => format!("repaired with the draft rule `{rule}` first"),
            };
            Some((Edit::Json(payload), said))
        }
        Decision::Park { .. } => None,
    })
}

/// Waits until the canary is resolved; its failing again, being discarded, the timeout or a stop
/// end the job.
async fn canary_outcome(
    state: &Shared,
    id: &str,
    attempt: u32,
    stop: &CancellationToken,
) -> Result<(), (JobState, String)> {
    let deadline = tokio::time::Instant::now() + state.settings.canary_timeout;
    loop {
        match state.store.get(id).await {
            Ok(Some(m)) => match m.status {
                Status::Resolved => return Ok(()),
                Status::Parked if m.attempt > attempt => {
                    let why = m
                        .envelope
                        .error
                        .title
                        .clone()
                        .or(m.envelope.error.code.clone())
                        .unwrap_or_else(|| "the app failed again".into());
                    return Err((
                        JobState::CanaryFailed,
                        format!("the canary {id} failed again: {why}; the rest were not sent"),
                    ));
                }
                Status::Discarded => {
                    return Err((JobState::Stopped, format!("the canary {id} was discarded")));
                }
                _ => {}
            },
            Ok(None) => {
                return Err((JobState::CanaryFailed, format!("the canary {id} is gone")));
            }
            Err(e) => tracing::warn!(error = %e, "Cannot read the canary's status; retrying."),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err((
                JobState::CanaryFailed,
                format!(
                    "no outcome for the canary {id} within {}s; the rest were not sent",
                    state.settings.canary_timeout.as_secs()
                ),
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.cancelled() => return Err((JobState::Stopped, "stopped while waiting for the canary".into())),
        }
    }
}

fn finish(job: &Job, state: JobState, message: Option<String>) {
    update(job, |p| {
        p.state = state;
        if message.is_some() {
            p.message = message;
        }
        p.finished_at = Some(now_ms());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: usize, started_at: i64, finished_at: Option<i64>) -> Arc<Job> {
        Arc::new(Job {
            progress: Mutex::new(Progress {
                id: format!("j{id}"),
                kind: Kind::Discard,
                group: None,
                by: "alice".into(),
                state: if finished_at.is_some() {
                    JobState::Finished
                } else {
                    JobState::Running
                },
                total: 1,
                done: 1,
                skipped: 0,
                failed: 0,
                not_repaired: 0,
                canary: None,
                message: None,
                started_at,
                finished_at,
            }),
            stop: CancellationToken::new(),
        })
    }

    #[test]
    fn finished_jobs_are_forgotten_by_age_and_count_running_ones_never() {
        let jobs = Jobs::default();
        let day = i64::try_from(FINISHED_KEPT.as_millis()).unwrap();
        let now = 10 * day;
        // An old running job, old finished ones, and more recent finished ones than are kept.
        jobs.insert("running".into(), job(0, 0, None), 0);
        for i in 0..20 {
            jobs.insert(format!("old{i}"), job(i, 0, Some(1)), 1);
        }
        for i in 0..150 {
            let at = now - 1000 + i64::try_from(i).unwrap();
            jobs.insert(format!("new{i}"), job(i, at, Some(at)), at);
        }
        jobs.insert("last".into(), job(999, now, None), now);
        let all = jobs.all();
        assert!(jobs.get("running").is_some(), "running jobs stay");
        assert!(jobs.get("last").is_some());
        assert!(jobs.get("old0").is_none(), "finished a day ago: gone");
        assert_eq!(all.len(), MAX_FINISHED + 2);
        assert!(
            jobs.get("new0").is_none() && jobs.get("new149").is_some(),
            "oldest go first"
        );
    }
}
