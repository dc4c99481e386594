//! The passes that fold a snapshot into per-process accumulators, one per kind of
//! evidence: CLOSE_WAIT sockets, TIME_WAIT sockets, ephemeral-port pressure, and
//! CLOSE_WAIT sockets closed within the window.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rustc_hash::FxHashMap;

use super::{GroupBy, Listening, Snapshot, Unattributed, key::counting_holders, round3};
use crate::{
    decode::{OwnerSource, TcpState},
    monitor::table::{AgeSource, Endpoint, QUIET_SPELL_MS, SockKey},
};

/// What one process accumulates over the passes.
#[derive(Default)]
pub(super) struct Acc {
    pub close_wait: u64,
    pub oldest_ns: Option<(u64, AgeSource)>,
    pub recv_q: u64,
    pub time_wait: u64,
    pub tw_oldest_ns: Option<u64>,
    /// TIME_WAITs per local port that the process listens on (server closed first).
    pub tw_on_listen_port: BTreeMap<u16, u64>,
    pub tw_created: u64,
    /// FIN_WAIT2 sockets it closed whose peer has not closed yet (orphans).
    pub fin_wait2: u64,
    pub fw2_oldest_ns: Option<u64>,
    /// Per peer address: FIN_WAIT2 sockets waiting longer than --fin-wait2-age, and the
    /// oldest wait.
    pub fw2_waiting: HashMap<std::net::IpAddr, (u64, u64)>,
    /// Per peer: CLOSE_WAIT, TIME_WAIT and FIN_WAIT2 sockets.
    pub peers: FxHashMap<PeerKey, [u64; 3]>,
    /// Peers on this host: the process holding the other end (a CLOSE_WAIT socket
    /// connwatch names), per peer; `None` where the peer's sockets are held by several
    /// (a server's peer `addr:*` groups every client on that address).
    pub peer_pids: FxHashMap<PeerKey, Option<u32>>,
    pub sources: BTreeSet<&'static str>,
    /// Lifetimes of its CLOSE_WAIT sockets closed within the window.
    pub closed: Vec<u64>,
    pub comm: Option<String>,
    pub pressure: Vec<Pressure>,
    /// CLOSE_WAIT sockets the peer closed after a quiet spell with nothing unread
    /// (pooled connections timed out by the server's keep-alive).
    pub cw_idle: u64,
    /// CLOSE_WAIT sockets with unread bytes that the program never read (a reply,
    /// or all the peer sent).
    pub cw_unread: u64,
    /// Of `cw_idle`, those whose unread bytes are the peer's goodbye.
    pub cw_goodbye: u64,
    /// CLOSE_WAIT sockets per leak site (where made, where EOF was read).
    pub sites: FxHashMap<crate::stacks::SiteId, u64>,
}

pub(super) type Accs = BTreeMap<u32, Acc>;

impl Acc {
    /// Records that `pid` holds the other end of a connection to `peer` (`None`: one
    /// that several processes hold): named only while it is the only one.
    pub fn peer_holder(&mut self, peer: PeerKey, pid: Option<u32>) {
        let e = self.peer_pids.entry(peer).or_insert(pid);
        if *e != pid {
            *e = None;
        }
    }

    /// Adds another process's evidence (rows grouped by command or unit).
    pub fn merge(&mut self, o: Acc) {
        self.close_wait += o.close_wait;
        if let Some((age, src)) = o.oldest_ns
            && self.oldest_ns.is_none_or(|(mine, _)| age > mine)
        {
            self.oldest_ns = Some((age, src));
        }
        self.recv_q += o.recv_q;
        self.time_wait += o.time_wait;
        self.tw_oldest_ns = self.tw_oldest_ns.max(o.tw_oldest_ns);
        for (port, n) in o.tw_on_listen_port {
            *self.tw_on_listen_port.entry(port).or_insert(0) += n;
        }
        self.tw_created += o.tw_created;
        self.fin_wait2 += o.fin_wait2;
        self.fw2_oldest_ns = self.fw2_oldest_ns.max(o.fw2_oldest_ns);
        for (ip, (n, oldest)) in o.fw2_waiting {
            let e = self.fw2_waiting.entry(ip).or_insert((0, 0));
            e.0 += n;
            e.1 = e.1.max(oldest);
        }
        for (peer, counts) in o.peers {
            let e = self.peers.entry(peer).or_default();
            for (mine, theirs) in e.iter_mut().zip(counts) {
                *mine += theirs;
            }
        }
        for (peer, pid) in o.peer_pids {
            self.peer_holder(peer, pid);
        }
        self.sources.extend(o.sources);
        self.closed.extend(o.closed);
        self.cw_idle += o.cw_idle;
        self.cw_unread += o.cw_unread;
        self.cw_goodbye += o.cw_goodbye;
        for (site, n) in o.sites {
            *self.sites.entry(site).or_insert(0) += n;
        }
        if self.comm.is_none() {
            self.comm = o.comm;
        }
        for p in o.pressure {
            if !self.pressure.iter().any(|x| x.dest == p.dest) {
                self.pressure.push(p);
            }
        }
    }
}

/// One destination whose ephemeral ports are running short.
#[derive(Clone, Debug, PartialEq)]
pub struct Pressure {
    pub dest: String,
    pub count: u64,
    pub range: [u16; 2],
    pub tw_reuse: Option<u32>,
    pub pct: f64,
}

/// CLOSE_WAIT sockets, counted for every process holding them (a socket shared after
/// fork counts for each holder), or for the owner the probe saw.
pub(super) fn close_wait(
    s: &Snapshot,
    by: GroupBy,
    accs: &mut Accs,
    unattributed: &mut Unattributed,
) {
    for (key, cw) in s.table.close_wait() {
        let age_ns = s.now_ns.saturating_sub(cw.since_ns);
        let holders = s.holders.holders(cw.inode);
        let (pids, source): (&[u32], &'static str) = if !holders.is_empty() {
            (holders, OwnerSource::Fd.as_str())
        } else if let Some(owner) = s.table.probe_owner(key) {
            (std::slice::from_ref(&owner.pid), owner.source.as_str())
        } else {
            unattributed.close_wait += 1;
            continue;
        };
        let peer = peer_addr(key, s.listening);
        let sites = s.sites.map(|b| b.of(cw.inode)).unwrap_or_default();
        let counting = counting_holders(pids, by, s.procs);
        for &pid in pids.iter().filter(|p| !counting.contains(p)) {
            // In its row already, through another holder: listed, not counted twice.
            accs.entry(pid).or_default();
        }
        for &pid in counting.iter() {
            let a = accs.entry(pid).or_default();
            a.close_wait += 1;
            if a.oldest_ns.is_none_or(|(o, _)| age_ns > o) {
                a.oldest_ns = Some((age_ns, cw.age_source));
            }
            a.recv_q += u64::from(cw.recv_q);
            if cw.goodbye {
                // The peer's parting notice on an idle session: the idle-pool cause.
                a.cw_idle += 1;
                a.cw_goodbye += 1;
            } else if cw.recv_q > 0 {
                a.cw_unread += 1;
            } else if cw
                .idle_before_fin_ms()
                .is_some_and(|ms| ms >= QUIET_SPELL_MS)
            {
                a.cw_idle += 1;
            }
            if let Some(p) = a.peers.get_mut(&peer) {
                p[0] += 1;
            } else {
                a.peers.insert(peer, [1, 0, 0]);
            }
            a.sources.insert(source);
            for site in sites.made.into_iter().chain(sites.eof) {
                *a.sites.entry(site).or_insert(0) += 1;
            }
            if a.comm.is_none() {
                a.comm = s.table.probe_owner(key).map(|o| o.comm.clone());
            }
        }
    }
}

/// Destinations reached from ephemeral ports: (netns, remote) → TIME_WAIT count.
pub(super) type PerDest = FxHashMap<(u32, Endpoint), u64>;

/// TIME_WAIT sockets, counted for the process that closed first, and the TIME_WAITs it
/// created within the window. Fills `per_dest` (emptied first) with the TIME_WAITs per
/// destination, for port pressure.
pub(super) fn time_wait(
    s: &Snapshot,
    window_start: u64,
    accs: &mut Accs,
    unattributed: &mut Unattributed,
    per_dest: &mut PerDest,
) {
    per_dest.clear();
    // Every followed TIME_WAIT, tens of thousands on an idle host, at every report: one
    // listener lookup each, and the namespace's port range and the owner's last source
    // remembered from the socket before (they rarely change from one to the next).
    let mut ns_range: Option<(u32, Option<std::ops::RangeInclusive<u16>>)> = None;
    let mut last_source: Option<(u32, &'static str)> = None;
    for (key, tw) in s.timewait.tracked() {
        if tw.substate != TcpState::TIME_WAIT {
            continue;
        }
        let port = key.local.port();
        let listeners = s.listening.get(&(key.netns, port));
        let range = match &ns_range {
            Some((ns, range)) if *ns == key.netns => range,
            _ => {
                let range = s.kernel.get(&key.netns).map(|k| k.ephemeral());
                &ns_range.insert((key.netns, range)).1
            }
        };
        let ephemeral = range.as_ref().is_some_and(|r| r.contains(&port));
        if ephemeral && listeners.is_none() {
            *per_dest.entry((key.netns, key.remote)).or_insert(0) += 1;
        }
        let Some(owner) = &tw.owner else {
            unattributed.time_wait += 1;
            continue;
        };
        let a = accs.entry(owner.pid).or_default();
        a.time_wait += 1;
        let age = s.now_ns.saturating_sub(tw.entered_ns);
        a.tw_oldest_ns = Some(a.tw_oldest_ns.map_or(age, |o| o.max(age)));
        a.peers
            .entry(peer_key(key, listeners.is_some()))
            .or_default()[1] += 1;
        let source = (owner.pid, tw.owner_source.as_str());
        if last_source != Some(source) {
            a.sources.insert(source.1);
            last_source = Some(source);
        }
        if listeners.is_some_and(|pids| pids.contains(&owner.pid)) {
            *a.tw_on_listen_port.entry(port).or_insert(0) += 1;
        }
        if a.comm.is_none() {
            a.comm = Some(owner.comm.to_string());
        }
    }
    for (_, pid) in s.timewait.created_since(window_start) {
        if let Some(pid) = pid {
            accs.entry(*pid).or_default().tw_created += 1;
        }
    }
}

/// FIN_WAIT2: connections a process closed (or shut down) first whose peer has not
/// closed yet, the kernel's orphans counted for the process that closed them and held
/// ones for the processes holding them, and per peer address those that waited longer
/// than `fin_wait2_age_ns` (the peer's program is not closing its sockets).
pub(super) fn fin_wait2(s: &Snapshot, fin_wait2_age_ns: u64, by: GroupBy, accs: &mut Accs) {
    // Orphans (the process closed) with a known owner, and held ones (it shut down its
    // side and keeps the socket): usually few beside the CLOSE_WAIT sockets.
    let orphans: Vec<_> = s
        .timewait
        .tracked()
        .filter(|(_, tw)| tw.substate == TcpState::FIN_WAIT2 && tw.owner.is_some())
        .collect();
    let held: Vec<_> = s.table.held_fin_wait2().collect();
    let peers_wanted: HashSet<(Endpoint, Endpoint)> = (orphans.iter().map(|(k, _)| *k))
        .chain(held.iter().map(|(k, ..)| *k))
        .map(|k| (k.remote, k.local))
        .collect();
    let local_peers = named_close_waits(s, &peers_wanted);
    // Waiting on a peer that is a CLOSE_WAIT socket on this host whose holder connwatch
    // names: that process is the one not closing, and its own row says so; the one that
    // closed properly is not blamed for it, and its `peers` name that process. (A
    // loopback peer is the same socket only in the same namespace.)
    let local_holder = |key: &SockKey| {
        local_peers.get(&(key.remote, key.local)).and_then(|ends| {
            ends.iter()
                .find(|(ns, _)| *ns == key.netns || !key.remote.ip().is_loopback())
                .map(|(_, pid)| *pid)
        })
    };
    for (key, tw) in orphans {
        let Some(owner) = &tw.owner else {
            continue;
        };
        let a = accs.entry(owner.pid).or_default();
        a.fin_wait2 += 1;
        let age = s.now_ns.saturating_sub(tw.entered_ns);
        a.fw2_oldest_ns = Some(a.fw2_oldest_ns.map_or(age, |o| o.max(age)));
        let peer = peer_addr(key, s.listening);
        a.peers.entry(peer).or_default()[2] += 1;
        a.sources.insert(tw.owner_source.as_str());
        let holder = local_holder(key);
        a.peer_holder(peer, holder);
        if age > fin_wait2_age_ns && holder.is_none() {
            let w = a.fw2_waiting.entry(key.remote.ip()).or_insert((0, 0));
            w.0 += 1;
            w.1 = w.1.max(age);
        }
        if a.comm.is_none() {
            a.comm = Some(owner.comm.to_string());
        }
    }
    // Held ones: whoever holds the fd waits.
    for (key, inode, since) in held {
        let age = s.now_ns.saturating_sub(since);
        let holder = local_holder(key);
        let peer = peer_addr(key, s.listening);
        let holders = s.holders.holders(inode);
        let counting = counting_holders(holders, by, s.procs);
        for &pid in holders.iter().filter(|p| !counting.contains(p)) {
            accs.entry(pid).or_default();
        }
        for &pid in counting.iter() {
            let a = accs.entry(pid).or_default();
            a.fin_wait2 += 1;
            a.fw2_oldest_ns = Some(a.fw2_oldest_ns.map_or(age, |o| o.max(age)));
            a.peers.entry(peer).or_default()[2] += 1;
            a.sources.insert(OwnerSource::Fd.as_str());
            a.peer_holder(peer, holder);
            if age > fin_wait2_age_ns && holder.is_none() {
                let w = a.fw2_waiting.entry(key.remote.ip()).or_insert((0, 0));
                w.0 += 1;
                w.1 = w.1.max(age);
            }
        }
    }
}

/// The CLOSE_WAIT sockets on this host at one of the `wanted` (local, remote) pairs whose
/// holder connwatch names (a process holding the fd, or the owner the probe saw), by
/// (local, remote), with their namespace and holder. Only the wanted pairs: a map of all
/// 50,000 CLOSE_WAIT sockets per report cost milliseconds and left its 50,000 small
/// blocks in the heap.
fn named_close_waits(
    s: &Snapshot,
    wanted: &HashSet<(Endpoint, Endpoint)>,
) -> HashMap<(Endpoint, Endpoint), Vec<(u32, u32)>> {
    let mut named: HashMap<(Endpoint, Endpoint), Vec<(u32, u32)>> = HashMap::new();
    if wanted.is_empty() {
        return named;
    }
    for (key, cw) in s.table.close_wait() {
        if !wanted.contains(&(key.local, key.remote)) {
            continue;
        }
        let holder = s
            .holders
            .holders(cw.inode)
            .first()
            .copied()
            .or_else(|| s.table.probe_owner(key).map(|o| o.pid));
        if let Some(pid) = holder {
            named
                .entry((key.local, key.remote))
                .or_default()
                .push((key.netns, pid));
        }
    }
    named
}

/// Port pressure: every process with TIME_WAITs to a destination whose count is over
/// `threshold_pct` of its namespace's ephemeral port range.
pub(super) fn port_pressure(s: &Snapshot, per_dest: &PerDest, threshold_pct: f64, accs: &mut Accs) {
    for ((ns, dest), count) in per_dest {
        let Some(k) = s.kernel.get(ns) else {
            continue;
        };
        let pct = *count as f64 * 100.0 / k.ephemeral_count() as f64;
        if pct <= threshold_pct {
            continue;
        }
        let p = Pressure {
            dest: dest.to_string(),
            count: *count,
            range: k.ip_local_port_range,
            tw_reuse: k.tcp_tw_reuse,
            pct,
        };
        for (key, tw) in s.timewait.tracked() {
            if key.netns == *ns
                && key.remote == *dest
                && tw.substate == TcpState::TIME_WAIT
                && let Some(o) = &tw.owner
            {
                let a = accs.entry(o.pid).or_default();
                if !a.pressure.iter().any(|x| x.dest == p.dest) {
                    a.pressure.push(p.clone());
                }
            }
        }
    }
}

/// CLOSE_WAIT sockets closed within the window: their lifetimes, per process.
pub(super) fn closed(s: &Snapshot, window_start: u64, accs: &mut Accs) {
    for c in s.table.closed_since(window_start) {
        if let Some(pid) = c.pid {
            let a = accs.entry(pid).or_default();
            a.closed.push(c.lifetime_ns);
            if a.comm.is_none() {
                a.comm.clone_from(&c.comm);
            }
        }
    }
}

/// A peer: its address, and its port unless it is a client of ours (`None`, shown `*`).
/// Formatted once per distinct peer, not once per socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct PeerKey(std::net::IpAddr, Option<u16>);

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0, self.1) {
            (ip, Some(port)) => write!(f, "{}", std::net::SocketAddr::new(ip, port)),
            (std::net::IpAddr::V4(ip), None) => write!(f, "{ip}:*"),
            (std::net::IpAddr::V6(ip), None) => write!(f, "[{ip}]:*"),
        }
    }
}

/// A peer as `addr:port`; on the server side (a listener's port) the client's ephemeral
/// port says nothing, so its sockets are grouped as `addr:*`.
pub(super) fn peer_addr(key: &SockKey, listening: &Listening) -> PeerKey {
    peer_key(key, listening.contains_key(&(key.netns, key.local.port())))
}

/// `peer_addr` where whether the local port is a listener's is already known.
fn peer_key(key: &SockKey, on_listener: bool) -> PeerKey {
    PeerKey(key.remote.ip(), (!on_listener).then(|| key.remote.port()))
}

/// Count, nearest-rank p50 and p99, and maximum of lifetimes (ns), in seconds.
pub(super) fn closed_stats(lifetimes: &mut [u64]) -> super::ClosedStats {
    if lifetimes.is_empty() {
        return super::ClosedStats::default();
    }
    lifetimes.sort_unstable();
    let pct = |p: f64| {
        let rank = ((p / 100.0) * lifetimes.len() as f64).ceil() as usize;
        let at = rank.clamp(1, lifetimes.len()) - 1;
        lifetimes.get(at).map_or(0.0, |&ns| round3(ns as f64 / 1e9))
    };
    super::ClosedStats {
        count: lifetimes.len() as u64,
        p50_s: Some(pct(50.0)),
        p99_s: Some(pct(99.0)),
        max_s: lifetimes.last().map(|&m| round3(m as f64 / 1e9)),
    }
}
