//! The embedded DNS of this node's containers: the cluster view turned into names, and one
//! resolver listener per container at 127.0.0.11:53 inside its namespace.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use netagent_dns::{DnsView, PortProto, PublishedPort, Resolver, ResolverConfig};
use tokio::sync::{oneshot, watch};

use crate::model::{EndpointMode, Protocol};
use crate::netlink;
use crate::runtime::lock;
use crate::view::ClusterView;

/// Where containers find their resolver (Docker's address).
pub const DNS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);

/// The names every container may see, before scoping to its networks.
pub fn dns_view(view: &ClusterView) -> DnsView {
    let mut dns = DnsView::new();
    for ep in view.endpoints.values() {
        let names = dns.network_mut(&ep.network);
        names.insert_container(&ep.container, ep.ip);
        for alias in &ep.aliases {
            names.insert_alias(alias, ep.ip);
        }
    }
    let replicas = view.live_replicas();
    for svc in view.services.values() {
        for sn in &svc.networks {
            // Only replicas whose node is alive: a dead node's tasks must not be handed out.
            let mut tasks: Vec<Ipv4Addr> = replicas
                .get(&(svc.name.as_str(), sn.network.as_str()))
                .map(|eps| eps.iter().map(|e| e.ip).collect())
                .unwrap_or_default();
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
            dns.network_mut(&sn.network).insert_service(
                &svc.name,
                netagent_dns::Service {
                    endpoint,
                    tasks,
                    ports,
                },
            );
        }
    }
    dns
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
                self.resolver.publish(dns_view(&view));
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
    use crate::model::{Availability, Endpoint, Node, Service, ServiceNetwork};

    #[test]
    fn view_scopes_services_and_live_tasks() {
        let mut v = ClusterView::default();
        for (n, alive) in [("n1", true), ("n2", false)] {
            v.nodes.insert(
                n.into(),
                Node {
                    name: n.into(),
                    address: "198.18.0.11".parse().unwrap(),
                    availability: Availability::Active,
                    created: String::new(),
                    uplink_mtu: None,
                    reserved_ports: vec![],
                    wireguard: None,
                    labels: Default::default(),
                },
            );
            if alive {
                v.alive.insert(n.into());
            }
        }
        for (c, ip, node) in [("web.1", "10.1.0.3", "n1"), ("web.2", "10.1.0.4", "n2")] {
            v.endpoints.insert(
                format!("front/{c}"),
                Endpoint {
                    id: c.into(),
                    container: c.into(),
                    network: "front".into(),
                    ip: ip.parse().unwrap(),
                    mac: String::new(),
                    node: node.into(),
                    ifname: "eth0".into(),
                    host_ifname: String::new(),
                    service: Some("web".into()),
                    aliases: vec!["www".into()],
                    ready: true,
                },
            );
        }
        v.services.insert(
            "web".into(),
            Service {
                name: "web".into(),
                id: String::new(),
                num: 1,
                endpoint_mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: "front".into(),
                    vip: Some("10.1.0.2".parse().unwrap()),
                }],
                ports: vec![crate::model::PortConfig::parse("8080:80").unwrap()],
                created: String::new(),
                spec: None,
                previous_spec: None,
                version: 0,
                update_status: None,
                labels: Default::default(),
                updated: None,
            },
        );
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
}
