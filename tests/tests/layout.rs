//! The architecture checks `make test` runs find what they are for: the import-cycle check fails on
//! a crate whose modules name each other (through `use`, paths in code, `super::` and a parent's
//! use of its child) and passes on one whose dependencies point one way; the mend and repair-rules
//! crates pass it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn check(srcs: &[&Path]) -> Output {
    let script = mend_e2e::workspace().join("scripts/check-module-cycles.py");
    Command::new("python3")
        .arg(script)
        .args(srcs)
        .output()
        .unwrap()
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

#[test]
fn cycles_are_found_in_every_form_and_one_way_dependencies_pass() {
    let one_way = [
        ("lib.rs", "pub mod a;\npub mod b;\n"),
        (
            "a/mod.rs",
            "pub mod low;\nuse low::Thing;\npub fn f() { crate::b::g(); }\n",
        ),
        (
            "a/low.rs",
            "pub struct Thing;\n// crate::a::f() in a comment is no dependency\n",
        ),
        (
            "b.rs",
            "pub fn g() {}\n#[cfg(test)]\nmod tests {\n    use crate::a::*;\n}\n",
        ),
    ];
    let cycles: [(&str, &[(&str, &str)]); 4] = [
        (
            "use",
            &[
                ("lib.rs", "mod a;\nmod b;\n"),
                ("a.rs", "use crate::b::G;\npub struct A;\n"),
                ("b.rs", "use crate::a::A;\npub struct G;\n"),
            ],
        ),
        (
            "path in code and grouped use",
            &[
                ("lib.rs", "mod x;\n"),
                ("x/mod.rs", "pub mod p;\npub mod q;\n"),
                ("x/p.rs", "pub fn f() { crate::x::q::g() }\n"),
                (
                    "x/q.rs",
                    "use crate::x::{self as here, p::f};\npub fn g() { f() }\n",
                ),
            ],
        ),
        (
            "super and a parent using its child",
            &[
                ("lib.rs", "mod x;\n"),
                (
                    "x/mod.rs",
                    "mod child;\npub struct Top;\npub fn f() { child::g(); }\n",
                ),
                ("x/child.rs", "use super::Top;\npub fn g() {}\n"),
            ],
        ),
        (
            "three modules",
            &[
                ("lib.rs", "mod a;\nmod b;\nmod c;\n"),
                ("a.rs", "use crate::b::B;\npub struct A;\n"),
                ("b.rs", "use crate::c::C;\npub struct B;\n"),
                ("c.rs", "pub struct C;\nfn f() -> crate::a::A { todo!() }\n"),
            ],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    write(&good, &one_way);
    let out = check(&[&good]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (i, (what, files)) in cycles.iter().enumerate() {
        let src = dir.path().join(format!("bad{i}"));
        write(&src, files);
        let out = check(&[&src]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{what}: {text}");
        assert!(text.contains("import cycle"), "{what}: {text}");
    }
}

#[test]
fn mend_and_repair_rules_have_no_import_cycle() {
    let root = mend_e2e::workspace();
    let out = check(&[&root.join("sidecar/src"), &root.join("repair-rules/src")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
