//! Connection tracking for the load balancer: which backend a flow was given, and how its
//! replies are translated back. Layout and kinds of entries: `dataplane_common::CtKind`; the two
//! tables (CT_NEW for connections being set up, CONNTRACK for established ones):
//! `dataplane_common::conntrack`.
//!
//! Every balanced connection has two entries created together on the node that balanced it:
//! the forward one, keyed by the client's packets, and the reverse one, keyed by the
//! backend's replies. They live in the same table, move together from CT_NEW to CONNTRACK
//! ("promotion": TCP when the client sends its first packet after the SYN, UDP when the first
//! reply comes back), and are refreshed together, so a flow whose packets only go one way (a
//! UDP stream, a long download) keeps both alive.
//!
//! Only a TCP SYN (or any UDP packet) creates a connection. A TCP packet of an unknown
//! connection is refused (`NoConntrack`): balancing it anew would send it to a backend that
//! knows nothing of it.
//!
//! Timeouts per state: half-open TCP (in CT_NEW) `ct_syn_timeout_s`, established TCP
//! `ct_tcp_timeout_s`, TCP after a FIN or RST `ct_close_timeout_s`, UDP `ct_udp_timeout_s`. An
//! entry idle for longer counts as absent; the agent deletes expired CONNTRACK entries, CT_NEW
//! recycles its own.

use aya_ebpf::{bindings, helpers::bpf_ktime_get_coarse_ns};
use dataplane_common::{
    CT_CLOSE_TIMEOUT_DEFAULT_S, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_CLOSING, CT_F_ENCRYPTED,
    CT_F_HAIRPIN, CT_SYN_TIMEOUT_DEFAULT_S, CT_TCP_TIMEOUT_DEFAULT_S, CT_UDP_TIMEOUT_DEFAULT_S,
    Config, CtEntry, CtKey, CtKind, DropReason, HAIRPIN_SNAT_IP, IPPROTO_TCP,
};

use crate::{
    ipv4::Ipv4,
    l4::L4,
    lb,
    maps::{CONNTRACK, CT_NEW},
};

// The bindings' integer types differ between architectures (see verdict.rs).
#[allow(clippy::unnecessary_cast)]
const BPF_ANY: u64 = bindings::BPF_ANY as u64;
#[allow(clippy::unnecessary_cast)]
const BPF_NOEXIST: u64 = bindings::BPF_NOEXIST as u64;

const NS_PER_S: u64 = 1_000_000_000;
/// Entries in use are refreshed at most this often (and at least four times per timeout), so
/// a busy flow does not write its entries on every packet.
const REFRESH_MAX_NS: u64 = NS_PER_S;

/// Which table an entry was found in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    /// CONNTRACK: established.
    Live,
    /// CT_NEW: being set up.
    New,
}

/// An entry found by [`lookup`]: where it lives and a copy of it.
#[derive(Clone, Copy)]
pub(crate) struct Found {
    pub ptr: *mut CtEntry,
    pub table: Table,
    pub entry: CtEntry,
}

/// The entry under `key`, established table first.
///
/// [`promote`] on another CPU inserts into CONNTRACK before it removes from CT_NEW, so a
/// lookup that missed CONNTRACK just before the insert and then CT_NEW just after the removal
/// finds the entry on a second look at CONNTRACK. Without it a packet racing a handshake's
/// last ACK on another CPU (the client's request, the backend's answer) could find no entry
/// (`NoConntrack`, `UnknownEndpoint`: a reset connection). Costs a third lookup only for
/// packets of no tracked connection.
#[inline(always)]
pub(crate) fn lookup(key: &CtKey) -> Option<Found> {
    let (ptr, table) = match CONNTRACK.get_ptr_mut(key) {
        Some(ptr) => (ptr, Table::Live),
        None => match CT_NEW.get_ptr_mut(key) {
            Some(ptr) => (ptr, Table::New),
            None => (CONNTRACK.get_ptr_mut(key)?, Table::Live),
        },
    };
    // SAFETY: a valid map value pointer; copied at once (see maps.rs on element reuse).
    let entry = unsafe { *ptr };
    Some(Found { ptr, table, entry })
}

#[inline(always)]
pub(crate) fn remove(key: &CtKey, table: Table) {
    // Best effort: an entry that is already gone is what we wanted.
    let _ = match table {
        Table::Live => CONNTRACK.remove(key),
        Table::New => CT_NEW.remove(key),
    };
}

#[inline(always)]
pub(crate) fn insert(
    key: &CtKey,
    entry: &CtEntry,
    table: Table,
    flags: u64,
) -> Result<(), DropReason> {
    let r = match table {
        Table::Live => CONNTRACK.insert(key, entry, flags),
        Table::New => CT_NEW.insert(key, entry, flags),
    };
    r.map_err(|_| DropReason::ConntrackFailed)
}

/// The time and the idle timeouts that apply to one packet.
#[derive(Clone, Copy)]
pub struct Clock {
    pub now: u64,
    tcp: u64,
    syn: u64,
    close: u64,
    udp: u64,
}

#[inline(always)]
fn secs_or(value: u32, default: u32) -> u64 {
    u64::from(if value == 0 { default } else { value }) * NS_PER_S
}

impl Clock {
    /// The coarse clock (jiffies resolution) is plenty for timeouts in seconds and cheaper
    /// than `bpf_ktime_get_ns`.
    #[inline(always)]
    pub fn new(config: &Config) -> Self {
        Self {
            // SAFETY: helper without arguments.
            now: unsafe { bpf_ktime_get_coarse_ns() },
            tcp: secs_or(config.ct_tcp_timeout_s, CT_TCP_TIMEOUT_DEFAULT_S),
            syn: secs_or(config.ct_syn_timeout_s, CT_SYN_TIMEOUT_DEFAULT_S),
            close: secs_or(config.ct_close_timeout_s, CT_CLOSE_TIMEOUT_DEFAULT_S),
            udp: secs_or(config.ct_udp_timeout_s, CT_UDP_TIMEOUT_DEFAULT_S),
        }
    }

    /// The idle timeout of an entry of protocol `proto` with `flags`, in `table`.
    #[inline(always)]
    fn timeout(&self, proto: u8, flags: u8, table: Table) -> u64 {
        if proto != IPPROTO_TCP {
            self.udp
        } else if flags & CT_F_CLOSING != 0 {
            self.close
        } else if table == Table::New {
            self.syn
        } else {
            self.tcp
        }
    }

    /// Idle for longer than its timeout. Saturating: another CPU may have stored a timestamp
    /// a tick newer than the one this CPU read.
    #[inline(always)]
    pub(crate) fn expired(&self, proto: u8, found: &Found) -> bool {
        let timeout = self.timeout(proto, found.entry.flags, found.table);
        self.now.saturating_sub(found.entry.last_seen_ns) > timeout
    }

    #[inline(always)]
    pub(crate) fn refresh_due(&self, proto: u8, found: &Found) -> bool {
        let quarter = self.timeout(proto, found.entry.flags, found.table) / 4;
        let every = if quarter < REFRESH_MAX_NS {
            quarter
        } else {
            REFRESH_MAX_NS
        };
        self.now.saturating_sub(found.entry.last_seen_ns) >= every
    }
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

/// The reverse entry matching the forward entry `forward` stored under `key`: replies get the
/// address the client sent to back as their source.
#[inline(always)]
fn reverse_of(key: &CtKey, forward: &CtEntry, kind: CtKind) -> CtEntry {
    CtEntry {
        last_seen_ns: forward.last_seen_ns,
        nat_ip: key.dst_ip,
        nat_port: key.dst_port,
        kind: kind as u8,
        flags: forward.flags & (CT_F_HAIRPIN | CT_F_CLOSING),
        tunnel_node: [0; 4],
        vni: forward.vni,
        service_id: forward.service_id,
        syn_seq: 0,
    }
}

/// The forward key and entry matching the reverse entry `entry` found under the reply key
/// `key`: the client is the reply's destination, or for a hairpin connection its source.
#[inline(always)]
fn forward_of(key: &CtKey, entry: &CtEntry, kind: CtKind) -> (CtKey, CtEntry) {
    let hairpin = entry.flags & CT_F_HAIRPIN != 0;
    let forward_key = CtKey {
        src_ip: if hairpin { key.src_ip } else { key.dst_ip },
        dst_ip: entry.nat_ip,
        src_port: key.dst_port,
        dst_port: entry.nat_port,
        proto: key.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    };
    let forward = CtEntry {
        last_seen_ns: entry.last_seen_ns,
        nat_ip: key.src_ip,
        nat_port: key.src_port,
        kind: kind as u8,
        flags: entry.flags & (CT_F_HAIRPIN | CT_F_CLOSING),
        tunnel_node: [0; 4],
        vni: entry.vni,
        service_id: entry.service_id,
        syn_seq: 0,
    };
    (forward_key, forward)
}

/// Moves a connection's entry pair from CT_NEW to CONNTRACK. If CONNTRACK is full the pair
/// stays where it is: the connection still works, it is only not protected from eviction.
#[inline(always)]
pub(crate) fn promote(key_a: &CtKey, a: &CtEntry, key_b: &CtKey, b: &CtEntry) {
    if insert(key_a, a, Table::Live, BPF_ANY).is_err() {
        return;
    }
    if insert(key_b, b, Table::Live, BPF_ANY).is_err() {
        remove(key_a, Table::Live);
        return;
    }
    remove(key_a, Table::New);
    remove(key_b, Table::New);
}

/// Sets `CT_F_CLOSING` on the entry behind `found` and on its partner under `partner` (the
/// two entries of a connection share one state, so they expire together).
#[inline(always)]
pub(crate) fn mark_closing(found: &Found, partner: &CtKey) {
    // SAFETY: a valid map value pointer; a byte store, racing only with identical stores.
    unsafe { (*found.ptr).flags = found.entry.flags | CT_F_CLOSING };
    if let Some(p) = lookup(partner) {
        // SAFETY: as above.
        unsafe { (*p.ptr).flags = p.entry.flags | CT_F_CLOSING };
    }
}

/// Sets `target` to the backend of the connection the client packet with `key` belongs to:
/// the one in its live forward entry, or for a new connection (a TCP SYN, any UDP packet)
/// the next one of the set in round-robin order, recorded in a new entry pair in CT_NEW.
///
/// A TCP SYN on an entry whose client already sent FIN or RST starts a new connection (the
/// client reused the port) and is balanced anew, unless it is a retransmission of the SYN that
/// created the entry (same sequence number; see `CT_F_CLOSING`). Any other TCP packet without
/// a live entry is `NoConntrack`.
#[inline(always)]
pub fn balance(
    key: &CtKey,
    l4: &L4,
    clock: &Clock,
    flow: &Flow,
    target: &mut Target,
) -> Result<(), DropReason> {
    let tcp = l4.proto == IPPROTO_TCP;
    let Some(found) = lookup(key) else {
        if tcp && !l4.is_syn() {
            return Err(DropReason::NoConntrack);
        }
        return create(key, l4, clock, flow, BPF_NOEXIST, target);
    };
    let entry = found.entry;
    let reusable = entry.kind == flow.forward as u8
        && !clock.expired(l4.proto, &found)
        && !(l4.is_syn() && entry.flags & CT_F_CLOSING != 0 && !same_syn(&entry, l4));
    if !reusable {
        if tcp && !l4.is_syn() {
            return Err(DropReason::NoConntrack);
        }
        // An old connection on this tuple: both of its entries go, wherever they are.
        remove(&reverse_key_of(key, &entry), found.table);
        remove(key, found.table);
        return create(key, l4, clock, flow, BPF_ANY, target);
    }
    let reverse_key = reverse_key_of(key, &entry);
    if l4.is_closing() && entry.flags & CT_F_CLOSING == 0 {
        mark_closing(&found, &reverse_key);
    } else if found.table == Table::New && tcp && !l4.is_syn() {
        // The client's first packet after its SYN: the handshake is done.
        let forward = CtEntry {
            last_seen_ns: clock.now,
            ..entry
        };
        promote(
            key,
            &forward,
            &reverse_key,
            &reverse_of(key, &forward, flow.reverse),
        );
    } else if clock.refresh_due(l4.proto, &found) {
        // SAFETY: as in `lookup`; an aligned u64 store.
        unsafe { (*found.ptr).last_seen_ns = clock.now };
        refresh_partner(
            &reverse_key,
            clock,
            &reverse_of(key, &entry, flow.reverse),
            found.table,
        );
    }
    target.set(&entry);
    Ok(())
}

/// `l4` (a SYN) is a retransmission of the SYN that created the forward entry `entry`.
#[inline(always)]
pub(crate) fn same_syn(entry: &CtEntry, l4: &L4) -> bool {
    entry.syn_seq != 0 && entry.syn_seq == l4.seq
}

/// Picks a backend and creates the entry pair in CT_NEW. `flags`: `BPF_NOEXIST` when no entry
/// was there (so of two CPUs racing on the first packets of one flow, the second follows the
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
    if CT_NEW.insert(key, forward, flags).is_err() {
        if flags == BPF_NOEXIST {
            // The winner may have been promoted since: looked up in both tables.
            if let Some(winner) = lookup(key) {
                target.set(&winner.entry);
                return Ok(());
            }
        }
        return Err(DropReason::ConntrackFailed);
    }
    // The replies' tuple may still belong to another connection: one that reached the same
    // backend through another node's routing mesh with the same client address and port. A
    // live one keeps it (the backend cannot tell two connections on one tuple apart); an
    // ended one gives it up here, or its return route (in CONNTRACK, which lookups consult
    // first) would take this connection's replies to the other node.
    let reverse_key = reverse_key_of(key, &forward);
    if let Some(old) = lookup(&reverse_key) {
        let live = !clock.expired(key.proto, &old) && old.entry.flags & CT_F_CLOSING == 0;
        if live {
            remove(key, Table::New);
            return Err(DropReason::MeshTupleConflict);
        }
        remove(&reverse_key, old.table);
    }
    CT_NEW
        .insert(
            reverse_key,
            reverse_of(key, &forward, flow.reverse),
            BPF_ANY,
        )
        .map_err(|_| DropReason::ConntrackFailed)?;
    crate::stats::new_flow(flow.service_id, backend);
    target.set(&forward);
    Ok(())
}

/// Refreshes the other entry of a pair, recreating it as `expected` in `table` if it is gone
/// or no longer belongs to this connection (evicted, or replaced by a newer connection reusing
/// the tuple: then the newer one wins and is left alone).
#[inline(always)]
pub(crate) fn refresh_partner(key: &CtKey, clock: &Clock, expected: &CtEntry, table: Table) {
    match lookup(key) {
        Some(p) => {
            if p.entry.kind == expected.kind && p.entry.nat_ip == expected.nat_ip {
                // SAFETY: a valid map value pointer; an aligned u64 store.
                unsafe { (*p.ptr).last_seen_ns = clock.now };
            }
        }
        None => {
            let entry = CtEntry {
                last_seen_ns: clock.now,
                ..*expected
            };
            // Best effort: failing leaves the pair as it was.
            let _ = insert(key, &entry, table, BPF_NOEXIST);
        }
    }
}

/// The live entry for the reply `l4` with `key` (any of the reply kinds: `VipReverse`,
/// `MeshReverse`, `MeshReturn`), refreshed if due, together with its forward partner. A FIN or
/// RST marks the connection closing; the first reply of a UDP flow promotes it.
///
/// Every local delivery of TCP/UDP asks this, and most of them are not replies of balanced
/// connections: the clock is read only once an entry is found.
#[inline(always)]
pub fn reply(key: &CtKey, l4: &L4, config: &Config) -> Option<CtEntry> {
    let found = lookup(key)?;
    let entry = found.entry;
    let forward_kind = match entry.kind {
        VIP_REVERSE => Some(CtKind::VipForward),
        MESH_REVERSE => Some(CtKind::MeshForward),
        MESH_RETURN => None,
        _ => return None,
    };
    let clock = Clock::new(config);
    if clock.expired(key.proto, &found) {
        return None;
    }
    let tcp = key.proto == IPPROTO_TCP;
    match forward_kind {
        Some(kind) => {
            let (forward_key, forward) = forward_of(key, &entry, kind);
            if l4.is_closing() && entry.flags & CT_F_CLOSING == 0 {
                mark_closing(&found, &forward_key);
            } else if found.table == Table::New && !tcp {
                let forward = CtEntry {
                    last_seen_ns: clock.now,
                    ..forward
                };
                let reverse = CtEntry {
                    last_seen_ns: clock.now,
                    ..entry
                };
                promote(&forward_key, &forward, key, &reverse);
            } else if clock.refresh_due(key.proto, &found) {
                // SAFETY: as in `lookup`; an aligned u64 store.
                unsafe { (*found.ptr).last_seen_ns = clock.now };
                refresh_partner(&forward_key, &clock, &forward, found.table);
            }
        }
        None => {
            // A mesh return entry has no partner on this node.
            if l4.is_closing() && entry.flags & CT_F_CLOSING == 0 {
                // SAFETY: as in `mark_closing`.
                unsafe { (*found.ptr).flags = entry.flags | CT_F_CLOSING };
            } else if found.table == Table::New && !tcp {
                let live = CtEntry {
                    last_seen_ns: clock.now,
                    ..entry
                };
                if insert(key, &live, Table::Live, BPF_ANY).is_ok() {
                    remove(key, Table::New);
                }
            } else if clock.refresh_due(key.proto, &found) {
                // SAFETY: as above.
                unsafe { (*found.ptr).last_seen_ns = clock.now };
            }
        }
    }
    Some(entry)
}

pub const VIP_REVERSE: u8 = CtKind::VipReverse as u8;
pub const MESH_REVERSE: u8 = CtKind::MeshReverse as u8;
pub const MESH_RETURN: u8 = CtKind::MeshReturn as u8;

/// On a backend's node, for a routing-mesh packet `l4` (client -> backend) that arrived from
/// the ingress node `node` with `vni`: records that the replies with `key` (backend -> client)
/// go back through the tunnel to `node`.
///
/// The backend cannot tell two connections with the same tuple apart, so a live entry for the
/// same tuple through another node is not overwritten: the packet is refused
/// (`MeshTupleConflict`) until that connection closes or goes idle. A SYN records the entry in
/// CT_NEW, anything later in CONNTRACK (the ingress node only forwards packets of connections
/// it tracks, and only nodes can send us overlay packets).
#[inline(always)]
pub fn record_mesh_return(
    key: &CtKey,
    l4: &L4,
    clock: &Clock,
    node: [u8; 4],
    vni: u32,
    encrypted: bool,
) -> Result<(), DropReason> {
    let enc_flag = if encrypted { CT_F_ENCRYPTED } else { 0 };
    let syn = l4.is_syn();
    if let Some(found) = lookup(key) {
        let entry = found.entry;
        let live = entry.kind == MESH_RETURN && !clock.expired(key.proto, &found);
        if live && entry.tunnel_node == node && entry.vni == vni {
            if l4.is_closing() && entry.flags & CT_F_CLOSING == 0 {
                // SAFETY: a valid map value pointer; a byte store.
                unsafe { (*found.ptr).flags = entry.flags | CT_F_CLOSING };
            } else if found.table == Table::New && !syn {
                let promoted = CtEntry {
                    last_seen_ns: clock.now,
                    ..entry
                };
                if insert(key, &promoted, Table::Live, BPF_ANY).is_ok() {
                    remove(key, Table::New);
                }
            } else if clock.refresh_due(key.proto, &found) {
                // SAFETY: as above; an aligned u64 store.
                unsafe { (*found.ptr).last_seen_ns = clock.now };
            }
            return Ok(());
        }
        // A SYN after the old connection's FIN or RST reuses the tuple; anything else while
        // the tuple is live through another node (or through this node's own mesh, whose
        // entry is another kind) would hijack that connection.
        let open = !clock.expired(key.proto, &found) && entry.flags & CT_F_CLOSING == 0;
        let other_path = entry.kind != MESH_RETURN || entry.tunnel_node != node;
        if open && other_path {
            return Err(DropReason::MeshTupleConflict);
        }
        // Expired, closed, or another kind of entry: the new connection takes the tuple.
        remove(key, found.table);
    }
    let entry = CtEntry {
        last_seen_ns: clock.now,
        nat_ip: [0; 4],
        nat_port: [0; 2],
        kind: CtKind::MeshReturn as u8,
        flags: enc_flag | if l4.is_closing() { CT_F_CLOSING } else { 0 },
        tunnel_node: node,
        vni,
        service_id: 0,
        syn_seq: 0,
    };
    let table = if syn || key.proto != IPPROTO_TCP {
        Table::New
    } else {
        Table::Live
    };
    insert(key, &entry, table, BPF_ANY)
}
