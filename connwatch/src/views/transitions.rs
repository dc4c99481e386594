//! `connwatch trace` output: one line per transition, as aligned columns or JSON lines.
use std::{
    io::{self, Write},
    net::SocketAddr,
};

use serde::Serialize;

use super::row_buf::RowBuf;
use crate::{
    clock::WallClock,
    decode::{OwnerSource, TcpState, Transition},
    monitor::timewait::Synthetic,
};

/// What one trace line shows: a transition from the probe, or one inferred by polling.
pub struct Row<'a> {
    pub ts_ns: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub old: TcpState,
    pub new: TcpState,
    pub duration_ns: Option<u64>,
    pub pid: Option<u32>,
    pub comm: Option<&'a str>,
    pub owner_source: OwnerSource,
    pub synthetic: bool,
    pub end: Option<&'static str>,
    /// `trace --stacks`: for a transition into CLOSE_WAIT, the stack where the socket
    /// was made.
    pub stack: Option<std::sync::Arc<crate::stacks::Site>>,
}

/// Stamps each row no earlier than the rows before it, so that the stream's times never
/// go backwards: an end connwatch learns late (a timer due before the poll that noticed
/// it, a close confirmed by a poll) takes the time of its place in the stream, while its
/// `duration` still says how long the state lasted; events of two CPUs can also reach
/// the ring microseconds out of order.
#[derive(Default)]
pub struct InOrder {
    last_ns: u64,
}

impl InOrder {
    pub fn place(&mut self, row: &mut Row<'_>) {
        row.ts_ns = row.ts_ns.max(self.last_ns);
        self.last_ns = row.ts_ns;
    }
}

impl<'a> From<&'a Transition> for Row<'a> {
    fn from(t: &'a Transition) -> Self {
        Self {
            ts_ns: t.ts_ns,
            local: t.local,
            remote: t.remote,
            old: t.old,
            new: t.new,
            duration_ns: t.duration_ns(),
            pid: t.owner.pid,
            comm: t.owner.comm.as_deref(),
            owner_source: t.owner.source,
            synthetic: false,
            end: None,
            stack: None,
        }
    }
}

impl<'a> From<&'a Synthetic> for Row<'a> {
    fn from(s: &'a Synthetic) -> Self {
        Self {
            ts_ns: s.ts_ns,
            local: s.key.local.into(),
            remote: s.key.remote.into(),
            old: s.old,
            new: s.new,
            duration_ns: s.duration_ns,
            pid: s.owner.as_ref().map(|o| o.pid),
            comm: s.owner.as_ref().map(|o| &*o.comm),
            owner_source: s.owner_source,
            synthetic: true,
            end: s.end.map(|e| e.as_str()),
            stack: None,
        }
    }
}

/// Column header of the human format.
pub fn header() -> String {
    format!(
        "{:<15} {:>7} {:<16} {:<26} {:<26} {:<11}    {:<11} {:>10}",
        "TIME", "PID", "COMM", "LADDR:LPORT", "RADDR:RPORT", "OLD", "NEW", "MS"
    )
}

/// One aligned row: `TIME PID COMM LADDR:LPORT RADDR:RPORT OLD -> NEW MS`. Address
/// columns fit IPv4 and short IPv6 addresses; longer ones push the rest of the row right.
pub fn human_row(t: &Row, clock: &WallClock) -> String {
    let mut out = Vec::with_capacity(128);
    // Writing into a Vec cannot fail.
    let _ = write_human_row(&mut out, t, clock);
    String::from_utf8_lossy(&out)
        .trim_end_matches('\n')
        .to_string()
}

/// `human_row` written straight to `w`, built in a stack buffer without `core::fmt`:
/// `trace` writes one per transition, tens of thousands a second on a busy host.
pub fn write_human_row(w: &mut impl Write, t: &Row, clock: &WallClock) -> io::Result<()> {
    let mut b = RowBuf::new();
    b.time_of_day_ns(clock.unix_ns(t.ts_ns));
    b.push(b" ");
    match t.pid {
        Some(pid) => b.right(itoa::Buffer::new().format(pid).as_bytes(), 7),
        None => b.right(b"-", 7),
    }
    b.push(b" ");
    b.left(t.comm.unwrap_or("-").as_bytes(), 16);
    b.push(b" ");
    b.socket_addr(&t.local, 26);
    b.push(b" ");
    b.socket_addr(&t.remote, 26);
    b.push(b" ");
    state(&mut b, t.old, 11);
    b.push(b" -> ");
    // Inferred rows say so, and how a TIME_WAIT ended.
    let note = match (t.synthetic, t.end) {
        (true, Some(end)) => Some(end),
        (true, None) => Some(""),
        _ => None,
    };
    match (t.duration_ns, note) {
        // Nothing after the state: no trailing padding.
        (None, None) => state(&mut b, t.new, 0),
        (ns, _) => {
            state(&mut b, t.new, 11);
            b.push(b" ");
            match ns {
                Some(ns) => b.millis(ns, 10),
                None => b.spaces(10),
            }
        }
    }
    match note {
        Some("") => b.push(b"  (synthetic)"),
        Some(end) => {
            b.push(b"  (synthetic, ");
            b.push(end.as_bytes());
            b.push(b")");
        }
        None => {}
    }
    b.push(b"\n");
    w.write_all(b.as_bytes())
}

/// A state's name left-aligned in `width` (`STATE_N` for numbers the kernel added).
fn state(b: &mut RowBuf, s: TcpState, width: usize) {
    match s.name() {
        Some(name) => b.left(name.as_bytes(), width),
        None => {
            let mut digits = itoa::Buffer::new();
            let n = digits.format(s.0).as_bytes();
            b.push(b"STATE_");
            b.left(n, width.saturating_sub(6));
        }
    }
}

fn duration_ms(t: &Row) -> Option<f64> {
    t.duration_ns.map(|ns| ns as f64 / 1e6)
}

/// Serializes a `Display` value as a JSON string without building a `String` first.
pub struct AsStr<T>(pub T);

impl<T: std::fmt::Display> Serialize for AsStr<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A row as its JSON-lines record: the row itself, serialized with the clock that
/// turns its time into wall-clock time (no second row type to fill). Key names and
/// order are a public interface: scripts read them.
pub struct Json<'r, 'a>(pub &'r Row<'a>, pub &'r WallClock);

impl Serialize for Json<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let Self(t, clock) = self;
        let mut m = ser.serialize_struct("Row", 14)?;
        m.serialize_field(
            "time",
            &AsStr(humantime::format_rfc3339_micros(clock.wall(t.ts_ns))),
        )?;
        m.serialize_field("family", if t.local.is_ipv6() { "ipv6" } else { "ipv4" })?;
        m.serialize_field("saddr", &t.local.ip())?;
        m.serialize_field("sport", &t.local.port())?;
        m.serialize_field("daddr", &t.remote.ip())?;
        m.serialize_field("dport", &t.remote.port())?;
        m.serialize_field("old", &AsStr(t.old))?;
        m.serialize_field("new", &AsStr(t.new))?;
        // Rounded to the microsecond: nanoseconds are noise in a JSON float.
        let ms = duration_ms(t).map(|ms| (ms * 1000.0).round() / 1000.0);
        m.serialize_field("duration_ms", &ms)?;
        m.serialize_field("pid", &t.pid)?;
        m.serialize_field("comm", &t.comm)?;
        m.serialize_field("owner_source", t.owner_source.as_str())?;
        // Present (true) only on rows connwatch inferred rather than saw.
        if t.synthetic {
            m.serialize_field("synthetic", &true)?;
        }
        // How a TIME_WAIT ended: `expired` or `early`.
        if let Some(end) = t.end {
            m.serialize_field("end", end)?;
        }
        // Present only with --stacks, on transitions into CLOSE_WAIT whose socket's
        // making was captured.
        if let Some(site) = &t.stack {
            m.serialize_field("stack", &site.stack)?;
        }
        m.end()
    }
}

pub fn json_line(t: &Row, clock: &WallClock) -> String {
    // A struct of strings and numbers always serializes.
    serde_json::to_string(&Json(t, clock)).unwrap_or_default()
}

/// `json_line` and a newline, serialized straight into `w`.
pub fn write_json_line(w: &mut impl Write, t: &Row, clock: &WallClock) -> io::Result<()> {
    serde_json::to_writer(&mut *w, &Json(t, clock)).map_err(io::Error::other)?;
    writeln!(w)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use connwatch_common::{AF_INET6, owner_source, tcp_state};

    use super::*;
    use crate::decode::{from_event, tests::v4_event};

    fn clock() -> WallClock {
        // 2026-11-25T16:40:00Z minus the 5 s monotonic timestamp of the test event.
        WallClock::with_epoch(UNIX_EPOCH + Duration::from_secs(1_795_624_795))
    }

    #[test]
    fn the_stream_never_goes_back_in_time() {
        let t = from_event(&v4_event(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)).unwrap();
        let mut order = InOrder::default();
        let mut late = Row::from(&t);
        late.ts_ns = 10_000;
        order.place(&mut late);
        // An expiry noticed after that row, due 1.1 s before it: placed at its time,
        // its duration untouched.
        let mut expired = Row::from(&t);
        expired.ts_ns = 10_000 - 1_100;
        expired.duration_ns = Some(60_000);
        order.place(&mut expired);
        assert_eq!((expired.ts_ns, expired.duration_ns), (10_000, Some(60_000)));
        let mut next = Row::from(&t);
        next.ts_ns = 12_000;
        order.place(&mut next);
        assert_eq!(next.ts_ns, 12_000);
    }

    #[test]
    fn json_has_exactly_the_documented_keys_in_order() {
        let t = from_event(&v4_event(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)).unwrap();
        assert_eq!(
            json_line(&Row::from(&t), &clock()),
            r#"{"time":"2026-11-25T16:40:00.000000Z","family":"ipv4","saddr":"127.0.0.1","sport":43210,"daddr":"10.1.2.3","dport":8080,"old":"ESTABLISHED","new":"FIN_WAIT1","duration_ms":1000.0,"pid":1234,"comm":"curl","owner_source":"context"}"#
        );
    }

    #[test]
    fn json_unknown_owner_and_unseen_entry_are_null() {
        let mut ev = v4_event(tcp_state::CLOSE, 77);
        ev.owner_source = owner_source::UNKNOWN;
        ev.old_since_ns = 0;
        ev.family = AF_INET6;
        ev.saddr = [0; 16];
        ev.saddr[15] = 1;
        let t = from_event(&ev).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&Row::from(&t), &clock())).unwrap();
        assert_eq!(v["pid"], serde_json::Value::Null);
        assert_eq!(v["comm"], serde_json::Value::Null);
        assert_eq!(v["duration_ms"], serde_json::Value::Null);
        assert_eq!(v["owner_source"], "unknown");
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["saddr"], "::1");
        assert_eq!(v["new"], "STATE_77");
    }

    #[test]
    fn human_row_is_aligned_with_header() {
        let t = from_event(&v4_event(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)).unwrap();
        let row = human_row(&Row::from(&t), &clock());
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [
                "16:40:00.000000",
                "1234",
                "curl",
                "127.0.0.1:43210",
                "10.1.2.3:8080",
                "ESTABLISHED",
                "->",
                "FIN_WAIT1",
                "1000.000"
            ]
        );
        let h = header();
        // Every column starts where its header starts.
        for (col, value) in [("COMM", "curl"), ("RADDR", "10.1.2.3"), ("MS", "1000.000")] {
            let hpos = h.find(col).unwrap();
            let vpos = row.find(value).unwrap();
            if col == "MS" {
                // Right-aligned: both end at the same column.
                assert_eq!(hpos + col.len(), vpos + value.len());
            } else {
                assert_eq!(hpos, vpos, "{col}");
            }
        }
    }

    #[test]
    fn synthetic_time_wait_rows_carry_their_markers() {
        use crate::{
            monitor::table::SockKey,
            monitor::timewait::{End, TwOwner},
        };
        let s = Synthetic {
            key: SockKey {
                netns: 1,
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: "127.0.0.1:8080".parse().unwrap(),
            },
            ts_ns: 65_000_000_000,
            old: TcpState::TIME_WAIT,
            new: TcpState::CLOSE,
            duration_ns: Some(60_000_000_000),
            owner: Some(TwOwner {
                pid: 42,
                comm: "client".into(),
            }),
            owner_source: OwnerSource::Carried,
            end: Some(End::Expired),
        };
        let line = json_line(&Row::from(&s), &clock());
        assert!(
            line.ends_with(r#""duration_ms":60000.0,"pid":42,"comm":"client","owner_source":"carried","synthetic":true,"end":"expired"}"#),
            "{line}"
        );
        let human = human_row(&Row::from(&s), &clock());
        assert!(
            human.contains("TIME_WAIT   -> CLOSE")
                && human.ends_with("60000.000  (synthetic, expired)"),
            "{human}"
        );
        // Rows the probe saw carry neither key.
        let t = from_event(&v4_event(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)).unwrap();
        let seen = json_line(&Row::from(&t), &clock());
        assert!(!seen.contains("synthetic") && !seen.contains("\"end\""));
    }

    /// The row as `core::fmt` widths wrote it before `RowBuf`.
    fn reference_row(t: &Row, clock: &WallClock) -> String {
        let stamp = humantime::format_rfc3339_micros(clock.wall(t.ts_ns)).to_string();
        let mut out = format!("{:<15} ", &stamp[11..26]);
        match t.pid {
            Some(pid) => out += &format!("{pid:>7} "),
            None => out += &format!("{:>7} ", "-"),
        }
        out += &format!(
            "{:<16} {:<26} {:<26} {:<11} -> ",
            t.comm.unwrap_or("-"),
            t.local,
            t.remote,
            t.old
        );
        let note = match (t.synthetic, t.end) {
            (true, Some(end)) => Some(end),
            (true, None) => Some(""),
            _ => None,
        };
        match (duration_ms(t), note) {
            (None, None) => out += &format!("{}", t.new),
            (ms, _) => {
                out += &format!("{:<11} ", t.new);
                match ms {
                    Some(ms) => out += &format!("{ms:>10.3}"),
                    None => out += &format!("{:>10}", ""),
                }
            }
        }
        match note {
            Some("") => out += "  (synthetic)",
            Some(end) => out += &format!("  (synthetic, {end})"),
            None => {}
        }
        out
    }

    #[test]
    fn human_rows_match_the_fmt_widths() {
        let long = "[2001:db8:1234:5678:9abc:def0:1234:5678]:65535";
        let addrs = ["127.0.0.1:43210", "[::1]:8080", long];
        let mut n = 0;
        for (i, local) in addrs.iter().enumerate() {
            for (old, new, since) in [
                (tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1, 1),
                (tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT, 0),
                (tcp_state::CLOSE, 77, 0),
                (99, tcp_state::CLOSE, 3),
            ] {
                let mut ev = v4_event(old, new);
                ev.old_since_ns = if since == 0 {
                    0
                } else {
                    ev.ts_ns - since * 1_234_567
                };
                ev.owner_source = (i % 2) as u8;
                let mut t = from_event(&ev).unwrap();
                t.local = local.parse().unwrap();
                t.remote = addrs[(i + 1) % 3].parse().unwrap();
                let row = Row::from(&t);
                assert_eq!(human_row(&row, &clock()), reference_row(&row, &clock()));
                let synthetic = Row {
                    synthetic: true,
                    end: [None, Some("early")][i % 2],
                    stack: None,
                    ..Row::from(&t)
                };
                assert_eq!(
                    human_row(&synthetic, &clock()),
                    reference_row(&synthetic, &clock())
                );
                n += 2;
            }
        }
        assert_eq!(n, 24);
    }

    #[test]
    fn human_row_unknown_owner_shows_dashes_and_no_ms() {
        let mut ev = v4_event(tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT);
        ev.owner_source = owner_source::UNKNOWN;
        ev.old_since_ns = 0;
        let row = human_row(&Row::from(&from_event(&ev).unwrap()), &clock());
        let cols: Vec<_> = row.split_whitespace().collect();
        assert_eq!(cols[1], "-");
        assert_eq!(cols[2], "-");
        assert_eq!(cols.last(), Some(&"CLOSE_WAIT"));
    }
}
