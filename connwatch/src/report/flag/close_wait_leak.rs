//! `close_wait_leak`: the process holds CLOSE_WAIT sockets older than `--close-wait-age`:
//! its peers hung up and it never called close(). The sentence names the peer, the age,
//! the growth, the fd headroom and, where the evidence points to one, the likely cause.
use super::{Flag, who};
use crate::report::{
    Evidence, ProcessRow,
    words::{fmt_age, fmt_eta, fmt_rate, plural},
};

pub const FLAG: Flag = Flag {
    name: "close_wait_leak",
    threshold: "--close-wait-age",
    meaning: "holds CLOSE_WAIT sockets older than --close-wait-age",
    raised: |r, _, cfg| {
        r.close_wait_oldest_s
            .is_some_and(|o| o > cfg.close_wait_age.as_secs_f64())
    },
    sentences,
};

fn sentences(r: &ProcessRow, ev: &Evidence) -> Vec<String> {
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
    if let Some(sites) = sites(r) {
        s += " ";
        s += &sites;
    }
    vec![s]
}

/// Where the code made its leaked sockets and read their EOF: the top site of each.
fn sites(r: &ProcessRow) -> Option<String> {
    let made = r.leak_sites.iter().find(|s| s.at.made());
    let eof = r.leak_sites.iter().find(|s| !s.at.made());
    let parts: Vec<String> = [eof, made]
        .into_iter()
        .flatten()
        .map(|s| format!("{} of them {}", s.sockets, s.summary))
        .collect();
    (!parts.is_empty()).then(|| format!("Leak site: {}.", parts.join("; ")))
}

/// The classic cause the evidence points to, when it points to one: most of the
/// sockets hold data the program never read (a reply, or all the peer sent), or most
/// were closed by the peer after a quiet spell, with nothing unread or only the peer's
/// goodbye (a server's idle timeout closing a pool's idle connections).
fn likely_cause(r: &ProcessRow, ev: &Evidence) -> Option<String> {
    let most = |n: u64| n > 0 && n * 2 >= r.close_wait;
    if most(ev.cw_unread) {
        return Some(format!(
            "{} of them hold data it never read ({} bytes): the program stopped reading them.",
            ev.cw_unread, r.close_wait_recv_q_bytes
        ));
    }
    if ev.cw_unread == 0 && most(ev.cw_idle) {
        let unread = if ev.cw_goodbye > 0 {
            format!(
                ", {} with only the server's parting message unread",
                ev.cw_goodbye
            )
        } else {
            ", with nothing unread".to_string()
        };
        return Some(format!(
            "{} of them were closed by the peer after a quiet spell{unread}: a pool keeps connections that the server's idle timeout already closed; make the pool's idle timeout shorter than the server's.",
            ev.cw_idle
        ));
    }
    None
}
