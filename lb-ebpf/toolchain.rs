// Included by the build scripts of lb-agent and weir-lab (not a module of lb-ebpf): the
// pinned eBPF toolchain's name, read from lb-ebpf/rust-toolchain.toml (tests/ebpf pins the
// same), checked to be installed.

/// The pinned eBPF toolchain, as the eBPF crate's `rust-toolchain.toml` names it.
fn ebpf_toolchain() -> anyhow::Result<String> {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-ebpf/rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", file.display());
    let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
    let name = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|v| v.trim_matches('"').to_string())
        .with_context(|| format!("{}: no channel", file.display()))?;
    let installed = std::process::Command::new("rustc")
        .args([&format!("+{name}"), "-V"])
        .output()
        .is_ok_and(|o| o.status.success());
    anyhow::ensure!(
        installed,
        "the eBPF toolchain {name} is not installed: run scripts/bootstrap"
    );
    Ok(name)
}
