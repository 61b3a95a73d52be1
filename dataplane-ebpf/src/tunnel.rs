//! Tunnel metadata for the collect-metadata VXLAN device.
//!
//! `struct bpf_tunnel_key` stores IPv4 addresses as host-order `u32`s: the kernel converts
//! with `cpu_to_be32`/`be32_to_cpu` on the way in and out. Our ABI keeps addresses in network
//! order (`EndpointInfo::node_ip` is a `__be32`), so the conversion is `u32::from_be` here and
//! nowhere else.

use aya_ebpf::{
    bindings::BPF_F_ZERO_CSUM_TX,
    bindings::bpf_tunnel_key,
    helpers::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use dataplane_common::DropReason;

/// Outer TTL of our VXLAN packets: they cross the fabric, not the Internet; 64 is the Linux
/// default for locally generated packets.
const TUNNEL_TTL: u8 = 64;

const KEY_SIZE: u32 = core::mem::size_of::<bpf_tunnel_key>() as u32;

/// Attaches TX tunnel metadata to the skb: the VXLAN device the packet is redirected to
/// encapsulates it with `vni` towards `remote_be` (network byte order, as stored in
/// `EndpointInfo::node_ip`). Source address, UDP
/// ports and checksum come from the device and the routing table.
///
/// BPF_F_ZERO_CSUM_TX: no outer UDP checksum, as Linux VXLAN devices default to over IPv4 (the
/// inner packet keeps its own checksums, and the outer IPv4 header has one). Computing it costs
/// a software pass per GSO segment on veth uplinks, which the bridge+VXLAN baseline never pays.
///
/// A subprogram: the key (a 44-byte struct) lives in a frame of its own, not in every
/// caller's (they are many, and several are deep).
#[inline(never)]
pub fn set_key(ctx: &TcContext, vni: u32, remote_be: u32) -> Result<(), DropReason> {
    // SAFETY: bpf_tunnel_key is plain integers and unions of integers; all zero is valid, and
    // the helper requires initialised memory (it reads the whole struct).
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(remote_be);
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: `key` is a live, initialised stack value of exactly KEY_SIZE bytes.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, KEY_SIZE, BPF_F_ZERO_CSUM_TX as u64)
    };
    if ret != 0 {
        return Err(DropReason::Internal);
    }
    Ok(())
}

/// The skb's tunnel metadata, or the helper's negative errno (no metadata: -EINVAL).
///
/// On RX metadata (set by the VXLAN device) `remote_ipv4` is the outer source, i.e. the
/// sending node. Beware when reading back TX metadata set by `set_key` (test hooks): the
/// kernel reports the outer *source* as `remote_ipv4` and the outer destination as
/// `local_ipv4`, so the address passed to `set_key` comes back in `local_ipv4`.
#[inline(always)]
pub fn get_key(ctx: &TcContext) -> Result<bpf_tunnel_key, i64> {
    // SAFETY: as in `set_key`; zeroing keeps the verifier happy about the stack slot.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `key` is a live stack value of exactly KEY_SIZE bytes the helper writes to.
    let ret = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, KEY_SIZE, 0) };
    if ret != 0 {
        return Err(ret);
    }
    Ok(key)
}
