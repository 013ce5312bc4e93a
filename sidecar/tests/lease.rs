//! Single-owner leases against a real nats-server: one holder at a time, a prompt handover on
//! release, a takeover only after the ttl when the holder crashes, and `lost()` when the entry is
//! overwritten or NATS goes away.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use mend::common::config::NatsConfig;
use mend::common::lease::{Lease, Stopped, lease_key};
use mend_e2e::nats::NatsServer;
use repair_rules::identity::buckets;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(1);
/// Bound on anything that should happen "at once" (a few polls of a waiter).
const PROMPT: Duration = Duration::from_secs(1);

async fn setup() -> anyhow::Result<(NatsServer, jetstream::Context, kv::Store)> {
    // Shown when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("mend=debug")
        .try_init();
    let nats = NatsServer::start().await?;
    let js = jetstream::new(nats.client().await?);
    mend::common::nats::ensure_layout(&js, &NatsConfig::default(), &Default::default()).await?;
    let kv = js.get_key_value(buckets::LEASES).await?;
    Ok((nats, js, kv))
}

fn acquire(
    js: &jetstream::Context,
    partition: u32,
    owner: &'static str,
    stop: &CancellationToken,
) -> JoinHandle<Result<Lease, Stopped>> {
    let (js, stop) = (js.clone(), stop.clone());
    tokio::spawn(async move {
        Lease::acquire(&js, "orders", "orders", partition, owner, TTL, &stop).await
    })
}

fn owner_of(entry: &kv::Entry) -> String {
    let value: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
    value["owner"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_handover_on_release_takeover_after_a_crash() -> anyhow::Result<()> {
    let (_nats, js, kv) = setup().await?;
    let key = lease_key("orders", "orders", 0);
    let stop = CancellationToken::new();

    let a = timeout(PROMPT, acquire(&js, 0, "a", &stop)).await???;
    let first = kv.entry(key.as_str()).await?.expect("entry");
    assert_eq!(owner_of(&first), "a");
    let value: serde_json::Value = serde_json::from_slice(&first.value)?;
    assert_eq!(value["ttl_ms"], 1000);
    assert!(value["nonce"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(value["acquired"].as_str().is_some_and(|t| t.ends_with('Z')));

    // B waits as long as A renews: more than twice the ttl.
    let mut b = acquire(&js, 0, "b", &stop);
    assert!(
        timeout(TTL * 5 / 2, &mut b).await.is_err(),
        "B acquired a held lease"
    );
    assert!(!a.lost().is_cancelled());
    let renewed = kv.entry(key.as_str()).await?.expect("entry");
    assert!(renewed.revision > first.revision, "A did not renew");
    assert_eq!(
        renewed.value, first.value,
        "a renewal rewrites the same value"
    );

    // A releases: B takes over at once.
    let lost = a.lost();
    let released = Instant::now();
    a.release().await;
    assert!(lost.is_cancelled());
    let b = timeout(PROMPT, b).await???;
    assert!(
        released.elapsed() < TTL / 2,
        "handover took {:?}",
        released.elapsed()
    );
    assert_eq!(
        owner_of(&kv.entry(key.as_str()).await?.expect("entry")),
        "b"
    );

    // C waits behind B; B crashes (dropped without release). C takes over one ttl after B's last
    // renewal, not before: the watch sees every revision with the server's time.
    let mut watch = kv.watch(key.as_str()).await?;
    let mut c = acquire(&js, 0, "c", &stop);
    assert!(
        timeout(TTL / 2, &mut c).await.is_err(),
        "C acquired a held lease"
    );
    let b_lost = b.lost();
    drop(b);
    let crashed = Instant::now();
    assert!(b_lost.is_cancelled());
    let c = timeout(TTL * 2, c).await???;
    let took = crashed.elapsed();
    assert!(took >= TTL / 2, "C took over {took:?} after B stopped");
    let mut last_of_b = None;
    let taken = loop {
        let entry = timeout(PROMPT, watch.next()).await?.expect("watch")?;
        match owner_of(&entry).as_str() {
            "b" => last_of_b = Some(entry),
            "c" => break entry,
            other => panic!("unexpected owner {other}"),
        }
    };
    let last_of_b = last_of_b.expect("B renewed while C waited");
    // Both times are the server's clock.
    let quiet =
        SystemTime::from(taken.created).duration_since(SystemTime::from(last_of_b.created))?;
    assert!(quiet >= TTL, "C took over after {quiet:?} without renewal");
    assert!(!c.lost().is_cancelled());
    c.release().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_entry_is_lost_and_a_waiter_stops_on_shutdown() -> anyhow::Result<()> {
    let (_nats, js, kv) = setup().await?;
    let key = lease_key("orders", "orders", 1);
    let stop = CancellationToken::new();
    let a = timeout(PROMPT, acquire(&js, 1, "a", &stop)).await???;

    // A waiter gives up when shutdown comes first.
    let waiter_stop = CancellationToken::new();
    let mut waiter = acquire(&js, 1, "w", &waiter_stop);
    assert!(timeout(TTL / 2, &mut waiter).await.is_err());
    waiter_stop.cancel();
    assert!(matches!(timeout(PROMPT, waiter).await??, Err(Stopped)));

    // Someone else writes the entry: A's next renewal finds it and A loses the lease.
    kv.put(key.as_str(), r#"{"owner":"intruder","ttl_ms":1000}"#.into())
        .await?;
    timeout(TTL, a.lost().cancelled()).await?;
    // Releasing a lost lease leaves the other's entry alone.
    a.release().await;
    let entry = kv.entry(key.as_str()).await?.expect("entry");
    assert_eq!(entry.operation, kv::Operation::Put);
    assert_eq!(owner_of(&entry), "intruder");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_from_nats_loses_the_lease_within_the_ttl() -> anyhow::Result<()> {
    let (mut nats, js, _kv) = setup().await?;
    let stop = CancellationToken::new();
    let a = timeout(PROMPT, acquire(&js, 2, "a", &stop)).await???;

    nats.stop().await?;
    let stopped = Instant::now();
    timeout(TTL, a.lost().cancelled()).await?;
    assert!(
        stopped.elapsed() < TTL,
        "lost after {:?}",
        stopped.elapsed()
    );

    // Back up (same store): the crashed-looking entry is taken over by the next instance, by A's
    // own release's delete if it gets through, or after the ttl.
    nats.restart().await?;
    let release = tokio::spawn(a.release());
    let b = timeout(TTL * 10, acquire(&js, 2, "b", &stop)).await???;
    timeout(TTL * 2, release).await??;
    assert!(!b.lost().is_cancelled());
    b.release().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ran_out_is_taken_back_at_once_when_nobody_wrote_it() -> anyhow::Result<()> {
    // Renewals that cannot be answered (here: the server is down; on a cluster: the bucket's
    // stream electing a leader) make the lease run out. Once NATS answers again, the entry still
    // holds the holder's last write: nobody took it, so the holder takes it back at once instead
    // of waiting a ttl like any other instance.
    const LONG: Duration = Duration::from_secs(4);
    let (mut nats, js, kv) = setup().await?;
    let key = lease_key("orders", "orders", 3);
    let stop = CancellationToken::new();
    let a = timeout(
        PROMPT,
        Lease::acquire(&js, "orders", "orders", 3, "a", LONG, &stop),
    )
    .await??;
    let before = kv.entry(key.as_str()).await?.expect("entry");

    nats.stop().await?;
    timeout(LONG, a.lost().cancelled()).await?;
    let reclaim = a.expired().await;
    assert!(reclaim.is_some(), "an expired lease can be reclaimed");
    nats.restart().await?;

    let started = Instant::now();
    let mut noting = |_: &str| {};
    let a = timeout(
        LONG * 2,
        Lease::acquire_noting(
            &js,
            "orders",
            "orders",
            3,
            "a",
            LONG,
            &stop,
            &mut noting,
            reclaim,
        ),
    )
    .await??;
    let took = started.elapsed();
    // Any instance without the reclaim watches the entry for a full ttl before taking it over.
    assert!(took < LONG, "taken back after {took:?}");
    let after = kv.entry(key.as_str()).await?.expect("entry");
    assert!(after.revision > before.revision);
    assert_eq!(owner_of(&after), "a");
    assert!(!a.lost().is_cancelled());

    // A lease that was taken by someone else is not reclaimed: the entry is not ours any more.
    kv.put(key.as_str(), r#"{"owner":"b","ttl_ms":4000}"#.into())
        .await?;
    timeout(LONG, a.lost().cancelled()).await?;
    assert!(
        a.expired().await.is_none(),
        "a taken lease is not reclaimable"
    );
    Ok(())
}
