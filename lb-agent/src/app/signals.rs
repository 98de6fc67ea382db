//! The signals the agent answers: SIGHUP reloads the config, SIGTERM and SIGINT stop it.

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
    pub fn new() -> Result<Self, super::AppError> {
        let handler = |kind, name| {
            signal(kind).map_err(|source| super::AppError::Signal {
                signal: name,
                source,
            })
        };
        Ok(Self {
            hup: handler(SignalKind::hangup(), "SIGHUP")?,
            stop: Stop {
                term: handler(SignalKind::terminate(), "SIGTERM")?,
                int: handler(SignalKind::interrupt(), "SIGINT")?,
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
