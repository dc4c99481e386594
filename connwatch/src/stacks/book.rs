//! The sites known so far: each distinct stack of a process at a capture point once,
//! and for each socket the site where it was made and where its EOF was read, so that
//! a report counts a process's CLOSE_WAIT sockets per site. Bounded: sockets beyond
//! `MAX_SOCKETS` push out the oldest (counted), and sites no socket refers to go.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
};

use super::{record::At, site::Site};

pub type SiteId = u32;

/// Sockets whose sites are remembered at most.
pub const MAX_SOCKETS: usize = 1 << 16;

/// A socket's sites.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketSites {
    pub made: Option<SiteId>,
    pub eof: Option<SiteId>,
    /// When the last of them was captured (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}

#[derive(Default)]
pub struct Book {
    sites: HashMap<SiteId, Arc<Site>>,
    /// (pid, capture point, addresses) -> site: a stack seen again is not symbolized
    /// again.
    by_stack: HashMap<(u32, At, Vec<u64>), SiteId>,
    sockets: HashMap<u64, SocketSites>,
    /// Inodes in the order they were first recorded, for eviction.
    order: VecDeque<u64>,
    next: SiteId,
    /// Sockets pushed out by `MAX_SOCKETS` before they were pruned.
    pub evicted: u64,
    /// Captures recorded, and those whose stack could not be read at all.
    pub captures: u64,
    pub unreadable: u64,
}

impl Book {
    /// The site of a stack already symbolized.
    pub fn known(&self, pid: u32, at: At, addrs: &[u64]) -> Option<SiteId> {
        self.by_stack.get(&(pid, at, addrs.to_vec())).copied()
    }

    pub fn add_site(&mut self, pid: u32, addrs: Vec<u64>, site: Site) -> SiteId {
        self.next += 1;
        let id = self.next;
        self.by_stack.insert((pid, site.at, addrs), id);
        self.sites.insert(id, Arc::new(site));
        id
    }

    /// Records that socket `inode` was made (or read to EOF) at `site`.
    pub fn record(&mut self, inode: u64, at: At, site: SiteId, ts_ns: u64) {
        self.captures += 1;
        if inode == 0 {
            return;
        }
        let e = self.sockets.entry(inode).or_insert_with(|| {
            self.order.push_back(inode);
            SocketSites::default()
        });
        e.ts_ns = ts_ns;
        if at.made() {
            e.made = Some(site);
        } else {
            e.eof = Some(site);
        }
        while self.sockets.len() > MAX_SOCKETS {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.sockets.remove(&old).is_some() {
                self.evicted += 1;
            }
        }
    }

    pub fn of(&self, inode: u64) -> SocketSites {
        self.sockets.get(&inode).copied().unwrap_or_default()
    }

    pub fn site(&self, id: SiteId) -> Option<&Arc<Site>> {
        self.sites.get(&id)
    }

    /// Forgets the sockets captured before `before_ns` that no longer exist (`live`),
    /// then the sites no socket refers to.
    pub fn prune(&mut self, live: impl Fn(u64) -> bool, before_ns: u64) {
        self.sockets
            .retain(|inode, s| s.ts_ns >= before_ns || live(*inode));
        self.order.retain(|inode| self.sockets.contains_key(inode));
        let mut used: BTreeMap<SiteId, ()> = BTreeMap::new();
        for s in self.sockets.values() {
            used.extend(s.made.into_iter().chain(s.eof).map(|id| (id, ())));
        }
        self.sites.retain(|id, _| used.contains_key(id));
        self.by_stack.retain(|_, id| used.contains_key(id));
    }

    pub fn sockets(&self) -> usize {
        self.sockets.len()
    }

    pub fn sites(&self) -> usize {
        self.sites.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(at: At, name: &str) -> Site {
        Site {
            at,
            stack: vec![name.to_string()],
            truncated: false,
            hint: None,
            own: Some(0),
        }
    }

    #[test]
    fn a_socket_has_a_made_site_and_an_eof_site_and_stacks_are_kept_once() {
        let mut b = Book::default();
        let made = b.add_site(1, vec![1, 2], site(At::Accept, "main"));
        assert_eq!(b.known(1, At::Accept, &[1, 2]), Some(made));
        assert_eq!(b.known(2, At::Accept, &[1, 2]), None, "per process");
        let eof = b.add_site(1, vec![3], site(At::Eof, "leaky_handler"));
        b.record(10, At::Accept, made, 100);
        b.record(10, At::Eof, eof, 200);
        b.record(11, At::Accept, made, 100);
        b.record(12, At::Accept, made, 900);
        assert_eq!(
            b.of(10),
            SocketSites {
                made: Some(made),
                eof: Some(eof),
                ts_ns: 200,
            }
        );
        assert_eq!(b.of(11).eof, None);
        // Socket 11 is gone; 12 was captured after the dump began (not listed yet).
        b.prune(|inode| inode == 10, 500);
        assert_eq!((b.sockets(), b.sites()), (2, 2));
        assert_eq!(b.of(11).made, None);
        b.prune(|_| false, u64::MAX);
        assert_eq!((b.sockets(), b.sites()), (0, 0));
        assert_eq!(b.known(1, At::Accept, &[1, 2]), None);
        assert_eq!(b.captures, 4);
    }

    #[test]
    fn sockets_beyond_the_bound_push_out_the_oldest_and_are_counted() {
        let mut b = Book::default();
        let s = b.add_site(1, vec![1], site(At::Connect, "f"));
        for inode in 1..=(MAX_SOCKETS as u64 + 3) {
            b.record(inode, At::Connect, s, 0);
        }
        assert_eq!(b.sockets(), MAX_SOCKETS);
        assert_eq!(b.evicted, 3);
        assert_eq!(b.of(1).made, None, "the oldest went first");
        assert_eq!(b.of(MAX_SOCKETS as u64 + 3).made, Some(s));
    }
}
