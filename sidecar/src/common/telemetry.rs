//! Logs (`tracing`, pretty or JSON) and metrics (Prometheus text from the `metrics` facade).
//!
//! Metric names are declared here once; every role records through these constants.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Bulk delivery: messages per batch sent, by service and binding.
pub const BATCH_SIZE: &str = "mend_batch_size";
/// Bulk delivery: seconds from sending a batch to its answer, by service and binding.
pub const BATCH_LATENCY: &str = "mend_batch_latency_seconds";
/// Batch-size histogram buckets, in messages.
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Messages the app processed (2xx), by service and binding.
pub const DELIVERED: &str = "mend_delivered_total";
/// Failed app calls by `kind`: `transient`, `message`, `transient_exhausted`.
pub const FAILED: &str = "mend_failed_total";
/// Failures delegated to MEND_FAILED.
pub const DELEGATED: &str = "mend_delegated_total";
/// Messages the app asked to drop (`Mend-Action: drop`).
pub const DROPPED: &str = "mend_dropped_total";
/// Messages the app sent straight to the dashboard (`Mend-Action: park`).
pub const PARKED_BY_APP: &str = "mend_parked_by_app_total";
/// App calls under way.
pub const IN_FLIGHT: &str = "mend_in_flight";
/// Messages pulled and waiting for their key's turn or a free slot.
pub const QUEUED: &str = "mend_queued";
/// Seconds per app call, whatever the answer.
pub const APP_LATENCY: &str = "mend_app_latency_seconds";
/// Messages of the consumer not yet delivered to mend (consumer lag).
pub const CONSUMER_PENDING: &str = "mend_consumer_pending";
/// Messages delivered to mend and not yet acknowledged.
pub const CONSUMER_ACK_PENDING: &str = "mend_consumer_ack_pending";
/// 1 while the app looks down and the sidecar has stopped pulling.
pub const CIRCUIT_OPEN: &str = "mend_circuit_open";
/// Redeliveries of a message that was still waiting in the sidecar (ignored).
pub const REDELIVERED_WHILE_BUFFERED: &str = "mend_redelivered_while_buffered_total";
/// Confirmed acks that could not be confirmed (the message will be redelivered).
pub const ACK_UNCONFIRMED: &str = "mend_ack_unconfirmed_total";

/// Keys held (or releasing) behind an unresolved head.
pub const HELD_KEYS: &str = "mend_held_keys";
/// Messages waiting in hold queues.
pub const HELD_MESSAGES: &str = "mend_held_messages";
/// Seconds since the oldest current hold began (0 without holds).
pub const HOLD_OLDEST_AGE: &str = "mend_hold_oldest_age_seconds";
/// Holds over their binding's `hold_alert_age` or `hold_alert_count`.
pub const HOLD_ALERTS: &str = "mend_hold_alerts";
/// Releases of a hold completed (its queue delivered).
pub const RELEASES: &str = "mend_releases_total";
/// Commands from the dashboard (`mend.control.<service>`) applied.
pub const CONTROL_COMMANDS: &str = "mend_control_commands_total";
/// Commands on `mend.control.<service>` refused as malformed.
pub const CONTROL_REFUSED: &str = "mend_control_refused_total";

/// Processor: failures a rule matched, by `rule`.
pub const RULE_MATCHED: &str = "mend_rule_matched_total";
/// Processor: failures repaired and sent back, by `rule`.
pub const REPAIRED: &str = "mend_repaired_total";
/// Processor: rule evaluations that failed, by `rule`.
pub const RULE_ERRORS: &str = "mend_rule_errors_total";
/// Processor: failures parked for a person, by `reason`.
pub const PARKED: &str = "mend_parked_total";
/// Processor: seconds from taking a failure to its ack.
pub const PROCESSING_LATENCY: &str = "mend_processing_seconds";
/// Processor: rules in force.
pub const RULES_LOADED: &str = "mend_rules_loaded";
/// Processor: 1 for the digest (SHA-256 of the files) of the rules in force, 0 for earlier ones.
pub const RULES_INFO: &str = "mend_rules_info";
/// Processor: reloads of the rules after a change, by `result` (`ok`, `refused`).
pub const RULES_RELOADS: &str = "mend_rules_reloads_total";

/// App-latency histogram buckets, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide metrics recorder once and returns the handle that renders it.
pub fn metrics() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = PROMETHEUS.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.to_owned()),
            BATCH_SIZE_BUCKETS,
        )?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = PROMETHEUS.set(handle.clone());
    }
    Ok(PROMETHEUS.get().cloned().unwrap_or(handle))
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Starts logging to stderr (the filter from `MEND_LOG`, else `default`, e.g. `info`), and
/// exporting traces over OTLP when the `OTEL_*` variables ask for it ([`super::otel`]; the
/// service is `mend-<role>` unless `OTEL_SERVICE_NAME` says otherwise). The guard, kept until
/// exit, exports what is still queued then.
pub fn init_logging(format: LogFormat, default: &str, role: &str) -> Option<super::otel::Guard> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = || {
        let filter =
            EnvFilter::try_from_env("MEND_LOG").unwrap_or_else(|_| EnvFilter::new(default));
        // The exported spans are for the trace only, never in the log lines.
        match format!("{}=off", super::otel::TARGET).parse() {
            Ok(off) => filter.add_directive(off),
            Err(_) => filter,
        }
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut failed = None;
    let traces = super::otel::settings(|k| std::env::var(k).ok()).and_then(|settings| {
        // The metrics recorder first, so that the export's counters are there from the start.
        let _ = metrics();
        match super::otel::start(role, &settings) {
            Ok(started) => Some(started),
            Err(error) => {
                failed = Some(error);
                None
            }
        }
    });
    // Colours only for a terminal: escape codes in a log file or collector are noise, and the fmt
    // layer writes every span's fields with them when the span is made (a message's span, in the
    // sidecar's hot path).
    let guard = match traces {
        // Without traces, one global filter, as cheap as logging gets: a call site the filter
        // refuses is never looked at again.
        None => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_ansi(ansi)
                .with_writer(std::io::stderr);
            let _ = match format {
                LogFormat::Pretty => builder.try_init(),
                LogFormat::Json => builder.json().flatten_event(true).try_init(),
            };
            None
        }
        // With them, a filter per layer: the log's, and the trace's (only [`super::otel::TARGET`]).
        Some((tracer, guard)) => {
            let fmt = tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr);
            let fmt = match format {
                LogFormat::Pretty => fmt.with_filter(filter()).boxed(),
                LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter()).boxed(),
            };
            let only_ours = tracing_subscriber::filter::Targets::new()
                .with_target(super::otel::TARGET, tracing::Level::TRACE);
            // Only what mend puts on its spans: no source location, thread, level, target or
            // busy/idle timing per span (each an attribute or clock reads on every poll).
            let traces = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false)
                .with_level(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(only_ours);
            let _ = tracing_subscriber::registry()
                .with(fmt)
                .with(traces)
                .try_init();
            Some(guard)
        }
    };
    if let Some(error) = failed {
        tracing::error!(%error, "Traces are not exported.");
    }
    guard
}
