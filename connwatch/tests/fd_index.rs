//! Root integration test of the fd index built by the probe's socket-fd iterator
//! (`iter/task_file`), against /proc on the same processes: the same (pid, fd, inode)
//! triples, and the same holders for every socket, fork-shared ones included.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{collections::BTreeSet, net::TcpStream, time::Duration};

use common::*;
use connwatch::{
    host::owners::{FdIndex, parse_socket_link},
    probe::{HookChoice, Probe, ProbeOptions, default_btf_path},
};
use rustc_hash::FxHashSet;

common::peer_entry!();

fn probe() -> Probe {
    Probe::load(&ProbeOptions {
        hook: HookChoice::Auto,
        ring_bytes: 1 << 16,
        max_sockets: 1 << 16,
        btf_path: default_btf_path(),
        verbose: false,
        filter: Default::default(),
        stacks: false,
    })
    .expect("load the probe")
}

/// (pid, fd, inode) of every socket among `pid`'s fds, read from /proc.
fn proc_socket_fds(pid: u32) -> BTreeSet<(u32, u32, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let inode = parse_socket_link(link.to_str()?.as_bytes())?;
            Some((pid, fd, inode))
        })
        .collect()
}

#[test]
fn iterator_fd_index_matches_proc() {
    require_root();
    // A server holding 3 accepted sockets, shared with a forked child; and its clients.
    let mut server = Peer::spawn(&["forkleaker", "127.0.0.1:0", "3"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    server.expect("accepted");
    let child: u32 = server.expect("child").parse().unwrap();
    let pids = [server.pid(), child, std::process::id()];

    let mut p = probe();
    let iter = p
        .take_socket_fds()
        .expect("this kernel has the socket-fd iterator");
    let listed: BTreeSet<(u32, u32, u64)> = iter
        .scan()
        .unwrap()
        .into_iter()
        .filter(|f| pids.contains(&f.pid))
        .map(|f| (f.pid, f.fd, f.inode))
        .collect();
    let from_proc: BTreeSet<(u32, u32, u64)> =
        pids.iter().flat_map(|&pid| proc_socket_fds(pid)).collect();
    // Listener + 3 accepted in the server, the same 3 + listener in its child, 3 here.
    assert!(from_proc.len() >= 11, "{from_proc:?}");
    assert_eq!(listed, from_proc);

    // The index built from the iterator names the same holders as one built from /proc.
    let wanted: FxHashSet<u64> = from_proc.iter().map(|t| t.2).collect();
    let mut by_proc = FdIndex::new(Duration::ZERO, Duration::from_secs(60));
    by_proc.scan(&wanted);
    let mut by_iter = FdIndex::new(Duration::ZERO, Duration::from_secs(60));
    by_iter.use_source(Box::new(iter));
    by_iter.scan(&wanted);
    for inode in &wanted {
        let mut a = by_proc.holders(*inode).to_vec();
        let mut b = by_iter.holders(*inode).to_vec();
        a.sort_unstable();
        b.sort_unstable();
        assert!(!a.is_empty(), "socket {inode} has a holder");
        assert_eq!(a, b, "holders of socket {inode}");
    }
    // The fork-shared sockets have both holders.
    let shared = wanted
        .iter()
        .filter(|i| by_iter.holders(**i).len() == 2)
        .count();
    assert!(shared >= 4, "{shared} sockets held by parent and child");
    drop(clients);
}
