//! connwatch kernel probe: one event per TCP state transition.
//!
//! Hooks (userspace attaches exactly one of them):
//! - `tp_btf/inet_sock_set_state`: typed `struct sock *` argument, cheapest, needs no
//!   tracefs. Fields are read at offsets that userspace resolves from the kernel's BTF and
//!   passes in the `OFFSETS` global (aya has no CO-RE); being constants to the verifier,
//!   they allow plain loads instead of a helper call per field (`Direct`).
//! - `tracepoint/sock/inet_sock_set_state`: the classic tracepoint, stable record layout
//!   since Linux 4.16; the fallback when tp_btf cannot load. Needs tracefs mounted.
//!
//! The probe keeps policy out of the kernel: it filters TCP, stamps the time, remembers
//! per socket when it entered its state and who owns it, and emits. Which process owns a
//! socket is only known where the transition runs in that process's own syscall
//! (connect, listen, close/shutdown); other transitions run in softirq or timers, where
//! the current task is a bystander, so they carry the owner remembered earlier.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
        generated::{
            bpf_get_current_comm, bpf_get_current_task, bpf_seq_write, bpf_sk_storage_get,
            bpf_skc_to_tcp_sock,
        },
    },
    macros::{btf_map, btf_tracepoint, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::debug;
use connwatch_common::{
    AF_INET, AF_INET6, Event, FILTER_MAX, Filter, IPPROTO_TCP, ListenKey, Offsets, SockState,
    SocketFd, begins_closing, counter, ends_closing, is_lifecycle, lifecycle_needs,
    may_leave_timewait, owner_needed_later, owner_source, runs_in_owner_context, starts_a_life,
    tcp_state, timewait_birth, timewait_birth_of, tp_record,
};

/// Event stream to userspace. Size is set by userspace at load time (`--ring-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Per-socket state on the socket itself (`tp_btf`): no preallocation, no eviction,
/// freed with the socket, so kernel memory follows the sockets that have state.
#[btf_map]
static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// Per-socket state keyed by `struct sock` address, for the classic tracepoint (whose
/// context is not a typed socket, which socket storage needs). LRU so that a missed
/// ->CLOSE can never leak an entry forever. One list for all CPUs (not per-CPU
/// partitions), since userspace sizes it for the whole host (1 entry when `tp_btf` is
/// used); inserts and removals are counted so that userspace can tell evictions.
#[map]
static SOCKETS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(1 << 18, 0);

/// The closer of each socket between its close()/shutdown() and its CLOSE, keyed by
/// socket address, for lifecycle-only `tp_btf` (1 entry otherwise, set by userspace):
/// the FIN_WAIT2/CLOSING -> CLOSE that tells a TIME_WAIT's birth runs in softirq or a
/// timer, and names its closer only from here. Preallocated: an insert and a delete
/// per connection that closes first cost a third of what allocating socket storage
/// and freeing it with the socket did (`bpf_stats`). Every way out of the closing
/// states ends in CLOSE, where the entry is deleted; a full map is counted
/// (`SOCKET_STORE_FAILED`), its closer then unknown.
#[map]
static CLOSERS: HashMap<u64, SockState> = HashMap::with_max_entries(1 << 15, 0);

/// Working space of one program run: the tuple, the socket's remembered and new state
/// and the task's name live here rather than on the BPF stack, which the verifier caps
/// at 512 bytes for a whole call chain (and which toolchains fill differently). The
/// kernel never runs two of these programs at once on one CPU, so one slot per CPU is
/// safe.
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters (see `connwatch_common::counter`): no atomics needed, summed in userspace.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// The processes listening on each port, so that `--pid` matches the sockets accepted
/// from them (their transitions run in softirq, with no owner of their own until
/// close()); keyed by (netns, port, pid), as SO_REUSEPORT siblings share a port.
#[map]
static LISTENERS: LruHashMap<ListenKey, u8> = LruHashMap::with_max_entries(1 << 14, 0);

/// Bytes waiting in EVENTS from which a submit wakes the reader (an eighth of the ring),
/// set before load.
// SAFETY: as OFFSETS.
#[unsafe(no_mangle)]
static WAKE_AT: u64 = 1 << 19;

/// Kernel struct field offsets, filled in by userspace from BTF before load.
// SAFETY: a symbol name of its own, which userspace overrides by name before load.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::unresolved();

/// Which events to emit (`--pid`, `--port`, `--family`, `--cgroup`), set before load.
// SAFETY: as OFFSETS.
#[unsafe(no_mangle)]
static FILTER: Filter = Filter {
    family: 0,
    nports: 0,
    npids: 0,
    lifecycle_only: 0,
    ports: [0; FILTER_MAX],
    pids: [0; FILTER_MAX],
    cgroup_id: 0,
};

/// One field of OFFSETS. Volatile, so that the compiler cannot fold the placeholder
/// values userspace overrides at load time; one field at a time, because copying the
/// whole struct to the stack on every event costs a memcpy call in BPF.
macro_rules! off {
    ($field:ident) => {
        $crate::global(&raw const $crate::OFFSETS.$field)
    };
}

/// One field of FILTER, read like OFFSETS.
macro_rules! filt {
    ($($field:tt)+) => {
        global(&raw const FILTER.$($field)+)
    };
}

/// A volatile read of one field of our own globals.
#[inline(always)]
fn global<T: Copy>(field: *const T) -> T {
    // SAFETY: `field` points into OFFSETS or FILTER (the macros above), statics that
    // live as long as the program and are never written after load.
    unsafe { core::ptr::read_volatile(field) }
}

/// The fields of a transition that the two hooks obtain differently.
#[repr(C, align(8))]
struct Tuple {
    family: u16,
    sport: u16,
    dport: u16,
    _pad: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// One run's working space (see `SCRATCH`). Aligned to 8 like its map value, so that
/// `words` may copy its 16- and 32-byte fields eight bytes at a time.
#[repr(C, align(8))]
struct Scratch {
    t: Tuple,
    /// What was remembered for the socket (zeroed when nothing was).
    prev: SockState,
    /// What is remembered for it from now on.
    state: SockState,
    /// The current task's name, filled only where the task owns the socket.
    comm: [u8; 16],
}

/// Copies and zeroes of plain data eight bytes at a time. LLVM turns a struct copy or a
/// `[0; N]` into a call of `memmove`/`memset`, which in BPF are byte loops (~4
/// instructions a byte, ~130 for a 32-byte `SockState`): with several a run they were a
/// tenth of the state program's time (`perf`). Volatile accesses are not merged back
/// into such a call.
mod words {
    use core::{
        mem::size_of,
        ptr::{read_volatile, write_volatile},
    };

    /// # Safety
    /// `dst` and `src` valid for `size_of::<T>()` bytes, both aligned to 8; `T` plain
    /// data whose size is a multiple of 8.
    #[inline(always)]
    pub unsafe fn copy<T>(dst: *mut T, src: *const T) {
        const { assert!(size_of::<T>() % 8 == 0) };
        let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
        for i in 0..size_of::<T>() / 8 {
            // SAFETY: within both objects, aligned (the caller's promise).
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
    }

    /// # Safety
    /// As `copy`, for `dst`.
    #[inline(always)]
    pub unsafe fn zero<T>(dst: *mut T) {
        const { assert!(size_of::<T>() % 8 == 0) };
        let d = dst.cast::<u64>();
        for i in 0..size_of::<T>() / 8 {
            // SAFETY: as `copy`.
            unsafe { write_volatile(d.add(i), 0) };
        }
    }
}

// The fields `words` copies are 8-aligned in their (8-aligned) structs.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Scratch, prev) % 8 == 0 && offset_of!(Scratch, state) % 8 == 0);
    assert!(offset_of!(Scratch, comm) % 8 == 0 && offset_of!(Scratch, t) % 8 == 0);
    assert!(offset_of!(Tuple, saddr) % 8 == 0 && offset_of!(Tuple, daddr) % 8 == 0);
    assert!(offset_of!(SockState, owner_comm) % 8 == 0);
    assert!(core::mem::align_of::<SockState>() == 8);
    assert!(offset_of!(Event, task_comm) % 8 == 0 && core::mem::align_of::<Event>() == 8);
};

/// This CPU's scratch slot (null only if the map is missing, which the loader prevents).
#[inline(always)]
fn scratch() -> *mut Scratch {
    SCRATCH.get_ptr_mut(0).unwrap_or(core::ptr::null_mut())
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn connwatch_tp_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let old = ctx.arg::<i32>(1) as u8;
    let new = ctx.arg::<i32>(2) as u8;
    // The cheap common path: `watch` needs 3 of a connection's ~10 transitions, plus the
    // owners named by connect() and close(); the rest return here, before any read.
    let lifecycle = global(&raw const FILTER.lifecycle_only) != 0;
    if lifecycle && !lifecycle_needs(old, new, filt!(npids) != 0) {
        return 0;
    }
    // SAFETY: `sk` is the tracepoint's typed `struct sock *` (see `Direct`).
    if unsafe { Direct::read::<u16>(sk, off!(sk_protocol)) } != Some(IPPROTO_TCP) {
        return 0;
    }
    let s = scratch();
    if s.is_null() {
        return 0;
    }
    // SAFETY: this CPU's slot, ours for this run (see `SCRATCH`).
    let s = unsafe { &mut *s };
    let mut task = Task::current(sk, old, new, &mut s.comm);
    let kept = recall(sk, old, new, lifecycle, s);
    let owned = owned(s, &task);
    remember(sk, old, new, lifecycle, &kept, s);
    if lifecycle
        && !is_lifecycle(old, new)
        && new != tcp_state::LISTEN
        && !(old == tcp_state::LISTEN && new == tcp_state::CLOSE)
    {
        // Only an owner to remember: no event, no listener.
        return 0;
    }
    // From here on the socket is read as a `tcp_sock`, which the helper hands back for
    // the same address (null for anything else). Two reasons: the local port is in
    // `inet_sock`, beyond `struct sock`, where the verifier lets no load through a
    // `struct sock *`; and the tracepoint's pointer is "trusted", so at load time the
    // verifier checks every pointer loaded through it with a search of the kernel's
    // BTF by name (~1 ms each), which the helper's untrusted pointer skips.
    // SAFETY: a helper that checks its argument; null-checked below.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk.cast_mut().cast()) } as *const u8;
    if tcp.is_null() {
        return 0;
    }
    task.sk = tcp;
    // SAFETY: `tcp` is a typed socket (see `Direct`).
    if !unsafe { tuple_of(tcp, &mut s.t) } {
        return 0;
    }
    finish::<Direct>(&task, s, &owned);
    0
}

/// Where the probe keeps a socket's state between transitions (`recall`).
struct Kept {
    /// The socket's storage (null without one).
    slot: *mut SockState,
    /// A closer was read from `CLOSERS`.
    closer: bool,
}

/// What was remembered of the socket before this transition, into `s.prev` (zeroed when
/// nothing was). Socket storage (an allocation per socket, a third of the probe's time
/// under churn) only where the kernel itself needs what it keeps: `--pid` matches a
/// transition in softirq by the owner an earlier syscall named. Otherwise `trace`, which
/// receives every transition, times states and carries owners in userspace (`carry`),
/// and lifecycle-only mode keeps closers in `CLOSERS`, read at the end of the closing
/// states. Inlined: the storage helper must get the tracepoint's typed pointer, which a
/// subprogram would see as a scalar.
#[inline(always)]
fn recall(sk: *const u8, old: u8, new: u8, lifecycle: bool, s: &mut Scratch) -> Kept {
    let slot = if filt!(npids) != 0 {
        let create = !lifecycle || owner_needed_later(old, new);
        // SAFETY: `SOCK_STATE` is a socket storage map and `sk` the tracepoint's typed
        // socket (the verifier checks both); the helper returns the socket's slot or
        // null.
        unsafe {
            bpf_sk_storage_get(
                core::ptr::from_ref(&SOCK_STATE).cast_mut().cast(),
                sk.cast_mut().cast(),
                core::ptr::null_mut(),
                if create { 1 } else { 0 },
            )
        }
        .cast::<SockState>()
    } else {
        core::ptr::null_mut()
    };
    // A zeroed value rather than an `Option` (see `update_lru`).
    // SAFETY: fields of this CPU's scratch slot; the storage slot is this socket's,
    // valid for this program run; all 8-aligned (see `words`).
    unsafe {
        if slot.is_null() {
            words::zero(&raw mut s.prev);
        } else {
            words::copy(&raw mut s.prev, slot);
        }
    }
    let closer = if lifecycle && ends_closing(old, new) {
        CLOSERS.get_ptr(&(sk as u64))
    } else {
        None
    };
    if let Some(p) = closer {
        // SAFETY: a map value pointer (8-aligned), valid for this program run.
        unsafe { words::copy(&raw mut s.prev, p) };
    }
    Kept {
        slot,
        closer: closer.is_some(),
    }
}

/// Keeps the socket's state after this transition (`s.state`) where `recall` found it,
/// and a closer from close()/shutdown() in `CLOSERS` until the closing states end.
#[inline(always)]
fn remember(sk: *const u8, old: u8, new: u8, lifecycle: bool, kept: &Kept, s: &Scratch) {
    if !kept.slot.is_null() {
        // SAFETY: the storage slot `recall` got in this run; 8-aligned (see `words`).
        unsafe { words::copy(kept.slot, &raw const s.state) };
    }
    let key = sk as u64;
    if lifecycle && begins_closing(old, new) {
        if CLOSERS.insert(&key, &s.state, 0).is_err() {
            bump(counter::SOCKET_STORE_FAILED);
        }
    } else if kept.closer {
        let _ = CLOSERS.remove(&key);
    }
}

/// Family, ports and addresses of a socket typed `tcp_sock`, into `t`; false for a
/// family other than IPv4 and IPv6.
///
/// # Safety
/// `sk` must be a typed `tcp_sock` pointer (see `Direct`).
#[inline(always)]
unsafe fn tuple_of(sk: *const u8, t: &mut Tuple) -> bool {
    // SAFETY: a typed pointer, plain loads the verifier checks (see `Direct`).
    unsafe {
        let Some(family) = Direct::read::<u16>(sk, off!(skc_family)) else {
            return false;
        };
        t.family = family;
        t.sport = u16::from_be(Direct::read::<u16>(sk, off!(inet_sport)).unwrap_or(0));
        t.dport = u16::from_be(Direct::read::<u16>(sk, off!(skc_dport)).unwrap_or(0));
        addresses(sk, family, &mut t.saddr, &mut t.daddr)
    }
}

/// The local and remote address of a typed socket (its `sock_common`) into `saddr`
/// and `daddr`: IPv4 in the first 4 bytes; false for a family other than IPv4 and
/// IPv6.
///
/// # Safety
/// `sk` must be a typed socket pointer whose type begins with `sock_common` (see
/// `Direct`).
#[inline(always)]
unsafe fn addresses(
    sk: *const u8,
    family: u16,
    saddr: &mut [u8; 16],
    daddr: &mut [u8; 16],
) -> bool {
    // SAFETY: plain loads the verifier checks (see `Direct`); both addresses are
    // 8-aligned fields (see `words`).
    unsafe {
        words::zero(saddr);
        words::zero(daddr);
        match family {
            AF_INET => {
                let s = Direct::read::<u32>(sk, off!(skc_rcv_saddr)).unwrap_or(0);
                let d = Direct::read::<u32>(sk, off!(skc_daddr)).unwrap_or(0);
                saddr[..4].copy_from_slice(&s.to_ne_bytes());
                daddr[..4].copy_from_slice(&d.to_ne_bytes());
            }
            AF_INET6 => {
                *saddr = Direct::read_16(sk, off!(skc_v6_rcv_saddr));
                *daddr = Direct::read_16(sk, off!(skc_v6_daddr));
            }
            _ => return false,
        }
        true
    }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn connwatch_tracepoint(ctx: TracePointContext) -> u32 {
    let rec = ctx.as_ptr() as *const u8;
    let s = scratch();
    if s.is_null() {
        return 0;
    }
    // SAFETY: this CPU's slot, ours for this run (see `SCRATCH`). Direct loads from the
    // tracepoint record at the offsets of `tp_record`, which userspace checks against the
    // tracepoint's `format` file before attaching; the verifier bounds-checks every
    // context access. IPv6 addresses are copied by the helper: loads in a loop let LLVM
    // step a pointer through the context, which the verifier refuses.
    unsafe {
        let s = &mut *s;
        let field = |off: usize| rec.add(off);
        if core::ptr::read_volatile(field(tp_record::PROTOCOL) as *const u16) != IPPROTO_TCP {
            return 0;
        }
        let t = &mut s.t;
        t.family = core::ptr::read_volatile(field(tp_record::FAMILY) as *const u16);
        // The tracepoint already converted the ports to host order.
        t.sport = core::ptr::read_volatile(field(tp_record::SPORT) as *const u16);
        t.dport = core::ptr::read_volatile(field(tp_record::DPORT) as *const u16);
        words::zero(&raw mut t.saddr);
        words::zero(&raw mut t.daddr);
        match t.family {
            AF_INET => {
                let sa = core::ptr::read_volatile(field(tp_record::SADDR) as *const u32);
                let da = core::ptr::read_volatile(field(tp_record::DADDR) as *const u32);
                t.saddr[..4].copy_from_slice(&sa.to_ne_bytes());
                t.daddr[..4].copy_from_slice(&da.to_ne_bytes());
            }
            AF_INET6 => {
                let _ = bpf_probe_read_kernel_buf(field(tp_record::SADDR_V6), &mut t.saddr);
                let _ = bpf_probe_read_kernel_buf(field(tp_record::DADDR_V6), &mut t.daddr);
            }
            _ => return 0,
        }
        let sk = core::ptr::read_volatile(field(tp_record::SKADDR) as *const u64) as *const u8;
        let old = core::ptr::read_volatile(field(tp_record::OLDSTATE) as *const i32) as u8;
        let new = core::ptr::read_volatile(field(tp_record::NEWSTATE) as *const i32) as u8;
        let task = Task::current(sk, old, new, &mut s.comm);
        let owned = update_lru(&ctx, &task, s);
        finish::<Copied>(&task, s, &owned);
    }
    0
}

/// One run of the probe: the transition and the current task, as far as it needs them.
struct Task {
    sk: *const u8,
    old: u8,
    new: u8,
    now: u64,
    pid: u32,
    /// The transition runs in the owner's syscall: the task is the owner.
    in_context: bool,
}

impl Task {
    /// The run's task; its name goes into `comm` only for an owner named by context
    /// (`in_context`; else it is read on emit): filling it on every run costs a call.
    #[inline(always)]
    fn current(sk: *const u8, old: u8, new: u8, comm: &mut [u8; 16]) -> Self {
        let in_context = runs_in_owner_context(old, new);
        if in_context {
            // SAFETY: a helper writing 16 bytes into our buffer (or zeroing them).
            unsafe { bpf_get_current_comm(comm.as_mut_ptr().cast(), 16) };
        }
        Self {
            sk,
            old,
            new,
            // SAFETY: a helper call without arguments.
            now: unsafe { bpf_ktime_get_ns() },
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            in_context,
        }
    }
}

/// What the probe knows of a socket's owner after this transition, beside the state
/// to remember (`Scratch::state`).
struct Owned {
    /// When the socket entered `old` (0: not seen).
    prev_since: u64,
    /// How the owner in `Scratch::state` was found (`owner_source`).
    source: u8,
}

/// The socket's state after `old -> new` into `s.state`, given what was remembered
/// (`s.prev`, zeroed when nothing was): the owner named by this context, or carried
/// from an earlier one.
#[inline(always)]
fn owned(s: &mut Scratch, task: &Task) -> Owned {
    let state = &mut s.state;
    state.since_ns = task.now;
    state.state = task.new;
    for b in &mut state._pad {
        // SAFETY: a byte of our scratch slot; volatile, as in `words`.
        unsafe { core::ptr::write_volatile(b, 0) };
    }
    let source = if task.in_context {
        state.owner_pid = task.pid;
        // SAFETY: 8-aligned fields of our scratch slot (see `words`).
        unsafe { words::copy(&raw mut state.owner_comm, &raw const s.comm) };
        owner_source::CONTEXT
    } else if s.prev.owner_pid != 0 {
        state.owner_pid = s.prev.owner_pid;
        // SAFETY: as above.
        unsafe { words::copy(&raw mut state.owner_comm, &raw const s.prev.owner_comm) };
        owner_source::CARRIED
    } else {
        state.owner_pid = 0;
        // SAFETY: as above.
        unsafe { words::zero(&raw mut state.owner_comm) };
        owner_source::UNKNOWN
    };
    Owned {
        // Only when what was stored timed `old` (lifecycle-only tp_btf stores owners,
        // not every transition).
        prev_since: if s.prev.state == task.old {
            s.prev.since_ns
        } else {
            0
        },
        source,
    }
}

/// The classic tracepoint's per-socket state, in the LRU map keyed by socket address:
/// looked up, updated in place, forgotten at CLOSE.
#[inline(always)]
fn update_lru<C: aya_ebpf::EbpfContext>(ctx: &C, task: &Task, s: &mut Scratch) -> Owned {
    let (key, old, new) = (task.sk as u64, task.old, task.new);
    // A zeroed value rather than an `Option`: LLVM may otherwise compute on the payload
    // of a `None` (undefined, often a stack pointer), which the verifier rejects as
    // pointer arithmetic. `since_ns == 0` means "not seen".
    // SAFETY: an 8-aligned field of our scratch slot (see `words`).
    unsafe { words::zero(&raw mut s.prev) };
    // The entry, to update in place: an LRU map update allocates a new element and
    // frees the old one, costlier than writing 32 bytes.
    let mut existing: *mut SockState = core::ptr::null_mut();
    // A socket that starts a life must not inherit a stale entry left by a freed socket
    // at the same address.
    if !starts_a_life(old, new)
        && let Some(p) = SOCKETS.get_ptr_mut(&key)
    {
        // SAFETY: a map value pointer (8-aligned), valid for this program run.
        unsafe { words::copy(&raw mut s.prev, p) };
        existing = p;
    }
    let owned = owned(s, task);
    if new == tcp_state::CLOSE {
        if SOCKETS.remove(&key).is_ok() {
            bump(counter::SOCKET_REMOVED);
        }
    } else if !existing.is_null() {
        // SAFETY: the pointer came from the lookup above, in this same run.
        unsafe { words::copy(existing, &raw const s.state) };
    } else if SOCKETS.insert(&key, &s.state, 0).is_err() {
        bump(counter::SOCKET_STORE_FAILED);
        debug!(ctx, "connwatch: could not store socket state");
    } else {
        bump(counter::SOCKET_INSERTED);
    }
    owned
}

/// Tracks listeners, applies the filter and emits: the part both hooks share.
// Not inlined: one copy shared by both hooks, and LLVM's cross-inlining of the
// tracepoint's record loads produced code the verifier rejects (pointer shifted as a
// scalar).
#[inline(never)]
fn finish<K: Kernel>(task: &Task, s: &Scratch, owned: &Owned) {
    let (sk, old, new) = (task.sk, task.old, task.new);
    let t = &s.t;
    // SAFETY: `sk` is the tracepoint's socket, read the way `K` allows.
    let netns = unsafe { netns_of::<K>(sk) };
    let listen_key = ListenKey {
        netns,
        port: t.sport,
        _pad: 0,
        pid: s.state.owner_pid,
    };
    update_listeners(old, new, &listen_key);
    if !passes::<K>(t, old, new, &listen_key, s.state.owner_pid, sk) {
        return;
    }
    bump(counter::SEEN);
    emit::<K>(task, netns, owned, s);
}

/// Keeps the processes listening on every port, for `--pid` on accepted sockets: the
/// one calling listen() is added, the one closing the listener removed.
#[inline(always)]
fn update_listeners(old: u8, new: u8, key: &ListenKey) {
    if new == tcp_state::LISTEN {
        let _ = LISTENERS.insert(key, &1, 0);
    } else if old == tcp_state::LISTEN && new == tcp_state::CLOSE {
        let _ = LISTENERS.remove(key);
    }
}

/// Writes the event into the ring and wakes the reader when an eighth of it is filled.
#[inline(always)]
fn emit<K: Kernel>(task: &Task, netns: u32, owned: &Owned, s: &Scratch) {
    let (sk, old, new) = (task.sk, task.old, task.new);
    let t = &s.t;
    // Only a socket entering CLOSE_WAIT needs its inode (userspace finds its holder by
    // it); four reads saved on every other event.
    let inode = if new == tcp_state::CLOSE_WAIT {
        // SAFETY: `sk` is the tracepoint's socket, read the way `K` allows.
        unsafe { inode_of::<K>(sk) }
    } else {
        0
    };
    // What a FIN_WAIT2/CLOSING -> CLOSE left behind: userspace then knows a TIME_WAIT
    // birth from the event alone, without polling for the timewait socket.
    let timewait = if may_leave_timewait(old, new) {
        // SAFETY: as above.
        unsafe { timewait_birth_at_close::<K>(sk, old) }
    } else {
        0
    };
    // A close in the context of an exiting task is the kernel closing its files, not a
    // close() of the program: userspace must not count it as one.
    let exiting = if task.in_context && new == tcp_state::LAST_ACK {
        task_exiting()
    } else {
        0
    };
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump(counter::DROPPED);
        return;
    };
    // Fields written straight into the reserved slot: building the 120-byte event on
    // the stack and copying it costs a memmove call in BPF.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to the reserved slot, exclusively ours until submitted; every
    // field is plain data.
    unsafe {
        (*e).ts_ns = task.now;
        (*e).skaddr = sk as u64;
        (*e).old_since_ns = owned.prev_since;
        (*e).inode = inode;
        (*e).netns = netns;
        (*e).owner_pid = s.state.owner_pid;
        (*e).task_pid = task.pid;
        (*e).family = t.family;
        (*e).sport = t.sport;
        (*e).dport = t.dport;
        (*e).oldstate = old;
        (*e).newstate = new;
        (*e).owner_source = owned.source;
        (*e).timewait = timewait;
        (*e).task_exiting = exiting;
        (*e)._pad = 0;
        (*e).saddr = t.saddr;
        (*e).daddr = t.daddr;
        (*e).owner_comm = s.state.owner_comm;
        // Filled when `in_context` (`Task::current`). A bystander's name (softirq, a
        // timer) is not read: no view shows it, and it cost a helper call on each of
        // the events that run there (->CLOSE_WAIT, FIN_WAIT2->CLOSE).
        if task.in_context {
            words::copy(&raw mut (*e).task_comm, &raw const s.comm);
        } else {
            words::zero(&raw mut (*e).task_comm);
        }
    }
    // Waking the reader for every event costs an IPI each (a VM exit under
    // virtualisation: microseconds). Wake it only once an eighth of the ring is filled
    // (`WAKE_AT`, set with the ring's size); userspace also drains on a short timer, so
    // rows still flow at low rates.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= global(&raw const WAKE_AT) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}

/// The load-time filter. A socket whose owner is not known yet (accepted, before its
/// close) matches `--pid` through the owner of the port it was accepted on.
#[inline(always)]
fn passes<K: Kernel>(
    t: &Tuple,
    old: u8,
    new: u8,
    listen_key: &ListenKey,
    owner: u32,
    sk: *const u8,
) -> bool {
    if filt!(lifecycle_only) != 0 && !is_lifecycle(old, new) {
        return false;
    }
    let family = filt!(family);
    if family != 0 && family != t.family {
        return false;
    }
    let nports = filt!(nports) as usize;
    if nports != 0 {
        let mut hit = false;
        for i in 0..FILTER_MAX {
            if i < nports {
                let port = filt!(ports[i]);
                if port == t.sport || port == t.dport {
                    hit = true;
                }
            }
        }
        if !hit {
            return false;
        }
    }
    let npids = filt!(npids) as usize;
    if npids != 0 {
        let mut hit = false;
        for i in 0..FILTER_MAX {
            if i < npids {
                let pid = filt!(pids[i]);
                hit |= if owner != 0 {
                    owner == pid
                } else {
                    // Not owned yet (accepted, before close): a selected process
                    // listening on its port.
                    let key = ListenKey { pid, ..*listen_key };
                    // SAFETY: a map value pointer, only tested for presence.
                    unsafe { LISTENERS.get(&key).is_some() }
                };
            }
        }
        if !hit {
            return false;
        }
    }
    let cgroup_id = filt!(cgroup_id);
    if cgroup_id != 0 {
        // SAFETY: `sk` is the tracepoint's socket, read the way `K` allows.
        let id = unsafe {
            let cgroup = K::read::<u64>(sk, off!(sk_cgroup)).unwrap_or(0) as *const u8;
            let kn = K::read::<u64>(cgroup, off!(cgroup_kn)).unwrap_or(0) as *const u8;
            K::read::<u64>(kn, off!(kernfs_id)).unwrap_or(0)
        };
        if id != cgroup_id {
            return false;
        }
    }
    true
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and the program is not re-entered on this CPU for the
        // same tracepoint, so a plain add is race-free.
        unsafe { *slot += 1 };
    }
}

/// How the probe reads a field of a kernel struct.
trait Kernel {
    /// A `T` at `base + off`; `None` when the offset is unresolved or (`Copied`) the base
    /// is null or the read failed.
    ///
    /// # Safety
    /// `base` must be a kernel address (or null) of the kind the implementation needs.
    unsafe fn read<T: Copy>(base: *const u8, off: u32) -> Option<T>;
}

/// Plain loads through the typed pointers of `tp_btf` (the tracepoint's `struct sock *`
/// and every pointer loaded from it). OFFSETS is in a frozen read-only map, so the
/// verifier knows each offset as a constant: it checks each load against the kernel's
/// BTF at load time and makes it fault-safe (a bad address reads 0), and drops the
/// branches of unresolved offsets. No helper call per field.
struct Direct;

impl Direct {
    /// 16 bytes (an IPv6 address) as two 8-byte loads.
    ///
    /// # Safety
    /// As `read`.
    #[inline(always)]
    unsafe fn read_16(base: *const u8, off: u32) -> [u8; 16] {
        let mut out = [0u8; 16];
        if off == Offsets::UNRESOLVED {
            return out;
        }
        // SAFETY: as `read`.
        unsafe {
            let hi = Self::read::<u64>(base, off).unwrap_or(0);
            let lo = Self::read::<u64>(base, off + 8).unwrap_or(0);
            out[..8].copy_from_slice(&hi.to_ne_bytes());
            out[8..].copy_from_slice(&lo.to_ne_bytes());
        }
        out
    }
}

impl Kernel for Direct {
    #[inline(always)]
    unsafe fn read<T: Copy>(base: *const u8, off: u32) -> Option<T> {
        // No test of `base` for null: a load through a null pointer reads 0 here, and the
        // verifier, which does not track the value of these pointers, would explore
        // the impossible mixes of two tests of one pointer that LLVM merged.
        if off == Offsets::UNRESOLVED {
            return None;
        }
        // SAFETY: the verifier allows the load only where BTF has a field of this size
        // at this offset, and the JIT turns a fault into 0.
        Some(unsafe { core::ptr::read_volatile(base.add(off as usize).cast::<T>()) })
    }
}

/// `bpf_probe_read_kernel`, for the classic tracepoint, whose socket pointer is a plain
/// number to the verifier.
struct Copied;

impl Kernel for Copied {
    #[inline(always)]
    unsafe fn read<T: Copy>(base: *const u8, off: u32) -> Option<T> {
        if off == Offsets::UNRESOLVED || base.is_null() {
            return None;
        }
        // SAFETY: bpf_probe_read_kernel copies out or fails cleanly; `add` only computes
        // an address (never dereferenced here).
        unsafe { bpf_probe_read_kernel(base.add(off as usize).cast::<T>()).ok() }
    }
}

/// The inode number of the socket's network namespace (0 when unreadable).
///
/// # Safety
/// `sk` must be a `struct sock *` (or null).
#[inline(always)]
unsafe fn netns_of<K: Kernel>(sk: *const u8) -> u32 {
    // SAFETY: reads at offsets resolved from BTF, the way `K` allows.
    unsafe {
        let net = K::read::<u64>(sk, off!(skc_net)).unwrap_or(0) as *const u8;
        K::read::<u32>(net, off!(net_ns_inum)).unwrap_or(0)
    }
}

/// `timewait_birth` of a socket on its FIN_WAIT2/CLOSING -> CLOSE, from `sk_err` and
/// `sk_flags` (UNKNOWN when either cannot be read: userspace polls instead).
///
/// # Safety
/// `sk` must be a `struct sock *` (or null).
#[inline(always)]
unsafe fn timewait_birth_at_close<K: Kernel>(sk: *const u8, old: u8) -> u8 {
    // SAFETY: reads at offsets resolved from BTF, the way `K` allows.
    let (err, flags) = unsafe {
        (
            K::read::<i32>(sk, off!(sk_err)),
            K::read::<u64>(sk, off!(skc_flags)),
        )
    };
    let birth = match (err, flags) {
        (Some(err), Some(flags)) => timewait_birth_of(old, err, flags),
        _ => return timewait_birth::UNKNOWN,
    };
    if birth == timewait_birth::NONE {
        return birth;
    }
    // At the namespace's timewait cap the kernel may have had no room (it counts that
    // in TcpExtTCPTimeWaitOverflow, nothing on the socket): a poll must tell. Unknown
    // fields (older kernels) skip the check.
    // SAFETY: as above.
    let (refs, max) = unsafe {
        let net = K::read::<u64>(sk, off!(skc_net)).unwrap_or(0) as *const u8;
        (
            K::read::<i32>(net, off!(net_tw_refcount)),
            K::read::<i32>(net, off!(net_max_tw_buckets)),
        )
    };
    match (refs, max) {
        (Some(refs), Some(max)) if refs - 1 >= max => timewait_birth::UNKNOWN,
        _ => birth,
    }
}

/// `PF_EXITING` of `task_struct.flags`.
const PF_EXITING: u32 = 0x4;

/// 1 when the current task is exiting (0 when its flags cannot be read).
#[inline(always)]
fn task_exiting() -> u8 {
    // SAFETY: the helper returns the current task's address; the field is copied out
    // by bpf_probe_read_kernel, which fails cleanly.
    let flags = unsafe {
        let task = bpf_get_current_task() as *const u8;
        Copied::read::<u32>(task, off!(task_flags)).unwrap_or(0)
    };
    u8::from(flags & PF_EXITING != 0)
}

/// The inode of the socket's file, as in /proc/PID/fd (0 without a file: not accepted).
///
/// # Safety
/// `sk` must be a `struct sock *` (or null).
#[inline(always)]
unsafe fn inode_of<K: Kernel>(sk: *const u8) -> u64 {
    // SAFETY: reads at offsets resolved from BTF, the way `K` allows; the inode beside
    // the socket is copied by bpf_probe_read_kernel, which fails cleanly.
    unsafe {
        let sock = K::read::<u64>(sk, off!(sk_socket)).unwrap_or(0) as *const u8;
        // As the kernel's `sock_i_ino`: every `struct socket` is allocated inside a
        // `socket_alloc`, its inode beside it. One read where the walk through the file
        // costs two more dependent loads, each a cache miss on a cold socket.
        let (beside, ino) = (off!(socket_alloc_inode), off!(inode_ino));
        if beside != Offsets::UNRESOLVED && ino != Offsets::UNRESOLVED {
            return Copied::read::<u64>(sock, beside + ino).unwrap_or(0);
        }
        let file = K::read::<u64>(sock, off!(socket_file)).unwrap_or(0) as *const u8;
        let inode = K::read::<u64>(file, off!(file_inode)).unwrap_or(0) as *const u8;
        K::read::<u64>(inode, off!(inode_ino)).unwrap_or(0)
    }
}

/// `struct bpf_iter__task_file`: each member is a union aligned to 8 bytes.
#[repr(C)]
pub struct TaskFileCtx {
    meta: *const IterMeta,
    task: *const u8,
    fd: u32,
    _pad: u32,
    file: *const u8,
}

/// `struct bpf_iter_meta`.
#[repr(C)]
struct IterMeta {
    seq: *mut core::ffi::c_void,
    session_id: u64,
    seq_num: u64,
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// The socket-fd iterator (`iter/task_file`): one `SocketFd` record per socket among
/// every process's open files, in one pass in the kernel, for the index of who holds
/// which socket (instead of a readlink per fd under /proc). The kernel visits each fd
/// table once (threads sharing their leader's table are skipped).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn connwatch_socket_fds(ctx: *const TaskFileCtx) -> i32 {
    // SAFETY: the context is the iterator's `bpf_iter__task_file`, read directly so the
    // verifier sees `meta->seq` as its seq_file; the task and file pointers are
    // checked for null, and the fields behind them read through bpf_probe_read_kernel.
    unsafe {
        let seq = (*(*ctx).meta).seq;
        let (task, file, fd) = ((*ctx).task, (*ctx).file, (*ctx).fd);
        if task.is_null() || file.is_null() {
            return 0;
        }
        let inode = Copied::read::<u64>(file, off!(file_inode)).unwrap_or(0) as *const u8;
        let mode = Copied::read::<u16>(inode, off!(inode_mode)).unwrap_or(0);
        if mode & S_IFMT != S_IFSOCK {
            return 0;
        }
        // A task whose id cannot be read is left out rather than listed as pid 0.
        let pid = Copied::read::<u32>(task, off!(task_tgid)).unwrap_or(0);
        if pid == 0 {
            return 0;
        }
        let rec = SocketFd {
            pid,
            fd,
            inode: Copied::read::<u64>(inode, off!(inode_ino)).unwrap_or(0),
        };
        bpf_seq_write(
            seq.cast(),
            core::ptr::from_ref(&rec).cast(),
            core::mem::size_of::<SocketFd>() as u32,
        );
    }
    0
}

// After the macros they use (`off!`).
mod seed;
mod stacks;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the section and symbol the kernel's loader reads the license from.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
