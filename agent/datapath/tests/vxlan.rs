//! VXLAN in eBPF (src/vxlan.rs of the eBPF crate) under BPF_PROG_TEST_RUN.
//!
//! Sending: plain traffic for another node leaves encapsulated by the program (the fixtures
//! with the mesh config know the node's address and uplink; `common::decapsulate` checks the
//! outer headers for every test that sends to a remote endpoint), encrypted networks' traffic
//! never does (tests/encryption.rs). Receiving: plain VXLAN from a node for a local endpoint of its VNI's network is
//! delivered from the uplink with from_overlay's decision; everything else passes untouched to
//! the VXLAN device, where `from_overlay` judges it (tests/from_overlay.rs, encryption.rs).
//! tests/kernel_paths.rs sends real VXLAN through both paths.

mod common;

use std::net::Ipv4Addr;

use common::*;
use netagent_datapath::{
    CT_DIR_REPLY, CtKind, ENDPOINT_F_ENCRYPTED, EndpointInfo, MESH_INNER_SRC_MAC,
};
use smoltcp::wire::{EthernetAddress, EthernetProtocol, Ipv4Address};

const TCP: u8 = 6;
const PACKET_HOST: u8 = 0;
const NODE: Ipv4Address = Ipv4Address::new(198, 18, 0, 1);
/// The MAC the sending node's from_container gives the inner frame as source.
const SENDER_ROUTER_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x09];

fn node_addr(addr: Ipv4Addr) -> Ipv4Address {
    Ipv4Address::from_octets(addr.octets())
}

/// The inner frame `from_container` on REMOTE_NODE sends to `dst` (MAC `dst_mac`).
fn inner(dst: Ipv4Address, dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut frame = ipv4_from(REMOTE_PEER_IP, dst, payload);
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&SENDER_ROUTER_MAC);
    frame
}

/// `inner` in VXLAN with `vni` (flags: VNI present) from `from` to this node's VXLAN port.
fn vxlan(from: Ipv4Addr, vni: u32, inner: &[u8]) -> Vec<u8> {
    vxlan_with_flags(from, vni, 0x08, inner)
}

fn vxlan_with_flags(from: Ipv4Addr, vni: u32, flags: u8, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![flags, 0, 0, 0];
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    udp_frame(node_addr(from), 41000, NODE, 4789, &payload)
}

fn forwarded(fx: &Fixture, hook: &str) -> u64 {
    fx.dp
        .forwarded()
        .expect("forwarded")
        .into_iter()
        .filter(|(h, action, _)| *h == hook && *action == "redirect")
        .map(|(_, _, c)| c.packets)
        .sum()
}

#[test]
fn vxlan_for_a_local_endpoint_is_decapsulated_and_delivered_from_the_uplink() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    let frame = inner(LOCAL_PEER_IP, LOCAL_PEER_MAC, b"from afar");
    let (verdict, out, obs) = fx.run_uplink(&vxlan(REMOTE_NODE, VNI_A, &frame));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // Exactly the inner frame, readdressed as from_overlay delivers it.
    assert_readdressed(&out, &frame, LOCAL_PEER_MAC);
    assert_eq!(obs.pkt_type, PACKET_HOST);
    assert_ne!(obs.tunnel_key_status, 0, "delivered, not tunnelled");
    // Counted as what it is: a packet delivered from the overlay.
    assert_eq!(forwarded(&fx, "from_overlay"), 1);
    assert_eq!(forwarded(&fx, "from_uplink"), 0);

    // Network B's endpoint with B's VNI.
    let frame = inner(B_LOCAL_IP, B_MAC, b"b");
    let (verdict, out, _) = fx.run_uplink(&vxlan(REMOTE_NODE, VNI_B, &frame));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, B_MAC);
    fx.assert_only_drops(None, 0);
}

#[test]
fn routing_mesh_traffic_decapsulated_on_the_uplink_records_its_ingress_node() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    // What an ingress node tunnels to a backend: client address kept, marked by the inner
    // source MAC (tests/mesh.rs has the same through the VXLAN device).
    let mut frame = tcp_frame(OUTSIDE_CLIENT, 50000, LOCAL_PEER_IP, 80, TcpFlags::Syn, b"");
    frame[0..6].copy_from_slice(&LOCAL_PEER_MAC);
    frame[6..12].copy_from_slice(&MESH_INNER_SRC_MAC);
    let (verdict, out, _) = fx.run_uplink(&vxlan(REMOTE_NODE, VNI_A, &frame));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, LOCAL_PEER_MAC);
    let key = ct_key(LOCAL_PEER_IP, 80, OUTSIDE_CLIENT, 50000, TCP, CT_DIR_REPLY);
    let entry = fx.ct_entry(&key).expect("return entry");
    assert_eq!(CtKind::from_code(entry.kind), Some(CtKind::MeshReturn));
    assert_eq!((entry.tunnel_addr(), entry.vni), (REMOTE_NODE, VNI_A));
}

#[test]
fn everything_else_goes_on_to_the_vxlan_device_untouched() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    fx.dp
        .upsert_endpoint(
            ip(B3_IP),
            &EndpointInfo {
                flags: EndpointInfo::local(VNI_A, B3_IFINDEX, B3_MAC).flags | ENDPOINT_F_ENCRYPTED,
                ..EndpointInfo::local(VNI_A, B3_IFINDEX, B3_MAC)
            },
        )
        .expect("encrypted endpoint");
    let arp_inner = ethernet(
        EthernetAddress(LOCAL_PEER_MAC),
        EthernetProtocol::Arp,
        &[0u8; 28],
    );
    let cases = [
        // The wrong network's VNI: from_overlay drops it as wrong_vni.
        (
            "wrong vni",
            vxlan(
                REMOTE_NODE,
                VNI_B,
                &inner(LOCAL_PEER_IP, LOCAL_PEER_MAC, b"x"),
            ),
        ),
        (
            "unknown vni",
            vxlan(
                REMOTE_NODE,
                0x77,
                &inner(LOCAL_PEER_IP, LOCAL_PEER_MAC, b"x"),
            ),
        ),
        // An encrypted network's endpoint in clear: from_overlay drops it as unencrypted.
        (
            "encrypted endpoint",
            vxlan(REMOTE_NODE, VNI_A, &inner(B3_IP, B3_MAC, b"x")),
        ),
        // Not for a local endpoint: a routing-mesh reply for the outside, or stale state.
        (
            "outside destination",
            vxlan(REMOTE_NODE, VNI_A, &inner(OUTSIDE_CLIENT, ROUTER_MAC, b"x")),
        ),
        (
            "remote endpoint",
            vxlan(
                REMOTE_NODE,
                VNI_A,
                &inner(REMOTE_PEER_IP, REMOTE_PEER_MAC, b"x"),
            ),
        ),
        // Not plain VXLAN carrying IPv4.
        (
            "no VNI flag",
            vxlan_with_flags(
                REMOTE_NODE,
                VNI_A,
                0,
                &inner(LOCAL_PEER_IP, LOCAL_PEER_MAC, b"x"),
            ),
        ),
        ("reserved bits set", {
            let mut f = vxlan(
                REMOTE_NODE,
                VNI_A,
                &inner(LOCAL_PEER_IP, LOCAL_PEER_MAC, b"x"),
            );
            // The second byte of the VXLAN header (after Ethernet, IPv4 and UDP).
            f[14 + 20 + 8 + 1] = 0x01;
            f
        }),
        ("inner ARP", vxlan(REMOTE_NODE, VNI_A, &arp_inner)),
        (
            "truncated",
            udp_frame(node_addr(REMOTE_NODE), 41000, NODE, 4789, &[0x08, 0, 0, 0]),
        ),
    ];
    for (what, frame) in &cases {
        let (verdict, out, _) = fx.run_uplink(frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(&out, frame, "{what}: untouched");
    }
    assert_eq!(forwarded(&fx, "from_overlay"), 0);
    fx.assert_only_drops(None, 0);
}

#[test]
fn plain_traffic_to_another_node_leaves_in_vxlan_built_by_the_program() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    let frame = tcp_frame(CONTAINER_IP, 40000, REMOTE_PEER_IP, 80, TcpFlags::Syn, b"");
    // The real program: counted as the container sent it, traced by its inner headers.
    let mut events = fx.dp.take_drop_events().expect("events");
    fx.dp.set_trace(true).expect("trace on");
    let (verdict, _) = fx.run(&frame);
    fx.dp.set_trace(false).expect("trace off");
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let traces = events.drain();
    assert_eq!(traces.len(), 1, "{traces:?}");
    let t = &traces[0];
    assert_eq!(
        (t.src_ip, t.dst_ip, t.src_port, t.dst_port),
        (CONTAINER_IP.octets(), REMOTE_PEER_IP.octets(), 40000, 80),
        "{t}"
    );
    let sent = fx
        .dp
        .forwarded()
        .expect("forwarded")
        .into_iter()
        .find(|(h, a, _)| *h == "from_container" && *a == "redirect")
        .expect("counted")
        .2;
    assert_eq!((sent.packets, sent.bytes), (1, frame.len() as u64));

    let prog = fx.dp.from_container_test().expect("program");
    let (verdict, out) = run(prog, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (inner, outer) = decapsulate(verdict, &out).expect("encapsulated by the program");
    assert_eq!(
        (outer.vni, outer.remote, outer.ttl),
        (VNI_A, REMOTE_NODE, 64)
    );
    assert_eq!(
        fx.observation().tunnel_key_status,
        NO_TUNNEL_KEY,
        "no metadata for the VXLAN device"
    );
    // The inner frame is the container's, addressed to the peer from the router.
    assert_readdressed(&inner, &frame, REMOTE_PEER_MAC);
    assert_eq!(&inner[6..12], &ROUTER_MAC);

    // One flow, one source port (the fabric's ECMP keeps it on one path).
    let again = tcp_frame(CONTAINER_IP, 40000, REMOTE_PEER_IP, 80, TcpFlags::Ack, b"x");
    let (verdict, out) = run(prog, &again);
    assert_eq!(
        decapsulate(verdict, &out).expect("encapsulated").1.sport,
        outer.sport
    );
    // Other flows spread over the range.
    let ports: std::collections::HashSet<u16> = (0..16u16)
        .map(|i| {
            let f = tcp_frame(
                CONTAINER_IP,
                41000 + i,
                REMOTE_PEER_IP,
                80,
                TcpFlags::Syn,
                b"",
            );
            let (verdict, out) = run(prog, &f);
            decapsulate(verdict, &out).expect("encapsulated").1.sport
        })
        .collect();
    assert!(ports.len() > 8, "source ports {ports:?}");
    fx.assert_only_drops(None, 0);
}

/// -EINVAL: what bpf_skb_get_tunnel_key returns for an skb without tunnel metadata.
const NO_TUNNEL_KEY: i32 = -22;

#[test]
fn with_the_device_asked_for_the_programs_do_no_vxlan_either_way() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    fx.dp.set_device_encap(true).expect("device encap");
    assert!(fx.dp.device_encap().expect("read back"));
    // Out: the tunnel key for the device, the frame untouched but readdressed.
    let frame = tcp_frame(CONTAINER_IP, 40000, REMOTE_PEER_IP, 80, TcpFlags::Syn, b"");
    let (out, obs) = run_for_the_device(&fx, &frame);
    assert_eq!(
        (obs.tunnel_id, obs.tunnel_remote),
        (VNI_A, REMOTE_NODE.octets())
    );
    assert_readdressed(&out, &frame, REMOTE_PEER_MAC);
    // In: left to the device.
    let vx = vxlan(
        REMOTE_NODE,
        VNI_A,
        &inner(LOCAL_PEER_IP, LOCAL_PEER_MAC, b"x"),
    );
    let (verdict, out, _) = fx.run_uplink(&vx);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, vx);
    // And back.
    fx.dp.set_device_encap(false).expect("ebpf encap");
    assert_eq!(fx.run_uplink(&vx).0, TC_ACT_REDIRECT);
    fx.assert_only_drops(None, 0);
}

#[test]
fn a_packet_too_big_for_the_vxlan_device_is_left_to_the_device() {
    if !have_root() {
        return;
    }
    // A veth stands in for the VXLAN device: the program compares packets with its MTU, the
    // uplink's less the encapsulation. (It lives in a private netns, gone with the thread.)
    in_private_netns(|| {
        ip_cmd(&[
            "link", "add", "vx-mtu", "mtu", "1450", "type", "veth", "peer", "name", "vx-mtu-p",
        ]);
        let mut fx = Fixture::with_services();
        fx.dp
            .set_config(netagent_datapath::DatapathConfig {
                vxlan_ifindex: ifindex("vx-mtu"),
                ..config()
            })
            .expect("config");
        let prog = fx.dp.from_container_test().expect("program");
        // IPv4 length 1450 (20 IP + 20 TCP + 1410): fits the network, built by the program.
        let fits = tcp_frame(
            CONTAINER_IP,
            40000,
            REMOTE_PEER_IP,
            80,
            TcpFlags::Ack,
            &[7; 1410],
        );
        let (verdict, out) = run(prog, &fits);
        let (inner, _) = decapsulate(verdict, &out).expect("encapsulated by the program");
        assert_readdressed(&inner, &fits, REMOTE_PEER_MAC);
        // One byte more: the device gets it (with its tunnel key) and answers the sender
        // with ICMP "fragmentation needed"; the program would have sent it to its death.
        let big = tcp_frame(
            CONTAINER_IP,
            40000,
            REMOTE_PEER_IP,
            80,
            TcpFlags::Ack,
            &[7; 1411],
        );
        let (out, obs) = run_for_the_device(&fx, &big);
        assert_readdressed(&out, &big, REMOTE_PEER_MAC);
        assert_eq!(
            (obs.tunnel_id, obs.tunnel_remote),
            (VNI_A, REMOTE_NODE.octets())
        );
        fx.assert_only_drops(None, 0);
    });
}
