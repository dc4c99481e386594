//! Root integration tests with real container runtimes, each started for the test with
//! its own root, state and socket: Debian's containerd (with runc) running a
//! FROM-scratch image the way the kubelet's CRI runs containers (the CRI's labels, the
//! kubelet's cgroup path, the host network), and Debian's Docker. The image holds one
//! static program (`support/leaker.c`) that connects and never closes; and Debian's
//! podman (no daemon: connwatch reads the container store it shares with CRI-O). A
//! runtime that cannot start fails the test: these tests never skip.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

common::peer_entry!();

const NS: &str = "shop";
const POD: &str = "checkout-7f9c";

/// A directory of the test's own, removed with it.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("cw-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Dir {
    /// Unmounts what the runtimes left mounted under it (dockerd's netns bind mount),
    /// then removes it.
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for target in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if Path::new(target).starts_with(&self.0) {
                let c = std::ffi::CString::new(target).unwrap();
                // SAFETY: umount2 reads one NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The static leaker, and a FROM-scratch image of it (built by buildah, no daemon) as
/// an OCI archive (for containerd) and a Docker archive.
struct Image {
    binary: PathBuf,
    oci: PathBuf,
    docker: PathBuf,
}

const IMAGE: &str = "connwatch-test/leaker:1";

fn build_image(dir: &Path) -> Image {
    let source = dir.join("leaker.c");
    std::fs::write(&source, include_str!("support/leaker.c")).unwrap();
    let binary = dir.join("leaker");
    run(Command::new(tool("/usr/bin/gcc", "gcc"))
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(&source));
    let buildah = || {
        let mut c = Command::new(tool("/usr/bin/buildah", "buildah"));
        c.arg("--root")
            .arg(dir.join("buildah/root"))
            .arg("--runroot")
            .arg(dir.join("buildah/run"))
            .args(["--storage-driver", "vfs"]);
        c
    };
    let out = run(buildah().args(["from", "scratch"]));
    let container = String::from_utf8_lossy(&out.stdout).trim().to_string();
    run(buildah()
        .args(["copy", &container])
        .arg(&binary)
        .arg("/leaker"));
    let (oci, docker) = (dir.join("leaker.oci.tar"), dir.join("leaker.docker.tar"));
    for (kind, path) in [("oci-archive", &oci), ("docker-archive", &docker)] {
        run(buildah()
            .args(["commit", "--quiet", &container])
            .arg(format!("{kind}:{}:{IMAGE}", path.display())));
    }
    run(buildah().args(["rm", &container]));
    Image {
        binary,
        oci,
        docker,
    }
}

/// A process that accepts connections and closes each at once (every client that never
/// closes its end holds a CLOSE_WAIT socket), and its port. A process of its own per
/// test: the tests of this file run in parallel.
fn closing_server() -> (Peer, String) {
    let mut closer = Peer::spawn_named(None, "cwcloser", &["closer", "127.0.0.1:0"]);
    let port = closer.expect("port");
    (closer, port)
}

/// A daemon started for a test, stopped with it (SIGTERM, then SIGKILL).
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(cmd: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Self { child, log }
    }

    /// Waits until `ready` answers, failing loudly (with the daemon's log) if it never does.
    fn wait_ready(&mut self, what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
        let end = Instant::now() + limit;
        while !ready() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{what} exited ({st}) at start: {tail:#?}");
            }
            assert!(
                Instant::now() < end,
                "{what} did not start within {limit:?}: {tail:#?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's containerd with its own root, state and socket (the CRI plugin off: the
/// containers are made as the CRI makes them, with `ctr`).
struct Containerd {
    socket: PathBuf,
    /// (container id, pod uid) of the containers run.
    containers: Vec<(String, String)>,
    /// Stopped after the containers (fields drop after `drop`).
    _daemon: Daemon,
}

impl Containerd {
    fn start(dir: &Path, image: &Image) -> Self {
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .unwrap();
        let socket = dir.join("containerd.sock");
        let mut daemon = Daemon::start(
            Command::new(tool("/usr/bin/containerd", "containerd"))
                .arg("--config")
                .arg(&config)
                .arg("--root")
                .arg(dir.join("containerd/root"))
                .arg("--state")
                .arg(dir.join("containerd/state"))
                .arg("--address")
                .arg(&socket),
            dir.join("containerd.log"),
        );
        daemon.wait_ready("containerd", Duration::from_secs(20), || {
            ctr(&socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        let c = Self {
            socket,
            containers: Vec::new(),
            _daemon: daemon,
        };
        run(c
            .ctr()
            .args(["images", "import", "--snapshotter", "native"])
            .arg(&image.oci));
        c
    }

    fn ctr(&self) -> Command {
        ctr(&self.socket)
    }

    /// Runs the leaker as container `name` of pod `pod` (namespace NS), with the CRI's
    /// labels and the kubelet's cgroupfs path; returns the container id.
    fn run_in_pod(&mut self, pod: &str, uid: &str, name: &str, args: &[String]) -> String {
        let id = format!("{:064x}", rand_u128(name) ^ u128::from(std::process::id()));
        let id = id.get(..64).unwrap().to_string();
        run(self
            .ctr()
            .args(["run", "-d", "--snapshotter", "native", "--net-host"])
            .arg("--cgroup")
            .arg(format!("/kubepods/besteffort/pod{uid}/{id}"))
            .args(["--label", &format!("io.kubernetes.pod.name={pod}")])
            .args(["--label", &format!("io.kubernetes.pod.namespace={NS}")])
            .args(["--label", &format!("io.kubernetes.pod.uid={uid}")])
            .args(["--label", &format!("io.kubernetes.container.name={name}")])
            .args([IMAGE, &id, "/leaker"])
            .args(args));
        self.containers.push((id.clone(), uid.to_string()));
        id
    }
}

/// `ctr` on a containerd's socket, in the kubelet's namespace.
fn ctr(socket: &Path) -> Command {
    let mut c = Command::new(tool("/usr/bin/ctr", "containerd"));
    c.arg("--address").arg(socket).args(["-n", "k8s.io"]);
    c
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for (id, _) in &self.containers {
            let _ = self.ctr().args(["task", "kill", "-s", "KILL", id]).output();
        }
        for (id, _) in &self.containers {
            let end = Instant::now() + Duration::from_secs(10);
            while !self
                .ctr()
                .args(["task", "delete", id])
                .output()
                .is_ok_and(|o| o.status.success())
                && Instant::now() < end
            {
                thread::sleep(Duration::from_millis(100));
            }
            let _ = self.ctr().args(["container", "delete", id]).output();
        }
        // runc removes the containers' cgroups; the kubelet-style pod directories are ours.
        for (_, uid) in &self.containers {
            if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
                for h in hierarchies.flatten() {
                    let _ =
                        std::fs::remove_dir(h.path().join(format!("kubepods/besteffort/pod{uid}")));
                }
            }
        }
    }
}

/// 128 random bits (seeded from a name): distinct container ids and pod uids per run.
fn rand_u128(name: &str) -> u128 {
    use std::hash::BuildHasher;
    let a = std::collections::hash_map::RandomState::new().hash_one(name);
    let b = std::collections::hash_map::RandomState::new().hash_one((name, a));
    (u128::from(a) << 64) | u128::from(b)
}

fn pod_uid(name: &str) -> String {
    let hex = format!("{:032x}", rand_u128(name));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The row of a report whose container is `id`.
fn container_row<'a>(r: &'a Value, id: &str) -> Option<&'a Value> {
    r["processes"]
        .as_array()?
        .iter()
        .find(|p| p["container"]["id"] == id)
}

fn snapshot(args: &[&str]) -> Value {
    let out = run(Command::new(CONNWATCH)
        .args(["snapshot", "--json"])
        .args(args));
    stderr_lines(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The first `watch` report in which container `id`'s row holds `close_wait` sockets
/// and is `named`; it may appear unnamed in one report at most (the runtime is asked
/// when a row first needs the name).
fn wait_named(
    cw: &mut Connwatch,
    id: &str,
    close_wait: u64,
    named: impl Fn(&Value) -> bool,
) -> Value {
    let mut unnamed = 0;
    let report = wait_report(cw, "the container's row, named", |r| {
        let Some(row) = container_row(r, id) else {
            return false;
        };
        let is_named = named(row);
        if !is_named {
            unnamed += 1;
        }
        row["close_wait"] == close_wait && is_named
    });
    assert!(unnamed <= 1, "named {unnamed} reports after its first row");
    report
}

/// The row of container `id` in `snapshot`'s report once it holds `close_wait`
/// sockets (within `DEADLINE`; else the test fails with the last report).
fn snapshot_row(args: &[&str], id: &str, close_wait: u64) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let r = snapshot(args);
        if let Some(row) = container_row(&r, id).filter(|p| p["close_wait"] == close_wait) {
            return row.clone();
        }
        assert!(Instant::now() < end, "no row for container {id}: {r}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// A pod's leaking container is named by namespace/pod/container in `watch` (started
/// before the container: named within an interval of its first row), in `snapshot`
/// (JSON and table), summed with its sibling by `--by pod`, and selected by `--pod` and
/// `--k8s-namespace`; a host process carries `container` and `k8s` null.
#[test]
fn containerd_pod_is_named_by_namespace_pod_and_container() {
    require_root();
    let dir = Dir::new("containerd");
    let image = build_image(&dir.0);
    let mut containerd = Containerd::start(&dir.0, &image);
    let socket = containerd.socket.display().to_string();
    let (closer, port) = closing_server();

    let mut cw = Connwatch::start(&[
        "watch",
        "--json",
        "--interval",
        "1s",
        "--containerd-socket",
        &socket,
    ]);
    wait_report(&mut cw, "a first report", |_| true);
    let uid = pod_uid(POD);
    let app = containerd.run_in_pod(POD, &uid, "app", &[port.clone(), "3".into()]);
    let report = wait_named(&mut cw, &app, 3, |row| row["k8s"]["pod"] == POD);
    let row = container_row(&report, &app).unwrap();
    assert_eq!(row["comm"], "leaker");
    assert_eq!(
        row["container"],
        serde_json::json!({"id": app, "runtime": "containerd", "name": "app"})
    );
    assert_eq!(
        row["k8s"],
        serde_json::json!({"namespace": NS, "pod": POD, "pod_uid": uid, "container": "app"})
    );
    // The closing server closed its ends first: its row's peer is the pod's process,
    // named with its pod.
    let r = wait_report(&mut cw, "the closer's FIN_WAIT2 peer named", |r| {
        process(r, closer.pid()).is_some_and(|p| p["peers"][0]["process"]["pod"] == POD)
    });
    let peer = &process(&r, closer.pid()).unwrap()["peers"][0]["process"];
    assert_eq!(
        (&peer["comm"], &peer["namespace"], &peer["container"]),
        (
            &Value::from("leaker"),
            &Value::from(NS),
            &Value::from("app")
        ),
        "{peer}"
    );
    drop(cw);

    // A sidecar in the same pod, and the same program on the host.
    let sidecar = containerd.run_in_pod(POD, &uid, "sidecar", &[port.clone(), "2".into()]);
    let mut host = Command::new(&image.binary)
        .args([port.as_str(), "1"])
        .spawn()
        .unwrap();
    let host_pid = host.id();
    let end = Instant::now() + DEADLINE;
    let r = loop {
        let r = snapshot(&["--containerd-socket", &socket]);
        let ready = container_row(&r, &sidecar).is_some_and(|p| p["close_wait"] == 2)
            && process(&r, host_pid).is_some_and(|p| p["close_wait"] == 1);
        if ready || Instant::now() > end {
            break r;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let side = container_row(&r, &sidecar).expect("the sidecar's row");
    assert_eq!(side["k8s"]["container"], "sidecar", "{side}");
    let on_host = process(&r, host_pid).expect("the host process's row");
    assert!(
        on_host["container"].is_null() && on_host["k8s"].is_null(),
        "{on_host}"
    );

    let by_pod = snapshot(&["--containerd-socket", &socket, "--by", "pod"]);
    let pod_rows: Vec<&Value> = by_pod["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["k8s"]["pod"] == POD)
        .collect();
    assert_eq!(pod_rows.len(), 1, "{by_pod}");
    assert_eq!(pod_rows[0]["close_wait"], 5, "app's 3 and the sidecar's 2");
    assert_eq!(
        pod_rows[0]["k8s"],
        serde_json::json!({"namespace": NS, "pod": POD, "pod_uid": uid, "container": null})
    );
    assert!(pod_rows[0]["container"].is_null());

    let only_pod = snapshot(&["--containerd-socket", &socket, "--pod", POD]);
    let comms: Vec<&Value> = only_pod["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["k8s"]["pod"])
        .collect();
    assert_eq!(comms.len(), 2, "app and sidecar only: {only_pod}");
    assert!(comms.iter().all(|p| *p == POD));
    let other_ns = snapshot(&["--containerd-socket", &socket, "--k8s-namespace", "other"]);
    assert_eq!(other_ns["processes"], serde_json::json!([]), "{other_ns}");

    let table = run(Command::new(CONNWATCH).args(["snapshot", "--containerd-socket", &socket]));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(&format!("leaker ({NS}/{POD}/app)")),
        "the table names the pod: {text}"
    );
    let _ = host.kill();
    let _ = host.wait();
}

/// A runtime that is not there is said once on stderr, and rows keep the ids.
#[test]
fn an_absent_runtime_is_said_once_and_rows_keep_ids() {
    require_root();
    let dir = Dir::new("containerd-gone");
    let image = build_image(&dir.0);
    let mut containerd = Containerd::start(&dir.0, &image);
    let (_closer, port) = closing_server();
    let uid = pod_uid("gone");
    let id = containerd.run_in_pod("gone", &uid, "app", &[port, "2".into()]);
    let missing = dir.0.join("no-such.sock");
    let end = Instant::now() + DEADLINE;
    loop {
        let out = run(Command::new(CONNWATCH)
            .args(["snapshot", "--json", "--containerd-socket"])
            .arg(&missing));
        let err = stderr_lines(&out);
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(row) = container_row(&r, &id) {
            assert_eq!(
                row["k8s"],
                serde_json::json!({"namespace": null, "pod": null, "pod_uid": uid, "container": null})
            );
            assert!(row["container"]["name"].is_null(), "{row}");
            let said: Vec<&String> = err
                .iter()
                .filter(|l| l.contains("cannot ask containerd"))
                .collect();
            assert_eq!(said.len(), 1, "{err:?}");
            assert!(said[0].contains("--containerd-socket"), "{said:?}");
            break;
        }
        assert!(Instant::now() < end, "no row for the container: {r}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// Debian's Docker (its own data root and socket, no iptables, no bridge): a
/// container's row carries Docker's name for it, and no pod.
#[test]
fn docker_container_is_named() {
    require_root();
    let dir = Dir::new("docker");
    let image = build_image(&dir.0);
    let socket = dir.0.join("docker.sock");
    let host = format!("unix://{}", socket.display());
    let docker = || {
        let mut c = Command::new(tool("/usr/bin/docker", "docker.io"));
        c.args(["-H", &host]);
        c
    };
    let mut daemon = Daemon::start(
        Command::new(tool("/usr/sbin/dockerd", "docker.io"))
            .arg("--data-root")
            .arg(dir.0.join("data"))
            .arg("--exec-root")
            .arg(dir.0.join("exec"))
            .arg("--pidfile")
            .arg(dir.0.join("dockerd.pid"))
            .args(["--host", &host, "--iptables=false", "--bridge=none"]),
        dir.0.join("dockerd.log"),
    );
    daemon.wait_ready("dockerd", Duration::from_secs(60), || {
        docker()
            .arg("info")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    run(docker().arg("load").arg("-i").arg(&image.docker));
    let (_closer, port) = closing_server();
    let name = format!("shop-web-{}", std::process::id());
    let out = run(docker()
        .args(["run", "-d", "--network", "host", "--name", &name])
        .args(["--label", "com.docker.compose.project=shop"])
        .args(["--label", "com.docker.compose.service=web"])
        .args([IMAGE, "/leaker", &port, "2"]));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let socket_arg = socket.display().to_string();
    let row = snapshot_row(
        &["--docker-socket", &socket_arg, "--by", "container"],
        &id,
        2,
    );
    assert_eq!(
        row["container"],
        serde_json::json!({"id": id, "runtime": "docker", "name": name})
    );
    assert!(row["k8s"].is_null(), "{row}");

    // A pod's container made by Docker the way cri-dockerd makes it: the kubelet's
    // cgroupfs path (which names no runtime) and the CRI's labels. containerd (dockerd's
    // own, asked too) lists it without a name in its `moby` namespace; Docker names it.
    let uid = pod_uid("docker-pod");
    let pod_name = format!("k8s_app_{POD}_{NS}_{uid}_0");
    let out = run(docker()
        .args(["run", "-d", "--network", "host", "--name", &pod_name])
        .arg(format!("--cgroup-parent=/kubepods/besteffort/pod{uid}"))
        .args(["--label", &format!("io.kubernetes.pod.name={POD}")])
        .args(["--label", &format!("io.kubernetes.pod.namespace={NS}")])
        .args(["--label", &format!("io.kubernetes.pod.uid={uid}")])
        .args(["--label", "io.kubernetes.container.name=app"])
        .args([IMAGE, "/leaker", &port, "1"]));
    let pod_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let containerd_socket = dir.0.join("exec/containerd/containerd.sock");
    assert!(
        containerd_socket.exists(),
        "dockerd's containerd socket is not at {}",
        containerd_socket.display()
    );
    let containerd_arg = containerd_socket.display().to_string();
    let args = [
        "--docker-socket",
        &socket_arg,
        "--containerd-socket",
        &containerd_arg,
    ];
    let row = snapshot_row(&args, &pod_id, 1);
    let _ = docker().args(["rm", "-f", &name, &pod_name]).output();
    assert_eq!(
        row["k8s"],
        serde_json::json!({"namespace": NS, "pod": POD, "pod_uid": uid, "container": "app"}),
        "{row}"
    );
    // Docker's name for it, and Docker as its runtime (the path alone said containerd).
    assert_eq!(row["container"]["name"], pod_name.as_str(), "{row}");
    assert_eq!(row["container"]["runtime"], "docker", "{row}");
}

/// Debian's podman on a store of the test's own (no daemon: each command is one run).
/// Its containers are removed with it.
struct Podman {
    root: PathBuf,
    runroot: PathBuf,
}

impl Podman {
    fn cmd(&self) -> Command {
        let mut c = Command::new(tool("/usr/bin/podman", "podman"));
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"]);
        c
    }

    /// Runs the leaker in a container `name` on the host network; returns its id.
    /// Limits within the test's own: podman's defaults would raise them, which needs
    /// CAP_SYS_RESOURCE.
    fn start(&self, name: &str, extra: &[&str], port: &str, n: &str) -> String {
        let out = run(self
            .cmd()
            .args(["run", "-d", "--network", "host", "--name", name])
            .args(["--ulimit", "nofile=1024:1024"])
            .args(["--ulimit", "nproc=4096:4096"])
            .args(extra)
            .args([IMAGE, "/leaker", port, n]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "-a", "-f", "-t", "0"]).output();
    }
}

/// podman's containers are named from its container store (no daemon runs): by their
/// name, and by their pod where the name is one CRI-O gives (the kubelet's
/// `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>`; CRI-O keeps its containers in the
/// same store).
#[test]
fn podman_container_is_named_from_its_store() {
    require_root();
    let dir = Dir::new("podman");
    let image = build_image(&dir.0);
    let podman = Podman {
        root: dir.0.join("podman/root"),
        runroot: dir.0.join("podman/run"),
    };
    run(podman.cmd().arg("load").arg("-i").arg(&image.oci));
    let (_closer, port) = closing_server();
    let store = [
        podman.root.display().to_string(),
        podman.runroot.display().to_string(),
    ];
    let args = [
        "--containers-storage",
        store[0].as_str(),
        "--containers-storage",
        store[1].as_str(),
    ];

    // Started while `watch` runs: named by the report after its first row.
    let mut cw = Connwatch::start(&[&["watch", "--json", "--interval", "1s"][..], &args].concat());
    wait_report(&mut cw, "a first report", |_| true);
    let name = format!("shop-web-{}", std::process::id());
    let id = podman.start(&name, &[], &port, "2");
    let report = wait_named(&mut cw, &id, 2, |row| {
        row["container"]["name"] == name.as_str()
    });
    drop(cw);
    let row = container_row(&report, &id).unwrap().clone();

    // Named the way CRI-O names a pod's container, in the kubelet's cgroup path.
    let uid = pod_uid("podman-pod");
    let pod_name = format!("k8s_app_{POD}_{NS}_{uid}_0");
    let parent = format!("--cgroup-parent=/kubepods/besteffort/pod{uid}");
    let pod_id = podman.start(&pod_name, &[parent.as_str()], &port, "1");
    let pod_row = snapshot_row(&args, &pod_id, 1);
    assert_eq!(
        row["container"],
        serde_json::json!({"id": id, "runtime": "podman", "name": name})
    );
    assert!(row["k8s"].is_null(), "{row}");
    assert_eq!(
        pod_row["k8s"],
        serde_json::json!({"namespace": NS, "pod": POD, "pod_uid": uid, "container": "app"}),
        "{pod_row}"
    );
    assert_eq!(pod_row["container"]["name"], "app", "{pod_row}");
}

/// The project's own alert fires in a real Prometheus (Debian's) for the leaking pod by
/// name: `serve` on loopback, scraped every second, deploy/alerts.yml evaluated every
/// second with its `for:` waits cut to 0s (the expressions and labels are the
/// shipped ones; waiting five minutes is not the test's business).
#[test]
fn prometheus_fires_the_leak_alert_for_the_pod_by_name() {
    require_root();
    let prometheus = tool("/usr/bin/prometheus", "prometheus");
    let dir = Dir::new("prom-pod");
    let image = build_image(&dir.0);
    let mut containerd = Containerd::start(&dir.0, &image);
    let (_closer, port) = closing_server();
    let uid = pod_uid(POD);
    containerd.run_in_pod(POD, &uid, "app", &[port, "2".into()]);
    let socket = containerd.socket.display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let _cw = Connwatch::start(&[
        "serve",
        "--listen",
        &listen,
        "--interval",
        "1s",
        "--close-wait-age",
        "1s",
        "--containerd-socket",
        &socket,
    ]);
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/alerts.yml"))
            .unwrap();
    let rules: String = shipped
        .lines()
        .map(|l| match l.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 0s\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(dir.0.join("alerts.yml"), rules).unwrap();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\nscrape_configs:\n  - job_name: connwatch\n    static_configs:\n      - targets: ['{listen}']\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let _prom = Daemon::start(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}")),
        dir.0.join("prometheus.log"),
    );
    let end = Instant::now() + Duration::from_secs(60);
    let alert = loop {
        let answer = std::net::TcpStream::connect(("127.0.0.1", web))
            .ok()
            .map(|_| get(web, "/api/v1/alerts"));
        if let Some((200, body)) = answer
            && let Ok(v) = serde_json::from_str::<Value>(&body)
            && let Some(a) = v["data"]["alerts"].as_array().and_then(|alerts| {
                alerts.iter().find(|a| {
                    a["labels"]["alertname"] == "CloseWaitLeak"
                        && a["state"] == "firing"
                        && a["labels"]["pod"] == POD
                })
            })
        {
            break a.clone();
        }
        assert!(
            Instant::now() < end,
            "CloseWaitLeak never fired for pod {POD}; alerts: {:?}; log: {}",
            get(web, "/api/v1/alerts").1,
            std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(250));
    };
    let labels = &alert["labels"];
    assert_eq!(
        (
            &labels["namespace"],
            &labels["pod"],
            &labels["container"],
            &labels["comm"]
        ),
        (
            &Value::from(NS),
            &Value::from(POD),
            &Value::from("app"),
            &Value::from("leaker")
        ),
        "{alert}"
    );
    assert_eq!(labels["instance"], listen.as_str());
    let summary = alert["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!("pod {NS}/{POD} (container app, leaker)")),
        "{summary}"
    );
}
