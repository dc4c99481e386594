//! Bad input gets one clear line on stderr and a non-zero exit, never a panic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::process::{Command, Output};

use common::*;

fn run(cmd: &mut Command) -> (Output, Vec<String>) {
    let out = cmd.output().expect("run connwatch");
    let err = stderr_lines(&out);
    (out, err)
}

#[test]
fn non_root_gets_one_line_and_fails() {
    require_root();
    let (out, err) = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([CONNWATCH, "trace"]));
    assert!(!out.status.success());
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("needs root") && err[0].contains("sudo"),
        "{err:?}"
    );
    // Said once: not "connwatch: connwatch needs root".
    assert!(!err[0].contains("connwatch: connwatch"), "{err:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_flags_are_rejected_by_clap() {
    for args in [
        &["trace", "--ring-size", "3M"][..],
        &["trace", "--duration", "soon"],
        &["trace", "--hook", "kprobe"],
        &["trace", "--max-sockets", "12"],
        &["no-such-command"],
    ] {
        let (out, err) = run(Command::new(CONNWATCH).args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(err[0].starts_with("error:"), "{args:?}: {err:?}");
    }
}

#[test]
fn missing_btf_with_forced_tp_btf_says_what_to_do() {
    require_root();
    let (out, err) = run(Command::new(CONNWATCH)
        .args(["trace", "--hook", "tp-btf"])
        .env("CONNWATCH_BTF", "/nonexistent/vmlinux"));
    assert!(!out.status.success());
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("/nonexistent/vmlinux") && err[0].contains("--hook tracepoint"),
        "{err:?}"
    );
}

/// The default hook on a kernel with BTF is tp_btf: a probe the verifier rejects there
/// would otherwise hide behind the fallback to the classic tracepoint.
#[test]
fn kernel_with_btf_attaches_tp_btf_by_default() {
    require_root();
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("skipped: this kernel has no BTF");
        return;
    }
    for command in ["trace", "watch"] {
        let (out, err) = run(Command::new(CONNWATCH).args([command, "--duration", "200ms"]));
        assert!(out.status.success(), "{command}: {err:?}");
        assert!(
            err.iter()
                .any(|l| l.contains("attached tp_btf/inet_sock_set_state")),
            "{command}: {err:?}"
        );
    }
}

#[test]
fn missing_btf_falls_back_to_the_tracepoint_with_a_warning() {
    require_root();
    let (out, err) = run(Command::new(CONNWATCH)
        .args(["trace", "--duration", "200ms"])
        .env("CONNWATCH_BTF", "/nonexistent/vmlinux"));
    assert!(out.status.success(), "{err:?}");
    assert!(
        err.iter()
            .any(|l| l.contains("attached tracepoint/sock/inet_sock_set_state")),
        "{err:?}"
    );
    assert!(err.iter().any(|l| l.contains("warning")), "{err:?}");
}

#[test]
fn help_has_examples() {
    let (out, _) = run(Command::new(CONNWATCH).args(["trace", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Examples:") && help.contains("--json"),
        "{help}"
    );
}

#[test]
fn generates_completions_and_man_pages() {
    let dir = std::env::temp_dir().join(format!("cw-gen-{}", std::process::id()));
    let (out, _) = run(Command::new(CONNWATCH)
        .args(["generate", "--out"])
        .arg(&dir));
    assert!(out.status.success());
    let bash = std::fs::read_to_string(dir.join("completions/connwatch.bash")).unwrap();
    assert!(
        bash.contains("--close-wait-age"),
        "bash completion lacks flags"
    );
    assert!(dir.join("completions/_connwatch").exists());
    let man = std::fs::read_to_string(dir.join("man/connwatch-watch.1")).unwrap();
    assert!(man.contains("close\\-wait\\-age"), "{man}");
    // One page per command, no filler pages for clap's `help`.
    let mut pages: Vec<String> = std::fs::read_dir(dir.join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "connwatch-serve.1",
            "connwatch-snapshot.1",
            "connwatch-top.1",
            "connwatch-trace.1",
            "connwatch-watch.1",
            "connwatch.1"
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `top` from cron or `ssh` without `-t`: one line naming `watch`, before the probe loads
/// (nothing about "attached" on stderr), not a panic from the terminal library.
#[test]
fn top_without_a_terminal_says_use_watch() {
    require_root();
    let (out, err) = run(Command::new(CONNWATCH)
        .arg("top")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped()));
    assert_eq!(out.status.code(), Some(1), "{err:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("needs a terminal") && err[0].contains("connwatch watch"),
        "{err:?}"
    );
}

/// A negative duration is named as such, not "unexpected argument '-1'".
#[test]
fn negative_durations_are_named() {
    for args in [
        &["watch", "--interval", "-1s"][..],
        &["trace", "--duration", "-5s"],
        &["watch", "--close-wait-age", "-1m"],
    ] {
        let (out, err) = run(Command::new(CONNWATCH).args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(err[0].contains("is negative"), "{args:?}: {err:?}");
    }
}

/// `--listen` says what the OS said when it cannot bind (host names: `cli::parse_listen`).
#[test]
fn listen_errors_name_the_os_error() {
    require_root();
    // 192.0.2.1 (TEST-NET-1) is on no interface of this host: nothing is sent to it.
    let (out, err) = run(Command::new(CONNWATCH).args(["serve", "--listen", "192.0.2.1:9977"]));
    assert!(!out.status.success());
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("not on this host") && err[0].contains("os error 99"),
        "{err:?}"
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (out, err) =
        run(Command::new(CONNWATCH).args(["serve", "--listen", &format!("127.0.0.1:{port}")]));
    assert!(!out.status.success());
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("os error 98") && err[0].contains("in use"),
        "{err:?}"
    );
}
