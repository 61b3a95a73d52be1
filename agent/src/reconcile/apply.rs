//! Writing the difference between the desired content and the maps.
//!
//! Every entry is written on its own and a failure is recorded, not returned: one full map or
//! one entry the kernel refuses must not freeze every later update on the node. The order
//! keeps what the programs see consistent: nodes and networks before endpoints, backend sets
//! before the VIPs and ports that point at them, and removals the other way round.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::net::Ipv4Addr;

use netagent_datapath::{
    Datapath, DatapathError, EndpointInfo, L4Proto, NetworkInfo, NodeInfo, PublishedInfo,
    ServiceInfo,
};

use super::desired::{Desired, Subnet};

/// How many failures a pass keeps (the rest are only counted).
const ERRORS_KEPT: usize = 20;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Changes {
    pub upserted: usize,
    pub removed: usize,
    /// Entries that could not be written, as one line each (the first [`ERRORS_KEPT`]).
    pub errors: Vec<String>,
    /// How many entries failed in all.
    pub failed: usize,
    /// Conntrack entries removed because their backend's address went away.
    pub purged: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upserted == 0 && self.removed == 0 && self.failed == 0 && self.purged == 0
    }

    fn fail(&mut self, what: impl Display, e: DatapathError) {
        self.failed += 1;
        if self.errors.len() < ERRORS_KEPT {
            self.errors.push(format!("{what}: {e}"));
        }
    }

    fn upsert(&mut self, what: impl Display, r: Result<(), DatapathError>) {
        match r {
            Ok(()) => self.upserted += 1,
            Err(e) => self.fail(what, e),
        }
    }

    fn remove(&mut self, what: impl Display, r: Result<bool, DatapathError>) {
        match r {
            Ok(true) => self.removed += 1,
            Ok(false) => {}
            Err(e) => self.fail(what, e),
        }
    }
}

/// A listing of what a map holds, or the reason it could not be read (then nothing of that
/// map is touched this pass: removing "everything not wanted" from an unknown list is unsafe).
fn have<T>(changes: &mut Changes, what: &str, r: Result<T, DatapathError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            changes.fail(format_args!("reading {what}"), e);
            None
        }
    }
}

/// What the maps hold, map by map; `None`: the map could not be read, and nothing of it is
/// touched this pass.
#[derive(Default)]
struct Held<'a> {
    nodes: Option<Cow<'a, BTreeMap<Ipv4Addr, NodeInfo>>>,
    networks: Option<Cow<'a, BTreeMap<Subnet, NetworkInfo>>>,
    endpoints: Option<Cow<'a, BTreeMap<Ipv4Addr, EndpointInfo>>>,
    backend_sets: Option<Cow<'a, BTreeMap<u32, Vec<Ipv4Addr>>>>,
    services: Option<Cow<'a, BTreeMap<Ipv4Addr, ServiceInfo>>>,
    published: Option<Cow<'a, BTreeMap<(u16, u8), PublishedInfo>>>,
}

fn owned<K: Ord + Clone, V: Clone>(
    r: Option<impl IntoIterator<Item = (K, V)>>,
) -> Option<Cow<'static, BTreeMap<K, V>>> {
    r.map(|v| Cow::Owned(v.into_iter().collect()))
}

impl Held<'static> {
    /// Every map, read from the kernel (two syscalls an entry).
    fn read(dp: &Datapath, c: &mut Changes) -> Self {
        Held {
            nodes: owned(have(c, "nodes", dp.nodes())),
            networks: owned(have(c, "networks", dp.networks())),
            endpoints: owned(have(c, "endpoints", dp.endpoints())),
            backend_sets: owned(have(c, "backend sets", dp.backend_sets())),
            services: owned(have(c, "services", dp.services())),
            published: owned(have(c, "published ports", dp.published()).map(|v| {
                v.into_iter()
                    .map(|(port, proto, info)| ((port, proto as u8), info))
            })),
        }
    }
}

impl<'a> Held<'a> {
    /// What a pass that wrote `d` without a failure left in the maps.
    fn written(d: &'a Desired) -> Self {
        Held {
            nodes: Some(Cow::Borrowed(&d.nodes)),
            networks: Some(Cow::Borrowed(&d.networks)),
            endpoints: Some(Cow::Borrowed(&d.endpoints)),
            backend_sets: Some(Cow::Borrowed(&d.backend_sets)),
            services: Some(Cow::Borrowed(&d.services)),
            published: Some(Cow::Borrowed(&d.published)),
        }
    }
}

/// Writes the difference between `want` and the maps, as read from the kernel.
pub fn apply(dp: &mut Datapath, want: &Desired) -> Changes {
    let mut c = Changes::default();
    let held = Held::read(dp, &mut c);
    write(dp, want, &held, c)
}

/// Writes the difference between `want` and `written`, what an earlier pass wrote without a
/// failure: no map is read, so a pass costs syscalls for its changes only. Only for maps
/// nothing else writes (the reconciler is their only writer); [`apply`] repairs the rest.
pub fn apply_since(dp: &mut Datapath, want: &Desired, written: &Desired) -> Changes {
    write(dp, want, &Held::written(written), Changes::default())
}

fn write(dp: &mut Datapath, want: &Desired, held: &Held, mut c: Changes) -> Changes {
    if let Some(have_nodes) = &held.nodes {
        for (addr, info) in &want.nodes {
            if have_nodes.get(addr) != Some(info) {
                c.upsert(format_args!("node {addr}"), dp.upsert_node(*addr, info));
            }
        }
    }
    if let Some(have_nets) = &held.networks {
        for (subnet, info) in &want.networks {
            if have_nets.get(subnet) != Some(info) {
                c.upsert(
                    format_args!("network {}/{}", subnet.0, subnet.1),
                    dp.upsert_network(*subnet, info),
                );
            }
        }
    }
    let mut gone = HashSet::new();
    if let Some(have_eps) = &held.endpoints {
        for (ip, info) in &want.endpoints {
            if have_eps.get(ip) != Some(info) {
                c.upsert(format_args!("endpoint {ip}"), dp.upsert_endpoint(*ip, info));
            }
        }
        for ip in have_eps.keys() {
            if !want.endpoints.contains_key(ip) {
                c.remove(format_args!("endpoint {ip}"), dp.remove_endpoint(*ip));
                gone.insert(*ip);
            }
        }
    }
    apply_services(dp, want, held, &mut c);
    // A removed endpoint's address will be handed out again: its connections must not reach
    // whoever gets it (TCP clients get a reset, UDP flows are balanced anew).
    if !gone.is_empty() {
        match dp.purge_backends(&gone) {
            Ok(n) => c.purged += n,
            Err(e) => c.fail("purging connections of removed endpoints", e),
        }
    }
    // Networks go last so no endpoint is ever left without its subnet.
    if let Some(have_nets) = &held.networks {
        for subnet in have_nets.keys() {
            if !want.networks.contains_key(subnet) {
                c.remove(
                    format_args!("network {}/{}", subnet.0, subnet.1),
                    dp.remove_network(*subnet),
                );
            }
        }
    }
    if let Some(have_nodes) = &held.nodes {
        for addr in have_nodes.keys() {
            if !want.nodes.contains_key(addr) {
                c.remove(format_args!("node {addr}"), dp.remove_node(*addr));
            }
        }
    }
    c
}

fn proto_of(n: u8) -> L4Proto {
    if n == L4Proto::Udp as u8 {
        L4Proto::Udp
    } else {
        L4Proto::Tcp
    }
}

/// Sets first (a VIP or port never points at a set that does not exist), then VIPs and ports;
/// removals the other way round.
fn apply_services(dp: &mut Datapath, want: &Desired, held: &Held, c: &mut Changes) {
    if let Some(have_sets) = &held.backend_sets {
        for (id, ips) in &want.backend_sets {
            if have_sets.get(id) != Some(ips) {
                c.upsert(format_args!("backend set {id}"), dp.set_backends(*id, ips));
            }
        }
    }
    if let Some(have_svcs) = &held.services {
        for (vip, info) in &want.services {
            if have_svcs.get(vip) != Some(info) {
                c.upsert(format_args!("service {vip}"), dp.upsert_service(*vip, info));
            }
        }
    }
    if let Some(have_pub) = &held.published {
        for ((port, proto), info) in &want.published {
            if have_pub.get(&(*port, *proto)) != Some(info) {
                c.upsert(
                    format_args!("published port {port}"),
                    dp.upsert_published(*port, proto_of(*proto), info),
                );
            }
        }
        for (port, proto) in have_pub.keys() {
            if !want.published.contains_key(&(*port, *proto)) {
                c.remove(
                    format_args!("published port {port}"),
                    dp.remove_published(*port, proto_of(*proto)),
                );
            }
        }
    }
    if let Some(have_svcs) = &held.services {
        for vip in have_svcs.keys() {
            if !want.services.contains_key(vip) {
                c.remove(format_args!("service {vip}"), dp.remove_service(*vip));
            }
        }
    }
    if let Some(have_sets) = &held.backend_sets {
        for id in have_sets.keys() {
            if !want.backend_sets.contains_key(id) {
                c.remove(format_args!("backend set {id}"), dp.remove_backends(*id));
            }
        }
    }
}
