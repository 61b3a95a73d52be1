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
//!
//! Load-balancer paths rewrite addresses, which is not idempotent either: after one run the
//! packet is addressed to the backend. So the established-flow rows balance to a backend
//! whose address *is* the VIP (or node address and published port): every repetition then
//! does exactly the work of an established flow (service lookup, conntrack hit, checksum
//! helpers, stores, endpoint lookup, redirect), rewriting the address to the same value.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use aya::programs::SchedClassifier;
use common::*;
use netagent_datapath::{EndpointInfo, L4Proto, PublishedInfo, ServiceInfo};
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
    fx.dp.set_test_tunnel(VNI_A, REMOTE_NODE).expect("vni");
    let fo_hook = fx.dp.from_overlay_test().expect("program");
    rows.push((
        "from_overlay (hook) deliver",
        median_ns(fo_hook, &from_afar, TC_ACT_REDIRECT),
    ));
    fx.dp.set_test_tunnel(VNI_B, REMOTE_NODE).expect("vni");
    let fo_hook = fx.dp.from_overlay_test().expect("program");
    rows.push((
        "from_overlay (hook) wrong VNI drop",
        median_ns(fo_hook, &from_afar, TC_ACT_SHOT),
    ));

    rows.extend(lb_rows());

    println!(
        "BPF_PROG_TEST_RUN, {} x {REPEAT} runs per path, median of the per-run means, {}-byte frames",
        ROUNDS,
        local.len()
    );
    println!("{:<44} {:>8}", "path", "ns/pkt");
    for (name, ns) in rows {
        println!("{name:<44} {ns:>8.0}");
    }
}

/// The load-balancer rows (see the module docs for the self-mapping trick).
fn lb_rows() -> Vec<(&'static str, f64)> {
    let mut fx = Fixture::with_services();
    let vip = Ipv4Address::new(10, 0, 0, 200);
    let vip_mac = [0x02, 0x42, 0x0a, 0x00, 0x00, 0xc8];
    let node = Ipv4Address::from_octets(NODE_IP.octets());
    fx.dp
        .upsert_service(
            ip(vip),
            &ServiceInfo {
                id: 2,
                vni: VNI_A,
                flags: 0,
            },
        )
        .expect("service");
    fx.dp.set_backends(2, &[ip(vip)]).expect("backends");
    fx.dp
        .upsert_endpoint(ip(vip), &EndpointInfo::local(VNI_A, 50, vip_mac))
        .expect("VIP as its own backend");
    // Published 8080 -> 8080 over a set whose backend is the node address itself.
    fx.dp.set_backends(3, &[NODE_IP]).expect("backends");
    fx.dp
        .upsert_published(8080, L4Proto::Tcp, &PublishedInfo::new(3, 8080))
        .expect("publish");
    fx.dp
        .upsert_endpoint(NODE_IP, &EndpointInfo::local(VNI_A, 51, vip_mac))
        .expect("node address as a backend");

    let payload = [0u8; 64];
    let to_vip = tcp_frame(CONTAINER_IP, 40000, vip, 80, TcpFlags::Psh, &payload);
    // Overlay delivery of ordinary TCP from a remote endpoint (conntrack miss), and of a
    // routing-mesh packet (return entry refreshed).
    let mut overlay_tcp = tcp_frame(
        REMOTE_PEER_IP,
        80,
        LOCAL_PEER_IP,
        40000,
        TcpFlags::Psh,
        &payload,
    );
    overlay_tcp[0..6].copy_from_slice(&LOCAL_PEER_MAC);
    let mut overlay_mesh = tcp_frame(
        OUTSIDE_CLIENT,
        50000,
        LOCAL_PEER_IP,
        80,
        TcpFlags::Psh,
        &payload,
    );
    overlay_mesh[0..6].copy_from_slice(&LOCAL_PEER_MAC);
    overlay_mesh[6..12].copy_from_slice(&netagent_datapath::MESH_INNER_SRC_MAC);
    let to_node = tcp_frame(OUTSIDE_CLIENT, 50000, node, 8080, TcpFlags::Psh, &payload);
    let unpublished = tcp_frame(OUTSIDE_CLIENT, 50000, node, 22, TcpFlags::Psh, &payload);
    let plain_tcp = tcp_frame(
        CONTAINER_IP,
        40000,
        LOCAL_PEER_IP,
        80,
        TcpFlags::Psh,
        &payload,
    );
    let fc = fx.dp.from_container().expect("program");
    let fu = fx.dp.from_uplink().expect("program");
    // A SYN creates the conntrack entries (only a SYN may), the client's next packet
    // promotes them to the established table; the measured runs are all established.
    let vip_syn = tcp_frame(CONTAINER_IP, 40000, vip, 80, TcpFlags::Syn, &[]);
    let node_syn = tcp_frame(OUTSIDE_CLIENT, 50000, node, 8080, TcpFlags::Syn, &[]);
    assert_eq!(run(fc, &vip_syn).0, TC_ACT_REDIRECT);
    assert_eq!(run(fc, &to_vip).0, TC_ACT_REDIRECT);
    assert_eq!(run(fu, &node_syn).0, TC_ACT_REDIRECT);
    assert_eq!(run(fu, &to_node).0, TC_ACT_REDIRECT);
    let mut rows = vec![
        (
            "from_container TCP to local peer (no LB)",
            median_ns(fc, &plain_tcp, TC_ACT_REDIRECT),
        ),
        (
            "from_container VIP established (DNAT)",
            median_ns(fc, &to_vip, TC_ACT_REDIRECT),
        ),
        (
            "from_uplink published established (DNAT)",
            median_ns(fu, &to_node, TC_ACT_REDIRECT),
        ),
        (
            "from_uplink unpublished port (pass)",
            median_ns(fu, &unpublished, TC_ACT_OK),
        ),
    ];
    fx.dp.set_test_tunnel(VNI_A, REMOTE_NODE).expect("vni");
    let fo_hook = fx.dp.from_overlay_test().expect("program");
    rows.push((
        "from_overlay (hook) deliver TCP",
        median_ns(fo_hook, &overlay_tcp, TC_ACT_REDIRECT),
    ));
    rows.push((
        "from_overlay (hook) mesh inbound",
        median_ns(fo_hook, &overlay_mesh, TC_ACT_REDIRECT),
    ));
    // The VIP's reply, delivered into the client with the VIP restored: send as the backend.
    fx.send_as(vip, vip_mac, 46);
    let reply = tcp_frame(vip, 80, CONTAINER_IP, 40000, TcpFlags::Psh, &payload);
    let fc = fx.dp.from_container().expect("program");
    rows.push((
        "from_container VIP reply (SNAT at delivery)",
        median_ns(fc, &reply, TC_ACT_REDIRECT),
    ));
    rows
}
