//! Connection tracking for the load balancer: which backend a flow was given, and how its
//! replies are translated back. Layout and kinds of entries: `dataplane_common::CtKind`.
//!
//! Every balanced connection has two entries created together on the node that balanced it:
//! the forward one, keyed by the client's packets, and the reverse one, keyed by the
//! backend's replies. They are refreshed together, so a flow whose packets only go one way
//! (a UDP stream, a long download) keeps both alive, and either entry can recreate the other
//! if the LRU evicted it.

use aya_ebpf::{bindings, helpers::bpf_ktime_get_coarse_ns};
use dataplane_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_CLOSING, CT_F_HAIRPIN, CT_TCP_TIMEOUT_DEFAULT_S,
    CT_UDP_TIMEOUT_DEFAULT_S, Config, CtEntry, CtKey, CtKind, DropReason, HAIRPIN_SNAT_IP,
    IPPROTO_TCP,
};

use crate::{ipv4::Ipv4, l4::L4, lb, maps::CONNTRACK};

// The bindings' integer types differ between architectures (see verdict.rs).
#[allow(clippy::unnecessary_cast)]
const BPF_ANY: u64 = bindings::BPF_ANY as u64;
#[allow(clippy::unnecessary_cast)]
const BPF_NOEXIST: u64 = bindings::BPF_NOEXIST as u64;

const NS_PER_S: u64 = 1_000_000_000;
/// Entries in use are refreshed at most this often (and at least four times per timeout), so
/// a busy flow does not write its entries on every packet.
const REFRESH_MAX_NS: u64 = NS_PER_S;

/// The time and the idle timeout that apply to one packet.
#[derive(Clone, Copy)]
pub struct Clock {
    now: u64,
    timeout: u64,
    refresh: u64,
}

impl Clock {
    /// The clock for a packet of protocol `proto`. The coarse clock (jiffies resolution) is
    /// plenty for timeouts in seconds and cheaper than `bpf_ktime_get_ns`.
    #[inline(always)]
    pub fn new(config: &Config, proto: u8) -> Self {
        let secs = if proto == IPPROTO_TCP {
            nonzero_or(config.ct_tcp_timeout_s, CT_TCP_TIMEOUT_DEFAULT_S)
        } else {
            nonzero_or(config.ct_udp_timeout_s, CT_UDP_TIMEOUT_DEFAULT_S)
        };
        let timeout = u64::from(secs) * NS_PER_S;
        let quarter = timeout / 4;
        Self {
            // SAFETY: helper without arguments.
            now: unsafe { bpf_ktime_get_coarse_ns() },
            timeout,
            refresh: if quarter < REFRESH_MAX_NS {
                quarter
            } else {
                REFRESH_MAX_NS
            },
        }
    }

    /// Idle for longer than the timeout. Saturating: another CPU may have stored a
    /// timestamp a tick newer than the one this CPU read.
    #[inline(always)]
    fn expired(&self, last_seen: u64) -> bool {
        self.now.saturating_sub(last_seen) > self.timeout
    }

    #[inline(always)]
    fn refresh_due(&self, last_seen: u64) -> bool {
        self.now.saturating_sub(last_seen) >= self.refresh
    }
}

#[inline(always)]
fn nonzero_or(value: u32, default: u32) -> u32 {
    if value == 0 { default } else { value }
}

/// The key of a packet from a client: its tuple as seen, direction original.
#[inline(always)]
pub fn original_key(ip: &Ipv4, l4: &L4) -> CtKey {
    CtKey {
        src_ip: ip.src,
        dst_ip: ip.dst,
        src_port: l4.sport,
        dst_port: l4.dport,
        proto: l4.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    }
}

/// The key of a reply: its tuple as seen, direction reply.
#[inline(always)]
pub fn reply_key(ip: &Ipv4, l4: &L4) -> CtKey {
    CtKey {
        dir: CT_DIR_REPLY,
        ..original_key(ip, l4)
    }
}

/// The key under which the replies to a packet with `key` are found (tuple swapped).
#[inline(always)]
pub fn reply_key_of(key: &CtKey) -> CtKey {
    CtKey {
        src_ip: key.dst_ip,
        dst_ip: key.src_ip,
        src_port: key.dst_port,
        dst_port: key.src_port,
        proto: key.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// What to create for a new balanced connection.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Backend set to pick from.
    pub service_id: u32,
    /// Port on the backend (the VIP's port for VIPs, the target port for published ports).
    pub backend_port: [u8; 2],
    /// Kind of the forward and of the reverse entry.
    pub forward: CtKind,
    pub reverse: CtKind,
    /// VNI recorded in the entries; 0: the chosen backend's (ENDPOINTS), for the mesh.
    pub vni: u32,
}

/// Where a balanced packet goes: backend address and port, network order.
///
/// Filled in through a `&mut` rather than returned: LLVM packs a small returned tuple into
/// registers in a block shared with the error paths, where those registers are uninitialised,
/// which the verifier rejects ("R1 !read_ok"); a stack slot has no such problem.
#[derive(Clone, Copy, Default)]
pub struct Target {
    pub ip: [u8; 4],
    pub port: [u8; 2],
    /// The client was balanced to itself: the source must become `HAIRPIN_SNAT_IP` too.
    pub hairpin: bool,
}

impl Target {
    #[inline(always)]
    fn set(&mut self, entry: &CtEntry) {
        self.ip = entry.nat_ip;
        self.port = entry.nat_port;
        self.hairpin = entry.flags & CT_F_HAIRPIN != 0;
    }
}

/// The key of the replies of the forward entry `entry` stored under `key`: from the backend,
/// to the client (or, for a hairpin connection, to `HAIRPIN_SNAT_IP`, which the client=backend
/// saw as its peer).
#[inline(always)]
fn reverse_key_of(key: &CtKey, entry: &CtEntry) -> CtKey {
    CtKey {
        src_ip: entry.nat_ip,
        dst_ip: if entry.flags & CT_F_HAIRPIN != 0 {
            HAIRPIN_SNAT_IP
        } else {
            key.src_ip
        },
        src_port: entry.nat_port,
        dst_port: key.src_port,
        proto: key.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// Sets `target` to the backend of the connection the client packet with `key` belongs to:
/// the one in its live forward entry, or for a new connection the next one of the set in
/// round-robin order, recorded in a new entry pair.
///
/// A TCP SYN on an entry whose client already sent FIN or RST starts a new connection (the
/// client reused the port) and is balanced anew, unless it is a retransmission of the SYN that
/// created the entry (same sequence number; see `CT_F_CLOSING`).
#[inline(always)]
pub fn balance(
    key: &CtKey,
    l4: &L4,
    clock: &Clock,
    flow: &Flow,
    target: &mut Target,
) -> Result<(), DropReason> {
    let Some(entry_ptr) = CONNTRACK.get_ptr_mut(key) else {
        return create(key, l4, clock, flow, BPF_NOEXIST, target);
    };
    // SAFETY: a valid map value pointer; copied at once (see maps.rs on LRU reuse).
    let entry = unsafe { *entry_ptr };
    let reusable = entry.kind == flow.forward as u8
        && !clock.expired(entry.last_seen_ns)
        && !(l4.is_syn() && entry.flags & CT_F_CLOSING != 0 && !same_syn(&entry, l4));
    if !reusable {
        return create(key, l4, clock, flow, BPF_ANY, target);
    }
    if l4.is_closing() && entry.flags & CT_F_CLOSING == 0 {
        // SAFETY: as above; a byte store, racing only with identical stores.
        unsafe { (*entry_ptr).flags = entry.flags | CT_F_CLOSING };
    }
    if clock.refresh_due(entry.last_seen_ns) {
        // SAFETY: as above; an aligned u64 store.
        unsafe { (*entry_ptr).last_seen_ns = clock.now };
        refresh_partner(
            &reverse_key_of(key, &entry),
            clock,
            &reverse_of(key, &entry, flow.reverse),
        );
    }
    target.set(&entry);
    Ok(())
}

/// `l4` (a SYN) is a retransmission of the SYN that created the forward entry `entry`.
#[inline(always)]
fn same_syn(entry: &CtEntry, l4: &L4) -> bool {
    entry.syn_seq != 0 && entry.syn_seq == l4.seq
}

/// Picks a backend and creates the entry pair. `flags`: `BPF_NOEXIST` when no entry was
/// there (so of two CPUs racing on the first packets of one flow, the second follows the
/// first's choice), `BPF_ANY` to replace an expired or finished one.
#[inline(always)]
fn create(
    key: &CtKey,
    l4: &L4,
    clock: &Clock,
    flow: &Flow,
    flags: u64,
    target: &mut Target,
) -> Result<(), DropReason> {
    let backend = lb::select(flow.service_id)?;
    let vni = if flow.vni != 0 {
        flow.vni
    } else {
        crate::maps::endpoint(&backend).map_or(0, |ep| ep.vni)
    };
    let mut entry_flags = if l4.is_closing() { CT_F_CLOSING } else { 0 };
    if backend == key.src_ip {
        entry_flags |= CT_F_HAIRPIN;
    }
    let forward = CtEntry {
        last_seen_ns: clock.now,
        nat_ip: backend,
        nat_port: flow.backend_port,
        kind: flow.forward as u8,
        flags: entry_flags,
        tunnel_node: [0; 4],
        vni,
        service_id: flow.service_id,
        syn_seq: if l4.is_syn() { l4.seq } else { 0 },
    };
    if CONNTRACK.insert(key, forward, flags).is_err() {
        if flags == BPF_NOEXIST {
            // SAFETY: copied at once.
            if let Some(winner) = unsafe { CONNTRACK.get(key) } {
                target.set(winner);
                return Ok(());
            }
        }
        return Err(DropReason::ConntrackFailed);
    }
    CONNTRACK
        .insert(
            reverse_key_of(key, &forward),
            reverse_of(key, &forward, flow.reverse),
            BPF_ANY,
        )
        .map_err(|_| DropReason::ConntrackFailed)?;
    target.set(&forward);
    Ok(())
}

/// The reverse entry matching the forward entry `forward` stored under `key`: replies get the
/// address the client sent to back as their source.
#[inline(always)]
fn reverse_of(key: &CtKey, forward: &CtEntry, kind: CtKind) -> CtEntry {
    CtEntry {
        last_seen_ns: forward.last_seen_ns,
        nat_ip: key.dst_ip,
        nat_port: key.dst_port,
        kind: kind as u8,
        flags: forward.flags & CT_F_HAIRPIN,
        tunnel_node: [0; 4],
        vni: forward.vni,
        service_id: forward.service_id,
        syn_seq: 0,
    }
}

/// Refreshes the other entry of a pair, recreating it as `expected` if it is gone or no
/// longer belongs to this connection (evicted, or replaced by a newer connection reusing the
/// tuple: then the newer one wins and is left alone).
#[inline(always)]
fn refresh_partner(key: &CtKey, clock: &Clock, expected: &CtEntry) {
    match CONNTRACK.get_ptr_mut(key) {
        Some(ptr) => {
            // SAFETY: a valid map value pointer; fields read and an aligned u64 stored.
            unsafe {
                if (*ptr).kind == expected.kind && (*ptr).nat_ip == expected.nat_ip {
                    (*ptr).last_seen_ns = clock.now;
                }
            }
        }
        None => {
            let entry = CtEntry {
                last_seen_ns: clock.now,
                ..*expected
            };
            // Best effort: failing leaves the pair as it was.
            let _ = CONNTRACK.insert(key, entry, BPF_NOEXIST);
        }
    }
}

/// The live entry for the reply with `key` (any of the reply kinds: `VipReverse`,
/// `MeshReverse`, `MeshReturn`), refreshed if due, together with its forward partner.
///
/// Every local delivery of TCP/UDP asks this, and most of them are not replies of balanced
/// connections: the clock is read only once an entry is found.
#[inline(always)]
pub fn reply(key: &CtKey, config: &Config) -> Option<CtEntry> {
    let ptr = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a valid map value pointer, copied at once.
    let entry = unsafe { *ptr };
    let clock = Clock::new(config, key.proto);
    let forward_kind = match entry.kind {
        VIP_REVERSE => Some(CtKind::VipForward),
        MESH_REVERSE => Some(CtKind::MeshForward),
        MESH_RETURN => None,
        _ => return None,
    };
    if clock.expired(entry.last_seen_ns) {
        return None;
    }
    if clock.refresh_due(entry.last_seen_ns) {
        // SAFETY: as above; an aligned u64 store.
        unsafe { (*ptr).last_seen_ns = clock.now };
        if let Some(forward_kind) = forward_kind {
            // The forward entry: client -> what it connected to, DNAT to the replying backend.
            // The client is the reply's destination, or for a hairpin connection its source.
            let hairpin = entry.flags & CT_F_HAIRPIN;
            let forward_key = CtKey {
                src_ip: if hairpin != 0 { key.src_ip } else { key.dst_ip },
                dst_ip: entry.nat_ip,
                src_port: key.dst_port,
                dst_port: entry.nat_port,
                proto: key.proto,
                dir: CT_DIR_ORIGINAL,
                _pad: [0; 2],
            };
            let forward = CtEntry {
                last_seen_ns: clock.now,
                nat_ip: key.src_ip,
                nat_port: key.src_port,
                kind: forward_kind as u8,
                flags: hairpin,
                tunnel_node: [0; 4],
                vni: entry.vni,
                service_id: entry.service_id,
                syn_seq: 0,
            };
            refresh_partner(&forward_key, &clock, &forward);
        }
    }
    Some(entry)
}

pub const VIP_REVERSE: u8 = CtKind::VipReverse as u8;
pub const MESH_REVERSE: u8 = CtKind::MeshReverse as u8;
pub const MESH_RETURN: u8 = CtKind::MeshReturn as u8;

/// On a backend's node: records that replies with `key` (backend -> outside client) go back
/// through the tunnel to `node` with `vni`, where the client's connection came in. Writes the
/// map only when the entry is missing, different or due for a refresh.
#[inline(always)]
pub fn record_mesh_return(
    key: &CtKey,
    clock: &Clock,
    node: [u8; 4],
    vni: u32,
) -> Result<(), DropReason> {
    if let Some(ptr) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer, copied at once.
        let entry = unsafe { *ptr };
        if entry.kind == CtKind::MeshReturn as u8
            && entry.tunnel_node == node
            && entry.vni == vni
            && !clock.expired(entry.last_seen_ns)
        {
            if clock.refresh_due(entry.last_seen_ns) {
                // SAFETY: as above; an aligned u64 store.
                unsafe { (*ptr).last_seen_ns = clock.now };
            }
            return Ok(());
        }
    }
    let entry = CtEntry {
        last_seen_ns: clock.now,
        nat_ip: [0; 4],
        nat_port: [0; 2],
        kind: CtKind::MeshReturn as u8,
        flags: 0,
        tunnel_node: node,
        vni,
        service_id: 0,
        syn_seq: 0,
    };
    CONNTRACK
        .insert(key, entry, BPF_ANY)
        .map_err(|_| DropReason::ConntrackFailed)
}
