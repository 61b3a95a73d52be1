//! Service VIPs (path 3) under BPF_PROG_TEST_RUN: round-robin balancing of new connections,
//! conntrack stickiness, DNAT and reverse NAT with checksums recomputed from the output bytes,
//! and the defined verdicts for what cannot be balanced.
//!
//! Topology (`Fixture::with_services`): the client is CONTAINER_IP (10.0.0.2, on the test-run
//! veth); VIP 10.0.0.100 balances over [10.0.0.3 local, 10.0.0.4 on REMOTE_NODE, 10.0.0.5
//! local], in that order.

mod common;

use std::{net::Ipv4Addr, time::Duration};

use common::*;
use netagent_datapath::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKind, DropReason, ForwardAction, LbConfig, ServiceInfo,
    TRACE_REASON,
};
use smoltcp::wire::{IpProtocol, Ipv4Address};

const TCP: u8 = 6;
const UDP: u8 = 17;
const PACKET_HOST: u8 = 0;

const BACKENDS: [Ipv4Address; 3] = [LOCAL_PEER_IP, REMOTE_PEER_IP, B3_IP];

fn mac_of(backend: Ipv4Address) -> [u8; 6] {
    match backend {
        LOCAL_PEER_IP => LOCAL_PEER_MAC,
        REMOTE_PEER_IP => REMOTE_PEER_MAC,
        B3_IP => B3_MAC,
        other => panic!("not a backend: {other}"),
    }
}

fn syn(sport: u16, dport: u16) -> Vec<u8> {
    tcp_frame(CONTAINER_IP, sport, VIP, dport, TcpFlags::Syn, b"")
}

/// Runs a client packet through the hook, checks it was DNATed correctly (addresses, ports,
/// checksums, payload, next hop) and returns the backend it went to.
fn balanced(fx: &Fixture, frame: &[u8]) -> Ipv4Address {
    let before = parse_checked(frame);
    let (verdict, out, obs) = fx.run_container_hook(frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "balanced packet is redirected");
    let after = parse_checked(&out);
    assert_eq!(after.src, before.src, "client address kept");
    assert_eq!(after.sport, before.sport);
    assert_eq!(after.dport, before.dport, "VIPs are port-transparent");
    assert_eq!(after.payload, before.payload);
    assert_eq!(out.len(), frame.len());
    let backend = after.dst;
    assert!(
        BACKENDS.contains(&backend),
        "DNAT to a backend, got {backend}"
    );
    assert_eq!(after.dst_mac, mac_of(backend), "routed to the backend");
    assert_eq!(after.src_mac, ROUTER_MAC);
    if backend == REMOTE_PEER_IP {
        assert_eq!(obs.tunnel_key_status, 0, "tunnelled");
        assert_eq!(obs.tunnel_remote, REMOTE_NODE.octets());
        assert_eq!(obs.tunnel_id, VNI_A);
    } else {
        assert_ne!(obs.tunnel_key_status, 0, "delivered locally");
        assert_eq!(obs.pkt_type, PACKET_HOST);
    }
    backend
}

#[test]
fn new_tcp_connections_take_the_backends_in_turn_with_correct_checksums() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    let chosen: Vec<Ipv4Address> = (0..6).map(|i| balanced(&fx, &syn(40000 + i, 80))).collect();
    assert_eq!(chosen, [BACKENDS, BACKENDS].concat());
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(6));

    // Each connection has its forward and reverse entry.
    assert_eq!(fx.ct().len(), 12);
    for (i, backend) in chosen.iter().enumerate() {
        let sport = 40000 + i as u16;
        let fwd = fx.ct_entry(&ct_key(CONTAINER_IP, sport, VIP, 80, TCP, CT_DIR_ORIGINAL));
        let fwd = assert_ct(fwd, CtKind::VipForward, *backend, 80);
        assert_eq!((fwd.vni, fwd.service_id, fwd.flags), (VNI_A, SVC_ID, 0));
        let rev = fx.ct_entry(&ct_key(
            *backend,
            80,
            CONTAINER_IP,
            sport,
            TCP,
            CT_DIR_REPLY,
        ));
        assert_ct(rev, CtKind::VipReverse, VIP, 80);
    }
    fx.assert_only_drops(None, 0);
    assert!(fx.events().is_empty());
}

#[test]
fn any_port_of_the_vip_is_balanced_to_the_same_port() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    for (i, dport) in [80u16, 443, 5432, 1].into_iter().enumerate() {
        let frame = tcp_frame(
            CONTAINER_IP,
            41000 + i as u16,
            VIP,
            dport,
            TcpFlags::Syn,
            b"",
        );
        let (_, out, _) = fx.run_container_hook(&frame);
        let after = parse_checked(&out);
        assert_eq!(after.dport, dport);
        assert_eq!(after.dst, BACKENDS[i % 3]);
    }
}

#[test]
fn established_packets_keep_their_backend() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    let first = balanced(&fx, &syn(40000, 80));
    let second = balanced(&fx, &syn(40001, 80));
    assert_ne!(first, second);
    // Later segments of both connections, interleaved, with data: each keeps its backend,
    // and none of them moves the round-robin position.
    for round in 0..3 {
        for (sport, backend) in [(40000, first), (40001, second)] {
            let flags = if round == 0 {
                TcpFlags::Ack
            } else {
                TcpFlags::Psh
            };
            let frame = tcp_frame(
                CONTAINER_IP,
                sport,
                VIP,
                80,
                flags,
                b"GET / HTTP/1.1\r\n\r\n",
            );
            assert_eq!(balanced(&fx, &frame), backend);
        }
    }
    // A retransmitted SYN is the same connection.
    assert_eq!(balanced(&fx, &syn(40000, 80)), first);
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(2));
    // The next new connection continues the rotation.
    assert_eq!(balanced(&fx, &syn(40002, 80)), BACKENDS[2]);
}

#[test]
fn replies_get_the_vip_back_as_source() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    // Connection 1 to the local peer, connection 2 to the remote peer.
    assert_eq!(balanced(&fx, &syn(40000, 80)), LOCAL_PEER_IP);
    assert_eq!(balanced(&fx, &syn(40001, 80)), REMOTE_PEER_IP);

    // The remote backend's reply arrives through the tunnel and is delivered to the client.
    let reply = tcp_frame(
        REMOTE_PEER_IP,
        80,
        CONTAINER_IP,
        40001,
        TcpFlags::SynAck,
        b"hi",
    );
    let (verdict, out, _) = fx.run_overlay(VNI_A, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let after = parse_checked(&out);
    assert_eq!(
        (after.src, after.sport),
        (VIP, 80),
        "VIP restored as source"
    );
    assert_eq!((after.dst, after.dport), (CONTAINER_IP, 40001));
    assert_eq!(after.payload, b"hi");
    assert_eq!(after.dst_mac, CONTAINER_MAC);

    // The local backend's reply comes through from_container on the backend's veth (make
    // the test-run veth the backend's for this).
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let reply = tcp_frame(
        LOCAL_PEER_IP,
        80,
        CONTAINER_IP,
        40000,
        TcpFlags::SynAck,
        b"",
    );
    let (verdict, out) = fx.run(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let after = parse_checked(&out);
    assert_eq!((after.src, after.sport), (VIP, 80));
    assert_eq!((after.dst, after.dport), (CONTAINER_IP, 40000));
    assert_eq!(after.dst_mac, CONTAINER_MAC);

    // A packet from the backend that is not a reply of a VIP connection is left alone.
    let direct = tcp_frame(LOCAL_PEER_IP, 80, CONTAINER_IP, 40999, TcpFlags::Ack, b"");
    let (verdict, out) = fx.run(&direct);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_readdressed(&out, &direct, CONTAINER_MAC);
    fx.assert_only_drops(None, 0);
}

#[test]
fn udp_flows_are_tracked_and_zero_checksums_stay_zero() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    let query = udp_frame(CONTAINER_IP, 5353, VIP, 53, b"query");
    let backend = balanced(&fx, &query);
    assert_eq!(backend, LOCAL_PEER_IP);
    // Later datagrams of the flow keep the backend.
    for _ in 0..3 {
        assert_eq!(balanced(&fx, &query), backend);
    }
    let fwd = fx.ct_entry(&ct_key(CONTAINER_IP, 5353, VIP, 53, UDP, CT_DIR_ORIGINAL));
    assert_ct(fwd, CtKind::VipForward, backend, 53);
    let rev = fx.ct_entry(&ct_key(backend, 53, CONTAINER_IP, 5353, UDP, CT_DIR_REPLY));
    assert_ct(rev, CtKind::VipReverse, VIP, 53);
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(1));

    // A UDP checksum of 0 means "none" and must stay 0 through DNAT...
    let mut no_csum = udp_frame(CONTAINER_IP, 5354, VIP, 53, b"no checksum");
    no_csum[40..42].copy_from_slice(&[0, 0]);
    let (verdict, out, _) = fx.run_container_hook(&no_csum);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let after = parse_checked(&out);
    assert_eq!(after.dst, REMOTE_PEER_IP);
    assert_eq!(after.udp_checksum, Some(0));
    // ... and through reverse NAT.
    let mut reply = udp_frame(REMOTE_PEER_IP, 53, CONTAINER_IP, 5354, b"answer");
    reply[40..42].copy_from_slice(&[0, 0]);
    let (verdict, out, _) = fx.run_overlay(VNI_A, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let after = parse_checked(&out);
    assert_eq!((after.src, after.sport), (VIP, 53));
    assert_eq!(after.udp_checksum, Some(0));
    // A reply with a checksum gets a correct one (checked by parse_checked).
    let reply = udp_frame(LOCAL_PEER_IP, 53, CONTAINER_IP, 5353, b"answer");
    let (_, out, _) = fx.run_overlay(VNI_A, &reply);
    let after = parse_checked(&out);
    assert_eq!(after.src, VIP);
    assert_ne!(after.udp_checksum, Some(0));
    fx.assert_only_drops(None, 0);
}

#[test]
fn a_removed_backend_gets_no_new_connections_but_keeps_its_own() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    // Connections to each backend.
    for i in 0..3 {
        assert_eq!(balanced(&fx, &syn(40000 + i, 80)), BACKENDS[i as usize]);
    }
    // The local peer (slot 0) is drained.
    fx.dp
        .set_backends(SVC_ID, &[ip(REMOTE_PEER_IP), ip(B3_IP)])
        .expect("shrink");
    let mut counts = [0usize; 3];
    for i in 0..10 {
        let backend = balanced(&fx, &syn(41000 + i, 80));
        counts[BACKENDS
            .iter()
            .position(|b| *b == backend)
            .expect("backend")] += 1;
    }
    assert_eq!(
        counts,
        [0, 5, 5],
        "only the remaining backends, alternating"
    );
    // The drained backend's connection continues on it.
    let data = tcp_frame(CONTAINER_IP, 40000, VIP, 80, TcpFlags::Psh, b"still here");
    assert_eq!(balanced(&fx, &data), LOCAL_PEER_IP);
    assert!(
        fx.ct_entry(&ct_key(CONTAINER_IP, 40000, VIP, 80, TCP, CT_DIR_ORIGINAL))
            .is_some()
    );
    // And so do the others.
    let data = tcp_frame(CONTAINER_IP, 40002, VIP, 80, TcpFlags::Psh, b"x");
    assert_eq!(balanced(&fx, &data), B3_IP);
}

#[test]
fn a_syn_after_the_client_closed_is_a_new_connection() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    assert_eq!(balanced(&fx, &syn(40000, 80)), BACKENDS[0]);
    let fin = tcp_frame(CONTAINER_IP, 40000, VIP, 80, TcpFlags::Fin, b"");
    assert_eq!(balanced(&fx, &fin), BACKENDS[0]);
    // The closing handshake still goes to the same backend...
    let ack = tcp_frame(CONTAINER_IP, 40000, VIP, 80, TcpFlags::Ack, b"");
    assert_eq!(balanced(&fx, &ack), BACKENDS[0]);
    // ... but a new SYN on the same tuple (port reuse, a new initial sequence number) is
    // balanced anew.
    let reuse = tcp_frame_seq(CONTAINER_IP, 40000, VIP, 80, TcpFlags::Syn, 90_000, b"");
    assert_eq!(balanced(&fx, &reuse), BACKENDS[1]);
    let fwd = fx.ct_entry(&ct_key(CONTAINER_IP, 40000, VIP, 80, TCP, CT_DIR_ORIGINAL));
    assert_eq!(assert_ct(fwd, CtKind::VipForward, BACKENDS[1], 80).flags, 0);
}

/// A backend socket in TIME_WAIT for the client's address and port (e.g. from the client's
/// connection through another node's published port) answers the SYN with an ACK, the client
/// answers that with a RST and retransmits its SYN: the same connection, which keeps its
/// backend and takes one round-robin slot, not two.
#[test]
fn a_retransmitted_syn_after_the_client_reset_keeps_its_backend() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    let cursor = fx.dp.rr_cursor(SVC_ID).expect("cursor").unwrap_or(0);
    assert_eq!(balanced(&fx, &syn(40000, 80)), BACKENDS[0]);
    let rst = tcp_frame_seq(CONTAINER_IP, 40000, VIP, 80, TcpFlags::Rst, 77_000, b"");
    assert_eq!(balanced(&fx, &rst), BACKENDS[0]);
    let fwd = fx.ct_entry(&ct_key(CONTAINER_IP, 40000, VIP, 80, TCP, CT_DIR_ORIGINAL));
    assert_ne!(
        assert_ct(fwd, CtKind::VipForward, BACKENDS[0], 80).flags,
        0,
        "closing"
    );
    assert_eq!(
        balanced(&fx, &syn(40000, 80)),
        BACKENDS[0],
        "retransmission"
    );
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(cursor + 1));
    // The next connection gets the next slot.
    assert_eq!(balanced(&fx, &syn(40001, 80)), BACKENDS[1]);
}

#[test]
fn three_hundred_sequential_connections_split_exactly_over_three_backends() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    let prog = fx.dp.from_container().expect("program");
    let mut counts = [0usize; 3];
    for i in 0..300u16 {
        let proto_frame = if i % 2 == 0 {
            syn(20000 + i, 80)
        } else {
            udp_frame(CONTAINER_IP, 20000 + i, VIP, 53, b"q")
        };
        let (verdict, out) = run(prog, &proto_frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let out = decapsulate(verdict, &out).map_or(out, |(inner, _)| inner);
        let dst = parse_checked(&out).dst;
        counts[BACKENDS.iter().position(|b| *b == dst).expect("backend")] += 1;
    }
    assert_eq!(counts, [100, 100, 100]);
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(300));
}

#[test]
fn forwarded_packets_new_flows_and_traces_are_counted() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    let mut events = fx.dp.take_drop_events().expect("events");
    let mut bytes = 0u64;
    for i in 0..30u16 {
        let frame = syn(21000 + i, 80);
        bytes += frame.len() as u64;
        let (verdict, _) = fx.run(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
    }
    // The same connection again is no new flow.
    let (verdict, _) = fx.run(&syn(21000, 80));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    bytes += syn(21000, 80).len() as u64;

    let forwarded = fx.dp.forwarded().expect("forwarded");
    let (_, _, c) = forwarded
        .iter()
        .find(|(hook, action, _)| *hook == "from_container" && *action == "redirect")
        .expect("from_container redirects counted");
    assert_eq!((c.packets, c.bytes), (31, bytes));
    let mut flows = fx.dp.flows().expect("flows");
    flows.sort_by_key(|(k, _)| k.backend);
    let by_backend: Vec<([u8; 4], u64)> = flows
        .iter()
        .filter(|(k, _)| k.service_id == SVC_ID)
        .map(|(k, n)| (k.backend, *n))
        .collect();
    let mut want: Vec<([u8; 4], u64)> = BACKENDS.iter().map(|b| (b.octets(), 10)).collect();
    want.sort();
    assert_eq!(by_backend, want);
    let usage = fx.dp.map_usage().expect("usage");
    let backends = usage
        .iter()
        .find(|u| u.name == "BACKENDS")
        .expect("BACKENDS");
    assert_eq!(backends.entries, 3);
    assert!(backends.capacity >= 3);
    // One connection is a pair of entries in CT_NEW.
    let ct_new = usage.iter().find(|u| u.name == "CT_NEW").expect("CT_NEW");
    assert_eq!(ct_new.entries, 60);

    // No trace events until asked for; then one per packet let through, after the NAT.
    assert!(events.drain().is_empty());
    fx.dp.set_trace(true).expect("trace on");
    let (verdict, _) = fx.run(&syn(22000, 80));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    fx.dp.set_trace(false).expect("trace off");
    let (verdict, _) = fx.run(&syn(22001, 80));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let traces = events.drain();
    assert_eq!(traces.len(), 1, "{traces:?}");
    let t = &traces[0];
    assert_eq!(t.reason, TRACE_REASON);
    assert_eq!(t.action, ForwardAction::Redirect as u8);
    assert_eq!((t.src_port, t.dst_port), (22000, 80));
    assert!(BACKENDS.iter().any(|b| b.octets() == t.dst_ip), "{t}");
}

#[test]
fn no_backend_is_a_defined_drop() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    fx.dp.set_backends(SVC_ID, &[]).expect("empty set");
    let frame = syn(40000, 80);
    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(out, frame, "dropped frames are not rewritten");
    // A VIP whose set does not exist at all.
    fx.dp
        .upsert_service(
            Ipv4Addr::new(10, 0, 0, 101),
            &ServiceInfo {
                id: 99,
                vni: VNI_A,
                flags: 0,
            },
        )
        .expect("service");
    let frame = tcp_frame(
        CONTAINER_IP,
        40000,
        Ipv4Address::new(10, 0, 0, 101),
        80,
        TcpFlags::Syn,
        b"",
    );
    assert_eq!(fx.run(&frame).0, TC_ACT_SHOT);
    fx.assert_only_drops(Some(DropReason::NoBackend), 2);
    assert!(
        fx.ct().is_empty(),
        "no conntrack state for failed connections"
    );
    let events = fx.events();
    assert_eq!(events[0].dst_ip, VIP.octets());
    assert!(events[0].to_string().starts_with("reason=no_backend"));
}

#[test]
fn what_cannot_be_balanced_gets_a_defined_verdict() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    // ICMP echo to the VIP: nothing answers for the address itself.
    let ping = ipv4_raw(
        CONTAINER_IP,
        VIP,
        IpProtocol::Icmp,
        &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
    );
    assert_eq!(fx.run(&ping).0, TC_ACT_SHOT);
    fx.assert_only_drops(Some(DropReason::VipUnsupportedProtocol), 1);

    // Fragments: a first fragment (MF) and a later one (offset 185 * 8).
    let mut first = syn(40000, 80);
    first[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    let mut later = udp_frame(CONTAINER_IP, 40000, VIP, 53, b"tail");
    later[20..22].copy_from_slice(&185u16.to_be_bytes());
    for frame in [&mut first, &mut later] {
        fix_ip_checksum(frame);
        assert_eq!(fx.run(frame).0, TC_ACT_SHOT);
    }
    assert_eq!(fx.counter(DropReason::Fragmented), 2);

    // A TCP header cut short by the end of the frame.
    let truncated = ipv4_raw(CONTAINER_IP, VIP, IpProtocol::Tcp, &syn(40000, 80)[34..44]);
    assert_eq!(fx.run(&truncated).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::Malformed), 1);

    // A VIP of another network: isolation, before any balancing.
    fx.dp
        .upsert_service(
            ip(VIP),
            &ServiceInfo {
                id: SVC_ID,
                vni: VNI_B,
                flags: 0,
            },
        )
        .expect("move VIP");
    assert_eq!(fx.run(&syn(40000, 80)).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(DropReason::PolicyIsolation), 1);
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(0));
    assert!(fx.ct().is_empty());
    assert_eq!(fx.events().len(), 5);
}

#[test]
fn ip_options_before_the_tcp_header_are_handled() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    // IHL 6: one 4-byte option (NOP NOP NOP EOL); the L4 header moves by 4 bytes.
    let mut frame = syn(40000, 80);
    frame[14] = 0x46;
    frame.splice(34..34, [1u8, 1, 1, 0]);
    let total = (frame.len() - 14) as u16;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut frame);
    let before = parse_checked(&frame);
    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // smoltcp finds the TCP header after the options (IHL), so this checks the checksum
    // the program fixed at the moved offset.
    let after = parse_checked(&out);
    assert_eq!(after.dst, BACKENDS[0]);
    assert_eq!((after.sport, after.dport), (before.sport, before.dport));
    assert_eq!(&out[34..38], &[1, 1, 1, 0], "options untouched");
}

#[test]
fn an_idle_entry_expires_and_an_active_one_does_not() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    fx.dp
        .set_lb_config(LbConfig {
            tcp_timeout: Duration::from_secs(1),
            udp_timeout: Duration::from_secs(1),
            ..fx.dp.lb_config().expect("lb config")
        })
        .expect("tiny timeouts");
    // Active: a packet every 300 ms for 2 s (twice the timeout) keeps the backend; the
    // entries are refreshed every timeout/4.
    assert_eq!(balanced(&fx, &syn(40000, 80)), BACKENDS[0]);
    let ack = tcp_frame(CONTAINER_IP, 40000, VIP, 80, TcpFlags::Ack, b"");
    for _ in 0..7 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(balanced(&fx, &ack), BACKENDS[0]);
    }
    // Its reply entry was refreshed along with it (the backend sent nothing meanwhile).
    let reply = tcp_frame(LOCAL_PEER_IP, 80, CONTAINER_IP, 40000, TcpFlags::Ack, b"");
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let (_, out) = fx.run(&reply);
    assert_eq!(parse_checked(&out).src, VIP);
    fx.send_as(CONTAINER_IP, CONTAINER_MAC, TEST_RUN_IFINDEX);

    // Idle for longer than the timeout: the entry is a miss. A mid-connection TCP packet is
    // answered with a reset (a new backend would not know the connection); the client's next
    // SYN is a new connection and takes the next backend. A UDP packet is simply balanced
    // anew.
    let dns = udp_frame(CONTAINER_IP, 5353, VIP, 53, b"q");
    assert_eq!(balanced(&fx, &dns), BACKENDS[1]);
    std::thread::sleep(Duration::from_millis(1500));
    let (verdict, out, _) = fx.run_container_hook(&ack);
    assert_eq!(verdict, TC_ACT_REDIRECT, "reset sent back");
    assert_reset(&out, &ack);
    assert_eq!(balanced(&fx, &syn(40000, 80)), BACKENDS[2]);
    assert_eq!(balanced(&fx, &dns), BACKENDS[0]);
    // And an expired reverse entry no longer rewrites: the old backend's late reply stays as
    // it is.
    std::thread::sleep(Duration::from_millis(1500));
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let (_, out) = fx.run(&reply);
    assert_eq!(parse_checked(&out).src, LOCAL_PEER_IP);
    fx.assert_only_drops(Some(DropReason::NoConntrack), 1);
}

/// Recomputes the IPv4 header checksum of a frame after a test edited the header.
fn fix_ip_checksum(frame: &mut [u8]) {
    let mut packet = smoltcp::wire::Ipv4Packet::new_unchecked(&mut frame[14..]);
    packet.fill_checksum();
}

#[test]
fn a_client_balanced_to_itself_sees_the_hairpin_address() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    // The client is one of the backends (a replica calling its own service).
    fx.dp
        .set_backends(SVC_ID, &[ip(CONTAINER_IP), ip(LOCAL_PEER_IP)])
        .expect("backends");
    let hairpin_ip = Ipv4Address::from_octets(netagent_datapath::HAIRPIN_SNAT_IP);
    for round in 0..2 {
        // Round 0 is the SYN (new connection), round 1 a data segment (established).
        let flags = if round == 0 {
            TcpFlags::Syn
        } else {
            TcpFlags::Psh
        };
        let frame = tcp_frame(CONTAINER_IP, 40000, VIP, 80, flags, b"me?");
        let (verdict, out) = fx.run(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let after = parse_checked(&out);
        assert_eq!(
            (after.src, after.sport),
            (hairpin_ip, 40000),
            "source translated"
        );
        assert_eq!((after.dst, after.dport), (CONTAINER_IP, 80), "to itself");
        assert_eq!(after.dst_mac, CONTAINER_MAC);
    }
    let fwd = fx.ct_entry(&ct_key(CONTAINER_IP, 40000, VIP, 80, TCP, CT_DIR_ORIGINAL));
    let fwd = assert_ct(fwd, CtKind::VipForward, CONTAINER_IP, 80);
    assert_ne!(fwd.flags & netagent_datapath::CT_F_HAIRPIN, 0);
    let rev = fx.ct_entry(&ct_key(
        CONTAINER_IP,
        80,
        hairpin_ip,
        40000,
        TCP,
        CT_DIR_REPLY,
    ));
    assert_ct(rev, CtKind::VipReverse, VIP, 80);

    // Its reply (as the backend, to the hairpin address) comes back as VIP -> client.
    let reply = tcp_frame(
        CONTAINER_IP,
        80,
        hairpin_ip,
        40000,
        TcpFlags::SynAck,
        b"you",
    );
    let (verdict, out) = fx.run(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let after = parse_checked(&out);
    assert_eq!((after.src, after.sport), (VIP, 80));
    assert_eq!((after.dst, after.dport), (CONTAINER_IP, 40000));
    assert_eq!(after.dst_mac, CONTAINER_MAC);
    // The next connection goes to the other backend, without any translation of the source.
    assert_eq!(balanced(&fx, &syn(40001, 80)), LOCAL_PEER_IP);
    fx.assert_only_drops(None, 0);
}
