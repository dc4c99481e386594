//! `connwatch top`: the `watch` report as a live full-screen table (ratatui). Rendering
//! and key handling are pure, so they are tested with ratatui's test backend.
use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState, Wrap},
};

use super::text::{flags, states_line};
use crate::report::{ProcessRow, Report, words::fmt_age};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    CloseWait,
    Oldest,
    TimeWait,
}

impl SortKey {
    fn label(self) -> &'static str {
        match self {
            Self::CloseWait => "CLOSE_WAIT",
            Self::Oldest => "oldest",
            Self::TimeWait => "TIME_WAIT",
        }
    }
}

pub struct App {
    pub report: Option<Report>,
    pub sort: SortKey,
    pub table: TableState,
    pub quit: bool,
}

impl Default for App {
    fn default() -> Self {
        Self {
            report: None,
            sort: SortKey::CloseWait,
            table: TableState::default().with_selected(Some(0)),
            quit: false,
        }
    }
}

impl App {
    /// Keys: q/Esc quit, c/o/t sort by CLOSE_WAIT count, oldest age, TIME_WAIT count,
    /// Up/Down (or k/j) select.
    pub fn key(&mut self, key: char) {
        match key {
            'q' | '\u{1b}' => self.quit = true,
            'c' => self.sort = SortKey::CloseWait,
            'o' => self.sort = SortKey::Oldest,
            't' => self.sort = SortKey::TimeWait,
            'j' | '↓' => self.table.select_next(),
            'k' | '↑' => self.table.select_previous(),
            _ => {}
        }
    }

    /// Rows in display order: flagged first, then by the sort key.
    pub fn rows(&self) -> Vec<&ProcessRow> {
        let Some(r) = &self.report else {
            return Vec::new();
        };
        let mut rows: Vec<&ProcessRow> = r.processes.iter().collect();
        rows.sort_by(|a, b| {
            let by = match self.sort {
                SortKey::CloseWait => b.close_wait.cmp(&a.close_wait),
                SortKey::Oldest => b
                    .close_wait_oldest_s
                    .unwrap_or(0.0)
                    .total_cmp(&a.close_wait_oldest_s.unwrap_or(0.0)),
                SortKey::TimeWait => b.time_wait.cmp(&a.time_wait),
            };
            a.flags
                .is_empty()
                .cmp(&b.flags.is_empty())
                .then(by)
                .then(a.pid.cmp(&b.pid))
        });
        rows
    }

    pub fn draw(&mut self, frame: &mut Frame) {
        let [head, body, detail, help] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Min(5),
            Constraint::Length(7),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(Paragraph::new(summary(self.report.as_ref())), head);

        let len = self.rows().len();
        // Drawing an empty table clears the selection: select the first row again.
        if len > 0 && self.table.selected().is_none_or(|i| i >= len) {
            let keep = self.table.selected().map_or(0, |i| i.min(len - 1));
            self.table.select(Some(keep));
        }
        let rows = self.rows();
        let selected = self
            .table
            .selected()
            .and_then(|i| rows.get(i.min(len.saturating_sub(1))).copied());
        let details = selected.map(details).unwrap_or_default();
        let by = self.report.as_ref().map_or("process", |r| r.by);
        let table = table(&rows, by).block(Block::new().borders(Borders::TOP).title(format!(
            " processes ({len}), sorted by {} ",
            self.sort.label()
        )));
        frame.render_stateful_widget(table, body, &mut self.table);
        frame.render_widget(
            Paragraph::new(details)
                .wrap(Wrap { trim: true })
                .block(Block::new().borders(Borders::TOP).title(" details ")),
            detail,
        );
        frame.render_widget(
            Paragraph::new("q quit   c/o/t sort by CLOSE_WAIT / oldest / TIME_WAIT   ↑/↓ select"),
            help,
        );
    }
}

/// The two header lines: time, states, losses.
fn summary(report: Option<&Report>) -> String {
    let Some(r) = report else {
        return "connwatch top: waiting for the first report…".to_string();
    };
    format!(
        "connwatch top  {}  elapsed {}  |  {}\nloss: {} events dropped, {} sockets untracked   unattributed: {} CLOSE_WAIT, {} TIME_WAIT",
        r.time.get(11..19).unwrap_or(""),
        fmt_age(r.elapsed_s),
        states_line(r).unwrap_or_default(),
        r.loss.events_dropped,
        r.loss.sockets_untracked,
        r.unattributed.close_wait,
        r.unattributed.time_wait
    )
}

/// The process table, flagged rows in bold red.
fn table<'a>(rows: &[&ProcessRow], by: &str) -> Table<'a> {
    // The name column widens for `namespace/pod/container`, up to a point.
    let name_width = rows
        .iter()
        .filter_map(|p| p.place().map(|place| p.comm.len() + place.len() + 3))
        .max()
        .unwrap_or(0)
        .clamp(16, 56) as u16;
    let rows: Vec<Row> = rows
        .iter()
        .map(|p| {
            let style = if p.flags.is_empty() {
                Style::new()
            } else {
                Style::new().red().add_modifier(Modifier::BOLD)
            };
            let pid = match p.pids.len() {
                0 | 1 => p.pid.to_string(),
                n => format!("{} +{}", p.pid, n - 1),
            };
            let name = match (by, &p.unit) {
                ("unit", Some(unit)) => unit.clone(),
                _ => p.comm.clone(),
            };
            let name = match p.place() {
                Some(place) => format!("{name} ({place})"),
                None => name,
            };
            Row::new(vec![
                Cell::from(pid),
                Cell::from(name),
                Cell::from(p.close_wait.to_string()),
                Cell::from(p.close_wait_oldest_s.map_or("-".into(), fmt_age)),
                Cell::from(p.time_wait.to_string()),
                Cell::from(p.fin_wait2.to_string()),
                Cell::from(match (p.fds, p.fd_limit) {
                    (Some(u), Some(l)) => format!("{u}/{l}"),
                    _ => "-".into(),
                }),
                Cell::from(flags(p)),
            ])
            .style(style)
        })
        .collect();
    Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(name_width),
            Constraint::Length(11),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Min(15),
        ],
    )
    .header(
        Row::new([
            "PID",
            "COMM",
            "CLOSE_WAIT",
            "OLDEST",
            "TIME_WAIT",
            "FIN_WAIT2",
            "FDS/LIMIT",
            "FLAGS",
        ])
        .style(Style::new().add_modifier(Modifier::BOLD)),
    )
    .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
}

/// The selected process's reason (or "not flagged") and its peers.
fn details<'a>(p: &ProcessRow) -> Vec<Line<'a>> {
    let reason = p
        .reason
        .clone()
        .unwrap_or_else(|| format!("{}[{}]: not flagged", p.comm, p.pid));
    let peers: Vec<String> = p
        .peers
        .iter()
        .map(|x| {
            let fw2 = if x.fin_wait2 > 0 {
                format!(", {} FW2", x.fin_wait2)
            } else {
                String::new()
            };
            format!("{} ({} CW, {} TW{fw2})", x.addr, x.close_wait, x.time_wait)
        })
        .collect();
    let mut lines = vec![Line::from(reason)];
    if let Some(site) = p.leak_sites.first().filter(|_| !p.flags.is_empty()) {
        lines.push(Line::from(site.summary.clone()));
    }
    lines.push(Line::from(format!("peers: {}", peers.join(", "))));
    lines
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::report::{Loss, Peer, TimeWaitEnds, Unattributed};

    fn row(pid: u32, cw: u64, tw: u64, flag: bool) -> ProcessRow {
        ProcessRow {
            pid,
            comm: format!("proc{pid}"),
            close_wait: cw,
            close_wait_oldest_s: Some(cw as f64 * 10.0),
            close_wait_age_source: Some("observed"),
            time_wait: tw,
            fds: Some(10),
            fd_limit: Some(1024),
            flags: if flag {
                vec!["close_wait_leak"]
            } else {
                vec![]
            },
            reason: flag.then(|| format!("proc{pid}[{pid}] holds {cw} CLOSE_WAIT sockets")),
            peers: vec![Peer {
                addr: "10.0.0.1:5432".into(),
                close_wait: cw,
                time_wait: tw,
                ..Peer::default()
            }],
            owner_sources: vec!["fd"],
            ..ProcessRow::default()
        }
    }

    fn app() -> App {
        App {
            report: Some(Report {
                time: "2026-11-25T16:40:00.000000Z".into(),
                elapsed_s: 4.0,
                is_final: false,
                states: BTreeMap::from([("CLOSE_WAIT".into(), 8)]),
                by: "process",
                processes: vec![
                    row(1, 2, 50, false),
                    row(2, 5, 0, true),
                    row(3, 1, 9, false),
                ],
                quiet: vec![],
                unattributed: Unattributed::default(),
                loss: Loss::default(),
                time_wait_ends: TimeWaitEnds::default(),
                kernel: None,
                footprint: Default::default(),
            }),
            ..App::default()
        }
    }

    fn screen(app: &mut App) -> String {
        let mut term = Terminal::new(TestBackend::new(110, 20)).unwrap();
        term.draw(|f| app.draw(f)).unwrap();
        let buf = term.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn flagged_first_then_sorted_and_detail_of_selection() {
        let mut app = app();
        let order: Vec<u32> = app.rows().iter().map(|p| p.pid).collect();
        assert_eq!(order, [2, 1, 3]);
        let text = screen(&mut app);
        assert!(text.contains("CLOSE_WAIT 8"), "{text}");
        assert!(text.contains("PID") && text.contains("FLAGS"), "{text}");
        assert!(
            text.contains("proc2[2] holds 5 CLOSE_WAIT sockets"),
            "{text}"
        );
        assert!(text.contains("10.0.0.1:5432 (5 CW, 0 TW)"), "{text}");
        app.key('t');
        assert_eq!(
            app.rows().iter().map(|p| p.pid).collect::<Vec<_>>(),
            [2, 1, 3]
        );
        app.key('j');
        let text = screen(&mut app);
        assert!(text.contains("proc1[1]: not flagged"), "{text}");
        assert!(text.contains("sorted by TIME_WAIT"), "{text}");
        // The flagged row is drawn in red.
        let mut term = Terminal::new(TestBackend::new(110, 20)).unwrap();
        term.draw(|f| app.draw(f)).unwrap();
        let buf = term.backend().buffer().clone();
        let y = (0..buf.area.height)
            .find(|&y| {
                (0..8)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
                    .trim()
                    == "2"
            })
            .unwrap();
        assert_eq!(buf[(0, y)].fg, ratatui::style::Color::Red);
        app.key('q');
        assert!(app.quit);
    }

    #[test]
    fn waits_for_the_first_report_then_selects_the_first_row() {
        let mut waiting = App::default();
        let text = screen(&mut waiting);
        assert!(text.contains("waiting for the first report"), "{text}");
        waiting.report = app().report;
        let text = screen(&mut waiting);
        assert!(
            text.contains("proc2[2] holds 5 CLOSE_WAIT sockets"),
            "{text}"
        );
    }
}
