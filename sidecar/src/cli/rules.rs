//! `mend rules check` and `mend rules try`: how a service owner tests rules before shipping them:
//! on a failure envelope, or on a running dashboard's parked backlog.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use mend_dashboard::backlog::Answer;
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

/// Exit status when the dashboard cannot be reached or refuses the request (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// Answers of one backlog try, at most (each covers up to the dashboard's per-request bound).
const MOST_ANSWERS: usize = 1_000;

/// `mend rules try --dashboard`: the rule files (checked here first, as `mend rules check` does)
/// tried on the parked backlog of a running dashboard through its API (`POST /api/rules/try`,
/// page after page), printed as one report: what they would repair and park, per rule, with
/// examples.
pub async fn try_backlog(
    paths: &[PathBuf],
    dashboard: &str,
    token_file: &Path,
    service: Option<&str>,
) -> ExitCode {
    let files = match collect(paths) {
        Ok(f) => f,
        Err(e) => return fail(EXIT_INPUT, &e),
    };
    let texts = match read(&files) {
        Ok(t) => t,
        Err(e) => return fail(EXIT_INPUT, &format!("cannot read rules: {e}")),
    };
    let rules = match RuleSet::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str()))) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RULES, &e.to_string()),
    };
    let (_, failures) = run_tests(&rules, &Limits::default());
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("{f}");
        }
        return fail(EXIT_RULES, "the rules' own tests fail; nothing was tried");
    }
    let token = match std::fs::read_to_string(token_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        Ok(_) => return fail(EXIT_INPUT, &format!("{}: empty", token_file.display())),
        Err(e) => return fail(EXIT_INPUT, &format!("{}: {e}", token_file.display())),
    };
    // The files as one draft, in their order (rule files are arrays of `[[rule]]` tables).
    let draft: String = texts
        .iter()
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let url = format!("{}/api/rules/try", dashboard.trim_end_matches('/'));
    let http = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
    {
        Ok(c) => c,
        Err(e) => return fail(EXIT_UNAVAILABLE, &format!("no HTTP client: {e}")),
    };
    let mut total: Option<Answer> = None;
    let mut cursor: Option<String> = None;
    for _ in 0..MOST_ANSWERS {
        let mut body = serde_json::json!({ "rules": draft });
        if let Some(s) = service {
            body["service"] = s.into();
        }
        if let Some(c) = &cursor {
            body["cursor"] = c.as_str().into();
        }
        let answer = match post(&http, &url, &token, &body).await {
            Ok(a) => a,
            Err(e) => return fail(EXIT_UNAVAILABLE, &e),
        };
        cursor = answer.next_cursor.clone();
        match total.as_mut() {
            Some(t) => t.merge(answer),
            None => total = Some(answer),
        }
        if cursor.is_none() {
            break;
        }
    }
    print(&total.unwrap_or_default(), service);
    ExitCode::SUCCESS
}

/// One `POST` of the backlog try: its answer, or why there is none.
async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> Result<Answer, String> {
    let res = http
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = res.status();
    let text = res
        .text()
        .await
        .map_err(|e| format!("{url}: {status}: {e}"))?;
    if !status.is_success() {
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let why = answer["error"]["message"]
            .as_str()
            .unwrap_or("no reason given");
        return Err(format!("{url}: {status}: {why}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{url}: not a dry-run answer: {e}"))
}

/// The summed answers of one backlog try, in words.
fn print(total: &Answer, service: Option<&str>) {
    let scope = service.map_or("the parked backlog".to_owned(), |s| {
        format!("the parked backlog of {s}")
    });
    println!("On {scope}: {}", total.summary);
    for (outcome, count) in &total.outcomes {
        println!("  {outcome}: {count}");
    }
    for (rule, per) in &total.rules {
        let per: Vec<String> = per.iter().map(|(o, c)| format!("{o} {c}")).collect();
        println!("  rule `{rule}`: {}", per.join(", "));
    }
    for (outcome, list) in &total.examples {
        println!("examples ({outcome}):");
        for e in list {
            println!("  {}: {}", e.id, e.describe());
        }
    }
}
