//! Preflight, for real: a kernel too old is one sentence; a missing optional capability
//! costs one feature, with a warning, and the tool still runs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

peer_entry!();

const N: usize = 3;

/// `snapshot --json`, run as root minus the capabilities in `drop` (bounding set, so
/// the exec'd connwatch never holds them).
fn snapshot_without(drop: Option<&str>) -> (Value, Vec<String>) {
    let mut cmd = match drop {
        Some(caps) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--inh-caps=-all",
                &format!("--bounding-set={caps}"),
                CONNWATCH,
            ]);
            c
        }
        None => Command::new(CONNWATCH),
    };
    let out = cmd
        .args(["snapshot", "--json", "--close-wait-age", "100d"])
        .output()
        .expect("run connwatch");
    let err = stderr_lines(&out);
    assert!(out.status.success(), "{drop:?}: {:?} {err:?}", out.status);
    let report = serde_json::from_slice(&out.stdout).expect("a JSON report");
    (report, err)
}

/// A leaker in `netns` (or here) whose clients have hung up: N CLOSE_WAIT sockets.
fn leak(netns: Option<&NetNs>) -> Peer {
    let mut leaker = Peer::spawn_in(netns, &["leaker", "127.0.0.1:0", &N.to_string()]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let mut clients = Peer::spawn_in(
        netns,
        &["clients", &addr("127.0.0.1", port), &N.to_string()],
    );
    clients.expect("closed");
    leaker.expect("accepted");
    leaker
}

#[test]
fn kernel_older_than_5_8_is_refused_in_one_line() {
    require_root();
    // The UNAME26 personality makes this kernel report itself as 2.6.x.
    let out = Command::new("setarch")
        .args([std::env::consts::ARCH, "--uname-2.6", CONNWATCH, "trace"])
        .args(["--duration", "1s"])
        .output()
        .expect("run setarch");
    let err = stderr_lines(&out);
    assert_eq!(out.status.code(), Some(1), "{err:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("Linux 5.8 or later") && err[0].contains("2.6."),
        "{err:?}"
    );
    assert!(out.stdout.is_empty());
}

/// Without CAP_SYS_PTRACE (and DAC_READ_SEARCH/OVERRIDE) the fds of a root process
/// cannot be read: its CLOSE_WAIT sockets are still counted, as unattributed.
#[test]
fn without_ptrace_close_wait_is_counted_unattributed() {
    require_root();
    let leaker = leak(None);
    let (full, err) = snapshot_without(None);
    assert!(err.is_empty(), "{err:?}");
    let p = process(&full, leaker.pid()).expect("attributed with all capabilities");
    assert_eq!(p["close_wait"], N as u64);

    let (partial, err) = snapshot_without(Some("-sys_ptrace,-dac_read_search,-dac_override"));
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("warning") && err[0].contains("CAP_SYS_PTRACE"),
        "{err:?}"
    );
    assert!(process(&partial, leaker.pid()).is_none(), "{partial}");
    let unattributed = partial["unattributed"]["close_wait"].as_u64().unwrap();
    assert!(unattributed >= N as u64, "{partial}");
}

/// Without CAP_SYS_ADMIN other namespaces cannot be entered: a leak in one is not
/// listed, the tool says why and still reports this namespace.
#[test]
fn without_sys_admin_only_this_namespace_is_listed() {
    require_root();
    let ns = NetNs::new("caps");
    let in_ns = leak(Some(&ns));
    let here = leak(None);
    let (full, _) = snapshot_without(None);
    assert!(process(&full, in_ns.pid()).is_some(), "{full}");

    let (partial, err) = snapshot_without(Some("-sys_admin"));
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("warning") && err[0].contains("CAP_SYS_ADMIN"),
        "{err:?}"
    );
    assert!(process(&partial, in_ns.pid()).is_none(), "{partial}");
    let p = process(&partial, here.pid()).expect("this namespace still listed");
    assert_eq!(p["close_wait"], N as u64);
}

/// The probe loads and runs without CAP_SYS_ADMIN (CAP_BPF + CAP_PERFMON suffice).
#[test]
fn probe_runs_with_bpf_and_perfmon_only() {
    require_root();
    let out = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-sys_admin", CONNWATCH])
        .args(["trace", "--duration", "500ms"])
        .output()
        .expect("run setpriv");
    let err = stderr_lines(&out);
    assert!(out.status.success(), "{err:?}");
    assert!(err.iter().any(|l| l.contains("attached")), "{err:?}");
    assert!(err.iter().any(|l| l.contains("CAP_SYS_ADMIN")), "{err:?}");
}
