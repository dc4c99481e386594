//! Command line: clap derive, doc comments are the help text.
use std::{path::PathBuf, time::Duration};

pub use crate::report::{GroupBy, ReportConfig};
use crate::units::{parse_duration, parse_interval};
use clap::{Args, Parser, Subcommand};

pub use crate::filter::{Family, FilterArgs};
use crate::host::runtime::RuntimeArgs;
use crate::probe::HookChoice;

const EXAMPLES: &str = "\
Examples:
  sudo connwatch watch                      who holds CLOSE_WAIT sockets, refreshed every 2s
  sudo connwatch watch --json --duration 1m one JSON report per interval, then a final one
  sudo connwatch snapshot --check           one report without BPF; exit 3 if a process is flagged
  sudo connwatch trace                      every TCP state transition, as a table
  sudo connwatch trace --json | jq .        the same as JSON lines
  sudo connwatch trace --duration 10s       stop after ten seconds";

/// `connwatch --version`: the release and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CONNWATCH_COMMIT"),
    ")"
);

/// Find the processes behind CLOSE_WAIT and TIME_WAIT sockets, with eBPF.
#[derive(Debug, Parser)]
#[command(name = "connwatch", version = VERSION, after_help = EXAMPLES)]
pub struct Cli {
    /// Show diagnostics: the hook chosen and why, the probe's own log, verifier output.
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every TCP state transition on the machine, one line each.
    ///
    /// Columns: TIME PID COMM LADDR:LPORT RADDR:RPORT OLD -> NEW MS, where MS is the time
    /// the socket spent in OLD (blank when connwatch did not see it enter OLD). PID and COMM
    /// name the socket's owner only where the kernel tells it; otherwise they are `-`.
    /// TIME_WAIT, which the kernel never reports, is inferred: `FIN_WAIT2 -> TIME_WAIT`
    /// once a poll confirms the timewait socket, `TIME_WAIT -> CLOSE` when it is gone
    /// (`expired` by its timer, or `early`); these rows are marked `synthetic`.
    #[command(after_help = "\
Owner sources (JSON `owner_source`):
  context   the transition ran in the owner's syscall (connect, listen, close, shutdown)
  carried   remembered from an earlier `context` transition of the same socket
  unknown   neither: pid and comm are null rather than a guess

Examples:
  sudo connwatch trace --json --duration 30s > transitions.jsonl
  sudo connwatch trace | grep CLOSE_WAIT")]
    Trace(TraceArgs),

    /// Name the processes that hold CLOSE_WAIT sockets, live: count, age, growth, peers,
    /// fds against the fd limit. Refreshed every --interval; a final report on exit.
    #[command(after_help = watch_after_help())]
    Watch(WatchArgs),

    /// One report from sock_diag and /proc alone, without loading BPF (works where BPF is
    /// forbidden). Ages of CLOSE_WAIT sockets are estimates (time since the peer's last ACK).
    #[command(after_help = "\
Examples:
  sudo connwatch snapshot
  sudo connwatch snapshot --json --check || echo leak found")]
    Snapshot(SnapshotArgs),

    /// Serve Prometheus metrics (/metrics) and a health check (/healthz) from the same
    /// report as `watch`, for fleets to scrape.
    #[command(after_help = "\
Examples:
  sudo connwatch serve                           http://127.0.0.1:9977/metrics
  sudo connwatch serve --listen 0.0.0.0:9977 --top 50 --cgroup-label")]
    Serve(ServeArgs),

    /// A live full-screen view of the `watch` table: flagged processes highlighted, a
    /// detail pane with the reason and peers of the selected process.
    #[command(
        after_help = "Keys: q quit, c/o/t sort by CLOSE_WAIT / oldest / TIME_WAIT, Up/Down select."
    )]
    Top(TopArgs),

    /// Write shell completions and man pages (used by `cargo xtask dist`).
    #[command(hide = true)]
    Generate {
        /// Directory to write into.
        #[arg(long, default_value = "target/dist")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Time between refreshes.
    #[arg(long, default_value = "2s", value_parser = parse_interval, allow_hyphen_values = true)]
    pub interval: Duration,

    /// One row per process, per command or per systemd unit / container.
    #[arg(long, value_enum, default_value_t = GroupBy::Process)]
    pub by: GroupBy,

    #[command(flatten)]
    pub thresholds: ReportConfig,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// Options of the per-process report (`watch`, `snapshot`).
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// One JSON report object per line instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Exit with status 3 when the final report flags a process (for cron and CI).
    #[arg(long)]
    pub check: bool,

    /// One row per process, per command (all its processes together) or per systemd
    /// unit / container; flags are raised on the row.
    #[arg(long, value_enum, default_value_t = GroupBy::Process)]
    pub by: GroupBy,

    #[command(flatten)]
    pub thresholds: ReportConfig,

    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the HTTP server for /metrics and /healthz, HOST:PORT (a name such as
    /// localhost, or an IP address; loopback by default).
    #[arg(long, default_value = "127.0.0.1:9977", value_parser = parse_listen)]
    pub listen: String,

    /// How often the report behind /metrics is refreshed.
    #[arg(long, default_value = "2s", value_parser = parse_interval, allow_hyphen_values = true)]
    pub interval: Duration,

    /// How often timewait sockets are polled.
    #[arg(long, default_value = "1s", value_parser = parse_interval, allow_hyphen_values = true)]
    pub tw_poll: Duration,

    /// Processes that get series of their own (the rest are summed as comm="other").
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub top: u16,

    /// Add a `cgroup` label (the process's cgroup v2 path) to per-process series.
    #[arg(long)]
    pub cgroup_label: bool,

    /// Series per command (label `comm`), per systemd unit / container (labels `comm`,
    /// `unit`) or per process (labels `comm`, `pid`: every restart mints new series).
    #[arg(long, value_enum, default_value_t = GroupBy::Command)]
    pub by: GroupBy,

    #[command(flatten)]
    pub thresholds: ReportConfig,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub probe: ProbeArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Time between reports (`2` is two seconds; `500ms`, `1m` take a unit).
    #[arg(long, default_value = "2s", value_parser = parse_interval, allow_hyphen_values = true)]
    pub interval: Duration,

    /// How often timewait sockets are polled (they fire no event when they end).
    #[arg(long, default_value = "1s", value_parser = parse_interval, allow_hyphen_values = true)]
    pub tw_poll: Duration,

    /// Stop after this long and print the final report (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Option<Duration>,

    #[command(flatten)]
    pub report: ReportArgs,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub probe: ProbeArgs,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub report: ReportArgs,

    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// One JSON object per line instead of columns.
    #[arg(long)]
    pub json: bool,

    /// Stop after this long (e.g. 10s, 2m, 1h).
    #[arg(long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Option<Duration>,

    /// How often timewait sockets are polled for the TIME_WAIT rows (they fire no
    /// event: entries are confirmed and ends noticed at the next poll).
    #[arg(long, default_value = "1s", value_parser = parse_interval, allow_hyphen_values = true)]
    pub tw_poll: Duration,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// Options of the kernel probe, shared by every command that loads it.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Kernel hook: tp_btf with fallback to the classic tracepoint, or force one.
    #[arg(long, value_enum, default_value_t = HookChoice::Auto)]
    pub hook: HookChoice,

    /// Size of the kernel-to-user event ring buffer in bytes: a power of two, at least
    /// 4096 (suffixes K and M allowed, e.g. 16M). Raise it if events are dropped.
    #[arg(long, default_value = "4M", value_parser = parse_ring_size)]
    pub ring_size: u32,

    /// Sockets followed at once in userspace (beyond it the oldest are forgotten, or
    /// new ones not followed, and counted as untracked; `trace` also keeps each
    /// socket's state and owner in userspace within this cap), and the cap of the
    /// kernel's per-socket map when the classic tracepoint is used (sized from the
    /// sockets the host holds, 104 bytes each). At least 1024, at most 16777216.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_sockets: u32,

    /// Capture user stacks from the start, for every selected process (only those of
    /// --pid when given): where each socket was made (connect, accept) and where its EOF
    /// was read, to name the code behind leaked sockets (`leak_sites`; with `trace
    /// --json`, a `stack` on transitions into CLOSE_WAIT). Without it, watch, top and
    /// serve start capturing a process by themselves once it is flagged
    /// close_wait_leak.
    #[arg(long)]
    pub stacks: bool,
}

/// `HOST:PORT`, checked for its form here; the name is resolved when binding.
pub fn parse_listen(s: &str) -> Result<String, String> {
    let port = s
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .ok_or_else(|| format!("`{s}` is not HOST:PORT, e.g. 127.0.0.1:9977 or localhost:9977"))?
        .1;
    port.parse::<u16>()
        .map_err(|_| format!("`{port}` is not a port number (0 to 65535)"))?;
    Ok(s.to_string())
}

pub fn parse_ring_size(s: &str) -> Result<u32, String> {
    let upper = s.trim().to_ascii_uppercase();
    let (digits, mult) = if let Some(n) = upper.strip_suffix('M') {
        (n, 1u64 << 20)
    } else if let Some(n) = upper.strip_suffix('K') {
        (n, 1u64 << 10)
    } else {
        (upper.as_str(), 1)
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size: use bytes, or K/M, e.g. 4M"))?;
    let bytes = n.saturating_mul(mult);
    if !bytes.is_power_of_two() || !(4096..=(1 << 30)).contains(&bytes) {
        return Err(format!(
            "{bytes} bytes: the ring size must be a power of two between 4K and 1024M"
        ));
    }
    u32::try_from(bytes).map_err(|_| "too large".to_string())
}

/// `watch --help`'s epilogue: the flags (from their definitions), exit status, examples.
fn watch_after_help() -> String {
    format!(
        "{}
Exit status with --check: 3 when the final report flags a process, 0 otherwise.

Examples:
  sudo connwatch watch --close-wait-age 30s
  sudo connwatch watch --json --duration 5m --check > report.jsonl",
        crate::report::flag::help()
    )
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_bare_interval_is_seconds() {
        use clap::Parser as _;
        let cli = Cli::try_parse_from(["connwatch", "watch", "--interval", "2"]).unwrap();
        let Command::Watch(args) = cli.command else {
            panic!("not watch");
        };
        assert_eq!(args.interval, Duration::from_secs(2));
    }

    #[test]
    fn negative_interval_is_named() {
        let err = Cli::try_parse_from(["connwatch", "watch", "--interval", "-1s"]).unwrap_err();
        assert!(err.to_string().contains("is negative"), "{err}");
    }

    #[test]
    fn listen_addresses() {
        assert!(parse_listen("localhost:9977").is_ok());
        assert!(parse_listen("[::1]:9977").is_ok());
        assert!(parse_listen("0.0.0.0:0").is_ok());
        assert!(parse_listen("9977").is_err());
        assert!(parse_listen(":9977").is_err());
        assert!(parse_listen("localhost:http").is_err());
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("4M"), Ok(4 << 20));
        assert_eq!(parse_ring_size("64k"), Ok(64 << 10));
        assert_eq!(parse_ring_size("8192"), Ok(8192));
        assert!(parse_ring_size("3M").is_err());
        assert!(parse_ring_size("1K").is_err());
        assert!(parse_ring_size("2048M").is_err());
        assert!(parse_ring_size("lots").is_err());
    }
}
