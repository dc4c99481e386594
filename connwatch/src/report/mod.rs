//! The per-process report: counts, ages, growth, fd headroom, TIME_WAIT costs, flags and
//! the sentence that explains each flag. A pure function of a [`Snapshot`] (the socket
//! table, the timewait tracker, process facts and a clock reading), so that tests drive
//! it with synthetic input. Built in passes (`passes`), one row per process (`row`),
//! flags raised by their own rules, each with its sentence (`flag`), in the words of `words`.
use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use serde::Serialize;

use crate::units::{parse_duration, parse_percent};

use crate::{
    host::kernelinfo::KernelInfo,
    monitor::timewait::{End, Tracker},
};

pub mod flag;
mod group;
mod growth;
mod key;
mod passes;
mod row;
pub mod words;

pub use growth::Growth;
pub use key::{GroupBy, GroupKey, unit_of};
pub use passes::Pressure;

pub use crate::monitor::snapshot::{Footprint, Listening, Loss, Snapshot};

/// When a process is flagged, and what a row stands for: the report options, given on
/// the command line of `watch`, `snapshot`, `top` and `serve` (a flag with a threshold
/// of its own adds its option here).
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct ReportConfig {
    /// CLOSE_WAIT sockets older than this are a leak; a p99 lifetime above it is slow.
    #[arg(long, default_value = "60s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub close_wait_age: Duration,

    /// Growth rates and closed-socket lifetimes cover this much recent time.
    #[arg(long, default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    pub window: Duration,

    /// A process that listens on a port and holds at least this many TIME_WAIT sockets on
    /// it is flagged `active_closer` (a server closing first).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub time_wait_min: u64,

    /// Flag `port_pressure` when TIME_WAIT sockets from ephemeral ports towards one
    /// destination exceed this percentage of net.ipv4.ip_local_port_range.
    #[arg(long = "port-pressure", default_value_t = 50.0, value_parser = parse_percent)]
    pub port_pressure_pct: f64,

    /// Flag `peer_not_closing` when at least this many of a process's connections to one
    /// peer address wait in FIN_WAIT2 longer than --fin-wait2-age (we closed, the peer
    /// never did: a CLOSE_WAIT leak on that host).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub fin_wait2_min: u64,

    /// How long a connection may wait in FIN_WAIT2 for its peer to close before it
    /// counts towards `peer_not_closing` (keep it below net.ipv4.tcp_fin_timeout, 60s by
    /// default, after which the kernel drops the socket).
    #[arg(long, default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub fin_wait2_age: Duration,

    /// What a row stands for (`--by`, whose default differs between commands).
    #[arg(skip)]
    pub by: GroupBy,
}

impl Default for ReportConfig {
    /// The command line's defaults (one definition of each).
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            cfg: ReportConfig,
        }
        <Defaults as clap::Parser>::parse_from(["connwatch"]).cfg
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Unattributed {
    pub close_wait: u64,
    pub time_wait: u64,
}

#[derive(Default, Clone, Debug, PartialEq, Serialize)]
pub struct Peer {
    pub addr: String,
    pub close_wait: u64,
    pub time_wait: u64,
    /// Connections to it that we closed and it has not (FIN_WAIT2).
    pub fin_wait2: u64,
    /// The process at the other end when it runs on this host and holds those
    /// connections in CLOSE_WAIT (the one not closing); null otherwise.
    pub process: Option<PeerProcess>,
}

/// A peer process on this host, with its pod.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerProcess {
    pub pid: u32,
    pub comm: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
}

/// Lifetimes of CLOSE_WAIT sockets that ended within the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClosedStats {
    pub count: u64,
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub max_s: Option<f64>,
}

/// One row of the report: a process, or the processes of a group (`--by`). Test
/// fixtures start from `Default` and set what they are about.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessRow {
    /// The process, or the lowest pid of a grouped row (`--by command|unit`).
    pub pid: u32,
    /// Every process of the row.
    pub pids: Vec<u32>,
    pub comm: String,
    /// The systemd unit or container that the cgroup v2 path names.
    pub unit: Option<String>,
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
    /// Connections it closed whose peer has not closed yet (FIN_WAIT2 orphans).
    pub fin_wait2: u64,
    pub fin_wait2_oldest_s: Option<f64>,
    /// The container its processes run in; null outside containers (or when a group's
    /// processes run in different ones).
    pub container: Option<ContainerRow>,
    /// Where it runs in Kubernetes; null outside it.
    pub k8s: Option<K8sRow>,
    /// The code behind its CLOSE_WAIT sockets, where stacks were captured: the sites
    /// where they were made and where their EOF was read, most sockets first.
    pub leak_sites: Vec<LeakSite>,
}

/// A place in the code, with the CLOSE_WAIT sockets of a row captured there.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LeakSite {
    pub sockets: u64,
    pub at: crate::stacks::At,
    /// `function (file:line)`, innermost first.
    pub stack: Vec<String>,
    /// The stack does not reach the program's first frame, or names none of its own
    /// code: the site may lie deeper.
    pub truncated: bool,
    /// What would give a whole stack, when it is truncated.
    pub hint: Option<&'static str>,
    /// The site in one line (`made at f (file.c:17) ← main (file.c:30)`).
    #[serde(skip)]
    pub summary: String,
}

/// A row's container, as its cgroup path names it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContainerRow {
    /// The full id.
    pub id: String,
    pub runtime: crate::host::container::Runtime,
    /// The runtime's name for it; null until the runtime tells it.
    pub name: Option<String>,
}

/// A row's place in Kubernetes: the pod uid from the kubelet's cgroup path; names
/// (namespace, pod, container) come from the container runtime, null until it tells
/// them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct K8sRow {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// From the kubelet's cgroup path, else the CRI's label.
    pub pod_uid: Option<String>,
    pub container: Option<String>,
}

impl ProcessRow {
    /// Where the row runs, as an engineer names it: `namespace/pod/container` in
    /// Kubernetes (`namespace/pod` for a pod's row), the runtime's container name
    /// elsewhere; until the runtime has named them, the pod's uid and the container's
    /// short id. `None` on the host.
    pub fn place(&self) -> Option<String> {
        let short = |id: &str, n: usize| id.get(..n).unwrap_or(id).to_string();
        let container = self
            .container
            .as_ref()
            .map(|c| c.name.clone().unwrap_or_else(|| short(&c.id, 12)));
        match &self.k8s {
            Some(k) => {
                let pod = match (&k.namespace, &k.pod, &k.pod_uid) {
                    (Some(ns), Some(pod), _) => format!("{ns}/{pod}"),
                    (_, _, Some(uid)) => format!("pod {}", short(uid, 8)),
                    _ => "pod ?".into(),
                };
                let container = k.container.clone().or(container);
                Some(match container {
                    Some(c) => format!("{pod}/{c}"),
                    None => pod,
                })
            }
            None => container,
        }
    }
}

/// Unflagged processes folded into one line per command (short-lived clients, health
/// checks, cron jobs): those that hold nothing (their only data are CLOSE_WAIT sockets
/// they closed promptly), and those that exited leaving only TIME_WAIT sockets behind.
/// What makes a process fold is what it is, never how many of them there are.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QuietRow {
    pub comm: String,
    pub processes: u64,
    pub close_wait_closed: ClosedStats,
    /// TIME_WAIT sockets its exited processes left behind (counted here, not in a row).
    pub time_wait: u64,
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
    /// What a row of `processes` stands for: `process`, `command` or `unit`.
    pub by: &'static str,
    pub processes: Vec<ProcessRow>,
    /// Processes with nothing held and nothing flagged, one entry per command.
    pub quiet: Vec<QuietRow>,
    pub unattributed: Unattributed,
    pub loss: Loss,
    pub time_wait_ends: TimeWaitEnds,
    /// TIME_WAIT settings and overflow counter of connwatch's own network namespace.
    pub kernel: Option<KernelInfo>,
    /// connwatch's own memory: a long-running session should see these flat.
    pub footprint: Footprint,
}

impl Report {
    pub fn flagged(&self) -> bool {
        self.processes.iter().any(|p| !p.flags.is_empty())
    }
}

/// Evidence behind a row's flags that the row itself does not carry.
#[derive(Debug, Default)]
pub struct Evidence {
    /// Peers that account for CLOSE_WAIT sockets (the row lists only the top ones).
    pub close_wait_peers: usize,
    /// The listening port with the most TIME_WAITs the process caused, and their count.
    pub closer_port: Option<(u16, u64)>,
    /// Destinations whose ephemeral ports its TIME_WAITs use up.
    pub pressure: Vec<Pressure>,
    /// The peer address with the most connections waiting in FIN_WAIT2 longer than
    /// --fin-wait2-age.
    pub not_closing: Option<NotClosing>,
    /// CLOSE_WAIT sockets with unread bytes, and those closed by the peer after a quiet
    /// spell with nothing unread.
    pub cw_unread: u64,
    pub cw_idle: u64,
    /// Of `cw_idle`, those whose unread bytes are the peer's goodbye.
    pub cw_goodbye: u64,
}

/// A peer that has not closed connections we closed, long after we did.
#[derive(Debug, Clone, PartialEq)]
pub struct NotClosing {
    pub peer: std::net::IpAddr,
    /// Connections to it waiting in FIN_WAIT2 longer than `waited_s`.
    pub count: u64,
    pub oldest_s: f64,
    /// --fin-wait2-age.
    pub waited_s: f64,
}

thread_local! {
    /// TIME_WAITs per destination, kept between reports: rebuilt from nothing, the map
    /// grew through every size each report (tens of thousands of destinations on a
    /// host holding as many TIME_WAITs), a third of an idle `watch`'s CPU.
    static PER_DEST: std::cell::RefCell<passes::PerDest> = Default::default();
}

/// Builds reports: the report options and what is kept from one report to the next
/// (the CLOSE_WAIT counts behind growth rates).
pub struct Reporter {
    pub cfg: ReportConfig,
    growth: Growth,
}

impl Reporter {
    pub fn new(cfg: ReportConfig) -> Self {
        Self {
            cfg,
            growth: Growth::default(),
        }
    }

    /// The report of one snapshot, with the rows `--pid`/`--cgroup`/`--pod`/
    /// `--k8s-namespace` select (a row in a pod not named yet waits for its name).
    pub fn build(&mut self, s: &Snapshot) -> Report {
        let mut report = build(s, &self.cfg, &mut self.growth);
        if s.filter.selects_processes() {
            report.processes.retain(|p| {
                let pod = p
                    .k8s
                    .as_ref()
                    .and_then(|k| Some((k.namespace.as_deref()?, k.pod.as_deref()?)));
                s.filter.process(p.pid, p.cgroup.as_deref())
                    && s.filter.workload(pod, p.container.is_some()) == crate::filter::Verdict::Yes
            });
        }
        report
            .footprint
            .entries
            .insert("growth_processes", self.growth.len() as u64);
        report
    }
}

/// Builds the report from one snapshot, in passes: CLOSE_WAIT sockets, TIME_WAIT
/// sockets, port pressure, closed sockets; then one row per process. `growth` gets this
/// report's counts recorded.
pub fn build(s: &Snapshot, cfg: &ReportConfig, growth: &mut Growth) -> Report {
    let window_start = s.now_ns.saturating_sub(cfg.window.as_nanos() as u64);
    let mut accs = passes::Accs::new();
    let mut unattributed = Unattributed::default();
    passes::close_wait(s, cfg.by, &mut accs, &mut unattributed);
    PER_DEST.with_borrow_mut(|per_dest| {
        passes::time_wait(s, window_start, &mut accs, &mut unattributed, per_dest);
        passes::port_pressure(s, per_dest, cfg.port_pressure_pct, &mut accs);
        // Room kept for the next report, not for a peak long gone.
        if per_dest.capacity() > 4 * per_dest.len().max(1024) {
            per_dest.shrink_to(2 * per_dest.len());
        }
    });
    passes::closed(s, window_start, &mut accs);
    passes::fin_wait2(s, cfg.fin_wait2_age.as_nanos() as u64, cfg.by, &mut accs);

    let groups = group::group(accs, cfg.by, s.procs);
    let counts: HashMap<GroupKey, u64> = groups
        .iter()
        .map(|(k, g)| (k.clone(), g.acc.close_wait))
        .collect();
    growth.record(s.now_ns, &counts, cfg.window);
    let mut processes = Vec::new();
    let mut quiet: BTreeMap<String, (u64, Vec<u64>, u64)> = BTreeMap::new();
    for (key, g) in groups {
        let held = g.acc.close_wait + g.acc.time_wait + g.acc.fin_wait2;
        // Exited, leaving only TIME_WAITs: nothing left to fix in the process itself.
        let exited = g.pids.iter().all(|pid| !s.procs.contains_key(pid));
        let only_time_wait = g.acc.close_wait == 0 && g.acc.fin_wait2 == 0;
        let folds = held == 0 || (exited && only_time_wait);
        let lifetimes = folds.then(|| g.acc.closed.clone());
        let n = g.pids.len() as u64;
        let r = row::row(&key, g, s, cfg, growth);
        match lifetimes {
            Some(lifetimes) if r.flags.is_empty() => {
                let q = quiet.entry(r.comm).or_default();
                q.0 += n;
                q.1.extend(lifetimes);
                q.2 += r.time_wait;
            }
            _ => processes.push(r),
        }
    }
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

    Report {
        time: s.time.clone(),
        elapsed_s: round3(s.elapsed_s),
        is_final: s.is_final,
        states: s.states.clone(),
        by: cfg.by.as_str(),
        processes,
        quiet: quiet_rows(quiet),
        unattributed,
        loss: s.loss,
        time_wait_ends: time_wait_ends(s.timewait, window_start),
        kernel: s.kernel.get(&s.own_netns).cloned(),
        footprint: s.footprint.clone(),
    }
}

/// One entry per command, most processes first.
fn quiet_rows(quiet: BTreeMap<String, (u64, Vec<u64>, u64)>) -> Vec<QuietRow> {
    let mut rows: Vec<QuietRow> = quiet
        .into_iter()
        .map(|(comm, (processes, mut lifetimes, time_wait))| QuietRow {
            comm,
            processes,
            close_wait_closed: passes::closed_stats(&mut lifetimes),
            time_wait,
        })
        .collect();
    rows.sort_by(|a, b| b.processes.cmp(&a.processes).then(a.comm.cmp(&b.comm)));
    rows
}

/// How the TIME_WAITs that ended since `window_start` ended.
fn time_wait_ends(timewait: &Tracker, window_start: u64) -> TimeWaitEnds {
    let mut expired: Vec<u64> = Vec::new();
    let mut ends = TimeWaitEnds::default();
    for e in timewait.ended_since(window_start) {
        match e.end {
            End::Expired => {
                ends.expired += 1;
                expired.push(e.lifetime_ns);
            }
            End::Early => ends.early += 1,
        }
    }
    ends.expired_p50_s = passes::closed_stats(&mut expired).p50_s;
    ends
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use connwatch_common::tcp_state::*;

    use super::*;
    use crate::host::owners::{FdIndex, ProcInfo};
    use crate::host::sockdiag::DiagSocket;
    use crate::monitor::snapshot::state_counts;
    use crate::monitor::table::{
        SockKey, Table,
        tests::{NS, close_cw, diag, enter_cw},
    };
    use crate::monitor::timewait::Listed;

    const SEC: u64 = 1_000_000_000;
    const L: &str = "127.0.0.1:8080";

    fn cfg() -> ReportConfig {
        ReportConfig {
            close_wait_age: Duration::from_secs(60),
            window: Duration::from_secs(300),
            time_wait_min: 3,
            port_pressure_pct: 50.0,
            ..ReportConfig::default()
        }
    }

    static NO_LISTENERS: std::sync::LazyLock<Listening> =
        std::sync::LazyLock::new(Listening::default);
    static NO_HOLDERS: std::sync::LazyLock<FdIndex> =
        std::sync::LazyLock::new(|| FdIndex::with_holders([]));
    static NO_TIMEWAIT: std::sync::LazyLock<Tracker> = std::sync::LazyLock::new(Tracker::default);
    static NO_KERNEL: std::sync::LazyLock<BTreeMap<u32, KernelInfo>> =
        std::sync::LazyLock::new(BTreeMap::new);
    static NO_FILTER: crate::filter::Filter = crate::filter::Filter {
        pids: Vec::new(),
        ports: Vec::new(),
        family: None,
        cgroup: None,
        pods: Vec::new(),
        k8s_namespaces: Vec::new(),
    };

    fn inputs<'a>(t: &'a Table, now_s: u64, procs: &'a HashMap<u32, ProcInfo>) -> Snapshot<'a> {
        Snapshot {
            table: t,
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
            filter: &NO_FILTER,
            footprint: Footprint::default(),
            sites: None,
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
                    ..ProcInfo::default()
                },
            ),
            (
                7,
                ProcInfo {
                    comm: "nginx".into(),
                    fds: 10,
                    fd_limit: Some(1024),
                    cgroup: None,
                    ..ProcInfo::default()
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
            &Snapshot {
                holders: &idx,
                ..inputs(&t, 400, &procs)
            },
            &cfg(),
            &mut g,
        );
        // The prompt closer holds nothing and is not flagged: folded into `quiet`.
        assert_eq!(r.processes.len(), 1);
        let leak = &r.processes[0];
        assert_eq!((leak.pid, leak.comm.as_str()), (4242, "python3"));
        assert_eq!(leak.close_wait, 3);
        assert_eq!(leak.close_wait_oldest_s, Some(312.0));
        assert_eq!(leak.close_wait_age_source, Some("observed"));
        assert_eq!(leak.flags, [flag::CLOSE_WAIT_LEAK.name]);
        assert_eq!(leak.owner_sources, ["fd"]);
        assert_eq!(leak.close_wait_recv_q_bytes, 0);
        assert_eq!(
            leak.reason.as_deref(),
            Some(
                "python3[4242] holds 3 CLOSE_WAIT sockets from 127.0.0.1:40000 and 2 other peers, \
                 oldest 5m12s; 60 of 1024 fds used. It never calls close() after the peer hangs up."
            )
        );
        assert_eq!(r.quiet.len(), 1, "{:?}", r.quiet);
        let good = &r.quiet[0];
        assert_eq!((good.comm.as_str(), good.processes), ("nginx", 1));
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
            let inp = Snapshot {
                holders: &idx,
                ..inputs(&t, minute * 60 + 1, &procs)
            };
            let _ = build(&inp, &cfg(), &mut g);
        }
        let idx = hold(&t, |_| vec![4242]);
        let inp = Snapshot {
            holders: &idx,
            ..inputs(&t, 121, &procs)
        };
        let r = build(&inp, &cfg(), &mut g);
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
        let r = build(&inputs(&t, 200, &procs), &cfg(), &mut Growth::default());
        let p = &r.processes[0];
        assert_eq!(p.flags, [flag::CLOSE_WAIT_SLOW.name]);
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

    /// Each CLOSE_WAIT socket counts at the site where it was made and where its EOF
    /// was read; the polite twin's site (a socket since closed) is never listed, and
    /// the reason names the EOF site first.
    #[test]
    fn leaked_sockets_are_counted_per_site_and_named_in_the_reason() {
        use crate::stacks::{At, Book, Site};
        let site = |at, f: &str| Site {
            at,
            stack: vec!["__libc_read".into(), f.into(), "main (s.c:40)".into()],
            truncated: false,
            hint: None,
            own: Some(1),
        };
        let mut t = Table::new(NS);
        for i in 0..3 {
            t.apply(&enter_cw(
                1.0,
                L,
                &format!("127.0.0.1:{}", 40000 + i),
                55 + i,
            ));
        }
        let mut book = Book::default();
        let made = book.add_site(4242, vec![1], site(At::Accept, "main (s.c:38)"));
        let leaky = book.add_site(4242, vec![2], site(At::Eof, "leaky (s.c:14)"));
        let polite = book.add_site(4242, vec![3], site(At::Eof, "polite (s.c:21)"));
        for inode in 55..58 {
            book.record(inode, At::Accept, made, 1);
        }
        // Only two EOFs were captured (capture began late for the first socket).
        book.record(56, At::Eof, leaky, 1);
        book.record(57, At::Eof, leaky, 1);
        book.record(99, At::Eof, polite, 1);
        let idx = hold(&t, |_| vec![4242]);
        let procs = procs();
        let r = build(
            &Snapshot {
                holders: &idx,
                sites: Some(&book),
                ..inputs(&t, 100, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        let p = &r.processes[0];
        let got: Vec<(u64, At, &str)> = p
            .leak_sites
            .iter()
            .map(|s| (s.sockets, s.at, s.stack[1].as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (3, At::Accept, "main (s.c:38)"),
                (2, At::Eof, "leaky (s.c:14)")
            ]
        );
        let reason = p.reason.as_deref().unwrap();
        assert!(
            reason.ends_with(
                "Leak site: 2 of them read EOF at leaky (s.c:14) ← main (s.c:40); 3 of them made at main (s.c:38) ← main (s.c:40)."
            ),
            "{reason}"
        );
        // Without stacks, the list is there and empty.
        let r = build(
            &Snapshot {
                holders: &idx,
                ..inputs(&t, 100, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        assert_eq!(r.processes[0].close_wait, 3);
        assert!(r.processes[0].leak_sites.is_empty());
    }

    #[test]
    fn fork_shared_socket_lists_every_holder() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(1.0, L, "127.0.0.1:40000", 55));
        let idx = hold(&t, |_| vec![4242, 7]);
        let procs = procs();
        let r = build(
            &Snapshot {
                holders: &idx,
                ..inputs(&t, 100, &procs)
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
                .all(|p| p.close_wait == 1 && p.flags == [flag::CLOSE_WAIT_LEAK.name])
        );
    }

    #[test]
    fn a_group_counts_a_shared_socket_once() {
        let mut t = Table::new(NS);
        for i in 0..3u64 {
            let r = format!("127.0.0.1:{}", 40000 + i);
            t.apply(&enter_cw(1.0, L, &r, 55 + i));
        }
        // A pre-fork server: parent and child (same command) hold the same 3 sockets.
        let idx = hold(&t, |_| vec![4242, 4243]);
        let mut procs = procs();
        procs.insert(
            4243,
            ProcInfo {
                comm: "python3".into(),
                fds: 60,
                fd_limit: Some(1024),
                cgroup: None,
                ..ProcInfo::default()
            },
        );
        let snapshot = Snapshot {
            holders: &idx,
            ..inputs(&t, 100, &procs)
        };
        let by_process = build(&snapshot, &cfg(), &mut Growth::default());
        assert!(by_process.processes.iter().all(|p| p.close_wait == 3));
        let cfg = ReportConfig {
            by: GroupBy::Command,
            ..cfg()
        };
        let r = build(&snapshot, &cfg, &mut Growth::default());
        assert_eq!(r.processes.len(), 1);
        assert_eq!(r.processes[0].close_wait, 3, "{:?}", r.processes[0]);
        assert_eq!(r.processes[0].pids, [4242, 4243]);
    }

    #[test]
    fn socket_without_holder_is_unattributed_not_guessed() {
        let mut t = Table::new(NS);
        t.apply(&enter_cw(1.0, L, "127.0.0.1:40000", 55));
        let procs = procs();
        let r = build(&inputs(&t, 100, &procs), &cfg(), &mut Growth::default());
        assert!(r.processes.is_empty());
        assert_eq!(r.unattributed.close_wait, 1);
        assert!(!r.flagged());
    }

    #[test]
    fn estimated_age_is_said_so() {
        let mut t = Table::new(NS);
        t.seed(
            NS,
            [diag(CLOSE_WAIT, L, "127.0.0.1:40000", 55, 90_000)].iter(),
            100 * SEC,
        );
        let idx = hold(&t, |_| vec![4242]);
        let procs = procs();
        let r = build(
            &Snapshot {
                holders: &idx,
                ..inputs(&t, 100, &procs)
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
            &Snapshot {
                holders: &idx,
                ..inputs(&t, 100, &procs)
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

    /// A process in a pod's container carries `container` and `k8s`; a host process
    /// carries null for both.
    #[test]
    fn rows_name_the_container_and_pod_their_cgroup_gives() {
        use crate::host::container::identity;
        let id = "ab".repeat(32);
        let uid = "12345678-9abc-def0-1234-56789abcdef0";
        let mut t = Table::new(NS);
        t.apply(&enter_cw(1.0, L, "127.0.0.1:40000", 55));
        t.apply(&enter_cw(1.0, L, "127.0.0.1:40001", 56));
        let idx = hold(&t, |inode| vec![if inode == 55 { 4242 } else { 7 }]);
        let mut procs = procs();
        procs.get_mut(&4242).unwrap().identity = identity(&format!(
            "4:memory:/kubepods/besteffort/pod{uid}/{id}\n0::/\n"
        ));
        let r = build(
            &Snapshot {
                holders: &idx,
                ..inputs(&t, 100, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        let v = serde_json::to_value(&r).unwrap();
        let row = |pid: u32| {
            v["processes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["pid"] == pid)
                .unwrap()
                .clone()
        };
        let pod = row(4242);
        assert_eq!(
            pod["container"],
            serde_json::json!({"id": id, "runtime": "containerd", "name": null})
        );
        assert_eq!(
            pod["k8s"],
            serde_json::json!({"namespace": null, "pod": null, "pod_uid": uid, "container": null})
        );
        let host = row(7);
        assert!(
            host["container"].is_null() && host["k8s"].is_null(),
            "{host}"
        );
    }

    /// Process `app` in container `id` of pod `uid`, as the kubelet's cgroupfs path
    /// places it.
    fn in_pod(uid: &str, id: &str) -> ProcInfo {
        ProcInfo {
            comm: "app".into(),
            identity: crate::host::container::identity(&format!(
                "0::/kubepods/besteffort/pod{uid}/{id}\n"
            )),
            ..ProcInfo::default()
        }
    }

    /// `--by pod` sums a pod's containers into one row (with `k8s`, no `container`);
    /// `--by container` one row per container; a host process stays a row of its
    /// command either way.
    #[test]
    fn rows_by_pod_and_by_container() {
        let uid = "12345678-9abc-def0-1234-56789abcdef0";
        let (c1, c2) = ("a1".repeat(32), "b2".repeat(32));
        let mut t = Table::new(NS);
        let mut procs = procs();
        let placed = [(101u32, Some(&c1)), (102, Some(&c2)), (103, None)];
        for (i, (pid, id)) in placed.into_iter().enumerate() {
            procs.insert(
                pid,
                id.map_or_else(
                    || ProcInfo {
                        comm: "app".into(),
                        ..ProcInfo::default()
                    },
                    |id| in_pod(uid, id),
                ),
            );
            t.apply(&enter_cw(
                1.0,
                L,
                &format!("127.0.0.1:{}", 41000 + i),
                pid.into(),
            ));
        }
        let idx = hold(&t, |inode| vec![inode as u32]);
        let snapshot = Snapshot {
            holders: &idx,
            ..inputs(&t, 100, &procs)
        };
        let by = |by: GroupBy| {
            build(
                &snapshot,
                &ReportConfig { by, ..cfg() },
                &mut Growth::default(),
            )
        };
        let pods = by(GroupBy::Pod);
        assert_eq!(pods.processes.len(), 2, "{:?}", pods.processes);
        let pod = pods.processes.iter().find(|p| p.k8s.is_some()).unwrap();
        assert_eq!((pod.close_wait, pod.pids.clone()), (2, vec![101, 102]));
        assert_eq!(pod.k8s.as_ref().unwrap().pod_uid.as_deref(), Some(uid));
        assert!(pod.container.is_none());
        let containers = by(GroupBy::Container);
        assert_eq!(containers.processes.len(), 3);
        let ids: Vec<Option<&str>> = containers
            .processes
            .iter()
            .map(|p| p.container.as_ref().map(|c| c.id.as_str()))
            .collect();
        assert!(ids.contains(&Some(c1.as_str())) && ids.contains(&Some(c2.as_str())));
        assert!(ids.contains(&None), "the host process: {ids:?}");
    }

    /// Names from the runtime reach the rows: `container.name`, `k8s` with namespace,
    /// pod and container, the table's place and the reason sentence; `--by command`
    /// keeps one program in two pods apart.
    #[test]
    fn rows_carry_the_runtimes_names() {
        use crate::host::runtime::{K8sNames, Names};
        let uid = |n: u8| format!("{n}2345678-9abc-def0-1234-56789abcdef0");
        let mut t = Table::new(NS);
        let mut procs = procs();
        for (i, pod) in ["checkout-7f9c", "checkout-8d2e"].into_iter().enumerate() {
            let pid = 201 + i as u32;
            let id = format!("{i}").repeat(64);
            let uid = uid(i as u8 + 1);
            procs.insert(
                pid,
                ProcInfo {
                    names: Some(std::sync::Arc::new(Names {
                        runtime: None,
                        name: Some("app".into()),
                        k8s: Some(K8sNames {
                            namespace: "shop".into(),
                            pod: pod.into(),
                            pod_uid: Some(uid.clone()),
                            container: Some("app".into()),
                        }),
                    })),
                    ..in_pod(&uid, &id)
                },
            );
            t.apply(&enter_cw(
                1.0,
                L,
                &format!("127.0.0.1:{}", 42000 + i),
                pid.into(),
            ));
        }
        let idx = hold(&t, |inode| vec![inode as u32]);
        let snapshot = Snapshot {
            holders: &idx,
            ..inputs(&t, 100, &procs)
        };
        let r = build(
            &snapshot,
            &ReportConfig {
                by: GroupBy::Command,
                ..cfg()
            },
            &mut Growth::default(),
        );
        assert_eq!(r.processes.len(), 2, "one row per pod: {:?}", r.processes);
        let row = r.processes.iter().find(|p| p.pid == 201).unwrap();
        let v = serde_json::to_value(row).unwrap();
        assert_eq!(v["container"]["name"], "app");
        assert_eq!(
            v["k8s"],
            serde_json::json!({"namespace": "shop", "pod": "checkout-7f9c", "pod_uid": uid(1), "container": "app"})
        );
        assert_eq!(row.place().as_deref(), Some("shop/checkout-7f9c/app"));
        let reason = row.reason.as_deref().unwrap();
        assert!(
            reason.starts_with("app[201] in shop/checkout-7f9c/app holds 1 CLOSE_WAIT"),
            "{reason}"
        );
        let pods = build(
            &snapshot,
            &ReportConfig {
                by: GroupBy::Pod,
                ..cfg()
            },
            &mut Growth::default(),
        );
        let pod = pods.processes.iter().find(|p| p.pid == 202).unwrap();
        assert_eq!(pod.place().as_deref(), Some("shop/checkout-8d2e"));
        assert_eq!(pod.k8s.as_ref().unwrap().container, None);
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
        let listening = Listening::from_iter([((NS, 8080), vec![4242])]);
        let mut inp = inputs(&t, 100, &procs);
        inp.holders = &idx;
        inp.listening = &listening;
        let r = build(&inp, &cfg(), &mut Growth::default());
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
        assert_eq!(passes::peer_addr(&v6, &listening).to_string(), "[::1]:*");
    }

    #[test]
    fn of_peers_with_as_many_sockets_the_close_wait_one_leads() {
        let mut t = Table::new(NS);
        for i in 0..2 {
            t.apply(&enter_cw(
                1.0,
                &format!("127.0.0.1:{}", 41000 + i),
                "10.0.0.9:5432",
                60 + i,
            ));
        }
        let idx = hold(&t, |_| vec![4242]);
        // As many TIME_WAITs, to a peer whose address sorts first.
        let tw = timewaits(2, "127.0.0.1:40000", "10.0.0.1:80", true, 4242);
        let procs = procs();
        let mut inp = inputs(&t, 20, &procs);
        inp.holders = &idx;
        inp.timewait = &tw;
        let r = build(&inp, &cfg(), &mut Growth::default());
        let peers: Vec<(&str, u64, u64)> = r.processes[0]
            .peers
            .iter()
            .map(|p| (p.addr.as_str(), p.close_wait, p.time_wait))
            .collect();
        assert_eq!(peers, [("10.0.0.9:5432", 2, 0), ("10.0.0.1:80", 0, 2)]);
    }

    /// A tracker holding `n` confirmed TIME_WAITs from `local` (port varying when
    /// `vary_local`) to `remote`, owned by `pid`.
    fn timewaits(n: u16, local: &str, remote: &str, vary_local: bool, pid: u32) -> Tracker {
        polled(TIME_WAIT, n, local, remote, vary_local, pid)
    }

    /// `n` closes by `pid` (at 10 s) confirmed by a poll (at 11 s) as timewait sockets in
    /// `state`: TIME_WAIT, or FIN_WAIT2 for orphans whose peer has not closed.
    fn polled(state: u8, n: u16, local: &str, remote: &str, vary_local: bool, pid: u32) -> Tracker {
        use crate::{decode::Owner, monitor::table::tests::tr, monitor::timewait::TwOwner};
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
            let mut d = diag(state, &l.to_string(), &r.to_string(), 0, 0);
            d.timewait = true;
            d.expires_ms = 59_000;
            polled.push(d);
        }
        let none = |_: u16| -> Option<TwOwner> { None };
        tw.observe(NS, &polled, Listed::All, 11 * SEC, false, &none);
        tw
    }

    #[test]
    fn server_closing_first_is_an_active_closer() {
        let t = Table::new(NS);
        let tw = timewaits(3, L, "127.0.0.2:50000", false, 7);
        let procs = procs();
        let listening = Listening::from_iter([((NS, 8080), vec![7])]);
        let mut inp = inputs(&t, 20, &procs);
        inp.listening = &listening;
        inp.timewait = &tw;
        let r = build(&inp, &cfg(), &mut Growth::default());
        let p = &r.processes[0];
        assert_eq!((p.pid, p.time_wait), (7, 3));
        assert_eq!(p.flags, [flag::ACTIVE_CLOSER.name]);
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
        let r = build(&inp, &strict, &mut Growth::default());
        assert!(r.processes[0].flags.is_empty());
    }

    #[test]
    fn client_time_wait_is_not_an_active_closer_but_may_press_ports() {
        let t = Table::new(NS);
        // 6 TIME_WAITs from ephemeral ports 40000.. to one destination.
        let tw = timewaits(6, "127.0.0.1:40000", "127.0.0.1:8080", true, 42);
        // A client that is still running (one that exited folds into a quiet line).
        let mut procs = procs();
        procs.insert(
            42,
            ProcInfo {
                comm: "client".into(),
                fds: 5,
                fd_limit: Some(1024),
                cgroup: None,
                ..ProcInfo::default()
            },
        );
        let kernel = BTreeMap::from([(
            NS,
            KernelInfo {
                ip_local_port_range: [40000, 40009],
                tcp_tw_reuse: Some(2),
                tcp_max_tw_buckets: Some(131072),
                time_wait_overflow: Some(0),
            },
        )]);
        let mut inp = inputs(&t, 20, &procs);
        inp.timewait = &tw;
        inp.kernel = &kernel;
        let r = build(&inp, &cfg(), &mut Growth::default());
        let p = &r.processes[0];
        assert_eq!((p.pid, p.time_wait), (42, 6));
        assert_eq!(p.flags, [flag::PORT_PRESSURE.name]);
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
        let r = build(&inp, &cfg(), &mut Growth::default());
        assert!(r.processes[0].flags.is_empty());
    }

    #[test]
    fn a_peer_that_never_closes_is_named() {
        let t = Table::new(NS);
        let procs = procs();
        let fin_wait2 = |n| polled(FIN_WAIT2, n, L, "10.1.2.3:40000", true, 7);
        let cfg = ReportConfig {
            fin_wait2_age: Duration::from_secs(10),
            ..cfg()
        };
        // 12 connections closed at 10 s, the peer silent since: at 30 s they waited 20 s.
        let tw = fin_wait2(12);
        let inp = Snapshot {
            timewait: &tw,
            ..inputs(&t, 30, &procs)
        };
        let r = build(&inp, &cfg, &mut Growth::default());
        let p = &r.processes[0];
        assert_eq!((p.pid, p.fin_wait2), (7, 12));
        assert_eq!(p.fin_wait2_oldest_s, Some(20.0));
        assert_eq!(p.flags, [flag::PEER_NOT_CLOSING.name]);
        assert_eq!(p.peers[0].fin_wait2, 12);
        let reason = p.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("12 connections to 10.1.2.3")
                && reason.contains("the program on 10.1.2.3 is not closing its sockets"),
            "{reason}"
        );
        // Below --fin-wait2-min, or not yet older than --fin-wait2-age: no flag.
        let few = fin_wait2(9);
        let r = build(
            &Snapshot {
                timewait: &few,
                ..inputs(&t, 30, &procs)
            },
            &cfg,
            &mut Growth::default(),
        );
        assert!(r.processes[0].flags.is_empty(), "{:?}", r.processes[0]);
        let r = build(
            &Snapshot {
                timewait: &tw,
                ..inputs(&t, 15, &procs)
            },
            &cfg,
            &mut Growth::default(),
        );
        assert!(r.processes[0].flags.is_empty(), "{:?}", r.processes[0]);
        assert_eq!(r.processes[0].fin_wait2, 12);
    }

    /// Both ends on this host: the closer's connections wait in FIN_WAIT2 on CLOSE_WAIT
    /// sockets that a process connwatch names holds. That process is the leaker; the
    /// closer is not flagged for it.
    #[test]
    fn a_local_peer_that_never_closes_is_blamed_not_the_closer() {
        use crate::decode::{Owner, OwnerSource};
        use crate::host::runtime::{K8sNames, Names};
        let mut procs = procs();
        procs.get_mut(&4242).unwrap().names = Some(std::sync::Arc::new(Names {
            runtime: None,
            name: Some("app".into()),
            k8s: Some(K8sNames {
                namespace: "shop".into(),
                pod: "checkout-7f9c".into(),
                pod_uid: None,
                container: Some("app".into()),
            }),
        }));
        let mut t = Table::new(NS);
        for i in 0..12u16 {
            let mut e = enter_cw(
                10.0,
                "127.0.0.1:40000",
                &format!("127.0.0.1:{}", 8080 + i),
                0,
            );
            e.owner = Owner {
                pid: Some(4242),
                comm: Some("python3".into()),
                source: OwnerSource::Carried,
            };
            t.apply(&e);
        }
        let tw = polled(FIN_WAIT2, 12, L, "127.0.0.1:40000", true, 7);
        let cfg = ReportConfig {
            fin_wait2_age: Duration::from_secs(10),
            ..cfg()
        };
        let r = build(
            &Snapshot {
                timewait: &tw,
                ..inputs(&t, 30, &procs)
            },
            &cfg,
            &mut Growth::default(),
        );
        let closer = r.processes.iter().find(|p| p.pid == 7).unwrap();
        assert_eq!(closer.fin_wait2, 12);
        assert!(closer.flags.is_empty(), "{closer:?}");
        // Its peer entry names the process at the other end, and its pod.
        assert_eq!(
            serde_json::to_value(&closer.peers[0]).unwrap()["process"],
            serde_json::json!({"pid": 4242, "comm": "python3", "namespace": "shop", "pod": "checkout-7f9c", "container": "app"}),
            "{closer:?}"
        );
        let leaker = r.processes.iter().find(|p| p.pid == 4242).unwrap();
        assert_eq!(leaker.close_wait, 12);
        // The same FIN_WAIT2 sockets towards a peer nobody here names: flagged.
        let stranger = polled(FIN_WAIT2, 12, L, "127.0.0.1:40500", true, 7);
        let r = build(
            &Snapshot {
                timewait: &stranger,
                ..inputs(&t, 30, &procs)
            },
            &cfg,
            &mut Growth::default(),
        );
        let closer = r.processes.iter().find(|p| p.pid == 7).unwrap();
        assert_eq!(closer.flags, [flag::PEER_NOT_CLOSING.name]);
        assert_eq!(closer.peers[0].process, None);
    }

    /// Folding goes by what a process is: one that exited leaving only TIME_WAITs folds
    /// into its command's quiet line, which counts them; a live one keeps its row.
    #[test]
    fn exited_processes_with_only_time_waits_fold() {
        let t = Table::new(NS);
        let procs = procs();
        // pid 42 exited (not in procs) leaving 6 TIME_WAITs; pid 7 (nginx) is alive.
        let gone = timewaits(6, "127.0.0.1:40000", "127.0.0.1:9999", true, 42);
        let r = build(
            &Snapshot {
                timewait: &gone,
                ..inputs(&t, 20, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        assert!(r.processes.iter().all(|p| p.pid != 42), "{:?}", r.processes);
        let q = r.quiet.iter().find(|q| q.time_wait == 6).unwrap();
        assert_eq!(q.processes, 1);
        let alive = timewaits(6, "127.0.0.1:40000", "127.0.0.1:9999", true, 7);
        let r = build(
            &Snapshot {
                timewait: &alive,
                ..inputs(&t, 20, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        assert_eq!(
            r.processes.iter().find(|p| p.pid == 7).unwrap().time_wait,
            6
        );
        assert!(r.quiet.is_empty(), "{:?}", r.quiet);
    }

    /// Three workers of one program, 4 leaked sockets each.
    fn workers() -> (Table, FdIndex, HashMap<u32, ProcInfo>) {
        let mut t = Table::new(NS);
        let mut procs = procs();
        for (w, pid) in [101u32, 102, 103].into_iter().enumerate() {
            procs.insert(
                pid,
                ProcInfo {
                    comm: "gunicorn".into(),
                    fds: 20 + pid as u64,
                    fd_limit: Some(1024),
                    cgroup: Some("/system.slice/app.service".into()),
                    ..ProcInfo::default()
                },
            );
            for i in 0..4 {
                let inode = 1000 + (w * 10 + i) as u64;
                let r = format!("127.0.0.9:{}", 41000 + inode);
                t.apply(&enter_cw(10.0, L, &r, inode));
            }
        }
        let idx = hold(&t, |inode| vec![101 + ((inode - 1000) / 10) as u32]);
        (t, idx, procs)
    }

    #[test]
    fn workers_of_one_command_are_one_row() {
        let (t, idx, procs) = workers();
        let snapshot = Snapshot {
            holders: &idx,
            ..inputs(&t, 100, &procs)
        };
        let by_process = build(&snapshot, &cfg(), &mut Growth::default());
        assert_eq!(by_process.processes.len(), 3);
        assert!(by_process.processes.iter().all(|p| p.close_wait == 4));

        for by in [GroupBy::Command, GroupBy::Unit] {
            let cfg = ReportConfig { by, ..cfg() };
            let r = build(&snapshot, &cfg, &mut Growth::default());
            assert_eq!(r.by, by.as_str());
            assert_eq!(r.processes.len(), 1, "{:?}", r.processes);
            let g = &r.processes[0];
            assert_eq!((g.pid, g.close_wait), (101, 12));
            assert_eq!(g.pids, [101, 102, 103]);
            assert_eq!(g.comm, "gunicorn");
            assert_eq!(g.unit.as_deref(), Some("app.service"));
            // Flags are raised on the group, and it runs out of fds where its fullest
            // worker does.
            assert_eq!(g.flags, [flag::CLOSE_WAIT_LEAK.name]);
            assert_eq!(g.fds, Some(123));
            assert!(
                g.reason
                    .as_deref()
                    .unwrap_or_default()
                    .starts_with("gunicorn (3 processes) holds 12")
            );
        }
    }

    #[test]
    fn the_likely_cause_follows_the_evidence() {
        let leak = |recv_q: u32, idle_ms: Option<u32>| {
            let mut t = Table::new(NS);
            let mut sockets = Vec::new();
            for i in 0..3 {
                let r = format!("127.0.0.1:{}", 40000 + i);
                t.apply(&enter_cw(10.0, L, &r, 100 + i as u64));
                let mut d = diag(CLOSE_WAIT, L, &r, 100 + i as u64, 90_000);
                d.recv_q = recv_q;
                // 90 s in CLOSE_WAIT at 100 s; the peer's last data came before that.
                d.last_data_recv_ms = idle_ms.map(|ms| 90_000 + ms);
                sockets.push(d);
            }
            t.fill_evidence(NS, &sockets, 100 * SEC);
            let idx = hold(&t, |_| vec![4242]);
            let procs = procs();
            let r = build(
                &Snapshot {
                    holders: &idx,
                    ..inputs(&t, 100, &procs)
                },
                &cfg(),
                &mut Growth::default(),
            );
            r.processes[0].reason.clone().unwrap_or_default()
        };
        // Unread bytes (Recv-Q counts the FIN as one).
        let unread = leak(101, Some(0));
        assert!(
            unread.contains(
                "3 of them hold data it never read (300 bytes): the program stopped reading them."
            ),
            "{unread}"
        );
        // Nothing unread, quiet for 30 s before the FIN: a pool outliving keep-alive.
        let pooled = leak(1, Some(30_000));
        assert!(
            pooled.contains("make the pool's idle timeout shorter than the server's"),
            "{pooled}"
        );
        // Data and FIN together (a server that closes after answering): no cause given.
        let plain = leak(1, Some(0));
        assert!(
            plain.ends_with("It never calls close() after the peer hangs up."),
            "{plain}"
        );
        let unknown = leak(1, None);
        assert!(
            unknown.ends_with("It never calls close() after the peer hangs up."),
            "{unknown}"
        );
    }

    #[test]
    fn held_fin_wait2_sockets_count_for_their_holder() {
        let mut t = Table::new(NS);
        // A client shut down its side of 2 connections to 10.1.2.3:443 and keeps them.
        let dump: Vec<DiagSocket> = (0..2)
            .map(|i| {
                diag(
                    FIN_WAIT2,
                    &format!("127.0.0.1:{}", 41000 + i),
                    "10.1.2.3:443",
                    500 + i,
                    0,
                )
            })
            .collect();
        t.note_fin_wait2(NS, &dump, 10 * SEC);
        t.note_fin_wait2(NS, &dump, 20 * SEC);
        let idx = FdIndex::with_holders([(500, vec![4242]), (501, vec![4242])]);
        let procs = procs();
        let r = build(
            &Snapshot {
                holders: &idx,
                ..inputs(&t, 30, &procs)
            },
            &cfg(),
            &mut Growth::default(),
        );
        let p = &r.processes[0];
        assert_eq!((p.pid, p.fin_wait2), (4242, 2));
        // Aged from the first dump that listed them.
        assert_eq!(p.fin_wait2_oldest_s, Some(20.0));
        assert_eq!(p.owner_sources, ["fd"]);
        assert_eq!(p.peers[0].fin_wait2, 2);
        // Gone from the next dump: gone from the report.
        t.note_fin_wait2(NS, &[], 31 * SEC);
        assert_eq!(t.held_fin_wait2().count(), 0);
    }
}
