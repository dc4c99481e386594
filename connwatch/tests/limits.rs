//! Root integration test of `--max-sockets`: sockets beyond the limit are counted as
//! untracked once each, not once per poll that sees them, so the counter (and the
//! `connwatch_sockets_untracked_total` alert built on it) stays flat while nothing changes.
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

const LIMIT: u64 = 1024;
const HELD: u64 = 3000;

/// 3,000 CLOSE_WAIT sockets that never change, over a limit of 1,024: the untracked
/// count settles at no more than one per socket and stays there for 30 s, while
/// `states` still counts every CLOSE_WAIT socket.
#[test]
fn overflow_is_counted_once_per_socket() {
    require_root();
    // The leaker and its clients inherit the limit: 3,000 sockets each side.
    raise_fd_limit(16_384);
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "1s",
        "--max-sockets",
        &LIMIT.to_string(),
    ]);
    // What other tests left on this host (TIME_WAITs over the limit) is counted too:
    // measure from there.
    let pre = untracked(&wait_report(&mut cw, "a report before the leak", |_| true));
    let mut leaker = Peer::spawn(&["leaker", "127.0.0.1:0", &HELD.to_string()]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let mut clients = Peer::spawn(&["clients", &addr("127.0.0.1", port), &HELD.to_string()]);
    clients.expect("closed");
    leaker.expect("accepted");

    // Settled: two reports two seconds apart with the same count, all sockets seen.
    let mut last: Option<(Instant, u64)> = None;
    let settled = wait_report(&mut cw, "the untracked count to settle", |r| {
        let n = untracked(r);
        if r["states"]["CLOSE_WAIT"].as_u64() < Some(HELD) || n == 0 {
            return false;
        }
        match last {
            Some((since, m)) if m == n => since.elapsed() >= Duration::from_secs(2),
            _ => {
                last = Some((Instant::now(), n));
                false
            }
        }
    });
    let base = untracked(&settled);
    // Every socket beyond the limit, at most once each: the CLOSE_WAIT sockets and the
    // clients' FIN_WAIT2 orphans (followed with the timewait sockets) over the limit.
    let new = base - pre;
    assert!(new >= HELD - LIMIT, "untracked {base} ({pre} before)");
    assert!(
        new <= 2 * HELD,
        "untracked {base} ({pre} before): counted more than once"
    );

    let until = Instant::now() + Duration::from_secs(30);
    let mut reports = 0;
    while Instant::now() < until {
        let line = cw
            .stdout
            .next_within(Duration::from_secs(5))
            .expect("a report every second");
        let Ok(r) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        reports += 1;
        assert_eq!(untracked(&r), base, "after {reports} reports");
        assert!(
            r["states"]["CLOSE_WAIT"].as_u64() >= Some(HELD),
            "{}",
            r["states"]
        );
    }
    assert!(reports >= 20, "{reports} reports in 30 s");
}
