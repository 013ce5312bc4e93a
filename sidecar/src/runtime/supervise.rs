//! One supervisor per binding: it takes the binding's lease before it pulls anything or loads a
//! hold, then binds the binding's consumer, loads its holds and runs its dispatcher until shutdown
//! or until the lease is lost. On a lost lease the dispatcher stops at once (queued messages are
//! handed back, in-flight ones get at most a quarter of the lease's ttl) and the supervisor waits
//! for the lease again.

use crate::RunError;
use crate::common::lease::{Lease, Stopped};
use crate::common::nats;
use crate::runtime::circuit::Circuit;
use crate::runtime::config::BindingConfig;
use crate::runtime::deliver::App;
use crate::runtime::dispatch;
use crate::runtime::dispatch::binding::{BindingMetrics, BindingRuntime};
use crate::runtime::router::Dispatchers;
use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::stream::ConsumerErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ready::*;

/// What every binding's supervisor shares.
pub(crate) struct Shared {
    pub(crate) nats_url: String,
    pub(crate) nats: crate::common::config::NatsConfig,
    pub(crate) service: String,
    /// Names this instance in the leases it holds: host and process id.
    pub(crate) owner: String,
    pub(crate) lease_ttl: Duration,
    pub(crate) shutdown_timeout: Duration,
    /// This instance's partition index.
    pub(crate) partition: u32,
    pub(crate) listen: SocketAddr,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) epoch: crate::common::ack::Epoch,
    /// The sidecar's shutdown (SIGTERM).
    pub(crate) shutdown: CancellationToken,
    pub(crate) dispatchers: Arc<Dispatchers>,
    pub(crate) phases: Arc<Phases>,
}

/// How one binding's supervision ended a turn of consuming.
pub(crate) enum Turn {
    /// The sidecar shuts down.
    Shutdown,
    /// The lease was lost: wait for it again.
    Lost,
    /// The dispatcher stopped by itself (another instance changed the binding's holds): give the
    /// lease up, pause, and take it again with freshly loaded holds.
    StoppedItself,
}

/// Runs binding `i` (`cfg` as this instance's partition consumes it) for as long as the sidecar
/// runs: take the lease, consume, and after a lost lease take it again. Returns an error only for
/// what the sidecar cannot go on with.
pub(crate) async fn supervise(
    sh: Arc<Shared>,
    i: usize,
    cfg: BindingConfig,
    app: App,
) -> Result<(), RunError> {
    let partition = cfg.partition_for(sh.partition);
    let mut pause = None;
    let mut first = true;
    // The lease this instance lost by running out (not by being taken): taken back at once if
    // nobody wrote it since.
    let mut reclaim = None;
    loop {
        sh.phases.set(i, Phase::Waiting { holder: None });
        if let Some(pause) = pause.take() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = sh.shutdown.cancelled() => return Ok(()),
            }
        }
        let phases = sh.phases.clone();
        let mut noting = move |holder: &str| {
            phases.set(
                i,
                Phase::Waiting {
                    holder: Some(holder.to_owned()),
                },
            );
        };
        let lease = match Lease::acquire_noting(
            &sh.js,
            &sh.service,
            &cfg.name,
            partition,
            &sh.owner,
            sh.lease_ttl,
            &sh.shutdown,
            &mut noting,
            reclaim.take(),
        )
        .await
        {
            Ok(lease) => lease,
            Err(Stopped) => return Ok(()),
        };
        sh.phases.set(i, Phase::Starting);
        let lost = lease.lost();
        // The binding's own shutdown: the sidecar's, or the lease's loss.
        let run = sh.shutdown.child_token();
        tokio::spawn({
            let (lost, run) = (lost.clone(), run.clone());
            async move {
                tokio::select! {
                    _ = lost.cancelled() => run.cancel(),
                    _ = run.cancelled() => {}
                }
            }
        });
        let consumed = consume_while_owned(&sh, i, &cfg, &app, &run, &lost, first).await;
        first = false;
        run.cancel();
        sh.dispatchers.close(i);
        let turn = match consumed {
            Ok(()) if sh.shutdown.is_cancelled() => Turn::Shutdown,
            Ok(()) if lost.is_cancelled() => Turn::Lost,
            Ok(()) => Turn::StoppedItself,
            Err(error) => {
                lease.release().await;
                return Err(error);
            }
        };
        match turn {
            Turn::Shutdown => {
                lease.release().await;
                return Ok(());
            }
            Turn::Lost => {
                tracing::error!(
                    "Lease lost: this instance stopped consuming the binding; waiting for the lease again."
                );
                reclaim = lease.expired().await;
            }
            Turn::StoppedItself => {
                tracing::error!(
                    pause = %humantime::format_duration(sh.lease_ttl),
                    "The binding stopped by itself; giving its lease up, then taking it again."
                );
                lease.release().await;
                pause = Some(sh.lease_ttl);
            }
        }
    }
}

/// One turn of consuming while the lease is held: bind the consumer, load the holds, run the
/// dispatcher until `run` is cancelled. `Ok` when the turn ended (the caller tells why); `Err` when
/// the binding cannot be consumed at all (`first`: this is the sidecar's first turn, so its start).
pub(crate) async fn consume_while_owned(
    sh: &Shared,
    i: usize,
    cfg: &BindingConfig,
    app: &App,
    run: &CancellationToken,
    lost: &CancellationToken,
    first: bool,
) -> Result<(), RunError> {
    let partition = cfg.partition_for(sh.partition);
    let Some(consumer) = bind(sh, cfg, partition, run, first).await? else {
        return Ok(());
    };
    let holds = match cfg.key {
        Some(_) => match load_holds(sh, cfg, run).await {
            Some(holds) => Some(holds),
            None => return Ok(()),
        },
        None => None,
    };
    let metrics = BindingMetrics::new(&sh.service, &cfg.name);
    let circuit = Circuit::new(metrics.circuit.clone());
    let rt = Arc::new(BindingRuntime {
        service: sh.service.clone(),
        cfg: cfg.clone(),
        app: app.clone(),
        fixed_headers: crate::runtime::headers::BindingHeaders::new(&sh.service, &cfg.stream),
        client: sh.client.clone(),
        js: sh.js.clone(),
        epoch: sh.epoch.clone(),
        circuit,
        shutdown: run.clone(),
        shutdown_timeout: sh.shutdown_timeout,
        connector: Arc::new(nats::Connector {
            url: sh.nats_url.clone(),
            cfg: sh.nats.clone(),
            name: format!("mend-sidecar-{}-{}-pull", sh.service, cfg.name),
        }),
        metrics,
        holds,
        batcher: cfg.batch.map(|b| {
            let metrics = crate::runtime::batcher::BatchMetrics::new(&sh.service, &cfg.name);
            let keyed = cfg.key.is_some();
            crate::runtime::batcher::Batcher::start(app.clone(), b, cfg.concurrency, keyed, metrics)
        }),
    });
    let (to_dispatcher, routed) = mpsc::channel(cfg.concurrency * 4);
    tokio::spawn(dispatch::chores::watch_consumer(rt.clone(), consumer.clone()).in_current_span());
    let mut dispatcher = tokio::spawn(dispatch::run(rt, consumer, Some(routed)).in_current_span());
    sh.dispatchers.open(i, to_dispatcher);
    sh.phases.set(i, Phase::Consuming);
    tracing::info!(
        consumer = cfg.partition_consumer_name(&sh.service, partition),
        "Binding consuming."
    );
    if sh.phases.all_consuming() {
        tracing::info!(service = %sh.service, listen = %sh.listen,
            bindings = sh.phases.len(), "Sidecar consuming.");
    }
    let joined = tokio::select! {
        joined = &mut dispatcher => joined,
        _ = lost.cancelled() => {
            // The dispatcher saw `run` cancelled too: it hands back what is queued at once, but it
            // must also be done with in-flight deliveries well before another instance may take
            // over (half the ttl after the loss).
            sh.dispatchers.close(i);
            sh.phases.set(i, Phase::Stopping);
            let grace = sh.shutdown_timeout.min(sh.lease_ttl / 4);
            match tokio::time::timeout(grace, &mut dispatcher).await {
                Ok(joined) => joined,
                Err(_) => {
                    tracing::warn!(grace = %humantime::format_duration(grace),
                        "In-flight deliveries not finished after the lease was lost; abandoning them \
                         (they are redelivered after their ack wait).");
                    dispatcher.abort();
                    dispatcher.await
                }
            }
        }
    };
    sh.dispatchers.close(i);
    sh.phases.set(i, Phase::Stopping);
    match joined {
        Err(e) if e.is_panic() => Err(RunError::Runtime(
            anyhow::Error::new(e).context("the dispatcher panicked"),
        )),
        Ok(()) | Err(_) => Ok(()),
    }
}

/// Creates or updates the durable pull consumer of the binding's partition on the app's stream,
/// retrying while NATS cannot answer. `None` when `run` is cancelled first. On the sidecar's `first`
/// turn, JetStream refusing the consumer (a filter outside the stream, say) is an error, as at any
/// start; later it is logged and retried, since the binding consumed before.
pub(crate) async fn bind(
    sh: &Shared,
    b: &BindingConfig,
    partition: u32,
    run: &CancellationToken,
    first: bool,
) -> Result<Option<PullConsumer>, RunError> {
    let name = b.partition_consumer_name(&sh.service, partition);
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        description: Some(if b.is_partitioned() {
            format!(
                "mend sidecar of {}, binding {}, partition {partition}",
                sh.service, b.name
            )
        } else {
            format!("mend sidecar of {}, binding {}", sh.service, b.name)
        }),
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
    let mut pause = crate::common::backoff::RETRY_MIN;
    loop {
        let stream = sh
            .js
            .get_stream_no_info(&b.stream)
            .await
            .with_context(|| format!("binding {}: {} is not a stream name", b.name, b.stream))
            .map_err(RunError::Config)?;
        let created = tokio::select! {
            created = stream.create_consumer(config.clone()) => created,
            _ = run.cancelled() => return Ok(None),
        };
        match created {
            Ok(consumer) => return Ok(Some(consumer)),
            Err(error) => {
                let refused = match error.kind() {
                    ConsumerErrorKind::JetStream(_) => !nats::is_unavailable(&error),
                    ConsumerErrorKind::InvalidName | ConsumerErrorKind::InvalidConsumerType => true,
                    _ => false,
                };
                if refused && first {
                    return Err(RunError::Startup(anyhow::Error::new(error).context(
                        format!(
                            "binding {}: cannot create consumer {name} on {}",
                            b.name, b.stream
                        ),
                    )));
                }
                if refused {
                    tracing::error!(%error, consumer = name, "Consumer refused; retrying.");
                } else {
                    tracing::warn!(%error, consumer = name, "Consumer not created yet; retrying.");
                }
            }
        }
        if crate::common::backoff::back_off(run, &mut pause)
            .await
            .is_err()
        {
            return Ok(None);
        }
    }
}

/// Loads the binding's holds, retrying while NATS cannot answer; `None` when `run` is cancelled
/// first.
pub(crate) async fn load_holds(
    sh: &Shared,
    b: &BindingConfig,
    run: &CancellationToken,
) -> Option<crate::runtime::holds::Holds> {
    let mut pause = crate::common::backoff::RETRY_MIN;
    loop {
        let loaded = tokio::select! {
            loaded = crate::runtime::holds::Holds::load(&sh.js, &sh.service, &b.name, b.partition_for(sh.partition), run) => loaded,
            _ = run.cancelled() => return None,
        };
        match loaded {
            Ok(holds) => return Some(holds),
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "Cannot load the binding's holds; retrying."
            ),
        }
        crate::common::backoff::back_off(run, &mut pause)
            .await
            .ok()?;
    }
}

/// This instance's name in the leases: host (`HOSTNAME`, else `/etc/hostname`) and process id.
pub(crate) fn owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{}:{}", host.trim(), std::process::id())
}
