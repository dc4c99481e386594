//! podman's and CRI-O's containers, from the files of `containers/storage`, the store
//! both keep their containers in (with buildah's): each driver's
//! `<driver>-containers/containers.json` under the store's root, and
//! `volatile-containers.json` (containers that do not outlive a reboot, as CRI-O makes
//! them) beside it, or under the run root where the store is transient. Both files
//! are read under every directory given. No daemon to ask: podman has none by default, and CRI-O's CRI socket would
//! need a gRPC client of its own for what these files already say.
//!
//! A container's first name is its name. CRI-O names each container the way the
//! kubelet's dockershim did, `k8s_<container>_<pod>_<namespace>_<pod uid>_<attempt>`
//! (`k8s_POD_…` for the pod's sandbox), and none of those parts can hold `_` (they are
//! DNS names and a UID), so the name gives the pod.
//!
//! Root's store is read, and each user's where rootless podman made one.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};
use serde::Deserialize;

use super::{K8sNames, Names};

/// The store's roots when `/etc/containers/storage.conf` names none: root's podman and
/// CRI-O defaults.
const GRAPHROOT: &str = "/var/lib/containers/storage";
const RUNROOT: &str = "/run/containers/storage";
const CONF: &str = "/etc/containers/storage.conf";

#[derive(Deserialize)]
struct Stored {
    id: String,
    #[serde(default)]
    names: Vec<String>,
}

/// The store's directories: `graphroot` and `runroot` of storage.conf's `[storage]`
/// table, each defaulting to root's; and those of rootless podman's users.
pub fn default_dirs() -> Vec<PathBuf> {
    let conf = std::fs::read_to_string(CONF).unwrap_or_default();
    let mut dirs = vec![
        conf_value(&conf, "graphroot").map_or_else(|| PathBuf::from(GRAPHROOT), PathBuf::from),
        conf_value(&conf, "runroot").map_or_else(|| PathBuf::from(RUNROOT), PathBuf::from),
    ];
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    dirs.extend(rootless_dirs(&passwd, Path::new("/run/user")));
    dirs
}

/// Rootless podman's stores: each user's `graphroot` (their own storage.conf's, else
/// `~/.local/share/containers/storage`) and run root (`/run/user/UID/containers`), where
/// they exist.
fn rootless_dirs(passwd: &str, run_user: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(uid), Some(home)) = (fields.get(2), fields.get(5)) else {
            continue;
        };
        if *uid == "0" || home.is_empty() {
            continue;
        }
        let home = Path::new(home);
        let conf = std::fs::read_to_string(home.join(".config/containers/storage.conf"))
            .unwrap_or_default();
        let graph = conf_value(&conf, "graphroot").map_or_else(
            || home.join(".local/share/containers/storage"),
            PathBuf::from,
        );
        let run = run_user.join(uid).join("containers");
        dirs.extend([graph, run].into_iter().filter(|d| d.is_dir()));
    }
    dirs
}

/// A quoted string `key = "value"` of storage.conf's `[storage]` table.
fn conf_value(conf: &str, key: &str) -> Option<String> {
    let mut table = "";
    for line in conf.lines().map(str::trim) {
        if line.starts_with('[') {
            table = line;
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if table == "[storage]" && k.trim() == key {
            let v = v.trim().trim_matches('"');
            return (!v.is_empty()).then(|| v.to_string());
        }
    }
    None
}

/// Every container the store's files under `dirs` hold, by id. An error only when
/// none of the directories exists.
pub(super) fn list(dirs: &[PathBuf]) -> Result<HashMap<String, Names>> {
    if !dirs.iter().any(|d| d.is_dir()) {
        let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        bail!("no container store at {}", shown.join(" or "));
    }
    let mut names = HashMap::new();
    for file in dirs.iter().flat_map(|d| files(d)) {
        // A file being rewritten (the store replaces it whole) is read at the next list.
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let Ok(stored) = serde_json::from_slice::<Vec<Stored>>(&bytes) else {
            log::debug!("{}: not a container list", file.display());
            continue;
        };
        for c in stored {
            let named = c.names.first().map(|n| from_name(n)).unwrap_or_default();
            names.insert(c.id, named);
        }
    }
    Ok(names)
}

/// The container lists of each storage driver under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("-containers"))
        .flat_map(|e| ["containers.json", "volatile-containers.json"].map(|f| e.path().join(f)))
        .filter(|f| f.is_file())
        .collect()
}

/// A container's names from its name in the store: the pod's where it is a CRI-O
/// one. No runtime is set: the store is shared, and the cgroup path tells podman's
/// containers from CRI-O's.
fn from_name(name: &str) -> Names {
    let parts: Vec<&str> = name.split('_').collect();
    if let ["k8s", container, pod, namespace, uid, attempt] = *parts.as_slice()
        && [container, pod, namespace, uid]
            .iter()
            .all(|p| !p.is_empty())
        && attempt.parse::<u32>().is_ok()
    {
        let container = (container != "POD").then(|| container.to_string());
        return Names {
            name: container.clone(),
            k8s: Some(K8sNames {
                namespace: namespace.into(),
                pod: pod.into(),
                pod_uid: Some(uid.into()),
                container,
            }),
            runtime: None,
        };
    }
    Names {
        name: (!name.is_empty()).then(|| name.to_string()),
        k8s: None,
        runtime: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cri_o_name_gives_the_pod() {
        let n = from_name("k8s_app_checkout-7f9c_shop_0f3c2a1e-1111-2222-3333-444455556666_2");
        assert_eq!(n.name.as_deref(), Some("app"));
        assert_eq!(
            n.k8s,
            Some(K8sNames {
                namespace: "shop".into(),
                pod: "checkout-7f9c".into(),
                pod_uid: Some("0f3c2a1e-1111-2222-3333-444455556666".into()),
                container: Some("app".into()),
            })
        );
        let sandbox = from_name("k8s_POD_checkout-7f9c_shop_uid_0");
        assert_eq!(sandbox.name, None);
        assert_eq!(
            sandbox.k8s.map(|k| (k.pod, k.container)),
            Some(("checkout-7f9c".into(), None))
        );
    }

    #[test]
    fn other_names_are_only_names() {
        for name in [
            "web-1",
            "k8s_app_pod_ns_uid",
            "k8s_app_pod_ns_uid_x",
            "k8s__pod_ns_uid_0",
        ] {
            let n = from_name(name);
            assert_eq!((n.name.as_deref(), n.k8s), (Some(name), None), "{name}");
        }
    }

    #[test]
    fn storage_conf_roots() {
        let conf = "[storage]\ndriver = \"overlay\"\nrunroot = \"/run/x\"\ngraphroot = \"/srv/containers\"\n[storage.options]\ngraphroot = \"/not/this\"\n";
        assert_eq!(
            conf_value(conf, "graphroot").as_deref(),
            Some("/srv/containers")
        );
        assert_eq!(conf_value(conf, "runroot").as_deref(), Some("/run/x"));
        assert_eq!(conf_value("", "graphroot"), None);
    }

    #[test]
    fn rootless_stores_of_users_that_have_one() {
        let root = std::env::temp_dir().join(format!("cw-rootless-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (alice, bob, run) = (root.join("alice"), root.join("bob"), root.join("run"));
        std::fs::create_dir_all(alice.join(".local/share/containers/storage")).unwrap();
        std::fs::create_dir_all(bob.join(".config/containers")).unwrap();
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        let conf = format!(
            "[storage]\ngraphroot = \"{}\"\n",
            root.join("elsewhere").display()
        );
        std::fs::write(bob.join(".config/containers/storage.conf"), conf).unwrap();
        std::fs::create_dir_all(run.join("1000/containers")).unwrap();
        let passwd = format!(
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::{}:/bin/sh\nbob:x:1001:1001::{}:/bin/sh\ncarol:x:1002:1002::{}:/bin/sh\nbroken\n",
            alice.display(),
            bob.display(),
            root.join("carol").display(),
        );
        let dirs = rootless_dirs(&passwd, &run);
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            dirs,
            [
                alice.join(".local/share/containers/storage"),
                run.join("1000/containers"),
                root.join("elsewhere"),
            ]
        );
    }

    #[test]
    fn lists_every_driver_and_the_volatile_file() {
        let root = std::env::temp_dir().join(format!("cw-storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (graph, run) = (root.join("graph"), root.join("run"));
        std::fs::create_dir_all(graph.join("overlay-containers")).unwrap();
        std::fs::create_dir_all(graph.join("vfs-containers")).unwrap();
        std::fs::create_dir_all(run.join("overlay-containers")).unwrap();
        std::fs::write(
            graph.join("overlay-containers/containers.json"),
            r#"[{"id":"aa","names":["web"],"image":"i","layer":"l"}]"#,
        )
        .unwrap();
        std::fs::write(
            graph.join("vfs-containers/containers.json"),
            r#"[{"id":"bb","names":[]}]"#,
        )
        .unwrap();
        std::fs::write(
            run.join("overlay-containers/volatile-containers.json"),
            r#"[{"id":"cc","names":["k8s_app_p_ns_u_0"]}]"#,
        )
        .unwrap();
        let listed = list(&[graph, run]).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(listed["aa"].name.as_deref(), Some("web"));
        assert!(!listed["bb"].is_named());
        assert_eq!(listed["cc"].k8s.as_ref().map(|k| k.pod.as_str()), Some("p"));
        assert!(list(&[root.join("absent")]).is_err());
    }
}
