//! When a command stops: SIGINT, SIGTERM or the end of `--duration`, whichever comes first.
use std::time::Duration;

use anyhow::Result;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    time::Instant,
};

pub struct Shutdown {
    sigint: Signal,
    sigterm: Signal,
    deadline: Option<Instant>,
}

impl Shutdown {
    pub fn new(duration: Option<Duration>) -> Result<Self> {
        Ok(Self {
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
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
