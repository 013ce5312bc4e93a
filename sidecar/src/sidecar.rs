//! `mend sidecar`: start-up (connect, create mend's layout, bind one durable consumer per binding),
//! the operations endpoint, the dispatchers, and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, stream};
use tokio_util::sync::CancellationToken;

use crate::config::{BindingConfig, SidecarConfig};
use crate::consume::{self, BindingMetrics, BindingRuntime};
use crate::deliver::App;
use crate::{RunError, circuit::Circuit, health, nats, telemetry};

/// Runs the sidecar until `shutdown` is cancelled, then shuts down gracefully.
pub async fn run(config: SidecarConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let metrics = telemetry::metrics().map_err(RunError::Startup)?;
    let (client, js, epoch) = nats::start(
        &config.nats_url,
        &config.nats,
        &format!("mend-sidecar-{}", config.service),
    )
    .await
    .map_err(|e| RunError::Startup(e.into()))?;

    let mut consumers = Vec::new();
    for binding in &config.bindings {
        let consumer = bind(&js, &config.service, binding)
            .await
            .map_err(RunError::Startup)?;
        consumers.push(consumer);
    }

    let bound = Arc::new(AtomicUsize::new(0));
    let ready: health::ReadyCheck = {
        let client = client.clone();
        let bound = bound.clone();
        let total = config.bindings.len();
        let shutdown = shutdown.clone();
        Arc::new(move || {
            if shutdown.is_cancelled() {
                return Err("shutting down".into());
            }
            if client.connection_state() != State::Connected {
                return Err("NATS is not connected".into());
            }
            let n = bound.load(Ordering::Acquire);
            if n < total {
                return Err(format!("{n} of {total} bindings consuming"));
            }
            Ok(())
        })
    };
    // The operations endpoint outlives the dispatchers, so probes see "shutting down" while they drain.
    let ops = health::serve(config.listen, ready, metrics)
        .await
        .map_err(RunError::Startup)?;

    // Retries (repairs, resubmissions) of every binding come on one consumer and are routed.
    let total_slots: usize = config.bindings.iter().map(|b| b.concurrency).sum();
    let retry_ack_wait = config
        .bindings
        .iter()
        .map(|b| b.ack_wait)
        .max()
        .unwrap_or_default();
    let retry_consumer = crate::retry::bind(&js, &config.service, total_slots * 4, retry_ack_wait)
        .await
        .map_err(RunError::Startup)?;
    let (retry_tx, mut retry_rx): (Vec<_>, Vec<_>) = config
        .bindings
        .iter()
        .map(|b| tokio::sync::mpsc::channel(b.concurrency * 4))
        .map(|(tx, rx)| (tx, Some(rx)))
        .unzip();
    let control_consumer = crate::retry::bind_control(&js, &config.service, retry_ack_wait)
        .await
        .map_err(RunError::Startup)?;
    let router = Arc::new(crate::retry::Router {
        service: config.service.clone(),
        bindings: config.bindings.clone(),
        client: client.clone(),
        js: js.clone(),
        epoch: epoch.clone(),
        shutdown: shutdown.clone(),
        ack_wait: retry_ack_wait,
    });
    tokio::spawn(crate::retry::route_control(
        router.clone(),
        control_consumer,
        retry_tx.clone(),
    ));
    tokio::spawn(crate::retry::route(router, retry_consumer, retry_tx));

    let mut dispatchers = tokio::task::JoinSet::new();
    for (i, (binding, consumer)) in config.bindings.iter().zip(consumers).enumerate() {
        let metrics = BindingMetrics::new(&config.service, &binding.name);
        let circuit = Circuit::new(metrics.circuit.clone());
        let holds = match binding.key {
            Some(_) => Some(
                crate::holds::Holds::load(&js, &config.service, &binding.name, &shutdown)
                    .await
                    .with_context(|| format!("binding {}: cannot load its holds", binding.name))
                    .map_err(RunError::Startup)?,
            ),
            None => None,
        };
        let rt = Arc::new(BindingRuntime {
            service: config.service.clone(),
            cfg: binding.clone(),
            app: App::new(binding)
                .context("cannot build the HTTP client")
                .map_err(RunError::Startup)?,
            fixed_headers: crate::headers::BindingHeaders::new(&config.service, &binding.stream),
            client: client.clone(),
            js: js.clone(),
            epoch: epoch.clone(),
            circuit,
            shutdown: shutdown.clone(),
            shutdown_timeout: config.shutdown_timeout,
            metrics,
            holds,
        });
        tokio::spawn(consume::watch_consumer(rt.clone(), consumer.clone()));
        let name = binding.name.clone();
        let retries = retry_rx[i].take();
        dispatchers.spawn(async move {
            consume::run(rt, consumer, retries).await;
            name
        });
        bound.fetch_add(1, Ordering::AcqRel);
    }
    tracing::info!(service = %config.service, listen = %config.listen,
        bindings = config.bindings.len(), "Sidecar consuming.");

    let mut failure = None;
    while let Some(result) = dispatchers.join_next().await {
        // A dispatcher only ends on shutdown; anything else is a panic.
        let error = match result {
            Ok(_) => continue,
            Err(e) => anyhow::Error::new(e).context("a binding's dispatcher panicked"),
        };
        tracing::error!(
            error = format!("{error:#}"),
            "Binding stopped; shutting down."
        );
        bound.fetch_sub(1, Ordering::AcqRel);
        shutdown.cancel();
        failure.get_or_insert(error);
    }
    shutdown.cancel();
    if let Err(error) = client.flush().await {
        tracing::warn!(%error, "Final flush failed; unsent acks lead to redeliveries.");
    }
    ops.stop().await;
    tracing::info!("Sidecar stopped.");
    failure.map_or(Ok(()), |e| Err(RunError::Runtime(e)))
}

/// Creates or updates the binding's durable pull consumer on the app's stream.
async fn bind(
    js: &jetstream::Context,
    service: &str,
    b: &BindingConfig,
) -> anyhow::Result<consumer::PullConsumer> {
    let app_stream: stream::Stream = js.get_stream(&b.stream).await.with_context(|| {
        format!(
            "binding {}: the app stream {} does not exist or cannot be read (mend never creates the app's streams)",
            b.name, b.stream
        )
    })?;
    let name = b.consumer_name(service);
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        description: Some(format!("mend sidecar of {service}, binding {}", b.name)),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: b.ack_wait,
        max_ack_pending: BindingRuntime::max_ack_pending(b) as i64,
        filter_subjects: if b.subjects.len() > 1 {
            b.subjects.clone()
        } else {
            Vec::new()
        },
        filter_subject: if b.subjects.len() == 1 {
            b.subjects[0].clone()
        } else {
            String::new()
        },
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = app_stream.create_consumer(config).await.with_context(|| {
        format!(
            "binding {}: cannot create consumer {name} on {}",
            b.name, b.stream
        )
    })?;
    Ok(consumer)
}
