//! Network namespaces. The tracepoint sees every namespace, but sock_diag and the
//! `net.ipv4.*` sysctls answer for the namespace of the thread that asks: to cover
//! containers, each distinct namespace found under /proc/*/ns/net is entered by a
//! short-lived thread (setns affects only the calling thread).
use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// The network namespaces that exist now, by inode, ours included.
#[derive(Default)]
pub struct Found {
    /// A path to enter each: the bind mount `ip netns` (or a CNI plugin) keeps under
    /// /run/netns, which lasts as long as the namespace, else a process's.
    pub enter: BTreeMap<u32, PathBuf>,
    /// /proc/PID of a process in each that has one: its per-namespace files
    /// (net/sockstat) read there without entering the namespace.
    pub procs: BTreeMap<u32, PathBuf>,
}

/// Distinct network namespaces: those of every process, and those kept by `ip netns`
/// under /run/netns with no process yet.
pub fn all() -> Found {
    let mut found = Found::default();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            // A bind mount of the namespace: its inode is the namespace's.
            if let Ok(meta) = entry.metadata() {
                found.enter.entry(meta.ino() as u32).or_insert(entry.path());
            }
        }
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        if let Some(inode) = inode_of(&path) {
            found.enter.entry(inode).or_insert(path);
            found.procs.entry(inode).or_insert_with(|| entry.path());
        }
    }
    found
}

/// `SO_NETNS_COOKIE` (Linux 5.14): a namespace's 64-bit id, never reused.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace. Unlike its inode number, which
/// the kernel hands to the next namespace created once it is freed (within
/// milliseconds on a node that churns pods), a cookie names one namespace for good.
pub fn cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned (and closed) below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Inode number of a namespace link such as `/proc/1/ns/net` (`net:[4026531840]`).
pub fn inode_of(path: &Path) -> Option<u32> {
    let link = std::fs::read_link(path).ok()?;
    parse_ns_link(&link.to_string_lossy())
}

pub fn parse_ns_link(link: &str) -> Option<u32> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Runs `f` in the network namespace at `path`, on a thread of its own.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(path)?;
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace fd; it changes only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("namespace worker panicked"))?
}

/// Runs `f(namespace)` in each namespace in turn, all on one thread of its own (setns moves only
/// that thread): one thread per round rather than one per namespace.
pub fn run_in_each<T: Send + 'static>(
    namespaces: Vec<(u32, PathBuf)>,
    f: impl Fn(u32) -> io::Result<T> + Send + 'static,
) -> Vec<(u32, io::Result<T>)> {
    let worker = std::thread::spawn(move || {
        namespaces
            .into_iter()
            .map(|(ns, path)| {
                let entered = File::open(&path).and_then(|file| {
                    // SAFETY: setns on an open namespace fd; it changes only this thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
                (ns, entered.and_then(|()| f(ns)))
            })
            .collect()
    });
    worker.join().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_links() {
        assert_eq!(parse_ns_link("net:[4026531840]"), Some(4026531840));
        assert_eq!(parse_ns_link("mnt:[4026531840]"), None);
        assert_eq!(parse_ns_link("net:[x]"), None);
    }

    #[test]
    fn our_namespace_has_a_cookie() {
        // Linux 5.14 or later; the same namespace, the same cookie.
        let a = cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(cookie().unwrap(), a);
    }

    #[test]
    fn finds_our_namespace() {
        let ours = inode_of(Path::new("/proc/self/ns/net")).unwrap();
        let found = all();
        assert!(found.enter.contains_key(&ours));
        assert!(found.procs.contains_key(&ours));
        let seen = run_in(Path::new("/proc/self/ns/net"), || {
            Ok(inode_of(Path::new("/proc/thread-self/ns/net")))
        })
        .unwrap();
        assert_eq!(seen, Some(ours));
    }
}
