//! The signals the agent answers: SIGHUP reloads the config, SIGTERM and SIGINT stop it.

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::info;

pub struct Signals {
    pub hup: Signal,
    pub stop: Stop,
}

/// SIGTERM or SIGINT.
pub struct Stop {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers (before anything else: a signal sent as soon as `/readyz`
    /// answers must be seen).
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            stop: Stop {
                term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            },
        })
    }
}

impl Stop {
    /// Resolves at SIGTERM or SIGINT, logging which (`when`: appended to the signal's name).
    pub async fn stopped(&mut self, when: &str) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM{when}: shutting down"),
            _ = self.int.recv() => info!("SIGINT{when}: shutting down"),
        }
    }
}
