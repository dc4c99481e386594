//! Churn soak (bounded, under a minute): processes that leak a few CLOSE_WAIT sockets from
//! peers never seen before and then die, over and over. Everything keyed by pid, peer or
//! socket must be pruned, so connwatch's RSS after the churn is what it was once warm.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use std::collections::{HashMap, HashSet};

use common::*;
use serde_json::Value;
use socket2::{Domain, Socket, Type};

peer_entry!();

const WARM: Duration = Duration::from_secs(15);
const CHURN: Duration = Duration::from_secs(45);
/// `--window`: closes and growth samples older than this are forgotten.
const WINDOW: Duration = Duration::from_secs(5);
const THREADS: usize = 3;
const PER_ROUND: usize = 4;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One round: a new process accepts PER_ROUND connections from source addresses never
/// used before; the clients hang up (CLOSE_WAIT in the process), and the process is
/// ends 100 ms later, closing them (the clients' end in TIME_WAIT).
fn round(ns: &NetNs, next_peer: &AtomicU64) {
    let mut leaker = Peer::spawn_in(Some(ns), &["leaker", "127.0.0.1:0", &PER_ROUND.to_string()]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let clients: Vec<Socket> = (0..PER_ROUND)
        .map(|_| {
            let n = next_peer.fetch_add(1, Ordering::Relaxed);
            let src: SocketAddr = format!(
                "127.{}.{}.{}:0",
                1 + (n >> 16) % 254,
                (n >> 8) & 255,
                n & 255
            )
            .parse()
            .unwrap();
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.bind(&src.into()).unwrap();
            s.connect(&server.into()).unwrap();
            s
        })
        .collect();
    leaker.expect("accepted");
    drop(clients);
    thread::sleep(Duration::from_millis(100));
    // It closes its CLOSE_WAIT sockets and exits (a process killed with them open
    // closes nothing: connwatch would rightly count no closes).
    leaker.finish();
}

#[test]
fn churn_does_not_grow_memory() {
    require_root();
    let ns = Arc::new(NetNs::new("soak"));
    // The kernel keeps at most 256 TIME_WAIT sockets here (the rest overflow), so what
    // connwatch follows is bounded by the churn rate, not by the test's length.
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", "256");
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "250ms",
        "--close-wait-age",
        "50ms",
        "--window",
        &format!("{}s", WINDOW.as_secs()),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let next_peer = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (ns, stop, rounds, next_peer) =
                (ns.clone(), stop.clone(), rounds.clone(), next_peer.clone());
            thread::spawn(move || {
                ns.enter();
                while !stop.load(Ordering::Relaxed) {
                    round(&ns, &next_peer);
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut reports: Vec<(Instant, Value)> = Vec::new();
    let mut collect = |cw: &mut Connwatch, until: Instant| {
        while Instant::now() < until {
            if let Some(line) = cw.stdout.next_within(Duration::from_millis(200))
                && let Ok(v) = serde_json::from_str::<Value>(&line)
            {
                reports.push((Instant::now(), v));
            }
        }
    };
    collect(&mut cw, started + WARM);
    let warm = rss_kib(cw.pid());
    let warm_rounds = rounds.load(Ordering::Relaxed);
    collect(&mut cw, started + CHURN);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let end = rss_kib(cw.pid());
    let total_rounds = rounds.load(Ordering::Relaxed);
    // Once a window has passed, the dead processes' recent closes are history too.
    collect(
        &mut cw,
        Instant::now() + WINDOW + Duration::from_millis(1500),
    );
    eprintln!(
        "soak: {total_rounds} rounds ({warm_rounds} before warm), {} peers, rss warm {warm} KiB, end {end} KiB",
        next_peer.load(Ordering::Relaxed)
    );

    // The churn was real and seen: many processes, now dead, were reported holding or
    // closing CLOSE_WAIT sockets on the way.
    assert!(
        total_rounds - warm_rounds >= 300,
        "only {total_rounds} rounds"
    );
    let reported: HashSet<u64> = reports
        .iter()
        .flat_map(|(_, r)| r["processes"].as_array().cloned().unwrap_or_default())
        .filter(|p| {
            p["close_wait"].as_u64().unwrap_or(0) > 0
                || p["close_wait_closed"]["count"].as_u64().unwrap_or(0) > 0
        })
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    eprintln!("soak: {} leakers reported", reported.len());
    assert!(
        reported.len() >= 300,
        "only {} leakers reported",
        reported.len()
    );
    // Nothing lost silently.
    let (_, last) = reports.last().expect("reports");
    assert_eq!(last["loss"]["events_dropped"], 0, "{last}");
    // Dead processes are gone from the report once their window has passed.
    let lingering: Vec<&Value> = last["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| reported.contains(&p["pid"].as_u64().unwrap()))
        // TIME_WAITs a dead process closed first stay (and stay its) until the kernel
        // ends them; another thread's fork can make a child do the last close().
        .filter(|p| {
            p["close_wait"].as_u64() != Some(0)
                || p["close_wait_closed"]["count"].as_u64() != Some(0)
        })
        .collect();
    assert!(
        lingering.is_empty(),
        "dead leakers still listed: {lingering:?}"
    );

    // Every table of connwatch's stays at its warm size: state kept per dead pid, old
    // peer or closed socket would grow with the rounds (x3 from warm to end).
    let peak = |from: Instant, to: Instant| -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for (_, r) in reports.iter().filter(|(at, _)| (from..to).contains(at)) {
            for (table, n) in r["footprint"]["entries"].as_object().unwrap() {
                let e = out.entry(table.clone()).or_insert(0);
                *e = (*e).max(n.as_u64().unwrap());
            }
        }
        out
    };
    let five = Duration::from_secs(5);
    let at_warm = peak(started + WARM - five, started + WARM);
    let at_end = peak(started + CHURN - five, started + CHURN);
    eprintln!("soak: table peaks warm {at_warm:?}");
    eprintln!("soak: table peaks end  {at_end:?}");
    assert!(!at_end.is_empty(), "no footprint in reports");
    for (table, &n) in &at_end {
        let before = at_warm.get(table).copied().unwrap_or(0);
        assert!(
            n <= before + before / 2 + 64,
            "table {table} grew from {before} to {n} entries"
        );
    }
    // And so does RSS (allowing allocator noise).
    assert!(
        end <= warm + warm / 10 + 1024,
        "RSS grew from {warm} KiB to {end} KiB over {} rounds",
        total_rounds - warm_rounds
    );
}
