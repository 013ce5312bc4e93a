//! The `mend` binary's library: every role of the one executable, in one folder each, and what
//! they share.
//!
//! # Layout
//! - [`cli`]: the command line (`mend sidecar|processor|dashboard|dev|rules|hash-password`), which
//!   loads a role's configuration and runs it.
//! - [`runtime`]: `mend sidecar`, the binding runtime beside an app: leases, one dispatcher per
//!   binding (intake, the app call, holds and releases, settling), the router of retries and
//!   commands.
//! - [`processor`]: `mend processor`, failures from MEND_FAILED through the rules to a retry or the
//!   dashboard.
//! - [`dashboard`]: `mend dashboard`, NATS, the store and the rules handed to the `mend-dashboard`
//!   crate, which serves the UI and the API.
//! - [`dev`]: `mend dev`, a nats-server child, a demo app and producer, and the three roles in one
//!   process.
//! - [`common`]: what every role uses (configuration reading, the NATS connection and mend's layout,
//!   publishing, acks, leases, payloads by reference, live rules, the ops endpoint, telemetry).
//!   Nothing in it depends on a role.

pub mod cli;
pub mod common;
pub mod dashboard;
pub mod dev;
pub mod processor;
pub mod runtime;

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
