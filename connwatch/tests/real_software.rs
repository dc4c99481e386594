//! Root tests against software nobody here wrote: Debian's redis-server and PostgreSQL
//! with the Python clients people pool them with (redis-py, psycopg2), and
//! `python3 -m http.server` with a client that never reads its reply. `cargo xtask test`
//! installs them; a server or client that cannot start fails the test, loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    io::Write as _,
    net::TcpStream,
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// A server started for a test and killed with it.
struct Server {
    child: Child,
    what: &'static str,
}

impl Server {
    /// Starts `cmd` and waits until it accepts connections on `port`.
    fn start(what: &'static str, cmd: &mut Command, port: u16) -> Self {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e} (cargo xtask test installs it)"));
        let mut server = Self { child, what };
        let end = Instant::now() + DEADLINE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = server.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = server.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("{what} exited before listening ({st}): {err}");
            }
            assert!(Instant::now() < end, "{what} did not listen on port {port}");
            thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    /// Stops the server the way its service manager would (SIGTERM: nginx's master
    /// then stops its workers, which a SIGKILL would orphan), killing it after a while.
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.child.try_wait().ok().flatten().is_some() {
                eprintln!("stopped {}", self.what);
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("killed {}", self.what);
    }
}

/// A Python client: a script that says `ready` once its connections are set up, and
/// keeps them until its stdin closes.
struct Client {
    child: Child,
    _stdin: ChildStdin,
    out: Lines,
}

impl Client {
    fn start(script: &str, args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let mut out = Lines::new(child.stdout.take().unwrap());
        out.wait_for("the client to be ready", |l| l == "ready");
        Self {
            child,
            _stdin: stdin,
            out,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.out;
    }
}

fn reason(p: &Value) -> String {
    p["reason"].as_str().unwrap_or_default().to_string()
}

/// Reads reports until `pid` has carried `flag` with a reason satisfying `cause` for
/// `hold`, checking `every` report on the way; returns the last report.
fn flagged_for(
    cw: &mut Connwatch,
    pid: u32,
    flag: &str,
    cause: impl Fn(&str) -> bool,
    hold: Duration,
    mut every: impl FnMut(&Value),
) -> Value {
    let mut since: Option<Instant> = None;
    wait_report(cw, &format!("pid {pid} flagged {flag} for {hold:?}"), |r| {
        every(r);
        let hit = process(r, pid).is_some_and(|p| has_flag(p, flag) && cause(&reason(p)));
        match (hit, since) {
            (true, None) => since = Some(Instant::now()),
            (false, _) => since = None,
            _ => {}
        }
        since.is_some_and(|t| t.elapsed() >= hold)
    })
}

const REDIS_POOL: &str = r#"
import sys, redis
pool = redis.ConnectionPool(host="127.0.0.1", port=int(sys.argv[1]), max_connections=10)
def get():
    try:
        return pool.get_connection()
    except TypeError:  # redis-py before 5.3 wants a command name
        return pool.get_connection("PING")
conns = [get() for _ in range(10)]
for c in conns:
    c.send_command("PING")
    c.read_response()
for c in conns:
    pool.release(c)
print("ready", flush=True)
sys.stdin.read()
"#;

/// `redis-server --timeout 2` closes the idle connections of a redis-py pool of 10:
/// python holds 10 CLOSE_WAIT sockets (the leak, an idle pool), redis-server's closed
/// connections wait in FIN_WAIT2 for python. Both ends are local and python is named:
/// python is flagged with the idle-pool cause; redis-server, which closed properly, is
/// never flagged (`peer_not_closing` would send the engineer to the wrong program).
#[test]
fn redis_idle_pool_blames_the_client_not_redis() {
    require_root();
    let port = free_port();
    let redis = Server::start(
        "redis-server",
        Command::new("redis-server").args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--timeout",
            "2",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]),
        port,
    );
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "500ms",
        "--close-wait-age",
        "3s",
        "--fin-wait2-age",
        "2s",
    ]);
    let client = Client::start(REDIS_POOL, &[&port.to_string()]);
    let r = flagged_for(
        &mut cw,
        client.pid(),
        "close_wait_leak",
        |reason| reason.contains("pool"),
        Duration::from_secs(3),
        |r| {
            if let Some(p) = process(r, redis.pid()) {
                assert!(
                    p["flags"].as_array().is_none_or(Vec::is_empty),
                    "redis-server blamed: {p}"
                );
            }
        },
    );
    let py = process(&r, client.pid()).unwrap();
    assert_eq!(py["close_wait"], 10, "{py}");
    assert!(!reason(py).contains("stopped reading"), "{py}");
}

const PG_POOL: &str = r#"
import sys, psycopg2.pool
pool = psycopg2.pool.SimpleConnectionPool(5, 5, host="127.0.0.1", port=int(sys.argv[1]),
                                          user="postgres", dbname="postgres")
conns = [pool.getconn() for _ in range(5)]
for c in conns:
    cur = c.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    c.commit()
for c in conns:
    pool.putconn(c)
print("ready", flush=True)
sys.stdin.read()
"#;

/// A PostgreSQL cluster in a directory of the test's, run as the `postgres` user.
fn postgres(port: u16, idle_timeout: &str) -> (Server, PathBuf) {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (cargo xtask test installs it)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .find(|p| p.join("postgres").exists())
        .expect("no postgres binary under /usr/lib/postgresql");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pg-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let st = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let as_postgres = |program: PathBuf| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--reset-env",
        ])
        .arg(program);
        c
    };
    let data = dir.join("data");
    let out = as_postgres(bin.join("initdb"))
        .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = Server::start(
        "postgres",
        as_postgres(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("idle_session_timeout={idle_timeout}"),
                "-c",
                "fsync=off",
            ]),
        port,
    );
    (server, dir)
}

/// PostgreSQL's `idle_session_timeout` ends a psycopg2 pool's idle sessions with a
/// FATAL notice sent with its FIN: those unread bytes are the server's goodbye, not a
/// reply the program never read. The cause is the idle pool, as with redis.
#[test]
fn postgres_goodbye_is_an_idle_pool_not_unread_data() {
    require_root();
    let port = free_port();
    let (_pg, dir) = postgres(port, "2s");
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "500ms",
        "--close-wait-age",
        "3s",
    ]);
    let client = Client::start(PG_POOL, &[&port.to_string()]);
    let r = flagged_for(
        &mut cw,
        client.pid(),
        "close_wait_leak",
        |reason| reason.contains("pool"),
        Duration::from_secs(1),
        |r| {
            if let Some(p) = process(r, client.pid()) {
                assert!(
                    !reason(p).contains("stopped reading"),
                    "the server's goodbye taken for unread data: {p}"
                );
            }
        },
    );
    let py = process(&r, client.pid()).unwrap();
    assert_eq!(py["close_wait"], 5, "{py}");
    assert!(reason(py).contains("parting message"), "{py}");
    assert!(py["close_wait_recv_q_bytes"].as_u64() > Some(0), "{py}");
    drop(cw);
    let _ = std::fs::remove_dir_all(dir);
}

const NEVER_READS: &str = r#"
import sys, socket
conns = []
for _ in range(3):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    conns.append(s)
print("ready", flush=True)
sys.stdin.read()
"#;

/// The other side of the rule: a client that sends requests and never reads the
/// replies (Go's unclosed `resp.Body`) holds them unread when `python3 -m http.server`
/// closes: that is the program's bug, "stopped reading", whatever came after.
#[test]
fn a_reply_never_read_is_still_unread_data() {
    require_root();
    let port = free_port();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("www-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::File::create(dir.join("index.html"))
        .unwrap()
        .write_all(&[b'x'; 300])
        .unwrap();
    let _server = Server::start(
        "python3 -m http.server",
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(&dir)
            .arg(port.to_string()),
        port,
    );
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "500ms",
        "--close-wait-age",
        "2s",
    ]);
    let client = Client::start(NEVER_READS, &[&port.to_string()]);
    let r = flagged_for(
        &mut cw,
        client.pid(),
        "close_wait_leak",
        |reason| reason.contains("stopped reading"),
        Duration::ZERO,
        |_| {},
    );
    let py = process(&r, client.pid()).unwrap();
    assert!(!reason(py).contains("pool"), "{py}");
    let _ = std::fs::remove_dir_all(dir);
}

/// nginx (Debian's nginx-light) in a directory of the test's: `workers` worker
/// processes on `port`, `listen` options as given (e.g. `reuseport`), keep-alive on or
/// off. Returns the server (the master) and the directory.
fn nginx(port: u16, workers: u32, listen: &str, keepalive: bool) -> (Server, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nginx-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 512; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         keepalive_timeout {};\n  server {{\n    listen 127.0.0.1:{port} {listen};\n\
         location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        if keepalive { "60s" } else { "0" }
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let server = Server::start(
        "nginx",
        Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .args(["-e", "stderr"]),
        port,
    );
    (server, dir)
}

fn curl(url: &str, times: usize) {
    for _ in 0..times {
        let st = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "5", url])
            .status()
            .expect("curl (cargo xtask test installs it)");
        assert!(st.success(), "curl {url}: {st}");
    }
}

/// 200 separate curl runs against nginx with keep-alive: each curl closes first and
/// exits, leaving one TIME_WAIT behind. However many exited curls there are, and
/// whenever they exited, they fold into one quiet line that counts their TIME_WAITs,
/// with no curl row beside it.
#[test]
fn exited_short_lived_clients_fold_with_their_time_waits() {
    require_root();
    let port = free_port();
    let (_nginx, dir) = nginx(port, 1, "", true);
    let mut cw = Connwatch::start(&["watch", "--json", "--interval", "500ms"]);
    curl(&format!("http://127.0.0.1:{port}/"), 200);
    let mut checked = 0;
    let r = wait_report(&mut cw, "the curls folded, over 4 reports", |r| {
        let rows: Vec<&Value> = r["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["comm"] == "curl")
            .collect();
        assert!(rows.is_empty(), "curl rows beside the quiet line: {rows:?}");
        let folded = r["quiet"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["comm"] == "curl" && q["processes"].as_u64() >= Some(1));
        if folded {
            checked += 1;
        }
        checked >= 4
    });
    let q = r["quiet"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["comm"] == "curl")
        .unwrap();
    assert!(q["time_wait"].as_u64() >= Some(150), "{q}");
    let _ = std::fs::remove_dir_all(dir);
}

const REUSEPORT_WORKER: &str = r#"
import sys, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    c.close()
"#;

/// Two worker processes, each with its own socket on one port (SO_REUSEPORT, as
/// gunicorn `--reuse-port`, Go or Envoy workers do), answer curl and close first: each
/// is a listener of that port, so each is flagged `active_closer` for its own
/// TIME_WAIT sockets, and together they hold them all.
#[test]
fn reuseport_workers_are_each_active_closers() {
    require_root();
    let port = free_port();
    let workers = [
        Client::start(REUSEPORT_WORKER, &[&port.to_string()]),
        Client::start(REUSEPORT_WORKER, &[&port.to_string()]),
    ];
    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "500ms",
        "--time-wait-min",
        "5",
    ]);
    // The kernel spreads connections from many source ports over both sockets.
    curl(&format!("http://127.0.0.1:{port}/"), 120);
    let credited = |r: &Value, pid: u32| {
        process(r, pid)
            .is_some_and(|p| has_flag(p, "active_closer") && p["time_wait"].as_u64() >= Some(5))
    };
    let last = wait_report(
        &mut cw,
        "both workers credited with their TIME_WAITs",
        |r| workers.iter().all(|w| credited(r, w.pid())),
    );
    for w in &workers {
        let p = process(&last, w.pid()).unwrap();
        assert!(has_flag(p, "active_closer"), "a worker not credited: {p}");
    }
}
