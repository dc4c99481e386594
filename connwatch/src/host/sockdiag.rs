//! TCP socket dumps through netlink `sock_diag` (what `ss` uses), for the sockets that
//! existed before connwatch started and for periodic reconciliation. Sees the network
//! namespace it runs in.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

use crate::decode::TcpState;

/// One TCP socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub state: TcpState,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Socket inode (`socket:[N]` in /proc/PID/fd); 0 for timewait and orphan sockets.
    pub inode: u64,
    pub uid: u32,
    /// Recv-Q: bytes received but not read by the process (the TCP socket iterator
    /// reads it only for CLOSE_WAIT and FIN_WAIT2 sockets, 0 for the others).
    pub recv_q: u32,
    /// A timewait socket (`struct inet_timewait_sock`): TIME_WAIT, or FIN_WAIT2 of an
    /// orphan whose process already closed it.
    pub timewait: bool,
    /// ms until the active timer fires (for timewait sockets: until the socket goes).
    pub expires_ms: u32,
    /// `tcpi_last_ack_recv`: ms since the last ACK from the peer (with `Info` requested).
    pub last_ack_recv_ms: Option<u32>,
    /// `tcpi_last_data_recv`: ms since the last data from the peer (with `Info`).
    pub last_data_recv_ms: Option<u32>,
    /// `tcpi_last_data_sent`: ms since we last sent data (with `Info`).
    pub last_data_sent_ms: Option<u32>,
    /// `tcpi_bytes_received`: bytes the peer sent over the connection's life (with
    /// `Info`, Linux 4.1+), the FIN perhaps counted as one.
    pub bytes_received: Option<u64>,
}

/// What to dump.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    /// Bit `1 << state` for each state wanted.
    pub states: u32,
    /// Ask the kernel for `tcp_info` (costlier: only where ages are needed).
    pub tcp_info: bool,
}

impl Query {
    pub fn all() -> Self {
        Self {
            states: u32::MAX,
            tcp_info: false,
        }
    }

    /// Every socket with its `tcp_info` (the seed's dump where there is no iterator).
    pub fn all_with_info() -> Self {
        Self {
            tcp_info: true,
            ..Self::all()
        }
    }

    pub fn states(states: &[TcpState], tcp_info: bool) -> Self {
        Self {
            states: states.iter().fold(0, |acc, s| acc | (1 << s.0)),
            tcp_info,
        }
    }
}

/// Dumps the TCP sockets (IPv4 and IPv6) of the current network namespace.
pub fn dump(query: Query) -> io::Result<Vec<DiagSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        request(&socket, family, query)?;
        receive(&socket, &mut out)?;
    }
    Ok(out)
}

/// Requests sent in one datagram by `lookup`: their replies (one message each) must
/// fit in the socket's receive buffer at once.
const LOOKUP_BATCH: usize = 64;

/// Looks up single sockets by (local, remote) in the current network namespace, as
/// `ss` does for one socket: the sockets found (timewait ones included), in no order.
/// Costs a message per socket instead of a dump of every socket in the state: what
/// tells an orphan's FIN_WAIT2 that turned TIME_WAIT from one that ended.
pub fn lookup(pairs: &[(SocketAddr, SocketAddr)]) -> io::Result<Vec<DiagSocket>> {
    let mut out = Vec::new();
    if pairs.is_empty() {
        return Ok(out);
    }
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    let mut buf = vec![0u8; 64 * 1024];
    for batch in pairs.chunks(LOOKUP_BATCH) {
        let mut bytes = Vec::with_capacity(batch.len() * 80);
        for (local, remote) in batch {
            bytes.extend(exact_request(*local, *remote));
        }
        socket.send(&bytes, 0)?;
        // One reply per request: the socket, or an error (ENOENT: it is gone).
        let mut replies = 0;
        while replies < batch.len() {
            let n = socket.recv(&mut buf.as_mut_slice(), 0)?;
            replies += parse_replies(buf.get(..n).unwrap_or_default(), &mut out)?;
        }
    }
    Ok(out)
}

/// A request for the one socket with this (local, remote).
fn exact_request(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match by address alone.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// Parses the replies to exact requests in one datagram: the sockets found go to
/// `out`; returns how many replies (sockets and errors) it held.
fn parse_replies(bytes: &[u8], out: &mut Vec<DiagSocket>) -> io::Result<usize> {
    let mut replies = 0;
    for_each_message(bytes, |kind, payload| {
        match kind {
            NLMSG_ERROR => {
                // ENOENT: no such socket. Anything else is a real failure.
                let errno = errno_of(payload);
                if errno != 0 && errno != libc::ENOENT {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                replies += 1;
            }
            SOCK_DIAG_BY_FAMILY => {
                out.push(socket_of(payload)?);
                replies += 1;
            }
            _ => {}
        }
        Ok(false)
    })?;
    Ok(replies)
}

fn request(socket: &Socket, family: u8, query: Query) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: if query.tcp_info {
                ExtensionFlags::INFO
            } else {
                ExtensionFlags::empty()
            },
            states: StateFlags::from_bits_truncate(query.states),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

fn receive(socket: &Socket, out: &mut Vec<DiagSocket>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut buf.as_mut_slice(), 0)?;
        if parse_datagram(buf.get(..n).unwrap_or_default(), out)? {
            return Ok(());
        }
    }
}

/// Parses one netlink datagram of a dump; `true` once the dump is done.
///
/// Responses are parsed by hand from their fixed kernel layout (`nlmsghdr`,
/// `inet_diag_msg`, `rtattr`) rather than through the netlink crate: a poll of 100k
/// timewait sockets is 100k messages a second, and this path allocates nothing per
/// socket. Requests are still built with the crate.
pub fn parse_datagram(bytes: &[u8], out: &mut Vec<DiagSocket>) -> io::Result<bool> {
    for_each_message(bytes, |kind, payload| {
        match kind {
            NLMSG_DONE => return Ok(true),
            // 0 is an acknowledgement.
            NLMSG_ERROR if errno_of(payload) != 0 => {
                return Err(io::Error::from_raw_os_error(errno_of(payload)));
            }
            SOCK_DIAG_BY_FAMILY => out.push(socket_of(payload)?),
            _ => {}
        }
        Ok(false)
    })
}

/// Calls `f(type, payload)` for each netlink message of a datagram, until it returns
/// `true` (then so does this) or an error.
fn for_each_message(
    mut bytes: &[u8],
    mut f: impl FnMut(u16, &[u8]) -> io::Result<bool>,
) -> io::Result<bool> {
    while !bytes.is_empty() {
        let len = u32_at(bytes, 0).ok_or_else(|| bad("short netlink header".into()))? as usize;
        let kind = u16_at(bytes, 4).unwrap_or(0);
        if len < NLMSG_HDRLEN || len > bytes.len() {
            return Err(bad(format!("message length {len}")));
        }
        if f(kind, bytes.get(NLMSG_HDRLEN..len).unwrap_or_default())? {
            return Ok(true);
        }
        // Messages are 4-byte aligned.
        bytes = bytes.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(false)
}

fn bad(e: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {e}"))
}

/// The positive errno of an `NLMSG_ERROR` (0: an acknowledgement). Saturating: the
/// bytes are untrusted and -i32::MIN overflows (found by fuzzing).
fn errno_of(payload: &[u8]) -> i32 {
    u32_at(payload, 0).map_or(0, |e| e as i32).saturating_neg()
}

fn socket_of(payload: &[u8]) -> io::Result<DiagSocket> {
    parse_inet_diag(payload)
        .ok_or_else(|| bad(format!("inet_diag message of {} bytes", payload.len())))
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_INFO: u16 = 2;
const TIMER_TIMEWAIT: u8 = 3;
/// Offsets of fields of `struct tcp_info` (include/uapi/linux/tcp.h).
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_LAST_ACK_RECV: usize = 56;
const TCPI_BYTES_RECEIVED: usize = 128;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// `struct inet_diag_msg` and its attributes.
fn parse_inet_diag(p: &[u8]) -> Option<DiagSocket> {
    let head: &[u8; INET_DIAG_MSG_LEN] = p.get(..INET_DIAG_MSG_LEN)?.try_into().ok()?;
    let [family, state, timer, _retrans, s0, s1, d0, d1, ..] = *head;
    let (sport, dport) = (u16::from_be_bytes([s0, s1]), u16::from_be_bytes([d0, d1]));
    let addr = |off: usize| -> Option<IpAddr> {
        let raw: [u8; 16] = p.get(off..off + 16)?.try_into().ok()?;
        Some(if family == AF_INET {
            let [a, b, c, d, ..] = raw;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        } else {
            IpAddr::V6(Ipv6Addr::from(raw))
        })
    };
    let (src, dst) = (addr(8)?, addr(24)?);
    let (mut last_ack_recv_ms, mut last_data_recv_ms) = (None, None);
    let (mut last_data_sent_ms, mut bytes_received) = (None, None);
    let mut attrs = p.get(INET_DIAG_MSG_LEN..).unwrap_or_default();
    while attrs.len() >= 4 {
        let alen = usize::from(u16_at(attrs, 0)?);
        let atype = u16_at(attrs, 2)?;
        if alen < 4 || alen > attrs.len() {
            break;
        }
        if atype == INET_DIAG_INFO {
            let info = attrs.get(4..alen).unwrap_or_default();
            last_ack_recv_ms = u32_at(info, TCPI_LAST_ACK_RECV);
            last_data_recv_ms = u32_at(info, TCPI_LAST_DATA_RECV);
            last_data_sent_ms = u32_at(info, TCPI_LAST_DATA_SENT);
            bytes_received = info
                .get(TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_ne_bytes);
        }
        attrs = attrs.get((alen + 3) & !3..).unwrap_or(&[]);
    }
    Some(DiagSocket {
        state: TcpState(state),
        local: SocketAddr::new(src, sport),
        remote: SocketAddr::new(dst, dport),
        inode: u64::from(u32_at(p, 68)?),
        uid: u32_at(p, 64)?,
        recv_q: u32_at(p, 56)?,
        timewait: timer == TIMER_TIMEWAIT,
        expires_ms: if timer != 0 { u32_at(p, 52)? } else { 0 },
        last_ack_recv_ms,
        last_data_recv_ms,
        last_data_sent_ms,
        bytes_received,
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage};
    use netlink_packet_sock_diag::inet::{InetResponse, InetResponseHeader, Timer, nlas::Nla};

    use super::*;

    fn response(state: u8, timer: Option<Timer>, nlas: Vec<Nla>) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            SockDiagMessage::InetResponse(Box::new(InetResponse {
                header: InetResponseHeader {
                    family: AF_INET,
                    state,
                    timer,
                    socket_id: SocketId {
                        source_port: 8080,
                        destination_port: 43210,
                        source_address: "127.0.0.1".parse().unwrap(),
                        destination_address: "127.0.0.2".parse().unwrap(),
                        interface_id: 0,
                        cookie: [0; 8],
                    },
                    recv_queue: 17,
                    send_queue: 0,
                    uid: 1000,
                    inode: 4242,
                },
                nlas: nlas.into(),
            }))
            .into(),
        );
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn parses_a_close_wait_socket() {
        let bytes = response(8, None, vec![]);
        let mut out = Vec::new();
        assert!(!parse_datagram(&bytes, &mut out).unwrap());
        assert_eq!(out.len(), 1);
        let s = &out[0];
        assert_eq!(s.state, TcpState(8));
        assert_eq!(s.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.remote, "127.0.0.2:43210".parse().unwrap());
        assert_eq!((s.inode, s.uid, s.recv_q), (4242, 1000, 17));
        assert!(!s.timewait);
        assert_eq!(s.last_ack_recv_ms, None);
    }

    #[test]
    fn parses_last_ack_recv_from_tcp_info() {
        // An INET_DIAG_INFO attribute holding a tcp_info with tcpi_last_ack_recv set.
        let mut bytes = response(8, None, vec![]);
        let mut info = vec![0u8; 104];
        info[TCPI_LAST_ACK_RECV..TCPI_LAST_ACK_RECV + 4].copy_from_slice(&3924u32.to_ne_bytes());
        bytes.extend(((4 + info.len()) as u16).to_ne_bytes());
        bytes.extend(INET_DIAG_INFO.to_ne_bytes());
        bytes.extend(info);
        let len = bytes.len() as u32;
        bytes[..4].copy_from_slice(&len.to_ne_bytes());
        let mut out = Vec::new();
        parse_datagram(&bytes, &mut out).unwrap();
        assert_eq!(out[0].last_ack_recv_ms, Some(3924));
    }

    #[test]
    fn timewait_expiry_is_read() {
        let bytes = response(6, Some(Timer::TimeWait), vec![]);
        let mut out = Vec::new();
        parse_datagram(&bytes, &mut out).unwrap();
        assert!(out[0].timewait);
        // The crate cannot emit a timewait expiry: patch it into idiag_expires.
        let mut raw = bytes.clone();
        raw[16 + 52..16 + 56].copy_from_slice(&42_000u32.to_ne_bytes());
        let mut out = Vec::new();
        parse_datagram(&raw, &mut out).unwrap();
        assert_eq!(out[0].expires_ms, 42_000);
    }

    #[test]
    fn done_and_error_messages() {
        let mut done = vec![0u8; 20];
        done[..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(parse_datagram(&done, &mut Vec::new()).unwrap());
        let mut err = done.clone();
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-13i32).to_ne_bytes());
        let e = parse_datagram(&err, &mut Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(13));
    }

    /// Regression: an NLMSG_ERROR carrying i32::MIN made the negation overflow.
    #[test]
    fn fuzz_crash_error_with_min_errno() {
        let input: [u8; 77] = [
            73, 0, 0, 0, 2, 0, 0, 0, 20, 1, 0, 0, 29, 0, 0, 130, 0, 0, 0, 128, 0, 0, 0, 3, 85, 85,
            85, 85, 0, 0, 0, 0, 0, 253, 255, 255, 255, 255, 255, 255, 255, 203, 255, 255, 255, 255,
            255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 255, 255, 255, 255, 255, 255, 255, 195, 0,
        ];
        assert!(parse_datagram(&input, &mut Vec::new()).is_err());
    }

    #[test]
    fn parses_several_messages_in_one_datagram() {
        let mut bytes = response(8, None, vec![]);
        bytes.extend(response(6, Some(Timer::TimeWait), vec![]));
        let mut out = Vec::new();
        parse_datagram(&bytes, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out[1].timewait);
    }

    #[test]
    fn truncated_datagram_is_an_error_not_a_panic() {
        let bytes = response(8, None, vec![]);
        for cut in [1, 10, 20, bytes.len() - 1] {
            let mut out = Vec::new();
            let _ = parse_datagram(&bytes[..cut], &mut out);
        }
        let mut out = Vec::new();
        assert!(parse_datagram(&bytes[..20], &mut out).is_err());
    }

    /// Against the running kernel: a listening socket this test opens shows up.
    #[test]
    fn dump_sees_our_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let all = dump(Query::states(&[TcpState(10)], false)).unwrap();
        let ours = all
            .iter()
            .find(|s| s.local == addr)
            .expect("listener in dump");
        assert_eq!(ours.state, TcpState(10));
        assert_ne!(ours.inode, 0);
    }

    #[test]
    fn lookup_finds_single_sockets_timewait_included() {
        use std::io::Read as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let (local, remote) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let found = lookup(&[(local, remote), (unused, remote)]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].local, local);
        assert_eq!(found[0].state, TcpState(1));
        assert!(!found[0].timewait);
        // The client closes first, then the server: the client's side is TIME_WAIT.
        drop(client);
        assert_eq!(server.read(&mut [0u8; 8]).unwrap(), 0);
        drop(server);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let found = lookup(&[(local, remote)]).unwrap();
            if found.first().is_some_and(|s| s.state == TcpState(6)) {
                assert!(found[0].timewait);
                assert!(found[0].expires_ms > 50_000, "{found:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{found:?}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // More than one batch: every request gets its reply.
        let many = vec![(unused, remote); LOOKUP_BATCH * 2 + 3];
        assert!(lookup(&many).unwrap().is_empty());
    }
}
