//! Evaluating rules against one failure envelope (SPEC §6): rules are tried in order; the first
//! whose filters and `when` hold decides. A repair applies its JSON Patch, then its `set` entries.
//! Everything that cannot be repaired is a [`Decision::Park`] with a reason — an outcome, not an error.

use std::fmt;

use cel::Value as Cel;
use serde_json::Value as Json;

use super::env::{to_json, with_context};
use super::file::{Rule, RuleSet};
use super::subject;
use crate::envelope::FailureEnvelope;

/// Bounds on one evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Payloads larger than this (as JSON) are parked without evaluating rules.
    pub max_payload_bytes: usize,
    /// Repairs of one lineage before it is parked.
    pub max_repairs: u32,
    /// How long one evaluation's comprehensions may run (`None`: no limit); past it the evaluation
    /// stops and the message is parked with a rule error.
    pub time_limit: Option<std::time::Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 256 * 1024,
            max_repairs: 3,
            time_limit: None,
        }
    }
}

/// What to do with a failure.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send `payload` back to the service's sidecar.
    Repaired { rule: String, payload: Json },
    /// Send the envelope to the dashboard.
    Park {
        rule: Option<String>,
        reason: ParkReason,
        message: String,
    },
}

/// Why a failure is parked (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkReason {
    NoRule,
    RulePark,
    RuleError,
    MaxRepairs,
    SameRuleFailedAgain,
    PayloadTooLarge,
}

impl ParkReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ParkReason::NoRule => "no_rule",
            ParkReason::RulePark => "rule_park",
            ParkReason::RuleError => "rule_error",
            ParkReason::MaxRepairs => "max_repairs",
            ParkReason::SameRuleFailedAgain => "same_rule_failed_again",
            ParkReason::PayloadTooLarge => "payload_too_large",
        }
    }
}

impl fmt::Display for ParkReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn park(rule: Option<&Rule>, reason: ParkReason, message: String) -> Decision {
    Decision::Park {
        rule: rule.map(|r| r.name.clone()),
        reason,
        message,
    }
}

/// The decision of `rules` on `envelope`.
pub fn evaluate(rules: &RuleSet, envelope: &FailureEnvelope, limits: &Limits) -> Decision {
    // A payload too large for its envelope travels by reference: rules would see `null` in its
    // place, and a repair of it could not be sent back under max_payload anyway.
    if let (serde_json::Value::Null, None, Some(by_ref)) = (
        &envelope.payload,
        &envelope.payload_base64,
        &envelope.payload_ref,
    ) {
        return park(
            None,
            ParkReason::PayloadTooLarge,
            format!(
                "payload of {} bytes is too large for an envelope (kept by reference); rules are \
                 not tried on it",
                by_ref.size
            ),
        );
    }
    let size = json_size(&envelope.payload);
    if size > limits.max_payload_bytes {
        return park(
            None,
            ParkReason::PayloadTooLarge,
            format!(
                "payload of {size} bytes is over the rules' limit of {}",
                limits.max_payload_bytes
            ),
        );
    }
    let _deadline = super::bounded::Deadline::set(limits.time_limit);
    with_context(envelope, rules.uses(), |ctx| {
        decide(rules, envelope, limits, ctx)
    })
}

/// The size of `value` as compact JSON, counted without building the text.
fn json_size(value: &Json) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

fn decide(
    rules: &RuleSet,
    envelope: &FailureEnvelope,
    limits: &Limits,
    ctx: &cel::Context<'_, '_>,
) -> Decision {
    let mut chosen = None;
    for rule in &rules.rules {
        if rule
            .service
            .as_ref()
            .is_some_and(|s| *s != envelope.service)
            || rule
                .subject
                .as_ref()
                .is_some_and(|f| !subject::matches(f, &envelope.subject))
        {
            continue;
        }
        match rule.when.execute(ctx) {
            Ok(Cel::Bool(true)) => {
                chosen = Some(rule);
                break;
            }
            Ok(Cel::Bool(false)) => {}
            Ok(other) => {
                return park(
                    Some(rule),
                    ParkReason::RuleError,
                    format!("rule {}: `when` gave {other:?}, not a boolean", rule.name),
                );
            }
            Err(e) => {
                return park(
                    Some(rule),
                    ParkReason::RuleError,
                    format!(
                        "rule {}: `when` failed: {}",
                        rule.name,
                        super::bounded::describe(&e)
                    ),
                );
            }
        }
    }
    let Some(rule) = chosen else {
        return park(None, ParkReason::NoRule, "no rule matched".into());
    };
    if let Some(note) = &rule.park {
        return park(Some(rule), ParkReason::RulePark, note.clone());
    }
    // A repair is delivered as the next attempt; there is none after the counter's last value.
    if envelope.attempt == u32::MAX {
        return park(
            Some(rule),
            ParkReason::MaxRepairs,
            format!("attempt {} is the last one counted", envelope.attempt),
        );
    }
    let repairs = envelope
        .history
        .iter()
        .filter(|h| h.what == "repaired")
        .count();
    if repairs >= limits.max_repairs as usize {
        return park(
            Some(rule),
            ParkReason::MaxRepairs,
            format!(
                "repaired {repairs} times already (max_repairs = {})",
                limits.max_repairs
            ),
        );
    }
    if repaired_same_error_before(envelope, &rule.name) {
        return park(
            Some(rule),
            ParkReason::SameRuleFailedAgain,
            format!(
                "rule {} already repaired this lineage and the app failed again with the same error",
                rule.name
            ),
        );
    }
    match repair(rule, ctx, &envelope.payload, limits.max_payload_bytes) {
        Ok(payload) => Decision::Repaired {
            rule: rule.name.clone(),
            payload,
        },
        Err(message) => park(
            Some(rule),
            ParkReason::RuleError,
            format!("rule {}: {message}", rule.name),
        ),
    }
}

/// Whether `rule` repaired an earlier failure with the same error code as the current one.
fn repaired_same_error_before(envelope: &FailureEnvelope, rule: &str) -> bool {
    let by = format!("rule:{rule}");
    let mut last_code: Option<&Option<String>> = None;
    for entry in &envelope.history {
        if let Some(error) = &entry.error {
            last_code = Some(&error.code);
        }
        if entry.what == "repaired"
            && entry.by.split(',').any(|b| b.trim() == by)
            && last_code == Some(&envelope.error.code)
        {
            return true;
        }
    }
    false
}

/// Applies `rule`'s patch, then its `set` entries, to a copy of `payload`. The document may not pass
/// `max_bytes` after any one operation: a patch of 64 operations can otherwise double it 64 times
/// (each `copy` of the document into itself), and the rule would exhaust memory instead of failing.
fn repair(
    rule: &Rule,
    ctx: &cel::Context<'_, '_>,
    payload: &Json,
    max_bytes: usize,
) -> Result<Json, String> {
    let mut doc = payload.clone();
    let bounded = |doc: &Json, what: &dyn Fn() -> String| {
        let size = json_size(doc);
        if size > max_bytes {
            return Err(format!(
                "{} made the payload {size} bytes, over the rules' limit of {max_bytes}",
                what()
            ));
        }
        Ok(())
    };
    for (i, op) in rule.patch.iter().enumerate() {
        json_patch::patch(&mut doc, std::slice::from_ref(op))
            .map_err(|e| format!("patch failed: {e}"))?;
        bounded(&doc, &|| format!("patch operation {}", i + 1))?;
    }
    for (pointer, source, program) in &rule.set {
        let value = program.execute(ctx).map_err(|e| {
            format!(
                "set {pointer} = {source:?} failed: {}",
                super::bounded::describe(&e)
            )
        })?;
        let value = to_json(&value).map_err(|e| format!("set {pointer}: {e}"))?;
        let path = json_patch::jsonptr::Pointer::parse(pointer.as_str())
            .map_err(|e| format!("set {pointer}: {e}"))?;
        let op = json_patch::PatchOperation::Add(json_patch::AddOperation {
            path: path.to_buf(),
            value,
        });
        json_patch::patch(&mut doc, std::slice::from_ref(&op))
            .map_err(|e| format!("set {pointer} failed: {e}"))?;
        bounded(&doc, &|| format!("set {pointer}"))?;
    }
    Ok(doc)
}
