//! The layer order of the crate docs, checked: every `crate::` path in a module's code (test
//! code aside: fixtures may reach up) names the module itself or one listed before it.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

/// The layers as the crate docs list them (`//! N. \`name\`: ...`), lowest first.
fn layers(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("//! ")?;
            let (n, rest) = rest.split_once(". `")?;
            n.parse::<u32>().ok()?;
            Some(rest.split_once('`')?.0.to_string())
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("src readable") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `text` without comments and without the items that follow `#[cfg(test)]`.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            // Skip the next item: one line (`mod tests;`) or a braced block.
            let mut depth = 0i32;
            for l in lines.by_ref() {
                depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
                if depth <= 0 && (l.contains(';') || l.contains('}')) {
                    break;
                }
            }
            continue;
        }
        let line = line.split("//").next().unwrap_or_default();
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The top-level modules named by `crate::` paths in `code` (grouped imports included).
fn uses(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at depth-0 commas.
            let mut depth = 0;
            let mut item = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(std::mem::take(&mut item));
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
            found.push(item);
        } else {
            found.push(rest.to_string());
        }
    }
    found
        .iter()
        .filter_map(|i| {
            let name: String = i
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            name.starts_with(|c: char| c.is_ascii_lowercase())
                .then_some(name)
        })
        .collect()
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let order = layers(&lib);
    assert!(
        order.len() >= 10,
        "the crate docs list the layers: {order:?}"
    );
    let rank: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        let test_code = parts.iter().any(|p| p == "tests" || p == "fixtures");
        if test_code || matches!(parts[0].as_str(), "lib" | "main" | "layers" | "sys") {
            continue;
        }
        let me = parts[0].as_str();
        let Some(&mine) = rank.get(me) else {
            wrong.push(format!(
                "{}: module `{me}` is not in the crate docs' layers",
                rel.display()
            ));
            continue;
        };
        let text = code(&fs::read_to_string(f).expect("readable"));
        // The outside world's two big dependencies stay in their rooms.
        for (krate, home) in [
            ("aya::", "dataplane"),
            ("kube::", "sources"),
            ("k8s_openapi::", "sources"),
        ] {
            if text.contains(krate) && me != home {
                wrong.push(format!(
                    "{}: uses `{krate}`, which only `{home}` may",
                    rel.display()
                ));
            }
        }
        for used in uses(&text) {
            checked += 1;
            match rank.get(used.as_str()) {
                Some(&r) if r <= mine => {}
                Some(_) => wrong.push(format!(
                    "{}: `{me}` (layer {}) uses `{used}` (layer {}), a higher layer",
                    rel.display(),
                    mine + 1,
                    rank[used.as_str()] + 1
                )),
                // The crate root's helpers.
                None if used == "LockExt" || used == "sys" => {}
                None => wrong.push(format!("{}: `crate::{used}` is in no layer", rel.display())),
            }
        }
    }
    assert!(
        checked > 100,
        "the scan found the crate's paths ({checked})"
    );
    assert!(wrong.is_empty(), "layer violations:\n{}", wrong.join("\n"));
}

#[test]
fn the_scan_sees_grouped_imports_and_skips_comments_and_tests() {
    let text = "use crate::{\n    model::{Service, check::Probe},\n    health::x,\n};\n\
                // crate::api in a comment\n\
                fn f() { crate::status::Snapshot::default(); }\n\
                #[cfg(test)]\nmod tests {\n    use crate::app;\n}\n";
    assert_eq!(uses(&code(text)), ["model", "health", "status"]);
}
