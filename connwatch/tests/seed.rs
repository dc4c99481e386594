//! Root integration test of the start-up seed's TCP socket iterator (`iter/tcp`),
//! against a sock_diag dump with `tcp_info` of the same sockets: the same sockets in
//! the same states with the same inodes, queues, timers and ages, and only those of
//! the namespace the iterator was opened in.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use connwatch::{
    decode::TcpState,
    host::sockdiag::{self, DiagSocket, Query},
    probe::{HookChoice, Probe, ProbeOptions, TcpSockets, default_btf_path},
};

fn iterator() -> TcpSockets {
    let mut probe = Probe::load(&ProbeOptions {
        hook: HookChoice::Auto,
        ring_bytes: 1 << 16,
        max_sockets: 1 << 16,
        btf_path: default_btf_path(),
        verbose: false,
        filter: Default::default(),
        stacks: false,
    })
    .expect("load the probe");
    probe
        .take_tcp_sockets()
        .expect("this kernel has the TCP socket iterator")
}

/// Sockets made on a fresh listener, kept until dropped: clients in CLOSE_WAIT with
/// unread data, the server's orphans in FIN_WAIT2 (timewait sockets), clients in
/// TIME_WAIT, and established pairs with data queued both ways.
struct Sockets {
    port: u16,
    _keep: Vec<TcpStream>,
    _listener: TcpListener,
}

fn make_sockets() -> Sockets {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut keep = Vec::new();
    let pair = || {
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = listener.accept().unwrap();
        (c, s)
    };
    // The server writes and closes: the client sits in CLOSE_WAIT with 5 bytes and the
    // FIN unread.
    for _ in 0..3 {
        let (c, mut s) = pair();
        s.write_all(b"hello").unwrap();
        drop(s);
        keep.push(c);
    }
    // The client closes first, then the server: the client's side is TIME_WAIT.
    for _ in 0..2 {
        let (c, mut s) = pair();
        drop(c);
        let mut buf = [0u8; 8];
        while s.read(&mut buf).unwrap() > 0 {}
        drop(s);
    }
    // Established, with bytes unread on both sides.
    for _ in 0..2 {
        let (mut c, mut s) = pair();
        c.write_all(b"ping").unwrap();
        s.write_all(b"pong!").unwrap();
        keep.extend([c, s]);
    }
    Sockets {
        port,
        _keep: keep,
        _listener: listener,
    }
}

type Key = (SocketAddr, SocketAddr);

fn by_tuple(sockets: Vec<DiagSocket>, port: u16) -> BTreeMap<Key, DiagSocket> {
    sockets
        .into_iter()
        .filter(|s| s.local.port() == port || s.remote.port() == port)
        .map(|s| ((s.local, s.remote), s))
        .collect()
}

/// Waits until the kernel lists what `make_sockets` leads to (orphans and TIME_WAITs
/// come from softirq, a moment after the calls return).
fn settled(port: u16) -> BTreeMap<Key, DiagSocket> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = by_tuple(sockdiag::dump(Query::all()).unwrap(), port);
        let count = |state: TcpState| listed.values().filter(|s| s.state == state).count();
        // 3 CLOSE_WAIT + their 3 orphans, 2 TIME_WAIT, 4 ESTABLISHED, the listener.
        if count(TcpState::CLOSE_WAIT) == 3
            && count(TcpState::TIME_WAIT) == 2
            && count(TcpState::FIN_WAIT2) == 3
            && listed.len() == 13
        {
            return listed;
        }
        assert!(
            Instant::now() < deadline,
            "sockets did not settle: {listed:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_iterator_lists_what_sock_diag_lists() {
    let iter = iterator();
    let made = make_sockets();
    settled(made.port);
    // Ages of a second, so that a wrong tick rate or stamp shows beyond the tolerance.
    std::thread::sleep(Duration::from_secs(1));
    let diag = by_tuple(sockdiag::dump(Query::all_with_info()).unwrap(), made.port);
    let listed = by_tuple(iter.list().unwrap(), made.port);
    assert_eq!(listed.len(), 13, "{listed:#?}");
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        diag.keys().collect::<Vec<_>>()
    );
    // Ages are read a moment apart, in ticks (4 ms at 250 Hz): close, not equal.
    let near = |a: Option<u32>, b: Option<u32>| match (a, b) {
        (Some(a), Some(b)) => a.abs_diff(b) <= 100,
        (a, b) => a == b,
    };
    for (key, d) in &diag {
        let s = &listed[key];
        let what = format!("{key:?}: iterator {s:?}, sock_diag {d:?}");
        assert_eq!(
            (s.state, s.timewait, s.inode, s.uid),
            (d.state, d.timewait, d.inode, d.uid),
            "{what}"
        );
        assert!(
            s.expires_ms.abs_diff(d.expires_ms) <= 100 || !d.timewait,
            "{what}"
        );
        if d.state == TcpState::LISTEN {
            continue;
        }
        // Unread bytes and ages only for the states whose evidence the reports read.
        if d.timewait || !matches!(d.state, TcpState::CLOSE_WAIT | TcpState::FIN_WAIT2) {
            assert_eq!(
                (s.recv_q, s.last_ack_recv_ms, s.bytes_received),
                (0, None, None),
                "{what}"
            );
            continue;
        }
        assert_eq!(s.recv_q, d.recv_q, "{what}");
        assert_eq!(s.bytes_received, d.bytes_received, "{what}");
        assert!(near(s.last_ack_recv_ms, d.last_ack_recv_ms), "{what}");
        assert!(near(s.last_data_recv_ms, d.last_data_recv_ms), "{what}");
        assert!(near(s.last_data_sent_ms, d.last_data_sent_ms), "{what}");
    }
    // What the seed reads is there: CLOSE_WAIT sockets with inodes and their unread
    // bytes (5 and the FIN), the orphans as timewait sockets with a running timer.
    let cw: Vec<&DiagSocket> = listed
        .values()
        .filter(|s| s.state == TcpState::CLOSE_WAIT)
        .collect();
    assert_eq!(cw.len(), 3);
    assert!(cw.iter().all(|s| s.inode != 0 && s.recv_q == 6), "{cw:?}");
    let orphans = listed
        .values()
        .filter(|s| s.timewait && s.state == TcpState::FIN_WAIT2 && s.expires_ms > 0);
    assert_eq!(orphans.count(), 3);
}

#[test]
fn the_iterator_lists_the_namespace_it_is_opened_in() {
    let iter = std::sync::Arc::new(iterator());
    let made = make_sockets();
    settled(made.port);
    // A thread in a namespace of its own sees only that namespace's sockets.
    let inside = std::sync::Arc::clone(&iter);
    let (port, listed) = std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let lo = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        // `ip` runs in the namespace of the thread that starts it.
        assert!(lo.unwrap().success());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, _) = listener.accept().unwrap();
        (port, inside.list().unwrap())
    })
    .join()
    .unwrap();
    let states: Vec<TcpState> = listed.iter().map(|s| s.state).collect();
    assert_eq!(listed.len(), 3, "listener and one pair only: {listed:?}");
    assert!(
        listed
            .iter()
            .all(|s| s.local.port() == port || s.remote.port() == port)
    );
    assert!(states.contains(&TcpState::LISTEN), "{states:?}");
    // And the host's namespace, opened here, has the sockets made here.
    assert_eq!(by_tuple(iter.list().unwrap(), made.port).len(), 13);
}
