//! The one event loop, shared by every command that loads the probe (`trace`, `watch`,
//! `serve`, `top`): the probe attached, the monitor seeded, and a loop that keeps the
//! socket table current (ring buffer, drain timer, timewait polls, namespace discovery)
//! and hands each transition, seen or inferred, to a `Sink` (trace prints them; the
//! report commands need none). Loss accounting is the same for all of them.
use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    time::{Interval, MissedTickBehavior},
};

use crate::{
    carry::Carry,
    decode::{Transition, decode},
    filter::Filter,
    monitor::Monitor,
    monitor::timewait::Synthetic,
    probe::{Probe, ProbeOptions},
    report::{Report, ReportConfig, Reporter},
    stacks::{self, Stacks},
};

/// Where transitions go as they are applied. A sink's error ends the loop.
pub trait Sink {
    /// A transition the probe reported.
    fn transition(&mut self, _t: &Transition) -> std::io::Result<()> {
        Ok(())
    }
    /// Transitions connwatch inferred (TIME_WAIT entries and ends).
    fn inferred(&mut self, _rows: &[Synthetic]) -> std::io::Result<()> {
        Ok(())
    }
    /// The end of a batch: write out what is buffered.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Whether `transition` looks up where a CLOSE_WAIT socket was made (`--stacks`):
    /// then the stacks captured before it are filed first. Reports settle before they
    /// read the sites, so a sink that does not read them spares every CLOSE_WAIT a
    /// look at the stack ring and a lock.
    fn reads_sites(&self) -> bool {
        false
    }
}

/// The sink of the report commands: the table is all they need.
pub struct NoSink;
impl Sink for NoSink {}

/// A sink failed (e.g. stdout closed): told apart from the monitor's own errors.
#[derive(Debug)]
pub struct SinkError(pub std::io::Error);

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write the output: {}", self.0)
    }
}

impl std::error::Error for SinkError {}

pub struct Live {
    probe: Probe,
    pub monitor: Monitor,
    reporter: Reporter,
    ring: AsyncFd<RingBuf<MapData>>,
    /// What reading the ring keeps beside the monitor.
    intake: Intake,
    drain_tick: Interval,
    tw_poll: Interval,
    report_tick: Interval,
    /// When the next report is due, and a timewait poll deferred until it is out.
    next_report: tokio::time::Instant,
    poll_after_report: bool,
    /// Stack capture, where it may run (`--stacks`, or the report commands' capture of
    /// flagged processes).
    stacks: Option<Stacks>,
}

/// The reader's own books and state, beside the monitor.
struct Intake {
    /// Events read from the ring buffer, and those of them that could not be decoded.
    received: u64,
    undecodable: u64,
    /// Where the probe keeps no per-socket state (`Probe::userspace_carries`).
    carry: Option<Carry>,
}

/// What `attach` starts.
pub struct Attached {
    pub probe: Probe,
    pub monitor: Monitor,
    pub ring: AsyncFd<RingBuf<MapData>>,
    pub stacks: Option<Stacks>,
}

/// The start-up shared by every command that loads the probe, in its order: the monitor
/// first (its /proc scan runs while the probe loads), then the probe, the seeding, the
/// listeners for `--pid`, stack capture, and the capabilities dropped before "attached"
/// is announced (from then on, every socket is seen, and with `--stacks` its stacks).
pub fn attach(opts: &ProbeOptions, window: Duration, filter: Filter) -> Result<Attached> {
    let mut monitor = Monitor::new(window, filter).with_limit(opts.max_sockets as usize);
    // Without kernel BTF there is no socket-fd iterator: /proc is walked while the
    // probe loads.
    if !opts.btf_path.exists() {
        monitor = monitor.with_prescan();
    }
    let mut probe = Probe::load(opts)?;
    if let Some(iter) = probe.take_tcp_sockets() {
        monitor.use_tcp_sockets(iter);
    }
    if let Some(fds) = probe.take_socket_fds() {
        monitor.use_socket_fds(Box::new(fds));
    }
    let ring = probe.take_events()?;
    monitor.seed()?;
    if opts.filter.npids > 0 {
        probe.seed_listeners(&monitor.listener_owners())?;
    }
    let stacks = start_stacks(&mut probe, opts)?;
    if let Some(s) = &stacks {
        monitor.use_sites(s.book());
    }
    // Before announcing: "attached" means the capabilities are already dropped.
    crate::probe::drop_capabilities();
    crate::probe::announce(&probe);
    let ring = crate::probe::readable(ring).context("cannot poll the probe's ring buffer")?;
    Ok(Attached {
        probe,
        monitor,
        ring,
        stacks,
    })
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
        let Attached {
            probe,
            monitor,
            ring,
            stacks,
        } = attach(opts, cfg.window, filter)?;
        let mut report_tick = interval(every);
        report_tick.tick().await; // the first tick is immediate: skip it
        let carry = probe
            .userspace_carries
            .then(|| Carry::new(opts.max_sockets as usize));
        Ok(Self {
            probe,
            monitor,
            reporter: Reporter::new(cfg),
            ring,
            intake: Intake {
                received: 0,
                undecodable: 0,
                carry,
            },
            // `trace` shows rows within 50 ms at low rates; the reports read events at
            // their own ticks (polls and reports drain first), so they wake less often.
            // At high rates the probe wakes the reader once an eighth of the ring fills.
            drain_tick: crate::probe::drain_timer(if opts.filter.lifecycle_only != 0 {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(50)
            }),
            // The seed has just observed every timewait socket: the first poll is one
            // period away, not now.
            tw_poll: {
                let mut t = interval(tw_poll);
                t.reset();
                t
            },
            next_report: tokio::time::Instant::now() + every,
            report_tick,
            poll_after_report: false,
            stacks,
        })
    }

    /// The leak sites captured so far (`None` where stacks are not captured).
    pub fn sites(&self) -> Option<std::sync::Arc<std::sync::Mutex<stacks::Book>>> {
        self.stacks.as_ref().map(Stacks::book)
    }

    /// Keeps the table current until a report is due (the report commands).
    pub async fn report_due(&mut self) -> Result<()> {
        self.until_tick(&mut NoSink).await
    }

    /// Keeps the table current, handing transitions to `sink`, until the next tick of
    /// `every` (a report is due; for `trace`, namespaces are listed again). Cancel-safe
    /// (every branch finishes its work synchronously), so it can sit in a `select!`.
    pub async fn until_tick(&mut self, sink: &mut impl Sink) -> Result<()> {
        if std::mem::take(&mut self.poll_after_report) {
            self.note_loss()?;
            self.poll(sink)?;
        }
        loop {
            if tokio::time::Instant::now() >= self.next_report {
                // Due while a branch ran (a poll): the timer is seen as elapsed only once
                // the runtime turns its clock, else another batch would go first.
                tokio::task::yield_now().await;
            }
            // Biased, the event ring last: a report that is due goes before another
            // batch of events (at saturation the ring is always ready, and a fair draw
            // would let batches hold up the report); the timers cannot starve it, and
            // the stack ring is drained whole each time.
            tokio::select! {
                biased;
                _ = self.report_tick.tick() => {
                    self.next_report = tokio::time::Instant::now() + self.report_tick.period();
                    // New namespaces (pods) within one interval, in every command.
                    self.monitor.discover_namespaces();
                    return Ok(());
                }
                _ = self.drain_tick.tick() => self.drain(sink)?,
                _ = self.tw_poll.tick() => {
                    self.note_loss()?;
                    // A poll that could still run when the report is due waits for it:
                    // the report keeps its time, the poll runs right after it.
                    let report_in = self.next_report.saturating_duration_since(tokio::time::Instant::now());
                    if self.monitor.poll_waits_for_report(report_in, self.tw_poll.period()) {
                        self.poll_after_report = true;
                    } else {
                        self.poll(sink)?;
                    }
                }
                ready = stack_ring(&mut self.stacks) => {
                    let mut guard = ready?;
                    guard.clear_ready();
                    drop(guard);
                    if let Some(s) = &mut self.stacks {
                        s.drain();
                    }
                }
                ready = self.ring.readable_mut() => {
                    let mut guard = ready?;
                    let ring = guard.get_inner_mut();
                    let drained = drain(ring, &mut self.monitor, sink, &mut self.intake, &mut self.stacks, BATCH);
                    // A full batch may have left more: stay ready, and let the other
                    // branches (the report tick) take their turn first.
                    if drained.as_ref().is_ok_and(|n| *n < BATCH) {
                        guard.clear_ready();
                    }
                    drained?;
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// A timewait poll, after what is queued is applied. The loss it goes by was noted
    /// before (`note_loss`): one that a drop during this drain brought would turn the
    /// poll, already judged not to hold up the report, into one of every namespace.
    fn poll(&mut self, sink: &mut impl Sink) -> Result<()> {
        self.drain(sink)?;
        let rows = self.monitor.poll_timewait()?;
        if !rows.is_empty() {
            sink.inferred(&rows)
                .and_then(|()| sink.flush())
                .map_err(SinkError)?;
        }
        Ok(())
    }

    /// Tells the monitor the loss so far (a poll after a loss lists every namespace).
    fn note_loss(&mut self) -> Result<()> {
        let loss = self.loss()?;
        self.monitor.note_loss(loss);
        Ok(())
    }

    /// Events lost so far: dropped by the kernel, not storable, or undecodable.
    fn loss(&self) -> Result<u64> {
        let c = self.probe.counters()?;
        Ok(c.dropped + c.sockets_lost() + self.intake.undecodable + self.carry_untracked())
    }

    /// Sockets whose state `carry` could not keep (over `--max-sockets`).
    fn carry_untracked(&self) -> u64 {
        self.intake.carry.as_ref().map_or(0, |c| c.untracked)
    }

    /// Applies one batch of what is queued in the ring buffer (at saturation the ring
    /// never empties: draining "until empty" would hold the loop for good).
    pub fn drain(&mut self, sink: &mut impl Sink) -> Result<()> {
        drain(
            self.ring.get_mut(),
            &mut self.monitor,
            sink,
            &mut self.intake,
            &mut self.stacks,
            BATCH,
        )
        .map(|_| ())
    }

    /// Stops the probe and applies everything it had queued: after this the counters
    /// are final, so `events = received + dropped` holds exactly in the summary.
    pub fn stop(&mut self) {
        if let Err(e) = self.stop_into(&mut NoSink) {
            log::warn!("last drain: {e:#}");
        }
    }

    /// `stop`, handing the last transitions to `sink`.
    pub fn stop_into(&mut self, sink: &mut impl Sink) -> Result<()> {
        self.probe.detach();
        drain(
            self.ring.get_mut(),
            &mut self.monitor,
            sink,
            &mut self.intake,
            &mut self.stacks,
            usize::MAX,
        )
        .map(|_| ())
    }

    /// The line every command ends with: events produced, received, dropped, and the
    /// sockets whose state was lost.
    pub fn summary(&self) -> Result<String> {
        let c = self.probe.counters()?;
        let untracked = self.monitor.untracked()
            + c.sockets_lost()
            + self.intake.undecodable
            + self.carry_untracked();
        let mut s = format!(
            "connwatch: {} events, {} received, {} dropped, {untracked} sockets untracked",
            c.seen, self.intake.received, c.dropped
        );
        if self.intake.undecodable > 0 {
            s += &format!(", {} undecodable", self.intake.undecodable);
        }
        if c.dropped > 0 {
            s += " (the ring buffer was full: raise --ring-size)";
        }
        if let Some(st) = &self.stacks
            && c.stacks_captured + c.stacks_dropped > 0
        {
            s += &format!(
                "; {} stacks captured, {} dropped",
                c.stacks_captured,
                c.stacks_dropped + st.lost()
            );
        }
        Ok(s)
    }

    /// Applies what is queued, reconciles with sock_diag and builds a report; then
    /// starts capturing the stacks of processes it flags `close_wait_leak`.
    pub fn report(&mut self, is_final: bool) -> Result<Report> {
        self.drain(&mut NoSink)?;
        // Every stack captured so far is counted in this report.
        settle(&mut self.stacks);
        self.monitor.refresh()?;
        let c = self.probe.counters()?;
        let lost = crate::report::Loss {
            events_dropped: c.dropped,
            sockets_untracked: c.sockets_lost() + self.intake.undecodable + self.carry_untracked(),
            stacks_dropped: c.stacks_dropped + self.stacks.as_ref().map_or(0, |s| s.lost()),
        };
        let reporter = &mut self.reporter;
        let mut report = self
            .monitor
            .with_snapshot(is_final, lost, |s| reporter.build(s));
        if let Some(s) = &mut self.stacks {
            s.follow(
                report
                    .processes
                    .iter()
                    .filter(|p| p.flags.contains(&crate::report::flag::CLOSE_WAIT_LEAK.name))
                    .flat_map(|p| p.pids.iter().copied()),
            );
            // Processes captured by pid from now on (none: no syscall program attached).
            report
                .footprint
                .entries
                .insert("stack_processes", s.wanted() as u64);
        }
        Ok(report)
    }

    /// Events the probe produced so far (received or dropped).
    pub fn events_seen(&self) -> Result<u64> {
        Ok(self.probe.counters()?.seen)
    }
}

/// Stack capture for `opts`: from the start with `--stacks` (the `--pid` processes, or
/// all), else for the processes a report flags (the report commands only).
fn start_stacks(probe: &mut Probe, opts: &ProbeOptions) -> Result<Option<Stacks>> {
    let reports = opts.filter.lifecycle_only != 0;
    let mode = match (opts.stacks, opts.filter.npids) {
        (true, 0) => stacks::Mode::All,
        (true, _) => stacks::Mode::Pids,
        (false, _) if reports => stacks::Mode::Flagged,
        (false, _) => return Ok(None),
    };
    let Some(control) = probe.take_stacks() else {
        return Ok(None);
    };
    let pids = opts
        .filter
        .pids
        .get(..usize::from(opts.filter.npids))
        .unwrap_or_default();
    Stacks::start(control, mode, pids).map(Some)
}

/// Files the stacks captured so far (bounded wait; nothing to wait for mostly).
fn settle(stacks: &mut Option<Stacks>) {
    if let Some(s) = stacks {
        s.settle();
    }
}

/// The stack ring's readiness; never, where stacks are not captured.
async fn stack_ring(
    stacks: &mut Option<Stacks>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
    match stacks {
        Some(s) => s.ring().readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Events applied per drain: the loop yields between batches, so that reports keep
/// their interval when events come faster than they can be applied (the probe then
/// drops and counts what the ring cannot hold).
const BATCH: usize = 4096;

/// Applies up to `max` queued events; returns how many were read.
fn drain(
    ring: &mut RingBuf<MapData>,
    monitor: &mut Monitor,
    sink: &mut impl Sink,
    intake: &mut Intake,
    stacks: &mut Option<Stacks>,
    max: usize,
) -> Result<usize> {
    let mut written = false;
    let mut read = 0;
    while read < max
        && let Some(item) = ring.next()
    {
        read += 1;
        intake.received += 1;
        match decode(&item) {
            Ok(mut t) => {
                if let Some(c) = &mut intake.carry {
                    c.fill(&mut t);
                }
                if t.new == crate::decode::TcpState::CLOSE_WAIT && sink.reads_sites() {
                    // Its socket's stacks were captured before this event was
                    // queued: filed first, so the sink finds where it was made.
                    settle(stacks);
                }
                monitor.apply(&t);
                sink.transition(&t).map_err(SinkError)?;
                written = true;
            }
            Err(e) => {
                intake.undecodable += 1;
                log::warn!("skipped an event: {e}");
            }
        }
    }
    // Births the probe told and ends seen in transitions: out with the events that
    // caused them, not at the next poll.
    let inferred = monitor.take_inferred();
    if !inferred.is_empty() {
        sink.inferred(&inferred).map_err(SinkError)?;
        written = true;
    }
    if written {
        sink.flush().map_err(SinkError)?;
    }
    Ok(read)
}
