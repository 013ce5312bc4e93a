//! The three-node cluster harness (`mend_e2e::cluster`): an R3 stream keeps every acknowledged
//! message when its leader is SIGKILLed and restarted, and a paused (SIGSTOPped) follower catches
//! up once it runs again.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use mend_e2e::cluster::{Cluster, NODES, publish_until_stored};
use mend_e2e::wait;

const STREAM: &str = "T";
/// How long one message may take to be stored (a leader election on a busy 2-core machine).
const PUBLISH_LIMIT: Duration = Duration::from_secs(30);
/// How long the cluster may take to settle after a kill, restart or resume.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// A client of every node, as mend would connect with a seed list.
async fn connect(cluster: &Cluster) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    let client = async_nats::connect(cluster.server_addrs()?).await?;
    let js = jetstream::new(client.clone());
    Ok((client, js))
}

/// Creates the R3 stream `T` on `t.>`, retrying with backoff while the cluster is still placing
/// assets (the create can time out right after start).
async fn create_stream(js: &jetstream::Context) -> anyhow::Result<()> {
    let config = stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["t.>".to_owned()],
        storage: stream::StorageType::File,
        num_replicas: 3,
        ..Default::default()
    };
    let mut backoff = Duration::from_millis(100);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() + backoff < deadline => {
                eprintln!("create stream {STREAM}: {e}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(anyhow::Error::from(e).context("cannot create stream T")),
        }
    }
}

/// Publishes messages `from..=to` (id `m<n>`, subject `t.<n>`), each retried with its id until
/// stored; returns the errors of failed tries.
async fn publish(js: &jetstream::Context, from: u64, to: u64) -> anyhow::Result<Vec<String>> {
    let mut errors = Vec::new();
    for n in from..=to {
        let stored = publish_until_stored(
            js,
            &format!("t.{n}"),
            &format!("m{n}"),
            Bytes::from(n.to_string()),
            PUBLISH_LIMIT,
        )
        .await?;
        errors.extend(stored.errors.into_iter().map(|e| format!("m{n}: {e}")));
    }
    Ok(errors)
}

/// Waits until the stream (as its leader reports it) holds exactly `count` messages.
async fn wait_count(cluster: &Cluster, count: u64) -> anyhow::Result<()> {
    wait::until(
        &format!("{count} messages in {STREAM}"),
        SETTLE_LIMIT,
        || async {
            let info = cluster.stream_info(STREAM).await?;
            let messages = info.pointer("/state/messages").and_then(|m| m.as_u64());
            Ok((messages == Some(count)).then_some(()))
        },
    )
    .await
}

/// Every node answers a JetStream request from a client connected to it alone.
async fn all_answer(cluster: &Cluster) -> anyhow::Result<()> {
    for i in 0..NODES {
        let client = cluster.node_client(i).await?;
        wait::until(&format!("n{i} to answer"), SETTLE_LIMIT, || async {
            let answer = client
                .request("$JS.API.INFO", Bytes::new())
                .await
                .map_err(anyhow::Error::from)?;
            let json: serde_json::Value = serde_json::from_slice(&answer.payload)?;
            Ok(json.get("error").is_none().then_some(()))
        })
        .await?;
    }
    Ok(())
}

fn summary(errors: &[String]) -> String {
    let mut kinds: Vec<String> = errors
        .iter()
        .map(|e| e.split_once(": ").map_or(e.as_str(), |(_, e)| e).to_owned())
        .collect();
    kinds.sort();
    kinds.dedup();
    format!("{} failed tries; kinds: {kinds:?}", errors.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_restarts_and_no_message_is_lost() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut cluster = Cluster::start().await?;
    eprintln!("cluster {} ready in {:?}", cluster.name(), t0.elapsed());
    assert_eq!(cluster.urls().len(), NODES);
    assert_eq!(cluster.seed_list().split(',').count(), NODES);
    eprintln!("meta leader: {}", cluster.meta_leader().await?);

    let result = async {
        let (_client, js) = connect(&cluster).await?;
        let t = Instant::now();
        create_stream(&js).await?;
        eprintln!("stream created in {:?}", t.elapsed());
        let errors = publish(&js, 1, 100).await?;
        eprintln!("first 100 published: {}", summary(&errors));

        let leader = cluster.kill_leader_of(STREAM).await?;
        let killed = Instant::now();
        eprintln!("killed the leader n{leader}");
        let errors = publish(&js, 101, 200).await?;
        eprintln!(
            "next 100 published in {:?} with the old leader down: {}",
            killed.elapsed(),
            summary(&errors)
        );
        let new_leader = cluster.leader_index(STREAM).await?;
        assert_ne!(new_leader, leader, "a dead node cannot lead");

        let t = Instant::now();
        cluster.restart(leader).await?;
        eprintln!("n{leader} restarted and rejoined in {:?}", t.elapsed());

        wait_count(&cluster, 200).await?;
        let stream = js.get_stream(STREAM).await?;
        let last = stream.get_raw_message(200).await?;
        assert_eq!(last.payload, Bytes::from("200"));
        assert_eq!(last.subject.as_str(), "t.200");
        all_answer(&cluster).await?;
        // The restarted node's own copy caught up too.
        wait::until("the restarted node's copy", SETTLE_LIMIT, || async {
            let state = cluster.node(leader).local_stream_state(STREAM).await?;
            let messages = state.and_then(|s| s.get("messages").and_then(|m| m.as_u64()));
            Ok((messages == Some(200)).then_some(()))
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    eprintln!("test took {:?}", t0.elapsed());
    result.map_err(|e| e.context(format!("logs:\n{}", cluster.logs())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_follower_catches_up() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut cluster = Cluster::start().await?;
    eprintln!("cluster {} ready in {:?}", cluster.name(), t0.elapsed());

    let result = async {
        let (_client, js) = connect(&cluster).await?;
        create_stream(&js).await?;
        publish(&js, 1, 200).await?;

        let leader = cluster.leader_index(STREAM).await?;
        let followers = cluster.follower_indexes(STREAM).await?;
        assert_eq!(followers.len(), NODES - 1, "an R3 stream has two followers");
        assert!(!followers.contains(&leader));
        let paused = followers[0];
        cluster.pause(paused).await?;
        assert!(cluster.node(paused).is_paused());
        eprintln!("paused follower n{paused} (leader n{leader})");

        // Publish through the other two: a client whose connection is to the stopped node gets
        // no error, only timeouts, until its pings go unanswered (async-nats: 60 s by default).
        let others = (0..NODES)
            .filter(|&i| i != paused)
            .map(|i| cluster.node(i).server_addr())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let js_others = jetstream::new(async_nats::connect(others).await?);
        let t = Instant::now();
        let errors = publish(&js_others, 201, 250).await?;
        eprintln!(
            "50 published with n{paused} paused in {:?}: {}",
            t.elapsed(),
            summary(&errors)
        );
        // Still stopped: it answers nothing, so it cannot have stored the 50 yet.
        let hung = tokio::time::timeout(Duration::from_millis(300), cluster.node(paused).healthy());
        assert!(hung.await.is_err(), "a paused node answered");
        cluster.resume(paused).await?;

        wait_count(&cluster, 250).await?;
        let client = cluster.node_client(paused).await?;
        let t = Instant::now();
        wait::until(
            "250 messages seen through the resumed node",
            SETTLE_LIMIT,
            || async {
                let answer = client
                    .request(format!("$JS.API.STREAM.INFO.{STREAM}"), Bytes::new())
                    .await
                    .map_err(anyhow::Error::from)?;
                let info: serde_json::Value = serde_json::from_slice(&answer.payload)?;
                let messages = info.pointer("/state/messages").and_then(|m| m.as_u64());
                Ok((messages == Some(250)).then_some(()))
            },
        )
        .await?;
        // Its own copy, not just the leader's answer relayed through it.
        wait::until("the resumed node's copy", SETTLE_LIMIT, || async {
            let state = cluster.node(paused).local_stream_state(STREAM).await?;
            let messages = state.and_then(|s| s.get("messages").and_then(|m| m.as_u64()));
            Ok((messages == Some(250)).then_some(()))
        })
        .await?;
        eprintln!("n{paused} caught up {:?} after resuming", t.elapsed());
        assert!(cluster.node(paused).healthy().await?);
        all_answer(&cluster).await?;
        anyhow::Ok(())
    }
    .await;
    eprintln!("test took {:?}", t0.elapsed());
    result.map_err(|e| e.context(format!("logs:\n{}", cluster.logs())))?;

    // Dropping the cluster kills every node, a paused one too.
    cluster.pause(0).await?;
    let pids: Vec<u32> = cluster.nodes().iter().filter_map(|n| n.pid()).collect();
    assert_eq!(pids.len(), NODES);
    drop(cluster);
    wait::until("every node gone", Duration::from_secs(10), || async {
        Ok(pids.iter().all(|&pid| gone(pid)).then_some(()))
    })
    .await
}

/// The process exited: no `/proc` entry, or a zombie waiting to be reaped.
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) state ...`; comm may contain spaces, the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}
