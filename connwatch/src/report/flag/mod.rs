//! The flags a process (row) can carry, one file each: the flag names itself, the
//! option that sets its threshold, what it means (for `--help` and the metrics' HELP),
//! the rule that raises it and the sentence that explains it. A new flag is a file
//! here and its line in `ALL`.
mod active_closer;
mod close_wait_leak;
mod close_wait_slow;
mod peer_not_closing;
mod port_pressure;

pub use active_closer::FLAG as ACTIVE_CLOSER;
pub use close_wait_leak::FLAG as CLOSE_WAIT_LEAK;
pub use close_wait_slow::FLAG as CLOSE_WAIT_SLOW;
pub use peer_not_closing::FLAG as PEER_NOT_CLOSING;
pub use port_pressure::FLAG as PORT_PRESSURE;

use super::{Evidence, ProcessRow, ReportConfig};

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

/// `comm[pid]`, or for a grouped row `comm (N processes)`.
/// The row's processes as a sentence names them, with where they run (`app[18937] in
/// shop/checkout-7f9c/app`).
pub(crate) fn who(r: &ProcessRow) -> String {
    let who = match r.pids.len() {
        0 | 1 => format!("{}[{}]", r.comm, r.pid),
        n => format!("{} ({n} processes)", r.comm),
    };
    match r.place() {
        Some(place) => format!("{who} in {place}"),
        None => who,
    }
}

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
