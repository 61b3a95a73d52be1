//! The datapath's desired content for this node, computed from a view snapshot and what this
//! node has plugged. Pure: no kernel, no store.

use std::net::Ipv4Addr;

use netagent_datapath::{
    ENDPOINT_F_ENCRYPTED, ENDPOINT_F_INTERNAL, ENDPOINT_F_REPLICA, EndpointInfo, L4Proto,
    NODE_F_TUNNEL_ADDR, NetworkInfo, NodeInfo, PublishedInfo, ServiceInfo,
};

use super::LocalState;
use crate::model::{self, Availability, Endpoint, EndpointMode, Network, Protocol, Service};
use crate::view::ClusterView;

pub type Subnet = (Ipv4Addr, u8);

/// A map's desired content. Persistent (structurally shared): a pass clones the last desired
/// state in O(1), changes what the view's change touched, and diffs against what it wrote in
/// O(changes).
pub type Table<K, V> = imbl::OrdMap<K, V>;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Desired {
    pub endpoints: Table<Ipv4Addr, EndpointInfo>,
    pub networks: Table<Subnet, NetworkInfo>,
    /// VIP -> its backend set.
    pub services: Table<Ipv4Addr, ServiceInfo>,
    /// Backend set id -> replicas taking new connections, in a stable order.
    pub backend_sets: Table<u32, Vec<Ipv4Addr>>,
    /// (published port, protocol) -> backend set and target port.
    pub published: Table<(u16, u8), PublishedInfo>,
    /// Advertise addresses of every node of the cluster: the only senders of overlay traffic
    /// the datapath accepts.
    pub nodes: Table<Ipv4Addr, NodeInfo>,
}

/// The datapath's backend set of a service on its `index`-th network: the replicas have a
/// different address on each network, so each (service, network) is a set of its own.
pub fn set_id(svc: &Service, index: usize) -> u32 {
    (svc.num << 8) | (index as u32 & 0xff)
}

/// The protocol's number in the published ports' key.
pub(super) fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => L4Proto::Tcp as u8,
        Protocol::Udp => L4Proto::Udp as u8,
    }
}

/// The entries one service contributes to the maps.
#[derive(Debug, Default)]
pub(super) struct ServiceEntries {
    pub sets: Vec<(u32, Vec<Ipv4Addr>)>,
    pub vips: Vec<(Ipv4Addr, ServiceInfo)>,
    pub ports: Vec<((u16, u8), PublishedInfo)>,
}

/// A VIP service's backend sets, VIPs and published ports. `replicas(network)` gives its
/// ready replicas on live nodes in container order; a replica whose own record gets no endpoint
/// entry is none of its backends. A replica takes new connections only while it is ready and its node is alive and
/// `active`: a drained or dead node's replicas, and exited or stopping ones, keep their
/// established flows (conntrack) and get no new ones.
pub(super) fn service_entries<'v>(
    view: &'v ClusterView,
    local: &LocalState,
    node: &str,
    svc: &Service,
    replicas: impl Fn(&str) -> Vec<&'v Endpoint>,
) -> ServiceEntries {
    let mut out = ServiceEntries::default();
    if svc.endpoint_mode != EndpointMode::Vip {
        return out;
    }
    for (i, sn) in svc.networks.iter().enumerate() {
        let (Some(vip), Some(net)) = (sn.vip, view.networks.get(&sn.network)) else {
            continue;
        };
        let id = set_id(svc, i);
        let ips: Vec<Ipv4Addr> = replicas(&sn.network)
            .into_iter()
            .filter(|e| {
                view.nodes
                    .get(&e.node)
                    .is_some_and(|n| n.availability == Availability::Active)
            })
            .filter(|e| has_entry(view, node, local, e))
            .filter(|e| !(e.node == node && local.unready.contains(&e.container)))
            .map(|e| e.ip)
            .collect();
        out.sets.push((id, ips));
        out.vips.push((
            vip,
            ServiceInfo {
                id,
                vni: net.vni,
                flags: 0,
            },
        ));
    }
    // The mesh balances over the replicas on the service's first network.
    if svc.networks.first().is_some_and(|n| n.vip.is_some()) {
        for p in &svc.ports {
            out.ports.push((
                (p.published, proto_number(p.protocol)),
                PublishedInfo::new(set_id(svc, 0), p.target),
            ));
        }
    }
    out
}

pub fn network_info(net: &Network) -> NetworkInfo {
    NetworkInfo {
        vni: net.vni,
        flags: if net.encrypted {
            netagent_datapath::NETWORK_F_ENCRYPTED
        } else {
            0
        } | if net.internal {
            netagent_datapath::NETWORK_F_INTERNAL
        } else {
            0
        },
    }
}

pub fn local_endpoint(vni: u32, ifindex: u32, mac: [u8; 6]) -> EndpointInfo {
    EndpointInfo {
        vni,
        ifindex,
        node_ip: 0,
        mac,
        flags: netagent_datapath::ENDPOINT_F_LOCAL,
    }
}

pub fn remote_endpoint(vni: u32, node: Ipv4Addr, mac: [u8; 6]) -> EndpointInfo {
    EndpointInfo {
        vni,
        ifindex: 0,
        node_ip: netagent_datapath::node_ip_to_abi(node),
        mac,
        flags: 0,
    }
}

/// Whether [`endpoint_entry`] gives `ep` an entry.
fn has_entry(view: &ClusterView, node: &str, local: &LocalState, ep: &Endpoint) -> bool {
    view.networks.contains_key(&ep.network)
        && if ep.node == node {
            local.ifaces.contains_key(&ep.host_ifname)
        } else {
            view.nodes.contains_key(&ep.node)
        }
}

/// One endpoint record's entry, or none: a local endpoint whose interface is not plugged
/// (yet, or any more), or one of an unknown network or node.
pub(super) fn endpoint_entry(
    view: &ClusterView,
    node: &str,
    local: &LocalState,
    ep: &Endpoint,
) -> Option<EndpointInfo> {
    let net = view.networks.get(&ep.network)?;
    let mac = model::parse_mac(&ep.mac).unwrap_or(model::endpoint_mac(ep.ip));
    let mut info = if ep.node == node {
        local_endpoint(net.vni, *local.ifaces.get(&ep.host_ifname)?, mac)
    } else {
        remote_endpoint(net.vni, view.nodes.get(&ep.node)?.address, mac)
    };
    if net.encrypted {
        info.flags |= ENDPOINT_F_ENCRYPTED;
    }
    if net.internal {
        info.flags |= ENDPOINT_F_INTERNAL;
    }
    if ep.service.is_some() {
        info.flags |= ENDPOINT_F_REPLICA;
    }
    Some(info)
}

/// The nodes' and networks' entries: any change to either makes the next desired state a
/// whole one.
fn nodes_and_networks(view: &ClusterView, d: &mut Desired) {
    for n in view.nodes.values() {
        let tunnel_ip = n.wireguard.as_ref().map(|w| w.tunnel_addr);
        d.nodes.insert(
            n.address,
            NodeInfo {
                flags: 0,
                tunnel_ip: tunnel_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
            },
        );
        // Packets out of the tunnel carry the sending node's tunnel address as source.
        if let Some(t) = tunnel_ip {
            d.nodes.insert(
                t,
                NodeInfo {
                    flags: NODE_F_TUNNEL_ADDR,
                    tunnel_ip: t.octets(),
                },
            );
        }
    }
    for net in view.networks.values() {
        d.networks.insert(
            (net.subnet.network(), net.subnet.prefix_len()),
            network_info(net),
        );
    }
}

/// The maps' whole desired content, and whether two records claimed one key (an address, a
/// VIP, a port, a set): the later one in key order wins, which only a whole computation can
/// reproduce, so [`super::Basis`] does not compute the next state from a change then.
pub(super) fn build(view: &ClusterView, node: &str, local: &LocalState) -> (Desired, bool) {
    let mut d = Desired::default();
    let mut conflicted = false;
    nodes_and_networks(view, &mut d);
    for ep in view.endpoints.values() {
        if let Some(info) = endpoint_entry(view, node, local, ep) {
            conflicted |= d.endpoints.insert(ep.ip, info).is_some();
        }
    }
    let live = view.live_replicas();
    for svc in view.services.values() {
        let e = service_entries(view, local, node, svc, |net| {
            live.get(&(svc.name.as_str(), net))
                .cloned()
                .unwrap_or_default()
        });
        for (id, ips) in e.sets {
            conflicted |= d.backend_sets.insert(id, ips).is_some();
        }
        for (vip, info) in e.vips {
            conflicted |= d.services.insert(vip, info).is_some();
        }
        for (port, info) in e.ports {
            conflicted |= d.published.insert(port, info).is_some();
        }
    }
    (d, conflicted)
}

/// The maps' desired content. `local` holds this node's plugged interfaces (host-side veth
/// name -> ifindex): a local endpoint whose interface is not plugged (yet, or any more) gets
/// no entry, so a pass that runs while a container is being built or torn down can never
/// remove or resurrect its endpoint behind the runtime's back.
pub fn desired(view: &ClusterView, node: &str, local: &LocalState) -> Desired {
    build(view, node, local).0
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::Availability;

    /// Networks a and b (encrypted), nodes n1 and n2, endpoints c1 (a, n1), c2 (a, n2), c3 (b,
    /// n1), c4 (a, on an unknown node n9).
    pub(in crate::reconcile) fn view() -> ClusterView {
        let mut v = ClusterView {
            revision: 7,
            ..Default::default()
        };
        for (name, subnet, vni) in [("a", "10.1.0.0/24", 4096), ("b", "10.2.0.0/24", 4097)] {
            v.networks.insert(
                name.into(),
                Network {
                    id: "x".into(),
                    encrypted: name == "b",
                    ..crate::fixtures::network(name, subnet, vni)
                },
            );
        }
        for (n, addr) in [("n1", "198.18.0.11"), ("n2", "198.18.0.12")] {
            v.nodes
                .insert(n.into(), crate::fixtures::node(n, addr.parse().unwrap()));
        }
        for (c, net, ip, node) in [
            ("c1", "a", "10.1.0.2", "n1"),
            ("c2", "a", "10.1.0.3", "n2"),
            ("c3", "b", "10.2.0.2", "n1"),
            ("c4", "a", "10.1.0.4", "n9"),
        ] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            v.endpoints.insert(
                format!("{net}/{c}"),
                Endpoint {
                    id: c.into(),
                    container: c.into(),
                    network: net.into(),
                    ip,
                    mac: model::format_mac(model::endpoint_mac(ip)),
                    node: node.into(),
                    ifname: "eth0".into(),
                    host_ifname: format!("na{c}"),
                    service: None,
                    aliases: vec![],
                    ready: true,
                },
            );
        }
        v
    }

    #[test]
    fn services_become_sets_vips_and_ports() {
        let mut v = view();
        v.alive.insert("n1".into());
        v.alive.insert("n2".into());
        for id in ["a/c1", "a/c2"] {
            v.endpoints.get_mut(id).unwrap().service = Some("web".into());
        }
        v.services.insert(
            "web".into(),
            Service {
                networks: vec![crate::model::ServiceNetwork {
                    network: "a".into(),
                    vip: Some("10.1.0.9".parse().unwrap()),
                }],
                ports: vec![crate::model::PortConfig::parse("8080:80").unwrap()],
                ..crate::fixtures::service("web", "x", 3)
            },
        );
        let ifx = LocalState::with_ifaces([("nac1", 11u32)]);
        let d = desired(&v, "n1", &ifx);
        let id = 3 << 8;
        let c1: Ipv4Addr = "10.1.0.2".parse().unwrap();
        let c2: Ipv4Addr = "10.1.0.3".parse().unwrap();
        assert_eq!(d.backend_sets[&id], vec![c1, c2]);
        let vip = d.services[&"10.1.0.9".parse::<Ipv4Addr>().unwrap()];
        assert_eq!((vip.id, vip.vni), (id, 4096));
        let p = d.published[&(8080, L4Proto::Tcp as u8)];
        assert_eq!((p.service_id, p.target()), (id, 80));

        // Draining n2 or losing its lease takes c2 out of new connections.
        v.nodes.get_mut("n2").unwrap().availability = Availability::Drain;
        assert_eq!(desired(&v, "n1", &ifx).backend_sets[&id], vec![c1]);
        v.nodes.get_mut("n2").unwrap().availability = Availability::Active;
        v.alive.remove("n2");
        assert_eq!(desired(&v, "n1", &ifx).backend_sets[&id], vec![c1]);
    }

    #[test]
    fn desired_state_from_view() {
        let v = view();
        let ifx = LocalState::with_ifaces([("nac1", 11u32)]);
        let d = desired(&v, "n1", &ifx);
        assert_eq!(d.networks.len(), 2);
        assert_eq!(d.networks[&("10.2.0.0".parse().unwrap(), 24)].vni, 4097);
        assert_ne!(d.networks[&("10.2.0.0".parse().unwrap(), 24)].flags, 0);
        // c1 local with its ifindex; c2 remote on n2; c3 local but no interface yet: absent;
        // c4 on an unknown node: absent.
        assert_eq!(d.endpoints.len(), 2);
        let c1 = d.endpoints[&"10.1.0.2".parse::<Ipv4Addr>().unwrap()];
        assert_eq!((c1.ifindex, c1.node_ip, c1.vni), (11, 0, 4096));
        let c2 = d.endpoints[&"10.1.0.3".parse::<Ipv4Addr>().unwrap()];
        assert_eq!(c2.ifindex, 0);
        assert_eq!(
            c2.node_ip,
            netagent_datapath::node_ip_to_abi("198.18.0.12".parse().unwrap())
        );
        assert_eq!(c2.mac, model::endpoint_mac("10.1.0.3".parse().unwrap()));
        assert_eq!(c1.flags & ENDPOINT_F_INTERNAL, 0, "a has a way out");
    }

    #[test]
    fn internal_networks_mark_their_endpoints() {
        let mut v = view();
        v.networks.get_mut("a").unwrap().internal = true;
        let ifx = LocalState::with_ifaces([("nac1", 11u32)]);
        let d = desired(&v, "n1", &ifx);
        let net = d.networks[&("10.1.0.0".parse().unwrap(), 24)];
        assert_ne!(net.flags & netagent_datapath::NETWORK_F_INTERNAL, 0);
        for ip in ["10.1.0.2", "10.1.0.3"] {
            let ep = d.endpoints[&ip.parse::<Ipv4Addr>().unwrap()];
            assert_ne!(ep.flags & ENDPOINT_F_INTERNAL, 0, "{ip}");
        }
        let b = d.networks[&("10.2.0.0".parse().unwrap(), 24)];
        assert_eq!(b.flags & netagent_datapath::NETWORK_F_INTERNAL, 0);
    }
}
