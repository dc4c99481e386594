//! Kernel settings and counters that decide how much TIME_WAIT costs: the ephemeral port
//! range, `tcp_tw_reuse`, the timewait table size and how often it overflowed. Read per
//! network namespace (these sysctls are per namespace).
use std::ops::RangeInclusive;

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelInfo {
    /// `net.ipv4.ip_local_port_range`.
    pub ip_local_port_range: [u16; 2],
    /// `net.ipv4.tcp_tw_reuse` (0 off, 1 on, 2 loopback only).
    pub tcp_tw_reuse: Option<u32>,
    /// `net.ipv4.tcp_max_tw_buckets`: above this, TIME_WAIT sockets are not kept.
    pub tcp_max_tw_buckets: Option<u64>,
    /// `TcpExt: TCPTimeWaitOverflow` from /proc/net/netstat: TIME_WAITs the kernel dropped.
    pub time_wait_overflow: Option<u64>,
}

impl KernelInfo {
    /// Reads the settings of the calling thread's network namespace.
    pub fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        Self {
            ip_local_port_range: read("/proc/sys/net/ipv4/ip_local_port_range")
                .and_then(|s| parse_port_range(&s))
                .unwrap_or([32768, 60999]),
            tcp_tw_reuse: read("/proc/sys/net/ipv4/tcp_tw_reuse")
                .and_then(|s| s.trim().parse().ok()),
            tcp_max_tw_buckets: read("/proc/sys/net/ipv4/tcp_max_tw_buckets")
                .and_then(|s| s.trim().parse().ok()),
            time_wait_overflow: read("/proc/thread-self/net/netstat")
                .and_then(|s| netstat_counter(&s, "TcpExt", "TCPTimeWaitOverflow")),
        }
    }

    pub fn ephemeral(&self) -> RangeInclusive<u16> {
        self.ip_local_port_range[0]..=self.ip_local_port_range[1]
    }

    pub fn ephemeral_count(&self) -> u64 {
        u64::from(self.ip_local_port_range[1].saturating_sub(self.ip_local_port_range[0])) + 1
    }
}

/// The timewait sockets (both substates) the kernel holds in the network namespace of
/// a process (`/proc/PID`, `/proc/self`, `/proc/thread-self`), from the `tw` field of
/// its net/sockstat.
pub fn timewait_count(proc_dir: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_dir.join("net/sockstat")).ok()?;
    sockstat_timewait(&text)
}

/// `tw` of the `TCP:` line of /proc/net/sockstat.
pub fn sockstat_timewait(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

pub fn parse_port_range(s: &str) -> Option<[u16; 2]> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (lo <= hi).then_some([lo, hi])
}

/// A counter from /proc/net/netstat, which pairs a header line (`TcpExt: A B …`) with a
/// value line (`TcpExt: 1 2 …`).
pub fn netstat_counter(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let idx = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(idx)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timewait_count_from_sockstat() {
        let text = "sockets: used 312\nTCP: inuse 21 orphan 0 tw 14000 alloc 57 mem 3\n";
        assert_eq!(sockstat_timewait(text), Some(14_000));
        assert_eq!(sockstat_timewait("UDP: inuse 4 mem 2\n"), None);
        let own = timewait_count(std::path::Path::new("/proc/self"));
        assert!(own.is_some(), "this host's /proc/self/net/sockstat");
        assert_eq!(timewait_count(std::path::Path::new("/run/netns/x")), None);
    }

    #[test]
    fn parses_netstat_and_range() {
        let text =
            "TcpExt: SyncookiesSent TCPTimeWaitOverflow X\nTcpExt: 0 17 3\nIpExt: A\nIpExt: 1\n";
        assert_eq!(
            netstat_counter(text, "TcpExt", "TCPTimeWaitOverflow"),
            Some(17)
        );
        assert_eq!(netstat_counter(text, "TcpExt", "Nope"), None);
        assert_eq!(parse_port_range("32768\t60999\n"), Some([32768, 60999]));
        assert_eq!(parse_port_range("5 4"), None);
        assert_eq!(parse_port_range("x"), None);
    }

    #[test]
    fn reads_this_machine() {
        let k = KernelInfo::read();
        assert!(k.ephemeral_count() > 1);
        assert!(k.tcp_max_tw_buckets.is_some());
        assert!(k.time_wait_overflow.is_some());
    }
}
