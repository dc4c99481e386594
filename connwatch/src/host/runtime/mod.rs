//! The names of containers, from the runtime that made them, read-only over its local
//! socket: containerd's own API (every namespace, `k8s.io` among them, with the labels
//! the CRI gave each container) and the Docker Engine API. No Kubernetes API server is
//! needed: the kubelet's CRI labels on each container carry its pod, namespace and
//! container name.
//!
//! The cgroup path (`host::container`) says which container a process runs in; this
//! module says what the container is called. Names are asked for in a thread of their
//! own, so a slow or absent runtime never holds up events or reports: a lookup that
//! misses returns at once and queues the id; the thread lists the runtime's containers
//! (all of them, in one call, so a host's containers are named together): within
//! 200 ms of its last list for an id first wanted since, else at most once a second
//! while ids it did not list wait. A container started after connwatch is named by the
//! next report. podman's and CRI-O's containers are named from the files of the store
//! they share (`storage`), as no daemon need be running for them. A runtime that is
//! absent or refuses is said once on stderr; rows keep the ids.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use super::container::{Container, Runtime};

mod containerd;
mod docker;
mod storage;

/// What the runtime says about a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// The runtime's name for it: Docker's name; for a Kubernetes container, the name
    /// in its pod spec; nerdctl's name.
    pub name: Option<String>,
    /// Its pod, from the CRI's labels; `None` outside Kubernetes.
    pub k8s: Option<K8sNames>,
    /// The runtime that listed it (the kubelet's cgroupfs path names none: a pod's
    /// container there may be Docker's, through cri-dockerd).
    pub runtime: Option<Runtime>,
}

/// A container's place in Kubernetes, as the CRI labelled it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct K8sNames {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: Option<String>,
    /// `None` for the pod's sandbox (pause) container.
    pub container: Option<String>,
}

/// The labels the kubelet's CRI puts on every container it makes.
pub const POD_NAME: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const POD_UID: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// Adds one runtime's listing to what others said: a container two runtimes list (a
/// Docker container also sits, unlabelled, in containerd's `moby` namespace) keeps the
/// listing that names it.
pub fn merge(into: &mut HashMap<String, Names>, listed: HashMap<String, Names>) {
    for (id, names) in listed {
        match into.get(&id) {
            Some(have) if have.is_named() && !names.is_named() => {}
            _ => {
                into.insert(id, names);
            }
        }
    }
}

impl Names {
    /// Whether it says anything beyond the id.
    pub fn is_named(&self) -> bool {
        self.name.is_some() || self.k8s.is_some()
    }

    /// A container's names from the runtime's own name for it (if any) and its labels.
    /// The CRI labels name the pod whatever runtime ran it (containerd, or Docker
    /// through cri-dockerd).
    pub fn from_labels(name: Option<String>, labels: &HashMap<String, String>) -> Self {
        let label = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        let k8s = match (label(POD_NAMESPACE), label(POD_NAME)) {
            (Some(namespace), Some(pod)) => Some(K8sNames {
                namespace,
                pod,
                pod_uid: label(POD_UID),
                container: label(CONTAINER_NAME),
            }),
            _ => None,
        };
        let name = name
            .filter(|n| !n.is_empty())
            .or_else(|| k8s.as_ref().and_then(|k| k.container.clone()))
            .or_else(|| label("nerdctl/name"));
        Self {
            name,
            k8s,
            runtime: None,
        }
    }

    /// The same, as listed by `runtime`.
    pub fn listed_by(self, runtime: Runtime) -> Self {
        Self {
            runtime: Some(runtime),
            ..self
        }
    }
}

/// Containers and pods: which to report on (`--pod`, `--k8s-namespace`), and where the
/// runtimes that name them listen.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Containers and pods")]
pub struct RuntimeArgs {
    /// Only rows of this Kubernetes pod, by name (repeatable). Names come from the
    /// container runtime: a pod's rows appear once it has named the pod.
    #[arg(long, value_name = "NAME")]
    pub pod: Vec<String>,

    /// Only rows of pods in this Kubernetes namespace (repeatable).
    #[arg(long, value_name = "NS")]
    pub k8s_namespace: Vec<String>,

    /// containerd's API socket, asked for the names of containerd and Kubernetes
    /// containers (k3s: /run/k3s/containerd/containerd.sock).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,

    /// The Docker Engine API socket, asked for the names of Docker containers.
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,

    /// A directory of the container store podman and CRI-O share (containers/storage),
    /// read for the names of their containers (repeatable: the store's root and its run
    /// root). Default: `graphroot` and `runroot` of /etc/containers/storage.conf, else
    /// /var/lib/containers/storage and /run/containers/storage; and each user's rootless
    /// store (~/.local/share/containers/storage, /run/user/UID/containers).
    #[arg(long, value_name = "DIR")]
    pub containers_storage: Vec<PathBuf>,
}

/// One list call per runtime at most this often while ids it did not list wait for
/// names.
const MIN_GAP: Duration = Duration::from_secs(1);
/// An id wanted since a runtime's last list is asked for this soon after that list: a
/// container that just started is named by the next report, even while its runtime
/// is asked again and again for another id it does not know (a container gone, or
/// another runtime's).
const FRESH_GAP: Duration = Duration::from_millis(200);
/// How long an id is asked for before it counts as one its runtime does not know (a
/// container gone, or made by another runtime).
const GIVE_UP: Duration = Duration::from_secs(10);
/// After a runtime fails, how long before it is asked again.
const BACKOFF: Duration = Duration::from_secs(5);
/// How long one runtime may take to list its containers.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of each table (cleared when it grows past it: only a host churning through
/// thousands of containers reaches it).
const TABLE_MAX: usize = 8192;

#[derive(Default)]
struct Table {
    known: HashMap<String, Arc<Names>>,
    /// Ids asked for and not found yet: their runtime and when first asked.
    wanted: HashMap<String, (Runtime, Instant)>,
    /// Ids their runtime did not list within `GIVE_UP`.
    unknown: std::collections::HashSet<String>,
    /// Runtimes whose socket was not there at start, with the line that says so (said
    /// when one of their containers is first seen, by the thread that sees it).
    absent: HashMap<Runtime, String>,
    /// Runtimes already said on stderr to be out of reach.
    said: std::collections::HashSet<Runtime>,
}

impl Table {
    /// Says a runtime's trouble on stderr, once per runtime.
    fn say_once(&mut self, runtime: Runtime, line: &str) {
        if self.said.insert(runtime) {
            eprintln!("{line}");
        }
    }
}

/// The line that says a runtime cannot be asked, and what to do.
fn cannot_ask(runtime: Runtime, socket: &std::path::Path, error: &str) -> String {
    let flag = match runtime {
        Runtime::Docker => "--docker-socket",
        Runtime::CriO | Runtime::Podman => {
            return format!(
                "connwatch: cannot read the names of podman and CRI-O containers ({error}): rows keep container ids (give the container store's directories with --containers-storage)"
            );
        }
        _ => "--containerd-socket",
    };
    format!(
        "connwatch: cannot ask {} at {} for container names ({error}): rows keep container ids (give its socket with {flag})",
        runtime.as_str(),
        socket.display(),
    )
}

struct Resolver {
    table: Mutex<Table>,
    wake: Condvar,
    /// Set once the first listing of every runtime present is done.
    primed: Mutex<bool>,
    primed_cv: Condvar,
}

static RESOLVER: OnceLock<Arc<Resolver>> = OnceLock::new();

/// Starts asking the runtimes for names (once per process; later calls do nothing).
pub fn start(args: &RuntimeArgs) {
    let mut started = false;
    let resolver = RESOLVER.get_or_init(|| {
        started = true;
        Arc::new(Resolver {
            table: Mutex::new(Table::default()),
            wake: Condvar::new(),
            primed: Mutex::new(false),
            primed_cv: Condvar::new(),
        })
    });
    if started {
        let (resolver, args) = (resolver.clone(), args.clone());
        let spawned = std::thread::Builder::new()
            .name("runtime-names".into())
            .spawn(move || ask_loop(resolver, &args));
        if let Err(e) = spawned {
            eprintln!(
                "connwatch: cannot start asking container runtimes for names ({e}): rows keep container ids"
            );
        }
    }
}

/// Containers named so far (bounded by `TABLE_MAX`), for the report's footprint.
pub fn known_len() -> usize {
    RESOLVER
        .get()
        .and_then(|r| r.table.lock().ok().map(|t| t.known.len()))
        .unwrap_or(0)
}

/// Waits (up to `limit`) for the first listing of the runtimes present, so that a
/// one-shot report names the containers that already run.
pub fn wait_primed(limit: Duration) {
    let Some(resolver) = RESOLVER.get() else {
        return;
    };
    if let Ok(primed) = resolver.primed.lock() {
        let _ = resolver
            .primed_cv
            .wait_timeout_while(primed, limit, |p| !*p);
    }
}

/// The names of a container if its runtime has told them; else `None` at once, and the
/// id is asked for (names arrive by a later report). `None` too before `start`.
pub fn lookup(c: &Container) -> Option<Arc<Names>> {
    let resolver = RESOLVER.get()?;
    let mut t = resolver.table.lock().ok()?;
    if let Some(n) = t.known.get(&c.id) {
        return Some(n.clone());
    }
    if t.unknown.contains(&c.id) || t.wanted.contains_key(&c.id) {
        return None;
    }
    if let Some(line) = t.absent.get(&c.runtime).cloned() {
        t.say_once(c.runtime, &line);
    }
    if t.wanted.len() >= TABLE_MAX {
        t.wanted.clear();
    }
    t.wanted.insert(c.id.clone(), (c.runtime, Instant::now()));
    resolver.wake.notify_one();
    None
}

/// The thread that asks: waits for wanted ids, lists the runtimes they belong to.
fn ask_loop(resolver: Arc<Resolver>, args: &RuntimeArgs) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "connwatch: cannot ask container runtimes for names ({e}): rows keep container ids"
            );
            return;
        }
    };
    let mut asker = Asker::new(args, resolver.clone());
    // First, every runtime whose socket is there, before anything is wanted: the
    // containers already running are named by the first report.
    let primed = rt.block_on(asker.prime());
    if let Ok(mut t) = resolver.table.lock() {
        t.known
            .extend(primed.into_iter().map(|(id, n)| (id, Arc::new(n))));
    }
    if let Ok(mut p) = resolver.primed.lock() {
        *p = true;
        resolver.primed_cv.notify_all();
    }
    // When each runtime was last listed (the start of the call).
    let mut listed: HashMap<Runtime, Instant> = HashMap::new();
    loop {
        let Some(asking) = wait_due(&resolver, &listed) else {
            return;
        };
        let started = Instant::now();
        let (found, answered) = rt.block_on(asker.ask(&asking));
        for (_, runtime) in &asking {
            listed.insert(*runtime, started);
        }
        let Ok(mut t) = resolver.table.lock() else {
            return;
        };
        file_answers(&mut t, found, &answered);
    }
}

/// Waits until a wanted id's runtime is due to be listed (`due`); returns the wanted
/// ids of the runtimes due. `None` when the table is poisoned.
fn wait_due(
    resolver: &Resolver,
    listed: &HashMap<Runtime, Instant>,
) -> Option<Vec<(String, Runtime)>> {
    let mut t = resolver.table.lock().ok()?;
    loop {
        let now = Instant::now();
        let (ready, next) = due(t.wanted.values().copied(), listed, now);
        if !ready.is_empty() {
            let asking = t
                .wanted
                .iter()
                .filter(|(_, (r, _))| ready.contains(r))
                .map(|(id, (r, _))| (id.clone(), *r))
                .collect();
            return Some(asking);
        }
        t = match next {
            Some(at) => resolver.wake.wait_timeout(t, at - now).ok()?.0,
            None => resolver.wake.wait(t).ok()?,
        };
    }
}

/// Which runtimes of the wanted ids (runtime, wanted since) are due to be listed
/// at `now`, given when each was `listed` last; and, if none is, when the first will
/// be. A runtime never listed is due at once; one with an id wanted since its last
/// list, `FRESH_GAP` after that list; otherwise `MIN_GAP` after it.
fn due(
    wanted: impl Iterator<Item = (Runtime, Instant)>,
    listed: &HashMap<Runtime, Instant>,
    now: Instant,
) -> (Vec<Runtime>, Option<Instant>) {
    let (mut ready, mut next) = (Vec::new(), None::<Instant>);
    for (runtime, since) in wanted {
        let at = match listed.get(&runtime) {
            None => now,
            Some(&last) if since >= last => last + FRESH_GAP,
            Some(&last) => last + MIN_GAP,
        };
        if at <= now {
            if !ready.contains(&runtime) {
                ready.push(runtime);
            }
        } else {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    (ready, next)
}

/// The runtime whose listing holds a runtime's containers: podman's and CRI-O's are in
/// one store, listed once for both (as podman's).
fn listed_by(runtime: Runtime) -> Runtime {
    match runtime {
        Runtime::CriO => Runtime::Podman,
        r => r,
    }
}

/// Files what a round of lists found, and gives up on the ids that runtimes answered
/// without for `GIVE_UP`.
fn file_answers(
    t: &mut Table,
    found: HashMap<String, Names>,
    answered: &std::collections::HashSet<Runtime>,
) {
    if t.known.len() + found.len() > TABLE_MAX {
        t.known.clear();
    }
    for (id, names) in found {
        t.wanted.remove(&id);
        t.known.insert(id, Arc::new(names));
    }
    // Given up on only where the runtime answered without it: while a runtime cannot
    // be asked, its ids wait.
    let now = Instant::now();
    let expired: Vec<String> = t
        .wanted
        .iter()
        .filter(|(_, (runtime, asked))| {
            answered.contains(&listed_by(*runtime)) && now.duration_since(*asked) >= GIVE_UP
        })
        .map(|(id, _)| id.clone())
        .collect();
    if t.unknown.len() + expired.len() > TABLE_MAX {
        t.unknown.clear();
    }
    for id in expired {
        t.wanted.remove(&id);
        t.unknown.insert(id);
    }
}

/// The runtimes' clients, with what each has said.
struct Asker {
    containerd: PathBuf,
    docker: PathBuf,
    /// The container store's directories given (podman's and CRI-O's containers);
    /// empty for the defaults, found anew at each list (a user's rootless store may
    /// appear later).
    storage: Vec<PathBuf>,
    /// Runtimes that failed, and when they may be asked again.
    backoff: HashMap<Runtime, Instant>,
    /// Where failures are said (once per runtime, with the lookups' sayings).
    resolver: Arc<Resolver>,
}

impl Asker {
    fn new(args: &RuntimeArgs, resolver: Arc<Resolver>) -> Self {
        Self {
            containerd: args.containerd_socket.clone(),
            docker: args.docker_socket.clone(),
            storage: args.containers_storage.clone(),
            backoff: HashMap::new(),
            resolver,
        }
    }

    /// The container store's directories: those given, else the defaults as they are now.
    fn storage_dirs(&self) -> Vec<PathBuf> {
        if self.storage.is_empty() {
            storage::default_dirs()
        } else {
            self.storage.clone()
        }
    }

    /// Every container of the runtimes whose sockets are there (quietly: a runtime not
    /// running here is said only when one of its containers is seen).
    async fn prime(&mut self) -> HashMap<String, Names> {
        let mut found = HashMap::new();
        for (runtime, socket) in [
            (Runtime::Containerd, self.containerd.clone()),
            (Runtime::Docker, self.docker.clone()),
        ] {
            if !socket.exists() {
                if let Ok(mut t) = self.resolver.table.lock() {
                    t.absent
                        .insert(runtime, cannot_ask(runtime, &socket, "no socket there"));
                }
                continue;
            }
            if let Some(listed) = self.list(runtime, true).await {
                merge(&mut found, listed);
            }
        }
        // podman's and CRI-O's store, one listing for both.
        if self.storage_dirs().iter().any(|d| d.is_dir()) {
            if let Some(listed) = self.list(Runtime::Podman, true).await {
                merge(&mut found, listed);
            }
        } else if let Ok(mut t) = self.resolver.table.lock() {
            for runtime in [Runtime::Podman, Runtime::CriO] {
                let line = cannot_ask(runtime, Path::new(""), "no container store here");
                t.absent.insert(runtime, line);
            }
        }
        found
    }

    /// Lists every runtime that a wanted id belongs to and returns the names of every
    /// container listed. An id of the kubelet's cgroupfs layout is taken for a
    /// containerd one; where containerd does not know it, Docker is asked as well
    /// (cri-dockerd places Docker's containers the same way).
    /// Also returns the runtimes that answered (podman's store for CRI-O's ids too).
    async fn ask(
        &mut self,
        wanted: &[(String, Runtime)],
    ) -> (HashMap<String, Names>, std::collections::HashSet<Runtime>) {
        let mut found = HashMap::new();
        let mut asked = Vec::new();
        let mut answered = std::collections::HashSet::new();
        for runtime in [Runtime::Containerd, Runtime::Docker, Runtime::Podman] {
            if !wanted.iter().any(|(_, r)| listed_by(*r) == runtime) {
                continue;
            }
            if let Some(listed) = self.list(runtime, true).await {
                merge(&mut found, listed);
                answered.insert(runtime);
            }
            asked.push(runtime);
        }
        // Not listed, or listed without a name (cri-dockerd's containers sit unlabelled
        // in containerd's `moby` namespace, and the kubelet's cgroupfs path names no
        // runtime: its containers may be Docker's or, on a CRI-O node, in the store).
        for other in [Runtime::Docker, Runtime::Podman] {
            let missing = wanted
                .iter()
                .any(|(id, _)| !found.get(id).is_some_and(Names::is_named));
            let there = || match other {
                Runtime::Docker => self.docker.exists(),
                _ => self.storage_dirs().iter().any(|d| d.is_dir()),
            };
            if missing
                && !asked.contains(&other)
                && there()
                && let Some(listed) = self.list(other, false).await
            {
                merge(&mut found, listed);
            }
        }
        (found, answered)
    }

    /// One runtime's containers; `None` when it cannot be asked (said once on stderr
    /// when `say`).
    async fn list(&mut self, runtime: Runtime, say: bool) -> Option<HashMap<String, Names>> {
        if self
            .backoff
            .get(&runtime)
            .is_some_and(|t| Instant::now() < *t)
        {
            return None;
        }
        let timeout = LIST_TIMEOUT;
        let result = match runtime {
            Runtime::Containerd => {
                tokio::time::timeout(timeout, containerd::list(&self.containerd)).await
            }
            Runtime::Docker => tokio::time::timeout(timeout, docker::list(&self.docker)).await,
            // Files, read at once.
            Runtime::CriO | Runtime::Podman => Ok(storage::list(&self.storage_dirs())),
        };
        let error = match result {
            Ok(Ok(listed)) => {
                self.backoff.remove(&runtime);
                return Some(listed);
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {}s", timeout.as_secs()),
        };
        self.backoff.insert(runtime, Instant::now() + BACKOFF);
        if say && let Ok(mut t) = self.resolver.table.lock() {
            let socket = match runtime {
                Runtime::Docker => &self.docker,
                _ => &self.containerd,
            };
            t.say_once(runtime, &cannot_ask(runtime, socket, &error));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_labels_name_the_pod() {
        let l = labels(&[
            (POD_NAME, "checkout-7f9c"),
            (POD_NAMESPACE, "shop"),
            (POD_UID, "12345678-9abc-def0-1234-56789abcdef0"),
            (CONTAINER_NAME, "app"),
        ]);
        let n = Names::from_labels(None, &l);
        assert_eq!(n.name.as_deref(), Some("app"));
        let k = n.k8s.unwrap();
        assert_eq!(
            (k.namespace.as_str(), k.pod.as_str(), k.container.as_deref()),
            ("shop", "checkout-7f9c", Some("app"))
        );
        assert_eq!(
            k.pod_uid.as_deref(),
            Some("12345678-9abc-def0-1234-56789abcdef0")
        );
    }

    #[test]
    fn outside_kubernetes_only_the_runtimes_name() {
        let compose = labels(&[("com.docker.compose.service", "web")]);
        let n = Names::from_labels(Some("shop-web-1".into()), &compose);
        assert_eq!((n.name.as_deref(), n.k8s), (Some("shop-web-1"), None));
        // A pod name without its namespace is not a place in Kubernetes.
        let half = labels(&[(POD_NAME, "x")]);
        assert_eq!(Names::from_labels(None, &half), Names::default());
        let nerdctl = labels(&[("nerdctl/name", "db")]);
        assert_eq!(
            Names::from_labels(None, &nerdctl).name.as_deref(),
            Some("db")
        );
    }

    #[test]
    fn the_listing_that_names_a_container_wins() {
        let pod = labels(&[(POD_NAME, "p"), (POD_NAMESPACE, "ns")]);
        let named = Names::from_labels(Some("web".into()), &pod);
        let mut found = HashMap::from([("a".to_string(), named.clone())]);
        // containerd's unlabelled copy after Docker's named one, and before.
        merge(
            &mut found,
            HashMap::from([("a".to_string(), Names::default())]),
        );
        assert_eq!(found["a"], named);
        let mut found = HashMap::from([("a".to_string(), Names::default())]);
        merge(
            &mut found,
            HashMap::from([("a".to_string(), named.clone())]),
        );
        assert_eq!(found["a"], named);
        assert!(!Names::default().is_named());
    }

    #[test]
    fn a_new_id_is_asked_soon_and_one_not_listed_once_a_second() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ready =
            |wanted: &[(Runtime, Instant)], listed, now| due(wanted.iter().copied(), listed, now);
        // Never listed: at once.
        let none = HashMap::new();
        let (r, next) = ready(&[(Runtime::Containerd, at(0))], &none, at(0));
        assert_eq!((r, next), (vec![Runtime::Containerd], None));
        // Listed at 100 ms without "a" (wanted since 0): again at 1.1 s, not before.
        let listed = HashMap::from([(Runtime::Containerd, at(100))]);
        let old = (Runtime::Containerd, at(0));
        assert_eq!(ready(&[old], &listed, at(500)), (vec![], Some(at(1100))));
        assert_eq!(
            ready(&[old], &listed, at(1100)).0,
            vec![Runtime::Containerd]
        );
        // "b", wanted after that list: 200 ms after it, whatever "a" waits for.
        let new = (Runtime::Containerd, at(400));
        assert_eq!(
            ready(&[old, new], &listed, at(250)),
            (vec![], Some(at(300)))
        );
        assert_eq!(
            ready(&[old, new], &listed, at(450)).0,
            vec![Runtime::Containerd]
        );
        // Another runtime's gap does not hold Docker's first id.
        let docker = (Runtime::Docker, at(400));
        assert_eq!(
            ready(&[old, docker], &listed, at(450)),
            (vec![Runtime::Docker], Some(at(1100)))
        );
    }

    #[test]
    fn a_sandbox_names_its_pod_not_a_container() {
        let l = labels(&[(POD_NAME, "p"), (POD_NAMESPACE, "ns")]);
        let n = Names::from_labels(None, &l);
        assert_eq!(n.name, None);
        assert_eq!(n.k8s.unwrap().container, None);
    }
}
