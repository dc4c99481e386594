//! The kernel side of stack capture: which processes are captured (`STACK_CTL`,
//! `STACK_PIDS`), and the syscall programs (connect, accept, read/recvfrom EOF), loaded
//! and attached only while a process is wanted, so a host where nothing is wanted runs
//! none of them.
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use connwatch_common::{
    MAP_STACK_CTL, MAP_STACK_PIDS, MAP_STACKS, PROG_ACCEPT_EXIT, PROG_CONNECT_ENTER, PROG_EOF_EXIT,
    PROG_FD_ENTER, stack_mode,
};

use super::tracefs;

/// The syscall tracepoints each program is attached to.
const ATTACH: [(&str, &[&str]); 4] = [
    (PROG_CONNECT_ENTER, &["sys_enter_connect"]),
    (PROG_FD_ENTER, &["sys_enter_read", "sys_enter_recvfrom"]),
    (PROG_EOF_EXIT, &["sys_exit_read", "sys_exit_recvfrom"]),
    (PROG_ACCEPT_EXIT, &["sys_exit_accept", "sys_exit_accept4"]),
];

/// Most processes captured by pid (the kernel map's size).
pub const MAX_PIDS: usize = 1024;

pub struct StackControl {
    ebpf: Arc<Mutex<Ebpf>>,
    /// The kernel can name the socket behind an fd (BTF has the fields): stacks can be
    /// captured.
    fd_capable: bool,
    syscalls: Attached,
    /// The syscall programs were loaded (once; attached and detached as needed).
    loaded: bool,
    pids: BTreeSet<u32>,
    mode: u32,
}

enum Attached {
    No,
    Yes(Vec<(&'static str, TracePointLinkId)>),
    /// Attaching failed; said once, not tried again.
    Failed,
}

impl StackControl {
    pub(super) fn new(ebpf: Arc<Mutex<Ebpf>>, fd_capable: bool) -> Self {
        Self {
            ebpf,
            fd_capable,
            syscalls: Attached::No,
            loaded: false,
            pids: BTreeSet::new(),
            mode: stack_mode::OFF,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Ebpf>> {
        self.ebpf.lock().map_err(|_| anyhow!("probe lock poisoned"))
    }

    /// The ring the probe writes stacks to. Can be taken once.
    pub fn take_ring(&self) -> Result<RingBuf<MapData>> {
        let map = self
            .lock()?
            .take_map(MAP_STACKS)
            .context("the probe's stack ring is missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Captures every process from now on.
    pub fn all(&mut self) -> Result<()> {
        self.set_mode(stack_mode::ALL)?;
        self.attach_syscalls();
        Ok(())
    }

    /// Captures `pid` from now on (besides those already wanted). False when the map is
    /// full.
    pub fn want(&mut self, pid: u32) -> Result<bool> {
        if self.mode == stack_mode::ALL || self.pids.contains(&pid) {
            return Ok(true);
        }
        if self.pids.len() >= MAX_PIDS {
            return Ok(false);
        }
        {
            let mut ebpf = self.lock()?;
            let map = ebpf
                .map_mut(MAP_STACK_PIDS)
                .context("the probe's stack pid map is missing")?;
            HashMap::<_, u32, u8>::try_from(map)?.insert(pid, 1, 0)?;
        }
        self.pids.insert(pid);
        if self.mode == stack_mode::OFF {
            self.set_mode(stack_mode::LISTED)?;
        }
        self.attach_syscalls();
        Ok(true)
    }

    /// Stops capturing processes that are gone (their pids may be reused); with none
    /// left, the syscall programs are detached.
    pub fn forget(&mut self, gone: impl Fn(u32) -> bool) -> Result<()> {
        let gone: Vec<u32> = self.pids.iter().copied().filter(|p| gone(*p)).collect();
        if gone.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(&self.ebpf);
        let mut ebpf = shared.lock().map_err(|_| anyhow!("probe lock poisoned"))?;
        let map = ebpf
            .map_mut(MAP_STACK_PIDS)
            .context("the probe's stack pid map is missing")?;
        let mut map = HashMap::<_, u32, u8>::try_from(map)?;
        for pid in gone {
            let _ = map.remove(&pid);
            self.pids.remove(&pid);
        }
        drop(ebpf);
        if self.pids.is_empty() && self.mode == stack_mode::LISTED {
            self.set_mode(stack_mode::OFF)?;
            self.detach_syscalls();
        }
        Ok(())
    }

    /// Whether the syscall programs are attached now.
    pub fn syscalls_attached(&self) -> bool {
        matches!(self.syscalls, Attached::Yes(_))
    }

    fn detach_syscalls(&mut self) {
        let Attached::Yes(links) = std::mem::replace(&mut self.syscalls, Attached::No) else {
            return;
        };
        let Ok(mut ebpf) = self.lock() else { return };
        for (name, link) in links {
            if let Some(p) = ebpf.program_mut(name)
                && let Ok(p) = <&mut TracePoint>::try_from(p)
            {
                let _ = p.detach(link);
            }
        }
    }

    pub fn wanted(&self) -> usize {
        self.pids.len()
    }

    fn set_mode(&mut self, mode: u32) -> Result<()> {
        {
            let mut ebpf = self.lock()?;
            let map = ebpf
                .map_mut(MAP_STACK_CTL)
                .context("the probe's stack control is missing")?;
            Array::<_, u32>::try_from(map)?.set(0, mode, 0)?;
        }
        self.mode = mode;
        Ok(())
    }

    /// Loads and attaches the syscall programs, once. Where they cannot be, connect()
    /// is still captured, and the reason is said once.
    fn attach_syscalls(&mut self) {
        if !matches!(self.syscalls, Attached::No) {
            return;
        }
        if !self.fd_capable {
            eprintln!(
                "connwatch: leak sites are not available on this kernel: its BTF lacks the fd table (task_struct.files, fdtable)"
            );
            self.syscalls = Attached::Failed;
            return;
        }
        self.syscalls = match self.try_attach() {
            Ok(links) => Attached::Yes(links),
            Err(e) => {
                eprintln!("connwatch: leak sites are not available: {e:#}");
                Attached::Failed
            }
        };
    }

    fn try_attach(&mut self) -> Result<Vec<(&'static str, TracePointLinkId)>> {
        let mount = tracefs::ensure_event("syscalls", "sys_exit_read")?;
        let shared = Arc::clone(&self.ebpf);
        let mut ebpf = shared.lock().map_err(|_| anyhow!("probe lock poisoned"))?;
        let mut links = Vec::new();
        for (name, events) in ATTACH {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("the probe has no program {name}"))?
                .try_into()?;
            if !self.loaded {
                prog.load()
                    .map_err(|e| super::verifier_error(name, e, false))?;
            }
            for event in events {
                let link = prog
                    .attach("syscalls", event)
                    .with_context(|| format!("cannot attach syscalls/{event}"))?;
                links.push((name, link));
            }
        }
        self.loaded = true;
        drop(mount);
        Ok(links)
    }
}
