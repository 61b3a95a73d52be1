//! Encrypted networks under BPF_PROG_TEST_RUN: their traffic leaves only towards a node's
//! tunnel address (never in clear), and is delivered only when it came out of the tunnel.

mod common;

use std::net::Ipv4Addr;

use common::*;
use netagent_datapath::{
    DropReason, ENDPOINT_F_ENCRYPTED, EndpointInfo, NODE_F_TUNNEL_ADDR, NodeInfo, TunnelConfig,
};
use smoltcp::wire::Ipv4Address;

/// REMOTE_NODE's address on the tunnel devices.
const REMOTE_TUNNEL: Ipv4Addr = Ipv4Addr::new(169, 254, 128, 12);
const ENC_IFINDEX: u32 = 98;

fn encrypted(mut info: EndpointInfo) -> EndpointInfo {
    info.flags |= ENDPOINT_F_ENCRYPTED;
    info
}

/// The routed topology with network A encrypted and a tunnel to REMOTE_NODE.
fn fixture(tunnel_to_remote: bool) -> Fixture {
    let mut fx = Fixture::with_services();
    for (addr, info) in [
        (
            CONTAINER_IP,
            EndpointInfo::local(VNI_A, TEST_RUN_IFINDEX, CONTAINER_MAC),
        ),
        (
            LOCAL_PEER_IP,
            EndpointInfo::local(VNI_A, LOCAL_PEER_IFINDEX, LOCAL_PEER_MAC),
        ),
        (
            REMOTE_PEER_IP,
            EndpointInfo::remote(VNI_A, REMOTE_NODE, REMOTE_PEER_MAC),
        ),
    ] {
        fx.dp
            .upsert_endpoint(ip(addr), &encrypted(info))
            .expect("encrypted endpoint");
    }
    fx.dp
        .set_tunnel_config(TunnelConfig {
            vxlan_enc_ifindex: ENC_IFINDEX,
            wireguard_port: 51820,
        })
        .expect("tunnel config");
    if tunnel_to_remote {
        fx.dp
            .upsert_node(
                REMOTE_NODE,
                &NodeInfo {
                    flags: 0,
                    tunnel_ip: REMOTE_TUNNEL.octets(),
                },
            )
            .expect("node");
        fx.dp
            .upsert_node(
                REMOTE_TUNNEL,
                &NodeInfo {
                    flags: NODE_F_TUNNEL_ADDR,
                    tunnel_ip: REMOTE_TUNNEL.octets(),
                },
            )
            .expect("tunnel address");
    }
    fx
}

#[test]
fn encrypted_traffic_goes_to_the_tunnel_address_or_nowhere() {
    if !have_root() {
        return;
    }
    let frame = ipv4_from(CONTAINER_IP, REMOTE_PEER_IP, b"secret");
    let mut fx = fixture(true);
    let (verdict, _, obs) = fx.run_container_hook(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(obs.tunnel_key_status, 0);
    assert_eq!(obs.tunnel_id, VNI_A);
    assert_eq!(
        obs.tunnel_remote,
        REMOTE_TUNNEL.octets(),
        "to the tunnel, not the node"
    );
    // Network B (plain) still goes to the node's own address.
    fx.dp
        .upsert_endpoint(
            ip(CONTAINER_IP),
            &EndpointInfo::local(VNI_A, 46, CONTAINER_MAC),
        )
        .expect("move");
    fx.dp
        .upsert_endpoint(
            ip(B_LOCAL_IP),
            &EndpointInfo::local(VNI_B, TEST_RUN_IFINDEX, B_MAC),
        )
        .expect("sender on B");
    let (verdict, _, obs) = fx.run_container_hook(&ipv4_from(B_LOCAL_IP, B_REMOTE_IP, b"plain"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(obs.tunnel_remote, REMOTE_NODE.octets());

    // No tunnel address for the node (no key yet): dropped, not sent in clear.
    let fx = fixture(false);
    let (verdict, out, _) = fx.run_container_hook(&frame);
    assert_eq!((verdict, out), (TC_ACT_SHOT, frame.clone()));
    fx.assert_only_drops(Some(DropReason::NoTunnel), 1);
    // No tunnel device on this node: the same.
    let mut fx = fixture(true);
    fx.dp
        .set_tunnel_config(TunnelConfig::default())
        .expect("no tunnel");
    assert_eq!(fx.run_container_hook(&frame).0, TC_ACT_SHOT);
    fx.assert_only_drops(Some(DropReason::NoTunnel), 1);
}

#[test]
fn an_encrypted_network_is_delivered_only_out_of_the_tunnel() {
    if !have_root() {
        return;
    }
    let mut fx = fixture(true);
    let mut frame = ipv4_from(Ipv4Address::new(10, 0, 0, 4), LOCAL_PEER_IP, b"x");
    frame[0..6].copy_from_slice(&LOCAL_PEER_MAC);
    // In clear from the node's real address: refused.
    fx.dp
        .set_test_tunnel_via(VNI_A, REMOTE_NODE, false)
        .expect("input");
    let prog = fx.dp.from_overlay_test().expect("program");
    assert_eq!(run(prog, &frame).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::Unencrypted), 1);
    // Out of the tunnel from the node's tunnel address: delivered.
    fx.dp
        .set_test_tunnel_via(VNI_A, REMOTE_TUNNEL, true)
        .expect("input");
    let prog = fx.dp.from_overlay_test().expect("program");
    let (verdict, out) = run(prog, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, LOCAL_PEER_MAC);
    // On the tunnel's device, an advertise address as source is no node of the tunnel.
    fx.dp
        .set_test_tunnel_via(VNI_A, REMOTE_NODE, true)
        .expect("input");
    let prog = fx.dp.from_overlay_test().expect("program");
    assert_eq!(run(prog, &frame).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::UnknownNode), 1);
    // A plain network's packet out of the tunnel is not where it belongs either.
    let mut plain = ipv4_from(Ipv4Address::new(10, 1, 0, 9), B_LOCAL_IP, b"y");
    plain[0..6].copy_from_slice(&B_MAC);
    fx.dp
        .set_test_tunnel_via(VNI_B, REMOTE_TUNNEL, true)
        .expect("input");
    let prog = fx.dp.from_overlay_test().expect("program");
    assert_eq!(run(prog, &plain).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::WrongVni), 1);
}

#[test]
fn only_nodes_may_send_to_the_wireguard_port() {
    if !have_root() {
        return;
    }
    let fx = fixture(true);
    let stranger = Ipv4Address::new(198, 18, 0, 200);
    let node_ip = ip4(NODE_IP);
    let handshake = udp_frame(stranger, 51820, node_ip, 51820, &[1u8; 148]);
    assert_eq!(fx.run_uplink(&handshake).0, TC_ACT_SHOT);
    let from_node = udp_frame(ip4(REMOTE_NODE), 51820, node_ip, 51820, &[1u8; 148]);
    assert_eq!(fx.run_uplink(&from_node).0, TC_ACT_OK);
    fx.assert_only_drops(Some(DropReason::UnknownNode), 1);
}

fn ip4(a: Ipv4Addr) -> Ipv4Address {
    Ipv4Address::from_octets(a.octets())
}

#[test]
fn encrypted_traffic_is_never_encapsulated_for_the_uplink() {
    if !have_root() {
        return;
    }
    // The fixture knows the node's address and uplink: plain traffic would be put in VXLAN
    // by the program and sent out of the uplink (tests/vxlan.rs).
    let fx = fixture(true);
    let frame = tcp_frame(CONTAINER_IP, 40000, REMOTE_PEER_IP, 80, TcpFlags::Syn, b"");
    // Not in clear VXLAN: to the tunnel's device, with its metadata.
    let (out, obs) = run_for_the_device(&fx, &frame);
    assert_eq!(obs.tunnel_remote, REMOTE_TUNNEL.octets());
    assert_readdressed(&out, &frame, REMOTE_PEER_MAC);
}
