//! Renders `charts/weir` with the subset of Helm's template language the chart keeps to, so
//! that the chart's default rendering can be checked here, where no `helm` binary can be
//! installed: `{{ .Values.a.b }}`, `{{ .Release.Namespace }}`, `{{ .Chart.AppVersion }}`,
//! pipes to `quote` and `toJson`, `toYaml X | nindent N`, `if`/`range`/`end`, trim markers, and
//! `(.Files.Glob "dir/*.json").AsConfig | nindent N`. Anything else is an error, so the chart
//! cannot silently grow past what this renderer checks.

use std::path::Path;

use serde_json::Value;

#[derive(Debug)]
enum Node {
    Text(String),
    Expr(String),
    If(String, Vec<Node>),
    Range(String, Vec<Node>),
}

/// Splits a template into text and actions, applying the trim markers.
fn tokens(src: &str) -> Result<Vec<(bool, String)>, String> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = src;
    while let Some(start) = rest.find("{{") {
        let mut text = rest[..start].to_string();
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or("unclosed {{")?;
        let mut action = &after[..end];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end().to_string();
            action = a;
        }
        let trim_after = action.ends_with('-');
        if trim_after {
            action = &action[..action.len() - 1];
        }
        out.push((false, text));
        out.push((true, action.trim().to_string()));
        rest = &after[end + 2..];
        if trim_after {
            rest = rest.trim_start();
        }
    }
    out.push((false, rest.to_string()));
    Ok(out)
}

fn parse(tokens: &mut std::vec::IntoIter<(bool, String)>) -> Result<(Vec<Node>, bool), String> {
    let mut nodes = Vec::new();
    while let Some((action, t)) = tokens.next() {
        if !action {
            nodes.push(Node::Text(t));
        } else if t == "end" {
            return Ok((nodes, true));
        } else if let Some(cond) = t.strip_prefix("if ") {
            let (body, closed) = parse(tokens)?;
            if !closed {
                return Err(format!("if {cond}: no end"));
            }
            nodes.push(Node::If(cond.trim().to_string(), body));
        } else if let Some(list) = t.strip_prefix("range ") {
            let (body, closed) = parse(tokens)?;
            if !closed {
                return Err(format!("range {list}: no end"));
            }
            nodes.push(Node::Range(list.trim().to_string(), body));
        } else {
            nodes.push(Node::Expr(t));
        }
    }
    Ok((nodes, false))
}

struct Ctx<'a> {
    values: &'a Value,
    namespace: &'a str,
    app_version: &'a str,
    chart: &'a Path,
}

fn lookup(ctx: &Ctx, dot: &Value, path: &str) -> Result<Value, String> {
    if path == ".Release.Namespace" {
        return Ok(Value::String(ctx.namespace.into()));
    }
    if path == ".Chart.AppVersion" {
        return Ok(Value::String(ctx.app_version.into()));
    }
    let (root, rest) = match path.strip_prefix(".Values") {
        Some(r) => (ctx.values, r),
        None => (dot, path),
    };
    let mut v = root;
    for part in rest.split('.').filter(|p| !p.is_empty()) {
        v = v
            .get(part)
            .ok_or_else(|| format!("{path}: no value {part:?}"))?;
    }
    Ok(v.clone())
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn nindent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    let mut out = String::new();
    for line in text.trim_end_matches('\n').lines() {
        out.push('\n');
        if !line.is_empty() {
            out.push_str(&pad);
        }
        out.push_str(line);
    }
    out
}

fn eval(ctx: &Ctx, dot: &Value, expr: &str) -> Result<String, String> {
    let stages: Vec<&str> = expr.split('|').map(str::trim).collect();
    let mut value: String = match stages[0] {
        s if s.starts_with("toYaml ") => {
            let v = lookup(ctx, dot, s["toYaml ".len()..].trim())?;
            serde_saphyr::to_string(&v).map_err(|e| e.to_string())?
        }
        s if s.starts_with("(.Files.Glob ") && s.ends_with(").AsConfig") => {
            let pattern = s["(.Files.Glob ".len()..s.len() - ").AsConfig".len()]
                .trim()
                .trim_matches('"');
            let (dir, ext) = pattern
                .split_once("/*")
                .ok_or_else(|| format!("glob {pattern}: only DIR/*EXT"))?;
            let mut files: Vec<_> = std::fs::read_dir(ctx.chart.join(dir))
                .map_err(|e| format!("{dir}: {e}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(ext))
                .collect();
            files.sort();
            let mut out = String::new();
            for f in files {
                let name = f
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let body = std::fs::read_to_string(&f).map_err(|e| e.to_string())?;
                out.push_str(&format!("{name}: |{}\n", nindent(&body, 2)));
            }
            out
        }
        s if s.starts_with('.') => scalar(&lookup(ctx, dot, s)?),
        s => return Err(format!("unsupported action {s:?}")),
    };
    for stage in &stages[1..] {
        value = match *stage {
            "quote" => format!("{value:?}"),
            "toJson" => {
                let v = lookup(ctx, dot, stages[0])?;
                serde_json::to_string(&v).map_err(|e| e.to_string())?
            }
            s if s.starts_with("nindent ") => {
                let n: usize = s["nindent ".len()..]
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad {s}"))?;
                nindent(&value, n)
            }
            s => return Err(format!("unsupported function {s:?}")),
        };
    }
    Ok(value)
}

fn run(ctx: &Ctx, dot: &Value, nodes: &[Node], out: &mut String) -> Result<(), String> {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Expr(e) => out.push_str(&eval(ctx, dot, e)?),
            Node::If(cond, body) => {
                if truthy(&lookup(ctx, dot, cond)?) {
                    run(ctx, dot, body, out)?;
                }
            }
            Node::Range(list, body) => {
                for item in lookup(ctx, dot, list)?
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    run(ctx, &item, body, out)?;
                }
            }
        }
    }
    Ok(())
}

/// Renders every template of the chart at `chart` (sorted by file name) with its
/// `values.yaml`, in `namespace`; the CRDs of `crds/` first, as Helm installs them.
pub fn render(chart: &Path, namespace: &str) -> Result<String, String> {
    render_with(chart, namespace, &Value::Null)
}

/// Renders with `overrides` merged over `values.yaml` (objects key by key, the rest replaced),
/// like `helm template -f overrides.yaml`.
pub fn render_with(chart: &Path, namespace: &str, overrides: &Value) -> Result<String, String> {
    let mut values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart.join("values.yaml")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("values.yaml: {e}"))?;
    merge(&mut values, overrides);
    let meta: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart.join("Chart.yaml")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("Chart.yaml: {e}"))?;
    let app_version = scalar(&meta["appVersion"]);
    let ctx = Ctx {
        values: &values,
        namespace,
        app_version: &app_version,
        chart,
    };
    let mut docs = Vec::new();
    let mut crds: Vec<_> = std::fs::read_dir(chart.join("crds"))
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    crds.sort();
    for c in crds {
        docs.push(std::fs::read_to_string(c).map_err(|e| e.to_string())?);
    }
    let mut templates: Vec<_> = std::fs::read_dir(chart.join("templates"))
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    templates.sort();
    for t in templates {
        let src = std::fs::read_to_string(&t).map_err(|e| e.to_string())?;
        let name = t
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let (nodes, closed) =
            parse(&mut tokens(&src)?.into_iter()).map_err(|e| format!("{name}: {e}"))?;
        if closed {
            return Err(format!("{name}: end without if or range"));
        }
        let mut out = String::new();
        run(&ctx, &Value::Null, &nodes, &mut out).map_err(|e| format!("{name}: {e}"))?;
        docs.push(format!(
            "# Source: weir/templates/{name}\n{}",
            out.trim_start_matches('\n')
        ));
    }
    // One document per object, empty ones dropped.
    let mut manifest = String::new();
    for doc in docs {
        for part in doc.split("\n---\n") {
            let body: Vec<&str> = part.lines().filter(|l| l.trim() != "---").collect();
            if body
                .iter()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            manifest.push_str("---\n");
            manifest.push_str(body.join("\n").trim_end());
            manifest.push('\n');
        }
    }
    Ok(manifest)
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (_, Value::Null) => {}
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}
