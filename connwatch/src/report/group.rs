//! Rows by what users fix: the per-process accumulators merged by their key (`key`).
use std::collections::BTreeMap;

use super::{
    key::{GroupBy, GroupKey, key_of},
    passes::{Acc, Accs},
};
use crate::host::owners::ProcInfo;

/// The processes of one row and what they accumulated together.
pub(super) struct Group {
    pub pids: Vec<u32>,
    pub acc: Acc,
}

/// Merges per-process accumulators into rows.
pub(super) fn group(
    accs: Accs,
    by: GroupBy,
    procs: &std::collections::HashMap<u32, ProcInfo>,
) -> BTreeMap<GroupKey, Group> {
    let mut groups: BTreeMap<GroupKey, Group> = BTreeMap::new();
    for (pid, acc) in accs {
        let key = key_of(pid, by, procs, acc.comm.as_deref());
        match groups.get_mut(&key) {
            Some(g) => {
                g.pids.push(pid);
                g.acc.merge(acc);
            }
            None => {
                groups.insert(
                    key,
                    Group {
                        pids: vec![pid],
                        acc,
                    },
                );
            }
        }
    }
    groups
}
