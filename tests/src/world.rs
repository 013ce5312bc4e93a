//! A test's world: its own nats-server, the app's stream `APP` on `app.>`, and a [`FakeApp`].

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use serde_json::json;

use crate::app::FakeApp;
use crate::js::{self, Out};
use crate::mend::{MendProcess, processor_config, sidecar_config};
use crate::nats::NatsServer;

/// The app's stream in every world.
pub const STREAM: &str = "APP";
/// The key header of keyed messages.
pub const KEY_HEADER: &str = "Account-Id";
/// Every test gets this long to reach its end state.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

pub struct World {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub app: FakeApp,
}

impl World {
    pub async fn new() -> anyhow::Result<Self> {
        Self::with_server(NatsServer::start().await?).await
    }

    pub async fn with_server(nats: NatsServer) -> anyhow::Result<Self> {
        crate::init();
        let client = nats.client().await?;
        let js = jetstream::new(client.clone());
        js::app_stream(&js, STREAM, &["app.>"]).await?;
        let app = FakeApp::start().await?;
        Ok(Self {
            nats,
            client,
            js,
            app,
        })
    }

    /// The config of a sidecar for service `svc` keyed by [`KEY_HEADER`], plus `extra` binding keys.
    pub fn keyed_config(&self, svc: &str, extra: &str) -> String {
        sidecar_config(
            svc,
            &self.nats.url(),
            STREAM,
            &["app.>"],
            &self.app.endpoint(),
            &format!("key = {{ header = \"{KEY_HEADER}\" }}\n{extra}"),
        )
    }

    /// Starts a sidecar with `config` and waits until it consumes.
    pub async fn sidecar(&self, config: &str) -> anyhow::Result<MendProcess> {
        let p = MendProcess::start("sidecar", config).await?;
        p.ready().await?;
        Ok(p)
    }

    /// Starts a processor on this world's server with the rules at `rules` (and `extra` keys) and
    /// waits until it consumes.
    pub async fn processor(&self, rules: &Path, extra: &str) -> anyhow::Result<MendProcess> {
        let config = processor_config(&self.nats.url(), rules, extra);
        let p = MendProcess::start("processor", &config).await?;
        p.ready().await?;
        Ok(p)
    }

    /// Publishes `n` messages `{"key": "k<i % keys>", "n": i}` on `app.created`, keyed by header.
    pub async fn publish_keyed(&self, n: usize, keys: usize) -> anyhow::Result<Vec<u64>> {
        self.publish_with_keys(n, |i| format!("k{}", i % keys))
            .await
    }

    /// Publishes `n` messages on `app.created`; message `i` has key `key(i)` and JSON
    /// `{"key": key(i), "n": i}`.
    pub async fn publish_with_keys(
        &self,
        n: usize,
        key: impl Fn(usize) -> String,
    ) -> anyhow::Result<Vec<u64>> {
        let msgs = (0..n)
            .map(|i| {
                let key = key(i);
                Out::keyed("app.created", KEY_HEADER, &key, json!({"key": key, "n": i}))
            })
            .collect();
        js::publish_all(&self.js, msgs).await
    }

    /// SIGKILLs `sidecar` and starts it again three times, once the app has seen each fifth of
    /// `total` requests (up to three fifths).
    pub async fn kill_three_times(
        &self,
        sidecar: &mut MendProcess,
        total: u64,
    ) -> anyhow::Result<()> {
        for round in 1..=3u64 {
            let reached = round * total / 5;
            self.app
                .wait_for(
                    &format!("{reached} requests before kill {round}"),
                    TEST_TIMEOUT,
                    |log| log.len() as u64 >= reached,
                )
                .await?;
            sidecar.kill().await?;
            sidecar.restart().await?;
            sidecar.ready().await?;
        }
        Ok(())
    }

    /// [`World::kill_three_times`], then what no crash may break: every one of the `total` messages
    /// that is not `failing` delivered, the consumer of `svc` drained, first successes in key
    /// order, and each failing one delegated exactly once.
    pub async fn survives_three_kills(
        &self,
        sidecar: &mut MendProcess,
        svc: &str,
        total: u64,
        failing: impl Fn(u64) -> bool,
    ) -> anyhow::Result<()> {
        use std::collections::HashSet;
        self.kill_three_times(sidecar, total).await?;
        let expect_ok: HashSet<u64> = (0..total).filter(|n| !failing(*n)).collect();
        let log = self.delivered(&expect_ok).await?;
        self.drained(svc).await?;
        first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
        let expect_failed: HashSet<u64> = (0..total).filter(|n| failing(*n)).collect();
        delegated_once(&self.js, svc, &expect_failed).await
    }

    /// Waits until every `n` of `expect` went through (a 2xx) and returns the app's log.
    pub async fn delivered(
        &self,
        expect: &std::collections::HashSet<u64>,
    ) -> anyhow::Result<Vec<crate::app::Delivery>> {
        self.app
            .wait_for("every good message delivered", TEST_TIMEOUT, |log| {
                let ok: std::collections::HashSet<u64> = log
                    .iter()
                    .filter(|d| d.ok())
                    .map(crate::app::Delivery::n)
                    .collect();
                expect.is_subset(&ok)
            })
            .await
    }

    /// Waits until the sidecar's consumer for `svc` has nothing pending or unacked.
    pub async fn drained(&self, svc: &str) -> anyhow::Result<()> {
        js::consumer_drained(&self.js, STREAM, &format!("mend-{svc}-{svc}"), TEST_TIMEOUT).await
    }
}

/// The `n` of each successful delivery, per key, in the order the app saw them.
pub fn successes_by_key(
    log: &[crate::app::Delivery],
) -> std::collections::BTreeMap<String, Vec<u64>> {
    let mut out: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for d in log.iter().filter(|d| d.ok()) {
        let key = d
            .field("key")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        let n = d.field("n").and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
        out.entry(key).or_default().push(n);
    }
    out
}

/// Whether every key's successful deliveries are in increasing order of `n`, first deliveries only.
pub fn first_successes_in_order(log: &[crate::app::Delivery]) -> Result<(), String> {
    for (key, ns) in successes_by_key(log) {
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<u64> = ns.into_iter().filter(|n| seen.insert(*n)).collect();
        if firsts.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("key {key} out of order: {firsts:?}"));
        }
    }
    Ok(())
}

/// Checks the failure envelopes of service `svc` on MEND_FAILED: no lineage delegated twice, and
/// exactly the messages whose `n` is in `expect` delegated.
pub async fn delegated_once(
    js: &jetstream::Context,
    svc: &str,
    expect: &std::collections::HashSet<u64>,
) -> anyhow::Result<()> {
    let failed = js::failed(js, svc).await?;
    let mut per_id: std::collections::HashMap<String, usize> = Default::default();
    for e in &failed {
        *per_id.entry(e.id.clone()).or_default() += 1;
    }
    anyhow::ensure!(
        per_id.values().all(|&c| c == 1),
        "a failure delegated twice: {per_id:?}"
    );
    let delegated: std::collections::HashSet<u64> = failed
        .iter()
        .filter_map(|e| e.payload["n"].as_u64())
        .collect();
    anyhow::ensure!(
        &delegated == expect,
        "delegated {delegated:?}, expected {expect:?}"
    );
    Ok(())
}
