//! What every stage of a binding's dispatcher shares: the binding's runtime (config, app, NATS,
//! holds, shutdown) and its metric handles.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self};
use metrics::{Counter, Gauge, Histogram};
use tokio_util::sync::CancellationToken;

use crate::common::ack;
use crate::common::telemetry as t;
use crate::runtime::circuit::Circuit;
use crate::runtime::config::BindingConfig;
use crate::runtime::deliver::App;
use crate::runtime::headers::{self};
use crate::runtime::holds::Holds;

/// Messages held per unit of concurrency (the consumer's max ack pending is the product): enough that
/// `concurrency` distinct keys are usually among them.
pub const BUFFER_PER_SLOT: usize = 16;

/// The error code of a message parked because its key cannot be read.
pub const UNREADABLE_KEY: &str = "mend_unreadable_key";

/// The error code of a retry parked because the object its payload was kept in is gone.
pub const PAYLOAD_GONE: &str = "mend_payload_gone";

/// The error code of a message parked because its NATS headers cannot be read.
pub const UNREADABLE_HEADERS: &str = "mend_unreadable_headers";

/// Everything the deliveries of one binding share.
pub struct BindingRuntime {
    pub service: String,
    pub cfg: BindingConfig,
    pub app: App,
    /// Request header values shared by every message of the binding.
    pub fixed_headers: headers::BindingHeaders,
    pub client: Client,
    pub js: jetstream::Context,
    /// Which connection of the client deliveries came on.
    pub epoch: ack::Epoch,
    pub circuit: Circuit,
    pub shutdown: CancellationToken,
    pub shutdown_timeout: Duration,
    /// Opens the app stream's own connection ([`Puller`]).
    pub connector: Arc<crate::common::nats::Connector>,
    pub metrics: BindingMetrics,
    /// The binding's holds (bindings with a key only).
    pub holds: Option<Holds>,
    /// Bulk delivery's batching of app calls, when the binding has `batch`.
    pub batcher: Option<crate::runtime::batcher::Batcher>,
}

/// Metric handles of one binding, labelled once.
pub struct BindingMetrics {
    pub delivered: Counter,
    pub failed_transient: Counter,
    pub failed_message: Counter,
    pub failed_exhausted: Counter,
    pub delegated: Counter,
    pub dropped: Counter,
    pub parked: Counter,
    pub redelivered: Counter,
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub latency: Histogram,
    pub pending: Gauge,
    pub ack_pending: Gauge,
    pub circuit: Gauge,
    pub held_keys: Gauge,
    pub held_messages: Gauge,
    pub hold_oldest_age: Gauge,
    pub hold_alerts: Gauge,
    pub releases: Counter,
    pub commands: Counter,
}

impl BindingMetrics {
    pub fn new(service: &str, binding: &str) -> Self {
        let l = [
            ("service", service.to_owned()),
            ("binding", binding.to_owned()),
        ];
        let failed = |kind: &'static str| {
            let mut labels = l.to_vec();
            labels.push(("kind", kind.to_owned()));
            metrics::counter!(t::FAILED, &labels)
        };
        Self {
            delivered: metrics::counter!(t::DELIVERED, &l),
            failed_transient: failed("transient"),
            failed_message: failed("message"),
            failed_exhausted: failed("transient_exhausted"),
            delegated: metrics::counter!(t::DELEGATED, &l),
            dropped: metrics::counter!(t::DROPPED, &l),
            parked: metrics::counter!(t::PARKED_BY_APP, &l),
            redelivered: metrics::counter!(t::REDELIVERED_WHILE_BUFFERED, &l),
            in_flight: metrics::gauge!(t::IN_FLIGHT, &l),
            queued: metrics::gauge!(t::QUEUED, &l),
            latency: metrics::histogram!(t::APP_LATENCY, &l),
            pending: metrics::gauge!(t::CONSUMER_PENDING, &l),
            ack_pending: metrics::gauge!(t::CONSUMER_ACK_PENDING, &l),
            circuit: metrics::gauge!(t::CIRCUIT_OPEN, &l),
            held_keys: metrics::gauge!(t::HELD_KEYS, &l),
            held_messages: metrics::gauge!(t::HELD_MESSAGES, &l),
            hold_oldest_age: metrics::gauge!(t::HOLD_OLDEST_AGE, &l),
            hold_alerts: metrics::gauge!(t::HOLD_ALERTS, &l),
            releases: metrics::counter!(t::RELEASES, &l),
            commands: metrics::counter!(t::CONTROL_COMMANDS, &l),
        }
    }
}

impl BindingRuntime {
    /// The consumer's max ack pending, derived from the binding's concurrency. With bulk delivery
    /// twice its messages in flight: enough for full batches of distinct keys without holding
    /// `BUFFER_PER_SLOT` times thousands of messages.
    pub fn max_ack_pending(cfg: &BindingConfig) -> usize {
        (cfg.concurrency * BUFFER_PER_SLOT).max(cfg.slots() * 2)
    }
}
