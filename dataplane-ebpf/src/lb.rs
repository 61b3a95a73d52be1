//! The load balancer: service VIPs (path 3) and the ingress routing mesh (path 4), built on
//! `conntrack` (which backend a flow has) and `nat` (rewriting with checksums).
//!
//! Where each rewrite happens:
//!
//! - VIP, on the client's node: `from_container` DNATs client -> VIP to the backend and routes
//!   the packet like any other; the backend's replies come back to the client's node (they are
//!   addressed to the client) and get the VIP back as source just before delivery into the
//!   client, in `from_container` (backend on the same node) or `from_overlay`.
//! - Mesh, on the ingress node: `from_uplink` DNATs client -> node_ip:published to the
//!   backend:target (the client's address is kept) and delivers or tunnels it (marked with
//!   `MESH_INNER_SRC_MAC` as inner source). On the backend's node `from_overlay` notes which
//!   node the flow came from, and `from_container` tunnels the replies (addressed to an
//!   outside client, which no route on the overlay knows) back there. The ingress node
//!   restores node_ip:published as source and sends them out of the uplink, in `from_overlay`
//!   or, for a local backend, `from_container`.

use crate::verdict::subprogram;
use aya_ebpf::programs::TcContext;
use dataplane_common::{
    BackendKey, CT_F_ENCRYPTED, CT_F_HAIRPIN, Config, CtKind, DropReason, ENDPOINT_F_ENCRYPTED,
    EndpointInfo, HAIRPIN_SNAT_IP, MESH_INNER_SRC_MAC, PublishedInfo, PublishedKey, RrCursor,
    ServiceInfo,
};

use crate::{
    atomic,
    conntrack::{self, Clock, Flow, MESH_RETURN, MESH_REVERSE, Target, VIP_REVERSE},
    eth::{EthHdr, ptr_at},
    forward,
    ipv4::Ipv4,
    l4::{self, L4},
    maps::{self, BACKEND_SETS, BACKENDS, RR_CURSORS},
    nat::{self, Side},
    verdict::TC_ACT_OK,
};

/// The next backend of set `id` in round-robin order.
///
/// Exact across CPUs: the position comes from one atomic fetch-and-add on the set's cursor,
/// so concurrent new connections get distinct consecutive positions (see `RrCursor`).
///
/// A BPF-to-BPF subprogram, not inlined: it runs only for new connections, so the
/// established path stays compact, and its own registers keep LLVM from merging its error
/// exits with the caller's (merged exits once produced bit operations on a stack pointer,
/// which the verifier rejects).
#[inline(never)]
pub fn select(id: u32) -> Result<[u8; 4], DropReason> {
    // SAFETY: copied at once; BPF_F_NO_PREALLOC keeps the element valid meanwhile.
    let set = unsafe { BACKEND_SETS.get(id) }
        .copied()
        .ok_or(DropReason::NoBackend)?;
    if set.count == 0 {
        return Err(DropReason::NoBackend);
    }
    let cursor = match RR_CURSORS.get_ptr_mut(id) {
        Some(cursor) => cursor,
        None => {
            // The agent creates cursors with their sets; this covers a set written by hand.
            // NOEXIST: if another CPU created it meanwhile, keep its count.
            let _ = RR_CURSORS.insert(id, RrCursor { next: 0 }, BPF_NOEXIST);
            RR_CURSORS.get_ptr_mut(id).ok_or(DropReason::Internal)?
        }
    };
    // SAFETY: `cursor` points to a live map value, 8-byte aligned, `next` at offset 0.
    let position = unsafe { atomic::fetch_add(core::ptr::addr_of_mut!((*cursor).next), 1) };
    // count <= BACKENDS_PER_SET_MAX, so the slot fits the key's u16.
    let key = BackendKey {
        service_id: id,
        slot: (position % u64::from(set.count)) as u16,
        bank: set.bank as u16,
    };
    // SAFETY: copied at once, as above.
    unsafe { BACKENDS.get(key) }
        .map(|backend| backend.ip)
        .ok_or(DropReason::NoBackend)
}

#[allow(clippy::unnecessary_cast)]
const BPF_NOEXIST: u64 = aya_ebpf::bindings::BPF_NOEXIST as u64;

subprogram! {
    /// Path 3: a packet from a container to the VIP of `svc`, a service of the container's own
    /// network (the caller checks).
    ///
    /// A subprogram (as are `to_outside` and the egress paths): its locals get a frame of their
    /// own, so `from_container`'s stays small enough for the deepest path to fit the 512-byte
    /// stack.
    pub fn to_vip => try_to_vip(ctx: &TcContext, ip: &Ipv4, svc: &ServiceInfo, config: &Config)
}

#[inline(always)]
fn try_to_vip(
    ctx: &TcContext,
    ip: &Ipv4,
    svc: &ServiceInfo,
    config: &Config,
) -> Result<i32, DropReason> {
    let vni = svc.vni;
    if !l4::is_tcp_or_udp(ip.proto) {
        return Err(DropReason::VipUnsupportedProtocol);
    }
    if ip.is_fragment() {
        return Err(DropReason::Fragmented);
    }
    let l4 = l4::parse(ctx, ip)?;
    let clock = Clock::new(config);
    let flow = Flow {
        service_id: svc.id,
        // Port-transparent: the backend gets the port the client connected to.
        backend_port: l4.dport,
        forward: CtKind::VipForward,
        reverse: CtKind::VipReverse,
        vni,
    };
    let mut target = Target::default();
    // `NoConntrack` (a mid-connection packet of a connection we do not know, any more) is
    // reset by the caller (`reset::unknown_connection`).
    conntrack::balance(
        &conntrack::original_key(ip, &l4),
        &l4,
        &clock,
        &flow,
        &mut target,
    )?;
    nat::rewrite(
        ctx,
        &l4,
        Side::Dst,
        ip.dst,
        target.ip,
        l4.dport,
        target.port,
    )?;
    if target.hairpin {
        // Client and backend are the same container: it must not see its own address as
        // the peer (see HAIRPIN_SNAT_IP).
        nat::rewrite(
            ctx,
            &l4,
            Side::Src,
            ip.src,
            HAIRPIN_SNAT_IP,
            l4.sport,
            l4.sport,
        )?;
    }
    // Now an ordinary packet to an endpoint of the client's network.
    let ep = maps::endpoint(&target.ip).ok_or(DropReason::UnknownEndpoint)?;
    if ep.vni != vni {
        return Err(DropReason::PolicyIsolation);
    }
    if ep.is_local() {
        forward::to_local(ctx, &ep, config.router_mac)
    } else {
        forward::to_node(ctx, &ep, config)
    }
}

/// Just before delivery into a local container: if the packet is a backend's reply to a
/// connection this container made to a VIP, restore the VIP as its source.
///
/// Fragments are delivered as they are: only the first carries ports, and a datagram whose
/// fragments disagree on the source cannot be reassembled anyway.
///
/// A subprogram for `from_container`: the conntrack lookup's locals stay out of its frame.
#[inline(never)]
pub fn reverse_vip(ctx: &TcContext, ip: &Ipv4, l4: &L4, config: &Config) -> Result<(), DropReason> {
    reverse_vip_inline(ctx, ip, l4, config)
}

/// [`reverse_vip`] inlined, for `from_overlay`: its frame is the larger one there, and the
/// two would not fit the stack together.
#[inline(always)]
pub fn reverse_vip_inline(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    config: &Config,
) -> Result<(), DropReason> {
    if let Some(entry) = conntrack::reply(&conntrack::reply_key(ip, l4), l4, config)
        && entry.kind == VIP_REVERSE
    {
        nat::rewrite(
            ctx,
            l4,
            Side::Src,
            ip.src,
            entry.nat_ip,
            l4.sport,
            entry.nat_port,
        )?;
    }
    Ok(())
}

/// The L4 header of a packet the load balancer may have state for (unfragmented TCP/UDP).
#[inline(always)]
pub fn balanced_l4(ctx: &TcContext, ip: &Ipv4) -> Result<Option<L4>, DropReason> {
    if !l4::is_tcp_or_udp(ip.proto) || ip.is_fragment() {
        return Ok(None);
    }
    l4::parse(ctx, ip).map(Some)
}

subprogram! {
    /// `from_container`: a packet from the local endpoint `src` to an address outside every
    /// overlay network. Replies of balanced connections go back their way: replies of
    /// routing-mesh flows through the tunnel to the ingress node, or, if this is the ingress node,
    /// out of the uplink; replies of a hairpin VIP connection back into the same container.
    /// Everything else ([`NOT_A_REPLY`]) is the container's own traffic to the outside world
    /// (`egress`). A subprogram, like `to_vip`.
    ///
    /// The "not a reply" answer is a verdict value rather than an `Option`: LLVM fills the
    /// payload of a `None` with whatever register is at hand, once a map pointer, which the
    /// verifier then refuses to see shifted.
    pub fn to_outside => try_to_outside(
        ctx: &TcContext,
        ip: &Ipv4,
        src: &EndpointInfo,
        config: &Config,
    )
}

#[inline(always)]
fn try_to_outside(
    ctx: &TcContext,
    ip: &Ipv4,
    src: &EndpointInfo,
    config: &Config,
) -> Result<i32, DropReason> {
    let vni = src.vni;
    let Some(l4) = balanced_l4(ctx, ip)? else {
        return Ok(NOT_A_REPLY);
    };
    let Some(entry) = conntrack::reply(&conntrack::reply_key(ip, &l4), &l4, config) else {
        return Ok(NOT_A_REPLY);
    };
    // The entry was made for the backend's network; the key already pins the backend's
    // address, which anti-spoofing tied to this veth.
    if entry.vni != vni {
        return Err(DropReason::NoRoute);
    }
    match entry.kind {
        MESH_RETURN => forward::to_tunnel(
            ctx,
            entry.vni,
            u32::from_ne_bytes(entry.tunnel_node),
            entry.flags & CT_F_ENCRYPTED != 0,
            config,
        ),
        MESH_REVERSE => {
            nat::rewrite(
                ctx,
                &l4,
                Side::Src,
                ip.src,
                entry.nat_ip,
                l4.sport,
                entry.nat_port,
            )?;
            leave(ctx, ip.dst, config)
        }
        VIP_REVERSE if entry.flags & CT_F_HAIRPIN != 0 => {
            // backend:port -> HAIRPIN_SNAT_IP:port becomes VIP:port -> client:port, and the
            // client is the sender itself.
            nat::rewrite(
                ctx,
                &l4,
                Side::Src,
                ip.src,
                entry.nat_ip,
                l4.sport,
                entry.nat_port,
            )?;
            nat::rewrite(ctx, &l4, Side::Dst, ip.dst, ip.src, l4.dport, l4.dport)?;
            forward::to_local(ctx, src, config.router_mac)
        }
        _ => Err(DropReason::NoRoute),
    }
}

/// [`to_outside`]'s answer for a packet that is no reply of a balanced connection.
pub const NOT_A_REPLY: i32 = -1;

/// A routing-mesh reply with the published address restored leaves through the uplink, or,
/// if its client is this node itself (a container of the node reached its own published
/// port through egress), goes back in through the uplink's ingress to that flow's reply path.
#[inline(always)]
fn leave(ctx: &TcContext, dst: [u8; 4], config: &Config) -> Result<i32, DropReason> {
    if dst == config.node_ip {
        return crate::egress::reinject(ctx, config);
    }
    forward::to_uplink(config)
}

/// `from_overlay`, before delivering a packet from `remote` (the sending node) with `vni` into
/// a local endpoint: a reply to a VIP connection gets the VIP back; a packet of a
/// routing-mesh client (balanced by `remote`, which marked it with `MESH_INNER_SRC_MAC`)
/// records where its replies must go.
#[inline(always)]
pub fn on_overlay_delivery(
    ctx: &TcContext,
    ip: &Ipv4,
    vni: u32,
    remote: [u8; 4],
    encrypted: bool,
    config: &Config,
) -> Result<(), DropReason> {
    let Some(l4) = balanced_l4(ctx, ip)? else {
        return Ok(());
    };
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 14 bytes are inside the linear packet data.
    if unsafe { (*eth).src } != MESH_INNER_SRC_MAC {
        return reverse_vip_inline(ctx, ip, &l4, config);
    }
    let clock = Clock::new(config);
    let key = conntrack::reply_key_of(&conntrack::original_key(ip, &l4));
    conntrack::record_mesh_return(&key, &l4, &clock, remote, vni, encrypted)
}

/// `from_overlay`, for a packet whose destination is not a local endpoint: a backend's reply
/// to a routing-mesh client that came in through this node goes out of the uplink with the
/// published address restored as source.
#[inline(always)]
pub fn overlay_to_outside(
    ctx: &TcContext,
    ip: &Ipv4,
    vni: u32,
    encrypted: bool,
    config: &Config,
) -> Result<i32, DropReason> {
    let Some(l4) = balanced_l4(ctx, ip)? else {
        return Err(DropReason::UnknownEndpoint);
    };
    // The replying backend is an endpoint of the flow's network: if that network is
    // encrypted, its replies count only when they came out of the tunnel.
    if !encrypted && maps::endpoint(&ip.src).is_some_and(|ep| ep.flags & ENDPOINT_F_ENCRYPTED != 0)
    {
        return Err(DropReason::Unencrypted);
    }
    let entry = match conntrack::reply(&conntrack::reply_key(ip, &l4), &l4, config) {
        Some(entry) if entry.kind == MESH_REVERSE => entry,
        _ => return Err(DropReason::UnknownEndpoint),
    };
    if entry.vni != vni {
        return Err(DropReason::WrongVni);
    }
    nat::rewrite(
        ctx,
        &l4,
        Side::Src,
        ip.src,
        entry.nat_ip,
        l4.sport,
        entry.nat_port,
    )?;
    leave(ctx, ip.dst, config)
}

subprogram! {
    /// Path 4 on the ingress node: a packet to `node_ip:port`, where the port is published as
    /// `published`. A subprogram: its frame and `egress::to_node`'s, both `from_uplink`'s
    /// largest, do not add up.
    pub fn to_published => try_to_published(
        ctx: &TcContext,
        ip: &Ipv4,
        l4: &L4,
        published: &PublishedInfo,
        config: &Config,
    )
}

#[inline(always)]
fn try_to_published(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    published: &PublishedInfo,
    config: &Config,
) -> Result<i32, DropReason> {
    let clock = Clock::new(config);
    let flow = Flow {
        service_id: published.service_id,
        backend_port: published.target_port,
        forward: CtKind::MeshForward,
        reverse: CtKind::MeshReverse,
        vni: 0,
    };
    let mut target = Target::default();
    match conntrack::balance(
        &conntrack::original_key(ip, l4),
        l4,
        &clock,
        &flow,
        &mut target,
    ) {
        Ok(()) => {}
        // Not a connection we balance: the node's own stack answers it (with a reset, as
        // nothing of the node listens on a published port).
        Err(DropReason::NoConntrack) => return Ok(TC_ACT_OK),
        Err(e) => return Err(e),
    }
    // Destination only: the backend sees the real client address.
    nat::rewrite(ctx, l4, Side::Dst, ip.dst, target.ip, l4.dport, target.port)?;
    let ep = maps::endpoint(&target.ip).ok_or(DropReason::UnknownEndpoint)?;
    if ep.is_local() {
        forward::to_local(ctx, &ep, config.router_mac)
    } else {
        // Marked, so the backend's node knows to send the replies back here.
        forward::to_node_from(ctx, &ep, config, MESH_INNER_SRC_MAC)
    }
}

/// The PUBLISHED entry for a packet's destination port and protocol.
#[inline(always)]
pub fn published(l4: &L4) -> Option<PublishedInfo> {
    maps::published(&PublishedKey {
        port: l4.dport,
        proto: l4.proto,
        _pad: 0,
    })
}
