//! `--pid`, `--port`, `--family`, `--cgroup`: applied in the kernel (load-time globals,
//! so unwanted events never reach userspace) and to what sock_diag adds in userspace.
//! `--pod` and `--k8s-namespace` in userspace: a pod's name is the runtime's to tell,
//! and may be told after its first sockets (narrow the kernel's share with `--cgroup`
//! on the pod's cgroup v2 directory).
use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};

use crate::host::{
    cgroup::{cgroup2_root, is_cgroup2, parse_cgroup},
    container::identity_cached,
    runtime::{self, RuntimeArgs},
};
use clap::{Args, ValueEnum};
use connwatch_common::{AF_INET, AF_INET6, FILTER_MAX};

/// Which sockets and processes to look at. In the kernel for the probe's events; the
/// same conditions apply to what sock_diag and /proc add.
#[derive(Clone, Debug, Default, Args)]
pub struct FilterArgs {
    /// Only sockets owned by this process (repeatable, up to 8). A socket accepted by a
    /// server matches through the process listening on its port.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Vec<u32>,

    /// Only sockets with this local or remote port (repeatable, up to 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,

    /// Only IPv4 or only IPv6 sockets.
    #[arg(long, value_enum)]
    pub family: Option<Family>,

    /// Only sockets created in this cgroup v2 (a directory under /sys/fs/cgroup, or a
    /// path relative to it), and processes in it.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Family {
    Ipv4,
    Ipv6,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub family: Option<Family>,
    /// cgroup path relative to the cgroup2 root (as in /proc/PID/cgroup) and its id.
    pub cgroup: Option<(String, u64)>,
    /// `--pod` names and `--k8s-namespace` namespaces.
    pub pods: Vec<String>,
    pub k8s_namespaces: Vec<String>,
}

/// Whether a workload is selected, as far as the runtime has said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Yes,
    No,
    /// In a container the runtime has not named yet.
    Unknown,
}

impl Filter {
    /// Validates the flags against the running system.
    pub fn from_args(args: &FilterArgs) -> Result<Self> {
        if args.pid.len() > FILTER_MAX || args.port.len() > FILTER_MAX {
            bail!("at most {FILTER_MAX} --pid and {FILTER_MAX} --port values are supported");
        }
        for pid in &args.pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                bail!(
                    "no process with pid {pid}: check it with `ps -p {pid}` (or find it with pgrep)"
                );
            }
        }
        let cgroup = args.cgroup.as_deref().map(cgroup_id).transpose()?;
        Ok(Self {
            pids: args.pid.clone(),
            ports: args.port.clone(),
            family: args.family,
            cgroup,
            ..Self::default()
        })
    }

    /// With `--pod` and `--k8s-namespace`.
    pub fn with_workloads(mut self, runtime: &RuntimeArgs) -> Self {
        self.pods.clone_from(&runtime.pod);
        self.k8s_namespaces.clone_from(&runtime.k8s_namespace);
        self
    }

    /// `--pod`/`--k8s-namespace` on a process's pod (`(namespace, pod)`, as the
    /// runtime named it), `in_container` telling whether it runs in a container at all.
    pub fn workload(&self, pod: Option<(&str, &str)>, in_container: bool) -> Verdict {
        if self.pods.is_empty() && self.k8s_namespaces.is_empty() {
            return Verdict::Yes;
        }
        match pod {
            Some((namespace, pod)) => {
                let pod_ok = self.pods.is_empty() || self.pods.iter().any(|p| p == pod);
                let ns_ok = self.k8s_namespaces.is_empty()
                    || self.k8s_namespaces.iter().any(|n| n == namespace);
                if pod_ok && ns_ok {
                    Verdict::Yes
                } else {
                    Verdict::No
                }
            }
            None if in_container => Verdict::Unknown,
            None => Verdict::No,
        }
    }

    pub fn kernel(&self) -> connwatch_common::Filter {
        let mut f = connwatch_common::Filter {
            family: match self.family {
                Some(Family::Ipv4) => AF_INET,
                Some(Family::Ipv6) => AF_INET6,
                None => 0,
            },
            nports: self.ports.len() as u16,
            npids: self.pids.len() as u16,
            cgroup_id: self.cgroup.as_ref().map_or(0, |(_, id)| *id),
            ..Default::default()
        };
        for (slot, port) in f.ports.iter_mut().zip(&self.ports) {
            *slot = *port;
        }
        for (slot, pid) in f.pids.iter_mut().zip(&self.pids) {
            *slot = *pid;
        }
        f
    }

    /// Family and port conditions on a socket.
    pub fn socket(&self, local: &SocketAddr, remote: &SocketAddr) -> bool {
        let family_ok = match self.family {
            Some(Family::Ipv4) => local.is_ipv4(),
            Some(Family::Ipv6) => local.is_ipv6(),
            None => true,
        };
        let port_ok = self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|p| *p == local.port() || *p == remote.port());
        family_ok && port_ok
    }

    /// Pid and cgroup conditions on a process (`cgroup` as in /proc/PID/cgroup).
    pub fn process(&self, pid: u32, cgroup: Option<&str>) -> bool {
        let pid_ok = self.pids.is_empty() || self.pids.contains(&pid);
        let cgroup_ok = self
            .cgroup
            .as_ref()
            .is_none_or(|(path, _)| cgroup == Some(path.as_str()));
        pid_ok && cgroup_ok
    }

    /// Whether rows must be checked with `process` (pid, cgroup or pod conditions).
    pub fn selects_processes(&self) -> bool {
        !self.pids.is_empty()
            || self.cgroup.is_some()
            || !self.pods.is_empty()
            || !self.k8s_namespaces.is_empty()
    }
}

/// `Filter::process` asked of live processes by pid (their cgroup read from /proc),
/// each pid answered once: a dump or a table asks it of every socket.
pub struct Selection<'a> {
    filter: &'a Filter,
    verdicts: std::collections::HashMap<u32, bool>,
}

impl<'a> Selection<'a> {
    pub fn new(filter: &'a Filter) -> Self {
        Self {
            filter,
            verdicts: std::collections::HashMap::new(),
        }
    }

    /// Whether a live process is selected; one in a container not named yet is kept
    /// (its sockets are followed until the runtime says whose they are; its rows wait
    /// for the name).
    pub fn pid(&mut self, pid: u32) -> bool {
        let filter = self.filter;
        *self.verdicts.entry(pid).or_insert_with(|| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let in_cgroup = filter.process(pid, parse_cgroup(&text).as_deref());
            if !in_cgroup || (filter.pods.is_empty() && filter.k8s_namespaces.is_empty()) {
                return in_cgroup;
            }
            let identity = identity_cached(&text);
            let names = identity.container.as_ref().and_then(runtime::lookup);
            let pod = names
                .as_ref()
                .and_then(|n| n.k8s.as_ref())
                .map(|k| (k.namespace.as_str(), k.pod.as_str()));
            filter.workload(pod, identity.container.is_some()) != Verdict::No
        })
    }

    /// Whether any of a socket's holders is selected.
    pub fn any(&mut self, holders: &[u32]) -> bool {
        holders.iter().any(|&pid| self.pid(pid))
    }
}

/// A cgroup v2 directory (absolute, or relative to the cgroup2 mount) → (path as
/// /proc/PID/cgroup spells it, id). The id of a cgroup v2 is its directory's inode.
fn cgroup_id(arg: &Path) -> Result<(String, u64)> {
    let root = cgroup2_root();
    let full: PathBuf = if arg.is_absolute() {
        arg.to_path_buf()
    } else {
        root.join(arg)
    };
    let Ok(meta) = std::fs::metadata(&full) else {
        bail!(
            "no cgroup at {}: give a cgroup v2 directory, e.g. {}/system.slice/nginx.service",
            full.display(),
            root.display()
        );
    };
    if !meta.is_dir() || !is_cgroup2(&full) {
        bail!(
            "{} is not a cgroup v2 directory: --cgroup needs the unified hierarchy under {}",
            full.display(),
            root.display()
        );
    }
    let rel = full
        .strip_prefix(&root)
        .map(|r| format!("/{}", r.display()))
        .unwrap_or_else(|_| full.display().to_string());
    let rel = if rel == "/" {
        rel
    } else {
        rel.trim_end_matches('/').to_string()
    };
    Ok((rel, meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::cgroup::{cgroup_of, parse_cgroup};

    fn filter() -> Filter {
        Filter {
            pids: vec![42],
            ports: vec![8080],
            family: Some(Family::Ipv4),
            cgroup: Some(("/system.slice/x.service".into(), 77)),
            ..Filter::default()
        }
    }

    #[test]
    fn socket_conditions() {
        let f = filter();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(f.socket(&a("127.0.0.1:8080"), &a("127.0.0.1:40000")));
        assert!(f.socket(&a("127.0.0.1:40000"), &a("127.0.0.1:8080")));
        assert!(!f.socket(&a("127.0.0.1:40000"), &a("127.0.0.1:9090")));
        assert!(!f.socket(&a("[::1]:8080"), &a("[::1]:40000")));
        assert!(Filter::default().socket(&a("[::1]:1"), &a("[::1]:2")));
    }

    #[test]
    fn process_conditions() {
        let f = filter();
        assert!(f.process(42, Some("/system.slice/x.service")));
        assert!(!f.process(43, Some("/system.slice/x.service")));
        assert!(!f.process(42, Some("/user.slice")));
        assert!(!f.process(42, None));
        assert!(Filter::default().process(1, None));
    }

    #[test]
    fn pods_and_namespaces() {
        let k = |ns, pod| (ns, pod);
        let none = Filter::default();
        assert_eq!(none.workload(None, false), Verdict::Yes);
        let f = Filter {
            pods: vec!["checkout".into()],
            k8s_namespaces: vec!["shop".into()],
            ..Filter::default()
        };
        assert!(f.selects_processes());
        assert_eq!(f.workload(Some(k("shop", "checkout")), true), Verdict::Yes);
        assert_eq!(f.workload(Some(k("dev", "checkout")), true), Verdict::No);
        assert_eq!(f.workload(Some(k("shop", "cart")), true), Verdict::No);
        // Not named yet: kept until the runtime says; a host process never matches.
        assert_eq!(f.workload(None, true), Verdict::Unknown);
        assert_eq!(f.workload(None, false), Verdict::No);
        let ns_only = Filter {
            k8s_namespaces: vec!["shop".into()],
            ..Filter::default()
        };
        assert_eq!(ns_only.workload(Some(k("shop", "any")), true), Verdict::Yes);
    }

    #[test]
    fn kernel_form() {
        let k = filter().kernel();
        assert_eq!(
            (k.family, k.nports, k.npids, k.cgroup_id),
            (AF_INET, 1, 1, 77)
        );
        assert_eq!((k.ports[0], k.pids[0]), (8080, 42));
        assert_eq!(
            Filter::default().kernel(),
            connwatch_common::Filter::default()
        );
    }

    #[test]
    fn validation_and_cgroups() {
        let mut args = FilterArgs {
            pid: vec![u32::MAX - 1],
            ..Default::default()
        };
        let err = Filter::from_args(&args).unwrap_err().to_string();
        assert!(err.contains("no process with pid"), "{err}");
        args.pid = vec![std::process::id()];
        assert!(Filter::from_args(&args).is_ok());
        args.cgroup = Some("/no/such/cgroup".into());
        assert!(
            Filter::from_args(&args)
                .unwrap_err()
                .to_string()
                .contains("no cgroup")
        );
        args.cgroup = Some("/tmp".into());
        assert!(
            Filter::from_args(&args)
                .unwrap_err()
                .to_string()
                .contains("not a cgroup v2")
        );
        let mine = cgroup_of(std::process::id()).unwrap();
        args.cgroup = Some(PathBuf::from(format!("{}{mine}", cgroup2_root().display())));
        let f = Filter::from_args(&args).unwrap();
        assert_eq!(f.cgroup.as_ref().unwrap().0, mine);
        assert!(f.process(std::process::id(), Some(&mine)));
        assert_eq!(parse_cgroup("0::/a/b\n"), Some("/a/b".into()));
    }
}
