//! Leak sites on real programs: each leaker runs beside a polite twin in the same
//! process, so that a test passes only when the leaking function is named and the
//! polite one never is. A C server built with frame pointers and the same server built
//! without them (`support/sites_server.c`, gcc), and a Go client
//! (`support/sites_client.go`, Debian's golang-go).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    io::Write as _,
    net::{Shutdown, TcpStream},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Connwatch, DEADLINE, Lines, Peer, require_root, run, tool};
use serde_json::Value;

common::peer_entry!();

fn scratch(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sites-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The C server built with `flags` (each test its own binary: tests run in parallel).
fn c_server(tag: &str, flags: &[&str]) -> PathBuf {
    let dir = scratch(tag);
    let src = dir.join("sites_server.c");
    std::fs::write(&src, include_str!("support/sites_server.c")).unwrap();
    let bin = dir.join("sites_server");
    run(Command::new(tool("/usr/bin/gcc", "gcc"))
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src));
    bin
}

fn go_client(tag: &str) -> PathBuf {
    let dir = scratch(tag);
    let src = dir.join("sites_client.go");
    std::fs::write(&src, include_str!("support/sites_client.go")).unwrap();
    let bin = dir.join("sites_client");
    run(Command::new(tool("/usr/bin/go", "golang-go"))
        .args(["build", "-o"])
        .arg(&bin)
        .arg(&src)
        .current_dir(&dir)
        .env("GOCACHE", dir.join("cache"))
        .env("HOME", &dir)
        .env("GO111MODULE", "off"));
    bin
}

/// A program of ours, with its stdout read line by line.
struct Program {
    child: Child,
    stdin: ChildStdin,
    out: Lines,
}

impl Program {
    fn spawn(bin: &PathBuf, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let out = Lines::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take().unwrap();
        Self { child, stdin, out }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One connection to the C server: 'L' goes to its leaking handler, 'P' to the polite
/// one; we close, so the server reads EOF.
fn connect(port: u16, kind: &str) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(format!("{kind}hello").as_bytes()).unwrap();
    s.shutdown(Shutdown::Both).unwrap();
}

/// The row of `pid` in the next JSON report that satisfies `pred`.
fn row_where(
    cw: &mut Connwatch,
    pid: &str,
    what: &str,
    mut pred: impl FnMut(&Value) -> bool,
) -> Value {
    let pid: u64 = pid.parse().unwrap();
    let line = cw.stdout.wait_for(what, |l| {
        let Ok(r) = serde_json::from_str::<Value>(l) else {
            return false;
        };
        row_of(&r, pid).is_some_and(|row| pred(&row))
    });
    row_of(&serde_json::from_str(&line).unwrap(), pid).unwrap()
}

fn row_of(r: &Value, pid: u64) -> Option<Value> {
    r["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid))
        .cloned()
}

fn flagged(row: &Value) -> bool {
    row["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "close_wait_leak"))
}

fn sites(row: &Value) -> Vec<Value> {
    row["leak_sites"].as_array().cloned().unwrap_or_default()
}

fn site_at<'a>(sites: &'a [Value], at: &str) -> Option<&'a Value> {
    sites.iter().find(|s| s["at"] == at)
}

fn names(site: &Value, function: &str) -> bool {
    site["stack"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f.as_str().unwrap().starts_with(function))
}

/// No site of the row, and not its sentence, names `function`.
fn never_names(row: &Value, function: &str) {
    for s in sites(row) {
        assert!(!names(&s, function), "{function} named: {row:#}");
    }
    assert!(
        !row["reason"].as_str().unwrap_or("").contains(function),
        "{function} in the reason: {row:#}"
    );
}

const LEAKS: usize = 3;

/// `watch --stacks`, reporting every second, leaks flagged from 1 s.
const WATCH_STACKS: [&str; 7] = [
    "watch",
    "--stacks",
    "--json",
    "--interval",
    "1s",
    "--close-wait-age",
    "1s",
];

/// The C server built with `flags`, its port and pid, and `watch --json` (reports every
/// second, leaks flagged from 1 s) started on it with `extra` options.
fn c_server_under(tag: &str, flags: &[&str], extra: &[&str]) -> (Program, u16, String, Connwatch) {
    require_root();
    let bin = c_server(tag, flags);
    let mut server = Program::spawn(&bin, &[]);
    let port: u16 = server.out.wait_for("the port", |_| true).parse().unwrap();
    let pid = server.pid();
    let mut args = vec![
        "watch",
        "--json",
        "--interval",
        "1s",
        "--close-wait-age",
        "1s",
    ];
    args.extend(extra);
    args.extend(["--pid", &pid]);
    let cw = Connwatch::start(&args);
    (server, port, pid, cw)
}

/// The C server with `flags` under `watch --stacks`: its three leaked sockets are
/// counted at one EOF site and one accept site.
fn c_server_sites(tag: &str, flags: &[&str]) -> Value {
    let (_server, port, pid, mut cw) = c_server_under(tag, flags, &["--stacks"]);
    for _ in 0..LEAKS {
        connect(port, "L");
        connect(port, "P");
    }
    row_where(&mut cw, &pid, "the leaked sockets' sites", |r| {
        let s = sites(r);
        r["close_wait"] == LEAKS
            && site_at(&s, "eof").is_some_and(|e| e["sockets"] == LEAKS)
            && site_at(&s, "accept").is_some_and(|a| a["sockets"] == LEAKS)
            && r["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "close_wait_leak")
    })
}

#[test]
fn c_server_with_frame_pointers_names_the_leaking_handler() {
    let row = c_server_sites("fp", &["-g", "-O0", "-fno-omit-frame-pointer"]);
    let s = sites(&row);
    let eof = site_at(&s, "eof").unwrap();
    // glibc's read() keeps no frame: a frame-pointer walk alone skips the handler.
    assert!(names(eof, "leaky_handler (sites_server.c:"), "{row:#}");
    assert_eq!(eof["truncated"], false, "{row:#}");
    assert!(names(
        site_at(&s, "accept").unwrap(),
        "main (sites_server.c:"
    ));
    let reason = row["reason"].as_str().unwrap();
    assert!(
        reason.contains("read EOF at leaky_handler (sites_server.c:"),
        "{reason}"
    );
    never_names(&row, "polite_handler");
}

#[test]
fn c_server_without_frame_pointers_is_named_or_said_truncated() {
    let row = c_server_sites("nofp", &["-g", "-O2", "-fomit-frame-pointer"]);
    let s = sites(&row);
    let eof = site_at(&s, "eof").unwrap();
    assert!(
        names(eof, "leaky_handler") || eof["truncated"] == true,
        "neither named nor said truncated: {row:#}"
    );
    never_names(&row, "polite_handler");
}

/// The Go client, its server (a peer closing each connection at once), and connwatch
/// started by `args` (with the client's pid appended) before the client dials.
fn go_client_under(tag: &str, args: &[&str]) -> (Program, Peer, Connwatch) {
    client_under(&go_client(tag), &[], args)
}

/// A client program (`bin` with `pre` arguments before the address and the count)
/// under connwatch, as `go_client_under`.
fn client_under(bin: &PathBuf, pre: &[&str], args: &[&str]) -> (Program, Peer, Connwatch) {
    require_root();
    let mut server = Peer::spawn(&["closer", "127.0.0.1:0"]);
    let port = server.out.wait_for("the port", |l| l.starts_with("port "));
    let addr = format!("127.0.0.1:{}", port.trim_start_matches("port "));
    let leaks = LEAKS.to_string();
    let mut client_args = pre.to_vec();
    client_args.extend([addr.as_str(), leaks.as_str()]);
    let mut client = Program::spawn(bin, &client_args);
    client.out.wait_for("the client", |l| l == "ready");
    let pid = client.pid();
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--pid", &pid]);
    let cw = Connwatch::start(&full);
    writeln!(client.stdin, "go").unwrap();
    client.out.wait_for("the dials", |l| l.starts_with("done "));
    (client, server, cw)
}

#[test]
fn go_client_names_the_dialing_function() {
    let (client, _server, mut cw) = go_client_under("go", &WATCH_STACKS);
    let row = row_where(&mut cw, &client.pid(), "the Go client's sites", |r| {
        let s = sites(r);
        r["close_wait"] == LEAKS
            && site_at(&s, "connect").is_some_and(|c| c["sockets"] == LEAKS)
            && site_at(&s, "eof").is_some_and(|e| e["sockets"] == LEAKS)
            && flagged(r)
    });
    let s = sites(&row);
    // Sixteen frames under the dial, the program's own function is named.
    for at in ["connect", "eof"] {
        let site = site_at(&s, at).unwrap();
        assert!(names(site, "main.leakyClient (sites_client.go:"), "{row:#}");
        assert_eq!(site["truncated"], false, "{row:#}");
    }
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("made at main.leakyClient (sites_client.go:"),
        "{row:#}"
    );
    never_names(&row, "main.politeClient");
}

/// CPython without a perf map: its stacks name only the interpreter's C functions, so
/// the sites say truncated, with the option that would name the program's functions,
/// and the sentence names no place rather than the interpreter's `sock_recv`.
#[test]
fn python_without_a_perf_map_is_said_truncated_with_its_option() {
    let dir = scratch("python");
    let script = dir.join("sites_client.py");
    std::fs::write(&script, include_str!("support/sites_client.py")).unwrap();
    let python = PathBuf::from(tool("/usr/bin/python3", "python3"));
    let (client, _server, mut cw) =
        client_under(&python, &[script.to_str().unwrap()], &WATCH_STACKS);
    let row = row_where(&mut cw, &client.pid(), "the Python client's sites", |r| {
        let s = sites(r);
        site_at(&s, "connect").is_some_and(|c| c["sockets"] == LEAKS)
            && site_at(&s, "eof").is_some_and(|e| e["sockets"] == LEAKS)
            && flagged(r)
    });
    for site in sites(&row) {
        assert_eq!(site["truncated"], true, "{row:#}");
        assert!(
            site["hint"].as_str().unwrap().contains("-X perf"),
            "{row:#}"
        );
    }
    let reason = row["reason"].as_str().unwrap();
    assert!(
        reason.contains("read EOF at no function of the program's own (stack incomplete: run python 3.12+ with -X perf"),
        "{reason}"
    );
}

/// `trace --json --stacks`: a transition into CLOSE_WAIT carries the stack where its
/// socket was made; the leaked and the polite sockets each their own.
#[test]
fn trace_gives_each_close_wait_the_stack_that_made_its_socket() {
    let (_client, _server, mut cw) = go_client_under("trace", &["trace", "--json", "--stacks"]);
    let end = Instant::now() + DEADLINE;
    let (mut leaky, mut polite) = (0, 0);
    while (leaky < LEAKS || polite < LEAKS) && Instant::now() < end {
        let Some(line) = cw.stdout.next_within(Duration::from_millis(500)) else {
            continue;
        };
        let row: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if row["new"] != "CLOSE_WAIT" {
            assert!(row.get("stack").is_none(), "a stack on {row}");
            continue;
        }
        let stack = row["stack"]
            .as_array()
            .unwrap_or_else(|| panic!("no stack: {row}"));
        let has = |f: &str| stack.iter().any(|s| s.as_str().unwrap().starts_with(f));
        match (has("main.leakyClient"), has("main.politeClient")) {
            (true, false) => leaky += 1,
            (false, true) => polite += 1,
            _ => panic!("not one dialer: {row}"),
        }
    }
    assert_eq!((leaky, polite), (LEAKS, LEAKS), "{:?}", cw.stdout.seen);
}

/// Without --stacks, a process flagged close_wait_leak is captured from then on: its
/// next leaked sockets get their sites within a few reports.
#[test]
fn a_flagged_leak_gets_its_sites_without_stacks() {
    let (server, port, pid, mut cw) =
        c_server_under("auto", &["-g", "-O0", "-fno-omit-frame-pointer"], &[]);
    connect(port, "L");
    let row = row_where(&mut cw, &pid, "the leak flagged", |r| {
        r["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "close_wait_leak")
    });
    assert!(
        sites(&row).is_empty(),
        "no stack was captured before: {row:#}"
    );
    // The leak goes on: one more every report or so, until its sites are known.
    let end = Instant::now() + DEADLINE;
    let found = loop {
        assert!(
            Instant::now() < end,
            "no site within {DEADLINE:?}: {:?}",
            cw.stdout.seen
        );
        connect(port, "L");
        connect(port, "P");
        if let Some(line) = cw.stdout.next_within(Duration::from_millis(1500))
            && let Ok(r) = serde_json::from_str::<Value>(&line)
            && let Some(row) = row_of(&r, pid.parse().unwrap())
            && site_at(&sites(&row), "eof").is_some()
        {
            break row;
        }
    };
    let s = sites(&found);
    let eof = site_at(&s, "eof").unwrap();
    assert!(names(eof, "leaky_handler (sites_server.c:"), "{found:#}");
    // Only sockets leaked since capture began have a site.
    assert!(eof["sockets"].as_u64().unwrap() < found["close_wait"].as_u64().unwrap());
    never_names(&found, "polite_handler");
    // The leaker gone, nothing is captured any more.
    drop(server);
    cw.stdout.wait_for("capture to stop", |l| {
        serde_json::from_str::<Value>(l)
            .is_ok_and(|r| r["footprint"]["entries"]["stack_processes"] == 0)
    });
}
