//! A rule drafted from a person's fix (SPEC §9 "a rule from a fix"): from a parked message's error
//! and the payload before and after a person's edit that resolved it, a rule file that would have
//! made the same repair: `service`/`subject` filters, a `when` from the error, and the edit
//! generalised where a transform is recognised (a number sent as text, trimmed or re-cased text, a
//! field renamed or moved, a field removed, a constant added), literal values otherwise, marked as
//! specific to that message. The draft carries an inline test made from the message, and is offered
//! only when it parses, its test passes and it repairs its own message into the edited payload.

use std::fmt::Write as _;

use serde_json::{Map, Value as Json};

use super::eval::{Decision, Limits, evaluate};
use super::file::RuleSet;
use super::inline::run_tests;
use crate::envelope::FailureEnvelope;

/// Why no draft is offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoDraft(pub String);

impl std::fmt::Display for NoDraft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a person's fix changed at one place of the payload, and how the draft redoes it.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// A member moved (or renamed): a JSON Patch `move`.
    Move { from: String, to: String },
    /// A member removed: a JSON Patch `remove`.
    Remove { at: String },
    /// A member added with a value: a JSON Patch `add` of that constant.
    Add { at: String, value: Json },
    /// A value computed from the original payload: `set` of a CEL expression.
    Set {
        at: String,
        cel: String,
        /// Whether the value is this message's own (a literal), not a transform.
        literal: bool,
    },
}

/// Drafts a rule for the failure `envelope` (as it was parked) whose payload a person edited into
/// `after`, which then resolved. `name` is the failure group's (made into the rule's name). The
/// rule's filters come from the envelope's service and subject; its `when` from the error.
pub fn draft(envelope: &FailureEnvelope, after: &Json, name: &str) -> Result<String, NoDraft> {
    let before = &envelope.payload;
    if before == after {
        return Err(NoDraft(
            "the edited payload is the one that was parked (as far as it is shown)".into(),
        ));
    }
    // Generalised where a transform is recognised; should that draft not redo the fix (a text CEL
    // reads differently than Rust, say), the values written out as this message's.
    let generalised = render(envelope, after, name, &steps(before, after, true))
        .and_then(|text| check(&text, envelope, after).map(|()| text));
    match generalised {
        Ok(text) => Ok(text),
        Err(_) => {
            let text = render(envelope, after, name, &steps(before, after, false))?;
            check(&text, envelope, after)?;
            Ok(text)
        }
    }
}

/// The steps that turn `before` into `after`: objects are compared member by member (recursively);
/// a member that left one place and appears with the same value at another moved. Changed values
/// are computed where a transform is recognised and `generalise` holds, else written out.
fn steps(before: &Json, after: &Json, generalise: bool) -> Vec<Step> {
    let transform = |at: &str, old: &Json, new: &Json| {
        if generalise {
            transform(at, old, new)
        } else {
            None
        }
    };
    let mut d = Diff::default();
    Diff::of("", before, after, &mut d);
    let Diff {
        removed,
        mut containers,
        mut added,
        changed,
    } = d;
    // Outer objects before inner ones (they were found inner first).
    containers.reverse();
    let mut steps: Vec<Step> = containers
        .into_iter()
        .map(|at| Step::Add {
            at,
            value: Json::Object(Map::new()),
        })
        .collect();
    // Moves first: the patch runs before `set`, whose expressions read the original payload.
    let mut unmoved = Vec::new();
    let mut computed = Vec::new();
    for (from, value) in removed {
        if let Some(i) = added.iter().position(|(_, v)| *v == value) {
            let (to, _) = added.remove(i);
            steps.push(Step::Move { from, to });
        } else if let Some((i, cel)) = added
            .iter()
            .enumerate()
            .find_map(|(i, (_, v))| transform(&from, value, v).map(|cel| (i, cel)))
        {
            // Moved and transformed: moved by the patch, its value then computed from the
            // original place.
            let (to, _) = added.remove(i);
            steps.push(Step::Move {
                from,
                to: to.clone(),
            });
            computed.push(Step::Set {
                at: to,
                cel,
                literal: false,
            });
        } else {
            unmoved.push(from);
        }
    }
    steps.extend(unmoved.into_iter().map(|at| Step::Remove { at }));
    steps.extend(computed);
    for (at, value) in added {
        match value {
            // TOML has no null: a null constant is set by CEL instead.
            Json::Null => steps.push(Step::Set {
                at,
                cel: "null".into(),
                literal: false,
            }),
            value => steps.push(Step::Add {
                at,
                value: value.clone(),
            }),
        }
    }
    for (at, old, new) in changed {
        let (cel, literal) = match transform(&at, old, new) {
            Some(cel) => (cel, false),
            None => (cel_literal(new), true),
        };
        steps.push(Step::Set { at, cel, literal });
    }
    steps
}

/// What differs between two payloads, place by place (JSON Pointers).
#[derive(Default)]
struct Diff<'a> {
    removed: Vec<(String, &'a Json)>,
    /// New objects, made empty first so that members can be moved or added into them.
    containers: Vec<String>,
    added: Vec<(String, &'a Json)>,
    changed: Vec<(String, &'a Json, &'a Json)>,
}

impl<'a> Diff<'a> {
    fn of(at: &str, before: &'a Json, after: &'a Json, d: &mut Diff<'a>) {
        match (before, after) {
            (Json::Object(b), Json::Object(a)) => {
                for (k, bv) in b {
                    let path = format!("{at}/{}", escape(k));
                    match a.get(k) {
                        Some(av) if av == bv => {}
                        Some(av) => Self::of(&path, bv, av, d),
                        None => d.removed.push((path, bv)),
                    }
                }
                for (k, av) in a {
                    if !b.contains_key(k) {
                        d.add(format!("{at}/{}", escape(k)), av);
                    }
                }
            }
            _ if before == after => {}
            _ => d.changed.push((at.to_owned(), before, after)),
        }
    }

    /// A new member: a non-empty object is made empty, then filled member by member (so that a
    /// value that moved into it is found as moved).
    fn add(&mut self, at: String, value: &'a Json) {
        match value {
            Json::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    self.add(format!("{at}/{}", escape(k)), v);
                }
                self.containers.push(at);
            }
            _ => self.added.push((at, value)),
        }
    }
}

/// What differs between `before` and `after`, place by place: `(pointer, before, after)`, `None`
/// where the place is absent (objects compared member by member, anything else as a whole).
pub fn changes<'a>(
    before: &'a Json,
    after: &'a Json,
) -> Vec<(String, Option<&'a Json>, Option<&'a Json>)> {
    let mut d = Diff::default();
    Diff::of("", before, after, &mut d);
    let mut out: Vec<_> = d
        .removed
        .into_iter()
        .map(|(at, v)| (at, Some(v), None))
        .chain(d.added.into_iter().map(|(at, v)| (at, None, Some(v))))
        .chain(
            d.changed
                .into_iter()
                .map(|(at, b, a)| (at, Some(b), Some(a))),
        )
        .collect();
    out.sort_by(|x, y| x.0.cmp(&y.0));
    out
}

/// A member name as a JSON Pointer token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// A recognised transform of the value at `at` from `old` to `new`, as CEL over the original
/// payload: text to a number, trimmed text, re-cased text (and trimmed and re-cased).
fn transform(at: &str, old: &Json, new: &Json) -> Option<String> {
    let Json::String(text) = old else {
        return None;
    };
    let source = cel_path(at)?;
    let trimmed = text.trim();
    let base = if trimmed == text {
        source.clone()
    } else {
        format!("{source}.trim()")
    };
    match new {
        Json::Number(n) => {
            if let (Some(i), Ok(parsed)) = (n.as_i64(), trimmed.parse::<i64>()) {
                return (i == parsed).then(|| format!("int({base})"));
            }
            let parsed = trimmed.parse::<f64>().ok()?;
            (n.as_f64() == Some(parsed) && n.as_i64().is_none() && n.as_u64().is_none())
                .then(|| format!("double({base})"))
        }
        Json::String(s) if s == trimmed && s != text => Some(base),
        Json::String(s) if *s == trimmed.to_ascii_lowercase() && s != trimmed => {
            Some(format!("{base}.lowerAscii()"))
        }
        Json::String(s) if *s == trimmed.to_ascii_uppercase() && s != trimmed => {
            Some(format!("{base}.upperAscii()"))
        }
        _ => None,
    }
}

/// CEL's reserved words: a member with such a name is reached by index, not by a dot.
const RESERVED: [&str; 21] = [
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
    "true",
    "false",
    "null",
];

/// The CEL expression reading the value at JSON Pointer `at` of the payload (members only).
fn cel_path(at: &str) -> Option<String> {
    let mut out = String::from("payload");
    for token in at.split('/').skip(1) {
        let token = unescape(token);
        let ident = token
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !RESERVED.contains(&token.as_str());
        if ident {
            out.push('.');
            out.push_str(&token);
        } else {
            // A JSON string is a CEL string literal (same escapes).
            let _ = write!(out, "[{}]", serde_json::to_string(&token).ok()?);
        }
    }
    Some(out)
}

/// A JSON value as a CEL literal: JSON's own text is one (strings, numbers, lists, maps with string
/// keys, `true`, `false`, `null`), except integers past `int`, which CEL writes with a `u`.
fn cel_literal(value: &Json) -> String {
    match value {
        Json::Number(n) if n.as_i64().is_none() && n.as_u64().is_some() => format!("{n}u"),
        Json::Array(items) => format!(
            "[{}]",
            items.iter().map(cel_literal).collect::<Vec<_>>().join(", ")
        ),
        Json::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!(
                    "{}: {}",
                    serde_json::to_string(k).unwrap_or_default(),
                    cel_literal(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// A TOML inline value of `value`, or `None` where TOML cannot hold it (null, integers past i64).
fn toml_value(value: &Json) -> Option<String> {
    Some(match value {
        Json::Null => return None,
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(_)) if n.as_u64().is_some() => return None,
            (None, Some(f)) if f.is_finite() => {
                let text = n.to_string();
                if text.contains(['.', 'e', 'E']) {
                    text
                } else {
                    format!("{text}.0")
                }
            }
            _ => return None,
        },
        Json::String(s) => toml_string(s),
        Json::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(toml_value)
                .collect::<Option<Vec<_>>>()?
                .join(", ")
        ),
        Json::Object(map) => toml_table(map)?,
    })
}

fn toml_table(map: &Map<String, Json>) -> Option<String> {
    if map.is_empty() {
        return Some("{}".into());
    }
    let members = map
        .iter()
        .map(|(k, v)| Some(format!("{} = {}", toml_key(k), toml_value(v)?)))
        .collect::<Option<Vec<_>>>()?;
    Some(format!("{{ {} }}", members.join(", ")))
}

fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        toml_string(key)
    }
}

/// A TOML basic string (JSON's escapes are TOML's, but for `\/`, which serde_json never writes).
fn toml_string(s: &str) -> String {
    let json = serde_json::to_string(s).unwrap_or_default();
    // TOML has no `\u007f`-style problem, but it does not allow DEL raw either: serde_json writes
    // it raw; escape it.
    json.replace('\u{7f}', "\\u007f")
}

/// A CEL expression as a TOML literal string where it can be one, else a basic string.
fn toml_cel(cel: &str) -> String {
    if cel.contains(['\'', '\n', '\r']) || cel.chars().any(char::is_control) {
        toml_string(cel)
    } else {
        format!("'{cel}'")
    }
}

/// The rule's name: `fix-` and the group's name, lower-cased, runs of anything else than letters
/// and digits made one `-`, at most 64 characters.
fn rule_name(name: &str) -> String {
    let mut out = String::from("fix");
    for part in name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
    {
        if out.len() + 1 + part.len() > 64 {
            break;
        }
        out.push('-');
        out.push_str(&part.to_ascii_lowercase());
    }
    out
}

/// The `when` of the draft: the error's kind, code and field (its status when there is no code).
fn when(envelope: &FailureEnvelope) -> String {
    let e = &envelope.error;
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut parts = vec![format!("error.kind == {}", quoted(e.kind.as_str()))];
    match (&e.code, e.status) {
        (Some(code), _) => parts.push(format!("error.code == {}", quoted(code))),
        (None, Some(status)) => parts.push(format!("error.status == {status}")),
        (None, None) => {}
    }
    if let Some(field) = &e.field {
        parts.push(format!("error.field == {}", quoted(field)));
    }
    parts.join(" && ")
}

fn render(
    envelope: &FailureEnvelope,
    after: &Json,
    name: &str,
    steps: &[Step],
) -> Result<String, NoDraft> {
    let id = envelope.lineage().to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Drafted from a person's fix of {id} (failure group {name:?}).\n\
         # Check it with `mend rules check`, try it on the parked backlog, then ship it."
    );
    let _ = writeln!(out, "\n[[rule]]");
    let _ = writeln!(out, "name    = {}", toml_string(&rule_name(name)));
    let _ = writeln!(out, "service = {}", toml_string(&envelope.service));
    let _ = writeln!(out, "subject = {}", toml_string(&envelope.subject));
    let _ = writeln!(out, "when    = {}", toml_cel(&when(envelope)));
    let mut patch = Vec::new();
    for step in steps {
        match step {
            Step::Move { from, to } => patch.push(format!(
                "{{ op = \"move\", from = {}, path = {} }}",
                toml_string(from),
                toml_string(to)
            )),
            Step::Remove { at } => {
                patch.push(format!("{{ op = \"remove\", path = {} }}", toml_string(at)))
            }
            Step::Add { at, value } => {
                let value = toml_value(value).ok_or_else(|| {
                    NoDraft(format!("the value added at {at} cannot be written in TOML"))
                })?;
                patch.push(format!(
                    "{{ op = \"add\", path = {}, value = {value} }}",
                    toml_string(at)
                ))
            }
            Step::Set { .. } => {}
        }
    }
    if !patch.is_empty() {
        let _ = writeln!(out, "patch = [");
        for op in &patch {
            let _ = writeln!(out, "  {op},");
        }
        let _ = writeln!(out, "]");
    }
    let sets: Vec<&Step> = steps
        .iter()
        .filter(|s| matches!(s, Step::Set { .. }))
        .collect();
    if !sets.is_empty() {
        let _ = writeln!(out, "[rule.set]");
        for step in sets {
            if let Step::Set { at, cel, literal } = step {
                if *literal {
                    let _ = writeln!(
                        out,
                        "# The value of {id}, specific to that message: generalise it before shipping."
                    );
                }
                let _ = writeln!(out, "{} = {}", toml_string(at), toml_cel(cel));
            }
        }
    }
    let mut error = Map::new();
    error.insert("kind".into(), Json::from(envelope.error.kind.as_str()));
    if let Some(code) = &envelope.error.code {
        error.insert("code".into(), Json::from(code.as_str()));
    }
    if let Some(status) = envelope.error.status {
        error.insert("status".into(), Json::from(status));
    }
    if let Some(field) = &envelope.error.field {
        error.insert("field".into(), Json::from(field.as_str()));
    }
    let test = (
        toml_table(&error),
        toml_value(&envelope.payload),
        toml_value(after),
    );
    match test {
        (Some(error), Some(payload), Some(expect)) => {
            let _ = writeln!(
                out,
                "\n[[rule.test]]  # the message this rule was drafted from"
            );
            let _ = writeln!(
                out,
                "envelope       = {{ error = {error}, payload = {payload} }}"
            );
            let _ = writeln!(out, "expect_payload = {expect}");
        }
        _ => {
            let _ = writeln!(
                out,
                "\n# No inline test: the message's payload holds a value TOML cannot write (null, or\n\
                 # an integer past 64 bits)."
            );
        }
    }
    Ok(out)
}

/// The draft parses, its inline test passes, and it repairs its own message into `after`.
fn check(text: &str, envelope: &FailureEnvelope, after: &Json) -> Result<(), NoDraft> {
    let rules =
        RuleSet::parse([("draft.toml", text)]).map_err(|e| NoDraft(format!("the draft {e}")))?;
    let limits = Limits::default();
    let (_, failures) = run_tests(&rules, &limits);
    if let Some(f) = failures.first() {
        return Err(NoDraft(format!("the draft's test fails: {}", f.message)));
    }
    // The rule itself, whatever repairs the lineage had before.
    let mut own = envelope.clone();
    own.history.clear();
    match evaluate(&rules, &own, &limits) {
        Decision::Repaired { payload, .. } if payload == *after => Ok(()),
        Decision::Repaired { payload, .. } => Err(NoDraft(format!(
            "the draft would repair its own message into {payload}, not the edited payload"
        ))),
        Decision::Park { message, .. } => Err(NoDraft(format!(
            "the draft would not repair its own message: {message}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{ErrorKind, FailureError};
    use crate::identity::LineageId;
    use serde_json::json;

    fn parked(payload: Json, code: Option<&str>, field: Option<&str>) -> FailureEnvelope {
        let mut error = FailureError::bare(ErrorKind::Message, Some(422));
        error.code = code.map(str::to_owned);
        error.field = field.map(str::to_owned);
        let mut e = FailureEnvelope::raw(
            LineageId::new("ORDERS", 42),
            "orders".into(),
            "orders.created".into(),
            (payload, None),
            error,
            "2026-12-06T00:00:00Z".into(),
        );
        e.key = Some("acct-1".into());
        e
    }

    /// Drafts the fix, and checks that the draft is a rule file whose rule repairs `second` (another
    /// message failing the same way) into `second_fixed`.
    fn drafted(before: Json, after: Json, second: Json, second_fixed: Json) -> String {
        let e = parked(before, Some("bad_type"), Some("/amount"));
        let text = draft(&e, &after, "orders · orders.created · bad_type").unwrap();
        let rules = RuleSet::parse([("d.toml", text.as_str())]).unwrap();
        let (ran, failures) = run_tests(&rules, &Limits::default());
        assert_eq!((ran, failures.len()), (1, 0), "{text}\n{failures:?}");
        let other = parked(second, Some("bad_type"), Some("/amount"));
        match evaluate(&rules, &other, &Limits::default()) {
            Decision::Repaired { payload, rule } => {
                assert_eq!(payload, second_fixed, "{text}");
                assert_eq!(rule, "fix-orders-orders-created-bad-type");
            }
            d => panic!("{d:?}\n{text}"),
        }
        text
    }

    #[test]
    fn a_number_sent_as_text_becomes_double_or_int() {
        let t = drafted(
            json!({"amount": "12.5", "n": 1}),
            json!({"amount": 12.5, "n": 1}),
            json!({"amount": "7.25", "n": 2}),
            json!({"amount": 7.25, "n": 2}),
        );
        assert!(t.contains("'double(payload.amount)'"), "{t}");
        assert!(!t.contains("specific to that message"), "{t}");
        let t = drafted(
            json!({"amount": " 12 "}),
            json!({"amount": 12}),
            json!({"amount": "40"}),
            json!({"amount": 40}),
        );
        assert!(t.contains("'int(payload.amount.trim())'"), "{t}");
    }

    #[test]
    fn trimmed_and_recased_text() {
        let t = drafted(
            json!({"amount": 1, "currency": " usd "}),
            json!({"amount": 1, "currency": "USD"}),
            json!({"amount": 2, "currency": "eur"}),
            json!({"amount": 2, "currency": "EUR"}),
        );
        assert!(t.contains("payload.currency.trim().upperAscii()"), "{t}");
        let t = drafted(
            json!({"amount": 1, "email": "A@B.example"}),
            json!({"amount": 1, "email": "a@b.example"}),
            json!({"amount": 2, "email": "X@Y.example"}),
            json!({"amount": 2, "email": "x@y.example"}),
        );
        assert!(t.contains("payload.email.lowerAscii()"), "{t}");
        drafted(
            json!({"amount": 1, "name": "  Ann "}),
            json!({"amount": 1, "name": "Ann"}),
            json!({"amount": 2, "name": "Bob  "}),
            json!({"amount": 2, "name": "Bob"}),
        );
    }

    #[test]
    fn a_constant_added_and_a_field_removed() {
        let t = drafted(
            json!({"amount": 1, "debug": {"x": 1}}),
            json!({"amount": 1, "currency": "USD"}),
            json!({"amount": 2, "debug": true}),
            json!({"amount": 2, "currency": "USD"}),
        );
        assert!(t.contains(r#"op = "remove", path = "/debug""#), "{t}");
        assert!(
            t.contains(r#"op = "add", path = "/currency", value = "USD""#),
            "{t}"
        );
    }

    #[test]
    fn a_field_renamed_or_moved_and_one_renamed_and_converted() {
        let t = drafted(
            json!({"amount": 1, "acct": "a-1"}),
            json!({"amount": 1, "account": {"id": "a-1"}}),
            json!({"amount": 2, "acct": "b-2"}),
            json!({"amount": 2, "account": {"id": "b-2"}}),
        );
        // Moved into a new object: the object made first.
        assert!(
            t.contains(r#"op = "add", path = "/account", value = {}"#),
            "{t}"
        );
        assert!(
            t.contains(r#"op = "move", from = "/acct", path = "/account/id""#),
            "{t}"
        );
        let t = drafted(
            json!({"amount": 1, "acct": "a-1", "account": {}}),
            json!({"amount": 1, "account": {"id": "a-1"}}),
            json!({"amount": 2, "acct": "b-2", "account": {}}),
            json!({"amount": 2, "account": {"id": "b-2"}}),
        );
        assert!(
            t.contains(r#"op = "move", from = "/acct", path = "/account/id""#),
            "{t}"
        );
        let t = drafted(
            json!({"amt": "12.5"}),
            json!({"amount": 12.5}),
            json!({"amt": "3"}),
            json!({"amount": 3.0}),
        );
        assert!(
            t.contains(r#"op = "move", from = "/amt", path = "/amount""#),
            "{t}"
        );
        assert!(t.contains("'double(payload.amt)'"), "{t}");
    }

    #[test]
    fn other_values_are_literals_marked_as_the_messages_own() {
        let e = parked(json!({"amount": 1, "sku": "old-1"}), None, Some("/sku"));
        let text = draft(&e, &json!({"amount": 1, "sku": "NEW-2"}), "orders bad sku").unwrap();
        assert!(text.contains("specific to that message"), "{text}");
        assert!(text.contains(r#""/sku" = '"NEW-2"'"#), "{text}");
        // No code: the status stands in.
        assert!(text.contains("error.status == 422"), "{text}");
        assert!(text.contains("error.field == \"/sku\""), "{text}");
    }

    #[test]
    fn odd_member_names_and_values_survive_the_round_trip() {
        let e = parked(
            json!({"in": " x ", "a/b": "1", "we'ird \"k\"": "Q", "n": null, "big": 1}),
            Some("c"),
            None,
        );
        let after = json!({"in": "x", "a/b": 1, "we'ird \"k\"": "q", "n": null, "big": 18446744073709551615u64});
        let text = draft(&e, &after, "odd").unwrap();
        assert!(text.contains("payload[\"in\"].trim()"), "{text}");
        assert!(text.contains("No inline test"), "{text}");
    }

    #[test]
    fn a_transform_cel_reads_otherwise_falls_back_to_the_messages_values() {
        // Rust reads "+12" and "1_0"... as numbers in ways CEL may not; whatever CEL makes of them,
        // the draft offered redoes the fix.
        for text in ["+12", "0x1F", "1e3", "-0", " 5\t"] {
            let e = parked(json!({"amount": text}), Some("bad_type"), Some("/amount"));
            let after = match text.trim().parse::<i64>() {
                Ok(i) => json!({"amount": i}),
                Err(_) => json!({"amount": text.trim().parse::<f64>().unwrap_or(31.0)}),
            };
            let drafted = draft(&e, &after, "g").unwrap();
            let rules = RuleSet::parse([("d.toml", drafted.as_str())]).unwrap();
            let mut own = e.clone();
            own.history.clear();
            assert!(
                matches!(evaluate(&rules, &own, &Limits::default()), Decision::Repaired { payload, .. } if payload == after),
                "{drafted}"
            );
        }
    }

    #[test]
    fn no_draft_for_an_unchanged_payload() {
        let e = parked(json!({"amount": 1}), Some("c"), None);
        assert!(draft(&e, &json!({"amount": 1}), "g").is_err());
    }
}
