//! Root integration tests of a busy Kubernetes-like node: a hundred network namespaces
//! with a small server in each, namespaces created after connwatch started, and one
//! deleted while it holds TIME_WAIT and CLOSE_WAIT sockets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::time::{Duration, Instant};

use common::*;

common::peer_entry!();

/// Namespaces present before connwatch starts: past the 64 polls after which pending
/// closes used to be dropped.
const CROWD: usize = 100;
const N: usize = 3;

/// `CROWD` namespaces, each with a listening server (a leaker that accepts nothing).
struct Crowd {
    _servers: Vec<Peer>,
    _namespaces: Vec<NetNs>,
}

fn crowd(tag: &str) -> Crowd {
    let namespaces: Vec<NetNs> = (0..CROWD)
        .map(|i| NetNs::new(&format!("{tag}{i}")))
        .collect();
    let servers = namespaces
        .iter()
        .map(|ns| Peer::spawn_in(Some(ns), &["leaker", "127.0.0.1:0", "0"]))
        .collect();
    Crowd {
        _servers: servers,
        _namespaces: namespaces,
    }
}

/// A namespace without port reuse (its TIME_WAITs end only by their timer).
fn quiet_netns(tag: &str) -> NetNs {
    let ns = NetNs::new(tag);
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    ns
}

/// `watch` with short intervals, and every server with a TIME_WAIT an `active_closer`.
fn watch_fast() -> Connwatch {
    Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "500ms",
        "--tw-poll",
        "200ms",
        "--time-wait-min",
        "1",
    ])
}

/// A server in `ns` that closes each of N connections first, and its client, both done:
/// (server, client, the server's port).
fn server_closes_first(ns: &NetNs) -> (Peer, Peer, u16) {
    let mut server = Peer::spawn_in(Some(ns), &["firstcloser", "127.0.0.1:0", &N.to_string()]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn_in(
        Some(ns),
        &["secondclosers", &addr("127.0.0.1", port), &N.to_string()],
    );
    client.expect("closed");
    server.expect("closed");
    (server, client, port)
}

/// With a hundred namespaces present, a server in a namespace created after connwatch
/// started, which closes first, owns its TIME_WAITs: in `watch` and in `trace`.
#[test]
fn new_namespace_among_many_owns_its_time_waits() {
    require_root();
    let _crowd = crowd("cr");
    let mut watch = watch_fast();
    let trace = Connwatch::start(&["trace", "--json", "--tw-poll", "200ms"]);
    let ns = quiet_netns("late");
    let (server, _client, port) = server_closes_first(&ns);

    // The client's next connect may end a server TIME_WAIT early (a SYN on its
    // 4-tuple): at least N - 1 remain.
    let min = N as u64 - 1;
    let r = wait_report(&mut watch, "the late server owning its TIME_WAITs", |r| {
        process(r, server.pid()).is_some_and(|p| p["time_wait"].as_u64() >= Some(min))
    });
    let p = process(&r, server.pid()).unwrap();
    assert_eq!(p["owner_sources"], serde_json::json!(["carried"]), "{p}");

    let mut trace = trace;
    let births = |lines: &[String]| -> Vec<Row> {
        parse_rows(lines)
            .into_iter()
            .filter(|r| r.new == "TIME_WAIT" && r.sport == port)
            .collect()
    };
    let deadline = Instant::now() + DEADLINE;
    while births(&trace.stdout.seen).len() < min as usize && Instant::now() < deadline {
        trace.stdout.next_within(Duration::from_millis(200));
    }
    let rows = births(&trace.stdout.seen);
    assert!(rows.len() >= min as usize, "trace rows: {rows:?}");
    for row in rows {
        assert_eq!(row.pid, Some(server.pid()), "{row:?}");
        assert_eq!(row.owner_source, "carried", "{row:?}");
    }
}

/// With a hundred namespaces present (full dumps then come tens of seconds apart), a
/// server in a new namespace that closes first is named through its listener and
/// flagged `active_closer` within a few intervals.
#[test]
fn new_server_among_many_is_flagged_as_active_closer() {
    require_root();
    let _crowd = crowd("ac");
    let mut watch = watch_fast();
    let ns = quiet_netns("acl");
    let started = Instant::now();
    let (server, _client, port) = server_closes_first(&ns);
    let min = N as u64 - 1;
    // Shown with the reports if it fails.
    println!("server pid {}, port {port}", server.pid());
    let r = wait_report(&mut watch, "the new server flagged", |r| {
        process(r, server.pid()).is_some_and(|p| {
            p["time_wait"].as_u64() >= Some(min)
                && p["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == "active_closer"))
        })
    });
    let took = started.elapsed();
    // The listener's holder comes from the next fd scan (at most one a second).
    assert!(took <= Duration::from_secs(4), "took {took:?}");
    let reason = process(&r, server.pid()).unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains(&format!("listens on port {port}")),
        "{reason}"
    );
}

/// With a hundred namespaces present, a new 10-socket leak in the root namespace is
/// attributed, and counted in `states`, within two intervals.
#[test]
fn new_leak_among_many_namespaces_is_reported_within_two_intervals() {
    require_root();
    let _crowd = crowd("lk");
    leak_reported_within_two_intervals();
}

/// Starts `watch --interval 1s`, makes a 10-socket leak in the root namespace after its
/// first report, and checks that a report names the leaker and counts the sockets in
/// `states` within two intervals; returns that report.
fn leak_reported_within_two_intervals() -> serde_json::Value {
    let interval = Duration::from_secs(1);
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "1s"]);
    // One report first: connwatch is up and has done its first full dump.
    wait_report(&mut cw, "a first report", |_| true);
    let mut leaker = Peer::spawn(&["leaker", "127.0.0.1:0", "10"]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let mut clients = Peer::spawn(&["clients", &addr("127.0.0.1", port), "10"]);
    clients.expect("closed");
    leaker.expect("accepted");
    let leaked = Instant::now();
    let r = wait_report(&mut cw, "the leak attributed and counted", |r| {
        process(r, leaker.pid()).is_some_and(|p| p["close_wait"] == 10)
            && r["states"]["CLOSE_WAIT"].as_u64() >= Some(10)
    });
    let took = leaked.elapsed();
    assert!(
        took <= interval * 2 + Duration::from_millis(500),
        "took {took:?}: {}",
        r["states"]
    );
    r
}

/// A namespace deleted while it holds TIME_WAIT and CLOSE_WAIT sockets (the kernel
/// purges them): it leaves the report within two intervals, and its TIME_WAITs count as
/// ended early rather than ageing on until their timer.
#[test]
fn deleted_namespace_leaves_the_report() {
    require_root();
    let mut cw = watch_fast();
    let ns = quiet_netns("del");
    let (server, client, _) = server_closes_first(&ns);
    let mut leaker = Peer::spawn_in(Some(&ns), &["leaker", "127.0.0.1:0", "2"]);
    let lport: u16 = leaker.expect("port").parse().unwrap();
    let mut clients = Peer::spawn_in(Some(&ns), &["clients", &addr("127.0.0.1", lport), "2"]);
    clients.expect("closed");
    leaker.expect("accepted");
    let min = N as u64 - 1;
    let before = wait_report(&mut cw, "both sockets kinds in the namespace", |r| {
        process(r, server.pid()).is_some_and(|p| p["time_wait"].as_u64() >= Some(min))
            && process(r, leaker.pid()).is_some_and(|p| p["close_wait"] == 2)
    });
    let time_waits = process(&before, server.pid()).unwrap()["time_wait"]
        .as_u64()
        .unwrap();
    let early_before = before["time_wait_ends"]["early"].as_u64().unwrap();

    let (server_pid, leaker_pid) = (server.pid(), leaker.pid());
    drop((server, client, leaker, clients));
    drop(ns);
    let deleted = Instant::now();
    // The server exited: its row folds at once into a quiet line, so what proves its
    // TIME_WAITs gone is their early ends themselves.
    let r = wait_report(
        &mut cw,
        "the namespace's sockets gone from the report",
        |r| {
            let early = r["time_wait_ends"]["early"].as_u64().unwrap() - early_before;
            early >= time_waits
                && process(r, server_pid).is_none_or(|p| p["time_wait"] == 0)
                && process(r, leaker_pid).is_none_or(|p| p["close_wait"] == 0)
        },
    );
    let took = deleted.elapsed();
    assert!(took <= Duration::from_millis(1500), "took {took:?}");
    let early = r["time_wait_ends"]["early"].as_u64().unwrap() - early_before;
    assert!(early >= time_waits, "{} early of {time_waits}", early);
    assert_eq!(r["time_wait_ends"]["expired"], 0, "{}", r["time_wait_ends"]);
}

/// Every number of one report describes the same moment: while namespaces holding
/// CLOSE_WAIT and TIME_WAIT sockets come and go, `states` equals what the tables hold
/// (the processes' sockets plus the unattributed ones) in every report.
#[test]
fn states_and_tables_agree_during_namespace_churn() {
    require_root();
    let mut cw = watch_fast();
    let agree = |r: &serde_json::Value| -> Result<(), String> {
        for (state, key) in [("CLOSE_WAIT", "close_wait"), ("TIME_WAIT", "time_wait")] {
            let held: u64 = r["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[key].as_u64().unwrap())
                .sum::<u64>()
                + r["unattributed"][key].as_u64().unwrap()
                // Exited processes' TIME_WAITs are counted in their quiet line.
                + r["quiet"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|q| q[key].as_u64().unwrap_or(0))
                    .sum::<u64>();
            let counted = r["states"][state].as_u64().unwrap_or(0);
            if held != counted {
                return Err(format!(
                    "states.{state} {counted}, tables {held}: {}",
                    r["states"]
                ));
            }
        }
        Ok(())
    };
    let mut reports = 0;
    // Waits for `n` more reports, each checked: the churn is paced by the reports.
    let mut check_reports = |cw: &mut Connwatch, n: usize| {
        for _ in 0..n {
            let line = cw
                .stdout
                .wait_for("the next report", |l| l.starts_with('{'));
            let r: serde_json::Value = serde_json::from_str(&line).unwrap();
            reports += 1;
            if let Err(e) = agree(&r) {
                panic!("report {reports}: {e}");
            }
        }
    };
    // Each round: a namespace with a leak and a server that closes first; the one made
    // two rounds earlier is deleted with its sockets.
    let mut live: std::collections::VecDeque<(NetNs, Vec<Peer>)> = Default::default();
    for round in 0..6 {
        let ns = quiet_netns(&format!("churn{round}"));
        let (server, client, _) = server_closes_first(&ns);
        let mut leaker = Peer::spawn_in(Some(&ns), &["leaker", "127.0.0.1:0", "2"]);
        let port: u16 = leaker.expect("port").parse().unwrap();
        let mut clients = Peer::spawn_in(Some(&ns), &["clients", &addr("127.0.0.1", port), "2"]);
        clients.expect("closed");
        leaker.expect("accepted");
        live.push_back((ns, vec![server, client, leaker, clients]));
        if live.len() > 2 {
            drop(live.pop_front());
        }
        check_reports(&mut cw, 1);
    }
    drop(live);
    check_reports(&mut cw, 3);
    assert!(reports >= 8, "{reports} reports");
}

/// The same with five hundred (empty) namespaces: each costs a sock_diag visit, so this
/// is where a poll that visits every namespace for one pending close would fall behind.
#[test]
fn new_leak_among_five_hundred_namespaces_is_reported_within_two_intervals() {
    require_root();
    let _namespaces: Vec<NetNs> = (0..500).map(|i| NetNs::new(&format!("q{i}"))).collect();
    let r = leak_reported_within_two_intervals();
    assert!(
        r["footprint"]["entries"]["namespaces"].as_u64() >= Some(501),
        "{}",
        r["footprint"]
    );
}

/// The kernel gives a freed namespace's inode number to the next namespace created: a
/// namespace deleted while it holds TIME_WAITs, replaced at once by one that gets the
/// same number, still leaves the report (connwatch tells them apart by their cookies).
#[test]
fn a_reused_namespace_inode_is_a_new_namespace() {
    require_root();
    let mut cw = watch_fast();
    let ns = quiet_netns("reuse");
    let inode = |name: &str| {
        std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(format!("/run/netns/{name}")).unwrap(),
        )
    };
    let old = inode(&ns.name);
    let (server, client, _) = server_closes_first(&ns);
    let min = N as u64 - 1;
    wait_report(&mut cw, "the server's TIME_WAITs", |r| {
        process(r, server.pid()).is_some_and(|p| p["time_wait"].as_u64() >= Some(min))
    });
    let server_pid = server.pid();
    drop((server, client));
    drop(ns);
    // The number is free once the namespace is torn down (asynchronously): retry until a
    // new namespace gets it. Other tests may take it first: then this one cannot tell.
    let end = Instant::now() + Duration::from_secs(5);
    let mut reused = None;
    for i in 0.. {
        let candidate = NetNs::new(&format!("re{i}"));
        if inode(&candidate.name) == old {
            reused = Some(candidate);
            break;
        }
        drop(candidate);
        if Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some(_reused) = reused else {
        eprintln!("skipped: no namespace got inode {old} back within 5 s");
        return;
    };
    let replaced = Instant::now();
    wait_report(&mut cw, "the old namespace's TIME_WAITs gone", |r| {
        process(r, server_pid).is_none_or(|p| p["time_wait"] == 0)
    });
    let took = replaced.elapsed();
    assert!(took <= Duration::from_millis(1500), "took {took:?}");
}

/// Leaks made before connwatch starts, in namespaces other than its own, are in its
/// first report, with estimated ages (the seed reads other namespaces on a worker and
/// fills the table as it reads); `--port` keeps out another port's leak there.
#[test]
fn leaks_in_other_namespaces_before_start_are_seeded() {
    require_root();
    let namespaces: Vec<NetNs> = (0..3).map(|i| NetNs::new(&format!("sd{i}"))).collect();
    let mut leaks = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let n = 4 + i;
        let mut leaker = Peer::spawn_in(Some(ns), &["leaker", "127.0.0.1:0", &n.to_string()]);
        let port: u16 = leaker.expect("port").parse().unwrap();
        let mut clients = Peer::spawn_in(
            Some(ns),
            &["clients", &addr("127.0.0.1", port), &n.to_string()],
        );
        clients.expect("closed");
        leaker.expect("accepted");
        leaks.push((leaker, port, n as u64));
    }
    // The first leak's port: the others' ports differ unless the kernel happened to
    // pick the same one in their namespace (then they are selected too).
    let port = leaks[0].1;
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "500ms"]);
    let r = wait_report(&mut cw, "a first report", |_| true);
    for (leaker, _, n) in &leaks {
        let p = process(&r, leaker.pid()).unwrap_or_else(|| panic!("leaker missing: {r}"));
        assert_eq!(p["close_wait"].as_u64(), Some(*n), "{p}");
        assert_eq!(p["close_wait_age_source"], "estimated", "{p}");
    }
    drop(cw);
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "500ms",
        "--port",
        &port.to_string(),
    ]);
    let r = wait_report(&mut cw, "a first report", |_| true);
    for (leaker, leak_port, n) in &leaks {
        let seen = process(&r, leaker.pid()).map(|p| p["close_wait"].as_u64());
        if *leak_port == port {
            assert_eq!(seen, Some(Some(*n)), "{r}");
        } else {
            assert_eq!(seen, None, "port {leak_port} is not selected: {r}");
        }
    }
}
