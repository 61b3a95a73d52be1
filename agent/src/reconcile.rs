//! Level-triggered reconciliation of the datapath maps with the cluster view.
//!
//! From a view snapshot we compute the full desired content of the ENDPOINTS and NETWORKS maps
//! for this node, read what the maps hold, and write only the difference. Start-up runs the same
//! code, so a restarted agent changes nothing that is already right and the pinned maps keep
//! forwarding throughout.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use netagent_datapath::{
    Datapath, DatapathError, EndpointInfo, L4Proto, NetworkInfo, NodeInfo, PublishedInfo,
    ServiceInfo,
};
use tokio::sync::watch;

use crate::model::{self, Availability, EndpointMode, Network, Protocol, Service};
use crate::runtime::{Runtime, lock};
use crate::view::ClusterView;

/// Also reconcile this often without a store event: repairs anything changed behind our back.
const RESYNC: Duration = Duration::from_secs(10);

pub type Subnet = (Ipv4Addr, u8);

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Desired {
    pub endpoints: BTreeMap<Ipv4Addr, EndpointInfo>,
    pub networks: BTreeMap<Subnet, NetworkInfo>,
    /// VIP -> its backend set.
    pub services: BTreeMap<Ipv4Addr, ServiceInfo>,
    /// Backend set id -> replicas taking new connections, in a stable order.
    pub backend_sets: BTreeMap<u32, Vec<Ipv4Addr>>,
    /// (published port, protocol) -> backend set and target port.
    pub published: BTreeMap<(u16, u8), PublishedInfo>,
    /// Advertise addresses of every node of the cluster: the only senders of overlay traffic
    /// the datapath accepts.
    pub nodes: BTreeMap<Ipv4Addr, NodeInfo>,
}

/// The datapath's backend set of a service on its `index`-th network: the replicas have a
/// different address on each network, so each (service, network) is a set of its own.
pub fn set_id(svc: &Service, index: usize) -> u32 {
    (svc.num << 8) | (index as u32 & 0xff)
}

fn l4(p: Protocol) -> L4Proto {
    match p {
        Protocol::Tcp => L4Proto::Tcp,
        Protocol::Udp => L4Proto::Udp,
    }
}

/// Backend sets, VIPs and published ports. A replica takes new connections only while its node
/// is alive and `active`: a drained or dead node's replicas keep their established flows
/// (conntrack) and get no new ones.
fn desired_services(view: &ClusterView, d: &mut Desired) {
    let live = view.live_replicas();
    for svc in view.services.values() {
        if svc.endpoint_mode != EndpointMode::Vip {
            continue;
        }
        for (i, sn) in svc.networks.iter().enumerate() {
            let (Some(vip), Some(net)) = (sn.vip, view.networks.get(&sn.network)) else {
                continue;
            };
            let id = set_id(svc, i);
            let replicas: Vec<Ipv4Addr> = live
                .get(&(svc.name.as_str(), sn.network.as_str()))
                .into_iter()
                .flatten()
                .filter(|e| {
                    view.nodes
                        .get(&e.node)
                        .is_some_and(|n| n.availability == Availability::Active)
                })
                .filter(|e| d.endpoints.contains_key(&e.ip))
                .map(|e| e.ip)
                .collect();
            d.backend_sets.insert(id, replicas);
            d.services.insert(
                vip,
                ServiceInfo {
                    id,
                    vni: net.vni,
                    flags: 0,
                },
            );
        }
        // The mesh balances over the replicas on the service's first network.
        if svc.networks.first().is_some_and(|n| n.vip.is_some()) {
            for p in &svc.ports {
                d.published.insert(
                    (p.published, l4(p.protocol) as u8),
                    PublishedInfo::new(set_id(svc, 0), p.target),
                );
            }
        }
    }
}

pub fn network_info(net: &Network) -> NetworkInfo {
    NetworkInfo {
        vni: net.vni,
        flags: if net.encrypted {
            netagent_datapath::NETWORK_F_ENCRYPTED
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

/// The maps' desired content. `local_ifindex` maps this node's host-side veth names to their
/// ifindex; a local endpoint whose interface does not exist (yet) gets no entry.
pub fn desired(view: &ClusterView, node: &str, local_ifindex: &HashMap<String, u32>) -> Desired {
    let mut d = Desired::default();
    for n in view.nodes.values() {
        d.nodes.insert(n.address, NodeInfo::default());
    }
    for net in view.networks.values() {
        d.networks.insert(
            (net.subnet.network(), net.subnet.prefix_len()),
            network_info(net),
        );
    }
    for ep in view.endpoints.values() {
        let Some(net) = view.networks.get(&ep.network) else {
            continue;
        };
        let mac = model::parse_mac(&ep.mac).unwrap_or(model::endpoint_mac(ep.ip));
        let info = if ep.node == node {
            match local_ifindex.get(&ep.host_ifname) {
                Some(&ifindex) => local_endpoint(net.vni, ifindex, mac),
                None => continue,
            }
        } else {
            match view.nodes.get(&ep.node) {
                Some(n) => remote_endpoint(net.vni, n.address, mac),
                None => continue,
            }
        };
        d.endpoints.insert(ep.ip, info);
    }
    desired_services(view, &mut d);
    d
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserted: usize,
    pub removed: usize,
}

/// Writes the difference between `want` and the maps.
pub fn apply(dp: &mut Datapath, want: &Desired) -> Result<Changes, DatapathError> {
    let mut changes = Changes::default();
    let have_nodes: BTreeMap<Ipv4Addr, NodeInfo> = dp.nodes()?.into_iter().collect();
    for (addr, info) in &want.nodes {
        if have_nodes.get(addr) != Some(info) {
            dp.upsert_node(*addr, info)?;
            changes.upserted += 1;
        }
    }
    let have_nets: BTreeMap<Subnet, NetworkInfo> = dp.networks()?.into_iter().collect();
    for (subnet, info) in &want.networks {
        if have_nets.get(subnet) != Some(info) {
            dp.upsert_network(*subnet, info)?;
            changes.upserted += 1;
        }
    }
    let have_eps: BTreeMap<Ipv4Addr, EndpointInfo> = dp.endpoints()?.into_iter().collect();
    for (ip, info) in &want.endpoints {
        if have_eps.get(ip) != Some(info) {
            dp.upsert_endpoint(*ip, info)?;
            changes.upserted += 1;
        }
    }
    for ip in have_eps.keys() {
        if !want.endpoints.contains_key(ip) && dp.remove_endpoint(*ip)? {
            changes.removed += 1;
        }
    }
    apply_services(dp, want, &mut changes)?;
    // Networks go last so no endpoint is ever left without its subnet.
    for subnet in have_nets.keys() {
        if !want.networks.contains_key(subnet) && dp.remove_network(*subnet)? {
            changes.removed += 1;
        }
    }
    for addr in have_nodes.keys() {
        if !want.nodes.contains_key(addr) && dp.remove_node(*addr)? {
            changes.removed += 1;
        }
    }
    Ok(changes)
}

/// Sets first (a VIP or port never points at a set that does not exist), then VIPs and ports;
/// removals the other way round.
fn apply_services(
    dp: &mut Datapath,
    want: &Desired,
    changes: &mut Changes,
) -> Result<(), DatapathError> {
    let have_sets: BTreeMap<u32, Vec<Ipv4Addr>> = dp.backend_sets()?.into_iter().collect();
    for (id, ips) in &want.backend_sets {
        if have_sets.get(id) != Some(ips) {
            dp.set_backends(*id, ips)?;
            changes.upserted += 1;
        }
    }
    let have_svcs: BTreeMap<Ipv4Addr, ServiceInfo> = dp.services()?.into_iter().collect();
    for (vip, info) in &want.services {
        if have_svcs.get(vip) != Some(info) {
            dp.upsert_service(*vip, info)?;
            changes.upserted += 1;
        }
    }
    let have_pub: BTreeMap<(u16, u8), (L4Proto, PublishedInfo)> = dp
        .published()?
        .into_iter()
        .map(|(port, proto, info)| ((port, proto as u8), (proto, info)))
        .collect();
    for ((port, proto), info) in &want.published {
        if have_pub.get(&(*port, *proto)).map(|(_, i)| i) != Some(info) {
            let proto = if *proto == L4Proto::Udp as u8 {
                L4Proto::Udp
            } else {
                L4Proto::Tcp
            };
            dp.upsert_published(*port, proto, info)?;
            changes.upserted += 1;
        }
    }
    for ((port, proto_num), (proto, _)) in &have_pub {
        if !want.published.contains_key(&(*port, *proto_num))
            && dp.remove_published(*port, *proto)?
        {
            changes.removed += 1;
        }
    }
    for vip in have_svcs.keys() {
        if !want.services.contains_key(vip) && dp.remove_service(*vip)? {
            changes.removed += 1;
        }
    }
    for id in have_sets.keys() {
        if !want.backend_sets.contains_key(id) && dp.remove_backends(*id)? {
            changes.removed += 1;
        }
    }
    Ok(())
}

pub fn upsert_network(dp: &mut Datapath, net: &Network) -> Result<(), DatapathError> {
    dp.upsert_network(
        (net.subnet.network(), net.subnet.prefix_len()),
        &network_info(net),
    )
}

pub fn upsert_local_endpoint(
    dp: &mut Datapath,
    ip: Ipv4Addr,
    vni: u32,
    ifindex: u32,
    mac: [u8; 6],
) -> Result<(), DatapathError> {
    dp.upsert_endpoint(ip, &local_endpoint(vni, ifindex, mac))
}

/// How often idle established connections are removed from CONNTRACK. The shortest timeout
/// there is the close timeout (10 s by default); a few seconds of overstay cost nothing.
const CT_GC_EVERY: Duration = Duration::from_secs(5);

/// Runs forever: removes established connections that went idle past their timeout (the
/// programs never delete; CT_NEW is an LRU and needs no help).
pub async fn conntrack_gc(datapath: Arc<std::sync::Mutex<Datapath>>) {
    let mut tick = tokio::time::interval(CT_GC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = netagent_datapath::monotonic_coarse_ns();
        // The walk happens under the lock, like every other map write: it is bounded by the
        // table size and runs on a blocking thread so the runtime keeps serving.
        let dp = datapath.clone();
        let result = tokio::task::spawn_blocking(move || lock(&dp).conntrack_gc(now)).await;
        match result {
            Ok(Ok(stats)) if stats.expired > 0 => tracing::debug!(
                expired = stats.expired,
                live = stats.live,
                new = stats.new,
                "conntrack garbage collected"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "conntrack garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "conntrack garbage collection panicked"),
        }
    }
}

/// Runs forever: on every view change (and every `RESYNC`), bring the maps in line.
pub async fn run(mut view_rx: watch::Receiver<Arc<ClusterView>>, runtime: Arc<Runtime>) {
    loop {
        let view = view_rx.borrow_and_update().clone();
        if view.revision > 0
            && let Err(e) = once(&view, &runtime).await
        {
            tracing::warn!(error = %e, "datapath reconcile failed; will retry");
        }
        tokio::select! {
            changed = view_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

async fn once(view: &ClusterView, runtime: &Runtime) -> anyhow::Result<()> {
    let mut local_ifindex = HashMap::new();
    for ep in view.endpoints.values().filter(|e| e.node == runtime.node) {
        if let Some(i) = runtime.netlink.link_index(&ep.host_ifname).await? {
            local_ifindex.insert(ep.host_ifname.clone(), i);
        }
    }
    let want = desired(view, &runtime.node, &local_ifindex);
    let changes = apply(&mut lock(&runtime.datapath), &want)?;
    if changes != Changes::default() {
        tracing::info!(
            revision = view.revision,
            upserted = changes.upserted,
            removed = changes.removed,
            "datapath reconciled"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Availability, Endpoint, Node};

    fn view() -> ClusterView {
        let mut v = ClusterView {
            revision: 7,
            ..Default::default()
        };
        for (name, subnet, vni) in [("a", "10.1.0.0/24", 4096), ("b", "10.2.0.0/24", 4097)] {
            v.networks.insert(
                name.into(),
                Network {
                    name: name.into(),
                    id: "x".into(),
                    driver: "overlay".into(),
                    vni,
                    subnet: subnet.parse().unwrap(),
                    gateway: subnet.replace(".0/24", ".1").parse().unwrap(),
                    encrypted: name == "b",
                    attachable: false,
                    mtu: None,
                    labels: Default::default(),
                    created: String::new(),
                },
            );
        }
        for (n, addr) in [("n1", "198.18.0.11"), ("n2", "198.18.0.12")] {
            v.nodes.insert(
                n.into(),
                Node {
                    name: n.into(),
                    address: addr.parse().unwrap(),
                    availability: Availability::Active,
                    created: String::new(),
                },
            );
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
                name: "web".into(),
                id: "x".into(),
                num: 3,
                endpoint_mode: EndpointMode::Vip,
                networks: vec![crate::model::ServiceNetwork {
                    network: "a".into(),
                    vip: Some("10.1.0.9".parse().unwrap()),
                }],
                ports: vec![crate::model::PortConfig::parse("8080:80").unwrap()],
                created: String::new(),
            },
        );
        let ifx = HashMap::from([("nac1".to_string(), 11u32)]);
        let d = desired(&v, "n1", &ifx);
        let id = 3 << 8;
        let c1: Ipv4Addr = "10.1.0.2".parse().unwrap();
        let c2: Ipv4Addr = "10.1.0.3".parse().unwrap();
        assert_eq!(d.backend_sets[&id], vec![c1, c2]);
        let vip = d.services[&"10.1.0.9".parse().unwrap()];
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
        let ifx = HashMap::from([("nac1".to_string(), 11u32)]);
        let d = desired(&v, "n1", &ifx);
        assert_eq!(d.networks.len(), 2);
        assert_eq!(d.networks[&("10.2.0.0".parse().unwrap(), 24)].vni, 4097);
        assert_ne!(d.networks[&("10.2.0.0".parse().unwrap(), 24)].flags, 0);
        // c1 local with its ifindex; c2 remote on n2; c3 local but no interface yet: absent;
        // c4 on an unknown node: absent.
        assert_eq!(d.endpoints.len(), 2);
        let c1 = d.endpoints[&"10.1.0.2".parse().unwrap()];
        assert_eq!((c1.ifindex, c1.node_ip, c1.vni), (11, 0, 4096));
        let c2 = d.endpoints[&"10.1.0.3".parse().unwrap()];
        assert_eq!(c2.ifindex, 0);
        assert_eq!(
            c2.node_ip,
            netagent_datapath::node_ip_to_abi("198.18.0.12".parse().unwrap())
        );
        assert_eq!(c2.mac, model::endpoint_mac("10.1.0.3".parse().unwrap()));
    }
}
