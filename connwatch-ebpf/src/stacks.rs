//! User stacks at the moments that name the code behind a leaked socket: where it was
//! made (connect, accept) and where its process read the peer's EOF and went on without
//! closing it. Off the common path: all of it runs on syscall tracepoints, attached only
//! while userspace wants some process (`STACK_PIDS`, or every process); the state
//! probe is not touched, so the cost of a transition does not change.
//!
//! A record holds the kernel's frame-pointer walk (`bpf_get_stack`), the user registers
//! at the syscall and a copy of the top of the user stack: a frame-pointer walk skips
//! the caller of a syscall wrapper that keeps no frame (glibc's `read`, `accept`), and
//! knows nothing of code built without frame pointers; userspace unwinds the copy with
//! the binaries' unwind tables and joins the walk where it agrees.
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_task, bpf_get_current_task_btf, bpf_get_stack, bpf_probe_read_user,
            bpf_task_pt_regs,
        },
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::TracePointContext,
};
use connwatch_common::{
    IPPROTO_TCP, STACK_COPY, STACK_FRAMES, StackRecord, counter, stack_at, stack_mode,
};

use crate::{Copied, Kernel as _, S_IFMT, S_IFSOCK, bump};

/// Captured stacks, for userspace to unwind and symbolize. Apart from the events so
/// that a burst of stacks can never crowd out a transition.
#[map]
static STACKS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Processes (tgid) whose stacks are wanted, when `STACK_CTL[0]` is `LISTED`.
#[map]
static STACK_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// `STACK_CTL[0]`: `stack_mode`. Written by userspace while the probe runs.
#[map]
static STACK_CTL: Array<u32> = Array::with_max_entries(1, 0);

/// The fd a wanted thread passed to read()/recvfrom(), until the syscall returns
/// (whose exit record holds only the result). LRU: a thread that dies inside the
/// syscall cannot leak its entry.
#[map]
static READ_FDS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4096, 0);

/// Whether stacks are wanted for this process.
#[inline(always)]
fn wanted(tgid: u32) -> bool {
    match STACK_CTL.get(0).copied().unwrap_or(stack_mode::OFF) {
        stack_mode::OFF => false,
        stack_mode::ALL => true,
        // SAFETY: a map value pointer, only tested for presence.
        _ => unsafe { STACK_PIDS.get(&tgid).is_some() },
    }
}

/// Captures the current task's user stack for the socket `inode` (`at`: `stack_at`).
/// `ctx` is the running program's context, which `bpf_get_stack` takes.
#[inline(never)]
fn capture(ctx: *mut core::ffi::c_void, at: u8, inode: u64) {
    let Some(mut entry) = STACKS.reserve::<StackRecord>(0) else {
        bump(counter::STACKS_DROPPED);
        return;
    };
    let r = entry.as_mut_ptr();
    let id = bpf_get_current_pid_tgid();
    // SAFETY: `r` is the reserved slot, ours until submitted; the helpers write within
    // the sizes given, which are those of the slot's fields.
    unsafe {
        (*r).ts_ns = bpf_ktime_get_ns();
        (*r).inode = inode;
        (*r).pid = (id >> 32) as u32;
        (*r).tid = id as u32;
        (*r).at = at;
        (*r)._pad = [0; 3];
        (*r)._pad2 = 0;
        let n = bpf_get_stack(
            ctx,
            (&raw mut (*r).frames).cast(),
            (STACK_FRAMES * 8) as u32,
            u64::from(BPF_F_USER_STACK),
        );
        (*r).nframes = if n > 0 { (n / 8) as u32 } else { 0 };
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let ip = Copied::read::<u64>(regs, off!(pt_regs_ip)).unwrap_or(0);
        let sp = Copied::read::<u64>(regs, off!(pt_regs_sp)).unwrap_or(0);
        let bp = Copied::read::<u64>(regs, off!(pt_regs_bp)).unwrap_or(0);
        (*r).ip = ip;
        (*r).sp = sp;
        (*r).bp = bp;
        (*r).stack_len = 0;
        if sp != 0 {
            let dst = (&raw mut (*r).stack).cast::<core::ffi::c_void>();
            let src = sp as *const core::ffi::c_void;
            // The whole copy fails where the stack ends within it (a main thread near
            // its top): then what is left of the stack pointer's page and the next one,
            // then of its page alone (always mapped).
            if bpf_probe_read_user(dst, STACK_COPY as u32, src) == 0 {
                (*r).stack_len = STACK_COPY as u32;
            } else {
                let in_page = 4096 - (sp & 4095) as u32;
                for len in [in_page + 4096, in_page] {
                    // Bounded for the verifier: below the field's size.
                    let len = len & (STACK_COPY as u32 - 1);
                    if len != 0 && bpf_probe_read_user(dst, len, src) == 0 {
                        (*r).stack_len = len;
                        break;
                    }
                }
            }
        }
    }
    bump(counter::STACKS_CAPTURED);
    entry.submit(0);
}

/// The inode of the TCP socket behind the current task's `fd` (0 for anything else).
#[inline(always)]
fn tcp_inode_of_fd(fd: u32) -> u64 {
    // SAFETY: every read goes through bpf_probe_read_kernel, which fails cleanly; `add`
    // only computes addresses.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files = Copied::read::<u64>(task, off!(task_files)).unwrap_or(0) as *const u8;
        let fdt = Copied::read::<u64>(files, off!(files_fdt)).unwrap_or(0) as *const u8;
        let max = Copied::read::<u32>(fdt, off!(fdtable_max_fds)).unwrap_or(0);
        if fd >= max {
            return 0;
        }
        let table = Copied::read::<u64>(fdt, off!(fdtable_fd)).unwrap_or(0) as *const u8;
        let file = Copied::read::<u64>(table, fd.wrapping_mul(8)).unwrap_or(0) as *const u8;
        let inode = Copied::read::<u64>(file, off!(file_inode)).unwrap_or(0) as *const u8;
        let mode = Copied::read::<u16>(inode, off!(inode_mode)).unwrap_or(0);
        if mode & S_IFMT != S_IFSOCK {
            return 0;
        }
        let sock = Copied::read::<u64>(file, off!(file_private_data)).unwrap_or(0) as *const u8;
        let sk = Copied::read::<u64>(sock, off!(socket_sk)).unwrap_or(0) as *const u8;
        if Copied::read::<u16>(sk, off!(sk_protocol)) != Some(IPPROTO_TCP) {
            return 0;
        }
        Copied::read::<u64>(inode, off!(inode_ino)).unwrap_or(0)
    }
}

/// Offsets in a syscall tracepoint's record: the first argument of `sys_enter_*`, the
/// result of `sys_exit_*` (after the common header and the syscall number).
const SYSCALL_ARG0: usize = 16;
const SYSCALL_RET: usize = 16;

/// `sys_enter_read`, `sys_enter_recvfrom`: remembers the fd of a wanted thread.
#[tracepoint]
pub fn connwatch_fd_enter(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if !wanted((id >> 32) as u32) {
        return 0;
    }
    // SAFETY: a bounds-checked read of the record (the verifier checks the context).
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(SYSCALL_ARG0) }) else {
        return 0;
    };
    let _ = READ_FDS.insert(&id, &(fd as u32), 0);
    0
}

/// `sys_exit_read`, `sys_exit_recvfrom`: a read that returned 0 on a TCP socket is its
/// process learning of the peer's FIN.
#[tracepoint]
pub fn connwatch_eof_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a map value pointer, copied out at once.
    let Some(fd) = (unsafe { READ_FDS.get(&id) }).copied() else {
        return 0;
    };
    let _ = READ_FDS.remove(&id);
    // SAFETY: as in `connwatch_fd_enter`.
    if unsafe { ctx.read_at::<i64>(SYSCALL_RET) } != Ok(0) {
        return 0;
    }
    capture_fd(&ctx, stack_at::EOF, fd);
    0
}

/// Captures the stack for the TCP socket behind `fd`, if it is one.
#[inline(always)]
fn capture_fd(ctx: &TracePointContext, at: u8, fd: u32) {
    let inode = tcp_inode_of_fd(fd);
    if inode != 0 {
        capture(ctx.as_ptr(), at, inode);
    }
}

/// `sys_enter_connect`: the socket's fd is the first argument; the stack is the one the
/// CLOSE -> SYN_SENT transition runs under, in the same syscall.
#[tracepoint]
pub fn connwatch_connect_enter(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if !wanted((id >> 32) as u32) {
        return 0;
    }
    // SAFETY: as in `connwatch_fd_enter`.
    if let Ok(fd) = unsafe { ctx.read_at::<u64>(SYSCALL_ARG0) } {
        capture_fd(&ctx, stack_at::CONNECT, fd as u32);
    }
    0
}

/// `sys_exit_accept`, `sys_exit_accept4`: the accepted socket's fd is the result.
#[tracepoint]
pub fn connwatch_accept_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if !wanted((id >> 32) as u32) {
        return 0;
    }
    // SAFETY: as in `connwatch_fd_enter`.
    let Ok(fd) = (unsafe { ctx.read_at::<i64>(SYSCALL_RET) }) else {
        return 0;
    };
    if fd < 0 {
        return 0;
    }
    capture_fd(&ctx, stack_at::ACCEPT, fd as u32);
    0
}
