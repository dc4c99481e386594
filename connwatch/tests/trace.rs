//! Root integration tests of `connwatch trace`: the real probe, real processes, real
//! sockets on loopback (ports chosen by the kernel).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::time::Duration;

use common::*;

common::peer_entry!();

const HOLD_MS: u64 = 300;

fn transitions(rows: &[&Row]) -> Vec<String> {
    rows.iter()
        .map(|r| format!("{}->{}", r.old, r.new))
        .collect()
}

/// A client that closes first against a server that closes after it, watched by
/// `connwatch trace --json` with the given hook.
fn client_closes_first(ip: &str, hook: &str) {
    require_root();
    let mut cw = Connwatch::start(&["trace", "--json", "--hook", hook]);
    let bind = if ip.contains(':') {
        format!("[{ip}]:0")
    } else {
        format!("{ip}:0")
    };
    let mut server = Peer::spawn(&["server", &bind]);
    let sport: u16 = server.expect("port").parse().unwrap();
    let target = if ip.contains(':') {
        format!("[{ip}]:{sport}")
    } else {
        format!("{ip}:{sport}")
    };
    let mut client = Peer::spawn(&["client", &target, &HOLD_MS.to_string()]);
    let cport: u16 = client.expect("local").parse().unwrap();
    server.expect("accepted");
    let held_ms: f64 = client.expect("held").parse().unwrap();
    server.send("close");
    server.expect("closed");

    // Both ends reach CLOSE: the client from FIN_WAIT2, the server from LAST_ACK.
    let is_end =
        |r: &Row, port: u16, old: &str| r.sport == port && r.old == old && r.new == "CLOSE";
    let mut client_done = false;
    let mut server_done = false;
    cw.stdout.wait_for("both ends to reach CLOSE", |l| {
        if let Ok(r) = serde_json::from_str::<Row>(l) {
            client_done |= is_end(&r, cport, "FIN_WAIT2") && r.dport == sport;
            server_done |= is_end(&r, sport, "LAST_ACK") && r.dport == cport;
        }
        client_done && server_done
    });
    let rows = parse_rows(&cw.stdout.seen);
    let family = if ip.contains(':') { "ipv6" } else { "ipv4" };

    // The client's socket: its connect() row has no local port yet.
    let connect: Vec<&Row> = rows
        .iter()
        .filter(|r| r.new == "SYN_SENT" && r.dport == sport && r.pid == Some(client.pid()))
        .collect();
    assert_eq!(connect.len(), 1, "one connect row: {connect:?}");
    assert_eq!(connect[0].owner_source, "context");
    let client_rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.sport == cport && r.dport == sport)
        .collect();
    let server_rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.sport == sport && r.dport == cport)
        .collect();
    assert_eq!(
        transitions(&client_rows),
        [
            "SYN_SENT->ESTABLISHED",
            "ESTABLISHED->FIN_WAIT1",
            "FIN_WAIT1->FIN_WAIT2",
            "FIN_WAIT2->CLOSE"
        ]
    );
    assert_eq!(
        transitions(&server_rows),
        [
            "LISTEN->SYN_RECV",
            "SYN_RECV->ESTABLISHED",
            "ESTABLISHED->CLOSE_WAIT",
            "CLOSE_WAIT->LAST_ACK",
            "LAST_ACK->CLOSE"
        ]
    );
    for r in client_rows.iter().chain(&server_rows).chain(&connect) {
        assert_eq!(r.family, family);
        assert_eq!(r.saddr, ip);
        assert_eq!(r.daddr, ip);
    }

    // We close first: the close() runs in the client, which owns the socket.
    let fin_wait1 = client_rows[1];
    assert_eq!(fin_wait1.pid, Some(client.pid()));
    assert_eq!(fin_wait1.owner_source, "context");
    assert!(fin_wait1.comm.is_some());
    // The server closes its CLOSE_WAIT socket in its own syscall.
    let last_ack = server_rows[3];
    assert_eq!(last_ack.pid, Some(server.pid()));
    assert_eq!(last_ack.owner_source, "context");

    // Each side's rows name only that side's process; softirq rows are never `context`,
    // and an unknown owner has no pid rather than a bystander's.
    for (side, rows, pid) in [
        ("client", &client_rows, client.pid()),
        ("server", &server_rows, server.pid()),
    ] {
        for r in rows.iter() {
            match r.owner_source.as_str() {
                "unknown" => assert_eq!((r.pid, &r.comm), (None, &None), "{side}: {r:?}"),
                "context" | "carried" => assert_eq!(r.pid, Some(pid), "{side}: {r:?}"),
                other => panic!("{side}: unexpected owner_source {other}"),
            }
            let softirq = matches!(
                (r.old.as_str(), r.new.as_str()),
                ("LISTEN", "SYN_RECV")
                    | ("SYN_RECV", "ESTABLISHED")
                    | ("SYN_SENT", "ESTABLISHED")
                    | ("ESTABLISHED", "CLOSE_WAIT")
                    | ("FIN_WAIT1", "FIN_WAIT2")
                    | ("FIN_WAIT2", "CLOSE")
                    | ("LAST_ACK", "CLOSE")
            );
            if softirq {
                assert_ne!(r.owner_source, "context", "{side}: {r:?}");
            }
        }
    }
    // The accepted socket's owner is never seen in a syscall before its close.
    assert_eq!(
        server_rows[2].owner_source, "unknown",
        "{:?}",
        server_rows[2]
    );
    // The client's owner is carried from connect() to the softirq rows.
    assert_eq!(client_rows[0].owner_source, "carried");
    assert_eq!(client_rows[3].owner_source, "carried");

    // Time in ESTABLISHED matches how long the client held the connection.
    let established_ms = fin_wait1.duration_ms.expect("ESTABLISHED entry was seen");
    assert!(
        (established_ms - held_ms).abs() < 50.0,
        "ESTABLISHED lasted {established_ms} ms, client held it {held_ms} ms"
    );
    assert!(held_ms >= HOLD_MS as f64);
    // A socket's first transition has no time in its previous state.
    assert_eq!(connect[0].duration_ms, None);
    assert_eq!(server_rows[0].duration_ms, None);
}

#[test]
fn ipv4_tp_btf() {
    client_closes_first("127.0.0.1", "tp-btf");
}

#[test]
fn ipv6_tp_btf() {
    client_closes_first("::1", "tp-btf");
}

#[test]
fn ipv4_tracepoint() {
    client_closes_first("127.0.0.1", "tracepoint");
}

#[test]
fn ipv6_tracepoint() {
    client_closes_first("::1", "tracepoint");
}

/// SIGINT and SIGTERM: a summary on stderr, exit 0, and the probe's programs are gone.
#[test]
fn signals_detach_and_summarise() {
    require_root();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut cw = Connwatch::start(&["trace", "--json"]);
        let progs = prog_ids_of(cw.pid());
        assert!(!progs.is_empty(), "connwatch holds no BPF program fd");
        cw.signal(sig);
        let status = cw.wait_exit();
        assert!(status.success(), "exit status {status}");
        let err = cw.stderr.drain(Duration::from_millis(200));
        assert!(
            err.iter().any(|l| l.contains(" received")
                && l.contains("dropped")
                && l.contains("sockets untracked")),
            "{err:?}"
        );
        wait_unloaded(&progs);
    }
}

/// Programs are freed asynchronously (RCU, deferred work) after their last fd closes:
/// wait for it with a deadline.
fn wait_unloaded(progs: &[u32]) {
    let end = std::time::Instant::now() + DEADLINE;
    while progs.iter().any(|id| loaded_prog_ids().contains(id)) {
        assert!(
            std::time::Instant::now() < end,
            "programs {progs:?} still loaded after exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `kill -9`: the kernel drops the programs with the process's fds.
#[test]
fn sigkill_leaves_nothing_attached() {
    require_root();
    let mut cw = Connwatch::start(&["trace"]);
    let progs = prog_ids_of(cw.pid());
    assert!(!progs.is_empty());
    cw.signal(libc::SIGKILL);
    cw.wait_exit();
    // Programs are freed asynchronously (RCU): wait for it with a deadline.
    let end = std::time::Instant::now() + DEADLINE;
    while progs.iter().any(|id| loaded_prog_ids().contains(id)) {
        assert!(
            std::time::Instant::now() < end,
            "programs {progs:?} still loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `connwatch trace | head -1`: the reader goes away, connwatch exits 0 without a word.
#[test]
fn closed_stdout_is_a_quiet_exit() {
    require_root();
    let mut cw = Connwatch::start(&["trace"]);
    cw.stdout.wait_for("the header", |l| l.starts_with("TIME"));
    // Close our end of the pipe, then cause transitions so that connwatch writes.
    drop(std::mem::replace(
        &mut cw.stdout,
        Lines::new(std::io::empty()),
    ));
    let end = std::time::Instant::now() + DEADLINE;
    let status = loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        if let Some(st) = cw.child.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < end, "connwatch kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let err = cw.stderr.drain(Duration::from_millis(100));
    assert!(
        !err.iter()
            .any(|l| l.contains("error") || l.contains("panic")),
        "{err:?}"
    );
}

/// `--duration` stops on its own.
#[test]
fn duration_stops_the_trace() {
    require_root();
    let start = std::time::Instant::now();
    let mut cw = Connwatch::start(&["trace", "--duration", "500ms"]);
    assert!(cw.wait_exit().success());
    assert!(start.elapsed() >= Duration::from_millis(500));
}

/// Ids of the BPF programs whose fds a process holds (from /proc/PID/fdinfo).
fn prog_ids_of(pid: i32) -> Vec<u32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        if info.contains("prog_type:")
            && let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids
}

/// Ids of every BPF program loaded in the kernel.
fn loaded_prog_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

/// Once attached, connwatch keeps only the capabilities it still needs.
#[test]
fn capabilities_are_dropped_after_attach() {
    require_root();
    let cw = Connwatch::start(&["trace"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", cw.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    // CAP_BPF 39, CAP_PERFMON 38, CAP_SYS_MODULE 16, CAP_NET_RAW 13 are gone.
    for cap in [39, 38, 16, 13] {
        assert!(!has(cap), "capability {cap} still effective: {eff:#x}");
    }
    // CAP_SYS_PTRACE 19 and CAP_NET_ADMIN 12 stay (fd scans, sock_diag).
    assert!(has(19) && has(12), "{eff:#x}");
}
