//! Userspace WireGuard between the nodes of the cluster, carrying the VXLAN packets of
//! encrypted networks.
//!
//! Split the way boringtun splits itself: `engine` is the protocol side (peers, sessions, key
//! rotation, what may come out of the tunnel) with no I/O and is tested without root;
//! `device` does the I/O (a TUN device with virtio-net headers, one UDP socket with GSO and
//! GRO, batched reads and writes) and runs the engine on threads of its own. `packet` holds
//! the header and coalescing code both need; `keys` the node's static key pair.

pub mod device;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod packet;

pub use device::{Device, DeviceConfig, DeviceStats};
pub use engine::{Engine, LocalTunnel, PeerConfig, PeerStats, RxVerdict};
pub use keys::KeyPair;

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::engine::{Inbox, Outbox};
    use super::*;
    use crate::packet::tests::udp;

    const VXLAN_PORT: u16 = 4790;

    struct Node {
        engine: Engine,
        key: KeyPair,
        addr: Ipv4Addr,
        endpoint: SocketAddrV4,
    }

    fn node(i: u8) -> Node {
        let key = KeyPair::generate();
        let addr = Ipv4Addr::new(169, 254, 128, i);
        Node {
            engine: Engine::new(
                key.clone(),
                LocalTunnel {
                    addr,
                    vxlan_port: VXLAN_PORT,
                    control_port: 0,
                },
            ),
            key,
            addr,
            endpoint: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10 + i), 51820),
        }
    }

    fn config(n: &Node, name: &str) -> PeerConfig {
        PeerConfig {
            name: name.into(),
            public_key: *n.key.public.as_bytes(),
            tunnel_addr: n.addr,
            endpoint: n.endpoint,
        }
    }

    /// Delivers everything in `out` (from `from`) to the nodes it is addressed to, repeatedly,
    /// until nobody has anything left to say; returns what the node `watch` decrypted.
    fn exchange(
        nodes: &[&Node],
        mut out: Vec<(SocketAddrV4, Outbox)>,
        watch: usize,
    ) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for _ in 0..10 {
            let mut next = Vec::new();
            for (from, ob) in out.drain(..) {
                for i in 0..ob.items.len() {
                    let (dgram, to) = ob.datagram(i);
                    let Some((j, n)) = nodes.iter().enumerate().find(|(_, n)| n.endpoint == to)
                    else {
                        continue;
                    };
                    let mut inbox = Inbox::default();
                    let mut reply = Outbox::default();
                    n.engine.receive(from, dgram, &mut inbox, &mut reply);
                    if j == watch {
                        got.extend(inbox.packets().iter().map(|p| p.to_vec()));
                    }
                    next.push((n.endpoint, reply));
                }
            }
            if next.iter().all(|(_, o)| o.items.is_empty()) {
                break;
            }
            out = next;
        }
        got
    }

    fn vxlan(from: &Node, to: &Node, fill: u8) -> Vec<u8> {
        udp(
            from.addr.octets(),
            to.addr.octets(),
            40000,
            VXLAN_PORT,
            100,
            fill,
        )
    }

    fn send(a: &Node, b: &Node, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = Outbox::default();
        let peer = a.engine.peer_for(b.addr).expect("peer");
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        a.engine.encapsulate(&peer, &refs, &mut out);
        exchange(&[a, b], vec![(a.endpoint, out)], 1)
    }

    fn pair() -> (Node, Node) {
        let (a, b) = (node(1), node(2));
        let mut oa = Outbox::default();
        let mut ob = Outbox::default();
        a.engine.set_peers(&[config(&b, "b")], &mut oa);
        b.engine.set_peers(&[config(&a, "a")], &mut ob);
        // Both start a handshake at once; whatever happens, one session comes up.
        exchange(&[&a, &b], vec![(a.endpoint, oa), (b.endpoint, ob)], 0);
        (a, b)
    }

    #[test]
    fn peers_handshake_and_carry_vxlan_both_ways() {
        let (a, b) = pair();
        let p = vxlan(&a, &b, 7);
        assert_eq!(send(&a, &b, std::slice::from_ref(&p)), vec![p]);
        let q = vxlan(&b, &a, 8);
        let mut out = Outbox::default();
        b.engine
            .encapsulate(&b.engine.peer_for(a.addr).unwrap(), &[&q], &mut out);
        assert_eq!(exchange(&[&a, &b], vec![(b.endpoint, out)], 0), vec![q]);
        let stats = a.engine.stats();
        assert_eq!(stats.len(), 1);
        assert!(stats[0].since_handshake.is_some());
        assert!(stats[0].tx_bytes > 0 && stats[0].rx_bytes > 0);
    }

    #[test]
    fn only_vxlan_from_the_peer_to_us_comes_out() {
        let (a, b) = pair();
        let forged = [
            // From another address than the peer's tunnel address.
            udp(
                [169, 254, 128, 9],
                b.addr.octets(),
                40000,
                VXLAN_PORT,
                50,
                1,
            ),
            // To another destination (the tunnel must not route into the node).
            udp(a.addr.octets(), [10, 0, 0, 1], 40000, VXLAN_PORT, 50, 1),
            // Not the encrypted VXLAN port.
            udp(a.addr.octets(), b.addr.octets(), 40000, 22, 50, 1),
        ];
        for f in &forged {
            assert!(send(&a, &b, std::slice::from_ref(f)).is_empty());
        }
        assert_eq!(
            b.engine
                .counters
                .rx_forbidden
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
    }

    #[test]
    fn garbage_replays_and_strangers_are_dropped() {
        let (a, b) = pair();
        let mut inbox = Inbox::default();
        let mut out = Outbox::default();
        for junk in [&b"hello"[..], &[0u8; 0], &[1, 0, 0, 0], &[4u8; 200]] {
            let v = b.engine.receive(a.endpoint, junk, &mut inbox, &mut out);
            assert!(
                matches!(
                    v,
                    RxVerdict::Malformed | RxVerdict::UnknownPeer | RxVerdict::Rejected
                ),
                "{v:?}"
            );
        }
        // A replayed data packet.
        let mut enc = Outbox::default();
        a.engine.encapsulate(
            &a.engine.peer_for(b.addr).unwrap(),
            &[&vxlan(&a, &b, 1)],
            &mut enc,
        );
        let (dgram, _) = enc.datagram(0);
        let dgram = dgram.to_vec();
        assert_eq!(
            b.engine.receive(a.endpoint, &dgram, &mut inbox, &mut out),
            RxVerdict::Data
        );
        assert_eq!(
            b.engine.receive(a.endpoint, &dgram, &mut inbox, &mut out),
            RxVerdict::Rejected
        );
        // A handshake from a key nobody configured.
        let stranger = node(3);
        let mut so = Outbox::default();
        stranger.engine.set_peers(&[config(&b, "b")], &mut so);
        let (init, _) = so.datagram(0);
        assert_eq!(
            b.engine
                .receive(stranger.endpoint, init, &mut inbox, &mut out),
            RxVerdict::UnknownPeer
        );
        assert!(out.items.is_empty(), "no answer to strangers");
    }

    #[test]
    fn rotating_a_key_never_interrupts_traffic() {
        let (a, b) = pair();
        let p = vxlan(&a, &b, 1);
        // a rotates: publishes the new key (b learns it), then starts using it.
        let new = KeyPair::generate();
        let mut ob = Outbox::default();
        let mut b_view = config(&a, "a");
        b_view.public_key = *new.public.as_bytes();
        b.engine.set_peers(&[b_view], &mut ob);
        // Traffic still flows on the old session while the new handshake is pending.
        assert_eq!(send(&a, &b, std::slice::from_ref(&p)), vec![p.clone()]);
        let mut oa = Outbox::default();
        a.engine.rotate_key(new, &mut oa);
        assert_eq!(
            send(&a, &b, std::slice::from_ref(&p)),
            vec![p.clone()],
            "old session meanwhile"
        );
        exchange(&[&a, &b], vec![(a.endpoint, oa), (b.endpoint, ob)], 1);
        for _ in 0..3 {
            assert_eq!(send(&a, &b, std::slice::from_ref(&p)), vec![p.clone()]);
        }
        assert_eq!(a.engine.public_key(), b.engine.stats()[0].public_key);
        // Both sides run the new session beside the old one until the old retires.
        assert_eq!(a.engine.stats()[0].sessions, 2);
        assert_eq!(b.engine.stats()[0].sessions, 2);
    }

    #[test]
    fn a_restarted_peer_gets_traffic_going_again() {
        let (a, b) = pair();
        // b restarts: same key, no sessions.
        let b2 = Node {
            engine: Engine::new(
                b.key.clone(),
                LocalTunnel {
                    addr: b.addr,
                    vxlan_port: VXLAN_PORT,
                    control_port: 0,
                },
            ),
            key: b.key.clone(),
            addr: b.addr,
            endpoint: b.endpoint,
        };
        let mut ob = Outbox::default();
        b2.engine.set_peers(&[config(&a, "a")], &mut ob);
        // a still has its old session and sends on it; b2 cannot read it but answers with a
        // handshake, after which everything flows.
        let p = vxlan(&a, &b2, 5);
        let _ = send(&a, &b2, std::slice::from_ref(&p));
        exchange(&[&a, &b2], vec![(b2.endpoint, ob)], 1);
        assert_eq!(send(&a, &b2, std::slice::from_ref(&p)), vec![p]);
    }
}
