//! The flow every view shares: seed from sock_diag, apply the probe's transitions, poll
//! timewait sockets, reconcile and resolve owners, build the report. Covers every network
//! namespace on the host (the probe sees them all; dumps are made inside each).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    budget::Budget,
    clock::{WallClock, monotonic_ns},
    decode::{TcpState, Transition},
    filter::Filter,
    kernelinfo::KernelInfo,
    netns,
    owners::{self, FdIndex, ProcInfo},
    report::{self, Footprint, Growth, Loss, Report, ReportConfig, Snapshot},
    sockdiag::{self, DiagSocket, Query},
    table::{SockKey, Table},
    timewait::{Synthetic, Tracker, TwOwner},
};

pub struct Monitor {
    table: Table,
    tw: Tracker,
    index: FdIndex,
    growth: Growth,
    cfg: ReportConfig,
    own_netns: u32,
    namespaces: BTreeMap<u32, PathBuf>,
    start_ns: u64,
    clock: WallClock,
    states: BTreeMap<String, u64>,
    /// Listening sockets: (netns, port) → socket inode.
    listeners: HashMap<(u32, u16), u64>,
    kernel: BTreeMap<u32, KernelInfo>,
    tw_seeded: bool,
    /// Namespaces whose dump failed (gone meanwhile, or no permission).
    pub dump_errors: u64,
    filter: Filter,
    /// A transition came from a namespace not listed yet: list them again.
    rediscover: bool,
    /// Time spent in sock_diag dumps and /proc scans (the polling cost).
    pub poll_ns: u64,
    /// How many closes/ends `take_lifetimes` already handed out.
    taken: (u64, u64),
    /// End and cost of the last dump that observed timewait sockets.
    tw_budget: Budget,
    /// Whether other network namespaces can be entered (CAP_SYS_ADMIN).
    other_netns: bool,
    /// Full dumps (`refresh`).
    full_budget: Budget,
    /// Events lost so far (dropped, unstorable, undecodable): a loss means a timewait
    /// socket may have begun unseen, so the next poll is not skipped.
    loss_seen: u64,
    loss_polled: u64,
    /// The /proc scan started with the monitor, taken over at the first seeding.
    prescan: Option<owners::Prescan>,
    /// Namespaces forgotten because they no longer exist.
    pub forgotten: u64,
}

/// Timewait polls may use at most 1/POLL_BUDGET of a CPU: with very many timewait
/// sockets, polls are spaced out beyond --tw-poll rather than taxing the host.
const POLL_BUDGET: u32 = 20;

/// Full dumps (`refresh`) may use at most 1/REFRESH_BUDGET of a CPU.
const REFRESH_BUDGET: u32 = 100;

impl Monitor {
    pub fn new(cfg: ReportConfig, filter: Filter) -> Self {
        let own_netns = owners::own_netns();
        Self {
            table: Table::new(own_netns),
            tw: Tracker::default(),
            // New inodes trigger a /proc rescan at most once a second; the whole index is
            // refreshed every minute to notice fds closed or handed over (both spaced
            // further when a scan is slow: see owners::SCAN_BUDGET).
            index: FdIndex::new(Duration::from_secs(1), Duration::from_secs(60)),
            growth: Growth::default(),
            cfg,
            own_netns,
            namespaces: BTreeMap::new(),
            start_ns: monotonic_ns(),
            clock: WallClock::new(),
            states: BTreeMap::new(),
            listeners: HashMap::new(),
            kernel: BTreeMap::new(),
            tw_seeded: false,
            dump_errors: 0,
            filter,
            rediscover: false,
            poll_ns: 0,
            taken: (0, 0),
            tw_budget: Budget::new(POLL_BUDGET),
            other_netns: crate::probe::Abilities::current().other_netns,
            full_budget: Budget::new(REFRESH_BUDGET),
            loss_seen: 0,
            loss_polled: 0,
            prescan: Some(owners::Prescan::start()),
            forgotten: 0,
        }
    }

    /// Bounds the sockets followed in userspace (`--max-sockets`, as in the kernel map).
    pub fn with_limit(mut self, max_sockets: usize) -> Self {
        self.table.set_limit(max_sockets);
        self.tw.limit = max_sockets;
        self
    }

    /// One visit to every namespace (or `only` those): the `queries` dumped (their results together) and,
    /// with `kernel`, its TIME_WAIT settings read, all in one setns per namespace and one
    /// worker thread for all of them. A namespace that fails (its last process exited
    /// meanwhile) is counted and skipped; our own failing is an error.
    fn visit(
        &mut self,
        queries: &[Query],
        kernel: bool,
        only: Option<&BTreeSet<u32>>,
    ) -> Result<Vec<Visit>> {
        let started = std::time::Instant::now();
        let queries = queries.to_vec();
        let visit = move || -> std::io::Result<(Vec<DiagSocket>, Option<KernelInfo>)> {
            let mut sockets = Vec::new();
            for q in &queries {
                sockets.extend(sockdiag::dump(*q)?);
            }
            Ok((sockets, kernel.then(KernelInfo::read)))
        };
        let own = self.own_netns;
        let wanted = |ns: &u32| only.is_none_or(|o| o.contains(ns));
        let others: Vec<(u32, PathBuf)> = self
            .namespaces
            .iter()
            .filter(|(ns, _)| **ns != own && wanted(ns))
            .map(|(ns, path)| (*ns, path.clone()))
            .collect();
        let mut results = Vec::new();
        if wanted(&own) {
            results.push((own, visit()));
        }
        if !others.is_empty() {
            results.extend(netns::run_in_each(others, visit));
        }
        let mut out = Vec::with_capacity(results.len());
        for (ns, result) in results {
            match result {
                Ok((mut sockets, kernel)) => {
                    // Listeners stay: they name the owners of server-side sockets.
                    sockets.retain(|s| {
                        s.state == TcpState::LISTEN || self.filter.socket(&s.local, &s.remote)
                    });
                    out.push(Visit {
                        ns,
                        sockets,
                        kernel,
                    });
                }
                Err(e) if ns == own => {
                    return Err(e).context("cannot list TCP sockets through netlink sock_diag");
                }
                Err(e) => {
                    self.dump_errors += 1;
                    log::debug!("netns {ns}: sock_diag dump failed: {e}");
                }
            }
        }
        self.poll_ns += started.elapsed().as_nanos() as u64;
        Ok(out)
    }

    /// Lists the network namespaces that exist now (cheap: one readlink per process).
    /// One that existed before and is gone now took its sockets with it: its TIME_WAITs
    /// end (`early`), its CLOSE_WAIT rows, listeners, settings and pending closes go.
    pub fn discover_namespaces(&mut self) {
        let mut found = netns::all();
        if !self.other_netns {
            // setns would fail in each of them (warned once at start), and without
            // CAP_SYS_PTRACE other processes' namespaces may be unreadable: then nothing
            // is forgotten either, since absence from the list proves nothing.
            let own = self.own_netns;
            found.retain(|&ns, _| ns == own);
        }
        found
            .entry(self.own_netns)
            .or_insert_with(|| PathBuf::from("/proc/self/ns/net"));
        if self.other_netns {
            let now = monotonic_ns();
            let gone: Vec<u32> = self
                .namespaces
                .keys()
                .filter(|ns| !found.contains_key(ns))
                .copied()
                .collect();
            for ns in gone {
                self.forget_namespace(ns, now);
            }
        }
        self.namespaces = found;
    }

    fn forget_namespace(&mut self, ns: u32, now_ns: u64) {
        log::debug!("netns {ns} is gone: forgetting its sockets");
        self.tw.forget(ns, now_ns);
        self.table.forget(ns);
        self.listeners.retain(|&(n, _), _| n != ns);
        self.kernel.remove(&ns);
        self.forgotten += 1;
    }

    /// Sockets that existed before start: CLOSE_WAIT with `tcp_info` for age estimates,
    /// the timewait sockets with their timers, listeners, settings and the state
    /// histogram, from one visit to each namespace (the first full dump).
    pub fn seed(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        self.discover_namespaces();
        log::debug!(
            "seed: {} namespaces in {:?}",
            self.namespaces.len(),
            started.elapsed()
        );
        let now = monotonic_ns();
        // tcp_info for the CLOSE_WAIT sockets' ages; asked of every socket, because a
        // second dump per namespace costs more (each walks the host-wide hash table).
        let everything = Query {
            tcp_info: true,
            ..Query::all()
        };
        let visits = self.visit(&[everything], true, None)?;
        for v in &visits {
            self.table.seed(v.ns, &v.sockets, now);
        }
        log::debug!("seed: dumped at {:?}", started.elapsed());
        self.absorb_full_dump(visits, now, started)?;
        log::debug!(
            "seed: timewait and listeners known at {:?}",
            started.elapsed()
        );
        Ok(())
    }

    /// Sockets whose state was lost so far (missed transitions, over the limit).
    pub fn untracked(&self) -> u64 {
        self.table.untracked() + self.tw.untracked()
    }

    /// Notes the probe's running loss count (dropped + unstorable + undecodable events).
    pub fn note_loss(&mut self, total: u64) {
        self.loss_seen = total;
    }

    /// Owners of the listening ports found so far: (netns, port, pid).
    pub fn listener_owners(&mut self) -> Vec<(u32, u16, u32)> {
        self.index.ensure(self.listeners.values().copied());
        self.listeners
            .iter()
            .filter_map(|(&(ns, port), &inode)| {
                Some((ns, port, *self.index.holders(inode).first()?))
            })
            .collect()
    }

    pub fn apply(&mut self, t: &Transition) {
        let index = &self.index;
        self.table
            .apply_with(t, |inode| index.holders(inode).first().copied());
        let ns = if t.netns == 0 {
            self.own_netns
        } else {
            t.netns
        };
        if !self.namespaces.contains_key(&ns) {
            // A namespace created since the last discovery: list them before the next
            // poll, so that its closes are confirmed and its sockets dumped.
            self.rediscover = true;
        }
        let key = SockKey {
            netns: ns,
            local: t.local.into(),
            remote: t.remote.into(),
        };
        self.tw.on_transition(key, t);
    }

    /// Polls timewait sockets (and listeners, their likely owners) in every namespace:
    /// confirms TIME_WAIT entries, notices their ends. Returns the inferred transitions
    /// that pass the filter.
    pub fn poll_timewait(&mut self) -> Result<Vec<Synthetic>> {
        if std::mem::take(&mut self.rediscover) {
            self.discover_namespaces();
        }
        let mut rows = if let Some(only) = self.timewait_poll_scope() {
            let query = Query::states(
                &[TcpState::TIME_WAIT, TcpState::FIN_WAIT2, TcpState::LISTEN],
                false,
            );
            let started = std::time::Instant::now();
            let loss = self.loss_seen;
            let dumps = self
                .visit(&[query], false, only.as_ref())?
                .into_iter()
                .map(|v| (v.ns, v.sockets))
                .collect();
            let rows = self.observe(dumps, started)?;
            self.tw.expire_pending(monotonic_ns());
            self.loss_polled = loss;
            rows
        } else {
            // Ends noticed without a poll (a new SYN on the 4-tuple, a namespace gone).
            self.tw.take_queued()
        };
        if self.filter.selects_processes() {
            let filter = &self.filter;
            rows.retain(|r| {
                r.owner.as_ref().is_some_and(|o| {
                    filter.process(o.pid, crate::filter::cgroup_of(o.pid).as_deref())
                })
            });
        }
        Ok(rows)
    }

    /// Whether a timewait poll can tell anything events did not, within its CPU budget,
    /// and where: every namespace before seeding or after a loss (a timewait socket may
    /// have begun unseen anywhere), else only those with a close pending or a timer due
    /// (`Some(None)` is every namespace, `None` no poll).
    fn timewait_poll_scope(&mut self) -> Option<Option<BTreeSet<u32>>> {
        let everywhere = !self.tw_seeded || self.loss_seen != self.loss_polled;
        let wanting = self.tw.wanting_poll(monotonic_ns());
        if !everywhere && wanting.is_empty() {
            return None;
        }
        if !self.tw_budget.allows() {
            return None;
        }
        Some((!everywhere).then_some(wanting))
    }

    fn observe(
        &mut self,
        dumps: Vec<(u32, Vec<DiagSocket>)>,
        started: std::time::Instant,
    ) -> Result<Vec<Synthetic>> {
        let now = monotonic_ns();
        let mut rows = Vec::new();
        for (ns, sockets) in &dumps {
            self.listeners.retain(|(n, _), _| n != ns);
            for s in sockets.iter().filter(|s| s.state == TcpState::LISTEN) {
                self.listeners.insert((*ns, s.local.port()), s.inode);
            }
        }
        let seeding = !self.tw_seeded;
        if seeding {
            // Pre-existing TIME_WAITs are attributed to listeners: know their holders,
            // and those of the CLOSE_WAIT sockets just seeded, in one /proc scan.
            let inodes: Vec<u64> = self
                .listeners
                .values()
                .copied()
                .chain(self.table.close_wait().map(|(_, cw)| cw.inode))
                .collect();
            if let Some(prescan) = self.prescan.take() {
                self.index.adopt(prescan, inodes.iter().copied());
            }
            self.index.ensure(inodes);
        }
        let Self {
            tw,
            index,
            listeners,
            ..
        } = self;
        for (ns, sockets) in &dumps {
            // Once per listening port, not once per socket: a server can leave tens of
            // thousands of TIME_WAITs on one port.
            let known: std::cell::RefCell<HashMap<u16, Option<TwOwner>>> = Default::default();
            let listener = |port: u16| -> Option<TwOwner> {
                if let Some(owner) = known.borrow().get(&port) {
                    return owner.clone();
                }
                let owner = listeners
                    .get(&(*ns, port))
                    .and_then(|inode| index.holders(*inode).first().copied())
                    .map(|pid| TwOwner {
                        pid,
                        comm: owners::proc_info(pid)
                            .map(|p| p.comm)
                            .unwrap_or_default()
                            .into(),
                    });
                known.borrow_mut().insert(port, owner.clone());
                owner
            };
            rows.extend(tw.observe(*ns, sockets, now, seeding, &listener));
        }
        self.tw_seeded = true;
        rows.sort_by_key(|r| r.ts_ns);
        self.tw_budget.spent(started.elapsed());
        Ok(rows)
    }

    /// Full dump of every namespace: the state histogram, listeners, kernel settings,
    /// and the CLOSE_WAIT table and timewait sockets reconciled with what exists.
    ///
    /// Between full dumps the CLOSE_WAIT table follows the probe's events; the dumps only
    /// correct what events missed and count every state, so they are spaced to use at
    /// most 1/REFRESH_BUDGET of a CPU (a few ms on most hosts: every report; ~100 ms
    /// with 100,000 sockets: every few seconds).
    pub fn refresh(&mut self) -> Result<Vec<Synthetic>> {
        if !self.full_budget.allows() {
            return Ok(Vec::new());
        }
        let now = monotonic_ns();
        let started = std::time::Instant::now();
        let visits = self.visit(&[Query::all()], true, None)?;
        self.absorb_full_dump(visits, now, started)
    }

    /// A full dump of every namespace: the state histogram, the CLOSE_WAIT table
    /// reconciled, settings, listeners and timewait sockets observed.
    fn absorb_full_dump(
        &mut self,
        visits: Vec<Visit>,
        now: u64,
        started: std::time::Instant,
    ) -> Result<Vec<Synthetic>> {
        self.states.clear();
        self.kernel.retain(|ns, _| self.namespaces.contains_key(ns));
        let mut dumps = Vec::with_capacity(visits.len());
        for v in visits {
            for (state, n) in report::state_counts(&v.sockets) {
                *self.states.entry(state).or_insert(0) += n;
            }
            self.table.reconcile(v.ns, &v.sockets, now);
            if let Some(info) = v.kernel {
                self.kernel.insert(v.ns, info);
            }
            dumps.push((v.ns, v.sockets));
        }
        let loss = self.loss_seen;
        let rows = self.observe(dumps, started);
        self.loss_polled = loss;
        release_freed_memory();
        self.full_budget.spent(started.elapsed());
        rows
    }

    /// Lifetimes (seconds) of the CLOSE_WAIT and TIME_WAIT sockets that ended since the
    /// last call.
    pub fn take_lifetimes(&mut self) -> (Vec<f64>, Vec<f64>) {
        let (c, e) = (self.table.closed_total, self.tw.ended_total);
        let cw = self.table.newest_closed(c - self.taken.0).collect();
        let tw = self.tw.newest_ended(e - self.taken.1).collect();
        self.taken = (c, e);
        (cw, tw)
    }

    /// CLOSE_WAIT sockets whose peer closed before the process accepted them carry no
    /// inode in their transition (no file yet): ask the namespaces that hold such
    /// sockets for their CLOSE_WAIT sockets only, so that the holder can be found now
    /// rather than at the next (budgeted) full dump.
    fn fill_inodes(&mut self) {
        let wanting: std::collections::BTreeSet<u32> = self
            .table
            .close_wait()
            .filter(|(_, cw)| cw.inode == 0)
            .map(|(k, _)| k.netns)
            .collect();
        let query = Query::states(&[TcpState::CLOSE_WAIT], false);
        let mut others = Vec::new();
        for ns in wanting {
            if ns == self.own_netns {
                if let Ok(sockets) = sockdiag::dump(query) {
                    self.table.fill_inodes(ns, &sockets);
                }
            } else if let Some(path) = self.namespaces.get(&ns) {
                others.push((ns, path.clone()));
            }
        }
        if !others.is_empty() {
            for (ns, result) in netns::run_in_each(others, move || sockdiag::dump(query)) {
                if let Ok(sockets) = result {
                    self.table.fill_inodes(ns, &sockets);
                }
            }
        }
    }

    /// Resolves holders and process facts, then builds the report.
    pub fn report(&mut self, is_final: bool, events_dropped: u64, untracked_extra: u64) -> Report {
        let now = monotonic_ns();
        let started = std::time::Instant::now();
        self.fill_inodes();
        self.index.ensure(
            self.table
                .close_wait()
                .map(|(_, cw)| cw.inode)
                .chain(self.listeners.values().copied()),
        );
        self.poll_ns += started.elapsed().as_nanos() as u64;
        let window_start = now.saturating_sub(self.cfg.window.as_nanos() as u64);
        self.table.prune_closed(window_start);
        self.tw.prune(window_start);
        let listening: HashMap<(u32, u16), Vec<u32>> = self
            .listeners
            .iter()
            .map(|(k, inode)| (*k, self.index.holders(*inode).to_vec()))
            .collect();

        let mut pids: HashSet<u32> = HashSet::new();
        for (_, cw) in self.table.close_wait() {
            pids.extend(self.index.holders(cw.inode));
            pids.extend(cw.probe_owner.as_ref().map(|o| o.0));
        }
        pids.extend(self.table.closed_since(window_start).filter_map(|c| c.pid));
        pids.extend(
            self.tw
                .tracked()
                .filter_map(|(_, t)| t.owner.as_ref().map(|o| o.pid)),
        );
        let procs: HashMap<u32, ProcInfo> = pids
            .into_iter()
            .filter_map(|pid| Some((pid, owners::proc_info(pid)?)))
            .collect();
        let snapshot = Snapshot {
            table: &self.table,
            time: humantime::format_rfc3339_micros(self.clock.wall(now)).to_string(),
            now_ns: now,
            elapsed_s: now.saturating_sub(self.start_ns) as f64 / 1e9,
            is_final,
            states: self.states_now(),
            procs: &procs,
            listening: &listening,
            holders: &self.index,
            timewait: &self.tw,
            kernel: &self.kernel,
            own_netns: self.own_netns,
            loss: Loss {
                events_dropped,
                sockets_untracked: self.untracked() + untracked_extra,
            },
        };
        let mut report = report::build(&snapshot, &self.cfg, &mut self.growth);
        if self.filter.selects_processes() {
            let filter = &self.filter;
            report
                .processes
                .retain(|p| filter.process(p.pid, p.cgroup.as_deref()));
        }
        report.footprint = self.footprint();
        report
    }

    /// The state histogram of the last full dump, with the states that connwatch follows
    /// between dumps (CLOSE_WAIT from events, timewait sockets from polls) taken from
    /// the tables themselves: every number of one report describes the same moment.
    fn states_now(&self) -> BTreeMap<String, u64> {
        let mut states = self.states.clone();
        let mut set = |state: &str, n: u64| {
            if n == 0 {
                states.remove(state);
            } else {
                states.insert(state.to_string(), n);
            }
        };
        set("CLOSE_WAIT", self.table.close_wait_count());
        if self.tw_seeded {
            let (time_wait, fin_wait2) = self.tw.counts();
            set("TIME_WAIT", time_wait);
            set("FIN_WAIT2_TW", fin_wait2);
        }
        states
    }

    fn footprint(&self) -> Footprint {
        let mut entries: BTreeMap<&'static str, u64> = self
            .table
            .sizes()
            .into_iter()
            .chain(self.tw.sizes())
            .collect();
        entries.insert("fd_index", self.index.len() as u64);
        entries.insert("growth_processes", self.growth.len() as u64);
        entries.insert("listeners", self.listeners.len() as u64);
        entries.insert("namespaces", self.namespaces.len() as u64);
        Footprint {
            rss_bytes: owners::own_rss_bytes(),
            entries,
        }
    }
}

/// What one visit to a namespace brought back.
struct Visit {
    ns: u32,
    sockets: Vec<DiagSocket>,
    kernel: Option<KernelInfo>,
}

/// Hands the memory a large dump used back to the kernel: glibc keeps freed heap pages,
/// so RSS would otherwise show the largest dump ever made rather than what is held.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
