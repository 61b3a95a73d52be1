//! Egress (path 6): a container reaching an address outside every overlay network leaves
//! through its node's uplink with the node's address as source and a port allocated for the
//! flow (masquerade); the replies come back to that port and are delivered into the container
//! with its address and port restored.
//!
//! Where each step runs:
//!
//! - `from_container` ([`from_container`]): SNAT and out of the uplink. To the node's own
//!   address: a published port is SNATed and sent back into the uplink's ingress (marked), so
//!   the routing mesh balances it as it would a client's from outside; anything else goes to
//!   the node's stack untranslated (it answers through the container's host route).
//! - `from_uplink` ([`to_node`]), before anything else: replies to an allocated port
//!   (`EgressReverse`), and ICMP errors quoting a translated packet, egress or routing mesh:
//!   "fragmentation needed", "port unreachable", "time exceeded" reach the container or the
//!   backend with the addresses it knows, so path MTU discovery works through both.
//!
//! Flows are tracked in the conntrack tables like balanced ones (SYN-only creation, CT_NEW
//! until the handshake or first reply, per-state timeouts). A port is allocated per
//! (protocol, destination address, destination port): the reverse key is unique, so two flows
//! to different servers may share a port, and a live mapping is never reused. TCP and UDP flows
//! keep the container's own port when they can (as the kernel's masquerade does): free for
//! that destination, and no socket of the node's own on it (`bpf_sk_lookup_*`). Only then does
//! a port from the egress range come in; so a client that opens connections to one server
//! faster than closed ones expire is limited by its own port range, not by the egress range.

use aya_ebpf::{
    EbpfContext, bindings,
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::TcContext,
};
use dataplane_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_CLOSING, Config, CtEntry, CtKey, CtKind, DropReason,
    EGRESS_PORT_MAX_DEFAULT, EGRESS_PORT_MIN_DEFAULT, ENDPOINT_F_INTERNAL, EndpointInfo,
    HAIRPIN_SNAT_IP, IPPROTO_TCP, IPPROTO_UDP, REINJECT_MARK,
};

use crate::verdict::subprogram;
use crate::{
    conntrack::{self, Clock, Table},
    eth::{ETH_HLEN, ensure_linear, ptr_at},
    forward,
    ipv4::{IPV4_HLEN, Ipv4, Ipv4Hdr},
    l4::{self, ICMP_HLEN, IPPROTO_ICMP, L4},
    lb, maps,
    nat::{self, Side},
    verdict::{TC_ACT_OK, TC_ACT_REDIRECT},
};

#[allow(clippy::unnecessary_cast)]
const BPF_ANY: u64 = bindings::BPF_ANY as u64;
#[allow(clippy::unnecessary_cast)]
const BPF_NOEXIST: u64 = bindings::BPF_NOEXIST as u64;
#[allow(clippy::unnecessary_cast)]
const BPF_F_INGRESS: u64 = bindings::BPF_F_INGRESS as u64;
/// `BPF_F_CURRENT_NETNS` (-1) as the helpers take it.
const BPF_F_CURRENT_NETNS: u64 = bindings::BPF_F_CURRENT_NETNS as i64 as u64;

const EGRESS_FORWARD: u8 = CtKind::EgressForward as u8;
const EGRESS_REVERSE: u8 = CtKind::EgressReverse as u8;
const MESH_FORWARD: u8 = CtKind::MeshForward as u8;

/// [`to_node`]'s answer for a packet that is none of egress's business.
pub const NOT_OURS: i32 = -1;

/// Ports tried for a new flow before giving up (`EgressNoPort`).
const PROBES: u32 = 32;

/// Addresses that are the node's, not the container's to reach: the WireGuard tunnel
/// addresses (169.254.128.0/17, where the agents' peer API listens), the hairpin address,
/// loopback and "this network".
#[inline(always)]
fn forbidden(dst: [u8; 4]) -> bool {
    (dst[0] == 169 && dst[1] == 254 && dst[2] >= 128)
        || dst == HAIRPIN_SNAT_IP
        || dst[0] == 127
        || dst[0] == 0
}

/// The L4 view egress keys a packet on: TCP, UDP (unfragmented: later fragments carry no
/// ports to translate) or an ICMP echo request.
#[inline(always)]
fn flow_l4(ctx: &TcContext, ip: &Ipv4) -> Result<L4, DropReason> {
    if l4::is_tcp_or_udp(ip.proto) {
        if ip.is_fragment() {
            return Err(DropReason::Fragmented);
        }
        return l4::parse(ctx, ip);
    }
    if ip.proto == IPPROTO_ICMP && !ip.is_fragment() {
        let (_, echo) = l4::parse_icmp(ctx, ip)?;
        // Only requests start a flow (a container answering an outside ping has no flow).
        if let Some(e) = echo
            && e.dport == [0; 2]
        {
            return Ok(e);
        }
    }
    Err(DropReason::NoRoute)
}

subprogram! {
    /// `from_container`: a packet from the local endpoint `src` to an address outside every
    /// overlay network (and not a reply of a balanced connection).
    ///
    /// A subprogram: its locals get a stack frame of their own instead of adding to
    /// `from_container`'s, which would take the program past the 512-byte stack limit.
    pub fn from_container => try_from_container(
        ctx: &TcContext,
        ip: &Ipv4,
        src: &EndpointInfo,
        config: &Config,
    )
}

#[inline(always)]
fn try_from_container(
    ctx: &TcContext,
    ip: &Ipv4,
    src: &EndpointInfo,
    config: &Config,
) -> Result<i32, DropReason> {
    if src.flags & ENDPOINT_F_INTERNAL != 0 {
        return Err(DropReason::EgressInternal);
    }
    if forbidden(ip.dst) {
        return Err(DropReason::EgressForbidden);
    }
    if config.node_ip == [0; 4] || config.uplink_ifindex == 0 {
        return Err(DropReason::NoUplink);
    }
    let l4 = flow_l4(ctx, ip)?;
    let to_self = ip.dst == config.node_ip;
    if to_self && (l4.proto == IPPROTO_ICMP || lb::published(&l4).is_none()) {
        // The node's own services: its stack sees the container's address and answers
        // through the container's host route.
        return Ok(TC_ACT_OK);
    }
    let clock = Clock::new(config);
    let mut port = [0u8; 2];
    // `NoConntrack` (mid-connection without a flow: it went idle) is answered with a reset by
    // the caller (`reset::unknown_connection`), outside this subprogram's frame.
    track(
        ctx,
        &conntrack::original_key(ip, &l4),
        &l4,
        &clock,
        config,
        &mut port,
    )?;
    if l4.proto == IPPROTO_ICMP {
        rewrite_icmp_id(ctx, &l4, Side::Src, ip.src, config.node_ip, l4.sport, port)?;
    } else {
        nat::rewrite(ctx, &l4, Side::Src, ip.src, config.node_ip, l4.sport, port)?;
    }
    if to_self {
        return reinject(ctx, config);
    }
    forward::to_uplink(config)
}

/// Sends the packet back in through the uplink's ingress, marked as the node's own.
#[inline(always)]
pub fn reinject(ctx: &TcContext, config: &Config) -> Result<i32, DropReason> {
    ctx.set_mark(REINJECT_MARK);
    // SAFETY: plain helper call with scalar arguments.
    let verdict = unsafe { aya_ebpf::helpers::bpf_redirect(config.uplink_ifindex, BPF_F_INGRESS) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::Internal);
    }
    Ok(TC_ACT_REDIRECT)
}

/// The key of the replies of the egress flow `key` translated as `entry`.
#[inline(always)]
fn reverse_key(key: &CtKey, nat_ip: [u8; 4], nat_port: [u8; 2]) -> CtKey {
    CtKey {
        src_ip: key.dst_ip,
        dst_ip: nat_ip,
        src_port: key.dst_port,
        dst_port: nat_port,
        proto: key.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// The forward key of the flow whose reverse entry `entry` is stored under `key`.
#[inline(always)]
fn forward_key(key: &CtKey, entry: &CtEntry) -> CtKey {
    CtKey {
        src_ip: entry.nat_ip,
        dst_ip: key.src_ip,
        src_port: entry.nat_port,
        dst_port: key.src_port,
        proto: key.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    }
}

/// The reverse entry of the forward flow `key`: deliver to the container's address and port.
#[inline(always)]
fn reverse_entry(key: &CtKey, forward: &CtEntry) -> CtEntry {
    CtEntry {
        kind: EGRESS_REVERSE,
        nat_ip: key.src_ip,
        nat_port: key.src_port,
        syn_seq: 0,
        ..*forward
    }
}

/// The forward entry matching the reverse entry `entry`: leave as the node's address and port.
#[inline(always)]
fn forward_entry(key: &CtKey, entry: &CtEntry) -> CtEntry {
    CtEntry {
        kind: EGRESS_FORWARD,
        nat_ip: key.dst_ip,
        nat_port: key.dst_port,
        ..*entry
    }
}

/// The port of the container's flow `key` on the node's address: its tracked one (refreshed,
/// promoted, marked closing as its packets say), or a new one for a new flow.
#[inline(always)]
fn track(
    ctx: &TcContext,
    key: &CtKey,
    l4: &L4,
    clock: &Clock,
    config: &Config,
    port: &mut [u8; 2],
) -> Result<(), DropReason> {
    let tcp = l4.proto == IPPROTO_TCP;
    if let Some(found) = conntrack::lookup(key) {
        let entry = found.entry;
        let ours = entry.kind == EGRESS_FORWARD;
        let reusable = ours
            && !clock.expired(key.proto, &found)
            && !(l4.is_syn()
                && entry.flags & CT_F_CLOSING != 0
                && !conntrack::same_syn(&entry, l4));
        if reusable {
            let rkey = reverse_key(key, entry.nat_ip, entry.nat_port);
            if l4.is_closing() && entry.flags & CT_F_CLOSING == 0 {
                conntrack::mark_closing(&found, &rkey);
            } else if found.table == Table::New && tcp && !l4.is_syn() {
                let forward = CtEntry {
                    last_seen_ns: clock.now,
                    ..entry
                };
                conntrack::promote(key, &forward, &rkey, &reverse_entry(key, &forward));
            } else if clock.refresh_due(key.proto, &found) {
                // SAFETY: a valid map value pointer; an aligned u64 store.
                unsafe { (*found.ptr).last_seen_ns = clock.now };
                conntrack::refresh_partner(&rkey, clock, &reverse_entry(key, &entry), found.table);
            }
            *port = entry.nat_port;
            return Ok(());
        }
        if tcp && !l4.is_syn() {
            return Err(DropReason::NoConntrack);
        }
        if ours {
            conntrack::remove(&reverse_key(key, entry.nat_ip, entry.nat_port), found.table);
        }
        conntrack::remove(key, found.table);
    } else if tcp && !l4.is_syn() {
        return Err(DropReason::NoConntrack);
    }
    let forward = CtEntry {
        last_seen_ns: clock.now,
        nat_ip: config.node_ip,
        nat_port: [0; 2],
        kind: EGRESS_FORWARD,
        flags: if l4.is_closing() { CT_F_CLOSING } else { 0 },
        tunnel_node: [0; 4],
        vni: 0,
        service_id: 0,
        syn_seq: if l4.is_syn() { l4.seq } else { 0 },
    };
    let allocated = allocate(ctx, key, &forward, clock, config);
    if allocated == 0 {
        return Err(DropReason::EgressNoPort);
    }
    let nat_port = (allocated as u16).to_be_bytes();
    let forward = CtEntry {
        nat_port,
        ..forward
    };
    if conntrack::insert(key, &forward, Table::New, BPF_ANY).is_err() {
        conntrack::remove(&reverse_key(key, config.node_ip, nat_port), Table::New);
        return Err(DropReason::ConntrackFailed);
    }
    *port = nat_port;
    Ok(())
}

/// Claims a source port for the new flow `key` by creating its reverse entry (this
/// destination, the node's address, the port): the container's own port if it is free and no
/// node socket holds it, else the first of up to [`PROBES`] ports, from a random start in the
/// egress range, that is free or expired. Returns the port (host order), 0 if every probe
/// found a live mapping.
#[inline(always)]
fn allocate(
    ctx: &TcContext,
    key: &CtKey,
    forward: &CtEntry,
    clock: &Clock,
    config: &Config,
) -> u32 {
    let (min, max) = match (config.egress_port_min, config.egress_port_max) {
        (0, 0) => (EGRESS_PORT_MIN_DEFAULT, EGRESS_PORT_MAX_DEFAULT),
        (a, b) if a <= b => (a, b),
        _ => (EGRESS_PORT_MIN_DEFAULT, EGRESS_PORT_MAX_DEFAULT),
    };
    let span = u32::from(max - min) + 1;
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    let reverse = reverse_entry(key, forward);
    // The container's own port first (not an echo identifier: the node's pings are not
    // sockets the lookup finds).
    if key.proto != IPPROTO_ICMP && !node_holds(ctx, key, config.node_ip) {
        let rkey = reverse_key(key, config.node_ip, key.src_port);
        if claim(&rkey, &reverse, clock) {
            return u32::from(u16::from_be_bytes(key.src_port));
        }
    }
    for i in 0..PROBES {
        let port = u32::from(min) + (start + i) % span;
        let rkey = reverse_key(key, config.node_ip, (port as u16).to_be_bytes());
        if claim(&rkey, &reverse, clock) {
            return port;
        }
    }
    0
}

/// Creates the reverse entry `rkey` unless a live one holds it (an expired one is replaced);
/// `BPF_NOEXIST`, so of two CPUs claiming it at once one wins.
#[inline(always)]
fn claim(rkey: &CtKey, reverse: &CtEntry, clock: &Clock) -> bool {
    if let Some(found) = conntrack::lookup(rkey) {
        if !clock.expired(rkey.proto, &found) {
            return false;
        }
        conntrack::remove(rkey, found.table);
    }
    conntrack::insert(rkey, reverse, Table::New, BPF_NOEXIST).is_ok()
}

/// Whether a socket of the node's own (connected, or listening) would take the replies of
/// flow `key` if it kept its source port: the lookup an arriving reply would get.
#[inline(always)]
fn node_holds(ctx: &TcContext, key: &CtKey, node_ip: [u8; 4]) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(key.dst_ip),
                daddr: u32::from_ne_bytes(node_ip),
                sport: u16::from_ne_bytes(key.dst_port),
                dport: u16::from_ne_bytes(key.src_port),
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    // The netns of the packet: the node's (the host end of the veth lives there).
    let netns = BPF_F_CURRENT_NETNS;
    // SAFETY: the tuple is initialised and outlives the call; a socket it returns is
    // released before anything else.
    unsafe {
        let sk = if key.proto == IPPROTO_TCP {
            bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// Rewrites an ICMP echo's address and identifier (its "port"): the IPv4 checksum inline, the
/// ICMP checksum (no pseudo header) for the identifier only.
#[inline(always)]
fn rewrite_icmp_id(
    ctx: &TcContext,
    l4: &L4,
    side: Side,
    old_ip: [u8; 4],
    new_ip: [u8; 4],
    old_id: [u8; 2],
    new_id: [u8; 2],
) -> Result<(), DropReason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // Bounded again: from the caller's stack, the verifier does not know its range.
    let id: *mut [u8; 2] = ptr_at(ctx, (l4.off & 0x7f) + 4)?;
    // SAFETY: `ptr_at` checked both are inside the linear, writable packet data.
    unsafe {
        match side {
            Side::Src => (*ip).saddr = new_ip,
            Side::Dst => (*ip).daddr = new_ip,
        }
        (*ip).check = nat::csum_replace4((*ip).check, old_ip, new_ip);
        *id = new_id;
    }
    if old_id != new_id {
        let from = u64::from(u16::from_ne_bytes(old_id));
        let to = u64::from(u16::from_ne_bytes(new_id));
        ctx.l4_csum_replace(l4.csum_off(), from, to, 2)
            .map_err(|_| DropReason::Internal)?;
    }
    Ok(())
}

/// `from_uplink`, for a packet to the node's address: the verdict if it is a reply of an
/// egress flow or an ICMP error about a translated packet (egress or routing mesh),
/// [`NOT_OURS`] if it is none of those (the caller goes on); a sentinel rather than an
/// `Option` for the verifier (see `lb::to_outside`). The two paths are subprograms of their
/// own, side by side: nested, their frames would not fit the stack.
#[inline(always)]
pub fn to_node(ctx: &TcContext, ip: &Ipv4, config: &Config) -> Result<i32, DropReason> {
    if ip.is_later_fragment() {
        return Ok(NOT_OURS);
    }
    if l4::is_tcp_or_udp(ip.proto) {
        let l4 = l4::parse(ctx, ip)?;
        return reply(ctx, ip, &l4, config);
    }
    if ip.proto != IPPROTO_ICMP {
        return Ok(NOT_OURS);
    }
    match l4::parse_icmp(ctx, ip)? {
        (_, Some(echo)) if echo.sport == [0; 2] => reply(ctx, ip, &echo, config),
        (l4::ICMP_DEST_UNREACH | l4::ICMP_TIME_EXCEEDED | l4::ICMP_PARAMETER_PROBLEM, _) => {
            icmp_error(ctx, ip, config)
        }
        _ => Ok(NOT_OURS),
    }
}

subprogram! {
    /// A reply of an egress flow: to the container, with its address and port restored.
    fn reply => try_reply(ctx: &TcContext, ip: &Ipv4, l4: &L4, config: &Config)
}

#[inline(always)]
fn try_reply(ctx: &TcContext, ip: &Ipv4, l4: &L4, config: &Config) -> Result<i32, DropReason> {
    let key = conntrack::reply_key(ip, l4);
    let Some(found) = conntrack::lookup(&key) else {
        return Ok(NOT_OURS);
    };
    let entry = found.entry;
    let clock = Clock::new(config);
    if entry.kind != EGRESS_REVERSE || clock.expired(key.proto, &found) {
        return Ok(NOT_OURS);
    }
    let fkey = forward_key(&key, &entry);
    if l4.is_closing() && entry.flags & CT_F_CLOSING == 0 {
        conntrack::mark_closing(&found, &fkey);
    } else if found.table == Table::New && key.proto != IPPROTO_TCP {
        // The first reply of a UDP flow or a ping: established.
        let reverse = CtEntry {
            last_seen_ns: clock.now,
            ..entry
        };
        conntrack::promote(&fkey, &forward_entry(&key, &reverse), &key, &reverse);
    } else if clock.refresh_due(key.proto, &found) {
        // SAFETY: a valid map value pointer; an aligned u64 store.
        unsafe { (*found.ptr).last_seen_ns = clock.now };
        conntrack::refresh_partner(&fkey, &clock, &forward_entry(&key, &entry), found.table);
    }
    let ep = match maps::endpoint(&entry.nat_ip) {
        Some(ep) if ep.is_local() => ep,
        _ => return Err(DropReason::UnknownEndpoint),
    };
    if l4.proto == IPPROTO_ICMP {
        rewrite_icmp_id(
            ctx,
            l4,
            Side::Dst,
            ip.dst,
            entry.nat_ip,
            l4.dport,
            entry.nat_port,
        )?;
    } else {
        nat::rewrite(
            ctx,
            l4,
            Side::Dst,
            ip.dst,
            entry.nat_ip,
            l4.dport,
            entry.nat_port,
        )?;
    }
    forward::to_local(ctx, &ep, config.router_mac)
}

subprogram! {
    /// An ICMP error to the node quoting a packet the node translated: an egress flow's (quoted
    /// source node:port, restored to the container's) or a routing-mesh reply's (quoted source
    /// node:published, restored to the backend's). Outer destination and quoted source are
    /// rewritten with their checksums (the quoted transport checksum is left alone: receivers
    /// match errors by addresses and ports and do not verify it), and the error is delivered
    /// like a packet of the flow. Anything else is not ours.
    fn icmp_error => try_icmp_error(ctx: &TcContext, ip: &Ipv4, config: &Config)
}

#[inline(always)]
fn try_icmp_error(ctx: &TcContext, ip: &Ipv4, config: &Config) -> Result<i32, DropReason> {
    let icmp_off = ETH_HLEN + ip.hdr_len;
    let inner_off = icmp_off + ICMP_HLEN;
    // The quoted IPv4 header (no options) and the first 8 bytes after it.
    if (ctx.len() as usize) < inner_off + IPV4_HLEN + 8 {
        return Ok(NOT_OURS);
    }
    ensure_linear(ctx, inner_off + IPV4_HLEN + 8)?;
    let inner: *const Ipv4Hdr = ptr_at(ctx, inner_off)?;
    let ports: *const [u8; 8] = ptr_at(ctx, inner_off + IPV4_HLEN)?;
    // SAFETY: `ptr_at` checked both lie inside the linear packet data; copied at once.
    let (inner, ports) = unsafe { (*inner, *ports) };
    if inner.version_ihl != 0x45 || inner.saddr != config.node_ip {
        return Ok(NOT_OURS);
    }
    // The quoted packet's "ports" as egress keys them (an echo request: its identifier).
    let (sport, dport, port_off) = match inner.protocol {
        IPPROTO_TCP | IPPROTO_UDP => ([ports[0], ports[1]], [ports[2], ports[3]], 0),
        IPPROTO_ICMP if ports[0] == l4::ICMP_ECHO => ([ports[4], ports[5]], [0; 2], 4),
        _ => return Ok(NOT_OURS),
    };
    let clock = Clock::new(config);
    // The quoted packet left as node:sport -> peer:dport. Egress: its replies' key.
    let rkey = CtKey {
        src_ip: inner.daddr,
        dst_ip: inner.saddr,
        src_port: dport,
        dst_port: sport,
        proto: inner.protocol,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let mut restore = None;
    if let Some(found) = conntrack::lookup(&rkey)
        && found.entry.kind == EGRESS_REVERSE
        && !clock.expired(rkey.proto, &found)
    {
        restore = Some((found.entry.nat_ip, found.entry.nat_port));
    }
    if restore.is_none() && inner.protocol != IPPROTO_ICMP {
        // Routing mesh: it was a reply node:published -> client; the client's packets of that
        // connection are keyed client -> node:published.
        let fkey = CtKey {
            src_ip: inner.daddr,
            dst_ip: inner.saddr,
            src_port: dport,
            dst_port: sport,
            proto: inner.protocol,
            dir: CT_DIR_ORIGINAL,
            _pad: [0; 2],
        };
        if let Some(found) = conntrack::lookup(&fkey)
            && found.entry.kind == MESH_FORWARD
            && !clock.expired(fkey.proto, &found)
        {
            restore = Some((found.entry.nat_ip, found.entry.nat_port));
        }
    }
    let Some((to_ip, to_port)) = restore else {
        return Ok(NOT_OURS);
    };
    let ep = maps::endpoint(&to_ip).ok_or(DropReason::UnknownEndpoint)?;
    let new_check = nat::csum_replace4(inner.check, inner.saddr, to_ip);
    // Stores first, while the pointers are valid; the checksum helper calls come after.
    let outer: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    let quoted: *mut Ipv4Hdr = ptr_at(ctx, inner_off)?;
    let quoted_port: *mut [u8; 2] = ptr_at(ctx, inner_off + IPV4_HLEN + port_off)?;
    // SAFETY: `ptr_at` checked each lies inside the linear, writable packet data.
    unsafe {
        (*outer).daddr = to_ip;
        (*outer).check = nat::csum_replace4((*outer).check, ip.dst, to_ip);
        (*quoted).saddr = to_ip;
        (*quoted).check = new_check;
        *quoted_port = to_port;
    }
    // The ICMP checksum covers the quoted bytes that changed.
    let csum = icmp_off + 2;
    let word = |b: [u8; 2]| u64::from(u16::from_ne_bytes(b));
    let dword = |b: [u8; 4]| u64::from(u32::from_ne_bytes(b));
    ctx.l4_csum_replace(csum, dword(inner.saddr), dword(to_ip), 4)
        .and_then(|()| ctx.l4_csum_replace(csum, word(inner.check), word(new_check), 2))
        .and_then(|()| ctx.l4_csum_replace(csum, word(sport), word(to_port), 2))
        .map_err(|_| DropReason::Internal)?;
    if ep.is_local() {
        forward::to_local(ctx, &ep, config.router_mac)
    } else {
        forward::to_node(ctx, &ep, config)
    }
}
