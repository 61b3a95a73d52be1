//! Drop accounting: every dropped packet is counted under its reason and, if the ring buffer
//! has room, reported with the header fields an operator needs to find the sender.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{DROP_COUNTER_EVENTS_LOST, DropEvent, DropReason, Hook};

use crate::{
    arp::ArpEthIpv4,
    eth::{ETH_HLEN, EthHdr, ifindex},
    ipv4::Ipv4Hdr,
    maps::{DROP_COUNTERS, DROP_EVENTS},
    verdict::TC_ACT_SHOT,
};

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = DROP_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU map; programs do not migrate CPUs
        // while running, so a plain increment cannot race.
        unsafe { *counter += 1 };
    }
}

/// Counts and reports the drop, returns the verdict to hand back to tc. `vni` is the VNI the
/// packet arrived with (`from_overlay`), 0 elsewhere.
///
/// Not inlined: the drop path is cold and shared by every early return of a program, so one
/// BPF-to-BPF subprogram keeps the hot path small for the verifier and the icache.
#[inline(never)]
pub fn drop_packet(ctx: &TcContext, reason: DropReason, hook: Hook, vni: u32) -> i32 {
    report(ctx, reason, hook, vni);
    TC_ACT_SHOT
}

/// Counts and reports a packet the program consumed for `reason` without simply dropping it
/// (it answered it instead, e.g. with a TCP reset). Call before the packet is rewritten, so
/// the event shows what arrived.
#[inline(never)]
pub fn report(ctx: &TcContext, reason: DropReason, hook: Hook, vni: u32) {
    count(reason.code());

    let mut event = DropEvent {
        // SAFETY: helper without arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        reason: reason.code(),
        ifindex: ifindex(ctx),
        pkt_len: ctx.len(),
        hook: hook as u8,
        vni,
        ..DropEvent::default()
    };
    // Header fields are read with bpf_skb_load_bytes, not direct access: the frame may be
    // truncated or paged (that can be why it is dropped), and a failed fixed-size read simply
    // leaves the fields zero.
    if let Ok(eth) = ctx.load::<EthHdr>(0) {
        event.dst_mac = eth.dst;
        event.src_mac = eth.src;
        event.ethertype = u16::from_be_bytes(eth.ether_type);
        match eth.ether_type {
            crate::eth::ETH_P_ARP => {
                if let Ok(arp) = ctx.load::<ArpEthIpv4>(ETH_HLEN) {
                    event.arp_op = u16::from_be_bytes(arp.oper);
                    event.src_ip = arp.spa;
                    event.dst_ip = arp.tpa;
                }
            }
            crate::eth::ETH_P_IP => {
                if let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_HLEN) {
                    event.ip_proto = ip.protocol;
                    event.src_ip = ip.saddr;
                    event.dst_ip = ip.daddr;
                }
            }
            _ => {}
        }
    }
    if DROP_EVENTS.output::<DropEvent>(&event, 0).is_err() {
        count(DROP_COUNTER_EVENTS_LOST);
    }
}
