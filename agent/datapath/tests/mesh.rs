//! The ingress routing mesh (path 4) under BPF_PROG_TEST_RUN, on each node it involves:
//!
//! - the ingress node's `from_uplink`: node_ip:published -> backend:target, client address
//!   kept; everything else passes untouched;
//! - the backend's node: `from_overlay` records the ingress node, `from_container` tunnels
//!   the replies back to it;
//! - the ingress node again: the replies get node_ip:published back as source and leave
//!   through the uplink (`from_overlay` for a remote backend, `from_container` for a local
//!   one).
//!
//! Test runs perform no redirect, so where a packet goes is seen in the verdict, the tunnel
//! key (hooks) and the rewritten bytes; tests/kernel_paths.rs sends real traffic.

mod common;

use std::net::Ipv4Addr;

use common::*;
use netagent_datapath::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKind, DropReason, Hook, L4Proto, LbConfig, MESH_INNER_SRC_MAC,
    NodeInfo, PublishedInfo,
};
use smoltcp::wire::{EthernetProtocol, IpProtocol, Ipv4Address};

const TCP: u8 = 6;
const UDP: u8 = 17;
const PACKET_HOST: u8 = 0;
const NODE: Ipv4Address = Ipv4Address::new(198, 18, 0, 1);
/// The node a routing-mesh connection came in through, as seen by the backend's node.
const INGRESS_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);

/// `with_services` plus 8080/tcp -> 80 and 5353/udp -> 53 published over the same set.
fn published() -> Fixture {
    let mut fx = Fixture::with_services();
    fx.dp
        .upsert_published(8080, L4Proto::Tcp, &PublishedInfo::new(SVC_ID, 80))
        .expect("publish tcp");
    fx.dp
        .upsert_published(5353, L4Proto::Udp, &PublishedInfo::new(SVC_ID, 53))
        .expect("publish udp");
    fx.dp
        .upsert_node(INGRESS_NODE, &NodeInfo::default())
        .expect("ingress node");
    fx
}

fn client_syn(sport: u16) -> Vec<u8> {
    tcp_frame(OUTSIDE_CLIENT, sport, NODE, 8080, TcpFlags::Syn, b"")
}

#[test]
fn a_published_port_is_balanced_keeping_the_client_address() {
    if !have_root() {
        return;
    }
    let mut fx = published();
    let order = [LOCAL_PEER_IP, REMOTE_PEER_IP, B3_IP];
    for (i, backend) in order.iter().enumerate() {
        let sport = 50000 + i as u16;
        let frame = client_syn(sport);
        let (verdict, out, obs) = fx.run_uplink(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let after = parse_checked(&out);
        assert_eq!((after.src, after.sport), (OUTSIDE_CLIENT, sport), "no SNAT");
        assert_eq!(
            (after.dst, after.dport),
            (*backend, 80),
            "DNAT to backend:target"
        );
        if *backend == REMOTE_PEER_IP {
            assert_eq!(after.dst_mac, REMOTE_PEER_MAC);
            // Marked for the backend's node: "an outside client, note the ingress node".
            assert_eq!(after.src_mac, MESH_INNER_SRC_MAC);
            assert_eq!(obs.tunnel_key_status, 0);
            assert_eq!(
                (obs.tunnel_id, obs.tunnel_remote),
                (VNI_A, REMOTE_NODE.octets())
            );
        } else {
            assert_eq!(after.src_mac, ROUTER_MAC);
            assert_ne!(obs.tunnel_key_status, 0, "local delivery, no tunnel");
            assert_eq!(obs.pkt_type, PACKET_HOST);
        }

        let fwd = fx.ct_entry(&ct_key(
            OUTSIDE_CLIENT,
            sport,
            NODE,
            8080,
            TCP,
            CT_DIR_ORIGINAL,
        ));
        let fwd = assert_ct(fwd, CtKind::MeshForward, *backend, 80);
        assert_eq!((fwd.vni, fwd.service_id), (VNI_A, SVC_ID));
        let rev = fx.ct_entry(&ct_key(
            *backend,
            80,
            OUTSIDE_CLIENT,
            sport,
            TCP,
            CT_DIR_REPLY,
        ));
        assert_ct(rev, CtKind::MeshReverse, NODE, 8080);
    }
    // Established: later segments keep their backend.
    let data = tcp_frame(OUTSIDE_CLIENT, 50001, NODE, 8080, TcpFlags::Psh, b"GET /");
    let (_, out, _) = fx.run_uplink(&data);
    let after = parse_checked(&out);
    assert_eq!((after.dst, after.dport), (REMOTE_PEER_IP, 80));
    assert_eq!(after.payload, b"GET /");
    // VIP and published port share the set's rotation.
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(3));

    // UDP.
    let query = udp_frame(OUTSIDE_CLIENT, 40000, NODE, 5353, b"q");
    let (verdict, out, _) = fx.run_uplink(&query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let after = parse_checked(&out);
    assert_eq!(
        (after.src, after.dst, after.dport),
        (OUTSIDE_CLIENT, LOCAL_PEER_IP, 53)
    );
    let fwd = fx.ct_entry(&ct_key(
        OUTSIDE_CLIENT,
        40000,
        NODE,
        5353,
        UDP,
        CT_DIR_ORIGINAL,
    ));
    assert_ct(fwd, CtKind::MeshForward, LOCAL_PEER_IP, 53);
    fx.assert_only_drops(None, 0);
    assert!(fx.events().is_empty());
}

#[test]
fn everything_else_on_the_uplink_passes_untouched() {
    if !have_root() {
        return;
    }
    let mut fx = published();
    let other_host = Ipv4Address::new(198, 18, 0, 99);
    let mut bad_version = client_syn(50000);
    bad_version[14] = 0x65;
    let mut later_fragment = udp_frame(OUTSIDE_CLIENT, 40000, NODE, 5353, b"tail");
    later_fragment[20..22].copy_from_slice(&100u16.to_be_bytes());
    let passing = [
        // The node's own services: a port nobody published.
        tcp_frame(OUTSIDE_CLIENT, 50000, NODE, 22, TcpFlags::Syn, b""),
        // A published port number, but for the other protocol.
        udp_frame(OUTSIDE_CLIENT, 50000, NODE, 8080, b"x"),
        // The VXLAN underlay.
        udp_frame(ip4(REMOTE_NODE), 41000, NODE, 4789, &[0u8; 50]),
        // A published port on an address that is not the node's.
        tcp_frame(OUTSIDE_CLIENT, 50000, other_host, 8080, TcpFlags::Syn, b""),
        // Not TCP/UDP, not IPv4, not parseable, no ports.
        ipv4_raw(
            OUTSIDE_CLIENT,
            NODE,
            IpProtocol::Icmp,
            &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
        ),
        arp_request(ip4(NODE_IP)),
        ethernet(BROADCAST, EthernetProtocol::Ipv6, &[0x60; 60]),
        bad_version,
        later_fragment,
    ];
    for frame in &passing {
        let (verdict, out, _) = fx.run_uplink(frame);
        assert_eq!(verdict, TC_ACT_OK, "{:02x?}", &frame[..40.min(frame.len())]);
        assert_eq!(&out, frame, "passed untouched");
    }
    // The real program too, and with the mesh turned off a published port passes as well.
    let prog = fx.dp.from_uplink().expect("program");
    assert_eq!(run(prog, &passing[0]).0, TC_ACT_OK);
    fx.dp
        .set_lb_config(LbConfig {
            node_ip: None,
            ..fx.dp.lb_config().expect("lb config")
        })
        .expect("mesh off");
    let syn = client_syn(50000);
    let (verdict, out, _) = fx.run_uplink(&syn);
    assert_eq!((verdict, out), (TC_ACT_OK, syn));
    fx.assert_only_drops(None, 0);
    assert!(fx.ct().is_empty());
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(0));
    assert!(fx.events().is_empty());
}

#[test]
fn published_ports_without_backends_or_with_fragments_are_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = published();
    // A first fragment to a published port.
    let mut first = udp_frame(OUTSIDE_CLIENT, 40000, NODE, 5353, b"head");
    first[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    smoltcp::wire::Ipv4Packet::new_unchecked(&mut first[14..]).fill_checksum();
    let (verdict, out, _) = fx.run_uplink(&first);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(out, first);
    // No backends.
    fx.dp.set_backends(SVC_ID, &[]).expect("empty");
    assert_eq!(fx.run_uplink(&client_syn(50000)).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::Fragmented), 1);
    assert_eq!(fx.counter(DropReason::NoBackend), 1);
    let events = fx.events();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.hook == Hook::FromUplink as u8));
    assert_eq!(events[1].src_ip, OUTSIDE_CLIENT.octets());
}

#[test]
fn the_backends_node_sends_replies_back_through_the_ingress_node() {
    if !have_root() {
        return;
    }
    let mut fx = published();
    // What the ingress node tunnelled here: client -> backend:target, client address kept,
    // marked as routing-mesh traffic by the inner source MAC.
    let mut inbound_eth = tcp_frame(OUTSIDE_CLIENT, 50000, LOCAL_PEER_IP, 80, TcpFlags::Syn, b"");
    inbound_eth[0..6].copy_from_slice(&LOCAL_PEER_MAC);
    inbound_eth[6..12].copy_from_slice(&MESH_INNER_SRC_MAC);
    for _ in 0..2 {
        let (verdict, out, _) = fx.run_overlay_from(VNI_A, INGRESS_NODE, &inbound_eth);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_readdressed(&out, &inbound_eth, LOCAL_PEER_MAC);
    }
    let key = ct_key(LOCAL_PEER_IP, 80, OUTSIDE_CLIENT, 50000, TCP, CT_DIR_REPLY);
    let entry = fx.ct_entry(&key).expect("return entry");
    assert_eq!(CtKind::from_code(entry.kind), Some(CtKind::MeshReturn));
    assert_eq!((entry.tunnel_addr(), entry.vni), (INGRESS_NODE, VNI_A));
    assert_eq!(fx.ct().len(), 1, "one entry, refreshed, not duplicated");

    // The backend replies (to an address outside every overlay network): back into the
    // tunnel to the ingress node, unchanged.
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let reply = tcp_frame(
        LOCAL_PEER_IP,
        80,
        OUTSIDE_CLIENT,
        50000,
        TcpFlags::SynAck,
        b"",
    );
    let (verdict, out, obs) = fx.run_container_hook(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, reply, "no NAT on the backend's node");
    assert_eq!(obs.tunnel_key_status, 0);
    assert_eq!(
        (obs.tunnel_id, obs.tunnel_remote),
        (VNI_A, INGRESS_NODE.octets())
    );

    // A packet to an outside address that is no such reply is the container's own egress:
    // mid-connection without a flow, it is answered with a reset (and counted).
    let other = tcp_frame(
        LOCAL_PEER_IP,
        80,
        OUTSIDE_CLIENT,
        50001,
        TcpFlags::SynAck,
        b"",
    );
    let (verdict, out, _) = fx.run_container_hook(&other);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_ne!(out, other, "a reset, not the packet");
    fx.assert_only_drops(Some(DropReason::NoConntrack), 1);

    // Overlay traffic (router MAC as inner source) is not a routing-mesh client's: no return
    // entry, whatever its source address.
    for src in [REMOTE_PEER_IP, Ipv4Address::new(198, 51, 100, 8)] {
        let mut frame = tcp_frame(src, 1234, B3_IP, 80, TcpFlags::Syn, b"");
        frame[6..12].copy_from_slice(&ROUTER_MAC);
        let (verdict, _, _) = fx.run_overlay_from(VNI_A, REMOTE_NODE, &frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
    }
    assert_eq!(fx.ct().len(), 1);
}

#[test]
fn the_ingress_node_restores_the_published_address_on_replies() {
    if !have_root() {
        return;
    }
    let mut fx = published();
    // Remote backend: the reply comes back through the tunnel.
    fx.dp
        .set_backends(SVC_ID, &[ip(REMOTE_PEER_IP)])
        .expect("set");
    let (verdict, _, _) = fx.run_uplink(&client_syn(50001));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let reply = tcp_frame(
        REMOTE_PEER_IP,
        80,
        OUTSIDE_CLIENT,
        50001,
        TcpFlags::SynAck,
        b"hi",
    );
    let (verdict, out, _) = fx.run_overlay_from(VNI_A, REMOTE_NODE, &reply);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "out of the uplink (redirect_neigh)"
    );
    let after = parse_checked(&out);
    assert_eq!(
        (after.src, after.sport),
        (NODE, 8080),
        "published address restored"
    );
    assert_eq!((after.dst, after.dport), (OUTSIDE_CLIENT, 50001));
    assert_eq!(after.payload, b"hi");
    // The same reply with another network's VNI is refused.
    let (verdict, _, _) = fx.run_overlay_from(VNI_B, REMOTE_NODE, &reply);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::WrongVni), 1);

    // Local backend: the reply comes through from_container on the backend's veth.
    fx.dp
        .set_backends(SVC_ID, &[ip(LOCAL_PEER_IP)])
        .expect("set");
    let (_, out, _) = fx.run_uplink(&client_syn(50002));
    assert_eq!(parse_checked(&out).dst, LOCAL_PEER_IP);
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let reply = tcp_frame(
        LOCAL_PEER_IP,
        80,
        OUTSIDE_CLIENT,
        50002,
        TcpFlags::SynAck,
        b"",
    );
    let (verdict, out) = fx.run(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let after = parse_checked(&out);
    assert_eq!((after.src, after.sport), (NODE, 8080));
    assert_eq!((after.dst, after.dport), (OUTSIDE_CLIENT, 50002));

    // Without an uplink ifindex such replies cannot leave.
    fx.dp
        .set_lb_config(LbConfig {
            uplink_ifindex: 0,
            ..fx.dp.lb_config().expect("lb config")
        })
        .expect("no uplink");
    assert_eq!(fx.run(&reply).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::NoUplink), 1);
    // A reply through the tunnel that belongs to no connection is still unknown.
    let stray = tcp_frame(
        REMOTE_PEER_IP,
        80,
        OUTSIDE_CLIENT,
        59999,
        TcpFlags::Ack,
        b"",
    );
    assert_eq!(
        fx.run_overlay_from(VNI_A, REMOTE_NODE, &stray).0,
        TC_ACT_SHOT
    );
    assert_eq!(fx.counter(DropReason::UnknownEndpoint), 1);
}

fn ip4(addr: Ipv4Addr) -> Ipv4Address {
    Ipv4Address::from_octets(addr.octets())
}

#[test]
fn vxlan_from_hosts_that_are_not_nodes_is_dropped_on_the_uplink() {
    if !have_root() {
        return;
    }
    let mut fx = published();
    let stranger = Ipv4Address::new(198, 18, 0, 200);
    let vxlan = udp_frame(stranger, 41000, NODE, 4789, &[0u8; 50]);
    let (verdict, _, _) = fx.run_uplink(&vxlan);
    assert_eq!(verdict, TC_ACT_SHOT);
    // The same from a node passes to the VXLAN socket.
    let from_node = udp_frame(ip4(INGRESS_NODE), 41000, NODE, 4789, &[0u8; 50]);
    assert_eq!(fx.run_uplink(&from_node).0, TC_ACT_OK);
    fx.assert_only_drops(Some(DropReason::UnknownNode), 1);
    assert_eq!(fx.events()[0].src_ip, stranger.octets());
}

#[test]
fn outside_packets_with_an_overlay_source_are_dropped() {
    if !have_root() {
        return;
    }
    let fx = published();
    // Claims to come from a container of network A, to a published port and to anything else.
    for frame in [
        tcp_frame(CONTAINER_IP, 50000, NODE, 8080, TcpFlags::Syn, b""),
        tcp_frame(REMOTE_PEER_IP, 50000, NODE, 22, TcpFlags::Syn, b""),
        udp_frame(B_LOCAL_IP, 53, NODE, 53, b"q"),
    ] {
        assert_eq!(fx.run_uplink(&frame).0, TC_ACT_SHOT);
    }
    fx.assert_only_drops(Some(DropReason::OverlaySourceOutside), 3);
    assert!(fx.ct().is_empty(), "nothing was balanced");
}

#[test]
fn a_tuple_live_through_one_node_is_not_taken_over_through_another() {
    if !have_root() {
        return;
    }
    let mut fx = published();
    let marked = |flags: TcpFlags| {
        let mut f = tcp_frame(OUTSIDE_CLIENT, 50000, LOCAL_PEER_IP, 80, flags, b"");
        f[0..6].copy_from_slice(&LOCAL_PEER_MAC);
        f[6..12].copy_from_slice(&MESH_INNER_SRC_MAC);
        f
    };
    let key = ct_key(LOCAL_PEER_IP, 80, OUTSIDE_CLIENT, 50000, TCP, CT_DIR_REPLY);
    // Established through INGRESS_NODE (SYN, then the handshake's ACK).
    for flags in [TcpFlags::Syn, TcpFlags::Ack] {
        let (verdict, _, _) = fx.run_overlay_from(VNI_A, INGRESS_NODE, &marked(flags));
        assert_eq!(verdict, TC_ACT_REDIRECT);
    }
    let tables = fx.dp.conntrack_tables().expect("tables");
    assert_eq!(tables.len(), 1);
    assert!(tables[0].2, "promoted to the established table");
    // The same tuple through another node: refused, the first connection keeps its route.
    for flags in [TcpFlags::Syn, TcpFlags::Ack] {
        let (verdict, _, _) = fx.run_overlay_from(VNI_A, REMOTE_NODE, &marked(flags));
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    let entry = fx.ct_entry(&key).expect("return entry");
    assert_eq!(entry.tunnel_addr(), INGRESS_NODE);
    fx.assert_only_drops(Some(DropReason::MeshTupleConflict), 2);
    // Once the first connection closes, the tuple may be reused through the other node.
    let (verdict, _, _) = fx.run_overlay_from(VNI_A, INGRESS_NODE, &marked(TcpFlags::Fin));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, _, _) = fx.run_overlay_from(VNI_A, REMOTE_NODE, &marked(TcpFlags::Syn));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(fx.ct_entry(&key).expect("entry").tunnel_addr(), REMOTE_NODE);
}

/// A client reuses its port towards another node while the backend's node still remembers
/// the ended connection that came through the first one (a client closing first keeps no
/// TIME_WAIT, so the kernel hands the port out again at once). The new connection through
/// this node's own published port takes the tuple; a live one through another node keeps it.
#[test]
fn a_local_ingress_takes_a_tuple_only_once_its_mesh_connection_ended() {
    if !have_root() {
        return;
    }
    let mut fx = published();
    fx.dp
        .set_backends(SVC_ID, &[ip(LOCAL_PEER_IP)])
        .expect("set");
    let marked = |sport: u16, flags: TcpFlags| {
        let mut f = tcp_frame(OUTSIDE_CLIENT, sport, LOCAL_PEER_IP, 80, flags, b"");
        f[0..6].copy_from_slice(&LOCAL_PEER_MAC);
        f[6..12].copy_from_slice(&MESH_INNER_SRC_MAC);
        f
    };
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    // Port 50010: through INGRESS_NODE, established and still open.
    for flags in [TcpFlags::Syn, TcpFlags::Ack] {
        let (verdict, _, _) = fx.run_overlay_from(VNI_A, INGRESS_NODE, &marked(50010, flags));
        assert_eq!(verdict, TC_ACT_REDIRECT);
    }
    // The same client port through this node: refused while that connection lives.
    let (verdict, _, _) = fx.run_uplink(&client_syn(50010));
    assert_eq!(verdict, TC_ACT_SHOT);
    fx.assert_only_drops(Some(DropReason::MeshTupleConflict), 1);
    let key = ct_key(LOCAL_PEER_IP, 80, OUTSIDE_CLIENT, 50010, TCP, CT_DIR_REPLY);
    assert_eq!(
        fx.ct_entry(&key).expect("kept").tunnel_addr(),
        INGRESS_NODE,
        "the open connection keeps its return route"
    );
    // Once the client has closed it (FIN through INGRESS_NODE), the tuple is free: the new
    // connection's replies leave here with the published address, not through the tunnel.
    let (verdict, _, _) = fx.run_overlay_from(VNI_A, INGRESS_NODE, &marked(50010, TcpFlags::Fin));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, out, _) = fx.run_uplink(&client_syn(50010));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(parse_checked(&out).dst, LOCAL_PEER_IP);
    let rev = fx.ct_entry(&key).expect("reverse entry");
    assert_ct(Some(rev), CtKind::MeshReverse, NODE, 8080);
    let reply = tcp_frame(
        LOCAL_PEER_IP,
        80,
        OUTSIDE_CLIENT,
        50010,
        TcpFlags::SynAck,
        b"",
    );
    let (verdict, out, obs) = fx.run_container_hook(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_ne!(obs.tunnel_key_status, 0, "not into the tunnel");
    let after = parse_checked(&out);
    assert_eq!((after.src, after.sport), (NODE, 8080));

    // The other way round: a connection through this node's port, then the same tuple
    // arriving through another node's mesh, is refused while open.
    let (verdict, _, _) = fx.run_uplink(&client_syn(50020));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, _, _) = fx.run_overlay_from(VNI_A, INGRESS_NODE, &marked(50020, TcpFlags::Syn));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::MeshTupleConflict), 2);
}
