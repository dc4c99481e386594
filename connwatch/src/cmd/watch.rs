//! `connwatch watch` and `connwatch snapshot`: the per-process report, live from the
//! probe (watch) or once from sock_diag and /proc alone (snapshot, no BPF).
use std::{
    io::{self, IsTerminal, Write},
    process::ExitCode,
};

use anyhow::{Result, anyhow};

use crate::{
    cli::{GroupBy, SnapshotArgs, WatchArgs},
    cmd::live::Live,
    cmd::shutdown::Shutdown,
    filter::Filter,
    monitor::Monitor,
    probe::ProbeOptions,
    report::{Report, ReportConfig, Reporter},
    views::text as view,
};

/// `--check`: exit status 3 when the final report flags a process.
const EXIT_FLAGGED: u8 = 3;

pub async fn watch(args: WatchArgs, opts: ProbeOptions, filter: Filter) -> Result<ExitCode> {
    let cfg = config(&args.report.thresholds, args.report.by);
    // Handlers first: a signal right after "attached" must not kill the process.
    let mut shutdown = Shutdown::new(args.duration)?;
    let mut live = Live::start(&opts, cfg, filter, args.interval, args.tw_poll).await?;
    let mut out = Output::new(args.report.json);
    loop {
        tokio::select! {
            due = live.report_due() => {
                due?;
                if !written(out.print(&live.report(false)?))? {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            () = shutdown.wait() => break,
        }
    }
    live.stop();
    let report = live.report(true)?;
    let delivered = written(out.print(&report))?;
    eprintln!("{}", live.summary()?);
    if !delivered {
        return Ok(ExitCode::SUCCESS);
    }
    Ok(exit_code(&report, args.report.check))
}

pub fn snapshot(args: SnapshotArgs, filter: Filter) -> Result<ExitCode> {
    // No BPF here: sock_diag and /proc answer anyone, so a missing privilege only
    // narrows what is listed.
    crate::probe::warn_missing_optional();
    let mut reporter = Reporter::new(config(&args.report.thresholds, args.report.by));
    let mut monitor = Monitor::new(reporter.cfg.window, filter).with_prescan();
    monitor.seed()?;
    monitor.refresh()?;
    let report = monitor.with_snapshot(true, Default::default(), |s| reporter.build(s));
    if !written(Output::new(args.report.json).print(&report))? {
        return Ok(ExitCode::SUCCESS);
    }
    Ok(exit_code(&report, args.report.check))
}

/// Whether a report reached its reader: false when the reader is gone (`| head`),
/// which is a quiet end; any other failure (a full disk) is an error, so that no
/// `--check` verdict is given for a report nobody got.
fn written(r: io::Result<()>) -> Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow!("cannot write the output: {e}")),
    }
}

/// The report options of a command: its thresholds and its `--by`.
pub fn config(t: &ReportConfig, by: GroupBy) -> ReportConfig {
    ReportConfig { by, ..*t }
}

fn exit_code(report: &Report, check: bool) -> ExitCode {
    if check && report.flagged() {
        ExitCode::from(EXIT_FLAGGED)
    } else {
        ExitCode::SUCCESS
    }
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
