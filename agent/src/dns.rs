//! The embedded DNS of this node's containers: the cluster view turned into names, and one
//! resolver listener per container at 127.0.0.11:53 inside its namespace.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use imbl::ordmap::DiffItem;
use netagent_dns::{DnsView, NetworkNames, PortProto, PublishedPort, Resolver, ResolverConfig};
use tokio::sync::{oneshot, watch};

use crate::model::{Endpoint, EndpointMode, Protocol};
use crate::netlink;
use crate::runtime::lock;
use crate::view::ClusterView;

/// Where containers find their resolver (Docker's address).
pub const DNS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);

/// The names every container may see, before scoping to its networks.
pub fn dns_view(view: &ClusterView) -> DnsView {
    let mut networks: BTreeSet<&str> = view
        .endpoints
        .values()
        .map(|e| e.network.as_str())
        .collect();
    for svc in view.services.values() {
        networks.extend(svc.networks.iter().map(|sn| sn.network.as_str()));
    }
    let mut dns = DnsView::new();
    for network in networks {
        *dns.network_mut(network) = network_names(view, network);
    }
    dns
}

/// The endpoints of `network`: the view keys them "<network>/<container>", so they are one
/// range of its ordered map.
fn network_endpoints<'a>(
    view: &'a ClusterView,
    network: &'a str,
) -> impl Iterator<Item = &'a Endpoint> + 'a {
    let prefix = format!("{network}/");
    view.endpoints
        .range(prefix.clone()..)
        .take_while(move |(key, _)| key.starts_with(&prefix))
        .map(|(_, ep)| ep)
        .filter(move |ep| ep.network == network)
}

/// The names on one network: its containers and their aliases, and the services on it with
/// the replicas DNS hands out (ready, on a live node: a dead node's tasks must not be).
pub fn network_names(view: &ClusterView, network: &str) -> NetworkNames {
    let endpoints: Vec<&Endpoint> = network_endpoints(view, network).collect();
    let mut names = NetworkNames::default();
    for ep in &endpoints {
        names.insert_container(&ep.container, ep.ip);
        for alias in &ep.aliases {
            names.insert_alias(alias, ep.ip);
        }
    }
    for svc in view.services.values() {
        for sn in svc.networks.iter().filter(|sn| sn.network == network) {
            let mut tasks: Vec<Ipv4Addr> = endpoints
                .iter()
                .filter(|e| {
                    e.service.as_deref() == Some(svc.name.as_str())
                        && e.ready
                        && view.alive.contains(&e.node)
                })
                .map(|e| e.ip)
                .collect();
            tasks.sort();
            let endpoint = match (svc.endpoint_mode, sn.vip) {
                (EndpointMode::Vip, Some(vip)) => netagent_dns::Endpoint::Vip(vip),
                _ => netagent_dns::Endpoint::DnsRr,
            };
            let ports = svc
                .ports
                .iter()
                .map(|p| PublishedPort {
                    port: p.published,
                    proto: match p.protocol {
                        Protocol::Tcp => PortProto::Tcp,
                        Protocol::Udp => PortProto::Udp,
                    },
                })
                .collect();
            names.insert_service(
                &svc.name,
                netagent_dns::Service {
                    endpoint,
                    tasks,
                    ports,
                },
            );
        }
    }
    names
}

/// The networks whose names may differ between `old` and `new`, when only their endpoints
/// differ (`None` otherwise: services, networks or live nodes changed, which can touch any
/// network). imbl's diff skips the subtrees the two maps share, so this costs the change.
fn changed_networks(old: &ClusterView, new: &ClusterView) -> Option<BTreeSet<String>> {
    if !(old.networks.ptr_eq(&new.networks)
        && old.alive.ptr_eq(&new.alive)
        && old.services.ptr_eq(&new.services))
    {
        return None;
    }
    let mut networks = BTreeSet::new();
    for item in old.endpoints.diff(&new.endpoints) {
        match item {
            DiffItem::Add(_, ep) | DiffItem::Remove(_, ep) => {
                networks.insert(ep.network.clone());
            }
            DiffItem::Update { old, new } => {
                networks.insert(old.1.network.clone());
                networks.insert(new.1.network.clone());
            }
        }
    }
    Some(networks)
}

/// The node's resolver: published from the view, served per container.
pub struct Dns {
    resolver: Arc<Resolver>,
    listeners: Mutex<HashMap<String, Listener>>,
}

struct Listener {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    /// `upstreams` empty: the node's resolv.conf decides.
    pub fn new(upstreams: &[SocketAddr]) -> Arc<Self> {
        let upstreams = if upstreams.is_empty() {
            std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| netagent_dns::upstreams_from_resolv_conf(&t))
                .unwrap_or_default()
        } else {
            upstreams.to_vec()
        };
        tracing::info!(?upstreams, "DNS upstreams");
        Arc::new(Self {
            resolver: Resolver::new(ResolverConfig {
                upstreams,
                ..ResolverConfig::default()
            }),
            listeners: Mutex::new(HashMap::new()),
        })
    }

    /// Queries answered on this node so far, by result, and their latency.
    pub fn stats(&self) -> netagent_dns::StatsSnapshot {
        self.resolver.stats()
    }

    /// Publishes every view change at once: answers follow the store within one watch event.
    /// Changes that leave every name as it was (task states, container pids) publish nothing.
    pub async fn follow(self: Arc<Self>, mut view_rx: watch::Receiver<Arc<ClusterView>>) {
        let mut published: Option<Arc<ClusterView>> = None;
        loop {
            let view = view_rx.borrow_and_update().clone();
            if !published.as_ref().is_some_and(|p| p.same_routing(&view)) {
                // Containers came or went: only their networks are rebuilt.
                match published.as_ref().and_then(|p| changed_networks(p, &view)) {
                    Some(networks) => {
                        let changed = networks
                            .into_iter()
                            .map(|n| {
                                let names = network_names(&view, &n);
                                let empty = names == NetworkNames::default();
                                (n, (!empty).then_some(names))
                            })
                            .collect();
                        self.resolver.publish_networks(changed);
                    }
                    None => self.resolver.publish(dns_view(&view)),
                }
                published = Some(view);
            }
            if view_rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Opens 127.0.0.11:53 (UDP and TCP) inside `netns` and serves `networks`' names there.
    pub fn start(&self, container: &str, netns: &Path, networks: &[String]) -> anyhow::Result<()> {
        use anyhow::Context as _;
        // Sockets keep the namespace they were made in; only a throw-away thread enters it.
        let (udp, tcp) = netlink::run_in_netns(netns, || -> std::io::Result<_> {
            let udp = std::net::UdpSocket::bind(DNS_ADDR)?;
            let tcp = std::net::TcpListener::bind(DNS_ADDR)?;
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })
        .context("entering the container namespace")?
        .with_context(|| format!("binding {DNS_ADDR} in the container"))?;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let handler = self.resolver.handler(networks);
        let (stop, stop_rx) = oneshot::channel();
        let name = container.to_string();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            if let Err(e) = netagent_dns::serve(handler, udp, tcp, shutdown).await {
                tracing::warn!(container = %name, error = %e, "DNS listener stopped");
            }
        });
        if let Some(old) =
            lock(&self.listeners).insert(container.to_string(), Listener { stop, task })
        {
            let _ = old.stop.send(());
        }
        tracing::debug!(container, "DNS listening at 127.0.0.11:53");
        Ok(())
    }

    /// Closes a container's listener (before its namespace goes).
    pub async fn stop(&self, container: &str) {
        let listener = lock(&self.listeners).remove(container);
        if let Some(l) = listener {
            let _ = l.stop.send(());
            let _ = l.task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Service, ServiceNetwork};

    fn endpoint(network: &str, container: &str, ip: &str, node: &str) -> Endpoint {
        Endpoint {
            id: container.into(),
            container: container.into(),
            network: network.into(),
            ip: ip.parse().unwrap(),
            mac: String::new(),
            node: node.into(),
            ifname: "eth0".into(),
            host_ifname: String::new(),
            service: Some("web".into()),
            aliases: vec!["www".into()],
            ready: true,
        }
    }

    #[test]
    fn view_scopes_services_and_live_tasks() {
        let v = sample_view();
        let d = dns_view(&v);
        let front = &d.networks["front"];
        assert_eq!(
            front.containers["web.1"],
            "10.1.0.3".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(front.aliases["www"].len(), 2);
        let web = &front.services["web"];
        assert!(
            matches!(web.endpoint, netagent_dns::Endpoint::Vip(ip) if ip.to_string() == "10.1.0.2")
        );
        // web.2's node is down: not a live task.
        assert_eq!(web.tasks, vec!["10.1.0.3".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(web.ports[0].port, 8080);
    }

    #[test]
    fn a_container_change_rebuilds_its_networks_to_what_a_full_build_gives() {
        let v1 = sample_view();
        let mut v2 = v1.clone();
        v2.endpoints.insert(
            "front/web.3".into(),
            endpoint("front", "web.3", "10.1.0.5", "n1"),
        );
        // A network whose name sorts right after "front" must not leak into its range.
        v2.endpoints
            .insert("front2/x".into(), endpoint("front2", "x", "10.2.0.3", "n1"));
        let changed = changed_networks(&v1, &v2).expect("only endpoints changed");
        assert_eq!(
            changed.iter().map(String::as_str).collect::<Vec<_>>(),
            ["front", "front2"]
        );
        let mut incremental = dns_view(&v1);
        for n in &changed {
            incremental
                .networks
                .insert(n.clone(), network_names(&v2, n));
        }
        assert_eq!(incremental, dns_view(&v2));
        assert_eq!(
            incremental.networks["front"].services["web"].tasks.len(),
            2,
            "web.3 is a live task"
        );
        assert!(!incremental.networks["front"].containers.contains_key("x"));
        // A service change can touch any network: no shortcut.
        let mut v3 = v2.clone();
        v3.services.remove("web");
        assert!(changed_networks(&v2, &v3).is_none());
    }

    fn sample_view() -> ClusterView {
        let mut v = ClusterView::default();
        for (n, alive) in [("n1", true), ("n2", false)] {
            v.nodes.insert(
                n.into(),
                crate::fixtures::node(n, "198.18.0.11".parse().unwrap()),
            );
            if alive {
                v.alive.insert(n.into());
            }
        }
        for (c, ip, node) in [("web.1", "10.1.0.3", "n1"), ("web.2", "10.1.0.4", "n2")] {
            v.endpoints
                .insert(format!("front/{c}"), endpoint("front", c, ip, node));
        }
        v.services.insert(
            "web".into(),
            Service {
                networks: vec![ServiceNetwork {
                    network: "front".into(),
                    vip: Some("10.1.0.2".parse().unwrap()),
                }],
                ports: vec![crate::model::PortConfig::parse("8080:80").unwrap()],
                ..crate::fixtures::service("web", "", 1)
            },
        );
        v
    }
}
