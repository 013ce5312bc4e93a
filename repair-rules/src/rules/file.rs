//! The rule file format (SPEC §10) and its compilation. Every error names the file, the line, the
//! rule and the key.

use std::fmt;

use cel::Program;
use serde::Deserialize;
use serde_json::Value as Json;
use toml::Spanned;

use super::subject;

/// The longest `when` or `set` expression accepted, in bytes: CEL has no loops, and bounding the
/// source bounds how many comprehensions one expression can nest.
pub const MAX_EXPRESSION: usize = 4096;
/// Most JSON Patch operations and `set` entries per rule.
pub const MAX_ACTIONS: usize = 64;

/// A rule file that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RuleError {
    pub file: String,
    pub line: Option<usize>,
    pub rule: Option<String>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(rule) = &self.rule {
            write!(f, ": rule `{rule}`")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    /// The file it came from and the line of its name.
    pub origin: (String, usize),
    pub service: Option<String>,
    pub subject: Option<String>,
    pub when_source: String,
    pub when: Program,
    pub patch: json_patch::Patch,
    /// JSON Pointer, CEL source and program, in file order.
    pub set: Vec<(String, String, Program)>,
    pub park: Option<String>,
    pub tests: Vec<TestCase>,
}

/// An inline test of a rule (`[[rule.test]]`).
#[derive(Debug, Clone)]
pub struct TestCase {
    pub line: usize,
    /// The (partial) envelope, completed with defaults before the run.
    pub envelope: Json,
    pub expect_payload: Option<Json>,
    /// `repaired`, `parked` or `not_matched`.
    pub expect: Option<String>,
    /// Text the park reason must contain.
    pub expect_reason: Option<String>,
}

/// The rules of one or more files, in order: the first whose filters and `when` hold is applied.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// See [`RuleSet::is_linear`]; computed once when the rules are compiled.
    linear: bool,
    /// The rule environment's variables some expression uses; only these are built per envelope.
    uses: Uses,
}

/// Which of the rule environment's variables the rules' expressions use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Uses {
    pub subject: bool,
    pub key: bool,
    pub headers: bool,
    pub payload: bool,
    pub error: bool,
    pub attempt: bool,
}

impl Uses {
    fn add(&mut self, program: &Program) {
        let refs = program.references();
        self.subject |= refs.has_variable("subject");
        self.key |= refs.has_variable("key");
        self.headers |= refs.has_variable("headers");
        self.payload |= refs.has_variable("payload");
        self.error |= refs.has_variable("error");
        self.attempt |= refs.has_variable("attempt");
    }
}

/// The variables a rule's expressions can use, and CEL's type names (identifiers too).
const KNOWN_NAMES: [&str; 18] = [
    "subject",
    "key",
    "headers",
    "payload",
    "error",
    "attempt",
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "timestamp",
    "duration",
];

/// Names an expression uses that are neither variables of the rule environment, type names, nor
/// bound by a comprehension macro (`list.map(x, …)`): misspellings, found before any message is.
fn unknown_names(source: &str, program: &Program) -> Vec<String> {
    let compact: String = source.chars().filter(|c| !c.is_whitespace()).collect();
    let mut bound: Vec<&str> = Vec::new();
    for m in COMPREHENSIONS {
        let call = format!(".{m}(");
        for (i, _) in compact.match_indices(&call) {
            if let Some(var) = compact[i + call.len()..].split(',').next() {
                bound.push(var);
            }
        }
    }
    let mut unknown: Vec<String> = program
        .references()
        .variables()
        .into_iter()
        .filter(|v| !KNOWN_NAMES.contains(v) && !bound.contains(v))
        .filter(|v| !v.starts_with('@') && !v.starts_with("__"))
        .map(str::to_owned)
        .collect();
    unknown.sort();
    unknown
}

/// CEL's comprehension macros: the only constructs whose cost can grow faster than their input.
const COMPREHENSIONS: [&str; 5] = ["map", "filter", "all", "exists", "exists_one"];

impl RuleSet {
    /// Whether every expression runs in time linear in its input (no comprehension macro appears).
    /// Conservative: a macro name followed by `(` anywhere, even inside a string, counts.
    pub fn is_linear(&self) -> bool {
        self.linear
    }

    /// The variables the rules use.
    pub fn uses(&self) -> Uses {
        self.uses
    }

    fn compute_uses(&self) -> Uses {
        let mut uses = Uses::default();
        for rule in &self.rules {
            uses.add(&rule.when);
            for (_, _, program) in &rule.set {
                uses.add(program);
            }
        }
        uses
    }

    fn compute_linear(&self) -> bool {
        let sources = self.rules.iter().flat_map(|r| {
            std::iter::once(r.when_source.as_str()).chain(r.set.iter().map(|(_, s, _)| s.as_str()))
        });
        for source in sources {
            let compact: String = source.chars().filter(|c| !c.is_whitespace()).collect();
            if COMPREHENSIONS
                .iter()
                .any(|m| compact.contains(&format!(".{m}(")))
            {
                return false;
            }
        }
        true
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: Spanned<String>,
    service: Option<Spanned<String>>,
    subject: Option<Spanned<String>>,
    when: Spanned<String>,
    patch: Option<Spanned<Vec<Json>>>,
    set: Option<Spanned<toml::Table>>,
    park: Option<Spanned<String>>,
    #[serde(default)]
    test: Vec<Spanned<TestSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestSpec {
    envelope: Json,
    expect_payload: Option<Json>,
    expect: Option<String>,
    expect_reason: Option<String>,
}

impl RuleSet {
    /// Parses and compiles the files `(name, text)` in order. Rule names must be unique across them.
    pub fn parse<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, RuleError> {
        let mut set = RuleSet::default();
        for (file, text) in files {
            for rule in parse_file(file, text)? {
                if let Some(first) = set.rules.iter().find(|r| r.name == rule.name) {
                    return Err(RuleError {
                        file: file.to_owned(),
                        line: Some(rule.origin.1),
                        rule: Some(rule.name.clone()),
                        key: Some("name".into()),
                        message: format!(
                            "the name is already used at {}:{}",
                            first.origin.0, first.origin.1
                        ),
                    });
                }
                set.rules.push(rule);
            }
        }
        set.linear = set.compute_linear();
        set.uses = set.compute_uses();
        Ok(set)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn parse_file(file: &str, text: &str) -> Result<Vec<Rule>, RuleError> {
    let spec: FileSpec = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let key = e.span().and_then(|s| {
            let start = text[..s.start].rfind('\n').map_or(0, |i| i + 1);
            let end = text[s.start..]
                .find('\n')
                .map_or(text.len(), |i| s.start + i);
            let line = &text[start..end];
            if e.message().starts_with("unknown field") {
                text.get(s.clone()).map(|k| k.trim().to_owned())
            } else {
                line.split_once('=').map(|(k, _)| k.trim().to_owned())
            }
        });
        RuleError {
            file: file.to_owned(),
            line,
            rule: None,
            key,
            message: e.message().trim().to_owned(),
        }
    })?;
    spec.rule
        .into_iter()
        .map(|r| compile(file, text, r))
        .collect()
}

fn compile(file: &str, text: &str, spec: RuleSpec) -> Result<Rule, RuleError> {
    let name = spec.name.get_ref().clone();
    let err = |span: std::ops::Range<usize>, key: &str, message: String| RuleError {
        file: file.to_owned(),
        line: Some(line_of(text, span.start)),
        rule: Some(name.clone()),
        key: Some(key.to_owned()),
        message,
    };
    if name.trim().is_empty() {
        return Err(err(spec.name.span(), "name", "a rule needs a name".into()));
    }
    // Names travel in `Mend-Repaired-By` (comma-separated) and in metric labels.
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(err(
            spec.name.span(),
            "name",
            "use only letters, digits, `-`, `_` and `.` in a rule name".into(),
        ));
    }
    if let Some(service) = &spec.service
        && !crate::identity::is_subject_token(service.get_ref())
    {
        return Err(err(
            service.span(),
            "service",
            "not a service name (one subject token)".into(),
        ));
    }
    if let Some(s) = &spec.subject
        && !subject::is_valid_filter(s.get_ref())
    {
        return Err(err(
            s.span(),
            "subject",
            format!("{:?} is not a NATS subject filter", s.get_ref()),
        ));
    }
    let program = |source: &Spanned<String>, key: &str| -> Result<Program, RuleError> {
        if source.get_ref().len() > MAX_EXPRESSION {
            return Err(err(
                source.span(),
                key,
                format!("expression longer than {MAX_EXPRESSION} bytes"),
            ));
        }
        let program = super::bounded::compile(source.get_ref()).map_err(|e| {
            err(
                source.span(),
                key,
                format!("invalid CEL: {}", e.to_string().trim()),
            )
        })?;
        let unknown = unknown_names(source.get_ref(), &program);
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.iter().map(|u| format!("`{u}`")).collect();
            return Err(err(
                source.span(),
                key,
                format!(
                    "unknown name{} {}: a rule sees subject, key, headers, payload, error and attempt",
                    if unknown.len() > 1 { "s" } else { "" },
                    names.join(", ")
                ),
            ));
        }
        Ok(program)
    };
    let when = program(&spec.when, "when")?;
    let patch = match &spec.patch {
        None => json_patch::Patch(Vec::new()),
        Some(p) => {
            if p.get_ref().len() > MAX_ACTIONS {
                return Err(err(
                    p.span(),
                    "patch",
                    format!("more than {MAX_ACTIONS} operations"),
                ));
            }
            let patch: json_patch::Patch = serde_json::from_value(Json::Array(p.get_ref().clone()))
                .map_err(|e| {
                    err(
                        p.span(),
                        "patch",
                        format!("not a JSON Patch (RFC 6902): {e}"),
                    )
                })?;
            // A value copied into its own inside doubles the document every time it runs; a size
            // check at evaluation stops it, but such a rule is never meant, so it is refused here.
            for (i, op) in patch.0.iter().enumerate() {
                if let json_patch::PatchOperation::Copy(copy) = op {
                    let (from, path) = (copy.from.to_string(), copy.path.to_string());
                    if from.is_empty() || path.starts_with(&format!("{from}/")) {
                        return Err(err(
                            p.span(),
                            "patch",
                            format!(
                                "operation {} copies `{from}` into itself (`{path}`): the document \
                                 would double each time",
                                i + 1
                            ),
                        ));
                    }
                }
            }
            patch
        }
    };
    let mut set = Vec::new();
    if let Some(table) = &spec.set {
        if table.get_ref().len() > MAX_ACTIONS {
            return Err(err(
                table.span(),
                "set",
                format!("more than {MAX_ACTIONS} entries"),
            ));
        }
        for (pointer, expr) in table.get_ref() {
            let key = format!("set.{pointer:?}");
            if !pointer.starts_with('/') {
                return Err(err(
                    table.span(),
                    &key,
                    "not a JSON Pointer (it must start with '/')".into(),
                ));
            }
            // Checked here, so a rule that loads never fails on its pointer at evaluation.
            if let Err(e) = json_patch::jsonptr::Pointer::parse(pointer.as_str()) {
                return Err(err(table.span(), &key, format!("not a JSON Pointer: {e}")));
            }
            let Some(source) = expr.as_str() else {
                return Err(err(
                    table.span(),
                    &key,
                    "the value must be a CEL expression in a string".into(),
                ));
            };
            let spanned = Spanned::new(table.span(), source.to_owned());
            set.push((pointer.clone(), source.to_owned(), program(&spanned, &key)?));
        }
    }
    let has_repair = !patch.0.is_empty() || !set.is_empty();
    match (&spec.park, has_repair) {
        (Some(p), true) => {
            return Err(err(
                p.span(),
                "park",
                "a rule either repairs (patch, set) or parks, not both".into(),
            ));
        }
        (None, false) => {
            return Err(err(
                spec.name.span(),
                "name",
                "the rule has no action: add patch, set or park".into(),
            ));
        }
        _ => {}
    }
    let mut tests = Vec::new();
    for t in spec.test {
        let line = line_of(text, t.span().start);
        let t = t.into_inner();
        if let Some(expect) = &t.expect
            && !["repaired", "parked", "not_matched"].contains(&expect.as_str())
        {
            return Err(RuleError {
                file: file.to_owned(),
                line: Some(line),
                rule: Some(name.clone()),
                key: Some("test.expect".into()),
                message: format!("{expect:?}: expected one of repaired, parked, not_matched"),
            });
        }
        if !t.envelope.is_object() {
            return Err(RuleError {
                file: file.to_owned(),
                line: Some(line),
                rule: Some(name.clone()),
                key: Some("test.envelope".into()),
                message: "the envelope must be a table".into(),
            });
        }
        tests.push(TestCase {
            line,
            envelope: t.envelope,
            expect_payload: t.expect_payload,
            expect: t.expect,
            expect_reason: t.expect_reason,
        });
    }
    Ok(Rule {
        origin: (file.to_owned(), line_of(text, spec.name.span().start)),
        name,
        service: spec.service.map(Spanned::into_inner),
        subject: spec.subject.map(Spanned::into_inner),
        when_source: spec.when.into_inner(),
        when,
        patch,
        set,
        park: spec.park.map(Spanned::into_inner),
        tests,
    })
}
