//! Repair rules: the SPEC §10 examples, every park reason, located errors for malformed files, and
//! evaluation that never panics on arbitrary envelopes.

#![allow(clippy::unwrap_used)] // test code

use proptest::prelude::*;
use repair_rules::rules::{Decision, Limits, ParkReason, RuleSet, evaluate, run_tests};
use repair_rules::{FailureEnvelope, HistoryEntry};
use serde_json::{Value, json};

const EXAMPLES: &str = include_str!("../../examples/rules/orders.toml");

fn rules(text: &str) -> RuleSet {
    RuleSet::parse([("rules.toml", text)]).unwrap()
}

fn error_of(text: &str) -> String {
    RuleSet::parse([("bad.toml", text)])
        .unwrap_err()
        .to_string()
}

/// The SPEC §5 envelope, with `payload`, `error` fields and `history` as given.
fn envelope(payload: Value, code: &str, field: Option<&str>) -> FailureEnvelope {
    serde_json::from_value(json!({
        "version": 1, "id": "ORDERS:1042", "service": "orders", "binding": "orders",
        "stream": "ORDERS", "seq": 1042, "subject": "orders.created", "key": "acct-7",
        "headers": {"Account-Id": ["acct-7"]}, "payload": payload, "payload_base64": null,
        "error": {"kind": "message", "status": 422, "code": code, "field": field,
                  "title": "amount must be a number", "detail": "...", "body": null},
        "attempt": 1, "first_failed_at": "2026-11-22T10:00:00Z", "failed_at": "2026-11-22T10:00:00Z",
        "history": [],
    }))
    .unwrap()
}

fn history(what: &str, by: &str, code: Option<&str>) -> HistoryEntry {
    HistoryEntry {
        at: "2026-11-22T10:00:00Z".into(),
        what: what.into(),
        by: by.into(),
        attempt: None,
        error: code.map(|c| {
            let mut e =
                repair_rules::FailureError::bare(repair_rules::ErrorKind::Message, Some(422));
            e.code = Some(c.into());
            e
        }),
        note: None,
    }
}

#[test]
fn spec_examples_parse_and_their_inline_tests_pass() {
    let set = rules(EXAMPLES);
    assert_eq!(set.rules.len(), 3);
    let (ran, failures) = run_tests(&set, &Limits::default());
    assert_eq!(ran, 3);
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn string_amount_is_repaired() {
    let set = rules(EXAMPLES);
    let env = envelope(
        json!({"account": "acct-7", "amount": "12.50"}),
        "bad_type",
        Some("/amount"),
    );
    let d = evaluate(&set, &env, &Limits::default());
    assert_eq!(
        d,
        Decision::Repaired {
            rule: "amount-as-number".into(),
            payload: json!({"account": "acct-7", "amount": 12.5, "currency": "USD"}),
        }
    );
}

#[test]
fn unknown_account_is_parked_with_the_note() {
    let set = rules(EXAMPLES);
    let d = evaluate(
        &set,
        &envelope(json!({"account": "x"}), "unknown_account", None),
        &Limits::default(),
    );
    assert_eq!(
        d,
        Decision::Park {
            rule: Some("unknown-account".into()),
            reason: ParkReason::RulePark,
            message: "account not found: needs a person".into(),
        }
    );
}

#[test]
fn filters_and_no_match() {
    let set = rules(EXAMPLES);
    let mut env = envelope(json!({"amount": "1"}), "bad_type", Some("/amount"));
    env.service = "payments".into(); // amount-as-number is for orders only
    let d = evaluate(&set, &env, &Limits::default());
    assert!(
        matches!(
            d,
            Decision::Park {
                reason: ParkReason::NoRule,
                rule: None,
                ..
            }
        ),
        "{d:?}"
    );

    let set =
        rules("[[rule]]\nname = \"eu\"\nsubject = \"orders.eu.*\"\nwhen = 'true'\npark = \"eu\"\n");
    let mut env = envelope(json!({}), "x", None);
    assert!(matches!(
        evaluate(&set, &env, &Limits::default()),
        Decision::Park {
            reason: ParkReason::NoRule,
            ..
        }
    ));
    env.subject = "orders.eu.created".into();
    assert!(matches!(
        evaluate(&set, &env, &Limits::default()),
        Decision::Park {
            reason: ParkReason::RulePark,
            ..
        }
    ));
}

#[test]
fn first_matching_rule_wins() {
    let set = rules(
        "[[rule]]\nname = \"a\"\nwhen = 'attempt > 5'\npark = \"a\"\n\n[[rule]]\nname = \"b\"\nwhen = 'true'\nset = { \"/b\" = '1' }\n\n[[rule]]\nname = \"c\"\nwhen = 'true'\nset = { \"/c\" = '1' }\n",
    );
    let d = evaluate(&set, &envelope(json!({}), "x", None), &Limits::default());
    assert_eq!(
        d,
        Decision::Repaired {
            rule: "b".into(),
            payload: json!({"b": 1})
        }
    );
}

#[test]
fn the_last_countable_attempt_is_parked_not_repaired() {
    let set = rules(EXAMPLES);
    let mut env = envelope(json!({"amount": "12.50"}), "bad_type", Some("/amount"));
    env.attempt = u32::MAX - 1;
    let d = evaluate(&set, &env, &Limits::default());
    assert!(matches!(d, Decision::Repaired { .. }), "{d:?}");
    env.attempt = u32::MAX;
    let d = evaluate(&set, &env, &Limits::default());
    assert!(
        matches!(
            d,
            Decision::Park {
                reason: ParkReason::MaxRepairs,
                ..
            }
        ),
        "{d:?}"
    );
}

#[test]
fn max_repairs_and_same_rule_failing_again_park() {
    let set = rules(EXAMPLES);
    let mut env = envelope(json!({"amount": "12.50"}), "bad_type", Some("/amount"));
    env.history = vec![
        history("delegated", "sidecar", Some("other")),
        history("repaired", "rule:default-currency", None),
        history("delegated", "sidecar", Some("other2")),
        history("repaired", "rule:x", None),
        history("delegated", "sidecar", Some("other3")),
        history("repaired", "rule:y", None),
        history("delegated", "sidecar", Some("bad_type")),
    ];
    let limits = Limits {
        max_repairs: 3,
        ..Limits::default()
    };
    let d = evaluate(&set, &env, &limits);
    assert!(
        matches!(
            d,
            Decision::Park {
                reason: ParkReason::MaxRepairs,
                ..
            }
        ),
        "{d:?}"
    );

    env.history = vec![
        history("delegated", "sidecar", Some("bad_type")),
        history("repaired", "rule:amount-as-number", None),
        history("delegated", "sidecar", Some("bad_type")),
    ];
    let d = evaluate(&set, &env, &limits);
    assert!(
        matches!(
            d,
            Decision::Park {
                reason: ParkReason::SameRuleFailedAgain,
                ..
            }
        ),
        "{d:?}"
    );

    // The same rule after a *different* error is applied again.
    env.history[0] = history("delegated", "sidecar", Some("something_else"));
    assert!(matches!(
        evaluate(&set, &env, &limits),
        Decision::Repaired { .. }
    ));
}

#[test]
fn rule_errors_park_with_the_error() {
    for (rule, expect) in [
        ("when = 'payload.missing == 1'\npark = \"x\"", "No such key"),
        ("when = '1 + 1'\npark = \"x\"", "not a boolean"),
        (
            "when = 'true'\nset = { \"/a/b/c\" = '1' }",
            "set /a/b/c failed",
        ),
        (
            "when = 'true'\npatch = [{ op = \"remove\", path = \"/nope\" }]",
            "patch failed",
        ),
        (
            "when = 'true'\nset = { \"/x\" = 'int(\"seven\")' }",
            "set /x",
        ),
    ] {
        let set = rules(&format!("[[rule]]\nname = \"r\"\n{rule}\n"));
        let d = evaluate(
            &set,
            &envelope(json!({"a": 1}), "c", None),
            &Limits::default(),
        );
        match d {
            Decision::Park {
                reason: ParkReason::RuleError,
                message,
                rule,
            } => {
                assert!(message.contains(expect), "{rule:?}: {message}");
            }
            other => panic!("{rule}: {other:?}"),
        }
    }
}

#[test]
fn cel_builtins_the_docs_promise() {
    let set = rules(
        r#"[[rule]]
name = "all"
when = 'has(payload.s) && size(payload.list) == 3 && payload.s.matches("^ *[0-9]+ *$") && type(payload.list) == list && timestamp("2026-11-22T10:00:00Z") < timestamp("2026-11-23T00:00:00Z")'
set = { "/i" = 'int(payload.s.trim())', "/d" = 'double("2.5")', "/s" = 'string(payload.list[0])', "/t" = 'payload.s.trim()', "/lo" = '"MiXeD Ä".lowerAscii()', "/up" = 'payload.s.trim().upperAscii()', "/doubled" = 'payload.list.map(x, x * 2)', "/k" = 'key', "/h" = 'headers["Account-Id"][0]' }
"#,
    );
    let d = evaluate(
        &set,
        &envelope(json!({"s": " 42 ", "list": [1, 2, 3]}), "c", None),
        &Limits::default(),
    );
    let Decision::Repaired { payload, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(payload["i"], 42);
    assert_eq!(payload["d"], 2.5);
    assert_eq!(payload["s"], "1");
    assert_eq!(payload["t"], "42");
    assert_eq!(payload["lo"], "mixed Ä", "ASCII letters only");
    assert_eq!(payload["up"], "42");
    assert_eq!(payload["doubled"], json!([2, 4, 6]));
    assert_eq!(payload["k"], "acct-7");
    assert_eq!(payload["h"], "acct-7");
}

#[test]
fn payload_over_the_limit_is_parked_unevaluated() {
    let set = rules(EXAMPLES);
    let env = envelope(
        json!({"amount": "1", "blob": "x".repeat(10_000)}),
        "bad_type",
        Some("/amount"),
    );
    let d = evaluate(
        &set,
        &env,
        &Limits {
            max_payload_bytes: 1000,
            ..Limits::default()
        },
    );
    assert!(
        matches!(
            d,
            Decision::Park {
                reason: ParkReason::PayloadTooLarge,
                ..
            }
        ),
        "{d:?}"
    );
}

#[test]
fn a_payload_kept_by_reference_is_parked_unevaluated() {
    let set = rules(EXAMPLES);
    let mut env = envelope(json!(null), "bad_type", Some("/amount"));
    env.payload_ref = Some(repair_rules::envelope::PayloadRef {
        stream: "APP".into(),
        seq: 7,
        size: 1 << 20,
        object: Some("APP/7/1/failed".into()),
    });
    match evaluate(&set, &env, &Limits::default()) {
        Decision::Park {
            reason: ParkReason::PayloadTooLarge,
            message,
            ..
        } => assert!(message.contains("by reference"), "{message}"),
        d => panic!("{d:?}"),
    }
}

/// A patch that doubles the document with every pair of operations (a value copied out and back
/// into its own child, 32 times over) would need 2^32 copies of it; it is stopped at the first
/// operation that takes the document past the rules' size limit, and the message is parked with
/// that error. A copy straight into itself is refused when the rules are loaded.
#[test]
fn a_patch_that_doubles_the_document_is_stopped_at_the_size_limit() {
    // Copied out and back in (a copy straight into itself is refused at load), 32 times.
    let ops: Vec<String> = (0..32)
        .flat_map(|i| {
            [
                "{ op = \"copy\", from = \"/a\", path = \"/b\" }".to_owned(),
                format!("{{ op = \"copy\", from = \"/b\", path = \"/a/k{i}\" }}"),
            ]
        })
        .collect();
    let text = format!(
        "[[rule]]\nname = \"bomb\"\nwhen = 'true'\npatch = [{}]\n",
        ops.join(", ")
    );
    let set = rules(&text);
    let env = envelope(json!({"a": {"x": "0123456789"}}), "c", None);
    let limits = Limits {
        max_payload_bytes: 64 * 1024,
        ..Limits::default()
    };
    match evaluate(&set, &env, &limits) {
        Decision::Park {
            reason: ParkReason::RuleError,
            message,
            ..
        } => assert!(message.contains("over the rules' limit"), "{message}"),
        d => panic!("{}", format!("{d:?}").chars().take(300).collect::<String>()),
    }
}

#[test]
fn a_copy_into_itself_is_refused_at_load() {
    for (from, path) in [("", "/a"), ("/a", "/a/b"), ("/a/b", "/a/b/c/d")] {
        let text = format!(
            "[[rule]]\nname = \"r\"\nwhen = 'true'\npatch = [{{ op = \"copy\", from = \"{from}\", path = \"{path}\" }}]\n"
        );
        assert!(error_of(&text).contains("into itself"), "{from} → {path}");
    }
    // Beside itself is fine.
    rules(
        "[[rule]]\nname = \"r\"\nwhen = 'true'\npatch = [{ op = \"copy\", from = \"/a\", path = \"/ab\" }]\n",
    );
}

#[test]
fn malformed_files_give_located_errors() {
    for (text, expect) in [
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\npark = \"x\"\nparc = \"y\"\n",
            "bad.toml:5: key `parc`: unknown field",
        ),
        (
            "[[rule]]\nname = \"a,b\"\nwhen = 'true'\npark = \"x\"\n",
            "bad.toml:2: rule `a,b`: key `name`: use only letters",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true &&'\npark = \"x\"\n",
            "bad.toml:3: rule `a`: key `when`: invalid CEL",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\n",
            "bad.toml:2: rule `a`: key `name`: the rule has no action",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\npark = \"x\"\nset = { \"/a\" = '1' }\n",
            "rule `a`: key `park`: a rule either repairs",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\npatch = [{ op = \"jump\", path = \"/a\" }]\n",
            "bad.toml:4: rule `a`: key `patch`: not a JSON Patch",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\nset = { \"a\" = '1' }\n",
            "rule `a`: key `set.\"a\"`: not a JSON Pointer",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\nset = { \"/a~2\" = '1' }\n",
            "rule `a`: key `set.\"/a~2\"`: not a JSON Pointer",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\nset = { \"/a\" = '1 +' }\n",
            "rule `a`: key `set.\"/a\"`: invalid CEL",
        ),
        (
            "[[rule]]\nname = \"a\"\nsubject = \"orders.>.x\"\nwhen = 'true'\npark = \"x\"\n",
            "bad.toml:3: rule `a`: key `subject`",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\npark = \"x\"\n[[rule.test]]\nenvelope = {}\nexpect = \"maybe\"\n",
            "bad.toml:5: rule `a`: key `test.expect`",
        ),
        (
            "[[rule]]\nname = \"a\"\npark = \"x\"\n",
            "missing field `when`",
        ),
        ("[[rule]\nname = 1\n", "bad.toml:1"),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'paylaod.x == 1'\npark = \"x\"\n",
            "bad.toml:3: rule `a`: key `when`: unknown name `paylaod`",
        ),
        (
            "[[rule]]\nname = \"a\"\nwhen = 'true'\nset = { \"/a\" = 'eror.code + atempt' }\n",
            "key `set.\"/a\"`: unknown names `atempt`, `eror`",
        ),
    ] {
        let e = error_of(text);
        assert!(e.contains(expect), "{text}\n=> {e}");
    }
    let long = format!(
        "[[rule]]\nname = \"a\"\nwhen = '{}'\npark = \"x\"\n",
        "true && ".repeat(600) + "true"
    );
    assert!(
        error_of(&long).contains("longer than"),
        "{}",
        error_of(&long)
    );
}

#[test]
fn duplicate_names_across_files_are_refused() {
    let a = "[[rule]]\nname = \"same\"\nwhen = 'true'\npark = \"x\"\n";
    let e = RuleSet::parse([("a.toml", a), ("b.toml", a)])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("b.toml:2: rule `same`: key `name`: the name is already used at a.toml:2"),
        "{e}"
    );
}

#[test]
fn failing_inline_tests_are_located() {
    let text = "[[rule]]\nname = \"a\"\nwhen = 'true'\nset = { \"/a\" = '1' }\n\n[[rule.test]]\nenvelope = { payload = {} }\nexpect_payload = { a = 2 }\n\n[[rule.test]]\nenvelope = { payload = {} }\nexpect = \"parked\"\n";
    let set = rules(text);
    let (ran, failures) = run_tests(&set, &Limits::default());
    assert_eq!(ran, 2);
    assert_eq!(failures.len(), 2);
    assert_eq!(failures[0].line, 6);
    assert!(
        failures[0].to_string().contains(
            "rules.toml:6: rule `a`: test failed: repaired payload is {\"a\":1}, expected {\"a\":2}"
        ),
        "{}",
        failures[0]
    );
    assert!(
        failures[1]
            .to_string()
            .contains("expected parked by this rule, got repaired by a"),
        "{}",
        failures[1]
    );
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn arbitrary_envelopes_never_panic(
        payload in arb_json(),
        code in prop::option::of("[a-z_]{0,10}"),
        field in prop::option::of("/[a-z]{0,5}"),
        attempt in 1u32..10,
        subject in "[a-z]{1,5}(\\.[a-z]{1,5}){0,3}",
    ) {
        let set = rules(&format!("{EXAMPLES}\n{}", r#"
[[rule]]
name = "poke"
when = 'has(payload.a) && payload.a == payload.b || size(headers) > 0 && attempt > 3'
set = { "/x" = 'payload', "/y" = '[subject, key, error.status, attempt]' }
"#));
        let mut env = envelope(payload, "c", None);
        env.error.code = code;
        env.error.field = field;
        env.attempt = attempt;
        env.subject = subject;
        let _ = evaluate(&set, &env, &Limits::default());
    }
}

#[test]
fn rules_without_comprehensions_are_linear() {
    assert!(rules(EXAMPLES).is_linear());
    let with_map =
        "[[rule]]\nname = \"m\"\nwhen = 'payload.items . map (x, x) == []'\npark = \"x\"\n";
    assert!(!rules(with_map).is_linear());
    let in_set =
        "[[rule]]\nname = \"s\"\nwhen = 'true'\nset = { \"/a\" = 'payload.l.exists(x, x > 1)' }\n";
    assert!(!rules(in_set).is_linear());
}

#[test]
fn only_the_variables_rules_use_are_built_and_each_one_works() {
    use repair_rules::rules::Uses;
    assert_eq!(
        rules(EXAMPLES).uses(),
        Uses {
            payload: true,
            error: true,
            ..Uses::default()
        }
    );
    // Each variable on its own, inside has() and inside a comprehension, still resolves.
    let cases = [
        ("subject", r#"subject == "orders.created""#),
        ("key", r#"key == "acct-7""#),
        ("headers", r#"headers["Account-Id"][0] == "acct-7""#),
        ("payload", "has(payload.amount)"),
        ("error", r#"error.kind == "message" && error.status == 422"#),
        ("attempt", "attempt == 1"),
        ("macro", r#"headers["Account-Id"].exists(v, v == key)"#),
    ];
    for (what, when) in cases {
        let set = rules(&format!(
            "[[rule]]\nname = \"r\"\nwhen = '{when}'\npark = \"matched\"\n"
        ));
        let decision = evaluate(
            &set,
            &envelope(json!({"amount": 1}), "x", None),
            &Limits::default(),
        );
        assert!(
            matches!(
                &decision,
                Decision::Park {
                    reason: ParkReason::RulePark,
                    ..
                }
            ),
            "{what}: {decision:?}"
        );
    }
}

#[test]
fn comprehensions_give_the_standard_results() {
    let set = rules(
        r#"[[rule]]
name = "all-macros"
when = 'payload.l.all(x, x > 0) && payload.l.exists(x, x == 2) && payload.l.exists_one(x, x == 3) && payload.l.existsOne(x, x == 1) && !payload.l.exists(x, x > 9) && has(payload.l)'
set = { "/m" = 'payload.l.map(x, x * 10)', "/mf" = 'payload.l.map(x, x % 2 == 1, x + 100)', "/f" = 'payload.l.filter(x, x >= 2)', "/nested" = 'payload.l.map(x, payload.l.filter(y, y < x))', "/keys" = 'payload.o.filter(k, k != "b")', "/none" = '[].all(x, false)' }
"#,
    );
    let d = evaluate(
        &set,
        &envelope(json!({"l": [1, 2, 3], "o": {"a": 1, "b": 2}}), "c", None),
        &Limits::default(),
    );
    let Decision::Repaired { payload, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(payload["m"], json!([10, 20, 30]));
    assert_eq!(payload["mf"], json!([101, 103]));
    assert_eq!(payload["f"], json!([2, 3]));
    assert_eq!(payload["nested"], json!([[], [1], [1, 2]]));
    assert_eq!(payload["keys"], json!(["a"]));
    assert_eq!(payload["none"], json!(true));
}

/// A payload with a list of `n` numbers.
fn long_list(n: usize) -> FailureEnvelope {
    envelope(json!({"l": (0..n).collect::<Vec<_>>()}), "c", None)
}

#[test]
fn a_runaway_comprehension_is_stopped_at_the_time_limit() {
    // Each would run for many minutes: 20k × 20k steps (nested), for each macro kind.
    let cases = [
        ("map", "size(payload.l.map(x, payload.l.map(y, x + y))) > 0"),
        (
            "filter",
            "size(payload.l.filter(x, size(payload.l.filter(y, y == x)) > 1)) > 0",
        ),
        ("all", "payload.l.all(x, payload.l.all(y, y >= 0))"),
        ("exists", "payload.l.exists(x, payload.l.exists(y, y < 0))"),
        (
            "exists_one",
            "payload.l.exists_one(x, payload.l.exists_one(y, y == -1))",
        ),
    ];
    let env = long_list(20_000);
    let limits = Limits {
        time_limit: Some(std::time::Duration::from_millis(200)),
        ..Limits::default()
    };
    for (kind, when) in cases {
        let set = rules(&format!(
            "[[rule]]\nname = \"{kind}\"\nwhen = '{when}'\nset = {{ \"/n\" = '1' }}\n"
        ));
        let started = std::time::Instant::now();
        let d = evaluate(&set, &env, &limits);
        let took = started.elapsed();
        match &d {
            Decision::Park {
                reason: ParkReason::RuleError,
                message,
                ..
            } => assert!(message.contains("time limit"), "{kind}: {message}"),
            other => panic!("{kind}: {other:?}"),
        }
        assert!(
            took < std::time::Duration::from_secs(3),
            "{kind}: stopped only after {took:?}"
        );
    }
}

#[test]
fn a_long_map_stays_linear() {
    // 200k steps: the interpreter appends in place (the expansion keeps the shape it recognises);
    // copying the list at every step would take minutes.
    let set = rules(
        "[[rule]]\nname = \"long\"\nwhen = 'size(payload.l.map(x, x + 1)) == 200000 && size(payload.l.filter(x, x % 2 == 0)) == 100000'\nset = { \"/n\" = '1' }\n",
    );
    let started = std::time::Instant::now();
    let d = evaluate(
        &set,
        &long_list(200_000),
        &Limits {
            max_payload_bytes: 4 << 20,
            ..Limits::default()
        },
    );
    assert!(matches!(d, Decision::Repaired { .. }), "{d:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn the_optional_syntax_is_refused_as_before() {
    let e = error_of("[[rule]]\nname = \"opt\"\nwhen = 'payload.?a.hasValue()'\npark = \"x\"\n");
    assert!(e.contains("invalid CEL"), "{e}");
}
