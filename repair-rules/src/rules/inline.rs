//! Running the inline tests of rules (`[[rule.test]]`): each test envelope, completed with defaults,
//! is evaluated against the whole rule set, and the outcome is compared with the expectation.

use serde_json::{Value as Json, json};

use super::eval::{Decision, Limits, evaluate};
use super::file::{Rule, RuleSet};
use crate::envelope::FailureEnvelope;

/// A failed inline test, located in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct TestFailure {
    pub file: String,
    pub line: usize,
    pub rule: String,
    pub message: String,
}

impl std::fmt::Display for TestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: rule `{}`: test failed: {}",
            self.file, self.line, self.rule, self.message
        )
    }
}

/// Runs every inline test; returns how many ran and the failures.
pub fn run_tests(rules: &RuleSet, limits: &Limits) -> (usize, Vec<TestFailure>) {
    let mut ran = 0;
    let mut failures = Vec::new();
    for rule in &rules.rules {
        for case in &rule.tests {
            ran += 1;
            let fail = |message: String| TestFailure {
                file: rule.origin.0.clone(),
                line: case.line,
                rule: rule.name.clone(),
                message,
            };
            let envelope = match complete(rule, &case.envelope) {
                Ok(e) => e,
                Err(e) => {
                    failures.push(fail(format!("the test envelope is not valid: {e}")));
                    continue;
                }
            };
            let decision = evaluate(rules, &envelope, limits);
            let expect = case.expect.as_deref().unwrap_or(
                if case.expect_payload.is_some() || rule.park.is_none() {
                    "repaired"
                } else {
                    "parked"
                },
            );
            let problem = match (expect, &decision) {
                ("repaired", Decision::Repaired { rule: by, payload }) if *by == rule.name => {
                    match &case.expect_payload {
                        Some(want) if want != payload => {
                            Some(format!("repaired payload is {payload}, expected {want}"))
                        }
                        _ => None,
                    }
                }
                (
                    "parked",
                    Decision::Park {
                        rule: Some(by),
                        message,
                        ..
                    },
                ) if *by == rule.name => match &case.expect_reason {
                    Some(want) if !message.contains(want.as_str()) => Some(format!(
                        "parked with {message:?}, expected it to mention {want:?}"
                    )),
                    _ => None,
                },
                ("not_matched", d) if decided_by(d) != Some(rule.name.as_str()) => None,
                (_, d) => Some(format!(
                    "expected {expect} by this rule, got {}",
                    describe(d)
                )),
            };
            if let Some(message) = problem {
                failures.push(fail(message));
            }
        }
    }
    (ran, failures)
}

fn decided_by(d: &Decision) -> Option<&str> {
    match d {
        Decision::Repaired { rule, .. } => Some(rule),
        Decision::Park { rule, .. } => rule.as_deref(),
    }
}

/// A human description of a decision.
pub fn describe(d: &Decision) -> String {
    match d {
        Decision::Repaired { rule, payload } => format!("repaired by {rule} into {payload}"),
        Decision::Park {
            rule: Some(rule),
            reason,
            message,
        } => {
            format!("parked by {rule} ({reason}): {message}")
        }
        Decision::Park {
            rule: None,
            reason,
            message,
        } => format!("parked ({reason}): {message}"),
    }
}

/// A full envelope from a test's partial one: defaults first, the test's fields over them (error
/// fields merge into the default error).
fn complete(rule: &Rule, partial: &Json) -> Result<FailureEnvelope, serde_json::Error> {
    let subject = rule
        .subject
        .as_deref()
        .filter(|s| !s.contains('*') && !s.contains('>'))
        .unwrap_or("test.subject");
    let mut base = json!({
        "version": 1, "id": "TEST:1", "service": rule.service.as_deref().unwrap_or("test"),
        "binding": "test", "stream": "TEST", "seq": 1, "subject": subject, "key": null,
        "headers": {}, "payload": null, "payload_base64": null,
        "error": {"kind": "message", "status": 422, "code": null, "field": null, "title": null,
                  "detail": null, "body": null},
        "attempt": 1, "first_failed_at": "1970-01-01T00:00:00Z", "failed_at": "1970-01-01T00:00:00Z",
        "history": [],
    });
    merge(&mut base, partial);
    serde_json::from_value(base)
}

fn merge(base: &mut Json, over: &Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if k == "error" => merge(slot, v),
                    Some(slot) => *slot = v.clone(),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}
