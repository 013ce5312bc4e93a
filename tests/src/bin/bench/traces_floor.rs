//! The floor of traces' cost: the hand-written loop of (b) making, per message, the spans mend's
//! sidecar makes (a `receive` consumer span and a `deliver` client span under it, with the same
//! attributes, the app called with the `deliver` span as parent), through the OpenTelemetry SDK
//! directly and exported by the SDK's own batch span processor and OTLP/HTTP exporter to the same
//! receiver. The loop with them against the loop without is what those spans cost at the least.

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{
    Span as _, SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};

/// A tracer exporting to an OTLP/HTTP endpoint (`http://host:port`) the SDK's standard way.
pub struct Floor {
    provider: SdkTracerProvider,
    pub tracer: SdkTracer,
}

impl Floor {
    pub fn start(endpoint: &str) -> anyhow::Result<Self> {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{endpoint}/v1/traces"))
            .build()?;
        let exporter = OnRuntime {
            inner: std::sync::Arc::new(exporter),
            runtime: tokio::runtime::Handle::current(),
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("bench-loop")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("bench");
        Ok(Self { provider, tracer })
    }

    /// Exports what is queued and stops.
    pub fn stop(self) {
        let _ = self.provider.shutdown();
    }
}

/// The OTLP exporter, its exports run on the bench's Tokio runtime: the SDK's batch processor
/// exports from a thread of its own with no runtime, where the exporter's (async) HTTP client
/// cannot run.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: std::sync::Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        match self
            .runtime
            .spawn(async move { inner.export(batch).await })
            .await
        {
            Ok(result) => result,
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        }
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(inner) = std::sync::Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The spans of one message: its `receive` (as a context, ended by [`end`]) and its `deliver`,
/// whose trace context goes into the app's request `headers`.
pub fn begin(
    tracer: &SdkTracer,
    m: &async_nats::Message,
    id: &str,
    key: &str,
    headers: &mut reqwest::header::HeaderMap,
) -> (Context, opentelemetry_sdk::trace::Span) {
    let parent = mend_dashboard::trace::parent_of(m.headers.as_ref()).unwrap_or_default();
    let receive = tracer
        .span_builder("receive")
        .with_kind(SpanKind::Consumer)
        .with_attributes(vec![
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.destination.name", m.subject.to_string()),
            KeyValue::new("mend.id", id.to_owned()),
            KeyValue::new("mend.attempt", 1i64),
            KeyValue::new("mend.service", "bench"),
            KeyValue::new("mend.key", key.to_owned()),
        ])
        .start_with_context(tracer, &parent);
    let receive = Context::new().with_span(receive);
    let deliver = tracer
        .span_builder("deliver")
        .with_kind(SpanKind::Client)
        .with_attributes(vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("mend.try", 1i64),
        ])
        .start_with_context(tracer, &receive);
    let cx = Context::new().with_remote_span_context(deliver.span_context().clone());
    TraceContextPropagator::new().inject_context(&cx, &mut Http(headers));
    (receive, deliver)
}

/// Ends a message's call span with the app's status.
pub fn answered(mut deliver: opentelemetry_sdk::trace::Span, status: Option<u16>) {
    if let Some(status) = status {
        deliver.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
    }
    deliver.end();
}

/// Ends a message's `receive`, once it is acked.
pub fn settled(receive: Context) {
    receive.span().end();
}

struct Http<'a>(&'a mut reqwest::header::HeaderMap);

impl opentelemetry::propagation::Injector for Http<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
