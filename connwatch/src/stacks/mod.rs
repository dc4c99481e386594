//! Leak sites: the code that made each socket (connect, accept) and the code that read
//! its EOF and did not close it, from user stacks the probe captures for the processes
//! that are wanted (`--stacks`, or a process once it is flagged `close_wait_leak`).
//!
//! The flow: the probe writes a record per capture to its `STACKS` ring (`record`);
//! the event loop hands records to a thread of their own, which unwinds each stack
//! (`unwind`, with the process's binaries' tables from `modules`), symbolizes a stack
//! it has not seen (`symbolize`, blazesym, while the process still lives), reads what
//! the stack says (`site`) and files it under its socket (`book`). Reports count each
//! process's CLOSE_WAIT sockets per site from the book.
mod book;
mod modules;
mod record;
mod site;
mod symbolize;
mod unwind;

use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

pub use book::{Book, SiteId, SocketSites};
pub use record::At;
pub use site::Site;

use crate::probe::StackControl;

/// Which processes stacks are captured for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--stacks` with `--pid`: those processes, from the start.
    Pids,
    /// `--stacks`: every process, from the start.
    All,
    /// A process once it is flagged `close_wait_leak` (the default).
    Flagged,
}

/// Captures sent to the thread and done by it.
#[derive(Default)]
struct Progress {
    sent: u64,
    done: u64,
}

struct Shared {
    book: Arc<Mutex<Book>>,
    progress: Mutex<Progress>,
    done: Condvar,
}

/// The event loop's end of stack capture.
pub struct Stacks {
    control: StackControl,
    ring: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<record::Capture>,
    shared: Arc<Shared>,
    pub mode: Mode,
    /// Records that could not be decoded, or handed to the thread.
    pub undecodable: u64,
}

/// How long the event loop waits for the stacks already captured to be filed (the
/// first stack of a binary parses its symbols: a large Go binary's take a few hundred
/// ms on a busy host), so that what follows them finds them.
const SETTLE: Duration = Duration::from_secs(2);

impl Stacks {
    /// Starts the thread and sets the probe's switches for `mode` (`pids`: `--pid`).
    pub fn start(mut control: StackControl, mode: Mode, pids: &[u32]) -> Result<Self> {
        let ring = crate::probe::readable(control.take_ring()?)
            .context("cannot poll the probe's stack ring")?;
        let shared = Arc::new(Shared {
            book: Arc::new(Mutex::new(Book::default())),
            progress: Mutex::new(Progress::default()),
            done: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel();
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("stacks".into())
            .spawn(move || work(&rx, &worker))
            .context("cannot start the stack thread")?;
        match mode {
            Mode::All => control.all()?,
            Mode::Pids => {
                for &pid in pids {
                    control.want(pid)?;
                }
            }
            Mode::Flagged => {}
        }
        Ok(Self {
            control,
            ring,
            tx,
            shared,
            mode,
            undecodable: 0,
        })
    }

    /// The book, shared with the monitor's reports.
    pub fn book(&self) -> Arc<Mutex<Book>> {
        Arc::clone(&self.shared.book)
    }

    pub fn ring(&mut self) -> &mut AsyncFd<RingBuf<MapData>> {
        &mut self.ring
    }

    /// Hands every queued record to the thread.
    pub fn drain(&mut self) {
        let mut sent = 0;
        while let Some(item) = self.ring.get_mut().next() {
            match record::decode(&item) {
                Ok(c) => {
                    if self.tx.send(c).is_ok() {
                        sent += 1;
                    } else {
                        // The thread is gone: counted, never waited for.
                        self.undecodable += 1;
                    }
                }
                Err(e) => {
                    self.undecodable += 1;
                    log::warn!("skipped a stack: {e}");
                }
            }
        }
        if sent > 0 {
            lock(&self.shared.progress).sent += sent;
        }
    }

    /// Drains, then waits (at most `SETTLE`) until the thread has filed everything
    /// sent: a report then counts the sites of the sockets it shows.
    pub fn settle(&mut self) {
        self.drain();
        let progress = lock(&self.shared.progress);
        let _ = self
            .shared
            .done
            .wait_timeout_while(progress, SETTLE, |p| p.done < p.sent);
    }

    /// Starts capturing processes flagged `close_wait_leak` (in `Flagged` mode), and
    /// stops for those that are gone.
    pub fn follow(&mut self, flagged: impl IntoIterator<Item = u32>) {
        if self.mode != Mode::Flagged {
            return;
        }
        let gone = |pid: u32| !std::path::Path::new(&format!("/proc/{pid}")).exists();
        let _ = self.control.forget(gone);
        // A row may outlive its process by a report (its sockets not yet seen gone).
        for pid in flagged.into_iter().filter(|&p| !gone(p)) {
            match self.control.want(pid) {
                Ok(true) => {}
                Ok(false) => log::debug!("stack capture: pid map full, {pid} not captured"),
                Err(e) => log::warn!("cannot capture stacks of {pid}: {e:#}"),
            }
        }
    }

    /// Records lost in userspace: undecodable, or with no stack that could be read.
    pub fn lost(&self) -> u64 {
        self.undecodable + lock(&self.shared.book).unreadable
    }

    /// Processes captured by pid.
    pub fn wanted(&self) -> usize {
        self.control.wanted()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The thread: each capture unwound, symbolized where its stack is new, and filed.
fn work(rx: &mpsc::Receiver<record::Capture>, shared: &Shared) {
    let mut files = modules::Files::default();
    let symbols = symbolize::Symbols::default();
    let mut procs: HashMap<u32, modules::ProcessModules> = HashMap::new();
    let mut cache = framehop::x86_64::CacheX86_64::new();
    while let Ok(c) = rx.recv() {
        if procs.len() > 256 {
            procs.clear();
        }
        let fresh = procs.get(&c.pid).is_none_or(|m| !m.covers(c.ip));
        if fresh {
            procs.insert(c.pid, files.process(c.pid));
        }
        // One stack that trips a library must not end the thread: it is counted as
        // unreadable and the next one goes on.
        let filed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let u = procs
                .get(&c.pid)
                .map(|m| unwind::unwind(&c, &m.unwinder, &mut cache))
                .unwrap_or_default();
            file(&c, u.addrs, &symbols, shared);
        }));
        if filed.is_err() {
            log::warn!("a stack of {} could not be unwound or symbolized", c.pid);
            let mut book = lock(&shared.book);
            book.captures += 1;
            book.unreadable += 1;
        }
        let mut p = lock(&shared.progress);
        p.done += 1;
        shared.done.notify_all();
    }
}

fn file(c: &record::Capture, addrs: Vec<u64>, symbols: &symbolize::Symbols, shared: &Shared) {
    if addrs.is_empty() {
        let mut book = lock(&shared.book);
        book.captures += 1;
        book.unreadable += 1;
        return;
    }
    {
        let mut book = lock(&shared.book);
        if let Some(id) = book.known(c.pid, c.at, &addrs) {
            book.record(c.inode, c.at, id, c.ts_ns);
            return;
        }
    }
    // Symbolized without the book's lock: the first stack of a binary parses it.
    let started = std::time::Instant::now();
    let frames = symbols.frames(c.pid, &addrs);
    log::debug!(
        "stack of {} symbolized in {:?} ({} frames)",
        c.pid,
        started.elapsed(),
        frames.len()
    );
    let exe = std::fs::read_link(format!("/proc/{}/exe", c.pid))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let site = site::site(c.at, &frames, &exe);
    let mut book = lock(&shared.book);
    let id = book.add_site(c.pid, addrs, site);
    book.record(c.inode, c.at, id, c.ts_ns);
}
