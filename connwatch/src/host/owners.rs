//! Who holds a socket: the processes with `socket:[INODE]` among their fds.
//!
//! A CLOSE_WAIT socket's transition runs in softirq, so the probe cannot name its owner;
//! whoever holds its file descriptor can. Scanning every /proc/PID/fd is what `ss -p`
//! does each time; here the index is kept and rebuilt only when a socket's inode is
//! unknown to it (at most once per `min_rescan`), and in full every `max_age` so that
//! fds closed or passed on are noticed. A scan asks the probe's socket-fd iterator
//! where there is one (one pass in the kernel), else walks /proc.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use procfs::process::{Process, all_processes};
use rustc_hash::{FxHashMap as HashMap, FxHashSet};

use crate::budget::{Budget, thread_cpu_time};

/// What a report shows of a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub comm: String,
    /// Open file descriptors.
    pub fds: u64,
    /// Soft `RLIMIT_NOFILE`; `None` when unlimited or unreadable.
    pub fd_limit: Option<u64>,
    /// cgroup v2 path (the container or service it runs in).
    pub cgroup: Option<String>,
    /// The container and pod its cgroup paths name.
    pub identity: crate::host::container::Identity,
    /// What the container's runtime calls them (once it has said).
    pub names: Option<Arc<crate::host::runtime::Names>>,
}

impl ProcInfo {
    /// Its pod's uid: from the kubelet's cgroup path, else the CRI's label.
    pub fn pod_uid(&self) -> Option<&str> {
        self.identity.pod_uid.as_deref().or_else(|| {
            self.names
                .as_ref()
                .and_then(|n| n.k8s.as_ref())
                .and_then(|k| k.pod_uid.as_deref())
        })
    }

    /// Its pod's namespace and name, once the runtime has said them.
    pub fn pod(&self) -> Option<&crate::host::runtime::K8sNames> {
        self.names.as_ref().and_then(|n| n.k8s.as_ref())
    }

    pub fn container_id(&self) -> Option<&str> {
        self.identity.container.as_ref().map(|c| c.id.as_str())
    }
}

/// The processes holding each socket, by inode, in 16 bytes an entry: one or two pids
/// inline (almost always one, two after a fork; 0 marks an empty slot: pid 0 holds no
/// files), more (rare) in a map of their own. The index holds an entry per followed
/// socket.
#[derive(Default)]
struct HolderMap {
    two: HashMap<u64, [u32; 2]>,
    more: HashMap<u64, Vec<u32>>,
}

impl HolderMap {
    /// Adds `pid` to the holders of `inode` (once). Pid 0 (a listing that could not
    /// read a task's id) is never a holder: 0 marks an empty slot here, and a 0 in the
    /// first would hide the real holder beside it.
    fn add(&mut self, inode: u64, pid: u32) {
        if pid == 0 {
            return;
        }
        if let Some(pids) = self.more.get_mut(&inode) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
            return;
        }
        let pair = self.two.entry(inode).or_insert([pid, 0]);
        match *pair {
            [a, _] if a == pid => {}
            [_, 0] => pair[1] = pid,
            [_, b] if b == pid => {}
            [a, b] => {
                self.two.remove(&inode);
                self.more.insert(inode, vec![a, b, pid]);
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.two.retain(|&inode, _| keep(inode));
        self.more.retain(|&inode, _| keep(inode));
    }

    fn get(&self, inode: u64) -> &[u32] {
        if let Some(pids) = self.two.get(&inode) {
            let n = pids.iter().take_while(|&&p| p != 0).count();
            return pids.get(..n).unwrap_or_default();
        }
        self.more.get(&inode).map_or(&[], Vec::as_slice)
    }

    fn contains(&self, inode: u64) -> bool {
        self.two.contains_key(&inode) || self.more.contains_key(&inode)
    }

    fn len(&self) -> usize {
        self.two.len() + self.more.len()
    }
}

pub struct FdIndex {
    holders: HolderMap,
    /// Inodes the last scan looked for and found in no process (kernel sockets, holders
    /// in reach of no /proc we can read): not worth a rescan until the index is stale.
    missing: FxHashSet<u64>,
    /// Scans use at most 1/SCAN_BUDGET of a CPU (a scan of 50,000 fds takes a few
    /// hundred ms), beyond which they are spaced further than asked.
    pub budget: Budget,
    min_rescan: Duration,
    max_age: Duration,
    /// Full scans done so far (shown in diagnostics; a cost counter).
    pub scans: u64,
    /// Lists every (pid, socket inode) in one pass; /proc is walked without it.
    source: Option<Box<dyn SocketFdSource>>,
}

/// Something that lists every socket held by a process at once (the probe's iterator).
pub trait SocketFdSource: Send + Sync {
    /// (pid, inode) of every socket fd; `None` when the listing failed this time.
    fn socket_fds(&mut self) -> Option<Vec<(u32, u64)>>;
}

/// /proc scans may use at most 1/SCAN_BUDGET of a CPU.
const SCAN_BUDGET: u32 = 40;

impl FdIndex {
    pub fn new(min_rescan: Duration, max_age: Duration) -> Self {
        Self {
            holders: HolderMap::default(),
            missing: FxHashSet::default(),
            budget: Budget::new(SCAN_BUDGET),
            min_rescan,
            max_age,
            scans: 0,
            source: None,
        }
    }

    /// Scans ask `source` rather than walking /proc.
    pub fn use_source(&mut self, source: Box<dyn SocketFdSource>) {
        self.source = Some(source);
    }

    /// A scan through the source started now on a thread of its own, to overlap
    /// other work; `adopt` takes its result and gives the source back. `None` without
    /// a source.
    pub fn prescan(&mut self) -> Option<Prescan> {
        self.source.take().map(Prescan::with_source)
    }

    /// Makes sure the index knows `inodes`: rescans /proc when one is new to it and the
    /// last scan is older than `min_rescan`, or when the index is older than `max_age`
    /// (both stretched to keep within the CPU budget). Only these inodes are kept, so
    /// memory follows the sockets of interest, not every socket on the machine.
    pub fn ensure(&mut self, inodes: impl IntoIterator<Item = u64>) {
        let wanted: Vec<u64> = inodes.into_iter().filter(|&i| i != 0).collect();
        let spacing = self.budget.spacing();
        let age = self.budget.since_last();
        let stale = age.is_none_or(|a| a >= self.max_age.max(spacing));
        let may_rescan = age.is_none_or(|a| a >= self.min_rescan.max(spacing));
        let new = wanted
            .iter()
            .any(|i| !self.holders.contains(*i) && !self.missing.contains(i));
        if stale || (may_rescan && new) {
            self.scan(&wanted.into_iter().collect());
        }
    }

    /// Rebuilds the index of `wanted` inodes from every process's fd table.
    pub fn scan(&mut self, wanted: &FxHashSet<u64>) {
        let started = thread_cpu_time();
        let keep = |inode: u64| wanted.contains(&inode);
        let listed = self.source.as_mut().and_then(|s| s.socket_fds());
        if listed.is_none() && self.source.take().is_some() {
            // It failed once (capabilities dropped, say): /proc from now on.
            log::info!("the fd index walks /proc from now on");
        }
        let holders = match listed {
            Some(pairs) => group(pairs, keep),
            None => collect(keep, &AtomicBool::new(false)),
        };
        self.missing = wanted
            .iter()
            .filter(|i| !holders.contains(**i))
            .copied()
            .collect();
        self.holders = holders;
        self.budget.spent(thread_cpu_time().saturating_sub(started));
        self.scans += 1;
    }

    /// Processes holding the socket with this inode (several after fork or fd passing).
    /// Takes over what a prescan found, for the `wanted` inodes. Nothing is marked
    /// missing: a socket opened after the prescan began is unknown, not holder-less, and
    /// gets a rescan of its own.
    pub fn adopt(&mut self, prescan: Prescan, wanted: impl IntoIterator<Item = u64>) {
        let Some(Scanned { all, cost, source }) = prescan.join() else {
            return;
        };
        if source.is_some() {
            self.source = source;
        }
        // The source failed this time: the next scan asks it again, or walks /proc.
        let Some(mut all) = all else {
            return;
        };
        let wanted: FxHashSet<u64> = wanted.into_iter().collect();
        all.retain(|inode| wanted.contains(&inode));
        self.holders = all;
        self.missing.clear();
        self.budget.spent(cost);
        self.scans += 1;
    }

    /// An index with these holders, never rescanned (for tests of what reads it).
    pub fn with_holders(pairs: impl IntoIterator<Item = (u64, Vec<u32>)>) -> Self {
        let mut index = Self::new(Duration::MAX, Duration::MAX);
        for (inode, pids) in pairs {
            for pid in pids {
                index.holders.add(inode, pid);
            }
        }
        index.budget.spent(Duration::ZERO);
        index
    }

    /// Inodes indexed.
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.holders.len() == 0
    }

    pub fn holders(&self, inode: u64) -> &[u32] {
        self.holders.get(inode)
    }
}

/// A scan of every process's sockets, run on a thread of its own at start-up so that it
/// overlaps other steps (with tens of thousands of sockets it is one of the longest):
/// under /proc while the probe loads (where the probe cannot list them), or through
/// the probe's socket-fd iterator during the first dumps. Dropped unused, it stops.
pub struct Prescan {
    handle: Option<std::thread::JoinHandle<Scanned>>,
    stop: Arc<AtomicBool>,
}

/// What a prescan found, what it cost, and the source it borrowed.
struct Scanned {
    /// `None` when the source failed.
    all: Option<HolderMap>,
    cost: Duration,
    source: Option<Box<dyn SocketFdSource>>,
}

impl Prescan {
    /// Walks /proc.
    pub fn start() -> Self {
        Self::spawn(None)
    }

    /// Asks `source`, which `FdIndex::adopt` gets back.
    pub fn with_source(source: Box<dyn SocketFdSource>) -> Self {
        Self::spawn(Some(source))
    }

    fn spawn(mut source: Option<Box<dyn SocketFdSource>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let started = thread_cpu_time();
            let all = match source.as_mut() {
                Some(s) => s.socket_fds().map(|pairs| group(pairs, |_| true)),
                None => Some(collect(|_| true, &flag)),
            };
            Scanned {
                all,
                cost: thread_cpu_time().saturating_sub(started),
                source,
            }
        });
        Self {
            handle: Some(handle),
            stop,
        }
    }

    fn join(mut self) -> Option<Scanned> {
        self.handle.take()?.join().ok()
    }
}

impl Drop for Prescan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Holders by inode from (pid, inode) pairs, for the inodes `keep` accepts.
fn group(pairs: Vec<(u32, u64)>, keep: impl Fn(u64) -> bool) -> HolderMap {
    let mut holders = HolderMap::default();
    for (pid, inode) in pairs {
        if keep(inode) {
            holders.add(inode, pid);
        }
    }
    holders
}

/// The holders of every socket inode that `keep` accepts, from every process's fds,
/// until `stop` is set. Processes that exit meanwhile or deny access are skipped.
fn collect(keep: impl Fn(u64) -> bool, stop: &AtomicBool) -> HolderMap {
    let mut pairs = Vec::new();
    if let Ok(procs) = all_processes() {
        for proc in procs.flatten() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let pid = proc.pid() as u32;
            for_each_socket_inode(pid, |inode| pairs.push((pid, inode)));
        }
    }
    group(pairs, keep)
}

/// Calls `f` with the inode of every socket among `pid`'s open files. One readlinkat
/// per fd, into a stack buffer: procfs's fd iterator also opens and stats each fd (four
/// system calls instead of one, and allocations), on the path that dominates start-up
/// with tens of thousands of sockets.
fn for_each_socket_inode(pid: u32, mut f: impl FnMut(u64)) {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    let path = format!("/proc/{pid}/fd");
    let (Ok(dir), Ok(entries)) = (std::fs::File::open(&path), std::fs::read_dir(&path)) else {
        return;
    };
    let mut name = [0u8; 24];
    let mut link = [0u8; 40];
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let bytes = file_name.as_bytes();
        // An fd number, NUL-terminated.
        let Some(dst) = name.get_mut(..bytes.len()) else {
            continue;
        };
        dst.copy_from_slice(bytes);
        if let Some(nul) = name.get_mut(bytes.len()) {
            *nul = 0;
        } else {
            continue;
        }
        // SAFETY: `name` is NUL-terminated; readlinkat writes at most `link.len()` bytes.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr().cast(),
                link.as_mut_ptr().cast(),
                link.len(),
            )
        };
        if let Some(inode) = usize::try_from(n)
            .ok()
            .and_then(|n| link.get(..n))
            .and_then(parse_socket_link)
        {
            f(inode);
        }
    }
}

/// The inode of an fd link `socket:[12345]`.
pub fn parse_socket_link(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// This process's resident memory.
pub fn own_rss_bytes() -> Option<u64> {
    let statm = Process::myself().ok()?.statm().ok()?;
    Some(statm.resident * procfs::page_size())
}

/// Name, fd count and fd limit of a process; `None` when it is gone.
pub fn proc_info(pid: u32) -> Option<ProcInfo> {
    let proc = Process::new(pid as i32).ok()?;
    let comm = proc.stat().ok()?.comm;
    let fds = proc.fd_count().ok().map_or(0, |n| n as u64);
    let fd_limit = proc
        .limits()
        .ok()
        .and_then(|l| match l.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(v) => Some(v),
            procfs::process::LimitValue::Unlimited => None,
        });
    // One read of /proc/PID/cgroup for both: the v2 path, and the container and pod
    // that any of its lines name (cgroup v1 hosts name them in the v1 lines).
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let identity = crate::host::container::identity_cached(&cgroups);
    Some(ProcInfo {
        comm,
        fds,
        fd_limit,
        cgroup: crate::host::cgroup::parse_cgroup(&cgroups),
        names: identity
            .container
            .as_ref()
            .and_then(crate::host::runtime::lookup),
        identity,
    })
}

/// A process's name alone (`/proc/PID/stat`): what naming the owner of a timewait
/// socket needs, without the fd count (a walk of /proc/PID/fd, long for a server
/// holding tens of thousands) and the rest of `proc_info`.
pub fn comm(pid: u32) -> Option<String> {
    Some(Process::new(pid as i32).ok()?.stat().ok()?.comm)
}

/// Inode of this process's network namespace (`/proc/self/ns/net`).
pub fn own_netns() -> u32 {
    std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|p| {
            let s = p.to_string_lossy().into_owned();
            s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn pid_zero_never_hides_a_holder() {
        let mut m = HolderMap::default();
        m.add(5, 0);
        m.add(5, 42);
        assert_eq!(m.get(5), &[42]);
        m.add(6, 0);
        assert!(!m.contains(6));
    }

    #[test]
    fn holder_map_keeps_one_two_and_many() {
        let index = FdIndex::with_holders([
            (1, vec![10]),
            (2, vec![20, 21]),
            (3, vec![30, 31, 32]),
            (4, vec![]),
        ]);
        assert_eq!(index.holders(1), [10]);
        assert_eq!(index.holders(2), [20, 21]);
        assert_eq!(index.holders(3), [30, 31, 32]);
        assert_eq!(index.holders(4), [] as [u32; 0]);
        assert_eq!(index.holders(5), [] as [u32; 0]);
        assert_eq!(index.len(), 3);
        // Pairs from a listing: repeats kept once, a third holder spills over.
        let mut map = group(
            vec![(7, 1), (7, 1), (8, 1), (9, 1), (8, 1), (7, 2), (5, 3)],
            |inode| inode != 3,
        );
        assert_eq!(map.get(1), [7, 8, 9]);
        assert_eq!(map.get(2), [7]);
        assert_eq!(map.get(3), [] as [u32; 0]);
        map.retain(|inode| inode == 1);
        assert_eq!((map.len(), map.get(1)), (1, &[7, 8, 9][..]));
    }

    #[test]
    fn finds_our_own_socket_and_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode: u64 = link
            .to_string_lossy()
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap();
        let mut index = FdIndex::new(Duration::ZERO, Duration::from_secs(60));
        index.ensure([inode]);
        assert_eq!(index.holders(inode), [std::process::id()]);
        assert_eq!(index.scans, 1);
        // Known inode, fresh index: no rescan.
        index.ensure([inode]);
        assert_eq!(index.scans, 1);
        let me = proc_info(std::process::id()).unwrap();
        assert_eq!(comm(std::process::id()).as_ref(), Some(&me.comm));
        assert!(me.fds >= 3);
        assert!(me.fd_limit.is_some());
        assert_ne!(own_netns(), 0);
    }

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link(b"socket:[4026531993]"), Some(4026531993));
        assert_eq!(parse_socket_link(b"pipe:[12]"), None);
        assert_eq!(parse_socket_link(b"socket:[12"), None);
        assert_eq!(parse_socket_link(b"socket:[x]"), None);
        assert_eq!(parse_socket_link(b"/dev/null"), None);
    }

    #[test]
    fn holderless_inodes_do_not_force_rescans() {
        let mut index = FdIndex::new(Duration::ZERO, Duration::from_secs(60));
        index.budget = Budget::new(0);
        // No process holds this inode (a kernel socket, or a holder we cannot see).
        let nobody = u64::MAX - 7;
        index.ensure([nobody]);
        assert_eq!(index.scans, 1);
        index.ensure([nobody]);
        assert_eq!(index.scans, 1, "rescanned for an inode known to be missing");
        // A new inode still triggers a rescan.
        index.ensure([nobody, nobody - 1]);
        assert_eq!(index.scans, 2);
    }

    #[test]
    fn scans_are_spaced_by_their_cost() {
        let mut index = FdIndex::new(Duration::ZERO, Duration::from_secs(60));
        index.ensure([u64::MAX - 7]);
        assert_eq!(index.scans, 1);
        // Pretend the scan was expensive: a new inode waits for the budget.
        index.budget.spent(Duration::from_secs(1));
        index.ensure([u64::MAX - 8]);
        assert_eq!(index.scans, 1);
    }
}
