//! `close_wait_slow`: the process does close its CLOSE_WAIT sockets, but its p99 time
//! from the peer's FIN to close() is above `--close-wait-age`.
use super::{Flag, who};
use crate::report::{
    Evidence, ProcessRow,
    words::{fmt_age, plural},
};

pub const FLAG: Flag = Flag {
    name: "close_wait_slow",
    threshold: "--close-wait-age",
    meaning: "closes its CLOSE_WAIT sockets, but p99 later than --close-wait-age",
    raised: |r, _, cfg| {
        r.close_wait_closed
            .p99_s
            .is_some_and(|p| p > cfg.close_wait_age.as_secs_f64())
    },
    sentences,
};

fn sentences(r: &ProcessRow, _: &Evidence) -> Vec<String> {
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
