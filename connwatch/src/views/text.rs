//! The `watch`/`snapshot` report for people: a summary line, the process table (flagged
//! processes first) and one sentence per flagged process. `--json` serializes the
//! `Report` itself.
use comfy_table::{CellAlignment, Table, presets::NOTHING};

use crate::report::words::fmt_age;
use crate::report::words::plural;
use crate::report::{ProcessRow, QuietRow, Report};

pub fn json(report: &Report) -> String {
    // Strings, numbers and maps only: serialization cannot fail.
    serde_json::to_string(report).unwrap_or_default()
}

pub fn human(r: &Report) -> String {
    let mut out = String::new();
    if r.loss.events_dropped > 0 {
        out += &format!(
            "WARNING: {} events dropped by the kernel (ring buffer full): ages and lifetimes may be missing; raise --ring-size\n",
            r.loss.events_dropped
        );
    }
    out += &format!(
        "connwatch {} {}  elapsed {}  |  {}\n",
        if r.is_final { "final report" } else { "at" },
        r.time.get(..19).unwrap_or(&r.time).replace('T', " "),
        fmt_age(r.elapsed_s),
        states_line(r).unwrap_or_else(|| "no TCP sockets".into())
    );
    if r.processes.is_empty() {
        out += "no process holds CLOSE_WAIT or TIME_WAIT sockets\n";
    } else {
        for line in process_table(r).to_string().lines() {
            out += line.trim_end();
            out.push('\n');
        }
        for p in &r.processes {
            let Some(reason) = p.reason.as_deref() else {
                continue;
            };
            out += &format!("  * {reason}\n");
            // The code to look at first, on a line of its own.
            if let Some(site) = p.leak_sites.first() {
                out += &format!("    {}\n", site.summary);
            }
        }
    }
    for q in &r.quiet {
        out += &quiet_line(q);
    }
    out += &footer(r);
    out
}

/// `STATE count` pairs, or `None` without any TCP socket.
pub fn states_line(r: &Report) -> Option<String> {
    let states: Vec<String> = r.states.iter().map(|(s, n)| format!("{s} {n}")).collect();
    (!states.is_empty()).then(|| states.join("  "))
}

/// One line for the processes of one command that hold nothing and carry no flag.
fn quiet_line(q: &QuietRow) -> String {
    let c = &q.close_wait_closed;
    let who = format!(
        "quiet: {} {} process{}",
        q.processes,
        q.comm,
        if q.processes == 1 { "" } else { "es" }
    );
    let closed = match (c.count, c.p50_s, c.p99_s) {
        (0, _, _) => None,
        (n, Some(a), Some(b)) => Some(format!(
            " closed {n} CLOSE_WAIT socket{} promptly (p50 {}, p99 {})",
            plural(n),
            fmt_age(a),
            fmt_age(b)
        )),
        (n, _, _) => Some(format!(
            " closed {n} CLOSE_WAIT socket{} promptly",
            plural(n)
        )),
    };
    let left = (q.time_wait > 0).then(|| {
        format!(
            " (exited, {} TIME_WAIT socket{} left)",
            q.time_wait,
            plural(q.time_wait)
        )
    });
    match (closed, left) {
        (None, None) => format!("{who}, nothing held\n"),
        (closed, left) => format!(
            "{who}{}{}\n",
            closed.unwrap_or_default(),
            left.unwrap_or_default()
        ),
    }
}

fn process_table(r: &Report) -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING);
    // FIN_WAIT2 only where a row has some: the usual screen stays as it was.
    let fin_wait2 = r.processes.iter().any(|p| p.fin_wait2 > 0);
    let mut header = vec![
        "PID",
        if r.by == "unit" { "UNIT" } else { "COMM" },
        "CLOSE_WAIT",
        "OLDEST",
        "GROWTH/MIN",
        "RECV-Q",
        "FDS/LIMIT",
        "CLOSED p50/p99",
        "TIME_WAIT",
        "TOP PEER",
        "FLAGS",
    ];
    if fin_wait2 {
        header.insert(9, "FIN_WAIT2");
    }
    t.set_header(header);
    for p in &r.processes {
        let mut cells = row_cells(p).to_vec();
        if r.by == "unit"
            && let (Some(unit), Some(cell)) = (&p.unit, cells.get_mut(1))
        {
            cell.clone_from(unit);
        }
        // Where it runs, beside the command: namespace/pod/container.
        if let (Some(place), Some(cell)) = (p.place(), cells.get_mut(1)) {
            *cell = format!("{cell} ({place})");
        }
        if fin_wait2 {
            let fw2 = match (p.fin_wait2, p.fin_wait2_oldest_s) {
                (0, _) => "-".to_string(),
                (n, Some(o)) => format!("{n} {}", fmt_age(o)),
                (n, None) => n.to_string(),
            };
            cells.insert(9, fw2);
        }
        t.add_row(cells);
    }
    for i in [0, 2, 3, 4, 5] {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

fn row_cells(p: &ProcessRow) -> [String; 11] {
    let growth = p
        .close_wait_growth_per_min
        .map_or("-".into(), |g| format!("{g:+.1}"));
    let fds = match (p.fds, p.fd_limit) {
        (Some(u), Some(l)) => format!("{u}/{l}"),
        (Some(u), None) => format!("{u}/-"),
        _ => "-".into(),
    };
    let c = &p.close_wait_closed;
    let closed = match (c.p50_s, c.p99_s) {
        (Some(a), Some(b)) => format!("{} {}/{}", c.count, fmt_age(a), fmt_age(b)),
        _ => "-".into(),
    };
    let peer = p.peers.first().map_or("-".into(), |x| {
        let n = x.close_wait + x.time_wait + x.fin_wait2;
        // A peer on this host: who holds the other end.
        match &x.process {
            Some(pp) => match (&pp.namespace, &pp.pod) {
                (Some(ns), Some(pod)) => format!("{} ({n}) {ns}/{pod}", x.addr),
                _ => format!("{} ({n}) {}[{}]", x.addr, pp.comm, pp.pid),
            },
            None => format!("{} ({n})", x.addr),
        }
    });
    let tw = match (p.time_wait, p.time_wait_created_per_s) {
        (0, None) => "-".to_string(),
        (n, Some(rate)) => format!("{n} {rate:.1}/s"),
        (n, None) => n.to_string(),
    };
    let pid = match p.pids.len() {
        0 | 1 => p.pid.to_string(),
        n => format!("{} +{}", p.pid, n - 1),
    };
    [
        pid,
        p.comm.clone(),
        p.close_wait.to_string(),
        oldest(p),
        growth,
        p.close_wait_recv_q_bytes.to_string(),
        fds,
        closed,
        tw,
        peer,
        flags(p),
    ]
}

/// The oldest CLOSE_WAIT's age, `~` when estimated.
fn oldest(p: &ProcessRow) -> String {
    p.close_wait_oldest_s.map_or("-".into(), |o| {
        let est = if p.close_wait_age_source == Some("estimated") {
            "~"
        } else {
            ""
        };
        format!("{est}{}", fmt_age(o))
    })
}

/// Flags comma-separated, `-` for none.
pub fn flags(p: &ProcessRow) -> String {
    if p.flags.is_empty() {
        "-".into()
    } else {
        p.flags.join(",")
    }
}

/// Unattributed sockets, losses, and how TIME_WAITs ended under which settings.
fn footer(r: &Report) -> String {
    let mut out = format!(
        "unattributed: {} CLOSE_WAIT, {} TIME_WAIT   loss: {} events dropped, {} sockets untracked\n",
        r.unattributed.close_wait,
        r.unattributed.time_wait,
        r.loss.events_dropped,
        r.loss.sockets_untracked
    );
    if r.loss.stacks_dropped > 0 {
        // Only where stacks were lost: leak sites may then miss sockets.
        out.insert_str(
            out.len() - 1,
            &format!(", {} stacks dropped", r.loss.stacks_dropped),
        );
    }
    let e = &r.time_wait_ends;
    if let Some(k) = &r.kernel {
        out += &format!(
            "TIME_WAIT ended: {} expired, {} early   ports {}-{}  tcp_tw_reuse={}  tcp_max_tw_buckets={}  overflows={}\n",
            e.expired,
            e.early,
            k.ip_local_port_range[0],
            k.ip_local_port_range[1],
            k.tcp_tw_reuse.map_or("?".into(), |v| v.to_string()),
            k.tcp_max_tw_buckets.map_or("?".into(), |v| v.to_string()),
            k.time_wait_overflow.map_or("?".into(), |v| v.to_string()),
        );
        if k.time_wait_overflow.is_some_and(|n| n > 0) {
            out += "  the kernel has discarded TIME_WAIT sockets (tcp_max_tw_buckets reached): connections closed then could be confused with new ones\n";
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::report::{ClosedStats, Loss, Peer, ProcessRow, Unattributed};

    fn report(dropped: u64) -> Report {
        Report {
            time: "2026-11-25T16:40:00.000000Z".into(),
            elapsed_s: 4.0,
            is_final: false,
            states: BTreeMap::from([("CLOSE_WAIT".into(), 50), ("ESTABLISHED".into(), 10)]),
            by: "process",
            quiet: vec![],
            processes: vec![ProcessRow {
                pids: vec![4242],
                pid: 4242,
                comm: "python3".into(),
                close_wait: 50,
                close_wait_oldest_s: Some(312.0),
                close_wait_age_source: Some("estimated"),
                fds: Some(60),
                fd_limit: Some(1024),
                flags: vec!["close_wait_leak"],
                reason: Some("python3[4242] holds 50 CLOSE_WAIT sockets.".into()),
                peers: vec![Peer {
                    addr: "127.0.0.1:8080".into(),
                    close_wait: 50,
                    ..Peer::default()
                }],
                owner_sources: vec!["fd"],
                close_wait_growth_per_min: Some(10.0),
                fds_exhausted_in_s: Some(5784.0),
                ..ProcessRow::default()
            }],
            unattributed: Unattributed {
                close_wait: 0,
                time_wait: 3,
            },
            loss: Loss {
                events_dropped: dropped,
                sockets_untracked: 0,
                stacks_dropped: 0,
            },
            time_wait_ends: Default::default(),
            kernel: None,
            footprint: Default::default(),
        }
    }

    #[test]
    fn human_report_shows_row_reason_and_totals() {
        let text = human(&report(0));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("connwatch at 2026-11-25 16:40:00"),
            "{text}"
        );
        assert!(lines[0].contains("CLOSE_WAIT 50  ESTABLISHED 10"), "{text}");
        let row = lines.iter().find(|l| l.contains("python3")).unwrap();
        for cell in [
            "4242",
            "50",
            "~5m12s",
            "+10.0",
            "60/1024",
            "127.0.0.1:8080 (50)",
            "close_wait_leak",
        ] {
            assert!(row.contains(cell), "{cell} missing in {row}");
        }
        assert!(text.contains("  * python3[4242] holds 50 CLOSE_WAIT sockets."));
        assert!(text.contains("unattributed: 0 CLOSE_WAIT, 3 TIME_WAIT"));
        assert!(!text.contains("WARNING"));
    }

    /// A flagged row's top leak site follows its reason on a line of its own; lost
    /// stacks join the loss line.
    #[test]
    fn the_top_leak_site_follows_the_reason() {
        let mut r = report(0);
        r.loss.stacks_dropped = 4;
        r.processes[0].leak_sites = vec![crate::report::LeakSite {
            sockets: 50,
            at: crate::stacks::At::Eof,
            stack: vec!["handler (srv.py:9)".into()],
            truncated: false,
            hint: None,
            summary: "read EOF at handler (srv.py:9) ← main (srv.py:30)".into(),
        }];
        let text = human(&r);
        assert!(
            text.contains(
                "  * python3[4242] holds 50 CLOSE_WAIT sockets.\n    read EOF at handler (srv.py:9) ← main (srv.py:30)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("0 sockets untracked, 4 stacks dropped\n"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        let site = &json["processes"][0]["leak_sites"][0];
        assert_eq!(site["at"], "eof");
        assert_eq!(site["sockets"], 50);
        assert!(site.get("summary").is_none(), "{site}");
    }

    #[test]
    fn drops_are_announced_on_the_first_line() {
        let text = human(&report(12));
        assert!(
            text.lines()
                .next()
                .unwrap()
                .starts_with("WARNING: 12 events dropped")
        );
    }

    #[test]
    fn json_is_one_line_with_final_key() {
        let line = json(&report(0));
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["final"], false);
        assert_eq!(v["processes"][0]["flags"][0], "close_wait_leak");
    }

    #[test]
    fn quiet_processes_are_one_line_per_command() {
        let mut r = report(0);
        r.quiet = vec![
            QuietRow {
                comm: "curl".into(),
                processes: 30,
                close_wait_closed: ClosedStats {
                    count: 30,
                    p50_s: Some(0.0),
                    p99_s: Some(0.002),
                    max_s: Some(0.002),
                },
                ..QuietRow::default()
            },
            QuietRow {
                comm: "cron".into(),
                processes: 1,
                close_wait_closed: ClosedStats::default(),
                time_wait: 0,
            },
            QuietRow {
                comm: "wget".into(),
                processes: 200,
                time_wait: 200,
                ..QuietRow::default()
            },
        ];
        let text = human(&r);
        assert!(
            text.contains("quiet: 30 curl processes closed 30 CLOSE_WAIT sockets promptly (p50 0ms, p99 2ms)\n"),
            "{text}"
        );
        assert!(
            text.contains("quiet: 1 cron process, nothing held\n"),
            "{text}"
        );
        assert!(
            text.contains("quiet: 200 wget processes (exited, 200 TIME_WAIT sockets left)\n"),
            "{text}"
        );
    }
}
