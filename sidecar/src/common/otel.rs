//! OpenTelemetry traces over OTLP (SPEC §11), configured only by the standard `OTEL_*` variables:
//! on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and neither
//! `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`), off otherwise, and then nothing is
//! made: the spans of target [`TARGET`] have no subscriber that wants them, so their call sites
//! stay disabled.
//!
//! The SDK reads the rest itself: headers and timeout (`OTEL_EXPORTER_OTLP_*`), the service name and
//! resource (`OTEL_SERVICE_NAME`, default `mend-<role>`; `OTEL_RESOURCE_ATTRIBUTES`), the sampler
//! (`OTEL_TRACES_SAMPLER`, `_ARG`). The protocol is HTTP/protobuf.
//!
//! Finished spans go through [`Bounded`], a span processor of ours rather than the SDK's batch
//! processor, because the SDK's only logs what it drops, and a dropped span must be counted: a
//! bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) that a span joins without waiting or is dropped
//! and counted (`mend_trace_spans_dropped_total{reason="queue_full"}`), drained by a thread of
//! its own in batches (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512; every `OTEL_BSP_SCHEDULE_DELAY`,
//! 5000 ms), each export bounded by the exporter's timeout; what a failed export held is counted
//! too (`reason="export_failed"`). So a slow or absent collector costs the service a failed
//! `try_send` per span, never a wait, and at most the queue's worth of memory.

use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};

pub use mend_dashboard::trace::{
    KeyValue, Kind, Span, TARGET, inject_nats, parent_in, parent_of, set_parent,
};

/// Spans dropped before export, by reason (`queue_full`, `export_failed`).
pub const SPANS_DROPPED: &str = "mend_trace_spans_dropped_total";
/// Spans exported.
pub const SPANS_EXPORTED: &str = "mend_trace_spans_exported_total";

/// Writes `span`'s trace context as `traceparent` (and `tracestate`) into the headers of a call of
/// the app, replacing what was there: the app's work is a child of mend's span. Nothing when the
/// span is none.
pub fn inject_http(span: &Span, headers: &mut reqwest::header::HeaderMap) {
    use reqwest::header::{HeaderName, HeaderValue};
    let Some((parent, state)) = span.traceparent() else {
        return;
    };
    // Both are ASCII made by the SDK (the state from entries it accepted as valid). A state the
    // message carried beside a context that was not kept (a new trace) goes.
    if let Ok(value) = HeaderValue::from_str(&parent) {
        headers.insert(HeaderName::from_static("traceparent"), value);
    }
    match state.map(|s| HeaderValue::from_str(&s)) {
        Some(Ok(value)) => {
            headers.insert(HeaderName::from_static("tracestate"), value);
        }
        _ => {
            headers.remove("tracestate");
        }
    }
}

/// Longest text put in an attribute from a message (a key may be as long as a header is).
pub const ATTRIBUTE_MAX: usize = 256;

/// `text` cut to [`ATTRIBUTE_MAX`] bytes at a character boundary, with `…` when cut.
pub fn clip(text: &str) -> String {
    if text.len() <= ATTRIBUTE_MAX {
        return text.to_owned();
    }
    let mut end = ATTRIBUTE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The OTLP settings mend takes from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub queue: usize,
    pub batch: usize,
    pub delay: Duration,
}

/// Whether traces are to be exported, from the environment `var` gives: `Some` with the queue's
/// settings when an OTLP endpoint is set and tracing is not turned off.
pub fn settings(var: impl Fn(&str) -> Option<String>) -> Option<Settings> {
    let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    if set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none")) {
        return None;
    }
    set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
    let number = |k: &str, default: u64| {
        set(k)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(default)
    };
    let queue = usize::try_from(number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)).unwrap_or(2048);
    let batch = usize::try_from(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512))
        .unwrap_or(512)
        .min(queue);
    Some(Settings {
        queue,
        batch,
        delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)),
    })
}

/// Keeps the tracer provider; dropped at exit, it exports what is queued (for a few seconds at
/// most).
pub struct Guard {
    provider: SdkTracerProvider,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown_with_timeout(Duration::from_secs(3));
    }
}

/// The tracer and its guard when traces are on; `role` names the service by default.
pub fn start(
    role: &str,
    settings: &Settings,
) -> Result<(opentelemetry_sdk::trace::Tracer, Guard), String> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("cannot make the OTLP exporter: {e}"))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(role.to_owned());
    }
    let resource = resource.build();
    exporter.set_resource(&resource);
    let processor = Bounded::start(exporter, settings)?;
    metrics::counter!(SPANS_DROPPED, "reason" => "queue_full").absolute(0);
    metrics::counter!(SPANS_DROPPED, "reason" => "export_failed").absolute(0);
    metrics::counter!(SPANS_EXPORTED).absolute(0);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("mend");
    mend_dashboard::trace::install(tracer.clone());
    Ok((tracer, Guard { provider }))
}

enum Command {
    Flush(SyncSender<()>),
    Stop(SyncSender<()>),
}

/// A bounded queue of finished spans and the thread that exports them; see the module's text.
#[derive(Debug)]
pub struct Bounded {
    spans: SyncSender<SpanData>,
    commands: SyncSender<CommandBox>,
}

/// [`Command`] in a box the channel can carry with `Debug`.
struct CommandBox(Command);

impl std::fmt::Debug for CommandBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Bounded {
    fn start<E: SpanExporter + 'static>(exporter: E, settings: &Settings) -> Result<Self, String> {
        let (spans, queue) = mpsc::sync_channel(settings.queue);
        let (commands, asked) = mpsc::sync_channel(4);
        let settings = settings.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the span export thread: {e}"))?;
        std::thread::Builder::new()
            .name("mend-otel".into())
            .spawn(move || runtime.block_on(drain(exporter, queue, asked, settings)))
            .map_err(|e| format!("cannot start the span export thread: {e}"))?;
        Ok(Self { spans, commands })
    }

    fn ask(&self, make: impl FnOnce(SyncSender<()>) -> Command, wait: Duration) -> OTelSdkResult {
        let (done, answered) = mpsc::sync_channel(1);
        self.commands
            .try_send(CommandBox(make(done)))
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
        answered
            .recv_timeout(wait)
            .map_err(|_| OTelSdkError::Timeout(wait))
    }
}

impl SpanProcessor for Bounded {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.spans.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                metrics::counter!(SPANS_DROPPED, "reason" => "queue_full").increment(1);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Command::Flush, Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.ask(Command::Stop, timeout)
    }
}

/// How often the export thread looks at the queue. It never waits on the queue itself: a thread
/// blocked on a channel is woken by every span sent (a futex call and a context switch per span,
/// a fifth of the sidecar's CPU with traces on); looking every few milliseconds costs nothing
/// per span.
const TICK: Duration = Duration::from_millis(5);

/// The export thread: a batch when it is full or when the delay is up, what is queued on a flush
/// or a stop.
async fn drain<E: SpanExporter>(
    exporter: E,
    queue: Receiver<SpanData>,
    commands: Receiver<CommandBox>,
    settings: Settings,
) {
    let mut batch = Vec::with_capacity(settings.batch);
    let mut due = Instant::now() + settings.delay;
    loop {
        tokio::time::sleep(TICK).await;
        loop {
            match queue.try_recv() {
                Ok(span) => {
                    batch.push(span);
                    if batch.len() >= settings.batch {
                        export(&exporter, &mut batch).await;
                        due = Instant::now() + settings.delay;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    export(&exporter, &mut batch).await;
                    return;
                }
            }
        }
        if Instant::now() >= due {
            export(&exporter, &mut batch).await;
            due = Instant::now() + settings.delay;
        }
        if let Ok(CommandBox(command)) = commands.try_recv() {
            while let Ok(span) = queue.try_recv() {
                batch.push(span);
                if batch.len() >= settings.batch {
                    export(&exporter, &mut batch).await;
                }
            }
            export(&exporter, &mut batch).await;
            match command {
                Command::Flush(done) => {
                    let _ = done.try_send(());
                }
                Command::Stop(done) => {
                    let _ = exporter.shutdown();
                    let _ = done.try_send(());
                    return;
                }
            }
        }
    }
}

async fn export<E: SpanExporter>(exporter: &E, batch: &mut Vec<SpanData>) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    match exporter.export(spans).await {
        Ok(()) => metrics::counter!(SPANS_EXPORTED).increment(n),
        Err(error) => {
            metrics::counter!(SPANS_DROPPED, "reason" => "export_failed").increment(n);
            tracing::debug!(%error, spans = n, "Spans not exported.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn on_only_with_an_endpoint_and_not_turned_off() {
        assert_eq!(settings(env(&[])), None);
        assert_eq!(settings(env(&[("OTEL_SERVICE_NAME", "x")])), None);
        assert_eq!(settings(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])), None);
        let on = Settings {
            queue: 2048,
            batch: 512,
            delay: Duration::from_secs(5),
        };
        assert_eq!(
            settings(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])),
            Some(on.clone())
        );
        assert_eq!(
            settings(env(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )])),
            Some(on)
        );
        for off in [
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(
                settings(env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    off
                ])),
                None
            );
        }
    }

    #[test]
    fn long_texts_are_clipped_at_a_character_boundary() {
        assert_eq!(clip("k-1"), "k-1");
        let long = "é".repeat(200);
        let clipped = clip(&long);
        assert!(clipped.len() <= ATTRIBUTE_MAX + '…'.len_utf8());
        assert!(clipped.ends_with('…') && clipped.starts_with("éé"));
    }

    #[test]
    fn queue_settings_from_the_standard_variables() {
        let s = settings(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
        ]))
        .unwrap();
        assert_eq!(
            (s.queue, s.batch, s.delay),
            (100, 100, Duration::from_millis(250))
        );
        let s = settings(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "zero"),
            ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ]))
        .unwrap();
        assert_eq!((s.queue, s.delay), (2048, Duration::from_secs(5)));
    }
}
