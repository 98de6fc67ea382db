//! The Helm chart through the real `helm` (installed by `scripts/bootstrap`): `helm lint
//! --strict` and `helm template` with the chart's values or overrides. `helm install`,
//! `upgrade` and `uninstall` need a cluster, which this machine has none of.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// The release name and namespace the tests render with.
pub const RELEASE: &str = "weir";
pub const NAMESPACE: &str = "weir-system";

/// `helm`: from the PATH, else where `scripts/bootstrap` puts it.
fn helm() -> PathBuf {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|h| h.join("bin/helm"));
    match cargo_bin {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("helm"),
    }
}

/// Runs helm with `args`, and `values` (overrides, as JSON, which is YAML) in a file.
fn run(args: &[&str], chart: &Path, values: Option<&Value>) -> Result<String, String> {
    let file = values.map(|v| {
        let path = std::env::temp_dir().join(format!(
            "weir-values-{}-{}.yaml",
            std::process::id(),
            std::thread::current()
                .name()
                .unwrap_or("t")
                .replace(':', "_")
        ));
        std::fs::write(&path, v.to_string()).expect("values file");
        path
    });
    let mut cmd = Command::new(helm());
    cmd.args(args).arg(chart);
    if let Some(f) = &file {
        cmd.arg("--values").arg(f);
    }
    let out = cmd.output().map_err(|e| {
        format!("running helm: {e} (scripts/bootstrap installs it into ~/.cargo/bin)")
    });
    if let Some(f) = &file {
        let _ = std::fs::remove_file(f);
    }
    let out = out?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "helm {}: {}{stdout}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stdout)
}

/// `helm template` of `chart` (CRDs included, as `deploy/weir.yaml` carries them).
pub fn template(chart: &Path, values: Option<&Value>) -> Result<String, String> {
    run(
        &[
            "template",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--include-crds",
        ],
        chart,
        values,
    )
}

/// `helm lint --strict` of `chart`: its output when it passes.
pub fn lint(chart: &Path, values: Option<&Value>) -> Result<String, String> {
    run(
        &["lint", "--strict", "--namespace", NAMESPACE],
        chart,
        values,
    )
}
