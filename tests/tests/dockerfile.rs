//! The Dockerfile (SPEC §11), checked without a Docker daemon (none runs on the CI machines):
//! hadolint finds nothing at any level, the final image is non-root and read-only-root friendly with
//! `mend` as its entrypoint, the build is the locked release build of the `mend` binary, and the
//! build context keeps every file that build reads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn dockerfile() -> String {
    std::fs::read_to_string(mend_e2e::workspace().join("Dockerfile")).unwrap()
}

#[test]
fn hadolint_finds_nothing() {
    let root = mend_e2e::workspace();
    let bin = root.join(".tools/venv/bin/hadolint");
    assert!(
        bin.exists(),
        "hadolint is missing: run `make tools` (scripts/install-hadolint.sh)"
    );
    let out = Command::new(bin)
        .args(["--failure-threshold", "style", "Dockerfile"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The instructions of the last stage.
fn final_stage(text: &str) -> Vec<String> {
    let mut stage = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if line.ends_with('\\') {
            continue;
        }
        let instruction = std::mem::take(&mut current).trim().to_owned();
        if instruction.starts_with("FROM ") {
            stage.clear();
        }
        stage.push(instruction);
    }
    stage
}

#[test]
fn the_final_image_is_small_non_root_and_runs_mend() {
    let text = dockerfile();
    assert!(text.matches("\nFROM ").count() >= 2, "multi-stage");
    let last = final_stage(&text);
    assert!(
        last[0].starts_with("FROM gcr.io/distroless/cc-debian12:nonroot"),
        "{last:?}"
    );
    let user = last.iter().rfind(|i| i.starts_with("USER ")).unwrap();
    assert_eq!(
        user, "USER 65532:65532",
        "numeric, so runAsNonRoot can verify it"
    );
    assert!(last.contains(&r#"ENTRYPOINT ["/usr/local/bin/mend"]"#.to_owned()));
    // The only writable place it needs (besides /tmp) is its working directory, owned by the user.
    assert!(last.contains(&"WORKDIR /data".to_owned()), "{last:?}");
    assert!(
        last.iter().any(
            |i| i.starts_with("COPY --from=build --chown=65532:65532") && i.ends_with(" /data")
        ),
        "{last:?}"
    );
    // The chart runs it as this user with a read-only root filesystem.
    let values =
        std::fs::read_to_string(mend_e2e::workspace().join("helm/mend/values.yaml")).unwrap();
    assert!(values.contains("runAsUser: 65532") && values.contains("readOnlyRootFilesystem: true"));
    // The build: locked, release, the mend binary, checked by running it.
    assert!(text.contains("cargo build --release --locked --bin mend"));
    assert!(text.contains("/out/usr/local/bin/mend --version"));
}

/// Whether `.dockerignore` pattern `p` (the forms used there: `dir/`, `**/name/`, `*.ext`, `name`)
/// excludes `path` (relative, `/`-separated).
fn ignored_by(p: &str, path: &str) -> bool {
    let p = p.trim_end_matches('/');
    if let Some(name) = p.strip_prefix("**/") {
        return path.split('/').any(|c| c == name);
    }
    if let Some(ext) = p.strip_prefix("*.") {
        return !path.contains('/') && path.ends_with(&format!(".{ext}"));
    }
    path == p || path.starts_with(&format!("{p}/"))
}

#[test]
fn the_build_context_keeps_what_the_build_reads() {
    let root = mend_e2e::workspace();
    let patterns: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for p in &patterns {
        let simple = !p.starts_with('!')
            && !p.contains('?')
            && (p.starts_with("**/") || !p[1..].contains('*'));
        assert!(simple, "the test understands only simple patterns: {p}");
    }
    let ignored = |path: &str| patterns.iter().any(|p| ignored_by(p, path));
    // What cargo reads for `--bin mend`: the workspace, every member's manifest and sources, and
    // the files the sources embed (rules, CSS, templates, migrations).
    let needed = [
        "Cargo.toml",
        "Cargo.lock",
        "sidecar/src/main.rs",
        "repair-rules/src/lib.rs",
        "dashboard/src/lib.rs",
        "dashboard/templates",
        "dashboard/static/mend.css",
        "dashboard/migrations/sqlite",
        "dashboard/migrations/postgres",
        "tests/Cargo.toml",
        "tests/src/lib.rs",
        "examples/rules/orders.toml",
    ];
    for n in needed {
        assert!(root.join(n).exists(), "{n} moved: update this test");
        assert!(!ignored(n), "{n} is left out of the build context");
    }
    for n in [
        "target/debug",
        ".tools/venv",
        "tests/browser/node_modules/x",
        ".git/HEAD",
    ] {
        assert!(ignored(n), "{n} would be sent to the build");
    }
    // Every file embedded by the sources is in the context.
    for dir in ["sidecar/src", "dashboard/src", "repair-rules/src"] {
        for file in walk(&root.join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            for embedded in text.split("include_str!(\"").skip(1) {
                let rel = embedded.split('"').next().unwrap();
                let target = file.parent().unwrap().join(rel);
                let target = target.canonicalize().unwrap();
                let rel = target.strip_prefix(&root).unwrap().to_string_lossy();
                assert!(
                    !ignored(&rel),
                    "{rel} (embedded) is left out of the build context"
                );
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}
