//! TCP socket dumps through netlink `sock_diag` (what `ss` uses), for the sockets that
//! existed before connwatch started and for periodic reconciliation. Sees the network
//! namespace it runs in.
use std::{io, net::SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
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
    /// Recv-Q: bytes received but not read by the process.
    pub recv_q: u32,
    pub send_q: u32,
    /// A timewait socket (`struct inet_timewait_sock`): TIME_WAIT, or FIN_WAIT2 of an
    /// orphan whose process already closed it.
    pub timewait: bool,
    /// ms until the active timer fires (for timewait sockets: until the socket goes).
    pub expires_ms: u32,
    /// `tcpi_last_ack_recv`: ms since the last ACK from the peer (with `Info` requested).
    pub last_ack_recv_ms: Option<u32>,
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
        let n = socket.recv(&mut &mut buf[..], 0)?;
        if parse_datagram(&buf[..n], out)? {
            return Ok(());
        }
    }
}

/// Parses one netlink datagram of a dump; `true` once the dump is done.
pub fn parse_datagram(mut bytes: &[u8], out: &mut Vec<DiagSocket>) -> io::Result<bool> {
    let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {e}"));
    while !bytes.is_empty() {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
            .map_err(|e| bad(e.to_string()))?;
        let len = msg.header.length as usize;
        if len == 0 || len > bytes.len() {
            return Err(bad(format!("message length {len}")));
        }
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                // The crate drops a timewait socket's expiry: read it from the fixed
                // `inet_diag_msg` header (nlmsghdr is 16 bytes, idiag_expires at 52).
                let expires = bytes
                    .get(16 + 52..16 + 56)
                    .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                out.push(from_response(&resp, expires));
            }
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => {
                return Err(e.to_io());
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        bytes = bytes.get(step..).unwrap_or(&[]);
    }
    Ok(false)
}

fn from_response(resp: &InetResponse, expires_ms: u32) -> DiagSocket {
    let h = &resp.header;
    let id = &h.socket_id;
    let last_ack_recv_ms = resp.nlas.iter().find_map(|nla| match nla {
        Nla::TcpInfo(info) => Some(info.last_ack_recv),
        _ => None,
    });
    let timewait = matches!(
        h.timer,
        Some(netlink_packet_sock_diag::inet::Timer::TimeWait)
    );
    DiagSocket {
        state: TcpState(h.state),
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        inode: u64::from(h.inode),
        uid: h.uid,
        recv_q: h.recv_queue,
        send_q: h.send_queue,
        timewait,
        expires_ms: if timewait || h.timer.is_some() {
            expires_ms
        } else {
            0
        },
        last_ack_recv_ms,
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage};
    use netlink_packet_sock_diag::inet::{InetResponseHeader, Timer};

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
}
