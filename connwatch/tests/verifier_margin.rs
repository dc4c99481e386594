//! The probe verifies with margin, and a rejection reads as one line.
//!
//! A newcomer's toolchain can build a slightly different object than ours, so each
//! program must stay well under the verifier's 512-byte combined stack: this test reads
//! the verifier's own `stack depth` figure for every program connwatch loads, under both
//! hooks, and fails above 384 bytes. aya asks for a verifier log only after a failed
//! load, so an LD_PRELOAD shim (`support/bpf_shim.c`, built here with gcc) asks the
//! kernel for `BPF_LOG_STATS` on every load and writes the figure down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use common::{CONNWATCH, require_root, stderr_lines};

/// The combined stack each program may use: 512 is the kernel's limit.
const MARGIN_BYTES: u32 = 384;

/// Builds the shim once per test binary (tests run in parallel: each gets its own copy).
fn shim(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/bpf_shim.c");
    let out = dir.join(format!("bpf_shim_{tag}.so"));
    let st = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("gcc is needed to build the test shim (cargo xtask setup installs it)");
    assert!(st.success(), "cannot build {}", src.display());
    out
}

fn run_with_shim(tag: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(CONNWATCH);
    cmd.args(args).env("LD_PRELOAD", shim(tag));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run connwatch")
}

/// `(program name, combined stack)` from the shim's lines `NAME stack depth A+B+...`.
fn stack_figures(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(" stack depth ")?;
            let total = rest
                .split('+')
                .map(|n| n.trim().parse::<u32>().unwrap_or(u32::MAX))
                .fold(0u32, u32::saturating_add);
            Some((name.to_string(), total))
        })
        .collect()
}

/// The programs of stack capture, which `--stacks` loads at once.
const STACK_PROGRAMS: [&str; 4] = [
    "connwatch_connect_enter",
    "connwatch_fd_enter",
    "connwatch_eof_exit",
    "connwatch_accept_exit",
];

/// The iterators, loaded wherever the kernel has BTF: the fd index's and the seed's.
const ITERATORS: [&str; 2] = ["connwatch_socket_fds", "connwatch_tcp_sockets"];

fn margin_under(hook: &str, program: &str) {
    require_root();
    let stats = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("stack_{hook}.txt"));
    let _ = std::fs::remove_file(&stats);
    let out = run_with_shim(
        hook,
        &["trace", "--hook", hook, "--stacks", "--duration", "1s"],
        &[("CONNWATCH_SHIM_STATS", stats.to_str().unwrap())],
    );
    let err = stderr_lines(&out);
    assert!(out.status.success(), "trace --hook {hook} failed: {err:?}");
    let text = std::fs::read_to_string(&stats).unwrap_or_default();
    let figures = stack_figures(&text);
    for program in std::iter::once(program)
        .chain(STACK_PROGRAMS)
        .chain(ITERATORS)
    {
        assert!(
            figures
                .iter()
                .any(|(name, _)| program.starts_with(name.as_str())),
            "no verifier figure for {program}: {text:?} (stderr {err:?})"
        );
    }
    for (name, total) in &figures {
        assert!(
            *total <= MARGIN_BYTES,
            "{name} uses {total} bytes of BPF stack (margin {MARGIN_BYTES}, limit 512): {text}"
        );
    }
}

#[test]
fn tp_btf_stack_has_margin() {
    margin_under("tp-btf", "connwatch_tp_btf");
}

#[test]
fn tracepoint_stack_has_margin() {
    margin_under("tracepoint", "connwatch_tracepoint");
}

#[test]
fn the_parser_reads_the_verifier_line() {
    let figures = stack_figures("connwatch_trace stack depth 432+0+112\nnoise\n");
    assert_eq!(figures, vec![("connwatch_trace".to_string(), 544)]);
}

/// A kernel that rejects the probe gets one plain line, not a debug struct; the
/// verifier's last lines follow only with --verbose.
#[test]
fn a_rejection_is_one_line() {
    require_root();
    let reject = [("CONNWATCH_SHIM_REJECT", "connwatch_tp")];
    let args = ["trace", "--hook", "tp-btf", "--duration", "1s"];
    let out = run_with_shim("reject", &args, &reject);
    let err = stderr_lines(&out);
    assert!(!out.status.success(), "a rejected probe must fail: {err:?}");
    assert_eq!(
        err,
        vec![
            "connwatch: the kernel rejected tp_btf/inet_sock_set_state: Permission denied (os error 13) (run with --verbose for the verifier's last lines)"
                .to_string()
        ]
    );
    let mut verbose = args.to_vec();
    verbose.push("--verbose");
    let out = run_with_shim("reject", &verbose, &reject);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("invalid func unknown#999"), "{text}");
    assert!(
        !text.contains("LoadError") && !text.contains("io_error"),
        "{text}"
    );
}
