//! Header names of the mend contract (SPEC §3, §4), declared once so no role spells them twice.

/// The lineage id `<stream>:<sequence>` of the original message; the app's idempotency key.
pub const MEND_ID: &str = "Mend-Id";
/// The business key of the message, when its binding has one.
pub const MEND_KEY: &str = "Mend-Key";
/// The service whose sidecar delivered the message.
pub const MEND_SERVICE: &str = "Mend-Service";
/// How many deliveries of this lineage the app has seen, counting this one (1 for the original).
pub const MEND_ATTEMPT: &str = "Mend-Attempt";
/// Rule names that repaired this lineage, comma-separated.
pub const MEND_REPAIRED_BY: &str = "Mend-Repaired-By";
/// The dashboard user who resubmitted this lineage.
pub const MEND_RESUBMITTED_BY: &str = "Mend-Resubmitted-By";
/// The subject the original message was published on.
pub const MEND_ORIGINAL_SUBJECT: &str = "Mend-Original-Subject";
/// The app's instruction on an answer: `drop` or `park`.
pub const MEND_ACTION: &str = "Mend-Action";
/// JetStream's de-duplication id; every message mend publishes carries one.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context, propagated from the message to the app call and onward.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace context vendor state.
pub const TRACESTATE: &str = "tracestate";
