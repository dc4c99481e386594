//! Root integration test of the map where `watch`'s probe keeps each socket's closer
//! from its close() to its CLOSE (`CLOSERS`): what it holds is let go however the
//! closing ends, and the TIME_WAITs it names are the closer's. A file of its own: the
//! probe sees every socket of the host, so another test's closing sockets would be in
//! the map beside this one's.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use common::*;

common::peer_entry!();

/// The id of connwatch's `CLOSERS` map, found among the BPF maps its fds hold.
fn closers_map(pid: i32, bpftool: &str) -> u32 {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap();
    for fd in fds.flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let out = run(Command::new(bpftool).args(["map", "show", "id", &id.to_string(), "-j"]));
        let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if map["name"] == "CLOSERS" {
            return id;
        }
    }
    panic!("connwatch (pid {pid}) holds no CLOSERS map");
}

/// Entries in the map now.
fn entries(id: u32, bpftool: &str) -> usize {
    let out = run(Command::new(bpftool).args(["map", "dump", "id", &id.to_string(), "-j"]));
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    dump.as_array().map_or(0, Vec::len)
}

/// Waits until `pred` holds of the map's entry count; the last count.
fn wait_entries(id: u32, bpftool: &str, what: &str, pred: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = entries(id, bpftool);
        if pred(n) {
            return n;
        }
        assert!(Instant::now() < deadline, "{what}: {n} entries in CLOSERS");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A listener whose accepted sockets have a small receive buffer (set before listen(),
/// which accepted sockets inherit), so that a client that writes and never gets read
/// fills it quickly.
fn small_listener() -> TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    s.listen(128).unwrap();
    s.into()
}

/// A client that wrote until neither its send buffer nor the server's receive buffer
/// had room, then closed: its FIN waits behind the data, in FIN_WAIT1.
fn stuck_in_fin_wait1(l: &TcpListener) -> TcpStream {
    let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    c.set_send_buffer_size(4096).unwrap();
    c.connect(&l.local_addr().unwrap().into()).unwrap();
    let mut c: TcpStream = c.into();
    let (server, _) = l.accept().unwrap();
    c.set_nonblocking(true).unwrap();
    let chunk = [7u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut blocked = 0;
    // The buffers are full once writes keep failing for a while (the kernel moves data
    // from one to the other meanwhile).
    while blocked < 20 {
        assert!(Instant::now() < deadline, "the buffers never filled");
        match c.write(&chunk) {
            Ok(_) => blocked = 0,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                blocked += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    drop(c);
    server
}

/// The closers the probe keeps are let go however the closing ends: a TIME_WAIT birth,
/// a reset in FIN_WAIT1 (a close() whose FIN never left), a reset after shutdown(), a
/// server that closes first. While sockets are stuck in FIN_WAIT1 the map holds them;
/// the TIME_WAITs are named after the closer, carried from its close().
#[test]
fn closers_are_kept_until_their_sockets_end() {
    require_root();
    let bpftool = tool("/usr/sbin/bpftool", "bpftool");
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "500ms"]);
    let id = closers_map(cw.pid(), &bpftool);
    const STUCK: usize = 10;

    // close() with the FIN stuck behind unread data: held until the server's reset.
    let l = small_listener();
    let servers: Vec<TcpStream> = (0..STUCK).map(|_| stuck_in_fin_wait1(&l)).collect();
    wait_entries(id, &bpftool, "the stuck closers kept", |n| n >= STUCK);
    // The server closes with unread data: a reset, FIN_WAIT1 -> CLOSE.
    drop(servers);

    // Clients closing first (TIME_WAIT births), after shutdown() and a reset, and a
    // server closing first.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap();
    const CLOSED_FIRST: usize = 20;
    for _ in 0..CLOSED_FIRST {
        let mut c = TcpStream::connect(target).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"x").unwrap();
        drop(c);
        let mut buf = [0u8; 8];
        while s.read(&mut buf).unwrap() > 0 {}
    }
    for _ in 0..5 {
        let c = TcpStream::connect(target).unwrap();
        let (s, _) = l.accept().unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        let mut buf = [0u8; 8];
        let _ = (&c).read(&mut buf);
    }
    const SERVER_FIRST: usize = 5;
    for _ in 0..SERVER_FIRST {
        let mut c = TcpStream::connect(target).unwrap();
        let (s, _) = l.accept().unwrap();
        drop(s);
        let mut buf = [0u8; 8];
        while c.read(&mut buf).unwrap() > 0 {}
    }
    wait_entries(id, &bpftool, "every closer let go", |n| n == 0);

    // The TIME_WAITs of those that closed first are this process's, from its close().
    let me = std::process::id();
    let r = wait_report(&mut cw, "this process owning its TIME_WAITs", |r| {
        process(r, me)
            .is_some_and(|p| p["time_wait"].as_u64() >= Some((CLOSED_FIRST + SERVER_FIRST) as u64))
    });
    let p = process(&r, me).unwrap();
    assert!(
        p["owner_sources"]
            .as_array()
            .is_some_and(|s| s.contains(&serde_json::json!("carried"))),
        "{p}"
    );
}
