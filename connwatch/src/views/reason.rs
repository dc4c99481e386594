//! The sentence that explains each flag, e.g. `python3[4242] holds 50 CLOSE_WAIT sockets
//! from 127.0.0.1:8080, oldest 5m12s, +10/min; 60 of 1024 fds used: fds run out in
//! ~96 min. It never calls close() after the peer hangs up.` One function per flag; the
//! report joins those of the flags it raised into a row's `reason`.
use super::format::{fmt_age, fmt_eta, fmt_rate, plural};
use crate::report::{Evidence, ProcessRow};

/// `comm[pid]`, or for a grouped row `comm (N processes)`.
fn who(r: &ProcessRow) -> String {
    match r.pids.len() {
        0 | 1 => format!("{}[{}]", r.comm, r.pid),
        n => format!("{} ({n} processes)", r.comm),
    }
}

pub fn close_wait_leak(r: &ProcessRow, ev: &Evidence) -> Vec<String> {
    let mut s = format!(
        "{} holds {} CLOSE_WAIT socket{}",
        who(r),
        r.close_wait,
        plural(r.close_wait)
    );
    if let Some(p) = r.peers.iter().find(|p| p.close_wait > 0) {
        s += &format!(" from {}", p.addr);
        let others = ev.close_wait_peers.saturating_sub(1);
        if others > 0 {
            s += &format!(" and {others} other peer{}", plural(others as u64));
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
    if let Some(cause) = likely_cause(r, ev) {
        s += " ";
        s += &cause;
    }
    vec![s]
}

/// The classic cause the evidence points to, when it points to one: most of the
/// sockets hold unread data, or most were closed by the peer after a quiet spell with
/// nothing unread.
fn likely_cause(r: &ProcessRow, ev: &Evidence) -> Option<String> {
    let most = |n: u64| n > 0 && n * 2 >= r.close_wait;
    if most(ev.cw_unread) {
        return Some(format!(
            "{} of them hold data it never read ({} bytes): the program stopped reading them.",
            ev.cw_unread, r.close_wait_recv_q_bytes
        ));
    }
    if ev.cw_unread == 0 && most(ev.cw_idle) {
        return Some(format!(
            "{} of them were closed by the peer after a quiet spell, with nothing unread: a pool keeps connections that the server's keep-alive timeout already closed; make the pool's idle timeout shorter than the server's.",
            ev.cw_idle
        ));
    }
    None
}

pub fn close_wait_slow(r: &ProcessRow, _: &Evidence) -> Vec<String> {
    let c = &r.close_wait_closed;
    vec![format!(
        "{} closed {} CLOSE_WAIT socket{} only {} after the peer hung up (p50), {} at p99, up to {}: it is slow to call close().",
        who(r),
        c.count,
        plural(c.count),
        fmt_age(c.p50_s.unwrap_or(0.0)),
        fmt_age(c.p99_s.unwrap_or(0.0)),
        fmt_age(c.max_s.unwrap_or(0.0)),
    )]
}

pub fn active_closer(r: &ProcessRow, ev: &Evidence) -> Vec<String> {
    let Some((port, n)) = ev.closer_port else {
        return Vec::new();
    };
    let mut s = format!(
        "{} listens on port {port} and closed first on {n} of its connections: {n} TIME_WAIT socket{} on that port",
        who(r),
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
    vec![s]
}

pub fn port_pressure(r: &ProcessRow, ev: &Evidence) -> Vec<String> {
    ev.pressure
        .iter()
        .map(|p| {
            format!(
                "{} has TIME_WAIT sockets to {} from local ephemeral ports: {} in all, {:.0}% of the range {}-{} (tcp_tw_reuse={}); new connections to it may fail with EADDRNOTAVAIL. Reuse connections (pooling, keep-alive) or widen net.ipv4.ip_local_port_range.",
                who(r),
                p.dest,
                p.count,
                p.pct,
                p.range[0],
                p.range[1],
                p.tw_reuse.map_or("unknown".into(), |v| v.to_string()),
            )
        })
        .collect()
}

pub fn peer_not_closing(r: &ProcessRow, ev: &Evidence) -> Vec<String> {
    let Some(n) = &ev.not_closing else {
        return Vec::new();
    };
    vec![format!(
        "{} closed first on {} connection{} to {} that {} waited more than {} for that peer to close (oldest {}; {} in FIN_WAIT2 in all): the program on {} is not closing its sockets, a CLOSE_WAIT leak on that host. Look for it there (connwatch watch, or ss -tanp state close-wait).",
        who(r),
        n.count,
        plural(n.count),
        n.peer,
        if n.count == 1 { "has" } else { "have" },
        fmt_age(n.waited_s),
        fmt_age(n.oldest_s),
        r.fin_wait2,
        n.peer,
    )]
}
