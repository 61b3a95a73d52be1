//! The I/O side of the node tunnels: a TUN device the kernel routes the encrypted networks'
//! VXLAN packets into, one UDP socket to the other nodes, and three threads that move packets
//! between them through the [`Engine`].
//!
//! What makes it fast enough (boringtun's own device does one read and one send per packet):
//! - reads from the TUN are drained in batches and encrypted under one peer lock per batch;
//! - encrypted datagrams to one peer go out as UDP GSO sends (`UDP_SEGMENT`), several per
//!   `sendmmsg`, since boringtun does not pad and equal packets give equal datagrams;
//! - the socket receives with `UDP_GRO` and `recvmmsg`, so a burst arrives in a few calls;
//! - decrypted datagrams of one flow are written back as one UDP GSO super-packet
//!   (`packet::plan_writes`), which the kernel splits again and VXLAN's GRO then merges.
//!
//! The TUN is persistent: it outlives the agent with its address and routes, so a restarted
//! agent attaches to the same device. While no agent reads it, packets for it are dropped by
//! the kernel: an encrypted network never falls back to clear text.

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{Engine, Inbox, LocalTunnel, Outbox, PeerConfig, PeerStats};
use crate::keys::KeyPair;
use crate::packet::{self, VNET_F_NEEDS_CSUM, VNET_GSO_NONE, VNET_HDR_LEN, VnetHdr};

/// Packets read from the TUN per batch.
const TUN_BATCH: usize = 64;
/// Messages per `recvmmsg`; with GRO each can hold a 64 KB burst.
const RX_BATCH: usize = 8;
const RX_BUF: usize = 65_536;
/// Socket buffers, as wireguard-go sets them.
const SOCKET_BUFFER: libc::c_int = 7 << 20;
/// Most segments of one UDP GSO send the kernel takes everywhere.
const GSO_SEGMENTS_MAX: usize = 64;
const GSO_BYTES_MAX: usize = 65_000;
/// How often the threads look at the stop flag when idle.
const IDLE_POLL_MS: libc::c_int = 200;
const TIMER_TICK: Duration = Duration::from_millis(250);

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Knobs of the I/O batching, for measuring what each step gives (the benchmark's ablation);
/// read from the environment (`NETAGENT_WG_TUN_BATCH`, `NETAGENT_WG_RX_BATCH`,
/// `NETAGENT_WG_GSO`, `NETAGENT_WG_GRO`, `NETAGENT_WG_COALESCE`). The defaults are the fast
/// path; nothing in production sets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// TUN packets read per batch (1: one read per packet, as boringtun's device does).
    pub tun_batch: usize,
    /// Messages per `recvmmsg`.
    pub rx_batch: usize,
    /// UDP GSO sends (else one datagram per message).
    pub gso: bool,
    /// UDP GRO receives.
    pub gro: bool,
    /// Coalesced TUN writes (else one write per packet).
    pub coalesce: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            tun_batch: TUN_BATCH,
            rx_batch: RX_BATCH,
            gso: true,
            gro: true,
            coalesce: true,
        }
    }
}

impl Tuning {
    pub fn from_env() -> Self {
        let d = Self::default();
        let num = |k: &str, def: usize, max: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(def, |v| v.clamp(1, max))
        };
        let flag = |k: &str| std::env::var(k).map_or(true, |v| v != "0");
        Self {
            tun_batch: num("NETAGENT_WG_TUN_BATCH", d.tun_batch, TUN_BATCH),
            rx_batch: num("NETAGENT_WG_RX_BATCH", d.rx_batch, RX_BATCH),
            gso: flag("NETAGENT_WG_GSO"),
            gro: flag("NETAGENT_WG_GRO"),
            coalesce: flag("NETAGENT_WG_COALESCE"),
        }
    }
}

/// How to set the device up.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Name of the TUN device (made if missing, re-attached if it exists).
    pub tun_name: String,
    /// Our address on it.
    pub tunnel_addr: Ipv4Addr,
    /// UDP port of the encrypted VXLAN device (allowed out of the tunnel).
    pub vxlan_port: u16,
    /// TCP port of the agents' control API between tunnel addresses (allowed both ways; 0:
    /// none).
    pub control_port: u16,
    /// Where the WireGuard socket binds (advertise address and port).
    pub listen: SocketAddrV4,
    pub key: KeyPair,
}

/// Counters of the I/O side.
#[derive(Debug, Default)]
pub struct DeviceStats {
    pub tun_packets_in: AtomicU64,
    pub tun_writes: AtomicU64,
    pub tun_packets_out: AtomicU64,
    pub udp_sends: AtomicU64,
    pub udp_datagrams_out: AtomicU64,
    pub udp_datagrams_in: AtomicU64,
    pub send_errors: AtomicU64,
    pub tun_write_errors: AtomicU64,
    /// Packets from the kernel the device could not handle (offloads it did not ask for).
    pub tun_unsupported: AtomicU64,
}

pub struct Device {
    engine: Arc<Engine>,
    stats: Arc<DeviceStats>,
    udp: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (or attaches to) the persistent TUN `name` with virtio-net headers and no offloads:
/// the kernel hands over whole packets with finished checksums.
fn open_tun(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad TUN name"));
    }
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
    // SAFETY: open(2) on a constant path.
    let fd = cvt(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the ioctls take the request structs above by pointer.
    unsafe {
        cvt(libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req))?;
        cvt(libc::ioctl(
            fd.as_raw_fd(),
            TUNSETPERSIST,
            1 as libc::c_ulong,
        ))?;
        cvt(libc::ioctl(
            fd.as_raw_fd(),
            TUNSETOFFLOAD,
            0 as libc::c_ulong,
        ))?;
    }
    Ok(fd)
}

/// Removes the persistent TUN `name` (the agent's teardown; a running device is unaffected
/// until it closes its fd).
pub fn delete_tun(name: &str) -> io::Result<()> {
    let fd = open_tun(name)?;
    // SAFETY: as in open_tun.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 0 as libc::c_ulong) })?;
    Ok(())
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int option by pointer and size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn open_udp(listen: SocketAddrV4, gro: bool) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constants.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // FORCE: above net.core.[rw]mem_max; the agent runs as root.
    if setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, SOCKET_BUFFER).is_err() {
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER)?;
    }
    if setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, SOCKET_BUFFER).is_err() {
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER)?;
    }
    if gro && let Err(e) = setsockopt(raw, SOL_UDP, UDP_GRO, 1) {
        tracing::info!(error = %e, "UDP GRO not available; receiving datagram by datagram");
    }
    let addr = sockaddr(listen);
    // SAFETY: bind(2) with a sockaddr_in of the right size.
    cvt(unsafe {
        libc::bind(
            raw,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// Waits until `fd` is ready for `events` or the idle timeout passes; false on timeout.
fn wait(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0
}

impl Device {
    /// Opens the TUN and the socket and starts the threads. Addresses and routes of the TUN
    /// are the caller's (the agent sets them through rtnetlink).
    pub fn start(config: &DeviceConfig) -> io::Result<Device> {
        let tuning = Tuning::from_env();
        if tuning != Tuning::default() {
            tracing::warn!(?tuning, "WireGuard I/O tuned away from the defaults");
        }
        let tun = Arc::new(open_tun(&config.tun_name)?);
        let udp = Arc::new(open_udp(config.listen, tuning.gro)?);
        let engine = Arc::new(Engine::new(
            config.key.clone(),
            LocalTunnel {
                addr: config.tunnel_addr,
                vxlan_port: config.vxlan_port,
                control_port: config.control_port,
            },
        ));
        let stats = Arc::new(DeviceStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(f)
        };
        {
            let (tun, udp, engine, stats, stop) = (
                tun.clone(),
                udp.clone(),
                engine.clone(),
                stats.clone(),
                stop.clone(),
            );
            threads.push(spawn(
                "wg-tx",
                Box::new(move || tx_loop(&tun, &udp, &engine, &stats, &stop, tuning)),
            )?);
        }
        {
            let (tun, udp, engine, stats, stop) = (
                tun.clone(),
                udp.clone(),
                engine.clone(),
                stats.clone(),
                stop.clone(),
            );
            threads.push(spawn(
                "wg-rx",
                Box::new(move || rx_loop(&tun, &udp, &engine, &stats, &stop, tuning)),
            )?);
        }
        {
            let (udp, engine, stats, stop) =
                (udp.clone(), engine.clone(), stats.clone(), stop.clone());
            threads.push(spawn(
                "wg-timers",
                Box::new(move || timer_loop(&udp, &engine, &stats, &stop, tuning)),
            )?);
        }
        tracing::info!(tun = %config.tun_name, listen = %config.listen, "WireGuard device up");
        Ok(Device {
            engine,
            stats,
            udp,
            stop,
            threads,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// Makes the peers those of `peers` (new ones are handshaken with at once).
    pub fn set_peers(&self, peers: &[PeerConfig]) {
        let mut out = Outbox::default();
        self.engine.set_peers(peers, &mut out);
        send_all(self.udp.as_raw_fd(), &out, &self.stats, true);
    }

    /// Starts using `key` (see [`Engine::rotate_key`]).
    pub fn rotate_key(&self, key: KeyPair) {
        let mut out = Outbox::default();
        self.engine.rotate_key(key, &mut out);
        send_all(self.udp.as_raw_fd(), &out, &self.stats, true);
    }

    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.engine.stats()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads batches from the TUN, encrypts, sends.
fn tx_loop(
    tun: &OwnedFd,
    udp: &OwnedFd,
    engine: &Engine,
    stats: &DeviceStats,
    stop: &AtomicBool,
    tuning: Tuning,
) {
    let fd = tun.as_raw_fd();
    let mut bufs: Vec<Vec<u8>> = (0..TUN_BATCH)
        .map(|_| vec![0u8; RX_BUF + VNET_HDR_LEN])
        .collect();
    let mut lens = vec![0usize; TUN_BATCH];
    let mut out = Outbox::default();
    while !stop.load(Ordering::Relaxed) {
        if !wait(fd, libc::POLLIN, IDLE_POLL_MS) {
            continue;
        }
        let mut n = 0;
        while n < tuning.tun_batch {
            // SAFETY: read(2) into a buffer we own.
            let r = unsafe { libc::read(fd, bufs[n].as_mut_ptr().cast(), bufs[n].len()) };
            if r <= 0 {
                break;
            }
            lens[n] = r as usize;
            n += 1;
        }
        if n == 0 {
            continue;
        }
        stats.tun_packets_in.fetch_add(n as u64, Ordering::Relaxed);
        // Group by peer, keeping order within each.
        let mut groups: Vec<(Arc<crate::engine::Peer>, Vec<usize>)> = Vec::new();
        for i in 0..n {
            let buf = &mut bufs[i][..lens[i]];
            let Some(hdr) = VnetHdr::parse(buf) else {
                continue;
            };
            if hdr.gso_type != VNET_GSO_NONE {
                stats.tun_unsupported.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let pkt = &mut buf[VNET_HDR_LEN..];
            if hdr.flags & VNET_F_NEEDS_CSUM != 0
                && !packet::complete_checksum(pkt, hdr.csum_start.into(), hdr.csum_offset.into())
            {
                stats.tun_unsupported.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(dst) = packet::ipv4_dst(pkt) else {
                continue;
            };
            match engine.peer_for(Ipv4Addr::from(dst)) {
                Some(peer) => match groups.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &peer)) {
                    Some((_, v)) => v.push(i),
                    None => groups.push((peer, vec![i])),
                },
                None => {
                    engine.counters.tx_no_peer.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        out.clear();
        for (peer, idx) in &groups {
            let pkts: Vec<&[u8]> = idx
                .iter()
                .map(|&i| &bufs[i][VNET_HDR_LEN..lens[i]])
                .collect();
            engine.encapsulate(peer, &pkts, &mut out);
        }
        send_all(udp.as_raw_fd(), &out, stats, tuning.gso);
    }
}

/// Receives batches from the socket, decrypts, writes into the TUN.
fn rx_loop(
    tun: &OwnedFd,
    udp: &OwnedFd,
    engine: &Engine,
    stats: &DeviceStats,
    stop: &AtomicBool,
    tuning: Tuning,
) {
    let ufd = udp.as_raw_fd();
    let mut bufs: Vec<Vec<u8>> = (0..RX_BATCH).map(|_| vec![0u8; RX_BUF]).collect();
    let mut addrs = [libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    }; RX_BATCH];
    let mut ctrl = vec![[0u64; 8]; RX_BATCH];
    let mut inbox = Inbox::default();
    let mut out = Outbox::default();
    let mut write_buf = Vec::with_capacity(RX_BUF + VNET_HDR_LEN);
    while !stop.load(Ordering::Relaxed) {
        if !wait(ufd, libc::POLLIN, IDLE_POLL_MS) {
            continue;
        }
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; every pointer below points into buffers that
        // outlive the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..RX_BATCH)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for i in 0..RX_BATCH {
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&raw mut addrs[i]).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &raw mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = size_of::<[u64; 8]>() as _;
        }
        // SAFETY: as above.
        let n = unsafe {
            libc::recvmmsg(
                ufd,
                msgs.as_mut_ptr(),
                RX_BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        inbox.clear();
        out.clear();
        for (i, msg) in msgs.iter().enumerate().take(n as usize) {
            let len = msg.msg_len as usize;
            let from = SocketAddrV4::new(
                Ipv4Addr::from(addrs[i].sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(addrs[i].sin_port),
            );
            let seg = gro_segment(&msg.msg_hdr).unwrap_or(len).max(1);
            for chunk in bufs[i][..len].chunks(seg) {
                stats.udp_datagrams_in.fetch_add(1, Ordering::Relaxed);
                engine.receive(from, chunk, &mut inbox, &mut out);
            }
        }
        write_tun(
            tun.as_raw_fd(),
            &inbox,
            &mut write_buf,
            stats,
            tuning.coalesce,
        );
        send_all(ufd, &out, stats, true);
    }
}

/// The segment size of a GRO-coalesced receive, from its control message.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|v| *v > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Writes decrypted packets into the TUN, coalesced where they can be.
fn write_tun(fd: RawFd, inbox: &Inbox, buf: &mut Vec<u8>, stats: &DeviceStats, coalesce: bool) {
    if inbox.items.is_empty() {
        return;
    }
    let pkts = inbox.packets();
    let runs = if coalesce {
        packet::plan_writes(&pkts)
    } else {
        (0..pkts.len()).map(|i| i..i + 1).collect()
    };
    for run in runs {
        packet::build_write(&pkts[run.clone()], buf);
        // SAFETY: write(2) from a buffer we own.
        let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if r < 0 {
            stats.tun_write_errors.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.tun_writes.fetch_add(1, Ordering::Relaxed);
            stats
                .tun_packets_out
                .fetch_add(run.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Sends everything in `out`: consecutive datagrams to one destination of one size (the last
/// of a run may be shorter) as one UDP GSO message each, all messages in few `sendmmsg`s.
fn send_all(fd: RawFd, out: &Outbox, stats: &DeviceStats, gso: bool) {
    if out.items.is_empty() {
        return;
    }
    // (first item, item count, segment size, bytes)
    let mut runs: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (i, &(_, len, to)) in out.items.iter().enumerate() {
        if let Some(last) = runs.last_mut() {
            let (first, count, seg, bytes) = *last;
            let (_, prev_len, prev_to) = out.items[first + count - 1];
            let same = to == out.items[first].2 && prev_to == to;
            // Extend only while every earlier datagram is full-size.
            if gso
                && same
                && prev_len == seg
                && len <= seg
                && count < GSO_SEGMENTS_MAX
                && bytes + len <= GSO_BYTES_MAX
            {
                *last = (first, count + 1, seg, bytes + len);
                continue;
            }
        }
        runs.push((i, 1, len, len));
    }
    let mut addrs: Vec<libc::sockaddr_in> =
        runs.iter().map(|r| sockaddr(out.items[r.0].2)).collect();
    let mut iovs: Vec<libc::iovec> = runs
        .iter()
        .map(|&(first, _, _, bytes)| libc::iovec {
            iov_base: out.buf[out.items[first].0..].as_ptr() as *mut libc::c_void,
            iov_len: bytes,
        })
        .collect();
    let mut ctrl = vec![[0u64; 4]; runs.len()];
    // SAFETY: zeroed mmsghdr is valid; the control messages are built with the libc macros
    // inside buffers of CMSG_SPACE(2) or more.
    let mut msgs: Vec<libc::mmsghdr> = (0..runs.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (i, &(_, count, seg, _)) in runs.iter().enumerate() {
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = (&raw mut addrs[i]).cast();
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &raw mut iovs[i];
        h.msg_iovlen = 1;
        if count > 1 {
            h.msg_control = ctrl[i].as_mut_ptr().cast();
            // SAFETY: computing the space for a u16 payload.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
            // SAFETY: the buffer holds at least CMSG_SPACE(2) bytes.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
            }
        }
    }
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_millis(100);
    while sent < msgs.len() {
        // SAFETY: pointers into the vectors above, all alive for the call.
        let r =
            unsafe { libc::sendmmsg(fd, msgs[sent..].as_mut_ptr(), (msgs.len() - sent) as u32, 0) };
        if r > 0 {
            sent += r as usize;
            stats.udp_sends.fetch_add(r as u64, Ordering::Relaxed);
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline {
            // The socket buffer is full: wait for room rather than drop a whole batch.
            wait(fd, libc::POLLOUT, 10);
            continue;
        }
        stats.send_errors.fetch_add(1, Ordering::Relaxed);
        // Skip the message that failed (e.g. a peer unreachable) and go on with the rest.
        sent += 1;
    }
    stats
        .udp_datagrams_out
        .fetch_add(out.items.len() as u64, Ordering::Relaxed);
}

fn timer_loop(
    udp: &OwnedFd,
    engine: &Engine,
    stats: &DeviceStats,
    stop: &AtomicBool,
    tuning: Tuning,
) {
    let mut out = Outbox::default();
    let mut ticks = 0u64;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        ticks += 1;
        out.clear();
        engine.tick(ticks.is_multiple_of(4), &mut out);
        send_all(udp.as_raw_fd(), &out, stats, tuning.gso);
    }
}
