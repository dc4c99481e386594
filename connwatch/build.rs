//! Builds the eBPF probe (nightly, `-Z build-std=core`, bpf-linker) and leaves the object
//! in OUT_DIR, where `src/probe` embeds it with `include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "connwatch-ebpf")
        .ok_or_else(|| anyhow!("connwatch-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default()).context(
        "building the eBPF probe failed: run `cargo xtask setup` to install llvm-22, \
         rust-src for nightly and bpf-linker",
    )?;
    // With AYA_BUILD_SKIP=1 (fuzzing the parsers, where sanitizer flags would break the
    // BPF build) no probe is built: embed an empty object, which fails to load with a
    // clear error instead of breaking the build.
    let object = std::path::Path::new(&std::env::var("OUT_DIR")?).join("connwatch");
    if !object.exists() {
        std::fs::write(&object, [])?;
    }
    emit_commit();
    Ok(())
}

/// `connwatch --version` names the commit it was built from (`unknown` outside a git
/// checkout, e.g. a source tarball).
fn emit_commit() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CONNWATCH_COMMIT={commit}");
    // HEAD moves on commit and checkout; the ref it names moves on commit.
    if let Ok(out) = std::process::Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            println!("cargo:rerun-if-changed={dir}/HEAD");
            println!("cargo:rerun-if-changed={dir}/refs/heads");
            println!("cargo:rerun-if-changed={dir}/packed-refs");
        }
    }
}
