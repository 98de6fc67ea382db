//! The real `lb-agent` binary, run inside a namespace.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::{clients, lab::Proc, netns::Netns};

/// The agent binary: `WEIR_AGENT_BIN`, or built once with the cargo that runs the tests.
pub fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("WEIR_AGENT_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // Without the variables cargo gave this test process: build scripts (ring's) name
        // some of them as inputs, and a value that differs from the outer build's rebuilt
        // them, and then everything above them, in both builds, for every test binary.
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| n.starts_with(p))
                || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*n)
            {
                build.env_remove(&name);
            }
        }
        let out = build
            .args([
                "build",
                "-p",
                "lb-agent",
                "--bin",
                "lb-agent",
                "--message-format=json-render-diagnostics",
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build for lb-agent");
        assert!(out.status.success(), "cargo build -p lb-agent failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "lb-agent")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo did not report the lb-agent executable")
    })
    .clone()
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Agent {
    proc: Proc,
    /// The config file; None when the agent runs on its embedded default.
    pub config: Option<PathBuf>,
    pub log: PathBuf,
    pub admin: SocketAddr,
}

impl Agent {
    /// Writes `config` into `dir` and starts `lb-agent run --config` in `ns` (or with the
    /// embedded default config when `config` is None).
    pub fn start(ns: &Netns, dir: &Path, config: Option<&str>) -> Self {
        Self::start_with(ns, dir, config, &[], &[])
    }

    /// As [`Agent::start`], with more arguments to `run` and environment variables.
    pub fn start_with(
        ns: &Netns,
        dir: &Path,
        config: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_bin_with(&agent_binary(), ns, dir, config, args, env)
    }

    /// As [`Agent::start`], in Kubernetes mode against the API server that `kubeconfig`
    /// names, as the agent of node `lb-node` (the pod's environment as the chart gives it).
    pub fn start_kubernetes(ns: &Netns, dir: &Path, config: &str, kubeconfig: &Path) -> Self {
        Self::start_with(
            ns,
            dir,
            Some(config),
            &[
                "--kubernetes",
                "--kubeconfig",
                kubeconfig.to_str().expect("utf-8 path"),
            ],
            &[
                ("NODE_NAME", "lb-node"),
                ("POD_NAMESPACE", "weir-system"),
                ("POD_NAME", "weir-lb-node"),
            ],
        )
    }

    /// As [`Agent::start`], with the agent binary `bin` (another build, for a comparison).
    pub fn start_bin(bin: &Path, ns: &Netns, dir: &Path, config: Option<&str>) -> Self {
        Self::start_bin_with(bin, ns, dir, config, &[], &[])
    }

    fn start_bin_with(
        bin: &Path,
        ns: &Netns,
        dir: &Path,
        config: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = ns.agent_command(bin.to_str().expect("utf-8 path"));
        cmd.arg("run");
        Self::spawn(cmd, dir, config, args, env)
    }

    /// As [`Agent::start`], with the agent of an unpacked container image (`rootfs`): it runs
    /// chrooted there with what a container runtime gives the pod (`/proc`, `/sys`, `/dev`),
    /// the node's bpffs at `/sys/fs/bpf` as the chart mounts the host's, and the test's
    /// directory (its config) at the same path; nothing else of the host. As the chart's
    /// security context runs it: the root filesystem read-only (`readOnlyRootFilesystem`) and
    /// no privileges gained on exec (`allowPrivilegeEscalation: false`, no_new_privs).
    pub fn start_from_image(ns: &Netns, dir: &Path, config: &str, rootfs: &Path) -> Self {
        const SETUP: &str = r#"R="$0"; D="$1"; B="$2"; shift 2
mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R$D" &&
mount --bind "$R" "$R" && mount -o remount,bind,ro "$R" &&
mount -t proc proc "$R/proc" && mount --rbind /sys "$R/sys" &&
mount --bind "$B" "$R/sys/fs/bpf" && mount --rbind /dev "$R/dev" &&
mount --bind "$D" "$R$D" && exec setpriv --no-new-privs chroot "$R" /usr/bin/lb-agent "$@""#;
        let bpffs = ns.bpffs();
        let s = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        let mut cmd = ns.command("sh");
        cmd.args(["-c", SETUP, &s(rootfs), &s(dir), &s(&bpffs), "run"]);
        Self::spawn(cmd, dir, Some(config), &[], &[])
    }

    /// As [`Agent::start_with`], with only the capabilities the Helm chart grants
    /// (`BPF`, `PERFMON`, `NET_ADMIN`, `NET_RAW`, `NET_BIND_SERVICE`): `setpriv` empties the
    /// bounding set of the rest, so even as root the agent cannot use them.
    pub fn start_with_chart_caps(
        ns: &Netns,
        dir: &Path,
        config: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let bin = agent_binary();
        let mut cmd = ns.agent_command("setpriv");
        cmd.args([
            "--bounding-set",
            CHART_CAPS,
            "--inh-caps",
            CHART_CAPS,
            bin.to_str().expect("utf-8 path"),
            "run",
        ]);
        Self::spawn(cmd, dir, config, args, env)
    }

    fn spawn(
        mut cmd: Command,
        dir: &Path,
        config: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let path = dir.join("weir.yaml");
        let log = dir.join("agent.log");
        let config = config.map(|text| {
            std::fs::write(&path, text).expect("write config");
            cmd.arg("--config").arg(&path);
            path
        });
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let logfile = std::fs::File::create(&log).expect("agent log");
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("WEIR_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("log"))
            .stderr(logfile)
            .spawn()
            .expect("start lb-agent");
        Self {
            proc: Proc { child },
            config,
            log,
            admin: "127.0.0.1:9300".parse().expect("admin"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin API, from inside `ns`.
    pub fn get(&self, ns: &Netns, path: &str) -> Option<(u16, String)> {
        self.try_get(ns, path).ok()
    }

    /// GET on the admin API, from inside `ns`, with the error when there is no answer.
    pub fn try_get(&self, ns: &Netns, path: &str) -> std::io::Result<(u16, String)> {
        let admin = self.admin;
        let started = Instant::now();
        ns.run_in(|| clients::http_get(None, admin, path, Duration::from_secs(2)))
            .map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("GET {path} on {admin}: {e} (after {:?})", started.elapsed()),
                )
            })
    }

    /// GET `path`, which must answer 200; panics with the error and the agent's log if not.
    fn get_ok(&self, ns: &Netns, path: &str) -> String {
        match self.try_get(ns, path) {
            Ok((200, body)) => body,
            Ok((code, body)) => panic!("GET {path}: status {code}: {body}"),
            Err(e) => panic!("{e}\n--- agent log ---\n{}", self.log_text()),
        }
    }

    /// Waits until /readyz answers 200; panics with the log if the agent exits first.
    pub fn wait_ready(&mut self, ns: &Netns) {
        wait_for(Duration::from_secs(30), "the agent to be ready", || {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                panic!("lb-agent exited ({status}):\n{}", self.log_text());
            }
            match self.get(ns, "/readyz") {
                Some((200, _)) => Some(()),
                _ => None,
            }
        });
    }

    /// `/api/v1/status` as JSON.
    pub fn status(&self, ns: &Netns) -> serde_json::Value {
        serde_json::from_str(&self.get_ok(ns, "/api/v1/status")).expect("status JSON")
    }

    /// `/api/v1/services` as JSON.
    pub fn services(&self, ns: &Netns) -> serde_json::Value {
        serde_json::from_str(&self.get_ok(ns, "/api/v1/services")).expect("services JSON")
    }

    /// The API's entry for backend `addr` (`ip:port`) of `service`.
    pub fn backend(&self, ns: &Netns, service: &str, addr: SocketAddr) -> serde_json::Value {
        backend_entry(&self.services(ns), service, addr)
    }

    /// Waits until backend `addr` of `service` is in `state` (`up`, `down`, `unknown`) and,
    /// when given, its last failure has `reason`; returns the entry.
    pub fn wait_backend(
        &self,
        ns: &Netns,
        service: &str,
        addr: SocketAddr,
        state: &str,
        reason: Option<&str>,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            last = self.backend(ns, service, addr);
            if last["state"] == state && reason.is_none_or(|r| last["last_failure"]["reason"] == r)
            {
                return last;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{service} {addr}: wanted state {state} (reason {reason:?}), have {last}
--- agent log ---
{}",
            self.log_text()
        );
    }

    /// The text of `/metrics`.
    pub fn metrics(&self, ns: &Netns) -> String {
        self.get_ok(ns, "/metrics")
    }

    fn counts(&self, ns: &Netns) -> (u64, u64) {
        let s = self.status(ns);
        (
            s["config"]["generation"].as_u64().unwrap_or(0),
            s["config"]["reload_failures"].as_u64().unwrap_or(0),
        )
    }

    /// Writes a new config and sends SIGHUP; waits until the agent applied it (`Ok`) or
    /// refused it (`Err` with its error).
    pub fn reload(&self, ns: &Netns, config: &str) -> Result<(), String> {
        let path = self
            .config
            .as_ref()
            .expect("reload needs an agent started with a config file");
        let before = self.counts(ns);
        std::fs::write(path, config).expect("write config");
        self.signal(libc::SIGHUP);
        let after = wait_for(Duration::from_secs(10), "the reload", || {
            let now = self.counts(ns);
            (now != before).then_some(now)
        });
        if after.1 > before.1 {
            Err(self.status(ns)["config"]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_string())
        } else {
            Ok(())
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.proc.pid() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({sig}): {}", std::io::Error::last_os_error());
    }

    /// SIGKILL (as an OOM kill or a crash ends it), then the exit status.
    pub fn kill(mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        wait_for(Duration::from_secs(10), "the agent to die", || {
            self.proc.child.try_wait().ok().flatten()
        })
    }

    /// SIGTERM, then the exit status (within 10 s).
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        wait_for(Duration::from_secs(10), "the agent to exit", || {
            self.proc.child.try_wait().ok().flatten()
        })
    }
}

/// The value of the sample `name{labels}` in a `/metrics` text (labels exactly as the agent
/// writes them).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// The capabilities of `charts/weir`'s DaemonSet, as `setpriv` spells them.
pub const CHART_CAPS: &str = "-all,+bpf,+perfmon,+net_admin,+net_raw,+net_bind_service";

/// Backend `addr` of `service` in an `/api/v1/services` answer.
pub fn backend_entry(
    services: &serde_json::Value,
    service: &str,
    addr: SocketAddr,
) -> serde_json::Value {
    let s = services["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .unwrap_or_else(|| panic!("no service {service} in {services}"));
    s["backends"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|b| b["address"] == addr.ip().to_string() && b["port"] == addr.port())
        })
        .unwrap_or_else(|| panic!("no backend {addr} in {s}"))
        .clone()
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- lb-agent log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}
