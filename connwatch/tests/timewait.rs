//! Root integration tests of the TIME_WAIT lifecycle with real processes on loopback:
//! who closed first owns the TIME_WAIT, orphan FIN_WAIT2 turning into TIME_WAIT, early and
//! natural ends, port pressure inside a network namespace made by the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

common::peer_entry!();

const N: usize = 5;

fn watch(extra: &[&str]) -> Connwatch {
    let mut args = vec![
        "watch",
        "--json",
        "--interval",
        "300ms",
        "--tw-poll",
        "200ms",
    ];
    args.extend_from_slice(extra);
    Connwatch::start(&args)
}

/// Connects to `port`, waits for the server to close, closes: the server closed first.
fn connect_and_await_close(ip: &str, port: u16) -> TcpStream {
    let mut c = TcpStream::connect(addr(ip, port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(c.read(&mut buf).unwrap(), 0, "server should close first");
    c
}

/// A namespace with `tcp_tw_reuse=0`, so that the kernel does not end a TIME_WAIT early
/// by reusing its port for the next connection (it may on loopback by default).
fn quiet_netns(tag: &str) -> NetNs {
    let ns = NetNs::new(tag);
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    ns
}

/// A server that closes first owns its TIME_WAIT sockets and is an `active_closer`;
/// its client holds none.
fn server_closes_first(ip: &str) {
    require_root();
    let ns = quiet_netns(if ip.contains(':') { "sf6" } else { "sf4" });
    // The client's next connect may pick a port whose server-side TIME_WAIT still exists:
    // its SYN ends that TIME_WAIT early (correctly reported). So expect N - 1 at least.
    let min = N as u64 - 1;
    let mut cw = watch(&["--time-wait-min", &min.to_string()]);
    let mut server = Peer::spawn_in(Some(&ns), &["firstcloser", &addr(ip, 0), &N.to_string()]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn_in(
        Some(&ns),
        &["secondclosers", &addr(ip, port), &N.to_string()],
    );
    client.expect("closed");
    server.expect("closed");

    // The listener's holder is found by the next /proc rescan (at most one a second).
    let r = wait_report(&mut cw, "the server flagged for its TIME_WAITs", |r| {
        process(r, server.pid())
            .is_some_and(|p| p["time_wait"].as_u64() >= Some(min) && has_flag(p, "active_closer"))
    });
    let p = process(&r, server.pid()).unwrap();
    assert_eq!(p["owner_sources"], serde_json::json!(["carried"]), "{p}");
    assert!(p["time_wait_oldest_s"].as_f64().unwrap() < 10.0, "{p}");
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("listens on port {port}")),
        "{reason}"
    );
    assert!(p["peers"][0]["time_wait"].as_u64() >= Some(min), "{p}");
    // The client closed second: no TIME_WAIT for it.
    if let Some(c) = process(&r, client.pid()) {
        assert_eq!(c["time_wait"], 0, "{c}");
    }
    assert!(
        r["kernel"]["tcp_max_tw_buckets"].as_u64().is_some(),
        "{}",
        r["kernel"]
    );
    assert!(r["kernel"]["time_wait_overflow"].as_u64().is_some());
}

#[test]
fn server_closing_first_owns_time_wait_ipv4() {
    server_closes_first("127.0.0.1");
}

#[test]
fn server_closing_first_owns_time_wait_ipv6() {
    server_closes_first("::1");
}

/// A client that closes first owns the TIME_WAIT sockets; the server is not flagged.
fn client_closes_first(ip: &str) {
    require_root();
    let ns = quiet_netns(if ip.contains(':') { "cf6" } else { "cf4" });
    let mut cw = watch(&["--time-wait-min", "1"]);
    let mut server = Peer::spawn_in(Some(&ns), &["closer", &addr(ip, 0), &N.to_string(), "0"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn_in(Some(&ns), &["clients", &addr(ip, port), &N.to_string()]);
    client.expect("closed");
    server.expect("done");

    let r = wait_report(&mut cw, "the client's TIME_WAITs", |r| {
        process(r, client.pid()).is_some_and(|p| p["time_wait"] == N as u64)
    });
    let c = process(&r, client.pid()).unwrap();
    assert_eq!(c["owner_sources"], serde_json::json!(["carried"]), "{c}");
    assert!(!has_flag(c, "active_closer"), "{c}");
    assert_eq!(c["peers"][0]["addr"], addr(ip, port), "{c}");
    assert!(c["time_wait_created_per_s"].as_f64().unwrap() > 0.0, "{c}");
    if let Some(s) = process(&r, server.pid()) {
        assert_eq!(s["time_wait"], 0, "{s}");
        assert!(!has_flag(s, "active_closer"), "{s}");
    }
}

#[test]
fn client_closing_first_owns_time_wait_ipv4() {
    client_closes_first("127.0.0.1");
}

#[test]
fn client_closing_first_owns_time_wait_ipv6() {
    client_closes_first("::1");
}

fn trace() -> Connwatch {
    Connwatch::start(&["trace", "--json", "--tw-poll", "200ms"])
}

fn rows_for(cw: &Connwatch, local: u16, remote: u16) -> Vec<Row> {
    parse_rows(&cw.stdout.seen)
        .into_iter()
        .filter(|r| r.sport == local && r.dport == remote)
        .collect()
}

fn is_synthetic(line: &str) -> bool {
    serde_json::from_str::<Value>(line).is_ok_and(|v| v["synthetic"] == true)
}

/// An orphan in FIN_WAIT2 (its process closed, the peer has not) turns into TIME_WAIT
/// when the peer's FIN arrives: trace reports that change.
#[test]
fn orphan_fin_wait2_becomes_time_wait() {
    require_root();
    let mut cw = trace();
    let mut server = Peer::spawn(&["closer", "127.0.0.1:0", "1", "1500"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn(&["clients", &addr("127.0.0.1", port), "1"]);
    let cport: u16 = client.expect("local").parse().unwrap();
    server.expect("done");
    let line = cw.stdout.wait_for("FIN_WAIT2 -> TIME_WAIT", |l| {
        is_synthetic(l)
            && serde_json::from_str::<Row>(l)
                .is_ok_and(|r| r.sport == cport && r.old == "FIN_WAIT2" && r.new == "TIME_WAIT")
    });
    let row: Row = serde_json::from_str(&line).unwrap();
    assert_eq!(row.pid, Some(client.pid()));
    assert_eq!(row.owner_source, "carried");
    // It waited in FIN_WAIT2 for the 1.5 s the server took to close.
    let waited = row.duration_ms.unwrap();
    assert!(
        (waited - 1500.0).abs() < 300.0,
        "FIN_WAIT2 lasted {waited} ms"
    );
    // The real transitions before it: FIN_WAIT2 -> CLOSE (the orphan became a tw socket).
    let seen = rows_for(&cw, cport, port);
    assert!(
        seen.iter()
            .any(|r| r.old == "FIN_WAIT2" && r.new == "CLOSE"),
        "{seen:?}"
    );
}

/// A new SYN from the same client port ends the server's TIME_WAIT early.
#[test]
fn time_wait_ended_by_port_reuse_is_early() {
    require_root();
    let mut cw = trace();
    let mut server = Peer::spawn(&["firstcloser", "127.0.0.1:0", "2"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let bind = |local: SocketAddr| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&local.into()).unwrap();
        s.connect(
            &addr("127.0.0.1", port)
                .parse::<SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        let mut c: TcpStream = s.into();
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0);
        c
    };
    let first = bind("127.0.0.1:0".parse().unwrap());
    let cport = first.local_addr().unwrap().port();
    drop(first);
    cw.stdout.wait_for("the server's TIME_WAIT", |l| {
        is_synthetic(l)
            && serde_json::from_str::<Row>(l)
                .is_ok_and(|r| r.sport == port && r.dport == cport && r.new == "TIME_WAIT")
    });
    let again = bind(format!("127.0.0.1:{cport}").parse().unwrap());
    server.expect("closed");
    let line = cw.stdout.wait_for("the early end", |l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| {
            v["sport"] == port
                && v["dport"] == cport
                && v["old"] == "TIME_WAIT"
                && v["end"] == "early"
        })
    });
    let row: Row = serde_json::from_str(&line).unwrap();
    assert_eq!(row.new, "CLOSE");
    assert_eq!(row.pid, Some(server.pid()));
    assert!(row.duration_ms.unwrap() < 30_000.0, "{line}");
    drop(again);
}

/// A TIME_WAIT followed to its natural end lives the kernel's 60 s.
#[test]
fn time_wait_expires_after_sixty_seconds() {
    require_root();
    let mut cw = trace();
    let mut server = Peer::spawn(&["firstcloser", "127.0.0.1:0", "1"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let c = connect_and_await_close("127.0.0.1", port);
    let cport = c.local_addr().unwrap().port();
    drop(c);
    server.expect("closed");
    let end = Instant::now() + Duration::from_secs(75);
    let row = loop {
        let left = end.saturating_duration_since(Instant::now());
        let Some(line) = cw.stdout.next_within(left) else {
            panic!("no end of TIME_WAIT within 75 s");
        };
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["sport"] == port
            && v["dport"] == cport
            && v["old"] == "TIME_WAIT"
            && v["new"] == "CLOSE"
        {
            break v;
        }
    };
    assert_eq!(row["end"], "expired", "{row}");
    assert_eq!(row["synthetic"], true);
    assert_eq!(row["pid"], server.pid());
    let ms = row["duration_ms"].as_f64().unwrap();
    assert!((ms - 60_000.0).abs() <= 500.0, "TIME_WAIT lasted {ms} ms");
}

/// Port pressure inside a namespace with a 10-port ephemeral range: 7 TIME_WAITs from
/// ephemeral ports to one server are 70 % of it (the server's own listening port comes
/// from the same range, leaving 9). Also proves connwatch looks into other
/// namespaces (sock_diag and sysctls there), and attributes the client's TIME_WAITs.
#[test]
fn port_pressure_in_a_small_port_range() {
    require_root();
    let ns = quiet_netns("pp");
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40009");
    let mut cw = watch(&[]);
    let mut server = Peer::spawn_in(Some(&ns), &["closer", "127.0.0.1:0", "7", "0"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn_in(Some(&ns), &["clients", &addr("127.0.0.1", port), "7"]);
    client.expect("closed");
    server.expect("done");
    // 6 of the 7 are already over 50 %: the flag may show before the seventh is in.
    let r = wait_report(&mut cw, "port pressure", |r| {
        process(r, client.pid()).is_some_and(|p| has_flag(p, "port_pressure"))
    });
    let p = process(&r, client.pid()).unwrap();
    assert!(p["time_wait"].as_u64() >= Some(6), "{p}");
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("to 127.0.0.1:{port}"))
            && reason.contains(" in all, ")
            && reason.contains("40000-40009")
            && reason.contains("tcp_tw_reuse="),
        "{reason}"
    );
    // The host's own range is untouched.
    let host = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    assert!(!host.starts_with("40000"), "{host}");
}

/// A CLOSE_WAIT leak inside another network namespace is found and attributed.
#[test]
fn leak_in_another_namespace_is_attributed() {
    require_root();
    let ns = NetNs::new("leak");
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "300ms",
        "--close-wait-age",
        "1s",
    ]);
    let mut leaker = Peer::spawn_in(Some(&ns), &["leaker", "127.0.0.1:0", "3"]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let mut client = Peer::spawn_in(Some(&ns), &["clients", &addr("127.0.0.1", port), "3"]);
    client.expect("closed");
    leaker.expect("accepted");
    let r = wait_report(&mut cw, "the leak in the namespace", |r| {
        process(r, leaker.pid()).is_some_and(|p| has_flag(p, "close_wait_leak"))
    });
    let p = process(&r, leaker.pid()).unwrap();
    assert_eq!(p["close_wait"], 3, "{p}");
    assert_eq!(p["close_wait_age_source"], "observed", "{p}");
    // snapshot (no BPF) finds it too.
    let out = std::process::Command::new(CONNWATCH)
        .args(["snapshot", "--json", "--close-wait-age", "100d"])
        .output()
        .unwrap();
    let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        process(&snap, leaker.pid()).expect("in snapshot")["close_wait"],
        3
    );
}

/// The synthetic rows of one client port, as JSON values (with their `end`).
fn synthetic_rows_for(cw: &Connwatch, local: u16) -> Vec<Value> {
    cw.stdout
        .seen
        .iter()
        .filter(|l| is_synthetic(l))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["sport"] == local)
        .collect()
}

/// The probe tells a TIME_WAIT birth on the close itself: `trace` shows it although no
/// timewait poll runs during the test (the first is at start, the next 10 minutes on).
#[test]
fn time_wait_birth_needs_no_poll() {
    require_root();
    // The seed's dump (before "attached") is the only look at timewait sockets: the
    // first poll is 10 minutes away.
    let mut cw = Connwatch::start(&["trace", "--json", "--tw-poll", "10m"]);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let cport = c.local_addr().unwrap().port();
    let (mut s, _) = l.accept().unwrap();
    // The client closes first; the server closes once it sees the client's FIN.
    drop(c);
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
    drop(s);
    let line = cw.stdout.wait_for("the client's TIME_WAIT birth", |l| {
        is_synthetic(l)
            && serde_json::from_str::<Row>(l)
                .is_ok_and(|r| r.sport == cport && r.dport == port && r.new == "TIME_WAIT")
    });
    let row: Row = serde_json::from_str(&line).unwrap();
    assert_eq!(row.pid, Some(std::process::id()), "{line}");
    assert_eq!(row.owner_source, "carried", "{line}");
}

/// A close by reset leaves no timewait socket: a client that shut down its sending side
/// (FIN_WAIT2, still holding the socket) is reset by the server. The FIN_WAIT2 -> CLOSE
/// is reported, and no TIME_WAIT for it.
#[test]
fn a_reset_close_is_not_a_time_wait() {
    require_root();
    let mut cw = trace();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let cport = c.local_addr().unwrap().port();
    let (mut s, _) = l.accept().unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
    // Reset only once the FIN is acknowledged, or it ends FIN_WAIT1 instead.
    cw.stdout
        .wait_for("the client's FIN_WAIT1 -> FIN_WAIT2", |l| {
            serde_json::from_str::<Row>(l)
                .is_ok_and(|r| r.sport == cport && r.old == "FIN_WAIT1" && r.new == "FIN_WAIT2")
        });
    // SO_LINGER {on, 0}: close() sends an RST.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(s);
    cw.stdout.wait_for("the client's FIN_WAIT2 -> CLOSE", |l| {
        !is_synthetic(l)
            && serde_json::from_str::<Row>(l).is_ok_and(|r| {
                r.sport == cport && r.dport == port && r.old == "FIN_WAIT2" && r.new == "CLOSE"
            })
    });
    // Several timewait polls (every 200 ms) later, still no TIME_WAIT for it.
    let end = Instant::now() + Duration::from_secs(1);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        cw.stdout.next_within(left);
    }
    let rows = synthetic_rows_for(&cw, cport);
    assert!(rows.is_empty(), "{rows:?}");
    drop(c);
}

/// An orphan whose peer never closes times out in FIN_WAIT2 (`tcp_fin_timeout` 1 s in
/// this namespace): it ends `expired` as a FIN_WAIT2 and is never a TIME_WAIT.
#[test]
fn a_fin_wait2_timeout_is_not_a_time_wait() {
    require_root();
    let ns = NetNs::new("fto");
    ns.sysctl("net.ipv4.tcp_fin_timeout", "1");
    let mut cw = trace();
    // The server holds each connection 5 s after its peer closed.
    let mut server = Peer::spawn_in(Some(&ns), &["closer", "127.0.0.1:0", "1", "5000"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn_in(Some(&ns), &["clients", &addr("127.0.0.1", port), "1"]);
    let cport: u16 = client.expect("local").parse().unwrap();
    let line = cw
        .stdout
        .wait_for("the orphan's FIN_WAIT2 timing out", |l| {
            is_synthetic(l)
                && serde_json::from_str::<Value>(l).is_ok_and(|v| {
                    v["sport"] == cport && v["old"] == "FIN_WAIT2" && v["new"] == "CLOSE"
                })
        });
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["end"], "expired", "{line}");
    assert_eq!(v["pid"], client.pid(), "{line}");
    // It lived about its 1 s timer.
    let lived = v["duration_ms"].as_f64().unwrap();
    assert!((500.0..3000.0).contains(&lived), "{line}");
    let rows = synthetic_rows_for(&cw, cport);
    assert!(rows.iter().all(|r| r["new"] != "TIME_WAIT"), "{rows:?}");
}

/// At its namespace's timewait cap (`tcp_max_tw_buckets` 3) the kernel keeps no timewait
/// socket for further closes (it counts them in `TcpExtTCPTimeWaitOverflow`): the
/// server owns the TIME_WAITs the kernel kept, not one per close.
#[test]
fn closes_over_the_timewait_cap_are_not_time_waits() {
    require_root();
    let ns = quiet_netns("cap");
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", "3");
    let mut cw = watch(&["--time-wait-min", "1"]);
    let mut server = Peer::spawn_in(Some(&ns), &["firstcloser", "127.0.0.1:0", "8"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn_in(Some(&ns), &["secondclosers", &addr("127.0.0.1", port), "8"]);
    client.expect("closed");
    server.expect("closed");
    let kernel_count = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "ss",
                "-Htan",
                "state",
                "time-wait",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count() as u64
    };
    let kept = kernel_count();
    assert_eq!(kept, 3, "the kernel keeps 3 at its cap");
    let mut seen = 0;
    wait_report(&mut cw, "the server owning what the kernel kept", |r| {
        seen = process(r, server.pid()).map_or(0, |p| p["time_wait"].as_u64().unwrap_or(0));
        seen == kept
    });
    // And no more later (a told birth for each close would make it 8).
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        let r = wait_report(&mut cw, "a later report", |_| true);
        let n = process(&r, server.pid()).map_or(0, |p| p["time_wait"].as_u64().unwrap_or(0));
        assert!(n <= kept, "{n} TIME_WAITs reported, the kernel has {kept}");
    }
}

/// `watch` does not follow connection starts, yet agrees with `ss` within one interval
/// when a TIME_WAIT ends early because its 4-tuple is reused: a server closes first on
/// three connections, then one client connects again from the same port (the new
/// connection waits in the server's accept queue).
#[test]
fn watch_sees_a_reused_four_tuple_within_one_interval() {
    require_root();
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "1s"]);
    reuse_is_seen_within_one_interval(&mut cw, None);
}

/// The same where another service's TIME_WAITs reach their timers in the namespace at
/// the time: the kernel's timer wheel ends those up to seconds late, so its count of
/// timewait sockets alone cannot tell which ended; `watch` looks up those at their
/// timers rather than wait until they are all gone.
#[test]
fn a_reuse_is_seen_while_other_time_waits_reach_their_timers() {
    require_root();
    let ns = NetNs::new("twtimers");
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "1s"]);
    let mut other = Peer::spawn_in(Some(&ns), &["firstcloser", "127.0.0.1:0", "300"]);
    let target = format!("127.0.0.1:{}", other.expect("port"));
    // Six batches a second apart: at any time in the six seconds after the first is
    // due, some are near or past their timers.
    let first_batch = Instant::now();
    for _ in 0..6 {
        let started = Instant::now();
        Peer::spawn_in(Some(&ns), &["secondclosers", &target, "50"]).expect("closed");
        std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
    }
    other.expect("closed");
    let first_due = first_batch + Duration::from_secs(60);
    std::thread::sleep(first_due.saturating_duration_since(Instant::now()));
    reuse_is_seen_within_one_interval(&mut cw, Some(&ns));
    assert!(
        first_batch.elapsed() < Duration::from_secs(65),
        "the reuse came after the other TIME_WAITs were gone: the test proves nothing"
    );
}

/// Connects to `target` from `local` (port 0: the kernel's pick), in `ns`.
fn connect_from(ns: Option<&NetNs>, local: SocketAddr, target: SocketAddr) -> TcpStream {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(ns) = ns {
                ns.enter();
            }
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&local.into()).unwrap();
            s.connect(&target.into()).unwrap();
            let c: TcpStream = s.into();
            c
        })
        .join()
        .unwrap()
    })
}

/// A server (in `ns`) closes first on three connections, then one client connects again
/// from the same port: `watch` reports 2 of the server's TIME_WAITs within 2.5 s.
fn reuse_is_seen_within_one_interval(cw: &mut Connwatch, ns: Option<&NetNs>) {
    let mut server = Peer::spawn_in(ns, &["firstcloser", "127.0.0.1:0", "3"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let target: SocketAddr = addr("127.0.0.1", port).parse().unwrap();
    let connect_from = |local: SocketAddr| connect_from(ns, local, target);
    let mut cports = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.0.1:0".parse().unwrap());
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0, "the server closes first");
        cports.push(c.local_addr().unwrap().port());
    }
    server.expect("closed");
    let server_tw =
        |r: &Value| process(r, server.pid()).map_or(0, |p| p["time_wait"].as_u64().unwrap());
    wait_report(cw, "the server's 3 TIME_WAITs", |r| server_tw(r) == 3);
    let _again = connect_from(format!("127.0.0.1:{}", cports[0]).parse().unwrap());
    let reused = Instant::now();
    let r = wait_report(cw, "2 TIME_WAITs, as ss says", |r| server_tw(r) == 2);
    let took = reused.elapsed();
    assert!(
        took <= Duration::from_millis(2500),
        "watch agreed with the kernel {took:?} after the reuse (interval 1s): {}",
        r["time_wait_ends"]
    );
    assert!(
        r["time_wait_ends"]["early"].as_u64() >= Some(1),
        "{}",
        r["time_wait_ends"]
    );
}

/// Through a churn that reuses ports (each new SYN ends the server's TIME_WAIT on its
/// 4-tuple, and the new connection's close tells it), the kernel's count of timewait
/// sockets is short by those in flight at every poll; `watch` leaves such a shortfall to
/// the events rather than list every timewait socket each time. An early end that no
/// event tells (a 4-tuple reused by a connection that stays open) is still found: here
/// within a few polls of the churn's end, when the events stop accounting for it.
#[test]
fn a_reuse_no_event_tells_is_found_through_a_churn_that_reuses_ports() {
    require_root();
    let ns = quiet_netns("twchurn");
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40049");
    let mut cw = watch(&[]);
    let mut quiet = Peer::spawn_in(Some(&ns), &["firstcloser", "127.0.0.1:0", "3"]);
    let quiet_port: u16 = quiet.expect("port").parse().unwrap();
    // Fixed client ports outside the churn's range: no churn socket holds them.
    let quiet_addr: SocketAddr = addr("127.0.0.1", quiet_port).parse().unwrap();
    let connect_from = |local: u16| {
        let local: SocketAddr = addr("127.0.0.1", local).parse().unwrap();
        connect_from(Some(&ns), local, quiet_addr)
    };
    for port in 45001..=45003 {
        let mut c = connect_from(port);
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0, "the server closes first");
    }
    quiet.expect("closed");
    let quiet_tw =
        |r: &Value| process(r, quiet.pid()).map_or(0, |p| p["time_wait"].as_u64().unwrap());
    wait_report(&mut cw, "the quiet server's 3 TIME_WAITs", |r| {
        quiet_tw(r) == 3
    });
    // The churn: 50 client ports to one first-closing server, so that nearly every
    // connection reuses the 4-tuple of a TIME_WAIT of the server's.
    const CHURN: &str = "20000";
    // The server accepts more than the clients make: a connect that fails and is made
    // again may have been accepted.
    let mut server = Peer::spawn_in(Some(&ns), &["firstcloser", "127.0.0.1:0", "100000"]);
    let target = addr("127.0.0.1", server.expect("port").parse().unwrap());
    let mut clients = Peer::spawn_in(Some(&ns), &["reusers", &target, CHURN]);
    std::thread::sleep(Duration::from_millis(300));
    // Reused by a connection that waits in the accept queue: no event will tell.
    let _again = connect_from(45001);
    let reused = Instant::now();
    let told = clients.expect("closed");
    let churn_ended = Instant::now();
    assert!(
        churn_ended - reused >= Duration::from_millis(600),
        "the churn ended {:?} after the reuse, before 3 polls: the test proves nothing ({told})",
        churn_ended - reused
    );
    let r = wait_report(
        &mut cw,
        "2 TIME_WAITs of the quiet server, as ss says",
        |r| quiet_tw(r) == 2,
    );
    let took = churn_ended.elapsed();
    assert!(
        took <= Duration::from_secs(3),
        "watch agreed with the kernel {took:?} after the churn ended (polls every 200ms): {} (clients: {told})",
        r["time_wait_ends"]
    );
    // The churn reused its 4-tuples (ended early, most of them told by events).
    assert!(
        r["time_wait_ends"]["early"].as_u64() >= Some(1000),
        "{}",
        r["time_wait_ends"]
    );
}
