//! ns per packet of each datapath path, measured by the kernel with BPF_PROG_TEST_RUN
//! (`repeat` runs on one skb, mean per run; several rounds, median printed).
//!
//! Needs root. What it measures: the program alone, with hot caches and a warm map, on the
//! loopback device; no redirect is performed (a test run only records it), so the cost of
//! the veth/VXLAN transmit is not included. Compare paths with each other and across
//! changes, not with wire latency.
//!
//! Only paths whose rewrite is idempotent can be repeated on one skb: the ARP responder turns
//! the request into a reply in place, so its second run sees a reply and drops it; it is left
//! out.
//!
//! `from_overlay` runs through its test hook, which adds a tunnel-key read and a map write
//! after the decision; `from_container (hook)` against `from_container` shows that overhead.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use aya::programs::SchedClassifier;
use common::*;
use smoltcp::wire::Ipv4Address;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 7;

fn median_ns(prog: &SchedClassifier, frame: &[u8], expect: u32) -> f64 {
    let mut samples: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let (verdict, mean) = run_repeat(prog, frame, REPEAT);
            assert_eq!(verdict, expect, "unexpected verdict");
            mean
        })
        .collect();
    samples.sort();
    samples[ROUNDS / 2].as_nanos() as f64
}

fn main() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let payload = [0u8; 64];
    let local = ipv4(LOCAL_PEER_IP, &payload);
    let remote = ipv4(REMOTE_PEER_IP, &payload);
    let isolated = ipv4(B_LOCAL_IP, &payload);
    let mut from_afar = ipv4_from(Ipv4Address::new(10, 0, 0, 50), LOCAL_PEER_IP, &payload);
    from_afar[0..6].copy_from_slice(&LOCAL_PEER_MAC);

    let fc = fx.dp.from_container().expect("program");
    let fc_hook = fx.dp.from_container_test().expect("program");
    let mut rows = vec![
        (
            "from_container local peer",
            median_ns(fc, &local, TC_ACT_REDIRECT),
        ),
        (
            "from_container remote peer",
            median_ns(fc, &remote, TC_ACT_REDIRECT),
        ),
        (
            "from_container drop (isolation)",
            median_ns(fc, &isolated, TC_ACT_SHOT),
        ),
        (
            "from_container (hook) local peer",
            median_ns(fc_hook, &local, TC_ACT_REDIRECT),
        ),
        (
            "from_container (hook) remote peer",
            median_ns(fc_hook, &remote, TC_ACT_REDIRECT),
        ),
    ];
    fx.dp.set_test_vni(VNI_A).expect("vni");
    let fo_hook = fx.dp.from_overlay_test().expect("program");
    rows.push((
        "from_overlay (hook) deliver",
        median_ns(fo_hook, &from_afar, TC_ACT_REDIRECT),
    ));
    fx.dp.set_test_vni(VNI_B).expect("vni");
    let fo_hook = fx.dp.from_overlay_test().expect("program");
    rows.push((
        "from_overlay (hook) wrong VNI drop",
        median_ns(fo_hook, &from_afar, TC_ACT_SHOT),
    ));

    println!(
        "BPF_PROG_TEST_RUN, {} x {REPEAT} runs per path, median of the per-run means, {}-byte frames",
        ROUNDS,
        local.len()
    );
    println!("{:<36} {:>8}", "path", "ns/pkt");
    for (name, ns) in rows {
        println!("{name:<36} {ns:>8.0}");
    }
}
