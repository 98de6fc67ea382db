//! Network namespaces made by a test and removed when it ends, also when it fails (on drop,
//! which runs while a panic unwinds). Namespaces are named `weir-<pid>-<n>-<role>`; ones left
//! by a test process that was killed are removed by the next run.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// Panics with a clear message unless the process runs as root (namespaces, veth, eBPF).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root (it creates network namespaces and loads eBPF programs); \
         run the suite as root: sudo scripts/test"
    );
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    match try_run(program, args) {
        Ok(out) => out,
        Err(e) => panic!("{e}"),
    }
}

/// Runs a command; `Err` carries the command line and its stderr.
pub fn try_run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes namespaces left behind by test processes that no longer exist.
fn sweep_stale() {
    let Ok(list) = try_run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("weir-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = try_run("ip", &["netns", "del", name]);
        }
    }
    for e in std::fs::read_dir(BPFFS_ROOT)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("weir-").and_then(|r| r.split('-').next());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            unmount_bpffs(&name);
        }
    }
}

pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace with its loopback up.
    pub fn new(role: &str) -> Self {
        require_root();
        SWEEP.call_once(sweep_stale);
        let name = format!(
            "weir-{}-{}-{role}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`, panicking on failure.
    pub fn ip(&self, args: &str) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend(args.split_whitespace());
        run("ip", &a)
    }

    /// Runs `argv` inside the namespace, panicking on failure; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(argv);
        run("ip", &a)
    }

    /// Like [`exec`](Self::exec), without panicking.
    pub fn try_exec(&self, argv: &[&str]) -> Result<String, String> {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(argv);
        try_run("ip", &a)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so the
    /// child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it makes live there.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a valid namespace fd; setns affects only this thread.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The interface's index inside the namespace.
    pub fn ifindex(&self, iface: &str) -> u32 {
        let out = self.ip(&format!("-o link show dev {iface}"));
        out.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("no index for {iface} in {}: {out}", self.name))
    }

    /// The interface's MAC address.
    pub fn mac(&self, iface: &str) -> [u8; 6] {
        let text = self.exec(&["cat", &format!("/sys/class/net/{iface}/address")]);
        parse_mac(text.trim())
    }
}

/// Where the lab mounts each node's bpf filesystem.
const BPFFS_ROOT: &str = "/run/weir-lab/bpffs";

impl Netns {
    /// This node's bpf filesystem: an instance of its own, mounted (once) outside `/sys` so
    /// that it outlives the agents started in the node, as the host's `/sys/fs/bpf` does.
    pub fn bpffs(&self) -> std::path::PathBuf {
        let path = std::path::Path::new(BPFFS_ROOT).join(&self.name);
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let p = path.to_str().expect("utf-8 path");
        if !mounts.lines().any(|l| l.split(' ').nth(1) == Some(p)) {
            std::fs::create_dir_all(&path).expect("bpffs mount point");
            run("mount", &["-t", "bpf", "bpf", p]);
        }
        path
    }

    /// A command run in the namespace as the agent runs in its pod: with the node's bpf
    /// filesystem at `/sys/fs/bpf`. The chart mounts the host's `/sys/fs/bpf` into the pod;
    /// `ip netns exec` mounts a fresh sysfs without it, so the lab binds the node's own there.
    pub fn agent_command(&self, program: &str) -> Command {
        let bpffs = self.bpffs();
        let mut c = self.command("sh");
        c.args([
            "-c",
            "mount --bind \"$0\" /sys/fs/bpf && exec \"$@\"",
            bpffs.to_str().expect("utf-8 path"),
            program,
        ]);
        c
    }
}

/// Unmounts a node's bpf filesystem (its pins, and the maps only they held, go with it).
fn unmount_bpffs(name: &str) {
    let path = std::path::Path::new(BPFFS_ROOT).join(name);
    if path.exists() {
        let _ = try_run("umount", &[path.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_dir(&path);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = try_run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
        unmount_bpffs(&self.name);
    }
}

pub fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    assert_eq!(parts.len(), 6, "bad MAC {text:?}");
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).unwrap_or_else(|_| panic!("bad MAC {text:?}"));
    }
    mac
}

/// A veth pair between two namespaces (`a_if` in `a`, `b_if` in `b`), both ends up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    run(
        "ip",
        &[
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    );
    a.ip(&format!("link set {a_if} up"));
    b.ip(&format!("link set {b_if} up"));
}

/// Keeps the calling thread on CPU `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}
