//! Release artifacts for the box that has the problem, which is rarely the box that
//! builds: one static binary (musl, `static-pie`: no libc needed on the host, so it runs
//! on Ubuntu 20.04, RHEL 8 or Amazon Linux 2 as well as here), a `.deb` with man pages,
//! completions and a hardened systemd unit for `serve`, a SHA-256 sums file, and an OCI
//! image `FROM scratch` built with buildah (no daemon, no registry).
//!
//! The `.deb` is assembled with `dpkg-deb` from the workspace metadata (name, version,
//! description, licence): the binary is static, so there are no shared-library
//! dependencies to compute, and nothing has to be built or installed to package it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, setup, status, workspace_root};

/// What `cargo xtask dist` writes to `target/dist/`.
pub struct Artifacts {
    pub dir: PathBuf,
    pub binary: PathBuf,
    pub deb: PathBuf,
    pub sums: PathBuf,
    pub version: String,
}

/// The systemd unit for `connwatch serve`, shipped in the `.deb`.
pub const UNIT: &str = "deploy/connwatch.service";
/// Where the image puts the binary; the entrypoint, as in the Dockerfile.
const IMAGE_BINARY: &str = "/usr/local/bin/connwatch";

pub fn dist() -> Result<Artifacts> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION").to_string();
    // Stripped (symbols only: the probe object is embedded as data and keeps its BTF).
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "connwatch",
        "--target",
        setup::MUSL_TARGET,
        "--config",
        "profile.release.strip=\"symbols\"",
    ]))?;
    let dir = root.join("target/dist");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let binary = dir.join("connwatch");
    let built = root.join(format!("target/{}/release/connwatch", setup::MUSL_TARGET));
    fs::copy(&built, &binary).with_context(|| format!("cannot copy {}", built.display()))?;
    // Completions and man pages come from the binary itself (clap), so they match it.
    status(Command::new(&binary).arg("generate").arg("--out").arg(&dir))?;
    let deb = build_deb(&root, &dir, &version)?;
    let sums = dir.join("SHA256SUMS");
    let listing = Command::new("sha256sum")
        .arg("connwatch")
        .arg(deb.file_name().unwrap_or_default())
        .current_dir(&dir)
        .output()
        .context("cannot run sha256sum")?;
    if !listing.status.success() {
        bail!(
            "sha256sum failed: {}",
            String::from_utf8_lossy(&listing.stderr)
        );
    }
    fs::write(&sums, &listing.stdout)?;
    let artifacts = Artifacts {
        dir,
        binary,
        deb,
        sums,
        version,
    };
    for path in [&artifacts.binary, &artifacts.deb, &artifacts.sums] {
        eprintln!("xtask: {} ({} bytes)", path.display(), size(path));
    }
    Ok(artifacts)
}

pub fn size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Lays out the package tree under `dist/deb/` and packs it with `dpkg-deb`.
fn build_deb(root: &Path, dist: &Path, version: &str) -> Result<PathBuf> {
    let stage = dist.join("deb");
    let put = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let dest = stage.join(to);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(from, &dest).with_context(|| format!("cannot copy {}", from.display()))?;
        set_mode(&dest, mode)
    };
    put(&dist.join("connwatch"), "usr/bin/connwatch", 0o755)?;
    let completions = dist.join("completions");
    put(
        &completions.join("connwatch.bash"),
        "usr/share/bash-completion/completions/connwatch",
        0o644,
    )?;
    put(
        &completions.join("_connwatch"),
        "usr/share/zsh/vendor-completions/_connwatch",
        0o644,
    )?;
    put(
        &completions.join("connwatch.fish"),
        "usr/share/fish/vendor_completions.d/connwatch.fish",
        0o644,
    )?;
    for page in fs::read_dir(dist.join("man"))? {
        let page = page?.path();
        let name = page.file_name().unwrap_or_default().to_string_lossy();
        put(&page, &format!("usr/share/man/man1/{name}"), 0o644)?;
        status(
            Command::new("gzip")
                .args(["-9n"])
                .arg(stage.join(format!("usr/share/man/man1/{name}"))),
        )?;
    }
    put(
        &root.join(UNIT),
        "usr/lib/systemd/system/connwatch.service",
        0o644,
    )?;
    let doc = stage.join("usr/share/doc/connwatch");
    fs::create_dir_all(&doc)?;
    fs::write(
        doc.join("copyright"),
        format!(
            "connwatch {version}\nLicense: {}\n",
            env!("CARGO_PKG_LICENSE")
        ),
    )?;
    let control = stage.join("DEBIAN/control");
    fs::create_dir_all(stage.join("DEBIAN"))?;
    fs::write(&control, control_file(version, installed_kib(&stage)?))?;
    let deb = dist.join(format!("connwatch_{version}_amd64.deb"));
    status(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    fs::remove_dir_all(&stage)?;
    Ok(deb)
}

/// `DEBIAN/control` from the workspace metadata. No `Depends`: the binary is static.
fn control_file(version: &str, installed_kib: u64) -> String {
    let description = "Find the processes behind CLOSE_WAIT and TIME_WAIT sockets, with eBPF";
    format!(
        "Package: connwatch\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: connwatch developers <connwatch@localhost>\n\
         Section: net\n\
         Priority: optional\n\
         Installed-Size: {installed_kib}\n\
         Description: {description}\n \
         connwatch follows TCP state transitions with an eBPF probe and names the\n \
         processes behind CLOSE_WAIT leaks and TIME_WAIT build-up: pid, command, count,\n \
         oldest age, peers and open fds against the fd limit. One static binary; needs\n \
         Linux >= 5.8 with BTF. Ships a systemd unit for Prometheus metrics (serve).\n"
    )
}

fn installed_kib(stage: &Path) -> Result<u64> {
    fn walk(dir: &Path) -> Result<u64> {
        let mut bytes = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            bytes += if meta.is_dir() {
                walk(&entry.path())?
            } else {
                meta.len()
            };
        }
        Ok(bytes)
    }
    Ok(walk(stage)?.div_ceil(1024))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// The image's name: `localhost/connwatch:VERSION`, also tagged `latest`.
pub fn image_name(version: &str) -> String {
    format!("localhost/connwatch:{version}")
}

/// buildah with the storage driver that works everywhere (no overlay mount needed).
pub fn buildah() -> Command {
    let mut cmd = Command::new("buildah");
    cmd.args(["--storage-driver", "vfs"]);
    cmd
}

fn buildah_out(args: &[&str]) -> Result<String> {
    let out = buildah()
        .args(args)
        .output()
        .context("cannot run buildah: `cargo xtask setup` installs it")?;
    if !out.status.success() {
        bail!(
            "buildah {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds the OCI image from scratch around the static binary, with the entrypoint and
/// default command of the Dockerfile, and writes it as an OCI archive next to the other
/// artifacts (`podman load -i`, `ctr -n k8s.io images import`, `skopeo copy`).
pub fn image(artifacts: &Artifacts) -> Result<PathBuf> {
    let name = image_name(&artifacts.version);
    let ctr = buildah_out(&["from", "scratch"])?;
    let built = (|| -> Result<()> {
        let binary = artifacts.binary.to_string_lossy();
        buildah_out(&["copy", "--chmod", "0755", &ctr, &binary, IMAGE_BINARY])?;
        buildah_out(&[
            "config",
            "--entrypoint",
            &format!("[\"{IMAGE_BINARY}\"]"),
            "--cmd",
            "[\"serve\", \"--listen\", \"0.0.0.0:9977\"]",
            "--port",
            "9977",
            "--label",
            &format!("org.opencontainers.image.version={}", artifacts.version),
            "--label",
            "org.opencontainers.image.title=connwatch",
            &ctr,
        ])?;
        buildah_out(&["commit", "--rm", &ctr, &name])?;
        Ok(())
    })();
    if built.is_err() {
        let _ = buildah_out(&["rm", &ctr]);
    }
    built?;
    buildah_out(&["tag", &name, "localhost/connwatch:latest"])?;
    let archive = artifacts
        .dir
        .join(format!("connwatch-image-{}.oci.tar", artifacts.version));
    let _ = fs::remove_file(&archive);
    buildah_out(&[
        "push",
        &name,
        &format!("oci-archive:{}:{name}", archive.display()),
    ])?;
    // Earlier builds of the same tag are left untagged: drop them (vfs keeps full copies).
    let _ = buildah_out(&["rmi", "--prune"]);
    eprintln!(
        "xtask: image {name} (buildah --storage-driver vfs images), archive {} ({} bytes)",
        archive.display(),
        size(&archive)
    );
    Ok(archive)
}
