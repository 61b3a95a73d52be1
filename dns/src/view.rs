//! The input of the resolver: what names exist, per network.
//!
//! [`DnsView`] is plain data the agent builds from its store on every change. Before it is
//! served it is compiled once into a [`CompiledView`] (lower-cased keys, one hash map per
//! network holding every answerable name, a reverse map for PTR), so that a query costs a few
//! hash lookups and no allocation beyond the answer itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Every name the embedded DNS answers for, grouped by network name.
///
/// Keys may be given in any case and with or without a trailing dot: compilation normalises
/// them, so the agent can fill the maps directly or use the `insert_*` helpers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsView {
    /// Network name -> names on that network.
    pub networks: BTreeMap<String, NetworkNames>,
}

/// The names that exist on one network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkNames {
    /// Service name -> how it is reached, its live tasks and published ports.
    pub services: BTreeMap<String, Service>,
    /// Container name -> its address on this network.
    pub containers: BTreeMap<String, Ipv4Addr>,
    /// Alias (`--alias`, network-scoped) -> the addresses of every container carrying it.
    pub aliases: BTreeMap<String, Vec<Ipv4Addr>>,
}

/// One service as seen on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// VIP or DNS round robin.
    pub endpoint: Endpoint,
    /// Addresses of the live tasks (replicas) on this network.
    pub tasks: Vec<Ipv4Addr>,
    /// Published ports, answered as `_<port>._<proto>.<service>` SRV records.
    pub ports: Vec<PublishedPort>,
}

/// How a service name resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Endpoint {
    /// The name resolves to one virtual IP, load-balanced by the dataplane.
    Vip(Ipv4Addr),
    /// `--endpoint-mode dnsrr`: the name resolves to the task addresses, shuffled.
    DnsRr,
}

/// A published port of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    /// Port number.
    pub port: u16,
    /// Transport.
    pub proto: PortProto,
}

/// Transport of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PortProto {
    /// `_tcp`
    Tcp,
    /// `_udp`
    Udp,
}

impl PortProto {
    fn label(self) -> &'static str {
        match self {
            Self::Tcp => "_tcp",
            Self::Udp => "_udp",
        }
    }
}

impl DnsView {
    /// An empty view: every query is forwarded.
    pub fn new() -> Self {
        Self::default()
    }

    /// The names of `network`, created empty if absent.
    pub fn network_mut(&mut self, network: &str) -> &mut NetworkNames {
        self.networks.entry(normalize(network)).or_default()
    }
}

impl NetworkNames {
    /// Adds (or replaces) a service.
    pub fn insert_service(&mut self, name: &str, service: Service) -> &mut Self {
        self.services.insert(normalize(name), service);
        self
    }

    /// Adds (or replaces) a container.
    pub fn insert_container(&mut self, name: &str, ip: Ipv4Addr) -> &mut Self {
        self.containers.insert(normalize(name), ip);
        self
    }

    /// Adds one address under an alias (several containers may share an alias).
    pub fn insert_alias(&mut self, alias: &str, ip: Ipv4Addr) -> &mut Self {
        let ips = self.aliases.entry(normalize(alias)).or_default();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
        self
    }
}

/// Lower-case, no trailing dot: the form every key is compared in.
pub(crate) fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What one name on one network answers.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    /// A records. `shuffle` is set for DNS round robin answers (dnsrr, `tasks.`), whose order
    /// is randomised per answer so clients that take the first address spread their load.
    Addrs {
        addrs: Arc<[Ipv4Addr]>,
        shuffle: bool,
    },
    /// One SRV record `_<port>._<proto>.<service>` pointing at `<service>`.
    Srv { port: u16, service: Arc<str> },
}

/// One network, compiled for lookup.
#[derive(Debug, Default)]
pub(crate) struct CompiledNetwork {
    /// Every answerable name on this network (services, `tasks.<svc>`, containers, aliases,
    /// SRV names), lower-case, without trailing dot.
    pub(crate) names: HashMap<Box<str>, Entry>,
    /// Address -> names to answer PTR with, best first (container, then `tasks.<svc>` or the
    /// service for a VIP, then aliases). Relative to the network: the answer appends it.
    pub(crate) reverse: HashMap<Ipv4Addr, Vec<Arc<str>>>,
}

/// A [`DnsView`] compiled for lookup; immutable once built and shared behind an `Arc`.
#[derive(Debug, Default)]
pub(crate) struct CompiledView {
    pub(crate) networks: HashMap<Box<str>, CompiledNetwork>,
    /// Every name on any network, so that a name on a network outside the asker's scope gets
    /// NXDOMAIN instead of being forwarded (which would leak it and waste the upstream's time).
    pub(crate) all_names: HashSet<Box<str>>,
    /// Every address on any network, for the same reason for PTR.
    pub(crate) all_addrs: HashSet<Ipv4Addr>,
}

impl CompiledView {
    pub(crate) fn compile(view: &DnsView) -> Self {
        let mut out = Self::default();
        for (net_name, names) in &view.networks {
            let net_key = normalize(net_name);
            if net_key.is_empty() {
                continue;
            }
            let compiled = compile_network(names);
            out.all_names.extend(compiled.names.keys().cloned());
            out.all_addrs.extend(compiled.reverse.keys().copied());
            // Two spellings of one network (e.g. "Front" and "front") merge, first one wins
            // per name: a view normally has one spelling, this only keeps the result defined.
            match out.networks.entry(net_key.into_boxed_str()) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(compiled);
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let existing = o.get_mut();
                    for (k, v) in compiled.names {
                        existing.names.entry(k).or_insert(v);
                    }
                    for (ip, ns) in compiled.reverse {
                        existing.reverse.entry(ip).or_default().extend(ns);
                    }
                }
            }
        }
        out
    }
}

fn compile_network(names: &NetworkNames) -> CompiledNetwork {
    let mut net = CompiledNetwork::default();
    // Reverse names are collected in priority order: containers, services, aliases.
    let mut reverse: HashMap<Ipv4Addr, Vec<Arc<str>>> = HashMap::new();
    let mut push_rev = |ip: Ipv4Addr, name: Arc<str>| {
        let v = reverse.entry(ip).or_default();
        if !v.contains(&name) {
            v.push(name);
        }
    };

    for (name, ip) in &names.containers {
        let key = normalize(name);
        if !key.is_empty() {
            push_rev(*ip, Arc::from(key.as_str()));
        }
    }

    // Insertion order gives priority when one name is several things on one network:
    // services first, then containers, then aliases (`or_insert` keeps the first).
    for (name, svc) in &names.services {
        let key = normalize(name);
        if key.is_empty() {
            continue;
        }
        let svc_name: Arc<str> = Arc::from(key.as_str());
        let tasks: Arc<[Ipv4Addr]> = dedup(svc.tasks.iter().copied()).into();
        let main = match svc.endpoint {
            Endpoint::Vip(vip) => {
                push_rev(vip, svc_name.clone());
                Entry::Addrs {
                    addrs: Arc::from([vip]),
                    shuffle: false,
                }
            }
            Endpoint::DnsRr => Entry::Addrs {
                addrs: tasks.clone(),
                shuffle: true,
            },
        };
        net.names.insert(key.clone().into_boxed_str(), main);
        let tasks_name = format!("tasks.{key}");
        for ip in tasks.iter() {
            // `tasks.<svc>` resolves back to the task address, so forward-confirmed reverse
            // DNS holds even when the task has no container name in the view.
            push_rev(*ip, Arc::from(tasks_name.as_str()));
        }
        net.names.insert(
            tasks_name.into_boxed_str(),
            Entry::Addrs {
                addrs: tasks,
                shuffle: true,
            },
        );
        for p in &svc.ports {
            net.names.insert(
                format!("_{}.{}.{key}", p.port, p.proto.label()).into_boxed_str(),
                Entry::Srv {
                    port: p.port,
                    service: svc_name.clone(),
                },
            );
        }
    }

    for (name, ip) in &names.containers {
        let key = normalize(name);
        if !key.is_empty() {
            net.names
                .entry(key.into_boxed_str())
                .or_insert(Entry::Addrs {
                    addrs: Arc::from([*ip]),
                    shuffle: false,
                });
        }
    }

    for (alias, ips) in &names.aliases {
        let key = normalize(alias);
        if key.is_empty() {
            continue;
        }
        let ips = dedup(ips.iter().copied());
        let alias_name: Arc<str> = Arc::from(key.as_str());
        for ip in &ips {
            push_rev(*ip, alias_name.clone());
        }
        net.names
            .entry(key.into_boxed_str())
            .or_insert(Entry::Addrs {
                addrs: ips.into(),
                // Several containers behind one alias are a round robin too.
                shuffle: true,
            });
    }

    net.reverse = reverse;
    net
}

fn dedup(ips: impl Iterator<Item = Ipv4Addr>) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = Vec::new();
    for ip in ips {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test ip")
    }

    #[test]
    fn compile_normalises_and_indexes() {
        let mut v = DnsView::new();
        let n = v.networks.entry("Front.".into()).or_default();
        n.services.insert(
            "Web".into(),
            Service {
                endpoint: Endpoint::Vip(ip("10.0.0.2")),
                tasks: vec![ip("10.0.0.5"), ip("10.0.0.6"), ip("10.0.0.5")],
                ports: vec![PublishedPort {
                    port: 80,
                    proto: PortProto::Tcp,
                }],
            },
        );
        n.containers.insert("C1".into(), ip("10.0.0.5"));
        n.aliases.insert("DB".into(), vec![ip("10.0.0.9")]);
        let c = CompiledView::compile(&v);
        let net = c.networks.get("front").expect("network");
        assert!(net.names.contains_key("web"));
        assert!(net.names.contains_key("tasks.web"));
        assert!(net.names.contains_key("_80._tcp.web"));
        assert!(net.names.contains_key("c1"));
        assert!(net.names.contains_key("db"));
        match net.names.get("tasks.web") {
            Some(Entry::Addrs { addrs, shuffle }) => {
                assert_eq!(addrs.len(), 2, "duplicates dropped");
                assert!(*shuffle);
            }
            other => panic!("unexpected {other:?}"),
        }
        let rev = net.reverse.get(&ip("10.0.0.5")).expect("reverse");
        assert_eq!(&*rev[0], "c1", "container name first");
        assert_eq!(&*rev[1], "tasks.web");
        assert!(c.all_names.contains("db"));
        assert!(c.all_addrs.contains(&ip("10.0.0.2")));
    }

    #[test]
    fn service_wins_over_container_of_same_name() {
        let mut v = DnsView::new();
        v.network_mut("n")
            .insert_service(
                "x",
                Service {
                    endpoint: Endpoint::Vip(ip("10.0.0.2")),
                    tasks: vec![],
                    ports: vec![],
                },
            )
            .insert_container("X", ip("10.0.0.3"));
        let c = CompiledView::compile(&v);
        match c.networks["n"].names.get("x") {
            Some(Entry::Addrs { addrs, .. }) => assert_eq!(&addrs[..], &[ip("10.0.0.2")]),
            other => panic!("unexpected {other:?}"),
        }
    }
}
