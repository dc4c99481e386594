//! The socket table: which sockets are in CLOSE_WAIT, since when, held by whom.
//!
//! Pure logic, driven by the probe's transitions and by sock_diag observations, with the
//! time passed in (CLOCK_MONOTONIC ns), so that tests can feed synthetic sequences.
//!
//! Sockets are keyed by network namespace + local + remote address: the kernel reuses
//! `struct sock` addresses within seconds, and containers reuse the same addresses in
//! different namespaces. Only the states a report needs are kept, so memory follows the
//! number of CLOSE_WAIT sockets, not of every connection on the box.
use std::{collections::VecDeque, net::SocketAddr};

use rustc_hash::FxHashMap as HashMap;

use serde::Serialize;

use crate::{
    decode::{OwnerSource, TcpState, Transition},
    host::sockdiag::DiagSocket,
};

/// Closed CLOSE_WAIT lifetimes kept at most (the window prunes them sooner).
const MAX_CLOSED: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    pub netns: u32,
    pub local: Endpoint,
    pub remote: Endpoint,
}

/// A socket address in 20 bytes rather than `SocketAddr`'s 32: every followed socket's
/// key holds two, and a busy host has 100,000 of them. Orders like `SocketAddr` (IPv4
/// first, then address, then port).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    v6: bool,
    addr: [u8; 16],
    port: u16,
}

impl Endpoint {
    pub fn ip(&self) -> std::net::IpAddr {
        if self.v6 {
            std::net::IpAddr::from(self.addr)
        } else {
            let [a, b, c, d, ..] = self.addr;
            std::net::IpAddr::from([a, b, c, d])
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        let (v6, addr) = match a.ip() {
            std::net::IpAddr::V4(ip) => {
                let mut addr = [0; 16];
                let [a0, a1, a2, a3] = ip.octets();
                addr[..4].copy_from_slice(&[a0, a1, a2, a3]);
                (false, addr)
            }
            std::net::IpAddr::V6(ip) => (true, ip.octets()),
        };
        Self {
            v6,
            addr,
            port: a.port(),
        }
    }
}

impl From<Endpoint> for SocketAddr {
    fn from(e: Endpoint) -> Self {
        SocketAddr::new(e.ip(), e.port)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<SocketAddr>().map(Self::from)
    }
}

impl PartialEq<SocketAddr> for Endpoint {
    fn eq(&self, other: &SocketAddr) -> bool {
        *self == Endpoint::from(*other)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SocketAddr::from(*self).fmt(f)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SocketAddr::from(*self).fmt(f)
    }
}

/// Whether an age was measured from the transition or estimated afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgeSource {
    /// connwatch saw the socket enter its state.
    Observed,
    /// Derived later (sock_diag's `tcpi_last_ack_recv`), or a lower bound.
    Estimated,
}

impl AgeSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Observed => "observed",
            Self::Estimated => "estimated",
        }
    }
}

/// A socket in CLOSE_WAIT: the peer closed, the process did not (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseWait {
    pub since_ns: u64,
    pub age_source: AgeSource,
    /// Socket inode, to find the processes holding its fd; 0 until known.
    pub inode: u64,
    /// Bytes received and never read.
    pub recv_q: u32,
    /// How long the connection had been quiet (no data from the peer) when the peer's
    /// FIN arrived, in ms, from `tcp_info`: `IDLE_UNKNOWN` until asked,
    /// `IDLE_UNKNOWABLE` when a dump could not tell. See `idle_before_fin_ms`.
    idle_ms: u32,
    /// Added by reconciliation, not by a transition: if no transition follows, the
    /// probe missed this socket's entry.
    from_reconcile: bool,
    /// Consecutive reconciliations that did not list the socket.
    missed: u8,
    /// The unread bytes are the peer's goodbye (see `goodbye`), not a reply the program
    /// never read.
    pub goodbye: bool,
    /// The reconciliation that last listed it (mark and sweep, no per-dump key set).
    listed_in: u32,
}

const IDLE_UNKNOWN: u32 = u32::MAX;
const IDLE_UNKNOWABLE: u32 = u32::MAX - 1;

impl CloseWait {
    /// How long the peer had sent nothing when it closed, if `tcp_info` told.
    pub fn idle_before_fin_ms(&self) -> Option<u32> {
        (self.idle_ms < IDLE_UNKNOWABLE).then_some(self.idle_ms)
    }

    /// Evidence `fill_evidence` has yet to ask a dump for.
    fn wants_evidence(&self) -> bool {
        self.inode == 0 || self.idle_ms == IDLE_UNKNOWN
    }
}

/// A spell without data this long marks a connection that sat idle: a quiet spell
/// before the peer's FIN with nothing unread (pooled connections that the server's
/// keep-alive timeout closed), or between our last request and the peer's unread data.
pub const QUIET_SPELL_MS: u32 = 1000;

/// Whether the unread bytes of a CLOSE_WAIT socket are the peer's goodbye: the program
/// had read what came before (more bytes arrived over the connection's life than sit
/// unread, the FIN aside), and the unread data came a quiet spell after the program
/// last sent anything, not in answer to it: a server's parting notice on an idle
/// session (PostgreSQL's idle_session_timeout). Unread data that came in answer to a
/// request, or that is all the peer ever sent, is a reply the program never read.
fn goodbye(s: &DiagSocket) -> bool {
    let unread = u64::from(unread(s));
    match (s.last_data_sent_ms, s.last_data_recv_ms, s.bytes_received) {
        (Some(sent), Some(recv), Some(received)) => {
            unread > 0 && received > unread + 1 && sent.saturating_sub(recv) >= QUIET_SPELL_MS
        }
        _ => false,
    }
}

/// The quiet spell before the FIN: the time since the peer's last data, less the time
/// since the FIN (the socket's age in CLOSE_WAIT).
fn idle_before_fin(s: &DiagSocket, age_ns: u64) -> u32 {
    s.last_data_recv_ms.map_or(IDLE_UNKNOWABLE, |ms| {
        let age_ms = u32::try_from(age_ns / 1_000_000).unwrap_or(u32::MAX);
        ms.saturating_sub(age_ms).min(IDLE_UNKNOWABLE - 1)
    })
}

/// A CLOSE_WAIT socket that its process finally closed (or that was reset).
#[derive(Clone, Debug, PartialEq)]
pub struct ClosedCloseWait {
    pub at_ns: u64,
    pub lifetime_ns: u64,
    /// The process that closed it, when known.
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// Sockets left out because a table was full (`--max-sockets`), each counted once while
/// it exists, not once per dump that lists it again. Only a key is kept per socket.
#[derive(Default)]
pub struct Overflow {
    /// Socket → the pass (dump or poll) that last listed it.
    seen: HashMap<SockKey, u64>,
    /// Distinct sockets left out so far.
    pub counted: u64,
}

impl Overflow {
    /// Notes a socket left out in `pass`; counts it if it was not already left out.
    pub fn note(&mut self, key: SockKey, pass: u64) {
        if self.seen.insert(key, pass).is_none() {
            self.counted += 1;
        }
    }

    /// Forgets the sockets of `netns` that the dump of `pass` no longer lists (gone, or
    /// followed now): a later socket on the same 4-tuple is another socket.
    pub fn sweep(&mut self, netns: u32, pass: u64) {
        self.seen.retain(|k, p| k.netns != netns || *p == pass);
        shrink_idle(&mut self.seen);
    }

    /// Whether this socket was left out (and counted).
    pub fn contains(&self, key: &SockKey) -> bool {
        self.seen.contains_key(key)
    }

    /// A socket left out is followed now that there is room; whether it had been left
    /// out (then it was counted already).
    pub fn take(&mut self, key: &SockKey) -> bool {
        self.seen.remove(key).is_some()
    }

    /// Forgets a namespace that no longer exists.
    pub fn forget(&mut self, netns: u32) {
        self.seen.retain(|k, _| k.netns != netns);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[derive(Default)]
pub struct Table {
    close_wait: HashMap<SockKey, CloseWait>,
    closed: VecDeque<ClosedCloseWait>,
    /// Sockets whose state connwatch lost: a transition it never saw (dropped event,
    /// socket from before start in a namespace it could not dump).
    pub untracked: u64,
    /// CLOSE_WAIT closes recorded so far (for consumers that take new ones).
    pub closed_total: u64,
    /// CLOSE_WAIT sockets that ended without a close() of the program: reset, timed
    /// out, or closed by the exit of the process holding them.
    pub ended_without_close: u64,
    own_netns: u32,
    /// Reconciliations so far (the mark of the current one; wraps harmlessly).
    reconciles: u32,
    /// Most sockets followed at once (`--max-sockets`); beyond it they are counted as
    /// untracked (once each) instead of growing memory without bound.
    limit: usize,
    over_limit: Overflow,
    /// FIN_WAIT2 sockets a process still holds (it shut down its side; the peer has not
    /// closed), as the last full dump listed them: inode and when first listed. Orphans
    /// (closed, kept by the kernel) are the timewait tracker's.
    held_fin_wait2: HashMap<SockKey, (u64, u64)>,
    /// Owners the probe named (connect/close context, carried) for CLOSE_WAIT sockets in
    /// `close_wait`, beside it: most CLOSE_WAIT sockets are accepted ones, which the
    /// probe cannot name, and a table of 50,000 should not pay for a field each. (The
    /// processes holding the fd live in the fd index, for the same reason.)
    probe_owners: HashMap<SockKey, ProbeOwner>,
}

/// The owner the probe named for a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOwner {
    pub pid: u32,
    pub comm: String,
    pub source: OwnerSource,
}

impl Table {
    pub fn new(own_netns: u32) -> Self {
        Self {
            own_netns,
            limit: usize::MAX,
            ..Self::default()
        }
    }

    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Room for one more socket? Counts it as untracked (once) when there is none.
    fn room(&mut self, key: &SockKey) -> bool {
        if self.close_wait.len() < self.limit || self.close_wait.contains_key(key) {
            return true;
        }
        self.over_limit.note(*key, u64::from(self.reconciles));
        false
    }

    /// Sockets whose state was lost: missed transitions, and sockets over the limit.
    pub fn untracked(&self) -> u64 {
        self.untracked + self.over_limit.counted
    }

    /// Fills in what transitions could not carry, from a dump (with `tcp_info`) of one
    /// namespace's CLOSE_WAIT sockets: the inode of a socket the process had not yet
    /// accepted, its unread bytes, and how long the peer had been quiet when it closed.
    pub fn fill_evidence(&mut self, netns: u32, sockets: &[DiagSocket], now_ns: u64) {
        let netns = if netns == 0 { self.own_netns } else { netns };
        for s in sockets.iter().filter(|s| s.state == TcpState::CLOSE_WAIT) {
            let key = self.key(netns, s.local, s.remote);
            let Some(e) = self.close_wait.get_mut(&key) else {
                continue;
            };
            if e.inode == 0 {
                e.inode = s.inode;
            }
            if e.idle_ms == IDLE_UNKNOWN {
                e.idle_ms = idle_before_fin(s, now_ns.saturating_sub(e.since_ns));
                e.goodbye = goodbye(s);
            }
            e.recv_q = unread(s);
        }
        // Asked once: what the dump did not tell, no later one will.
        for (_, e) in self.close_wait.iter_mut().filter(|(k, _)| k.netns == netns) {
            if e.idle_ms == IDLE_UNKNOWN {
                e.idle_ms = IDLE_UNKNOWABLE;
            }
        }
    }

    /// Namespaces holding CLOSE_WAIT sockets, in that state since `entered_by` or
    /// earlier, whose inode or `tcp_info` evidence is still to be asked for
    /// (`fill_evidence`). Younger ones wait: see `Monitor::fill_evidence`.
    pub fn wanting_evidence(&self, entered_by: u64) -> std::collections::BTreeSet<u32> {
        self.close_wait
            .iter()
            .filter(|(_, e)| e.since_ns <= entered_by && e.wants_evidence())
            .map(|(k, _)| k.netns)
            .collect()
    }

    /// CLOSE_WAIT sockets that exist as far as connwatch knows: followed, or over the
    /// limit and still listed by the last dump.
    pub fn close_wait_count(&self) -> u64 {
        (self.close_wait.len() + self.over_limit.len()) as u64
    }

    /// Takes the held FIN_WAIT2 sockets of a full dump of one namespace (ages from
    /// when a dump first listed them).
    pub fn note_fin_wait2(&mut self, netns: u32, sockets: &[DiagSocket], now_ns: u64) {
        let netns = if netns == 0 { self.own_netns } else { netns };
        let mut listed: HashMap<SockKey, (u64, u64)> = HashMap::default();
        for s in sockets
            .iter()
            .filter(|s| s.state == TcpState::FIN_WAIT2 && !s.timewait && s.inode != 0)
        {
            let key = self.key(netns, s.local, s.remote);
            let since = self.held_fin_wait2.get(&key).map_or(now_ns, |e| e.1);
            if listed.len() < self.limit {
                listed.insert(key, (s.inode, since));
            }
        }
        self.held_fin_wait2.retain(|k, _| k.netns != netns);
        self.held_fin_wait2.extend(listed);
    }

    /// Held FIN_WAIT2 sockets: key, inode, since.
    pub fn held_fin_wait2(&self) -> impl Iterator<Item = (&SockKey, u64, u64)> {
        self.held_fin_wait2
            .iter()
            .map(|(k, &(inode, since))| (k, inode, since))
    }

    /// Drops what is known of a namespace that no longer exists (the kernel destroyed
    /// its sockets with it).
    pub fn forget(&mut self, netns: u32) {
        self.held_fin_wait2.retain(|k, _| k.netns != netns);
        self.close_wait.retain(|k, _| k.netns != netns);
        self.probe_owners.retain(|k, _| k.netns != netns);
        self.over_limit.forget(netns);
    }

    /// Whether the socket is followed (in CLOSE_WAIT).
    pub fn follows(&self, key: &SockKey) -> bool {
        self.close_wait.contains_key(key)
    }

    fn key(&self, netns: u32, local: SocketAddr, remote: SocketAddr) -> SockKey {
        // Without the netns offset the probe reports 0: treat it as our own namespace.
        let netns = if netns == 0 { self.own_netns } else { netns };
        SockKey {
            netns,
            local: local.into(),
            remote: remote.into(),
        }
    }

    /// Applies one transition from the probe.
    pub fn apply(&mut self, t: &Transition) {
        self.apply_with(t, |_| None);
    }

    /// As `apply`; `holder` names a process holding a socket's fd (by inode), for
    /// closes the probe cannot attribute.
    pub fn apply_with(&mut self, t: &Transition, holder: impl Fn(u64) -> Option<u32>) {
        let key = self.key(t.netns, t.local, t.remote);
        if t.old == TcpState::CLOSE_WAIT {
            let entry = self.close_wait.remove(&key);
            self.probe_owners.remove(&key);
            let since = t
                .old_since_ns
                .or(entry.as_ref().map(|e| e.since_ns))
                .filter(|&s| s <= t.ts_ns);
            let Some(since) = since else {
                // It was in CLOSE_WAIT, but since when and held by whom is unknown
                // (already counted if it was left out over the limit).
                if !self.over_limit.contains(&key) {
                    self.untracked += 1;
                }
                return;
            };
            // Only a close() (or shutdown()) by the program is a close: a reset or a
            // timeout (CLOSE_WAIT -> CLOSE, e.g. keepalive probes unanswered) ends the
            // state without one, and so does the exit of the process holding it (the
            // kernel closes its files in its context). Neither is a slow close().
            if t.new != TcpState::LAST_ACK || t.exiting {
                self.ended_without_close += 1;
                return;
            }
            // The closer: the process whose close() ran now, else whoever held the fd.
            let (pid, comm) = match (&t.owner.source, &entry) {
                (OwnerSource::Context, _) => {
                    (t.owner.pid, t.owner.comm.as_deref().map(String::from))
                }
                (_, Some(e)) if holder(e.inode).is_some() => (holder(e.inode), None),
                _ => (t.owner.pid, t.owner.comm.as_deref().map(String::from)),
            };
            self.push_closed(ClosedCloseWait {
                at_ns: t.ts_ns,
                lifetime_ns: t.ts_ns - since,
                pid,
                comm,
            });
        }
        if t.new == TcpState::CLOSE_WAIT && self.room(&key) {
            match t.owner.pid {
                Some(pid) => {
                    _ = self.probe_owners.insert(
                        key,
                        ProbeOwner {
                            pid,
                            comm: t.owner.comm.as_deref().unwrap_or_default().to_string(),
                            source: t.owner.source,
                        },
                    )
                }
                None => _ = self.probe_owners.remove(&key),
            }
            // A reused 4-tuple replaces whatever was there.
            self.close_wait.insert(
                key,
                CloseWait {
                    since_ns: t.ts_ns,
                    age_source: AgeSource::Observed,
                    inode: t.inode,
                    recv_q: 0,
                    idle_ms: IDLE_UNKNOWN,
                    goodbye: false,
                    from_reconcile: false,
                    missed: 0,
                    listed_in: 0,
                },
            );
        }
    }

    /// Lifetimes (seconds) of the newest `n` closes still kept.
    pub fn newest_closed(&self, n: u64) -> impl Iterator<Item = f64> + '_ {
        let skip = self.closed.len().saturating_sub(n as usize);
        self.closed
            .iter()
            .skip(skip)
            .map(|c| c.lifetime_ns as f64 / 1e9)
    }

    fn push_closed(&mut self, c: ClosedCloseWait) {
        self.closed_total += 1;
        if self.closed.len() >= MAX_CLOSED {
            self.closed.pop_front();
        }
        self.closed.push_back(c);
    }

    /// Sockets that existed before connwatch: CLOSE_WAIT ages are estimated from the
    /// time since the peer's last ACK (its FIN, if nothing was sent after it).
    pub fn seed<'a>(
        &mut self,
        netns: u32,
        sockets: impl Iterator<Item = &'a DiagSocket> + Clone,
        now_ns: u64,
    ) {
        let close_wait = sockets.filter(|s| s.state == TcpState::CLOSE_WAIT);
        // Room at once, rather than a rehash at each doubling.
        self.close_wait.reserve(
            close_wait
                .clone()
                .count()
                .min(self.limit.saturating_sub(self.close_wait.len())),
        );
        for s in close_wait {
            let key = self.key(netns, s.local, s.remote);
            if self.room(&key) {
                self.close_wait
                    .entry(key)
                    .or_insert_with(|| estimated(s, now_ns, false));
            }
        }
    }

    /// Brings the table in line with a dump of one namespace's CLOSE_WAIT sockets:
    /// fills in what transitions do not carry (Recv-Q, the inode of a socket not yet
    /// accepted), adds sockets whose transition was missed and drops those that are gone.
    pub fn reconcile(&mut self, netns: u32, sockets: &[DiagSocket], now_ns: u64) {
        let netns = if netns == 0 { self.own_netns } else { netns };
        self.reconciles = self.reconciles.wrapping_add(1);
        let pass = self.reconciles;
        for s in sockets.iter().filter(|s| s.state == TcpState::CLOSE_WAIT) {
            let key = self.key(netns, s.local, s.remote);
            match self.close_wait.get_mut(&key) {
                Some(e) => {
                    e.listed_in = pass;
                    e.recv_q = unread(s);
                    if s.inode != 0 {
                        e.inode = s.inode;
                    }
                    e.missed = 0;
                    if e.from_reconcile {
                        // Still no transition a full period later: it was missed.
                        e.from_reconcile = false;
                        self.untracked += 1;
                    }
                }
                None => {
                    // Its transition may still be in the ring buffer: decided next time.
                    if self.close_wait.len() < self.limit {
                        let mut e = estimated(s, now_ns, true);
                        e.listed_in = pass;
                        self.close_wait.insert(key, e);
                    } else {
                        self.over_limit.note(key, u64::from(pass));
                    }
                }
            }
        }
        let mut gone = 0;
        self.close_wait.retain(|k, e| {
            if k.netns != netns || e.listed_in == pass {
                return true;
            }
            e.missed += 1;
            // Twice absent: closed without a transition connwatch saw.
            let keep = e.missed < 2;
            if !keep {
                gone += 1;
            }
            keep
        });
        self.untracked += gone;
        if gone > 0 {
            let Self {
                probe_owners,
                close_wait,
                ..
            } = self;
            probe_owners.retain(|k, _| close_wait.contains_key(k));
        }
        self.over_limit.sweep(netns, u64::from(pass));
    }

    /// Entries held: CLOSE_WAIT sockets followed, and closes kept for the window.
    pub fn sizes(&self) -> [(&'static str, u64); 4] {
        [
            ("close_wait", self.close_wait.len() as u64),
            ("close_wait_closed", self.closed.len() as u64),
            ("close_wait_over_limit", self.over_limit.len() as u64),
            ("fin_wait2_held", self.held_fin_wait2.len() as u64),
        ]
    }

    pub fn close_wait(&self) -> impl Iterator<Item = (&SockKey, &CloseWait)> {
        self.close_wait.iter()
    }

    /// The owner the probe named for a CLOSE_WAIT socket, when it knew one.
    pub fn probe_owner(&self, key: &SockKey) -> Option<&ProbeOwner> {
        self.probe_owners.get(key)
    }

    /// CLOSE_WAIT sockets closed at or after `from_ns`.
    pub fn closed_since(&self, from_ns: u64) -> impl Iterator<Item = &ClosedCloseWait> {
        self.closed.iter().filter(move |c| c.at_ns >= from_ns)
    }

    /// Forgets lifetimes that ended before `before_ns`.
    pub fn prune_closed(&mut self, before_ns: u64) {
        while self.closed.front().is_some_and(|c| c.at_ns < before_ns) {
            self.closed.pop_front();
        }
        self.closed.shrink_to(self.closed.len() * 2);
        shrink_idle(&mut self.close_wait);
    }
}

/// Gives back a map's memory once it holds less than a quarter of its capacity (after a
/// burst), keeping room for twice what it holds.
pub fn shrink_idle<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// Unread bytes of a CLOSE_WAIT socket. sock_diag's Recv-Q is `rcv_nxt - copied_seq`,
/// which counts the peer's FIN as one byte: that byte is not data.
fn unread(s: &DiagSocket) -> u32 {
    s.recv_q.saturating_sub(1)
}

fn estimated(s: &DiagSocket, now_ns: u64, from_reconcile: bool) -> CloseWait {
    let age_ns = u64::from(s.last_ack_recv_ms.unwrap_or(0)) * 1_000_000;
    CloseWait {
        since_ns: now_ns.saturating_sub(age_ns),
        age_source: AgeSource::Estimated,
        inode: s.inode,
        recv_q: unread(s),
        idle_ms: if s.last_ack_recv_ms.is_some() {
            idle_before_fin(s, age_ns)
        } else {
            IDLE_UNKNOWN
        },
        goodbye: goodbye(s),
        from_reconcile,
        missed: 0,
        listed_in: 0,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use connwatch_common::tcp_state::*;

    use super::*;
    use crate::decode::Owner;

    pub const NS: u32 = 4026531840;
    const SEC: u64 = 1_000_000_000;

    pub fn tr(ts_s: f64, old: u8, new: u8, local: &str, remote: &str) -> Transition {
        Transition {
            ts_ns: (ts_s * 1e9) as u64,
            skaddr: 0xffff_0000,
            old_since_ns: None,
            inode: 0,
            netns: NS,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            old: TcpState(old),
            new: TcpState(new),
            owner: Owner {
                pid: None,
                comm: None,
                source: OwnerSource::Unknown,
            },
            task_pid: 1,
            task_comm: "bystander".into(),
            leaves: Default::default(),
            exiting: false,
        }
    }

    pub fn enter_cw(ts_s: f64, local: &str, remote: &str, inode: u64) -> Transition {
        let mut t = tr(ts_s, ESTABLISHED, CLOSE_WAIT, local, remote);
        t.inode = inode;
        t
    }

    pub fn close_cw(ts_s: f64, local: &str, remote: &str, pid: u32) -> Transition {
        let mut t = tr(ts_s, CLOSE_WAIT, LAST_ACK, local, remote);
        t.owner = Owner {
            pid: Some(pid),
            comm: Some("server".into()),
            source: OwnerSource::Context,
        };
        t
    }

    pub fn diag(state: u8, local: &str, remote: &str, inode: u64, lastack_ms: u32) -> DiagSocket {
        DiagSocket {
            state: TcpState(state),
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            inode,
            uid: 0,
            recv_q: 5,
            timewait: false,
            expires_ms: 0,
            last_ack_recv_ms: Some(lastack_ms),
            last_data_recv_ms: None,
            last_data_sent_ms: None,
            bytes_received: None,
        }
    }

    const L: &str = "127.0.0.1:8080";
    const R1: &str = "127.0.0.1:40001";
    const R2: &str = "127.0.0.1:40002";
    const R3: &str = "127.0.0.1:40003";

    #[test]
    fn leak_stays_with_observed_age() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(10.0, L, R1, 77));
        let (k, cw) = t.close_wait().next().unwrap();
        assert_eq!(k.remote, R1.parse::<SocketAddr>().unwrap());
        assert_eq!(cw.since_ns, 10 * SEC);
        assert_eq!(cw.age_source, AgeSource::Observed);
        assert_eq!(cw.inode, 77);
        assert_eq!(t.closed_since(0).count(), 0);
    }

    #[test]
    fn only_sockets_in_close_wait_long_enough_want_evidence() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(10.0, L, R1, 77));
        // Entered at 10 s: not by 9.9 s, by 10 s and later.
        assert!(t.wanting_evidence(9 * SEC + 9 * SEC / 10).is_empty());
        assert_eq!(t.wanting_evidence(10 * SEC), [NS].into());
        // Asked once, it wants nothing more at any age.
        t.fill_evidence(NS, &[diag(CLOSE_WAIT, L, R1, 77, 10)], 11 * SEC);
        assert!(t.wanting_evidence(u64::MAX).is_empty());
        // A second, younger one wants it only once old enough.
        t.apply(&enter_cw(20.0, L, R2, 78));
        assert!(t.wanting_evidence(19 * SEC).is_empty());
        assert_eq!(t.wanting_evidence(u64::MAX), [NS].into());
    }

    #[test]
    fn prompt_close_records_lifetime_and_closer() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(10.0, L, R1, 77));
        t.apply(&close_cw(10.25, L, R1, 4242));
        assert_eq!(t.close_wait().count(), 0);
        let closed: Vec<_> = t.closed_since(0).collect();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].lifetime_ns, SEC / 4);
        assert_eq!(closed[0].pid, Some(4242));
        assert_eq!(t.untracked, 0);
    }

    #[test]
    fn reused_four_tuple_starts_afresh() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(10.0, L, R1, 77));
        t.apply(&close_cw(11.0, L, R1, 1));
        t.apply(&enter_cw(20.0, L, R1, 78));
        let (_, cw) = t.close_wait().next().unwrap();
        assert_eq!((cw.since_ns, cw.inode), (20 * SEC, 78));
    }

    #[test]
    fn probe_owners_go_with_their_sockets() {
        let mut t = Table::new(NS);
        let named = |ts, remote, pid| {
            let mut e = enter_cw(ts, L, remote, 77);
            e.owner = Owner {
                pid: Some(pid),
                comm: Some("client".into()),
                source: OwnerSource::Carried,
            };
            e
        };
        t.apply(&named(10.0, R1, 42));
        t.apply(&named(10.0, R2, 43));
        let key = |remote: &str| {
            t.close_wait()
                .find(|(k, _)| k.remote == remote.parse::<SocketAddr>().unwrap())
                .map(|(k, _)| *k)
        };
        let (k1, k2) = (key(R1).unwrap(), key(R2).unwrap());
        assert_eq!(
            t.probe_owner(&k1).map(|o| (o.pid, o.comm.as_str())),
            Some((42, "client"))
        );
        // A reused 4-tuple entered without a named owner has none.
        t.apply(&close_cw(11.0, L, R1, 42));
        assert_eq!(t.probe_owner(&k1), None);
        t.apply(&enter_cw(12.0, L, R1, 78));
        assert_eq!(t.probe_owner(&k1), None);
        assert_eq!(t.probe_owner(&k2).map(|o| o.pid), Some(43));
        // Twice missing from the namespace's dumps: gone with its owner.
        t.reconcile(NS, &[], 20 * SEC);
        t.reconcile(NS, &[], 21 * SEC);
        assert_eq!(t.close_wait().count(), 0);
        assert_eq!(t.probe_owners.len(), 0);
        t.apply(&named(30.0, R2, 44));
        t.forget(NS);
        assert_eq!(t.probe_owners.len(), 0);
    }

    #[test]
    fn same_tuple_in_two_namespaces_are_two_sockets() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(10.0, L, R1, 77));
        let mut other = enter_cw(11.0, L, R1, 99);
        other.netns = NS + 1;
        t.apply(&other);
        assert_eq!(t.close_wait().count(), 2);
    }

    #[test]
    fn close_of_unknown_socket_is_counted_untracked() {
        let mut t = Table::new(NS);
        t.apply(&close_cw(5.0, L, R1, 1));
        assert_eq!(t.untracked, 1);
        assert_eq!(t.closed_since(0).count(), 0);
        // With the kernel's own entry time the lifetime is still known.
        let mut c = close_cw(5.0, L, R2, 1);
        c.old_since_ns = Some(2 * SEC);
        t.apply(&c);
        assert_eq!(t.closed_since(0).next().unwrap().lifetime_ns, 3 * SEC);
        assert_eq!(t.untracked, 1);
    }

    #[test]
    fn seeded_sockets_have_estimated_ages() {
        let mut t = Table::new(NS);
        t.seed(
            NS,
            [
                diag(CLOSE_WAIT, L, R1, 77, 3_924),
                diag(ESTABLISHED, L, R2, 78, 0),
            ]
            .iter(),
            100 * SEC,
        );
        let cws: Vec<_> = t.close_wait().collect();
        assert_eq!(cws.len(), 1);
        assert_eq!(cws[0].1.age_source, AgeSource::Estimated);
        assert_eq!(cws[0].1.since_ns, 100 * SEC - 3_924_000_000);
        assert_eq!(cws[0].1.recv_q, 4, "the FIN is not unread data");
    }

    #[test]
    fn reconcile_fills_inode_and_drops_vanished_sockets() {
        let mut t = Table::new(NS);
        // Entered CLOSE_WAIT before accept(): no file, no inode yet.
        t.apply(&enter_cw(10.0, L, R1, 0));
        t.apply(&enter_cw(10.0, L, R2, 88));
        t.reconcile(NS, &[diag(CLOSE_WAIT, L, R1, 77, 0)], 12 * SEC);
        let r1 = t
            .close_wait()
            .find(|(k, _)| k.remote == R1.parse::<SocketAddr>().unwrap())
            .unwrap();
        assert_eq!(r1.1.inode, 77);
        assert_eq!(r1.1.age_source, AgeSource::Observed);
        // R2 missing once: kept (its close may still be in flight); twice: gone, counted.
        assert_eq!(t.close_wait().count(), 2);
        t.reconcile(NS, &[diag(CLOSE_WAIT, L, R1, 77, 0)], 14 * SEC);
        assert_eq!(t.close_wait().count(), 1);
        assert_eq!(t.untracked, 1);
    }

    #[test]
    fn reconcile_leaves_other_namespaces_alone() {
        let mut t = Table::new(NS);
        let mut other = enter_cw(10.0, L, R1, 77);
        other.netns = NS + 7;
        t.apply(&other);
        t.reconcile(NS, &[], 12 * SEC);
        t.reconcile(NS, &[], 14 * SEC);
        assert_eq!(t.close_wait().count(), 1);
    }

    #[test]
    fn socket_found_only_by_reconcile_counts_as_untracked_once_confirmed() {
        let mut t = Table::new(NS);
        t.reconcile(NS, &[diag(CLOSE_WAIT, L, R1, 77, 1_000)], 12 * SEC);
        assert_eq!(t.untracked, 0);
        // Its transition arrives late: observed, nothing lost.
        t.apply(&enter_cw(11.5, L, R1, 77));
        t.reconcile(NS, &[diag(CLOSE_WAIT, L, R1, 77, 1_000)], 14 * SEC);
        assert_eq!(t.untracked, 0);
        // Another never gets its transition.
        t.reconcile(
            NS,
            &[
                diag(CLOSE_WAIT, L, R1, 77, 0),
                diag(CLOSE_WAIT, L, R2, 78, 500),
            ],
            16 * SEC,
        );
        t.reconcile(
            NS,
            &[
                diag(CLOSE_WAIT, L, R1, 77, 0),
                diag(CLOSE_WAIT, L, R2, 78, 500),
            ],
            18 * SEC,
        );
        assert_eq!(t.untracked, 1);
    }

    #[test]
    fn idle_maps_give_memory_back() {
        let mut m: HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        let full = m.capacity();
        m.retain(|&k, _| k < 10);
        shrink_idle(&mut m);
        assert!(m.capacity() < full / 100, "{} of {full}", m.capacity());
        assert_eq!(m.len(), 10);
        // A map in use is left alone.
        let mut busy: HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        let cap = busy.capacity();
        shrink_idle(&mut busy);
        assert_eq!(busy.capacity(), cap);
    }

    #[test]
    fn a_goodbye_is_told_from_a_reply_never_read() {
        let sock = |recv_q: u32, received: u64, sent_ms: u32, recv_ms: u32| {
            let mut d = diag(CLOSE_WAIT, L, R1, 77, recv_ms);
            d.recv_q = recv_q;
            d.bytes_received = Some(received);
            d.last_data_sent_ms = Some(sent_ms);
            d.last_data_recv_ms = Some(recv_ms);
            d
        };
        // PostgreSQL's idle_session_timeout: answers read, then 3 s of quiet, then its
        // FATAL notice with the FIN.
        assert!(goodbye(&sock(101, 600, 5_000, 2_000)));
        // Go's unclosed resp.Body: the reply is all the peer ever sent.
        assert!(!goodbye(&sock(301, 301, 3_000, 2_990)));
        // A second request's answer never read: it came right after the request.
        assert!(!goodbye(&sock(301, 900, 4_000, 3_990)));
        // A server that never reads a client's request (nothing of ours was sent).
        assert!(!goodbye(&sock(101, 101, u32::MAX, 1_000)));
        // Nothing unread, or no tcp_info: no goodbye to tell.
        assert!(!goodbye(&sock(1, 600, 5_000, 2_000)));
        assert!(!goodbye(&diag(CLOSE_WAIT, L, R1, 77, 0)));
    }

    #[test]
    fn resets_and_exits_are_not_closes() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(10.0, L, R1, 77));
        t.apply(&enter_cw(10.0, L, R2, 78));
        t.apply(&enter_cw(10.0, L, R3, 79));
        // Reset by the peer or timed out by keepalive: ->CLOSE in softirq.
        t.apply(&tr(13.0, CLOSE_WAIT, CLOSE, L, R1));
        // The process holding it exits: the kernel closes its files in its context.
        let mut exit = close_cw(14.0, L, R2, 4242);
        exit.exiting = true;
        t.apply(&exit);
        assert_eq!(t.close_wait().count(), 1);
        assert_eq!(t.closed_since(0).count(), 0, "neither is a close()");
        assert_eq!(t.ended_without_close, 2);
        // A close() by the program is one.
        t.apply(&close_cw(15.0, L, R3, 4242));
        assert_eq!(t.closed_since(0).count(), 1);
        assert_eq!(t.untracked, 0);
    }

    #[test]
    fn the_limit_bounds_memory_and_counts_the_rest() {
        let mut t = Table::new(NS);
        t.set_limit(2);
        for i in 0..5 {
            t.apply(&enter_cw(1.0, L, &format!("127.0.0.1:{}", 41000 + i), i));
        }
        assert_eq!(t.close_wait().count(), 2);
        assert_eq!(t.untracked(), 3);
        // A socket already followed still updates.
        t.apply(&enter_cw(2.0, L, "127.0.0.1:41000", 9));
        assert_eq!(t.untracked(), 3);
        // One left out closes: it was counted already.
        t.apply(&close_cw(3.0, L, "127.0.0.1:41004", 1));
        assert_eq!(t.untracked(), 3);
    }

    /// The same sockets over the limit, listed by dump after dump, count once each; a
    /// socket that is gone and comes back on the same 4-tuple counts again.
    #[test]
    fn sockets_over_the_limit_count_once() {
        let mut t = Table::new(NS);
        t.set_limit(2);
        let dump: Vec<DiagSocket> = (0..5)
            .map(|i| diag(8, L, &format!("127.0.0.1:{}", 41000 + i), i + 1, 10))
            .collect();
        for round in 0..10 {
            t.reconcile(NS, &dump, (round + 1) * SEC);
        }
        assert_eq!(t.close_wait().count(), 2);
        // Two were followed from reconcile without a transition (counted once each as
        // missed), three never fitted (counted once each).
        assert_eq!(t.untracked(), 5);
        let fewer: Vec<DiagSocket> = dump.iter().take(4).cloned().collect();
        t.reconcile(NS, &fewer, 20 * SEC);
        t.reconcile(NS, &dump, 21 * SEC);
        assert_eq!(t.untracked(), 6, "the socket that came back is a new one");
    }

    #[test]
    fn prune_forgets_old_lifetimes() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(1.0, L, R1, 1));
        t.apply(&close_cw(2.0, L, R1, 1));
        t.apply(&enter_cw(3.0, L, R2, 2));
        t.apply(&close_cw(9.0, L, R2, 1));
        t.prune_closed(5 * SEC);
        assert_eq!(t.closed_since(0).count(), 1);
    }
}
