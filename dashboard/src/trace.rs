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
