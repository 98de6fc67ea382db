//! A cgroup v2 directory of the test's own, for the socket hooks: the agent attaches them
//! there (as it attaches them at the node's cgroup root in production), and the test's client
//! processes run in it, so nothing else on the machine meets them.
//!
//! The lab mounts the host's cgroup2 hierarchy at `/run/weir-lab/cgroup2` (another mount of
//! the same hierarchy): `ip netns exec` mounts a fresh sysfs over `/sys`, which would hide the
//! usual mount point from the agent, as the chart mounts the host's cgroup2 into the pod.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::netns::{Netns, run};

/// Where the lab mounts the cgroup2 hierarchy.
pub const MOUNT: &str = "/run/weir-lab/cgroup2";

pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// A fresh cgroup under the hierarchy's root.
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if !mounts.lines().any(|l| l.split(' ').nth(1) == Some(MOUNT)) {
            std::fs::create_dir_all(MOUNT).expect("cgroup2 mount point");
            run("mount", &["-t", "cgroup2", "none", MOUNT]);
        }
        let path = Path::new(MOUNT).join(format!(
            "weir-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `program args` in `ns`, as a process of this cgroup (it joins before it runs).
    pub fn command(&self, ns: &Netns, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo $$ > \"$0/cgroup.procs\" && exec ip netns exec \"$@\"",
            self.path.to_str().expect("utf-8 path"),
            ns.name(),
            program.to_str().expect("utf-8 path"),
        ]);
        c.args(args);
        c
    }

    /// Runs `program args` in `ns` inside the cgroup to its end: its standard output.
    pub fn output(&self, ns: &Netns, program: &Path, args: &[&str]) -> String {
        let out = self
            .command(ns, program, args)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {args:?}: {}\n{}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Whatever still runs in it goes first; an empty cgroup can be removed.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("cleanup: could not remove {}", self.path.display());
    }
}
