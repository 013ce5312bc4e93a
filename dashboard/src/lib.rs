//! mend's dashboard (SPEC §9): ingest of MEND_PARKED and MEND_EVENTS into a sqlx store, the
//! server-rendered web UI and the JSON API, resubmission and control commands.
//!
//! The `mend` binary (crate `mend`) connects to NATS, opens the store and hands both to [`run`].
//! Architecture invariant: this is the only crate that runs SQL.

pub mod actions;
pub mod api;
pub mod app;
pub mod auth;
pub mod backlog;
pub mod drafts;
pub mod holds;
pub mod ingest;
pub mod jobs;
pub mod openapi;
pub mod overview;
pub mod payloads;
pub mod store;
pub mod trace;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio_util::sync::CancellationToken;

pub use app::{RulesSource, Settings, User};

use crate::app::AppState;
use crate::store::{Store, now_ms};

/// What the dashboard is given besides its settings.
pub struct Deps {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub store: Store,
    pub rules: RulesSource,
    /// The ingest's consumers on MEND_PARKED and MEND_EVENTS ([`ingest::bind`]; the caller waits for
    /// JetStream to answer).
    pub consumers: (
        async_nats::jetstream::consumer::PullConsumer,
        async_nats::jetstream::consumer::PullConsumer,
    ),
    /// `/healthz`, `/readyz`, `/metrics`, served on the dashboard's own address.
    pub ops: Router,
}

/// Serves the dashboard and runs its ingest until `shutdown`; then stops taking requests, lets the
/// ingest finish what it holds and returns.
pub async fn run(
    settings: Settings,
    deps: Deps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (parked, events) = deps.consumers;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let local = listener.local_addr()?;
    let state = Arc::new(AppState {
        limiter: auth::LoginLimiter::default(),
        address_limiter: auth::LoginLimiter::new(
            auth::ADDRESS_MAX_FAILURES,
            auth::DEFAULT_WINDOW,
            auth::DEFAULT_MAX_KEYS,
        ),
        password_checks: auth::PasswordChecks::new(settings.login_memory_kib),
        jobs: jobs::Jobs::default(),
        dry_runs: Arc::new(tokio::sync::Semaphore::new(api::DRY_RUNS_IN_FLIGHT)),
        holds: holds::HoldsCache::start(deps.js.clone(), shutdown.clone()),
        store: deps.store.clone(),
        js: deps.js.clone(),
        client: deps.client.clone(),
        rules: deps.rules,
        settings,
    });
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(ingest::parked(parked, deps.store.clone(), shutdown.clone()));
    tasks.spawn(ingest::events(events, deps.store.clone(), shutdown.clone()));
    tasks.spawn({
        let state = state.clone();
        let shutdown = shutdown.clone();
        async move { actions::settle_stale(&state, &shutdown).await }
    });
    tasks.spawn(prune(
        deps.store.clone(),
        state.settings.events_retention,
        shutdown.clone(),
    ));

    let app = match state.settings.ops_listen {
        // Probes and scrapers get their own address; the one people reach has no unauthenticated
        // endpoint but the login page and the OpenAPI document.
        Some(addr) => {
            let ops = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (ops_listen)"))?;
            let ops_local = ops.local_addr()?;
            tracing::info!(listen = %ops_local, "Operations endpoints on http://{ops_local}/.");
            let stop = shutdown.clone();
            let router = deps.ops;
            tasks.spawn(async move {
                let served = axum::serve(ops, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "The operations endpoints failed.");
                }
            });
            with_ops(state.clone(), Router::new())
        }
        None => with_ops(state.clone(), deps.ops),
    };
    tracing::info!(listen = %local, "Dashboard serving on http://{local}/");
    let stop = shutdown.clone();
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await
    .context("the web server failed")?;
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Every route of the dashboard, with its limits and security headers.
pub fn router(state: app::Shared) -> Router {
    with_ops(state, Router::new())
}

/// [`router`] with the operations endpoints (`/healthz`, `/readyz`, `/metrics`) beside it; the
/// limits and security headers cover everything, unknown paths included.
pub fn with_ops(state: app::Shared, ops: Router) -> Router {
    let max_body = state.settings.max_body_bytes;
    api::routes()
        .merge(ui::routes())
        .fallback(ui::not_found)
        .with_state(state.clone())
        .merge(ops)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state, app::security))
}

/// Drops announcements past their retention and expired sessions, hourly.
async fn prune(store: Store, retention: Duration, shutdown: CancellationToken) {
    loop {
        let now = now_ms();
        let before = now - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match store.prune_events(before).await {
            Ok(n) if n > 0 => tracing::info!(dropped = n, "Old announcements dropped."),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "Cannot drop old announcements."),
        }
        if let Err(error) = store.prune_sessions(now).await {
            tracing::warn!(%error, "Cannot drop expired sessions.");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
