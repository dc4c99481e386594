//! `peer_not_closing`: at least `--fin-wait2-min` connections this process closed wait
//! in FIN_WAIT2 longer than `--fin-wait2-age` for one peer: the leak is on that host.
use super::{Flag, who};
use crate::report::{
    Evidence, ProcessRow,
    words::{fmt_age, plural},
};

pub const FLAG: Flag = Flag {
    name: "peer_not_closing",
    threshold: "--fin-wait2-min",
    meaning: ">= --fin-wait2-min connections it closed wait > --fin-wait2-age for one peer",
    raised: |_, ev, cfg| {
        ev.not_closing
            .as_ref()
            .is_some_and(|n| n.count >= cfg.fin_wait2_min)
    },
    sentences,
};

fn sentences(r: &ProcessRow, ev: &Evidence) -> Vec<String> {
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
