//! Scaling out (SPEC §7, §11): one sidecar at a time owns a (binding, partition) through its lease,
//! so a standby takes over a killed sidecar without two ever racing on a key; partitions split a
//! binding's keys between instances, and retries and commands reach the instance that owns their
//! key's partition whichever instance pulled them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use mend_e2e::app::{Delivery, FakeApp, Reply};
use mend_e2e::js::{self, Out};
use mend_e2e::mend::{
    MendProcess, example_rules, processor_config, readyz, refused, sidecar_config, with_top_level,
};
use mend_e2e::wait;
use mend_e2e::world::{KEY_HEADER, TEST_TIMEOUT, World, first_successes_in_order};
use serde_json::json;

/// Short leases keep the tests quick: a standby takes over about this long after a kill.
const LEASE_TTL: &str = "2s";
/// Ack waits of the bindings under test: a killed sidecar's unacked messages come back after it.
const TIMINGS: &str = "ack_wait = \"3s\"\ntimeout = \"1s\"";

fn key_of(d: &Delivery) -> String {
    d.header("mend-key").unwrap_or_default().to_owned()
}

fn with_lease_ttl(config: &str) -> String {
    with_top_level(config, &format!("lease_ttl = \"{LEASE_TTL}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_sidecar_and_keeps_per_key_order() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|_| Reply::Slow(Duration::from_millis(50)));
    // The same config twice, apart from the port of the operations endpoint.
    let configs = [
        with_lease_ttl(&w.keyed_config("lease", TIMINGS)),
        with_lease_ttl(&w.keyed_config("lease", TIMINGS)),
    ];
    let mut sidecars = Vec::new();
    for config in &configs {
        sidecars.push(MendProcess::start("sidecar", config).await?);
    }

    // Exactly one of them consumes; the other says it waits for the lease, and who holds it.
    let (active, standby) = wait::until("one sidecar ready", TEST_TIMEOUT, || async {
        let (a, b) = (readyz(&configs[0]).await?, readyz(&configs[1]).await?);
        Ok(match (a.0, b.0) {
            (200, 200) => Some(Err(anyhow::anyhow!("both sidecars ready at once"))),
            (200, _) => Some(Ok((0, 1))),
            (_, 200) => Some(Ok((1, 0))),
            _ => None,
        })
    })
    .await??;
    let body = wait::until("the standby names the holder", TEST_TIMEOUT, || async {
        let (status, body) = readyz(&configs[standby]).await?;
        assert_eq!(status, 503, "{body}");
        if !body.contains("held by") {
            anyhow::bail!("/readyz says {body:?}");
        }
        Ok(Some(body))
    })
    .await?;
    assert!(
        body.contains("binding lease: waiting for the lease held by"),
        "{body}"
    );

    let total = 1000u64;
    w.publish_keyed(total as usize, 20).await?;
    w.app
        .wait_for("some deliveries", TEST_TIMEOUT, |log| log.len() >= 200)
        .await?;
    let (status, body) = readyz(&configs[standby]).await?;
    assert_eq!(status, 503, "the standby was ready before the kill: {body}");
    assert!(body.contains("waiting for the lease"), "{body}");
    assert!(
        !sidecars[standby].log().contains("Sidecar consuming"),
        "{}",
        sidecars[standby].log()
    );
    let before_kill = w.app.log().len();
    assert!(before_kill < total as usize, "killed before the end");

    sidecars[active].kill().await?;
    let killed = Instant::now();
    wait::until("the standby ready", TEST_TIMEOUT, || async {
        Ok((readyz(&configs[standby]).await?.0 == 200).then_some(()))
    })
    .await?;
    let took = killed.elapsed();
    // The lease's ttl, one poll of the waiter, and slack for a slow machine.
    assert!(
        took < Duration::from_secs(8),
        "took over after {took:?}\n{}",
        sidecars[standby].log()
    );
    assert!(
        sidecars[standby].log().contains("Lease taken over"),
        "{}",
        sidecars[standby].log()
    );

    let log = w
        .app
        .wait_for("every message delivered", TEST_TIMEOUT, |log| {
            let ok: HashSet<u64> = log.iter().filter(|d| d.ok()).map(Delivery::n).collect();
            ok.len() as u64 >= total
        })
        .await?;
    w.drained("lease").await?;
    let ok: HashSet<u64> = log.iter().filter(|d| d.ok()).map(Delivery::n).collect();
    assert_eq!(ok, (0..total).collect(), "nothing lost");
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Another instance writing the lease entry (here the test, as an "intruder" that never renews) makes
/// the holder stop at once; it takes the lease back when the intruder's ttl has passed and goes on
/// where it stopped, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_loses_its_lease_stops_and_later_takes_it_back() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|_| Reply::Slow(Duration::from_millis(20)));
    let config = with_lease_ttl(&w.keyed_config("loss", TIMINGS));
    let s = w.sidecar(&config).await?;
    let total = 1000u64;
    w.publish_keyed(total as usize, 10).await?;
    w.app
        .wait_for("some deliveries", TEST_TIMEOUT, |log| log.len() >= 100)
        .await?;

    let leases = w.js.get_key_value("mend_leases").await?;
    let intruder = json!({"owner": "intruder", "nonce": "x", "ttl_ms": 2000, "acquired": ""});
    leases
        .put("loss.loss.0", intruder.to_string().into())
        .await?;
    wait::until("the sidecar stops", TEST_TIMEOUT, || async {
        let (status, body) = readyz(&config).await?;
        Ok(
            (status == 503 && body.contains("waiting for the lease held by intruder"))
                .then_some(()),
        )
    })
    .await?;
    s.wait_log("Lease lost", TEST_TIMEOUT).await?;
    // Stopped: what was in flight finished or was handed back, so the app soon hears nothing more.
    let stopped_at = w.app.log().len();
    assert!(stopped_at < total as usize, "stopped before the end");

    wait::until("the lease taken back", TEST_TIMEOUT, || async {
        Ok((readyz(&config).await?.0 == 200).then_some(()))
    })
    .await?;
    let log = w
        .app
        .wait_for("every message delivered", TEST_TIMEOUT, |log| {
            let ok: HashSet<u64> = log.iter().filter(|d| d.ok()).map(Delivery::n).collect();
            ok.len() as u64 >= total
        })
        .await?;
    w.drained("loss").await?;
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    assert!(s.log().contains("Lease taken over"), "{}", s.log());
    Ok(())
}

/// The partitioned app stream: `part.<key>.<event>` is stored as `part.<p>.<key>.<event>`.
const PART_STREAM: &str = "PART";
const PARTITIONS: u32 = 2;

/// Which partition the server puts each key in: a probe per key, read back, then purged.
async fn partitions_of(
    js: &jetstream::Context,
    keys: &[String],
) -> anyhow::Result<BTreeMap<String, u32>> {
    let probes = keys
        .iter()
        .map(|k| Out::keyed(&format!("part.{k}.probe"), KEY_HEADER, k, json!({})))
        .collect();
    let seqs = js::publish_all(js, probes).await?;
    let stream = js.get_stream(PART_STREAM).await?;
    let mut out = BTreeMap::new();
    for (key, seq) in keys.iter().zip(seqs) {
        let stored = stream.get_raw_message(seq).await?;
        let partition = stored
            .subject
            .split('.')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("not partitioned: {}", stored.subject))?;
        out.insert(key.clone(), partition);
    }
    stream.purge().await?;
    Ok(out)
}

/// The orders app (service `orders`, which the example rules are for): a string amount is a
/// `bad_type` (repaired by the rules), an unknown
/// account is `unknown_account` (parked by them); everything else is processed, slowly enough that
/// several keys are in flight.
fn orders_app(d: &Delivery) -> Reply {
    mend_e2e::app::order_problem(d).unwrap_or(Reply::Slow(Duration::from_millis(5)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_split_keys_and_retries_and_commands_reach_their_partition() -> anyhow::Result<()>
{
    let w = World::new().await?;
    js::app_stream_with_transform(
        &w.js,
        PART_STREAM,
        &["part.>"],
        "part.*.*",
        &format!("part.{{{{partition({PARTITIONS},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"),
    )
    .await?;
    let keys: Vec<String> = (0..20).map(|i| format!("acct-{i}")).collect();
    let partition = partitions_of(&w.js, &keys).await?;
    let in_partition = |p: u32| -> Vec<String> {
        keys.iter()
            .filter(|k| partition[*k] == p)
            .cloned()
            .collect()
    };
    let (p0_keys, p1_keys) = (in_partition(0), in_partition(1));
    assert!(
        p0_keys.len() >= 2 && p1_keys.len() >= 3,
        "keys spread: {partition:?}"
    );

    // Each partition's sidecar delivers to its own app, so each request says who sent it.
    let app1 = FakeApp::start().await?;
    let apps = [&w.app, &app1];
    for app in apps {
        app.script(orders_app);
    }
    let config = |p: usize| {
        with_lease_ttl(&sidecar_config(
            "orders",
            &w.nats.url(),
            PART_STREAM,
            &["part.{partition}.>"],
            &apps[p].endpoint(),
            &format!("key = {{ header = \"{KEY_HEADER}\" }}\npartitions = {PARTITIONS}\n{TIMINGS}"),
        ))
    };
    let p0 =
        MendProcess::start_with_args("sidecar", &config(0), &["--partition", "0"], &[]).await?;
    let mut p1 =
        MendProcess::start_with_env("sidecar", &config(1), &[("MEND_PARTITION", "1")]).await?;
    p0.ready().await?;
    p1.ready().await?;

    // 20 rounds over the keys. Two keys of each partition get a string amount in round 3 (repaired
    // by the rules); one key of partition 1 gets an unknown account in round 5 (parked, then
    // discarded by a person).
    let repairable: HashSet<&String> = p0_keys.iter().take(2).chain(&p1_keys[..2]).collect();
    let discarded_key = p1_keys[2].clone();
    let mut msgs = Vec::new();
    let mut discarded_n = 0;
    for round in 0..20u64 {
        for (k, key) in keys.iter().enumerate() {
            let n = round * keys.len() as u64 + k as u64;
            let amount = if round == 3 && repairable.contains(key) {
                json!(format!("{n}.50"))
            } else {
                json!(n)
            };
            let account = if round == 5 && *key == discarded_key {
                discarded_n = n;
                "nobody"
            } else {
                key.as_str()
            };
            let order = json!({"key": key, "n": n, "account": account, "amount": amount});
            msgs.push(Out::keyed(
                &format!("part.{key}.created"),
                KEY_HEADER,
                key,
                order,
            ));
        }
    }
    let total = msgs.len() as u64;
    let seqs = js::publish_all(&w.js, msgs).await?;
    wait::until("every failure delegated", TEST_TIMEOUT, || async {
        Ok((js::failed(&w.js, "orders").await?.len() == 5).then_some(()))
    })
    .await?;

    // Partition 1's sidecar stops; meanwhile the processor repairs and parks, and a person discards
    // the parked message. Partition 0's sidecar pulls all of it and forwards what is partition 1's.
    let status = p1.terminate(Duration::from_secs(15)).await?;
    assert!(status.success(), "{}", p1.log());
    let processor = MendProcess::start(
        "processor",
        &processor_config(&w.nats.url(), &example_rules(), ""),
    )
    .await?;
    processor.ready().await?;
    let parked = wait::until("the unknown account parked", TEST_TIMEOUT, || async {
        let parked = js::parked(&w.js, "orders").await?;
        Ok(parked.into_iter().next())
    })
    .await?;
    assert_eq!(parked.key.as_deref(), Some(discarded_key.as_str()));
    let discard = json!({"action": "discard", "key": discarded_key, "id": parked.id, "by": "test"});
    w.js.publish("mend.control.orders", discard.to_string().into())
        .await?
        .await?;
    let forwards = |log: &str| log.matches("Forwarded to the instance").count();
    wait::until(
        "two retries and a command forwarded",
        TEST_TIMEOUT,
        || async { Ok((forwards(&p0.log()) >= 3).then_some(())) },
    )
    .await?;
    assert_eq!(forwards(&p0.log()), 3, "{}", p0.log());
    let p0_log = p0.log();
    assert!(p0_log.contains(".p1"), "{p0_log}");

    // Partition 0 goes on by itself: its repaired keys are released and everything of its keys is
    // delivered while partition 1's sidecar is down.
    let n_of_key = |n: u64| &keys[(n % keys.len() as u64) as usize];
    let p0_expected: HashSet<u64> = (0..total)
        .filter(|n| partition[n_of_key(*n)] == 0)
        .collect();
    apps[0]
        .wait_for("partition 0's keys delivered", TEST_TIMEOUT, |log| {
            let ok: HashSet<u64> = log.iter().filter(|d| d.ok()).map(Delivery::n).collect();
            p0_expected.is_subset(&ok)
        })
        .await?;

    p1.restart().await?;
    p1.ready().await?;
    let expected: HashSet<u64> = (0..total).filter(|n| *n != discarded_n).collect();
    let all_ok = || -> HashSet<u64> {
        apps.iter()
            .flat_map(|a| a.log())
            .filter(|d| d.ok())
            .map(|d| d.n())
            .collect()
    };
    wait::until(
        "every message delivered but the discarded",
        TEST_TIMEOUT,
        || async { Ok(expected.is_subset(&all_ok()).then_some(())) },
    )
    .await?;
    assert!(
        !all_ok().contains(&discarded_n),
        "the discarded one stays out"
    );

    // Every key was delivered by its partition's sidecar only, in order, repairs included.
    let mut app_of_key: HashMap<String, HashSet<usize>> = HashMap::new();
    for (p, app) in apps.iter().enumerate() {
        let log = app.log();
        for d in &log {
            app_of_key.entry(key_of(d)).or_default().insert(p);
        }
        first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    }
    for (key, sent_by) in &app_of_key {
        let owner = partition[key] as usize;
        assert_eq!(
            sent_by,
            &HashSet::from([owner]),
            "key {key} of partition {owner}"
        );
    }
    let repaired: HashSet<String> = apps[1]
        .log()
        .iter()
        .filter(|d| d.ok() && d.header("mend-repaired-by").is_some())
        .map(key_of)
        .collect();
    assert_eq!(repaired.len(), 2, "partition 1's repairs: {repaired:?}");
    assert!(repaired.iter().all(|k| p1_keys.contains(k)));
    assert!(seqs.len() as u64 == total);

    for p in 0..PARTITIONS {
        js::consumer_drained(
            &w.js,
            PART_STREAM,
            &format!("mend-orders-orders-p{p}"),
            TEST_TIMEOUT,
        )
        .await?;
    }
    for consumer in ["mend-orders-retry", "mend-orders-retry-p1"] {
        js::consumer_drained(&w.js, "MEND_RETRY", consumer, TEST_TIMEOUT).await?;
    }
    for consumer in ["mend-orders-control", "mend-orders-control-p1"] {
        js::consumer_drained(&w.js, "MEND_CONTROL", consumer, TEST_TIMEOUT).await?;
    }
    Ok(())
}

/// A partition's sidecar must take only its own partition's holds: resuming another partition's
/// release at start would deliver that partition's keys from two sidecars at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_takes_only_its_own_holds() -> anyhow::Result<()> {
    let w = World::new().await?;
    js::app_stream_with_transform(
        &w.js,
        PART_STREAM,
        &["part.>"],
        "part.*.*",
        &format!("part.{{{{partition({PARTITIONS},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"),
    )
    .await?;
    let keys: Vec<String> = (0..20).map(|i| format!("acct-{i}")).collect();
    let partition = partitions_of(&w.js, &keys).await?;
    let held_key = keys
        .iter()
        .find(|k| partition[*k] == 0)
        .expect("a key of partition 0")
        .clone();
    w.app.script(|d| {
        if d.field("fail").is_some() {
            Reply::Status(422)
        } else {
            Reply::Ok
        }
    });
    let config = |p: u32| {
        let c = sidecar_config(
            "orders",
            &w.nats.url(),
            PART_STREAM,
            &["part.{partition}.>"],
            &w.app.endpoint(),
            &format!("key = {{ header = \"{KEY_HEADER}\" }}\npartitions = {PARTITIONS}\n{TIMINGS}"),
        );
        with_top_level(&with_lease_ttl(&c), &format!("partition = {p}"))
    };
    let _p0 = w.sidecar(&config(0)).await?;
    let order = json!({"key": held_key, "n": 0, "fail": true});
    js::publish_all(
        &w.js,
        vec![Out::keyed(
            &format!("part.{held_key}.created"),
            KEY_HEADER,
            &held_key,
            order,
        )],
    )
    .await?;
    wait::until("the key of partition 0 held", TEST_TIMEOUT, || async {
        Ok((js::failed(&w.js, "orders").await?.len() == 1).then_some(()))
    })
    .await?;

    let p1_config = config(1);
    let _p1 = w.sidecar(&p1_config).await?;
    let url = format!("http://{}/metrics", mend_e2e::mend::listen_addr(&p1_config));
    let line = "mend_held_keys{service=\"orders\",binding=\"orders\"}";
    // The gauge is set every second: it must be there, at 0, for more than two seconds (over
    // two settings at least), and never count the key of partition 0. A missing line fails.
    let started = std::time::Instant::now();
    let mut seen = 0;
    while !(seen >= 3 && started.elapsed() > Duration::from_millis(2100)) {
        anyhow::ensure!(
            started.elapsed() < TEST_TIMEOUT,
            "{line} was not at 0 for two seconds (seen {seen} times)"
        );
        let text = reqwest::get(&url).await?.text().await?;
        match text
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .map(str::trim)
        {
            Some("0") => seen += 1,
            Some(held) => anyhow::bail!("partition 1 took partition 0's hold: {line} {held}"),
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_settings_that_cannot_work_are_refused_at_start() -> anyhow::Result<()> {
    let config = |subject: &str, extra: &str| {
        sidecar_config(
            "x",
            "nats://127.0.0.1:1",
            "APP",
            &[subject],
            "http://127.0.0.1:1/",
            extra,
        )
    };
    // Partitioned, but the subject does not say where the partition goes.
    let (code, log) = refused(&config("app.>", "partitions = 2"), &[]).await?;
    assert_eq!(code, Some(64), "{log}");
    assert!(
        log.contains("binding \"x\" subjects") && log.contains("{partition}"),
        "{log}"
    );

    // An index that is not a partition, from the file, the environment or the flag.
    let good = config("app.{partition}.>", "partitions = 2");
    let (code, log) = refused(&with_top_level(&good, "partition = 2"), &[]).await?;
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("partition: 2 is not a partition"), "{log}");
    let (code, log) = refused(&good, &[("MEND_PARTITION", "2")]).await?;
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("partition: 2 is not a partition"), "{log}");
    let mut p = MendProcess::start_with_args("sidecar", &good, &["--partition", "7"], &[]).await?;
    let status = p.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(64), "{}", p.log());
    assert!(p.log().contains("7 (from --partition)"), "{}", p.log());

    // A lease too short to renew.
    let (code, log) = refused(&with_top_level(&good, "lease_ttl = \"100ms\""), &[]).await?;
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("key `lease_ttl`"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_split_into_other_partitions_is_refused() -> anyhow::Result<()> {
    let w = World::new().await?;
    js::app_stream_with_transform(
        &w.js,
        PART_STREAM,
        &["part.>"],
        "part.*.*",
        "part.{{partition(4,1)}}.{{wildcard(1)}}.{{wildcard(2)}}",
    )
    .await?;
    let config = sidecar_config(
        "four",
        &w.nats.url(),
        PART_STREAM,
        &["part.{partition}.>"],
        &w.app.endpoint(),
        "partitions = 2",
    );
    let (code, log) = refused(&config, &[]).await?;
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("maps subjects into 4 partitions"), "{log}");
    Ok(())
}

/// A partitioned binding on a work-queue stream: a parked head's original is gone from the app
/// stream once acked, so the sidecar cannot read which partition owns the key from it. A release
/// by hand in the dashboard still reaches the owning partition (the hold entry names it), and the
/// held messages are delivered. A command naming a partition the binding does not have is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_release_reaches_its_partition_when_the_head_is_gone_from_the_stream()
-> anyhow::Result<()> {
    use async_nats::jetstream::stream;
    let w = World::new().await?;
    w.js.create_stream(stream::Config {
        name: PART_STREAM.to_owned(),
        subjects: vec!["part.>".to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        subject_transform: Some(stream::SubjectTransform {
            source: "part.*.*".to_owned(),
            destination: format!(
                "part.{{{{partition({PARTITIONS},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
            ),
        }),
        ..Default::default()
    })
    .await?;
    let keys: Vec<String> = (0..20).map(|i| format!("acct-{i}")).collect();
    let partition = partitions_of(&w.js, &keys).await?;
    let key = keys
        .iter()
        .find(|k| partition[*k] == 1)
        .expect("a key of partition 1")
        .clone();
    w.app.script(orders_app);
    let config = |p: u32| {
        let c = sidecar_config(
            "orders",
            &w.nats.url(),
            PART_STREAM,
            &["part.{partition}.>"],
            &w.app.endpoint(),
            &format!("key = {{ header = \"{KEY_HEADER}\" }}\npartitions = {PARTITIONS}\n{TIMINGS}"),
        );
        with_top_level(&with_lease_ttl(&c), &format!("partition = {p}"))
    };
    // Both partitions run: the command may be pulled by either.
    let p0 = w.sidecar(&config(0)).await?;
    let p1 = w.sidecar(&config(1)).await?;
    let processor = MendProcess::start(
        "processor",
        &processor_config(&w.nats.url(), &example_rules(), ""),
    )
    .await?;
    processor.ready().await?;
    let dashboard = mend_e2e::dashboard::Dashboard::start(&w.nats.url(), "").await?;

    let orders = (0..3u64)
        .map(|n| {
            let account = if n == 0 { "nobody" } else { key.as_str() };
            Out::keyed(
                &format!("part.{key}.created"),
                KEY_HEADER,
                &key,
                json!({"key": key, "n": n, "account": account, "amount": n}),
            )
        })
        .collect();
    let seqs = js::publish_all(&w.js, orders).await?;
    let parked = dashboard
        .wait_messages("status=parked", 1, TEST_TIMEOUT)
        .await?;
    assert_eq!(parked[0]["id"], format!("{PART_STREAM}:{}", seqs[0]));
    // Everything was taken off the work queue: the head's original is gone.
    wait::until("the work queue emptied", TEST_TIMEOUT, || async {
        let mut stream = w.js.get_stream(PART_STREAM).await?;
        Ok((stream.info().await?.state.messages == 0).then_some(()))
    })
    .await?;
    let stream = w.js.get_stream(PART_STREAM).await?;
    assert!(stream.get_raw_message(seqs[0]).await.is_err());

    // A command naming a partition the binding does not have is refused; nothing is released.
    let wrong = json!({"action": "release", "key": key, "partition": PARTITIONS + 5, "by": "test"});
    w.js.publish("mend.control.orders", wrong.to_string().into())
        .await?
        .await?;
    let refusal = format!(
        "has {PARTITIONS} partitions, not a partition {}",
        PARTITIONS + 5
    );
    wait::until("the command refused", TEST_TIMEOUT, || async {
        Ok((p0.log().contains(&refusal) || p1.log().contains(&refusal)).then_some(()))
    })
    .await?;
    assert!(w.app.log().iter().all(|d| !d.ok()), "nothing released");

    let (status, body) = dashboard
        .post(
            &format!("/api/holds/orders/{key}/release"),
            Some(mend_e2e::dashboard::OPERATOR_TOKEN),
            &json!({"note": "order does not matter here"}),
        )
        .await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    w.app
        .wait_for("the held orders delivered", TEST_TIMEOUT, |log| {
            let ok: Vec<u64> = log.iter().filter(|d| d.ok()).map(Delivery::n).collect();
            ok == [1, 2]
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!("{e:#}\n--- p0 ---\n{}\n--- p1 ---\n{}", p0.log(), p1.log())
        })?;
    let refused =
        p0.log().matches("Command refused").count() + p1.log().matches("Command refused").count();
    assert_eq!(
        refused,
        1,
        "only the wrong partition's command\n{}\n{}",
        p0.log(),
        p1.log()
    );
    Ok(())
}

/// A release under way stops with its binding when the lease is lost: no held message is
/// delivered by an instance that no longer owns the key (the next owner resumes the release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_stops_when_the_lease_is_lost() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|d| {
        if d.n() == 0 {
            Reply::Status(422)
        } else {
            Reply::Slow(Duration::from_millis(20))
        }
    });
    let config = with_lease_ttl(&w.keyed_config("rel", TIMINGS));
    let s = w.sidecar(&config).await?;
    const HELD: u64 = 300;
    let orders: Vec<Out> = (0..=HELD)
        .map(|n| Out::keyed("app.created", KEY_HEADER, "k", json!({"key": "k", "n": n})))
        .collect();
    let seqs = js::publish_all(&w.js, orders).await?;
    js::consumer_drained(&w.js, "APP", "mend-rel-rel", TEST_TIMEOUT).await?;

    // The head is discarded: the release of the 300 held messages begins.
    let discard =
        json!({"action": "discard", "key": "k", "id": format!("APP:{}", seqs[0]), "by": "test"});
    w.js.publish("mend.control.rel", discard.to_string().into())
        .await?
        .await?;
    w.app.wait_for_successes(30, TEST_TIMEOUT).await?;
    let leases = w.js.get_key_value("mend_leases").await?;
    let intruder = json!({"owner": "intruder", "nonce": "x", "ttl_ms": 60000, "acquired": ""});
    leases.put("rel.rel.0", intruder.to_string().into()).await?;
    s.wait_log("Lease lost", TEST_TIMEOUT).await?;
    let lost_at = Instant::now();
    let delivered_then = w.app.log().len();
    assert!(delivered_then < HELD as usize, "lost before the end");

    // Watched for two seconds: at most the delivery that was in flight finishes.
    let watch = async {
        loop {
            let late = w
                .app
                .log()
                .iter()
                .filter(|d| d.at > lost_at + Duration::from_millis(500))
                .count();
            if late > 0 {
                anyhow::bail!("{late} deliveries after the lease was lost\n{}", s.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), watch).await {
        Ok(result) => result?,
        Err(_watched_long_enough) => {}
    }

    // The lease comes free: the release resumes and ends, in order.
    leases.delete("rel.rel.0").await?;
    let log = w
        .app
        .wait_for("every held message delivered", TEST_TIMEOUT, |log| {
            let ok: HashSet<u64> = log.iter().filter(|d| d.ok()).map(Delivery::n).collect();
            ok.len() as u64 >= HELD
        })
        .await?;
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// The state of the hold entry of `key` of service `svc`, if it has one.
async fn hold_state(
    js: &jetstream::Context,
    svc: &str,
    key: &str,
) -> anyhow::Result<Option<String>> {
    let kv = js.get_key_value("mend_holds").await?;
    let token = repair_rules::MessageKey(key.into()).token();
    Ok(match kv.get(format!("{svc}.{token}")).await? {
        Some(v) => serde_json::from_slice::<serde_json::Value>(&v)?["state"]
            .as_str()
            .map(str::to_owned),
        None => None,
    })
}

/// A sidecar whose connection stalls (a partition: nothing is closed, its writes just stop arriving)
/// the moment it sends the purge that ends a release. It loses its lease; a standby takes the key
/// over, finishes the release, and holds the key again behind a new head with a message waiting.
/// Then the stalled writes arrive, the old purge among them: it must take only what its sender had
/// released, never the new owner's held message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_held_up_on_a_stalled_connection_takes_nothing_of_the_next_owner()
-> anyhow::Result<()> {
    const SVC: &str = "stall";
    let w = World::new().await?;
    w.app.script(mend_e2e::app::failing(&[0, 10]));
    let proxy = mend_e2e::proxy::NatsProxy::start(w.nats.port()).await?;
    let stalled =
        mend_e2e::mend::SidecarToml::parse(&with_lease_ttl(&w.keyed_config(SVC, TIMINGS)))
            .set("nats_url", proxy.url())
            .to_string();
    let direct = with_lease_ttl(&w.keyed_config(SVC, TIMINGS));
    let mut a = w.sidecar(&stalled).await?;

    // k's head fails; three messages wait behind it.
    let out = |n: u64| Out::keyed("app.created", KEY_HEADER, "k", json!({"key": "k", "n": n}));
    let seqs = js::publish_all(&w.js, (0..4).map(out).collect()).await?;
    let queue = format!(
        "mend.hold.{SVC}.{}",
        repair_rules::MessageKey("k".into()).token()
    );
    wait::until("three messages held", TEST_TIMEOUT, || async {
        Ok((js::read_all(&w.js, "MEND_HOLD", &queue).await?.len() == 3).then_some(()))
    })
    .await?;

    // The head is discarded: the release delivers the three, then its purge stalls.
    proxy.freeze_on("$JS.API.STREAM.PURGE.MEND_HOLD");
    let discard =
        json!({"action": "discard", "key": "k", "id": format!("APP:{}", seqs[0]), "by": "test"});
    w.js.publish(format!("mend.control.{SVC}"), discard.to_string().into())
        .await?
        .await?;
    wait::until("the release's purge stalled", TEST_TIMEOUT, || async {
        Ok(proxy.frozen().then_some(()))
    })
    .await?;
    a.wait_log("Lease lost", TEST_TIMEOUT).await?;

    // The standby takes over, finishes the release, and k is held again: n10 fails, n11 waits.
    let b = w.sidecar(&direct).await?;
    wait::until(
        "the release finished by the new owner",
        TEST_TIMEOUT,
        || async {
            Ok((hold_state(&w.js, SVC, "k").await?.as_deref() == Some("resolved")).then_some(()))
        },
    )
    .await?;
    let later = js::publish_all(&w.js, (10..12).map(out).collect()).await?;
    wait::until("n11 held behind n10", TEST_TIMEOUT, || async {
        let held = js::read_all(&w.js, "MEND_HOLD", &queue).await?;
        Ok(
            (held.len() == 1 && hold_state(&w.js, SVC, "k").await?.as_deref() == Some("held"))
                .then_some(()),
        )
    })
    .await?;

    // The stalled writes arrive; the old purge is answered.
    thaw_and_wait(&w, &proxy).await?;
    let held = js::read_all(&w.js, "MEND_HOLD", &queue).await?;
    assert_eq!(held.len(), 1, "the new owner's held message was purged");

    // n10 discarded: n11 is delivered, after everything before it.
    let discard =
        json!({"action": "discard", "key": "k", "id": format!("APP:{}", later[0]), "by": "test"});
    w.js.publish(format!("mend.control.{SVC}"), discard.to_string().into())
        .await?
        .await?;
    let log = w
        .app
        .wait_for("n11 delivered", TEST_TIMEOUT, |log| {
            log.iter().any(|d| d.ok() && d.n() == 11)
        })
        .await?;
    first_successes_in_order(&log).map_err(anyhow::Error::msg)?;
    a.kill().await?;
    drop(b);
    Ok(())
}

/// Subscribes to the answers of the publishes the proxy held, thaws it, and waits for every answer:
/// the stalled writes have arrived and been acted on.
async fn thaw_and_wait(w: &World, proxy: &mend_e2e::proxy::NatsProxy) -> anyhow::Result<()> {
    let replies = proxy.held_replies();
    anyhow::ensure!(!replies.is_empty(), "nothing held");
    let mut answers = Vec::new();
    for reply in &replies {
        answers.push(w.client.subscribe(reply.clone()).await?);
    }
    w.client.flush().await?;
    proxy.thaw();
    for answer in &mut answers {
        let got = tokio::time::timeout(TEST_TIMEOUT, futures::StreamExt::next(answer)).await?;
        anyhow::ensure!(got.is_some(), "a held publish was not answered");
    }
    Ok(())
}
