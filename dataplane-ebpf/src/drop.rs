//! Drop accounting: every dropped packet is counted under its reason and, if the ring buffer
//! has room, reported with the header fields an operator needs to find the sender.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{
    DROP_COUNTER_EVENTS_LOST, DROP_COUNTERS_MAX_ENTRIES, DROP_EVENTS_PER_SEC, DropEvent,
    DropReason, Hook,
};

use crate::{
    arp::ArpEthIpv4,
    eth::{ETH_HLEN, EthHdr, ifindex},
    ipv4::Ipv4Hdr,
    maps::{DROP_BUDGET, DROP_BY_HOOK, DROP_COUNTERS, DROP_EVENTS},
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

/// DROP_BUDGET slots of drop events and of trace events (window start, events in it).
pub const BUDGET_DROPS: u32 = 0;
pub const BUDGET_TRACES: u32 = 2;

/// Whether this CPU may push another event of the budget at `slot` in the current second, at
/// most `per_sec` (and counts it if so).
#[inline(always)]
pub fn within_budget(now: u64, slot: u32, per_sec: u64) -> bool {
    let (Some(start), Some(sent)) = (
        DROP_BUDGET.get_ptr_mut(slot),
        DROP_BUDGET.get_ptr_mut(slot + 1),
    ) else {
        return false;
    };
    // SAFETY: this CPU's slots of a per-CPU map; programs do not migrate while running.
    unsafe {
        if now.wrapping_sub(*start) >= 1_000_000_000 {
            *start = now;
            *sent = 0;
        }
        if *sent >= per_sec {
            return false;
        }
        *sent += 1;
    }
    true
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
    let by_hook = hook as u32 * DROP_COUNTERS_MAX_ENTRIES + reason.code();
    if let Some(counter) = DROP_BY_HOOK.get_ptr_mut(by_hook) {
        // SAFETY: as in `count`.
        unsafe { *counter += 1 };
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !within_budget(now, BUDGET_DROPS, DROP_EVENTS_PER_SEC) {
        count(DROP_COUNTER_EVENTS_LOST);
        return;
    }
    if !emit(ctx, 0, now, reason.code(), hook, vni, 0) {
        count(DROP_COUNTER_EVENTS_LOST);
    }
}

/// Pushes one event (a drop, or a trace with `action`) with the headers of the frame as it is
/// now. False when the ring buffer is full.
#[inline(always)]
pub fn emit(
    ctx: &TcContext,
    off: usize,
    now: u64,
    reason: u32,
    hook: Hook,
    vni: u32,
    action: u8,
) -> bool {
    let mut event = DropEvent {
        timestamp_ns: now,
        reason,
        ifindex: ifindex(ctx),
        pkt_len: ctx.len(),
        hook: hook as u8,
        vni,
        action,
        ..DropEvent::default()
    };
    // Header fields are read with bpf_skb_load_bytes, not direct access: the frame may be
    // truncated or paged (that can be why it is dropped), and a failed fixed-size read simply
    // leaves the fields zero.
    if let Ok(eth) = ctx.load::<EthHdr>(off) {
        event.dst_mac = eth.dst;
        event.src_mac = eth.src;
        event.ethertype = u16::from_be_bytes(eth.ether_type);
        match eth.ether_type {
            crate::eth::ETH_P_ARP => {
                if let Ok(arp) = ctx.load::<ArpEthIpv4>(off + ETH_HLEN) {
                    event.arp_op = u16::from_be_bytes(arp.oper);
                    event.src_ip = arp.spa;
                    event.dst_ip = arp.tpa;
                }
            }
            crate::eth::ETH_P_IP => {
                if let Ok(ip) = ctx.load::<Ipv4Hdr>(off + ETH_HLEN) {
                    event.ip_proto = ip.protocol;
                    event.src_ip = ip.saddr;
                    event.dst_ip = ip.daddr;
                    let first_fragment = u16::from_be_bytes(ip.frag_off) & 0x1fff == 0;
                    if (ip.protocol == 6 || ip.protocol == 17) && first_fragment {
                        let l4 = off + ETH_HLEN + usize::from(ip.version_ihl & 0x0f) * 4;
                        if let Ok(ports) = ctx.load::<[u8; 4]>(l4) {
                            event.src_port = u16::from_be_bytes([ports[0], ports[1]]);
                            event.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    DROP_EVENTS.output::<DropEvent>(&event, 0).is_ok()
}
