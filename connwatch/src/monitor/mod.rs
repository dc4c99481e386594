//! The flow every view shares: seed from sock_diag, apply the probe's transitions, poll
//! timewait sockets, reconcile and resolve owners, build the report. Covers every network
//! namespace on the host (the probe sees them all; dumps are made inside each).
pub mod namespaces;
pub mod snapshot;
pub mod table;
pub mod timewait;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    time::Duration,
};

use std::sync::{Arc, Mutex};

use anyhow::Result;

use self::snapshot::{Footprint, Loss, Snapshot};
use crate::{
    budget::{Budget, thread_cpu_time},
    clock::{WallClock, monotonic_ns},
    decode::{Leaves, TcpState, Transition},
    filter::{Filter, Selection},
    host::owners::{self, FdIndex, ProcInfo},
    host::sockdiag::Query,
    monitor::namespaces::{Listing, Namespaces, Visit},
    monitor::table::{SockKey, Table},
    monitor::timewait::{CountSays, Listed, Synthetic, Tracker, TwOwner},
};

pub struct Monitor {
    table: Table,
    tw: Tracker,
    index: FdIndex,
    /// How much history (closes, TIME_WAIT entries and ends) is kept: the report
    /// window, 0 where no report is built.
    window: Duration,
    namespaces: Namespaces,
    start_ns: u64,
    clock: WallClock,
    states: BTreeMap<String, u64>,
    tw_seeded: bool,
    filter: Filter,
    /// Time spent in sock_diag dumps and /proc scans (the polling cost).
    pub poll_ns: u64,
    /// How many closes/ends `take_lifetimes` already handed out.
    taken: (u64, u64),
    /// End and cost of the last dump that observed timewait sockets.
    tw_budget: Budget,
    /// Full dumps (`refresh`).
    full_budget: Budget,
    /// Sockets listed by the last full dump other than CLOSE_WAIT and timewait ones
    /// (those are followed between dumps), and `population()` right after it.
    listed_other: u64,
    full_population: u64,
    /// The dumps that fetch new CLOSE_WAIT sockets' evidence before a report.
    evidence_budget: Budget,
    /// The last timewait poll of every namespace.
    last_reconcile: Option<std::time::Instant>,
    /// Wall time of the last timewait poll that listed only the namespaces wanting it
    /// (`some`), and of the last that listed them all: what the next like it will take.
    poll_wall: PollWall,
    /// Events lost so far (dropped, unstorable, undecodable): a loss means a timewait
    /// socket may have begun unseen, so the next poll is not skipped.
    loss_seen: u64,
    loss_polled: u64,
    /// The /proc scan started with the monitor, taken over at the first seeding.
    prescan: Option<owners::Prescan>,
    /// The probe's TCP socket iterator, for the seed (used once).
    tcp_sockets: Option<Arc<crate::probe::TcpSockets>>,
    /// Leak sites, where stacks are captured.
    sites: Option<Arc<Mutex<crate::stacks::Book>>>,
}

fn lock_book(b: &Mutex<crate::stacks::Book>) -> std::sync::MutexGuard<'_, crate::stacks::Book> {
    b.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Timewait polls may use at most 1/POLL_BUDGET of a CPU: with very many timewait
/// sockets, polls are spaced out beyond --tw-poll rather than taxing the host (a close
/// waits for its poll up to a minute; with 130,000 TIME_WAITs a poll costs ~200 ms, so
/// births are confirmed within ~10 s).
const POLL_BUDGET: u32 = 50;

/// Full dumps (`refresh`) may use at most 1/REFRESH_BUDGET of a CPU. Each walks the
/// host-wide TCP hash table, TIME_WAIT sockets included even when they are not asked
/// for; between dumps the tables follow events, so a dump every few seconds suffices.
const REFRESH_BUDGET: u32 = 400;

/// A dump's walk of the host-wide hash costs about as much as this many sockets' before
/// it meets any (its buckets: 262,144 on a host with 16 GB or more); what a full dump
/// is expected to cost grows from the last one's by the sockets known to have come
/// since, over this (see `Monitor::refresh`).
const WALK_FIXED_SOCKETS: u64 = 4096;

/// How much more a walk of `now` sockets costs than one of `then` (see
/// `WALK_FIXED_SOCKETS`).
fn walk_growth(then: u64, now: u64) -> f64 {
    (now + WALK_FIXED_SOCKETS) as f64 / (then + WALK_FIXED_SOCKETS) as f64
}

/// The evidence dumps before a report may use at most 1/EVIDENCE_BUDGET of a CPU. Each
/// lists only CLOSE_WAIT sockets, but walks the host-wide hash table to find them: with
/// tens of thousands of TIME_WAITs that costs milliseconds, and under a CPU limit it
/// would delay every report. Sockets still wanting evidence get it at a later report.
const EVIDENCE_BUDGET: u32 = 50;

/// A CLOSE_WAIT socket younger than this at a periodic report has its evidence asked
/// at a later one, if it is still there. A busy server always has a few sockets
/// between the peer's FIN and its own close(), microseconds each: asking for them made
/// a walk of the host's hash at nearly every report (47 ms with 110,000 TIME_WAITs,
/// ~40 % of `watch`'s CPU under the bench's churn), for sockets gone before the next.
/// Far below any sensible `--close-wait-age`, so a socket old enough to raise a flag
/// has its evidence; a younger one can only lack a cause's evidence, never add to it.
const EVIDENCE_MIN_AGE_NS: u64 = 250_000_000;

/// A followed TIME_WAIT this close to its timer may be gone from the kernel already
/// (jiffies round its timer, and its due time is taken just after the kernel armed it):
/// whether it is, a lookup tells.
const SETTLE_NS: u64 = 500_000_000;

/// Timewait sockets of every namespace are listed at least this often: the rare
/// reconciliation that catches what neither events nor timers tell.
const TW_RECONCILE: Duration = Duration::from_secs(60);

/// Wall time of the last timewait polls, by scope (see `Monitor::poll_waits_for_report`).
#[derive(Clone, Copy, Debug, Default)]
struct PollWall {
    some: Duration,
    all: Duration,
}

impl Monitor {
    pub fn new(window: Duration, filter: Filter) -> Self {
        let own_netns = owners::own_netns();
        let mut tw = Tracker::default();
        tw.window_ns = Some(u64::try_from(window.as_nanos()).unwrap_or(u64::MAX));
        Self {
            table: Table::new(own_netns),
            tw,
            // New inodes trigger a /proc rescan at most once a second; the whole index is
            // refreshed every minute to notice fds closed or handed over (both spaced
            // further when a scan is slow: see owners::SCAN_BUDGET).
            index: FdIndex::new(Duration::from_secs(1), Duration::from_secs(60)),
            window,
            namespaces: Namespaces::new(own_netns, crate::probe::Abilities::current().other_netns),
            start_ns: monotonic_ns(),
            clock: WallClock::new(),
            states: BTreeMap::new(),
            tw_seeded: false,
            filter,
            poll_ns: 0,
            taken: (0, 0),
            tw_budget: Budget::new(POLL_BUDGET),
            full_budget: Budget::new(REFRESH_BUDGET),
            listed_other: 0,
            full_population: 0,
            evidence_budget: Budget::new(EVIDENCE_BUDGET),
            last_reconcile: None,
            poll_wall: PollWall::default(),
            loss_seen: 0,
            loss_polled: 0,
            prescan: None,
            tcp_sockets: None,
            sites: None,
        }
    }

    /// Counts CLOSE_WAIT sockets per leak site from `book` in reports, and forgets the
    /// sites of sockets gone from full dumps.
    pub fn use_sites(&mut self, book: Arc<Mutex<crate::stacks::Book>>) {
        self.sites = Some(book);
    }

    /// Starts walking /proc for the fd index now, on a thread of its own, to overlap
    /// what comes before the seed. Only where the probe's socket-fd iterator will not do
    /// it: on two cores the walk would compete with the probe's loading for the CPU.
    pub fn with_prescan(mut self) -> Self {
        self.prescan = Some(owners::Prescan::start());
        self
    }

    /// Bounds the sockets followed in userspace (`--max-sockets`, as in the kernel map).
    pub fn with_limit(mut self, max_sockets: usize) -> Self {
        self.table.set_limit(max_sockets);
        self.tw.limit = max_sockets;
        self
    }

    /// One visit to every namespace (or `only` those) with sock_diag dumps, its cost
    /// counted as polling.
    fn visit(
        &mut self,
        queries: &[Query],
        kernel: bool,
        only: Option<&BTreeSet<u32>>,
    ) -> Result<Vec<Visit>> {
        self.visit_listing(&Listing::Dumps(queries.to_vec()), kernel, only)
    }

    fn visit_listing(
        &mut self,
        listing: &Listing,
        kernel: bool,
        only: Option<&BTreeSet<u32>>,
    ) -> Result<Vec<Visit>> {
        let started = std::time::Instant::now();
        let mut visits = self.namespaces.visit(listing, kernel, only, &self.filter)?;
        self.keep_selected(&mut visits);
        self.poll_ns += started.elapsed().as_nanos() as u64;
        Ok(visits)
    }

    /// With `--pid`/`--cgroup`, keeps only the selected processes' sockets of a dump
    /// (and every listener: they name owners), as the probe keeps only their events:
    /// other processes' sockets are not ours to count, neither in the header nor as
    /// sockets whose transitions were missed. A socket is selected when a selected
    /// process holds its fd; without a known holder (timewait, not yet accepted), when
    /// a selected process holds a listener on its port; and in any case when
    /// connwatch already follows it from that process's own transitions.
    fn keep_selected(&mut self, visits: &mut [Visit]) {
        if !self.filter.selects_processes() {
            return;
        }
        let inodes: Vec<u64> = visits
            .iter()
            .flat_map(|v| v.sockets.iter().map(|s| s.inode))
            .filter(|&i| i != 0)
            .collect();
        if let Some(prescan) = self.prescan.take() {
            self.index.adopt(prescan, inodes.iter().copied());
        }
        self.index.ensure(inodes);
        let index = &self.index;
        let mut selection = Selection::new(&self.filter);
        let mut selected = |inode: u64| selection.any(index.holders(inode));
        let mut ports: BTreeSet<(u32, u16)> = BTreeSet::new();
        for (&(ns, port), inodes) in self.namespaces.listeners() {
            if inodes.iter().any(|&inode| selected(inode)) {
                ports.insert((ns, port));
            }
        }
        for v in visits.iter() {
            for s in v.sockets.iter().filter(|s| s.state == TcpState::LISTEN) {
                if selected(s.inode) {
                    ports.insert((v.ns, s.local.port()));
                }
            }
        }
        for v in visits.iter_mut() {
            let ns = v.ns;
            let (table, tw) = (&self.table, &self.tw);
            v.sockets.retain(|s| {
                let key = SockKey {
                    netns: ns,
                    local: s.local.into(),
                    remote: s.remote.into(),
                };
                // A socket some process holds is that process's: by its holders (with
                // SO_REUSEPORT another process's sockets share the selected one's
                // port). Without a known holder, by the listener on its port.
                let held = s.inode != 0 && !index.holders(s.inode).is_empty();
                s.state == TcpState::LISTEN
                    || (held && selected(s.inode))
                    || (!held && ports.contains(&(ns, s.local.port())))
                    || table.follows(&key)
                    || tw.follows(&key)
            });
        }
    }

    /// The seed lists sockets with the probe's TCP socket iterator instead of sock_diag.
    pub fn use_tcp_sockets(&mut self, iter: crate::probe::TcpSockets) {
        self.tcp_sockets = Some(Arc::new(iter));
    }

    /// The fd index asks `source` (the probe's socket-fd iterator) instead of walking
    /// /proc; the start-up /proc scan, no longer needed, stops.
    pub fn use_socket_fds(&mut self, source: Box<dyn owners::SocketFdSource>) {
        self.prescan = None;
        self.index.use_source(source);
    }

    /// Lists the network namespaces that exist now. One that existed before and is gone
    /// took its sockets with it: its TIME_WAITs end (`early`), its CLOSE_WAIT rows,
    /// listeners, settings and pending closes go.
    pub fn discover_namespaces(&mut self) {
        let now = monotonic_ns();
        let (gone, reborn) = self.namespaces.discover();
        for ns in gone {
            self.tw.forget(ns, now);
            self.table.forget(ns);
        }
        // The old namespace's timewait sockets are gone, and the new one's may already
        // be followed: a poll of every timewait socket there tells them apart.
        for ns in reborn {
            self.tw.recheck(ns);
            self.table.forget(ns);
        }
    }

    /// Sockets that existed before start: CLOSE_WAIT with `tcp_info` for age estimates,
    /// the timewait sockets with their timers, listeners, settings and the state
    /// histogram, from one visit to each namespace (the first full dump).
    pub fn seed(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        // The probe's fd listing runs beside the dumps (the index wants the inodes they
        // find, so it is grouped after).
        if self.prescan.is_none() {
            self.prescan = self.index.prescan();
        }
        self.discover_namespaces();
        log::debug!(
            "seed: {} namespaces in {:?}",
            self.namespaces.len(),
            started.elapsed()
        );
        let now = monotonic_ns();
        let visits = self.seed_visit(now)?;
        log::debug!("seed: dumped at {:?}", started.elapsed());
        self.last_reconcile = Some(started);
        self.absorb_full_dump(visits, now, true)?;
        // The seed is the first full dump: the next waits for its budget (a second
        // dump of a large host right after start would leave its peak resident).
        self.full_budget.spent(started.elapsed());
        log::debug!(
            "seed: timewait and listeners known at {:?}",
            started.elapsed()
        );
        Ok(())
    }

    /// The seed's listing of every namespace, its CLOSE_WAIT sockets in the table: from
    /// the probe's TCP socket iterator, or where there is none (or it fails), a
    /// sock_diag dump with `tcp_info` for the CLOSE_WAIT sockets' ages, asked of every
    /// socket because a second dump per namespace costs more (each walks the host-wide
    /// hash table).
    fn seed_visit(&mut self, now: u64) -> Result<Vec<Visit>> {
        let visits = match self.tcp_sockets.take() {
            // The table fills as the iterator's output is read (~15 ms less for 50,000
            // CLOSE_WAIT sockets), unless `--pid`/`--cgroup` must first tell which
            // sockets are the selected processes' (by their holders, after the listing).
            Some(iter) if !self.filter.selects_processes() => {
                let started = std::time::Instant::now();
                let (table, filter) = (&mut self.table, &self.filter);
                let listed = self
                    .namespaces
                    .visit_streamed(&iter, filter, |ns, sockets| {
                        let kept = sockets
                            .iter()
                            .filter(|s| filter.socket(&s.local, &s.remote));
                        table.seed(ns, kept, now);
                    });
                self.poll_ns += started.elapsed().as_nanos() as u64;
                match listed {
                    Ok(visits) => return Ok(visits),
                    Err(e) => {
                        log::warn!("seeding from sock_diag instead: {e:#}");
                        None
                    }
                }
            }
            Some(iter) => match self.visit_listing(&Listing::Iterator(iter), true, None) {
                Ok(visits) => Some(visits),
                Err(e) => {
                    log::warn!("seeding from sock_diag instead: {e:#}");
                    None
                }
            },
            None => None,
        };
        let visits = match visits {
            Some(visits) => visits,
            None => self.visit(&[Query::all_with_info()], true, None)?,
        };
        for v in &visits {
            self.table.seed(v.ns, v.sockets.iter(), now);
        }
        Ok(visits)
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
        self.index.ensure(self.namespaces.listener_inodes());
        let mut owners = Vec::new();
        for (&(ns, port), inodes) in self.namespaces.listeners() {
            for &pid in inodes.iter().flat_map(|&i| self.index.holders(i)) {
                owners.push((ns, port, pid));
            }
        }
        owners
    }

    pub fn apply(&mut self, t: &Transition) {
        let index = &self.index;
        self.table
            .apply_with(t, |inode| index.holders(inode).first().copied());
        let ns = if t.netns == 0 {
            self.namespaces.own()
        } else {
            t.netns
        };
        self.namespaces.note(ns);
        let key = SockKey {
            netns: ns,
            local: t.local.into(),
            remote: t.remote.into(),
        };
        self.tw.on_transition(key, t);
        if matches!(t.leaves, Leaves::Timewait(_)) {
            self.namespaces.want_listeners(ns);
        }
    }

    /// Polls timewait sockets (and listeners, their likely owners) in every namespace:
    /// confirms TIME_WAIT entries, notices their ends. Returns the inferred transitions
    /// that pass the filter.
    pub fn poll_timewait(&mut self) -> Result<Vec<Synthetic>> {
        if self.namespaces.take_rediscover() {
            self.discover_namespaces();
        }
        self.tw.expire_due(monotonic_ns());
        // The lookups a recheck may need and the poll it may call for are one job,
        // judged against the budget once and charged together.
        let allowed = self.tw_budget.allows();
        let asked = self.recheck_early_ends(monotonic_ns(), allowed)?;
        let mut rows = if let Some(scope) = self.timewait_poll_scope(allowed) {
            let everywhere = scope.is_none();
            let started = std::time::Instant::now();
            let loss = self.loss_seen;
            let polled = match scope {
                None => {
                    let visits = self.visit(&[Self::timewait_query()], false, None)?;
                    visits.into_iter().map(|v| (v, Listed::All)).collect()
                }
                Some(wanting) => self.poll_wanting(&wanting)?,
            };
            let rows = self.observe(polled)?;
            // Charged to the polls' budget; a full dump that observes timewait sockets
            // (the seed) is charged to its own.
            self.tw_budget.spent(asked + started.elapsed());
            if everywhere {
                self.poll_wall.all = started.elapsed();
            } else {
                self.poll_wall.some = started.elapsed();
            }
            self.tw.expire_pending(monotonic_ns());
            self.loss_polled = loss;
            rows
        } else {
            if !asked.is_zero() {
                self.tw_budget.spent(asked);
            }
            // Ends noticed without a poll (a new SYN on the 4-tuple, a namespace gone).
            self.tw.take_queued()
        };
        self.refresh_listeners()?;
        self.select(&mut rows);
        self.prune_history(monotonic_ns());
        Ok(rows)
    }

    /// Forgets the history (closes, births, ends) older than the report window, at
    /// every poll rather than only when a report is built: `trace` builds none, and
    /// keeps none (its window is 0), so its memory follows the sockets that exist.
    fn prune_history(&mut self, now: u64) {
        let window_start = now.saturating_sub(self.window.as_nanos() as u64);
        self.table.prune_closed(window_start);
        self.tw.prune(window_start);
    }

    /// Notices TIME_WAITs that ended early without an event connwatch sees (a new
    /// connection on the same 4-tuple while `watch` does not follow connection starts,
    /// an RST), at the poll after: where the kernel holds fewer timewait sockets
    /// (/proc/PID/net/sockstat) than connwatch follows there, that namespace's timewait
    /// sockets are listed again now (where events are telling early ends there, once
    /// they told fewer than were missing: `Tracker::judge_counts`). A cheap read per
    /// namespace holding followed TIME_WAITs; where others there are at their timers
    /// (another service's churn), a lookup of those tells whether they account for the
    /// difference.
    /// Returns the time the lookups took (only where the budget `allowed` them).
    fn recheck_early_ends(&mut self, now: u64, allowed: bool) -> Result<Duration> {
        if !self.tw_seeded {
            return Ok(Duration::ZERO);
        }
        let namespaces: Vec<u32> = self.tw.followed_per_ns().keys().copied().collect();
        let (mut short, mut wanted, mut asking) = (Vec::new(), BTreeMap::new(), Vec::new());
        let held = self.namespaces.timewait_counts(&namespaces);
        for (ns, says) in self.tw.judge_counts(&held, now, SETTLE_NS) {
            match says {
                CountSays::Nothing => {}
                CountSays::Short => short.push(ns),
                CountSays::Ask { settled, near } if allowed => {
                    wanted.insert(ns, near);
                    asking.push((ns, held.get(&ns).copied().unwrap_or(0), settled));
                }
                CountSays::Ask { .. } => {}
            }
        }
        let mut asked = Duration::ZERO;
        if !wanted.is_empty() {
            let started = std::time::Instant::now();
            let found = self.namespaces.lookup(wanted)?;
            for (ns, held, settled) in asking {
                // Not looked up (the namespace went meanwhile): nothing to conclude.
                let Some(found) = found.get(&ns) else {
                    continue;
                };
                let still = found.iter().filter(|s| s.timewait).count() as u64;
                log::debug!(
                    "netns {ns}: {held} timewait sockets, {settled} far from their timer, {still} of those near it still there"
                );
                if held < settled + still {
                    short.push(ns);
                }
            }
            asked = started.elapsed();
        }
        for ns in short {
            log::debug!("netns {ns}: fewer timewait sockets than followed: listing them");
            self.tw.recheck(ns);
        }
        Ok(asked)
    }

    /// Lists the listeners of the namespaces where a TIME_WAIT was born since they were
    /// last listed (a LISTEN-only dump walks only the listening sockets): a server's
    /// TIME_WAITs are named and flagged through the listener on their port, and a birth
    /// the probe told brings no poll of its namespace that would list them.
    fn refresh_listeners(&mut self) -> Result<()> {
        let wanted = self.namespaces.take_listeners_wanted();
        if wanted.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let query = Query::states(&[TcpState::LISTEN], false);
        for v in &self.visit(&[query], false, Some(&wanted))? {
            self.namespaces.note_listeners(v);
        }
        self.tw_budget.spent(started.elapsed());
        Ok(())
    }

    /// Rows inferred without a poll since the last call (births the probe told, ends
    /// seen in transitions), filtered like the rest.
    pub fn take_inferred(&mut self) -> Vec<Synthetic> {
        let mut rows = self.tw.take_queued();
        self.select(&mut rows);
        rows
    }

    /// Keeps the inferred rows of the processes `--pid`/`--cgroup` select.
    fn select(&self, rows: &mut Vec<Synthetic>) {
        if self.filter.selects_processes() {
            let mut selection = Selection::new(&self.filter);
            rows.retain(|r| r.owner.as_ref().is_some_and(|o| selection.pid(o.pid)));
        }
    }

    /// Every timewait socket, and the listeners that own the unclaimed ones.
    fn timewait_query() -> Query {
        Query::states(
            &[TcpState::TIME_WAIT, TcpState::FIN_WAIT2, TcpState::LISTEN],
            false,
        )
    }

    /// Polls the namespaces that want it, each for what it needs: every timewait socket
    /// where closes wait for confirmation, else only the orphans' FIN_WAIT2 (the
    /// kernel's state filter goes by substate, so TIME_WAIT sockets are not listed) and
    /// those of the followed orphans that left that list, looked up one by one to tell
    /// a FIN_WAIT2 that turned TIME_WAIT from one that ended.
    fn poll_wanting(&mut self, wanting: &BTreeMap<u32, Listed>) -> Result<Vec<(Visit, Listed)>> {
        let with = |listed: Listed| -> BTreeSet<u32> {
            wanting
                .iter()
                .filter(|(_, l)| **l == listed)
                .map(|(ns, _)| *ns)
                .collect()
        };
        let (all, orphans) = (with(Listed::All), with(Listed::FinWait2));
        let mut polled = Vec::new();
        if !all.is_empty() {
            let visits = self.visit(&[Self::timewait_query()], false, Some(&all))?;
            polled.extend(visits.into_iter().map(|v| (v, Listed::All)));
        }
        if orphans.is_empty() {
            return Ok(polled);
        }
        let query = Query::states(&[TcpState::FIN_WAIT2, TcpState::LISTEN], false);
        let mut visits = self.visit(&[query], false, Some(&orphans))?;
        let mut lookups = BTreeMap::new();
        for v in &visits {
            let listed: std::collections::HashSet<(SocketAddr, SocketAddr)> = v
                .sockets
                .iter()
                .filter(|s| s.timewait)
                .map(|s| (s.local, s.remote))
                .collect();
            let mut left = self.tw.orphans(v.ns);
            left.retain(|pair| !listed.contains(pair));
            if !left.is_empty() {
                lookups.insert(v.ns, left);
            }
        }
        if !lookups.is_empty() {
            let started = std::time::Instant::now();
            let mut found = self.namespaces.lookup(lookups)?;
            self.poll_ns += started.elapsed().as_nanos() as u64;
            for v in &mut visits {
                // Only timewait sockets count: a new connection on the same 4-tuple is
                // not the orphan.
                let timewait = found.remove(&v.ns).unwrap_or_default();
                v.sockets
                    .extend(timewait.into_iter().filter(|s| s.timewait));
            }
        }
        polled.extend(visits.into_iter().map(|v| (v, Listed::FinWait2)));
        Ok(polled)
    }

    /// Whether a timewait poll can tell anything events did not, within its CPU budget,
    /// and where: every namespace before seeding or after a loss (a timewait socket may
    /// have begun unseen anywhere), else only those with a close pending or a timer due
    /// (`Some(None)` is every namespace, `None` no poll). Every `TW_RECONCILE` all of
    /// them are polled anyway: what no event shows (an RST in TIME_WAIT, a timer
    /// re-armed) is caught there.
    fn timewait_poll_scope(&mut self, allowed: bool) -> Option<Option<BTreeMap<u32, Listed>>> {
        let everywhere = self.polls_everywhere();
        let wanting = self.tw.wanting_poll();
        if !everywhere && wanting.is_empty() {
            return None;
        }
        if !allowed {
            return None;
        }
        if everywhere {
            self.last_reconcile = Some(std::time::Instant::now());
        }
        Some((!everywhere).then_some(wanting))
    }

    /// Whether the next timewait poll lists every namespace: before the first, after a
    /// loss (a timewait socket may have begun unseen), and every `TW_RECONCILE`.
    fn polls_everywhere(&self) -> bool {
        let reconcile = self
            .last_reconcile
            .is_none_or(|t| t.elapsed() >= TW_RECONCILE);
        !self.tw_seeded || self.loss_seen != self.loss_polled || reconcile
    }

    /// Whether the timewait poll due now should wait until the report due in
    /// `report_in` is out, so as not to hold it up: where the last poll like it took
    /// longer than that. One that lists every namespace costs in proportion to every
    /// timewait socket on the host, and the first after a loss has no like poll to go
    /// by: it also waits where the report is due within a poll `period` (the next poll
    /// tick would come after it anyway). None waits where the budget allows no poll.
    pub fn poll_waits_for_report(&self, report_in: Duration, period: Duration) -> bool {
        let likely = if self.polls_everywhere() {
            self.poll_wall.all.max(period)
        } else {
            self.poll_wall.some
        };
        self.tw_budget.allows() && likely > report_in
    }

    /// Takes a visit's listeners and timewait sockets: confirms closes as TIME_WAIT
    /// births, notices ends, adopts sockets not seen entering.
    fn observe(&mut self, visits: Vec<(Visit, Listed)>) -> Result<Vec<Synthetic>> {
        let now = monotonic_ns();
        let mut rows = Vec::new();
        for (v, _) in &visits {
            self.namespaces.note_listeners(v);
        }
        let seeding = !self.tw_seeded;
        if seeding {
            // Pre-existing TIME_WAITs are attributed to listeners: know their holders,
            // and those of the CLOSE_WAIT sockets just seeded, in one /proc scan.
            let inodes: Vec<u64> = self
                .namespaces
                .listener_inodes()
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
            namespaces,
            ..
        } = self;
        let listeners = namespaces.listeners();
        // Once per listening port, not once per socket: a server can leave tens of
        // thousands of TIME_WAITs on one port.
        let known: std::cell::RefCell<HashMap<(u32, u16), Option<TwOwner>>> = Default::default();
        let listener = |ns: u32, port: u16| -> Option<TwOwner> {
            if let Some(owner) = known.borrow().get(&(ns, port)) {
                return owner.clone();
            }
            let owner = listeners
                .get(&(ns, port))
                .and_then(|inodes| sole_holder(index, inodes))
                .map(|pid| TwOwner {
                    pid,
                    comm: owners::comm(pid).unwrap_or_default().into(),
                });
            known.borrow_mut().insert((ns, port), owner.clone());
            owner
        };
        let polled: Vec<(u32, &[crate::host::sockdiag::DiagSocket], Listed)> = visits
            .iter()
            .map(|(v, listed)| (v.ns, v.sockets.as_slice(), *listed))
            .collect();
        rows.extend(tw.observe_many(&polled, now, seeding, &listener));
        self.tw_seeded = true;
        rows.sort_by_key(|r| r.ts_ns);
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
        // Spaced by what the next dump will cost, not the last: the seed may have
        // walked a quiet host that a churn has since filled with TIME_WAITs (the seed
        // of an empty namespace, then 60,000 TIME_WAITs: a walk ~16 times the seed's).
        let grown = walk_growth(self.full_population, self.population());
        if !self.full_budget.allows_scaled(grown) {
            return Ok(Vec::new());
        }
        let now = monotonic_ns();
        let started = std::time::Instant::now();
        let cpu_before = thread_cpu_time();
        // Every state but TIME_WAIT: those are followed by events, timers and the
        // timewait polls, and on a busy host they are most of what a dump would list.
        let query = Query {
            states: Query::all().states & !(1 << TcpState::TIME_WAIT.0),
            tcp_info: false,
        };
        let visits = self.visit(&[query], true, None)?;
        let rows = self.absorb_full_dump(visits, now, false);
        // CPU on every thread the visit used, or the wall time where that is longer
        // (a thread waiting for a core on a loaded host).
        let cpu =
            thread_cpu_time().saturating_sub(cpu_before) + self.namespaces.other_threads_cpu();
        self.full_budget.spent(started.elapsed().max(cpu));
        rows
    }

    /// The TCP sockets a full dump is known to walk: those the last listed besides
    /// CLOSE_WAIT and timewait ones, and those followed now.
    fn population(&self) -> u64 {
        let (time_wait, fin_wait2) = self.tw.counts();
        self.listed_other + self.table.close_wait_count() + time_wait + fin_wait2
    }

    /// Forgets the sites of sockets that a full dump (begun at `now`) no longer lists;
    /// those captured since it began may simply be too new for it.
    fn prune_sites(&self, visits: &[Visit], now: u64) {
        let Some(book) = &self.sites else { return };
        let mut book = lock_book(book);
        if book.sockets() == 0 {
            return;
        }
        let live: rustc_hash::FxHashSet<u64> = visits
            .iter()
            .flat_map(|v| v.sockets.iter().map(|s| s.inode))
            .filter(|&i| i != 0)
            .collect();
        book.prune(|inode| live.contains(&inode), now);
    }

    /// A full dump of every namespace: the state histogram, the CLOSE_WAIT table
    /// reconciled, settings, listeners; for the seed (whose listing holds TIME_WAIT
    /// sockets) timewait sockets observed, and no reconciliation: the table was just
    /// filled from this same listing.
    fn absorb_full_dump(
        &mut self,
        visits: Vec<Visit>,
        now: u64,
        seed: bool,
    ) -> Result<Vec<Synthetic>> {
        self.states.clear();
        self.prune_sites(&visits, now);
        self.listed_other = visits
            .iter()
            .flat_map(|v| &v.sockets)
            .filter(|s| !s.timewait && s.state != TcpState::CLOSE_WAIT)
            .count() as u64;
        for v in &visits {
            for (state, n) in snapshot::state_counts(&v.sockets) {
                *self.states.entry(state).or_insert(0) += n;
            }
            if !seed {
                self.table.reconcile(v.ns, &v.sockets, now);
            }
            self.table.note_fin_wait2(v.ns, &v.sockets, now);
        }
        let rows = if seed {
            let loss = self.loss_seen;
            let rows = self.observe(visits.into_iter().map(|v| (v, Listed::All)).collect());
            self.loss_polled = loss;
            rows
        } else {
            for v in &visits {
                self.namespaces.note_listeners(v);
            }
            Ok(Vec::new())
        };
        self.full_population = self.population();
        release_freed_memory();
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

    /// Evidence that transitions do not carry, asked of the namespaces holding new
    /// CLOSE_WAIT sockets, CLOSE_WAIT sockets only: the inode of one whose peer closed
    /// before the process accepted it (no file yet), so that its holder is found now
    /// rather than at the next budgeted full dump; unread bytes and the quiet spell
    /// before the peer's FIN (`tcp_info`), the evidence behind a leak's likely cause.
    /// The final report (and `snapshot`) asks for every socket's: no later report.
    fn fill_evidence(&mut self, now: u64, is_final: bool) {
        let entered_by = if is_final {
            u64::MAX
        } else {
            now.saturating_sub(EVIDENCE_MIN_AGE_NS)
        };
        let wanting = self.table.wanting_evidence(entered_by);
        if wanting.is_empty() || !self.evidence_budget.allows() {
            return;
        }
        let started = std::time::Instant::now();
        let query = Query::states(&[TcpState::CLOSE_WAIT], true);
        if let Ok(visits) = self.visit(&[query], false, Some(&wanting)) {
            let now = monotonic_ns();
            for v in visits {
                self.table.fill_evidence(v.ns, &v.sockets, now);
            }
        }
        self.evidence_budget.spent(started.elapsed());
    }

    /// Resolves holders and process facts, and hands `build` a snapshot of it all (a
    /// report is built from it: `report::Reporter`).
    /// `lost`: what the probe and the reader lost, besides what the monitor did.
    pub fn with_snapshot<R>(
        &mut self,
        is_final: bool,
        lost: Loss,
        build: impl FnOnce(&Snapshot) -> R,
    ) -> R {
        let now = monotonic_ns();
        let started = std::time::Instant::now();
        self.fill_evidence(now, is_final);
        self.index.ensure(
            self.table
                .close_wait()
                .map(|(_, cw)| cw.inode)
                .chain(self.table.held_fin_wait2().map(|(_, inode, _)| inode))
                .chain(self.namespaces.listener_inodes()),
        );
        self.poll_ns += started.elapsed().as_nanos() as u64;
        let window_start = now.saturating_sub(self.window.as_nanos() as u64);
        self.prune_history(now);
        let listening: snapshot::Listening = self
            .namespaces
            .listeners()
            .iter()
            .map(|(k, inodes)| {
                let mut pids: Vec<u32> = inodes
                    .iter()
                    .flat_map(|&i| self.index.holders(i).iter().copied())
                    .collect();
                pids.sort_unstable();
                pids.dedup();
                (*k, pids)
            })
            .collect();

        // Fx: one insert per followed socket, tens of thousands on a busy host.
        let mut pids: rustc_hash::FxHashSet<u32> = rustc_hash::FxHashSet::default();
        for (key, cw) in self.table.close_wait() {
            pids.extend(self.index.holders(cw.inode));
            pids.extend(self.table.probe_owner(key).map(|o| o.pid));
        }
        pids.extend(self.table.closed_since(window_start).filter_map(|c| c.pid));
        for (_, inode, _) in self.table.held_fin_wait2() {
            pids.extend(self.index.holders(inode));
        }
        // Tens of thousands of TIME_WAITs, mostly of a few owners: one insert per run.
        let mut last = None;
        pids.extend(
            self.tw
                .tracked()
                .filter_map(|(_, t)| t.owner.as_ref().map(|o| o.pid))
                .filter(|&pid| last.replace(pid) != Some(pid)),
        );
        let procs: HashMap<u32, ProcInfo> = pids
            .into_iter()
            .filter_map(|pid| Some((pid, owners::proc_info(pid)?)))
            .collect();
        let sites = self.sites.as_ref().map(|b| lock_book(b));
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
            kernel: self.namespaces.kernel(),
            own_netns: self.namespaces.own(),
            loss: Loss {
                sockets_untracked: self.untracked() + lost.sockets_untracked,
                ..lost
            },
            filter: &self.filter,
            footprint: self.footprint(sites.as_deref()),
            sites: sites.as_deref(),
        };
        build(&snapshot)
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
        set("CLOSE_WAIT", self.close_wait_selected());
        if self.tw_seeded {
            let (time_wait, fin_wait2) = self.tw.counts();
            set("TIME_WAIT", time_wait);
            set("FIN_WAIT2_TW", fin_wait2);
        }
        states
    }

    /// CLOSE_WAIT sockets followed, less (with `--pid`/`--cgroup`) those held only by
    /// processes not selected: the kernel's filter cannot tell which SO_REUSEPORT
    /// sibling an accepted socket went to, so a sibling's sockets may be followed too.
    fn close_wait_selected(&self) -> u64 {
        if !self.filter.selects_processes() {
            return self.table.close_wait_count();
        }
        let mut selection = Selection::new(&self.filter);
        self.table
            .close_wait()
            .filter(|(_, cw)| {
                let holders = self.index.holders(cw.inode);
                holders.is_empty() || selection.any(holders)
            })
            .count() as u64
    }

    fn footprint(&self, sites: Option<&crate::stacks::Book>) -> Footprint {
        let mut entries: BTreeMap<&'static str, u64> = self
            .table
            .sizes()
            .into_iter()
            .chain(self.tw.sizes())
            .collect();
        entries.insert("fd_index", self.index.len() as u64);
        entries.insert(
            "listeners",
            self.namespaces.listener_inodes().count() as u64,
        );
        entries.insert("namespaces", self.namespaces.len() as u64);
        entries.insert("container_names", crate::host::runtime::known_len() as u64);
        if let Some(b) = sites {
            entries.insert("stack_sites", b.sites() as u64);
            entries.insert("stack_sockets", b.sockets() as u64);
            // Sockets whose sites were pushed out by the bound (not pruned as gone).
            entries.insert("stack_sockets_evicted", b.evicted);
        }
        Footprint {
            rss_bytes: owners::own_rss_bytes(),
            entries,
        }
    }
}

/// The process a timewait socket found by a poll on a listening port is most likely
/// owned by: the listeners' holder when they are all held by one process (the first
/// holder, as for a listener shared after fork), none when several processes listen on
/// the port with SO_REUSEPORT (which of them closed it is not known: no guess).
fn sole_holder(index: &FdIndex, inodes: &[u64]) -> Option<u32> {
    let first = *index.holders(*inodes.first()?).first()?;
    let others = inodes
        .iter()
        .skip(1)
        .filter_map(|&i| index.holders(i).first());
    others.into_iter().all(|&p| p == first).then_some(first)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_dump_is_expected_to_cost_what_it_walks() {
        // The seed of an empty namespace, then a churn's 60,000 TIME_WAITs: the next
        // dump walks ~16 times what the seed did.
        let g = walk_growth(0, 60_000);
        assert!((15.0..16.0).contains(&g), "{g}");
        // A few sockets more or less change nothing worth a delay.
        assert!((walk_growth(100, 150) - 1.0).abs() < 0.02);
        // A host emptied since costs less, and may be walked sooner.
        assert!(walk_growth(100_000, 1_000) < 0.1);
        // Deferred by the budget accordingly: a 1 ms seed allows a dump ~0.4 s later
        // at the same size, not at 16 times it.
        let mut m = Monitor::new(Duration::from_secs(60), Filter::default());
        m.full_budget.spent(MS);
        std::thread::sleep(500 * MS);
        assert!(m.full_budget.allows_scaled(walk_growth(0, 0)));
        assert!(!m.full_budget.allows_scaled(walk_growth(0, 60_000)));
    }

    #[test]
    fn a_poll_waits_for_a_report_it_would_hold_up() {
        let mut m = Monitor::new(Duration::from_secs(60), Filter::default());
        let period = 1000 * MS;
        // Before the first poll every namespace is listed: it waits for a report due
        // within a poll period, not for one due later.
        assert!(m.poll_waits_for_report(900 * MS, period));
        assert!(!m.poll_waits_for_report(1100 * MS, period));
        // The last such poll took 3 s: a report due within 3 s goes first.
        m.poll_wall.all = 3000 * MS;
        assert!(m.poll_waits_for_report(2900 * MS, period));
        assert!(!m.poll_waits_for_report(3100 * MS, period));
        // A poll of the namespaces wanting it goes by its own last cost.
        m.tw_seeded = true;
        m.last_reconcile = Some(std::time::Instant::now());
        m.poll_wall.some = 5 * MS;
        assert!(!m.poll_waits_for_report(10 * MS, period));
        assert!(m.poll_waits_for_report(4 * MS, period));
        // A loss makes the next poll list every namespace again.
        m.note_loss(1);
        assert!(m.poll_waits_for_report(2900 * MS, period));
        // Where the budget allows no poll now, there is nothing to defer.
        m.tw_budget.spent(Duration::from_secs(1));
        assert!(!m.poll_waits_for_report(10 * MS, period));
    }
}
