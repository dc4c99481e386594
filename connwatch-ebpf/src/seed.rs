//! The start-up seed's view of the sockets that already exist: an `iter/tcp` program
//! writes one fixed-size `TcpSocket` record per TCP socket of the namespace the
//! iterator was opened in. A sock_diag dump builds netlink attributes for every socket
//! and, to tell the CLOSE_WAIT sockets' ages, a `tcp_info` (which locks each socket);
//! here the few fields the seed reads are plain loads.
use aya_ebpf::helpers::{
    bpf_ktime_get_ns,
    generated::{bpf_jiffies64, bpf_seq_write, bpf_skc_to_tcp_sock, bpf_skc_to_tcp_timewait_sock},
};
use core::mem::MaybeUninit;

use connwatch_common::{TcpSocket, tcp_socket_kind, tcp_state};

use crate::{Direct, IterMeta, Kernel as _, addresses, inode_of, words};

// `words::zero` and `addresses` write the record eight bytes at a time.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(align_of::<TcpSocket>() == 8 && size_of::<TcpSocket>() % 8 == 0);
    assert!(offset_of!(TcpSocket, saddr) % 8 == 0 && offset_of!(TcpSocket, daddr) % 8 == 0);
};

/// `struct bpf_iter__tcp`: each member aligned to 8 bytes.
#[repr(C)]
pub struct TcpIterCtx {
    meta: *const IterMeta,
    sk_common: *const u8,
    uid: u32,
    _pad: u32,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn connwatch_tcp_sockets(ctx: *const TcpIterCtx) -> i32 {
    // SAFETY: the context is the iterator's `bpf_iter__tcp`, read directly so that the
    // verifier types `meta->seq` and `sk_common` (null-checked); every field behind
    // them is a plain load at an offset from BTF (see `Direct`).
    unsafe {
        let meta = (*ctx).meta;
        let seq = (*meta).seq;
        let mut slot = MaybeUninit::<TcpSocket>::uninit();
        // Zeroed eight bytes at a time: `TcpSocket::default()` is a `memset` call, a
        // byte loop in BPF (~400 instructions a socket).
        words::zero(slot.as_mut_ptr());
        let rec = slot.assume_init_mut();
        if (*meta).seq_num == 0 {
            rec.kind = tcp_socket_kind::HEADER;
            rec.now_jiffies = bpf_jiffies64();
            rec.now_ns = bpf_ktime_get_ns();
            write(seq, rec);
            // Volatile: two plain stores of 0 side by side become a `memset` call.
            core::ptr::write_volatile(&raw mut rec.now_jiffies, 0);
            core::ptr::write_volatile(&raw mut rec.now_ns, 0);
        }
        let sk = (*ctx).sk_common;
        if sk.is_null() {
            return 0;
        }
        rec.kind = tcp_socket_kind::FULL;
        rec.uid = (*ctx).uid;
        if !common(sk, rec) {
            return 0;
        }
        if rec.state == tcp_state::NEW_SYN_RECV {
            rec.kind = tcp_socket_kind::REQUEST;
        } else if rec.state == tcp_state::TIME_WAIT {
            let tw = bpf_skc_to_tcp_timewait_sock(sk.cast_mut().cast()) as *const u8;
            if tw.is_null() {
                return 0;
            }
            rec.kind = tcp_socket_kind::TIMEWAIT;
            rec.state = Direct::read::<u8>(tw, off!(tw_substate)).unwrap_or(tcp_state::TIME_WAIT);
            let expires = Direct::read::<u64>(tw, off!(tw_expires)).unwrap_or(0);
            // As sock_diag: what is left of the timer, 0 once due.
            let left = expires.wrapping_sub(bpf_jiffies64()) as i64;
            rec.expires = left.clamp(0, i64::from(u32::MAX)) as u32;
        } else {
            let tcp = bpf_skc_to_tcp_sock(sk.cast_mut().cast()) as *const u8;
            if tcp.is_null() {
                return 0;
            }
            full(tcp, rec);
        }
        write(seq, rec);
    }
    0
}

/// The fields every kind of socket has in its `sock_common`: state, family, ports and
/// addresses. False for a family other than IPv4 and IPv6.
///
/// # Safety
/// `sk` must be the iterator's typed, non-null `sock_common` pointer.
#[inline(always)]
unsafe fn common(sk: *const u8, rec: &mut TcpSocket) -> bool {
    // SAFETY: plain loads the verifier checks against `sock_common` (see `Direct`).
    unsafe {
        rec.state = Direct::read::<u8>(sk, off!(skc_state)).unwrap_or(0);
        rec.family = Direct::read::<u16>(sk, off!(skc_family)).unwrap_or(0);
        rec.sport = Direct::read::<u16>(sk, off!(skc_num)).unwrap_or(0);
        rec.dport = u16::from_be(Direct::read::<u16>(sk, off!(skc_dport)).unwrap_or(0));
        addresses(sk, rec.family, &mut rec.saddr, &mut rec.daddr)
    }
}

/// A full socket's inode, and for the states whose evidence the reports read
/// (CLOSE_WAIT, FIN_WAIT2) its unread bytes and its ages as `tcp_info` computes them, in
/// jiffies: each is a cache line more of a cold socket, read only where it is used.
///
/// # Safety
/// `tcp` must be a typed `tcp_sock` pointer (see `Direct`).
#[inline(always)]
unsafe fn full(tcp: *const u8, rec: &mut TcpSocket) {
    // SAFETY: plain loads the verifier checks against `tcp_sock` (see `Direct`).
    unsafe {
        rec.inode = inode_of::<Direct>(tcp);
        if !has_ages(rec.state) {
            return;
        }
        rec.kind = tcp_socket_kind::FULL_AGED;
        let u32_at = |off: u32| Direct::read::<u32>(tcp, off).unwrap_or(0);
        rec.recv_q = u32_at(off!(tcp_rcv_nxt)).wrapping_sub(u32_at(off!(tcp_copied_seq)));
        let now = bpf_jiffies64() as u32;
        rec.since_sent = now.wrapping_sub(u32_at(off!(tcp_lsndtime)));
        rec.since_recv = now.wrapping_sub(u32_at(off!(icsk_lrcvtime)));
        rec.since_ack = now.wrapping_sub(u32_at(off!(tcp_rcv_tstamp)));
        rec.bytes_received = Direct::read::<u64>(tcp, off!(tcp_bytes_received)).unwrap_or(0);
    }
}

/// The states whose ages and bytes received the seed reads (`tcp_socket_kind::FULL_AGED`).
#[inline(always)]
fn has_ages(state: u8) -> bool {
    state == tcp_state::CLOSE_WAIT || state == tcp_state::FIN_WAIT2
}

/// Appends a record to the iterator's output.
///
/// # Safety
/// `seq` must be the iterator's seq_file.
#[inline(always)]
unsafe fn write(seq: *mut core::ffi::c_void, rec: &TcpSocket) {
    // SAFETY: the helper copies `size_of::<TcpSocket>()` bytes from our record.
    unsafe {
        bpf_seq_write(
            seq.cast(),
            core::ptr::from_ref(rec).cast(),
            core::mem::size_of::<TcpSocket>() as u32,
        );
    }
}
