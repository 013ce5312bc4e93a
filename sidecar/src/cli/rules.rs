//! `mend rules check` and `mend rules try`: how a service owner tests rules before shipping them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use repair_rules::FailureEnvelope;
use repair_rules::rules::{Decision, Limits, RuleSet, evaluate, inline, run_tests};

/// Exit status when the rules are malformed or their tests fail.
const EXIT_RULES: u8 = 1;
/// Exit status for unreadable inputs (EX_USAGE-like: nothing was checked).
const EXIT_INPUT: u8 = 64;

/// The rule files named by `paths`: files as given, directories as their `*.toml` files by name.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
                .collect();
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(format!("{}: no such file or directory", path.display()));
        }
    }
    if files.is_empty() {
        return Err("no rule files (*.toml) found".into());
    }
    Ok(files)
}

/// The files' names and texts.
pub fn read(files: &[PathBuf]) -> std::io::Result<Vec<(String, String)>> {
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).map(|t| (f.display().to_string(), t)))
        .collect()
}

/// Reads and compiles the rule files.
pub fn load(files: &[PathBuf]) -> Result<RuleSet, (u8, String)> {
    let texts = read(files).map_err(|e| (EXIT_INPUT, format!("cannot read rules: {e}")))?;
    RuleSet::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())))
        .map_err(|e| (EXIT_RULES, e.to_string()))
}

/// `mend rules check`: parse, compile and run every inline test.
pub fn check(paths: &[PathBuf], limits: &Limits) -> ExitCode {
    let files = match collect(paths) {
        Ok(f) => f,
        Err(e) => return fail(EXIT_INPUT, &e),
    };
    let rules = match load(&files) {
        Ok(r) => r,
        Err((code, e)) => return fail(code, &e),
    };
    let (ran, failures) = run_tests(&rules, limits);
    for f in &failures {
        eprintln!("{f}");
    }
    println!(
        "{} rules in {} files; tests: {} passed, {} failed",
        rules.rules.len(),
        files.len(),
        ran - failures.len(),
        failures.len()
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_RULES)
    }
}

/// `mend rules try`: what the rules would do to one failure envelope.
pub fn try_one(paths: &[PathBuf], message: &Path, limits: &Limits) -> ExitCode {
    let rules = match collect(paths)
        .map_err(|e| (EXIT_INPUT, e))
        .and_then(|f| load(&f))
    {
        Ok(r) => r,
        Err((code, e)) => return fail(code, &e),
    };
    let envelope: FailureEnvelope = match std::fs::read_to_string(message)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(e) => e,
        Err(e) => {
            return fail(
                EXIT_INPUT,
                &format!("{}: not a failure envelope: {e}", message.display()),
            );
        }
    };
    let decision = evaluate(&rules, &envelope, limits);
    match &decision {
        Decision::Repaired { rule, payload } => {
            println!("repaired by rule `{rule}`:");
            print!("{}", payload_diff(&envelope.payload, payload));
        }
        Decision::Park { .. } => println!("{}", inline::describe(&decision)),
    }
    ExitCode::SUCCESS
}

/// A unified diff of two payloads, pretty-printed.
pub fn payload_diff(before: &serde_json::Value, after: &serde_json::Value) -> String {
    let pretty = |v| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let (a, b) = (pretty(before), pretty(after));
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .header("payload", "repaired payload")
        .to_string()
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("mend rules: {message}");
    ExitCode::from(code)
}
