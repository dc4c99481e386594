//! The network namespaces connwatch covers, as a service of their own: which exist
//! (found within one interval, forgotten when gone), one visit per namespace per round
//! for the dumps a round needs, and what each namespace says about itself (listening
//! ports, TIME_WAIT settings).
//!
//! The probe sees every namespace, but sock_diag and `net.ipv4.*` answer for the
//! namespace of the thread that asks, so a round enters each namespace once, from one
//! worker thread (`netns::run_in_each`). Each dump walks the host-wide TCP hash table
//! (~1 ms with a few thousand sockets), so rounds visit only the namespaces they need.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    budget::thread_cpu_time,
    decode::TcpState,
    filter::Filter,
    host::kernelinfo::{self, KernelInfo},
    host::netns,
    host::sockdiag::{self, DiagSocket, Query},
    probe::{TcpSocketRecords, TcpSockets},
};

pub struct Namespaces {
    own: u32,
    /// Whether other namespaces can be entered (CAP_SYS_ADMIN).
    others: bool,
    paths: BTreeMap<u32, PathBuf>,
    /// /proc/PID of a process in each namespace that had one at the last discovery.
    procs: BTreeMap<u32, PathBuf>,
    /// Each namespace's cookie: its inode number is reused by the next namespace
    /// created once it is gone, the cookie never is.
    cookies: HashMap<u32, u64>,
    /// TIME_WAIT settings of each namespace, from the last full visit.
    kernel: BTreeMap<u32, KernelInfo>,
    /// Listening sockets: (netns, port) → socket inode.
    listeners: HashMap<(u32, u16), Vec<u64>>,
    /// A transition came from a namespace not listed yet: list them again.
    rediscover: bool,
    /// Namespaces where a TIME_WAIT was born since their listeners were last listed.
    listeners_wanted: BTreeSet<u32>,
    /// CPU time the last `visit` used on threads other than the caller's.
    other_threads_cpu: Duration,
}

/// How a visit lists a namespace's sockets.
#[derive(Clone)]
pub enum Listing {
    /// sock_diag dumps, their results together.
    Dumps(Vec<Query>),
    /// The probe's TCP socket iterator: every socket, with what the seed reads of
    /// `tcp_info`; a sock_diag dump with `tcp_info` where it fails.
    Iterator(Arc<TcpSockets>),
}

impl Listing {
    /// The sockets of the calling thread's namespace.
    fn list(&self) -> std::io::Result<Vec<DiagSocket>> {
        match self {
            Self::Dumps(queries) => {
                let mut sockets = Vec::new();
                for q in queries {
                    sockets.extend(sockdiag::dump(*q)?);
                }
                Ok(sockets)
            }
            // A pass that fails (the tick rate untold near five minutes of uptime) is
            // made again the old way, for this namespace.
            Self::Iterator(iter) => iter.list().or_else(|e| {
                log::debug!("TCP socket iterator failed ({e}): sock_diag instead");
                sockdiag::dump(Query::all_with_info())
            }),
        }
    }
}

/// What the seed's worker sends as it reads another namespace: a batch of whole records,
/// then whether the pass ended well, with the namespace's settings.
enum Piece {
    Batch(u32, Vec<u8>),
    Done(u32, bool, KernelInfo),
}

/// One namespace's sockets and settings, as listed.
type NsListing = std::io::Result<(Vec<DiagSocket>, Option<KernelInfo>)>;

/// Reads the TCP socket iterator in each of `namespaces` in turn, on a worker, sending
/// each batch of records as it comes and then how the pass ended.
fn read_elsewhere(
    iter: &Arc<TcpSockets>,
    namespaces: Vec<(u32, PathBuf)>,
    tx: std::sync::mpsc::Sender<Piece>,
) -> std::thread::JoinHandle<Vec<(u32, std::io::Result<()>)>> {
    let iter = Arc::clone(iter);
    std::thread::spawn(move || {
        netns::run_in_each(namespaces, move |ns| {
            let read = iter.read(|batch| {
                tx.send(Piece::Batch(ns, batch.to_vec()))
                    .map_err(|_| std::io::Error::other("the seed stopped reading"))
            });
            let _ = tx.send(Piece::Done(ns, read.is_ok(), KernelInfo::read()));
            Ok(())
        })
    })
}

/// Parses the worker's batches as they come, handing each namespace's new sockets to
/// `each`; the namespaces whose pass ended well go into `results`, the others are
/// returned (a pass that wrote no header, say, is listed again another way).
fn parse_as_read(
    rx: std::sync::mpsc::Receiver<Piece>,
    each: &mut impl FnMut(u32, &[DiagSocket]),
    results: &mut Vec<(u32, NsListing)>,
) -> Vec<u32> {
    // A namespace's records so far; `Err` once its output could not be parsed.
    let mut reading: BTreeMap<u32, Result<TcpSocketRecords, ()>> = BTreeMap::new();
    let mut failed = Vec::new();
    for piece in rx {
        match piece {
            Piece::Batch(ns, bytes) => {
                let slot = reading.entry(ns).or_insert_with(|| Ok(Default::default()));
                if let Ok(records) = slot {
                    match records.feed(&bytes) {
                        Ok(start) => each(ns, records.sockets.get(start..).unwrap_or(&[])),
                        Err(e) => {
                            log::debug!("netns {ns}: TCP socket iterator failed ({e})");
                            *slot = Err(());
                        }
                    }
                }
            }
            Piece::Done(ns, read, info) => match reading.remove(&ns) {
                Some(Ok(records)) if read => results.push((ns, Ok((records.sockets, Some(info))))),
                None if read => results.push((ns, Ok((Vec::new(), Some(info))))),
                _ => failed.push(ns),
            },
        }
    }
    failed
}

/// What one visit to a namespace brought back.
pub struct Visit {
    pub ns: u32,
    pub sockets: Vec<DiagSocket>,
}

impl Namespaces {
    pub fn new(own: u32, others: bool) -> Self {
        Self {
            own,
            others,
            paths: BTreeMap::new(),
            procs: BTreeMap::new(),
            cookies: HashMap::new(),
            kernel: BTreeMap::new(),
            listeners: HashMap::new(),
            rediscover: false,
            listeners_wanted: BTreeSet::new(),
            other_threads_cpu: Duration::ZERO,
        }
    }

    /// connwatch's own network namespace.
    pub fn own(&self) -> u32 {
        self.own
    }

    /// CPU time the last `visit` used on threads other than the caller's (the caller's
    /// own is in its thread's clock).
    pub fn other_threads_cpu(&self) -> Duration {
        self.other_threads_cpu
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Notes a namespace named by a transition; one not listed yet is looked for before
    /// the next poll, so that its closes are confirmed and its sockets dumped.
    pub fn note(&mut self, ns: u32) {
        // Without the privilege to enter other namespaces only our own is ever listed:
        // a transition from another one is no reason to walk /proc again.
        if !self.paths.contains_key(&ns) && (self.others || ns == self.own) {
            self.rediscover = true;
        }
    }

    /// Whether a transition named a namespace not listed yet (cleared).
    pub fn take_rediscover(&mut self) -> bool {
        std::mem::take(&mut self.rediscover)
    }

    /// Lists the namespaces that exist now (cheap: one readlink per process) and
    /// returns those that existed before and are gone (they took their sockets with
    /// them), and those whose inode number now names a new namespace (the old one's
    /// sockets are gone, the new one's are to be listed). Their listeners and settings
    /// are dropped here; a new namespace's listeners are wanted at the next poll.
    pub fn discover(&mut self) -> (Vec<u32>, Vec<u32>) {
        let netns::Found {
            enter: mut found,
            procs,
        } = netns::all();
        self.procs = procs;
        if !self.others {
            // setns would fail in each of them (warned once at start), and without
            // CAP_SYS_PTRACE other processes' namespaces may be unreadable: then nothing
            // is forgotten either, since absence from the list proves nothing.
            let own = self.own;
            found.retain(|&ns, _| ns == own);
        }
        found
            .entry(self.own)
            .or_insert_with(|| PathBuf::from("/proc/self/ns/net"));
        let gone: Vec<u32> = if self.others {
            self.paths
                .keys()
                .filter(|ns| !found.contains_key(ns))
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        for ns in &gone {
            self.cookies.remove(ns);
        }
        let reborn = self.reborn(&found);
        for ns in gone.iter().chain(&reborn) {
            log::debug!("netns {ns} is gone: forgetting its sockets");
            self.listeners.retain(|&(n, _), _| n != *ns);
            self.kernel.remove(ns);
        }
        self.listeners_wanted.extend(&reborn);
        self.paths = found;
        (gone, reborn)
    }

    /// Namespaces whose inode number now belongs to another namespace: the old one is
    /// gone (its sockets with it), the new one starts empty. Only namespaces that are
    /// new or found by another path than before are asked their cookie (one setns
    /// each): a reused inode comes with the new namespace's path.
    fn reborn(&mut self, found: &BTreeMap<u32, PathBuf>) -> Vec<u32> {
        if !self.others {
            return Vec::new();
        }
        let check: Vec<(u32, PathBuf)> = found
            .iter()
            .filter(|(ns, path)| **ns != self.own && self.paths.get(ns) != Some(path))
            .map(|(ns, path)| (*ns, path.clone()))
            .collect();
        if check.is_empty() {
            return Vec::new();
        }
        let mut reborn = Vec::new();
        for (ns, cookie) in netns::run_in_each(check, |_| netns::cookie()) {
            // Without cookies (before Linux 5.14) a reused inode goes unnoticed.
            let Ok(cookie) = cookie else { continue };
            if self
                .cookies
                .insert(ns, cookie)
                .is_some_and(|old| old != cookie)
            {
                log::debug!("netns {ns} is a new namespace under a reused inode");
                reborn.push(ns);
            }
        }
        reborn
    }

    /// One visit to every namespace (or `only` those): its sockets listed, and with
    /// `kernel` its TIME_WAIT settings read and kept, all in one setns per namespace.
    /// Sockets outside `filter` are left out (listeners stay: they name the owners of
    /// server-side sockets). A namespace that fails (its last process exited
    /// meanwhile) is skipped; our own failing is an error.
    pub fn visit(
        &mut self,
        listing: &Listing,
        kernel: bool,
        only: Option<&BTreeSet<u32>>,
        filter: &Filter,
    ) -> Result<Vec<Visit>> {
        let what = match listing {
            Listing::Dumps(_) => "cannot list TCP sockets through netlink sock_diag",
            Listing::Iterator(_) => "cannot list TCP sockets with the probe's iterator",
        };
        let visit =
            move |listing: &Listing| -> std::io::Result<(Vec<DiagSocket>, Option<KernelInfo>)> {
                Ok((listing.list()?, kernel.then(KernelInfo::read)))
            };
        let own = self.own;
        let wanted = |ns: &u32| only.is_none_or(|o| o.contains(ns));
        let others: Vec<(u32, PathBuf)> = self
            .paths
            .iter()
            .filter(|(ns, _)| **ns != own && wanted(ns))
            .map(|(ns, path)| (*ns, path.clone()))
            .collect();
        // The other namespaces on a thread of their own, beside our own namespace here.
        // Its CPU time is kept (`other_threads_cpu`): the budgets that space visits count
        // CPU, and a visit on two threads costs up to twice its wall time.
        let elsewhere = (!others.is_empty()).then(|| {
            let listing = listing.clone();
            std::thread::spawn(move || {
                let cpu = Arc::new(AtomicU64::new(0));
                let spent = Arc::clone(&cpu);
                let listed = netns::run_in_each(others, move |_| {
                    let before = thread_cpu_time();
                    let listed = visit(&listing);
                    let used = thread_cpu_time().saturating_sub(before);
                    spent.fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
                    listed
                });
                (listed, Duration::from_nanos(cpu.load(Ordering::Relaxed)))
            })
        });
        let mut results = Vec::new();
        if wanted(&own) {
            results.push((own, visit(listing)));
        }
        self.other_threads_cpu = Duration::ZERO;
        if let Some(elsewhere) = elsewhere {
            let (listed, cpu) = elsewhere.join().unwrap_or_default();
            results.extend(listed);
            self.other_threads_cpu = cpu;
        }
        self.absorb_visits(results, filter, what)
    }

    /// The listings of a visit as its `Visit`s, the filter applied (listeners are kept:
    /// they name owners), each namespace's settings kept. Our own namespace failing is
    /// an error (`what`); another's is only logged.
    fn absorb_visits(
        &mut self,
        results: Vec<(u32, NsListing)>,
        filter: &Filter,
        what: &str,
    ) -> Result<Vec<Visit>> {
        let own = self.own;
        let mut out = Vec::with_capacity(results.len());
        for (ns, result) in results {
            match result {
                Ok((mut sockets, info)) => {
                    sockets.retain(|s| {
                        s.state == TcpState::LISTEN || filter.socket(&s.local, &s.remote)
                    });
                    if let Some(info) = info {
                        self.kernel.insert(ns, info);
                    }
                    out.push(Visit { ns, sockets });
                }
                Err(e) if ns == own => {
                    return Err(e).context(what.to_string());
                }
                Err(e) => log::debug!("netns {ns}: listing its sockets failed: {e}"),
            }
        }
        Ok(out)
    }

    /// The seed's visit, with the TCP socket iterator: as `visit`, but every namespace's
    /// sockets are also handed to `each` (on this thread, before `filter` is applied to
    /// them) as they are read, so that the tables fill while the kernel is still
    /// listing. The other namespaces are read on a worker and parsed here. A namespace
    /// whose pass fails is listed again through sock_diag, as `Listing::Iterator` does.
    pub fn visit_streamed(
        &mut self,
        iter: &Arc<TcpSockets>,
        filter: &Filter,
        mut each: impl FnMut(u32, &[DiagSocket]),
    ) -> Result<Vec<Visit>> {
        let own = self.own;
        let others: Vec<(u32, PathBuf)> = self
            .paths
            .iter()
            .filter(|(ns, _)| **ns != own)
            .map(|(ns, path)| (*ns, path.clone()))
            .collect();
        let (tx, rx) = std::sync::mpsc::channel::<Piece>();
        let worker = (!others.is_empty()).then(|| read_elsewhere(iter, others.clone(), tx));
        let listing = Listing::Iterator(Arc::clone(iter));
        let mut results = vec![(own, listing.list().map(|s| (s, Some(KernelInfo::read()))))];
        if let Some((_, Ok((sockets, _)))) = results.first() {
            each(own, sockets);
        }
        let failed = parse_as_read(rx, &mut each, &mut results);
        for (ns, entered) in worker.and_then(|w| w.join().ok()).unwrap_or_default() {
            if let Err(e) = entered {
                log::debug!("netns {ns}: listing its sockets failed: {e}");
            }
        }
        // What failed, the way `Listing::Iterator` falls back.
        let again: Vec<(u32, PathBuf)> = others
            .into_iter()
            .filter(|(ns, _)| failed.contains(ns))
            .collect();
        let dump = |_| {
            Ok((
                sockdiag::dump(Query::all_with_info())?,
                Some(KernelInfo::read()),
            ))
        };
        for (ns, listed) in netns::run_in_each(again, dump) {
            if let Ok((sockets, _)) = &listed {
                each(ns, sockets);
            }
            results.push((ns, listed));
        }
        self.absorb_visits(
            results,
            filter,
            "cannot list TCP sockets with the probe's iterator",
        )
    }

    /// Looks up single sockets by (local, remote) in each namespace of `wanted`: those
    /// found, by namespace. A namespace that fails (gone meanwhile) finds nothing; our
    /// own failing is an error.
    pub fn lookup(
        &self,
        mut wanted: BTreeMap<u32, Vec<(SocketAddr, SocketAddr)>>,
    ) -> Result<BTreeMap<u32, Vec<DiagSocket>>> {
        let mut found = BTreeMap::new();
        if let Some(pairs) = wanted.remove(&self.own) {
            let own = sockdiag::lookup(&pairs)
                .context("cannot look up TCP sockets through netlink sock_diag")?;
            found.insert(self.own, own);
        }
        let others: Vec<(u32, PathBuf)> = wanted
            .keys()
            .filter_map(|ns| Some((*ns, self.paths.get(ns)?.clone())))
            .collect();
        if others.is_empty() {
            return Ok(found);
        }
        let wanted = std::sync::Arc::new(wanted);
        let lookups = netns::run_in_each(others, move |ns| {
            sockdiag::lookup(wanted.get(&ns).map_or(&[][..], Vec::as_slice))
        });
        for (ns, result) in lookups {
            match result {
                Ok(sockets) => {
                    found.insert(ns, sockets);
                }
                Err(e) => log::debug!("netns {ns}: sock_diag lookup failed: {e}"),
            }
        }
        Ok(found)
    }

    /// A TIME_WAIT was born in `ns`: its owner may be the listener on its port (a
    /// server closing first), so the namespace's listeners are wanted at the next poll.
    pub fn want_listeners(&mut self, ns: u32) {
        self.listeners_wanted.insert(ns);
    }

    /// The namespaces whose listeners are wanted (cleared).
    pub fn take_listeners_wanted(&mut self) -> BTreeSet<u32> {
        std::mem::take(&mut self.listeners_wanted)
    }

    /// Takes the listening sockets of a visit that asked for them.
    pub fn note_listeners(&mut self, visit: &Visit) {
        self.listeners_wanted.remove(&visit.ns);
        self.listeners.retain(|(n, _), _| *n != visit.ns);
        for s in visit.sockets.iter().filter(|s| s.state == TcpState::LISTEN) {
            // Several sockets share a port with SO_REUSEPORT (nginx `reuseport`,
            // gunicorn `--reuse-port`, Go and Envoy workers): each is a listener.
            let inodes = self
                .listeners
                .entry((visit.ns, s.local.port()))
                .or_default();
            if !inodes.contains(&s.inode) {
                inodes.push(s.inode);
            }
        }
    }

    /// Listening sockets: (netns, port) → the inodes of the sockets listening there
    /// (several with SO_REUSEPORT).
    pub fn listeners(&self) -> &HashMap<(u32, u16), Vec<u64>> {
        &self.listeners
    }

    /// The inodes of every listening socket.
    pub fn listener_inodes(&self) -> impl Iterator<Item = u64> + '_ {
        self.listeners.values().flatten().copied()
    }

    /// The timewait sockets the kernel holds in each of `wanted` (the `tw` of its
    /// /proc/net/sockstat): read through a process in the namespace, still there and
    /// still in it (its pid may have been reused), else by entering the namespace (one
    /// kept only by a bind mount, as `ip netns` and CNI plugins keep pods').
    pub fn timewait_counts(&self, wanted: &[u32]) -> BTreeMap<u32, u64> {
        let mut counts = BTreeMap::new();
        let mut enter = Vec::new();
        for &ns in wanted {
            let proc_dir = if ns == self.own {
                Some(std::path::Path::new("/proc/self"))
            } else {
                self.procs
                    .get(&ns)
                    .map(PathBuf::as_path)
                    .filter(|dir| netns::inode_of(&dir.join("ns/net")) == Some(ns))
            };
            match proc_dir.and_then(kernelinfo::timewait_count) {
                Some(n) => {
                    counts.insert(ns, n);
                }
                None => enter.extend(self.paths.get(&ns).map(|p| (ns, p.clone()))),
            }
        }
        if !enter.is_empty() {
            let read = |_| {
                kernelinfo::timewait_count(std::path::Path::new("/proc/thread-self"))
                    .ok_or_else(|| std::io::Error::other("no TCP line in sockstat"))
            };
            for (ns, n) in netns::run_in_each(enter, read) {
                match n {
                    Ok(n) => {
                        counts.insert(ns, n);
                    }
                    Err(e) => log::debug!("netns {ns}: cannot read its sockstat: {e}"),
                }
            }
        }
        counts
    }

    /// TIME_WAIT settings per namespace.
    pub fn kernel(&self) -> &BTreeMap<u32, KernelInfo> {
        &self.kernel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_namespaces_bring_no_rediscovery_without_the_privilege() {
        let mut unprivileged = Namespaces::new(1, false);
        unprivileged.note(2);
        assert!(!unprivileged.take_rediscover(), "nothing to find there");
        let mut root = Namespaces::new(1, true);
        root.note(2);
        assert!(root.take_rediscover());
        assert!(!root.take_rediscover(), "cleared once taken");
    }

    /// A namespace no process is in, kept by a bind mount as `ip netns` and CNI plugins
    /// keep them, still has its timewait sockets counted (by entering it).
    #[test]
    fn timewait_sockets_are_counted_where_no_process_is() {
        struct Deleted(String);
        impl Drop for Deleted {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        let name = format!("cw-unit-count-{}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip").args(args).status();
            assert!(ok.is_ok_and(|s| s.success()), "ip {args:?} (run as root)");
        };
        ip(&["netns", "add", &name]);
        let _deleted = Deleted(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let path = PathBuf::from(format!("/run/netns/{name}"));
        // A server that closes first leaves a TIME_WAIT there once the client closes.
        let made = netns::run_in(&path, || {
            use std::io::Read as _;
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let mut client = std::net::TcpStream::connect(listener.local_addr()?)?;
            drop(listener.accept()?);
            client.read_exact(&mut [0u8; 1]).ok();
            Ok(())
        });
        // A bind mount's inode is the namespace's.
        let ns = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()) as u32;
        let own = netns::inode_of(std::path::Path::new("/proc/self/ns/net")).unwrap();
        let mut namespaces = Namespaces::new(own, true);
        namespaces.discover();
        let counts = namespaces.timewait_counts(&[ns, own]);
        made.unwrap();
        assert!(!namespaces.procs.contains_key(&ns), "no process is in it");
        assert_eq!(counts.get(&ns), Some(&1));
        assert!(counts.contains_key(&own));
    }
}
