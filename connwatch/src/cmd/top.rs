//! `connwatch top`: the live full-screen view. The same flow as `watch`; keys are read
//! by a thread (crossterm's blocking reader) and handed to the event loop.
use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};

use crate::{
    cli::TopArgs, cmd::live::Live, cmd::shutdown::Shutdown, cmd::watch::config, filter::Filter,
    probe::ProbeOptions, views::screen::App,
};

pub async fn top(args: TopArgs, opts: ProbeOptions, filter: Filter) -> Result<ExitCode> {
    // Before anything is loaded: cron, `ssh host connwatch top` without -t, a pipe.
    if !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        anyhow::bail!(
            "top needs a terminal (stdin and stdout); without one use `connwatch watch` (or `ssh -t` for a remote terminal)"
        );
    }
    let cfg = config(&args.thresholds, args.by);
    // Handlers first: a signal right after "attached" must not kill the process.
    let mut shutdown = Shutdown::new(None)?;
    let mut live = Live::start(&opts, cfg, filter, args.interval, args.interval).await?;

    let (tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Ok(ev) = event::read() {
            if let Event::Key(k) = ev
                && k.kind == KeyEventKind::Press
            {
                let c = match k.code {
                    KeyCode::Char(c) => c,
                    KeyCode::Esc => '\u{1b}',
                    KeyCode::Up => '↑',
                    KeyCode::Down => '↓',
                    _ => continue,
                };
                if tx.send(c).is_err() {
                    break;
                }
            }
        }
    });

    let mut terminal = ratatui::init();
    let mut app = App::default();
    let result: Result<()> = async {
        app.report = Some(live.report(false)?);
        loop {
            terminal.draw(|f| app.draw(f))?;
            tokio::select! {
                due = live.report_due() => {
                    due?;
                    app.report = Some(live.report(false)?);
                }
                Some(k) = keys.recv() => {
                    app.key(k);
                    if app.quit {
                        return Ok(());
                    }
                }
                () = shutdown.wait() => return Ok(()),
            }
        }
    }
    .await;
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}
