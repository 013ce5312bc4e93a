//! `mend dashboard` (SPEC §1, §9): connects to NATS, opens the store, loads the rules for dry-runs,
//! then hands everything to the dashboard crate, which serves the UI, the API and the operations
//! endpoints on one address and runs the ingest.

pub mod config;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mend_dashboard::auth::Role;
use mend_dashboard::store::Store;
use mend_dashboard::{Deps, RulesSource, Settings, User};
use tokio_util::sync::CancellationToken;

use crate::RunError;
use crate::common::rules_live::LiveRules;
use crate::common::{nats, ops, role, telemetry};
use crate::dashboard::config::DashboardConfig;

/// How the dashboard runs: with logins (production) or open to anyone as admin (`mend dev`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Login,
    Open,
}

/// Runs the dashboard until `shutdown`.
pub async fn run(
    config: DashboardConfig,
    access: Access,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    if access == Access::Login && !config.has_credentials() {
        return Err(RunError::Config(anyhow::anyhow!(
            "no [[user]] and no [[api_token]]: nobody could log in, and the dashboard does not run \
             open (only `mend dev` does); add a user with a hash from `mend hash-password`"
        )));
    }
    let tokens = config
        .tokens()
        .map_err(|e| RunError::Config(anyhow::anyhow!("api_token: {e}")))?;
    let metrics = telemetry::metrics().map_err(RunError::Startup)?;
    let rules: RulesSource = match &config.rules {
        Some(path) => {
            let live = Arc::new(
                LiveRules::load(path)
                    .map_err(|e| RunError::Config(anyhow::anyhow!("rules: {e}")))?,
            );
            tokio::spawn({
                let (live, shutdown) = (live.clone(), shutdown.clone());
                async move {
                    if let Err(error) = crate::common::rules_live::watch(live, shutdown).await {
                        tracing::error!(%error, "Cannot watch the rules; changes need a restart.");
                    }
                }
            });
            Arc::new(move || Some(live.get()))
        }
        None => Arc::new(|| None),
    };
    let started =
        role::connect(&config.nats_url, &config.nats, "mend-dashboard", &shutdown).await?;
    let Some((client, js, _epoch)) = started else {
        return Ok(());
    };
    let store = Store::open(&config.database_url)
        .await
        .map_err(|e| RunError::Startup(anyhow::anyhow!("{e}")))?;
    tracing::info!(backend = ?store.backend(), "Store open.");

    // Ready while NATS is connected and the store answers (checked every few seconds).
    let store_ok = Arc::new(AtomicBool::new(true));
    tokio::spawn({
        let (store, ok, shutdown) = (store.clone(), store_ok.clone(), shutdown.clone());
        async move {
            loop {
                let answered = tokio::time::timeout(Duration::from_secs(3), store.ping())
                    .await
                    .is_ok_and(|r| r.is_ok());
                if ok.swap(answered, Ordering::Relaxed) != answered {
                    if answered {
                        tracing::info!("The store answers again.");
                    } else {
                        tracing::warn!("The store does not answer.");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    });
    let ready = {
        let store_ok = store_ok.clone();
        role::readiness(&client, &shutdown, move || {
            if store_ok.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("the store does not answer".into())
            }
        })
    };
    let settings = Settings {
        listen: config.listen,
        ops_listen: config.ops_listen,
        users: config
            .users
            .iter()
            .map(|u| User {
                name: u.name.clone(),
                role: u.role,
                password_hash: u.password_hash.clone(),
            })
            .collect(),
        tokens,
        mask: config.mask.clone(),
        session_ttl: config.session_ttl,
        events_retention: config.events_retention,
        max_body_bytes: config.max_body_bytes,
        bulk_rate: config.bulk_rate,
        canary_timeout: config.canary_timeout,
        login_memory_kib: config.login_memory_mib.saturating_mul(1024),
        trusted_proxies: mend_dashboard::auth::TrustedProxies::parse(&config.trusted_proxies)
            .unwrap_or_default(),
        secure_cookies: config.secure_cookies,
        publish_timeout: config.publish_timeout,
        anonymous: (access == Access::Open).then_some(Role::Admin),
        ack_wait: config.ack_wait,
    };
    let consumers = match nats::when_available(
        "the dashboard's consumers on MEND_PARKED and MEND_EVENTS",
        &shutdown,
        || mend_dashboard::ingest::bind(&js, config.ack_wait),
    )
    .await
    {
        Ok(Some(consumers)) => consumers,
        Ok(None) => return Ok(()),
        Err(e) => return Err(RunError::Startup(e)),
    };
    let deps = Deps {
        client: client.clone(),
        js,
        consumers,
        store: store.clone(),
        rules,
        ops: ops::router(ready, metrics),
    };
    let result = mend_dashboard::run(settings, deps, shutdown).await;
    if let Err(error) = client.flush().await {
        tracing::warn!(%error, "Final flush failed; unsent acks lead to redeliveries.");
    }
    store.close().await;
    tracing::info!("Dashboard stopped.");
    result.map_err(|e| {
        if e.to_string().starts_with("cannot listen") {
            RunError::Startup(e)
        } else {
            RunError::Runtime(e)
        }
    })
}

/// `mend hash-password`: reads a password from standard input (one line; a terminal is not
/// required) and prints its Argon2id hash for `[[user]] password_hash`.
pub fn hash_password() -> std::process::ExitCode {
    use std::io::BufRead as _;
    let mut line = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("mend hash-password: cannot read the password from standard input: {e}");
        return std::process::ExitCode::from(64);
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("mend hash-password: the password is empty (give it on standard input)");
        return std::process::ExitCode::from(64);
    }
    match mend_dashboard::auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mend hash-password: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
