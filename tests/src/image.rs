//! The container image `scripts/image` writes (an OCI archive), unpacked as a container
//! runtime would: its config and its root filesystem.

use std::path::{Path, PathBuf};

use serde_json::Value;

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The archive of this version: `target/image/lb-agent-<version>.oci.tar`.
pub fn archive() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let version = env!("CARGO_PKG_VERSION");
    let path = root.join(format!("target/image/lb-agent-{version}.oci.tar"));
    assert!(
        path.exists(),
        "{} is missing: build the image first with scripts/image (scripts/test does)",
        path.display()
    );
    path
}

/// An unpacked image: its config and root filesystem, under a directory removed on drop.
pub struct Unpacked {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    /// The image config's `config` part (Entrypoint, Cmd, Labels...).
    pub config: Value,
    /// Names of the index's image (`org.opencontainers.image.ref.name`).
    pub names: Vec<String>,
}

fn run(cmd: &str, args: &[&str]) {
    crate::netns::run(cmd, args);
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("a digest");
    layout.join("blobs").join(alg).join(hex)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("blob")).expect("JSON")
}

impl Unpacked {
    /// Unpacks `archive` into a new directory: the OCI layout, then each layer in order.
    pub fn new(archive: &Path) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "weir-image-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let (layout, rootfs) = (dir.join("layout"), dir.join("rootfs"));
        std::fs::create_dir_all(&layout).unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        let s = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        run("tar", &["-xf", &s(archive), "-C", &s(&layout)]);
        let index = json(&layout.join("index.json"));
        let manifests = index["manifests"].as_array().expect("manifests");
        assert_eq!(manifests.len(), 1, "one image in {index}");
        let names = manifests
            .iter()
            .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
            .map(str::to_string)
            .collect();
        let manifest = json(&blob(
            &layout,
            manifests[0]["digest"].as_str().expect("digest"),
        ));
        let config = json(&blob(
            &layout,
            manifest["config"]["digest"].as_str().expect("config"),
        ))["config"]
            .clone();
        for layer in manifest["layers"].as_array().expect("layers") {
            let path = blob(&layout, layer["digest"].as_str().expect("layer digest"));
            run("tar", &["-xzf", &s(&path), "-C", &s(&rootfs)]);
        }
        Self {
            dir,
            rootfs,
            config,
            names,
        }
    }

    /// Every file of the root filesystem, relative, sorted (directories left out).
    pub fn files(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.rootfs, &self.rootfs, &mut out);
        out.sort();
        out
    }

    /// The root filesystem's size in bytes.
    pub fn size(&self) -> u64 {
        self.files()
            .iter()
            .map(|f| std::fs::symlink_metadata(self.rootfs.join(f)).map_or(0, |m| m.len()))
            .sum()
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
