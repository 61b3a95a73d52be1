//! `from_container` under BPF_PROG_TEST_RUN: ARP, parsing and drop accounting (IPv4 routing
//! is in tests/routing.rs).

mod common;

use common::*;
use netagent_datapath::{Config, DropReason, Hook, map_names};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, Ipv4Address,
};

/// Checks that `out` is the router's ARP reply to the container's request for `target`.
fn assert_arp_reply(out: &[u8], target: Ipv4Address) {
    let eth = EthernetFrame::new_checked(out).expect("ethernet");
    assert_eq!(eth.dst_addr(), EthernetAddress(CONTAINER_MAC), "eth dst");
    assert_eq!(eth.src_addr(), EthernetAddress(ROUTER_MAC), "eth src");
    assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).expect("arp")).expect("arp");
    assert_eq!(
        arp,
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(ROUTER_MAC),
            source_protocol_addr: target,
            target_hardware_addr: EthernetAddress(CONTAINER_MAC),
            target_protocol_addr: CONTAINER_IP,
        }
    );
}

#[test]
fn arp_request_is_answered_with_router_mac() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    // Gateway, a peer on the subnet, and an address off the subnet: proxy ARP answers all.
    for target in [
        GATEWAY_IP,
        Ipv4Address::new(10, 0, 0, 77),
        Ipv4Address::new(192, 0, 2, 1),
    ] {
        let frame = arp_request(target);
        let (verdict, out) = fx.run(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "ARP for {target}");
        assert_eq!(out.len(), frame.len());
        assert_arp_reply(&out, target);
    }
    fx.assert_only_drops(None, 0);
    assert!(fx.events().is_empty());
}

#[test]
fn padded_arp_request_keeps_its_padding() {
    if !have_root() {
        return;
    }
    let fx = Fixture::new();
    // Frames that crossed a real NIC are padded to the 60-byte Ethernet minimum.
    let mut frame = arp_request(GATEWAY_IP);
    frame.resize(60, 0);
    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 60);
    assert_arp_reply(&out, GATEWAY_IP);
    assert_eq!(&out[42..], &[0u8; 18]);
}

#[test]
fn gratuitous_arp_and_probes_are_dropped_not_answered() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let frames = [
        // Announcement (request form): sender == target.
        arp(ArpOperation::Request, CONTAINER_IP, CONTAINER_IP),
        // RFC 5227 probe: sender 0.0.0.0, target the address being checked.
        arp(
            ArpOperation::Request,
            Ipv4Address::UNSPECIFIED,
            CONTAINER_IP,
        ),
    ];
    for frame in &frames {
        let (verdict, out) = fx.run(frame);
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(&out, frame, "dropped frames are not rewritten");
    }
    fx.assert_only_drops(Some(DropReason::ArpGratuitous), 2);
    let events = fx.events();
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| e.reason == DropReason::ArpGratuitous.code())
    );
    assert_eq!(events[1].src_ip, [0; 4]);
    assert_eq!(events[1].dst_ip, CONTAINER_IP.octets());
}

#[test]
fn arp_reply_from_container_is_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    // Includes the gratuitous reply form (sender == target): the opcode check comes first.
    for target in [GATEWAY_IP, CONTAINER_IP] {
        let (verdict, _) = fx.run(&arp(ArpOperation::Reply, CONTAINER_IP, target));
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    fx.assert_only_drops(Some(DropReason::ArpUnsupportedOp), 2);
    let events = fx.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].arp_op, 2);
}

#[test]
fn non_ethernet_ipv4_arp_is_invalid() {
    if !have_root() {
        return;
    }
    let fx = Fixture::new();
    let good = arp_request(GATEWAY_IP);
    // (offset in frame, byte): htype, ptype, hlen, plen.
    for (offset, value) in [(15usize, 6u8), (16, 0x86), (18, 8), (19, 16)] {
        let mut frame = good.clone();
        frame[offset] = value;
        let (verdict, _) = fx.run(&frame);
        assert_eq!(verdict, TC_ACT_SHOT, "byte {offset} = {value}");
    }
    fx.assert_only_drops(Some(DropReason::ArpInvalid), 4);
}

#[test]
fn ipv4_without_endpoints_is_a_spoofed_source() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    // Routing is covered in tests/routing.rs; with empty maps no source is legitimate.
    let frame = ipv4(Ipv4Address::new(10, 0, 0, 3), b"hello overlay");
    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(out, frame);
    fx.assert_only_drops(Some(DropReason::SourceSpoofed), 1);
    assert_eq!(fx.events().len(), 1);
}

#[test]
fn bad_ipv4_header_is_malformed() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let good = ipv4(GATEWAY_IP, b"x");
    let mut v6_in_v4 = good.clone();
    v6_in_v4[14] = 0x65; // version 6 under the IPv4 ethertype
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44; // IHL 4 (16 bytes) is below the minimum
    for frame in [&v6_in_v4, &short_ihl] {
        assert_eq!(fx.run(frame).0, TC_ACT_SHOT);
    }
    fx.assert_only_drops(Some(DropReason::Malformed), 2);
    let events = fx.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].ethertype, 0x0800);
    assert_eq!(events[0].ip_proto, 17);
    assert_eq!(events[0].src_ip, CONTAINER_IP.octets());
}

#[test]
fn truncated_frames_are_dropped_as_malformed() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let arp_cut = arp_request(GATEWAY_IP)[..24].to_vec(); // 10 of the 28 ARP bytes
    let arp_cut_late = arp_request(GATEWAY_IP)[..41].to_vec(); // last byte of target IP missing
    let eth_only = arp_request(GATEWAY_IP)[..14].to_vec(); // ARP ethertype, nothing after
    // A truncated IPv4 header cannot be tested here: since 6.x the kernel refuses test runs
    // of an IPv4-ethertype skb shorter than 14 + 20 bytes (EINVAL). Real traffic can still
    // deliver one to tc ingress; the program treats it like the ARP cases (same helper).
    for frame in [&arp_cut, &arp_cut_late, &eth_only] {
        let (verdict, out) = fx.run(frame);
        assert_eq!(verdict, TC_ACT_SHOT, "{} byte frame", frame.len());
        assert_eq!(&out, frame);
    }
    fx.assert_only_drops(Some(DropReason::Malformed), 3);

    let events = fx.events();
    assert_eq!(events.len(), 3);
    let arp_event = &events[0];
    assert_eq!(arp_event.reason, DropReason::Malformed.code());
    assert_eq!(arp_event.hook, Hook::FromContainer as u8);
    assert_eq!(arp_event.pkt_len, 24);
    assert_eq!(arp_event.ethertype, 0x0806);
    assert_eq!(arp_event.src_mac, CONTAINER_MAC);
    assert_eq!(arp_event.dst_mac, [0xff; 6]);
    // The ARP header could not be read, so its fields stay zero.
    assert_eq!((arp_event.arp_op, arp_event.src_ip), (0, [0; 4]));
    // BPF_PROG_TEST_RUN runs skb programs on the loopback device.
    assert_eq!(arp_event.ifindex, 1);
    assert_ne!(arp_event.timestamp_ns, 0);
    assert_eq!(events[1].pkt_len, 41);
    assert_eq!(events[2].pkt_len, 14);
}

#[test]
fn frames_shorter_than_ethernet_never_reach_the_program() {
    if !have_root() {
        return;
    }
    let fx = Fixture::new();
    // The kernel refuses to build an skb under ETH_HLEN for a test run (EINVAL), just as no
    // real device hands tc such a frame, so "10 bytes" is covered by the 14-byte case above.
    let prog = fx.dp.from_container().expect("program");
    let mut out = [0u8; 64];
    let result = aya::TestRun::test_run(
        prog,
        aya::TestRunOptions {
            data_in: Some(&[0u8; 10]),
            data_out: Some(&mut out),
            ..Default::default()
        },
    );
    assert!(result.is_err(), "expected EINVAL, got {result:?}");
    fx.assert_only_drops(None, 0);
}

#[test]
fn unsupported_ethertypes_are_dropped() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let v6 = ethernet(BROADCAST, EthernetProtocol::Ipv6, &[0x60; 40]);
    let vlan = ethernet(BROADCAST, EthernetProtocol::Unknown(0x8100), &[0; 46]);
    for frame in [&v6, &vlan] {
        assert_eq!(fx.run(frame).0, TC_ACT_SHOT);
    }
    fx.assert_only_drops(Some(DropReason::UnsupportedL3), 2);
    let events = fx.events();
    let types: Vec<u16> = events.iter().map(|e| e.ethertype).collect();
    assert_eq!(types, [0x86dd, 0x8100]);
    // The Display form is what the agent logs.
    let line = events[0].to_string();
    assert!(
        line.starts_with("reason=unsupported_l3 hook=from_container"),
        "{line}"
    );
}

#[test]
fn arp_is_not_answered_before_config_is_written() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    // Simulate programs running against a CONFIG the agent has not filled in yet.
    {
        let map = fx
            .dp
            .ebpf_mut()
            .map_mut(map_names::CONFIG)
            .expect("CONFIG map");
        let mut config: aya::maps::HashMap<_, u32, Config> =
            aya::maps::HashMap::try_from(map).expect("hash map");
        config
            .insert(0, Config::default(), 0)
            .expect("write config");
    }
    let (verdict, _) = fx.run(&arp_request(GATEWAY_IP));
    assert_eq!(verdict, TC_ACT_SHOT);
    fx.assert_only_drops(Some(DropReason::NotReady), 1);

    fx.dp.set_config(config()).expect("set config");
    assert_eq!(fx.run(&arp_request(GATEWAY_IP)).0, TC_ACT_REDIRECT);
}

#[test]
fn drop_counters_list_every_reason_in_code_order() {
    if !have_root() {
        return;
    }
    let fx = Fixture::new();
    let names: Vec<&str> = fx
        .dp
        .drop_counters()
        .expect("counters")
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let expected: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(names, expected);
    assert_eq!(fx.dp.drop_events_lost().expect("lost"), 0);
}

#[test]
fn drop_events_carry_ports_and_are_limited_per_cpu_and_second() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::routed();
    // An unknown address of the sender's own subnet: dropped as unknown_endpoint.
    let frame = ipv4(Ipv4Address::new(10, 0, 0, 200), b"x");
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let sent = 1000 * cpus + 500;
    for _ in 0..sent {
        assert_eq!(fx.run(&frame).0, TC_ACT_SHOT);
    }
    fx.assert_only_drops(Some(DropReason::UnknownEndpoint), sent as u64);
    assert_eq!(
        fx.dp.drop_counters_by_hook().expect("by hook"),
        [("from_container", "unknown_endpoint", sent as u64)]
    );
    let events = fx.events();
    let lost = fx.dp.drop_events_lost().expect("lost");
    assert_eq!(
        events.len() as u64 + lost,
        sent as u64,
        "each drop reported or lost"
    );
    assert!(
        events.len() <= 1000 * cpus,
        "{} events from {cpus} CPUs",
        events.len()
    );
    let e = events.first().expect("an event");
    assert_eq!((e.src_port, e.dst_port, e.ip_proto), (40000, 7, 17));
    assert_eq!(e.src_ip, CONTAINER_IP.octets());
}
