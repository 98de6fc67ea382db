//! The standalone agent: load and attach the data plane, program it, serve the admin API, and
//! apply config changes (SIGHUP, or the file changing) until SIGTERM/SIGINT.

use std::{sync::atomic::Ordering, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    api::{self, ApiState},
    config::{Config, Source},
    dataplane::{Programmer, ebpf::Datapath},
};

/// How often the config file is compared with what was last loaded.
const FILE_POLL: Duration = Duration::from_secs(1);

pub async fn run(source: Source) -> anyhow::Result<()> {
    // Signal handlers first: a SIGHUP or SIGTERM sent as soon as /readyz answers must be seen.
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let (config, fingerprint) = source.load_with_fingerprint()?;
    info!(
        config = %source,
        services = config.desired.services.len(),
        interfaces = ?config.node.interfaces,
        "starting"
    );

    // Bind the admin port first: a port conflict should fail before the data plane changes.
    let listener = api::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen {}", config.admin.listen))?;
    let state = ApiState::default();
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn(api::serve(listener, state.clone(), async {
        let _ = api_stopped.await;
    }));
    info!(listen = %config.admin.listen, "admin API listening");

    let mut datapath = Datapath::load(&config.dataplane).context("loading the data plane")?;
    for iface in &config.node.interfaces {
        // On error, dropping `datapath` detaches what was attached so far.
        let mode = datapath.attach(iface, config.node.xdp_mode)?;
        info!(iface = %iface, mode = mode.as_str(), "XDP ingress and TC egress attached");
    }
    state.readiness.attached.store(true, Ordering::Release);

    let started = std::time::Instant::now();
    let mut programmer = Programmer::new(&config.dataplane, config.maglev.seed);
    let report = programmer
        .apply(&config.desired, &mut datapath.maps)
        .context("programming the first state")?;
    state.readiness.programmed.store(true, Ordering::Release);
    info!(
        services = report.added.len(),
        took = ?started.elapsed(),
        "data plane programmed; ready"
    );

    state.note_config(Ok(()));
    let mut agent = Agent {
        api: state.clone(),
        source,
        current: config,
        fingerprint,
        programmer,
        datapath,
    };

    let mut poll = tokio::time::interval(FILE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = hup.recv() => agent.reload("SIGHUP"),
            _ = poll.tick() => {
                let now = agent.source.fingerprint();
                if now.is_some() && now != agent.fingerprint {
                    agent.reload("config file changed");
                }
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }

    state.readiness.attached.store(false, Ordering::Release);
    agent.datapath.detach_all();
    let _ = stop_api.send(());
    match api_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "admin API stopped with an error"),
        Err(e) => warn!(error = %e, "admin API task failed"),
    }
    info!("stopped");
    Ok(())
}

struct Agent {
    api: ApiState,
    source: Source,
    current: Config,
    fingerprint: Option<Vec<u8>>,
    programmer: Programmer,
    datapath: Datapath,
}

impl Agent {
    /// Loads the config again and applies the difference; a refused config changes nothing.
    fn reload(&mut self, why: &str) {
        let new = match self.source.load_with_fingerprint() {
            Ok((c, fingerprint)) => {
                self.fingerprint = fingerprint;
                c
            }
            Err(e) => {
                // Do not retry the same broken file every second; wait for it to change.
                self.fingerprint = self.source.fingerprint();
                error!(
                    reason = why,
                    "config reload refused; the previous config stays:\n{e}"
                );
                self.api.note_config(Err(e.to_string()));
                return;
            }
        };
        if let Some(field) = restart_only_change(&self.current, &new) {
            error!(
                reason = why,
                field,
                "config reload refused: this field only changes with a restart; the previous config stays"
            );
            self.api
                .note_config(Err(format!("{field} only changes with a restart")));
            return;
        }
        let started = std::time::Instant::now();
        match self.programmer.apply(&new.desired, &mut self.datapath.maps) {
            Ok(r) => {
                info!(
                    reason = why,
                    added = ?r.added,
                    updated = ?r.updated,
                    removed = ?r.removed,
                    unchanged = r.unchanged,
                    took = ?started.elapsed(),
                    "config reloaded"
                );
                for e in &r.cleanup_errors {
                    warn!("{e}");
                }
                self.current = new;
                self.api.note_config(Ok(()));
            }
            Err(e) => {
                error!(reason = why, error = %e, "applying the new config failed; rolling back");
                self.api.note_config(Err(e.to_string()));
                match self
                    .programmer
                    .apply(&self.current.desired, &mut self.datapath.maps)
                {
                    Ok(_) => info!("rolled back to the previous config"),
                    Err(e) => {
                        error!(error = %e, "rolling back failed too; the data plane may be partly updated")
                    }
                }
            }
        }
    }
}

/// The first field that differs and can only change with a restart (the programs' attachment,
/// map capacities, the admin listener, the Maglev hash and seed every node must share).
fn restart_only_change(old: &Config, new: &Config) -> Option<&'static str> {
    if old.node.interfaces != new.node.interfaces {
        Some("node.interfaces")
    } else if old.node.xdp_mode != new.node.xdp_mode {
        Some("node.xdp_mode")
    } else if old.admin != new.admin {
        Some("admin.listen")
    } else if old.dataplane != new.dataplane {
        Some("dataplane")
    } else if old.maglev.hash != new.maglev.hash || old.maglev.seed != new.maglev.seed {
        Some("maglev.hash/maglev.seed")
    } else {
        None
    }
}
