//! Root integration tests of reports that stay readable on a busy host: short-lived
//! clients folded into one line, workers and units grouped, a leaking peer on "another
//! host" (another network namespace) named from this side, and the likely cause of a
//! CLOSE_WAIT leak. Each test gives its processes a command name of its own, so that
//! tests running side by side do not count each other's processes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use common::*;
use serde_json::Value;

common::peer_entry!();

fn rows<'a>(r: &'a Value, comm: &str) -> Vec<&'a Value> {
    r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["comm"] == comm)
        .collect()
}

fn watch(extra: &[&str]) -> Connwatch {
    let mut args = vec![
        "watch",
        "--json",
        "--interval",
        "500ms",
        "--tw-poll",
        "200ms",
    ];
    args.extend_from_slice(extra);
    Connwatch::start(&args)
}

/// 30 short-lived clients of a server that closes first each close their end at once:
/// no row of their own, one `quiet` entry for their command.
#[test]
fn short_lived_clients_fold_into_one_line() {
    require_root();
    let mut cw = watch(&[]);
    let mut server = Peer::spawn_named(None, "cwsrv", &["firstcloser", "127.0.0.1:0", "30"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let target = addr("127.0.0.1", port);
    let clients: Vec<Peer> = (0..30)
        .map(|_| {
            let mut c = Peer::spawn_named(None, "cwcurl", &["secondclosers", &target, "1"]);
            c.expect("closed");
            c
        })
        .collect();
    server.expect("closed");
    let r = wait_report(&mut cw, "the clients folded into one quiet entry", |r| {
        r["quiet"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["comm"] == "cwcurl" && q["processes"] == 30)
    });
    assert!(rows(&r, "cwcurl").is_empty(), "{}", r["processes"]);
    let q = r["quiet"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["comm"] == "cwcurl")
        .unwrap();
    assert_eq!(q["close_wait_closed"]["count"], 30, "{q}");
    drop(clients);
}

/// Three processes of one command, 4 leaked sockets each: one `--by command` row with
/// 12 sockets, all three pids, and the leak flagged on the group.
#[test]
fn workers_of_one_command_are_one_row() {
    require_root();
    let mut cw = watch(&["--by", "command", "--close-wait-age", "1s"]);
    let mut workers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut w = Peer::spawn_named(None, "cwworker", &["leaker", "127.0.0.1:0", "4"]);
        let port: u16 = w.expect("port").parse().unwrap();
        let mut c = Peer::spawn(&["clients", &addr("127.0.0.1", port), "4"]);
        c.expect("closed");
        w.expect("accepted");
        workers.push(w);
        clients.push(c);
    }
    let r = wait_report(&mut cw, "one row for the three workers", |r| {
        rows(r, "cwworker")
            .first()
            .is_some_and(|p| p["close_wait"] == 12 && p["flags"][0] == "close_wait_leak")
    });
    assert_eq!(r["by"], "command");
    let all = rows(&r, "cwworker");
    assert_eq!(all.len(), 1, "{all:?}");
    let mut pids: Vec<u64> = all[0]["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    pids.sort_unstable();
    let mut want: Vec<u64> = workers.iter().map(|w| u64::from(w.pid())).collect();
    want.sort_unstable();
    assert_eq!(pids, want);
}

/// A server that forks after accepting: parent and child hold the same sockets. Per
/// process each counts them; one `--by command` row counts them once, with both pids.
#[test]
fn a_group_counts_sockets_shared_after_fork_once() {
    require_root();
    let mut cw = watch(&["--by", "command"]);
    let mut leaker = Peer::spawn_named(None, "cwprefork", &["forkleaker", "127.0.0.1:0", "3"]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let mut clients = Peer::spawn(&["clients", &addr("127.0.0.1", port), "3"]);
    clients.expect("closed");
    leaker.expect("accepted");
    let child: u64 = leaker.expect("child").parse().unwrap();
    let r = wait_report(&mut cw, "one row with both holders", |r| {
        rows(r, "cwprefork")
            .first()
            .is_some_and(|p| p["pids"].as_array().is_some_and(|a| a.len() == 2))
    });
    let row = rows(&r, "cwprefork")[0];
    assert_eq!(row["close_wait"], 3, "{row}");
    assert_eq!(
        row["pids"],
        serde_json::json!([
            u64::from(leaker.pid()).min(child),
            u64::from(leaker.pid()).max(child)
        ])
    );
}

/// A process in a cgroup of its own (a scope, as systemd or a container runtime makes)
/// is reported under that unit with `--by unit`.
#[test]
fn a_process_in_its_own_cgroup_is_grouped_under_its_unit() {
    require_root();
    let unit = format!("cwtest-{}.scope", std::process::id());
    let cg = Cgroup::new(&unit);
    let mut leaker = Peer::spawn_with(None, &["leaker", "127.0.0.1:0", "4"], true);
    leaker.expect("ready");
    cg.add(leaker.pid());
    leaker.send("go");
    let port: u16 = leaker.expect("port").parse().unwrap();
    let mut cw = watch(&["--by", "unit"]);
    let mut clients = Peer::spawn(&["clients", &addr("127.0.0.1", port), "4"]);
    clients.expect("closed");
    leaker.expect("accepted");
    let r = wait_report(&mut cw, "a row for the unit", |r| {
        r["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["unit"] == unit.as_str() && p["close_wait"] == 4)
    });
    assert_eq!(r["by"], "unit");
    let row = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["unit"] == unit.as_str())
        .unwrap();
    assert_eq!(row["pids"], serde_json::json!([leaker.pid()]), "{row}");
    drop((leaker, clients));
}

/// A server whose peer, in another network namespace on this machine (over a veth
/// pair, as a pod on the same node), never closes: the server's connections wait in
/// FIN_WAIT2, naming that peer's address, but the leak is the client's: connwatch names
/// the process holding the CLOSE_WAIT end, so the client carries the blame and the
/// server, which closed properly, is not flagged `peer_not_closing`. (A peer on
/// another host, which connwatch cannot name, gets the flag: report unit tests.)
#[test]
fn a_peer_that_never_closes_on_this_machine_is_blamed_not_the_server() {
    require_root();
    let here = NetNs::new("fw2a");
    let there = NetNs::new("fw2b");
    let (server_ip, client_ip) = here.link(&there, 77);
    let mut cw = watch(&["--fin-wait2-age", "1s", "--close-wait-age", "2s"]);
    let n = 12;
    let mut server = Peer::spawn_in(
        Some(&here),
        &["firstcloser", &format!("{server_ip}:0"), &n.to_string()],
    );
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn_in(
        Some(&there),
        &["holdclients", &addr(&server_ip, port), &n.to_string()],
    );
    client.expect("connected");
    server.expect("closed");
    client.expect("eof");
    let r = wait_report(&mut cw, "the client flagged for its CLOSE_WAITs", |r| {
        if let Some(p) = process(r, server.pid()) {
            assert!(!has_flag(p, "peer_not_closing"), "the server blamed: {p}");
        }
        process(r, client.pid()).is_some_and(|p| has_flag(p, "close_wait_leak"))
    });
    let p = process(&r, server.pid()).unwrap();
    assert_eq!(p["fin_wait2"], n, "{p}");
    assert!(p["fin_wait2_oldest_s"].as_f64() > Some(1.0), "{p}");
    let peer = &p["peers"][0];
    assert_eq!(peer["addr"], format!("{client_ip}:*"), "{p}");
    assert_eq!(peer["fin_wait2"], n, "{p}");
    let theirs = process(&r, client.pid()).unwrap();
    assert_eq!(theirs["close_wait"], n, "{theirs}");
}

/// A process that shut down its side of its connections and keeps them, waiting on a
/// peer that never closes: its held FIN_WAIT2 sockets count and name the peer, and the
/// blame goes to the peer's process, which connwatch names on this machine.
#[test]
fn held_fin_wait2_sockets_are_counted_and_the_local_peer_blamed() {
    require_root();
    let mut server = Peer::spawn_named(None, "cwsilent", &["leaker", "127.0.0.1:0", "4"]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut client = Peer::spawn_named(
        None,
        "cwshut",
        &["shutclients", &addr("127.0.0.1", port), "4"],
    );
    client.expect("shut");
    server.expect("accepted");
    // Started after: the first full dump (the seed) lists them; later ones come on
    // the dumps' budget.
    let mut cw = watch(&[
        "--fin-wait2-age",
        "1s",
        "--fin-wait2-min",
        "3",
        "--close-wait-age",
        "2s",
    ]);
    let r = wait_report(&mut cw, "the silent server flagged", |r| {
        if let Some(p) = process(r, client.pid()) {
            assert!(!has_flag(p, "peer_not_closing"), "the client blamed: {p}");
        }
        process(r, server.pid()).is_some_and(|p| has_flag(p, "close_wait_leak"))
            && process(r, client.pid())
                .is_some_and(|p| p["fin_wait2_oldest_s"].as_f64() > Some(1.0))
    });
    let p = process(&r, client.pid()).unwrap();
    assert_eq!(p["fin_wait2"], 4, "{p}");
    assert_eq!(p["owner_sources"], serde_json::json!(["fd"]), "{p}");
    assert_eq!(p["peers"][0]["addr"], format!("127.0.0.1:{port}"), "{p}");
    // Both ends here: the peer entry names the process that is not closing.
    assert_eq!(p["peers"][0]["process"]["pid"], server.pid(), "{p}");
    assert_eq!(p["peers"][0]["process"]["comm"], "cwsilent", "{p}");
}

/// The leak's reason names the likely cause where the evidence shows one: data left
/// unread, or idle pooled connections closed by the peer.
#[test]
fn the_likely_cause_is_named_from_the_evidence() {
    require_root();
    let mut cw = watch(&["--close-wait-age", "1s"]);
    let leak = |comm: &str, role: &[&str]| -> Peer {
        let mut leaker = Peer::spawn_named(None, comm, &["leaker", "127.0.0.1:0", "3"]);
        let port: u16 = leaker.expect("port").parse().unwrap();
        let target = addr("127.0.0.1", port);
        let mut args = vec![role[0], target.as_str()];
        args.extend_from_slice(&role[1..]);
        let mut clients = Peer::spawn(&args);
        clients.expect("closed");
        leaker.expect("accepted");
        leaker
    };
    let reader = leak("cwnoread", &["sendclients", "3", "100"]);
    let pool = leak("cwpool", &["idleclients", "3", "1500"]);
    let reason = |r: &Value, pid: u32| {
        process(r, pid)
            .and_then(|p| p["reason"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let r = wait_report(&mut cw, "both leaks flagged with their cause", |r| {
        reason(r, reader.pid()).contains("stopped reading")
            && reason(r, pool.pid()).contains("idle timeout")
    });
    let unread = reason(&r, reader.pid());
    assert!(
        unread.contains("3 of them hold data it never read (300 bytes)"),
        "{unread}"
    );
    let pooled = reason(&r, pool.pid());
    assert!(
        pooled.contains("closed by the peer after a quiet spell")
            && !pooled.contains("stopped reading"),
        "{pooled}"
    );
}
