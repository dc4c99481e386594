//! One row's accumulated evidence (a process, or a group of them) turned into its row:
//! figures, flags and reason.
use super::{
    ContainerRow, Evidence, GroupKey, Growth, K8sRow, LeakSite, NotClosing, Peer, PeerProcess,
    ProcessRow, ReportConfig, Snapshot, flag,
    group::Group,
    key::comm_of,
    passes::{Acc, closed_stats},
    round3, unit_of,
};
use crate::host::owners::ProcInfo;

/// Peers listed per row.
const TOP_PEERS: usize = 5;

pub(super) fn row(
    key: &GroupKey,
    g: Group,
    s: &Snapshot,
    cfg: &ReportConfig,
    growth: &Growth,
) -> ProcessRow {
    let Group {
        mut pids,
        acc: mut a,
    } = g;
    pids.sort_unstable();
    let pid = pids.first().copied().unwrap_or(0);
    let comm = match key {
        GroupKey::Comm(c, _) => c.clone(),
        _ => comm_of(pid, a.comm.as_deref(), s.procs),
    };
    let cgroup = pids
        .iter()
        .find_map(|p| s.procs.get(p).and_then(|i| i.cgroup.clone()));
    let (mut container, mut k8s) = placement(&pids, s);
    if matches!(key, GroupKey::Pod(_)) {
        // A pod's row stands for all its containers.
        container = None;
        if let Some(k) = k8s.as_mut() {
            k.container = None;
        }
    }
    // A group runs out of fds where its tightest process does.
    let info = tightest(&pids, s);
    let growth_per_min = growth.per_min(key).filter(|_| a.close_wait > 0);
    let fds = info.map(|i| i.fds);
    let fd_limit = info.and_then(|i| i.fd_limit);
    let fds_exhausted_in_s = match (growth_per_min, fds, fd_limit) {
        (Some(g), Some(used), Some(limit)) if g > 0.0 => {
            Some(round3(limit.saturating_sub(used) as f64 / g * 60.0))
        }
        _ => None,
    };
    let span_s = cfg.window.as_secs_f64().min(s.elapsed_s);
    let tw_rate = (span_s > 0.0 && a.tw_created > 0).then(|| round3(a.tw_created as f64 / span_s));
    let ev = evidence(&mut a, cfg);
    let peers = top_peers(&mut a, s);

    let mut row = ProcessRow {
        pid,
        pids,
        comm,
        unit: cgroup.as_deref().map(unit_of),
        cgroup,
        close_wait: a.close_wait,
        close_wait_oldest_s: a.oldest_ns.map(|(ns, _)| round3(ns as f64 / 1e9)),
        close_wait_age_source: a.oldest_ns.map(|(_, s)| s.as_str()),
        time_wait: a.time_wait,
        time_wait_oldest_s: a.tw_oldest_ns.map(|ns| round3(ns as f64 / 1e9)),
        fds,
        fd_limit,
        flags: Vec::new(),
        reason: None,
        peers,
        owner_sources: std::mem::take(&mut a.sources).into_iter().collect(),
        close_wait_growth_per_min: growth_per_min.map(round3),
        close_wait_recv_q_bytes: a.recv_q,
        fds_exhausted_in_s,
        close_wait_closed: closed_stats(&mut a.closed),
        time_wait_created_per_s: tw_rate,
        fin_wait2: a.fin_wait2,
        fin_wait2_oldest_s: a.fw2_oldest_ns.map(|ns| round3(ns as f64 / 1e9)),
        container,
        k8s,
        leak_sites: leak_sites(&a, s),
    };
    let raised: Vec<&flag::Flag> = flag::ALL
        .into_iter()
        .filter(|f| f.raised(&row, &ev, cfg))
        .collect();
    let sentences: Vec<String> = raised.iter().flat_map(|f| f.sentences(&row, &ev)).collect();
    row.flags = raised.iter().map(|f| f.name).collect();
    row.reason = (!sentences.is_empty()).then(|| sentences.join(" "));
    row
}

/// Sites listed per row at most.
const LEAK_SITES_MAX: usize = 8;

/// The row's CLOSE_WAIT sockets per leak site, most first; on a tie, the site where
/// EOF was read first (where the program went on without closing).
fn leak_sites(a: &Acc, s: &Snapshot) -> Vec<LeakSite> {
    let Some(book) = s.sites else {
        return Vec::new();
    };
    let mut sites: Vec<LeakSite> = a
        .sites
        .iter()
        .filter_map(|(&id, &n)| {
            let site = book.site(id)?;
            Some(LeakSite {
                sockets: n,
                at: site.at,
                stack: site.stack.clone(),
                truncated: site.truncated,
                hint: site.hint,
                summary: site.summary(),
            })
        })
        .collect();
    sites.sort_by(|x, y| {
        y.sockets
            .cmp(&x.sockets)
            .then(x.at.made().cmp(&y.at.made()))
            .then(x.stack.cmp(&y.stack))
    });
    sites.truncate(LEAK_SITES_MAX);
    sites
}

/// The member process nearest its fd limit (the only one for a process row).
fn tightest<'a>(pids: &[u32], s: &'a Snapshot) -> Option<&'a ProcInfo> {
    pids.iter()
        .filter_map(|p| s.procs.get(p))
        .max_by(|a, b| fill(a).total_cmp(&fill(b)))
}

fn fill(i: &ProcInfo) -> f64 {
    i.fd_limit
        .filter(|l| *l > 0)
        .map_or(0.0, |l| i.fds as f64 / l as f64)
}

/// The container and pod of a row: those its live processes share (each none when
/// they differ, or none of them is alive to tell), named as the runtime names them. A
/// pod's row shares the pod, not the container.
fn placement(pids: &[u32], s: &Snapshot) -> (Option<ContainerRow>, Option<K8sRow>) {
    let infos: Vec<&ProcInfo> = pids.iter().filter_map(|p| s.procs.get(p)).collect();
    let first = infos.first();
    let shared =
        |same: &dyn Fn(&ProcInfo) -> bool| !infos.is_empty() && infos.iter().all(|i| same(i));
    let container = first
        .and_then(|f| f.identity.container.as_ref().map(|c| (f, c)))
        .filter(|(_, c)| shared(&|i| i.identity.container.as_ref() == Some(c)))
        .map(|(f, c)| ContainerRow {
            id: c.id.clone(),
            // The runtime that listed it, where the cgroup path could only guess.
            runtime: f
                .names
                .as_ref()
                .and_then(|n| n.runtime)
                .unwrap_or(c.runtime),
            name: f.names.as_ref().and_then(|n| n.name.clone()),
        });
    let pod_uid = first
        .and_then(|f| f.pod_uid())
        .filter(|uid| shared(&|i| i.pod_uid() == Some(uid)));
    let names = first.and_then(|f| f.pod()).filter(|k| {
        shared(&|i| {
            i.pod()
                .is_some_and(|o| (&o.namespace, &o.pod) == (&k.namespace, &k.pod))
        })
    });
    let k8s = (pod_uid.is_some() || names.is_some()).then(|| K8sRow {
        namespace: names.map(|k| k.namespace.clone()),
        pod: names.map(|k| k.pod.clone()),
        pod_uid: pod_uid.map(String::from),
        container: names
            .and_then(|k| k.container.clone())
            .filter(|_| container.is_some()),
    });
    (container, k8s)
}

/// What the flags need beyond the row's own figures.
fn evidence(a: &mut Acc, cfg: &ReportConfig) -> Evidence {
    Evidence {
        close_wait_peers: a.peers.values().filter(|c| c[0] > 0).count(),
        closer_port: a
            .tw_on_listen_port
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(p, n)| (*p, *n)),
        pressure: std::mem::take(&mut a.pressure),
        not_closing: a
            .fw2_waiting
            .iter()
            .max_by(|x, y| x.1.0.cmp(&y.1.0).then(y.0.cmp(x.0)))
            .map(|(ip, (n, oldest))| NotClosing {
                peer: *ip,
                count: *n,
                oldest_s: round3(*oldest as f64 / 1e9),
                waited_s: cfg.fin_wait2_age.as_secs_f64(),
            }),
        cw_unread: a.cw_unread,
        cw_idle: a.cw_idle,
        cw_goodbye: a.cw_goodbye,
    }
}

/// The peers with the most sockets (at most `TOP_PEERS`).
fn top_peers(a: &mut Acc, s: &Snapshot) -> Vec<Peer> {
    let named = std::mem::take(&mut a.peer_pids);
    let mut peers: Vec<Peer> = a
        .peers
        .drain()
        .map(|(addr, [cw, tw, fw2])| Peer {
            process: named
                .get(&addr)
                .copied()
                .flatten()
                .map(|pid| peer_process(pid, s)),
            addr: addr.to_string(),
            close_wait: cw,
            time_wait: tw,
            fin_wait2: fw2,
        })
        .collect();
    // Most sockets first; of peers with as many, the one with more CLOSE_WAIT (a leak
    // of this process), then TIME_WAIT, leads: the text view shows only the first.
    peers.sort_by(|x, y| {
        (y.close_wait + y.time_wait + y.fin_wait2)
            .cmp(&(x.close_wait + x.time_wait + x.fin_wait2))
            .then(y.close_wait.cmp(&x.close_wait))
            .then(y.time_wait.cmp(&x.time_wait))
            .then(x.addr.cmp(&y.addr))
    });
    peers.truncate(TOP_PEERS);
    peers
}

/// The process at the other end of a connection on this host, with its pod.
fn peer_process(pid: u32, s: &Snapshot) -> PeerProcess {
    let info = s.procs.get(&pid);
    let k8s = info.and_then(ProcInfo::pod);
    PeerProcess {
        pid,
        comm: info.map_or_else(|| "?".into(), |i| i.comm.clone()),
        namespace: k8s.map(|k| k.namespace.clone()),
        pod: k8s.map(|k| k.pod.clone()),
        container: k8s.and_then(|k| k.container.clone()).or_else(|| {
            info.and_then(|i| i.names.as_ref())
                .and_then(|n| n.name.clone())
        }),
    }
}
