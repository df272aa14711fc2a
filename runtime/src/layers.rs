//! The layer check: every `crate::` path in a module's code names a module of a lower layer
//! of `LAYERS` (or its own). An import that runs back up fails here with file and line.

use std::path::{Path, PathBuf};

use crate::LAYERS;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top module a source file belongs to (`api/convert.rs` → `api`); `None` for `lib.rs`,
/// the façade above every layer.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    // `lib.rs` is the façade above every layer; this check is test code.
    (name != "lib" && name != "layers").then(|| name.to_string())
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::name` paths in `code` (comments stripped), with their line numbers; a group
/// `crate::{a::X, b}` names each of its members.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let text: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let line_at = |at: usize| text[..at].matches('\n').count() + 1;
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("crate::").map(|i| from + i) {
        let after = at + "crate::".len();
        from = after;
        if text[after..].starts_with('{') {
            let end = text[after..].find('}').map_or(text.len(), |i| after + i);
            for member in text[after + 1..end].split(',') {
                let name = ident(member);
                if !name.is_empty() {
                    found.push((line_at(at), name));
                }
            }
        } else {
            let name = ident(&text[after..]);
            if !name.is_empty() {
                found.push((line_at(at), name));
            }
        }
    }
    found
}

/// Every import that runs up or sideways across the layers, as `file:line: a -> b`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    sources(src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let Some(own) = layer_of(&module) else {
            out.push(format!(
                "{}: module {module:?} is in no layer of LAYERS",
                file.display()
            ));
            continue;
        };
        // Test code may reach anywhere (a store test builds a registry and twins).
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source is utf-8");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (line, target) in crate_paths(code) {
            if target == module {
                continue;
            }
            match layer_of(&target) {
                Some(l) if l < own => {}
                Some(l) => out.push(format!(
                    "{}:{line}: {module} (layer {own}) imports {target} (layer {l})",
                    file.display()
                )),
                // Re-exports of the façade (`crate::Runtime`) belong to the top.
                None if module == "testing" => {}
                None => out.push(format!(
                    "{}:{line}: {module} names crate::{target}, which is in no layer",
                    file.display()
                )),
            }
        }
    }
    out
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "imports against the layer order (lib.rs LAYERS):\n{}",
        found.join("\n")
    );
}

#[test]
fn a_back_import_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::create_dir_all(src.join("core")).expect("mkdir");
    std::fs::write(src.join("core/mod.rs"), "use crate::registry::Registry;\n").expect("write");
    std::fs::write(src.join("registry.rs"), "use crate::core::TwinMsg;\n").expect("write");
    std::fs::write(
        src.join("store.rs"),
        "use crate::watch::Watcher; // a sibling of the same layer\n",
    )
    .expect("write");
    std::fs::write(
        src.join("twin.rs"),
        "use crate::{\n    core::TwinMsg,\n    api::TwinApi,\n};\n",
    )
    .expect("write");
    let found = violations(src);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].contains("core/mod.rs:1: core (layer 0) imports registry (layer 1)"));
    assert!(found[1].contains("store.rs:1: store (layer 2) imports watch (layer 2)"));
    assert!(found[2].contains("twin.rs:1: twin (layer 3) imports api (layer 6)"));
}
