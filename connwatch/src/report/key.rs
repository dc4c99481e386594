//! What a report row stands for: a process, a command (all its workers), a systemd
//! unit / container named by the cgroup v2 path, a Kubernetes pod or a container
//! (`--by`).
use clap::ValueEnum;

use crate::host::owners::ProcInfo;

/// How report rows are grouped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum GroupBy {
    /// One row per process.
    #[default]
    Process,
    /// One row per command name (comm): all workers of a program together.
    Command,
    /// One row per systemd unit or container (from the cgroup v2 path), else per cgroup.
    Unit,
    /// One row per Kubernetes pod (all its containers together); a process outside
    /// pods, one row per command.
    Pod,
    /// One row per container (its processes together); a process outside containers,
    /// one row per command.
    Container,
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Command => "command",
            Self::Unit => "unit",
            Self::Pod => "pod",
            Self::Container => "container",
        }
    }
}

/// What a row stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupKey {
    Pid(u32),
    /// A command, in one container (`None`: on the host): the same program in a hundred
    /// pods is a hundred rows.
    Comm(String, Option<String>),
    Unit(String),
    /// A pod, by uid.
    Pod(String),
    /// A container, by id.
    Container(String),
}

/// The comm of a process: from /proc while it lives, else what the probe saw.
pub(super) fn comm_of(
    pid: u32,
    seen: Option<&str>,
    procs: &std::collections::HashMap<u32, ProcInfo>,
) -> String {
    procs
        .get(&pid)
        .map(|i| i.comm.clone())
        .or_else(|| seen.map(String::from))
        .unwrap_or_else(|| "?".into())
}

/// The row a process belongs to. `comm` is what the probe saw, for a process gone from
/// /proc.
pub(super) fn key_of(
    pid: u32,
    by: GroupBy,
    procs: &std::collections::HashMap<u32, ProcInfo>,
    comm: Option<&str>,
) -> GroupKey {
    match by {
        GroupBy::Process => GroupKey::Pid(pid),
        GroupBy::Command => command_key(pid, comm, procs),
        GroupBy::Unit => GroupKey::Unit(
            procs
                .get(&pid)
                .and_then(|i| i.cgroup.as_deref())
                .map_or_else(|| "?".into(), unit_of),
        ),
        GroupBy::Pod => procs
            .get(&pid)
            .and_then(|i| {
                i.pod_uid()
                    .map(String::from)
                    .or_else(|| i.pod().map(|k| format!("{}/{}", k.namespace, k.pod)))
            })
            .map_or_else(|| command_key(pid, comm, procs), GroupKey::Pod),
        GroupBy::Container => procs.get(&pid).and_then(|i| i.container_id()).map_or_else(
            || command_key(pid, comm, procs),
            |id| GroupKey::Container(id.to_string()),
        ),
    }
}

fn command_key(
    pid: u32,
    comm: Option<&str>,
    procs: &std::collections::HashMap<u32, ProcInfo>,
) -> GroupKey {
    let container = procs
        .get(&pid)
        .and_then(|i| i.container_id())
        .map(String::from);
    GroupKey::Comm(comm_of(pid, comm, procs), container)
}

/// The holders of one socket that count it: all of them per process (a socket shared
/// after fork is held by each), but one per row when rows group processes, so that a
/// group counts each socket once.
pub(super) fn counting_holders<'a>(
    holders: &'a [u32],
    by: GroupBy,
    procs: &std::collections::HashMap<u32, ProcInfo>,
) -> std::borrow::Cow<'a, [u32]> {
    if by == GroupBy::Process || holders.len() < 2 {
        return std::borrow::Cow::Borrowed(holders);
    }
    let mut seen: Vec<GroupKey> = Vec::with_capacity(holders.len());
    let mut kept = Vec::with_capacity(holders.len());
    for &pid in holders {
        let key = key_of(pid, by, procs, None);
        if !seen.contains(&key) {
            seen.push(key);
            kept.push(pid);
        }
    }
    std::borrow::Cow::Owned(kept)
}

/// The unit a cgroup v2 path names: a systemd service or scope (`nginx.service`,
/// `docker-<id>.scope`, `cri-containerd-<id>.scope`), a Kubernetes pod
/// (`kubepods-besteffort-pod<uid>.slice`), else the path itself.
pub fn unit_of(cgroup: &str) -> String {
    let parts: Vec<&str> = cgroup.split('/').filter(|p| !p.is_empty()).collect();
    // The innermost service or scope names the container or service; a pod is the
    // innermost `-pod….slice` when its containers are not told apart.
    if let Some(unit) = parts
        .iter()
        .rev()
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
    {
        return (*unit).to_string();
    }
    if let Some(pod) = parts
        .iter()
        .rev()
        .find(|p| p.contains("-pod") && p.ends_with(".slice"))
    {
        return (*pod).to_string();
    }
    if cgroup.is_empty() {
        "/".into()
    } else {
        cgroup.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_from_cgroup_paths() {
        assert_eq!(unit_of("/system.slice/nginx.service"), "nginx.service");
        assert_eq!(
            unit_of("/system.slice/docker-0123abcd.scope"),
            "docker-0123abcd.scope"
        );
        assert_eq!(
            unit_of(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_34.slice/cri-containerd-aa.scope"
            ),
            "cri-containerd-aa.scope"
        );
        assert_eq!(
            unit_of("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9.slice"),
            "kubepods-burstable-pod9.slice"
        );
        assert_eq!(
            unit_of("/user.slice/user-0.slice/session-3.scope"),
            "session-3.scope"
        );
        assert_eq!(unit_of("/custom/leaky"), "/custom/leaky");
        assert_eq!(unit_of("/"), "/");
    }
}
