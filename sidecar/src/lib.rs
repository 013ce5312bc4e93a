//! The `mend` binary's library: every role's runtime, NATS and HTTP plumbing.
//!
//! # Layout
//! Modules follow a message through the sidecar:
//! - [`cli`] parses the command line; [`config`] and [`envcfg`] read the TOML config and `MEND_*`
//!   overrides into typed values.
//! - [`nats`] connects and creates mend's streams; [`sidecar`] binds the consumers and starts one
//!   dispatcher per binding.
//! - [`consume`] pulls, puts each message in its key's lane ([`lanes`]), and drives it through
//!   [`deliver`] (the app call and its classification, with [`headers`]) to one ending: [`ack`],
//!   [`delegate`] (failure envelope, events, through [`publish`]), drop or park. [`circuit`] notices an app that is down.
//! - [`processor`] is `mend processor`: failures from MEND_FAILED through the rules to a retry or
//!   the dashboard, with [`rules_live`] reloading the rules on change. [`rules_cli`] is
//!   `mend rules check` and `mend rules try`.
//! - [`retry`] consumes `mend.retry.<service>` and routes repaired and resubmitted messages to
//!   their binding's lanes.
//! - [`dashboard`] is `mend dashboard` (and `mend hash-password`): NATS, the store and the rules
//!   handed to the `mend-dashboard` crate, which serves the UI and the API.
//! - [`dev`] is `mend dev`: a nats-server child, a demo app and producer, and the three roles in
//!   one process.
//! - [`health`] serves `/healthz`, `/readyz`, `/metrics`; [`telemetry`] sets up logs and metrics.

pub mod ack;
pub mod circuit;
pub mod cli;
pub mod config;
pub mod consume;
pub mod dashboard;
pub mod delegate;
pub mod deliver;
pub mod dev;
pub mod envcfg;
pub mod headers;
pub mod health;
pub mod holds;
pub mod lanes;
pub mod lease;
pub mod nats;
pub mod payloads;
pub mod processor;
pub mod publish;
pub mod release;
pub mod rescue;
pub mod retry;
pub mod rules_cli;
pub mod rules_live;
pub mod sidecar;
pub mod telemetry;

/// How a role's `run` ended badly; the command line maps each to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration or the rules cannot be used.
    #[error("{0:#}")]
    Config(anyhow::Error),
    /// Could not start: NATS unreachable or too old, an app stream missing, a port taken.
    #[error("{0:#}")]
    Startup(anyhow::Error),
    /// Failed while running.
    #[error("{0:#}")]
    Runtime(anyhow::Error),
}
