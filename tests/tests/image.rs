//! The container image `scripts/image` builds (scripts/test builds it first): its config runs
//! the agent, its root filesystem holds the agent and the CA bundle only, and unpacked it runs
//! `lb-agent --version`, `lb-agent check` and, in the lab, the agent itself (chrooted, with
//! what a container runtime and the chart give the pod), so a missing library or file fails
//! here rather than on a cluster; it runs on a read-only root with no_new_privs, as the chart's
//! security context runs it. Needs root (chroot, mounts, the lab).

use std::{process::Command, time::Duration};

use weir_lab::{agent::Agent, clients, image, lab::*, netns::require_root};

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[test]
fn the_image_runs_the_agent_and_holds_nothing_else() {
    let img = image::Unpacked::new(&image::archive());
    assert_eq!(img.names, [format!("docker.io/weir/lb-agent:{VERSION}")]);
    assert_eq!(
        img.config["Entrypoint"],
        serde_json::json!(["/usr/bin/lb-agent"])
    );
    assert_eq!(
        img.config["Cmd"],
        serde_json::json!(["run", "--kubernetes", "--config=/etc/weir/weir.yaml"])
    );
    assert_eq!(
        img.config["Labels"]["org.opencontainers.image.version"],
        VERSION
    );
    // No shell, no libraries: a static agent and the CA roots.
    assert_eq!(
        img.files(),
        ["etc/ssl/certs/ca-certificates.crt", "usr/bin/lb-agent"]
    );
    println!(
        "image root filesystem: {:.1} MB, archive {:.1} MB",
        img.size() as f64 / 1e6,
        std::fs::metadata(image::archive()).unwrap().len() as f64 / 1e6
    );

    require_root();
    let root = img.rootfs.to_str().unwrap();
    let out = Command::new("chroot")
        .args([root, "/usr/bin/lb-agent", "--version"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("lb-agent {VERSION}")
    );
    // `check` reads the node's ephemeral port range from /proc, as it does in a pod.
    let out = Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            r#"mkdir -p "$0/proc" && mount -t proc proc "$0/proc" && exec chroot "$0" /usr/bin/lb-agent check"#,
            root,
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("ok (5 services, 15 backends)"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_agent_from_the_image_serves_the_lab() {
    let img = image::Unpacked::new(&image::archive());
    let mut lab = Lab::new(3);
    lab.start_servers(env!("CARGO_BIN_EXE_weir-lab").as_ref());
    let config = lb_agent::config::DEFAULT_CONFIG;
    let mut agent = Agent::start_from_image(&lab.lb, &lab.dir.path, config, &img.rootfs);
    agent.wait_ready(&lab.lb);
    let vip = std::net::SocketAddr::new(VIP_V4.parse().unwrap(), 80);
    let r = lab
        .client
        .run_in(|| clients::http_get(None, vip, "/", Duration::from_secs(3)))
        .expect("a request through the VIP");
    assert!(r.backend.starts_with('b'), "{}", r.backend);
    let metrics = agent.metrics(&lab.lb);
    assert!(
        metrics.contains("weir_dataplane_start{outcome=\"fresh\"} 1"),
        "{metrics}"
    );
    // It ran as the chart's security context runs it: its root read-only, no_new_privs.
    let pid = agent.pid();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no root mount:\n{mountinfo}"));
    let options = root.split(' ').nth(5).unwrap_or_default();
    assert!(options.split(',').any(|o| o == "ro"), "{root}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(agent.stop().success());
}
