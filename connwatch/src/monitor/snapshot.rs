//! What a report is made of, at one moment: the monitor's tables and the host's facts
//! (processes, listeners, settings), borrowed for the time it takes to build one
//! (`report::Reporter`), with the loss counters and connwatch's own footprint.
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::{table::Table, timewait::Tracker};
use crate::{
    decode::TcpState,
    filter::Filter,
    host::{
        kernelinfo::KernelInfo,
        owners::{FdIndex, ProcInfo},
        sockdiag::DiagSocket,
    },
};

/// Listening ports by (network namespace, port), with the processes holding the
/// listener; looked up once per followed socket at every report (Fx: small keys).
pub type Listening = rustc_hash::FxHashMap<(u32, u16), Vec<u32>>;

/// Everything a report is made of, at one moment.
pub struct Snapshot<'a> {
    /// CLOSE_WAIT sockets, and those closed within the window.
    pub table: &'a Table,
    /// Wall-clock time of the report, already formatted (RFC 3339).
    pub time: String,
    pub now_ns: u64,
    pub elapsed_s: f64,
    pub is_final: bool,
    pub states: BTreeMap<String, u64>,
    pub procs: &'a HashMap<u32, ProcInfo>,
    /// Listening ports, per network namespace, with the processes holding the listener.
    /// Sockets on them are the server side, whose peers differ only by ephemeral port.
    pub listening: &'a Listening,
    /// Processes holding each socket's fd.
    pub holders: &'a FdIndex,
    pub timewait: &'a Tracker,
    pub kernel: &'a BTreeMap<u32, KernelInfo>,
    pub own_netns: u32,
    pub loss: Loss,
    /// `--pid`/`--cgroup`: the rows kept.
    pub filter: &'a Filter,
    /// connwatch's own memory and table sizes.
    pub footprint: Footprint,
    /// Leak sites of sockets, where stacks are captured.
    pub sites: Option<&'a crate::stacks::Book>,
}

/// Loss counters shown in every report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Loss {
    pub events_dropped: u64,
    pub sockets_untracked: u64,
    /// User stacks lost: their ring was full, or nothing of them could be read.
    pub stacks_dropped: u64,
}

/// connwatch's resident memory and the entries in each of its tables. Every table is
/// bounded by what exists (sockets, processes), `--max-sockets` or `--window`; none
/// grows with how long connwatch has run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// VmRSS of the connwatch process.
    pub rss_bytes: Option<u64>,
    pub entries: BTreeMap<&'static str, u64>,
}

/// The machine's state histogram from a full dump: every TCP state, IPv4 and IPv6.
/// Timewait sockets whose substate is FIN_WAIT2 (orphans the process already closed)
/// are counted apart from real FIN_WAIT2 sockets, as `FIN_WAIT2_TW`.
pub fn state_counts(sockets: &[DiagSocket]) -> BTreeMap<String, u64> {
    // Counted by state number first: a name per socket costs an allocation each, and
    // a full dump of a busy host lists 100,000.
    let mut by_state = [0u64; 256];
    let mut orphans = 0;
    for s in sockets {
        if s.timewait && s.state == TcpState::FIN_WAIT2 {
            orphans += 1;
        } else {
            // A u8 state always has its slot.
            if let Some(n) = by_state.get_mut(usize::from(s.state.0)) {
                *n += 1;
            }
        }
    }
    let mut counts: BTreeMap<String, u64> = (0..=u8::MAX)
        .zip(by_state)
        .filter(|&(_, n)| n > 0)
        .map(|(state, n)| (TcpState(state).to_string(), n))
        .collect();
    if orphans > 0 {
        counts.insert("FIN_WAIT2_TW".to_string(), orphans);
    }
    counts
}
