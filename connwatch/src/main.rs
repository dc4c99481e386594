//! connwatch: find the processes behind CLOSE_WAIT and TIME_WAIT sockets.
//!
//! `main` only wires the modules of the library: `cli` parses, each command runs its view
//! over the same flow.
use std::process::ExitCode;

use clap::Parser as _;

use connwatch::{
    cli::{Cli, Command, ProbeArgs},
    cmd::{serve, top, trace, watch},
    filter::Filter,
    host::runtime,
    probe::{self, ProbeOptions},
};

/// Large tables on transparent huge pages (see the module).
#[global_allocator]
static ALLOCATOR: connwatch::huge_pages::Allocator = connwatch::huge_pages::Allocator;

fn main() -> ExitCode {
    // One malloc arena: connwatch works on one thread, plus short-lived threads that
    // dump other network namespaces; with an arena each, what a dump freed stays
    // resident in a per-thread heap that nothing reuses (5 MB with 50,000 sockets).
    // And a fixed mmap threshold: by default glibc raises it to the largest block freed
    // so far (the kernel BTF, parsed at start, is several MB), after which the seed's
    // large transient blocks (dumps, listings, tables being grouped) come from the heap
    // and stay resident once freed (another 5 MB with 50,000 sockets).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    let cli = Cli::parse();
    let verbose = cli.verbose;
    env_logger::Builder::new()
        .filter_level(if verbose {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Warn
        })
        .format_timestamp(None)
        .format_target(false)
        .parse_env("CONNWATCH_LOG")
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("connwatch: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        // One line with the causes (`{:#}`): never a debug struct or a backtrace.
        Err(e) => {
            eprintln!("connwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Trace(args) => {
            let filter = Filter::from_args(&args.filter)?;
            let opts = probe_options(&args.probe, &filter, cli.verbose);
            trace::run(args, opts, filter).await
        }
        Command::Watch(args) => {
            let filter = Filter::from_args(&args.filter)?.with_workloads(&args.report.runtime);
            start_runtime(&args.report.runtime);
            let mut opts = probe_options(&args.probe, &filter, cli.verbose);
            opts.filter.lifecycle_only = 1;
            watch::watch(args, opts, filter).await
        }
        Command::Serve(args) => {
            let filter = Filter::from_args(&args.filter)?.with_workloads(&args.runtime);
            start_runtime(&args.runtime);
            let mut opts = probe_options(&args.probe, &filter, cli.verbose);
            opts.filter.lifecycle_only = 1;
            serve::serve(args, opts, filter).await
        }
        Command::Top(args) => {
            let filter = Filter::from_args(&args.filter)?.with_workloads(&args.runtime);
            start_runtime(&args.runtime);
            let mut opts = probe_options(&args.probe, &filter, cli.verbose);
            opts.filter.lifecycle_only = 1;
            top::top(args, opts, filter).await
        }
        Command::Generate { out } => {
            generate(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot(args) => {
            let filter = Filter::from_args(&args.filter)?.with_workloads(&args.report.runtime);
            start_runtime(&args.report.runtime);
            watch::snapshot(args, filter)
        }
    }
}

/// Starts asking the container runtimes for names, and waits for the first listing of
/// those present (a few ms; bounded) so that the first report names the containers
/// already running.
fn start_runtime(args: &runtime::RuntimeArgs) {
    runtime::start(args);
    runtime::wait_primed(std::time::Duration::from_secs(6));
}

fn probe_options(args: &ProbeArgs, filter: &Filter, verbose: bool) -> ProbeOptions {
    ProbeOptions {
        filter: filter.kernel(),
        hook: args.hook,
        ring_bytes: args.ring_size,
        max_sockets: args.max_sockets,
        btf_path: probe::default_btf_path(),
        verbose,
        stacks: args.stacks,
    }
}

/// Shell completions (bash, zsh, fish) and man pages generated from the clap definition,
/// so that they never drift from the flags.
fn generate(out: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let completions = out.join("completions");
    let man = out.join("man");
    std::fs::create_dir_all(&completions)?;
    std::fs::create_dir_all(&man)?;
    let mut cmd = Cli::command();
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, "connwatch", &completions)?;
    }
    // One page per command; none for clap's `help` subcommand.
    clap_mangen::generate_to(Cli::command().disable_help_subcommand(true), &man)?;
    eprintln!(
        "connwatch: wrote completions and man pages to {}",
        out.display()
    );
    Ok(())
}
