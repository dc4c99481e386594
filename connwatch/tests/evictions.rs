//! Root integration test of the classic tracepoint's per-socket LRU map: what it evicts
//! is counted. A file of its own, so that no other test's sockets run beside its 3,000.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use common::*;

common::peer_entry!();

const LIMIT: u64 = 1024;

/// The classic tracepoint keeps per-socket state in an LRU map of `--max-sockets`
/// entries: 1,500 open connections (3,000 sockets) against 1,024 entries make it evict,
/// and every socket whose state it evicted is counted as untracked (once).
#[test]
fn tracepoint_map_evictions_are_counted() {
    require_root();
    const OPEN: u64 = 1500;
    raise_fd_limit(16_384);
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--hook",
        "tracepoint",
        "--interval",
        "1s",
        "--max-sockets",
        &LIMIT.to_string(),
    ]);
    let pre = untracked(&wait_report(
        &mut cw,
        "a report before the connections",
        |_| true,
    ));
    let mut server = Peer::spawn(&["leaker", "127.0.0.1:0", &OPEN.to_string()]);
    let port: u16 = server.expect("port").parse().unwrap();
    let mut clients = Peer::spawn(&["holdclients", &addr("127.0.0.1", port), &OPEN.to_string()]);
    clients.expect("connected");
    server.expect("accepted");
    let r = wait_report(&mut cw, "the evictions counted", |r| {
        untracked(r) - pre >= 2 * OPEN - LIMIT
    });
    let counted = untracked(&r) - pre;
    assert!(
        counted <= 2 * OPEN,
        "{counted} untracked for {} sockets",
        2 * OPEN
    );
}
