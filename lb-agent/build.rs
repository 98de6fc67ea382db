//! Builds the eBPF programs (`lb-ebpf`, for the BPF target, on the nightly toolchain) into
//! OUT_DIR, where `dataplane::object` embeds them. `scripts/bootstrap` installs what this needs
//! (rust-src for nightly, bpf-linker).
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("lb-ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    // aya-build relays the nested cargo's progress lines as build warnings; errors and
    // compiler diagnostics still come through.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&ebpf_toolchain()?),
    )
}

// `ebpf_toolchain`: the pinned toolchain's name (shared with the lab's build script).
include!("../lb-ebpf/toolchain.rs");
