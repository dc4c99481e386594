//! The flow every report view shares: seed the socket table from sock_diag, apply the
//! probe's transitions, reconcile and resolve owners each interval, build the report.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    clock::{WallClock, monotonic_ns},
    decode::{TcpState, Transition},
    owners::{self, FdIndex, ProcInfo},
    report::{self, Growth, Inputs, Loss, Report, ReportConfig},
    sockdiag::{self, Query},
    table::Table,
};

pub struct Monitor {
    table: Table,
    index: FdIndex,
    growth: Growth,
    cfg: ReportConfig,
    own_netns: u32,
    start_ns: u64,
    clock: WallClock,
    states: BTreeMap<String, u64>,
    listen_ports: HashSet<(u32, u16)>,
}

impl Monitor {
    pub fn new(cfg: ReportConfig) -> Self {
        let own_netns = owners::own_netns();
        Self {
            table: Table::new(own_netns),
            // Unknown inodes trigger a /proc rescan at most once a second; the whole
            // index is refreshed every 30 s to notice fds closed or handed over.
            index: FdIndex::new(Duration::from_secs(1), Duration::from_secs(30)),
            growth: Growth::default(),
            cfg,
            own_netns,
            start_ns: monotonic_ns(),
            clock: WallClock::new(),
            states: BTreeMap::new(),
            listen_ports: HashSet::new(),
        }
    }

    /// Sockets that existed before start: CLOSE_WAIT with `tcp_info` for age estimates.
    pub fn seed(&mut self) -> Result<()> {
        let now = monotonic_ns();
        let cw = sockdiag::dump(Query::states(&[TcpState::CLOSE_WAIT], true))
            .context("cannot list TCP sockets through netlink sock_diag")?;
        self.table.seed(self.own_netns, &cw, now);
        Ok(())
    }

    pub fn apply(&mut self, t: &Transition) {
        self.table.apply(t);
    }

    /// Full dump: the state histogram, and the table reconciled with what exists.
    pub fn refresh(&mut self) -> Result<()> {
        let now = monotonic_ns();
        let all = sockdiag::dump(Query::all())
            .context("cannot list TCP sockets through netlink sock_diag")?;
        self.states = report::state_counts(&all);
        self.listen_ports = report::listen_ports(self.own_netns, &all);
        self.table.reconcile(self.own_netns, &all, now);
        Ok(())
    }

    /// Resolves holders and process facts, then builds the report.
    pub fn report(&mut self, is_final: bool, events_dropped: u64, untracked_extra: u64) -> Report {
        let now = monotonic_ns();
        self.index
            .ensure(self.table.close_wait().map(|(_, cw)| cw.inode));
        for (_, cw) in self.table.close_wait_mut() {
            cw.holders = self.index.holders(cw.inode).to_vec();
        }
        let window_start = now.saturating_sub(self.cfg.window.as_nanos() as u64);
        self.table.prune_closed(window_start);
        let mut pids: HashSet<u32> = HashSet::new();
        for (_, cw) in self.table.close_wait() {
            pids.extend(&cw.holders);
            pids.extend(cw.probe_owner.as_ref().map(|(p, _, _)| *p));
        }
        pids.extend(self.table.closed_since(window_start).filter_map(|c| c.pid));
        let procs: HashMap<u32, ProcInfo> = pids
            .into_iter()
            .filter_map(|pid| Some((pid, owners::proc_info(pid)?)))
            .collect();
        let inputs = Inputs {
            time: humantime::format_rfc3339_micros(self.clock.wall(now)).to_string(),
            now_ns: now,
            elapsed_s: now.saturating_sub(self.start_ns) as f64 / 1e9,
            is_final,
            states: self.states.clone(),
            procs: &procs,
            listen_ports: &self.listen_ports,
            loss: Loss {
                events_dropped,
                sockets_untracked: self.table.untracked + untracked_extra,
            },
        };
        report::build(&self.table, &inputs, &self.cfg, &mut self.growth)
    }
}
