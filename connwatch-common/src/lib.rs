//! Wire types shared by the kernel probe and the userspace loader.
//!
//! Everything here crosses the kernel/user boundary as raw bytes: `#[repr(C)]`,
//! fixed-width integers only, explicit padding, no `bool` and no Rust enums.
#![no_std]

/// Names of the maps and programs in the probe object. One definition for both sides.
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_SOCKETS: &str = "SOCKETS";
pub const MAP_CLOSERS: &str = "CLOSERS";
pub const MAP_SOCK_STATE: &str = "SOCK_STATE";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const PROG_TP_BTF: &str = "connwatch_tp_btf";
pub const PROG_TRACEPOINT: &str = "connwatch_tracepoint";
pub const GLOBAL_OFFSETS: &str = "OFFSETS";
pub const GLOBAL_FILTER: &str = "FILTER";
pub const GLOBAL_WAKE_AT: &str = "WAKE_AT";
pub const MAP_LISTENERS: &str = "LISTENERS";
pub const PROG_SOCKET_FDS: &str = "connwatch_socket_fds";
/// The TCP socket iterator (`iter/tcp`) that seeds the tables at start-up.
pub const PROG_TCP_SOCKETS: &str = "connwatch_tcp_sockets";
pub const MAP_STACKS: &str = "STACKS";
pub const MAP_STACK_PIDS: &str = "STACK_PIDS";
pub const MAP_STACK_CTL: &str = "STACK_CTL";
/// The syscall programs of stack capture (classic tracepoints under `syscalls/`): one
/// program attached to every syscall of its kind.
pub const PROG_FD_ENTER: &str = "connwatch_fd_enter";
pub const PROG_EOF_EXIT: &str = "connwatch_eof_exit";
pub const PROG_ACCEPT_EXIT: &str = "connwatch_accept_exit";
pub const PROG_CONNECT_ENTER: &str = "connwatch_connect_enter";

/// Where a user stack was captured: the two moments of a socket that can end in
/// CLOSE_WAIT (where it was made, where the process learnt of the hang-up).
pub mod stack_at {
    /// connect(), at its entry (the syscall in which CLOSE -> SYN_SENT runs).
    pub const CONNECT: u8 = 1;
    /// accept()/accept4() returning the socket's fd.
    pub const ACCEPT: u8 = 2;
    /// read()/recvfrom() returning 0 (the peer's FIN) on the socket.
    pub const EOF: u8 = 3;
}

/// Which processes stacks are captured for (`STACK_CTL[0]`).
pub mod stack_mode {
    pub const OFF: u32 = 0;
    /// The tgids in `STACK_PIDS`.
    pub const LISTED: u32 = 1;
    /// Every process (`--stacks` without `--pid`).
    pub const ALL: u32 = 2;
}

/// Return addresses the kernel's frame-pointer walk keeps per stack.
pub const STACK_FRAMES: usize = 64;
/// Bytes of the user stack copied from the stack pointer up, for userspace to unwind
/// the first frames with the binaries' unwind tables (`.eh_frame`).
pub const STACK_COPY: usize = 8192;

/// One captured user stack (ring `STACKS`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackRecord {
    pub ts_ns: u64,
    /// The socket's inode, as in `socket:[N]`.
    pub inode: u64,
    /// User registers at the syscall: instruction, stack and frame pointer (0 where
    /// the kernel's `pt_regs` layout is unknown).
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub pid: u32,
    pub tid: u32,
    /// `stack_at`.
    pub at: u8,
    pub _pad: [u8; 3],
    /// Frames the kernel's frame-pointer walk filled in `frames`.
    pub nframes: u32,
    /// Bytes of `stack` copied (0 when the copy failed).
    pub stack_len: u32,
    pub _pad2: u32,
    pub frames: [u64; STACK_FRAMES],
    pub stack: [u8; STACK_COPY],
}

/// One record of the socket-fd iterator: a process holding a socket file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFd {
    /// Process (tgid) whose fd table holds the socket.
    pub pid: u32,
    pub fd: u32,
    /// The socket's inode, as in `socket:[N]`.
    pub inode: u64,
}

/// What a `TcpSocket` record describes.
pub mod tcp_socket_kind {
    /// The first record of a pass: only `now_jiffies` and `now_ns` are set, for userspace
    /// to tell the kernel's tick rate (jiffies per second).
    pub const HEADER: u8 = 0;
    /// A full socket (`tcp_sock`): every field but the ages and `bytes_received`.
    pub const FULL: u8 = 1;
    /// A full socket in CLOSE_WAIT or FIN_WAIT2, whose evidence the reports read:
    /// every field is set.
    pub const FULL_AGED: u8 = 4;
    /// A timewait socket: `state` is its substate (TIME_WAIT, or FIN_WAIT2 of an
    /// orphan), `expires` its timer; no inode, queues or ages.
    pub const TIMEWAIT: u8 = 2;
    /// A request socket (a handshake in progress, `NEW_SYN_RECV`).
    pub const REQUEST: u8 = 3;
}

/// One record of the TCP socket iterator (`iter/tcp`): what the start-up seed reads of
/// a socket, in a fixed layout, instead of a sock_diag dump with `tcp_info` for every
/// socket. Ages are in jiffies, as the kernel keeps them (`tcp_info` converts them the
/// same way: `tcp_jiffies32` less the stamp).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSocket {
    /// `tcp_socket_kind`.
    pub kind: u8,
    /// `skc_state` (a timewait socket's `tw_substate`).
    pub state: u8,
    pub family: u16,
    /// Local and remote port, host order.
    pub sport: u16,
    pub dport: u16,
    /// The socket's owner uid as the iterator gives it (0 for timewait sockets).
    pub uid: u32,
    /// Bytes received and not read (`rcv_nxt - copied_seq`, sock_diag's Recv-Q), for
    /// `FULL_AGED` sockets only: the seed reads it of CLOSE_WAIT sockets alone, and each
    /// field is a cache line more of a cold socket.
    pub recv_q: u32,
    pub _pad: u32,
    pub inode: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Jiffies since we last sent data (`lsndtime`), since the peer last sent data
    /// (`icsk_ack.lrcvtime`) and since its last ACK (`rcv_tstamp`).
    pub since_sent: u32,
    pub since_recv: u32,
    pub since_ack: u32,
    /// Jiffies until a timewait socket's timer fires (0 when due).
    pub expires: u32,
    /// `tcp_sock.bytes_received`.
    pub bytes_received: u64,
    /// `HEADER` only: `bpf_jiffies64()` and `bpf_ktime_get_ns()` at one moment.
    pub now_jiffies: u64,
    pub now_ns: u64,
}

/// Most pids and ports a kernel-side filter holds.
pub const FILTER_MAX: usize = 8;

/// Which events the probe emits, set at load time (`--pid`, `--port`, `--family`,
/// `--cgroup`). Zero counts and zero values mean "any". Per-socket state is kept for
/// every socket whatever the filter, so owners and entry times stay right.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// AF_INET or AF_INET6; 0 for both.
    pub family: u16,
    pub nports: u16,
    pub npids: u16,
    /// Non-zero: emit only the transitions the CLOSE_WAIT/TIME_WAIT report needs
    /// (->CLOSE_WAIT, CLOSE_WAIT->, FIN_WAIT2/CLOSING->CLOSE): `watch` and `serve` do not
    /// pay for the other seven of a connection's ten transitions.
    pub lifecycle_only: u16,
    /// Local or remote port, host order.
    pub ports: [u16; FILTER_MAX],
    /// Owner tgids: the socket's owner (context or carried), else its listener's owner.
    pub pids: [u32; FILTER_MAX],
    /// cgroup v2 id (the cgroup directory's inode) of the socket; 0 for any.
    pub cgroup_id: u64,
}

/// Key of the listener map: a process listening on a port, so that sockets accepted
/// from it (whose transitions run in softirq) can be matched to a process by `--pid`.
/// The pid is part of the key: with SO_REUSEPORT several processes listen on one port,
/// each with a socket of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
    pub pid: u32,
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// How the owner named in an event was found.
pub mod owner_source {
    /// Neither the transition's context nor an earlier one names the owner.
    pub const UNKNOWN: u8 = 0;
    /// The transition runs in the owning process (connect, close, shutdown, listen).
    pub const CONTEXT: u8 = 1;
    /// Remembered for this socket from an earlier `CONTEXT` transition.
    pub const CARRIED: u8 = 2;
}

/// Transitions that run in the syscall of the process that owns the socket, so that the
/// current task *is* the owner. Every other transition runs in softirq or a timer
/// (or, on loopback, inside the peer's syscall): its current task is a bystander.
#[inline(always)]
pub const fn runs_in_owner_context(old: u8, new: u8) -> bool {
    use tcp_state::*;
    matches!(
        (old, new),
        (CLOSE, SYN_SENT) // connect()
            | (CLOSE, LISTEN) // listen()
            | (LISTEN, CLOSE) // close() of a listener
            | (ESTABLISHED, FIN_WAIT1) // close()/shutdown(): we close first
            | (SYN_RECV, FIN_WAIT1) // close() of a fast-open socket before the handshake ends
            | (CLOSE_WAIT, LAST_ACK) // close() after the peer closed
    )
}

/// Transitions that begin a socket's life: connect() or listen() from CLOSE, or a child
/// socket created by a listener. Whatever was remembered for the same address (a freed
/// socket) or 4-tuple (a timewait socket now reused) belongs to an earlier life.
#[inline(always)]
pub const fn starts_a_life(old: u8, new: u8) -> bool {
    old == tcp_state::CLOSE || (old == tcp_state::LISTEN && new == tcp_state::SYN_RECV)
}

/// FIN_WAIT2/CLOSING -> CLOSE: the socket closed first and, unless it was reset or
/// timed out, a timewait socket now stands in for it (the kernel reports no
/// ->TIME_WAIT for the full socket).
#[inline(always)]
pub const fn may_leave_timewait(old: u8, new: u8) -> bool {
    new == tcp_state::CLOSE && (old == tcp_state::FIN_WAIT2 || old == tcp_state::CLOSING)
}

/// Whether the lifecycle-only probe (`watch`, `serve`, `top`) has anything to do for a
/// transition: emit it, remember the owner its syscall names, forget a closer, or track
/// a listener. Most transitions of a connection need nothing, and return before any
/// kernel read. connect()'s owner is kept only for a `--pid` filter (`pids`,
/// `owner_needed_later`); without one its run would read the task for nothing.
#[inline(always)]
pub const fn lifecycle_needs(old: u8, new: u8, pids: bool) -> bool {
    is_lifecycle(old, new)
        || (runs_in_owner_context(old, new) && (pids || !owner_needed_later(old, new)))
        || ends_closing(old, new)
        || new == tcp_state::LISTEN
        || (old == tcp_state::LISTEN && new == tcp_state::CLOSE)
}

/// close() or shutdown() in the owner's context: the socket enters the states of the
/// side that closes first. In lifecycle-only mode the closer is remembered in a map
/// keyed by the socket (`CLOSERS`) until `ends_closing`, for the FIN_WAIT2/CLOSING ->
/// CLOSE that tells its TIME_WAIT's birth (in softirq or a timer, not the closer's).
#[inline(always)]
pub const fn begins_closing(old: u8, new: u8) -> bool {
    new == tcp_state::FIN_WAIT1 && runs_in_owner_context(old, new)
}

/// The socket leaves the states of the side that closed first: every way out of them
/// ends in CLOSE (a TIME_WAIT birth, a reset, a timeout, an abort).
#[inline(always)]
pub const fn ends_closing(old: u8, new: u8) -> bool {
    new == tcp_state::CLOSE
        && matches!(
            old,
            tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2 | tcp_state::CLOSING
        )
}

/// Whether an owner named in this transition's context is kept on the socket (socket
/// storage) in lifecycle-only mode: a client's (connect) for its later CLOSE_WAIT, and
/// only where `--pid` must match that CLOSE_WAIT in the kernel. Without `--pid` its
/// holder is found by its inode, which the event carries: no allocation per connection
/// (a third of the probe's time under churn). Closers are kept in `CLOSERS` instead.
#[inline(always)]
pub const fn owner_needed_later(old: u8, new: u8) -> bool {
    runs_in_owner_context(old, new) && new == tcp_state::SYN_SENT
}

/// The transitions the CLOSE_WAIT/TIME_WAIT report needs (`Filter::lifecycle_only`):
/// into and out of CLOSE_WAIT, and those that may leave a timewait socket.
#[inline(always)]
pub const fn is_lifecycle(old: u8, new: u8) -> bool {
    new == tcp_state::CLOSE_WAIT || old == tcp_state::CLOSE_WAIT || may_leave_timewait(old, new)
}

/// What a FIN_WAIT2/CLOSING -> CLOSE left behind, told by the probe from the socket at
/// that moment, so that userspace knows a TIME_WAIT birth without polling for it.
/// The kernel replaces the socket by a timewait socket on that transition unless it
/// was reset or timed out (both set `sk_err` first); the timewait socket waits for the
/// peer's FIN (substate FIN_WAIT2) unless that FIN already came (`SOCK_DONE`, set by
/// `tcp_fin`; `sk_shutdown` cannot tell, close() sets both of its bits). The one ending
/// it cannot tell is a full timewait table (`TcpExtTCPTimeWaitOverflow`): at the
/// namespace's cap a close is left UNKNOWN, for a poll to confirm.
pub mod timewait_birth {
    /// Not told (kernels without the fields in BTF, the classic tracepoint without
    /// BTF): a poll confirms.
    pub const UNKNOWN: u8 = 0;
    /// Reset or timed out: no timewait socket.
    pub const NONE: u8 = 1;
    /// An orphan waiting for the peer's FIN (becomes TIME_WAIT when it comes).
    pub const FIN_WAIT2: u8 = 2;
    pub const TIME_WAIT: u8 = 3;
}

/// `SOCK_DONE` in `sock.sk_flags` (`enum sock_flags`): the peer's FIN was received.
pub const SOCK_DONE: u64 = 1 << 1;

/// The `timewait_birth` of a FIN_WAIT2/CLOSING -> CLOSE from the socket's `sk_err` and
/// `sk_flags` as they were at the transition.
#[inline(always)]
pub const fn timewait_birth_of(old: u8, sk_err: i32, sk_flags: u64) -> u8 {
    if sk_err != 0 {
        timewait_birth::NONE
    } else if old == tcp_state::CLOSING || sk_flags & SOCK_DONE != 0 {
        timewait_birth::TIME_WAIT
    } else {
        timewait_birth::FIN_WAIT2
    }
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// TCP transitions the probe ran for (after filtering).
    pub const SEEN: u32 = 0;
    /// Events lost because the ring buffer was full.
    pub const DROPPED: u32 = 1;
    /// Per-socket state that could not be stored (map update failed).
    pub const SOCKET_STORE_FAILED: u32 = 2;
    /// Entries put into, and removed from, the classic tracepoint's LRU map: with the
    /// entries still there, what the LRU evicted (`SOCKET_INSERTED - SOCKET_REMOVED -
    /// live`).
    pub const SOCKET_INSERTED: u32 = 3;
    pub const SOCKET_REMOVED: u32 = 4;
    /// User stacks captured, and lost because their ring was full.
    pub const STACKS_CAPTURED: u32 = 5;
    pub const STACKS_DROPPED: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// Record layout of the classic tracepoint `sock/inet_sock_set_state` (stable since
/// Linux 4.16). Userspace checks the tracepoint's `format` file against these offsets
/// before it attaches the fallback program that reads them.
pub mod tp_record {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const SPORT: usize = 24;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const SADDR: usize = 32;
    pub const DADDR: usize = 36;
    pub const SADDR_V6: usize = 40;
    pub const DADDR_V6: usize = 56;
    /// (field name in `format`, offset) pairs that must match.
    pub const FIELDS: [(&str, usize); 11] = [
        ("skaddr", SKADDR),
        ("oldstate", OLDSTATE),
        ("newstate", NEWSTATE),
        ("sport", SPORT),
        ("dport", DPORT),
        ("family", FAMILY),
        ("protocol", PROTOCOL),
        ("saddr", SADDR),
        ("daddr", DADDR),
        ("saddr_v6", SADDR_V6),
        ("daddr_v6", DADDR_V6),
    ];
}

/// One TCP state transition, as written to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the transition.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock` (reused quickly: an id only together with time).
    pub skaddr: u64,
    /// When the socket entered `oldstate`; 0 when the probe did not see it.
    pub old_since_ns: u64,
    /// Inode of the socket's file (`socket:[N]` in /proc/PID/fd), read only for a
    /// transition into CLOSE_WAIT (the one whose holder is looked up); 0 otherwise.
    pub inode: u64,
    /// Network namespace inode number; 0 when unknown.
    pub netns: u32,
    /// Owner's tgid; 0 when `owner_source` is UNKNOWN.
    pub owner_pid: u32,
    /// tgid of the task that was current when the probe ran (may be an interrupted bystander).
    pub task_pid: u32,
    pub family: u16,
    /// Local and remote port, host byte order.
    pub sport: u16,
    pub dport: u16,
    pub oldstate: u8,
    pub newstate: u8,
    pub owner_source: u8,
    /// For FIN_WAIT2/CLOSING -> CLOSE, what the socket left behind (`timewait_birth`);
    /// 0 for every other transition.
    pub timewait: u8,
    /// 1 when the transition ran in a task that is exiting (`PF_EXITING`): its files
    /// are being closed by the kernel, not by a close() of the program's own.
    pub task_exiting: u8,
    pub _pad: u8,
    /// Local and remote address: IPv4 in the first 4 bytes, IPv6 in all 16.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub owner_comm: [u8; 16],
    /// The current task's name where the transition runs in the owner's context
    /// (`runs_in_owner_context`); zeros elsewhere (a bystander's name is not read).
    pub task_comm: [u8; 16],
}

/// Per-socket state the probe keeps between transitions, keyed by socket address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    /// When the socket entered `state`.
    pub since_ns: u64,
    /// Owner tgid; 0 while unknown.
    pub owner_pid: u32,
    /// The state entered at `since_ns` (a transition out of another state finds that
    /// `since_ns` does not time it: the probe does not store every transition).
    pub state: u8,
    pub _pad: [u8; 3],
    pub owner_comm: [u8; 16],
}

/// Byte offsets of the kernel struct fields the probe reads, resolved by userspace from
/// the running kernel's BTF (aya has no CO-RE). `u32::MAX` marks a field that could not
/// be resolved: the probe skips that read (value stays 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `sock_common.skc_family` (u16).
    pub skc_family: u32,
    /// `sock_common.skc_daddr` / `skc_rcv_saddr` (be32).
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    /// `sock_common.skc_v6_daddr` / `skc_v6_rcv_saddr` (16 bytes).
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `sock_common.skc_dport` (be16).
    pub skc_dport: u32,
    /// `inet_sock.inet_sport` (be16); `skc_num` is already 0 on ->CLOSE.
    pub inet_sport: u32,
    /// `sock.sk_protocol` (u16, not a bitfield since Linux 5.6).
    pub sk_protocol: u32,
    /// `sock_common.skc_net` -> `net.ns.inum`.
    pub skc_net: u32,
    pub net_ns_inum: u32,
    /// `sock.sk_socket` -> `socket.file` -> `file.f_inode` -> `inode.i_ino`.
    pub sk_socket: u32,
    pub socket_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    /// `sock.sk_cgrp_data.cgroup` -> `cgroup.kn` -> `kernfs_node.id` (cgroup v2 id).
    pub sk_cgroup: u32,
    pub cgroup_kn: u32,
    pub kernfs_id: u32,
    /// `sock.sk_err` (int) and `sock_common.skc_flags` (unsigned long): how a
    /// FIN_WAIT2/CLOSING -> CLOSE ended (`timewait_birth`).
    pub sk_err: u32,
    pub skc_flags: u32,
    /// `task_struct.tgid` and `inode.i_mode`: the socket-fd iterator's pid and its test
    /// for a socket file.
    pub task_tgid: u32,
    pub inode_mode: u32,
    /// `task_struct.flags`: `PF_EXITING` tells a close by exit from a close() call.
    pub task_flags: u32,
    /// `net.ipv4.tcp_death_row.tw_refcount` (1 + timewait sockets) and
    /// `.sysctl_max_tw_buckets`: a close at the namespace's timewait cap may have left
    /// no timewait socket (`TcpExtTCPTimeWaitOverflow`), so its birth is not told.
    pub net_tw_refcount: u32,
    pub net_max_tw_buckets: u32,
    /// `task_struct.files` -> `files_struct.fdt` -> `fdtable.{max_fds, fd}`: the file
    /// behind an fd a syscall returned or was given (stack capture).
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    /// `file.private_data` (a socket file's `struct socket`) -> `socket.sk`.
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// `pt_regs.{ip, sp, bp}`: the user registers at a syscall, for unwinding.
    pub pt_regs_ip: u32,
    pub pt_regs_sp: u32,
    pub pt_regs_bp: u32,
    /// `sock_common.skc_num` (local port, host order) and `.skc_state`: the iterator
    /// reads them for every kind of socket (full, timewait, request).
    pub skc_num: u32,
    pub skc_state: u32,
    /// `tcp_sock.{rcv_nxt, copied_seq}` (the unread bytes),
    /// `.{lsndtime, rcv_tstamp}`, `inet_connection_sock.icsk_ack.lrcvtime` (ages) and
    /// `.bytes_received`: what the seed took from `tcp_info`.
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    pub tcp_lsndtime: u32,
    pub tcp_rcv_tstamp: u32,
    pub icsk_lrcvtime: u32,
    pub tcp_bytes_received: u32,
    /// `inet_timewait_sock.tw_substate` and `.tw_timer.expires`.
    pub tw_substate: u32,
    pub tw_expires: u32,
    /// `socket_alloc.vfs_inode`: a socket's inode sits beside its `struct socket`
    /// (`SOCK_INODE`), one read from the socket instead of a walk through its file.
    pub socket_alloc_inode: u32,
    pub _pad: u32,
}

impl Offsets {
    pub const UNRESOLVED: u32 = u32::MAX;
    pub const fn unresolved() -> Self {
        let u = Self::UNRESOLVED;
        Self {
            skc_family: u,
            skc_daddr: u,
            skc_rcv_saddr: u,
            skc_v6_daddr: u,
            skc_v6_rcv_saddr: u,
            skc_dport: u,
            inet_sport: u,
            sk_protocol: u,
            skc_net: u,
            net_ns_inum: u,
            sk_socket: u,
            socket_file: u,
            file_inode: u,
            inode_ino: u,
            sk_cgroup: u,
            cgroup_kn: u,
            kernfs_id: u,
            sk_err: u,
            skc_flags: u,
            task_tgid: u,
            inode_mode: u,
            task_flags: u,
            net_tw_refcount: u,
            net_max_tw_buckets: u,
            task_files: u,
            files_fdt: u,
            fdtable_max_fds: u,
            fdtable_fd: u,
            file_private_data: u,
            socket_sk: u,
            pt_regs_ip: u,
            pt_regs_sp: u,
            pt_regs_bp: u,
            skc_num: u,
            skc_state: u,
            tcp_rcv_nxt: u,
            tcp_copied_seq: u,
            tcp_lsndtime: u,
            tcp_rcv_tstamp: u,
            icsk_lrcvtime: u,
            tcp_bytes_received: u,
            tw_substate: u,
            tw_expires: u,
            socket_alloc_inode: u,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (each): plain-old-data, `#[repr(C)]`, integers and integer arrays only with
    // explicit padding (sizes asserted below), so every bit pattern is a valid value.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SockState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Offsets {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Filter {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ListenKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SocketFd {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::StackRecord {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::TcpSocket {}
}

// The wire layout is fixed: a change here must be a deliberate one on both sides.
const _: () = assert!(core::mem::size_of::<Event>() == 120);
const _: () = assert!(core::mem::size_of::<SockState>() == 32);
const _: () = assert!(core::mem::size_of::<Offsets>() == 45 * 4);
const _: () = assert!(core::mem::size_of::<StackRecord>() == 64 + STACK_FRAMES * 8 + STACK_COPY);
const _: () = assert!(core::mem::size_of::<Filter>() == 8 + 16 + 32 + 8);
const _: () = assert!(core::mem::size_of::<ListenKey>() == 12);
const _: () = assert!(core::mem::size_of::<SocketFd>() == 16);
const _: () = assert!(core::mem::size_of::<TcpSocket>() == 104);
