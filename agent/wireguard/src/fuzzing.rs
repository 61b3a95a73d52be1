//! Shared by the fuzz target (`agent/wireguard/fuzz`) and its regression tests: an engine pair
//! with an established session, and the check that whatever arrives at the WireGuard port,
//! nothing panics and nothing but VXLAN from the peer's tunnel address comes out.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::engine::{Engine, Inbox, LocalTunnel, Outbox, PeerConfig};
use crate::keys::KeyPair;

const VXLAN_PORT: u16 = 4790;

pub struct Pair {
    pub a: Engine,
    pub b: Engine,
    a_end: SocketAddrV4,
    b_end: SocketAddrV4,
    a_addr: Ipv4Addr,
    b_addr: Ipv4Addr,
    /// A valid data packet from a to b, and a's handshake initiation to b.
    data: Vec<u8>,
    init: Vec<u8>,
}

fn vxlan(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&60u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&VXLAN_PORT.to_be_bytes());
    p[24..26].copy_from_slice(&40u16.to_be_bytes());
    p
}

fn deliver(to: &Engine, from: SocketAddrV4, out: &Outbox) -> Outbox {
    let mut next = Outbox::default();
    for i in 0..out.items.len() {
        let (d, _) = out.datagram(i);
        let mut inbox = Inbox::default();
        to.receive(from, d, &mut inbox, &mut next);
    }
    next
}

impl Pair {
    pub fn new() -> Self {
        let (ka, kb) = (KeyPair::generate(), KeyPair::generate());
        let a_addr = Ipv4Addr::new(169, 254, 128, 1);
        let b_addr = Ipv4Addr::new(169, 254, 128, 2);
        let a_end = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 11), 51820);
        let b_end = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 12), 51820);
        let a = Engine::new(
            ka.clone(),
            LocalTunnel {
                addr: a_addr,
                vxlan_port: VXLAN_PORT,
                control_port: 0,
            },
        );
        let b = Engine::new(
            kb.clone(),
            LocalTunnel {
                addr: b_addr,
                vxlan_port: VXLAN_PORT,
                control_port: 0,
            },
        );
        let mut oa = Outbox::default();
        a.set_peers(
            &[PeerConfig {
                name: "b".into(),
                public_key: *kb.public.as_bytes(),
                tunnel_addr: b_addr,
                endpoint: b_end,
            }],
            &mut oa,
        );
        let init = oa.datagram(0).0.to_vec();
        let mut ob = Outbox::default();
        b.set_peers(
            &[PeerConfig {
                name: "a".into(),
                public_key: *ka.public.as_bytes(),
                tunnel_addr: a_addr,
                endpoint: a_end,
            }],
            &mut ob,
        );
        // a's initiation reaches b; b's answer completes a's side.
        let reply = deliver(&b, a_end, &oa);
        let _ = deliver(&a, b_end, &reply);
        let mut data = Outbox::default();
        let peer = a.peer_for(b_addr).expect("peer b");
        a.encapsulate(&peer, &[&vxlan(a_addr, b_addr)], &mut data);
        let data = data.datagram(0).0.to_vec();
        Self {
            a,
            b,
            a_end,
            b_end,
            a_addr,
            b_addr,
            data,
            init,
        }
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

/// Feeds a datagram made from `input` to b (and its answers to a): the first byte picks the
/// sender (a's endpoint or a stranger) and whether the rest is sent as it is or XORed into a
/// valid data packet or handshake initiation of a's.
pub fn check_receive(p: &Pair, input: &[u8]) {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let from = if mode & 1 == 0 {
        p.a_end
    } else {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 99), 51820)
    };
    let datagram = match (mode >> 1) % 3 {
        0 => rest.to_vec(),
        1 => mutate(&p.data, rest),
        _ => mutate(&p.init, rest),
    };
    let mut inbox = Inbox::default();
    let mut out = Outbox::default();
    p.b.receive(from, &datagram, &mut inbox, &mut out);
    for pkt in inbox.packets() {
        assert_eq!(
            &pkt[12..16],
            &p.a_addr.octets(),
            "only the peer's tunnel address"
        );
        assert_eq!(&pkt[16..20], &p.b_addr.octets(), "only to us");
        assert_eq!(pkt[9], 17);
        assert_eq!(u16::from_be_bytes([pkt[22], pkt[23]]), VXLAN_PORT);
    }
    // Whatever b answered must not upset a either.
    let _ = deliver(&p.a, p.b_end, &out);
}

fn mutate(base: &[u8], xor: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for (i, x) in xor.iter().enumerate() {
        if i < v.len() {
            v[i] ^= x;
        } else {
            v.push(*x);
        }
    }
    v
}
