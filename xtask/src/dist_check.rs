//! The packaging tier of `cargo xtask test`: each artifact of `cargo xtask dist` and
//! `cargo xtask image` is checked the way a user meets it. The static binary runs in a
//! root that holds nothing else; the `.deb` installs into a scratch root, works from
//! there and removes every file it added; the unit passes `systemd-analyze verify`;
//! the image has the entrypoint and, where a container runtime exists, runs `snapshot`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::dist::{self, Artifacts};

/// Runs every check, prints one line each and a closing `N passed, N failed` line.
/// Returns whether all passed.
pub fn run(artifacts: &Artifacts, image: &Path) -> bool {
    type Check<'a> = (&'static str, Box<dyn Fn() -> Result<()> + 'a>);
    let checks: Vec<Check> = vec![
        (
            "static_binary",
            Box::new(|| static_binary(&artifacts.binary)),
        ),
        ("version_names_commit", Box::new(|| version(artifacts))),
        ("sums_match", Box::new(|| sums(artifacts))),
        (
            "runs_in_empty_root",
            Box::new(|| empty_root(&artifacts.binary)),
        ),
        (
            "deb_installs_runs_removes",
            Box::new(|| deb(&artifacts.deb)),
        ),
        ("unit_verifies", Box::new(|| unit(&artifacts.deb))),
        (
            "image_entrypoint",
            Box::new(|| image_config(artifacts, image)),
        ),
        (
            "man_pages_from_source",
            Box::new(|| man_pages(&artifacts.binary)),
        ),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, check) in &checks {
        match check() {
            Ok(()) => {
                passed += 1;
                println!("test packaging::{name} ... ok");
            }
            Err(e) => {
                failed += 1;
                println!("test packaging::{name} ... FAILED\n    {e:#}");
            }
        }
    }
    println!("packaging: {passed} passed, {failed} failed");
    failed == 0
}

/// `cargo xtask run` puts the man pages where `man` finds them, one per command and
/// none for clap's `help`.
fn man_pages(binary: &Path) -> Result<()> {
    crate::install_man_pages(binary)?;
    let out = output(Command::new("man").args(["-w", "connwatch-watch"]))?;
    ensure!(out.status.success(), "man -w connwatch-watch found no page");
    // Debian links /usr/local/man to /usr/local/share/man: compare real paths.
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let real = |p: &str| fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
    ensure!(
        real(&found).starts_with(real(crate::MAN_DIR)),
        "man found {found}, not the page in {}",
        crate::MAN_DIR
    );
    let filler = fs::read_dir(crate::MAN_DIR)?
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("connwatch-help")
        });
    ensure!(!filler, "connwatch-help-* pages in {}", crate::MAN_DIR);
    Ok(())
}

fn output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output(cmd)?.stdout).into_owned())
}

/// No program interpreter and no shared libraries: it needs nothing from the host's libc.
fn static_binary(binary: &Path) -> Result<()> {
    let headers = stdout(Command::new("readelf").arg("-lW").arg(binary))?;
    ensure!(
        !headers.contains("INTERP"),
        "the binary has a PT_INTERP header (dynamically linked)"
    );
    let dynamic = stdout(Command::new("readelf").arg("-dW").arg(binary))?;
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    ensure!(
        needed.is_empty(),
        "the binary needs shared libraries: {needed:?}"
    );
    ensure!(
        headers.contains("DYN") || headers.contains("EXEC"),
        "readelf did not read an executable: {headers}"
    );
    Ok(())
}

fn version(artifacts: &Artifacts) -> Result<()> {
    let said = stdout(Command::new(&artifacts.binary).arg("--version"))?;
    let commit = stdout(Command::new("git").args(["rev-parse", "--short=12", "HEAD"]))?;
    let expected = format!("connwatch {} (commit {})", artifacts.version, commit.trim());
    ensure!(
        said.trim() == expected,
        "--version said {said:?}, expected {expected:?}"
    );
    Ok(())
}

fn sums(artifacts: &Artifacts) -> Result<()> {
    let checked = stdout(
        Command::new("sha256sum")
            .arg("-c")
            .arg(&artifacts.sums)
            .current_dir(&artifacts.dir),
    )?;
    ensure!(
        checked.lines().filter(|l| l.ends_with(": OK")).count() == 2,
        "sha256sum -c: {checked}"
    );
    Ok(())
}

/// A scratch directory under target/, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self> {
        let dir = crate::workspace_root()
            .join("target/packaging-test")
            .join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `snapshot`, and the probe attached by `trace`, in a root holding only the binary and
/// bind mounts of /proc, /sys and /dev (a private mount namespace, so nothing is left
/// mounted).
fn empty_root(binary: &Path) -> Result<()> {
    let root = Scratch::new("root")?;
    fs::copy(binary, root.0.join("connwatch"))?;
    for dir in ["proc", "sys", "dev"] {
        fs::create_dir(root.0.join(dir))?;
    }
    let r = root.0.display();
    let script = format!(
        "set -e; for d in proc sys dev; do mount --rbind /$d {r}/$d; done; \
         chroot {r} /connwatch snapshot --json; \
         chroot {r} /connwatch trace --duration 1s --json >/dev/null"
    );
    let out = output(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script),
    )?;
    let report = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(report.lines().last().unwrap_or(""))
        .with_context(|| format!("snapshot printed no JSON report: {report}"))?;
    ensure!(
        json.get("states").is_some_and(|s| s.is_object()),
        "the snapshot report has no states: {json}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("attached"),
        "trace did not say the probe attached: {stderr}"
    );
    Ok(())
}

/// Installs the package into a scratch root (its own dpkg database), runs the installed
/// binary, removes the package and checks that every file it added is gone.
fn deb(deb: &Path) -> Result<()> {
    let root = Scratch::new("dpkg")?;
    let admin = root.0.join("var/lib/dpkg");
    fs::create_dir_all(admin.join("info"))?;
    fs::create_dir_all(admin.join("updates"))?;
    fs::write(admin.join("status"), "")?;
    let dpkg = || {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", root.0.display()))
            .arg("--force-script-chrootless");
        c
    };
    output(dpkg().arg("-i").arg(deb))?;
    let listed = stdout(dpkg().args(["-L", "connwatch"]))?;
    let files: Vec<PathBuf> = listed
        .lines()
        .map(|l| root.0.join(l.trim_start_matches('/')))
        .filter(|p| p.is_file())
        .collect();
    for expected in [
        "usr/bin/connwatch",
        "usr/share/man/man1/connwatch.1.gz",
        "usr/share/bash-completion/completions/connwatch",
        "usr/share/zsh/vendor-completions/_connwatch",
        "usr/share/fish/vendor_completions.d/connwatch.fish",
        "usr/lib/systemd/system/connwatch.service",
    ] {
        ensure!(
            files.contains(&root.0.join(expected)),
            "the package did not install /{expected}"
        );
    }
    let report =
        stdout(Command::new(root.0.join("usr/bin/connwatch")).args(["snapshot", "--json"]))?;
    let json: serde_json::Value = serde_json::from_str(report.lines().last().unwrap_or(""))
        .with_context(|| format!("the installed snapshot printed no JSON: {report}"))?;
    ensure!(json.get("states").is_some(), "no states in {json}");
    output(dpkg().args(["-r", "connwatch"]))?;
    let left: Vec<&PathBuf> = files.iter().filter(|p| p.exists()).collect();
    ensure!(left.is_empty(), "dpkg -r left files behind: {left:?}");
    Ok(())
}

/// `systemd-analyze verify` on the unit as the package installs it: its ExecStart must
/// exist, so the package is unpacked into a scratch root (with the host's own units, which
/// the unit's default dependencies name) and verified there. Any line about our unit (an
/// unknown key, a bad value) fails the check, even where verify itself exits 0.
fn unit(deb: &Path) -> Result<()> {
    let root = Scratch::new("unit")?;
    let units = root.0.join("usr/lib/systemd");
    fs::create_dir_all(&units)?;
    output(
        Command::new("cp")
            .args(["-a", "/usr/lib/systemd/system"])
            .arg(&units),
    )?;
    output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root.0))?;
    let unit = root.0.join("usr/lib/systemd/system/connwatch.service");
    let out = Command::new("systemd-analyze")
        .arg(format!("--root={}", root.0.display()))
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .context("cannot run systemd-analyze")?;
    let said = String::from_utf8_lossy(&out.stderr);
    // Only what concerns our unit: verify also loads the default target's dependencies.
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("connwatch")).collect();
    ensure!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify ({}): {said}",
        out.status
    );
    Ok(())
}

fn image_config(artifacts: &Artifacts, archive: &Path) -> Result<()> {
    ensure!(
        archive.is_file(),
        "no image archive at {}",
        archive.display()
    );
    let name = dist::image_name(&artifacts.version);
    let inspect = stdout(dist::buildah().args(["inspect", "--type", "image", &name]))?;
    let json: serde_json::Value = serde_json::from_str(&inspect).context("buildah inspect")?;
    let config = &json["OCIv1"]["config"];
    let entrypoint = &config["Entrypoint"];
    ensure!(
        *entrypoint == serde_json::json!(["/usr/local/bin/connwatch"]),
        "entrypoint is {entrypoint}"
    );
    let cmd = &config["Cmd"];
    ensure!(
        *cmd == serde_json::json!(["serve", "--listen", "0.0.0.0:9977"]),
        "default command is {cmd}"
    );
    let layers = json["OCIv1"]["rootfs"]["diff_ids"]
        .as_array()
        .map_or(0, Vec::len);
    ensure!(
        layers == 1,
        "expected one layer (the binary), found {layers}"
    );
    // chroot isolation needs no OCI runtime (crun refuses hybrid cgroup hosts like this
    // VM); the host network, so that the snapshot lists this host's sockets.
    let report = stdout(dist::buildah().args([
        "run",
        "--isolation",
        "chroot",
        "--network",
        "host",
        &container(&name)?,
        "--",
        "/usr/local/bin/connwatch",
        "snapshot",
        "--json",
    ]));
    let _ = dist::buildah().args(["rm", "--all"]).output();
    let report = report?;
    let json: serde_json::Value = serde_json::from_str(report.lines().last().unwrap_or(""))
        .with_context(|| format!("the image's snapshot printed no JSON: {report}"))?;
    if json.get("states").is_none() {
        bail!("the image's snapshot has no states: {json}");
    }
    Ok(())
}

fn container(image: &str) -> Result<String> {
    Ok(stdout(dist::buildah().args(["from", image]))?
        .trim()
        .to_string())
}
