//! The input of the resolver: what names exist, per network.
//!
//! [`DnsView`] is plain data the agent builds from its store on every change. Before it is
//! served it is compiled once into a [`CompiledView`] (lower-cased keys, one hash map per
//! network holding every answerable name, a reverse map for PTR), so that a query costs a few
//! hash lookups and no allocation beyond the answer itself.

use std::collections::{BTreeMap, HashMap};
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
///
/// Networks are compiled one by one and shared between successive views: a change compiles
/// only the networks whose names changed ([`CompiledView::compile_from`]), and the indexes of
/// every name and address count the networks holding each (persistent maps, so the next view
/// starts from this one's at no cost and adjusts only what the changed networks bring).
#[derive(Debug, Default)]
pub(crate) struct CompiledView {
    pub(crate) networks: HashMap<Box<str>, Arc<CompiledNetwork>>,
    /// Every name on any network, so that a name on a network outside the asker's scope gets
    /// NXDOMAIN instead of being forwarded (which would leak it and waste the upstream's time).
    /// Name -> how many networks have it.
    pub(crate) all_names: imbl::HashMap<Box<str>, u32>,
    /// Every address on any network, for the same reason for PTR; address -> networks.
    pub(crate) all_addrs: imbl::HashMap<Ipv4Addr, u32>,
}

/// A view's networks by normalised name, each with the spellings that normalise to it, in
/// the view's order (normally exactly one).
type Grouped<'a> = HashMap<String, Vec<(&'a str, &'a NetworkNames)>>;

fn grouped(view: &DnsView) -> Grouped<'_> {
    let mut out: Grouped<'_> = HashMap::new();
    for (name, names) in &view.networks {
        let key = normalize(name);
        if !key.is_empty() {
            out.entry(key).or_default().push((name.as_str(), names));
        }
    }
    out
}

impl CompiledView {
    #[cfg(test)]
    pub(crate) fn compile(view: &DnsView) -> Self {
        Self::compile_from(view, &DnsView::default(), &Self::default())
    }

    /// `view` compiled, taking from `prev` (compiled from `prev_view`) every network whose
    /// names are unchanged: the cost is compiling the changed networks and comparing the rest.
    pub(crate) fn compile_from(view: &DnsView, prev_view: &DnsView, prev: &Self) -> Self {
        let old = grouped(prev_view);
        let new = grouped(view);
        let mut out = Self {
            networks: HashMap::with_capacity(new.len()),
            all_names: prev.all_names.clone(),
            all_addrs: prev.all_addrs.clone(),
        };
        for (key, spellings) in &new {
            let kept = prev.networks.get(key.as_str());
            if let Some(net) = kept
                && old.get(key) == Some(spellings)
            {
                out.networks.insert(key.as_str().into(), net.clone());
                continue;
            }
            if let Some(net) = kept {
                out.count(net, false);
            }
            let compiled = compile_spellings(spellings);
            out.count(&compiled, true);
            out.networks.insert(key.as_str().into(), Arc::new(compiled));
        }
        for (key, net) in &prev.networks {
            if !new.contains_key(&**key) {
                out.count(net, false);
            }
        }
        out
    }

    /// `prev` with the networks in `changed` (normalised names) compiled anew, or gone where
    /// `None`; every other network is shared with `prev`.
    pub(crate) fn with_networks(prev: &Self, changed: &[(String, Option<NetworkNames>)]) -> Self {
        let mut out = Self {
            networks: prev.networks.clone(),
            all_names: prev.all_names.clone(),
            all_addrs: prev.all_addrs.clone(),
        };
        for (key, names) in changed {
            if let Some(old) = out.networks.remove(key.as_str()) {
                out.count(&old, false);
            }
            if let Some(names) = names {
                let compiled = compile_network(names);
                out.count(&compiled, true);
                out.networks.insert(key.as_str().into(), Arc::new(compiled));
            }
        }
        out
    }

    /// Adds (or removes) one network's names and addresses to (from) the indexes.
    fn count(&mut self, net: &CompiledNetwork, add: bool) {
        for name in net.names.keys() {
            adjust(&mut self.all_names, name, add);
        }
        for ip in net.reverse.keys() {
            adjust(&mut self.all_addrs, ip, add);
        }
    }
}

fn adjust<K: Clone + std::hash::Hash + Eq>(index: &mut imbl::HashMap<K, u32>, key: &K, add: bool) {
    if add {
        *index.entry(key.clone()).or_insert(0) += 1;
    } else if let Some(n) = index.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            index.remove(key);
        }
    }
}

/// One network from its spellings. Two spellings of one network (e.g. "Front" and "front")
/// merge, the first one wins per name: a view normally has one spelling, this only keeps the
/// result defined.
fn compile_spellings(spellings: &[(&str, &NetworkNames)]) -> CompiledNetwork {
    let mut parts = spellings.iter().map(|(_, names)| compile_network(names));
    let mut net = parts.next().unwrap_or_default();
    for other in parts {
        for (k, v) in other.names {
            net.names.entry(k).or_insert(v);
        }
        for (ip, ns) in other.reverse {
            net.reverse.entry(ip).or_default().extend(ns);
        }
    }
    net
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
        assert!(c.all_names.contains_key("db"));
        assert!(c.all_addrs.contains_key(&ip("10.0.0.2")));
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

    fn svc(vip: &str, tasks: &[&str]) -> Service {
        Service {
            endpoint: Endpoint::Vip(ip(vip)),
            tasks: tasks.iter().map(|t| ip(t)).collect(),
            ports: vec![],
        }
    }

    /// Two networks sharing the name "db" and the address 10.0.0.9.
    fn two_networks() -> DnsView {
        let mut v = DnsView::new();
        v.network_mut("a")
            .insert_service("web", svc("10.0.0.2", &["10.0.0.5"]))
            .insert_container("db", ip("10.0.0.9"));
        v.network_mut("b")
            .insert_container("db", ip("10.0.0.9"))
            .insert_container("cache", ip("10.1.0.3"));
        v
    }

    type Counts = (Vec<(String, u32)>, Vec<(Ipv4Addr, u32)>);

    /// The indexes as counts, sorted, to compare an incremental result with a fresh one.
    fn indexes(c: &CompiledView) -> Counts {
        let mut names: Vec<_> = c
            .all_names
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect();
        let mut addrs: Vec<_> = c.all_addrs.iter().map(|(k, n)| (*k, *n)).collect();
        names.sort();
        addrs.sort();
        (names, addrs)
    }

    fn network_names(c: &CompiledView, net: &str) -> Vec<String> {
        let mut names: Vec<_> = c.networks[net]
            .names
            .keys()
            .map(|k| k.to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_change_compiles_only_the_networks_it_touches() {
        let v1 = two_networks();
        let c1 = CompiledView::compile(&v1);
        let mut v2 = v1.clone();
        v2.network_mut("a")
            .insert_container("web-1", ip("10.0.0.5"));
        let c2 = CompiledView::compile_from(&v2, &v1, &c1);
        assert!(
            Arc::ptr_eq(&c1.networks["b"], &c2.networks["b"]),
            "b recompiled"
        );
        assert!(!Arc::ptr_eq(&c1.networks["a"], &c2.networks["a"]));
        assert!(c2.networks["a"].names.contains_key("web-1"));
        // The same answer as compiling from nothing.
        let fresh = CompiledView::compile(&v2);
        assert_eq!(indexes(&c2), indexes(&fresh));
        assert_eq!(network_names(&c2, "a"), network_names(&fresh, "a"));
        // The previous view is untouched (still served to queries in progress).
        assert!(!c1.all_names.contains_key("web-1"));
    }

    #[test]
    fn the_indexes_count_networks_so_a_shared_name_outlives_one_of_them() {
        let v1 = two_networks();
        let c1 = CompiledView::compile(&v1);
        assert_eq!(c1.all_names.get("db"), Some(&2));
        assert_eq!(c1.all_addrs.get(&ip("10.0.0.9")), Some(&2));
        // Network b goes: "db" and 10.0.0.9 are still on a, "cache" is nowhere.
        let mut v2 = v1.clone();
        v2.networks.remove("b");
        let c2 = CompiledView::compile_from(&v2, &v1, &c1);
        assert_eq!(c2.all_names.get("db"), Some(&1));
        assert!(!c2.all_names.contains_key("cache"));
        assert!(!c2.all_addrs.contains_key(&ip("10.1.0.3")));
        assert!(!c2.networks.contains_key("b"));
        // The container db leaves a too: gone from every index.
        let mut v3 = v2.clone();
        v3.network_mut("a").containers.remove("db");
        let c3 = CompiledView::compile_from(&v3, &v2, &c2);
        assert!(!c3.all_names.contains_key("db"));
        assert!(!c3.all_addrs.contains_key(&ip("10.0.0.9")));
        assert_eq!(indexes(&c3), indexes(&CompiledView::compile(&v3)));
    }

    #[test]
    fn two_spellings_of_a_network_are_recompiled_together() {
        let mut v1 = DnsView::new();
        v1.networks
            .entry("Front".into())
            .or_default()
            .insert_container("x", ip("10.0.0.3"));
        v1.networks
            .entry("front".into())
            .or_default()
            .insert_container("y", ip("10.0.0.4"));
        let c1 = CompiledView::compile(&v1);
        assert_eq!(network_names(&c1, "front"), ["x", "y"]);
        // One spelling changes: the merged network is rebuilt from both.
        let mut v2 = v1.clone();
        v2.networks
            .get_mut("front")
            .expect("front")
            .insert_container("z", ip("10.0.0.5"));
        let c2 = CompiledView::compile_from(&v2, &v1, &c1);
        assert_eq!(network_names(&c2, "front"), ["x", "y", "z"]);
        // One spelling goes: what it alone had goes with it.
        let mut v3 = v2.clone();
        v3.networks.remove("Front");
        let c3 = CompiledView::compile_from(&v3, &v2, &c2);
        assert_eq!(network_names(&c3, "front"), ["y", "z"]);
        assert_eq!(indexes(&c3), indexes(&CompiledView::compile(&v3)));
    }

    #[test]
    fn replacing_networks_gives_what_compiling_the_whole_view_gives() {
        let v1 = two_networks();
        let c1 = CompiledView::compile(&v1);
        let mut a = v1.networks["a"].clone();
        a.insert_container("web-1", ip("10.0.0.5"));
        let c2 =
            CompiledView::with_networks(&c1, &[("a".into(), Some(a.clone())), ("b".into(), None)]);
        let mut v2 = v1.clone();
        v2.networks.insert("a".into(), a);
        v2.networks.remove("b");
        let fresh = CompiledView::compile(&v2);
        assert_eq!(indexes(&c2), indexes(&fresh));
        assert_eq!(network_names(&c2, "a"), network_names(&fresh, "a"));
        assert!(!c2.networks.contains_key("b"));
        // The view it started from is untouched.
        assert!(c1.networks.contains_key("b"));
        assert!(!c1.all_names.contains_key("web-1"));
    }
}
