//! Helpers for the root integration tests: run the real connwatch binary, and real peer
//! processes (this test binary re-executed in a peer role) that open sockets on loopback.
//!
//! Every wait is on a condition with a deadline; no test sleeps to synchronise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

/// Defines the ignored test `peer_entry` that re-executed peer processes enter (see
/// `peer_main`). Each test binary that spawns peers invokes it once at its root.
#[allow(unused_macros)] // cli.rs spawns no peers
macro_rules! peer_entry {
    () => {
        #[test]
        #[ignore = "helper: runs only as a re-executed peer process"]
        fn peer_entry() {
            if let Ok(role) = std::env::var("CW_PEER") {
                common::peer_main(&role);
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use peer_entry;

pub const CONNWATCH: &str = env!("CARGO_BIN_EXE_connwatch");

/// A finished command's stderr lines, after checking that nothing panicked.
#[allow(dead_code)] // not every test binary runs commands to completion
pub fn stderr_lines(out: &std::process::Output) -> Vec<String> {
    let err: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        !err.iter().any(|l| l.contains("panicked")),
        "connwatch panicked: {err:?}"
    );
    err
}
pub const DEADLINE: Duration = Duration::from_secs(15);

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "root integration tests load the real probe: run them as root (cargo xtask test)"
    );
}

/// Lines of a child's output, read by a thread so that waits can have deadlines.
pub struct Lines {
    rx: Receiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn new(r: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Next line, or `None` at EOF or after `deadline`.
    pub fn next_within(&mut self, deadline: Duration) -> Option<String> {
        match self.rx.recv_timeout(deadline) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Reads until a line satisfies `pred`; panics with what was seen after the deadline.
    pub fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.next_within(left) {
                Some(line) if pred(&line) => return line,
                Some(_) => {}
                None => panic!(
                    "timed out waiting for {what}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Everything already read plus whatever arrives until `idle` passes with nothing new.
    pub fn drain(&mut self, idle: Duration) -> Vec<String> {
        while self.next_within(idle).is_some() {}
        self.seen.clone()
    }
}

/// A running `connwatch` with its output streams.
pub struct Connwatch {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Connwatch {
    /// Starts connwatch and waits until it says the probe is attached.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(CONNWATCH)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn connwatch");
        let stdout = Lines::new(child.stdout.take().unwrap());
        let stderr = Lines::new(child.stderr.take().unwrap());
        let mut cw = Self {
            child,
            stdout,
            stderr,
        };
        cw.stderr
            .wait_for("connwatch to attach", |l| l.contains("attached"));
        cw
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the process to exit, with a deadline.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < end, "connwatch did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Connwatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer process: this test binary re-executed in a role (see `peer_main`).
pub struct Peer {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub out: Lines,
}

impl Peer {
    pub fn spawn(role: &[&str]) -> Self {
        Self::spawn_in(None, role)
    }

    /// Spawns the peer inside a network namespace (`ip netns exec`) when one is given.
    pub fn spawn_in(netns: Option<&NetNs>, role: &[&str]) -> Self {
        Self::spawn_with(netns, role, false)
    }

    /// With `wait`, the peer says `ready` and starts only when sent `go`.
    pub fn spawn_with(netns: Option<&NetNs>, role: &[&str], wait: bool) -> Self {
        Self::spawn_as(netns, None, role, wait)
    }

    /// A peer whose command name (comm) is `comm`, as a program of its own would have.
    pub fn spawn_named(netns: Option<&NetNs>, comm: &str, role: &[&str]) -> Self {
        Self::spawn_as(netns, Some(comm), role, false)
    }

    fn spawn_as(netns: Option<&NetNs>, comm: Option<&str>, role: &[&str], wait: bool) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .args([
                "--exact",
                "peer_entry",
                "--ignored",
                "--nocapture",
                "--quiet",
            ])
            .env("CW_PEER", role.join(" "))
            .env("CW_PEER_WAIT", if wait { "1" } else { "" })
            .env("CW_PEER_COMM", comm.unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn peer");
        let stdin = child.stdin.take();
        let out = Lines::new(child.stdout.take().unwrap());
        Self { child, stdin, out }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line `key value` from the peer and returns `value`.
    pub fn expect(&mut self, key: &str) -> String {
        let prefix = format!("{key} ");
        let line = self
            .out
            .wait_for(&format!("peer to say {key}"), |l| l.starts_with(&prefix));
        line[prefix.len()..].to_string()
    }

    pub fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("the peer's stdin is open");
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Peer {
    /// Ends the peer the way a program ends on its own: its stdin closes, it drops what
    /// it holds (close() on its sockets) and exits; killed (on drop) only if it has not
    /// after the deadline.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Entry point of a peer process. Roles (from `CW_PEER`):
/// - `server ADDR`: listen on ADDR (port 0), say `port N`, accept one connection, say
///   `accepted`, then on `close` close it and say `closed`.
/// - `client ADDR HOLD_MS`: connect, say `local PORT`, keep the connection HOLD_MS, close
///   it and say `held MS` (measured from connect's return to close), then idle.
///
/// A peer exits when its stdin closes.
pub fn peer_main(role: &str) {
    let args: Vec<&str> = role.split_whitespace().collect();
    if let Ok(comm) = std::env::var("CW_PEER_COMM")
        && !comm.is_empty()
    {
        // The process's name (its main thread's, as /proc/PID/comm shows) and this
        // thread's (peers run on a test thread; the probe sees the thread's name).
        std::fs::write("/proc/self/comm", &comm).unwrap();
        let name = std::ffi::CString::new(comm).unwrap();
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    let mut stdin = BufReader::new(std::io::stdin()).lines();
    if std::env::var("CW_PEER_WAIT").is_ok_and(|v| v == "1") {
        // Wait until the test has placed us (e.g. in a cgroup) before opening sockets.
        println!("ready 1");
        std::io::stdout().flush().unwrap();
        while let Some(Ok(line)) = stdin.next() {
            if line == "go" {
                break;
            }
        }
    }
    let say = |s: String| {
        println!("{s}");
        std::io::stdout().flush().unwrap();
    };
    match args.as_slice() {
        // Accepts connections and closes each at once: a client that never closes its
        // end holds a CLOSE_WAIT socket, and this process the FIN_WAIT2 end.
        ["closer", addr] => {
            let l = TcpListener::bind(addr.parse::<SocketAddr>().unwrap()).unwrap();
            say(format!("port {}", l.local_addr().unwrap().port()));
            for conn in l.incoming() {
                drop(conn);
            }
        }
        ["server", addr] => {
            let l = TcpListener::bind(addr.parse::<SocketAddr>().unwrap()).unwrap();
            say(format!("port {}", l.local_addr().unwrap().port()));
            let (conn, _) = l.accept().unwrap();
            say("accepted 1".into());
            while let Some(Ok(cmd)) = stdin.next() {
                if cmd == "close" {
                    drop(conn);
                    say("closed 1".into());
                    break;
                }
            }
        }
        ["client", addr, hold_ms] => {
            let conn = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
            let start = Instant::now();
            say(format!("local {}", conn.local_addr().unwrap().port()));
            thread::sleep(Duration::from_millis(hold_ms.parse().unwrap()));
            let held = start.elapsed();
            drop(conn);
            say(format!("held {:.3}", held.as_secs_f64() * 1e3));
        }
        ["leaker", addr, n] | ["forkleaker", addr, n] => {
            // Accepts N connections and never closes them: once the clients close, they
            // sit in CLOSE_WAIT. `forkleaker` then forks, so parent and child share them.
            let l = TcpListener::bind(addr.parse::<SocketAddr>().unwrap()).unwrap();
            say(format!("port {}", l.local_addr().unwrap().port()));
            let n: usize = n.parse().unwrap();
            let held: Vec<TcpStream> = (0..n).map(|_| l.accept().unwrap().0).collect();
            say(format!("accepted {n}"));
            if args[0] == "forkleaker" {
                // SAFETY: the child only sleeps and polls its parent before exiting.
                let child = unsafe { libc::fork() };
                if child == 0 {
                    // SAFETY: getppid/_exit have no preconditions.
                    while unsafe { libc::getppid() } != 1 {
                        thread::sleep(Duration::from_millis(50));
                    }
                    unsafe { libc::_exit(0) };
                }
                say(format!("child {child}"));
            }
            for _ in stdin.by_ref() {}
            drop(held);
            drop(l);
            return;
        }
        ["closer", addr, n, delay_ms] => {
            // Closes each connection DELAY_MS after its peer closed it.
            let l = TcpListener::bind(addr.parse::<SocketAddr>().unwrap()).unwrap();
            say(format!("port {}", l.local_addr().unwrap().port()));
            let delay = Duration::from_millis(delay_ms.parse().unwrap());
            let workers: Vec<_> = (0..n.parse::<usize>().unwrap())
                .map(|_| {
                    let (mut conn, _) = l.accept().unwrap();
                    thread::spawn(move || {
                        let mut buf = [0u8; 64];
                        while std::io::Read::read(&mut conn, &mut buf).unwrap_or(0) > 0 {}
                        thread::sleep(delay);
                        drop(conn);
                    })
                })
                .collect();
            say(format!("accepted {}", workers.len()));
            for w in workers {
                w.join().unwrap();
            }
            say("done 1".into());
        }
        ["firstcloser", addr, n] => {
            // A server that closes each connection first, as soon as it is accepted.
            let l = TcpListener::bind(addr.parse::<SocketAddr>().unwrap()).unwrap();
            say(format!("port {}", l.local_addr().unwrap().port()));
            let n: usize = n.parse().unwrap();
            for _ in 0..n {
                drop(l.accept().unwrap().0);
            }
            say(format!("closed {n}"));
            for _ in stdin.by_ref() {}
            drop(l);
            return;
        }
        ["secondclosers", addr, n] => {
            // Connects N times; each waits for the server to close first, then closes.
            let n: usize = n.parse().unwrap();
            for _ in 0..n {
                let mut c = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
                c.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut buf = [0u8; 16];
                while std::io::Read::read(&mut c, &mut buf).unwrap_or(0) > 0 {}
                drop(c);
            }
            say(format!("closed {n}"));
        }
        ["reusers", addr, n] => {
            // As `secondclosers`, for a churn over a few ports: each connection may reuse
            // the 4-tuple of one of the server's TIME_WAITs. A connect that fails is
            // tried again (counted, with the last error).
            let n: usize = n.parse().unwrap();
            let (mut failed, mut last) = (0, String::new());
            let mut done = 0;
            while done < n {
                match TcpStream::connect(addr.parse::<SocketAddr>().unwrap()) {
                    Ok(mut c) => {
                        c.set_read_timeout(Some(DEADLINE)).unwrap();
                        let mut buf = [0u8; 16];
                        while std::io::Read::read(&mut c, &mut buf).unwrap_or(0) > 0 {}
                        done += 1;
                    }
                    Err(e) => {
                        failed += 1;
                        last = e.to_string();
                        assert!(failed <= n, "{failed} connects failed, the last: {last}");
                    }
                }
            }
            say(format!("closed {n} failed {failed} {last}"));
        }
        ["clients", addr, n] => {
            // Connects N times and closes each connection first, at once.
            let n: usize = n.parse().unwrap();
            for _ in 0..n {
                let c = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
                say(format!("local {}", c.local_addr().unwrap().port()));
                drop(c);
            }
            say(format!("closed {n}"));
        }
        ["holdclients", addr, n] => {
            // Connects N times and never closes: once the server closes, these sit in
            // CLOSE_WAIT (a leaking client on "another host").
            let n: usize = n.parse().unwrap();
            let mut held: Vec<TcpStream> = (0..n)
                .map(|_| TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap())
                .collect();
            say(format!("connected {n}"));
            for c in &mut held {
                c.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut buf = [0u8; 16];
                while std::io::Read::read(c, &mut buf).unwrap_or(0) > 0 {}
            }
            say(format!("eof {n}"));
            for _ in stdin.by_ref() {}
            drop(held);
            return;
        }
        ["resetclients", addr, n] => {
            // Connects N times and shuts down its sending side (the server's sockets
            // go CLOSE_WAIT); on `reset`, closes each with SO_LINGER 0: an RST ends the
            // server's CLOSE_WAIT without any close() of the server's.
            let n: usize = n.parse().unwrap();
            let held: Vec<TcpStream> = (0..n)
                .map(|_| {
                    let c = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                    c
                })
                .collect();
            say(format!("shut {n}"));
            while let Some(Ok(cmd)) = stdin.next() {
                if cmd == "reset" {
                    break;
                }
            }
            for c in held {
                socket2::SockRef::from(&c)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(c);
            }
            say(format!("reset {n}"));
        }
        ["shutclients", addr, n] => {
            // Connects N times and shuts down its sending side, keeping each socket: they
            // wait in FIN_WAIT2 for a peer that never closes.
            let n: usize = n.parse().unwrap();
            let held: Vec<TcpStream> = (0..n)
                .map(|_| {
                    let c = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                    c
                })
                .collect();
            say(format!("shut {n}"));
            for _ in stdin.by_ref() {}
            drop(held);
            return;
        }
        ["sendclients", addr, n, bytes] => {
            // Connects N times, sends BYTES on each, and closes first.
            let n: usize = n.parse().unwrap();
            let data = vec![b'x'; bytes.parse().unwrap()];
            for _ in 0..n {
                let mut c = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
                c.write_all(&data).unwrap();
                drop(c);
            }
            say(format!("closed {n}"));
        }
        ["idleclients", addr, n, idle_ms] => {
            // Connects N times, stays quiet IDLE_MS, then closes all first (a server
            // timing out idle keep-alive connections, seen from its pooling client).
            let n: usize = n.parse().unwrap();
            let conns: Vec<TcpStream> = (0..n)
                .map(|_| TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap())
                .collect();
            thread::sleep(Duration::from_millis(idle_ms.parse().unwrap()));
            drop(conns);
            say(format!("closed {n}"));
        }
        other => panic!("unknown peer role {other:?}"),
    }
    // Stay alive (owning nothing more) until the test is done with us.
    for _ in stdin.by_ref() {}
}

/// A cgroup v2 made by the test, removed on drop.
pub struct Cgroup(pub std::path::PathBuf);

impl Cgroup {
    /// A cgroup named `name` at the root of the cgroup2 mount.
    pub fn new(name: &str) -> Self {
        let root = std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_string())
            })
            .expect("a cgroup2 mount");
        let dir = std::path::PathBuf::from(root).join(name);
        std::fs::create_dir(&dir).expect("create a cgroup");
        Self(dir)
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let end = Instant::now() + DEADLINE;
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A network namespace made for one test, with loopback up; deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let name = format!("cw-{tag}-{}", std::process::id());
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        run(&["netns", "add", &name]);
        let ns = Self { name };
        run(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Links this namespace to `other` with a veth pair on 10.200.`net`.0/24: returns
    /// (this side's address, the other side's), two hosts as far as TCP can tell.
    pub fn link(&self, other: &NetNs, net: u8) -> (String, String) {
        let (a, b) = (format!("10.200.{net}.1"), format!("10.200.{net}.2"));
        let (va, vb) = (format!("cwa{net}"), format!("cwb{net}"));
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        run(&[
            "-n",
            &self.name,
            "link",
            "add",
            &va,
            "type",
            "veth",
            "peer",
            "name",
            &vb,
            "netns",
            &other.name,
        ]);
        run(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            &va,
        ]);
        run(&[
            "-n",
            &other.name,
            "addr",
            "add",
            &format!("{b}/24"),
            "dev",
            &vb,
        ]);
        run(&["-n", &self.name, "link", "set", &va, "up"]);
        run(&["-n", &other.name, "link", "set", &vb, "up"]);
        (a, b)
    }

    /// Moves the calling thread into this namespace (setns affects only that thread).
    pub fn enter(&self) {
        use std::os::fd::AsRawFd as _;
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        // SAFETY: setns on an open namespace fd, for this thread only.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }

    /// Sets a sysctl inside the namespace (never on the host).
    pub fn sysctl(&self, key: &str, value: &str) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}"))
            .status()
            .expect("run sysctl");
        assert!(st.success(), "sysctl {key} in {}", self.name);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Opens `n` connections to `addr` from this process.
pub fn connect_n(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(addr).expect("connect to peer"))
        .collect()
}

/// `ip` and `port` as a connectable address (brackets for IPv6).
pub fn addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// One `trace --json` row.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Row {
    pub time: String,
    pub family: String,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    pub old: String,
    pub new: String,
    pub duration_ms: Option<f64>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub owner_source: String,
}

pub fn parse_rows(lines: &[String]) -> Vec<Row> {
    lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON row {l}: {e}")))
        .collect()
}

/// The row of `pid` in a JSON report.
pub fn process(r: &serde_json::Value, pid: u32) -> Option<&serde_json::Value> {
    r["processes"].as_array()?.iter().find(|p| p["pid"] == pid)
}

pub fn has_flag(p: &serde_json::Value, flag: &str) -> bool {
    p["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == flag))
}

/// Reads JSON reports from connwatch until one satisfies `pred`.
pub fn wait_report(
    cw: &mut Connwatch,
    what: &str,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let line = cw.stdout.wait_for(what, |l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|r| pred(&r))
    });
    serde_json::from_str(&line).unwrap_or_default()
}

/// `loss.sockets_untracked` of a JSON report.
pub fn untracked(r: &serde_json::Value) -> u64 {
    r["loss"]["sockets_untracked"].as_u64().unwrap()
}

/// Raises this process's fd limit (its peers inherit it), for tests that hold thousands
/// of sockets.
pub fn raise_fd_limit(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads one struct, which `lim` is.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

/// A port the kernel had free a moment ago (for servers that take a port number).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Plain HTTP/1.0 GET on loopback: (status, body).
pub fn get(port: u16, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Runs a set-up command (a build, a runtime's CLI) that must succeed; its output.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A program a test drives, which the test command installs: missing is a failure.
pub fn tool(path: &str, package: &str) -> String {
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: `cargo xtask test` installs it (Debian package {package})"
    );
    path.to_string()
}
