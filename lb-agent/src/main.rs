//! `lb-agent`: weir's agent binary.

#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_agent::config::{self, Source};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "weir: an XDP layer-4 load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the data plane and program it from a config file (standalone mode).
    /// SIGHUP or a change of the file reloads it; SIGTERM/SIGINT stop it (the data plane
    /// stays attached with its state unless dataplane.keep_on_exit is false).
    Run {
        /// The YAML config; without it, the embedded default (the lab's addresses). With
        /// --kubernetes it carries node settings only.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve Services of type LoadBalancer from the Kubernetes API (in-cluster credentials
        /// unless --kubeconfig).
        #[arg(long)]
        kubernetes: bool,
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// This node's name (default: $NODE_NAME, else the host name).
        #[arg(long, requires = "kubernetes")]
        node_name: Option<String>,
        /// The namespace of the leader Lease (default: $POD_NAMESPACE, else weir-system).
        #[arg(long, requires = "kubernetes")]
        namespace: Option<String>,
        /// Also serve LoadBalancer Services that set no loadBalancerClass.
        #[arg(long, requires = "kubernetes")]
        default_class: bool,
    },
    /// Validate a config file and exit: 0 when valid, 1 with the problems otherwise.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Detach weir from every interface and remove its pinned data plane (a stopping or
    /// crashing agent leaves it forwarding for the next agent to adopt; this is the only
    /// command that removes it).
    Cleanup {
        /// The pin directory (default: dataplane.pin_dir of --config, else /sys/fs/bpf/weir).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the embedded default config.
    DefaultConfig,
    /// Print weir's CustomResourceDefinitions (YAML).
    Crds,
    /// Show a running agent's services: backends, weights, health, traffic totals and rates.
    Status {
        /// The agent's admin API (`admin.listen` of its config).
        #[arg(long, default_value = "127.0.0.1:9300")]
        admin: std::net::SocketAddr,
    },
}

fn source(path: Option<PathBuf>) -> Source {
    path.map_or(Source::Embedded, Source::File)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let src = source(config);
            match src.load() {
                Ok(c) => {
                    println!(
                        "{src}: ok ({} services, {} backends)",
                        c.desired.services.len(),
                        c.desired
                            .services
                            .iter()
                            .map(|s| s.backends.len())
                            .sum::<usize>()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { admin } => {
            let Some(runtime) = runtime(false) else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(lb_agent::cli::services(admin)) {
                Ok(services) => {
                    print!("{}", lb_agent::cli::render(&services));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lb-agent status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup { pin_dir, config } => {
            let dir = match (pin_dir, config) {
                (Some(d), _) => d,
                (None, Some(c)) => match Source::File(c).load() {
                    Ok(c) => c.pinning.dir,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                },
                (None, None) => lb_agent::dataplane::DEFAULT_PIN_DIR.into(),
            };
            match lb_agent::dataplane::ebpf::cleanup(&dir) {
                Ok(done) => {
                    for line in &done {
                        println!("{line}");
                    }
                    if done.is_empty() {
                        println!("nothing of weir's at {}", dir.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lb-agent cleanup: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Crds => {
            print!("{}", lb_agent::sources::kubernetes::crd::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Run {
            config,
            kubernetes,
            kubeconfig,
            node_name,
            namespace,
            default_class,
        } => {
            init_logging();
            let kube = kubernetes.then(|| {
                let env = config::KubeEnv::read();
                let node = node_name
                    .or(env.node_name)
                    .or_else(|| config::host_name().ok().filter(|h| !h.is_empty()))
                    .unwrap_or_else(|| "unknown-node".into());
                lb_agent::app::KubeMode {
                    kubeconfig,
                    identity: env.pod_name.unwrap_or_else(|| node.clone()),
                    namespace: namespace
                        .or(env.pod_namespace)
                        .unwrap_or_else(|| "weir-system".into()),
                    node,
                    default_class,
                    daemonset: env.daemonset,
                }
            });
            let Some(runtime) = runtime(true) else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(lb_agent::app::run(source(config), kube)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The tokio runtime: two workers for the agent, one thread for a client command.
fn runtime(agent: bool) -> Option<tokio::runtime::Runtime> {
    let mut b = if agent {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all()
        .build()
        .map_err(|e| eprintln!("cannot start the runtime: {e}"))
        .ok()
}

fn init_logging() {
    // kube's client logs every failed request (many a second while the API server is
    // away); the agent says what failed itself, once per backoff step. RUST_LOG that names
    // kube_client gets it back.
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !asked.contains("kube_client")
        && let Ok(quiet) = "kube_client=off".parse()
    {
        filter = filter.add_directive(quiet);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
