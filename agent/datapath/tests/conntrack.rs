//! Connection tracking under BPF_PROG_TEST_RUN: only a SYN creates a TCP connection, the
//! handshake moves it to the established table where a flood of new connections cannot reach
//! it, per-state timeouts, and the agent-side garbage collection and purge of a backend.

mod common;

use std::time::Duration;

use common::*;
use netagent_datapath::{DropReason, LbConfig, Limits, monotonic_coarse_ns};
use smoltcp::wire::Ipv4Address;

const BACKENDS: [Ipv4Address; 3] = [LOCAL_PEER_IP, REMOTE_PEER_IP, B3_IP];
const TCP: u8 = 6;

fn to_vip(sport: u16, flags: TcpFlags) -> Vec<u8> {
    tcp_frame(CONTAINER_IP, sport, VIP, 80, flags, b"")
}

/// The backend a client packet was DNATed to (the packet must have been balanced).
fn backend_of(fx: &Fixture, frame: &[u8]) -> Ipv4Address {
    let (verdict, out, _) = fx.run_container_hook(frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let dst = parse_checked(&out).dst;
    assert!(BACKENDS.contains(&dst), "balanced, got {dst}");
    dst
}

/// (entries in the established table, entries in CT_NEW).
fn table_sizes(fx: &Fixture) -> (usize, usize) {
    let all = fx.dp.conntrack_tables().expect("tables");
    let live = all.iter().filter(|(_, _, live)| *live).count();
    (live, all.len() - live)
}

#[test]
fn only_a_syn_opens_a_connection_and_others_get_a_reset() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    for flags in [TcpFlags::Ack, TcpFlags::Psh, TcpFlags::Fin] {
        let frame = to_vip(40000, flags);
        let (verdict, out, _) = fx.run_container_hook(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{flags:?} answered");
        assert_reset(&out, &frame);
    }
    // A reset is never answered with a reset.
    let (verdict, _, _) = fx.run_container_hook(&to_vip(40000, TcpFlags::Rst));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert!(fx.ct().is_empty(), "none of them created a connection");
    assert_eq!(fx.dp.rr_cursor(SVC_ID).expect("cursor"), Some(0));
    fx.assert_only_drops(Some(DropReason::NoConntrack), 4);
}

#[test]
fn the_handshake_promotes_a_connection_to_the_established_table() {
    if !have_root() {
        return;
    }
    let fx = Fixture::with_services();
    let first = backend_of(&fx, &to_vip(40000, TcpFlags::Syn));
    assert_eq!(
        table_sizes(&fx),
        (0, 2),
        "half-open: both entries in CT_NEW"
    );
    // A retransmitted SYN keeps the connection where it is.
    assert_eq!(backend_of(&fx, &to_vip(40000, TcpFlags::Syn)), first);
    assert_eq!(table_sizes(&fx), (0, 2));
    // The client's ACK completes the handshake.
    assert_eq!(backend_of(&fx, &to_vip(40000, TcpFlags::Ack)), first);
    assert_eq!(table_sizes(&fx), (2, 0), "both entries established");
    assert_eq!(backend_of(&fx, &to_vip(40000, TcpFlags::Psh)), first);
    // The backend's replies still get the VIP back.
    let mut fx = fx;
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let reply = tcp_frame(LOCAL_PEER_IP, 80, CONTAINER_IP, 40000, TcpFlags::Ack, b"ok");
    let (_, out) = fx.run(&reply);
    assert_eq!(parse_checked(&out).src, VIP);
    fx.assert_only_drops(None, 0);
}

#[test]
fn established_connections_survive_a_syn_flood_of_twice_the_tables() {
    if !have_root() {
        return;
    }
    let limits = Limits {
        conntrack: 256,
        ct_new: 256,
    };
    let fx = Fixture::with_services_in(Fixture::with_limits(limits));
    // Three established connections, one per backend.
    let mut established = Vec::new();
    for sport in 1000..1003u16 {
        let backend = backend_of(&fx, &to_vip(sport, TcpFlags::Syn));
        assert_eq!(backend_of(&fx, &to_vip(sport, TcpFlags::Ack)), backend);
        established.push((sport, backend));
    }
    // A flood of SYNs from other ports: twice the capacity of both tables together.
    let flood = 2 * (limits.conntrack + limits.ct_new) as u16;
    for sport in 10_000..10_000 + flood {
        let (verdict, _, _) = fx.run_container_hook(&to_vip(sport, TcpFlags::Syn));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "new connections are still balanced"
        );
    }
    // The established connections are untouched and keep their backends.
    for (sport, backend) in &established {
        assert_eq!(backend_of(&fx, &to_vip(*sport, TcpFlags::Psh)), *backend);
    }
    let (live, new) = table_sizes(&fx);
    assert_eq!(live, 6, "only the established pairs in CONNTRACK");
    assert!(
        new <= limits.ct_new as usize,
        "the flood stayed in CT_NEW ({new})"
    );
    fx.assert_only_drops(None, 0);
}

#[test]
fn udp_flows_are_promoted_by_their_first_reply() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    let query = udp_frame(CONTAINER_IP, 5353, VIP, 53, b"q");
    let backend = backend_of(&fx, &query);
    assert_eq!(backend, LOCAL_PEER_IP);
    assert_eq!(table_sizes(&fx), (0, 2));
    // More queries without answers do not promote it.
    assert_eq!(backend_of(&fx, &query), backend);
    assert_eq!(table_sizes(&fx), (0, 2));
    fx.send_as(LOCAL_PEER_IP, LOCAL_PEER_MAC, 46);
    let answer = udp_frame(LOCAL_PEER_IP, 53, CONTAINER_IP, 5353, b"a");
    let (_, out) = fx.run(&answer);
    assert_eq!(parse_checked(&out).src, VIP, "reverse NAT");
    assert_eq!(table_sizes(&fx), (2, 0));
    fx.send_as(CONTAINER_IP, CONTAINER_MAC, TEST_RUN_IFINDEX);
    assert_eq!(backend_of(&fx, &query), backend);
    fx.assert_only_drops(None, 0);
}

/// The services fixture with 1 s close and UDP timeouts.
fn with_short_timeouts() -> Fixture {
    let mut fx = Fixture::with_services();
    fx.dp
        .set_lb_config(LbConfig {
            close_timeout: Duration::from_secs(1),
            udp_timeout: Duration::from_secs(1),
            ..fx.dp.lb_config().expect("lb config")
        })
        .expect("short timeouts");
    fx
}

#[test]
fn closing_connections_time_out_fast_and_gc_removes_idle_ones() {
    if !have_root() {
        return;
    }
    let mut fx = with_short_timeouts();
    // Two established connections; one closes.
    for sport in [41000u16, 41001] {
        backend_of(&fx, &to_vip(sport, TcpFlags::Syn));
        backend_of(&fx, &to_vip(sport, TcpFlags::Ack));
    }
    backend_of(&fx, &to_vip(41000, TcpFlags::Fin));
    // An answered UDP flow, established too (round robin gives it the third backend, which
    // is on this node, so its answer comes through from_container).
    assert_eq!(
        backend_of(&fx, &udp_frame(CONTAINER_IP, 5353, VIP, 53, b"q")),
        B3_IP
    );
    fx.send_as(B3_IP, B3_MAC, 46);
    let (_, out) = fx.run(&udp_frame(B3_IP, 53, CONTAINER_IP, 5353, b"a"));
    assert_eq!(parse_checked(&out).src, VIP);
    fx.send_as(CONTAINER_IP, CONTAINER_MAC, TEST_RUN_IFINDEX);
    assert_eq!(table_sizes(&fx).0, 6);

    // Nothing is idle yet.
    let stats = fx.dp.conntrack_gc(monotonic_coarse_ns()).expect("gc");
    assert_eq!((stats.live, stats.expired), (6, 0));
    std::thread::sleep(Duration::from_millis(1500));
    // The closed TCP pair and the UDP pair are past their 1 s timeouts, the open TCP
    // connection (6 h) is not.
    let stats = fx.dp.conntrack_gc(monotonic_coarse_ns()).expect("gc");
    assert_eq!((stats.live, stats.expired), (6, 4));
    let left = fx.ct();
    assert_eq!(left.len(), 2);
    assert!(
        left.iter()
            .all(|(k, _)| k.proto == TCP && (k.sport() == 41001 || k.dport() == 41001))
    );
    // A late packet of the closed connection gets a reset, not a new backend.
    let late = to_vip(41000, TcpFlags::Ack);
    let (verdict, out, _) = fx.run_container_hook(&late);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_reset(&out, &late);
}

#[test]
fn gc_spares_an_entry_that_a_new_connection_took_after_the_walk() {
    if !have_root() {
        return;
    }
    let mut fx = with_short_timeouts();
    let old = backend_of(&fx, &to_vip(41000, TcpFlags::Syn));
    backend_of(&fx, &to_vip(41000, TcpFlags::Ack));
    backend_of(&fx, &to_vip(41000, TcpFlags::Fin));
    std::thread::sleep(Duration::from_millis(1500));
    // The walk finds the closed connection's pair idle...
    let now = monotonic_coarse_ns();
    let (live, doomed) = fx.dp.conntrack_gc_walk(now).expect("walk");
    assert_eq!((live, doomed.len()), (2, 2));
    // ...and before its deletions the client reuses the port for a new connection.
    let syn = tcp_frame_seq(CONTAINER_IP, 41000, VIP, 80, TcpFlags::Syn, 5000, b"");
    let new = backend_of(&fx, &syn);
    assert_ne!(new, old, "round robin");
    assert_eq!(backend_of(&fx, &to_vip(41000, TcpFlags::Ack)), new);
    assert_eq!(table_sizes(&fx), (2, 0), "the new pair is established");
    // The deletions look again: the forward key is the new connection's now, the old
    // reverse entry is already gone with it.
    assert_eq!(fx.dp.conntrack_gc_delete(&doomed, now).expect("delete"), 0);
    assert_eq!(table_sizes(&fx), (2, 0));
    assert_eq!(backend_of(&fx, &to_vip(41000, TcpFlags::Psh)), new);
    fx.assert_only_drops(None, 0);
}

#[test]
fn purging_a_backend_removes_its_connections_only() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    let mut by_backend = Vec::new();
    for sport in 42000..42003u16 {
        let b = backend_of(&fx, &to_vip(sport, TcpFlags::Syn));
        backend_of(&fx, &to_vip(sport, TcpFlags::Ack));
        by_backend.push((sport, b));
    }
    assert_eq!(fx.ct().len(), 6);
    let gone = by_backend[1].1;
    assert_eq!(fx.dp.purge_backend(ip(gone)).expect("purge"), 2);
    assert_eq!(fx.ct().len(), 4);
    for (sport, backend) in &by_backend {
        let frame = to_vip(*sport, TcpFlags::Psh);
        if *backend == gone {
            // Its client fails fast instead of reaching whoever gets the address next.
            let (verdict, out, _) = fx.run_container_hook(&frame);
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_reset(&out, &frame);
        } else {
            assert_eq!(backend_of(&fx, &frame), *backend);
        }
    }
}
