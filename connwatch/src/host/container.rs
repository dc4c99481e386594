//! Which container, and which Kubernetes pod, a process runs in, from the cgroup paths
//! in `/proc/PID/cgroup` (cgroup v1 and v2; the systemd and cgroupfs drivers):
//!
//! | runtime | systemd driver | cgroupfs driver |
//! |---|---|---|
//! | containerd (CRI) | `cri-containerd-<id>.scope` | `/kubepods/<qos>/pod<uid>/<id>` |
//! | CRI-O | `crio-<id>.scope` | `/kubepods/<qos>/pod<uid>/crio-<id>` |
//! | Docker | `docker-<id>.scope` | `/docker/<id>` |
//! | podman | `libpod-<id>.scope` | `/libpod_parent/libpod-<id>` |
//!
//! The pod's uid comes from the kubelet's part of the path (`pod<uid>`, or
//! `kubepods-<qos>-pod<uid with _ for ->.slice`). Names (pod, namespace, container) are
//! the runtime's to tell; this module reads only what the path says. Parsed once per
//! distinct cgroup file, so the cost follows containers, not sockets or reports.
use std::{cell::RefCell, collections::HashMap};

use serde::Serialize;

/// The container runtime that made a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Runtime {
    #[serde(rename = "containerd")]
    Containerd,
    #[serde(rename = "cri-o")]
    CriO,
    #[serde(rename = "docker")]
    Docker,
    #[serde(rename = "podman")]
    Podman,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Docker => "docker",
            Self::Podman => "podman",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// The full id, as the runtime spells it.
    pub id: String,
    pub runtime: Runtime,
}

/// What the cgroup paths of a process say about where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// `None` for a process outside containers.
    pub container: Option<Container>,
    /// The Kubernetes pod's uid, for a process the kubelet placed.
    pub pod_uid: Option<String>,
}

/// Distinct cgroup files seen, and what they said (bounded: cleared when it grows past
/// this many, which only a host churning through containers reaches).
const CACHE_MAX: usize = 4096;

thread_local! {
    static CACHE: RefCell<HashMap<String, Identity>> = RefCell::new(HashMap::new());
}

/// The identity the text of a `/proc/PID/cgroup` file gives, cached per distinct text.
pub fn identity_cached(cgroup_file: &str) -> Identity {
    CACHE.with_borrow_mut(|cache| {
        if let Some(id) = cache.get(cgroup_file) {
            return id.clone();
        }
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        let id = identity(cgroup_file);
        cache.insert(cgroup_file.to_string(), id.clone());
        id
    })
}

/// The identity the text of a `/proc/PID/cgroup` file gives: the first line naming a
/// container wins (on cgroup v1 hosts every controller's line names the same one).
pub fn identity(cgroup_file: &str) -> Identity {
    let mut found = Identity::default();
    for line in cgroup_file.lines() {
        // `hierarchy-id:controllers:path`; the path may itself hold colons.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if found.pod_uid.is_none() {
            found.pod_uid = segments.iter().find_map(|s| pod_uid(s));
        }
        if found.container.is_none() {
            found.container = container_in(&segments);
        }
        if found.container.is_some() && found.pod_uid.is_some() {
            break;
        }
    }
    found
}

/// The container the segments of one cgroup path name, innermost first.
fn container_in(segments: &[&str]) -> Option<Container> {
    let in_kubepods = segments.iter().any(|s| s.starts_with("kubepods"));
    for (i, seg) in segments.iter().enumerate().rev() {
        let seg = seg.strip_suffix(".scope").unwrap_or(seg);
        let prefixed = [
            ("cri-containerd-", Runtime::Containerd),
            ("crio-", Runtime::CriO),
            ("docker-", Runtime::Docker),
            ("libpod-", Runtime::Podman),
        ];
        for (prefix, runtime) in prefixed {
            if let Some(id) = seg.strip_prefix(prefix)
                && is_id(id)
            {
                return Some(Container {
                    id: id.to_string(),
                    runtime,
                });
            }
        }
        let parent = i.checked_sub(1).and_then(|p| segments.get(p));
        if is_id(seg) {
            // cgroupfs: `/docker/<id>`, or the kubelet's `/kubepods/…/pod<uid>/<id>`
            // (the CRI's default runtime, containerd).
            if parent == Some(&"docker") {
                return Some(Container {
                    id: seg.to_string(),
                    runtime: Runtime::Docker,
                });
            }
            if in_kubepods && parent.is_some_and(|p| pod_uid(p).is_some()) {
                return Some(Container {
                    id: seg.to_string(),
                    runtime: Runtime::Containerd,
                });
            }
        }
    }
    None
}

/// A container id: at least 12 hex digits (runtimes use 64).
fn is_id(s: &str) -> bool {
    s.len() >= 12 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The pod uid of a kubelet cgroup segment: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".slice").unwrap_or(seg);
    let uid = if let Some(rest) = seg.strip_prefix("pod") {
        rest
    } else {
        seg.strip_prefix("kubepods")?.rsplit_once("-pod")?.1
    };
    let uid = uid.replace('_', "-");
    let plausible = uid.len() >= 32 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    plausible.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "12345678-9abc-def0-1234-56789abcdef0";

    fn container(text: &str) -> Option<(String, Runtime)> {
        identity(text).container.map(|c| (c.id, c.runtime))
    }

    #[test]
    fn containerd_under_the_kubelet_both_drivers() {
        // cgroup v1, cgroupfs driver (this project's test tier, and many nodes).
        let v1 = format!(
            "12:memory:/kubepods/besteffort/pod{UID}/{ID}\n11:cpu:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"
        );
        let id = identity(&v1);
        assert_eq!(container(&v1), Some((ID.into(), Runtime::Containerd)));
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        // cgroup v2, systemd driver.
        let uid_ = UID.replace('-', "_");
        let v2 = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(container(&v2), Some((ID.into(), Runtime::Containerd)));
        assert_eq!(identity(&v2).pod_uid.as_deref(), Some(UID));
        // Guaranteed pods have no QoS level in the path.
        let g = format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(identity(&g).pod_uid.as_deref(), Some(UID));
    }

    /// connwatch in a pod of its own (hostPID, a private cgroup namespace): other
    /// processes' paths are relative to its cgroup, and climb out of it with `..`.
    #[test]
    fn paths_seen_from_inside_a_cgroup_namespace() {
        let uid_ = UID.replace('-', "_");
        let text =
            format!("0::/../../kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(container(&text), Some((ID.into(), Runtime::Containerd)));
        assert_eq!(identity(&text).pod_uid.as_deref(), Some(UID));
        let docker = format!("0::/../../docker-{ID}.scope\n");
        assert_eq!(container(&docker), Some((ID.into(), Runtime::Docker)));
    }

    #[test]
    fn every_runtime_is_told_apart() {
        let cases = [
            (format!("0::/system.slice/crio-{ID}.scope"), Runtime::CriO),
            (
                format!("0::/system.slice/docker-{ID}.scope"),
                Runtime::Docker,
            ),
            (format!("4:memory:/docker/{ID}\n0::/"), Runtime::Docker),
            (
                format!("0::/machine.slice/libpod-{ID}.scope"),
                Runtime::Podman,
            ),
            (format!("0::/libpod_parent/libpod-{ID}"), Runtime::Podman),
        ];
        for (text, runtime) in cases {
            assert_eq!(container(&text), Some((ID.into(), runtime)), "{text}");
            assert_eq!(identity(&text).pod_uid, None, "{text}");
        }
    }

    #[test]
    fn hosts_processes_and_monitors_are_not_containers() {
        for text in [
            "0::/system.slice/nginx.service\n",
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "9:name=systemd:/\n0::/\n",
            // conmon watches a container from outside it.
            &format!("0::/machine.slice/libpod-conmon-{ID}.scope\n"),
            &format!("0::/system.slice/crio-conmon-{ID}.scope\n"),
            "",
        ] {
            assert_eq!(identity(text), Identity::default(), "{text}");
        }
    }

    #[test]
    fn cached_per_distinct_file() {
        let text = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(identity_cached(&text), identity(&text));
        assert_eq!(identity_cached(&text), identity(&text));
        CACHE.with_borrow(|c| assert!(c.contains_key(&text)));
    }
}
