//! The shared test harness of mend's end-to-end suites (and the benchmark).
//!
//! - [`nats::NatsServer`]: a real nats-server with JetStream on a free loopback port and a temp store,
//!   ready when it says so, restartable on the same port and store, killed on drop.
//! - [`cluster::Cluster`]: three nats-server nodes with routes on loopback and JetStream, ready once a
//!   meta leader is elected; nodes can be killed, restarted, paused and resumed, and stream leaders
//!   found.
//! - [`app::FakeApp`]: a programmable HTTP app that records every delivery and answers per message.
//! - [`mend::MendProcess`]: the built `mend` binary run with a config, killable and restartable.
//! - [`dashboard::Dashboard`]: `mend dashboard` on a temp SQLite file, with a client for its API.
//! - [`js`]: publishing, reading mend's streams, and consumer state.
//! - [`postgres::Postgres`]: a throw-away PostgreSQL server on a free loopback port and a temp
//!   cluster, ready when a query answers, stopped and deleted on drop.
//! - [`proxy::NatsProxy`]: a loopback proxy that stalls clients' writes from a chosen publish on,
//!   without closing their connections, and sends them on later (a partition, a stuck host).
//! - [`wait`]: waiting for conditions with a deadline (never sleeping and hoping).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness code

pub mod app;
pub mod cluster;
pub mod dashboard;
pub mod js;
pub mod mend;
pub mod nats;
pub mod otlp;
pub mod postgres;
pub mod proxy;
pub mod wait;

use std::path::PathBuf;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Starts test logging once (`RUST_LOG` filters; quiet by default).
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::new());
    });
}

pub mod world;
