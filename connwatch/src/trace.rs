//! `connwatch trace`: stream every transition from the probe to stdout.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
use std::{
    io::{self, Write},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};

use crate::{
    cli::TraceArgs,
    clock::WallClock,
    decode::decode,
    filter::Filter,
    monitor::Monitor,
    probe::ProbeOptions,
    report::ReportConfig,
    shutdown::Shutdown,
    views::trace::{self as view, Row},
};

pub async fn run(args: TraceArgs, opts: ProbeOptions, filter: Filter) -> Result<ExitCode> {
    // Handlers first: a signal right after "attached" must not kill the process.
    let mut shutdown = Shutdown::new(args.duration)?;
    // The monitor follows timewait sockets (TIME_WAIT is never a transition).
    let (probe, mut monitor, mut ring) =
        crate::live::attach(&opts, ReportConfig::default(), filter)?;
    let clock = WallClock::new();
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut stats = Stats::default();
    let mut drain_tick = crate::probe::drain_timer();
    let mut tw_poll = tokio::time::interval(args.tw_poll);
    tw_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let result: io::Result<()> = async {
        if !args.json {
            writeln!(out, "{}", view::header())?;
            out.flush()?;
        }
        loop {
            tokio::select! {
                ready = ring.readable_mut() => {
                    let mut guard = ready?;
                    drain(guard.get_inner_mut(), &mut monitor, &mut out, &clock, args.json, &mut stats)?;
                    guard.clear_ready();
                }
                _ = drain_tick.tick() => {
                    drain(ring.get_mut(), &mut monitor, &mut out, &clock, args.json, &mut stats)?;
                }
                _ = tw_poll.tick() => {
                    drain(ring.get_mut(), &mut monitor, &mut out, &clock, args.json, &mut stats)?;
                    if let Ok(c) = probe.counters() {
                        monitor.note_loss(c.dropped + c.socket_store_failed);
                    }
                    let rows = monitor.poll_timewait().map_err(io::Error::other)?;
                    print_rows(rows.iter().map(Row::from), &mut out, &clock, args.json)?;
                }
                () = shutdown.wait() => break,
            }
        }
        drain(ring.get_mut(), &mut monitor, &mut out, &clock, args.json, &mut stats)
    }
    .await;

    match result {
        // `connwatch trace | head`: the reader is gone, which is not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(e).context("cannot write the output"),
        Ok(()) => {}
    }
    let counters = probe.counters()?;
    let untracked = monitor.untracked() + counters.socket_store_failed + stats.undecodable;
    eprintln!(
        "{}",
        stats.summary(counters.seen, counters.dropped, untracked)
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Stats {
    received: u64,
    undecodable: u64,
}

impl Stats {
    /// `seen` counts the events the probe produced: each was either received or dropped.
    /// `untracked` counts sockets whose state was lost (as `sockets_untracked` in
    /// `watch` and the metrics).
    fn summary(&self, seen: u64, dropped: u64, untracked: u64) -> String {
        let mut s = format!(
            "connwatch: {seen} events, {} received, {dropped} dropped, {untracked} sockets untracked",
            self.received
        );
        if self.undecodable > 0 {
            s += &format!(", {} undecodable", self.undecodable);
        }
        if dropped > 0 {
            s += " (the ring buffer was full: raise --ring-size)";
        }
        s
    }
}

fn print_rows<'a>(
    rows: impl Iterator<Item = Row<'a>>,
    out: &mut impl Write,
    clock: &WallClock,
    json: bool,
) -> io::Result<()> {
    for row in rows {
        if json {
            writeln!(out, "{}", view::json_line(&row, clock))?;
        } else {
            writeln!(out, "{}", view::human_row(&row, clock))?;
        }
    }
    out.flush()
}

fn drain(
    ring: &mut RingBuf<MapData>,
    monitor: &mut Monitor,
    out: &mut impl Write,
    clock: &WallClock,
    json: bool,
    stats: &mut Stats,
) -> io::Result<()> {
    while let Some(item) = ring.next() {
        stats.received += 1;
        match decode(&item) {
            Ok(t) => {
                monitor.apply(&t);
                let row = Row::from(&t);
                if json {
                    writeln!(out, "{}", view::json_line(&row, clock))?;
                } else {
                    writeln!(out, "{}", view::human_row(&row, clock))?;
                }
            }
            Err(e) => {
                stats.undecodable += 1;
                log::warn!("skipped an event: {e}");
            }
        }
    }
    out.flush()
}
