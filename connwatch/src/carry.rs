//! What `trace` remembers per socket when the probe keeps nothing on the socket (under
//! `tp_btf` without `--pid`): when it entered its state, and the owner an earlier
//! syscall named. Socket storage cost an allocation per socket in the kernel, and its
//! free with the socket (~900 ns of the probe's time per connection under churn, two
//! sockets each); `trace` receives every transition anyway, so the same rule runs here
//! on the events, keyed by socket address as the classic tracepoint's map is:
//! - a transition's `old_since_ns` is the time of the socket's previous transition,
//!   when that one entered `old` (after a lost event it did not: then none);
//! - a transition outside the owner's syscall carries the owner remembered from one
//!   inside it (`carried`); a syscall's own owner replaces it;
//! - a socket's first transition (connect(), listen(), a listener's child) starts
//!   afresh, whatever an earlier socket at that address left; CLOSE forgets it.
use compact_str::CompactString;
use rustc_hash::FxHashMap;

use crate::decode::{Owner, OwnerSource, TcpState, Transition};

struct Remembered {
    state: TcpState,
    since_ns: u64,
    owner: Option<(u32, CompactString)>,
}

pub struct Carry {
    sockets: FxHashMap<u64, Remembered>,
    /// Most sockets remembered at once; beyond it a socket is not remembered (its next
    /// transitions lack what it would have carried) and is counted.
    limit: usize,
    /// Sockets left out at the limit.
    pub untracked: u64,
}

impl Carry {
    pub fn new(limit: usize) -> Self {
        Self {
            sockets: FxHashMap::default(),
            limit,
            untracked: 0,
        }
    }

    /// Fills in what the probe left out of `t` (its old state's entry time, a carried
    /// owner), and remembers `t` for the socket's next transition.
    pub fn fill(&mut self, t: &mut Transition) {
        let prev = if t.starts_a_life() {
            None
        } else {
            self.sockets.get(&t.skaddr)
        };
        if let Some(p) = prev {
            if t.old_since_ns.is_none() && p.state == t.old {
                t.old_since_ns = Some(p.since_ns);
            }
            if t.owner.source == OwnerSource::Unknown
                && let Some((pid, comm)) = &p.owner
            {
                t.owner = Owner {
                    pid: Some(*pid),
                    comm: Some(comm.clone()),
                    source: OwnerSource::Carried,
                };
            }
        }
        if t.new == TcpState::CLOSE {
            self.sockets.remove(&t.skaddr);
            return;
        }
        let now = Remembered {
            state: t.new,
            since_ns: t.ts_ns,
            owner: t
                .owner
                .pid
                .map(|pid| (pid, t.owner.comm.clone().unwrap_or_default())),
        };
        let len = self.sockets.len();
        match self.sockets.entry(t.skaddr) {
            std::collections::hash_map::Entry::Occupied(mut e) => _ = e.insert(now),
            std::collections::hash_map::Entry::Vacant(e) if len < self.limit => _ = e.insert(now),
            std::collections::hash_map::Entry::Vacant(_) => self.untracked += 1,
        }
    }

    /// Sockets remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.sockets.len()
    }
}

#[cfg(test)]
mod tests {
    use connwatch_common::tcp_state::*;

    use super::*;
    use crate::monitor::table::tests::tr;

    const C: &str = "127.0.0.1:40000";
    const S: &str = "127.0.0.1:8080";

    fn at(ts_s: f64, old: u8, new: u8) -> Transition {
        tr(ts_s, old, new, C, S)
    }

    fn in_context(mut t: Transition, pid: u32) -> Transition {
        t.owner = Owner {
            pid: Some(pid),
            comm: Some("client".into()),
            source: OwnerSource::Context,
        };
        t
    }

    #[test]
    fn a_connection_is_timed_and_its_owner_carried() {
        let mut c = Carry::new(100);
        let mut life = [
            in_context(at(1.0, CLOSE, SYN_SENT), 7),
            at(1.5, SYN_SENT, ESTABLISHED),
            in_context(at(3.0, ESTABLISHED, FIN_WAIT1), 7),
            at(3.25, FIN_WAIT1, FIN_WAIT2),
            at(4.0, FIN_WAIT2, CLOSE),
        ];
        for t in &mut life {
            c.fill(t);
        }
        let durations: Vec<Option<u64>> = life.iter().map(Transition::duration_ns).collect();
        assert_eq!(
            durations,
            [
                None,
                Some(500_000_000),
                Some(1_500_000_000),
                Some(250_000_000),
                Some(750_000_000)
            ]
        );
        let sources: Vec<OwnerSource> = life.iter().map(|t| t.owner.source).collect();
        use OwnerSource::*;
        assert_eq!(sources, [Context, Carried, Context, Carried, Carried]);
        assert!(life.iter().all(|t| t.owner.pid == Some(7)));
        assert_eq!(c.len(), 0, "CLOSE forgets the socket");
    }

    #[test]
    fn a_new_socket_at_a_freed_address_inherits_nothing() {
        let mut c = Carry::new(100);
        let mut old = in_context(at(1.0, CLOSE, SYN_SENT), 7);
        c.fill(&mut old);
        // Its CLOSE was lost; a listener's child takes the address.
        let mut child = at(5.0, LISTEN, SYN_RECV);
        c.fill(&mut child);
        assert_eq!((child.old_since_ns, child.owner.pid), (None, None));
        let mut next = at(5.5, SYN_RECV, ESTABLISHED);
        c.fill(&mut next);
        assert_eq!(next.old_since_ns, Some(5_000_000_000));
        assert_eq!(next.owner.source, OwnerSource::Unknown);
    }

    #[test]
    fn after_a_lost_event_the_old_state_is_not_timed() {
        let mut c = Carry::new(100);
        let mut t = at(1.0, SYN_SENT, ESTABLISHED);
        c.fill(&mut t);
        // ESTABLISHED -> FIN_WAIT1 was lost.
        let mut t = at(2.0, FIN_WAIT1, FIN_WAIT2);
        c.fill(&mut t);
        assert_eq!(t.old_since_ns, None);
    }

    #[test]
    fn what_the_probe_told_is_kept() {
        let mut c = Carry::new(100);
        let mut t = in_context(at(1.0, CLOSE, SYN_SENT), 7);
        c.fill(&mut t);
        let mut told = at(2.0, SYN_SENT, ESTABLISHED);
        told.old_since_ns = Some(1_900_000_000);
        told.owner = Owner {
            pid: Some(8),
            comm: Some("other".into()),
            source: OwnerSource::Carried,
        };
        c.fill(&mut told);
        assert_eq!(told.old_since_ns, Some(1_900_000_000));
        assert_eq!(told.owner.pid, Some(8));
    }

    #[test]
    fn the_limit_bounds_memory_and_counts_the_rest() {
        let mut c = Carry::new(2);
        for i in 0..5u64 {
            let mut t = at(1.0, CLOSE, SYN_SENT);
            t.skaddr = 0x1000 + i;
            c.fill(&mut t);
        }
        assert_eq!((c.len(), c.untracked), (2, 3));
        // One remembered still moves on.
        let mut t = at(2.0, SYN_SENT, ESTABLISHED);
        t.skaddr = 0x1000;
        c.fill(&mut t);
        assert_eq!((c.len(), t.old_since_ns), (2, Some(1_000_000_000)));
    }
}
