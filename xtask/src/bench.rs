//! `cargo xtask bench`: connwatch against tcpstates and against no tracer, in one run, on
//! this machine. Absolute numbers on a shared 2-core VM are noise; the ratios within one
//! invocation are the result. The load runs in a network namespace made for the run
//! (wide ephemeral port range, `tcp_tw_reuse=1`), so the host's settings are untouched.
use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const TCPSTATES: &str = "/usr/sbin/tcpstates";

/// The cost floor: one per-CPU count per event on the same tracepoint.
const FLOOR_PROGRAM: &str = "tracepoint:sock:inet_sock_set_state { @c = count(); }";

pub struct Options {
    pub quick: bool,
    /// Parts to measure alone (all, and the doc written, when empty).
    pub only: Vec<Part>,
    pub connwatch: PathBuf,
    pub out: PathBuf,
}

struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Result<Self> {
        Self::new_named("load")
    }

    fn new_named(tag: &str) -> Result<Self> {
        let name = format!("cw-bench-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        for (k, v) in [
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.core.somaxconn", "65535"),
            ("net.ipv4.tcp_max_syn_backlog", "65535"),
        ] {
            ns.sysctl(k, v)?;
        }
        Ok(ns)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        )
    }

    fn enter(&self) -> Result<()> {
        enter(&self.name)
    }
}

/// Moves the calling thread into the named namespace (setns affects only this thread).
fn enter(name: &str) -> Result<()> {
    let f = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns on an open namespace fd.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(cmd).args(args).status()?;
    if !st.success() {
        bail!("{cmd} {args:?} failed");
    }
    Ok(())
}

/// The load's listening port (see `listen`).
const LOAD_PORT: u16 = 80;

/// The load's listener, made in the namespace by a thread that enters it (setns affects
/// only the calling thread); a socket is used from any thread after.
fn listen(ns: &Arc<Netns>) -> Result<TcpListener> {
    let ns = Arc::clone(ns);
    thread::spawn(move || -> Result<TcpListener> {
        ns.enter()?;
        // On every loopback address: each client connects to its own (below),
        // so that each has a port space of its own and a run does not run out
        // of ports into reusing its own TIME_WAITs (a slower connect() whose
        // cost depends on what earlier runs left).
        // On one fixed port, a web server's: the rate a run settles at depends
        // on the port connected to (measured, 3-s runs: 31,300 conn/s on port
        // 12345 every time, 38,000 on 40000), so a port the kernel picks anew
        // for every run made runs without a tracer alone range over 27,000-
        // 37,000 conn/s, more than the tax they measure. Each run has a
        // namespace of its own: no other listener there.
        let l = TcpListener::bind(("0.0.0.0", LOAD_PORT))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the listener's thread panicked"))?
}

/// Connection churn: clients connect, send a byte, get a byte back, close (first).
struct Load {
    stop: Arc<AtomicBool>,
    conns: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// `rate`: connections per second in all, or `None` for as fast as possible.
    fn start(ns: &Arc<Netns>, clients: usize, rate: Option<f64>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(AtomicU64::new(0));
        let listener = listen(ns)?;
        let port = listener.local_addr()?.port();
        let mut threads = Vec::new();
        // As many server threads as clients: one would serialise every connection on
        // itself, and the load would wait on that thread's latency with CPUs idle
        // (a quarter of the time, measured), not saturate the machine.
        for _ in 0..clients {
            let l = listener.try_clone()?;
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || {
                let mut buf = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            if s.read(&mut buf).unwrap_or(0) == 1 {
                                let _ = s.write_all(&buf);
                            }
                            // Wait for the client to close first.
                            let _ = s.read(&mut buf);
                        }
                        Err(_) => thread::sleep(Duration::from_micros(50)),
                    }
                }
            }));
        }
        for client in 0..clients {
            let target = std::net::SocketAddr::from(([127, 0, 0, 1 + client as u8], port));
            let ns = Arc::clone(ns);
            let stop = Arc::clone(&stop);
            let conns = Arc::clone(&conns);
            let gap = rate.map(|r| Duration::from_secs_f64(clients as f64 / r));
            threads.push(thread::spawn(move || {
                if ns.enter().is_err() {
                    return;
                }
                let mut next = Instant::now();
                let mut buf = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    if let Some(gap) = gap {
                        next += gap;
                        let now = Instant::now();
                        if next > now {
                            thread::sleep(next - now);
                        }
                    }
                    let Ok(mut c) = TcpStream::connect(target) else {
                        continue;
                    };
                    if c.write_all(b"x").is_ok() && c.read(&mut buf).unwrap_or(0) == 1 {
                        conns.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            conns,
            threads,
        })
    }

    fn conns(&self) -> u64 {
        self.conns.load(Ordering::Relaxed)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Connections per second the load reaches over `secs`.
fn measure(load: &Load, secs: f64) -> f64 {
    let c0 = load.conns();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs_f64(secs));
    (load.conns() - c0) as f64 / t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A tracer running for the bench, with its stderr collected.
struct Tracer {
    child: Child,
    stderr: Arc<std::sync::Mutex<Vec<String>>>,
    /// BPF programs that appeared when it started (bpftool here cannot say which
    /// process owns a program).
    progs: Vec<u64>,
    /// From exec to its ready line.
    ready_after: Duration,
}

impl Tracer {
    fn connwatch(bin: &Path, args: &[&str]) -> Result<Self> {
        Self::spawn(Command::new(bin).args(args), Some("attached"))
    }

    fn tcpstates() -> Result<Self> {
        // tcpstates says nothing when ready: `spawn` waits for its programs.
        Self::spawn(&mut Command::new(TCPSTATES), None)
    }

    /// The cost floor: a trivial bpftrace program on the same tracepoint.
    fn floor() -> Result<Self> {
        Self::spawn(
            Command::new("bpftrace").args(["-q", "-e", FLOOR_PROGRAM]),
            None,
        )
    }

    fn spawn(cmd: &mut Command, ready: Option<&str>) -> Result<Self> {
        let before = prog_ids()?;
        let spawned = Instant::now();
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let stderr = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().context("stderr")?;
        let lines = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                if let Ok(mut l) = lines.lock() {
                    l.push(line);
                }
            }
        });
        if let Some(word) = ready {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let left = end.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) if line.contains(word) => break,
                    Ok(_) => {}
                    Err(_) => bail!("{cmd:?} did not become ready"),
                }
            }
        }
        let ready_after = spawned.elapsed();
        let mut progs: Vec<u64> = Vec::new();
        if ready.is_none() {
            // Silent tracers are ready once their programs appear (bpftrace compiles
            // first: seconds), and a moment more to attach.
            let end = Instant::now() + Duration::from_secs(30);
            while progs.is_empty() && Instant::now() < end {
                thread::sleep(Duration::from_millis(200));
                progs = prog_ids()?
                    .into_iter()
                    .filter(|id| !before.contains(id))
                    .collect();
            }
            thread::sleep(Duration::from_millis(500));
        }
        let progs = prog_ids()?
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        Ok(Self {
            child,
            stderr,
            progs,
            ready_after,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGINT, wait (SIGKILL after 5 s: bpftrace was seen to sit on a SIGINT), and
    /// return what it printed on stderr.
    fn finish(mut self) -> Vec<String> {
        self.signal(libc::SIGINT);
        let end = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
            thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        thread::sleep(Duration::from_millis(100));
        self.stderr.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn rss_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024
    }

    fn cpu_seconds(&self) -> f64 {
        cpu_of(self.pid())
    }
}

/// utime + stime of a process, in seconds.
fn cpu_of(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn bpftool_progs() -> Result<Vec<serde_json::Value>> {
    bpftool_json(&["prog", "show"])
}

fn bpftool_json(args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let out = Command::new("bpftool").arg("-j").args(args).output()?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(list.as_array().cloned().unwrap_or_default())
}

fn prog_ids() -> Result<Vec<u64>> {
    Ok(bpftool_progs()?
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

/// (run_time_ns, run_cnt) summed over `ids` (needs kernel.bpf_stats_enabled=1).
fn prog_stats(ids: &[u64]) -> Result<(u64, u64)> {
    let mut total = (0, 0);
    for p in bpftool_progs()? {
        if p["id"].as_u64().is_some_and(|id| ids.contains(&id)) {
            total.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            total.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok(total)
}

/// ns per event of the tracer's programs under a fixed-rate load.
fn probe_cost(tracer: &Tracer, ns: &Arc<Netns>, rate: f64, secs: f64) -> Result<(f64, u64)> {
    let [cost] = probe_cost_of([&tracer.progs], ns, rate, secs)?;
    Ok(cost)
}

/// ns per run, and runs, of each group of programs under one fixed-rate load.
fn probe_cost_of<const N: usize>(
    groups: [&[u64]; N],
    ns: &Arc<Netns>,
    rate: f64,
    secs: f64,
) -> Result<[(f64, u64); N]> {
    let load = Load::start(ns, 2, Some(rate))?;
    thread::sleep(Duration::from_millis(300));
    let before = groups.map(prog_stats);
    thread::sleep(Duration::from_secs_f64(secs));
    let after = groups.map(prog_stats);
    load.stop();
    let mut costs = [(0.0, 0); N];
    for ((cost, b), a) in costs.iter_mut().zip(before).zip(after) {
        let ((t0, c0), (t1, c1)) = (b?, a?);
        let runs = c1 - c0;
        *cost = (
            if runs > 0 {
                (t1 - t0) as f64 / runs as f64
            } else {
                0.0
            },
            runs,
        );
    }
    Ok(costs)
}

/// Of `ids`, the programs whose name (as the kernel keeps it: 15 characters) begins
/// one of `names`.
fn progs_named(ids: &[u64], names: &[&str]) -> Result<Vec<u64>> {
    Ok(bpftool_progs()?
        .iter()
        .filter(|p| {
            let name = p["name"].as_str().unwrap_or("");
            !name.is_empty() && names.iter().any(|n| n.starts_with(name))
        })
        .filter_map(|p| p["id"].as_u64())
        .filter(|id| ids.contains(id))
        .collect())
}

/// Sockets held for a measurement; released on drop.
enum Held {
    /// Helper processes holding CLOSE_WAIT sockets (fds are limited per process).
    Processes(Vec<Child>),
    /// TIME_WAIT sockets need no fd once closed.
    Nothing,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Self::Processes(children) = self {
            for c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// CLOSE_WAIT sockets held per helper process, within the fd limit of this machine.
const PER_HOLDER: usize = 15_000;

/// Holds `n` sockets in CLOSE_WAIT (server side never closes), spread over helper
/// processes, or leaves `n` TIME_WAIT (server closes first) inside the namespace.
fn hold_sockets(ns: &Netns, n: usize, time_wait: bool) -> Result<Held> {
    if time_wait {
        let ns_name = ns.name.clone();
        return thread::spawn(move || -> Result<Held> {
            enter(&ns_name)?;
            let l = TcpListener::bind("127.0.0.1:0")?;
            let target = l.local_addr()?;
            for _ in 0..n {
                let c = TcpStream::connect(target)?;
                let (s, _) = l.accept()?;
                drop(s); // the server closes first: TIME_WAIT on its side
                drop(c);
            }
            Ok(Held::Nothing)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("socket holder panicked"))?;
    }
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(PER_HOLDER);
        left -= k;
        let mut child = Command::new(&exe)
            .args(["hold", "--netns", &ns.name, "--count", &k.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("holder stdout")?).read_line(&mut line)?;
        if !line.starts_with("ready") {
            bail!("socket holder failed: {line}");
        }
        children.push(child);
    }
    Ok(Held::Processes(children))
}

/// `cargo xtask hold`: a helper process that holds `count` CLOSE_WAIT sockets in the
/// namespace until its stdin closes.
pub fn hold(netns: &str, count: usize) -> Result<()> {
    enter(netns)?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let target = l.local_addr()?;
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let c = TcpStream::connect(target)?;
        let (s, _) = l.accept()?;
        drop(c); // the client closes: the server's socket sits in CLOSE_WAIT
        held.push(s);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
    Ok(())
}

/// Raises the soft fd limit towards `n`, within the hard limit (raising that needs
/// CAP_SYS_RESOURCE, which some machines do not grant even to root).
fn raise_fd_limit(n: u64) {
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = n.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Parses `connwatch: N events, R received, D dropped`.
fn loss_summary(lines: &[String]) -> Option<(u64, u64, u64)> {
    let line = lines.iter().find(|l| l.contains(" received"))?;
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    Some((*n.first()?, *n.get(1)?, *n.get(2)?))
}

/// A part of the benchmark that `--only` can run alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Memory per socket, start-up, CPU against an ss loop, idle CPU over TIME_WAITs.
    Held,
    /// Probe cost per event (bpf_stats) against tcpstates and the floor.
    Probe,
    /// Workload tax of watch, trace and tcpstates.
    Tax,
    /// Loss accounting.
    Loss,
    /// Kernel memory of the maps.
    KernelMem,
}

/// Only the parts asked for, their lines printed; nothing written.
fn bench_parts(opts: &Options) -> Result<()> {
    let (q, cw) = (opts.quick, opts.connwatch.as_path());
    let ns = Arc::new(Netns::new()?);
    let tracefs = Tracefs::mount()?;
    let mut out = String::new();
    let n = if q { 10_000 } else { 50_000 };
    let needs_load = opts
        .only
        .iter()
        .any(|p| matches!(p, Part::Probe | Part::Tax));
    let fixed = if needs_load {
        saturation(&ns, q, &mut out)?
    } else {
        0.0
    };
    for part in &opts.only {
        match part {
            Part::Held => {
                let h = held_figures(cw, &ns, n, q, &mut out)?;
                writeln!(
                    out,
                    "memory: {:.0} B/CLOSE_WAIT socket, {:.0} B/TIME_WAIT socket; start-up: {:.0} ms",
                    h.per_cw, h.per_tw, h.startup_ms
                )?;
            }
            Part::Probe => {
                probe_costs(cw, &ns, fixed, q, &mut out)?;
            }
            Part::Tax => {
                workload_tax(cw, q, &mut out)?;
            }
            Part::Loss => {
                loss_accounting(cw, &ns, q, &mut out)?;
            }
            Part::KernelMem => {
                kernel_memory(cw, &mut out)?;
            }
        }
    }
    print!("{out}");
    drop(tracefs);
    Ok(())
}

pub fn bench(opts: &Options) -> Result<()> {
    if !Path::new(TCPSTATES).exists() {
        bail!("{TCPSTATES} is missing: run `cargo xtask setup` (Debian package libbpf-tools)");
    }
    if !opts.only.is_empty() {
        raise_fd_limit(65_536);
        return bench_parts(opts);
    }
    if !Path::new(TCPSTATES).exists() {
        bail!("{TCPSTATES} is missing: run `cargo xtask setup` (Debian package libbpf-tools)");
    }
    let q = opts.quick;
    let cw = opts.connwatch.as_path();
    raise_fd_limit(65_536);
    let ns = Arc::new(Netns::new()?);
    // tcpstates attaches the classic tracepoint, which needs tracefs.
    let tracefs = Tracefs::mount()?;
    let mut out = String::new();
    let started = Instant::now();

    // Sockets held first, in a namespace no load has touched (no leftover TIME_WAIT).
    let n = if q { 10_000 } else { 50_000 };
    let held = held_figures(cw, &ns, n, q, &mut out)?;
    timewait_poll_cost(cw, q, &mut out)?;
    let fixed = saturation(&ns, q, &mut out)?;
    let ProbeCosts {
        cw_ns,
        ts_ns,
        floor_ns,
        stacks_ns,
        capture_ns,
    } = probe_costs(cw, &ns, fixed, q, &mut out)?;
    let [tax, ts_tax, trace_tax] = workload_tax(cw, q, &mut out)?;
    let uncounted = loss_accounting(cw, &ns, q, &mut out)?;
    let kernel_mem = kernel_memory(cw, &mut out)?;

    let HeldFigures {
        rss0,
        rss_cw,
        per_cw,
        rss0_tw,
        rss_tw,
        per_tw,
        startup_ms,
        poll_ratio,
        tw_idle_cpu_pct,
    } = held;
    writeln!(
        out,
        "memory: RSS {rss0} B idle, {rss_cw} B with {n} CLOSE_WAIT ({per_cw:.0} B/socket); {rss0_tw} B idle, {rss_tw} B with {n} TIME_WAIT ({per_tw:.0} B/socket)"
    )?;
    writeln!(
        out,
        "start-up: {startup_ms:.0} ms from exec to attached and seeded with {n} CLOSE_WAIT sockets"
    )?;
    writeln!(out, "bench took {:.0} s", started.elapsed().as_secs_f64())?;

    let probe_ratio = if ts_ns > 0.0 { cw_ns / ts_ns } else { 0.0 };
    let rss_per_socket = per_cw.max(per_tw);
    let last = format!(
        "bench: probe_ns={cw_ns:.1} floor_ns={floor_ns:.1} tcpstates_ns={ts_ns:.1} probe_ratio={probe_ratio:.3} stacks_probe_ns={stacks_ns:.1} stack_capture_ns={capture_ns:.0} tax_pct={:.2} tax_pct_range={} trace_tax_pct={:.2} trace_tax_pct_range={} tcpstates_tax_pct={:.2} tcpstates_tax_pct_range={} uncounted_loss={uncounted} rss_per_socket_b={rss_per_socket:.0} startup_ms={startup_ms:.0} ss_poll_cpu_ratio={poll_ratio:.3} kernel_mem_b={kernel_mem} tw_idle_cpu_pct={tw_idle_cpu_pct:.2}",
        tax.median,
        tax.range(),
        trace_tax.median,
        trace_tax.range(),
        ts_tax.median,
        ts_tax.range(),
    );
    print!("{out}");
    println!("{last}");
    write_doc(&opts.out, &out, &last, q)?;
    drop(tracefs);
    Ok(())
}

fn say(s: &str) {
    eprintln!("bench: {s}");
}

/// Figures taken with `n` sockets held.
struct HeldFigures {
    rss0: u64,
    rss_cw: u64,
    per_cw: f64,
    rss0_tw: u64,
    rss_tw: u64,
    per_tw: f64,
    startup_ms: f64,
    poll_ratio: f64,
    tw_idle_cpu_pct: f64,
}

/// Memory per tracked socket (CLOSE_WAIT and TIME_WAIT), start-up with `n` existing
/// sockets, and CPU against an `ss -tanpio` loop with them held.
fn held_figures(cw: &Path, ns: &Netns, n: usize, q: bool, out: &mut String) -> Result<HeldFigures> {
    // The held sockets' clients live on this host too: once closed they are orphans in
    // FIN_WAIT2, which connwatch follows as well. A real server's peers are elsewhere,
    // so their namespace lets orphans go after 1 s and what is measured is the
    // CLOSE_WAIT sockets alone.
    let hold_ns = Netns::new_named("hold")?;
    hold_ns.sysctl("net.ipv4.tcp_fin_timeout", "1")?;
    // Memory is compared between two fresh `watch` processes, one on an empty host and
    // one started over the held sockets (seeded from sock_diag): a process that watched
    // the sockets being made would also count the ring buffer pages the event storm
    // touched (up to --ring-size, once), which is not a cost per socket.
    say(&format!("memory: {n} CLOSE_WAIT sockets"));
    let rss0 = idle_rss(cw)?;
    let held = hold_sockets(&hold_ns, n, false)?;
    // The clients' orphans go (tcp_fin_timeout=1).
    thread::sleep(Duration::from_secs(2));
    say(&format!("start-up with {n} existing sockets (3 starts)"));
    let (t, startup_ms, rss_cw) = three_starts(cw)?;
    let per_cw = rss_cw.saturating_sub(rss0) as f64 / n as f64;

    let secs = if q { 10.0 } else { 30.0 };
    say("polling comparison: connwatch watch vs ss -tanpio every 2 s");
    let c0 = t.cpu_seconds();
    thread::sleep(Duration::from_secs_f64(secs));
    let cw_cpu = t.cpu_seconds() - c0;
    t.finish();
    let ss_cpu = ss_loop_cpu(&hold_ns, secs)?;
    let poll_ratio = if ss_cpu > 0.0 { cw_cpu / ss_cpu } else { 0.0 };
    drop(held);
    writeln!(
        out,
        "polling: {secs:.0} s with {n} CLOSE_WAIT sockets: connwatch {cw_cpu:.3} s CPU, ss loop {ss_cpu:.3} s CPU"
    )?;

    say(&format!("memory: {n} TIME_WAIT sockets"));
    let rss0_tw = idle_rss(cw)?;
    let _tw = hold_sockets(ns, n, true)?;
    let t = Tracer::connwatch(cw, &["watch", "--json"])?;
    thread::sleep(Duration::from_secs(3));
    let rss_tw = t.rss_bytes();
    // Idle: the TIME_WAITs (60 s each) outlive the measurement, nothing else moves.
    let idle_secs = if q { 10.0 } else { 30.0 };
    say(&format!(
        "idle CPU with {n} TIME_WAIT sockets, {idle_secs:.0} s"
    ));
    let c0 = t.cpu_seconds();
    thread::sleep(Duration::from_secs_f64(idle_secs));
    let tw_idle_cpu_pct = (t.cpu_seconds() - c0) / idle_secs * 100.0;
    t.finish();
    writeln!(
        out,
        "timewait idle: {tw_idle_cpu_pct:.2}% of a CPU over {idle_secs:.0} s with {n} TIME_WAIT sockets and no traffic (watch, default flags)"
    )?;
    let per_tw = rss_tw.saturating_sub(rss0_tw) as f64 / n as f64;
    Ok(HeldFigures {
        rss0,
        rss_cw,
        per_cw,
        rss0_tw,
        rss_tw,
        per_tw,
        startup_ms,
        poll_ratio,
        tw_idle_cpu_pct,
    })
}

/// Start-up (ms) and RSS 3 s later of `watch --interval 2s`, medians of three fresh
/// starts (one process's figures move by a third between starts on this VM); the last
/// one is left running.
fn three_starts(cw: &Path) -> Result<(Tracer, f64, u64)> {
    let (mut starts, mut rss) = (Vec::new(), Vec::new());
    let mut last: Option<Tracer> = None;
    for _ in 0..3 {
        if let Some(previous) = last.take() {
            previous.finish();
        }
        let t = Tracer::connwatch(cw, &["watch", "--json", "--interval", "2s"])?;
        starts.push(t.ready_after.as_secs_f64() * 1e3);
        thread::sleep(Duration::from_secs(3));
        rss.push(t.rss_bytes() as f64);
        last = Some(t);
    }
    let t = last.context("no watch started")?;
    Ok((t, median(starts), median(rss) as u64))
}

/// RSS of a `watch` that has run 3 s (median of three).
fn idle_rss(cw: &Path) -> Result<u64> {
    let mut rss = Vec::new();
    for _ in 0..3 {
        let t = Tracer::connwatch(cw, &["watch", "--json", "--interval", "1s"])?;
        thread::sleep(Duration::from_secs(3));
        rss.push(t.rss_bytes() as f64);
        t.finish();
    }
    Ok(median(rss) as u64)
}

/// TIME_WAIT polling cost: a dump of many timewait sockets, timed through `connwatch
/// snapshot` (one full sock_diag dump and its parse, no BPF).
fn timewait_poll_cost(cw: &Path, q: bool, out: &mut String) -> Result<()> {
    let n_tw = if q { 20_000 } else { 100_000 };
    say(&format!("polling cost with {n_tw} TIME_WAIT sockets"));
    let tw_ns = Arc::new(Netns::new_named("tw")?);
    // One listener per 50,000: a destination has at most ~64k ephemeral ports.
    let mut tw_held = Vec::new();
    let mut left = n_tw;
    while left > 0 {
        let k = left.min(50_000);
        left -= k;
        tw_held.push(hold_sockets(&tw_ns, k, true)?);
    }
    let t0 = Instant::now();
    let snap = Command::new(cw).args(["snapshot", "--json"]).output()?;
    let snapshot_ms = t0.elapsed().as_secs_f64() * 1e3;
    let tw_seen = serde_json::from_slice::<serde_json::Value>(&snap.stdout)
        .ok()
        .and_then(|v| v["states"]["TIME_WAIT"].as_u64())
        .unwrap_or(0);
    writeln!(
        out,
        "tw poll: one full dump with {tw_seen} TIME_WAIT sockets took {snapshot_ms:.0} ms (connwatch snapshot); at the default 1 s poll that is {:.1}% of a CPU, capped at 5%",
        (snapshot_ms / 10.0).min(100.0)
    )?;
    Ok(())
}

/// Saturation without a tracer; returns the fixed rate (half of it) later phases use.
fn saturation(ns: &Arc<Netns>, q: bool, out: &mut String) -> Result<f64> {
    say("load generator: saturation without a tracer");
    let load = Load::start(ns, 4, None)?;
    thread::sleep(Duration::from_millis(500));
    let sat = measure(&load, if q { 2.0 } else { 5.0 });
    load.stop();
    let fixed = (sat * 0.5).max(100.0);
    writeln!(
        out,
        "load: saturation {sat:.0} conn/s (~{:.0} transitions/s); fixed rate {fixed:.0} conn/s",
        sat * 10.0
    )?;
    Ok(fixed)
}

/// ns per event of each probe, and of one captured stack.
struct ProbeCosts {
    cw_ns: f64,
    ts_ns: f64,
    floor_ns: f64,
    /// connwatch's state program with `--stacks`.
    stacks_ns: f64,
    /// One captured stack.
    capture_ns: f64,
}

/// Probe cost (ns per run, from bpf_stats) of connwatch and tcpstates under the same
/// fixed-rate load.
fn probe_costs(
    cw: &Path,
    ns: &Arc<Netns>,
    fixed: f64,
    q: bool,
    out: &mut String,
) -> Result<ProbeCosts> {
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")?;
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let secs = if q { 4.0 } else { 10.0 };
    say("probe cost: connwatch");
    let t = Tracer::connwatch(cw, &["watch", "--json", "--interval", "2s"])?;
    let (cw_ns, cw_runs) = probe_cost(&t, ns, fixed, secs)?;
    t.finish();
    // With --stacks every process is captured: the syscall programs run beside the
    // state program, and capture a stack at each connect(), accept() and EOF of the
    // load. stacks_probe_ns: the BPF time of all of connwatch's programs per transition
    // (the state program's runs); one captured stack: connwatch_accept_exit's ns per
    // run (each run an accept() of the load's server, captured).
    say("probe cost: connwatch --stacks");
    let t = Tracer::connwatch(cw, &["watch", "--stacks", "--json", "--interval", "2s"])?;
    let state = progs_named(&t.progs, &["connwatch_tp_btf", "connwatch_tracepoint"])?;
    let accept = progs_named(&t.progs, &["connwatch_accept_exit"])?;
    let [
        (state_ns, stacks_runs),
        (all_ns, all_runs),
        (capture_ns, captures),
    ] = probe_cost_of([&state, &t.progs, &accept], ns, fixed, secs)?;
    let stacks_ns = if stacks_runs > 0 {
        all_ns * all_runs as f64 / stacks_runs as f64
    } else {
        0.0
    };
    t.finish();
    say("probe cost: tcpstates");
    let t = Tracer::tcpstates()?;
    let (ts_ns, ts_runs) = probe_cost(&t, ns, fixed, secs)?;
    t.finish();
    say("probe cost: the floor (bpftrace count)");
    let t = Tracer::floor()?;
    let (floor_ns, floor_runs) = probe_cost(&t, ns, fixed, secs)?;
    t.finish();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim())?;
    writeln!(
        out,
        "probe: connwatch {cw_ns:.0} ns/event ({cw_runs} runs), tcpstates {ts_ns:.0} ns/event ({ts_runs} runs), floor {floor_ns:.0} ns/event ({floor_runs} runs)"
    )?;
    writeln!(
        out,
        "probe with --stacks: {stacks_ns:.0} ns/event, all programs ({stacks_runs} transitions; the state program alone {state_ns:.0} ns); one captured stack (accept): {capture_ns:.0} ns ({captures} captures)"
    )?;
    Ok(ProbeCosts {
        cw_ns,
        ts_ns,
        floor_ns,
        stacks_ns,
        capture_ns,
    })
}

/// A figure over rounds: its median, and the spread of the rounds.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Self {
        Self {
            median: median(v.to_vec()),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    /// `5.3-8.3`: the rounds' range, as the bench line prints it beside the median.
    fn range(&self) -> String {
        format!("{:.1}-{:.1}", self.min, self.max)
    }
}

/// Connections/s lost with a tracer, as % of the run without one.
fn tax_pct(with: f64, without: f64) -> f64 {
    (1.0 - with / without) * 100.0
}

/// Workload tax (% of connections/s lost) of connwatch and tcpstates: interleaved runs
/// at saturation, each round's tax against that round's run without a tracer (so a
/// drift of the machine's speed between rounds does not count as tax); the median of
/// the rounds, with their range.
fn workload_tax(cw: &Path, q: bool, out: &mut String) -> Result<[Spread; 3]> {
    // Rounds on this VM range over ±10 % of one another (the scheduler, the host): the
    // median of nine is steadier than the median of five for little more time.
    let rounds = if q { 3 } else { 9 };
    let per = if q { 2.0 } else { 3.0 };
    let mut runs: [Vec<f64>; 4] = Default::default();
    for round in 0..rounds {
        say(&format!("workload tax: round {}/{rounds}", round + 1));
        // Every other round in reverse order: the machine's rate drifts over a bench
        // (31,000 to 36,000 conn/s without a tracer, mostly one way), and a tracer run
        // always after the round's run without one would count that drift as its tax.
        let order: [usize; 4] = if round % 2 == 0 {
            [0, 1, 2, 3]
        } else {
            [3, 2, 1, 0]
        };
        for which in order {
            let results = &mut runs[which];
            // Each run in a namespace of its own, which starts empty: what an earlier
            // run left (tens of thousands of TIME_WAITs) neither slows this run's
            // connect()s nor is seeded and polled by this run's tracer.
            let ns = Arc::new(Netns::new_named(&format!("tax{round}{which}"))?);
            let tracer = match which {
                1 => Some(Tracer::connwatch(
                    cw,
                    &["watch", "--json", "--interval", "2s"],
                )?),
                2 => Some(Tracer::tcpstates()?),
                // `trace`, its output thrown away (stdout is /dev/null).
                3 => Some(Tracer::connwatch(cw, &["trace"])?),
                _ => None,
            };
            let load = Load::start(&ns, 4, None)?;
            thread::sleep(Duration::from_millis(300));
            results.push(measure(&load, per));
            load.stop();
            if let Some(t) = tracer {
                t.finish();
            }
            drop(ns);
            // The namespace's sockets are freed by a kernel worker after it is gone:
            // not during the next run.
            thread::sleep(Duration::from_millis(500));
        }
        // Each round's figures as it ends: whether a spread comes from one round or all.
        let tax = |with: &[f64]| tax_pct(with[round], runs[0][round]);
        say(&format!(
            "workload tax: round {}: {:.0} conn/s; watch {:.1}%, tcpstates {:.1}%, trace {:.1}%",
            round + 1,
            runs[0][round],
            tax(&runs[1]),
            tax(&runs[2]),
            tax(&runs[3])
        ));
    }
    let [none, with_cw, with_ts, with_trace] = &runs;
    let taxes = |with: &[f64]| -> Spread {
        let per_round: Vec<f64> = with
            .iter()
            .zip(none)
            .map(|(w, n)| tax_pct(*w, *n))
            .collect();
        Spread::of(&per_round)
    };
    let (cw_tax, ts_tax, trace_tax) = (taxes(with_cw), taxes(with_ts), taxes(with_trace));
    writeln!(
        out,
        "tax: no tracer {:.0} conn/s; connwatch watch {:.1}% (rounds {}), tcpstates {:.1}% (rounds {}), connwatch trace {:.1}% (rounds {})",
        median(none.clone()),
        cw_tax.median,
        cw_tax.range(),
        ts_tax.median,
        ts_tax.range(),
        trace_tax.median,
        trace_tax.range()
    )?;
    Ok([cw_tax, ts_tax, trace_tax])
}

/// Kernel memory (memlock) of the maps of a `watch` with default flags on an idle host.
fn kernel_memory(cw: &Path, out: &mut String) -> Result<u64> {
    say("kernel memory of the maps, default flags");
    let before = map_ids()?;
    let t = Tracer::connwatch(cw, &["watch", "--json"])?;
    let mut total = 0;
    let mut names = Vec::new();
    for m in bpftool_json(&["map", "show"])? {
        if m["id"].as_u64().is_some_and(|id| !before.contains(&id)) {
            let bytes = m["bytes_memlock"].as_u64().unwrap_or(0);
            total += bytes;
            names.push(format!("{} {bytes}", m["name"].as_str().unwrap_or("?")));
        }
    }
    t.finish();
    writeln!(
        out,
        "kernel memory: {total} B in maps ({})",
        names.join(", ")
    )?;
    Ok(total)
}

fn map_ids() -> Result<Vec<u64>> {
    Ok(bpftool_json(&["map", "show"])?
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect())
}

/// Loss accounting at saturation, then with the consumer stopped for 5 s: events the
/// probe saw that were neither received nor counted as dropped.
fn loss_accounting(cw: &Path, ns: &Arc<Netns>, q: bool, out: &mut String) -> Result<i64> {
    say("loss accounting at saturation");
    let t = Tracer::connwatch(cw, &["trace", "--json"])?;
    let load = Load::start(ns, 4, None)?;
    thread::sleep(Duration::from_secs_f64(if q { 3.0 } else { 8.0 }));
    load.stop();
    let (seen, recv, drop1) = loss_summary(&t.finish()).context("no summary from trace")?;
    let uncounted1 = seen as i64 - recv as i64 - drop1 as i64;
    writeln!(
        out,
        "loss (running): {seen} events, {recv} received, {drop1} dropped, {uncounted1} uncounted"
    )?;
    say("loss accounting with the consumer stopped for 5 s");
    let t = Tracer::connwatch(cw, &["trace", "--json", "--ring-size", "256K"])?;
    let load = Load::start(ns, 4, None)?;
    thread::sleep(Duration::from_secs(1));
    t.signal(libc::SIGSTOP);
    thread::sleep(Duration::from_secs(5));
    t.signal(libc::SIGCONT);
    thread::sleep(Duration::from_secs(1));
    load.stop();
    let alive = t.child.id();
    let summary = t.finish();
    let (seen2, recv2, drop2) = loss_summary(&summary).context("no summary after the stall")?;
    let uncounted2 = seen2 as i64 - recv2 as i64 - drop2 as i64;
    writeln!(
        out,
        "loss (stalled 5 s): {seen2} events, {recv2} received, {drop2} dropped, {uncounted2} uncounted (pid {alive} recovered and exited cleanly)"
    )?;
    Ok(uncounted1.abs() + uncounted2.abs())
}

/// tracefs mounted for the run when a fresh machine has it unmounted.
struct Tracefs {
    mounted: bool,
}

impl Tracefs {
    fn mount() -> Result<Self> {
        let empty = std::fs::read_dir("/sys/kernel/tracing")
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if empty {
            run(
                "mount",
                &["-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
            )?;
        }
        Ok(Self { mounted: empty })
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("/sys/kernel/tracing").status();
        }
    }
}

/// CPU seconds of `ss -tanpio` run every 2 s for `secs` inside the namespace.
fn ss_loop_cpu(ns: &Netns, secs: f64) -> Result<f64> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut total = 0.0;
    while Instant::now() < end {
        let tick = Instant::now();
        let before = children_cpu();
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "ss", "-tanpio"])
            .stdout(Stdio::null())
            .status()?;
        total += children_cpu() - before;
        let spent = tick.elapsed();
        if spent < Duration::from_secs(2) {
            thread::sleep(Duration::from_secs(2) - spent);
        }
    }
    Ok(total)
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    }
}

/// How each figure is taken, written under the results.
const METHOD: &str = "## How each figure is taken

- **probe_ns**, **tcpstates_ns**, **floor_ns**: `run_time_ns / run_cnt` of each tracer's programs (`kernel.bpf_stats_enabled=1`, restored after), under the same fixed-rate churn (half of saturation): `connwatch watch`, `tcpstates`, and the floor, `bpftrace -e 'tracepoint:sock:inet_sock_set_state { @c = count(); }'`.
- **stacks_probe_ns**: the BPF time of all of connwatch's programs (the state program and the syscall programs of stack capture: connect, accept, read/recvfrom) per transition, under `watch --stacks` (every process captured: a stack at each connect(), accept() and EOF of the load), in the same churn as probe_ns. **stack_capture_ns**: ns per run of `connwatch_accept_exit` in that run, each run one accept() of the load's server whose stack it captures: the cost of one captured stack (a frame-pointer walk of up to 64 frames, the user registers and an 8 KiB copy of the stack into the stack ring). The default path's probe_ns is measured without `--stacks`, when no process is captured.
- **tax_pct**, **tcpstates_tax_pct**, **trace_tax_pct**: saturating loopback churn (4 client threads, each connecting to a loopback address of its own so that none runs out of ports; 4 server threads, so that the CPUs and not one thread's latency bound the rate; connect / 1-byte exchange / client closes first; the server on port 80 in every run, as the rate a run settles at depends on the port), each run in a namespace of its own that starts empty, with no tracer, with `connwatch watch`, with `tcpstates`, with `connwatch trace` (output to /dev/null), interleaved rounds, every other one in reverse order (so that a drift of the machine's rate over the bench does not count as any tracer's tax); each round's tax as % of that round's no-tracer throughput, the median of the rounds, and beside it (`_range`) the lowest and highest round, so that a target grazed shows as such.
- **kernel_mem_b**: `bytes_memlock` summed over the maps a `connwatch watch` with default flags creates on an idle host (`bpftool map show`).
- **tw_idle_cpu_pct**: CPU time of `connwatch watch` (default flags) over 30 s while N TIME_WAIT sockets exist and nothing else happens, as % of one CPU.
- **uncounted_loss**: events the probe produced minus received minus counted as dropped, at saturation and with the reader stopped (SIGSTOP) for 5 s.
- **rss_per_socket_b**: RSS (3 s after start; median of three fresh processes for CLOSE_WAIT and for the empty host) of a fresh `watch` started over N held sockets minus that of a fresh `watch` on an empty namespace, divided by N; the larger of CLOSE_WAIT and TIME_WAIT. Fresh processes, because one that watched the sockets being made also has the ring buffer pages the event storm touched resident (up to `--ring-size`, once: not a cost per socket). The CLOSE_WAIT sockets are held in a namespace with `tcp_fin_timeout=1`: their clients live on this host too, and their FIN_WAIT2 orphans (which connwatch also follows) would otherwise be counted per CLOSE_WAIT socket; a real server's peers are on other hosts.
- **startup_ms**: from exec to the line `attached` (printed after seeding: the TCP socket iterator's pass per namespace, sock_diag where there is none, the fd index, capabilities dropped) with N CLOSE_WAIT sockets held; median of three starts.
- **ss_poll_cpu_ratio**: CPU time (utime+stime, all threads) of `connwatch watch --interval 2s` over 30 s with N CLOSE_WAIT sockets, over that of `ss -tanpio` run every 2 s for as long.
";

fn write_doc(path: &Path, table: &str, last: &str, quick: bool) -> Result<()> {
    let uname = Command::new("uname").arg("-r").output()?;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()?;
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mut doc = String::new();
    writeln!(doc, "# Benchmarks\n")?;
    writeln!(
        doc,
        "Produced by `cargo xtask bench{}` on {} ({cpus} CPUs, kernel {}). Ratios within one run are the result; absolute numbers on a shared VM are noise.\n",
        if quick { " --quick" } else { "" },
        String::from_utf8_lossy(&date.stdout).trim(),
        String::from_utf8_lossy(&uname.stdout).trim()
    )?;
    writeln!(doc, "```\n{table}{last}\n```\n")?;
    writeln!(
        doc,
        "Targets: probe_ns ≤ 3 × floor_ns; tax_pct ≤ 5 % and ≤ ⅓ of tcpstates_tax_pct; trace_tax_pct ≤ ⅕ of tcpstates_tax_pct; uncounted_loss = 0; rss_per_socket_b ≤ 150; startup_ms ≤ 100; ss_poll_cpu_ratio ≤ 0.05; kernel_mem_b ≤ 16 MiB; tw_idle_cpu_pct ≤ 0.5."
    )?;
    writeln!(
        doc,
        "\nWhere a target is missed, [PERFORMANCE.md](PERFORMANCE.md) records what limits it."
    )?;
    writeln!(doc, "\n{METHOD}")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, doc)?;
    Ok(())
}
