//! Egress (path 6) under BPF_PROG_TEST_RUN: containers reaching outside addresses leave with
//! the node's address and an allocated port (`from_container`), replies and ICMP errors about
//! translated packets come back to the container (`from_uplink`). tests/kernel_paths.rs and
//! the e2e tests send real traffic.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::*;
use netagent_datapath::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKind, DropReason, ENDPOINT_F_INTERNAL, EndpointInfo, L4Proto,
    PublishedInfo,
};
use smoltcp::wire::{EthernetFrame, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Address, Ipv4Packet};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const NODE: Ipv4Address = Ipv4Address::new(198, 18, 0, 1);
const SERVER: Ipv4Address = Ipv4Address::new(203, 0, 113, 10);
const ROUTER: Ipv4Address = Ipv4Address::new(198, 18, 0, 254);

fn fixture() -> Fixture {
    let mut fx = Fixture::with_services();
    fx.dp
        .upsert_published(8080, L4Proto::Tcp, &PublishedInfo::new(SVC_ID, 80))
        .expect("publish");
    fx
}

fn syn_out(sport: u16) -> Vec<u8> {
    tcp_frame(CONTAINER_IP, sport, SERVER, 80, TcpFlags::Syn, b"")
}

/// The port the flow from `sport` to SERVER:80 left with.
fn nat_port_of(fx: &Fixture, sport: u16) -> u16 {
    let key = ct_key(CONTAINER_IP, sport, SERVER, 80, TCP, CT_DIR_ORIGINAL);
    fx.ct_entry(&key).expect("egress forward entry").nat_port()
}

#[test]
fn tcp_leaves_with_the_node_address_and_its_replies_come_back() {
    if !have_root() {
        return;
    }
    let fx = fixture();
    let (verdict, out) = fx.run(&syn_out(40000));
    assert_eq!(verdict, TC_ACT_REDIRECT, "out of the uplink");
    let after = parse_checked(&out);
    assert_eq!((after.src, after.dst, after.dport), (NODE, SERVER, 80));
    assert_eq!(after.sport, 40000, "the container's own port, free here");
    let port = after.sport;
    let fwd = fx.ct_entry(&ct_key(
        CONTAINER_IP,
        40000,
        SERVER,
        80,
        TCP,
        CT_DIR_ORIGINAL,
    ));
    assert_ct(fwd, CtKind::EgressForward, NODE, port);
    let rev = fx.ct_entry(&ct_key(SERVER, 80, NODE, port, TCP, CT_DIR_REPLY));
    assert_ct(rev, CtKind::EgressReverse, CONTAINER_IP, 40000);
    // The retransmitted SYN keeps its port.
    let (_, again) = fx.run(&syn_out(40000));
    assert_eq!(parse_checked(&again).sport, port);

    // The server's answer is delivered into the container as the container knows the flow.
    let synack = tcp_frame(SERVER, 80, NODE, port, TcpFlags::SynAck, b"hello");
    let (verdict, out, _) = fx.run_uplink(&synack);
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the container");
    let back = parse_checked(&out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (SERVER, 80, CONTAINER_IP, 40000)
    );
    assert_eq!(back.dst_mac, CONTAINER_MAC);
    assert_eq!(back.payload, b"hello");
    // The handshake's ACK establishes the flow.
    let ack = tcp_frame(CONTAINER_IP, 40000, SERVER, 80, TcpFlags::Ack, b"");
    let (verdict, _) = fx.run(&ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let tables = fx.dp.conntrack_tables().expect("tables");
    assert!(
        tables.iter().filter(|(_, _, live)| *live).count() == 2,
        "both entries promoted"
    );
    // A reply to a port nobody was given is the node's own business.
    let stray = tcp_frame(SERVER, 80, NODE, 40001, TcpFlags::Ack, b"");
    assert_eq!(fx.run_uplink(&stray).0, TC_ACT_OK);
    fx.assert_only_drops(None, 0);
}

#[test]
fn many_flows_to_one_server_port_never_share_a_port() {
    if !have_root() {
        return;
    }
    let mut fx = fixture();
    let mut ports = BTreeSet::new();
    for sport in 30000..30200 {
        let (verdict, out) = fx.run(&syn_out(sport));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        ports.insert(parse_checked(&out).sport);
    }
    // Another container with the same source port towards the same server.
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let frame = tcp_frame(LOCAL_PEER_IP, 30000, SERVER, 80, TcpFlags::Syn, b"");
    let (_, out) = fx.run(&frame);
    ports.insert(parse_checked(&out).sport);
    assert_eq!(ports.len(), 201, "every flow has a port of its own");
}

#[test]
fn a_full_port_range_says_so_and_reuses_nothing_live() {
    if !have_root() {
        return;
    }
    let mut fx = fixture();
    fx.dp.set_egress_ports(62000, 62001).expect("two ports");
    // This container's flows keep their ports...
    for sport in [1000, 1001, 1002] {
        assert_eq!(fx.run(&syn_out(sport)).0, TC_ACT_REDIRECT);
        assert_eq!(nat_port_of(&fx, sport), sport);
    }
    // ...so another container's flows from the same ports need the range: two ports.
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let peer_syn = |sport| tcp_frame(LOCAL_PEER_IP, sport, SERVER, 80, TcpFlags::Syn, b"");
    let peer_port = |fx: &Fixture, sport| {
        let key = ct_key(LOCAL_PEER_IP, sport, SERVER, 80, TCP, CT_DIR_ORIGINAL);
        fx.ct_entry(&key).expect("peer forward entry").nat_port()
    };
    for sport in [1000, 1001] {
        assert_eq!(fx.run(&peer_syn(sport)).0, TC_ACT_REDIRECT);
    }
    let before = (peer_port(&fx, 1000), peer_port(&fx, 1001));
    assert_ne!(before.0, before.1);
    assert!(
        [before.0, before.1]
            .iter()
            .all(|p| (62000..=62001).contains(p))
    );
    assert_eq!(fx.run(&peer_syn(1002)).0, TC_ACT_SHOT);
    fx.assert_only_drops(Some(DropReason::EgressNoPort), 1);
    assert_eq!((peer_port(&fx, 1000), peer_port(&fx, 1001)), before);
    for sport in [1000, 1001, 1002] {
        assert_eq!(nat_port_of(&fx, sport), sport, "nothing live was taken");
    }
    // Another destination has its own ports.
    let other = tcp_frame(LOCAL_PEER_IP, 1002, SERVER, 443, TcpFlags::Syn, b"");
    assert_eq!(fx.run(&other).0, TC_ACT_REDIRECT);
    assert!(fx.dp.set_egress_ports(2, 1).is_err());
}

#[test]
fn a_port_a_node_socket_holds_is_not_kept() {
    if !have_root() {
        return;
    }
    // BPF_PROG_TEST_RUN looks sockets up in this process's namespace: a listener on any
    // address would take the replies to NODE:port.
    let tcp = std::net::TcpListener::bind("0.0.0.0:0").expect("listen");
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    let (tport, uport) = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    let fx = fixture();
    assert_eq!(fx.run(&syn_out(tport)).0, TC_ACT_REDIRECT);
    let nat = nat_port_of(&fx, tport);
    assert_ne!(nat, tport);
    assert!((61000..=65535).contains(&nat), "port {nat}");
    let (verdict, out) = fx.run(&udp_frame(CONTAINER_IP, uport, SERVER, 53, b"q"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let sport = parse_checked(&out).sport;
    assert!((61000..=65535).contains(&sport), "port {sport}");
    fx.assert_only_drops(None, 0);
}

#[test]
fn udp_and_ping_go_out_and_back() {
    if !have_root() {
        return;
    }
    let fx = fixture();
    let query = udp_frame(CONTAINER_IP, 5353, SERVER, 53, b"q");
    let (verdict, out) = fx.run(&query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let after = parse_checked(&out);
    assert_eq!((after.src, after.dst, after.dport), (NODE, SERVER, 53));
    let answer = udp_frame(SERVER, 53, NODE, after.sport, b"a");
    let (verdict, out, _) = fx.run_uplink(&answer);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let back = parse_checked(&out);
    assert_eq!(
        (back.dst, back.dport, back.payload.as_slice()),
        (CONTAINER_IP, 5353, &b"a"[..])
    );

    let ping = icmp_echo_frame(CONTAINER_IP, SERVER, true, 0x1234, 7);
    let (verdict, out) = fx.run(&ping);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (src, dst, id) = parse_echo(&out, true);
    assert_eq!((src, dst), (NODE, SERVER));
    let key = ct_key(CONTAINER_IP, 0x1234, SERVER, 0, ICMP, CT_DIR_ORIGINAL);
    assert_ct(fx.ct_entry(&key), CtKind::EgressForward, NODE, id);
    let pong = icmp_echo_frame(SERVER, NODE, false, id, 7);
    let (verdict, out, _) = fx.run_uplink(&pong);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (src, dst, id) = parse_echo(&out, false);
    assert_eq!((src, dst, id), (SERVER, CONTAINER_IP, 0x1234));
    let _ = UDP;
}

#[test]
fn internal_networks_and_the_nodes_own_addresses_have_no_way_out() {
    if !have_root() {
        return;
    }
    let mut fx = fixture();
    let mut internal = EndpointInfo::local(VNI_A, TEST_RUN_IFINDEX, CONTAINER_MAC);
    internal.flags |= ENDPOINT_F_INTERNAL;
    fx.dp
        .upsert_endpoint(ip(CONTAINER_IP), &internal)
        .expect("internal");
    assert_eq!(fx.run(&syn_out(40000)).0, TC_ACT_SHOT);
    fx.assert_only_drops(Some(DropReason::EgressInternal), 1);

    let fx = fixture();
    for dst in [
        Ipv4Address::new(169, 254, 128, 2),
        Ipv4Address::new(169, 254, 42, 1),
        Ipv4Address::new(127, 0, 0, 1),
    ] {
        let frame = tcp_frame(CONTAINER_IP, 40000, dst, 4791, TcpFlags::Syn, b"");
        assert_eq!(fx.run(&frame).0, TC_ACT_SHOT, "{dst}");
    }
    fx.assert_only_drops(Some(DropReason::EgressForbidden), 3);
    // The node's own services: to its stack, untranslated.
    let ssh = tcp_frame(CONTAINER_IP, 40000, NODE, 22, TcpFlags::Syn, b"");
    let (verdict, out) = fx.run(&ssh);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, ssh);
    assert!(fx.ct().is_empty());
}

#[test]
fn outside_packets_to_overlay_addresses_or_from_the_node_address_are_dropped() {
    if !have_root() {
        return;
    }
    let fx = fixture();
    let inward = tcp_frame(OUTSIDE_CLIENT, 1234, CONTAINER_IP, 80, TcpFlags::Syn, b"");
    assert_eq!(fx.run_uplink(&inward).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::OverlayDestOutside), 1);
    // Forged as the node itself: could hijack a translated flow.
    assert_eq!(fx.run(&syn_out(40000)).0, TC_ACT_REDIRECT);
    let port = nat_port_of(&fx, 40000);
    let forged = tcp_frame(NODE, 80, NODE, port, TcpFlags::SynAck, b"");
    assert_eq!(fx.run_uplink(&forged).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::NodeSourceOutside), 1);
}

#[test]
fn icmp_errors_about_translated_packets_reach_the_container_and_the_backend() {
    if !have_root() {
        return;
    }
    let fx = fixture();
    // Egress: the server's path says "fragmentation needed" about node:port -> server:80.
    assert_eq!(fx.run(&syn_out(40000)).0, TC_ACT_REDIRECT);
    let port = nat_port_of(&fx, 40000);
    let quoted = tcp_frame(NODE, port, SERVER, 80, TcpFlags::Ack, &[0u8; 100]);
    let error = icmp_error_frame(ROUTER, NODE, 3, 4, 1400, &quoted[14..]);
    let (verdict, out, _) = fx.run_uplink(&error);
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the container");
    let (outer_dst, inner_src, inner_sport, mtu) = parse_icmp_error(&out);
    assert_eq!(
        (outer_dst, inner_src, inner_sport, mtu),
        (CONTAINER_IP, CONTAINER_IP, 40000, 1400)
    );

    // Routing mesh: a client's path says the same about node:8080 -> client (a reply of the
    // backend on this node, LOCAL_PEER, the first of the set).
    let client_syn = tcp_frame(OUTSIDE_CLIENT, 50000, NODE, 8080, TcpFlags::Syn, b"");
    let (verdict, out, _) = fx.run_uplink(&client_syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(parse_checked(&out).dst, LOCAL_PEER_IP);
    let quoted = tcp_frame(
        NODE,
        8080,
        OUTSIDE_CLIENT,
        50000,
        TcpFlags::Ack,
        &[0u8; 100],
    );
    let error = icmp_error_frame(ROUTER, NODE, 3, 4, 1400, &quoted[14..]);
    let (verdict, out, _) = fx.run_uplink(&error);
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the backend");
    let (outer_dst, inner_src, inner_sport, _) = parse_icmp_error(&out);
    assert_eq!(
        (outer_dst, inner_src, inner_sport),
        (LOCAL_PEER_IP, LOCAL_PEER_IP, 80)
    );
    // About a packet nothing translated: the node's own.
    let quoted = tcp_frame(NODE, 22, OUTSIDE_CLIENT, 50001, TcpFlags::Ack, b"");
    let error = icmp_error_frame(ROUTER, NODE, 3, 3, 0, &quoted[14..]);
    assert_eq!(fx.run_uplink(&error).0, TC_ACT_OK);
    fx.assert_only_drops(None, 0);
}

/// An Ethernet frame with an ICMP echo request (`request`) or reply.
fn icmp_echo_frame(
    src: Ipv4Address,
    dst: Ipv4Address,
    request: bool,
    id: u16,
    seq: u16,
) -> Vec<u8> {
    let repr = if request {
        Icmpv4Repr::EchoRequest {
            ident: id,
            seq_no: seq,
            data: b"ping",
        }
    } else {
        Icmpv4Repr::EchoReply {
            ident: id,
            seq_no: seq,
            data: b"ping",
        }
    };
    let mut icmp = vec![0u8; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut icmp),
        &smoltcp::phy::ChecksumCapabilities::default(),
    );
    ipv4_raw(src, dst, IpProtocol::Icmp, &icmp)
}

/// (source, destination, identifier) of an echo frame, checksums verified.
fn parse_echo(frame: &[u8], request: bool) -> (Ipv4Address, Ipv4Address, u16) {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
    assert!(ip.verify_checksum(), "IPv4 checksum");
    let icmp = Icmpv4Packet::new_checked(ip.payload()).expect("icmp");
    assert!(icmp.verify_checksum(), "ICMP checksum");
    assert_eq!(u8::from(icmp.msg_type()), if request { 8 } else { 0 });
    (ip.src_addr(), ip.dst_addr(), icmp.echo_ident())
}

/// An ICMP error (type, code; `mtu` for "fragmentation needed") quoting `quoted` (an IPv4
/// packet; the first 28 + bytes are kept, as routers do).
fn icmp_error_frame(
    src: Ipv4Address,
    dst: Ipv4Address,
    typ: u8,
    code: u8,
    mtu: u16,
    quoted: &[u8],
) -> Vec<u8> {
    let keep = quoted.len().min(576 - 28);
    let mut icmp = vec![typ, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted[..keep]);
    let sum = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv4_raw(src, dst, IpProtocol::Icmp, &icmp)
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// (outer destination, quoted source, quoted source port, next-hop MTU) of an ICMP error,
/// with the outer IPv4, ICMP and quoted IPv4 checksums verified.
fn parse_icmp_error(frame: &[u8]) -> (Ipv4Address, Ipv4Address, u16, u16) {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
    assert!(ip.verify_checksum(), "outer IPv4 checksum");
    let payload = ip.payload();
    assert_eq!(inet_checksum(payload), 0, "ICMP checksum");
    let mtu = u16::from_be_bytes([payload[6], payload[7]]);
    let inner = Ipv4Packet::new_unchecked(&payload[8..]);
    assert!(inner.verify_checksum(), "quoted IPv4 checksum");
    let l4 = &payload[8 + 20..];
    let _ = Ipv4Addr::UNSPECIFIED;
    (
        ip.dst_addr(),
        inner.src_addr(),
        u16::from_be_bytes([l4[0], l4[1]]),
        mtu,
    )
}
