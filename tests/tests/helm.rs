//! The Helm chart `helm/mend`, without a cluster: `helm lint --strict`, `helm template` piped through
//! `kubernetes-validate --strict` (Kubernetes 1.37 schemas), the prometheus-operator objects checked
//! field by field (kubernetes-validate has no schema for those CRDs), the `mend.sidecar` snippet in an
//! example Deployment, and the rendered TOML configs loaded by the real `mend` binary.
//!
//! Needs `.tools/bin/helm` and `.tools/venv/bin/kubernetes-validate` (`make tools`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The kinds kubernetes-validate has no schema for: checked by `monitoring_objects_have_the_alerts`.
const CRD_KINDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];

fn tool(rel: &str) -> PathBuf {
    let path = mend_e2e::workspace().join(rel);
    assert!(
        path.exists(),
        "{} is missing: run `make tools` (scripts/install-helm.sh installs helm and kubernetes-validate)",
        path.display()
    );
    path
}

fn chart() -> PathBuf {
    mend_e2e::workspace().join("helm/mend")
}

fn full_values() -> String {
    chart().join("ci/full-values.yaml").display().to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs helm with HOME (and helm's cache and config) in a temp dir; panics with its output on failure.
fn helm(args: &[&str]) -> String {
    let helm = tool(".tools/bin/helm");
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(&helm)
        .args(args)
        .current_dir(mend_e2e::workspace())
        .env("HOME", home.path())
        .env("XDG_CACHE_HOME", home.path().join("cache"))
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("XDG_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {} failed:\n{}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn render(extra: &[&str]) -> String {
    let chart = chart().display().to_string();
    let mut args = vec!["template", "t", chart.as_str(), "--namespace", "mend"];
    args.extend_from_slice(extra);
    helm(&args)
}

/// The rendered documents as JSON (PyYAML from the tools' venv parses them).
fn docs(yaml: &str) -> Vec<Value> {
    let python = tool(".tools/venv/bin/python3");
    let mut child = Command::new(python)
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the rendered YAML does not parse:\n{}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n)
        .unwrap_or_else(|| panic!("no {k} {n} rendered"))
}

/// Validates every document of `yaml` whose kind is not a CRD of `CRD_KINDS` with
/// `kubernetes-validate --strict`; returns the kinds rendered, counted.
fn validate(yaml: &str) -> BTreeMap<String, usize> {
    let all = docs(yaml);
    let mut kinds = BTreeMap::new();
    for d in &all {
        *kinds.entry(kind(d).to_owned()).or_insert(0) += 1;
    }
    let core: Vec<&Value> = all
        .iter()
        .filter(|d| !CRD_KINDS.contains(&kind(d)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, d) in core.iter().enumerate() {
        // JSON is YAML: one file per document.
        let path = dir.path().join(format!("{i:02}-{}.yaml", kind(d)));
        std::fs::write(&path, serde_json::to_vec_pretty(d).unwrap()).unwrap();
        files.push(path);
    }
    let out = Command::new(tool(".tools/venv/bin/kubernetes-validate"))
        .arg("--strict")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let report = text(&out);
    assert!(
        out.status.success() && !report.contains("ERROR") && !report.contains("WARN"),
        "kubernetes-validate --strict refused the rendered chart:\n{report}"
    );
    assert_eq!(
        report.matches("passed for resource").count(),
        core.len(),
        "not every document was validated:\n{report}"
    );
    kinds
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn assert_hardened(pod: &Value, c: &Value) {
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{c}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{c}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{c}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{c}"
    );
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{c}");
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["mountPath"] == "/tmp"), "{c}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{c}");
}

#[test]
fn lint_strict_with_default_values() {
    let out = helm(&["lint", "--strict", &chart().display().to_string()]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn lint_strict_with_everything_turned_on() {
    let out = helm(&[
        "lint",
        "--strict",
        &chart().display().to_string(),
        "-f",
        &full_values(),
    ]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn the_schema_refuses_unknown_and_bad_values() {
    let helm_bin = tool(".tools/bin/helm");
    let home = tempfile::tempdir().unwrap();
    for set in [
        "bogus=1",
        "processor.bogus=1",
        "dashboard.users[0].name=a,dashboard.users[0].role=root,dashboard.users[0].passwordHash=$argon2id$x",
        "dashboard.databaseUrl=mysql://x",
        "nats.tls.bogus=1",
        "nats.tls.required=yes",
        "nats.tls.ca=a/b",
        "nats.auth.creds.key=../etc/passwd",
        "nats.auth.creds.contents=not a creds file",
        "nats.auth.nkey.contents=UABC",
        "nats.auth.nkey.existingSecret=Not_A_Name",
        // Not the schema, the templates: a client certificate without its key.
        "nats.tls.existingSecret=tls,nats.tls.cert=tls.crt",
    ] {
        let out = Command::new(&helm_bin)
            .args([
                "template",
                "t",
                &chart().display().to_string(),
                "--set",
                set,
            ])
            .env("HOME", home.path())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "--set {set} was accepted:\n{}",
            text(&out)
        );
    }
}

#[test]
fn default_values_render_valid_manifests() {
    let yaml = render(&[]);
    let kinds = validate(&yaml);
    let expected: BTreeMap<String, usize> = [
        ("ConfigMap", 2),
        ("Deployment", 2),
        ("PodDisruptionBudget", 2),
        ("Secret", 1),
        ("Service", 2),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(kinds, expected, "default values render these kinds");

    let all = docs(&yaml);
    let processor = find(&all, "Deployment", "t-mend-processor");
    let c = container(processor, "processor");
    assert_eq!(
        c["args"],
        serde_json::json!(["processor", "--config", "/etc/mend/processor.toml"])
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_hardened(&processor["spec"]["template"]["spec"], c);
    let rules_mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/etc/mend/rules")
        .expect("rules mounted at /etc/mend/rules");
    assert!(
        rules_mount.get("subPath").is_none(),
        "rules must be a directory mount (a subPath mount never sees ConfigMap updates)"
    );
    let toml = find(&all, "ConfigMap", "t-mend-processor")["data"]["processor.toml"]
        .as_str()
        .unwrap();
    assert!(toml.contains(r#"listen      = "0.0.0.0:9465""#), "{toml}");
    assert!(
        toml.contains(r#"rules       = "/etc/mend/rules""#),
        "{toml}"
    );
    assert!(
        find(&all, "ConfigMap", "t-mend-rules")["data"]["example.toml"].is_string(),
        "the default example rule"
    );

    let dashboard = find(&all, "Deployment", "t-mend-dashboard");
    let c = container(dashboard, "dashboard");
    assert_hardened(&dashboard["spec"]["template"]["spec"], c);
    let toml = find(&all, "Secret", "t-mend-dashboard")["stringData"]["dashboard.toml"]
        .as_str()
        .unwrap();
    assert!(toml.contains(r#"listen       = "0.0.0.0:8080""#), "{toml}");
    // Probes and scrapes go to the operations port, which the ingress does not reach.
    assert!(toml.contains(r#"ops_listen   = "0.0.0.0:9466""#), "{toml}");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "ops");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "ops");
    let service = find(&all, "Service", "t-mend-dashboard");
    let ports: Vec<(&str, &str)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["targetPort"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [("http", "http"), ("metrics", "ops")]);
    assert!(
        toml.contains(r#"database_url = "sqlite:///var/lib/mend/mend.db""#),
        "{toml}"
    );
    assert!(
        !yaml.contains("kind: Ingress"),
        "the Ingress is off by default"
    );
}

#[test]
fn everything_turned_on_renders_valid_manifests() {
    let yaml = render(&["-f", &full_values()]);
    let kinds = validate(&yaml);
    for k in [
        "Ingress",
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains_key(k), "no {k} in {kinds:?}");
    }
    assert_eq!(
        kinds["Secret"], 3,
        "NATS credentials, NATS credential files and dashboard.toml"
    );
    assert_eq!(kinds["Deployment"], 3, "processor, dashboard, example app");

    let all = docs(&yaml);
    let nats = find(&all, "Secret", "t-mend-nats");
    assert_eq!(nats["stringData"]["MEND_NATS_USER"], "mend");
    assert_eq!(nats["stringData"]["MEND_NATS_PASSWORD"], "s3cret");
    for d in ["t-mend-processor", "t-mend-dashboard", "t-mend-example-app"] {
        let spec = &find(&all, "Deployment", d)["spec"]["template"]["spec"];
        for c in spec["containers"].as_array().unwrap() {
            if c["name"] == "app" {
                continue;
            }
            assert_eq!(
                c["envFrom"][0]["secretRef"]["name"], "t-mend-nats",
                "{d}: {c}"
            );
            if d != "t-mend-example-app" {
                // extraEnv: where traces go.
                assert_eq!(
                    env_value(c, "OTEL_EXPORTER_OTLP_ENDPOINT"),
                    Some("http://otel-collector.monitoring:4318"),
                    "{d}: {c}"
                );
            }
        }
    }
    let toml = find(&all, "Secret", "t-mend-dashboard")["stringData"]["dashboard.toml"]
        .as_str()
        .unwrap();
    assert_eq!(toml.matches("[[user]]").count(), 2, "{toml}");
    assert_eq!(toml.matches("[[api_token]]").count(), 1, "{toml}");
    let rules = &find(&all, "ConfigMap", "t-mend-rules")["data"];
    assert!(
        rules.get("example.toml").is_none(),
        "`example.toml: null` drops the default rule"
    );
}

#[test]
fn monitoring_objects_have_the_alerts() {
    let yaml = render(&[
        "-f",
        &full_values(),
        "--show-only",
        "templates/monitoring.yaml",
    ]);
    let all = docs(&yaml);
    assert_eq!(all.len(), 2, "{yaml}");
    for d in &all {
        assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1", "{d}");
        assert_eq!(d["metadata"]["labels"]["release"], "prometheus", "{d}");
    }
    let sm = find(&all, "ServiceMonitor", "t-mend");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "t"
    );
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["port"], "metrics");
    assert_eq!(ep["path"], "/metrics");
    assert_eq!(ep["interval"], "15s");

    let pr = find(&all, "PrometheusRule", "t-mend");
    let rules = pr["spec"]["groups"][0]["rules"].as_array().unwrap();
    let by_alert = |a: &str| {
        rules
            .iter()
            .find(|r| r["alert"] == a)
            .unwrap_or_else(|| panic!("no alert {a}"))
    };
    for (alert, metric, threshold) in [
        ("MendParkedDepth", "mend_parked_total", "> 50"),
        (
            "MendHoldOldestAge",
            "mend_hold_oldest_age_seconds",
            "> 1800",
        ),
        ("MendRuleErrors", "mend_rule_errors_total", "> 5"),
    ] {
        let r = by_alert(alert);
        let expr = r["expr"].as_str().unwrap();
        assert!(
            expr.contains(metric) && expr.ends_with(threshold),
            "{alert}: {expr}"
        );
        assert!(r["labels"]["severity"].is_string(), "{r}");
        let summary = r["annotations"]["summary"].as_str().unwrap();
        assert!(!summary.is_empty(), "{r}");
    }
    assert!(
        by_alert("MendHoldOldestAge")["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("{{ $labels.service }}"),
        "Prometheus templates survive Helm's"
    );

    let defaults = render(&[]);
    for k in CRD_KINDS {
        assert!(
            !defaults.contains(&format!("kind: {k}")),
            "{k} is off by default"
        );
    }
}

#[test]
fn the_grafana_dashboard_is_a_configmap_grafana_finds_and_the_alerts_link_to_it() {
    let yaml = render(&[
        "-f",
        &full_values(),
        "--show-only",
        "templates/grafana-dashboard.yaml",
    ]);
    let all = docs(&yaml);
    let cm = find(&all, "ConfigMap", "t-mend-grafana-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1", "{cm}");
    assert_eq!(
        cm["metadata"]["annotations"]["grafana_folder"], "mend",
        "{cm}"
    );
    let json: Value = serde_json::from_str(cm["data"]["mend.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "mend-overview");
    let titles: Vec<&str> = json["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for t in [
        "Throughput",
        "Failed app calls by kind",
        "Parked",
        "Hold age",
        "Repairs per rule",
        "App latency",
    ] {
        assert!(titles.contains(&t), "no panel {t}: {titles:?}");
    }
    // The file in the chart is the dashboard as it is shipped.
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/mend.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(file, json);

    let rules = render(&[
        "-f",
        &full_values(),
        "--show-only",
        "templates/monitoring.yaml",
    ]);
    let all = docs(&rules);
    let pr = find(&all, "PrometheusRule", "t-mend");
    for r in pr["spec"]["groups"][0]["rules"].as_array().unwrap() {
        assert_eq!(r["annotations"]["dashboard_uid"], "mend-overview", "{r}");
        assert_eq!(
            r["annotations"]["dashboard_url"], "https://grafana.example.com/d/mend-overview",
            "{r}"
        );
    }
    assert!(!render(&[]).contains("grafana_dashboard"), "off by default");
}

#[test]
fn the_sidecar_snippet_renders_a_valid_deployment() {
    let yaml = render(&[
        "--set",
        "sidecarExample.enabled=true",
        "--set",
        "nats.auth.token=t0ken",
        "--show-only",
        "templates/sidecar-example.yaml",
    ]);
    let kinds = validate(&yaml);
    assert_eq!(kinds["Deployment"], 1, "{kinds:?}");
    assert_eq!(kinds["ConfigMap"], 1, "{kinds:?}");
    let all = docs(&yaml);
    let deployment = find(&all, "Deployment", "t-mend-example-app");
    let spec = &deployment["spec"]["template"]["spec"];
    let sidecar = container(deployment, "mend-sidecar");
    container(deployment, "app");
    assert_eq!(
        sidecar["args"],
        serde_json::json!(["sidecar", "--config", "/etc/mend/sidecar.toml"])
    );
    assert_eq!(sidecar["image"], "ghcr.io/mend/mend:0.1.0");
    assert_hardened(spec, sidecar);
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env = sidecar["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "MEND_LISTEN" && e["value"] == "0.0.0.0:9464"),
        "{sidecar}"
    );
    assert_eq!(sidecar["envFrom"][0]["secretRef"]["name"], "t-mend-nats");
    let volumes = spec["volumes"].as_array().unwrap();
    let config = volumes
        .iter()
        .find(|v| v["name"] == "mend-sidecar-config")
        .expect("the sidecar's config volume");
    assert_eq!(config["configMap"]["name"], "t-mend-example-sidecar");
    let toml = find(&all, "ConfigMap", "t-mend-example-sidecar")["data"]["sidecar.toml"]
        .as_str()
        .unwrap();
    assert!(toml.contains(r#"subjects = ["orders.>"]"#), "{toml}");
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["value"].as_str().unwrap())
}

/// The NATS file variables of a container, each checked to name a file of a read-only Secret volume
/// mounted in that container: returns variable -> (path, Secret name).
fn nats_files(pod: &Value, c: &Value) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for e in c["env"].as_array().unwrap() {
        let var = e["name"].as_str().unwrap();
        if ![
            "MEND_NATS_CREDS",
            "MEND_NATS_NKEY_SEED_FILE",
            "MEND_NATS_TLS_CA",
            "MEND_NATS_TLS_CERT",
            "MEND_NATS_TLS_KEY",
        ]
        .contains(&var)
        {
            continue;
        }
        let path = e["value"].as_str().unwrap();
        let (dir, file) = path.rsplit_once('/').unwrap();
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{var}={path}: nothing mounted at {dir}: {c}"));
        assert_eq!(mount["readOnly"], true, "{mount}");
        assert!(mount.get("subPath").is_none(), "{mount}");
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        let secret = &volume["secret"];
        assert!(
            secret["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["key"] == file && i["path"] == file),
            "{var}={path}: {file} is not an item of {volume}"
        );
        out.insert(
            var.to_owned(),
            (
                path.to_owned(),
                secret["secretName"].as_str().unwrap().to_owned(),
            ),
        );
    }
    out
}

#[test]
fn nats_credential_files_are_mounted_and_named() {
    let yaml = render(&["-f", &full_values()]);
    validate(&yaml);
    let all = docs(&yaml);

    let files = find(&all, "Secret", "t-mend-nats-files");
    let creds = files["stringData"]["nats.creds"].as_str().unwrap();
    assert!(
        creds.starts_with("-----BEGIN NATS USER JWT-----\n"),
        "{creds}"
    );
    assert!(creds.contains("-----BEGIN USER NKEY SEED-----"), "{creds}");
    assert_eq!(
        files["stringData"].as_object().unwrap().len(),
        1,
        "the NKey seed comes from its existing Secret: {files}"
    );

    let expected: BTreeMap<String, (String, String)> = [
        (
            "MEND_NATS_CREDS",
            "/etc/mend-nats/creds/nats.creds",
            "t-mend-nats-files",
        ),
        (
            "MEND_NATS_NKEY_SEED_FILE",
            "/etc/mend-nats/nkey/mend.nk",
            "mend-nkey",
        ),
        (
            "MEND_NATS_TLS_CA",
            "/etc/mend-nats/tls/ca.crt",
            "nats-client-tls",
        ),
        (
            "MEND_NATS_TLS_CERT",
            "/etc/mend-nats/tls/tls.crt",
            "nats-client-tls",
        ),
        (
            "MEND_NATS_TLS_KEY",
            "/etc/mend-nats/tls/tls.key",
            "nats-client-tls",
        ),
    ]
    .into_iter()
    .map(|(v, p, s)| (v.to_owned(), (p.to_owned(), s.to_owned())))
    .collect();
    for (d, name) in [
        ("t-mend-processor", "processor"),
        ("t-mend-dashboard", "dashboard"),
        ("t-mend-example-app", "mend-sidecar"),
    ] {
        let deployment = find(&all, "Deployment", d);
        let pod = &deployment["spec"]["template"]["spec"];
        let c = container(deployment, name);
        assert_eq!(nats_files(pod, c), expected, "{d}");
        assert_eq!(env_value(c, "MEND_NATS_TLS_REQUIRED"), Some("true"), "{d}");
        assert_eq!(env_value(c, "MEND_NATS_REPLICAS"), Some("3"), "{d}");
        // The app's container sees none of it.
        if let Some(app) = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "app")
        {
            let mounts = app["volumeMounts"].as_array().cloned().unwrap_or_default();
            assert!(
                mounts.iter().all(|m| !m["mountPath"]
                    .as_str()
                    .unwrap()
                    .starts_with("/etc/mend-nats")),
                "{app}"
            );
        }
    }

    // The rendered configs name the same files in [nats], with the streams' replicas.
    for toml in [
        find(&all, "ConfigMap", "t-mend-processor")["data"]["processor.toml"]
            .as_str()
            .unwrap(),
        find(&all, "Secret", "t-mend-dashboard")["stringData"]["dashboard.toml"]
            .as_str()
            .unwrap(),
    ] {
        let nats = toml.split_once("\n[nats]\n").expect("a [nats] table").1;
        for line in [
            "replicas       = 3",
            r#"creds          = "/etc/mend-nats/creds/nats.creds""#,
            r#"nkey_seed_file = "/etc/mend-nats/nkey/mend.nk""#,
            r#"tls_ca         = "/etc/mend-nats/tls/ca.crt""#,
            r#"tls_cert       = "/etc/mend-nats/tls/tls.crt""#,
            r#"tls_key        = "/etc/mend-nats/tls/tls.key""#,
            "tls_required   = true",
        ] {
            assert!(nats.contains(line), "no {line:?} in [nats]:\n{toml}");
        }
    }

    // The other way round: the creds file from an existing Secret, the seed rendered by the chart,
    // the CA alone (no client certificate), and nothing when nothing is set.
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    let yaml = render(&[
        "--set",
        "sidecarExample.enabled=true",
        "--set",
        "nats.auth.creds.existingSecret=orders-creds",
        "--set",
        &format!("nats.auth.nkey.contents={seed}"),
        "--set",
        "nats.tls.existingSecret=nats-ca",
    ]);
    validate(&yaml);
    let all = docs(&yaml);
    let files = find(&all, "Secret", "t-mend-nats-files");
    assert_eq!(files["stringData"]["nkey.seed"], seed.as_str());
    assert!(files["stringData"].get("nats.creds").is_none(), "{files}");
    for (d, name) in [
        ("t-mend-processor", "processor"),
        ("t-mend-dashboard", "dashboard"),
        ("t-mend-example-app", "mend-sidecar"),
    ] {
        let deployment = find(&all, "Deployment", d);
        let c = container(deployment, name);
        let got = nats_files(&deployment["spec"]["template"]["spec"], c);
        let want: BTreeMap<String, (String, String)> = [
            (
                "MEND_NATS_CREDS",
                "/etc/mend-nats/creds/nats.creds",
                "orders-creds",
            ),
            (
                "MEND_NATS_NKEY_SEED_FILE",
                "/etc/mend-nats/nkey/nkey.seed",
                "t-mend-nats-files",
            ),
            ("MEND_NATS_TLS_CA", "/etc/mend-nats/tls/ca.crt", "nats-ca"),
        ]
        .into_iter()
        .map(|(v, p, s)| (v.to_owned(), (p.to_owned(), s.to_owned())))
        .collect();
        assert_eq!(got, want, "{d}");
        assert_eq!(env_value(c, "MEND_NATS_TLS_REQUIRED"), None, "{d}");
    }

    let defaults = render(&["--set", "sidecarExample.enabled=true"]);
    assert!(!defaults.contains("/etc/mend-nats"), "{defaults}");
    assert!(!defaults.contains("nats-files"), "{defaults}");
}

/// Runs `mend <args>` against an unreachable NATS: 69 (unavailable) means the config was read and
/// accepted; 64 means it was refused.
fn mend_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(mend_e2e::mend::mend_bin().unwrap())
        .args(args)
        .env("MEND_NATS_URL", "nats://127.0.0.1:1")
        .env("MEND_NATS_CONNECT_TIMEOUT", "1s")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), text(&out))
}

fn write_data(doc: &Value, field: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (file, contents) in doc[field].as_object().unwrap() {
        std::fs::write(dir.join(file), contents.as_str().unwrap()).unwrap();
    }
}

#[test]
fn the_rendered_configs_load_in_mend() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = render(&["-f", &full_values()]);
    let all = docs(&yaml);
    let rules = dir.path().join("rules");
    let rules_arg = rules.display().to_string();
    write_data(find(&all, "ConfigMap", "t-mend-rules"), "data", &rules);
    write_data(
        find(&all, "ConfigMap", "t-mend-processor"),
        "data",
        dir.path(),
    );
    write_data(
        find(&all, "Secret", "t-mend-dashboard"),
        "stringData",
        dir.path(),
    );
    write_data(
        find(&all, "ConfigMap", "t-mend-example-sidecar"),
        "data",
        dir.path(),
    );

    let (code, out) = mend_exit(&["rules", "check", &rules_arg], &[]);
    assert_eq!(code, Some(0), "mend rules check: {out}");
    let db = format!("sqlite://{}/mend.db", dir.path().display());

    // Stand-ins for the mounted NATS files: a real user seed (mend parses the creds file and the
    // seed before it connects), PEM-shaped TLS files.
    let files = dir.path().join("nats-files");
    std::fs::create_dir_all(&files).unwrap();
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let mut local: Vec<(&str, String)> = Vec::new();
    for (var, file, contents) in [
        ("MEND_NATS_CREDS", "nats.creds", creds.as_str()),
        ("MEND_NATS_NKEY_SEED_FILE", "mend.nk", seed.as_str()),
        ("MEND_NATS_TLS_CA", "ca.crt", pem),
        ("MEND_NATS_TLS_CERT", "tls.crt", pem),
        ("MEND_NATS_TLS_KEY", "tls.key", pem),
    ] {
        let path = files.join(file);
        std::fs::write(&path, contents).unwrap();
        local.push((var, path.display().to_string()));
    }

    for (role, deployment, name) in [
        ("processor", "t-mend-processor", "processor"),
        ("dashboard", "t-mend-dashboard", "dashboard"),
        ("sidecar", "t-mend-example-app", "mend-sidecar"),
    ] {
        let config = dir
            .path()
            .join(format!("{role}.toml"))
            .display()
            .to_string();
        // The container's MEND_NATS_* environment as rendered (the URL aside: NATS is unreachable).
        let rendered: Vec<(String, String)> = container(find(&all, "Deployment", deployment), name)
            ["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .filter(|(k, _)| k.starts_with("MEND_NATS_") && k != "MEND_NATS_URL")
            .collect();
        assert!(
            rendered
                .iter()
                .any(|(k, v)| k == "MEND_NATS_CREDS" && v.starts_with("/etc/mend-nats/")),
            "{role}: {rendered:?}"
        );
        // The paths of the pods (/etc/mend/rules, the database) are replaced by the temp dir's.
        let mut env: Vec<(&str, &str)> = vec![
            ("MEND_RULES", rules_arg.as_str()),
            ("MEND_DATABASE_URL", db.as_str()),
        ];
        env.extend(rendered.iter().map(|(k, v)| (k.as_str(), v.as_str())));

        // As rendered, mend reads the creds file at the pod's path (absent here): the config and
        // the variables name it where the Secret is mounted.
        let (code, out) = mend_exit(&[role, "--config", &config], &env);
        assert_eq!(code, Some(69), "mend {role}:\n{out}");
        assert!(
            out.contains("cannot read NATS credentials /etc/mend-nats/creds/nats.creds"),
            "mend {role} should look for the creds file where the chart mounts it:\n{out}"
        );

        // With the files in place, it gets as far as the unreachable NATS.
        env.extend(local.iter().map(|(k, v)| (*k, v.as_str())));
        let (code, out) = mend_exit(&[role, "--config", &config], &env);
        assert_eq!(
            code,
            Some(69),
            "mend {role} should accept the rendered config and stop at the unreachable NATS:\n{out}"
        );
        assert!(
            out.contains("cannot connect to NATS") && !out.contains("cannot read NATS credentials"),
            "mend {role} should read the NATS files and stop at the unreachable NATS:\n{out}"
        );
    }

    // The default values' example rule passes its own inline test.
    let defaults = docs(&render(&[]));
    let default_rules = dir.path().join("default-rules");
    write_data(
        find(&defaults, "ConfigMap", "t-mend-rules"),
        "data",
        &default_rules,
    );
    let (code, out) = mend_exit(
        &["rules", "check", &default_rules.display().to_string()],
        &[],
    );
    assert_eq!(code, Some(0), "mend rules check (defaults): {out}");
}
