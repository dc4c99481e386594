//! The per-process report: counts, ages, growth, fd headroom, TIME_WAIT costs, flags and
//! the sentence that explains each flag. Pure: built from the socket table, the timewait
//! tracker, process facts and a clock reading, so that tests drive it with synthetic input.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::Duration,
};

use serde::Serialize;

use crate::{
    decode::TcpState,
    kernelinfo::KernelInfo,
    owners::ProcInfo,
    sockdiag::DiagSocket,
    table::{AgeSource, SockKey, Table},
    timewait::{End, Tracker},
};

pub const FLAG_CLOSE_WAIT_LEAK: &str = "close_wait_leak";
pub const FLAG_CLOSE_WAIT_SLOW: &str = "close_wait_slow";
pub const FLAG_ACTIVE_CLOSER: &str = "active_closer";
pub const FLAG_PORT_PRESSURE: &str = "port_pressure";

/// Peers listed per process.
const TOP_PEERS: usize = 5;

#[derive(Clone, Copy, Debug)]
pub struct ReportConfig {
    /// A CLOSE_WAIT socket older than this is a leak; a p99 lifetime above it is slow.
    pub close_wait_age: Duration,
    /// Growth, rates and lifetimes are measured over this much recent time.
    pub window: Duration,
    /// A listener holding at least this many TIME_WAIT sockets on its port closes first.
    pub time_wait_min: u64,
    /// TIME_WAITs towards one destination above this percentage of the ephemeral port
    /// range put new connections to it at risk.
    pub port_pressure_pct: f64,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            close_wait_age: Duration::from_secs(60),
            window: Duration::from_secs(300),
            time_wait_min: 100,
            port_pressure_pct: 50.0,
        }
    }
}

/// Loss counters shown in every report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Loss {
    pub events_dropped: u64,
    pub sockets_untracked: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Unattributed {
    pub close_wait: u64,
    pub time_wait: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Peer {
    pub addr: String,
    pub close_wait: u64,
    pub time_wait: u64,
}

/// Lifetimes of CLOSE_WAIT sockets that ended within the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClosedStats {
    pub count: u64,
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub max_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub comm: String,
    /// cgroup v2 path: the container or service the process runs in.
    pub cgroup: Option<String>,
    pub close_wait: u64,
    pub close_wait_oldest_s: Option<f64>,
    pub close_wait_age_source: Option<&'static str>,
    pub time_wait: u64,
    pub time_wait_oldest_s: Option<f64>,
    pub fds: Option<u64>,
    pub fd_limit: Option<u64>,
    pub flags: Vec<&'static str>,
    pub reason: Option<String>,
    pub peers: Vec<Peer>,
    pub owner_sources: Vec<&'static str>,
    /// Net change of the CLOSE_WAIT count per minute over the window.
    pub close_wait_growth_per_min: Option<f64>,
    /// Bytes received and never read, summed over its CLOSE_WAIT sockets.
    pub close_wait_recv_q_bytes: u64,
    /// At the current growth, seconds until the soft fd limit is reached.
    pub fds_exhausted_in_s: Option<f64>,
    pub close_wait_closed: ClosedStats,
    /// TIME_WAIT sockets it caused per second over the window (seen entering).
    pub time_wait_created_per_s: Option<f64>,
}

/// How TIME_WAIT sockets ended within the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TimeWaitEnds {
    pub expired: u64,
    pub early: u64,
    /// Median lifetime of those that expired (the kernel's TCP_TIMEWAIT_LEN, 60 s).
    pub expired_p50_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub time: String,
    pub elapsed_s: f64,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub states: BTreeMap<String, u64>,
    pub processes: Vec<ProcessRow>,
    pub unattributed: Unattributed,
    pub loss: Loss,
    pub time_wait_ends: TimeWaitEnds,
    /// TIME_WAIT settings and overflow counter of connwatch's own network namespace.
    pub kernel: Option<KernelInfo>,
    /// connwatch's own memory: a long-running session should see these flat.
    pub footprint: Footprint,
}

/// connwatch's resident memory and the entries in each of its tables. Every table is
/// bounded by what exists (sockets, processes), `--max-sockets` or `--window`; none
/// grows with how long connwatch has run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// VmRSS of the connwatch process.
    pub rss_bytes: Option<u64>,
    pub entries: BTreeMap<&'static str, u64>,
}

impl Report {
    pub fn flagged(&self) -> bool {
        self.processes.iter().any(|p| !p.flags.is_empty())
    }
}

/// What a report is made of, besides the CLOSE_WAIT table.
pub struct Inputs<'a> {
    /// Wall-clock time of the report, already formatted (RFC 3339).
    pub time: String,
    pub now_ns: u64,
    pub elapsed_s: f64,
    pub is_final: bool,
    pub states: BTreeMap<String, u64>,
    pub procs: &'a HashMap<u32, ProcInfo>,
    /// Listening ports, per network namespace, with the processes holding the listener.
    /// Sockets on them are the server side, whose peers differ only by ephemeral port.
    pub listening: &'a HashMap<(u32, u16), Vec<u32>>,
    /// Processes holding each socket's fd.
    pub holders: &'a crate::owners::FdIndex,
    pub timewait: &'a Tracker,
    pub kernel: &'a BTreeMap<u32, KernelInfo>,
    pub own_netns: u32,
    pub loss: Loss,
}

/// The machine's state histogram from a full dump: every TCP state, IPv4 and IPv6.
/// Timewait sockets whose substate is FIN_WAIT2 (orphans the process already closed)
/// are counted apart from real FIN_WAIT2 sockets, as `FIN_WAIT2_TW`.
pub fn state_counts(sockets: &[DiagSocket]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for s in sockets {
        let name = if s.timewait && s.state == TcpState::FIN_WAIT2 {
            "FIN_WAIT2_TW".to_string()
        } else {
            s.state.to_string()
        };
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// Per-process history of CLOSE_WAIT counts, for growth rates.
#[derive(Default)]
pub struct Growth {
    samples: HashMap<u32, VecDeque<(u64, u64)>>,
}

impl Growth {
    /// Processes with samples kept.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Records `counts` at `now_ns` (processes absent count 0) and forgets samples older
    /// than the window, keeping the newest of those as the window's starting point.
    pub fn record(&mut self, now_ns: u64, counts: &HashMap<u32, u64>, window: Duration) {
        let start = now_ns.saturating_sub(window.as_nanos() as u64);
        for (pid, &n) in counts {
            self.samples.entry(*pid).or_default().push_back((now_ns, n));
        }
        self.samples.retain(|pid, s| {
            if !counts.contains_key(pid) {
                s.push_back((now_ns, 0));
            }
            while s.len() > 1 && s.get(1).is_some_and(|&(t, _)| t <= start) {
                s.pop_front();
            }
            // A process with no sockets over a whole window is forgotten.
            s.iter().any(|&(_, n)| n > 0)
        });
    }

    /// Net change per minute between the window's first sample and the last.
    pub fn per_min(&self, pid: u32) -> Option<f64> {
        let s = self.samples.get(&pid)?;
        let (&(t0, n0), &(t1, n1)) = (s.front()?, s.back()?);
        let span_min = (t1.checked_sub(t0)? as f64) / 60e9;
        (span_min > 0.0).then(|| (n1 as f64 - n0 as f64) / span_min)
    }
}

#[derive(Default)]
struct Acc {
    close_wait: u64,
    oldest_ns: Option<(u64, AgeSource)>,
    recv_q: u64,
    time_wait: u64,
    tw_oldest_ns: Option<u64>,
    /// TIME_WAITs per local port that the process listens on (server closed first).
    tw_on_listen_port: BTreeMap<u16, u64>,
    tw_created: u64,
    peers: HashMap<PeerKey, (u64, u64)>,
    sources: BTreeSet<&'static str>,
    closed: Vec<u64>,
    comm: Option<String>,
    pressure: Vec<Pressure>,
}

/// One destination whose ephemeral ports are running short.
#[derive(Clone, Debug)]
struct Pressure {
    dest: String,
    count: u64,
    range: [u16; 2],
    tw_reuse: Option<u32>,
    pct: f64,
}

/// Builds the report. `growth` gets this report's counts recorded.
pub fn build(table: &Table, inp: &Inputs, cfg: &ReportConfig, growth: &mut Growth) -> Report {
    let mut accs: BTreeMap<u32, Acc> = BTreeMap::new();
    let mut unattributed = Unattributed::default();
    for (key, cw) in table.close_wait() {
        let age_ns = inp.now_ns.saturating_sub(cw.since_ns);
        let holders = inp.holders.holders(cw.inode);
        let (pids, source): (&[u32], &'static str) = if !holders.is_empty() {
            (holders, crate::decode::OwnerSource::Fd.as_str())
        } else if let Some(owner) = &cw.probe_owner {
            (std::slice::from_ref(&owner.0), owner.2.as_str())
        } else {
            unattributed.close_wait += 1;
            continue;
        };
        // A socket shared after fork counts for every holder.
        let peer = peer_addr(key, inp.listening);
        for &pid in pids {
            let a = accs.entry(pid).or_default();
            a.close_wait += 1;
            if a.oldest_ns.is_none_or(|(o, _)| age_ns > o) {
                a.oldest_ns = Some((age_ns, cw.age_source));
            }
            a.recv_q += u64::from(cw.recv_q);
            a.peers.entry(peer).or_default().0 += 1;
            a.sources.insert(source);
            if a.comm.is_none() {
                a.comm = cw.probe_owner.as_ref().map(|o| o.1.clone());
            }
        }
    }

    let window_start = inp.now_ns.saturating_sub(cfg.window.as_nanos() as u64);
    // Destinations reached from ephemeral ports: (netns, remote) → TIME_WAIT count.
    let mut per_dest: HashMap<(u32, crate::table::Endpoint), u64> = HashMap::new();
    for (key, tw) in inp.timewait.tracked() {
        if tw.substate != TcpState::TIME_WAIT {
            continue;
        }
        let listening = inp.listening.contains_key(&(key.netns, key.local.port()));
        let ephemeral = inp
            .kernel
            .get(&key.netns)
            .is_some_and(|k| k.ephemeral().contains(&key.local.port()));
        if ephemeral && !listening {
            *per_dest.entry((key.netns, key.remote)).or_insert(0) += 1;
        }
        let Some(owner) = &tw.owner else {
            unattributed.time_wait += 1;
            continue;
        };
        let a = accs.entry(owner.pid).or_default();
        a.time_wait += 1;
        let age = inp.now_ns.saturating_sub(tw.entered_ns);
        a.tw_oldest_ns = Some(a.tw_oldest_ns.map_or(age, |o| o.max(age)));
        a.peers.entry(peer_addr(key, inp.listening)).or_default().1 += 1;
        a.sources.insert(tw.owner_source.as_str());
        if inp
            .listening
            .get(&(key.netns, key.local.port()))
            .is_some_and(|pids| pids.contains(&owner.pid))
        {
            *a.tw_on_listen_port.entry(key.local.port()).or_insert(0) += 1;
        }
        if a.comm.is_none() {
            a.comm = Some(owner.comm.to_string());
        }
    }
    for (_, pid) in inp.timewait.created_since(window_start) {
        if let Some(pid) = pid {
            accs.entry(*pid).or_default().tw_created += 1;
        }
    }
    // Port pressure: every process with TIME_WAITs to a destination over the threshold.
    for ((ns, dest), count) in &per_dest {
        let Some(k) = inp.kernel.get(ns) else {
            continue;
        };
        let pct = *count as f64 * 100.0 / k.ephemeral_count() as f64;
        if pct <= cfg.port_pressure_pct {
            continue;
        }
        let p = Pressure {
            dest: dest.to_string(),
            count: *count,
            range: k.ip_local_port_range,
            tw_reuse: k.tcp_tw_reuse,
            pct,
        };
        for (key, tw) in inp.timewait.tracked() {
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

    for c in table.closed_since(window_start) {
        if let Some(pid) = c.pid {
            let a = accs.entry(pid).or_default();
            a.closed.push(c.lifetime_ns);
            if a.comm.is_none() {
                a.comm.clone_from(&c.comm);
            }
        }
    }

    let counts: HashMap<u32, u64> = accs.iter().map(|(p, a)| (*p, a.close_wait)).collect();
    growth.record(inp.now_ns, &counts, cfg.window);

    let mut processes: Vec<ProcessRow> = accs
        .into_iter()
        .map(|(pid, a)| row(pid, a, inp, cfg, growth))
        .collect();
    processes.sort_by(|a, b| {
        // Flagged first, then the most CLOSE_WAIT sockets, then the oldest, then TIME_WAIT.
        a.flags
            .is_empty()
            .cmp(&b.flags.is_empty())
            .then(b.close_wait.cmp(&a.close_wait))
            .then(
                b.close_wait_oldest_s
                    .unwrap_or(0.0)
                    .total_cmp(&a.close_wait_oldest_s.unwrap_or(0.0)),
            )
            .then(b.time_wait.cmp(&a.time_wait))
            .then(a.pid.cmp(&b.pid))
    });

    let mut expired: Vec<u64> = Vec::new();
    let mut ends = TimeWaitEnds::default();
    for e in inp.timewait.ended_since(window_start) {
        match e.end {
            End::Expired => {
                ends.expired += 1;
                expired.push(e.lifetime_ns);
            }
            End::Early => ends.early += 1,
        }
    }
    ends.expired_p50_s = closed_stats(&mut expired).p50_s;

    Report {
        time: inp.time.clone(),
        elapsed_s: round3(inp.elapsed_s),
        is_final: inp.is_final,
        states: inp.states.clone(),
        processes,
        unattributed,
        loss: inp.loss,
        time_wait_ends: ends,
        kernel: inp.kernel.get(&inp.own_netns).cloned(),
        footprint: Footprint::default(),
    }
}

fn row(pid: u32, mut a: Acc, inp: &Inputs, cfg: &ReportConfig, growth: &Growth) -> ProcessRow {
    let info = inp.procs.get(&pid);
    let comm = info
        .map(|i| i.comm.clone())
        .or(a.comm.take())
        .unwrap_or_else(|| "?".into());
    let oldest_s = a.oldest_ns.map(|(ns, _)| ns as f64 / 1e9);
    let closed = closed_stats(&mut a.closed);
    let growth_per_min = growth.per_min(pid).filter(|_| a.close_wait > 0);
    let fds = info.map(|i| i.fds);
    let fd_limit = info.and_then(|i| i.fd_limit);
    let fds_exhausted_in_s = match (growth_per_min, fds, fd_limit) {
        (Some(g), Some(used), Some(limit)) if g > 0.0 => {
            Some(round3(limit.saturating_sub(used) as f64 / g * 60.0))
        }
        _ => None,
    };
    let span_s = cfg.window.as_secs_f64().min(inp.elapsed_s);
    let tw_rate = (span_s > 0.0 && a.tw_created > 0).then(|| round3(a.tw_created as f64 / span_s));

    let age_limit = cfg.close_wait_age.as_secs_f64();
    let mut flags = Vec::new();
    if oldest_s.is_some_and(|o| o > age_limit) {
        flags.push(FLAG_CLOSE_WAIT_LEAK);
    }
    if closed.p99_s.is_some_and(|p| p > age_limit) {
        flags.push(FLAG_CLOSE_WAIT_SLOW);
    }
    let closer_port = a
        .tw_on_listen_port
        .iter()
        .filter(|(_, n)| **n >= cfg.time_wait_min)
        .max_by_key(|(_, n)| **n)
        .map(|(p, n)| (*p, *n));
    if closer_port.is_some() {
        flags.push(FLAG_ACTIVE_CLOSER);
    }
    if !a.pressure.is_empty() {
        flags.push(FLAG_PORT_PRESSURE);
    }
    let mut peers: Vec<Peer> = a
        .peers
        .into_iter()
        .map(|(addr, (cw, tw))| Peer {
            addr: addr.to_string(),
            close_wait: cw,
            time_wait: tw,
        })
        .collect();
    peers.sort_by(|x, y| {
        (y.close_wait + y.time_wait)
            .cmp(&(x.close_wait + x.time_wait))
            .then(x.addr.cmp(&y.addr))
    });
    let cw_peers = peers.iter().filter(|p| p.close_wait > 0).count();
    peers.truncate(TOP_PEERS);

    let mut row = ProcessRow {
        pid,
        comm,
        cgroup: info.and_then(|i| i.cgroup.clone()),
        close_wait: a.close_wait,
        close_wait_oldest_s: oldest_s.map(round3),
        close_wait_age_source: a.oldest_ns.map(|(_, s)| s.as_str()),
        time_wait: a.time_wait,
        time_wait_oldest_s: a.tw_oldest_ns.map(|ns| round3(ns as f64 / 1e9)),
        fds,
        fd_limit,
        flags,
        reason: None,
        peers,
        owner_sources: a.sources.into_iter().collect(),
        close_wait_growth_per_min: growth_per_min.map(round3),
        close_wait_recv_q_bytes: a.recv_q,
        fds_exhausted_in_s,
        close_wait_closed: closed,
        time_wait_created_per_s: tw_rate,
    };
    row.reason = reason(&row, cw_peers.saturating_sub(1), closer_port, &a.pressure);
    row
}

/// A peer: its address, and its port unless it is a client of ours (`None`, shown `*`).
/// Formatted once per distinct peer, not once per socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PeerKey(std::net::IpAddr, Option<u16>);

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
fn peer_addr(key: &SockKey, listening: &HashMap<(u32, u16), Vec<u32>>) -> PeerKey {
    let port = (!listening.contains_key(&(key.netns, key.local.port()))).then(|| key.remote.port());
    PeerKey(key.remote.ip(), port)
}

fn closed_stats(lifetimes: &mut [u64]) -> ClosedStats {
    if lifetimes.is_empty() {
        return ClosedStats::default();
    }
    lifetimes.sort_unstable();
    let pct = |p: f64| {
        // Nearest rank.
        let rank = ((p / 100.0) * lifetimes.len() as f64).ceil() as usize;
        let at = rank.clamp(1, lifetimes.len()) - 1;
        lifetimes.get(at).map_or(0.0, |&ns| round3(ns as f64 / 1e9))
    };
    ClosedStats {
        count: lifetimes.len() as u64,
        p50_s: Some(pct(50.0)),
        p99_s: Some(pct(99.0)),
        max_s: lifetimes.last().map(|&m| round3(m as f64 / 1e9)),
    }
}

/// One plain sentence per flag, e.g. `python3[4242] holds 50 CLOSE_WAIT sockets from
/// 127.0.0.1:8080, oldest 5m12s, +10/min; 60 of 1024 fds used: fds run out in ~96 min.
/// It never calls close() after the peer hangs up.`
fn reason(
    r: &ProcessRow,
    other_peers: usize,
    closer_port: Option<(u16, u64)>,
    pressure: &[Pressure],
) -> Option<String> {
    let mut parts = Vec::new();
    let who = format!("{}[{}]", r.comm, r.pid);
    if r.flags.contains(&FLAG_CLOSE_WAIT_LEAK) {
        let mut s = format!(
            "{who} holds {} CLOSE_WAIT socket{}",
            r.close_wait,
            plural(r.close_wait)
        );
        if let Some(p) = r.peers.iter().find(|p| p.close_wait > 0) {
            s += &format!(" from {}", p.addr);
            if other_peers > 0 {
                s += &format!(
                    " and {other_peers} other peer{}",
                    plural(other_peers as u64)
                );
            }
        }
        if let Some(o) = r.close_wait_oldest_s {
            s += &format!(", oldest {}", fmt_age(o));
            if r.close_wait_age_source == Some("estimated") {
                s += " (estimated)";
            }
        }
        if let Some(g) = r.close_wait_growth_per_min.filter(|g| *g >= 0.05) {
            s += &format!(", +{}/min", fmt_rate(g));
        }
        match (r.fds, r.fd_limit) {
            (Some(used), Some(limit)) => {
                s += &format!("; {used} of {limit} fds used");
                if let Some(eta) = r.fds_exhausted_in_s {
                    s += &format!(": fds run out in ~{}", fmt_eta(eta));
                }
            }
            (Some(used), None) => s += &format!("; {used} fds used"),
            _ => {}
        }
        s += if r.close_wait_closed.count > 0 {
            ". It closes sockets late or never after the peer hangs up."
        } else {
            ". It never calls close() after the peer hangs up."
        };
        parts.push(s);
    }
    if r.flags.contains(&FLAG_CLOSE_WAIT_SLOW) {
        let c = &r.close_wait_closed;
        parts.push(format!(
            "{who} closed {} CLOSE_WAIT socket{} only {} after the peer hung up (p50), {} at p99, up to {}: it is slow to call close().",
            c.count,
            plural(c.count),
            fmt_age(c.p50_s.unwrap_or(0.0)),
            fmt_age(c.p99_s.unwrap_or(0.0)),
            fmt_age(c.max_s.unwrap_or(0.0)),
        ));
    }
    if let Some((port, n)) = closer_port {
        let mut s = format!(
            "{who} listens on port {port} and closed first on {n} of its connections: {n} TIME_WAIT socket{} on that port",
            plural(n)
        );
        if let Some(o) = r.time_wait_oldest_s {
            s += &format!(", oldest {}", fmt_age(o));
        }
        if let Some(rate) = r.time_wait_created_per_s {
            s += &format!(", {}/s", fmt_rate(rate));
        }
        s += ". A server should let its clients close first (they then pay the TIME_WAIT); \
              usual fixes: keep-alive or pooling so connections are reused, and a protocol \
              where the client closes.";
        parts.push(s);
    }
    for p in pressure {
        parts.push(format!(
            "{who} has TIME_WAIT sockets to {} from local ephemeral ports: {} in all, {:.0}% of the range {}-{} (tcp_tw_reuse={}); new connections to it may fail with EADDRNOTAVAIL. Reuse connections (pooling, keep-alive) or widen net.ipv4.ip_local_port_range.",
            p.dest,
            p.count,
            p.pct,
            p.range[0],
            p.range[1],
            p.tw_reuse.map_or("unknown".into(), |v| v.to_string()),
        ));
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn fmt_rate(g: f64) -> String {
    if g >= 10.0 {
        format!("{g:.0}")
    } else {
        format!("{g:.1}")
    }
}

fn fmt_eta(secs: f64) -> String {
    let min = secs / 60.0;
    if min < 1.0 {
        format!("{secs:.0} s")
    } else if min < 120.0 {
        format!("{min:.0} min")
    } else {
        format!("{:.1} h", min / 60.0)
    }
}

/// Compact age: `850ms`, `42s`, `5m12s`, `3h04m`, `2d05h`.
pub fn fmt_age(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 1.0 {
        return format!("{:.0}ms", s * 1000.0);
    }
    if s < 10.0 {
        return format!("{s:.1}s");
    }
    let t = s as u64;
    match t {
        0..60 => format!("{t}s"),
        60..3600 => format!("{}m{:02}s", t / 60, t % 60),
        3600..86400 => format!("{}h{:02}m", t / 3600, (t % 3600) / 60),
        _ => format!("{}d{:02}h", t / 86400, (t % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use connwatch_common::tcp_state::*;

    use super::*;
    use crate::owners::FdIndex;
    use crate::table::{
        SockKey,
        tests::{NS, close_cw, diag, enter_cw},
    };

    const SEC: u64 = 1_000_000_000;
    const L: &str = "127.0.0.1:8080";

    fn cfg() -> ReportConfig {
        ReportConfig {
            close_wait_age: Duration::from_secs(60),
            window: Duration::from_secs(300),
            time_wait_min: 3,
            port_pressure_pct: 50.0,
        }
    }

    static NO_LISTENERS: std::sync::LazyLock<HashMap<(u32, u16), Vec<u32>>> =
        std::sync::LazyLock::new(HashMap::new);
    static NO_HOLDERS: std::sync::LazyLock<FdIndex> =
        std::sync::LazyLock::new(|| FdIndex::with_holders([]));
    static NO_TIMEWAIT: std::sync::LazyLock<Tracker> = std::sync::LazyLock::new(Tracker::default);
    static NO_KERNEL: std::sync::LazyLock<BTreeMap<u32, KernelInfo>> =
        std::sync::LazyLock::new(BTreeMap::new);

    fn inputs(now_s: u64, procs: &HashMap<u32, ProcInfo>) -> Inputs<'_> {
        Inputs {
            time: "2026-11-25T16:40:00.000000Z".into(),
            now_ns: now_s * SEC,
            elapsed_s: now_s as f64,
            is_final: false,
            states: BTreeMap::from([("CLOSE_WAIT".into(), 3), ("TIME_WAIT".into(), 2)]),
            procs,
            listening: &NO_LISTENERS,
            holders: &NO_HOLDERS,
            timewait: &NO_TIMEWAIT,
            kernel: &NO_KERNEL,
            own_netns: NS,
            loss: Loss::default(),
        }
    }

    fn procs() -> HashMap<u32, ProcInfo> {
        HashMap::from([
            (
                4242,
                ProcInfo {
                    comm: "python3".into(),
                    fds: 60,
                    fd_limit: Some(1024),
                    cgroup: None,
                },
            ),
            (
                7,
                ProcInfo {
                    comm: "nginx".into(),
                    fds: 10,
                    fd_limit: Some(1024),
                    cgroup: None,
                },
            ),
        ])
    }

    /// An fd index in which `pid_for_inode` holds each CLOSE_WAIT socket of `t`.
    fn hold(t: &Table, pid_for_inode: impl Fn(u64) -> Vec<u32>) -> FdIndex {
        FdIndex::with_holders(
            t.close_wait()
                .map(|(_, cw)| (cw.inode, pid_for_inode(cw.inode))),
        )
    }

    #[test]
    fn leaker_is_flagged_with_a_reason_and_prompt_closer_is_not() {
        let mut t = Table::new(NS);
        // The leaker: 3 sockets from one peer, the oldest 5m12s old at t=400s.
        for (i, at) in [88.0, 200.0, 390.0].into_iter().enumerate() {
            t.apply(&enter_cw(
                at,
                L,
                &format!("127.0.0.1:{}", 40000 + i),
                100 + i as u64,
            ));
        }
        // The well-behaved server closes each within 50 ms.
        for i in 0..20 {
            let r = format!("127.0.0.2:{}", 50000 + i);
            t.apply(&enter_cw(300.0 + i as f64, "127.0.0.1:9090", &r, 900 + i));
            t.apply(&close_cw(300.05 + i as f64, "127.0.0.1:9090", &r, 7));
        }
        let idx = hold(&t, |_| vec![4242]);
        let procs = procs();
        let mut g = Growth::default();
        let r = build(
            &t,
            &Inputs {
                holders: &idx,
                ..inputs(400, &procs)
            },
            &cfg(),
            &mut g,
        );
        assert_eq!(r.processes.len(), 2);
        let leak = &r.processes[0];
        assert_eq!((leak.pid, leak.comm.as_str()), (4242, "python3"));
        assert_eq!(leak.close_wait, 3);
        assert_eq!(leak.close_wait_oldest_s, Some(312.0));
        assert_eq!(leak.close_wait_age_source, Some("observed"));
        assert_eq!(leak.flags, [FLAG_CLOSE_WAIT_LEAK]);
        assert_eq!(leak.owner_sources, ["fd"]);
        assert_eq!(leak.close_wait_recv_q_bytes, 0);
        assert_eq!(
            leak.reason.as_deref(),
            Some(
                "python3[4242] holds 3 CLOSE_WAIT sockets from 127.0.0.1:40000 and 2 other peers, \
                 oldest 5m12s; 60 of 1024 fds used. It never calls close() after the peer hangs up."
            )
        );
        let good = &r.processes[1];
        assert_eq!((good.pid, good.close_wait), (7, 0));
        assert!(good.flags.is_empty(), "{good:?}");
        assert_eq!(good.reason, None);
        assert_eq!(good.close_wait_closed.count, 20);
        assert_eq!(good.close_wait_closed.p50_s, Some(0.05));
        assert!(r.flagged());
    }

    #[test]
    fn growth_and_fd_runout() {
        let mut t = Table::new(NS);
        let procs = procs();
        let mut g = Growth::default();
        // 10 new leaked sockets per minute, sampled each minute.
        for minute in 0..3u64 {
            for i in 0..10 {
                let r = format!("127.0.0.1:{}", 40000 + minute * 10 + i);
                t.apply(&enter_cw((minute * 60) as f64, L, &r, minute * 10 + i + 1));
            }
            let idx = hold(&t, |_| vec![4242]);
            let inp = Inputs {
                holders: &idx,
                ..inputs(minute * 60 + 1, &procs)
            };
            let _ = build(&t, &inp, &cfg(), &mut g);
        }
        let idx = hold(&t, |_| vec![4242]);
        let inp = Inputs {
            holders: &idx,
            ..inputs(121, &procs)
        };
        let r = build(&t, &inp, &cfg(), &mut g);
        let p = &r.processes[0];
        assert_eq!(p.close_wait, 30);
        assert_eq!(p.close_wait_growth_per_min, Some(10.0));
        // (1024 - 60) fds left at 10/min: 96.4 min.
        assert_eq!(p.fds_exhausted_in_s, Some(5784.0));
        assert!(
            p.reason
                .as_deref()
                .unwrap()
                .contains(", +10/min; 60 of 1024 fds used: fds run out in ~96 min."),
            "{:?}",
            p.reason
        );
    }

    #[test]
    fn late_closer_is_slow_with_percentiles() {
        let mut t = Table::new(NS);
        for i in 0..10u64 {
            let r = format!("127.0.0.2:{}", 50000 + i);
            let at = 10.0 + i as f64;
            t.apply(&enter_cw(at, L, &r, 900 + i));
            // Closes each after 70 s (90 s for the last one).
            let life = if i == 9 { 90.0 } else { 70.0 };
            t.apply(&close_cw(at + life, L, &r, 7));
        }
        let procs = procs();
        let r = build(&t, &inputs(200, &procs), &cfg(), &mut Growth::default());
        let p = &r.processes[0];
        assert_eq!(p.flags, [FLAG_CLOSE_WAIT_SLOW]);
        assert_eq!(p.close_wait_closed.count, 10);
        assert_eq!(p.close_wait_closed.p50_s, Some(70.0));
        assert_eq!(p.close_wait_closed.p99_s, Some(90.0));
        assert_eq!(p.close_wait_closed.max_s, Some(90.0));
        assert!(
            p.reason
                .as_deref()
                .unwrap()
                .contains("slow to call close()")
        );
    }

    #[test]
    fn fork_shared_socket_lists_every_holder() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(1.0, L, "127.0.0.1:40000", 55));
        let idx = hold(&t, |_| vec![4242, 7]);
        let procs = procs();
        let r = build(
            &t,
            &Inputs {
                holders: &idx,
                ..inputs(100, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        let pids: Vec<u32> = r.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids.len(), 2);
        assert!(pids.contains(&4242) && pids.contains(&7));
        assert!(
            r.processes
                .iter()
                .all(|p| p.close_wait == 1 && p.flags == [FLAG_CLOSE_WAIT_LEAK])
        );
    }

    #[test]
    fn socket_without_holder_is_unattributed_not_guessed() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(1.0, L, "127.0.0.1:40000", 55));
        let procs = procs();
        let r = build(&t, &inputs(100, &procs), &cfg(), &mut Growth::default());
        assert!(r.processes.is_empty());
        assert_eq!(r.unattributed.close_wait, 1);
        assert!(!r.flagged());
    }

    #[test]
    fn estimated_age_is_said_so() {
        let mut t = Table::new(NS);
        t.seed(
            NS,
            &[diag(CLOSE_WAIT, L, "127.0.0.1:40000", 55, 90_000)],
            100 * SEC,
        );
        let idx = hold(&t, |_| vec![4242]);
        let procs = procs();
        let r = build(
            &t,
            &Inputs {
                holders: &idx,
                ..inputs(100, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        let p = &r.processes[0];
        assert_eq!(p.close_wait_age_source, Some("estimated"));
        assert_eq!(p.close_wait_oldest_s, Some(90.0));
        assert!(
            p.reason
                .as_deref()
                .unwrap()
                .contains("oldest 1m30s (estimated)")
        );
    }

    #[test]
    fn json_keys_are_the_documented_ones() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(1.0, L, "127.0.0.1:40000", 55));
        let idx = hold(&t, |_| vec![4242]);
        let procs = procs();
        let r = build(
            &t,
            &Inputs {
                holders: &idx,
                ..inputs(100, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "time",
            "elapsed_s",
            "final",
            "states",
            "processes",
            "unattributed",
            "loss",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        let p = &v["processes"][0];
        for key in [
            "pid",
            "comm",
            "close_wait",
            "close_wait_oldest_s",
            "close_wait_age_source",
            "time_wait",
            "time_wait_oldest_s",
            "fds",
            "fd_limit",
            "flags",
            "reason",
            "peers",
            "owner_sources",
            "close_wait_closed",
        ] {
            assert!(p.get(key).is_some(), "{key}");
        }
        assert_eq!(p["peers"][0]["addr"], "127.0.0.1:40000");
        assert_eq!(p["peers"][0]["close_wait"], 1);
        assert_eq!(v["loss"]["events_dropped"], 0);
        assert_eq!(v["loss"]["sockets_untracked"], 0);
        assert_eq!(v["unattributed"]["close_wait"], 0);
        assert_eq!(p["close_wait_closed"]["count"], 0);
    }

    #[test]
    fn state_histogram_separates_timewait_fin_wait2() {
        let mut tw_fw2 = diag(FIN_WAIT2, L, "1.2.3.4:5", 0, 0);
        tw_fw2.timewait = true;
        let mut tw = diag(TIME_WAIT, L, "1.2.3.4:6", 0, 0);
        tw.timewait = true;
        let counts = state_counts(&[
            diag(ESTABLISHED, L, "1.2.3.4:1", 1, 0),
            diag(ESTABLISHED, L, "1.2.3.4:2", 2, 0),
            diag(FIN_WAIT2, L, "1.2.3.4:3", 3, 0),
            tw_fw2,
            tw,
        ]);
        assert_eq!(
            counts,
            BTreeMap::from([
                ("ESTABLISHED".into(), 2),
                ("FIN_WAIT2".into(), 1),
                ("FIN_WAIT2_TW".into(), 1),
                ("TIME_WAIT".into(), 1),
            ])
        );
    }

    #[test]
    fn server_side_peers_are_grouped_by_address() {
        let mut t = Table::new(NS);
        for i in 0..3 {
            t.apply(&enter_cw(
                1.0,
                L,
                &format!("10.0.0.9:{}", 40000 + i),
                55 + i,
            ));
        }
        t.apply(&enter_cw(1.0, "127.0.0.1:41000", "10.0.0.7:5432", 60));
        let idx = hold(&t, |_| vec![4242]);
        let procs = procs();
        let listening = HashMap::from([((NS, 8080), vec![4242])]);
        let mut inp = inputs(100, &procs);
        inp.holders = &idx;
        inp.listening = &listening;
        let r = build(&t, &inp, &cfg(), &mut Growth::default());
        let peers: Vec<(&str, u64)> = r.processes[0]
            .peers
            .iter()
            .map(|p| (p.addr.as_str(), p.close_wait))
            .collect();
        assert_eq!(peers, [("10.0.0.9:*", 3), ("10.0.0.7:5432", 1)]);
        let v6 = SockKey {
            netns: NS,
            local: "[::1]:8080".parse().unwrap(),
            remote: "[::1]:5000".parse().unwrap(),
        };
        assert_eq!(peer_addr(&v6, &listening).to_string(), "[::1]:*");
    }

    /// A tracker holding `n` confirmed TIME_WAITs from `local` (port varying when
    /// `vary_local`) to `remote`, owned by `pid`.
    fn timewaits(n: u16, local: &str, remote: &str, vary_local: bool, pid: u32) -> Tracker {
        use crate::{decode::Owner, table::tests::tr, timewait::TwOwner};
        let mut tw = Tracker::default();
        let mut polled = Vec::new();
        for i in 0..n {
            let mut l: std::net::SocketAddr = local.parse().unwrap();
            let mut r: std::net::SocketAddr = remote.parse().unwrap();
            if vary_local {
                l.set_port(l.port() + i);
            } else {
                r.set_port(r.port() + i);
            }
            let mut t = tr(10.0, FIN_WAIT2, CLOSE, &l.to_string(), &r.to_string());
            t.owner = Owner {
                pid: Some(pid),
                comm: Some("x".into()),
                source: crate::decode::OwnerSource::Carried,
            };
            tw.on_transition(
                SockKey {
                    netns: NS,
                    local: l.into(),
                    remote: r.into(),
                },
                &t,
            );
            let mut d = diag(TIME_WAIT, &l.to_string(), &r.to_string(), 0, 0);
            d.timewait = true;
            d.expires_ms = 59_000;
            polled.push(d);
        }
        let none = |_: u16| -> Option<TwOwner> { None };
        tw.observe(NS, &polled, 11 * SEC, false, &none);
        tw
    }

    #[test]
    fn server_closing_first_is_an_active_closer() {
        let t = Table::new(NS);
        let tw = timewaits(3, L, "127.0.0.2:50000", false, 7);
        let procs = procs();
        let listening = HashMap::from([((NS, 8080), vec![7])]);
        let mut inp = inputs(20, &procs);
        inp.listening = &listening;
        inp.timewait = &tw;
        let r = build(&t, &inp, &cfg(), &mut Growth::default());
        let p = &r.processes[0];
        assert_eq!((p.pid, p.time_wait), (7, 3));
        assert_eq!(p.flags, [FLAG_ACTIVE_CLOSER]);
        assert_eq!(p.time_wait_oldest_s, Some(10.0));
        assert_eq!(p.owner_sources, ["carried"]);
        assert_eq!(p.peers[0].addr, "127.0.0.2:*");
        assert_eq!(p.peers[0].time_wait, 3);
        let reason = p.reason.as_deref().unwrap();
        assert!(
            reason.contains("listens on port 8080 and closed first on 3"),
            "{reason}"
        );
        assert!(reason.contains("keep-alive"), "{reason}");
        // Below --time-wait-min: not flagged.
        let mut strict = cfg();
        strict.time_wait_min = 4;
        let r = build(&t, &inp, &strict, &mut Growth::default());
        assert!(r.processes[0].flags.is_empty());
    }

    #[test]
    fn client_time_wait_is_not_an_active_closer_but_may_press_ports() {
        let t = Table::new(NS);
        // 6 TIME_WAITs from ephemeral ports 40000.. to one destination.
        let tw = timewaits(6, "127.0.0.1:40000", "127.0.0.1:8080", true, 42);
        let procs = procs();
        let kernel = BTreeMap::from([(
            NS,
            KernelInfo {
                ip_local_port_range: [40000, 40009],
                tcp_tw_reuse: Some(2),
                tcp_max_tw_buckets: Some(131072),
                time_wait_overflow: Some(0),
            },
        )]);
        let mut inp = inputs(20, &procs);
        inp.timewait = &tw;
        inp.kernel = &kernel;
        let r = build(&t, &inp, &cfg(), &mut Growth::default());
        let p = &r.processes[0];
        assert_eq!((p.pid, p.time_wait), (42, 6));
        assert_eq!(p.flags, [FLAG_PORT_PRESSURE]);
        let reason = p.reason.as_deref().unwrap();
        assert!(
            reason.contains("to 127.0.0.1:8080")
                && reason.contains("6 in all, 60% of the range 40000-40009 (tcp_tw_reuse=2)"),
            "{reason}"
        );
        assert_eq!(
            r.kernel.as_ref().unwrap().ip_local_port_range,
            [40000, 40009]
        );
        // At 50% of a wider range: no pressure.
        let mut wide = kernel.clone();
        wide.get_mut(&NS).unwrap().ip_local_port_range = [40000, 40019];
        inp.kernel = &wide;
        let r = build(&t, &inp, &cfg(), &mut Growth::default());
        assert!(r.processes[0].flags.is_empty());
    }

    #[test]
    fn ages_are_compact() {
        assert_eq!(fmt_age(0.25), "250ms");
        assert_eq!(fmt_age(4.5), "4.5s");
        assert_eq!(fmt_age(42.0), "42s");
        assert_eq!(fmt_age(312.0), "5m12s");
        assert_eq!(fmt_age(11_040.0), "3h04m");
        assert_eq!(fmt_age(190_800.0), "2d05h");
    }
}
