//! Ethernet header and the bounds-checked packet access every parser uses.
//!
//! Verifier rules this module encodes:
//! - a direct packet access is only accepted after a `data + off + len <= data_end` comparison
//!   the verifier can see in the same function; `ptr_at` is `#[inline(always)]` so the check
//!   is inlined into each caller next to the access;
//! - every helper that may move the packet (`bpf_skb_pull_data`, `bpf_skb_change_*`, ...)
//!   invalidates all packet pointers, so callers take pointers only after `ensure_linear`;
//! - header structs contain only byte arrays (alignment 1): packet fields are not aligned and
//!   the bytes stay in network order until a caller converts them explicitly.

use aya_ebpf::programs::TcContext;
use dataplane_common::DropReason;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: [u8; 2] = 0x0800u16.to_be_bytes();
pub const ETH_P_ARP: [u8; 2] = 0x0806u16.to_be_bytes();

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_HLEN);

/// Returns a pointer to a `T` at `offset` from the start of the frame, or `Malformed` if the
/// linear data is too short. Call `ensure_linear` first when the headers may sit in paged data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*mut T, DropReason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(DropReason::Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// Makes the first `len` bytes directly accessible. A frame shorter than `len` is `Malformed`;
/// a long enough frame whose headers are in paged fragments (GSO, some veth paths) is pulled
/// into the linear area, which only fails under memory pressure (`Internal`).
#[inline(always)]
pub fn ensure_linear(ctx: &TcContext, len: usize) -> Result<(), DropReason> {
    if ctx.data() + len <= ctx.data_end() {
        return Ok(());
    }
    if (ctx.len() as usize) < len {
        return Err(DropReason::Malformed);
    }
    ctx.pull_data(len as u32).map_err(|_| DropReason::Internal)
}

/// Readdresses the frame for its next hop: `dst` is the receiving endpoint's MAC, `src` the
/// router MAC, exactly what the endpoint would see from a real router in front of it.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: [u8; 6], src: [u8; 6]) -> Result<(), DropReason> {
    // Callers parsed at least the Ethernet header already, so this check cannot fail; it is
    // repeated because the verifier needs it next to the store.
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 14 bytes are inside the linear (writable) packet data.
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
    }
    Ok(())
}

/// `skb->ifindex`: the device the packet is being processed on (at tc ingress, the device it
/// arrived on). aya-ebpf 0.2.1 has no accessor for it.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program; reading a
    // field of `__sk_buff` is a context access the verifier rewrites to the real skb field.
    unsafe { (*ctx.skb.skb).ifindex }
}
