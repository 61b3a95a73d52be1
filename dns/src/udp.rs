//! The UDP side of a listener, without a task per query: datagrams are read in batches
//! (`recvmmsg`), each is answered inline when the answer is local (the handler completes
//! without waiting), and the batch's answers go out with one `sendmmsg`. Only a query that must
//! be forwarded becomes a task of its own, which sends its answer when the upstream replies.
//!
//! Buffers live only while queries keep coming: an idle listener (one per container) holds
//! no memory for them.

use std::future::Future;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

use crate::handler::{ScopedHandler, Transport};

/// Datagrams read per `recvmmsg`.
const BATCH: usize = 32;
/// Largest query accepted (EDNS clients advertise up to 4096 for answers, queries are far
/// smaller); a longer datagram is truncated and then fails to parse (FORMERR or dropped).
const MAX_QUERY: usize = 1500;

/// A listener with no query for this long gives its buffers back.
const FREE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

type Answer = Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>>;

/// Serves `socket` until it fails.
pub async fn serve(handler: ScopedHandler, socket: Arc<UdpSocket>) -> std::io::Result<()> {
    // Forwarding tasks; dropped (aborted) with this future, so a stopped listener's socket
    // does not outlive it by an upstream timeout.
    let mut forwarding = tokio::task::JoinSet::new();
    // Allocated on the first datagram and kept while queries keep coming; freed after a
    // quiet second.
    let mut buffers: Option<Vec<u8>> = None;
    loop {
        while forwarding.try_join_next().is_some() {}
        if buffers.is_some() {
            tokio::select! {
                r = socket.readable() => r?,
                () = tokio::time::sleep(FREE_AFTER) => {
                    buffers = None;
                    continue;
                }
            }
        } else {
            socket.readable().await?;
        }
        let bufs = buffers.get_or_insert_with(|| vec![0u8; BATCH * MAX_QUERY]);
        let received = match socket.try_io(Interest::READABLE, || recv_batch(&socket, bufs)) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut out: Vec<(Vec<u8>, SocketAddrV4)> = Vec::with_capacity(received.len());
        for (i, (len, src)) in received.into_iter().enumerate() {
            let query = bufs[i * MAX_QUERY..i * MAX_QUERY + len].to_vec();
            let h = handler.clone();
            let mut answer: Answer =
                Box::pin(async move { h.answer_vec(query, Transport::Udp).await });
            match futures::future::poll_immediate(&mut answer).await {
                Some(Some(bytes)) => out.push((bytes, src)),
                Some(None) => {}
                None => {
                    // Waiting for an upstream: finish on a task of its own.
                    let socket = socket.clone();
                    forwarding.spawn(async move {
                        if let Some(bytes) = answer.await
                            && let Err(e) = socket.send_to(&bytes, SocketAddr::V4(src)).await
                        {
                            debug!(error = %e, "sending a forwarded answer");
                        }
                    });
                }
            }
        }
        send_batch(&socket, &out).await;
    }
}

/// One `recvmmsg` without waiting: (length, sender) of each datagram, in `bufs`' slots.
fn recv_batch(socket: &UdpSocket, bufs: &mut [u8]) -> std::io::Result<Vec<(usize, SocketAddrV4)>> {
    let mut iovs: Vec<libc::iovec> = bufs
        .chunks_mut(MAX_QUERY)
        .map(|c| libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: c.len(),
        })
        .collect();
    let mut addrs: Vec<MaybeUninit<libc::sockaddr_in>> = vec![MaybeUninit::zeroed(); BATCH];
    // SAFETY: zeroed mmsghdr is a valid "empty" header; every pointer is set below.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_name = addrs[i].as_mut_ptr().cast();
        m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        m.msg_hdr.msg_iov = &mut iovs[i];
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs` holds BATCH headers pointing at live buffers and address slots.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::with_capacity(n as usize);
    for (i, m) in msgs.iter().take(n as usize).enumerate() {
        if m.msg_hdr.msg_namelen as usize != size_of::<libc::sockaddr_in>() {
            continue; // not IPv4 (the socket is bound to 127.0.0.11)
        }
        // SAFETY: the kernel filled this slot (namelen says so).
        let sa = unsafe { addrs[i].assume_init() };
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        let port = u16::from_be(sa.sin_port);
        out.push((m.msg_len as usize, SocketAddrV4::new(ip, port)));
    }
    Ok(out)
}

/// Sends every answer, in one `sendmmsg` when the socket takes them all; waits for room and
/// goes on where it stopped otherwise. An answer the kernel refuses is dropped (the client
/// retries), as a full socket buffer would.
async fn send_batch(socket: &UdpSocket, out: &[(Vec<u8>, SocketAddrV4)]) {
    let mut next = 0;
    while next < out.len() {
        let rest = &out[next..];
        match socket.try_io(Interest::WRITABLE, || send_some(socket, rest)) {
            Ok(0) => return,
            Ok(n) => next += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!(error = %e, "sending answers; dropping one");
                next += 1;
            }
        }
    }
}

fn send_some(socket: &UdpSocket, out: &[(Vec<u8>, SocketAddrV4)]) -> std::io::Result<usize> {
    let n = out.len().min(BATCH);
    let mut addrs: Vec<libc::sockaddr_in> = out[..n]
        .iter()
        .map(|(_, a)| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        })
        .collect();
    let mut iovs: Vec<libc::iovec> = out[..n]
        .iter()
        .map(|(b, _)| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: as in `recv_batch`.
    let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
        m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        m.msg_hdr.msg_iov = &mut iovs[i];
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs` holds n headers pointing at live answers and addresses.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}
