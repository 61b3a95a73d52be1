//! The protocol side of the node tunnels, without I/O (boringtun's `noise` split): which peer
//! a packet is for, encapsulation and decapsulation through boringtun, the checks on what
//! comes out of the tunnel, handshake timers and key rotation. The device (`device`) feeds it
//! packets and sends what it returns.
//!
//! A peer is a node. It has one or more sessions (a boringtun `Tunn` each): normally one, two
//! while a key rotates (ours or the peer's). New traffic takes the newest session that has
//! completed a handshake (the newest at all if none has), so a rotation never interrupts
//! traffic: the old session carries it until the new one is up, then retires.
//!
//! Fail closed: a decrypted packet is handed to the node only if it is VXLAN from the peer's
//! tunnel address to ours on the encrypted VXLAN port; anything else from the tunnel is
//! dropped and counted, never written into the node.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::PublicKey;

use crate::keys::KeyPair;
use crate::packet;

/// WireGuard adds 32 bytes to a data packet; a handshake message is at most 148.
const OVERHEAD: usize = 32;
const MIN_OUT: usize = 148;
/// A session replaced by a newer one that completed its handshake is kept this long, for the
/// packets still in flight on it.
const RETIRE_AFTER: Duration = Duration::from_secs(5);
/// A rotated-away local key is kept this long for peers that have not switched yet.
const OLD_KEY_KEPT: Duration = Duration::from_secs(120);
/// Handshakes per second the shared rate limiter lets through before asking for cookies.
const HANDSHAKE_RATE: u64 = 100;
/// At most one handshake we start per peer in this time because of undecryptable data.
const NUDGE_EVERY: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A node to tunnel to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: [u8; 32],
    /// The peer's address on the tunnel devices: outer destination of the VXLAN packets we
    /// send it, outer source of those it sends us.
    pub tunnel_addr: Ipv4Addr,
    /// Where its WireGuard socket listens (its advertise address).
    pub endpoint: SocketAddrV4,
}

/// What the engine checks decrypted packets against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTunnel {
    /// Our address on the tunnel device.
    pub addr: Ipv4Addr,
    /// UDP port of our encrypted VXLAN device.
    pub vxlan_port: u16,
    /// TCP port of the agents' own API between tunnel addresses (0: none).
    pub control_port: u16,
}

/// Datagrams to send: contiguous bytes and (offset, length, destination) per datagram.
#[derive(Default, Debug)]
pub struct Outbox {
    pub buf: Vec<u8>,
    pub items: Vec<(usize, usize, SocketAddrV4)>,
}

impl Outbox {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.items.clear();
    }

    fn push_with(&mut self, room: usize, to: SocketAddrV4, f: impl FnOnce(&mut [u8]) -> usize) {
        let start = self.buf.len();
        self.buf.resize(start + room, 0);
        let n = f(&mut self.buf[start..]);
        self.buf.truncate(start + n);
        if n > 0 {
            self.items.push((start, n, to));
        }
    }

    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddrV4) {
        let (off, len, to) = self.items[i];
        (&self.buf[off..off + len], to)
    }
}

/// Decrypted packets for the node: contiguous bytes and (offset, length) per packet.
#[derive(Default, Debug)]
pub struct Inbox {
    pub buf: Vec<u8>,
    pub items: Vec<(usize, usize)>,
}

impl Inbox {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.items.clear();
    }

    pub fn packets(&self) -> Vec<&[u8]> {
        self.items
            .iter()
            .map(|&(o, l)| &self.buf[o..o + l])
            .collect()
    }
}

/// What became of one datagram from the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxVerdict {
    /// Decrypted and handed to the node.
    Data,
    /// A handshake message or keepalive, handled.
    Control,
    /// Not a WireGuard message at all.
    Malformed,
    /// A valid-looking message no peer of ours is party to (unknown index or key).
    UnknownPeer,
    /// Failed authentication, or a replay.
    Rejected,
    /// Decrypted, but not VXLAN from that peer's tunnel address to ours: dropped.
    Forbidden,
}

/// Counters of the engine, all monotonic.
#[derive(Debug, Default)]
pub struct Counters {
    pub rx_data: AtomicU64,
    pub rx_control: AtomicU64,
    pub rx_malformed: AtomicU64,
    pub rx_unknown_peer: AtomicU64,
    pub rx_rejected: AtomicU64,
    pub rx_forbidden: AtomicU64,
    /// Packets for a tunnel address no peer has.
    pub tx_no_peer: AtomicU64,
    pub handshakes: AtomicU64,
}

impl Counters {
    fn count(&self, v: RxVerdict) {
        let c = match v {
            RxVerdict::Data => &self.rx_data,
            RxVerdict::Control => &self.rx_control,
            RxVerdict::Malformed => &self.rx_malformed,
            RxVerdict::UnknownPeer => &self.rx_unknown_peer,
            RxVerdict::Rejected => &self.rx_rejected,
            RxVerdict::Forbidden => &self.rx_forbidden,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What `node inspect` shows of a peer.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerStats {
    pub name: String,
    pub endpoint: SocketAddrV4,
    pub tunnel_addr: Ipv4Addr,
    pub public_key: [u8; 32],
    /// Time since the newest session's last handshake; `None` before the first.
    pub since_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub sessions: usize,
}

struct Session {
    tunn: Tunn,
    index: u32,
    local_public: [u8; 32],
    peer_public: [u8; 32],
    /// When a newer session of the peer was seen established while this one was older.
    superseded: Option<Instant>,
}

impl Session {
    fn established(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }
}

pub struct Peer {
    pub name: String,
    pub tunnel_addr: Ipv4Addr,
    endpoint: Mutex<SocketAddrV4>,
    /// Oldest first.
    sessions: Mutex<Vec<Session>>,
    last_nudge: Mutex<Option<Instant>>,
    /// Bytes of sessions that have retired, so totals never go down.
    retired_tx: AtomicU64,
    retired_rx: AtomicU64,
}

impl Peer {
    pub fn endpoint(&self) -> SocketAddrV4 {
        *lock(&self.endpoint)
    }
}

/// The newest session that completed a handshake, else the newest.
fn pick(sessions: &mut [Session]) -> Option<&mut Session> {
    let i = sessions
        .iter()
        .rposition(Session::established)
        .or_else(|| sessions.len().checked_sub(1))?;
    sessions.get_mut(i)
}

struct LocalKeys {
    current: KeyPair,
    current_limiter: Arc<RateLimiter>,
    previous: Option<(KeyPair, Arc<RateLimiter>, Instant)>,
}

#[derive(Default)]
struct Table {
    by_addr: HashMap<Ipv4Addr, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_endpoint: HashMap<SocketAddrV4, Arc<Peer>>,
    configs: HashMap<String, PeerConfig>,
}

pub struct Engine {
    keys: RwLock<LocalKeys>,
    table: RwLock<Table>,
    local: LocalTunnel,
    next_index: AtomicU32,
    pub counters: Counters,
}

impl Engine {
    pub fn new(key: KeyPair, local: LocalTunnel) -> Self {
        let limiter = Arc::new(RateLimiter::new(&key.public, HANDSHAKE_RATE));
        Self {
            keys: RwLock::new(LocalKeys {
                current: key,
                current_limiter: limiter,
                previous: None,
            }),
            table: RwLock::new(Table::default()),
            local,
            // Random start: indexes of a restarted agent do not meet its old ones.
            next_index: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
            counters: Counters::default(),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .current
            .public
            .as_bytes()
    }

    fn index(&self) -> u32 {
        // boringtun keeps 24 bits of it (it shifts it left by 8 for its own counter).
        self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff
    }

    /// A new session of `peer` with our current key, registered, and its first handshake
    /// initiation queued in `out`.
    fn new_session(&self, peer: &Arc<Peer>, peer_public: [u8; 32], out: &mut Outbox) {
        let (secret, public, limiter) = {
            let k = self.keys.read().unwrap_or_else(|p| p.into_inner());
            (
                k.current.secret.clone(),
                *k.current.public.as_bytes(),
                k.current_limiter.clone(),
            )
        };
        self.add_session(peer, secret, public, peer_public, limiter, Some(out));
    }

    fn add_session(
        &self,
        peer: &Arc<Peer>,
        secret: boringtun::x25519::StaticSecret,
        local_public: [u8; 32],
        peer_public: [u8; 32],
        limiter: Arc<RateLimiter>,
        initiate: Option<&mut Outbox>,
    ) {
        let index = self.index();
        let mut tunn = Tunn::new(
            secret,
            PublicKey::from(peer_public),
            None,
            None,
            index,
            Some(limiter),
        );
        if let Some(out) = initiate {
            let to = peer.endpoint();
            out.push_with(MIN_OUT, to, |dst| {
                match tunn.format_handshake_initiation(dst, false) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => 0,
                }
            });
        }
        lock(&peer.sessions).push(Session {
            tunn,
            index,
            local_public,
            peer_public,
            superseded: None,
        });
        self.table
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .by_index
            .insert(index, peer.clone());
    }

    /// Makes the peers those of `configs`: new ones get a session and a handshake at once
    /// (so a restarted node does not wait for traffic to find out), removed ones go, a peer
    /// whose key changed gets a new session beside the old one.
    pub fn set_peers(&self, configs: &[PeerConfig], out: &mut Outbox) {
        let mut create = Vec::new();
        {
            let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
            let wanted: HashMap<&str, &PeerConfig> =
                configs.iter().map(|c| (c.name.as_str(), c)).collect();
            let gone: Vec<String> = t
                .configs
                .keys()
                .filter(|n| !wanted.contains_key(n.as_str()))
                .cloned()
                .collect();
            for name in gone {
                if let Some(old) = t.configs.remove(&name) {
                    t.by_addr.remove(&old.tunnel_addr);
                    t.by_key.remove(&old.public_key);
                    t.by_endpoint.remove(&old.endpoint);
                    t.by_index.retain(|_, p| p.name != name);
                }
            }
            for c in configs {
                match t.configs.get(&c.name).cloned() {
                    Some(old) if old == *c => {}
                    Some(old) => {
                        let Some(peer) = t.by_addr.remove(&old.tunnel_addr) else {
                            continue;
                        };
                        t.by_key.remove(&old.public_key);
                        t.by_endpoint.remove(&old.endpoint);
                        *lock(&peer.endpoint) = c.endpoint;
                        // Its address on the tunnel is its identity on the wire: a changed
                        // one is a new peer.
                        let peer = if old.tunnel_addr == c.tunnel_addr {
                            peer
                        } else {
                            t.by_index.retain(|_, p| p.name != c.name);
                            Arc::new(Peer::new(c))
                        };
                        t.by_addr.insert(c.tunnel_addr, peer.clone());
                        t.by_key.insert(c.public_key, peer.clone());
                        t.by_endpoint.insert(c.endpoint, peer.clone());
                        t.configs.insert(c.name.clone(), c.clone());
                        let has_key = lock(&peer.sessions)
                            .iter()
                            .any(|s| s.peer_public == c.public_key);
                        if !has_key {
                            create.push((peer, c.public_key));
                        }
                    }
                    None => {
                        let peer = Arc::new(Peer::new(c));
                        t.by_addr.insert(c.tunnel_addr, peer.clone());
                        t.by_key.insert(c.public_key, peer.clone());
                        t.by_endpoint.insert(c.endpoint, peer.clone());
                        t.configs.insert(c.name.clone(), c.clone());
                        create.push((peer, c.public_key));
                    }
                }
            }
        }
        for (peer, key) in create {
            self.new_session(&peer, key, out);
        }
    }

    /// Starts using `key` as ours: new sessions with every peer (handshakes queued in
    /// `out`), while the old key keeps answering for a while and the old sessions carry the
    /// traffic until the new ones are up. The caller publishes the new public key first.
    pub fn rotate_key(&self, key: KeyPair, out: &mut Outbox) {
        {
            let mut k = self.keys.write().unwrap_or_else(|p| p.into_inner());
            let limiter = Arc::new(RateLimiter::new(&key.public, HANDSHAKE_RATE));
            let old = std::mem::replace(&mut k.current, key);
            let old_limiter = std::mem::replace(&mut k.current_limiter, limiter);
            k.previous = Some((old, old_limiter, Instant::now()));
        }
        let peers: Vec<(Arc<Peer>, [u8; 32])> = {
            let t = self.table.read().unwrap_or_else(|p| p.into_inner());
            t.configs
                .values()
                .filter_map(|c| Some((t.by_addr.get(&c.tunnel_addr)?.clone(), c.public_key)))
                .collect()
        };
        for (peer, key) in peers {
            self.new_session(&peer, key, out);
        }
    }

    /// The peer whose tunnel address is `addr`.
    pub fn peer_for(&self, addr: Ipv4Addr) -> Option<Arc<Peer>> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_addr
            .get(&addr)
            .cloned()
    }

    /// Encrypts `packets` (all for `peer`) into `out`, taking the peer's lock once.
    pub fn encapsulate(&self, peer: &Peer, packets: &[&[u8]], out: &mut Outbox) {
        let to = peer.endpoint();
        let mut sessions = lock(&peer.sessions);
        let Some(s) = pick(&mut sessions) else {
            return;
        };
        for p in packets {
            out.push_with((p.len() + OVERHEAD).max(MIN_OUT), to, |dst| {
                match s.tunn.encapsulate(p, dst) {
                    TunnResult::WriteToNetwork(w) => w.len(),
                    // Queued until the handshake completes (boringtun keeps 256).
                    _ => 0,
                }
            });
        }
    }

    /// Handles one datagram from `from`: decrypted packets for the node go to `inbox`,
    /// replies (handshake responses, queued packets now sendable) to `out`.
    pub fn receive(
        &self,
        from: SocketAddrV4,
        datagram: &[u8],
        inbox: &mut Inbox,
        out: &mut Outbox,
    ) -> RxVerdict {
        let verdict = self.receive_inner(from, datagram, inbox, out);
        self.counters.count(verdict);
        verdict
    }

    fn receive_inner(
        &self,
        from: SocketAddrV4,
        datagram: &[u8],
        inbox: &mut Inbox,
        out: &mut Outbox,
    ) -> RxVerdict {
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return RxVerdict::Malformed,
        };
        let (peer, index) = match &packet {
            Packet::PacketData(p) => (
                self.by_index(p.receiver_idx >> 8),
                Some(p.receiver_idx >> 8),
            ),
            Packet::HandshakeResponse(p) => (
                self.by_index(p.receiver_idx >> 8),
                Some(p.receiver_idx >> 8),
            ),
            Packet::PacketCookieReply(p) => (
                self.by_index(p.receiver_idx >> 8),
                Some(p.receiver_idx >> 8),
            ),
            Packet::HandshakeInit(init) => match self.initiator(init) {
                Some((peer, local_public, peer_public)) => {
                    let index = self.session_for(&peer, local_public, peer_public);
                    (Some(peer), Some(index))
                }
                None => (None, None),
            },
        };
        let (Some(peer), Some(index)) = (peer, index) else {
            if matches!(packet, Packet::PacketData(_)) {
                self.nudge(from, out);
            }
            return RxVerdict::UnknownPeer;
        };
        let to = peer.endpoint();
        let mut sessions = lock(&peer.sessions);
        let Some(s) = sessions.iter_mut().find(|s| s.index == index) else {
            return RxVerdict::UnknownPeer;
        };
        let src = Some(IpAddr::V4(*from.ip()));
        let start = inbox.buf.len();
        inbox.buf.resize(start + datagram.len().max(MIN_OUT), 0);
        let verdict = match s.tunn.decapsulate(src, datagram, &mut inbox.buf[start..]) {
            TunnResult::WriteToTunnelV4(p, inner_src) => {
                let n = p.len();
                if self.allowed(&inbox.buf[start..start + n], inner_src, peer.tunnel_addr) {
                    inbox.items.push((start, n));
                    inbox.buf.truncate(start + n);
                    RxVerdict::Data
                } else {
                    inbox.buf.truncate(start);
                    RxVerdict::Forbidden
                }
            }
            TunnResult::WriteToTunnelV6(..) => {
                inbox.buf.truncate(start);
                RxVerdict::Forbidden
            }
            TunnResult::WriteToNetwork(p) => {
                let n = p.len();
                let reply = inbox.buf[start..start + n].to_vec();
                inbox.buf.truncate(start);
                out.push_with(n, to, |dst| {
                    dst[..n].copy_from_slice(&reply);
                    n
                });
                // Packets queued before the handshake go out now.
                loop {
                    let mut more = false;
                    out.push_with(MIN_OUT.max(2048), to, |dst| {
                        match s.tunn.decapsulate(None, &[], dst) {
                            TunnResult::WriteToNetwork(w) => {
                                more = true;
                                w.len()
                            }
                            _ => 0,
                        }
                    });
                    if !more {
                        break;
                    }
                }
                self.counters.handshakes.fetch_add(1, Ordering::Relaxed);
                RxVerdict::Control
            }
            TunnResult::Done => {
                inbox.buf.truncate(start);
                if matches!(packet, Packet::HandshakeResponse(_)) {
                    self.counters.handshakes.fetch_add(1, Ordering::Relaxed);
                }
                RxVerdict::Control
            }
            TunnResult::Err(e) => {
                inbox.buf.truncate(start);
                match e {
                    WireGuardError::DuplicateCounter
                    | WireGuardError::InvalidCounter
                    | WireGuardError::InvalidAeadTag
                    | WireGuardError::InvalidMac
                    | WireGuardError::WrongKey
                    | WireGuardError::InvalidTai64nTimestamp
                    | WireGuardError::WrongTai64nTimestamp => RxVerdict::Rejected,
                    WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
                        RxVerdict::UnknownPeer
                    }
                    _ => RxVerdict::Rejected,
                }
            }
        };
        drop(sessions);
        if verdict == RxVerdict::Control {
            self.supersede(&peer);
        }
        verdict
    }

    /// A decrypted packet may enter the node only from the peer's tunnel address to ours, as
    /// VXLAN on the encrypted VXLAN port or as TCP to or from the agents' control port.
    fn allowed(&self, pkt: &[u8], inner_src: Ipv4Addr, peer_addr: Ipv4Addr) -> bool {
        let addressed = inner_src == peer_addr
            && packet::ipv4_src(pkt) == Some(peer_addr.octets())
            && packet::ipv4_dst(pkt) == Some(self.local.addr.octets())
            && pkt.len() >= 28
            && pkt[0] == 0x45;
        if !addressed {
            return false;
        }
        let (sport, dport) = (
            u16::from_be_bytes([pkt[20], pkt[21]]),
            u16::from_be_bytes([pkt[22], pkt[23]]),
        );
        match pkt[9] {
            17 => dport == self.local.vxlan_port,
            6 => {
                let c = self.local.control_port;
                // Not a fragment: the ports are really there.
                let unfragmented = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff == 0;
                c != 0 && unfragmented && pkt.len() >= 40 && (dport == c || sport == c)
            }
            _ => false,
        }
    }

    fn by_index(&self, index: u32) -> Option<Arc<Peer>> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_index
            .get(&index)
            .cloned()
    }

    /// Who sent a handshake initiation: the peer, our key it was made for, and its key.
    fn initiator(
        &self,
        init: &boringtun::noise::HandshakeInit,
    ) -> Option<(Arc<Peer>, [u8; 32], [u8; 32])> {
        let k = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut ours = vec![&k.current];
        if let Some((old, _, _)) = &k.previous {
            ours.push(old);
        }
        for key in ours {
            if let Ok(half) = parse_handshake_anon(&key.secret, &key.public, init) {
                let t = self.table.read().unwrap_or_else(|p| p.into_inner());
                let peer = t.by_key.get(&half.peer_static_public)?.clone();
                return Some((peer, *key.public.as_bytes(), half.peer_static_public));
            }
        }
        None
    }

    /// The index of `peer`'s session between our `local_public` and its `peer_public`,
    /// created if a peer started it before we did.
    fn session_for(&self, peer: &Arc<Peer>, local_public: [u8; 32], peer_public: [u8; 32]) -> u32 {
        if let Some(s) = lock(&peer.sessions)
            .iter()
            .rev()
            .find(|s| s.local_public == local_public && s.peer_public == peer_public)
        {
            return s.index;
        }
        let (secret, limiter) = {
            let k = self.keys.read().unwrap_or_else(|p| p.into_inner());
            if *k.current.public.as_bytes() == local_public {
                (k.current.secret.clone(), k.current_limiter.clone())
            } else if let Some((old, limiter, _)) = &k.previous {
                (old.secret.clone(), limiter.clone())
            } else {
                (k.current.secret.clone(), k.current_limiter.clone())
            }
        };
        self.add_session(peer, secret, local_public, peer_public, limiter, None);
        lock(&peer.sessions).last().map_or(0, |s| s.index)
    }

    /// Data from a known endpoint that no session of ours can read (we restarted and lost
    /// the session, or it was rotated away): start a handshake so traffic resumes without
    /// waiting for the peer's rekey.
    fn nudge(&self, from: SocketAddrV4, out: &mut Outbox) {
        let peer = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_endpoint
            .get(&from)
            .cloned();
        let Some(peer) = peer else {
            return;
        };
        {
            let mut last = lock(&peer.last_nudge);
            if last.is_some_and(|t| t.elapsed() < NUDGE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let to = peer.endpoint();
        let mut sessions = lock(&peer.sessions);
        if let Some(s) = sessions.last_mut() {
            out.push_with(MIN_OUT, to, |dst| {
                match s.tunn.format_handshake_initiation(dst, false) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => 0,
                }
            });
        }
    }

    /// Marks older sessions superseded once a newer one is established.
    fn supersede(&self, peer: &Peer) {
        let mut sessions = lock(&peer.sessions);
        if let Some(newest) = sessions.iter().rposition(Session::established) {
            let now = Instant::now();
            for s in &mut sessions[..newest] {
                s.superseded.get_or_insert(now);
            }
        }
    }

    /// Every ~250 ms: boringtun's timers (handshake retries, keepalives, rekeys), retiring
    /// superseded sessions and old keys, the rate limiter's window.
    pub fn tick(&self, reset_limiter: bool, out: &mut Outbox) {
        {
            let mut k = self.keys.write().unwrap_or_else(|p| p.into_inner());
            if reset_limiter {
                k.current_limiter.reset_count();
                if let Some((_, l, _)) = &k.previous {
                    l.reset_count();
                }
            }
            if k.previous
                .as_ref()
                .is_some_and(|(_, _, t)| t.elapsed() > OLD_KEY_KEPT)
            {
                k.previous = None;
            }
        }
        let peers: Vec<Arc<Peer>> = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_addr
            .values()
            .cloned()
            .collect();
        let mut retired = Vec::new();
        for peer in peers {
            self.supersede(&peer);
            let to = peer.endpoint();
            let mut sessions = lock(&peer.sessions);
            for s in sessions.iter_mut() {
                out.push_with(MIN_OUT, to, |dst| match s.tunn.update_timers(dst) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => 0,
                });
            }
            let before = sessions.len();
            sessions.retain(|s| {
                let keep = s.superseded.is_none_or(|t| t.elapsed() < RETIRE_AFTER);
                if !keep {
                    let (_, tx, rx, _, _) = s.tunn.stats();
                    peer.retired_tx.fetch_add(tx as u64, Ordering::Relaxed);
                    peer.retired_rx.fetch_add(rx as u64, Ordering::Relaxed);
                    retired.push(s.index);
                }
                keep
            });
            debug_assert!(!sessions.is_empty() || before == 0);
        }
        if !retired.is_empty() {
            let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
            for i in retired {
                t.by_index.remove(&i);
            }
        }
    }

    /// Every peer, by name.
    pub fn stats(&self) -> Vec<PeerStats> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PeerStats> = t
            .configs
            .values()
            .filter_map(|c| {
                let peer = t.by_addr.get(&c.tunnel_addr)?;
                let sessions = lock(&peer.sessions);
                let mut tx = peer.retired_tx.load(Ordering::Relaxed);
                let mut rx = peer.retired_rx.load(Ordering::Relaxed);
                for s in sessions.iter() {
                    let (_, t, r, _, _) = s.tunn.stats();
                    tx += t as u64;
                    rx += r as u64;
                }
                let since = sessions
                    .iter()
                    .filter_map(|s| s.tunn.time_since_last_handshake())
                    .min();
                Some(PeerStats {
                    name: c.name.clone(),
                    endpoint: peer.endpoint(),
                    tunnel_addr: c.tunnel_addr,
                    public_key: c.public_key,
                    since_handshake: since,
                    tx_bytes: tx,
                    rx_bytes: rx,
                    sessions: sessions.len(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl Peer {
    fn new(c: &PeerConfig) -> Self {
        Self {
            name: c.name.clone(),
            tunnel_addr: c.tunnel_addr,
            endpoint: Mutex::new(c.endpoint),
            sessions: Mutex::new(Vec::new()),
            last_nudge: Mutex::new(None),
            retired_tx: AtomicU64::new(0),
            retired_rx: AtomicU64::new(0),
        }
    }
}
