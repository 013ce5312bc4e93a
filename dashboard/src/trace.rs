//! W3C trace context (SPEC §3, §11) read from and written into the headers of the messages mend
//! takes and publishes, for the spans every role exports over OTLP. Shared by every role (the
//! `mend` crate re-exports it beside its exporter, `mend::common::otel`); the spans are `tracing`
//! spans of target [`TARGET`], which only the OTLP layer takes, so with traces off they stay
//! disabled and all of this is skipped.

/// The `tracing` target of the spans that are exported (and of nothing else).
pub const TARGET: &str = "mend_otel";

/// The W3C trace context `get` finds (`traceparent`, `tracestate`, by lower-case name), as the
/// parent of a span; `None` without a valid one.
pub fn parent_from<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<opentelemetry::Context> {
    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::TraceContextExt as _;

    struct Found<'a>([Option<&'a str>; 2]);
    impl opentelemetry::propagation::Extractor for Found<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                "traceparent" => self.0[0],
                "tracestate" => self.0[1],
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent", "tracestate"]
        }
    }
    let found = Found([Some(get("traceparent")?), get("tracestate")]);
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &found);
    cx.span().span_context().is_valid().then_some(cx)
}

/// `cx`'s span context as a W3C `traceparent` (version 00).
pub fn traceparent(cx: &opentelemetry::Context) -> String {
    use opentelemetry::trace::TraceContextExt as _;
    w3c(cx.span().span_context())
}

fn w3c(sc: &opentelemetry::trace::SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Links `span` (when tracing is on) to the span of the W3C `traceparent` `linked` (another attempt
/// of the same message; nothing when it is not a valid one), with `attributes`.
pub fn link(span: &tracing::Span, linked: &str, attributes: Vec<opentelemetry::KeyValue>) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if span.is_disabled() {
        return;
    }
    if let Some(cx) = parent_from(|key| (key == "traceparent").then_some(linked)) {
        span.add_link_with_attributes(cx.span().span_context().clone(), attributes);
    }
}

/// The trace context in a NATS message's headers.
pub fn parent_of(headers: Option<&async_nats::HeaderMap>) -> Option<opentelemetry::Context> {
    let headers = headers?;
    parent_from(|key| {
        headers
            .iter()
            .find(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.first())
            .map(|v| v.as_str())
    })
}

/// The trace context in an envelope's copy of the message's headers.
pub fn parent_in(
    headers: &std::collections::BTreeMap<String, Vec<String>>,
) -> Option<opentelemetry::Context> {
    parent_from(|key| {
        headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.first())
            .map(String::as_str)
    })
}

/// Makes `parent` the parent of `span` (when tracing is on and there is one).
pub fn set_parent(span: &tracing::Span, parent: impl FnOnce() -> Option<opentelemetry::Context>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !span.is_disabled()
        && let Some(parent) = parent()
    {
        let _ = span.set_parent(parent);
    }
}

/// Writes `span`'s trace context as `traceparent` (and `tracestate`) into the NATS headers of a
/// message mend publishes, replacing what was there: whoever takes the message next continues the
/// trace under this span. Nothing when the span is disabled.
pub fn inject_nats(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    struct Nats<'a>(&'a mut async_nats::HeaderMap);
    impl opentelemetry::propagation::Injector for Nats<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key, value.as_str());
        }
    }
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&cx, &mut Nats(headers));
}

/// The tracer [`Span`]s are made with, installed by the role's exporter when traces are on.
static TRACER: std::sync::OnceLock<opentelemetry_sdk::trace::Tracer> = std::sync::OnceLock::new();

/// Installs the tracer of [`Span`]s (once; later calls change nothing).
pub fn install(tracer: opentelemetry_sdk::trace::Tracer) {
    let _ = TRACER.set(tracer);
}

/// A span made with the OpenTelemetry API directly, for the spans of every message (the sidecar's
/// `receive` and `deliver`, and what hangs off them): without the `tracing` bridge, a span costs
/// what the SDK costs and no more (no registry entry, no span data looked up on every poll of the
/// future it covers, no attribute formatted through `Debug`). With traces off it is an empty box:
/// [`Span::start`] reads one static and builds nothing, not even the attributes.
///
/// It ends when dropped.
#[derive(Debug)]
pub struct Span(Option<Box<opentelemetry_sdk::trace::Span>>);

/// An attribute.
pub use opentelemetry::KeyValue;
/// A span's kind (OpenTelemetry's, named here so callers need not import the API).
pub use opentelemetry::trace::SpanKind as Kind;

impl Span {
    /// No span (traces off, or nothing to trace).
    pub fn none() -> Self {
        Self(None)
    }

    /// Starts the span `name` of `kind` under `parent` (a new trace when it has none), with the
    /// attributes `attributes` makes; neither is called when traces are off.
    pub fn start(
        name: &'static str,
        kind: Kind,
        parent: impl FnOnce() -> Option<opentelemetry::Context>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        use opentelemetry::trace::Tracer as _;
        let Some(tracer) = TRACER.get() else {
            return Self(None);
        };
        let parent = parent().unwrap_or_default();
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(tracer, &parent);
        Self(Some(Box::new(span)))
    }

    /// Starts a span under this one (none when this is none).
    pub fn child(
        &self,
        name: &'static str,
        kind: Kind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        match self.context() {
            Some(cx) => Self::start(name, kind, || Some(cx), attributes),
            None => Self(None),
        }
    }

    /// Whether it is a span (traces on).
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Its context, as the parent of another span.
    pub fn context(&self) -> Option<opentelemetry::Context> {
        use opentelemetry::trace::{Span as _, TraceContextExt as _};
        let span = self.0.as_deref()?;
        Some(opentelemetry::Context::new().with_remote_span_context(span.span_context().clone()))
    }

    /// Its trace context as W3C `traceparent` (and `tracestate` when there is one).
    pub fn traceparent(&self) -> Option<(String, Option<String>)> {
        use opentelemetry::trace::Span as _;
        let sc = self.0.as_deref()?.span_context();
        let state = sc.trace_state().header();
        Some((w3c(sc), (!state.is_empty()).then_some(state)))
    }

    /// Sets an attribute.
    pub fn set(&mut self, attribute: KeyValue) {
        use opentelemetry::trace::Span as _;
        if let Some(span) = self.0.as_deref_mut() {
            span.set_attribute(attribute);
        }
    }

    /// Sets its status: `OK`, or `ERROR` with `why`.
    pub fn status(&mut self, ok: bool, why: &str) {
        use opentelemetry::trace::{Span as _, Status};
        if let Some(span) = self.0.as_deref_mut() {
            span.set_status(if ok {
                Status::Ok
            } else {
                Status::error(why.to_owned())
            });
        }
    }

    /// Links it to the span of `cx` (another attempt of the same message), with `attributes`.
    pub fn link(&mut self, cx: &opentelemetry::Context, attributes: Vec<KeyValue>) {
        use opentelemetry::trace::{Span as _, TraceContextExt as _};
        if let Some(span) = self.0.as_deref_mut() {
            let linked = cx.span().span_context().clone();
            if linked.is_valid() {
                span.add_link(linked, attributes);
            }
        }
    }

    /// Writes its trace context as `traceparent` (and `tracestate`) into the NATS headers of a
    /// message mend publishes, replacing what was there. Nothing when it is none.
    pub fn inject_nats(&self, headers: &mut async_nats::HeaderMap) {
        // As the W3C propagator writes them: `tracestate` always, empty when there is none, so
        // no stale state of an earlier span stays beside the new parent.
        if let Some((parent, state)) = self.traceparent() {
            headers.insert("traceparent", parent.as_str());
            headers.insert("tracestate", state.unwrap_or_default().as_str());
        }
    }
}
