//! TIME_WAIT from birth to end.
//!
//! The tracepoint never reports TIME_WAIT: on FIN_WAIT2->CLOSE (or CLOSING->CLOSE) the
//! full socket is replaced by a small timewait socket that fires no event when it dies.
//! So entry is the ->CLOSE transition. Where the kernel's BTF names `sk_err` and
//! `sk_flags`, the probe tells on that transition whether a timewait socket took the
//! socket's place and in which substate (`Leaves`): the birth needs no poll. Elsewhere
//! it is *confirmed* by a poll that lists a timewait socket with the same namespace and
//! 4-tuple (an RST or a full timewait table closes without one).
//!
//! Exit is timed by the kernel's own timer (`TCP_TIMEWAIT_LEN`, or the remaining time a
//! poll reports), so the lifetime is exact without polling; a new connection on the
//! 4-tuple is an event, and ends it `early`. Polls remain only for what no event shows:
//! an orphan's FIN_WAIT2 turning TIME_WAIT on the peer's FIN (a poll that lists only
//! FIN_WAIT2 timewait sockets, and looks up the ones that left the list), and a
//! reconciliation of every namespace once a minute (an RST in TIME_WAIT, an overflow).
//!
//! The owner is carried from the close() that started it (ESTABLISHED->FIN_WAIT1 runs in
//! the closing process); a TIME_WAIT that pre-dates connwatch is attributed to the
//! process listening on its local port, if any.
//!
//! Pure logic: polls and transitions come in with their timestamps.
use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap as HashMap;

use crate::{
    decode::{Leaves, OwnerSource, TcpState, Transition},
    host::sockdiag::DiagSocket,
    monitor::table::{AgeSource, Overflow, SockKey},
};

/// `TCP_TIMEWAIT_LEN`: fixed at compile time in every kernel.
pub const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;

/// A timewait socket that vanished this much before its timer was due ended early.
const EARLY_MARGIN_NS: u64 = 100_000_000;

/// A TIME_WAIT is ended by its timer this long after it is due (the kernel's timer
/// wheel may fire a little late; ending it sooner would count it `early` at a poll).
const EXPIRY_GRACE_NS: u64 = 1_000_000_000;

/// How late the kernel may end a timewait socket after its timer is due: a 60 s timer
/// sits in a level of the timer wheel that fires up to its granularity late (512
/// jiffies at HZ 100 or 250, 4096 at HZ 1000: 5.1, 2.0 and 4.1 s).
const LINGER_NS: u64 = 6_000_000_000;

/// Most sockets near or past their timer that `judge_counts` asks the kernel about in a
/// namespace; where there are more, the count is left to the next poll there.
pub const NEAR_TIMER_CAP: usize = 1024;

/// How long a close waits for a poll of its namespace to confirm its timewait socket.
/// Namespaces are polled every round (and a new one is found as soon as a transition
/// names it), so this is only reached when polls could not run: by then its TIME_WAIT
/// would have ended anyway.
const PENDING_TTL_NS: u64 = TIMEWAIT_LEN_NS;

/// Lifetimes of ended TIME_WAIT sockets kept at most.
const MAX_ENDED: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The kernel's timer ran out.
    Expired,
    /// Gone before its timer: port reuse, RST, a new SYN, tw bucket overflow.
    Early,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Early => "early",
        }
    }
}

/// What a poll of a namespace listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Listed {
    /// Only orphans' FIN_WAIT2 timewait sockets, plus those of the followed ones that
    /// left the list, looked up one by one: what a poll is for once births come from
    /// events (a dump of every TIME_WAIT socket costs in proportion to them all).
    FinWait2,
    /// Every timewait socket: to confirm closes the probe could not classify, and to
    /// reconcile.
    All,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwOwner {
    pub pid: u32,
    /// Shared: thousands of TIME_WAITs of one server carry the same name.
    pub comm: std::sync::Arc<str>,
}

/// The owners of the last few closes, for the next: a busy host's TIME_WAITs come from
/// a few processes, so their names are shared rather than allocated (and freed) once
/// per TIME_WAIT.
#[derive(Default)]
struct RecentOwners {
    owners: VecDeque<TwOwner>,
}

impl RecentOwners {
    /// As many as a linear search is cheaper than a hash.
    const KEPT: usize = 8;

    fn owner(&mut self, pid: u32, comm: &str) -> TwOwner {
        if let Some(o) = self
            .owners
            .iter()
            .find(|o| o.pid == pid && *o.comm == *comm)
        {
            return o.clone();
        }
        let o = TwOwner {
            pid,
            comm: comm.into(),
        };
        if self.owners.len() == Self::KEPT {
            self.owners.pop_back();
        }
        self.owners.push_front(o.clone());
        o
    }
}

/// A timewait socket being followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeWait {
    /// TIME_WAIT, or FIN_WAIT2 for an orphan still waiting for the peer's FIN.
    pub substate: TcpState,
    /// When it entered `substate`.
    pub entered_ns: u64,
    pub age_source: AgeSource,
    pub owner: Option<TwOwner>,
    pub owner_source: OwnerSource,
    /// When its timer is due (from the last poll that listed it).
    pub due_ns: u64,
    /// The poll that last listed it (mark and sweep, no per-poll key set).
    seen: u64,
    /// Found by a poll without its ->CLOSE transition: the transition may still be on
    /// its way (the kernel hashes the timewait socket before it emits the event), so it
    /// is counted as untracked only if a later poll still finds it unclaimed.
    provisional: bool,
}

/// A row for `trace`: a change connwatch inferred rather than saw (`"synthetic": true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synthetic {
    pub key: SockKey,
    pub ts_ns: u64,
    pub old: TcpState,
    pub new: TcpState,
    pub duration_ns: Option<u64>,
    pub owner: Option<TwOwner>,
    pub owner_source: OwnerSource,
    pub end: Option<End>,
}

/// A TIME_WAIT that ended (for lifetime statistics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub key: SockKey,
    pub at_ns: u64,
    pub lifetime_ns: u64,
    pub end: End,
    pub pid: Option<u32>,
}

/// What a namespace's count of timewait sockets says (`Tracker::judge_counts`).
#[derive(Debug, PartialEq, Eq)]
pub enum CountSays {
    /// Nothing connwatch follows is missing (or the count cannot tell).
    Nothing,
    /// Fewer than must exist: one ended early unseen.
    Short,
    /// Fewer than may exist: those near or past their timer (`near`) must be looked up;
    /// one ended early unseen if `held < settled + (those still there)`.
    Ask {
        settled: u64,
        near: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    },
}

/// A ->CLOSE from FIN_WAIT2/CLOSING waiting for a poll to confirm its timewait socket.
#[derive(Clone, Debug)]
struct Pending {
    ts_ns: u64,
    from: TcpState,
    from_duration_ns: Option<u64>,
    owner: Option<TwOwner>,
}

/// A namespace's shortfall (fewer timewait sockets in the kernel than followed far
/// from their timer), weighed against the early ends events told. A port reused by a
/// new connection ends its timewait socket at connect(), and `watch` is told only at
/// that connection's close: between the two, the count is short though nothing was
/// missed. Under a churn that reuses ports, that is true at nearly every poll, and
/// listing every timewait socket to find the few in flight (~0.25 s for 100,000 of
/// them) would be the poll's whole cost. So a shortfall is left to the events for one
/// poll where events are telling early ends; it is listed when the events since told
/// fewer ends than were missing (one that no event will tell: an RST in TIME_WAIT, or a
/// reused 4-tuple whose new connection lives on), or at once where none were told.
#[derive(Clone, Copy, Debug, Default)]
struct Shortfall {
    /// Early ends that events told here since the last judgement.
    told: u64,
    /// The shortfall left to the events at the last judgement.
    left: Option<u64>,
}

#[derive(Default)]
pub struct Tracker {
    pending: HashMap<SockKey, Pending>,
    /// Rows produced between polls (early ends seen in transitions), returned by the
    /// next `observe`.
    queued: Vec<Synthetic>,
    tracked: HashMap<SockKey, TimeWait>,
    ended: VecDeque<Ended>,
    /// Entry times of TIME_WAITs that began while connwatch watched (for rates).
    created: VecDeque<(u64, Option<u32>)>,
    /// Timewait sockets found by a poll whose start connwatch did not see.
    untracked: u64,
    /// Timewait sockets left out because `limit` was reached, each counted once.
    over_limit: Overflow,
    /// ->CLOSE transitions from FIN_WAIT2/CLOSING that left no timewait socket.
    pub closed_without_timewait: u64,
    /// Observed TIME_WAIT ends recorded so far (for consumers that take new ones).
    pub ended_total: u64,
    /// Number of the current poll.
    poll: u64,
    /// Most timewait sockets (and pending closes) followed at once; 0 for no limit.
    pub limit: usize,
    /// `wanting_poll`'s answer, kept until the tracker changes: an idle host with tens
    /// of thousands of TIME_WAITs is not rescanned every tick.
    wanting: Option<std::collections::BTreeMap<u32, Listed>>,
    /// No TIME_WAIT is due before this (0: unknown, scan).
    next_expiry_ns: u64,
    /// Namespaces to poll for every timewait socket (their inode number was reused, or
    /// the kernel holds fewer than are followed there).
    recheck: std::collections::BTreeSet<u32>,
    /// Followed timewait sockets per namespace (kept with `tracked`).
    per_ns: HashMap<u32, u64>,
    /// TIME_WAITs `expire_due` ended that the kernel may still hold for `LINGER_NS`
    /// (key, due): a count of a namespace's timewait sockets includes them. At most
    /// `NEAR_TIMER_CAP`; those let go make the list incomplete until `lingering_gap`.
    lingering: VecDeque<(SockKey, u64)>,
    lingering_gap: u64,
    /// Per namespace, what `judge_counts` weighs a shortfall against (`Shortfall`).
    shortfalls: HashMap<u32, Shortfall>,
    /// How much history (`created`, `ended`) is kept: older entries go as new ones
    /// come, so memory is bounded even where no report prunes (`trace`: 0). `None`:
    /// until `prune`.
    pub window_ns: Option<u64>,
    owners: RecentOwners,
}

impl Tracker {
    /// Notes a transition; FIN_WAIT2/CLOSING -> CLOSE may have left a timewait socket,
    /// and a new connection on the 4-tuple of a followed one means it ended early (a SYN
    /// to a server's TIME_WAIT, or the port reused): that end is reported at once.
    pub fn on_transition(&mut self, key: SockKey, t: &Transition) {
        self.changed();
        // connect() enters SYN_SENT before it picks the local port: a key with port 0
        // is no followed 4-tuple (and its lookup, a cache miss, is skipped).
        if t.starts_a_life() && key.local.port() != 0 && self.tracked.contains_key(&key) {
            self.end_told(key, t.ts_ns);
        }
        if !t.may_leave_timewait() {
            return;
        }
        let comm = t.owner.comm.as_deref().unwrap_or_default();
        let owner = t.owner.pid.map(|pid| self.owners.owner(pid, comm));
        // One lookup for both cases below: on a busy host the table holds 100,000s of
        // sockets, and each lookup of a new key is a cache miss (`perf`: the largest
        // part of `watch`'s time under churn).
        let followed = self.tracked.get_mut(&key);
        let followed_already = followed.is_some();
        if let Some(tw) = followed.filter(|tw| tw.provisional) {
            // A poll found this timewait socket just before its transition arrived.
            tw.provisional = false;
            tw.entered_ns = t.ts_ns;
            tw.age_source = AgeSource::Observed;
            tw.owner_source = if owner.is_some() {
                OwnerSource::Carried
            } else {
                OwnerSource::Unknown
            };
            tw.owner = owner;
            if tw.substate == TcpState::TIME_WAIT {
                let pid = tw.owner.as_ref().map(|o| o.pid);
                note_created(&mut self.created, self.window_ns, t.ts_ns, pid);
                self.queued.push(Synthetic {
                    key,
                    ts_ns: t.ts_ns,
                    old: t.old,
                    new: TcpState::TIME_WAIT,
                    duration_ns: t.duration_ns(),
                    owner: tw.owner.clone(),
                    owner_source: tw.owner_source,
                    end: None,
                });
            }
            return;
        }
        // Another close on a followed 4-tuple: a new connection took the old timewait
        // socket's place (unseen where connection starts are not followed), so the old
        // one ended early, before this close; it is not overwritten.
        if followed_already {
            self.end_told(key, t.ts_ns);
        }
        match t.leaves {
            Leaves::Nothing => {
                self.closed_without_timewait += 1;
                return;
            }
            Leaves::Timewait(substate) => {
                self.born(key, t, substate, owner);
                return;
            }
            Leaves::Unknown => {}
        }
        if self.limit != 0 && self.pending.len() >= self.limit {
            self.untracked += 1;
            return;
        }
        self.pending.insert(
            key,
            Pending {
                ts_ns: t.ts_ns,
                from: t.old,
                from_duration_ns: t.duration_ns(),
                owner,
            },
        );
    }

    /// A close the probe classified: its timewait socket exists from `t.ts_ns`, with
    /// its timer due `TCP_TIMEWAIT_LEN` later (an orphan's FIN_WAIT2 waits as long by
    /// default; a poll corrects it).
    fn born(&mut self, key: SockKey, t: &Transition, substate: TcpState, owner: Option<TwOwner>) {
        if self.limit != 0 && self.tracked.len() >= self.limit {
            // Counted once, as when a poll finds it over the limit: polls that list it
            // later do not count it again.
            self.over_limit.note(key, self.poll);
            return;
        }
        let p = Pending {
            ts_ns: t.ts_ns,
            from: t.old,
            from_duration_ns: t.duration_ns(),
            owner,
        };
        let mut rows = Vec::new();
        self.confirm(key, p, substate, t.ts_ns + TIMEWAIT_LEN_NS, &mut rows);
        self.queued.append(&mut rows);
    }

    /// Applies one poll of a namespace's timewait sockets (`timewait == true` entries of
    /// a dump) taken at `now_ns`. `seeding` marks the first poll, whose sockets pre-date
    /// connwatch. `listener` names the process listening on a local port, if any.
    pub fn observe(
        &mut self,
        netns: u32,
        sockets: &[DiagSocket],
        listed: Listed,
        now_ns: u64,
        seeding: bool,
        listener: &dyn Fn(u16) -> Option<TwOwner>,
    ) -> Vec<Synthetic> {
        self.observe_many(&[(netns, sockets, listed)], now_ns, seeding, &|_, port| {
            listener(port)
        })
    }

    /// `observe` for one poll of several namespaces: (namespace, its sockets, what was
    /// listed). `listener` names the process listening on a namespace's local port. The
    /// followed sockets and pending closes are gone through once for them all, not once
    /// per namespace: on a node with a hundred pods that is the difference between a
    /// pass and a hundred over every timewait socket of the host.
    pub fn observe_many(
        &mut self,
        polled: &[(u32, &[DiagSocket], Listed)],
        now_ns: u64,
        seeding: bool,
        listener: &dyn Fn(u32, u16) -> Option<TwOwner>,
    ) -> Vec<Synthetic> {
        self.changed();
        let mut rows = Vec::new();
        self.poll += 1;
        for &(netns, sockets, _) in polled {
            for s in sockets.iter().filter(|s| s.timewait) {
                let key = SockKey {
                    netns,
                    local: s.local.into(),
                    remote: s.remote.into(),
                };
                let due = now_ns + u64::from(s.expires_ms) * 1_000_000;
                if self.tracked.contains_key(&key) {
                    self.seen_again(key, s, due, now_ns, &mut rows);
                } else if let Some(p) = self.pending.remove(&key) {
                    self.confirm(key, p, s.state, due, &mut rows);
                } else if s.expires_ms == 0 && self.lingers(&key) {
                    // Ended at its timer already; the timer wheel has yet to run it.
                } else {
                    self.adopt(key, s, due, now_ns, !seeding, &|port| listener(netns, port));
                }
            }
        }
        let listed: HashMap<u32, Listed> = polled.iter().map(|&(ns, _, l)| (ns, l)).collect();
        self.end_missing(&listed, now_ns);
        rows.append(&mut self.queued);
        let all: Vec<u32> = polled
            .iter()
            .filter(|p| p.2 == Listed::All)
            .map(|p| p.0)
            .collect();
        for &netns in &all {
            self.recheck.remove(&netns);
            self.over_limit.sweep(netns, self.poll);
        }
        if !all.is_empty() {
            // Pending closes of the namespaces listed whole that the poll did not
            // confirm left no timewait socket (reset, or the kernel's timewait table was
            // full). Those of other namespaces wait for their own namespace's poll.
            let before = self.pending.len();
            self.pending.retain(|k, _| !all.contains(&k.netns));
            self.closed_without_timewait += (before - self.pending.len()) as u64;
        }
        rows.sort_by_key(|r| r.ts_ns);
        rows
    }

    /// A followed timewait socket listed again: still there; an orphan's FIN_WAIT2 may
    /// have become TIME_WAIT, and a retransmitted FIN may have re-armed its timer.
    fn seen_again(
        &mut self,
        key: SockKey,
        s: &DiagSocket,
        due: u64,
        now_ns: u64,
        rows: &mut Vec<Synthetic>,
    ) {
        let poll = self.poll;
        let Some(tw) = self.tracked.get_mut(&key) else {
            return;
        };
        tw.seen = poll;
        if std::mem::take(&mut tw.provisional) {
            // A full poll later, still no transition: it was missed.
            self.untracked += 1;
        }
        if tw.substate == TcpState::FIN_WAIT2 && s.state == TcpState::TIME_WAIT {
            // The orphan got the peer's FIN: TIME_WAIT with a fresh 60 s timer.
            let entered = due.saturating_sub(TIMEWAIT_LEN_NS).min(now_ns);
            rows.push(Synthetic {
                key,
                ts_ns: entered,
                old: TcpState::FIN_WAIT2,
                new: TcpState::TIME_WAIT,
                duration_ns: Some(entered.saturating_sub(tw.entered_ns)),
                owner: tw.owner.clone(),
                owner_source: tw.owner_source,
                end: None,
            });
            tw.substate = TcpState::TIME_WAIT;
            tw.entered_ns = entered;
            let pid = tw.owner.as_ref().map(|o| o.pid);
            note_created(&mut self.created, self.window_ns, entered, pid);
        }
        // Past its due time the kernel reports 0 ms left until the timer wheel gets to
        // it: keep the due time. A later one means the timer was re-armed (a
        // retransmitted FIN restarts TIME_WAIT).
        if s.expires_ms > 0 {
            tw.due_ns = due;
        }
    }

    /// A close seen by the probe, confirmed by the poll: a TIME_WAIT birth (or an
    /// orphan's FIN_WAIT2), owned by whoever closed.
    fn confirm(
        &mut self,
        key: SockKey,
        p: Pending,
        state: TcpState,
        due: u64,
        rows: &mut Vec<Synthetic>,
    ) {
        let owner_source = if p.owner.is_some() {
            OwnerSource::Carried
        } else {
            OwnerSource::Unknown
        };
        if state == TcpState::TIME_WAIT {
            rows.push(Synthetic {
                key,
                ts_ns: p.ts_ns,
                old: p.from,
                new: TcpState::TIME_WAIT,
                duration_ns: p.from_duration_ns,
                owner: p.owner.clone(),
                owner_source,
                end: None,
            });
            let pid = p.owner.as_ref().map(|o| o.pid);
            note_created(&mut self.created, self.window_ns, p.ts_ns, pid);
        }
        self.track(
            key,
            TimeWait {
                substate: state,
                entered_ns: p.ts_ns,
                age_source: AgeSource::Observed,
                owner: p.owner,
                owner_source,
                due_ns: due,
                seen: self.poll,
                provisional: false,
            },
        );
    }

    /// A timewait socket not seen entering: from before start, a transition that was
    /// lost, or one still on its way (then `on_transition` claims it: `provisional`).
    /// Its owner is the listener of its local port, if any.
    fn adopt(
        &mut self,
        key: SockKey,
        s: &DiagSocket,
        due: u64,
        now_ns: u64,
        provisional: bool,
        listener: &dyn Fn(u16) -> Option<TwOwner>,
    ) {
        if self.limit != 0 && self.tracked.len() >= self.limit {
            self.over_limit.note(key, self.poll);
            return;
        }
        // Left out over the limit before, and counted then: not again.
        let provisional = provisional && !self.over_limit.take(&key);
        let owner = listener(s.local.port());
        let owner_source = if owner.is_some() {
            OwnerSource::Listener
        } else {
            OwnerSource::Unknown
        };
        let entered_ns = if s.state == TcpState::TIME_WAIT {
            due.saturating_sub(TIMEWAIT_LEN_NS).min(now_ns)
        } else {
            now_ns
        };
        self.track(
            key,
            TimeWait {
                substate: s.state,
                entered_ns,
                age_source: AgeSource::Estimated,
                owner,
                owner_source,
                due_ns: due,
                seen: self.poll,
                provisional,
            },
        );
    }

    /// Ends the followed sockets of the namespaces polled (`listed`: what each poll
    /// listed) that this poll no longer lists, of those it lists: `expired` at their
    /// timer when it is due, `early` otherwise.
    fn end_missing(&mut self, listed: &HashMap<u32, Listed>, now_ns: u64) {
        let poll = self.poll;
        // A FIN_WAIT2-only poll lists (or looked up) the orphans, not the rest.
        let listed_here = |k: &SockKey, tw: &TimeWait| match listed.get(&k.netns) {
            Some(Listed::All) => true,
            Some(Listed::FinWait2) => tw.substate == TcpState::FIN_WAIT2,
            None => false,
        };
        let mut gone: Vec<SockKey> = self
            .tracked
            .iter()
            .filter(|(k, tw)| tw.seen != poll && listed_here(k, tw))
            .map(|(k, _)| *k)
            .collect();
        gone.sort();
        for key in gone {
            let due = self.tracked.get(&key).map_or(0, |tw| tw.due_ns);
            if now_ns + EARLY_MARGIN_NS >= due {
                // Timed by the kernel's timer, not by when the poll noticed.
                self.end(key, End::Expired, due);
            } else {
                self.end(key, End::Early, now_ns);
            }
        }
    }

    /// Gives up on closes whose namespace was not polled within `PENDING_TTL_NS`: their
    /// state is lost (counted as untracked), and memory stays bounded.
    pub fn expire_pending(&mut self, now_ns: u64) {
        self.changed();
        let before = self.pending.len();
        self.pending
            .retain(|_, p| now_ns.saturating_sub(p.ts_ns) < PENDING_TTL_NS);
        self.untracked += (before - self.pending.len()) as u64;
    }

    /// `netns` now names another namespace: the next poll there lists every timewait
    /// socket, ending the old namespace's (`early`) and keeping the new one's.
    pub fn recheck(&mut self, netns: u32) {
        self.changed();
        self.recheck.insert(netns);
    }

    /// A namespace that no longer exists: the kernel purged its timewait sockets with
    /// it, so each followed one ends `early` now, and its pending closes are dropped.
    pub fn forget(&mut self, netns: u32, now_ns: u64) {
        self.changed();
        let mut gone: Vec<SockKey> = self
            .tracked
            .keys()
            .filter(|k| k.netns == netns)
            .copied()
            .collect();
        gone.sort();
        for key in gone {
            self.end(key, End::Early, now_ns);
        }
        self.pending.retain(|k, _| k.netns != netns);
        self.over_limit.forget(netns);
        self.recheck.remove(&netns);
        self.shortfalls.remove(&netns);
    }

    /// Timewait sockets that exist as far as the last polls know: (TIME_WAIT, orphaned
    /// FIN_WAIT2). Those over the limit have no substate kept: counted as TIME_WAIT.
    pub fn counts(&self) -> (u64, u64) {
        let fin_wait2 = self
            .tracked
            .values()
            .filter(|t| t.substate == TcpState::FIN_WAIT2)
            .count();
        let time_wait = self.tracked.len() - fin_wait2 + self.over_limit.len();
        (time_wait as u64, fin_wait2 as u64)
    }

    /// Sockets whose state was lost: found without their start, given up on, or left
    /// out over the limit (each once).
    pub fn untracked(&self) -> u64 {
        self.untracked + self.over_limit.counted
    }

    /// Rows queued since the last poll (ends noticed from transitions or `forget`).
    pub fn take_queued(&mut self) -> Vec<Synthetic> {
        std::mem::take(&mut self.queued)
    }

    /// Ends a followed socket early, as an event told (a new connection on its 4-tuple).
    fn end_told(&mut self, key: SockKey, at_ns: u64) {
        self.shortfalls.entry(key.netns).or_default().told += 1;
        self.end(key, End::Early, at_ns);
    }

    /// Ends a followed socket at `at_ns`, queueing its row.
    fn end(&mut self, key: SockKey, end: End, at_ns: u64) {
        let Some(tw) = self.tracked.remove(&key) else {
            return;
        };
        if let Some(n) = self.per_ns.get_mut(&key.netns) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ns.remove(&key.netns);
            }
        }
        let at = at_ns.max(tw.entered_ns);
        let lifetime = at - tw.entered_ns;
        self.queued.push(Synthetic {
            key,
            ts_ns: at,
            old: tw.substate,
            new: TcpState::CLOSE,
            duration_ns: (tw.age_source == AgeSource::Observed).then_some(lifetime),
            owner: tw.owner.clone(),
            owner_source: tw.owner_source,
            end: Some(end),
        });
        if tw.substate == TcpState::TIME_WAIT && tw.age_source == AgeSource::Observed {
            self.ended_total += 1;
            let before = at.saturating_sub(self.window_ns.unwrap_or(u64::MAX));
            while self.ended.len() >= MAX_ENDED
                || self.ended.front().is_some_and(|e| e.at_ns < before)
            {
                self.ended.pop_front();
            }
            self.ended.push_back(Ended {
                key,
                at_ns: at,
                lifetime_ns: lifetime,
                end,
                pid: tw.owner.as_ref().map(|o| o.pid),
            });
        }
    }

    /// Lifetimes (seconds) of the newest `n` ends still kept.
    pub fn newest_ended(&self, n: u64) -> impl Iterator<Item = f64> + '_ {
        let skip = self.ended.len().saturating_sub(n as usize);
        self.ended
            .iter()
            .skip(skip)
            .map(|e| e.lifetime_ns as f64 / 1e9)
    }

    /// Ends the TIME_WAITs whose timer is due (`expired`, at the timer), without a poll:
    /// the kernel's timer ends them, and `TCP_TIMEWAIT_LEN` is fixed. What a timer
    /// re-armed by a retransmitted FIN, or an RST, changes is caught by the rare
    /// reconciliation that polls every namespace.
    pub fn expire_due(&mut self, now_ns: u64) {
        if self.next_expiry_ns != 0 && now_ns < self.next_expiry_ns {
            return;
        }
        let expires = |t: &TimeWait| {
            (t.substate == TcpState::TIME_WAIT && !t.provisional)
                .then_some(t.due_ns + EXPIRY_GRACE_NS)
        };
        let due: Vec<(SockKey, u64)> = self
            .tracked
            .iter()
            .filter(|(_, t)| expires(t).is_some_and(|at| at <= now_ns))
            .map(|(k, t)| (*k, t.due_ns))
            .collect();
        if !due.is_empty() {
            self.changed();
        }
        for (key, at) in due {
            self.end(key, End::Expired, at);
            if self.lingering.len() >= NEAR_TIMER_CAP
                && let Some((_, due)) = self.lingering.pop_front()
            {
                self.lingering_gap = self.lingering_gap.max(due + LINGER_NS);
            }
            self.lingering.push_back((key, at));
        }
        self.next_expiry_ns = self
            .tracked
            .values()
            .filter_map(expires)
            .min()
            .unwrap_or(u64::MAX);
    }

    /// Forgets what `wanting_poll` and `expire_due` worked out: the tracker changed.
    fn changed(&mut self) {
        self.wanting = None;
        self.next_expiry_ns = 0;
    }

    /// Whether a poll can tell anything events will not: a close waiting for its
    /// timewait socket, an entry found without its transition, or an orphan in
    /// FIN_WAIT2 (it turns TIME_WAIT on the peer's FIN, which no event shows).
    /// Otherwise every timewait socket is accounted for until its timer
    /// (`expire_due`), and a new connection on its 4-tuple (the only other early end
    /// most hosts see) is an event.
    pub fn wants_poll(&mut self) -> bool {
        !self.wanting_poll().is_empty()
    }

    /// The namespaces that `wants_poll` for, and what their poll must list: every
    /// timewait socket where a close waits for confirmation or an entry was found
    /// without its transition, only the orphans' FIN_WAIT2 where that is all there is.
    pub fn wanting_poll(&mut self) -> std::collections::BTreeMap<u32, Listed> {
        if let Some(wanting) = &self.wanting {
            return wanting.clone();
        }
        let mut wanting = std::collections::BTreeMap::new();
        for (k, t) in &self.tracked {
            if t.provisional {
                wanting.insert(k.netns, Listed::All);
            } else if t.substate == TcpState::FIN_WAIT2 {
                wanting.entry(k.netns).or_insert(Listed::FinWait2);
            }
        }
        for ns in self
            .pending
            .keys()
            .map(|k| k.netns)
            .chain(self.recheck.iter().copied())
        {
            wanting.insert(ns, Listed::All);
        }
        self.wanting = Some(wanting.clone());
        wanting
    }

    /// The followed orphans (FIN_WAIT2 timewait sockets) of `netns`: those a
    /// FIN_WAIT2-only poll no longer lists are looked up one by one.
    pub fn orphans(&self, netns: u32) -> Vec<(std::net::SocketAddr, std::net::SocketAddr)> {
        self.tracked
            .iter()
            .filter(|(k, t)| k.netns == netns && t.substate == TcpState::FIN_WAIT2)
            .map(|(k, _)| (k.local.into(), k.remote.into()))
            .collect()
    }

    /// Entries held in each of the tracker's tables.
    pub fn sizes(&self) -> [(&'static str, u64); 6] {
        [
            ("time_wait", self.tracked.len() as u64),
            ("time_wait_pending", self.pending.len() as u64),
            ("time_wait_queued", self.queued.len() as u64),
            ("time_wait_ended", self.ended.len() as u64),
            ("time_wait_created", self.created.len() as u64),
            ("time_wait_over_limit", self.over_limit.len() as u64),
        ]
    }

    /// Follows a timewait socket (replacing what the key held).
    fn track(&mut self, key: SockKey, tw: TimeWait) {
        if self.tracked.insert(key, tw).is_none() {
            *self.per_ns.entry(key.netns).or_insert(0) += 1;
        }
    }

    /// Namespaces where timewait sockets are followed, with how many.
    pub fn followed_per_ns(&self) -> &HashMap<u32, u64> {
        &self.per_ns
    }

    /// Whether `expire_due` ended this socket in the last `LINGER_NS`.
    fn lingers(&self, key: &SockKey) -> bool {
        self.lingering.iter().any(|(k, _)| k == key)
    }

    /// What the kernel's count of the timewait sockets of each namespace (`held`, read
    /// now) says about those followed there. Those confirmed and more than `margin_ns` from
    /// their timer must exist unless they ended early (the kernel never fires a timer
    /// sooner); those nearer, and those ended at their timer in the last `LINGER_NS`,
    /// may or may not. A count below the first is an early end; a count below all of
    /// them is one only if the uncertain ones still there make up the difference, which
    /// a lookup of each tells (at most `NEAR_TIMER_CAP`). Births not yet told only make
    /// the count higher.
    pub fn judge_counts(
        &mut self,
        held: &BTreeMap<u32, u64>,
        now_ns: u64,
        margin_ns: u64,
    ) -> BTreeMap<u32, CountSays> {
        self.lingering
            .retain(|(_, due)| due.saturating_add(LINGER_NS) > now_ns);
        // One a poll found again is followed anew: not counted twice.
        let mut lingering: HashMap<u32, Vec<SockKey>> = HashMap::default();
        for (k, _) in &self.lingering {
            if held.contains_key(&k.netns) && !self.tracked.contains_key(k) {
                lingering.entry(k.netns).or_default().push(*k);
            }
        }
        let lingering_in = |ns: &u32| lingering.get(ns).map_or(&[][..], Vec::as_slice);
        let mut says: BTreeMap<u32, CountSays> = BTreeMap::new();
        // Counted: (settled, near) of the namespaces whose count is below all followed.
        let mut counted: HashMap<u32, (u64, Vec<SockKey>)> = HashMap::default();
        for (&ns, &n) in held {
            let followed = self.per_ns.get(&ns).copied().unwrap_or(0);
            if n >= followed + lingering_in(&ns).len() as u64 {
                says.insert(ns, CountSays::Nothing);
            } else {
                counted.insert(ns, (0, Vec::new()));
            }
        }
        if !counted.is_empty() {
            // One walk of the followed sockets for every namespace that needs it.
            for (k, t) in &self.tracked {
                let Some((settled, near)) = counted.get_mut(&k.netns) else {
                    continue;
                };
                if t.provisional {
                    // Its namespace is polled anyway (`wanting_poll`).
                } else if t.due_ns > now_ns.saturating_add(margin_ns) {
                    *settled += 1;
                } else if near.len() <= NEAR_TIMER_CAP {
                    near.push(*k);
                }
            }
        }
        // What events told since the last judgement, and the shortfall left to them then.
        let mut weighed: HashMap<u32, Shortfall> = held
            .keys()
            .filter_map(|ns| Some((*ns, self.shortfalls.remove(ns)?)))
            .collect();
        for (ns, (settled, mut near)) in counted {
            let short = held.get(&ns).map_or(0, |&n| settled.saturating_sub(n));
            let w = weighed.remove(&ns).unwrap_or_default();
            // None told: nothing is in flight. Left to the events last time, and they told
            // fewer ends than were missing: one ended that no event will tell.
            let verdict = if short > 0 && (w.told == 0 || w.left.is_some_and(|l| l > w.told)) {
                CountSays::Short
            } else if short > 0 {
                // Events are telling early ends: those missing may be theirs, in flight.
                let left = Some(short);
                self.shortfalls.insert(ns, Shortfall { told: 0, left });
                CountSays::Nothing
            } else {
                near.extend_from_slice(lingering_in(&ns));
                if near.is_empty() || near.len() > NEAR_TIMER_CAP || now_ns < self.lingering_gap {
                    CountSays::Nothing
                } else {
                    let near = near.iter().map(|k| (k.local.into(), k.remote.into()));
                    CountSays::Ask {
                        settled,
                        near: near.collect(),
                    }
                }
            };
            says.insert(ns, verdict);
        }
        says
    }

    /// `judge_counts` for one namespace.
    #[cfg(test)]
    fn judge_count(&mut self, netns: u32, held: u64, now_ns: u64, margin_ns: u64) -> CountSays {
        let held = BTreeMap::from([(netns, held)]);
        let mut says = self.judge_counts(&held, now_ns, margin_ns);
        says.remove(&netns).unwrap_or(CountSays::Nothing)
    }

    /// Whether the socket is followed (a timewait socket, or a close awaiting one).
    pub fn follows(&self, key: &SockKey) -> bool {
        self.tracked.contains_key(key) || self.pending.contains_key(key)
    }

    pub fn tracked(&self) -> impl Iterator<Item = (&SockKey, &TimeWait)> {
        self.tracked.iter()
    }

    /// TIME_WAITs that ended at or after `from_ns`.
    pub fn ended_since(&self, from_ns: u64) -> impl Iterator<Item = &Ended> {
        self.ended.iter().filter(move |e| e.at_ns >= from_ns)
    }

    /// Entries created at or after `from_ns`: (time, owner pid).
    pub fn created_since(&self, from_ns: u64) -> impl Iterator<Item = &(u64, Option<u32>)> {
        self.created.iter().filter(move |c| c.0 >= from_ns)
    }

    /// Forgets history older than `before_ns`.
    pub fn prune(&mut self, before_ns: u64) {
        while self.ended.front().is_some_and(|e| e.at_ns < before_ns) {
            self.ended.pop_front();
        }
        while self.created.front().is_some_and(|c| c.0 < before_ns) {
            self.created.pop_front();
        }
        // A burst of 100,000 TIME_WAITs must not pin its memory for the rest of a
        // weeks-long run.
        crate::monitor::table::shrink_idle(&mut self.tracked);
        crate::monitor::table::shrink_idle(&mut self.pending);
        self.ended.shrink_to(self.ended.len() * 2);
        self.created.shrink_to(self.created.len() * 2);
    }
}

/// Records a TIME_WAIT's entry in `created`, forgetting those older than `window_ns`.
fn note_created(
    created: &mut VecDeque<(u64, Option<u32>)>,
    window_ns: Option<u64>,
    at_ns: u64,
    pid: Option<u32>,
) {
    created.push_back((at_ns, pid));
    let before = at_ns.saturating_sub(window_ns.unwrap_or(u64::MAX));
    while created.front().is_some_and(|c| c.0 < before) {
        created.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use connwatch_common::tcp_state::*;

    use super::*;
    use crate::{
        decode::Owner,
        monitor::table::tests::{NS, diag, tr},
    };

    const SEC: u64 = 1_000_000_000;
    const C: &str = "127.0.0.1:40000";
    const S: &str = "127.0.0.1:8080";

    fn key(local: &str, remote: &str) -> SockKey {
        SockKey {
            netns: NS,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    fn close_from(old: u8, ts_s: f64, pid: Option<u32>) -> Transition {
        let mut t = tr(ts_s, old, CLOSE, C, S);
        t.old_since_ns = Some(((ts_s - 0.5) * 1e9) as u64);
        if let Some(pid) = pid {
            t.owner = Owner {
                pid: Some(pid),
                comm: Some("client".into()),
                source: OwnerSource::Carried,
            };
        }
        t
    }

    fn tw(state: u8, local: &str, remote: &str, expires_ms: u32) -> DiagSocket {
        let mut d = diag(state, local, remote, 0, 0);
        d.timewait = true;
        d.expires_ms = expires_ms;
        d
    }

    fn no_listener(_: u16) -> Option<TwOwner> {
        None
    }

    #[test]
    fn history_stays_within_the_window_without_reports() {
        // `trace` keeps no history (window 0) and builds no report to prune it: what it
        // notes must not grow with the connections it has seen.
        let mut t = Tracker {
            window_ns: Some(0),
            ..Tracker::default()
        };
        for i in 0..1000u64 {
            note_created(&mut t.created, t.window_ns, i * SEC, Some(7));
        }
        assert!(t.created_since(0).count() <= 1);
        let mut kept = Tracker::default();
        for i in 0..1000u64 {
            note_created(&mut kept.created, kept.window_ns, i * SEC, Some(7));
        }
        assert_eq!(
            kept.created_since(0).count(),
            1000,
            "no window: kept until prune"
        );
    }

    #[test]
    fn confirmed_time_wait_lives_exactly_its_timer() {
        let mut t = Tracker::default();
        t.on_transition(key(C, S), &close_from(FIN_WAIT2, 10.0, Some(42)));
        // Polled 0.4 s later: 59.6 s left on the timer.
        let rows = t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 59_600)],
            Listed::All,
            10_400_000_000,
            false,
            &no_listener,
        );
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.old, r.new, r.ts_ns),
            (TcpState::FIN_WAIT2, TcpState::TIME_WAIT, 10 * SEC)
        );
        assert_eq!(r.owner.as_ref().map(|o| o.pid), Some(42));
        assert_eq!(r.owner_source, OwnerSource::Carried);
        assert_eq!(r.duration_ns, Some(SEC / 2));
        // Still there a second later.
        assert!(
            t.observe(
                NS,
                &[tw(TIME_WAIT, C, S, 58_600)],
                Listed::All,
                11_400_000_000,
                false,
                &no_listener
            )
            .is_empty()
        );
        // Gone at a poll after the timer was due: expired, lifetime from the timer.
        let rows = t.observe(NS, &[], Listed::All, 71 * SEC, false, &no_listener);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].end, Some(End::Expired));
        assert_eq!(rows[0].ts_ns, 70 * SEC);
        assert_eq!(rows[0].duration_ns, Some(60 * SEC));
        let ended: Vec<_> = t.ended_since(0).collect();
        assert_eq!((ended[0].lifetime_ns, ended[0].pid), (60 * SEC, Some(42)));
        assert_eq!(t.untracked(), 0);
    }

    #[test]
    fn a_confirmed_time_wait_ends_at_its_timer_without_a_poll() {
        let mut t = Tracker::default();
        t.on_transition(key(C, S), &close_from(FIN_WAIT2, 10.0, Some(42)));
        t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 59_600)],
            Listed::All,
            10_400_000_000,
            false,
            &no_listener,
        );
        // Nothing pending: no poll is wanted while the TIME_WAIT waits for its timer.
        assert!(!t.wants_poll());
        t.expire_due(70 * SEC);
        assert_eq!(t.counts(), (1, 0), "not before the timer's grace");
        t.expire_due(71 * SEC);
        assert_eq!(t.counts(), (0, 0));
        let rows = t.take_queued();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].end, Some(End::Expired));
        assert_eq!(rows[0].ts_ns, 70 * SEC);
        let ended: Vec<_> = t.ended_since(0).collect();
        assert_eq!((ended[0].lifetime_ns, ended[0].pid), (60 * SEC, Some(42)));
        // An orphan in FIN_WAIT2 still wants polls: its peer's FIN fires no event.
        t.on_transition(
            key(C, "127.0.0.1:9"),
            &close_from(FIN_WAIT2, 80.0, Some(42)),
        );
        t.observe(
            NS,
            &[tw(FIN_WAIT2, C, "127.0.0.1:9", 59_000)],
            Listed::All,
            81 * SEC,
            false,
            &no_listener,
        );
        assert!(t.wants_poll());
    }

    /// A close the probe told left a TIME_WAIT (`Leaves`), from `port` to S.
    fn born_at(t: &mut Tracker, port: u16, ts_s: f64) {
        let local = format!("127.0.0.1:{port}");
        let mut c = tr(ts_s, FIN_WAIT2, CLOSE, &local, S);
        c.leaves = Leaves::Timewait(TcpState::TIME_WAIT);
        t.on_transition(key(&local, S), &c);
    }

    #[test]
    fn a_shortfall_is_left_to_the_events_that_tell_reused_ports() {
        let mut t = Tracker::default();
        let margin = SEC / 2;
        for port in 1..=10 {
            born_at(&mut t, port, 1.0);
        }
        // Nothing told by events: one ended that none will tell. Listed at once.
        assert_eq!(t.judge_count(NS, 9, 5 * SEC, margin), CountSays::Short);
        // A churn that reuses ports: a new connection's close tells that its 4-tuple's
        // timewait socket ended (it is followed anew), and others are in flight: their
        // new connections have not closed yet.
        born_at(&mut t, 1, 5.5);
        assert_eq!(t.judge_count(NS, 8, 6 * SEC, margin), CountSays::Nothing);
        // Their closes come: as many ends told as were missing, and the next in flight
        // are left to the events in turn.
        born_at(&mut t, 2, 6.5);
        born_at(&mut t, 3, 6.6);
        assert_eq!(t.judge_count(NS, 8, 7 * SEC, margin), CountSays::Nothing);
        // Fewer told than were missing: one of those will never be told.
        born_at(&mut t, 4, 7.5);
        assert_eq!(t.judge_count(NS, 8, 8 * SEC, margin), CountSays::Short);
        // Left to the events, and none came since: listed.
        born_at(&mut t, 5, 8.5);
        assert_eq!(t.judge_count(NS, 9, 9 * SEC, margin), CountSays::Nothing);
        assert_eq!(t.judge_count(NS, 9, 10 * SEC, margin), CountSays::Short);
        // Counts that add up again leave nothing pending.
        born_at(&mut t, 6, 10.5);
        assert_eq!(t.judge_count(NS, 10, 11 * SEC, margin), CountSays::Nothing);
        assert_eq!(t.judge_count(NS, 9, 12 * SEC, margin), CountSays::Short);
    }

    #[test]
    fn count_tells_early_ends_through_others_at_their_timers() {
        let mut t = Tracker::default();
        let margin = SEC / 2;
        // Another service's three, due at 60 s; ours, due at 118 s.
        for port in 1..=3 {
            born_at(&mut t, port, 0.0);
            born_at(&mut t, 100 + port, 58.0);
        }
        let now = 59_800_000_000;
        assert_eq!(t.judge_count(NS, 6, now, margin), CountSays::Nothing);
        // One fewer: ours ended early, or one of theirs was timed out a little sooner
        // than connwatch reckons. Only a lookup of theirs can tell.
        let CountSays::Ask { settled, near } = t.judge_count(NS, 5, now, margin) else {
            panic!("the count alone cannot tell");
        };
        assert_eq!(settled, 3);
        let mut ports: Vec<u16> = near.iter().map(|(l, _)| l.port()).collect();
        ports.sort();
        assert_eq!(ports, [1, 2, 3]);
        assert_eq!(t.judge_count(NS, 2, now, margin), CountSays::Short);
        // Theirs ended at their timer, but the kernel may hold them a while longer.
        t.expire_due(61_500_000_000);
        assert_eq!(t.counts(), (3, 0));
        let now = 61_600_000_000;
        assert_eq!(t.judge_count(NS, 6, now, margin), CountSays::Nothing);
        let CountSays::Ask { settled, near } = t.judge_count(NS, 4, now, margin) else {
            panic!("theirs may linger");
        };
        assert_eq!((settled, near.len()), (3, 3));
        assert_eq!(t.judge_count(NS, 2, now, margin), CountSays::Short);
        // Past the longest the kernel's timer wheel waits, only ours count.
        let now = 67 * SEC;
        assert_eq!(t.judge_count(NS, 3, now, margin), CountSays::Nothing);
        assert_eq!(t.judge_count(NS, 2, now, margin), CountSays::Short);
    }

    #[test]
    fn one_the_timer_wheel_runs_late_is_not_found_anew() {
        let mut t = Tracker::default();
        born_at(&mut t, 1, 10.0);
        t.expire_due(71 * SEC);
        let ends: Vec<_> = t.take_queued().into_iter().filter_map(|r| r.end).collect();
        assert_eq!(ends, [End::Expired]);
        // The wheel runs its timer 2 s late: a poll still lists it, 0 ms left.
        let late = [tw(TIME_WAIT, "127.0.0.1:1", S, 0)];
        let rows = t.observe(NS, &late, Listed::All, 71_900_000_000, false, &no_listener);
        assert!(rows.is_empty(), "{rows:?}");
        assert_eq!(t.counts(), (0, 0));
        assert!(!t.wants_poll(), "nothing unexplained");
        let rows = t.observe(NS, &[], Listed::All, 73 * SEC, false, &no_listener);
        assert!(rows.is_empty(), "{rows:?}");
        assert_eq!(t.untracked(), 0);
    }

    #[test]
    fn counts_of_several_namespaces_are_judged_apart() {
        let mut t = Tracker::default();
        let other = NS + 1;
        for port in 1..=3 {
            born_at(&mut t, port, 0.0);
            let local = format!("127.0.0.1:{}", 100 + port);
            let mut c = tr(0.0, FIN_WAIT2, CLOSE, &local, S);
            c.netns = other;
            c.leaves = Leaves::Timewait(TcpState::TIME_WAIT);
            let mut k = key(&local, S);
            k.netns = other;
            t.on_transition(k, &c);
        }
        let held = BTreeMap::from([(NS, 3), (other, 2)]);
        let says = t.judge_counts(&held, 10 * SEC, SEC / 2);
        assert_eq!(says.get(&NS), Some(&CountSays::Nothing));
        assert_eq!(says.get(&other), Some(&CountSays::Short));
    }

    #[test]
    fn too_many_at_their_timers_are_not_looked_up() {
        let mut t = Tracker::default();
        for port in 1..=NEAR_TIMER_CAP as u16 + 1 {
            born_at(&mut t, port, 0.0);
        }
        born_at(&mut t, 60_000, 58.0);
        let held = NEAR_TIMER_CAP as u64 + 1;
        let now = 59_800_000_000;
        assert_eq!(t.judge_count(NS, held, now, SEC / 2), CountSays::Nothing);
        // Below the settled ones it is still an early end.
        assert_eq!(t.judge_count(NS, 0, now, SEC / 2), CountSays::Short);
    }

    #[test]
    fn vanishing_before_the_timer_is_early() {
        let mut t = Tracker::default();
        t.on_transition(key(C, S), &close_from(CLOSING, 10.0, Some(42)));
        let rows = t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 60_000)],
            Listed::All,
            10 * SEC,
            false,
            &no_listener,
        );
        assert_eq!(rows[0].old, TcpState::CLOSING);
        let rows = t.observe(NS, &[], Listed::All, 15 * SEC, false, &no_listener);
        assert_eq!(rows[0].end, Some(End::Early));
        assert_eq!(rows[0].duration_ns, Some(5 * SEC));
    }

    #[test]
    fn transition_arriving_after_the_poll_still_claims_its_time_wait() {
        let mut t = Tracker::default();
        // The poll lists the timewait socket before its ->CLOSE event was read.
        assert!(
            t.observe(
                NS,
                &[tw(TIME_WAIT, C, S, 59_900)],
                Listed::All,
                10_100_000_000,
                false,
                &no_listener
            )
            .is_empty()
        );
        t.on_transition(key(C, S), &close_from(FIN_WAIT2, 10.0, Some(42)));
        let rows = t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 58_900)],
            Listed::All,
            11_100_000_000,
            false,
            &no_listener,
        );
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (rows[0].new, rows[0].ts_ns),
            (TcpState::TIME_WAIT, 10 * SEC)
        );
        let tw0 = &t.tracked[&key(C, S)];
        assert_eq!(tw0.owner.as_ref().map(|o| o.pid), Some(42));
        assert_eq!(tw0.owner_source, OwnerSource::Carried);
        assert_eq!(tw0.age_source, AgeSource::Observed);
        assert_eq!(t.untracked(), 0);
        assert_eq!(t.created_since(0).count(), 1);
    }

    #[test]
    fn late_timer_does_not_stretch_the_lifetime() {
        let mut t = Tracker::default();
        t.on_transition(key(C, S), &close_from(FIN_WAIT2, 10.0, Some(42)));
        t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 60_000)],
            Listed::All,
            10 * SEC,
            false,
            &no_listener,
        );
        // The timer wheel runs it 1.5 s late: still listed, 0 ms left.
        t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 0)],
            Listed::All,
            71 * SEC,
            false,
            &no_listener,
        );
        let rows = t.observe(NS, &[], Listed::All, 72 * SEC, false, &no_listener);
        assert_eq!(rows[0].duration_ns, Some(60 * SEC));
    }

    #[test]
    fn new_connection_on_the_four_tuple_ends_time_wait_early() {
        let mut t = Tracker::default();
        let k = key(S, C);
        let mut close = close_from(FIN_WAIT2, 10.0, Some(7));
        close.local = S.parse().unwrap();
        close.remote = C.parse().unwrap();
        t.on_transition(k, &close);
        t.observe(
            NS,
            &[tw(TIME_WAIT, S, C, 60_000)],
            Listed::All,
            10 * SEC,
            false,
            &no_listener,
        );
        // A SYN from the same client port: the server's child starts on the 4-tuple.
        t.on_transition(k, &tr(12.0, LISTEN, SYN_RECV, S, C));
        let rows = t.observe(NS, &[], Listed::All, 12_500_000_000, false, &no_listener);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].end, Some(End::Early));
        assert_eq!(rows[0].ts_ns, 12 * SEC);
        assert_eq!(rows[0].duration_ns, Some(2 * SEC));
        assert_eq!(t.tracked().count(), 0);
    }

    #[test]
    fn one_poll_of_several_namespaces_ends_only_what_each_listed() {
        let (a, b, c) = (NS, NS + 1, NS + 2);
        let in_ns = |ns: u32, local: &str| SockKey {
            netns: ns,
            ..key(local, S)
        };
        let mut t = Tracker::default();
        let (la, lb, lc) = ("127.0.0.1:40001", "127.0.0.1:40002", "127.0.0.1:40003");
        let (sa, sb, sc) = (
            [tw(TIME_WAIT, la, S, 50_000)],
            [tw(TIME_WAIT, lb, S, 50_000)],
            [tw(TIME_WAIT, lc, S, 50_000)],
        );
        let polled: [(u32, &[DiagSocket], Listed); 3] = [
            (a, &sa, Listed::All),
            (b, &sb, Listed::All),
            (c, &sc, Listed::All),
        ];
        t.observe_many(&polled, 10 * SEC, true, &|_, _| None);
        assert_eq!(t.tracked().count(), 3);
        // Closes waiting for their timewait socket, in `a` and in `c`.
        for (ns, local) in [(a, "127.0.0.1:40004"), (c, "127.0.0.1:40005")] {
            let mut close = tr(10.5, FIN_WAIT2, CLOSE, local, S);
            close.netns = ns;
            t.on_transition(in_ns(ns, local), &close);
        }
        // `a` listed whole and empty, `b` only for its orphans, `c` not polled.
        let polled: [(u32, &[DiagSocket], Listed); 2] =
            [(a, &[], Listed::All), (b, &[], Listed::FinWait2)];
        let rows = t.observe_many(&polled, 11 * SEC, false, &|_, _| None);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0].key, rows[0].end), (in_ns(a, la), Some(End::Early)));
        assert!(
            t.follows(&in_ns(b, lb)),
            "a FIN_WAIT2 poll does not list TIME_WAITs"
        );
        assert!(t.follows(&in_ns(c, lc)), "c was not polled");
        assert_eq!(
            t.closed_without_timewait, 1,
            "a's close found no timewait socket"
        );
        assert!(
            t.follows(&in_ns(c, "127.0.0.1:40005")),
            "c's close still waits"
        );
    }

    #[test]
    fn close_without_timewait_socket_is_not_time_wait() {
        let mut t = Tracker::default();
        t.on_transition(key(C, S), &close_from(FIN_WAIT2, 10.0, Some(42)));
        assert!(
            t.observe(NS, &[], Listed::All, 11 * SEC, false, &no_listener)
                .is_empty()
        );
        assert_eq!(t.tracked().count(), 0);
        assert_eq!(t.closed_without_timewait, 1);
    }

    #[test]
    fn orphan_fin_wait2_turns_into_time_wait_with_a_fresh_timer() {
        let mut t = Tracker::default();
        t.on_transition(key(C, S), &close_from(FIN_WAIT2, 10.0, Some(42)));
        // An orphan: timewait socket in FIN_WAIT2 substate, no row yet.
        assert!(
            t.observe(
                NS,
                &[tw(FIN_WAIT2, C, S, 59_000)],
                Listed::All,
                11 * SEC,
                false,
                &no_listener
            )
            .is_empty()
        );
        // The peer's FIN arrives at 13 s: TIME_WAIT with 60 s from then.
        let rows = t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 59_000)],
            Listed::All,
            14 * SEC,
            false,
            &no_listener,
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].old, rows[0].new),
            (TcpState::FIN_WAIT2, TcpState::TIME_WAIT)
        );
        assert_eq!(rows[0].ts_ns, 13 * SEC);
        assert_eq!(rows[0].duration_ns, Some(3 * SEC));
        let rows = t.observe(NS, &[], Listed::All, 74 * SEC, false, &no_listener);
        assert_eq!(rows[0].end, Some(End::Expired));
        assert_eq!(rows[0].duration_ns, Some(60 * SEC));
    }

    #[test]
    fn preexisting_time_wait_is_estimated_and_owned_by_the_listener() {
        let mut t = Tracker::default();
        let listener = |port: u16| {
            (port == 8080).then(|| TwOwner {
                pid: 7,
                comm: "server".into(),
            })
        };
        let rows = t.observe(
            NS,
            &[tw(TIME_WAIT, S, C, 45_000), tw(TIME_WAIT, C, S, 30_000)],
            Listed::All,
            100 * SEC,
            true,
            &listener,
        );
        assert!(rows.is_empty());
        let server = &t.tracked[&key(S, C)];
        assert_eq!(server.owner_source, OwnerSource::Listener);
        assert_eq!(server.owner.as_ref().map(|o| o.pid), Some(7));
        assert_eq!(server.age_source, AgeSource::Estimated);
        assert_eq!(server.entered_ns, 85 * SEC);
        let client = &t.tracked[&key(C, S)];
        assert_eq!(client.owner_source, OwnerSource::Unknown);
        assert_eq!(t.untracked(), 0);
        // One that shows up later, and is still unclaimed by a transition at the next
        // poll, was missed.
        let later = [
            tw(TIME_WAIT, S, C, 44_000),
            tw(TIME_WAIT, C, S, 29_000),
            tw(TIME_WAIT, S, "127.0.0.1:1", 60_000),
        ];
        t.observe(NS, &later, Listed::All, 101 * SEC, false, &listener);
        assert_eq!(t.untracked(), 0, "its transition may still be on its way");
        t.observe(NS, &later, Listed::All, 102 * SEC, false, &listener);
        assert_eq!(t.untracked(), 1);
    }

    #[test]
    fn other_namespaces_are_left_alone() {
        let mut t = Tracker::default();
        let mut k = key(C, S);
        t.on_transition(k, &close_from(FIN_WAIT2, 10.0, Some(42)));
        t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 60_000)],
            Listed::All,
            10 * SEC,
            false,
            &no_listener,
        );
        k.netns = NS + 1;
        t.on_transition(k, &close_from(FIN_WAIT2, 10.0, Some(43)));
        // A poll of another namespace neither ends nor confirms these.
        assert!(
            t.observe(NS + 5, &[], Listed::All, 11 * SEC, false, &no_listener)
                .is_empty()
        );
        assert_eq!(t.tracked().count(), 1);
        assert_eq!(t.pending.len(), 1);
    }

    #[test]
    fn rates_and_pruning() {
        let mut t = Tracker::default();
        for i in 0..5 {
            let local = format!("127.0.0.1:{}", 41000 + i);
            let mut tr = close_from(FIN_WAIT2, 10.0 + i as f64, Some(42));
            tr.local = local.parse().unwrap();
            t.on_transition(key(&local, S), &tr);
        }
        let polled: Vec<DiagSocket> = (0..5)
            .map(|i| tw(TIME_WAIT, &format!("127.0.0.1:{}", 41000 + i), S, 59_000))
            .collect();
        t.observe(NS, &polled, Listed::All, 15 * SEC, false, &no_listener);
        assert_eq!(t.created_since(0).count(), 5);
        assert_eq!(t.created_since(12 * SEC).count(), 3);
        t.prune(13 * SEC);
        assert_eq!(t.created_since(0).count(), 2);
    }

    /// On a node with hundreds of namespaces, a close waits for its own namespace's poll
    /// however many others are polled first (it used to be dropped after 64).
    #[test]
    fn pending_close_outlives_polls_of_other_namespaces() {
        let mut t = Tracker::default();
        let mut k = key(C, S);
        k.netns = NS + 1000;
        t.on_transition(k, &close_from(FIN_WAIT2, 10.0, Some(42)));
        for ns in 0..500 {
            t.observe(NS + ns, &[], Listed::All, 11 * SEC, false, &no_listener);
        }
        t.expire_pending(12 * SEC);
        let mut sock = tw(TIME_WAIT, C, S, 59_000);
        sock.local = C.parse().unwrap();
        let rows = t.observe(
            NS + 1000,
            &[sock],
            Listed::All,
            12 * SEC,
            false,
            &no_listener,
        );
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].owner.as_ref().map(|o| o.pid), Some(42));
        assert_eq!(rows[0].owner_source, OwnerSource::Carried);
        assert_eq!(t.untracked(), 0);
    }

    #[test]
    fn pending_close_expires_by_time() {
        let mut t = Tracker::default();
        let mut k = key(C, S);
        k.netns = NS + 1;
        t.on_transition(k, &close_from(FIN_WAIT2, 10.0, Some(42)));
        t.expire_pending(69 * SEC);
        assert_eq!(t.pending.len(), 1);
        t.expire_pending(71 * SEC);
        assert_eq!(t.pending.len(), 0);
        assert_eq!(t.untracked(), 1);
    }

    /// A deleted namespace takes its timewait sockets with it: they end `early` at once,
    /// its pending closes go, other namespaces keep theirs.
    #[test]
    fn forgetting_a_namespace_ends_its_time_waits_early() {
        let mut t = Tracker::default();
        t.on_transition(key(C, S), &close_from(FIN_WAIT2, 10.0, Some(42)));
        t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 60_000)],
            Listed::All,
            10 * SEC,
            false,
            &no_listener,
        );
        let mut other = key(C, S);
        other.netns = NS + 1;
        t.on_transition(other, &close_from(FIN_WAIT2, 11.0, Some(43)));
        let mut pending_here = key("127.0.0.1:40001", S);
        pending_here.netns = NS;
        t.on_transition(pending_here, &close_from(FIN_WAIT2, 12.0, Some(42)));
        t.forget(NS, 20 * SEC);
        let rows = t.take_queued();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].end, Some(End::Early));
        assert_eq!(rows[0].ts_ns, 20 * SEC);
        assert_eq!(t.tracked().count(), 0);
        assert_eq!(t.ended_since(0).count(), 1);
        assert_eq!(t.pending.len(), 1, "the other namespace's close stays");
        assert!(!t.pending.contains_key(&pending_here));
    }

    /// An unchanging set of timewait sockets over the limit, polled again and again,
    /// counts once per socket.
    #[test]
    fn timewaits_over_the_limit_count_once() {
        let mut t = Tracker {
            limit: 2,
            ..Tracker::default()
        };
        let polled: Vec<DiagSocket> = (0..5)
            .map(|i| tw(TIME_WAIT, &format!("127.0.0.1:{}", 41000 + i), S, 59_000))
            .collect();
        for round in 0..30 {
            t.observe(
                NS,
                &polled,
                Listed::All,
                (10 + round) * SEC,
                true,
                &no_listener,
            );
        }
        assert_eq!(t.tracked().count(), 2);
        assert_eq!(t.untracked(), 3);
    }

    #[test]
    fn a_second_close_on_a_followed_tuple_ends_the_first_early() {
        let mut t = Tracker::default();
        let tw = Leaves::Timewait(TcpState::TIME_WAIT);
        t.on_transition(key(C, S), &told(FIN_WAIT2, 10.0, tw));
        // The 4-tuple reused (its start unseen), closed again at 20 s.
        t.on_transition(key(C, S), &told(FIN_WAIT2, 20.0, tw));
        let rows = t.take_queued();
        let ends: Vec<_> = rows.iter().filter(|r| r.end.is_some()).collect();
        assert_eq!(ends.len(), 1, "{rows:?}");
        assert_eq!((ends[0].end, ends[0].ts_ns), (Some(End::Early), 20 * SEC));
        assert_eq!(t.counts(), (1, 0), "one TIME_WAIT, the new one");
        assert_eq!(t.followed_per_ns().get(&NS), Some(&1));
    }

    fn told(old: u8, ts_s: f64, leaves: Leaves) -> Transition {
        let mut t = close_from(old, ts_s, Some(42));
        t.leaves = leaves;
        t
    }

    #[test]
    fn a_process_s_time_waits_share_its_name() {
        let mut t = Tracker::default();
        let tw = Leaves::Timewait(TcpState::TIME_WAIT);
        let name = |t: &Tracker, local: &str| t.tracked[&key(local, S)].owner.clone().unwrap();
        t.on_transition(key(C, S), &told(FIN_WAIT2, 10.0, tw));
        t.on_transition(key("127.0.0.1:40001", S), &told(FIN_WAIT2, 10.1, tw));
        let mut other = told(FIN_WAIT2, 10.2, tw);
        other.owner.pid = Some(43);
        t.on_transition(key("127.0.0.1:40002", S), &other);
        let (a, b, c) = (
            name(&t, C),
            name(&t, "127.0.0.1:40001"),
            name(&t, "127.0.0.1:40002"),
        );
        assert!(std::sync::Arc::ptr_eq(&a.comm, &b.comm), "one allocation");
        assert_eq!((a.pid, &*a.comm), (42, "client"));
        assert_eq!(
            (c.pid, &*c.comm),
            (43, "client"),
            "another process: its own"
        );
        // A renamed process (exec) is not given its old name.
        let mut renamed = told(FIN_WAIT2, 10.3, tw);
        renamed.owner.comm = Some("exec'd".into());
        t.on_transition(key("127.0.0.1:40003", S), &renamed);
        assert_eq!(&*name(&t, "127.0.0.1:40003").comm, "exec'd");
    }

    #[test]
    fn a_birth_told_by_the_probe_needs_no_poll() {
        let mut t = Tracker::default();
        t.on_transition(
            key(C, S),
            &told(FIN_WAIT2, 10.0, Leaves::Timewait(TcpState::TIME_WAIT)),
        );
        // Followed at once, with its row, and nothing to poll for.
        assert_eq!(t.counts(), (1, 0));
        assert!(!t.wants_poll());
        let rows = t.take_queued();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].old, rows[0].new, rows[0].ts_ns),
            (TcpState::FIN_WAIT2, TcpState::TIME_WAIT, 10 * SEC)
        );
        assert_eq!(rows[0].owner_source, OwnerSource::Carried);
        assert_eq!(rows[0].duration_ns, Some(SEC / 2));
        // Ends at its timer, 60 s on.
        t.expire_due(71 * SEC);
        let rows = t.take_queued();
        assert_eq!((rows[0].end, rows[0].ts_ns), (Some(End::Expired), 70 * SEC));
        assert_eq!(t.untracked(), 0);
    }

    #[test]
    fn a_reset_or_timed_out_close_is_not_a_time_wait() {
        let mut t = Tracker::default();
        t.on_transition(key(C, S), &told(FIN_WAIT2, 10.0, Leaves::Nothing));
        t.on_transition(key(S, C), &told(CLOSING, 10.0, Leaves::Nothing));
        assert_eq!(t.counts(), (0, 0));
        assert!(!t.wants_poll());
        assert!(t.take_queued().is_empty());
        assert_eq!(t.closed_without_timewait, 2);
    }

    #[test]
    fn a_told_orphan_is_polled_for_fin_wait2_only_and_looked_up_when_it_leaves() {
        let mut t = Tracker::default();
        t.on_transition(
            key(C, S),
            &told(FIN_WAIT2, 10.0, Leaves::Timewait(TcpState::FIN_WAIT2)),
        );
        // A TIME_WAIT elsewhere in the namespace that a FIN_WAIT2-only poll never lists.
        let other = "127.0.0.1:40001";
        t.on_transition(
            key(other, S),
            &told(FIN_WAIT2, 10.0, Leaves::Timewait(TcpState::TIME_WAIT)),
        );
        assert_eq!(t.counts(), (1, 1));
        assert!(t.take_queued().iter().all(|r| r.key == key(other, S)));
        assert_eq!(
            t.wanting_poll(),
            std::collections::BTreeMap::from([(NS, Listed::FinWait2)])
        );
        assert_eq!(
            t.orphans(NS),
            vec![(C.parse().unwrap(), S.parse().unwrap())]
        );
        // Still FIN_WAIT2: nothing changes, and the TIME_WAIT it does not list stays.
        let rows = t.observe(
            NS,
            &[tw(FIN_WAIT2, C, S, 59_000)],
            Listed::FinWait2,
            11 * SEC,
            false,
            &no_listener,
        );
        assert!(rows.is_empty(), "{rows:?}");
        assert_eq!(t.counts(), (1, 1));
        // The peer's FIN came: the lookup finds it in TIME_WAIT with 59.5 s left.
        let rows = t.observe(
            NS,
            &[tw(TIME_WAIT, C, S, 59_500)],
            Listed::FinWait2,
            12 * SEC,
            false,
            &no_listener,
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].old, rows[0].new, rows[0].ts_ns),
            (TcpState::FIN_WAIT2, TcpState::TIME_WAIT, 11_500_000_000)
        );
        assert_eq!(rows[0].duration_ns, Some(1_500_000_000));
        assert_eq!(t.counts(), (2, 0));
        assert!(!t.wants_poll());
        assert_eq!(t.untracked(), 0);
    }

    #[test]
    fn a_told_orphan_that_the_lookup_does_not_find_ended() {
        let mut t = Tracker::default();
        t.on_transition(
            key(C, S),
            &told(FIN_WAIT2, 10.0, Leaves::Timewait(TcpState::FIN_WAIT2)),
        );
        // Reset by the peer 2 s in: neither listed nor found.
        let rows = t.observe(NS, &[], Listed::FinWait2, 12 * SEC, false, &no_listener);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].old, rows[0].new, rows[0].end),
            (TcpState::FIN_WAIT2, TcpState::CLOSE, Some(End::Early))
        );
        assert_eq!(t.counts(), (0, 0));
        assert!(!t.wants_poll());
    }

    /// A tracker with room for one, told of a TIME_WAIT birth (C) and then of a second
    /// socket (`OTHER`) leaving `second` behind, which is left out.
    fn one_over_the_limit(second: TcpState) -> Tracker {
        let mut t = Tracker {
            limit: 1,
            ..Default::default()
        };
        t.on_transition(
            key(C, S),
            &told(FIN_WAIT2, 10.0, Leaves::Timewait(TcpState::TIME_WAIT)),
        );
        t.on_transition(
            key(OTHER, S),
            &told(FIN_WAIT2, 10.0, Leaves::Timewait(second)),
        );
        t
    }

    const OTHER: &str = "127.0.0.1:40001";

    #[test]
    fn a_socket_left_out_and_followed_later_counts_once() {
        let mut t = one_over_the_limit(TcpState::TIME_WAIT);
        let other = OTHER;
        assert_eq!(t.untracked(), 1);
        // The first ends at its timer; the poll after finds room for the other.
        t.expire_due(71 * SEC);
        for at in [72, 73] {
            t.observe(
                NS,
                &[tw(TIME_WAIT, other, S, 1_000)],
                Listed::All,
                at * SEC,
                false,
                &no_listener,
            );
        }
        assert_eq!(t.counts(), (1, 0));
        assert_eq!(t.untracked(), 1);
    }

    #[test]
    fn a_reused_namespace_number_is_rechecked_not_forgotten() {
        let mut t = Tracker::default();
        let new = "127.0.0.1:40001";
        for local in [C, new] {
            t.on_transition(
                key(local, S),
                &told(FIN_WAIT2, 10.0, Leaves::Timewait(TcpState::TIME_WAIT)),
            );
        }
        t.take_queued();
        // The number now names a new namespace, which holds only the second.
        t.recheck(NS);
        assert_eq!(
            t.wanting_poll(),
            std::collections::BTreeMap::from([(NS, Listed::All)])
        );
        let rows = t.observe(
            NS,
            &[tw(TIME_WAIT, new, S, 59_000)],
            Listed::All,
            11 * SEC,
            false,
            &no_listener,
        );
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].key, rows[0].end), (key(C, S), Some(End::Early)));
        assert_eq!(t.counts(), (1, 0));
        assert!(!t.wants_poll());
    }

    #[test]
    fn a_told_birth_over_the_limit_counts_once() {
        let mut t = one_over_the_limit(TcpState::FIN_WAIT2);
        let other = OTHER;
        assert_eq!(t.untracked(), 1);
        // Polls that list it again do not count it again.
        for (listed, at) in [(Listed::FinWait2, 11), (Listed::All, 12)] {
            t.observe(
                NS,
                &[tw(TIME_WAIT, C, S, 59_000), tw(FIN_WAIT2, other, S, 59_000)],
                listed,
                at * SEC,
                false,
                &no_listener,
            );
        }
        assert_eq!(t.untracked(), 1);
        assert_eq!(t.counts(), (2, 0));
    }
}
