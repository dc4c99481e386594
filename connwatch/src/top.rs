//! `connwatch top`: the live full-screen view. The same flow as `watch`; keys are read
//! by a thread (crossterm's blocking reader) and handed to the event loop.
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};

use crate::{
    cli::TopArgs,
    filter::Filter,
    monitor::Monitor,
    probe::{Probe, ProbeOptions},
    shutdown::Shutdown,
    views::top::App,
    watch::{config, drain},
};

pub async fn top(args: TopArgs, opts: ProbeOptions, filter: Filter) -> Result<ExitCode> {
    let mut probe = Probe::load(&opts)?;
    let ring = probe.take_events()?;
    let mut monitor =
        Monitor::new(config(&args.thresholds), filter).with_limit(opts.max_sockets as usize);
    monitor.seed()?;
    if opts.filter.npids > 0 {
        probe.seed_listeners(&monitor.listener_owners())?;
    }
    crate::probe::drop_capabilities();
    let mut ring = crate::probe::readable(ring).context("cannot poll the probe's ring buffer")?;

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
    let mut shutdown = Shutdown::new(None)?;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_tick = crate::probe::drain_timer();
    let mut undecodable = 0u64;
    let result: Result<()> = async {
        loop {
            terminal.draw(|f| app.draw(f))?;
            tokio::select! {
                ready = ring.readable_mut() => {
                    let mut guard = ready?;
                    drain(guard.get_inner_mut(), &mut monitor, &mut undecodable);
                    guard.clear_ready();
                }
                _ = drain_tick.tick() => drain(ring.get_mut(), &mut monitor, &mut undecodable),
                _ = ticker.tick() => {
                    drain(ring.get_mut(), &mut monitor, &mut undecodable);
                    monitor.refresh()?;
                    let c = probe.counters()?;
                    app.report = Some(monitor.report(false, c.dropped, c.socket_store_failed + undecodable));
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
