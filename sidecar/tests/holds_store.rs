//! The hold store against a real nats-server: entries persist with compare-and-set, another
//! instance's write is a conflict, hold queues keep order, de-duplicate, and empty out.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use mend::common::config::NatsConfig;
use mend::runtime::holds::{HoldError, Holds};
use mend_e2e::nats::NatsServer;
use repair_rules::MessageKey;
use repair_rules::holds::{Change, HoldState};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_persist_conflicts_are_refused_and_queues_keep_order() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    mend::common::nats::ensure_layout(&js, &NatsConfig::default(), &Default::default()).await?;
    let stop = CancellationToken::new();
    let key = MessageKey("acct 7/ü".into());

    let a = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    assert!(a.get(&key).is_none());
    let mut hold = a.fresh(&key);
    hold.head = "APP:1".into();
    a.apply(&key, Change::Create(hold.clone())).await?;
    // Another binding of the service and another service do not see it.
    assert!(
        Holds::load(&js, "orders", "other", 0, &stop)
            .await?
            .get(&key)
            .is_none()
    );
    assert!(
        Holds::load(&js, "payments", "orders", 0, &stop)
            .await?
            .get(&key)
            .is_none()
    );

    // Another partition's instance does not see it either.
    assert!(
        Holds::load(&js, "orders", "orders", 1, &stop)
            .await?
            .get(&key)
            .is_none()
    );

    // A second instance loads it; its write makes the first one's stale.
    let b = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    assert_eq!(b.get(&key), Some(hold.clone()));
    let releasing = repair_rules::holds::Hold {
        state: HoldState::Releasing,
        ..hold.clone()
    };
    let taken = repair_rules::holds::Hold {
        head: "APP:9".into(),
        ..hold.clone()
    };
    b.apply(&key, Change::Update(taken)).await?;
    let conflict = a.apply(&key, Change::Update(releasing.clone())).await;
    assert!(
        matches!(conflict, Err(HoldError::Conflict { .. })),
        "{conflict:?}"
    );
    // A write whose value is there already (an earlier try whose answer was lost) is done.
    let c = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    c.apply(&key, Change::Update(releasing.clone())).await?;
    c.apply(&key, Change::Create(releasing.clone())).await?;
    assert_eq!(c.get(&key), Some(releasing.clone()));

    // The hold queue: in order, de-duplicated by message id, emptied by remove and purge.
    for (i, id) in [
        "APP:2:1:hold",
        "APP:3:1:hold",
        "APP:2:1:hold",
        "APP:4:1:hold",
    ]
    .iter()
    .enumerate()
    {
        let mut headers = HeaderMap::new();
        headers.insert("Mend-Id", &id[..5]);
        c.append(&key, id, headers, Bytes::from(format!("{i}")), None)
            .await?;
    }
    // The repeated append is a duplicate: three are stored. The count may be higher (a duplicate
    // counts, as its first try's answer may have been lost) but never lower; a load reads it exactly.
    assert_eq!(c.queued(&key), 4);
    assert_eq!(c.stats().messages, 4);
    assert_eq!(
        Holds::load(&js, "orders", "orders", 0, &stop)
            .await?
            .queued(&key),
        3
    );
    let first = c.first(&key).await?.expect("held");
    assert_eq!(first.headers.get("Mend-Id").unwrap().as_str(), "APP:2");
    c.remove(&key, first.sequence).await?;
    c.remove(&key, first.sequence).await?; // gone already: fine
    let second = c.first(&key).await?.expect("held");
    assert_eq!(second.headers.get("Mend-Id").unwrap().as_str(), "APP:3");
    assert_eq!(c.queued(&key), 3);
    // The release goes on to the end, finds the queue empty and purges what it read; a message
    // appended after that read (by an instance that had lost the key, its publish held up) stays.
    c.advance(&key, second.sequence).await?;
    let third = c.first(&key).await?.expect("held");
    assert_eq!(third.headers.get("Mend-Id").unwrap().as_str(), "APP:4");
    c.advance(&key, third.sequence).await?;
    assert!(c.first(&key).await?.is_none());
    let late = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    let mut headers = HeaderMap::new();
    headers.insert("Mend-Id", "APP:9");
    late.append(&key, "APP:9:1:hold", headers, Bytes::new(), None)
        .await?;
    c.purge_done(&key).await?;
    assert_eq!(c.queued(&key), 0);
    let stays = c.first(&key).await?.expect("the late append stays");
    assert_eq!(stays.headers.get("Mend-Id").unwrap().as_str(), "APP:9");
    c.remove(&key, stays.sequence).await?;
    assert!(c.first(&key).await?.is_none());

    // Resolved entries are forgotten once old enough; held ones never.
    let resolved = repair_rules::holds::Hold {
        state: HoldState::Resolved,
        resolved: vec!["APP:1".into()],
        ..releasing.clone()
    };
    c.apply(&key, Change::Update(resolved)).await?;
    let other = MessageKey("acct-8".into());
    let mut held = c.fresh(&other);
    held.head = "APP:5".into();
    c.apply(&other, Change::Create(held.clone())).await?;
    assert!(c.expired(Duration::from_secs(600)).is_empty());
    assert!(!c.forget(&key, Duration::from_secs(600)).await);
    assert!(c.get(&key).is_some());
    assert_eq!(c.expired(Duration::ZERO), vec![key.clone()]);
    assert!(
        !c.forget(&other, Duration::ZERO).await,
        "held: never forgotten"
    );
    assert!(c.forget(&key, Duration::ZERO).await);
    assert!(c.get(&key).is_none());
    let reloaded = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    assert!(reloaded.get(&key).is_none());
    assert_eq!(reloaded.get(&other), Some(held));
    Ok(())
}

/// A load counts each held key's queue from the stream's per-subject counts: a spelled-out token
/// gives its key back, a long key's digest token is mapped back through the entries, and another
/// binding's queue is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_counts_the_queues_of_short_and_long_keys() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    mend::common::nats::ensure_layout(&js, &NatsConfig::default(), &Default::default()).await?;
    let stop = CancellationToken::new();
    let short = MessageKey("acct 7/ü".into());
    let long = MessageKey("L".repeat(repair_rules::identity::MAX_SPELLED_KEY_BYTES + 1));
    assert!(long.token().starts_with('H'));
    let a = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    let other = Holds::load(&js, "orders", "other", 0, &stop).await?;
    let unheld = MessageKey("not held here".into());
    for (holds, key, n) in [(&a, &short, 1), (&a, &long, 2), (&other, &unheld, 3)] {
        let mut hold = holds.fresh(key);
        hold.head = format!("APP:{n}");
        holds.apply(key, Change::Create(hold)).await?;
        for i in 0..n {
            let id = format!("APP:{}:1:hold", 100 * n + i);
            holds
                .append(key, &id, HeaderMap::new(), Bytes::from("x"), None)
                .await?;
        }
    }
    let loaded = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    assert_eq!(loaded.queued(&short), 1);
    assert_eq!(loaded.queued(&long), 2);
    assert_eq!(loaded.queued(&unheld), 0);
    assert_eq!(loaded.stats().messages, 3);
    Ok(())
}

/// Held keys loaded with messages waiting are each given once to look in their queue, also when
/// their entry is written again before the look is taken (the old code listed them at start, so a
/// later change could not drop one); keys with empty queues and released keys are not given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looks_are_owed_to_held_keys_with_waiting_messages_until_taken() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    mend::common::nats::ensure_layout(&js, &NatsConfig::default(), &Default::default()).await?;
    let stop = CancellationToken::new();
    let a = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    let keys: Vec<MessageKey> = (0..5).map(|i| MessageKey(format!("k{i}"))).collect();
    for (i, key) in keys.iter().enumerate() {
        let mut hold = a.fresh(key);
        hold.head = format!("APP:{i}");
        if i == 4 {
            hold.state = HoldState::Releasing;
        }
        a.apply(key, Change::Create(hold)).await?;
        // k3 has nothing waiting.
        if i != 3 {
            a.append(
                key,
                &format!("APP:{}:1:hold", 100 + i),
                HeaderMap::new(),
                Bytes::from("x"),
                None,
            )
            .await?;
        }
    }
    let loaded = Holds::load(&js, "orders", "orders", 0, &stop).await?;
    // k1's entry is written again (a new head) before any look is taken.
    let mut changed = loaded.get(&keys[1]).expect("k1 loaded");
    changed.head = "APP:11".into();
    loaded.apply(&keys[1], Change::Update(changed)).await?;
    let mut first = loaded.take_looks(2);
    assert_eq!(first.len(), 2);
    let mut rest = loaded.take_looks(10);
    first.append(&mut rest);
    first.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(first, keys[..3].to_vec());
    assert!(loaded.take_looks(10).is_empty());
    Ok(())
}

/// The subjects of a stream are read page by page: the server gives at most 100,000 in an answer,
/// and a sidecar with more held keys than that must load every one (the second page starts where
/// the first ended), each with its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_past_the_first_page_are_read() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    mend_e2e::js::app_stream(&js, "PAGED", &["p.>"]).await?;
    let n = 100_050;
    let mut msgs: Vec<mend_e2e::js::Out> = (0..n)
        .map(|i| mend_e2e::js::Out {
            subject: format!("p.{i}"),
            headers: HeaderMap::new(),
            payload: Bytes::new(),
        })
        .collect();
    for _ in 0..2 {
        msgs.push(mend_e2e::js::Out {
            subject: "p.77".into(),
            headers: HeaderMap::new(),
            payload: Bytes::new(),
        });
    }
    mend_e2e::js::publish_all(&js, msgs).await?;
    let read = mend::common::subject_counts::read(&js, "PAGED", "p.>").await?;
    assert_eq!(read.len(), n);
    let mut seen = std::collections::HashSet::new();
    for (subject, count) in read.iter() {
        assert!(seen.insert(subject.to_owned()), "{subject} read twice");
        let expected = if subject == "p.77" { 3 } else { 1 };
        assert_eq!(count, expected, "{subject}");
    }
    assert!((0..n).all(|i| seen.contains(&format!("p.{i}"))));
    // A filter that matches nothing, and a stream that does not exist.
    assert!(
        mend::common::subject_counts::read(&js, "PAGED", "q.>")
            .await?
            .is_empty()
    );
    let missing = mend::common::subject_counts::read(&js, "NOPE", "p.>").await;
    assert!(
        missing.is_err_and(|e| e.to_string().contains("stream not found")),
        "a missing stream is an error"
    );
    Ok(())
}
