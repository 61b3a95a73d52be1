//! Accounting of what the hooks let through (FORWARDED, trace events) and of the connections
//! the balancer creates (FLOWS). Drops are counted in `drop`.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{
    FORWARD_ACTIONS, FlowStatKey, ForwardAction, Hook, TRACE_EVENTS_PER_SEC, TRACE_REASON,
};

use crate::{
    drop::{self, BUDGET_TRACES},
    maps::{FLOWS, FORWARDED, TRACE},
    verdict::{TC_ACT_OK, TC_ACT_REDIRECT},
    vxlan,
};

/// Counts a packet `hook` let through with `verdict`, `len` bytes as it came in, and, while
/// tracing is on, reports it as it leaves (after any NAT; a packet the hook put in VXLAN, i.e.
/// grew by exactly the encapsulation, by its inner headers). Returns `verdict`. Verdicts that
/// are neither pass nor redirect (a reset sent in the packet's place) are not traffic let
/// through and are not counted.
///
/// Not inlined: one copy for the three entry points, off their stack frames.
#[inline(never)]
pub fn forwarded(ctx: &TcContext, hook: Hook, verdict: i32, vni: u32, len: u32) -> i32 {
    let action = match verdict {
        TC_ACT_OK => ForwardAction::Pass,
        TC_ACT_REDIRECT => ForwardAction::Redirect,
        _ => return verdict,
    };
    let slot = hook as u32 * FORWARD_ACTIONS + action as u32;
    if let Some(counter) = FORWARDED.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot of a per-CPU map; programs do not migrate while running.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(len);
        }
    }
    if TRACE.get(0).is_some_and(|on| *on != 0) {
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        if drop::within_budget(now, BUDGET_TRACES, TRACE_EVENTS_PER_SEC) {
            let off = if ctx.len() == len + vxlan::ENCAP_LEN as u32 {
                vxlan::ENCAP_LEN
            } else {
                0
            };
            drop::emit(ctx, off, now, TRACE_REASON, hook, vni, action as u8);
        }
    }
    verdict
}

/// Counts a connection the balancer created for `service_id` towards `backend`.
#[inline(never)]
pub fn new_flow(service_id: u32, backend: [u8; 4]) {
    let key = FlowStatKey {
        service_id,
        backend,
    };
    match FLOWS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a per-CPU map.
        Some(n) => unsafe { *n += 1 },
        None => {
            // A program's update of a per-CPU element writes this CPU's value only (a new
            // element starts at zero on the others), so if another CPU inserted the key
            // meanwhile this still just sets this CPU's count, which was zero, to one.
            let _ = FLOWS.insert(key, 1, 0);
        }
    }
}
