//! `from_container` IPv4 routing under BPF_PROG_TEST_RUN, on the two-network topology of
//! `common` (network A 10.0.0.0/24 with a local and a remote peer, network B 10.1.0.0/24).
//!
//! A test run performs no redirect: the verdict says a redirect was requested, the output
//! bytes show the rewrite, and the `from_container_test` hook shows the tunnel key and the
//! packet type the program left on the skb.

mod common;

use common::*;
use netagent_datapath::{DatapathConfig, DropReason, EndpointInfo, Hook};
use std::net::Ipv4Addr;

use smoltcp::wire::Ipv4Address;

/// -EINVAL: what bpf_skb_get_tunnel_key returns for an skb without tunnel metadata.
const NO_TUNNEL_KEY: i32 = -libc::EINVAL;
const PACKET_HOST: u8 = 0;

#[test]
fn local_peer_is_delivered_with_redirect_peer() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let frame = ipv4(LOCAL_PEER_IP, b"same node");

    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, LOCAL_PEER_MAC);

    let (verdict, out, obs) = fx.run_container_hook(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, LOCAL_PEER_MAC);
    assert_eq!(
        obs.tunnel_key_status, NO_TUNNEL_KEY,
        "no tunnel for a local peer"
    );
    // The test run classified the frame against lo's MAC (OTHERHOST); the program must mark
    // it for the receiving container or its IP stack would drop it.
    assert_eq!(obs.pkt_type, PACKET_HOST);

    fx.assert_only_drops(None, 0);
    assert!(fx.events().is_empty());
}

#[test]
fn remote_peer_gets_tunnel_key_and_goes_to_vxlan() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let frame = ipv4(REMOTE_PEER_IP, b"other node");

    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, REMOTE_PEER_MAC);

    let (verdict, out, obs) = fx.run_container_hook(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &frame, REMOTE_PEER_MAC);
    assert_eq!(obs.tunnel_key_status, 0, "a tunnel key is attached");
    assert_eq!(obs.tunnel_id, VNI_A);
    assert_eq!(
        obs.tunnel_remote,
        REMOTE_NODE.octets(),
        "outer destination = the peer's node"
    );
    assert_eq!(obs.tunnel_ttl, 64);
    assert_eq!(obs.tunnel_tos, 0);

    // Same for the other network's remote endpoint, from a sender on network B.
    fx.dp
        .upsert_endpoint(
            ip(B_LOCAL_IP),
            &EndpointInfo::local(VNI_B, TEST_RUN_IFINDEX, B_MAC),
        )
        .expect("move B's local endpoint onto the test-run interface");
    let (verdict, _, obs) = fx.run_container_hook(&ipv4_from(B_LOCAL_IP, B_REMOTE_IP, b"b"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        (obs.tunnel_id, obs.tunnel_remote),
        (VNI_B, REMOTE_NODE.octets())
    );

    fx.assert_only_drops(None, 0);
    assert!(fx.events().is_empty());
}

#[test]
fn remote_peer_without_vxlan_device_is_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    fx.dp
        .set_config(DatapathConfig {
            vxlan_ifindex: 0,
            ..config()
        })
        .expect("config without VXLAN device");
    let frame = ipv4(REMOTE_PEER_IP, b"x");
    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(out, frame);
    // Local delivery does not need the device.
    assert_eq!(fx.run(&ipv4(LOCAL_PEER_IP, b"x")).0, TC_ACT_REDIRECT);
    fx.assert_only_drops(Some(DropReason::NoTunnelDevice), 1);
    assert_eq!(fx.events().len(), 1);
}

#[test]
fn spoofed_sources_are_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let frames = [
        // An address nobody has.
        ipv4_from(Ipv4Address::new(10, 0, 0, 200), LOCAL_PEER_IP, b"1"),
        // Another local container's address, sent from this container's veth.
        ipv4_from(LOCAL_PEER_IP, CONTAINER_IP, b"2"),
        // A remote endpoint's address: remote endpoints never send through a local veth.
        ipv4_from(REMOTE_PEER_IP, LOCAL_PEER_IP, b"3"),
        // Network B's address, to reach network B "legitimately".
        ipv4_from(B_LOCAL_IP, B_REMOTE_IP, b"4"),
        // DHCP-style unspecified source.
        ipv4_from(Ipv4Address::UNSPECIFIED, Ipv4Address::BROADCAST, b"5"),
    ];
    for frame in &frames {
        let (verdict, out, obs) = fx.run_container_hook(frame);
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(&out, frame, "dropped frames are not rewritten");
        assert_eq!(obs.tunnel_key_status, NO_TUNNEL_KEY);
    }
    fx.assert_only_drops(Some(DropReason::SourceSpoofed), frames.len() as u64);
    let events = fx.events();
    assert_eq!(events.len(), frames.len());
    assert_eq!(events[1].src_ip, LOCAL_PEER_IP.octets());
    assert_eq!(events[1].dst_ip, CONTAINER_IP.octets());
    assert_eq!(events[1].hook, Hook::FromContainer as u8);
    assert_eq!(events[1].ifindex, TEST_RUN_IFINDEX);
}

#[test]
fn other_network_is_unreachable() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let frames = [
        // B's endpoint on this node (a hand-written route would get the frame this far).
        ipv4(B_LOCAL_IP, b"1"),
        // B's endpoint on another node.
        ipv4(B_REMOTE_IP, b"2"),
        // An address of B's subnet that no endpoint has.
        ipv4(Ipv4Address::new(10, 1, 0, 77), b"3"),
    ];
    for frame in &frames {
        let (verdict, out, obs) = fx.run_container_hook(frame);
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(&out, frame);
        assert_eq!(
            obs.tunnel_key_status, NO_TUNNEL_KEY,
            "nothing was tunnelled"
        );
    }
    fx.assert_only_drops(Some(DropReason::PolicyIsolation), frames.len() as u64);
    let events = fx.events();
    assert_eq!(events[0].reason, DropReason::PolicyIsolation.code());
    assert_eq!(events[0].dst_ip, B_LOCAL_IP.octets());
    assert_eq!(events[0].ip_proto, 17);
    assert_eq!(events[0].vni, 0, "vni is only reported by from_overlay");
    assert!(
        events[0]
            .to_string()
            .starts_with("reason=policy_isolation hook=from_container"),
        "{}",
        events[0]
    );
}

#[test]
fn unknown_address_in_own_subnet_is_dropped() {
    if !have_root() {
        return;
    }
    let fx = Fixture::routed();
    // A free address, the gateway (no endpoint has it in this design) and the subnet
    // broadcast: all just addresses without an endpoint.
    for dst in [
        Ipv4Address::new(10, 0, 0, 99),
        GATEWAY_IP,
        Ipv4Address::new(10, 0, 0, 255),
    ] {
        assert_eq!(fx.run(&ipv4(dst, b"?")).0, TC_ACT_SHOT, "{dst}");
    }
    fx.assert_only_drops(Some(DropReason::UnknownEndpoint), 3);
}

#[test]
fn destinations_outside_every_network_are_egress() {
    if !have_root() {
        return;
    }
    // This fixture's node has no uplink configured: egress has no way out (tests/egress.rs
    // gives it one).
    let fx = Fixture::routed();
    for dst in [
        Ipv4Address::new(8, 8, 8, 8),
        Ipv4Address::new(10, 2, 0, 1),
        Ipv4Address::new(198, 18, 0, 99),
    ] {
        assert_eq!(fx.run(&ipv4(dst, b"out")).0, TC_ACT_SHOT, "{dst}");
    }
    assert_eq!(fx.counter(DropReason::NoUplink), 3);
    // "This network" is nobody's to reach, uplink or not.
    assert_eq!(
        fx.run(&ipv4(Ipv4Address::UNSPECIFIED, b"out")).0,
        TC_ACT_SHOT
    );
    assert_eq!(fx.counter(DropReason::EgressForbidden), 1);
}

#[test]
fn broadcast_and_multicast_are_dropped() {
    if !have_root() {
        return;
    }
    let fx = Fixture::routed();
    for dst in [
        Ipv4Address::BROADCAST,
        Ipv4Address::new(224, 0, 0, 251),
        Ipv4Address::new(239, 255, 255, 250),
    ] {
        assert_eq!(fx.run(&ipv4(dst, b"all")).0, TC_ACT_SHOT, "{dst}");
    }
    fx.assert_only_drops(Some(DropReason::BroadcastMulticast), 3);
}

#[test]
fn routing_waits_for_the_config() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    {
        let map = fx
            .dp
            .ebpf_mut()
            .map_mut(netagent_datapath::map_names::CONFIG)
            .expect("CONFIG map");
        let mut config: aya::maps::HashMap<_, u32, netagent_datapath::Config> =
            aya::maps::HashMap::try_from(map).expect("hash map");
        config
            .insert(0, netagent_datapath::Config::default(), 0)
            .expect("write config");
    }
    // Without a router MAC there is nothing to put in the rewritten frame.
    assert_eq!(fx.run(&ipv4(LOCAL_PEER_IP, b"x")).0, TC_ACT_SHOT);
    assert_eq!(fx.run(&ipv4(REMOTE_PEER_IP, b"x")).0, TC_ACT_SHOT);
    fx.assert_only_drops(Some(DropReason::NotReady), 2);
}

#[test]
fn odd_but_valid_ipv4_is_routed_untouched() {
    if !have_root() {
        return;
    }
    let fx = Fixture::routed();

    // Padded to the Ethernet minimum, as after a real NIC: padding is kept.
    let mut padded = ipv4(LOCAL_PEER_IP, b"");
    padded.resize(60, 0);
    // IHL 6: one 4-byte option (NOP NOP NOP EOL) between header and payload. The program
    // only reads the fixed header, so it must not care.
    let mut with_options = ipv4(LOCAL_PEER_IP, b"payload!");
    with_options[14] = 0x46;
    with_options.splice(34..34, [1u8, 1, 1, 0]);
    // A header claiming more data than the frame has (truncated L4): routing is by address,
    // the receiving stack validates lengths.
    let mut short_payload = ipv4(REMOTE_PEER_IP, &[0u8; 8]);
    short_payload[16..18].copy_from_slice(&1400u16.to_be_bytes());

    for (frame, mac) in [
        (&padded, LOCAL_PEER_MAC),
        (&with_options, LOCAL_PEER_MAC),
        (&short_payload, REMOTE_PEER_MAC),
    ] {
        let (verdict, out) = fx.run(frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{} bytes", frame.len());
        assert_readdressed(&out, frame, mac);
    }
    fx.assert_only_drops(None, 0);
}

#[test]
fn malformed_ipv4_is_dropped_before_any_lookup() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let good = ipv4(LOCAL_PEER_IP, b"x");
    let mut v5 = good.clone();
    v5[14] = 0x55;
    let mut ihl0 = good.clone();
    ihl0[14] = 0x40;
    for frame in [&v5, &ihl0] {
        let (verdict, out) = fx.run(frame);
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(&out, frame);
    }
    fx.assert_only_drops(Some(DropReason::Malformed), 2);
    assert_eq!(fx.events().len(), 2);
}

#[test]
fn endpoint_changes_take_effect_on_the_next_packet() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    let frame = ipv4(LOCAL_PEER_IP, b"move");
    assert_eq!(fx.run(&frame).0, TC_ACT_REDIRECT);

    // The peer moves to another node (same address, same MAC): now tunnelled.
    fx.dp
        .upsert_endpoint(
            ip(LOCAL_PEER_IP),
            &EndpointInfo::remote(VNI_A, Ipv4Addr::new(198, 18, 0, 13), LOCAL_PEER_MAC),
        )
        .expect("update");
    let (verdict, _, obs) = fx.run_container_hook(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(obs.tunnel_remote, [198, 18, 0, 13]);

    // The peer is removed: its address is now an unknown one of the subnet.
    assert!(fx.dp.remove_endpoint(ip(LOCAL_PEER_IP)).expect("remove"));
    assert_eq!(fx.run(&frame).0, TC_ACT_SHOT);
    // The network is removed too: the address is an outside one, egress (which has no uplink
    // in this fixture).
    assert!(fx.dp.remove_network(SUBNET_A).expect("remove"));
    assert_eq!(fx.run(&frame).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::UnknownEndpoint), 1);
    assert_eq!(fx.counter(DropReason::NoUplink), 1);

    // And the sender itself removed: its packets are spoofed from now on.
    assert!(fx.dp.remove_endpoint(ip(CONTAINER_IP)).expect("remove"));
    assert_eq!(fx.run(&ipv4(REMOTE_PEER_IP, b"x")).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::SourceSpoofed), 1);
}
