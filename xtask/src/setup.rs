//! Idempotent installation of the probe's build toolchain. Each step checks first and is
//! skipped when already satisfied, so a second run takes seconds; each says on stderr what
//! it does. Versions are the ones verified on Debian 12 with kernel 6.18 (docs/KERNEL.md).
use std::{
    env,
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Build toolchain (LLVM 22 for bpf-linker), the peers that tests and benchmarks run
/// against (promtool/prometheus, tcpstates from libbpf-tools, bpftool, bpftrace for the
/// benchmark's cost floor, tmux for the terminal test of `connwatch top`) and the
/// packaging tools: buildah builds the OCI image without a daemon or registry;
/// systemd-analyze verifies the unit. protoc compiles containerd's API (the
/// containerd-client crate generates its gRPC client when it builds).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "protobuf-compiler",
    "prometheus",
    "libbpf-tools",
    "bpftool",
    "bpftrace",
    "tmux",
    "buildah",
    "systemd",
];
/// Real software the root tests run connwatch against (`cargo xtask test` only): servers
/// that close idle clients or share a port, the clients and libraries that leak, and
/// the container runtimes whose containers connwatch names (containerd and runc; Docker;
/// podman; gcc builds the static programs of their FROM-scratch images), and the compilers of
/// the leak-site tests' C and Go programs (gcc, golang-go).
const APT_TEST_PACKAGES: &[&str] = &[
    "redis-server",
    "postgresql",
    "nginx-light",
    "curl",
    "containerd",
    "runc",
    "docker.io",
    "podman",
    "gcc",
    "golang-go",
];
/// Python client libraries of those tests (imported by their names below).
const PYPI_TEST_PACKAGES: &[(&str, &str)] = &[("redis", "redis"), ("psycopg2-binary", "psycopg2")];

/// What the root tests drive: Debian's servers and PyPI's client libraries.
pub fn ensure_test_peers() -> Result<()> {
    ensure_apt_packages(APT_TEST_PACKAGES)?;
    let missing: Vec<&str> = PYPI_TEST_PACKAGES
        .iter()
        .filter(|(_, module)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        say("python test libraries already installed");
        return Ok(());
    }
    say(&format!("installing {} with pip", missing.join(" ")));
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing))
}

/// The target of the static release binary (`cargo xtask dist`).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure_all() -> Result<()> {
    ensure_apt_packages(APT_PACKAGES)?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_rust_target(MUSL_TARGET)?;
    Ok(())
}

/// The standard library of a target of the stable toolchain (musl: the static binary).
fn ensure_rust_target(target: &str) -> Result<()> {
    let listed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .stderr(Stdio::null())
        .output()
        .context("rustup is needed to add the musl target: install it from rustup.rs")?;
    if String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        say(&format!("rust target {target} already installed"));
        return Ok(());
    }
    say(&format!(
        "adding the rust target {target} (for the static binary of `cargo xtask dist`)"
    ));
    run(Command::new("rustup").args(["target", "add", target]))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

/// Debian packages, installed with apt when any is missing.
pub fn ensure_apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        say(&format!("{} already installed", packages.join(" ")));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `sudo apt-get update && sudo apt-get install -y {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    say(&format!("installing {} with apt-get", missing.join(" ")));
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// The eBPF crate builds with nightly and `-Z build-std=core`, which needs rust-src.
fn ensure_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .stderr(Stdio::null())
        .output()
        .context("rustup is needed to build the eBPF probe: install it from rustup.rs")?;
    let listing = String::from_utf8_lossy(&installed.stdout);
    if installed.status.success() && listing.lines().any(|l| l.starts_with("rust-src")) {
        say("nightly toolchain with rust-src already installed");
        return Ok(());
    }
    if installed.status.success() {
        say("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
    } else {
        say("installing the nightly toolchain with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
    }
}

/// bpf-linker links the probe; built against the system's LLVM 22.
fn ensure_bpf_linker() -> Result<()> {
    let found = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(version) = found
        && version.contains(BPF_LINKER_VERSION)
    {
        say(&format!("{version} already installed"));
        return Ok(());
    }
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    let path = {
        let mut p = OsString::from(format!("{LLVM_PREFIX}/bin:"));
        p.push(path_with_cargo_bin());
        p
    };
    run(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path),
    )
}

/// PATH with cargo's bin directory (where `cargo install` puts bpf-linker) first.
pub fn path_with_cargo_bin() -> OsString {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let mut paths = vec![cargo_home.join("bin")];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).unwrap_or_default()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
