//! `active_closer`: a server that closes first, so that the TIME_WAIT sockets pile up
//! on its own listening port (at least `--time-wait-min` of them).
use super::{Flag, who};
use crate::report::{
    Evidence, ProcessRow,
    words::{fmt_age, fmt_rate, plural},
};

pub const FLAG: Flag = Flag {
    name: "active_closer",
    threshold: "--time-wait-min",
    meaning: "listens on a port and holds >= --time-wait-min TIME_WAIT sockets on it",
    raised: |_, ev, cfg| ev.closer_port.is_some_and(|(_, n)| n >= cfg.time_wait_min),
    sentences,
};

fn sentences(r: &ProcessRow, ev: &Evidence) -> Vec<String> {
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
