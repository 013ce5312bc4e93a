//! Crashes and restarts: the sidecar SIGKILLed mid-run, nats-server restarted, a graceful SIGTERM.
//! Nothing is lost and no failure is delegated twice (SPEC §4 delegation order, §8 guarantee 1).

use std::collections::HashSet;
use std::time::Duration;

use mend_e2e::app::Reply;
use mend_e2e::js;
use mend_e2e::mend::with_top_level;
use mend_e2e::world::{TEST_TIMEOUT, World, first_successes_in_order};

/// Messages with n % 97 == 5 fail with 422.
fn failing(n: u64) -> bool {
    n % 97 == 5
}

/// Message `i`'s key: one of `keys` shared ones, or its own when it fails.
fn own_key_if_failing(i: usize, keys: usize) -> String {
    if failing(i as u64) {
        format!("f{i}")
    } else {
        format!("k{}", i % keys)
    }
}

const CRASHY: &str = "timeout = \"1s\"\nack_wait = \"2s\"\nconcurrency = 16";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_three_times_loses_nothing_and_delegates_once() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| {
        if failing(d.n()) {
            Reply::Status(422)
        } else {
            Reply::Ok
        }
    });
    let total = 5_000u64;
    // A failing message holds its key (no processor here): it has a key of its own.
    let seqs = w
        .publish_with_keys(total as usize, |i| own_key_if_failing(i, 50))
        .await?;
    // A killed sidecar's lease runs out before its restart takes over: a short one.
    let config = with_top_level(&w.keyed_config("crash", CRASHY), "lease_ttl = \"2s\"");
    let mut sidecar = w.sidecar(&config).await?;

    w.survives_three_kills(&mut sidecar, "crash", total, failing)
        .await?;
    assert_eq!(seqs.len() as u64, total);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_run_loses_nothing() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    w.app.script(|d| {
        if failing(d.n()) {
            Reply::Status(422)
        } else {
            Reply::Ok
        }
    });
    let total = 3_000u64;
    w.publish_with_keys(total as usize, |i| own_key_if_failing(i, 30))
        .await?;
    let sidecar = w.sidecar(&w.keyed_config("bounce", CRASHY)).await?;
    w.app
        .wait_for("a third delivered", TEST_TIMEOUT, |log| {
            log.len() as u64 >= total / 3
        })
        .await?;
    w.nats.restart().await?;

    let expect_ok: HashSet<u64> = (0..total).filter(|n| !failing(*n)).collect();
    let log = w
        .app
        .wait_for(
            "every good message delivered after the restart",
            TEST_TIMEOUT,
            |log| {
                let ok: HashSet<u64> = log
                    .iter()
                    .filter(|d| d.ok())
                    .map(mend_e2e::app::Delivery::n)
                    .collect();
                expect_ok.is_subset(&ok)
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", sidecar.log()))?;
    let client = w.nats.client().await?;
    let js2 = async_nats::jetstream::new(client);
    js::consumer_drained(&js2, "APP", "mend-bounce-bounce", TEST_TIMEOUT).await?;
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    let failed = js::failed(&js2, "bounce").await?;
    let delegated: HashSet<u64> = failed
        .iter()
        .map(|e| e.payload["n"].as_u64().unwrap())
        .collect();
    let expect_failed: HashSet<u64> = (0..total).filter(|n| failing(*n)).collect();
    assert_eq!(delegated, expect_failed);
    assert_eq!(
        failed.len(),
        expect_failed.len(),
        "no failure delegated twice"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_and_hands_back_the_rest() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|_| Reply::Slow(Duration::from_millis(300)));
    w.publish_keyed(200, 4).await?;
    let mut sidecar = w
        .sidecar(&w.keyed_config("term", "ack_wait = \"60s\""))
        .await?;
    w.app
        .wait_for("some deliveries", TEST_TIMEOUT, |log| log.len() >= 4)
        .await?;
    let status = sidecar.terminate(Duration::from_secs(15)).await?;
    assert!(
        status.success(),
        "graceful exit: {status:?}\n{}",
        sidecar.log()
    );
    assert!(
        sidecar.log().contains("Sidecar stopped"),
        "{}",
        sidecar.log()
    );
    let delivered_before = w.app.log().len();
    assert!(delivered_before < 200, "it stopped before the end");

    // Nothing was abandoned: what was not finished was handed back, so the next run gets it at once,
    // long before the 60 s ack wait would bring back an abandoned message.
    w.app.script(|_| Reply::Ok);
    sidecar.restart().await?;
    sidecar.ready().await?;
    let log = w
        .app
        .wait_for("the rest delivered", Duration::from_secs(30), |log| {
            log.iter()
                .filter(|d| d.ok())
                .map(mend_e2e::app::Delivery::n)
                .collect::<HashSet<_>>()
                .len()
                >= 200
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\nsidecar log:\n{}", sidecar.log()))?;
    js::consumer_drained(&w.js, "APP", "mend-term-term", Duration::from_secs(30)).await?;
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    Ok(())
}
