//! What every role shares: reading configuration, the NATS connection and mend's layout on it,
//! publishing, acks, leases, payloads kept by reference, live rules, the ops endpoint, logs and
//! metrics. Nothing here knows a role.

pub mod ack;
pub mod backoff;
pub mod config;
pub mod envcfg;
pub mod lease;
pub mod nats;
pub mod ops;
pub mod otel;
pub mod payloads;
pub mod publish;
pub mod role;
pub mod rules_live;
pub mod subject_counts;
pub mod telemetry;
