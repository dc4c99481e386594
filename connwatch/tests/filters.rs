//! Root integration tests of the kernel-side filters (`--pid`, `--port`, `--family`,
//! `--cgroup`), of loss under a stalled consumer, and of filter validation.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;

common::peer_entry!();

/// A server/client exchange where the client closes first; returns (server, client,
/// server port).
fn exchange(ip: &str) -> (Peer, Peer, u16) {
    let mut server = Peer::spawn(&["closer", &addr(ip, 0), "1", "0"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn(&["clients", &addr(ip, port), "1"]);
    client.expect("closed");
    server.expect("done");
    (server, client, port)
}

/// Waits until the trace printed `LAST_ACK -> CLOSE` of a socket on `port`, then a
/// little more (the connection's last rows), and returns all rows.
fn rows_until_server_done(cw: &mut Connwatch, port: u16) -> Vec<Row> {
    cw.stdout.wait_for("the server side's end", |l| {
        serde_json::from_str::<Row>(l)
            .is_ok_and(|r| r.sport == port && r.old == "LAST_ACK" && r.new == "CLOSE")
    });
    cw.stdout.drain(Duration::from_millis(300));
    parse_rows(&cw.stdout.seen)
}

#[test]
fn pid_filter_keeps_the_server_and_its_accepted_sockets() {
    require_root();
    // The server must exist before connwatch validates --pid: start it, then trace.
    let mut server = Peer::spawn(&["closer", "127.0.0.1:0", "1", "0"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let spid = server.pid().to_string();
    let mut cw = Connwatch::start(&["trace", "--json", "--pid", &spid]);
    let mut client = Peer::spawn(&["clients", &addr("127.0.0.1", port), "1"]);
    let cport: u16 = client.expect("local").parse().unwrap();
    server.expect("done");
    let rows = rows_until_server_done(&mut cw, port);
    // The accepted socket's softirq rows (no owner yet) pass through its listener.
    let accepted: Vec<_> = rows
        .iter()
        .filter(|r| r.sport == port && r.dport == cport)
        .map(|r| format!("{}->{}", r.old, r.new))
        .collect();
    assert_eq!(
        accepted,
        [
            "LISTEN->SYN_RECV",
            "SYN_RECV->ESTABLISHED",
            "ESTABLISHED->CLOSE_WAIT",
            "CLOSE_WAIT->LAST_ACK",
            "LAST_ACK->CLOSE"
        ]
    );
    // Nothing of the client's own socket, nor of anyone else.
    assert!(rows.iter().all(|r| r.sport == port), "{rows:?}");
    assert!(rows.iter().all(|r| r.pid.is_none_or(|p| p == server.pid())));
}

#[test]
fn port_and_family_filters() {
    require_root();
    let mut cw = Connwatch::start(&["trace", "--json", "--family", "ipv6"]);
    let (_s4, _c4, port4) = exchange("127.0.0.1");
    let (_s6, _c6, port6) = exchange("::1");
    let rows = rows_until_server_done(&mut cw, port6);
    assert!(rows.iter().all(|r| r.family == "ipv6"), "{rows:?}");
    assert!(!rows.iter().any(|r| r.sport == port4 || r.dport == port4));

    // --port: a server's port; another exchange at the same time stays out.
    let mut server = Peer::spawn(&["closer", "127.0.0.1:0", "1", "0"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut cw = Connwatch::start(&["trace", "--json", "--port", &port.to_string()]);
    let (_s, _c, other) = exchange("127.0.0.1");
    let mut client = Peer::spawn(&["clients", &addr("127.0.0.1", port), "1"]);
    client.expect("closed");
    server.expect("done");
    let rows = rows_until_server_done(&mut cw, port);
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|r| r.sport == port || r.dport == port),
        "{rows:?}"
    );
    assert!(!rows.iter().any(|r| r.sport == other || r.dport == other));
}

#[test]
fn cgroup_filter_keeps_sockets_created_in_the_cgroup() {
    require_root();
    let cg = Cgroup::new(&format!("cw-test-{}", std::process::id()));
    let mut server = Peer::spawn(&["closer", "127.0.0.1:0", "2", "0"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut inside = Peer::spawn_with(None, &["clients", &addr("127.0.0.1", port), "1"], true);
    inside.expect("ready");
    cg.add(inside.pid());
    let mut cw = Connwatch::start(&["trace", "--json", "--cgroup", cg.0.to_str().unwrap()]);
    // One client outside the cgroup, then one inside.
    let mut outside = Peer::spawn(&["clients", &addr("127.0.0.1", port), "1"]);
    let out_port: u16 = outside.expect("local").parse().unwrap();
    outside.expect("closed");
    inside.send("go");
    let in_port: u16 = inside.expect("local").parse().unwrap();
    inside.expect("closed");
    server.expect("done");
    cw.stdout.wait_for("the inside client's close", |l| {
        serde_json::from_str::<Row>(l).is_ok_and(|r| r.sport == in_port && r.new == "CLOSE")
    });
    cw.stdout.drain(Duration::from_millis(300));
    let rows = parse_rows(&cw.stdout.seen);
    assert!(
        rows.iter()
            .all(|r| r.sport == in_port || r.dport == port && r.sport == 0),
        "{rows:?}"
    );
    assert!(!rows.iter().any(|r| r.sport == out_port), "{rows:?}");
    drop(inside);
}

#[test]
fn bad_filters_get_one_line() {
    for (args, code, want) in [
        (
            &["trace", "--pid", "999999999"][..],
            1,
            "no process with pid",
        ),
        (&["snapshot", "--cgroup", "/tmp"], 1, "not a cgroup v2"),
        (&["trace", "--port", "0"], 2, "error:"),
        (&["watch", "--family", "ipx"], 2, "error:"),
        (
            &[
                "trace", "--pid", "1", "--pid", "1", "--pid", "1", "--pid", "1", "--pid", "1",
                "--pid", "1", "--pid", "1", "--pid", "1", "--pid", "1",
            ],
            1,
            "at most 8",
        ),
    ] {
        let out = Command::new(CONNWATCH).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            err.lines().next().unwrap_or("").contains(want),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"));
        if code == 1 {
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
}

/// A stalled consumer under a flood: drops are counted, every event is accounted for
/// (received + dropped = produced) and connwatch carries on afterwards.
#[test]
fn stalled_consumer_counts_drops_and_recovers() {
    require_root();
    let mut cw = Connwatch::start(&["trace", "--json", "--ring-size", "8K"]);
    cw.signal(libc::SIGSTOP);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap();
    for _ in 0..300 {
        let c = std::net::TcpStream::connect(target).unwrap();
        let (s, _) = l.accept().unwrap();
        drop(c);
        drop(s);
    }
    cw.signal(libc::SIGCONT);
    // Recovered: a new connection after the stall shows up.
    let (_server, client, port) = exchange("127.0.0.1");
    let _ = client;
    cw.stdout.wait_for("rows after the stall", |l| {
        serde_json::from_str::<Row>(l).is_ok_and(|r| r.sport == port && r.new == "CLOSE")
    });
    cw.signal(libc::SIGINT);
    assert!(cw.wait_exit().success());
    let err = cw.stderr.drain(Duration::from_millis(200));
    let summary = err
        .iter()
        .find(|l| l.contains(" received"))
        .unwrap_or_else(|| panic!("{err:?}"));
    let nums: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (seen, received, dropped) = (nums[0], nums[1], nums[2]);
    eprintln!("stall: {summary}");
    assert!(dropped > 0, "{summary}");
    assert_eq!(seen, received + dropped, "uncounted loss: {summary}");
    assert!(summary.contains("raise --ring-size"), "{summary}");
    cw.stdout.drain(Duration::from_millis(200));
    let rows = cw.stdout.seen.iter().filter(|l| l.starts_with('{')).count() as u64;
    assert_eq!(
        rows - synthetic_rows(&cw.stdout.seen),
        received,
        "{summary}"
    );
}

/// Rows inferred by polling (TIME_WAIT) are printed but not received from the ring.
fn synthetic_rows(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter(|l| l.contains("\"synthetic\":true"))
        .count() as u64
}

/// `--pid` follows one process: another process's 200 CLOSE_WAIT sockets are not its
/// loss (their events are filtered in the kernel, so a dump must not take them for
/// missed transitions), and the header counts only the selected process's sockets.
#[test]
fn pid_filter_is_not_counted_as_loss() {
    require_root();
    let mut mine = Peer::spawn(&["leaker", "127.0.0.1:0", "2"]);
    let my_port: u16 = mine.expect("port").parse().unwrap();
    let pid = mine.pid().to_string();
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "500ms", "--pid", &pid]);
    let mut my_clients = Peer::spawn(&["clients", &addr("127.0.0.1", my_port), "2"]);
    my_clients.expect("closed");
    mine.expect("accepted");
    let mut other = Peer::spawn(&["leaker", "127.0.0.1:0", "200"]);
    let port: u16 = other.expect("port").parse().unwrap();
    let mut clients = Peer::spawn(&["clients", &addr("127.0.0.1", port), "200"]);
    clients.expect("closed");
    other.expect("accepted");
    // Long enough for several full dumps to have listed the other's sockets twice.
    let start = Instant::now();
    let mut reports = 0;
    wait_report(&mut cw, "reports for 4 s after the other's leak", |r| {
        reports += 1;
        assert_eq!(
            r["loss"]["sockets_untracked"], 0,
            "another process's sockets counted as loss: {}",
            r["loss"]
        );
        let held = r["states"]["CLOSE_WAIT"].as_u64().unwrap_or(0);
        assert!(
            held <= 2,
            "the header counts other processes: {}",
            r["states"]
        );
        start.elapsed() >= Duration::from_secs(4) && held == 2
    });
    assert!(reports >= 4, "{reports} reports");
    let r = wait_report(&mut cw, "the selected leaker's row", |r| {
        process(r, mine.pid()).is_some()
    });
    let me = process(&r, mine.pid()).unwrap();
    assert_eq!(me["close_wait"], 2, "{me}");
}

const REUSEPORT_LEAKER: &str = r#"
import sys, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"#;

/// `--pid` on one of two workers sharing a port with SO_REUSEPORT: the sockets the
/// kernel hands to that worker are followed from their own transitions (the listener
/// map keeps every process listening on a port), none taken for a missed one.
#[test]
fn pid_filter_follows_one_reuseport_sibling() {
    require_root();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    /// A worker, killed with the test (a panic included).
    struct Worker(std::process::Child);
    impl Drop for Worker {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let start = |script: &str| {
        let mut child = Worker(
            Command::new("python3")
                .args(["-c", script, &port.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("python3"),
        );
        let mut out = Lines::new(child.0.stdout.take().unwrap());
        out.wait_for("the worker to listen", |l| l == "ready");
        (child, out)
    };
    let (first, _out1) = start(REUSEPORT_LEAKER);
    let pid = first.0.id().to_string();
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "500ms", "--pid", &pid]);
    // The sibling listens after connwatch started: the kernel sees its listen().
    let (_second, _out2) = start(REUSEPORT_LEAKER);
    let mut clients = Peer::spawn(&["clients", &addr("127.0.0.1", port), "40"]);
    clients.expect("closed");
    let first_pid = first.0.id();
    let started = Instant::now();
    let r = wait_report(&mut cw, "the first worker's CLOSE_WAITs, 3 s on", |r| {
        assert_eq!(
            r["loss"]["sockets_untracked"], 0,
            "the selected sibling's sockets taken for missed ones: {}",
            r["loss"]
        );
        started.elapsed() > Duration::from_secs(3)
            && process(r, first_pid).is_some_and(|p| p["close_wait"].as_u64() >= Some(1))
    });
    let mine = process(&r, first_pid).unwrap()["close_wait"]
        .as_u64()
        .unwrap();
    assert_eq!(
        r["states"]["CLOSE_WAIT"].as_u64(),
        Some(mine),
        "{}",
        r["states"]
    );
}
