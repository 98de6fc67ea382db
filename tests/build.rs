//! Builds the lab's own XDP programs (`tests/ebpf`) into OUT_DIR.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    // aya-build relays the nested cargo's progress lines as build warnings; errors and
    // compiler diagnostics still come through.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weir-lab-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain()?),
    )
}

/// The pinned eBPF toolchain, as the eBPF crate's `rust-toolchain.toml` names it.
fn toolchain() -> anyhow::Result<String> {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ebpf/rust-toolchain.toml");
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
