//! `connwatch trace`: stream every transition to stdout, seen by the probe or inferred
//! (TIME_WAIT), on the same event loop as every other command (`live`).
use std::{
    io::{self, BufWriter, StdoutLock, Write},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;

use crate::{
    cli::TraceArgs,
    clock::WallClock,
    cmd::live::{Live, Sink, SinkError},
    cmd::shutdown::Shutdown,
    decode::{TcpState, Transition},
    filter::Filter,
    monitor::timewait::Synthetic,
    probe::ProbeOptions,
    report::ReportConfig,
    stacks::Book,
    views::transitions::{self as view, Row},
};

/// Rows are written through a buffer this large, flushed at the end of each batch the
/// loop hands over (a drain of the ring buffer, woken at an eighth full or on its short
/// timer) and at exit: few write(2) calls at high rates, prompt rows at low ones.
const OUTPUT_BUFFER: usize = 64 * 1024;

/// How often `trace` lists namespaces again (new containers), when no transition of
/// theirs has named them first.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(2);

pub async fn run(args: TraceArgs, opts: ProbeOptions, filter: Filter) -> Result<ExitCode> {
    // Handlers first: a signal right after "attached" must not kill the process.
    let mut shutdown = Shutdown::new(args.duration)?;
    // No reports: no history is kept for them (window 0).
    let cfg = ReportConfig {
        window: Duration::ZERO,
        ..ReportConfig::default()
    };
    let mut live = Live::start(&opts, cfg, filter, DISCOVERY_INTERVAL, args.tw_poll).await?;
    let mut sink = Rows {
        out: BufWriter::with_capacity(OUTPUT_BUFFER, io::stdout().lock()),
        clock: WallClock::new(),
        json: args.json,
        order: view::InOrder::default(),
        sites: if opts.stacks { live.sites() } else { None },
    };
    let result: Result<()> = async {
        if !args.json {
            writeln!(sink.out, "{}", view::header()).map_err(SinkError)?;
            sink.out.flush().map_err(SinkError)?;
        }
        loop {
            tokio::select! {
                due = live.until_tick(&mut sink) => due?,
                () = shutdown.wait() => break,
            }
        }
        live.stop_into(&mut sink)
    }
    .await;
    if let Err(e) = result {
        // `connwatch trace | head`: the reader is gone, which is not an error.
        if e.downcast_ref::<SinkError>()
            .is_some_and(|s| s.0.kind() == io::ErrorKind::BrokenPipe)
        {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(e);
    }
    eprintln!("{}", live.summary()?);
    Ok(ExitCode::SUCCESS)
}

/// Rows on stdout, buffered; flushed at the end of each batch the loop hands over.
struct Rows<'a> {
    out: BufWriter<StdoutLock<'a>>,
    clock: WallClock,
    json: bool,
    /// Keeps the stream's times in order.
    order: view::InOrder,
    /// `--stacks`: where sockets were made.
    sites: Option<Arc<Mutex<Book>>>,
}

impl Rows<'_> {
    fn row(&mut self, mut row: Row) -> io::Result<()> {
        self.order.place(&mut row);
        if self.json {
            view::write_json_line(&mut self.out, &row, &self.clock)
        } else {
            view::write_human_row(&mut self.out, &row, &self.clock)
        }
    }
}

impl Sink for Rows<'_> {
    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        let mut row = Row::from(t);
        if t.new == TcpState::CLOSE_WAIT
            && let Some(book) = &self.sites
        {
            // The stored site: the transition itself runs in softirq, on whatever task
            // was interrupted, so a stack taken now would name a bystander.
            let book = book
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            row.stack = book.of(t.inode).made.and_then(|id| book.site(id).cloned());
        }
        self.row(row)
    }

    fn inferred(&mut self, rows: &[Synthetic]) -> io::Result<()> {
        rows.iter().try_for_each(|r| self.row(Row::from(r)))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn reads_sites(&self) -> bool {
        self.sites.is_some()
    }
}
