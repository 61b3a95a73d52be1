//! The ways a routed packet leaves a program: into a container on this node, to another node
//! through the VXLAN device, or (replies of routing-mesh flows) out of the uplink.
//!
//! No L3 change: the TTL is not decremented (so no checksum to fix either). From the IP
//! point of view the overlay is one L2 segment, as with Docker's overlay driver: peers are
//! on-link and a traceroute between containers shows a single hop. The router MAC is an
//! artefact of proxy ARP, not a routing hop.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use dataplane_common::{Config, DropReason, ENDPOINT_F_ENCRYPTED, EndpointInfo};

use crate::{eth::set_macs, maps, tunnel, verdict::TC_ACT_REDIRECT, vxlan};

/// `PACKET_HOST` from `linux/if_packet.h`.
const PACKET_HOST: u32 = 0;

/// Delivers the frame into the local endpoint `ep` (must be local: `ep.ifindex` != 0).
///
/// `bpf_redirect_peer` moves the skb straight to the ingress of the veth's container end,
/// skipping the host-side xmit and the per-CPU backlog. Only valid at tc ingress, which is
/// where both our programs run.
#[inline(always)]
pub fn to_local(
    ctx: &TcContext,
    ep: &EndpointInfo,
    router_mac: [u8; 6],
) -> Result<i32, DropReason> {
    set_macs(ctx, ep.mac, router_mac)?;
    // eth_type_trans classified the frame when it entered the host-side veth (or when the
    // VXLAN device decapsulated it) against *that* device's MAC, so it is usually
    // PACKET_OTHERHOST. redirect_peer does not reclassify, and the container's IP stack drops
    // OTHERHOST packets; the frame is now addressed to the endpoint, so say so.
    ctx.change_type(PACKET_HOST)
        .map_err(|_| DropReason::Internal)?;
    // SAFETY: plain helper call with scalar arguments.
    let verdict = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    // Fails only on non-zero flags; a vanished ifindex is dropped later by the kernel.
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::Internal);
    }
    Ok(TC_ACT_REDIRECT)
}

/// Sends the frame to the remote endpoint `ep` through the node's VXLAN device, or for an
/// endpoint of an encrypted network through the VXLAN device whose packets are routed into the
/// WireGuard tunnel, to the endpoint node's tunnel address.
#[inline(always)]
pub fn to_node(ctx: &TcContext, ep: &EndpointInfo, config: &Config) -> Result<i32, DropReason> {
    to_node_from(ctx, ep, config, config.router_mac)
}

/// `to_node` with `src_mac` as the inner Ethernet source: the router MAC for overlay
/// traffic, `MESH_INNER_SRC_MAC` for routing-mesh traffic.
#[inline(always)]
pub fn to_node_from(
    ctx: &TcContext,
    ep: &EndpointInfo,
    config: &Config,
    src_mac: [u8; 6],
) -> Result<i32, DropReason> {
    let encrypted = ep.flags & ENDPOINT_F_ENCRYPTED != 0;
    // Resolved before the frame is touched, so a drop leaves it as it came: an encrypted
    // network's packet with no tunnel to its node is dropped, never sent in clear.
    device(encrypted, config)?;
    let node = if encrypted {
        tunnel_addr_of(ep.node_ip)?
    } else {
        ep.node_ip
    };
    // The inner frame is addressed as the far side delivers it (from_overlay rewrites it
    // again, so this only matters to someone capturing on the fabric).
    set_macs(ctx, ep.mac, src_mac)?;
    to_tunnel(ctx, ep.vni, node, encrypted, config)
}

/// The VXLAN device for plain or (`encrypted`) tunnelled traffic, if the node has it.
#[inline(always)]
fn device(encrypted: bool, config: &Config) -> Result<u32, DropReason> {
    match (encrypted, config.vxlan_enc_ifindex, config.vxlan_ifindex) {
        (true, 0, _) => Err(DropReason::NoTunnel),
        (true, dev, _) => Ok(dev),
        (false, _, 0) => Err(DropReason::NoTunnelDevice),
        (false, _, dev) => Ok(dev),
    }
}

/// The tunnel address (network order, as a `__be32`) of the node with advertise address
/// `node_be`, or `NoTunnel` if it has none.
#[inline(always)]
fn tunnel_addr_of(node_be: u32) -> Result<u32, DropReason> {
    match maps::node(&node_be.to_ne_bytes()) {
        Some(n) if n.tunnel_ip != [0; 4] => Ok(u32::from_ne_bytes(n.tunnel_ip)),
        _ => Err(DropReason::NoTunnel),
    }
}

/// Sends the frame in VXLAN to the node `node_be` (network order) with `vni`, leaving the
/// inner Ethernet header as it is: plain traffic encapsulated here and out of the uplink
/// (`vxlan`; through the plain device if this datapath has no uplink), or (`encrypted`)
/// through the tunnel's device to a node's tunnel address. A node without the plain device
/// sends no plain traffic at all (`NoTunnelDevice`), as before.
#[inline(always)]
pub fn to_tunnel(
    ctx: &TcContext,
    vni: u32,
    node_be: u32,
    encrypted: bool,
    config: &Config,
) -> Result<i32, DropReason> {
    let device = device(encrypted, config)?;
    if !encrypted && vxlan::can_encapsulate(config) {
        match vxlan::encapsulate(ctx, vni, node_be, config)? {
            vxlan::NOT_ENCAPSULATED => {}
            verdict => return Ok(verdict),
        }
    }
    tunnel::set_key(ctx, vni, node_be)?;
    // Flags 0: transmit out of the VXLAN device, which encapsulates using the metadata.
    // SAFETY: plain helper call with scalar arguments.
    let verdict = unsafe { bpf_redirect(device, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::Internal);
    }
    Ok(TC_ACT_REDIRECT)
}

/// Sends a reply of a routing-mesh flow out of the uplink to the outside client.
///
/// `bpf_redirect_neigh` routes the packet in the node's FIB (the client, or the gateway
/// towards it) and fills in the Ethernet header from the neighbour table, resolving the
/// neighbour with ARP if needed, exactly as a forwarded packet would get it; the Ethernet
/// header the packet carries now is discarded.
#[inline(always)]
pub fn to_uplink(config: &Config) -> Result<i32, DropReason> {
    if config.uplink_ifindex == 0 {
        return Err(DropReason::NoUplink);
    }
    // No nexthop parameters: the kernel looks the route up itself.
    // SAFETY: a null parameter pointer with length 0 is the documented "look it up" form.
    let verdict = unsafe { bpf_redirect_neigh(config.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::Internal);
    }
    Ok(TC_ACT_REDIRECT)
}
