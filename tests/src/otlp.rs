//! An OTLP/HTTP receiver for tests: `POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest`, decoded with the official OpenTelemetry definitions
//! (`opentelemetry-proto`), each span kept with its resource's service name. It can also refuse
//! every export (a collector that is unwell) to see what that costs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;

/// One received span, in the terms tests ask about.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub name: String,
    /// Lower-case hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `SPAN_KIND_*` as its number (3 = client).
    pub kind: i32,
    pub attributes: Vec<(String, String)>,
    /// Linked spans: (trace id, span id).
    pub links: Vec<(String, String)>,
    /// 0 unset, 1 ok, 2 error.
    pub status: i32,
}

impl Span {
    /// The value of attribute `key`, as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Inner {
    spans: Vec<Span>,
    requests: usize,
    bytes: usize,
    refusing: bool,
    discarding: bool,
}

/// A receiver on a free loopback port, until dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn text(v: &KeyValue) -> String {
    match v.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traces(State(inner): State<Arc<Mutex<Inner>>>, body: Bytes) -> impl IntoResponse {
    if inner.lock().unwrap_or_else(|p| p.into_inner()).discarding {
        // What a collector does first (read, take), without keeping anything.
        let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.requests += 1;
        inner.bytes += body.len();
        return (
            StatusCode::OK,
            ExportTraceServiceResponse::default().encode_to_vec(),
        );
    }
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
    inner.requests += 1;
    if inner.refusing {
        return (StatusCode::SERVICE_UNAVAILABLE, Vec::new());
    }
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|a| a.key == "service.name")
            .map(text)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                inner.spans.push(Span {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(a)))
                        .collect(),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    status: s.status.map_or(0, |st| st.code),
                });
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Inner::default()).await
    }

    /// A receiver that takes every export and keeps nothing but counts (for benchmarks).
    pub async fn start_discarding() -> anyhow::Result<Self> {
        Self::start_with(Inner {
            discarding: true,
            ..Inner::default()
        })
        .await
    }

    /// Export requests and their bytes received so far.
    pub fn received(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.requests, inner.bytes)
    }

    async fn start_with(inner: Inner) -> anyhow::Result<Self> {
        let inner = Arc::new(Mutex::new(inner));
        let app = Router::new()
            .route(
                "/v1/traces",
                post(|state, body| async move {
                    let (status, body) = traces(state, body).await.into_response().into_parts();
                    let mut res = axum::response::Response::from_parts(status, body);
                    res.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/x-protobuf"),
                    );
                    res
                }),
            )
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, inner, task })
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for this receiver.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment that points mend here, exporting every 100 ms.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), self.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spans
            .clone()
    }

    /// Export requests received so far (refused ones too).
    pub fn requests(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
    }

    /// Answers every export 503 from now on (`true`), or takes them again.
    pub fn refuse(&self, refusing: bool) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refusing = refusing;
    }

    /// Waits until `check` holds for the spans received (within `limit`); returns them.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&[Span]) -> bool,
    ) -> anyhow::Result<Vec<Span>> {
        let waited = crate::wait::until(what, limit, || async {
            let spans = self.spans();
            Ok(check(&spans).then_some(spans))
        })
        .await;
        // On a timeout, what did come: each span's name, service, trace, ids and attributes.
        waited.map_err(|e| {
            let got: Vec<String> = self
                .spans()
                .iter()
                .map(|s| {
                    format!(
                        "{} ({}) trace {} span {} parent {} {:?}",
                        s.name, s.service, s.trace_id, s.span_id, s.parent_span_id, s.attributes
                    )
                })
                .collect();
            e.context(format!("spans received:\n{}", got.join("\n")))
        })
    }
}
