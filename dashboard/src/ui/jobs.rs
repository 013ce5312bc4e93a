//! Bulk jobs: their progress (the page refreshes itself while a job runs) and a stop button.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use super::{Nav, can_act, check_csrf, error_page, query_escape, see_other, when};
use crate::app::{ApiError, Shared, WebUser};
use crate::auth::Role;
use crate::jobs::{JobState, Kind, Progress};

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/jobs", get(list))
        .route("/jobs/{id}", get(one))
        .route("/jobs/{id}/stop", get(to_job).post(stop))
}

/// A form's address opened as a page: the page the form is on.
async fn to_job(Path(id): Path<String>) -> Response {
    see_other(&job_url(&id))
}

/// The page of job `id`.
pub fn job_url(id: &str) -> String {
    format!("/jobs/{}", query_escape(id))
}

/// A job as the pages show it.
pub struct JobRow {
    pub id: String,
    pub kind: &'static str,
    pub group: Option<String>,
    pub by: String,
    /// `canary`, `running`, `finished`, `stopped`, `canary_failed`.
    pub state: &'static str,
    /// The state in words.
    pub state_text: &'static str,
    pub total: usize,
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Left parked: the draft the job repaired with first did not repair them.
    pub not_repaired: usize,
    /// done + skipped + failed + not repaired.
    pub handled: usize,
    pub canary: Option<String>,
    pub message: Option<String>,
    /// The message is a problem (a failure, a failed canary), not a remark.
    pub problem: bool,
    pub started: String,
    pub finished: Option<String>,
    pub running: bool,
}

impl JobRow {
    pub fn of(p: &Progress) -> JobRow {
        let (state, state_text) = match p.state {
            JobState::Canary => (
                "canary",
                "canary sent: waiting for its outcome before the rest",
            ),
            JobState::Running => ("running", "running"),
            JobState::Finished => ("finished", "finished"),
            JobState::Stopped => ("stopped", "stopped"),
            JobState::CanaryFailed => ("canary_failed", "canary failed: the rest were not sent"),
        };
        JobRow {
            id: p.id.clone(),
            kind: match p.kind {
                Kind::Resubmit => "resubmit",
                Kind::Discard => "discard",
            },
            group: p.group.clone(),
            by: p.by.clone(),
            state,
            state_text,
            total: p.total,
            done: p.done,
            skipped: p.skipped,
            failed: p.failed,
            not_repaired: p.not_repaired,
            handled: p.done + p.skipped + p.failed + p.not_repaired,
            canary: p.canary.clone(),
            message: p.message.clone(),
            problem: p.failed > 0 || p.state == JobState::CanaryFailed,
            started: when(p.started_at),
            finished: p.finished_at.map(when),
            running: p.finished_at.is_none(),
        }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "jobs.html")]
pub struct JobsPage {
    pub nav: Nav,
    pub jobs: Vec<JobRow>,
    /// Some job is running: the page refreshes itself.
    pub refresh: bool,
}

#[derive(Template, WebTemplate)]
#[template(path = "job.html")]
pub struct JobPage {
    pub nav: Nav,
    pub job: JobRow,
    /// The job is running and the reader may stop it.
    pub can_stop: bool,
}

async fn list(State(s): State<Shared>, WebUser(who): WebUser) -> Response {
    let jobs: Vec<JobRow> = s.jobs.all().iter().map(JobRow::of).collect();
    JobsPage {
        nav: Nav::new(&who, "jobs"),
        refresh: jobs.iter().any(|j| j.running),
        jobs,
    }
    .into_response()
}

#[derive(Deserialize)]
struct DoneQuery {
    done: Option<String>,
}

async fn one(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Query(q): Query<DoneQuery>,
) -> Response {
    let Some(p) = s.jobs.get(&id) else {
        return error_page(
            Some(&who),
            ApiError::not_found(format!(
                "no job {id} (jobs live in the dashboard that started them, until it restarts)"
            )),
            "/jobs",
        );
    };
    let job = JobRow::of(&p);
    JobPage {
        nav: Nav::new(&who, "jobs").with_done(q.done.as_deref()),
        can_stop: job.running && can_act(&who),
        job,
    }
    .into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn stop(
    State(s): State<Shared>,
    WebUser(who): WebUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(page) = check_csrf(&who, &f.csrf) {
        return *page;
    }
    let back = job_url(&id);
    if let Err(e) = who.require(Role::Operator) {
        return error_page(Some(&who), e, &back);
    }
    if !s.jobs.stop(&id) {
        return error_page(
            Some(&who),
            ApiError::not_found(format!("no job {id}")),
            "/jobs",
        );
    }
    tracing::info!(job = id, by = who.name, "Bulk job stop requested.");
    see_other(&format!("{back}?done=stopped"))
}
