//! Root integration tests of `connwatch watch` and `connwatch snapshot` with real
//! processes on loopback: leakers, prompt and late closers, fork-shared sockets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use common::*;
use serde_json::Value;

common::peer_entry!();

const N: usize = 4;

fn report_time(r: &Value) -> SystemTime {
    humantime::parse_rfc3339(r["time"].as_str().unwrap()).unwrap()
}

fn flags(p: &Value) -> Vec<String> {
    p["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

/// A leaker beside a well-behaved server: the leaker is flagged with its pid, count and
/// age; the server that closes promptly is not.
fn leaker_and_good_server(ip: &str) {
    require_root();
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "300ms",
        "--close-wait-age",
        "1s",
    ]);
    let bind = addr(ip, 0);
    let mut leaker = Peer::spawn(&["leaker", &bind, &N.to_string()]);
    let lport: u16 = leaker.expect("port").parse().unwrap();
    let mut good = Peer::spawn(&["closer", &bind, &N.to_string(), "0"]);
    let gport: u16 = good.expect("port").parse().unwrap();

    let to_leaker = connect_n(&addr(ip, lport), N);
    let to_good = connect_n(&addr(ip, gport), N);
    leaker.expect("accepted");
    good.expect("accepted");
    drop(to_good);
    drop(to_leaker);
    let closed_at = SystemTime::now();
    good.expect("done");

    let r = wait_report(&mut cw, "the leaker to be flagged", |r| {
        process(r, leaker.pid()).is_some_and(|p| flags(p).contains(&"close_wait_leak".into()))
    });
    let p = process(&r, leaker.pid()).unwrap();
    assert_eq!(p["close_wait"], N as u64, "{p}");
    assert_eq!(p["close_wait_age_source"], "observed", "{p}");
    assert_eq!(p["owner_sources"], serde_json::json!(["fd"]), "{p}");
    let truth = report_time(&r)
        .duration_since(closed_at)
        .unwrap()
        .as_secs_f64();
    let oldest = p["close_wait_oldest_s"].as_f64().unwrap();
    assert!(
        (oldest - truth).abs() < 0.5,
        "oldest {oldest} s, truth {truth} s"
    );
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("[{}] holds {N} CLOSE_WAIT sockets", leaker.pid())),
        "{reason}"
    );
    assert!(p["fds"].as_u64().unwrap() >= N as u64 + 3, "{p}");
    assert!(p["fd_limit"].as_u64().is_some(), "{p}");
    let family_peer = if ip.contains(':') {
        format!("[{ip}]:*")
    } else {
        format!("{ip}:*")
    };
    assert_eq!(p["peers"][0]["addr"], family_peer, "{p}");
    assert_eq!(p["peers"][0]["close_wait"], N as u64, "{p}");
    // The prompt closer is never flagged.
    if let Some(g) = process(&r, good.pid()) {
        assert!(flags(g).is_empty(), "{g}");
        assert_eq!(g["close_wait"], 0, "{g}");
    }
    assert!(r["states"]["CLOSE_WAIT"].as_u64().unwrap() >= N as u64);
    assert_eq!(r["final"], false);

    // SIGINT: a final report, and --check is not set: exit 0.
    cw.signal(libc::SIGINT);
    let fin = wait_report(&mut cw, "the final report", |r| r["final"] == true);
    assert!(process(&fin, leaker.pid()).is_some());
    assert!(cw.wait_exit().success());
}

#[test]
fn leaker_is_flagged_ipv4() {
    leaker_and_good_server("127.0.0.1");
}

#[test]
fn leaker_is_flagged_ipv6() {
    leaker_and_good_server("::1");
}

/// A server that closes each CLOSE_WAIT socket 1.5 s late is `close_wait_slow`.
#[test]
fn late_closer_is_slow() {
    require_root();
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "300ms",
        "--close-wait-age",
        "1s",
        "--duration",
        "3s",
    ]);
    let mut late = Peer::spawn(&["closer", "127.0.0.1:0", &N.to_string(), "1500"]);
    let port: u16 = late.expect("port").parse().unwrap();
    let clients = connect_n(&addr("127.0.0.1", port), N);
    late.expect("accepted");
    drop(clients);
    late.expect("done");
    let fin = wait_report(&mut cw, "the final report", |r| r["final"] == true);
    let p = process(&fin, late.pid()).expect("late closer in report");
    assert!(flags(p).contains(&"close_wait_slow".into()), "{p}");
    let closed = &p["close_wait_closed"];
    assert_eq!(closed["count"], N as u64, "{p}");
    let p50 = closed["p50_s"].as_f64().unwrap();
    assert!((p50 - 1.5).abs() < 0.2, "p50 {p50}");
    assert_eq!(p["close_wait"], 0, "{p}");
    assert!(!flags(p).contains(&"close_wait_leak".into()), "{p}");
}

/// A leak from before connwatch started: flagged, with an estimated age.
#[test]
fn preexisting_leak_has_estimated_age() {
    require_root();
    let mut leaker = Peer::spawn(&["leaker", "127.0.0.1:0", &N.to_string()]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let clients = connect_n(&addr("127.0.0.1", port), N);
    leaker.expect("accepted");
    drop(clients);
    let closed_at = SystemTime::now();
    // Let the leak age past the threshold before connwatch looks.
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }

    for cmd in [&["snapshot"][..], &["watch", "--duration", "300ms"]] {
        let out = Command::new(CONNWATCH)
            .args(cmd)
            .args(["--json", "--close-wait-age", "1s", "--check"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{cmd:?} --check with a leak");
        let text = String::from_utf8(out.stdout).unwrap();
        let last = text.lines().last().expect("a report");
        let r: Value = serde_json::from_str(last).unwrap();
        assert_eq!(r["final"], true);
        let p = process(&r, leaker.pid()).expect("leaker in report");
        assert!(flags(p).contains(&"close_wait_leak".into()), "{p}");
        assert_eq!(p["close_wait"], N as u64);
        assert_eq!(p["close_wait_age_source"], "estimated");
        let truth = report_time(&r)
            .duration_since(closed_at)
            .unwrap()
            .as_secs_f64();
        let oldest = p["close_wait_oldest_s"].as_f64().unwrap();
        assert!(
            (oldest - truth).abs() < 1.0,
            "{cmd:?}: oldest {oldest} s, truth {truth} s"
        );
    }
}

/// After fork both processes hold the sockets: both are listed.
#[test]
fn fork_shared_sockets_list_both_holders() {
    require_root();
    let mut leaker = Peer::spawn(&["forkleaker", "127.0.0.1:0", &N.to_string()]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let clients = connect_n(&addr("127.0.0.1", port), N);
    leaker.expect("accepted");
    let child: u32 = leaker.expect("child").parse().unwrap();
    drop(clients);
    let out = Command::new(CONNWATCH)
        .args(["snapshot", "--json", "--close-wait-age", "100d"])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    for pid in [leaker.pid(), child] {
        let p = process(&r, pid).unwrap_or_else(|| panic!("holder {pid} missing: {r}"));
        assert_eq!(p["close_wait"], N as u64, "{p}");
    }
}

/// `--check` exits 0 when nothing is flagged.
#[test]
fn check_exits_zero_without_flags() {
    require_root();
    let out = Command::new(CONNWATCH)
        .args(["snapshot", "--check", "--close-wait-age", "100d"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("connwatch final report"), "{text}");
}

/// A report that cannot be written (a full disk) ends the command with one line and a
/// non-zero exit, for `watch` and `snapshot`, JSON and human alike; `--check` gives no
/// verdict for a report nobody got.
#[test]
fn a_failed_write_is_an_error() {
    require_root();
    for args in [
        &["watch", "--json", "--duration", "1s", "--check"][..],
        &["watch", "--duration", "1s"],
        &["snapshot", "--json", "--check"],
        &["snapshot"],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = Command::new(CONNWATCH)
            .args(args)
            .stdout(full)
            .output()
            .unwrap();
        let err = stderr_lines(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err:?}");
        assert!(
            err.iter().any(|l| l
                == "connwatch: cannot write the output: No space left on device (os error 28)"),
            "{args:?}: {err:?}"
        );
    }
}

/// Only a close() by the program is a close: a CLOSE_WAIT ended by a reset, or by the
/// exit of the process holding it, is not "slow to call close()" (`close_wait_slow`
/// would send the engineer to a close() that never ran).
#[test]
fn resets_and_exits_are_not_slow_closes() {
    require_root();
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "500ms",
        "--close-wait-age",
        "1s",
    ]);
    // One leaker whose peers reset its CLOSE_WAIT sockets, one that is killed.
    let mut reset = Peer::spawn(&["leaker", "127.0.0.1:0", "3"]);
    let port: u16 = reset.expect("port").parse().unwrap();
    let mut resetters = Peer::spawn(&["resetclients", &addr("127.0.0.1", port), "3"]);
    resetters.expect("shut");
    reset.expect("accepted");
    let mut killed = Peer::spawn(&["leaker", "127.0.0.1:0", "3"]);
    let port: u16 = killed.expect("port").parse().unwrap();
    let mut clients = Peer::spawn(&["clients", &addr("127.0.0.1", port), "3"]);
    clients.expect("closed");
    killed.expect("accepted");
    let (reset_pid, killed_pid) = (reset.pid(), killed.pid());
    wait_report(&mut cw, "both leakers flagged", |r| {
        [reset_pid, killed_pid]
            .iter()
            .all(|&pid| process(r, pid).is_some_and(|p| has_flag(p, "close_wait_leak")))
    });
    resetters.send("reset");
    resetters.expect("reset");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(killed_pid as i32, libc::SIGKILL) };
    let _ = killed.child.wait();
    let start = Instant::now();
    wait_report(
        &mut cw,
        "3 s of reports after the reset and the kill",
        |r| {
            for pid in [reset_pid, killed_pid] {
                if let Some(p) = process(r, pid) {
                    assert!(!has_flag(p, "close_wait_slow"), "called a slow close: {p}");
                    assert_eq!(p["close_wait_closed"]["count"], 0, "counted as closes: {p}");
                }
            }
            let gone = [reset_pid, killed_pid]
                .iter()
                .all(|&pid| process(r, pid).is_none_or(|p| p["close_wait"] == 0));
            gone && start.elapsed() > Duration::from_secs(3)
        },
    );
}

/// A leaker the way the kubelet places a container (cgroupfs driver: the cgroup
/// `/kubepods/besteffort/pod<uid>/<container id>`): its row names the container and the
/// pod's uid; a host process beside it has `container` and `k8s` null.
#[test]
fn a_container_leaker_is_named_by_its_cgroup() {
    require_root();
    let id = format!("{:064x}", 0xc0ffee_u64 + u64::from(std::process::id()));
    let uid = format!("0000abcd-0000-4000-8000-{:012x}", std::process::id());
    // The memory controller's v1 hierarchy where the host has one, else cgroup v2.
    let root = [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.join("cgroup.procs").exists())
    .expect("a cgroup hierarchy");
    let pod = root.join(format!("kubepods/besteffort/pod{uid}"));
    let dir = pod.join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "500ms"]);
    let mut leaker = Peer::spawn_with(None, &["leaker", "127.0.0.1:0", "2"], true);
    leaker.expect("ready");
    std::fs::write(dir.join("cgroup.procs"), leaker.pid().to_string()).unwrap();
    leaker.send("go");
    let port: u16 = leaker.expect("port").parse().unwrap();
    let mut clients = Peer::spawn(&["clients", &addr("127.0.0.1", port), "2"]);
    clients.expect("closed");
    leaker.expect("accepted");
    let r = wait_report(&mut cw, "the leaker's row with its container", |r| {
        process(r, leaker.pid()).is_some_and(|p| p["close_wait"] == 2 && !p["container"].is_null())
    });
    let p = process(&r, leaker.pid()).unwrap();
    assert_eq!(p["container"]["id"], id, "{p}");
    assert_eq!(p["container"]["runtime"], "containerd", "{p}");
    assert_eq!(p["k8s"]["pod_uid"], uid, "{p}");
    // The clients run on the host.
    if let Some(c) = process(&r, clients.pid()) {
        assert!(c["container"].is_null() && c["k8s"].is_null(), "{c}");
    }
    drop((leaker, clients, cw));
    let end = Instant::now() + DEADLINE;
    for d in [&dir, &pod, &pod.parent().unwrap().to_path_buf()] {
        while std::fs::remove_dir(d).is_err() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir(root.join("kubepods"));
}
