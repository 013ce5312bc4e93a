//! `mend rules check` and `mend rules try` as a service owner runs them: exit codes and messages.

use std::path::Path;
use std::process::Output;

use mend_e2e::mend::mend_bin;

fn mend(args: &[&str]) -> anyhow::Result<Output> {
    Ok(std::process::Command::new(mend_bin()?)
        .args(args)
        .output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn examples() -> String {
    mend_e2e::workspace()
        .join("examples/rules")
        .display()
        .to_string()
}

#[test]
fn check_passes_the_shipped_examples() -> anyhow::Result<()> {
    let o = mend(&["rules", "check", &examples()])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("3 rules in 1 files; tests: 3 passed, 0 failed"),
        "{}",
        text(&o)
    );
    Ok(())
}

#[test]
fn check_reports_malformed_files_and_failing_tests() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nname = \"a\"\nwhen = 'error.code =='\npark = \"x\"\n",
    )?;
    let o = mend(&["rules", "check", &bad.display().to_string()])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("bad.toml:3: rule `a`: key `when`: invalid CEL"),
        "{}",
        text(&o)
    );

    let failing = dir.path().join("failing.toml");
    std::fs::write(
        &failing,
        "[[rule]]\nname = \"f\"\nwhen = 'true'\nset = { \"/a\" = '1' }\n[[rule.test]]\nenvelope = { payload = {} }\nexpect_payload = { a = 2 }\n",
    )?;
    let o = mend(&["rules", "check", &failing.display().to_string()])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("failing.toml:5: rule `f`: test failed"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("tests: 0 passed, 1 failed"),
        "{}",
        text(&o)
    );

    let o = mend(&["rules", "check", "/nonexistent/rules"])?;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(
        text(&o).contains("/nonexistent/rules: no such file or directory"),
        "{}",
        text(&o)
    );
    let empty = tempfile::tempdir()?;
    let o = mend(&["rules", "check", &empty.path().display().to_string()])?;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    Ok(())
}

fn envelope_file(
    dir: &Path,
    payload: serde_json::Value,
    code: &str,
    field: &str,
) -> anyhow::Result<String> {
    let path = dir.join("envelope.json");
    let env = serde_json::json!({
        "version": 1, "id": "ORDERS:1042", "service": "orders", "binding": "orders",
        "stream": "ORDERS", "seq": 1042, "subject": "orders.created", "key": "acct-7",
        "headers": {}, "payload": payload, "payload_base64": null,
        "error": {"kind": "message", "status": 422, "code": code, "field": field,
                  "title": null, "detail": null, "body": null},
        "attempt": 1, "first_failed_at": "2026-11-22T10:00:00Z", "failed_at": "2026-11-22T10:00:00Z",
        "history": [],
    });
    std::fs::write(&path, env.to_string())?;
    Ok(path.display().to_string())
}

#[test]
fn try_shows_the_repair_as_a_diff_or_the_park_reason() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let env = envelope_file(
        dir.path(),
        serde_json::json!({"account": "acct-7", "amount": "12.50"}),
        "bad_type",
        "/amount",
    )?;
    let o = mend(&["rules", "try", &examples(), "--message", &env])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("repaired by rule `amount-as-number`"), "{out}");
    assert!(out.contains("-  \"amount\": \"12.50\""), "{out}");
    assert!(out.contains("+  \"amount\": 12.5"), "{out}");
    assert!(out.contains("+  \"currency\": \"USD\""), "{out}");

    let env = envelope_file(
        dir.path(),
        serde_json::json!({"account": "nobody"}),
        "unknown_account",
        "/account",
    )?;
    let o = mend(&["rules", "try", &examples(), "--message", &env])?;
    assert!(
        text(&o)
            .contains("parked by unknown-account (rule_park): account not found: needs a person"),
        "{}",
        text(&o)
    );

    std::fs::write(dir.path().join("broken.json"), "{\"version\": 1")?;
    let broken = dir.path().join("broken.json").display().to_string();
    let o = mend(&["rules", "try", &examples(), "--message", &broken])?;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("not a failure envelope"), "{}", text(&o));
    Ok(())
}
