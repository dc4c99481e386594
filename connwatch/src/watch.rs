//! `connwatch watch` and `connwatch snapshot`: the per-process report, live from the
//! probe (watch) or once from sock_diag and /proc alone (snapshot, no BPF).
use std::{
    io::{self, IsTerminal, Write},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};

use crate::{
    cli::{SnapshotArgs, Thresholds, WatchArgs},
    decode::decode,
    filter::Filter,
    monitor::Monitor,
    probe::{Probe, ProbeOptions},
    report::{Report, ReportConfig},
    shutdown::Shutdown,
    views::report as view,
};

/// `--check`: exit status 3 when the final report flags a process.
const EXIT_FLAGGED: u8 = 3;

pub async fn watch(args: WatchArgs, opts: ProbeOptions, filter: Filter) -> Result<ExitCode> {
    let mut probe = Probe::load(&opts)?;
    let ring = probe.take_events()?;
    let mut monitor =
        Monitor::new(config(&args.report.thresholds), filter).with_limit(opts.max_sockets as usize);
    monitor.seed()?;
    if opts.filter.npids > 0 {
        probe.seed_listeners(&monitor.listener_owners())?;
    }
    crate::announce(&probe);
    crate::probe::drop_capabilities();
    let mut ring = crate::probe::readable(ring).context("cannot poll the probe's ring buffer")?;
    let mut shutdown = Shutdown::new(args.duration)?;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate: skip it
    let mut out = Output::new(args.report.json);
    let mut undecodable = 0u64;
    let mut drain_tick = crate::probe::drain_timer();
    let mut tw_poll = tokio::time::interval(args.tw_poll);
    tw_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = ready?;
                drain(guard.get_inner_mut(), &mut monitor, &mut undecodable);
                guard.clear_ready();
            }
            _ = drain_tick.tick() => drain(ring.get_mut(), &mut monitor, &mut undecodable),
            _ = tw_poll.tick() => {
                drain(ring.get_mut(), &mut monitor, &mut undecodable);
                monitor.poll_timewait()?;
            }
            _ = ticker.tick() => {
                let report = refresh(&mut probe, &mut monitor, ring.get_mut(), &mut undecodable, false)?;
                if out.print(&report).is_err() {
                    return Ok(ExitCode::SUCCESS); // reader gone (`| head`)
                }
            }
            () = shutdown.wait() => break,
        }
    }
    let report = refresh(
        &mut probe,
        &mut monitor,
        ring.get_mut(),
        &mut undecodable,
        true,
    )?;
    let _ = out.print(&report);
    Ok(exit_code(&report, args.report.check))
}

pub fn snapshot(args: SnapshotArgs, filter: Filter) -> Result<ExitCode> {
    let mut monitor = Monitor::new(config(&args.report.thresholds), filter);
    monitor.seed()?;
    monitor.refresh()?;
    let report = monitor.report(true, 0, 0);
    let _ = Output::new(args.report.json).print(&report);
    Ok(exit_code(&report, args.report.check))
}

pub fn config(t: &Thresholds) -> ReportConfig {
    ReportConfig {
        close_wait_age: t.close_wait_age,
        window: t.window,
        time_wait_min: t.time_wait_min,
        port_pressure_pct: t.port_pressure_pct,
    }
}

fn exit_code(report: &Report, check: bool) -> ExitCode {
    if check && report.flagged() {
        ExitCode::from(EXIT_FLAGGED)
    } else {
        ExitCode::SUCCESS
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

/// Applies what is queued, reconciles with sock_diag and builds a report.
fn refresh(
    probe: &mut Probe,
    monitor: &mut Monitor,
    ring: &mut RingBuf<MapData>,
    undecodable: &mut u64,
    is_final: bool,
) -> Result<Report> {
    drain(ring, monitor, undecodable);
    monitor.refresh()?;
    let counters = probe.counters()?;
    Ok(monitor.report(
        is_final,
        counters.dropped,
        counters.socket_store_failed + *undecodable,
    ))
}

struct Output {
    json: bool,
    tty: bool,
}

impl Output {
    fn new(json: bool) -> Self {
        Self {
            json,
            tty: io::stdout().is_terminal(),
        }
    }

    fn print(&mut self, report: &Report) -> io::Result<()> {
        let mut out = io::stdout().lock();
        if self.json {
            writeln!(out, "{}", view::json(report))?;
        } else {
            if self.tty && !report.is_final {
                // Redraw in place on a terminal; a pipe gets one block per interval.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            writeln!(out, "{}", view::human(report))?;
        }
        out.flush()
    }
}
