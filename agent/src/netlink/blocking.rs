//! A synchronous rtnetlink request for the few places that run on a plain thread inside a
//! namespace and cannot await (namespace creation).

use rtnetlink::LinkUnspec;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};

use super::{NetlinkError, Result, validate_ifname};

/// Sets link `ifname` up in the calling thread's network namespace, waiting for the kernel's
/// acknowledgement.
pub fn set_link_up_blocking(ifname: &str) -> Result<()> {
    validate_ifname(ifname)?;
    let sock_err = |source| NetlinkError::Socket {
        netns: "the calling thread's namespace".into(),
        source,
    };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(sock_err)?;
    socket.bind_auto().map_err(sock_err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(sock_err)?;

    let link = LinkUnspec::new_with_name(ifname).up().build();
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::SetLink(link));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0).map_err(sock_err)?;

    let fail = |source| NetlinkError::Request {
        op: "setting up link",
        what: ifname.to_string(),
        netns: "the calling thread's namespace".into(),
        source: Box::new(source),
    };
    // One request, so the first ACK or error for our sequence number is the answer. A
    // datagram may hold several messages; walk them by their length fields.
    loop {
        let (data, _) = socket.recv_from_full().map_err(sock_err)?;
        let mut offset = 0;
        while offset < data.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..]).map_err(
                |e| {
                    sock_err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ))
                },
            )?;
            let len = msg.header.length as usize;
            if msg.header.sequence_number == 1
                && let NetlinkPayload::Error(err) = msg.payload
            {
                return match err.code {
                    None => Ok(()),
                    Some(_) => Err(fail(rtnetlink::Error::NetlinkError(err))),
                };
            }
            if len == 0 {
                break;
            }
            // Netlink messages are 4-byte aligned.
            offset += (len + 3) & !3;
        }
    }
}
