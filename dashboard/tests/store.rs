//! The store against a real SQLite file and a real PostgreSQL (a throw-away server each run): the
//! same checks on both, through the one code path.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mend_dashboard::store::{
    Audit, Backend, Changed, Claim, Event, Filter, Ingested, Outgoing, Plan, Session, Status,
    Store, StoreError, is_bad_cursor,
};
use mend_e2e::postgres::Postgres;
use repair_rules::{ENVELOPE_VERSION, ErrorKind, FailureEnvelope, FailureError, HistoryEntry};
use serde_json::json;

fn envelope(
    stream: &str,
    seq: u64,
    attempt: u32,
    code: &str,
    payload: serde_json::Value,
) -> FailureEnvelope {
    let mut error = FailureError::bare(ErrorKind::Message, Some(422));
    error.code = Some(code.to_owned());
    error.title = Some(format!("{code} title"));
    FailureEnvelope {
        version: ENVELOPE_VERSION,
        id: format!("{stream}:{seq}"),
        service: "orders".into(),
        binding: "orders".into(),
        stream: stream.into(),
        seq,
        subject: "orders.created".into(),
        key: Some(format!("acct-{}", seq % 3)),
        headers: Default::default(),
        payload,
        payload_base64: None,
        payload_ref: None,
        headers_base64: None,
        error,
        attempt,
        first_failed_at: "2026-11-23T10:00:00Z".into(),
        failed_at: "2026-11-23T10:00:00Z".into(),
        reason: Some("no_rule: no rule matched".into()),
        history: vec![HistoryEntry {
            at: "2026-11-23T10:00:00Z".into(),
            what: "parked".into(),
            by: "processor".into(),
            attempt: None,
            error: None,
            note: None,
        }],
    }
}

fn event(id: &str, kind: &str, attempt: u32, at: i64, rule: Option<&str>) -> Event {
    Event {
        id: format!("{id}:{attempt}:{kind}"),
        message_id: id.into(),
        service: "orders".into(),
        kind: kind.into(),
        attempt,
        at,
        rule: rule.map(str::to_owned),
        source: "urn:mend:test".into(),
        data: "{}".into(),
    }
}

/// The announcements in a CloudEvent as the sidecar or processor writes it: `kind` of `id` at
/// `attempt` and `at` (ms), carrying `steps` (what, attempt, at in ms, by), taken apart as ingest
/// takes it apart.
fn carried(
    id: &str,
    kind: &str,
    attempt: u32,
    at: i64,
    rule: Option<&str>,
    steps: &[(&str, u32, i64, &str)],
) -> Vec<Event> {
    let time = |ms: i64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64),
        )
        .to_string()
    };
    let steps: Vec<serde_json::Value> = steps
        .iter()
        .map(|(what, attempt, at, by)| {
            json!({"what": what, "attempt": attempt, "at": time(*at), "by": by})
        })
        .collect();
    let ce = json!({
        "specversion": "1.0", "id": format!("{id}:{attempt}:{kind}"),
        "source": "urn:mend:sidecar:orders:orders", "type": format!("mend.{kind}"),
        "subject": id, "time": time(at), "datacontenttype": "application/json",
        "data": {"service": "orders", "id": id, "attempt": attempt, "rule": rule,
                 "binding": "orders", "key": "k", "subject": "orders.created", "steps": steps},
    });
    mend_dashboard::ingest::events_of(ce.to_string().as_bytes()).unwrap()
}

/// A person's action on `id` at `attempt`: a resubmission of `sent`, or a discard.
fn plan(id: &str, attempt: u32, sent: Option<&FailureEnvelope>) -> Plan {
    Plan {
        message_id: id.into(),
        attempt,
        action: if sent.is_some() {
            "resubmit"
        } else {
            "discard"
        }
        .into(),
        actor: "alice".into(),
        note: Some("checked by hand".into()),
        service: "orders".into(),
        key: None,
        publish: Some(Outgoing {
            subject: "mend.retry.orders".into(),
            msg_id: format!("{id}:{}:retry", attempt + 1),
            headers: vec![("Mend-Id".into(), id.into())],
            body: String::new(),
        }),
        sent: sent.cloned(),
        before: Some(r#"{"amount":"x"}"#.into()),
        after: Some(r#"{"amount":1}"#.into()),
    }
}

/// Takes the action and records it at once, as if its publish was stored.
async fn act(store: &Store, plan: &Plan, now: i64) -> Changed {
    match store.claim_action(plan, now).await.unwrap() {
        Claim::Taken { started_at } => store.finish_action(plan, started_at, now).await.unwrap(),
        Claim::Missing => Changed::Missing,
        Claim::Conflict { status, .. } => Changed::Conflict(status),
        Claim::Pending { plan, .. } => panic!("an action is pending: {plan:?}"),
    }
}

async fn resubmit(
    store: &Store,
    id: &str,
    attempt: u32,
    sent: &FailureEnvelope,
    now: i64,
) -> Changed {
    act(store, &plan(id, attempt, Some(sent)), now).await
}

fn audit<'a>(action: &'a str, id: &'a str) -> Audit<'a> {
    Audit {
        actor: "alice",
        action,
        message_id: Some(id),
        service: Some("orders"),
        note: Some("checked by hand"),
        before: Some(r#"{"amount":"x"}"#),
        after: Some(r#"{"amount":1}"#),
        ..Default::default()
    }
}

/// Everything the dashboard relies on, on one store.
async fn exercise(store: &Store) {
    // Parkings: new, redelivered, a later attempt, a late earlier one.
    let first = envelope(
        "ORDERS",
        1,
        1,
        "unknown_account",
        json!({"account": "acct-9", "amount": 5}),
    );
    assert_eq!(
        store.ingest_parked(&first, 1000).await.unwrap(),
        Ingested::New
    );
    assert_eq!(
        store.ingest_parked(&first, 1001).await.unwrap(),
        Ingested::Duplicate
    );
    let m = store.get("ORDERS:1").await.unwrap().unwrap();
    assert_eq!(
        (m.status, m.attempt, m.parked_at),
        (Status::Parked, 1, 1000)
    );
    assert_eq!(m.envelope, first);
    let again = envelope(
        "ORDERS",
        1,
        3,
        "unknown_account",
        json!({"account": "acct-10"}),
    );
    assert_eq!(
        store.ingest_parked(&again, 2000).await.unwrap(),
        Ingested::Reparked
    );
    let late = envelope("ORDERS", 1, 2, "unknown_account", json!({}));
    assert_eq!(
        store.ingest_parked(&late, 2100).await.unwrap(),
        Ingested::Stale
    );
    let m = store.get("ORDERS:1").await.unwrap().unwrap();
    assert_eq!(
        (m.status, m.attempt, m.parked_at, m.updated_at),
        (Status::Parked, 3, 1000, 2000)
    );
    assert_eq!(m.envelope.payload, json!({"account": "acct-10"}));
    assert!(store.get("ORDERS:404").await.unwrap().is_none());

    // Resubmission: only from parked at the shown attempt, with its audit record; the message
    // shows the envelope as sent from then on.
    let mut sent = again.clone();
    sent.payload = json!({"account": "acct-11"});
    sent.history.push(HistoryEntry {
        at: "2026-11-23T10:05:00Z".into(),
        what: "resubmitted".into(),
        by: "alice".into(),
        attempt: Some(2),
        error: None,
        note: None,
    });
    assert_eq!(
        resubmit(store, "ORDERS:1", 1, &sent, 3000).await,
        Changed::Conflict(Status::Parked)
    );
    assert_eq!(
        resubmit(store, "ORDERS:1", 3, &sent, 3000).await,
        Changed::Done
    );
    assert_eq!(
        resubmit(store, "ORDERS:1", 3, &sent, 3001).await,
        Changed::Conflict(Status::Resubmitted)
    );
    assert_eq!(
        resubmit(store, "ORDERS:404", 1, &sent, 3002).await,
        Changed::Missing
    );
    let m = store.get("ORDERS:1").await.unwrap().unwrap();
    assert_eq!((m.status, m.attempt), (Status::Resubmitted, 4));
    assert_eq!(m.envelope, sent);

    // Events: stored once; `resolved` of the resubmitted attempt resolves it.
    let evs = vec![
        event("ORDERS:1", "delegated", 4, 3500, None),
        event("ORDERS:1", "delegated", 4, 3500, None),
        event("ORDERS:1", "resolved", 3, 3600, None),
    ];
    assert_eq!(store.ingest_events(&evs, 3700).await.unwrap(), 2);
    assert_eq!(
        store.get("ORDERS:1").await.unwrap().unwrap().status,
        Status::Resubmitted,
        "an older attempt's resolved changes nothing"
    );
    assert_eq!(
        store
            .ingest_events(&[event("ORDERS:1", "resolved", 4, 3800, None)], 3900)
            .await
            .unwrap(),
        1
    );
    let m = store.get("ORDERS:1").await.unwrap().unwrap();
    assert_eq!((m.status, m.updated_at), (Status::Resolved, 3900));
    let timeline = store.timeline("ORDERS:1").await.unwrap();
    let kinds: Vec<(&str, u32)> = timeline
        .iter()
        .map(|e| (e.kind.as_str(), e.attempt))
        .collect();
    assert_eq!(kinds, [("resolved", 3), ("delegated", 4), ("resolved", 4)]);

    // A parked message resolved by a retry of a later attempt (resubmitted elsewhere), but not by
    // a `resolved` of its own failed attempt.
    let second = envelope("ORDERS", 2, 2, "bad_type", json!({"amount": "12,50"}));
    store.ingest_parked(&second, 4000).await.unwrap();
    store
        .ingest_events(&[event("ORDERS:2", "resolved", 2, 4100, None)], 4100)
        .await
        .unwrap();
    assert_eq!(
        store.get("ORDERS:2").await.unwrap().unwrap().status,
        Status::Parked
    );
    store
        .ingest_events(&[event("ORDERS:2", "resolved", 3, 4200, None)], 4200)
        .await
        .unwrap();
    assert_eq!(
        store.get("ORDERS:2").await.unwrap().unwrap().status,
        Status::Resolved
    );

    // Discard.
    let third = envelope("ORDERS", 3, 1, "bad_type", json!({"amount": "7%_off"}));
    store.ingest_parked(&third, 5000).await.unwrap();
    assert_eq!(
        act(store, &plan("ORDERS:3", 1, None), 5100).await,
        Changed::Done
    );
    assert_eq!(
        store.get("ORDERS:3").await.unwrap().unwrap().status,
        Status::Discarded
    );

    // More parked ones for lists and groups.
    for seq in 10..17 {
        let code = if seq % 2 == 0 {
            "bad_type"
        } else {
            "unknown_account"
        };
        store
            .ingest_parked(
                &envelope(
                    "ORDERS",
                    seq,
                    1,
                    code,
                    json!({"n": seq, "note": format!("Mixed CASE {seq}")}),
                ),
                6000 + seq as i64,
            )
            .await
            .unwrap();
    }
    let all = store.list(&Filter::default(), 50, None).await.unwrap();
    let ids: Vec<&str> = all.items.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.first(), Some(&"ORDERS:16"), "newest first");
    assert_eq!(ids.len(), 10);
    assert!(all.next_cursor.is_none());

    let parked = Filter {
        status: Some(Status::Parked),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.list(&parked, 3, cursor.as_deref()).await.unwrap();
        pages += 1;
        seen.extend(page.items.iter().map(|m| m.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 7, "pages neither skip nor repeat: {seen:?}");
    seen.dedup();
    assert_eq!(seen.len(), 7);

    let code = Filter {
        code: Some("bad_type".into()),
        status: Some(Status::Parked),
        ..Default::default()
    };
    assert_eq!(store.list(&code, 50, None).await.unwrap().items.len(), 4);
    let text = Filter {
        q: Some("mixed case 13".into()),
        ..Default::default()
    };
    let found = store.list(&text, 50, None).await.unwrap();
    assert_eq!(
        found
            .items
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["ORDERS:13"]
    );
    let wildcard = Filter {
        q: Some("7%_".into()),
        ..Default::default()
    };
    let found = store.list(&wildcard, 50, None).await.unwrap();
    assert_eq!(
        found
            .items
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["ORDERS:3"],
        "% and _ are literal"
    );
    let other = Filter {
        service: Some("payments".into()),
        ..Default::default()
    };
    assert!(store.list(&other, 50, None).await.unwrap().items.is_empty());
    let bad = store
        .list(&Filter::default(), 5, Some("not-a-cursor"))
        .await
        .unwrap_err();
    assert!(is_bad_cursor(&bad), "{bad}");

    // Groups of parked messages.
    let groups = store.groups().await.unwrap();
    let sizes: Vec<(Option<&str>, i64)> = groups
        .iter()
        .map(|g| (g.error_code.as_deref(), g.count))
        .collect();
    assert_eq!(sizes, [(Some("bad_type"), 4), (Some("unknown_account"), 3)]);
    let members = store.group_members(&groups[0].id).await.unwrap();
    assert_eq!(
        members
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        ["ORDERS:10", "ORDERS:12", "ORDERS:14", "ORDERS:16"]
    );
    let by_group = Filter {
        group: Some(groups[1].id.clone()),
        ..Default::default()
    };
    // The group's parked three, and ORDERS:1 (resolved) which failed alike.
    assert_eq!(
        store.list(&by_group, 50, None).await.unwrap().items.len(),
        4
    );
    let parked_in_group = Filter {
        status: Some(Status::Parked),
        ..by_group
    };
    assert_eq!(
        store
            .list(&parked_in_group, 50, None)
            .await
            .unwrap()
            .items
            .len(),
        3
    );

    // Overview. Delegations and repairs are not announced on their own: they come as the steps of
    // the announcement that ends or parks their lineage, and count as if they had been.
    let by_rule = "rule:amount-as-number";
    let mut events = Vec::new();
    // Repaired, failed again, parked: its repair counts as failed.
    events.extend(carried(
        "ORDERS:20",
        "parked",
        2,
        7004,
        None,
        &[
            ("delegated", 1, 6999, "sidecar"),
            ("repaired", 2, 7000, by_rule),
            ("delegated", 2, 7003, "sidecar"),
        ],
    ));
    // Repaired and resolved.
    let resolved = carried(
        "ORDERS:21",
        "resolved",
        2,
        7002,
        None,
        &[
            ("delegated", 1, 7000, "sidecar"),
            ("repaired", 2, 7001, by_rule),
        ],
    );
    let kinds: Vec<(&str, u32, Option<&str>, i64)> = resolved
        .iter()
        .map(|e| (e.kind.as_str(), e.attempt, e.rule.as_deref(), e.at))
        .collect();
    assert_eq!(
        kinds,
        [
            ("delegated", 1, None, 7000),
            ("repaired", 2, Some("amount-as-number"), 7001),
            ("resolved", 2, None, 7002)
        ]
    );
    assert_eq!(resolved[1].id, "ORDERS:21:2:repaired");
    assert_eq!(resolved[1].source, "urn:mend:processor");
    events.extend(resolved.clone());
    // The same steps carried twice are stored once.
    events.extend(resolved);
    events.push(event(
        "ORDERS:22",
        "parked",
        1,
        7002,
        Some("unknown-account"),
    ));
    events.extend(carried(
        "ORDERS:23",
        "resolved",
        2,
        11,
        None,
        &[("repaired", 2, 10, "rule:too-old")],
    ));
    store.ingest_events(&events, 7100).await.unwrap();
    let o = store.overview(1000).await.unwrap();
    assert!(
        o.counts.contains(&("orders".into(), "parked".into(), 7)),
        "{:?}",
        o.counts
    );
    assert!(o.counts.contains(&("orders".into(), "resolved".into(), 2)));
    assert!(o.counts.contains(&("orders".into(), "discarded".into(), 1)));
    assert_eq!(o.oldest_parked, Some(("ORDERS:10".into(), 6010)));
    assert_eq!(
        o.rules,
        [
            ("amount-as-number".to_owned(), "failed".to_owned(), 1),
            ("amount-as-number".to_owned(), "repaired".to_owned(), 2),
            ("unknown-account".to_owned(), "parked".to_owned(), 1)
        ],
        "the repair of ORDERS:20 failed again"
    );
    assert_eq!(store.prune_events(20).await.unwrap(), 2);

    // Audit, newest first, paged.
    store
        .record(
            &Audit {
                actor: "bob",
                action: "release",
                service: Some("orders"),
                key: Some("acct-1"),
                ..Default::default()
            },
            8000,
        )
        .await
        .unwrap();
    let page = store.audit(2, None).await.unwrap();
    assert_eq!(
        page.items
            .iter()
            .map(|a| a.action.as_str())
            .collect::<Vec<_>>(),
        ["release", "discard"]
    );
    let rest = store.audit(2, page.next_cursor.as_deref()).await.unwrap();
    assert_eq!(
        rest.items
            .iter()
            .map(|a| a.action.as_str())
            .collect::<Vec<_>>(),
        ["resubmit"]
    );
    assert!(rest.next_cursor.is_none());
    let r = &rest.items[0];
    assert_eq!(
        (r.actor.as_str(), r.message_id.as_deref(), r.note.as_deref()),
        ("alice", Some("ORDERS:1"), Some("checked by hand"))
    );
    assert_eq!(
        (r.before.as_deref(), r.after.as_deref()),
        (Some(r#"{"amount":"x"}"#), Some(r#"{"amount":1}"#))
    );

    // Sessions.
    let s = Session {
        username: "alice".into(),
        role: "operator".into(),
        csrf: "c".into(),
        expires_at: 10_000,
    };
    store.create_session("secret-id", &s).await.unwrap();
    assert_eq!(
        store.session("secret-id", 9_000).await.unwrap(),
        Some(s.clone())
    );
    assert_eq!(
        store.session("secret-id", 10_000).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(store.session("other", 9_000).await.unwrap(), None);
    store
        .create_session(
            "second",
            &Session {
                expires_at: 20_000,
                ..s.clone()
            },
        )
        .await
        .unwrap();
    assert_eq!(store.prune_sessions(15_000).await.unwrap(), 1);
    store.delete_session("second").await.unwrap();
    assert_eq!(store.session("second", 9_000).await.unwrap(), None);
    store.ping().await.unwrap();

    // A retry that went through (and whose `resolved` was taken in) before its resubmission was
    // recorded: the message stays resolved, takes the new attempt, and the action is audited.
    let fast = envelope("RACE", 5, 1, "bad_type", json!({"amount": "1"}));
    store.ingest_parked(&fast, 4300).await.unwrap();
    let taken = plan("RACE:5", 1, Some(&fast));
    let Claim::Taken { started_at } = store.claim_action(&taken, 4305).await.unwrap() else {
        panic!("not taken")
    };
    store
        .ingest_events(&[event("RACE:5", "resolved", 2, 4310, None)], 4310)
        .await
        .unwrap();
    assert_eq!(
        store.finish_action(&taken, started_at, 4320).await.unwrap(),
        Changed::Done
    );
    let m = store.get("RACE:5").await.unwrap().unwrap();
    assert_eq!((m.status, m.attempt), (Status::Resolved, 2));

    // A retry that failed again, and whose new parking was taken in, before its resubmission was
    // recorded: the message stays parked at the new attempt, and the action is audited.
    let again = envelope("RACE", 6, 1, "bad_type", json!({"amount": "1"}));
    store.ingest_parked(&again, 4400).await.unwrap();
    let taken = plan("RACE:6", 1, Some(&again));
    let Claim::Taken { started_at } = store.claim_action(&taken, 4405).await.unwrap() else {
        panic!("not taken")
    };
    let reparked = envelope("RACE", 6, 2, "bad_type", json!({"amount": "1"}));
    store.ingest_parked(&reparked, 4410).await.unwrap();
    assert_eq!(
        store.finish_action(&taken, started_at, 4420).await.unwrap(),
        Changed::Done
    );
    let m = store.get("RACE:6").await.unwrap().unwrap();
    assert_eq!((m.status, m.attempt), (Status::Parked, 2));
    let log = store.audit(10, None).await.unwrap();
    assert_eq!(log.items[0].message_id.as_deref(), Some("RACE:6"));
    // An attempt that has not come yet is a conflict.
    assert_eq!(
        resubmit(store, "RACE:6", 3, &again, 4430).await,
        Changed::Conflict(Status::Parked)
    );

    // One action per message at a time: a second one finds the first pending, whatever it is,
    // until the first is recorded or let go; stale ones are listed for settling.
    let busy = envelope("RACE", 7, 1, "bad_type", json!({"amount": "1"}));
    store.ingest_parked(&busy, 4500).await.unwrap();
    let first = plan("RACE:7", 1, Some(&busy));
    let Claim::Taken { started_at } = store.claim_action(&first, 4510).await.unwrap() else {
        panic!("not taken")
    };
    assert_eq!(
        store
            .claim_action(&plan("RACE:7", 1, None), 4520)
            .await
            .unwrap(),
        Claim::Pending {
            plan: Box::new(first.clone()),
            started_at
        }
    );
    assert_eq!(
        store.stale_actions(4511).await.unwrap(),
        vec![(first.clone(), started_at)]
    );
    assert!(store.stale_actions(4510).await.unwrap().is_empty());
    store.drop_action("RACE:7", started_at).await.unwrap();
    assert!(store.stale_actions(i64::MAX).await.unwrap().is_empty());
    assert_eq!(
        act(store, &plan("RACE:7", 1, None), 4530).await,
        Changed::Done
    );
    assert_eq!(
        store.get("RACE:7").await.unwrap().unwrap().status,
        Status::Discarded
    );
    let log = store.audit(1, None).await.unwrap();
    assert_eq!(
        (
            log.items[0].action.as_str(),
            log.items[0].message_id.as_deref()
        ),
        ("discard", Some("RACE:7"))
    );

    // NUL bytes (PostgreSQL refuses them in TEXT): in a key, an error, a reason, a payload, an
    // announcement and an audit note. Each is stored; the envelope keeps every byte.
    let mut nul = envelope("NUL", 1, 1, "bad\0code", json!({"note": "a\0b"}));
    nul.key = Some("acct\0x".into());
    nul.error.title = Some("title\0with nul".into());
    nul.reason = Some("no_rule: \0".into());
    store.ingest_parked(&nul, 5000).await.unwrap();
    let m = store.get("NUL:1").await.unwrap().unwrap();
    assert_eq!(m.envelope.key.as_deref(), Some("acct\0x"));
    assert_eq!(m.envelope.payload["note"], "a\0b");
    let mut ev = event("NUL:1", "repaired", 1, 5010, Some("rule\0x"));
    ev.source = "urn:\0".into();
    store.ingest_events(&[ev], 5010).await.unwrap();
    let note_audit = Audit {
        note: Some("why\0not"),
        ..audit("discard", "NUL:1")
    };
    store.record(&note_audit, 5020).await.unwrap();

    // The overview's hours: announcements of four kinds counted per service, kind and hour from
    // `since` on; other kinds and older ones left out.
    const H: i64 = 3_600_000;
    let mut evs = Vec::new();
    for (i, (kind, at)) in [
        ("parked", 10 * H + 5),
        ("parked", 10 * H + H - 1),
        ("held", 11 * H),
        ("repaired", 12 * H + 7),
        ("resolved", 12 * H + 8),
        ("delegated", 12 * H + 9),
        ("parked", 9 * H + H - 1),
    ]
    .into_iter()
    .enumerate()
    {
        evs.push(Event {
            service: "hours".into(),
            ..event(&format!("HOURS:{i}"), kind, 1, at, None)
        });
    }
    store.ingest_events(&evs, 12 * H).await.unwrap();
    let mut rows: Vec<_> = store
        .hourly(10 * H)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.0 == "hours")
        .collect();
    rows.sort();
    let expected: Vec<(String, String, i64, i64)> = [
        ("held", 11, 1),
        ("parked", 10, 2),
        ("repaired", 12, 1),
        ("resolved", 12, 1),
    ]
    .iter()
    .map(|(k, h, n)| ("hours".to_owned(), (*k).to_owned(), *h, *n))
    .collect();
    assert_eq!(rows, expected);

    // The largest groups, and the parkings of their messages per hour.
    let groups = store.groups().await.unwrap();
    assert_eq!(store.largest_groups(2).await.unwrap(), groups[..2].to_vec());
    for seq in [1, 2] {
        store
            .ingest_parked(&envelope("TREND", seq, 1, "trend", json!({})), 13 * H)
            .await
            .unwrap();
    }
    let trend = store.get("TREND:1").await.unwrap().unwrap().group_id;
    store
        .ingest_events(
            &[
                event("TREND:1", "parked", 1, 13 * H + 1, None),
                event("TREND:2", "parked", 1, 14 * H + 1, None),
                event("TREND:2", "held", 1, 14 * H + 2, None),
                event("TREND:1", "parked", 1, 12 * H, None),
            ],
            14 * H,
        )
        .await
        .unwrap();
    let mut per_hour = store
        .group_parkings(&[trend.clone(), "no-such-group".into()], 13 * H)
        .await
        .unwrap();
    per_hour.sort();
    assert_eq!(per_hour, [(trend.clone(), 13, 1), (trend, 14, 1)]);
    assert!(store.group_parkings(&[], 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("mend.db").display());
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    exercise(&store).await;
    store.close().await;
    // Reopened: the migrations are not applied twice and the data is there.
    let store = Store::open(&url).await.unwrap();
    assert_eq!(
        store.get("ORDERS:1").await.unwrap().unwrap().status,
        Status::Resolved
    );
}

#[tokio::test]
async fn postgres() {
    let pg = Postgres::start().await.unwrap();
    let url = pg.database("mend").await.unwrap();
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    exercise(&store).await;
    store.close().await;
    let store = Store::open(&url).await.unwrap();
    assert_eq!(
        store.get("ORDERS:1").await.unwrap().unwrap().status,
        Status::Resolved
    );
}

#[tokio::test]
async fn bad_urls_are_refused_clearly() {
    for url in ["mysql://x", "mend.db", "sqlite::memory:"] {
        match Store::open(url).await {
            Err(StoreError::BadUrl(u)) => assert!(u.contains(url), "{u}"),
            Err(other) => panic!("{url}: {other}"),
            Ok(_) => panic!("{url} opened"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = format!(
        "sqlite://{}",
        dir.path().join("no/such/dir/mend.db").display()
    );
    let err = Store::open(&missing)
        .await
        .err()
        .expect("a missing directory fails");
    assert!(matches!(err, StoreError::Connect(_)), "{err}");
}
