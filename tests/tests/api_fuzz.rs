//! The dashboard's API against its own OpenAPI document (SPEC §9): schemathesis (PyPI, pinned,
//! installed by `make tools` into `.tools/schemathesis`) reads `GET /api/openapi.json` and sends
//! generated requests to every route, valid and invalid, with each role's token, then checks every
//! answer: never a server error, a status the document lists, the documented content type and
//! schema, and no route that answers without a token. It runs twice per role: once free (made-up
//! ids, bodies and parameters), once aimed at real data (a parked message, its failure group, a
//! held key) so the checks reach the handlers' core. Real nats-server, sidecar, processor, app and
//! dashboard (SQLite).

use std::path::PathBuf;
use std::process::Stdio;

use mend_e2e::dashboard::{ADMIN_TOKEN, OPERATOR_TOKEN, Stack, VIEWER_TOKEN, order, order_with};
use mend_e2e::js;
use mend_e2e::world::TEST_TIMEOUT;
use serde_json::{Value, json};

/// The schemathesis command: `SCHEMATHESIS_BIN`, else the one `make tools` installs.
fn schemathesis_bin() -> PathBuf {
    std::env::var_os("SCHEMATHESIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| mend_e2e::workspace().join(".tools/schemathesis/bin/schemathesis"))
}

/// Runs schemathesis against `url` with `token` and, when given, a config file aiming the path
/// parameters at real data, in `dir` (where it keeps its caches); its output when it found anything.
async fn fuzz(
    url: &str,
    token: &str,
    config: Option<&std::path::Path>,
    dir: &std::path::Path,
) -> Result<(), String> {
    let bin = schemathesis_bin();
    if !bin.exists() {
        return Err(format!(
            "no schemathesis at {}: run `make tools` (or set SCHEMATHESIS_BIN)",
            bin.display()
        ));
    }
    let mut cmd = tokio::process::Command::new(&bin);
    if let Some(c) = config {
        cmd.arg("--config-file").arg(c);
    }
    cmd.args([
        "run",
        &format!("{url}/api/openapi.json"),
        "--header",
        &format!("Authorization: Bearer {token}"),
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,\
         response_schema_conformance,ignored_auth",
        "--max-examples",
        "25",
        "--seed",
        "20261204",
        "--workers",
        "2",
        "--no-color",
        "--warnings",
        "off",
        "--generation-database",
        "none",
    ])
    .env("SCHEMATHESIS_HOOKS", "")
    .current_dir(dir)
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), cmd.output())
        .await
        .map_err(|_| "schemathesis ran past 300 s".to_owned())?
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[tokio::test]
async fn the_api_keeps_its_openapi_contract_for_every_role() {
    let s = Stack::start(None, "mask = [\"/card\"]").await.unwrap();
    let (world, d) = (&s.world, &s.dashboard);
    // A parked head of a held key with two messages behind it, and one more parked failure.
    let mut msgs = vec![order_with(
        "k1",
        0,
        "nobody",
        json!({"card": "4111111111111111"}),
    )];
    msgs.extend((1..3).map(|n| order("k1", n, "acct-1")));
    msgs.push(order_with(
        "k2",
        0,
        "nobody",
        json!({"card": "4000000000000002"}),
    ));
    js::publish_all(&world.js, msgs).await.unwrap();
    let parked = d
        .wait_messages("status=parked", 2, TEST_TIMEOUT)
        .await
        .unwrap();
    let head = parked
        .iter()
        .find(|m| m["key"] == "k1")
        .cloned()
        .unwrap_or(Value::Null);
    let (id, group) = (
        head["id"].as_str().unwrap_or_default(),
        head["group"].as_str().unwrap_or_default(),
    );

    // The document: OpenAPI 3.1, every route of the API, the bearer scheme.
    let (status, doc) = d.get("/api/openapi.json", None).await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{doc}");
    assert!(
        doc["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    for route in [
        "/api/overview",
        "/api/messages",
        "/api/messages/{id}",
        "/api/messages/{id}/resubmit",
        "/api/messages/{id}/discard",
        "/api/messages/{id}/try",
        "/api/groups",
        "/api/groups/{id}/resubmit",
        "/api/groups/{id}/discard",
        "/api/groups/{id}/try",
        "/api/bulk",
        "/api/jobs",
        "/api/jobs/{id}",
        "/api/jobs/{id}/stop",
        "/api/holds",
        "/api/holds/{service}/{key}/release",
        "/api/rules",
        "/api/audit",
        "/api/sessions/end",
        "/api/openapi.json",
    ] {
        assert!(
            paths.contains(&route),
            "{route} is not in the document: {paths:?}"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    let dir = tempfile::tempdir().unwrap();
    let aimed = dir.path().join("schemathesis.toml");
    std::fs::write(
        &aimed,
        format!(
            r#"[[operations]]
include-path-regex = "^/api/messages/"
parameters = {{ "path.id" = "{id}" }}

[[operations]]
include-path-regex = "^/api/groups/"
parameters = {{ "path.id" = "{group}" }}

[[operations]]
include-path-regex = "^/api/holds/"
parameters = {{ "path.service" = "app", "path.key" = "k1", "query.service" = "app" }}
"#
        ),
    )
    .unwrap();
    let mut failures = Vec::new();
    // The viewer first: the operator's and the admin's runs change the data.
    for (role, token) in [
        ("viewer", VIEWER_TOKEN),
        ("operator", OPERATOR_TOKEN),
        ("admin", ADMIN_TOKEN),
    ] {
        for config in [None, Some(aimed.as_path())] {
            if let Err(report) = fuzz(&d.url, token, config, dir.path()).await {
                failures.push(format!(
                    "== {role}{}\n{report}",
                    if config.is_some() {
                        ", aimed at real data"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\ndashboard log:\n{}",
        failures.join("\n"),
        d.process.log()
    );
}
