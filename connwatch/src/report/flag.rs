//! The flags a process (row) can carry: each names itself, the option that sets its
//! threshold, what it means (for `--help` and the metrics' HELP), the test that raises
//! it and the sentence that explains it (`views::reason`).
use super::{Evidence, ProcessRow, ReportConfig};
use crate::views::reason;

pub struct Flag {
    /// As it appears in `flags` (JSON, tables, the `flag` metric label).
    pub name: &'static str,
    /// The option whose value is the threshold.
    pub threshold: &'static str,
    /// What carrying it means, one line.
    pub meaning: &'static str,
    raised: fn(&ProcessRow, &Evidence, &ReportConfig) -> bool,
    sentences: fn(&ProcessRow, &Evidence) -> Vec<String>,
}

impl Flag {
    pub fn raised(&self, row: &ProcessRow, ev: &Evidence, cfg: &ReportConfig) -> bool {
        (self.raised)(row, ev, cfg)
    }

    pub fn sentences(&self, row: &ProcessRow, ev: &Evidence) -> Vec<String> {
        (self.sentences)(row, ev)
    }
}

pub const CLOSE_WAIT_LEAK: Flag = Flag {
    name: "close_wait_leak",
    threshold: "--close-wait-age",
    meaning: "holds CLOSE_WAIT sockets older than --close-wait-age",
    raised: |r, _, cfg| {
        r.close_wait_oldest_s
            .is_some_and(|o| o > cfg.close_wait_age.as_secs_f64())
    },
    sentences: reason::close_wait_leak,
};

pub const CLOSE_WAIT_SLOW: Flag = Flag {
    name: "close_wait_slow",
    threshold: "--close-wait-age",
    meaning: "closes its CLOSE_WAIT sockets, but p99 later than --close-wait-age",
    raised: |r, _, cfg| {
        r.close_wait_closed
            .p99_s
            .is_some_and(|p| p > cfg.close_wait_age.as_secs_f64())
    },
    sentences: reason::close_wait_slow,
};

pub const ACTIVE_CLOSER: Flag = Flag {
    name: "active_closer",
    threshold: "--time-wait-min",
    meaning: "listens on a port and holds >= --time-wait-min TIME_WAIT sockets on it",
    raised: |_, ev, cfg| ev.closer_port.is_some_and(|(_, n)| n >= cfg.time_wait_min),
    sentences: reason::active_closer,
};

pub const PORT_PRESSURE: Flag = Flag {
    name: "port_pressure",
    threshold: "--port-pressure",
    meaning: "TIME_WAITs to one destination use > --port-pressure % of the ephemeral ports",
    raised: |_, ev, _| !ev.pressure.is_empty(),
    sentences: reason::port_pressure,
};

pub const PEER_NOT_CLOSING: Flag = Flag {
    name: "peer_not_closing",
    threshold: "--fin-wait2-min",
    meaning: ">= --fin-wait2-min connections it closed wait > --fin-wait2-age for one peer",
    raised: |_, ev, cfg| {
        ev.not_closing
            .as_ref()
            .is_some_and(|n| n.count >= cfg.fin_wait2_min)
    },
    sentences: reason::peer_not_closing,
};

/// Every flag, in the order rows list them.
pub const ALL: [&Flag; 5] = [
    &CLOSE_WAIT_LEAK,
    &CLOSE_WAIT_SLOW,
    &ACTIVE_CLOSER,
    &PORT_PRESSURE,
    &PEER_NOT_CLOSING,
];

/// `Flags:` and one line per flag, for `--help`.
pub fn help() -> String {
    let mut s = String::from("Flags:\n");
    for f in ALL {
        s += &format!("  {:<17} {}\n", f.name, f.meaning);
    }
    s
}

/// The flag names, comma-separated, for the metrics' HELP.
pub fn names() -> String {
    ALL.map(|f| f.name).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_flag_with_its_threshold() {
        let h = help();
        for f in ALL {
            let line = h.lines().find(|l| l.trim_start().starts_with(f.name));
            assert!(
                line.is_some_and(|l| l.contains(f.threshold)),
                "{}: {h}",
                f.name
            );
        }
        assert_eq!(
            names(),
            "close_wait_leak, close_wait_slow, active_closer, port_pressure, peer_not_closing"
        );
    }
}
