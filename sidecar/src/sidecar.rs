//! `mend sidecar`: start-up (connect, create mend's layout, check the app streams), the operations
//! endpoint, the routers of retries and commands, one supervisor per binding, and graceful shutdown.
//!
//! One sidecar at a time consumes a (binding, partition) (SPEC §7). A binding's supervisor takes
//! the lease (`lease.rs`) before it pulls anything or loads a hold; then it binds the binding's
//! consumer, loads its holds and runs its dispatcher (`consume::run`) until shutdown or until the
//! lease is lost. On a lost lease the dispatcher stops at once (queued messages are handed back,
//! in-flight ones get at most a quarter of the lease's ttl) and the supervisor waits for the lease
//! again. `/readyz` answers ready only while every binding consumes here.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::stream::ConsumerErrorKind;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{BindingConfig, SidecarConfig};
use crate::consume::{self, BindingMetrics, BindingRuntime};
use crate::deliver::App;
use crate::lease::{Lease, Stopped};
use crate::retry::{self, Dispatchers, Router};
use crate::{RunError, circuit::Circuit, health, nats, telemetry};

/// Runs the sidecar until `shutdown` is cancelled, then shuts down gracefully.
pub async fn run(config: SidecarConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let metrics = telemetry::metrics().map_err(RunError::Startup)?;
    let (client, js, epoch) = match nats::start(
        &config.nats_url,
        &config.nats,
        &format!("mend-sidecar-{}", config.service),
        &shutdown,
    )
    .await
    {
        Ok(started) => started,
        Err(nats::ConnectError::Stopped) => return Ok(()),
        Err(e) => return Err(RunError::Startup(e.into())),
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
    let ready: health::ReadyCheck = {
        let client = client.clone();
        let phases = phases.clone();
        let shutdown = shutdown.clone();
        Arc::new(move || {
            if shutdown.is_cancelled() {
                return Err("shutting down".into());
            }
            if client.connection_state() != State::Connected {
                return Err("NATS is not connected".into());
            }
            phases.ready()
        })
    };
    // The operations endpoint outlives the dispatchers, so probes see "shutting down" while they drain.
    let ops = health::serve(config.listen, ready, metrics)
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
            let retries = retry::bind(
                &js,
                &config.service,
                partition,
                total_slots * 4,
                retry_ack_wait,
            )
            .await?;
            let commands =
                retry::bind_control(&js, &config.service, partition, retry_ack_wait).await?;
            Ok((retries, commands))
        })
        .await
        .map_err(RunError::Startup)?;
        let Some((retries, commands)) = bound else {
            ops.stop().await;
            return Ok(());
        };
        tokio::spawn(retry::route(router.clone(), retries));
        tokio::spawn(retry::route_control(router.clone(), commands));
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
    ops.stop().await;
    tracing::info!("Sidecar stopped.");
    failure.map_or(Ok(()), Err)
}

/// What every binding's supervisor shares.
struct Shared {
    nats_url: String,
    nats: crate::config::NatsConfig,
    service: String,
    /// Names this instance in the leases it holds: host and process id.
    owner: String,
    lease_ttl: Duration,
    shutdown_timeout: Duration,
    /// This instance's partition index.
    partition: u32,
    listen: SocketAddr,
    client: async_nats::Client,
    js: jetstream::Context,
    epoch: crate::ack::Epoch,
    /// The sidecar's shutdown (SIGTERM).
    shutdown: CancellationToken,
    dispatchers: Arc<Dispatchers>,
    phases: Arc<Phases>,
}

/// How one binding's supervision ended a turn of consuming.
enum Turn {
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
async fn supervise(
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
async fn consume_while_owned(
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
        fixed_headers: crate::headers::BindingHeaders::new(&sh.service, &cfg.stream),
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
    });
    let (to_dispatcher, routed) = mpsc::channel(cfg.concurrency * 4);
    tokio::spawn(consume::watch_consumer(rt.clone(), consumer.clone()).in_current_span());
    let mut dispatcher = tokio::spawn(consume::run(rt, consumer, Some(routed)).in_current_span());
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
async fn bind(
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
    let mut pause = crate::publish::RETRY_MIN;
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
        if crate::publish::back_off(run, &mut pause).await.is_err() {
            return Ok(None);
        }
    }
}

/// Loads the binding's holds, retrying while NATS cannot answer; `None` when `run` is cancelled
/// first.
async fn load_holds(
    sh: &Shared,
    b: &BindingConfig,
    run: &CancellationToken,
) -> Option<crate::holds::Holds> {
    let mut pause = crate::publish::RETRY_MIN;
    loop {
        let loaded = tokio::select! {
            loaded = crate::holds::Holds::load(&sh.js, &sh.service, &b.name, b.partition_for(sh.partition), run) => loaded,
            _ = run.cancelled() => return None,
        };
        match loaded {
            Ok(holds) => return Some(holds),
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "Cannot load the binding's holds; retrying."
            ),
        }
        crate::publish::back_off(run, &mut pause).await.ok()?;
    }
}

/// Refuses to start when a binding's app stream is missing, or is partitioned into another number
/// of partitions than the binding says; waits while JetStream cannot answer (`None`: shutdown came
/// first).
async fn check_app_stream(
    js: &jetstream::Context,
    b: &BindingConfig,
    shutdown: &CancellationToken,
) -> Result<Option<()>, RunError> {
    let what = format!("binding {}: the app stream {}", b.name, b.stream);
    let found = nats::when_available(&what, shutdown, || async { Ok(js.get_stream(&b.stream).await?) })
        .await
        .with_context(|| {
            format!(
                "binding {}: the app stream {} does not exist or cannot be read (mend never creates the app's streams)",
                b.name, b.stream
            )
        })
        .map_err(RunError::Startup)?;
    let Some(app_stream) = found else {
        return Ok(None);
    };
    if !b.is_partitioned() {
        return Ok(Some(()));
    }
    let transform = app_stream.cached_info().config.subject_transform.as_ref();
    let counts = transform.map_or_else(Vec::new, |t| partition_counts(&t.destination));
    if counts.is_empty() {
        tracing::warn!(binding = %b.name, stream = %b.stream, partitions = b.partitions,
            "The app stream has no subject transform with {{{{partition(N, …)}}}}: producers must \
             put the partition number into the subject themselves.");
    } else if counts.iter().any(|&n| n != b.partitions) {
        return Err(RunError::Config(anyhow::anyhow!(
            "binding {}: partitions = {}, but stream {} maps subjects into {} partitions (subject transform {:?})",
            b.name,
            b.partitions,
            b.stream,
            counts[0],
            transform
                .map(|t| t.destination.as_str())
                .unwrap_or_default()
        )));
    }
    Ok(Some(()))
}

/// The partition counts `N` of the `{{partition(N, …)}}` mapping functions in a transform's
/// destination.
fn partition_counts(destination: &str) -> Vec<u32> {
    let lower = destination.to_ascii_lowercase();
    lower
        .match_indices("partition(")
        .filter_map(|(at, found)| {
            let rest = &lower[at + found.len()..];
            rest.split(',').next()?.trim().parse().ok()
        })
        .collect()
}

/// This instance's name in the leases: host (`HOSTNAME`, else `/etc/hostname`) and process id.
fn owner() -> String {
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

/// Where a binding's supervisor stands, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for the lease (and who holds it, once known).
    Waiting {
        holder: Option<String>,
    },
    /// The lease is held; binding the consumer and loading the holds.
    Starting,
    Consuming,
    /// The dispatcher is stopping (shutdown or a lost lease).
    Stopping,
}

/// The phase of every binding, and how each is named in `/readyz`.
struct Phases {
    names: Vec<String>,
    phases: Vec<Mutex<Phase>>,
}

impl Phases {
    fn new(config: &SidecarConfig) -> Self {
        let names = config
            .bindings
            .iter()
            .map(|b| {
                if b.is_partitioned() {
                    format!("binding {} (partition {})", b.name, config.partition)
                } else {
                    format!("binding {}", b.name)
                }
            })
            .collect::<Vec<_>>();
        let phases = names
            .iter()
            .map(|_| Mutex::new(Phase::Waiting { holder: None }))
            .collect();
        Self { names, phases }
    }

    fn len(&self) -> usize {
        self.phases.len()
    }

    fn get(&self, i: usize) -> Phase {
        match self.phases[i].lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, i: usize, phase: Phase) {
        match self.phases[i].lock() {
            Ok(mut p) => *p = phase,
            Err(poisoned) => *poisoned.into_inner() = phase,
        }
    }

    fn all_consuming(&self) -> bool {
        (0..self.len()).all(|i| self.get(i) == Phase::Consuming)
    }

    /// Ready when every binding consumes; else why not, binding by binding.
    fn ready(&self) -> Result<(), String> {
        let not: Vec<String> = (0..self.len())
            .filter_map(|i| {
                let why = match self.get(i) {
                    Phase::Consuming => return None,
                    Phase::Waiting { holder: Some(h) } => {
                        format!("waiting for the lease held by {h}")
                    }
                    Phase::Waiting { holder: None } => "waiting for the lease".to_owned(),
                    Phase::Starting => "binding its consumer and loading its holds".to_owned(),
                    Phase::Stopping => "stopping".to_owned(),
                };
                Some(format!("{}: {why}", self.names[i]))
            })
            .collect();
        if not.is_empty() {
            Ok(())
        } else {
            Err(not.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_counts_of_transforms() {
        assert_eq!(
            partition_counts("orders.{{partition(4,1)}}.{{wildcard(1)}}.{{wildcard(2)}}"),
            [4]
        );
        assert_eq!(partition_counts("o.{{ Partition( 8 , 1, 2) }}.x"), [8]);
        assert!(partition_counts("o.{{wildcard(1)}}").is_empty());
    }
}
