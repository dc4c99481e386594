//! Project tasks that cargo alone cannot do: install the eBPF toolchain, run connwatch as
//! root, run every test tier.
//!
//! `cargo xtask run -- trace`   installs what is missing, builds in release, runs connwatch
//! `cargo xtask test`           installs what is missing, runs unit and root integration tests,
//!                              then builds and checks the release artifacts
//! `cargo xtask dist`           static binary, .deb and SHA256SUMS in target/dist
//! `cargo xtask image`          the same, plus an OCI image built with buildah
mod bench;
mod dist;
mod dist_check;
mod setup;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the probe needs (llvm 22, nightly rust-src, bpf-linker).
    Setup,
    /// Set up, build connwatch in release and run it (as root) with the given arguments.
    Run {
        /// Arguments for connwatch, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test tier: clippy (-D warnings), unit tests and root
    /// integration tests that load the real probe (the saturation test in release too),
    /// then the packaging tier (builds `dist` and `image` and checks each artifact).
    /// Extra arguments go to `cargo test` and skip clippy and the packaging tier.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// (bench helper) Hold CLOSE_WAIT sockets in a network namespace until stdin closes.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        count: usize,
    },
    /// Fuzz the parsers of untrusted bytes (cargo-fuzz, nightly): the event decoder, the
    /// sock_diag parser and the /proc/tracefs text parsers. Seeds in connwatch/fuzz/corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Targets to run (all when none): decode_event, sock_diag, proc_text.
        targets: Vec<String>,
    },
    /// Build the release artifacts into target/dist: a static (musl) `connwatch`, a .deb
    /// (binary, man pages, completions, systemd unit for `serve`) and SHA256SUMS.
    Dist,
    /// `dist`, then an OCI image FROM scratch holding only the static binary (buildah,
    /// no daemon or registry), also written to target/dist as an OCI archive.
    Image,
    /// The packaging tier of `test` alone: `image` (with `dist`), then check each artifact
    /// (static, runs in an empty root, .deb installs and removes cleanly, unit verifies,
    /// image entrypoint).
    Package,
    /// Set up, build in release, and measure connwatch against tcpstates and against no
    /// tracer in one run (root). Prints a table and a last `bench:` line; writes
    /// docs/BENCHMARKS.md.
    Bench {
        /// A shorter run (under 90 s) with 10,000 instead of 50,000 held sockets.
        #[arg(long)]
        quick: bool,
        /// Measure only these parts, print their figures and write no file (for working
        /// on one figure; the contract line needs a full run).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<bench::Part>,
        /// Measure this connwatch binary instead of building the workspace's (to compare
        /// two builds part by part; only with --only, so BENCHMARKS.md always describes
        /// this tree).
        #[arg(long, value_name = "PATH", requires = "only")]
        connwatch: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.task {
        Task::Setup => {
            setup::ensure_all()?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Run { args } => {
            setup::ensure_all()?;
            status(cargo().args(["build", "--release", "--package", "connwatch"]))?;
            let bin = workspace_root().join("target/release/connwatch");
            install_man_pages(&bin)?;
            let mut cmd = if setup::is_root() {
                Command::new(&bin)
            } else {
                eprintln!("xtask: connwatch loads an eBPF probe: running it through sudo");
                let mut c = Command::new("sudo");
                c.arg(&bin);
                c
            };
            exit_code(cmd.args(args))
        }
        Task::Hold { netns, count } => {
            bench::hold(&netns, count)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Fuzz { seconds, targets } => {
            fuzz(seconds, targets)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Dist => {
            setup::ensure_all()?;
            dist::dist()?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Image => {
            setup::ensure_all()?;
            let artifacts = dist::dist()?;
            dist::image(&artifacts)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Bench {
            quick,
            only,
            connwatch,
        } => {
            if !setup::is_root() {
                bail!("the benchmark loads BPF programs: run as root (sudo -E cargo xtask bench)");
            }
            setup::ensure_all()?;
            let connwatch = match connwatch {
                Some(bin) if bin.is_file() => bin,
                Some(bin) => bail!("--connwatch {}: no such file", bin.display()),
                None => {
                    status(cargo().args(["build", "--release", "--package", "connwatch"]))?;
                    workspace_root().join("target/release/connwatch")
                }
            };
            bench::bench(&bench::Options {
                quick,
                only,
                connwatch,
                out: workspace_root().join("docs/BENCHMARKS.md"),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Test { args } => test(args),
        Task::Package => {
            setup::ensure_all()?;
            Ok(if package()? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Every test tier: clippy, unit and root tests, the saturation test in release, the
/// packaging tier; with extra arguments, only `cargo test` with them.
fn test(args: Vec<String>) -> Result<ExitCode> {
    if !setup::is_root() {
        bail!("the integration tests load the real probe: run as root (sudo -E cargo xtask test)");
    }
    setup::ensure_all()?;
    setup::ensure_test_peers()?;
    let packaging = args.is_empty();
    if packaging {
        // The lint policy is part of the test: a warning fails CI.
        status(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    // default-members leave out the eBPF crate (built by connwatch/build.rs).
    let code = exit_code(cargo().args(["test", "--no-fail-fast"]).args(args))?;
    if !packaging {
        return Ok(code);
    }
    // The saturation test again in release, where the product's bound holds (a
    // report at most one interval late); in debug it only checks that reports
    // keep coming.
    let release = exit_code(cargo().args([
        "test",
        "--release",
        "--package",
        "connwatch",
        "--test",
        "saturation",
    ]))?;
    let code = if release == ExitCode::SUCCESS {
        code
    } else {
        ExitCode::FAILURE
    };
    Ok(if package()? { code } else { ExitCode::FAILURE })
}

/// Where `man` finds pages of programs built from source.
pub const MAN_DIR: &str = "/usr/local/share/man/man1";

/// Puts connwatch's man pages where `man connwatch` finds them (as root; else says how).
pub fn install_man_pages(bin: &std::path::Path) -> Result<()> {
    let out = workspace_root().join("target/generated");
    let st = Command::new(bin)
        .args(["generate", "--out"])
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .context("cannot run connwatch generate")?;
    if !st.success() {
        bail!("connwatch generate failed ({st})");
    }
    if !setup::is_root() {
        eprintln!(
            "xtask: man pages are in {}: `sudo cp {0}/*.1 {MAN_DIR}` to read them with man",
            out.join("man").display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(MAN_DIR).with_context(|| format!("cannot create {MAN_DIR}"))?;
    // Filler pages for clap's `help` that earlier builds installed.
    for old in std::fs::read_dir(MAN_DIR)?.filter_map(|e| e.ok()) {
        if old
            .file_name()
            .to_string_lossy()
            .starts_with("connwatch-help")
        {
            let _ = std::fs::remove_file(old.path());
        }
    }
    for page in std::fs::read_dir(out.join("man"))? {
        let page = page?.path();
        if let Some(name) = page.file_name() {
            std::fs::copy(&page, std::path::Path::new(MAN_DIR).join(name))
                .with_context(|| format!("cannot install {}", page.display()))?;
        }
    }
    eprintln!("xtask: man pages installed in {MAN_DIR} (`man connwatch`)");
    Ok(())
}

/// Builds every artifact and checks it; false when a check failed.
fn package() -> Result<bool> {
    eprintln!("xtask: packaging tier: cargo xtask dist, cargo xtask image, checks");
    let artifacts = dist::dist()?;
    let image = dist::image(&artifacts)?;
    Ok(dist_check::run(&artifacts, &image))
}

const FUZZ_TARGETS: [&str; 3] = ["decode_event", "sock_diag", "proc_text"];

/// Runs each fuzz target for `seconds` and reports executions. The probe is not built
/// (AYA_BUILD_SKIP): sanitizer flags would break the BPF build, and the parsers do not
/// need it.
fn fuzz(seconds: u64, targets: Vec<String>) -> Result<()> {
    let installed = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["fuzz", "--version"])
        .env("PATH", setup::path_with_cargo_bin())
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("xtask: installing cargo-fuzz");
        status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let targets = if targets.is_empty() {
        FUZZ_TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        targets
    };
    let dir = workspace_root().join("connwatch");
    for target in targets {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let out = Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", &target])
            .arg(format!("fuzz/corpus/{target}"))
            .args(["--", &format!("-max_total_time={seconds}"), "-max_len=4096"])
            .current_dir(&dir)
            .env("AYA_BUILD_SKIP", "1")
            .env("PATH", setup::path_with_cargo_bin())
            .output()
            .context("cannot run cargo fuzz")?;
        let log = String::from_utf8_lossy(&out.stderr);
        let done = log
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("no summary");
        println!("fuzz {target}: {done}");
        if !out.status.success() {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            bail!("fuzz target {target} failed:\n{tail}");
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// `cargo`, run at the workspace root, with bpf-linker's directory on PATH.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin());
    cmd
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn exit_code(cmd: &mut Command) -> Result<ExitCode> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    Ok(match st.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
