//! Turns the probe's raw ring-buffer records into typed transitions.
//!
//! The bytes come from the kernel but are still treated as untrusted: a short record is an
//! error, an unknown state number is a value to show (`STATE_<n>`), never a panic.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use compact_str::CompactString;
use connwatch_common::{AF_INET, AF_INET6, Event, owner_source, tcp_state, timewait_birth};

/// A TCP state number with the kernel's name for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpState(pub u8);

impl TcpState {
    pub const CLOSE_WAIT: Self = Self(tcp_state::CLOSE_WAIT);
    pub const LISTEN: Self = Self(tcp_state::LISTEN);
    pub const FIN_WAIT2: Self = Self(tcp_state::FIN_WAIT2);
    pub const TIME_WAIT: Self = Self(tcp_state::TIME_WAIT);
    pub const CLOSE: Self = Self(tcp_state::CLOSE);
    pub const CLOSING: Self = Self(tcp_state::CLOSING);
    pub const LAST_ACK: Self = Self(tcp_state::LAST_ACK);
    pub const SYN_RECV: Self = Self(tcp_state::SYN_RECV);

    /// The kernel's spelling (`include/trace/events/sock.h`), `None` for unknown numbers.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            tcp_state::ESTABLISHED => "ESTABLISHED",
            tcp_state::SYN_SENT => "SYN_SENT",
            tcp_state::SYN_RECV => "SYN_RECV",
            tcp_state::FIN_WAIT1 => "FIN_WAIT1",
            tcp_state::FIN_WAIT2 => "FIN_WAIT2",
            tcp_state::TIME_WAIT => "TIME_WAIT",
            tcp_state::CLOSE => "CLOSE",
            tcp_state::CLOSE_WAIT => "CLOSE_WAIT",
            tcp_state::LAST_ACK => "LAST_ACK",
            tcp_state::LISTEN => "LISTEN",
            tcp_state::CLOSING => "CLOSING",
            tcp_state::NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => return None,
        })
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.pad(name),
            None => f.pad(&format!("STATE_{}", self.0)),
        }
    }
}

/// How the owner of a socket was found. Carried from where it is made to every view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OwnerSource {
    /// The transition ran in the owner's own syscall.
    Context,
    /// Remembered from an earlier `Context` transition of the same socket.
    Carried,
    /// Nobody is known: pid and comm are left empty rather than guessed.
    Unknown,
    /// Holds the socket's file descriptor (found in /proc/PID/fd).
    Fd,
    /// Listens on the socket's local port: the likely owner of a TIME_WAIT socket that
    /// existed before connwatch started (a server that closed first).
    Listener,
}

impl OwnerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Context => "context",
            Self::Carried => "carried",
            Self::Unknown => "unknown",
            Self::Fd => "fd",
            Self::Listener => "listener",
        }
    }
}

/// The process a transition is attributed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: Option<u32>,
    pub comm: Option<CompactString>,
    pub source: OwnerSource,
}

/// One decoded TCP state transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub skaddr: u64,
    /// When the socket entered `old`; `None` when the probe did not see that.
    pub old_since_ns: Option<u64>,
    pub inode: u64,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub old: TcpState,
    pub new: TcpState,
    pub owner: Owner,
    /// The task that was running when the probe fired (not necessarily the owner).
    pub task_pid: u32,
    pub task_comm: CompactString,
    /// For FIN_WAIT2/CLOSING -> CLOSE, what the socket left behind as the probe told.
    pub leaves: Leaves,
    /// The transition ran in a task that is exiting: the kernel closing its files, not a
    /// close() of the program (told for CLOSE_WAIT -> LAST_ACK).
    pub exiting: bool,
}

/// What a FIN_WAIT2/CLOSING -> CLOSE left behind (`connwatch_common::timewait_birth`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Leaves {
    /// Not told (every other transition, or a kernel without the fields): a poll
    /// confirms whether a timewait socket stands in for the socket.
    #[default]
    Unknown,
    /// Reset or timed out: no timewait socket.
    Nothing,
    /// A timewait socket in this substate (TIME_WAIT, or FIN_WAIT2 for an orphan
    /// still waiting for the peer's FIN).
    Timewait(TcpState),
}

impl Leaves {
    pub fn from_wire(byte: u8) -> Self {
        match byte {
            timewait_birth::NONE => Self::Nothing,
            timewait_birth::FIN_WAIT2 => Self::Timewait(TcpState::FIN_WAIT2),
            timewait_birth::TIME_WAIT => Self::Timewait(TcpState::TIME_WAIT),
            _ => Self::Unknown,
        }
    }
}

impl Transition {
    /// connect()/listen() from CLOSE, or a listener's child: see
    /// [`connwatch_common::starts_a_life`].
    pub fn starts_a_life(&self) -> bool {
        connwatch_common::starts_a_life(self.old.0, self.new.0)
    }

    /// FIN_WAIT2/CLOSING -> CLOSE: see [`connwatch_common::may_leave_timewait`].
    pub fn may_leave_timewait(&self) -> bool {
        connwatch_common::may_leave_timewait(self.old.0, self.new.0)
    }

    /// Time spent in `old`, when its start was seen.
    pub fn duration_ns(&self) -> Option<u64> {
        self.old_since_ns
            .map(|since| self.ts_ns.saturating_sub(since))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Short { len: usize },
    Family(u16),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short { len } => write!(
                f,
                "event record of {len} bytes, expected {}",
                size_of::<Event>()
            ),
            Self::Family(family) => write!(f, "event with unknown address family {family}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Transition, DecodeError> {
    if bytes.len() < size_of::<Event>() {
        return Err(DecodeError::Short { len: bytes.len() });
    }
    // SAFETY: length checked above; `Event` is plain data valid for any bit pattern, and
    // `read_unaligned` makes no alignment assumption about the ring buffer's memory.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    from_event(&ev)
}

pub fn from_event(ev: &Event) -> Result<Transition, DecodeError> {
    let (local, remote) = match ev.family {
        AF_INET => (ipv4(&ev.saddr), ipv4(&ev.daddr)),
        AF_INET6 => (
            IpAddr::V6(Ipv6Addr::from(ev.saddr)),
            IpAddr::V6(Ipv6Addr::from(ev.daddr)),
        ),
        other => return Err(DecodeError::Family(other)),
    };
    let source = match ev.owner_source {
        owner_source::CONTEXT => OwnerSource::Context,
        owner_source::CARRIED => OwnerSource::Carried,
        _ => OwnerSource::Unknown,
    };
    let owner = match source {
        OwnerSource::Unknown => Owner {
            pid: None,
            comm: None,
            source,
        },
        _ => Owner {
            pid: Some(ev.owner_pid),
            comm: Some(comm(&ev.owner_comm)),
            source,
        },
    };
    Ok(Transition {
        ts_ns: ev.ts_ns,
        skaddr: ev.skaddr,
        old_since_ns: (ev.old_since_ns != 0).then_some(ev.old_since_ns),
        inode: ev.inode,
        netns: ev.netns,
        local: SocketAddr::new(local, ev.sport),
        remote: SocketAddr::new(remote, ev.dport),
        old: TcpState(ev.oldstate),
        new: TcpState(ev.newstate),
        owner,
        task_pid: ev.task_pid,
        task_comm: comm(&ev.task_comm),
        leaves: if connwatch_common::may_leave_timewait(ev.oldstate, ev.newstate) {
            Leaves::from_wire(ev.timewait)
        } else {
            Leaves::Unknown
        },
        exiting: ev.task_exiting != 0,
    })
}

fn ipv4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

/// A task's comm: NUL-terminated, at most 16 bytes, not necessarily UTF-8. Kept inline
/// (no allocation) however many events are decoded.
pub fn comm(bytes: &[u8; 16]) -> CompactString {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let name = bytes.get(..end).unwrap_or(bytes);
    // Almost every comm is ASCII: the fast path copies it inline.
    match std::str::from_utf8(name) {
        Ok(s) => CompactString::new(s),
        Err(_) => CompactString::from_utf8_lossy(name),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn event_bytes(ev: &Event) -> Vec<u8> {
        // SAFETY: `Event` is `#[repr(C)]` plain data without implicit padding.
        unsafe {
            std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), size_of::<Event>())
                .to_vec()
        }
    }

    fn comm16(s: &str) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..s.len()].copy_from_slice(s.as_bytes());
        out
    }

    pub fn v4_event(old: u8, new: u8) -> Event {
        let mut ev = Event {
            ts_ns: 5_000_000_000,
            skaddr: 0xffff_8880_1234_5678,
            old_since_ns: 4_000_000_000,
            inode: 4242,
            netns: 4026531840,
            owner_pid: 1234,
            task_pid: 99,
            family: AF_INET,
            sport: 43210,
            dport: 8080,
            oldstate: old,
            newstate: new,
            owner_source: owner_source::CONTEXT,
            owner_comm: comm16("curl"),
            task_comm: comm16("swapper/0"),
            ..Event::default()
        };
        ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        ev
    }

    #[test]
    fn decodes_ipv4_record() {
        let bytes = event_bytes(&v4_event(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1));
        let t = decode(&bytes).unwrap();
        assert_eq!(t.local, "127.0.0.1:43210".parse().unwrap());
        assert_eq!(t.remote, "10.1.2.3:8080".parse().unwrap());
        assert_eq!(t.old, TcpState(tcp_state::ESTABLISHED));
        assert_eq!(t.new, TcpState(tcp_state::FIN_WAIT1));
        assert_eq!(t.duration_ns(), Some(1_000_000_000));
        assert_eq!(t.owner.pid, Some(1234));
        assert_eq!(t.owner.comm.as_deref(), Some("curl"));
        assert_eq!(t.owner.source, OwnerSource::Context);
        assert_eq!(t.task_comm, "swapper/0");
        assert_eq!(t.netns, 4026531840);
        assert_eq!(t.inode, 4242);
    }

    #[test]
    fn decodes_unaligned_record() {
        let mut bytes = vec![0u8];
        bytes.extend(event_bytes(&v4_event(1, 4)));
        assert!(decode(&bytes[1..]).is_ok());
    }

    #[test]
    fn decodes_ipv6_record() {
        let mut ev = v4_event(tcp_state::SYN_SENT, tcp_state::ESTABLISHED);
        ev.family = AF_INET6;
        ev.saddr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        ev.daddr = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        let t = decode(&event_bytes(&ev)).unwrap();
        assert_eq!(t.local, "[::1]:43210".parse().unwrap());
        assert_eq!(t.remote, "[2001:db8::7]:8080".parse().unwrap());
        assert!(t.local.is_ipv6());
    }

    #[test]
    fn short_record_is_an_error() {
        let bytes = event_bytes(&v4_event(1, 4));
        assert_eq!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Short {
                len: bytes.len() - 1
            })
        );
        assert_eq!(decode(&[]), Err(DecodeError::Short { len: 0 }));
    }

    #[test]
    fn unknown_family_is_an_error() {
        let mut ev = v4_event(1, 4);
        ev.family = 1;
        assert_eq!(decode(&event_bytes(&ev)), Err(DecodeError::Family(1)));
    }

    #[test]
    fn unknown_state_is_shown_by_number() {
        let t = decode(&event_bytes(&v4_event(200, 13))).unwrap();
        assert_eq!(t.old.to_string(), "STATE_200");
        assert_eq!(t.new.to_string(), "STATE_13");
        assert_eq!(TcpState(tcp_state::CLOSE_WAIT).to_string(), "CLOSE_WAIT");
    }

    #[test]
    fn unknown_owner_has_no_pid_or_comm() {
        let mut ev = v4_event(tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT);
        ev.owner_source = owner_source::UNKNOWN;
        ev.owner_pid = 0;
        let t = decode(&event_bytes(&ev)).unwrap();
        assert_eq!(
            t.owner,
            Owner {
                pid: None,
                comm: None,
                source: OwnerSource::Unknown
            }
        );
        // The bystander task is kept apart, never promoted to owner.
        assert_eq!(t.task_pid, 99);
    }

    #[test]
    fn unseen_entry_has_no_duration() {
        let mut ev = v4_event(tcp_state::CLOSE, tcp_state::SYN_SENT);
        ev.old_since_ns = 0;
        assert_eq!(decode(&event_bytes(&ev)).unwrap().duration_ns(), None);
    }

    #[test]
    fn comm_stops_at_nul_and_tolerates_bad_utf8() {
        let mut raw = [0u8; 16];
        raw[..3].copy_from_slice(&[b'a', 0xff, b'b']);
        assert_eq!(comm(&raw), "a\u{fffd}b");
        assert_eq!(comm(&[b'x'; 16]), "x".repeat(16));
    }

    #[test]
    fn owner_context_rules() {
        use connwatch_common::runs_in_owner_context as ctx;
        use tcp_state::*;
        // Syscalls of the owning process.
        assert!(ctx(CLOSE, SYN_SENT));
        assert!(ctx(ESTABLISHED, FIN_WAIT1));
        assert!(ctx(CLOSE_WAIT, LAST_ACK));
        assert!(ctx(CLOSE, LISTEN));
        // Softirq/timer transitions: the current task is a bystander.
        for (old, new) in [
            (LISTEN, SYN_RECV),
            (SYN_RECV, ESTABLISHED),
            (SYN_SENT, ESTABLISHED),
            (ESTABLISHED, CLOSE_WAIT),
            (FIN_WAIT1, FIN_WAIT2),
            (FIN_WAIT2, CLOSE),
            (LAST_ACK, CLOSE),
            (ESTABLISHED, CLOSE),
            (SYN_SENT, CLOSE),
        ] {
            assert!(
                !ctx(old, new),
                "{old}->{new} must not be attributed to the current task"
            );
        }
    }

    #[test]
    fn life_and_lifecycle_rules() {
        use connwatch_common::{is_lifecycle, may_leave_timewait, starts_a_life};
        use tcp_state::*;
        assert!(starts_a_life(CLOSE, SYN_SENT));
        assert!(starts_a_life(CLOSE, LISTEN));
        assert!(starts_a_life(LISTEN, SYN_RECV));
        assert!(!starts_a_life(LISTEN, CLOSE));
        assert!(!starts_a_life(SYN_SENT, ESTABLISHED));

        assert!(may_leave_timewait(FIN_WAIT2, CLOSE));
        assert!(may_leave_timewait(CLOSING, CLOSE));
        assert!(!may_leave_timewait(LAST_ACK, CLOSE));
        assert!(!may_leave_timewait(FIN_WAIT1, FIN_WAIT2));

        // `watch` needs 3 of a connection's transitions; the other 7 are not emitted.
        let needed: [(u8, u8); 4] = [
            (ESTABLISHED, CLOSE_WAIT),
            (CLOSE_WAIT, LAST_ACK),
            (FIN_WAIT2, CLOSE),
            (CLOSING, CLOSE),
        ];
        for (old, new) in needed {
            assert!(is_lifecycle(old, new), "{old}->{new}");
        }
        for (old, new) in [
            (CLOSE, SYN_SENT),
            (SYN_SENT, ESTABLISHED),
            (ESTABLISHED, FIN_WAIT1),
            (FIN_WAIT1, FIN_WAIT2),
            (LAST_ACK, CLOSE),
            (CLOSE, LISTEN),
            (LISTEN, SYN_RECV),
        ] {
            assert!(!is_lifecycle(old, new), "{old}->{new}");
        }
    }

    #[test]
    fn closers_are_kept_from_close_to_close() {
        use connwatch_common::{begins_closing, ends_closing, lifecycle_needs};
        use tcp_state::*;
        // close()/shutdown() in the owner's context begins it; FIN_WAIT1 reached any
        // other way names no closer.
        assert!(begins_closing(ESTABLISHED, FIN_WAIT1));
        assert!(begins_closing(SYN_RECV, FIN_WAIT1));
        assert!(!begins_closing(FIN_WAIT1, FIN_WAIT2));
        // Every way out of the closing states ends it, and lifecycle mode runs for each
        // (a FIN_WAIT1 -> CLOSE is emitted by no view, but must let its closer go).
        for old in [FIN_WAIT1, FIN_WAIT2, CLOSING] {
            assert!(ends_closing(old, CLOSE), "{old}->CLOSE");
            assert!(lifecycle_needs(old, CLOSE, false), "{old}->CLOSE");
        }
        for (old, new) in [
            (LAST_ACK, CLOSE),
            (ESTABLISHED, CLOSE),
            (FIN_WAIT1, FIN_WAIT2),
            (FIN_WAIT1, CLOSING),
        ] {
            assert!(!ends_closing(old, new), "{old}->{new}");
        }
    }

    #[test]
    fn connects_owner_is_read_only_for_a_pid_filter() {
        use connwatch_common::lifecycle_needs;
        use tcp_state::*;
        // Without `--pid`, a client's CLOSE_WAIT finds its holder by its inode: the
        // connect() run has nothing to keep.
        assert!(!lifecycle_needs(CLOSE, SYN_SENT, false));
        assert!(lifecycle_needs(CLOSE, SYN_SENT, true));
        // The other syscalls' transitions are needed either way: listeners, closers,
        // and the close() of a CLOSE_WAIT.
        for (old, new) in [
            (CLOSE, LISTEN),
            (LISTEN, CLOSE),
            (ESTABLISHED, FIN_WAIT1),
            (SYN_RECV, FIN_WAIT1),
            (CLOSE_WAIT, LAST_ACK),
        ] {
            assert!(lifecycle_needs(old, new, false), "{old}->{new}");
        }
    }

    #[test]
    fn timewait_birth_from_the_socket_at_close() {
        use connwatch_common::timewait_birth_of;
        const ECONNRESET: i32 = 104;
        const ETIMEDOUT: i32 = 110;
        const SOCK_DONE: u64 = connwatch_common::SOCK_DONE;
        // SOCK_DEAD (an orphan) and SOCK_KEEPOPEN: other flags tell nothing.
        const OTHERS: u64 = 1 | 1 << 3;
        let leaves = |old, err, flags| Leaves::from_wire(timewait_birth_of(old, err, flags));
        let (fw2, tw) = (
            Leaves::Timewait(TcpState::FIN_WAIT2),
            Leaves::Timewait(TcpState::TIME_WAIT),
        );
        // The orphan's FIN_WAIT2 became a timewait socket before the peer's FIN.
        assert_eq!(leaves(tcp_state::FIN_WAIT2, 0, OTHERS), fw2);
        // The peer's FIN came first (or with the ACK): TIME_WAIT at once.
        assert_eq!(leaves(tcp_state::FIN_WAIT2, 0, SOCK_DONE), tw);
        assert_eq!(leaves(tcp_state::FIN_WAIT2, 0, SOCK_DONE | OTHERS), tw);
        // Simultaneous close: CLOSING has the peer's FIN by definition.
        assert_eq!(leaves(tcp_state::CLOSING, 0, 0), tw);
        // A reset or a timeout leaves nothing.
        assert_eq!(
            leaves(tcp_state::FIN_WAIT2, ECONNRESET, SOCK_DONE),
            Leaves::Nothing
        );
        assert_eq!(leaves(tcp_state::CLOSING, ETIMEDOUT, 0), Leaves::Nothing);
        // Only the FIN_WAIT2/CLOSING -> CLOSE of a record carries it.
        let mut ev = v4_event(tcp_state::FIN_WAIT2, tcp_state::CLOSE);
        ev.timewait = connwatch_common::timewait_birth::TIME_WAIT;
        assert_eq!(from_event(&ev).unwrap().leaves, tw);
        ev.newstate = tcp_state::CLOSE_WAIT;
        assert_eq!(from_event(&ev).unwrap().leaves, Leaves::Unknown);
    }
}
