//! mend on a three-node JetStream cluster with R3 streams and buckets (SPEC §8.6): every role starts
//! while the cluster elects its leaders, connects by a seed list, and the flow goes through.

use std::time::Duration;

use async_nats::jetstream;
use mend_e2e::app::FakeApp;
use mend_e2e::cluster::Cluster;
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{MendProcess, example_rules, processor_config, sidecar_config};
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT};

/// mend's streams and buckets as R3, on every role.
const R3: &str = "[nats]\nreplicas = 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_starts_while_the_cluster_elects_and_connects_by_seed_list() -> anyhow::Result<()>
{
    mend_e2e::init();
    let mut cluster = Cluster::start().await?;
    let js = jetstream::new(cluster.client().await?);
    mend_e2e::cluster::r3_stream(&js, "APP", &["app.>"]).await?;
    let app = FakeApp::start().await?;
    let seeds = cluster.seed_list();

    // The meta leader goes away; the roles start at once, while the other two elect a new one and
    // every JetStream request of theirs goes unanswered meanwhile.
    let meta = cluster.meta_leader_index().await?;
    cluster.kill(meta).await?;
    let sidecar_cfg = format!(
        "{}{R3}",
        sidecar_config(
            "cl",
            &seeds,
            "APP",
            &["app.>"],
            &app.endpoint(),
            &format!("key = {{ header = \"{KEY_HEADER}\" }}"),
        )
    );
    let sidecar = MendProcess::start("sidecar", &sidecar_cfg).await?;
    let processor =
        MendProcess::start("processor", &processor_config(&seeds, &example_rules(), R3)).await?;
    let started = tokio::try_join!(
        sidecar.wait_log("Sidecar consuming", Duration::from_secs(90)),
        processor.wait_log("Processor consuming", Duration::from_secs(90)),
    );
    if let Err(e) = started {
        anyhow::bail!(
            "{e:#}\n--- sidecar ---\n{}\n--- processor ---\n{}\n--- cluster ---\n{}",
            sidecar.log(),
            processor.log(),
            cluster.logs()
        );
    }
    cluster.restart(meta).await?;

    // mend's layout is R3, and the flow goes through.
    for name in [
        "MEND_FAILED",
        "MEND_HOLD",
        "KV_mend_holds",
        "KV_mend_leases",
        "OBJ_mend_payloads",
    ] {
        let info = cluster.stream_info(name).await?;
        assert_eq!(info["config"]["num_replicas"], 3, "{name}: {info}");
    }
    let msgs = (0..20)
        .map(|i| {
            Out::keyed(
                "app.created",
                KEY_HEADER,
                &format!("k{}", i % 4),
                serde_json::json!({"n": i}),
            )
        })
        .collect();
    js::publish_all(&js, msgs).await?;
    app.wait_for("20 deliveries", TEST_TIMEOUT, |log| log.len() >= 20)
        .await?;
    for p in [&sidecar, &processor] {
        assert!(!p.log().contains("panicked"), "{}", p.log());
        assert!(!p.log().contains("Cannot start"), "{}", p.log());
    }
    Ok(())
}
