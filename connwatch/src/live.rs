//! A live session shared by `watch`, `serve` and `top`: the probe attached, the monitor
//! seeded, and an event loop that keeps the socket table current (ring buffer, drain
//! timer, timewait polls) until the next report is due.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    time::{Interval, MissedTickBehavior},
};

use crate::{
    decode::decode,
    filter::Filter,
    monitor::Monitor,
    probe::{Probe, ProbeOptions},
    report::{Report, ReportConfig},
};

pub struct Live {
    probe: Probe,
    pub monitor: Monitor,
    ring: AsyncFd<RingBuf<MapData>>,
    undecodable: u64,
    drain_tick: Interval,
    tw_poll: Interval,
    report_tick: Interval,
}

/// The start-up shared by every command that loads the probe, in its order: the monitor
/// first (its /proc scan runs while the probe loads), then the probe, the seeding, the
/// listeners for `--pid`, and the capabilities dropped before "attached" is announced.
pub fn attach(
    opts: &ProbeOptions,
    cfg: ReportConfig,
    filter: Filter,
) -> Result<(Probe, Monitor, AsyncFd<RingBuf<MapData>>)> {
    let mut monitor = Monitor::new(cfg, filter).with_limit(opts.max_sockets as usize);
    let mut probe = Probe::load(opts)?;
    let ring = probe.take_events()?;
    monitor.seed()?;
    if opts.filter.npids > 0 {
        probe.seed_listeners(&monitor.listener_owners())?;
    }
    // Before announcing: "attached" means the capabilities are already dropped.
    crate::probe::drop_capabilities();
    crate::probe::announce(&probe);
    let ring = crate::probe::readable(ring).context("cannot poll the probe's ring buffer")?;
    Ok((probe, monitor, ring))
}

fn interval(every: Duration) -> Interval {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

impl Live {
    /// Loads and attaches the probe, seeds the table, and gives up the capabilities no
    /// longer needed. `every` is the report interval.
    pub async fn start(
        opts: &ProbeOptions,
        cfg: ReportConfig,
        filter: Filter,
        every: Duration,
        tw_poll: Duration,
    ) -> Result<Self> {
        let (probe, monitor, ring) = attach(opts, cfg, filter)?;
        let mut report_tick = interval(every);
        report_tick.tick().await; // the first tick is immediate: skip it
        Ok(Self {
            probe,
            monitor,
            ring,
            undecodable: 0,
            drain_tick: crate::probe::drain_timer(),
            tw_poll: interval(tw_poll),
            report_tick,
        })
    }

    /// Keeps the table current until a report is due. Cancel-safe (every branch
    /// finishes its work synchronously), so it can sit in a `select!`.
    pub async fn report_due(&mut self) -> Result<()> {
        loop {
            tokio::select! {
                ready = self.ring.readable_mut() => {
                    let mut guard = ready?;
                    drain(guard.get_inner_mut(), &mut self.monitor, &mut self.undecodable);
                    guard.clear_ready();
                }
                _ = self.drain_tick.tick() => self.drain(),
                _ = self.tw_poll.tick() => {
                    self.drain();
                    let c = self.probe.counters()?;
                    self.monitor
                        .note_loss(c.dropped + c.socket_store_failed + self.undecodable);
                    self.monitor.poll_timewait()?;
                }
                _ = self.report_tick.tick() => return Ok(()),
            }
        }
    }

    fn drain(&mut self) {
        drain(
            self.ring.get_mut(),
            &mut self.monitor,
            &mut self.undecodable,
        );
    }

    /// Applies what is queued, reconciles with sock_diag and builds a report.
    pub fn report(&mut self, is_final: bool) -> Result<Report> {
        self.drain();
        self.monitor.refresh()?;
        let c = self.probe.counters()?;
        Ok(self.monitor.report(
            is_final,
            c.dropped,
            c.socket_store_failed + self.undecodable,
        ))
    }

    /// Events the probe produced so far (received or dropped).
    pub fn events_seen(&self) -> Result<u64> {
        Ok(self.probe.counters()?.seen)
    }
}

pub fn drain(ring: &mut RingBuf<MapData>, monitor: &mut Monitor, undecodable: &mut u64) {
    while let Some(item) = ring.next() {
        match decode(&item) {
            Ok(t) => monitor.apply(&t),
            Err(e) => {
                *undecodable += 1;
                log::warn!("skipped an event: {e}");
            }
        }
    }
}
