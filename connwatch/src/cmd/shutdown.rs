//! When a command stops: SIGINT, SIGTERM or the end of `--duration`, whichever comes first.
//! SIGHUP is ignored, so that a long watch survives the terminal or ssh session that
//! started it; stop it with SIGINT or SIGTERM.
use std::time::Duration;

use anyhow::Result;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    time::Instant,
};

pub struct Shutdown {
    sigint: Signal,
    sigterm: Signal,
    /// Registered so that SIGHUP no longer kills the process; never acted on.
    _sighup: Signal,
    deadline: Option<Instant>,
}

impl Shutdown {
    pub fn new(duration: Option<Duration>) -> Result<Self> {
        Ok(Self {
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
            _sighup: signal(SignalKind::hangup())?,
            deadline: duration.map(|d| Instant::now() + d),
        })
    }

    /// Resolves once it is time to stop. Cancel-safe: usable in `select!` loops.
    pub async fn wait(&mut self) {
        let deadline = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.sigint.recv() => {}
            _ = self.sigterm.recv() => {}
            () = deadline => {}
        }
    }
}
