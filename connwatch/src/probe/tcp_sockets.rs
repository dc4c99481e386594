//! The sockets that exist, listed by the probe's `iter/tcp` program: the start-up
//! seed's source wherever the kernel has BTF (sock_diag remains the fallback). One
//! pass lists the TCP sockets of the network namespace of the thread that opens it,
//! with what the seed took from `tcp_info` (ages, bytes received) read as plain fields
//! instead of a `tcp_info` built, under the socket's lock, for every socket.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{Btf, Ebpf, programs::Iter};
use connwatch_common::{AF_INET, PROG_TCP_SOCKETS, TcpSocket, tcp_socket_kind, tcp_state};

use super::iter_file::for_each_batch;
use crate::{decode::TcpState, host::sockdiag::DiagSocket};

/// The loaded iterator; each `list` is one pass over the calling thread's namespace.
pub struct TcpSockets {
    ebpf: Arc<Mutex<Ebpf>>,
}

impl TcpSockets {
    pub fn load(ebpf: &Arc<Mutex<Ebpf>>, btf: &Btf) -> Result<Self> {
        let mut guard = ebpf.lock().map_err(|_| anyhow!("probe lock poisoned"))?;
        let prog: &mut Iter = guard
            .program_mut(PROG_TCP_SOCKETS)
            .context("the probe has no TCP socket iterator")?
            .try_into()?;
        prog.load("tcp", btf)
            .context("cannot load the TCP socket iterator")?;
        drop(guard);
        Ok(Self {
            ebpf: Arc::clone(ebpf),
        })
    }

    /// The TCP sockets of the calling thread's network namespace (the kernel binds an
    /// iterator to the namespace of the task that opens it).
    pub fn list(&self) -> io::Result<Vec<DiagSocket>> {
        let mut records = Records::default();
        self.read(|batch| records.feed(batch).map(|_| ()))?;
        Ok(records.sockets)
    }

    /// One pass over the calling thread's namespace, its output handed to `each` as it
    /// is read, in batches of whole records for `Records` to parse (on another thread,
    /// say, while the kernel goes on listing).
    pub fn read(&self, each: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let file = {
            let mut guard = self
                .ebpf
                .lock()
                .map_err(|_| io::Error::other("probe lock poisoned"))?;
            let prog: &mut Iter = guard
                .program_mut(PROG_TCP_SOCKETS)
                .ok_or_else(|| io::Error::other("the probe has no TCP socket iterator"))?
                .try_into()
                .map_err(io::Error::other)?;
            let link = prog.attach().map_err(io::Error::other)?;
            prog.take_link(link)
                .map_err(io::Error::other)?
                .into_file()
                .map_err(io::Error::other)?
        };
        for_each_batch(&file, size_of::<TcpSocket>(), each)
    }
}

/// The iterator's output, parsed as it is read: a header, then one record per socket;
/// nothing at all for a namespace without sockets (the kernel then does not run the
/// program).
#[derive(Default)]
pub struct Records {
    /// The kernel's tick rate, from the header (`None` until it is read).
    hz: Option<u32>,
    pub sockets: Vec<DiagSocket>,
}

impl Records {
    /// The next records of the output (whole ones); where in `sockets` theirs begin.
    pub fn feed(&mut self, batch: &[u8]) -> io::Result<usize> {
        let start = self.sockets.len();
        let mut records = batch.chunks_exact(size_of::<TcpSocket>()).map(record);
        let hz = match self.hz {
            Some(hz) => hz,
            None => {
                let Some(header) = records.next() else {
                    return Ok(start);
                };
                if header.kind != tcp_socket_kind::HEADER {
                    return Err(io::Error::other("the TCP socket iterator wrote no header"));
                }
                let hz = tick_rate(header.now_jiffies, header.now_ns).ok_or_else(|| {
                    io::Error::other("cannot tell the kernel's tick rate (uptime near 300 s)")
                })?;
                *self.hz.insert(hz)
            }
        };
        self.sockets.extend(records.filter_map(|r| socket(&r, hz)));
        Ok(start)
    }
}

/// A whole output of the iterator (see `Records`).
#[cfg(test)]
fn parse(bytes: &[u8]) -> io::Result<Vec<DiagSocket>> {
    let mut records = Records::default();
    records.feed(bytes)?;
    Ok(records.sockets)
}

fn record(bytes: &[u8]) -> TcpSocket {
    // SAFETY: `bytes` holds exactly `size_of::<TcpSocket>()` bytes (`chunks_exact`), and
    // `TcpSocket` is plain data valid for any bit pattern (`aya::Pod`); the read is
    // unaligned-safe.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TcpSocket>()) }
}

/// The kernel's tick rate (HZ), from `jiffies_64` and CLOCK_MONOTONIC read at one
/// moment: jiffies start at `2^32 - 300 * HZ` at boot (`INITIAL_JIFFIES`, so that they
/// wrap five minutes in) and count HZ a second. The rate that fits within two
/// seconds of ticks is the answer; none, or two, when the uptime is too near the
/// five minutes for the rates to differ (within about 12 s of it): then the seed asks
/// sock_diag instead.
pub fn tick_rate(now_jiffies: u64, now_ns: u64) -> Option<u32> {
    // The rates x86-64 and arm64 kernels can be built with.
    const RATES: [u32; 4] = [100, 250, 300, 1000];
    let secs = now_ns as f64 / 1e9;
    let fits = |hz: u32| {
        let hz = f64::from(hz);
        let expected = (1u64 << 32) as f64 + hz * (secs - 300.0);
        (now_jiffies as f64 - expected).abs() <= 2.0 * hz
    };
    let mut found = RATES.into_iter().filter(|&hz| fits(hz));
    match (found.next(), found.next()) {
        (Some(hz), None) => Some(hz),
        _ => None,
    }
}

/// jiffies to ms, rounded up as the kernel's `jiffies_to_msecs`.
fn ms(jiffies: u32, hz: u32) -> u32 {
    let ms = (u64::from(jiffies) * 1000).div_ceil(u64::from(hz));
    u32::try_from(ms).unwrap_or(u32::MAX)
}

/// A record as sock_diag would have listed the socket (with what the seed reads of
/// `tcp_info` for a CLOSE_WAIT or FIN_WAIT2 one); `None` for a header or an unknown
/// kind.
fn socket(r: &TcpSocket, hz: u32) -> Option<DiagSocket> {
    let addr = |raw: [u8; 16]| -> IpAddr {
        if r.family == AF_INET {
            let [a, b, c, d, ..] = raw;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        } else {
            IpAddr::V6(Ipv6Addr::from(raw))
        }
    };
    let aged = r.kind == tcp_socket_kind::FULL_AGED;
    let state = match r.kind {
        tcp_socket_kind::FULL | tcp_socket_kind::FULL_AGED | tcp_socket_kind::TIMEWAIT => r.state,
        // sock_diag names a handshake in progress SYN_RECV.
        tcp_socket_kind::REQUEST => tcp_state::SYN_RECV,
        _ => return None,
    };
    let info = |v: u32| aged.then_some(v);
    Some(DiagSocket {
        state: TcpState(state),
        local: SocketAddr::new(addr(r.saddr), r.sport),
        remote: SocketAddr::new(addr(r.daddr), r.dport),
        inode: r.inode,
        uid: r.uid,
        recv_q: r.recv_q,
        timewait: r.kind == tcp_socket_kind::TIMEWAIT,
        expires_ms: ms(r.expires, hz),
        last_ack_recv_ms: info(ms(r.since_ack, hz)),
        last_data_recv_ms: info(ms(r.since_recv, hz)),
        last_data_sent_ms: info(ms(r.since_sent, hz)),
        bytes_received: aged.then_some(r.bytes_received),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(recs: &[TcpSocket]) -> Vec<u8> {
        recs.iter()
            .flat_map(|r| {
                // SAFETY: plain data, read as bytes.
                unsafe {
                    std::slice::from_raw_parts(
                        std::ptr::from_ref(r).cast::<u8>(),
                        size_of::<TcpSocket>(),
                    )
                }
                .to_vec()
            })
            .collect()
    }

    /// `jiffies_64` after `secs` of uptime at `hz`.
    fn jiffies(hz: u64, secs: u64) -> u64 {
        (1u64 << 32) - 300 * hz + hz * secs
    }

    #[test]
    fn tells_the_tick_rate_from_uptime() {
        for hz in [100, 250, 300, 1000] {
            for secs in [1, 200, 400, 7 * 3600, 90 * 86_400] {
                let j = jiffies(u64::from(hz), secs);
                assert_eq!(
                    tick_rate(j, secs * 1_000_000_000),
                    Some(hz),
                    "{hz} Hz {secs} s"
                );
                // Half a second of skew between the two clocks changes nothing.
                assert_eq!(
                    tick_rate(j + u64::from(hz) / 2, secs * 1_000_000_000),
                    Some(hz)
                );
            }
        }
        // At five minutes every rate fits: no guess.
        assert_eq!(tick_rate(1 << 32, 300 * 1_000_000_000), None);
        // Nothing fits: no guess either.
        assert_eq!(tick_rate(5, 3_600 * 1_000_000_000), None);
    }

    #[test]
    fn records_read_as_sock_diag_would_list_them() {
        let header = TcpSocket {
            kind: tcp_socket_kind::HEADER,
            now_jiffies: jiffies(250, 1000),
            now_ns: 1000 * 1_000_000_000,
            ..TcpSocket::default()
        };
        let mut cw = TcpSocket {
            kind: tcp_socket_kind::FULL_AGED,
            state: tcp_state::CLOSE_WAIT,
            family: AF_INET,
            sport: 8080,
            dport: 40_000,
            uid: 1000,
            recv_q: 5,
            inode: 4242,
            since_ack: 250,
            since_recv: 500,
            since_sent: 3,
            bytes_received: 77,
            ..TcpSocket::default()
        };
        cw.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        cw.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let mut tw = TcpSocket {
            kind: tcp_socket_kind::TIMEWAIT,
            state: tcp_state::FIN_WAIT2,
            family: connwatch_common::AF_INET6,
            sport: 1,
            dport: 2,
            expires: 1000,
            ..TcpSocket::default()
        };
        tw.saddr[15] = 1;
        let req = TcpSocket {
            kind: tcp_socket_kind::REQUEST,
            state: tcp_state::NEW_SYN_RECV,
            family: AF_INET,
            ..TcpSocket::default()
        };
        let unknown = TcpSocket { kind: 9, ..cw };
        let established = TcpSocket {
            kind: tcp_socket_kind::FULL,
            state: tcp_state::ESTABLISHED,
            ..cw
        };
        let mut raw = bytes(&[header, cw, tw, req, unknown, established]);
        // A torn tail is ignored rather than misread.
        raw.extend([1, 2, 3]);
        let socks = parse(&raw).unwrap();
        assert_eq!(socks.len(), 4);
        let s = &socks[0];
        assert_eq!(s.state, TcpState::CLOSE_WAIT);
        assert_eq!(s.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.remote, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(
            (s.inode, s.uid, s.recv_q, s.timewait),
            (4242, 1000, 5, false)
        );
        assert_eq!(s.last_ack_recv_ms, Some(1000));
        assert_eq!(s.last_data_recv_ms, Some(2000));
        assert_eq!(s.last_data_sent_ms, Some(12));
        assert_eq!(s.bytes_received, Some(77));
        let t = &socks[1];
        assert!(t.timewait);
        assert_eq!(t.state, TcpState::FIN_WAIT2);
        assert_eq!(t.local, "[::1]:1".parse().unwrap());
        assert_eq!(t.expires_ms, 4000);
        assert_eq!((t.last_ack_recv_ms, t.bytes_received), (None, None));
        assert_eq!(socks[2].state, TcpState::SYN_RECV);
        // Ages only where the reports read them.
        let e = &socks[3];
        assert_eq!(
            (e.state, e.inode, e.recv_q),
            (TcpState(tcp_state::ESTABLISHED), 4242, 5)
        );
        assert_eq!((e.last_ack_recv_ms, e.bytes_received), (None, None));
        // No header: an error, not an empty list; nothing at all is no socket.
        assert!(parse(&bytes(&[cw])).is_err());
        assert!(parse(&[]).unwrap().is_empty());
    }
}
