//! `port_pressure`: TIME_WAIT sockets towards one destination from local ephemeral
//! ports use more than `--port-pressure` % of the range: new connections may fail.
use super::{Flag, who};
use crate::report::{Evidence, ProcessRow};

pub const FLAG: Flag = Flag {
    name: "port_pressure",
    threshold: "--port-pressure",
    meaning: "TIME_WAITs to one destination use > --port-pressure % of the ephemeral ports",
    raised: |_, ev, _| !ev.pressure.is_empty(),
    sentences,
};

fn sentences(r: &ProcessRow, ev: &Evidence) -> Vec<String> {
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
