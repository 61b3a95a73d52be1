//! `from_overlay` under BPF_PROG_TEST_RUN. A test run cannot attach tunnel metadata, so the
//! decision is exercised through the `from_overlay_test` hook, which runs the same function
//! with the VNI taken from a test map; the real program is checked for what it does without
//! metadata.

mod common;

use common::*;
use netagent_datapath::{DropReason, EndpointInfo, Hook};
use smoltcp::wire::{EthernetAddress, EthernetProtocol, Ipv4Address};

const PACKET_HOST: u8 = 0;

/// A frame as it comes out of the VXLAN device: inner Ethernet addressed by the sending node's
/// from_container (router MAC -> endpoint MAC), from a container on another node.
fn tunnelled(dst: Ipv4Address, payload: &[u8]) -> Vec<u8> {
    let mut frame = ipv4_from(Ipv4Address::new(10, 0, 0, 50), dst, payload);
    frame[0..6].copy_from_slice(&LOCAL_PEER_MAC);
    frame[6..12].copy_from_slice(&[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x09]);
    frame
}

#[test]
fn right_vni_is_delivered_to_the_local_endpoint() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let frame = tunnelled(LOCAL_PEER_IP, b"from afar");
    let (verdict, out, obs) = fx.run_overlay(VNI_A, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, LOCAL_PEER_MAC);
    assert_eq!(obs.pkt_type, PACKET_HOST);

    // Network B's local endpoint with B's VNI.
    let frame = tunnelled(B_LOCAL_IP, b"b");
    let (verdict, out, _) = fx.run_overlay(VNI_B, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, B_MAC);

    fx.assert_only_drops(None, 0);
    assert!(fx.events().is_empty());
}

#[test]
fn wrong_vni_is_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let cases = [
        // Network B's VNI aimed at network A's container: the isolation breach to stop.
        (VNI_B, LOCAL_PEER_IP),
        (VNI_A, B_LOCAL_IP),
        // A VNI no network has.
        (0x77, LOCAL_PEER_IP),
        (0, LOCAL_PEER_IP),
    ];
    for (vni, dst) in cases {
        let frame = tunnelled(dst, b"sneaky");
        let (verdict, out, _) = fx.run_overlay(vni, &frame);
        assert_eq!(verdict, TC_ACT_SHOT, "vni {vni:#x} to {dst}");
        assert_eq!(out, frame, "dropped frames are not rewritten");
    }
    fx.assert_only_drops(Some(DropReason::WrongVni), cases.len() as u64);
    let events = fx.events();
    assert_eq!(events.len(), cases.len());
    assert_eq!(events[0].hook, Hook::FromOverlay as u8);
    assert_eq!(events[0].vni, VNI_B, "the event carries the packet's VNI");
    assert_eq!(events[0].dst_ip, LOCAL_PEER_IP.octets());
    assert!(
        events[0]
            .to_string()
            .starts_with("reason=wrong_vni hook=from_overlay"),
        "{}",
        events[0]
    );
    assert!(events[0].to_string().ends_with("vni=4098"), "{}", events[0]);
}

#[test]
fn remote_or_unknown_destination_is_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    // A remote endpoint: never bounced back into the tunnel. Then an address of the subnet
    // without endpoint, then one outside every network.
    for dst in [
        REMOTE_PEER_IP,
        Ipv4Address::new(10, 0, 0, 99),
        Ipv4Address::new(8, 8, 8, 8),
    ] {
        let frame = tunnelled(dst, b"?");
        let (verdict, out, obs) = fx.run_overlay(VNI_A, &frame);
        assert_eq!(verdict, TC_ACT_SHOT, "{dst}");
        assert_eq!(out, frame);
        assert_ne!(obs.tunnel_key_status, 0, "nothing was re-tunnelled");
    }
    fx.assert_only_drops(Some(DropReason::UnknownEndpoint), 3);
    assert_eq!(fx.events()[0].vni, VNI_A);
}

#[test]
fn non_ipv4_inner_frames_are_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    fx.dp
        .set_test_tunnel(VNI_A, REMOTE_NODE)
        .expect("test tunnel");
    let mut arp = arp_request(LOCAL_PEER_IP);
    arp.resize(60, 0);
    let v6 = ethernet(
        EthernetAddress(LOCAL_PEER_MAC),
        EthernetProtocol::Ipv6,
        &[0x60; 60],
    );
    let eth_only = ethernet(
        EthernetAddress(LOCAL_PEER_MAC),
        EthernetProtocol::Unknown(0x88cc),
        &[],
    );
    let prog = fx.dp.from_overlay_test().expect("program");
    for frame in [&arp, &v6, &eth_only] {
        let (verdict, out) = run(prog, frame);
        assert_eq!(verdict, TC_ACT_SHOT, "{} byte frame", frame.len());
        assert_eq!(&out, frame);
    }
    fx.assert_only_drops(Some(DropReason::UnsupportedL3), 3);
}

#[test]
fn malformed_inner_ipv4_is_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let mut bad_version = tunnelled(LOCAL_PEER_IP, b"x");
    bad_version[14] = 0x65;
    let mut bad_ihl = tunnelled(LOCAL_PEER_IP, b"x");
    bad_ihl[14] = 0x43;
    for frame in [&bad_version, &bad_ihl] {
        assert_eq!(fx.run_overlay(VNI_A, frame).0, TC_ACT_SHOT);
    }
    fx.assert_only_drops(Some(DropReason::Malformed), 2);
}

#[test]
fn endpoint_moved_here_is_reachable_through_the_tunnel() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let frame = tunnelled(REMOTE_PEER_IP, b"moved");
    assert_eq!(fx.run_overlay(VNI_A, &frame).0, TC_ACT_SHOT);
    fx.dp
        .upsert_endpoint(
            ip(REMOTE_PEER_IP),
            &EndpointInfo::local(VNI_A, 44, REMOTE_PEER_MAC),
        )
        .expect("endpoint now local");
    let (verdict, out, _) = fx.run_overlay(VNI_A, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, REMOTE_PEER_MAC);
}

#[test]
fn real_program_without_tunnel_metadata_drops_no_tunnel_key() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    // What from_overlay sees if it is attached to a device that is not collect-metadata.
    let frame = tunnelled(LOCAL_PEER_IP, b"x");
    let (verdict, out) = run(fx.dp.from_overlay().expect("program"), &frame);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(out, frame);
    fx.assert_only_drops(Some(DropReason::NoTunnelKey), 1);
    let events = fx.events();
    assert_eq!(events[0].hook, Hook::FromOverlay as u8);
    assert_eq!(events[0].vni, 0);
}

#[test]
fn packets_from_hosts_that_are_not_nodes_are_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let frame = tunnelled(LOCAL_PEER_IP, b"injected");
    // Right VNI, right destination, but the outer source is not a node of the cluster.
    let stranger = std::net::Ipv4Addr::new(198, 18, 0, 200);
    let (verdict, out, _) = fx.run_overlay_from(VNI_A, stranger, &frame);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(out, frame);
    fx.assert_only_drops(Some(DropReason::UnknownNode), 1);
    // Once it is a node, the same packet is delivered.
    fx.dp
        .upsert_node(stranger, &netagent_datapath::NodeInfo::default())
        .expect("node");
    assert_eq!(
        fx.run_overlay_from(VNI_A, stranger, &frame).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(fx.dp.nodes().expect("nodes").len(), 2);
    assert!(fx.dp.remove_node(stranger).expect("remove"));
    assert_eq!(fx.run_overlay_from(VNI_A, stranger, &frame).0, TC_ACT_SHOT);
}
