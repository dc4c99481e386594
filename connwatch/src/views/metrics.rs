//! Prometheus exposition of the report (`connwatch serve`), through prometheus-client.
//!
//! Cardinality stays bounded over weeks: per-process series exist only for the top-K
//! processes of the latest report (the rest are summed under `comm="other"`), and the
//! per-process families are rebuilt at every refresh, so a process that went away loses
//! its series. Counters and lifetime histograms persist across refreshes.
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::report::{ProcessRow, Report};

type Labels = Vec<(String, String)>;

/// Lifetime buckets (seconds): from sub-second closes to hour-long leaks.
const LIFETIME_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 61.0, 120.0, 600.0, 3600.0,
];

/// Metrics that live as long as the process.
pub struct Persistent {
    events: Counter,
    dropped: Counter,
    untracked: Counter,
    stacks_dropped: Counter,
    poll_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    close_wait_lifetime: Histogram,
    time_wait_lifetime: Histogram,
    last: Totals,
}

impl Default for Persistent {
    fn default() -> Self {
        Self {
            events: Counter::default(),
            dropped: Counter::default(),
            untracked: Counter::default(),
            stacks_dropped: Counter::default(),
            poll_seconds: Counter::default(),
            close_wait_lifetime: Histogram::new(LIFETIME_BUCKETS),
            time_wait_lifetime: Histogram::new(LIFETIME_BUCKETS),
            last: Totals::default(),
        }
    }
}

/// Running totals handed in at each refresh (counters follow them).
#[derive(Clone, Copy, Default)]
pub struct Totals {
    pub events: u64,
    pub dropped: u64,
    pub untracked: u64,
    pub stacks_dropped: u64,
    pub poll_ns: u64,
}

impl Persistent {
    pub fn update(
        &mut self,
        t: &Totals,
        close_wait_lifetimes: &[f64],
        time_wait_lifetimes: &[f64],
    ) {
        let last = self.last;
        self.events.inc_by(t.events.saturating_sub(last.events));
        self.dropped.inc_by(t.dropped.saturating_sub(last.dropped));
        self.untracked
            .inc_by(t.untracked.saturating_sub(last.untracked));
        self.stacks_dropped
            .inc_by(t.stacks_dropped.saturating_sub(last.stacks_dropped));
        self.poll_seconds
            .inc_by(t.poll_ns.saturating_sub(last.poll_ns) as f64 / 1e9);
        self.last = *t;
        for &s in close_wait_lifetimes {
            self.close_wait_lifetime.observe(s);
        }
        for &s in time_wait_lifetimes {
            self.time_wait_lifetime.observe(s);
        }
    }
}

/// Renders one scrape: the report's gauges for the top `top` processes, plus the
/// persistent counters and histograms.
pub fn render(report: &Report, persistent: &Persistent, top: usize, cgroup_label: bool) -> String {
    let mut registry = Registry::default();
    register_states(&mut registry, report);
    register_processes(&mut registry, report, top, cgroup_label);
    register_unattributed(&mut registry, report);
    register_persistent(&mut registry, persistent);
    register_footprint(&mut registry, report);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    to_text_format(&out)
}

fn register_states(registry: &mut Registry, report: &Report) {
    let states = Family::<Labels, Gauge>::default();
    for (state, n) in &report.states {
        states
            .get_or_create(&vec![("state".into(), state.clone())])
            .set(*n as i64);
    }
    registry.register(
        "connwatch_sockets",
        "TCP sockets on the machine by state (every network namespace)",
        states,
    );
}

/// Per-process gauges for the top `top` processes (flagged first, then by sockets), the
/// rest summed as `comm="other"`; unattributed sockets.
fn register_processes(registry: &mut Registry, report: &Report, top: usize, cgroup_label: bool) {
    let close_wait = Family::<Labels, Gauge>::default();
    let oldest = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let time_wait = Family::<Labels, Gauge>::default();
    let fin_wait2 = Family::<Labels, Gauge>::default();
    let flagged = Family::<Labels, Gauge>::default();
    // The report lists flagged processes first, then by CLOSE_WAIT count.
    let mut ranked: Vec<_> = report.processes.iter().collect();
    ranked.sort_by_key(|p| {
        (
            p.flags.is_empty(),
            std::cmp::Reverse(p.close_wait + p.time_wait),
            p.pid,
        )
    });
    let (mut other_cw, mut other_tw, mut other_fw2) = (0i64, 0i64, 0i64);
    for (i, p) in ranked.iter().enumerate() {
        if i >= top {
            other_cw += p.close_wait as i64;
            other_tw += p.time_wait as i64;
            other_fw2 += p.fin_wait2 as i64;
            continue;
        }
        let labels = row_labels(report.by, p, cgroup_label);
        close_wait.get_or_create(&labels).set(p.close_wait as i64);
        time_wait.get_or_create(&labels).set(p.time_wait as i64);
        fin_wait2.get_or_create(&labels).set(p.fin_wait2 as i64);
        if let Some(o) = p.close_wait_oldest_s {
            oldest.get_or_create(&labels).set(o);
        }
        for flag in &p.flags {
            let mut l = labels.clone();
            l.push(("flag".into(), flag.to_string()));
            flagged.get_or_create(&l).set(1);
        }
    }
    // TIME_WAITs that exited processes left, folded into quiet lines: in "other", so
    // that the series still add up to what the host holds.
    let quiet_tw: i64 = report.quiet.iter().map(|q| q.time_wait as i64).sum();
    other_tw += quiet_tw;
    if ranked.len() > top || quiet_tw > 0 {
        let labels = other_labels(report.by, cgroup_label);
        close_wait.get_or_create(&labels).set(other_cw);
        time_wait.get_or_create(&labels).set(other_tw);
        fin_wait2.get_or_create(&labels).set(other_fw2);
    }
    registry.register(
        "connwatch_close_wait_sockets",
        "CLOSE_WAIT sockets held per row of --by (top-K by --top; the rest as comm=\"other\")",
        close_wait,
    );
    registry.register(
        "connwatch_close_wait_oldest_seconds",
        "Age of the process's oldest CLOSE_WAIT socket",
        oldest,
    );
    registry.register(
        "connwatch_time_wait_sockets",
        "TIME_WAIT sockets caused per process (it closed first)",
        time_wait,
    );
    registry.register(
        "connwatch_fin_wait2_sockets",
        "Connections closed first whose peer has not closed yet (FIN_WAIT2), per row of --by",
        fin_wait2,
    );
    registry.register(
        "connwatch_flagged",
        format!(
            "1 while the process carries the flag ({})",
            crate::report::flag::names()
        ),
        flagged,
    );
}

/// Labels of a row's series: `comm`, and `pid` with --by process or `unit` with --by
/// unit (`cgroup` too with --cgroup-label); a row in a container or pod adds
/// `namespace`, `pod` and `container`, named as kube-state-metrics and cAdvisor name
/// them (empty where they do not apply: a pod's row has no container, a Docker
/// container no pod). Until the runtime has named them, `pod` holds the pod's uid and
/// `container` the short container id. Without `pid`, a restarted process keeps its
/// series.
fn row_labels(by: &str, p: &ProcessRow, cgroup_label: bool) -> Labels {
    let mut labels: Labels = vec![("comm".into(), p.comm.clone())];
    match by {
        "process" => labels.push(("pid".into(), p.pid.to_string())),
        "unit" => labels.push(("unit".into(), p.unit.clone().unwrap_or_default())),
        _ => {}
    }
    if p.k8s.is_some() || p.container.is_some() {
        let k8s = p.k8s.as_ref();
        let container = k8s
            .and_then(|k| k.container.clone())
            .or_else(|| {
                p.container.as_ref().map(|c| {
                    c.name
                        .clone()
                        .unwrap_or_else(|| c.id.get(..12).unwrap_or(&c.id).to_string())
                })
            })
            .unwrap_or_default();
        let pod = k8s
            .and_then(|k| k.pod.clone().or_else(|| k.pod_uid.clone()))
            .unwrap_or_default();
        let namespace = k8s.and_then(|k| k.namespace.clone()).unwrap_or_default();
        labels.push(("namespace".into(), namespace));
        labels.push(("pod".into(), pod));
        labels.push(("container".into(), container));
    }
    if cgroup_label {
        labels.push(("cgroup".into(), p.cgroup.clone().unwrap_or_default()));
    }
    labels
}

/// Labels of the series that sums the rows beyond --top.
fn other_labels(by: &str, cgroup_label: bool) -> Labels {
    let mut labels: Labels = vec![("comm".into(), "other".into())];
    match by {
        "process" => labels.push(("pid".into(), String::new())),
        "unit" => labels.push(("unit".into(), String::new())),
        _ => {}
    }
    if cgroup_label {
        labels.push(("cgroup".into(), String::new()));
    }
    labels
}

fn register_unattributed(registry: &mut Registry, report: &Report) {
    let unattributed = Family::<Labels, Gauge>::default();
    unattributed
        .get_or_create(&vec![("state".into(), "CLOSE_WAIT".into())])
        .set(report.unattributed.close_wait as i64);
    unattributed
        .get_or_create(&vec![("state".into(), "TIME_WAIT".into())])
        .set(report.unattributed.time_wait as i64);

    registry.register(
        "connwatch_unattributed_sockets",
        "CLOSE_WAIT/TIME_WAIT sockets whose owner is unknown",
        unattributed,
    );
}

fn register_persistent(registry: &mut Registry, persistent: &Persistent) {
    registry.register(
        "connwatch_close_wait_lifetime_seconds",
        "Lifetimes of CLOSE_WAIT sockets that were closed",
        persistent.close_wait_lifetime.clone(),
    );
    registry.register(
        "connwatch_time_wait_lifetime_seconds",
        "Lifetimes of TIME_WAIT sockets that ended",
        persistent.time_wait_lifetime.clone(),
    );
    registry.register(
        "connwatch_events",
        "TCP state transitions produced by the probe",
        persistent.events.clone(),
    );
    registry.register(
        "connwatch_events_dropped",
        "Transitions lost because the ring buffer was full",
        persistent.dropped.clone(),
    );
    registry.register(
        "connwatch_sockets_untracked",
        "Sockets whose state connwatch lost (a transition it never saw)",
        persistent.untracked.clone(),
    );
    registry.register(
        "connwatch_stacks_dropped",
        "User stacks lost (their ring was full, or nothing of them could be read): leak sites may miss sockets",
        persistent.stacks_dropped.clone(),
    );
    registry.register(
        "connwatch_poll_seconds",
        "Time spent polling sock_diag and /proc",
        persistent.poll_seconds.clone(),
    );
}

/// connwatch's own tables and memory.
fn register_footprint(registry: &mut Registry, report: &Report) {
    let entries = Family::<Labels, Gauge>::default();
    for (table, n) in &report.footprint.entries {
        entries
            .get_or_create(&vec![("table".into(), (*table).into())])
            .set(*n as i64);
    }
    registry.register(
        "connwatch_table_entries",
        "Entries in connwatch's own tables (each bounded; flat over a long run)",
        entries,
    );
    if let Some(rss) = report.footprint.rss_bytes {
        let gauge = Gauge::<i64>::default();
        gauge.set(rss as i64);
        registry.register(
            "connwatch_resident_memory_bytes",
            "Resident memory of the connwatch process",
            gauge,
        );
    }
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples
/// `x_total` and the text ends with `# EOF`. The classic text format (0.0.4) that
/// every scraper and `promtool check metrics` read names the family `x_total`.
fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out += &format!("{kind}{name}{suffix} {tail}\n");
            }
            None => {
                out += line;
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::report::{Loss, ProcessRow, TimeWaitEnds, Unattributed};

    fn row(pid: u32, cw: u64, flags: Vec<&'static str>) -> ProcessRow {
        ProcessRow {
            pid,
            comm: format!("p{pid}"),
            cgroup: Some("/svc".into()),
            close_wait: cw,
            close_wait_oldest_s: Some(1.5),
            close_wait_age_source: Some("observed"),
            time_wait: 1,
            fds: Some(10),
            fd_limit: Some(1024),
            flags,
            owner_sources: vec!["fd"],
            ..ProcessRow::default()
        }
    }

    fn report(n: u32) -> Report {
        Report {
            time: String::new(),
            elapsed_s: 1.0,
            is_final: false,
            states: BTreeMap::from([("CLOSE_WAIT".into(), 7), ("ESTABLISHED".into(), 3)]),
            processes: (1..=n).map(|p| row(p, u64::from(p), vec![])).collect(),
            by: "process",
            quiet: vec![],
            unattributed: Unattributed::default(),
            loss: Loss::default(),
            time_wait_ends: TimeWaitEnds::default(),
            kernel: None,
            footprint: Default::default(),
        }
    }

    #[test]
    fn top_k_bounds_the_series() {
        let mut r = report(1000);
        r.processes[0].flags = vec!["close_wait_leak"];
        let text = render(&r, &Persistent::default(), 20, false);
        let cw_series = text
            .lines()
            .filter(|l| l.starts_with("connwatch_close_wait_sockets{"))
            .count();
        assert_eq!(cw_series, 21, "top 20 and `other`");
        // The flagged process is kept even though it holds the fewest sockets.
        assert!(
            text.contains(r#"connwatch_flagged{comm="p1",pid="1",flag="close_wait_leak"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"connwatch_close_wait_sockets{comm="p1000",pid="1000"} 1000"#));
        // 1..=1000 minus the top 19 by count (1000..=982) minus p1.
        let other: u64 = (2..=981).sum();
        assert!(
            text.contains(&format!(
                r#"connwatch_close_wait_sockets{{comm="other",pid=""}} {other}"#
            )),
            "{text}"
        );
        assert!(text.contains(r#"connwatch_sockets{state="CLOSE_WAIT"} 7"#));
        // Classic text format: counters named with _total, no OpenMetrics trailer.
        assert!(
            text.contains("# TYPE connwatch_events_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP connwatch_events_total "));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn counters_follow_totals_and_histograms_fill() {
        let mut p = Persistent::default();
        p.update(
            &Totals {
                events: 10,
                dropped: 1,
                untracked: 0,
                stacks_dropped: 0,
                poll_ns: 2_000_000,
            },
            &[0.5],
            &[60.0],
        );
        p.update(
            &Totals {
                events: 25,
                dropped: 1,
                untracked: 3,
                stacks_dropped: 2,
                poll_ns: 3_000_000,
            },
            &[],
            &[],
        );
        let text = render(&report(1), &p, 20, true);
        assert!(text.contains("connwatch_events_total 25"), "{text}");
        assert!(text.contains("connwatch_events_dropped_total 1"));
        assert!(text.contains("connwatch_sockets_untracked_total 3"));
        assert!(text.contains("connwatch_stacks_dropped_total 2"), "{text}");
        assert!(
            text.contains("connwatch_poll_seconds_total 0.003"),
            "{text}"
        );
        assert!(text.contains("connwatch_close_wait_lifetime_seconds_count 1"));
        assert!(
            text.contains(r#"connwatch_time_wait_lifetime_seconds_bucket{le="60.0"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"cgroup="/svc""#));
    }

    /// A row in a pod carries namespace, pod and container; a host row does not.
    #[test]
    fn pods_are_labelled_by_name() {
        let mut r = report(2);
        r.by = "command";
        r.processes[0].k8s = Some(crate::report::K8sRow {
            namespace: Some("shop".into()),
            pod: Some("checkout-7f9c".into()),
            pod_uid: Some("u".into()),
            container: Some("app".into()),
        });
        r.processes[1].container = Some(crate::report::ContainerRow {
            id: "0123456789abcdef".repeat(4),
            runtime: crate::host::container::Runtime::Docker,
            name: None,
        });
        let text = render(&r, &Persistent::default(), 10, false);
        assert!(
            text.contains(
                r#"connwatch_close_wait_sockets{comm="p1",namespace="shop",pod="checkout-7f9c",container="app"} 1"#
            ),
            "{text}"
        );
        // Not named by its runtime: the short id, so two containers stay two series.
        assert!(
            text.contains(
                r#"connwatch_close_wait_sockets{comm="p2",namespace="",pod="",container="0123456789ab"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn labels_follow_the_grouping() {
        let mut r = report(2);
        r.by = "command";
        let text = render(&r, &Persistent::default(), 10, false);
        assert!(
            text.contains(r#"connwatch_close_wait_sockets{comm="p1"} 1"#),
            "{text}"
        );
        assert!(!text.contains("pid=\""), "{text}");
        r.by = "unit";
        r.processes[0].unit = Some("app.service".into());
        let text = render(&r, &Persistent::default(), 1, false);
        assert!(
            text.contains(r#"connwatch_close_wait_sockets{comm="p2",unit=""} 2"#)
                || text.contains(r#"connwatch_close_wait_sockets{comm="p1",unit="app.service"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"connwatch_close_wait_sockets{comm="other",unit=""}"#),
            "{text}"
        );
        assert!(!text.contains("pid=\""), "{text}");
    }
}
