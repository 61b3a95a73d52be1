//! Forwarding names the view does not know to the node's upstream resolvers.
//!
//! Upstreams are tried in order, each with its own time budget; an upstream that times out,
//! cannot be reached, answers garbage or answers with a server-side failure (SERVFAIL,
//! REFUSED, ...) makes us try the next one. Only when all of them fail does the client get
//! SERVFAIL. Nothing is cached: the client's own resolver library and the upstream do that.
//!
//! Sockets are opened per query in the network namespace of the calling thread: the agent
//! runs the handler on its own runtime (host namespace), so the upstreams are those of the
//! node, even though the client's socket lives in the container's namespace.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

/// EDNS payload size we advertise upstream (the DNS flag day 2020 value: fits one unfragmented
/// packet on any path). Larger answers come back truncated and are fetched over TCP.
const UPSTREAM_EDNS_PAYLOAD: u16 = 1232;
/// Receive buffer for upstream UDP answers: comfortably above what we advertise, so a slightly
/// non-compliant upstream still parses.
const UDP_RECV_BUFFER: usize = 4096;

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream resolver is configured.
    #[error("no upstream resolver configured")]
    NoUpstreams,
    /// Every upstream failed; the last failure is kept for the log.
    #[error("all {count} upstream resolvers failed, last: {last}")]
    AllFailed {
        /// How many upstreams were tried.
        count: usize,
        /// The last upstream's failure.
        last: Box<ForwardError>,
    },
    /// Too many forwarded queries in flight for this listener.
    #[error("too many forwarded queries in flight")]
    Busy,
    /// The upstream did not answer within its budget.
    #[error("upstream {0} timed out")]
    Timeout(SocketAddr),
    /// Socket error talking to the upstream.
    #[error("upstream {addr}: {source}")]
    Io {
        /// The upstream.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The upstream answered something that is not a usable DNS answer.
    #[error("upstream {addr} sent an unusable answer: {reason}")]
    BadAnswer {
        /// The upstream.
        addr: SocketAddr,
        /// What was wrong with it.
        reason: String,
    },
    /// The upstream answered with a server-side error code.
    #[error("upstream {addr} answered {rcode}")]
    Rcode {
        /// The upstream.
        addr: SocketAddr,
        /// Its response code.
        rcode: ResponseCode,
    },
    /// The query could not be encoded (should not happen for a query we parsed).
    #[error("cannot encode query: {0}")]
    Encode(String),
}

/// The parts of the client's request that shape the upstream query.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForwardOptions {
    /// The client asked over TCP: ask upstream over TCP too (its answer may be big).
    pub(crate) tcp: bool,
    pub(crate) recursion_desired: bool,
    pub(crate) checking_disabled: bool,
    pub(crate) dnssec_ok: bool,
}

/// Asks `upstreams` in order; returns the first usable answer.
pub(crate) async fn forward(
    upstreams: &[SocketAddr],
    per_upstream: Duration,
    query: &Query,
    opts: ForwardOptions,
) -> Result<Message, ForwardError> {
    if upstreams.is_empty() {
        return Err(ForwardError::NoUpstreams);
    }
    let id: u16 = rand::random();
    let wire = encode_query(id, query, opts)?;
    let mut last = None;
    for &addr in upstreams {
        let attempt = exchange(addr, &wire, id, query, opts.tcp);
        let result = match tokio::time::timeout(per_upstream, attempt).await {
            Ok(r) => r,
            Err(_) => Err(ForwardError::Timeout(addr)),
        };
        match result {
            Ok(msg) => return Ok(msg),
            Err(e) => {
                debug!(upstream = %addr, error = %e, "upstream failed, trying the next one");
                last = Some(e);
            }
        }
    }
    Err(ForwardError::AllFailed {
        count: upstreams.len(),
        last: Box::new(last.unwrap_or(ForwardError::NoUpstreams)),
    })
}

fn encode_query(id: u16, query: &Query, opts: ForwardOptions) -> Result<Vec<u8>, ForwardError> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = opts.recursion_desired;
    msg.metadata.checking_disabled = opts.checking_disabled;
    msg.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_EDNS_PAYLOAD);
    edns.set_dnssec_ok(opts.dnssec_ok);
    msg.set_edns(edns);
    msg.to_vec()
        .map_err(|e| ForwardError::Encode(e.to_string()))
}

/// One upstream: UDP (then TCP if the answer is truncated), or TCP straight away.
async fn exchange(
    addr: SocketAddr,
    wire: &[u8],
    id: u16,
    query: &Query,
    tcp: bool,
) -> Result<Message, ForwardError> {
    if !tcp {
        let msg = udp_exchange(addr, wire, id).await?;
        if !msg.metadata.truncation {
            return check(addr, msg, query);
        }
        debug!(upstream = %addr, "truncated UDP answer, retrying over TCP");
    }
    let msg = tcp_exchange(addr, wire, id).await?;
    check(addr, msg, query)
}

async fn udp_exchange(addr: SocketAddr, wire: &[u8], id: u16) -> Result<Message, ForwardError> {
    let io_err = |source| ForwardError::Io { addr, source };
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // A fresh socket per query: a random source port, and connect() makes the kernel drop
    // datagrams from anyone but the upstream (and report ICMP unreachable as an error, so a
    // dead upstream fails fast instead of waiting for the timeout).
    let sock = UdpSocket::bind(local).await.map_err(io_err)?;
    sock.connect(addr).await.map_err(io_err)?;
    sock.send(wire).await.map_err(io_err)?;
    let mut buf = vec![0u8; UDP_RECV_BUFFER];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io_err)?;
        let msg = Message::from_vec(&buf[..n]).map_err(|e| ForwardError::BadAnswer {
            addr,
            reason: e.to_string(),
        })?;
        // A stray answer to some earlier query is not ours; keep waiting (bounded by the
        // caller's timeout).
        if msg.metadata.id == id && msg.metadata.message_type == MessageType::Response {
            return Ok(msg);
        }
    }
}

async fn tcp_exchange(addr: SocketAddr, wire: &[u8], id: u16) -> Result<Message, ForwardError> {
    let io_err = |source| ForwardError::Io { addr, source };
    let len =
        u16::try_from(wire.len()).map_err(|_| ForwardError::Encode("query too long".into()))?;
    let mut stream = TcpStream::connect(addr).await.map_err(io_err)?;
    let _ = stream.set_nodelay(true);
    let mut out = Vec::with_capacity(wire.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(wire);
    stream.write_all(&out).await.map_err(io_err)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io_err)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.map_err(io_err)?;
    let msg = Message::from_vec(&buf).map_err(|e| ForwardError::BadAnswer {
        addr,
        reason: e.to_string(),
    })?;
    if msg.metadata.id != id || msg.metadata.message_type != MessageType::Response {
        return Err(ForwardError::BadAnswer {
            addr,
            reason: "id mismatch".into(),
        });
    }
    Ok(msg)
}

/// Accepts NOERROR and NXDOMAIN answers to our question; everything else means "try another".
fn check(addr: SocketAddr, msg: Message, query: &Query) -> Result<Message, ForwardError> {
    let rcode = msg.metadata.response_code;
    if rcode != ResponseCode::NoError && rcode != ResponseCode::NXDomain {
        return Err(ForwardError::Rcode { addr, rcode });
    }
    // Name comparison is case-insensitive, so upstreams that normalise case still match.
    let same = matches!(msg.queries.as_slice(), [q] if q.name() == query.name()
        && q.query_type() == query.query_type()
        && q.query_class() == query.query_class());
    if !same {
        return Err(ForwardError::BadAnswer {
            addr,
            reason: "question does not match".into(),
        });
    }
    Ok(msg)
}
