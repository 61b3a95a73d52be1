//! Test hooks: programs the agent loads (so they are verified with everything else) but
//! never attaches. They run the real decision functions under BPF_PROG_TEST_RUN and make
//! visible what the test run itself cannot:
//!
//! - `from_overlay_test` takes the VNI and the sending node from TEST_INPUT, because a test
//!   run cannot attach tunnel metadata to its skb (and `from_overlay` would drop it as
//!   `no_tunnel_key`);
//! - all of them record in TEST_OBSERVED the skb's tunnel key and packet type after the decision,
//!   which the test run does not copy out. `bpf_skb_get_tunnel_key` reads the metadata
//!   `bpf_skb_set_tunnel_key` attached to the same skb, so the tunnel key from_container
//!   chose for a remote endpoint is observable without a VXLAN device.
//!
//! Drops are counted and reported exactly like those of the real programs.

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::Hook;

use crate::{
    drop,
    from_container::try_from_container,
    from_overlay::try_from_overlay,
    from_uplink::try_from_uplink,
    maps::{TEST_INPUT, TEST_OBSERVED},
    tunnel, vxlan,
};

#[classifier]
pub fn from_container_test(ctx: TcContext) -> i32 {
    let verdict = match try_from_container(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop::drop_packet(&ctx, reason, Hook::FromContainer, 0),
    };
    observe(&ctx, verdict);
    verdict
}

#[classifier]
pub fn from_overlay_test(ctx: TcContext) -> i32 {
    let (vni, remote, encrypted) = TEST_INPUT.get(0).map_or((0, [0; 4], false), |input| {
        (input.vni, input.remote_node, input.encrypted != 0)
    });
    let verdict = match try_from_overlay(&ctx, vni, remote, encrypted) {
        Ok(verdict) => verdict,
        Err(reason) => drop::drop_packet(&ctx, reason, Hook::FromOverlay, vni),
    };
    observe(&ctx, verdict);
    verdict
}

#[classifier]
pub fn from_uplink_test(ctx: TcContext) -> i32 {
    let verdict = match try_from_uplink(&ctx) {
        Ok(vxlan::DECAP) => vxlan::receive(&ctx),
        Ok(verdict) => verdict,
        Err(reason) => drop::drop_packet(&ctx, reason, Hook::FromUplink, 0),
    };
    observe(&ctx, verdict);
    verdict
}

#[inline(always)]
fn observe(ctx: &TcContext, verdict: i32) {
    let Some(obs) = TEST_OBSERVED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `obs` points to the map's only value; test runs of one load are serialised by
    // the test, and nothing else writes this unpinned map.
    let obs = unsafe { &mut *obs };
    obs.runs = obs.runs.wrapping_add(1);
    obs.verdict = verdict as u32;
    match tunnel::get_key(ctx) {
        Ok(key) => {
            obs.tunnel_key_status = 0;
            obs.tunnel_id = key.tunnel_id;
            // Read back from TX metadata: the outer destination is reported as local_ipv4
            // (see `tunnel::get_key`).
            // SAFETY: reading a u32 out of a union of integers is always defined.
            obs.tunnel_remote = unsafe { key.__bindgen_anon_3.local_ipv4 }.to_be_bytes();
            obs.tunnel_ttl = key.tunnel_ttl;
            obs.tunnel_tos = key.tunnel_tos;
        }
        Err(errno) => {
            obs.tunnel_key_status = errno as i32;
            obs.tunnel_id = 0;
            obs.tunnel_remote = [0; 4];
            obs.tunnel_ttl = 0;
            obs.tunnel_tos = 0;
        }
    }
    // SAFETY: context field read, rewritten by the verifier to the skb's pkt_type.
    obs.pkt_type = unsafe { (*ctx.skb.skb).pkt_type } as u8;
}
