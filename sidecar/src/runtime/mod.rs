//! `mend sidecar`: start-up (connect, create mend's layout, check the app streams), the operations
//! endpoint, the routers of retries and commands, one supervisor per binding, and graceful shutdown.
//!
//! One sidecar at a time consumes a (binding, partition) (SPEC §7). A binding's supervisor takes
//! the lease (`lease.rs`) before it pulls anything or loads a hold; then it binds the binding's
//! consumer, loads its holds and runs its dispatcher (`consume::run`) until shutdown or until the
//! lease is lost. On a lost lease the dispatcher stops at once (queued messages are handed back,
//! in-flight ones get at most a quarter of the lease's ttl) and the supervisor waits for the lease
//! again. `/readyz` answers ready only while every binding consumes here.
//!
//! Modules: [`supervise`] (a binding's lease and dispatcher), [`dispatch`] (the dispatcher and its
//! stages), [`router`] (retries and commands to their binding), [`holds`] (hold entries and queues
//! in NATS), [`deliver`] and [`headers`] (the app's HTTP contract), [`circuit`], [`lanes`],
//! [`rescue`], [`ready`], [`app_stream`], [`config`].

pub mod app_stream;
pub mod batcher;
pub mod circuit;
pub mod config;
pub mod deliver;
pub mod dispatch;
pub mod headers;
pub mod holds;
pub mod lanes;
pub mod ready;
pub mod rescue;
pub mod router;
pub mod supervise;

use crate::RunError;
use crate::common::{nats, ops, role, telemetry};
use crate::runtime::config::{BindingConfig, SidecarConfig};
use crate::runtime::deliver::App;
use anyhow::Context as _;
use app_stream::check_app_stream;
use ready::Phases;
use router::{Dispatchers, Router};
use std::sync::Arc;
use supervise::{Shared, owner, supervise};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Runs the sidecar until `shutdown` is cancelled, then shuts down gracefully.
pub async fn run(config: SidecarConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let metrics = telemetry::metrics().map_err(RunError::Startup)?;
    let name = format!("mend-sidecar-{}", config.service);
    let started = role::connect(&config.nats_url, &config.nats, &name, &shutdown).await?;
    let Some((client, js, epoch)) = started else {
        return Ok(());
    };

    // What can be checked before any lease: the app streams exist and fit the partitions, and each
    // binding's HTTP client can be built.
    let mut apps = Vec::new();
    for binding in &config.bindings {
        if check_app_stream(&js, binding, &shutdown).await?.is_none() {
            return Ok(());
        }
        apps.push(
            App::new(binding)
                .context("cannot build the HTTP client")
                .map_err(RunError::Startup)?,
        );
    }

    let phases = Arc::new(Phases::new(&config));
    let ready = {
        let phases = phases.clone();
        role::readiness(&client, &shutdown, move || phases.ready())
    };
    // The operations endpoint outlives the dispatchers, so probes see "shutting down" while they drain.
    let endpoint = ops::serve(config.listen, ready, metrics)
        .await
        .map_err(RunError::Startup)?;

    // Retries (repairs, resubmissions) and commands of every binding come on shared consumers and
    // are routed; with partitioned bindings, also on this instance's partition's own consumers.
    let total_slots: usize = config.bindings.iter().map(|b| b.concurrency).sum();
    let retry_ack_wait = config
        .bindings
        .iter()
        .map(|b| b.ack_wait)
        .max()
        .unwrap_or_default();
    let dispatchers = Arc::new(Dispatchers::new(config.bindings.len()));
    let router = Arc::new(Router {
        service: config.service.clone(),
        bindings: config.bindings.clone(),
        partition: config.partition,
        client: client.clone(),
        js: js.clone(),
        epoch: epoch.clone(),
        shutdown: shutdown.clone(),
        ack_wait: retry_ack_wait,
        dispatchers: dispatchers.clone(),
    });
    let mut inboxes = vec![None];
    if config.bindings.iter().any(BindingConfig::is_partitioned) {
        inboxes.push(Some(config.partition));
    }
    for partition in inboxes {
        let bound = nats::when_available("the retry and control consumers", &shutdown, || async {
            let retries = router::bind(
                &js,
                &config.service,
                partition,
                total_slots * 4,
                retry_ack_wait,
            )
            .await?;
            let commands =
                router::bind_control(&js, &config.service, partition, retry_ack_wait).await?;
            Ok((retries, commands))
        })
        .await
        .map_err(RunError::Startup)?;
        let Some((retries, commands)) = bound else {
            endpoint.stop().await;
            return Ok(());
        };
        tokio::spawn(router::route(router.clone(), retries));
        tokio::spawn(router::route_control(router.clone(), commands));
    }

    let shared = Arc::new(Shared {
        nats_url: config.nats_url.clone(),
        nats: config.nats.clone(),
        service: config.service.clone(),
        owner: owner(),
        lease_ttl: config.lease_ttl,
        shutdown_timeout: config.shutdown_timeout,
        partition: config.partition,
        listen: config.listen,
        client: client.clone(),
        js,
        epoch,
        shutdown: shutdown.clone(),
        dispatchers,
        phases,
    });
    let mut supervisors = tokio::task::JoinSet::new();
    for (i, (binding, app)) in config.bindings.iter().zip(apps).enumerate() {
        let partition = binding.partition_for(config.partition);
        let span = tracing::info_span!("binding", binding = %binding.name, partition);
        supervisors.spawn(
            supervise(shared.clone(), i, binding.for_partition(partition), app).instrument(span),
        );
    }
    tracing::info!(service = %config.service, owner = %shared.owner, partition = config.partition,
        bindings = config.bindings.len(), "Sidecar started; taking the leases of its bindings.");

    let mut failure = None;
    while let Some(result) = supervisors.join_next().await {
        // A supervisor only ends on shutdown; anything else stops the sidecar.
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => {
                RunError::Runtime(anyhow::Error::new(e).context("a binding's supervisor panicked"))
            }
        };
        tracing::error!(error = %error, "Binding stopped; shutting down.");
        shutdown.cancel();
        failure.get_or_insert(error);
    }
    shutdown.cancel();
    if let Err(error) = client.flush().await {
        tracing::warn!(%error, "Final flush failed; unsent acks lead to redeliveries.");
    }
    endpoint.stop().await;
    tracing::info!("Sidecar stopped.");
    failure.map_or(Ok(()), Err)
}
