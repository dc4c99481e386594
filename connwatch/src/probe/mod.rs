//! Loads the probe and attaches it to `inet_sock_set_state`.
//!
//! Hook choice, in order (`--hook auto`):
//! 1. `tp_btf/inet_sock_set_state`: typed `struct sock *`, cheapest per event, needs no
//!    tracefs; needs kernel BTF and the field offsets resolved from it.
//! 2. `tracepoint/sock/inet_sock_set_state`: the classic tracepoint with a stable record;
//!    aya finds it through tracefs, which a fresh machine boots without, so it is mounted
//!    here when missing (and unmounted again once attached).
//!
//! fentry/kprobes are not used: they are unavailable on the kernels we target (see
//! docs/KERNEL.md).
mod attach_btf;
mod iter_file;
mod offsets;
mod preflight;
mod socket_fds;
mod stacks;
mod tcp_sockets;
mod tracefs;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, TracePoint},
};
use connwatch_common::{
    GLOBAL_FILTER, GLOBAL_OFFSETS, GLOBAL_WAKE_AT, ListenKey, MAP_CLOSERS, MAP_COUNTERS,
    MAP_EVENTS, MAP_LISTENERS, MAP_SOCKETS, Offsets, PROG_TP_BTF, PROG_TRACEPOINT, counter,
};

pub use preflight::{
    Abilities, check_kernel, check_privileges, drop_capabilities, warn_missing_optional,
};
pub use socket_fds::SocketFds;
pub use stacks::StackControl;
pub use tcp_sockets::{Records as TcpSocketRecords, TcpSockets};
pub use tracefs::layout_mismatches;

/// Which kernel hook to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookChoice {
    /// tp_btf, falling back to the classic tracepoint.
    Auto,
    /// Only `tp_btf/inet_sock_set_state`.
    TpBtf,
    /// Only the classic tracepoint `sock/inet_sock_set_state`.
    Tracepoint,
}

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub hook: HookChoice,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Capacity of the kernel per-socket LRU map.
    pub max_sockets: u32,
    /// Kernel BTF; overridable so that the no-BTF path can be tested.
    pub btf_path: PathBuf,
    pub verbose: bool,
    /// Load-time event filter.
    pub filter: connwatch_common::Filter,
    /// `--stacks`: capture stacks from the start.
    pub stacks: bool,
}

/// The attached probe. Dropping it detaches every program (links are owned by the
/// `Ebpf` object; the kernel also drops them when the process dies).
pub struct Probe {
    /// Shared with the socket-fd iterator, which attaches a link per pass.
    ebpf: Arc<Mutex<Ebpf>>,
    /// The socket-fd iterator, where the kernel has what it needs.
    socket_fds: Option<SocketFds>,
    tcp_sockets: Option<TcpSockets>,
    /// Stack capture's switches (taken by the stack reader).
    stacks: Option<StackControl>,
    pub attached: &'static str,
    /// Optional fields that could not be resolved (netns/inode then read as 0).
    pub degraded: Vec<&'static str>,
    /// Capacity of the classic tracepoint's LRU map (0 under tp_btf), and the last count
    /// of what it evicted, with when it was taken.
    lru_capacity: u32,
    evicted: std::cell::Cell<(Option<std::time::Instant>, u64)>,
    /// The probe keeps no per-socket state and emits every transition (`trace` under
    /// tp_btf without `--pid`): userspace times states and carries owners (`carry`).
    pub userspace_carries: bool,
}

/// Counters kept by the probe, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub seen: u64,
    pub dropped: u64,
    pub socket_store_failed: u64,
    /// Per-socket state the classic tracepoint's LRU map evicted to make room: those
    /// sockets' owners and entry times are lost.
    pub evicted: u64,
    /// User stacks captured, and lost because their ring was full.
    pub stacks_captured: u64,
    pub stacks_dropped: u64,
}

impl Counters {
    /// Sockets whose state the probe lost (not stored, or evicted).
    pub fn sockets_lost(&self) -> u64 {
        self.socket_store_failed + self.evicted
    }
}

/// How often the LRU map's entries are counted, once it may be evicting.
const EVICTION_RECOUNT: std::time::Duration = std::time::Duration::from_secs(5);

static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connwatch"));

/// Why tp_btf cannot be used on this kernel, if it cannot.
fn tp_btf_blocker(
    btf_path: &std::path::Path,
    resolved: Option<&offsets::Resolved>,
) -> Option<String> {
    match resolved {
        None => Some(format!(
            "{} does not exist (kernel built without CONFIG_DEBUG_INFO_BTF)",
            btf_path.display()
        )),
        Some(r) if !r.missing_required.is_empty() => Some(format!(
            "kernel BTF lacks {}",
            r.missing_required.join(", ")
        )),
        Some(_) => None,
    }
}

/// What the probe cannot report for lack of BTF fields, for the start-up warning. Fields
/// whose absence only means the slower way (TIME_WAIT births confirmed by polling, the
/// fd index from /proc) are left out: nothing is reported differently.
fn degraded(resolved: Option<&offsets::Resolved>) -> Vec<&'static str> {
    let mut degraded = resolved.map_or_else(|| vec!["kernel BTF"], |r| r.missing_optional.clone());
    degraded.retain(|f| {
        let slower = offsets::TIMEWAIT_FIELDS.contains(f)
            || offsets::SOCKET_FD_ONLY_FIELDS.contains(f)
            || offsets::EXIT_FIELDS.contains(f)
            || offsets::STACK_FD_FIELDS.contains(f)
            || offsets::STACK_REG_FIELDS.contains(f);
        if slower {
            log::debug!("{f} not in kernel BTF: done the slower way");
        }
        !slower
    });
    degraded
}

/// Entries of `CLOSERS`, where lifecycle-only `tp_btf` keeps each socket's closer from
/// its close() to its CLOSE: the sockets in FIN_WAIT1, CLOSING or (after shutdown())
/// FIN_WAIT2 at once. Preallocated, ~100 bytes each; a full map is counted as sockets
/// untracked.
const CLOSERS_ENTRIES: u32 = 1 << 15;

/// Loads the probe object with `loader`: globals set, the ring sized, and the classic
/// tracepoint's per-socket LRU map sized `lru_entries` (1 when tp_btf keeps state on
/// the sockets, and then `CLOSERS` sized for lifecycle-only mode, else 1).
fn load_object(
    loader: EbpfLoader<'static>,
    opts: &ProbeOptions,
    btf: Option<&Btf>,
    offsets: &Offsets,
    lru_entries: u32,
) -> Result<Ebpf> {
    let wake_at = wake_at(opts.ring_bytes);
    let tp_btf = lru_entries == 1;
    let closers = if tp_btf && opts.filter.lifecycle_only != 0 {
        CLOSERS_ENTRIES
    } else {
        1
    };
    // What is set below is borrowed only until the load (the loader is covariant).
    let mut loader: EbpfLoader<'_> = loader;
    let mut ebpf = loader
        .btf(btf)
        .override_global(GLOBAL_OFFSETS, offsets, true)
        .override_global(GLOBAL_FILTER, &opts.filter, true)
        .override_global(GLOBAL_WAKE_AT, &wake_at, true)
        .map_max_entries(MAP_EVENTS, opts.ring_bytes)
        .map_max_entries(MAP_SOCKETS, lru_entries)
        .map_max_entries(MAP_CLOSERS, closers)
        .load(PROBE_OBJECT)
        .map_err(|e| load_error(e, opts.verbose))?;
    if opts.verbose {
        // The probe's own diagnostics (aya-log), never the data.
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger),
            Err(e) => log::warn!("probe log unavailable: {e}"),
        }
    }
    Ok(ebpf)
}

/// Bytes waiting in the ring from which the probe wakes the reader: an eighth of it.
fn wake_at(ring_bytes: u32) -> u64 {
    u64::from(ring_bytes) / 8
}

/// Entries of the classic tracepoint's LRU map: room for twice the TCP sockets the host
/// holds now (at least 16 Ki), within `--max-sockets`, rather than a fixed 1 Mi
/// preallocated (104 bytes each) on every host.
fn lru_entries(max_sockets: u32) -> u32 {
    let held = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| tcp_sockets_held(&s))
        .unwrap_or(0);
    let want = held.saturating_mul(2).max(16 * 1024).next_power_of_two();
    u32::try_from(want).unwrap_or(u32::MAX).min(max_sockets)
}

/// TCP sockets allocated plus timewait sockets, from /proc/net/sockstat's `TCP:` line.
fn tcp_sockets_held(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == name)?;
        words.get(at + 1)?.parse().ok()
    };
    Some(field("alloc")? + field("tw").unwrap_or(0))
}

/// Loads the object for the hook to use and attaches it: tp_btf (state on the sockets)
/// where it can be, else the classic tracepoint (state in an LRU map sized for this
/// host); `auto` falls back, reloading the object, when tp_btf cannot attach.
fn load_and_attach(
    loader: EbpfLoader<'static>,
    opts: &ProbeOptions,
    btf: Option<&Btf>,
    offsets: &Offsets,
    tp_btf_blocker: Option<&str>,
) -> Result<(Ebpf, &'static str)> {
    // Taken by the first load; a fallback load makes its own.
    let loader = std::cell::Cell::new(Some(loader));
    let fresh = || {
        attach_btf::loader_without_parse()
            .join()
            .unwrap_or_default()
    };
    let want_tp_btf = match opts.hook {
        HookChoice::TpBtf => true,
        HookChoice::Tracepoint => false,
        HookChoice::Auto => tp_btf_blocker.is_none(),
    };
    let tracepoint = |blocker: Option<String>| -> Result<(Ebpf, &'static str)> {
        let loader = loader.take().unwrap_or_else(fresh);
        let mut ebpf = load_object(loader, opts, btf, offsets, lru_entries(opts.max_sockets))?;
        let name = attach_tracepoint(&mut ebpf, opts.verbose).map_err(|e| match &blocker {
            Some(why) if opts.hook == HookChoice::Auto => {
                anyhow!("{e:#} (tp_btf was not usable either: {why})")
            }
            _ => e,
        })?;
        Ok((ebpf, name))
    };
    if !want_tp_btf {
        if opts.hook == HookChoice::Auto
            && let Some(why) = tp_btf_blocker
        {
            log::info!("tp_btf unavailable ({why}); falling back to the tracepoint");
        }
        return tracepoint(tp_btf_blocker.map(String::from));
    }
    if let Some(why) = tp_btf_blocker {
        bail!("cannot use tp_btf: {why}; try --hook tracepoint");
    }
    let mut ebpf = load_object(loader.take().unwrap_or_else(fresh), opts, btf, offsets, 1)?;
    match attach_tp_btf(&mut ebpf, btf, opts.verbose) {
        Ok(name) => Ok((ebpf, name)),
        Err(e) if opts.hook == HookChoice::Auto => {
            log::info!("tp_btf unavailable ({e:#}); falling back to the tracepoint");
            drop(ebpf);
            tracepoint(Some(format!("{e:#}")))
        }
        Err(e) => Err(e),
    }
}

/// The iterators, where the kernel has BTF and the fields they read: the fd index's
/// (else /proc is walked) and the seed's (else sock_diag dumps).
fn load_iterators(
    ebpf: &Arc<Mutex<Ebpf>>,
    btf: Option<&Btf>,
    resolved: Option<&offsets::Resolved>,
) -> (Option<SocketFds>, Option<TcpSockets>) {
    let (Some(btf), Some(r)) = (btf, resolved) else {
        return (None, None);
    };
    let socket_fds = r
        .has_all(&offsets::SOCKET_FD_FIELDS)
        .then(|| SocketFds::load(ebpf, btf))
        .and_then(|l| {
            l.inspect_err(|e| log::debug!("fd index from /proc: {e:#}"))
                .ok()
        });
    let seed_fields = r.missing_required.is_empty()
        && r.has_all(&offsets::TCP_ITER_FIELDS)
        && r.has_all(&offsets::INODE_FIELDS);
    let tcp_sockets = seed_fields
        .then(|| TcpSockets::load(ebpf, btf))
        .and_then(|l| {
            l.inspect_err(|e| log::debug!("seed from sock_diag: {e:#}"))
                .ok()
        });
    (socket_fds, tcp_sockets)
}

impl Probe {
    pub fn load(opts: &ProbeOptions) -> Result<Self> {
        let started = std::time::Instant::now();
        let lap = |what: &str| log::debug!("{what}: {:?}", started.elapsed());
        check_privileges()?;
        check_kernel()?;
        warn_missing_optional();
        let has_btf = opts.btf_path.exists();
        // Built on a thread beside the offsets' scan of the BTF (see `attach_btf`).
        let loader = attach_btf::loader_without_parse();
        let resolved = if has_btf {
            Some(offsets::resolve(&opts.btf_path)?)
        } else {
            None
        };
        let offsets = resolved
            .as_ref()
            .map_or_else(Offsets::unresolved, |r| r.offsets);
        lap("offsets resolved from BTF");
        offsets::check_cgroup_filter(opts.filter.cgroup_id, resolved.as_ref())?;
        let degraded = degraded(resolved.as_ref());

        let tp_btf_blocker = tp_btf_blocker(&opts.btf_path, resolved.as_ref());

        let btf = resolved
            .as_ref()
            .map(|r| attach_btf::btf(&r.attach_targets))
            .transpose()?;
        let loader = loader
            .join()
            .map_err(|_| anyhow!("building the probe's loader panicked"))?;
        lap("loader ready");
        let (ebpf, attached) = load_and_attach(
            loader,
            opts,
            btf.as_ref(),
            &offsets,
            tp_btf_blocker.as_deref(),
        )?;
        lap("attached");
        let ebpf = Arc::new(Mutex::new(ebpf));
        let (socket_fds, tcp_sockets) = load_iterators(&ebpf, btf.as_ref(), resolved.as_ref());
        lap("iterators loaded");
        let stacks = Some(StackControl::new(
            Arc::clone(&ebpf),
            resolved
                .as_ref()
                .is_some_and(|r| r.has_all(&offsets::STACK_FD_FIELDS)),
        ));
        let lru_capacity = if attached == TRACEPOINT_NAME {
            lru_entries(opts.max_sockets)
        } else {
            0
        };
        Ok(Self {
            ebpf,
            socket_fds,
            tcp_sockets,
            stacks,
            attached,
            degraded,
            lru_capacity,
            evicted: std::cell::Cell::new((None, 0)),
            userspace_carries: attached != TRACEPOINT_NAME
                && opts.filter.npids == 0
                && opts.filter.lifecycle_only == 0,
        })
    }

    /// The socket-fd iterator, for the fd index (once: `None` after, or where the
    /// kernel lacks it).
    pub fn take_socket_fds(&mut self) -> Option<SocketFds> {
        self.socket_fds.take()
    }

    /// The TCP socket iterator, for the start-up seed (once: `None` after, or where the
    /// kernel lacks it).
    pub fn take_tcp_sockets(&mut self) -> Option<TcpSockets> {
        self.tcp_sockets.take()
    }

    /// Stack capture's switches (once).
    pub fn take_stacks(&mut self) -> Option<StackControl> {
        self.stacks.take()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Ebpf>> {
        self.ebpf.lock().map_err(|_| anyhow!("probe lock poisoned"))
    }

    /// The event ring buffer, for the reader. Can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .lock()?
            .take_map(MAP_EVENTS)
            .context("the probe's event ring buffer is missing")?;
        RingBuf::try_from(map).context(
            "cannot open the probe's ring buffer (kernel 5.8 or newer is needed for BPF ring buffers)",
        )
    }

    /// Tells the probe who owns the ports that were listening before it was attached
    /// (it learns later ones from listen() itself): `--pid` matches accepted sockets
    /// through them.
    pub fn seed_listeners(&mut self, owners: &[(u32, u16, u32)]) -> Result<()> {
        let mut ebpf = self.lock()?;
        let map = ebpf
            .map_mut(MAP_LISTENERS)
            .context("the probe's listener map is missing")?;
        let mut listeners = aya::maps::HashMap::<_, ListenKey, u8>::try_from(map)?;
        for &(netns, port, pid) in owners {
            let key = ListenKey {
                netns,
                port,
                _pad: 0,
                pid,
            };
            listeners.insert(key, 1, 0)?;
        }
        Ok(())
    }

    /// Detaches and unloads the state programs: nothing more is counted or queued
    /// once this returns, so a last drain makes the books final.
    pub fn detach(&mut self) {
        let Ok(mut ebpf) = self.lock() else { return };
        if let Some(p) = ebpf.program_mut(PROG_TP_BTF)
            && let Ok(p) = <&mut BtfTracePoint>::try_from(p)
        {
            let _ = p.unload();
        }
        if let Some(p) = ebpf.program_mut(PROG_TRACEPOINT)
            && let Ok(p) = <&mut TracePoint>::try_from(p)
        {
            let _ = p.unload();
        }
    }

    pub fn counters(&self) -> Result<Counters> {
        let ebpf = self.lock()?;
        let map = ebpf
            .map(MAP_COUNTERS)
            .context("the probe's counters map is missing")?;
        let array = PerCpuArray::<_, u64>::try_from(map)?;
        let sum = |index: u32| -> Result<u64> { Ok(array.get(&index, 0)?.iter().sum()) };
        let stored = sum(counter::SOCKET_INSERTED)?.saturating_sub(sum(counter::SOCKET_REMOVED)?);
        Ok(Counters {
            seen: sum(counter::SEEN)?,
            dropped: sum(counter::DROPPED)?,
            socket_store_failed: sum(counter::SOCKET_STORE_FAILED)?,
            evicted: self.evicted(&ebpf, stored),
            stacks_captured: sum(counter::STACKS_CAPTURED)?,
            stacks_dropped: sum(counter::STACKS_DROPPED)?,
        })
    }

    /// Entries the LRU map evicted: stored and never removed, yet no longer there. The
    /// map can evict only once it nears its capacity, so it is walked only from half
    /// full on, at most every `EVICTION_RECOUNT` (the count in between is the last one:
    /// a lower bound, never a guess).
    fn evicted(&self, ebpf: &Ebpf, stored: u64) -> u64 {
        let (at, last) = self.evicted.get();
        if self.lru_capacity == 0 || stored < u64::from(self.lru_capacity / 2) {
            return last;
        }
        if at.is_some_and(|t| t.elapsed() < EVICTION_RECOUNT) {
            return last;
        }
        let Some(map) = ebpf.map(MAP_SOCKETS) else {
            return last;
        };
        let Ok(map) = aya::maps::HashMap::<_, u64, connwatch_common::SockState>::try_from(map)
        else {
            return last;
        };
        let live = map.keys().filter(Result::is_ok).count() as u64;
        let evicted = stored.saturating_sub(live).max(last);
        self.evicted.set((Some(std::time::Instant::now()), evicted));
        evicted
    }
}

fn attach_tp_btf(ebpf: &mut Ebpf, btf: Option<&Btf>, verbose: bool) -> Result<&'static str> {
    let btf = btf.context("no kernel BTF")?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(PROG_TP_BTF)
        .context("probe object lacks its tp_btf program")?
        .try_into()?;
    prog.load("inet_sock_set_state", btf)
        .map_err(|e| verifier_error("tp_btf/inet_sock_set_state", e, verbose))?;
    prog.attach()
        .context("cannot attach tp_btf/inet_sock_set_state")?;
    Ok("tp_btf/inet_sock_set_state")
}

fn attach_tracepoint(ebpf: &mut Ebpf, verbose: bool) -> Result<&'static str> {
    let mount = tracefs::ensure_event("sock", "inet_sock_set_state")?;
    tracefs::check_record_layout(&mount.path)?;
    let prog: &mut TracePoint = ebpf
        .program_mut(PROG_TRACEPOINT)
        .context("probe object lacks its tracepoint program")?
        .try_into()?;
    prog.load()
        .map_err(|e| verifier_error("tracepoint/sock/inet_sock_set_state", e, verbose))?;
    prog.attach("sock", "inet_sock_set_state")
        .context("cannot attach tracepoint sock/inet_sock_set_state")?;
    drop(mount);
    Ok(TRACEPOINT_NAME)
}

const TRACEPOINT_NAME: &str = "tracepoint/sock/inet_sock_set_state";

/// A verifier rejection in one line: what was rejected and the kernel's errno; with
/// --verbose, the verifier's last lines follow (the whole log runs to thousands).
fn verifier_error(what: &str, e: aya::programs::ProgramError, verbose: bool) -> anyhow::Error {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            if verbose {
                let log = verifier_log.to_string();
                let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
                let tail = lines
                    .get(lines.len().saturating_sub(VERIFIER_TAIL)..)
                    .unwrap_or(&[]);
                anyhow!(
                    "the kernel rejected {what}: {io_error}; the verifier's last lines:\n  {}",
                    tail.join("\n  ")
                )
            } else {
                anyhow!(
                    "the kernel rejected {what}: {io_error} (run with --verbose for the verifier's last lines)"
                )
            }
        }
        other => anyhow!("cannot load {what}: {other}"),
    }
}

/// Lines of the verifier's log shown with --verbose.
const VERIFIER_TAIL: usize = 8;

fn load_error(e: aya::EbpfError, verbose: bool) -> anyhow::Error {
    if verbose {
        log::debug!("probe load error: {e:?}");
    }
    anyhow!("cannot load the eBPF probe: {e}")
}

/// The probe wakes the reader only when its ring is an eighth full: below that, the
/// reader drains on this timer (the latency of a row at low event rates).
pub fn drain_timer(every: std::time::Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Registers a map's fd (ring buffer, log) with the tokio reactor for readability.
pub fn readable<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: the aya maps passed here own their fd, keep it open and return the same
    // one from `as_raw_fd` for as long as they live, which is as long as the AsyncFd.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|e| std::io::Error::other(e.to_string()))
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        let Ok(mut fd) = readable(logger) else {
            return;
        };
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Default location of the kernel's BTF.
pub fn default_btf_path() -> PathBuf {
    std::env::var_os("CONNWATCH_BTF")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("/sys/kernel/btf/vmlinux").to_path_buf())
}

/// Says on stderr which hook is attached, and what is degraded.
pub fn announce(probe: &Probe) {
    eprintln!("connwatch: attached {}", probe.attached);
    if !probe.degraded.is_empty() {
        eprintln!(
            "connwatch: warning: {} not found in kernel BTF: network namespace and socket inode are not reported",
            probe.degraded.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_held_from_sockstat() {
        let sockstat = "sockets: used 312\nTCP: inuse 21 orphan 0 tw 14000 alloc 57 mem 3\nUDP: inuse 4 mem 2\n";
        assert_eq!(tcp_sockets_held(sockstat), Some(14_057));
        assert_eq!(tcp_sockets_held("UDP: inuse 4 mem 2\n"), None);
        // The tracepoint's map: twice what is held, at least 16 Ki, within the cap.
        let held = tcp_sockets_held(sockstat).unwrap_or(0);
        assert_eq!((held * 2).max(16 * 1024).next_power_of_two(), 32_768);
        assert!(lru_entries(2048) <= 2048);
        assert!(lru_entries(1 << 24) >= 16 * 1024);
    }

    /// The functions each section of the probe object calls through relocations
    /// (BPF-to-BPF calls to `.text`, by symbol name).
    fn calls_in(section: &str) -> Vec<String> {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
        let file = object::File::parse(PROBE_OBJECT).expect("the probe object parses");
        let sec = file
            .section_by_name(section)
            .unwrap_or_else(|| panic!("no section {section} in the probe object"));
        sec.relocations()
            .filter_map(|(_, r)| match r.target() {
                RelocationTarget::Symbol(i) => file.symbol_by_index(i).ok(),
                _ => None,
            })
            .filter_map(|s| s.name().ok().map(str::to_string))
            .collect()
    }

    /// The programs that run for every transition, and for every socket at start-up,
    /// call no `memset`/`memmove`/`memcpy`: in BPF those are byte loops, once ~12 % of
    /// the state program's time (see `words` in connwatch-ebpf). A struct copy or a
    /// `[0; N]` there brings them back.
    #[test]
    fn hot_programs_call_no_byte_loops() {
        for section in [
            "tp_btf/inet_sock_set_state",
            "tracepoint/sock/inet_sock_set_state",
            "iter/tcp",
        ] {
            let calls = calls_in(section);
            let loops: Vec<_> = calls
                .iter()
                .filter(|c| matches!(c.as_str(), "memset" | "memmove" | "memcpy"))
                .collect();
            assert!(
                loops.is_empty(),
                "{section} calls {loops:?}: a struct copy or `[0; N]` in the probe became a \
                 call (a byte loop in BPF); copy or zero it with `words` in connwatch-ebpf"
            );
        }
        // The check sees such calls where they are: the stack capture (off the hot
        // path, in `.text`) still zeroes a buffer with one.
        assert!(
            calls_in(".text").iter().any(|c| c == "memset"),
            "no memset call found anywhere: the relocation scan reads nothing"
        );
    }
}
