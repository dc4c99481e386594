//! One process's accumulated evidence turned into its row: figures, flags and reason.
use super::{
    Evidence, Growth, Peer, ProcessRow, ReportConfig, Snapshot, flag,
    passes::{Acc, closed_stats},
    round3,
};

/// Peers listed per process.
const TOP_PEERS: usize = 5;

pub(super) fn row(
    pid: u32,
    mut a: Acc,
    s: &Snapshot,
    cfg: &ReportConfig,
    growth: &Growth,
) -> ProcessRow {
    let info = s.procs.get(&pid);
    let growth_per_min = growth.per_min(pid).filter(|_| a.close_wait > 0);
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
    let (peers, close_wait_peers) = top_peers(&mut a);
    let ev = Evidence {
        close_wait_peers,
        closer_port: a
            .tw_on_listen_port
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(p, n)| (*p, *n)),
        pressure: std::mem::take(&mut a.pressure),
    };

    let mut row = ProcessRow {
        pid,
        comm: info
            .map(|i| i.comm.clone())
            .or(a.comm.take())
            .unwrap_or_else(|| "?".into()),
        cgroup: info.and_then(|i| i.cgroup.clone()),
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

/// The peers with the most sockets (at most `TOP_PEERS`), and how many peers in all
/// account for CLOSE_WAIT sockets.
fn top_peers(a: &mut Acc) -> (Vec<Peer>, usize) {
    let mut peers: Vec<Peer> = a
        .peers
        .drain()
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
    let close_wait_peers = peers.iter().filter(|p| p.close_wait > 0).count();
    peers.truncate(TOP_PEERS);
    (peers, close_wait_peers)
}
