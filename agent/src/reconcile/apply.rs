//! Writing the difference between the desired content and the maps.
//!
//! Every entry is written on its own and a failure is recorded, not returned: one full map or
//! one entry the kernel refuses must not freeze every later update on the node. The order
//! keeps what the programs see consistent: nodes and networks before endpoints, backend sets
//! before the VIPs and ports that point at them, and removals the other way round.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::net::Ipv4Addr;

use netagent_datapath::{
    Datapath, DatapathError, EndpointInfo, L4Proto, NetworkInfo, NodeInfo, PublishedInfo,
    ServiceInfo,
};

use imbl::ordmap::DiffItem;

use super::desired::{Desired, Subnet, Table};

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

/// What to write to one map: entries to insert or replace, keys to remove.
struct Delta<'a, K, V> {
    upsert: Vec<(K, &'a V)>,
    remove: Vec<K>,
}

impl<'a, K: Ord + Copy, V: PartialEq + Clone> Delta<'a, K, V> {
    /// Against what the kernel holds: every wanted entry is looked up.
    fn against(have: &BTreeMap<K, V>, want: &'a Table<K, V>) -> Self {
        Delta {
            upsert: want
                .iter()
                .filter(|(k, v)| have.get(k) != Some(v))
                .map(|(k, v)| (*k, v))
                .collect(),
            remove: have
                .keys()
                .filter(|k| !want.contains_key(*k))
                .copied()
                .collect(),
        }
    }

    /// Against what an earlier pass wrote: a diff of two persistent maps that share all but
    /// the change, O(changes).
    fn since(written: &Table<K, V>, want: &'a Table<K, V>) -> Self {
        let mut d = Delta {
            upsert: Vec::new(),
            remove: Vec::new(),
        };
        for item in written.diff(want) {
            match item {
                DiffItem::Add(k, v) | DiffItem::Update { new: (k, v), .. } => {
                    d.upsert.push((*k, v))
                }
                DiffItem::Remove(k, _) => d.remove.push(*k),
            }
        }
        d
    }
}

/// What to write, map by map; `None`: the map could not be read, and nothing of it is
/// touched this pass.
struct Deltas<'a> {
    nodes: Option<Delta<'a, Ipv4Addr, NodeInfo>>,
    networks: Option<Delta<'a, Subnet, NetworkInfo>>,
    endpoints: Option<Delta<'a, Ipv4Addr, EndpointInfo>>,
    backend_sets: Option<Delta<'a, u32, Vec<Ipv4Addr>>>,
    services: Option<Delta<'a, Ipv4Addr, ServiceInfo>>,
    published: Option<Delta<'a, (u16, u8), PublishedInfo>>,
}

fn against<'a, K: Ord + Copy, V: PartialEq + Clone>(
    have: Option<impl IntoIterator<Item = (K, V)>>,
    want: &'a Table<K, V>,
) -> Option<Delta<'a, K, V>> {
    have.map(|h| Delta::against(&h.into_iter().collect(), want))
}

impl<'a> Deltas<'a> {
    /// Against every map, read from the kernel (two syscalls an entry).
    fn read(dp: &Datapath, want: &'a Desired, c: &mut Changes) -> Self {
        Deltas {
            nodes: against(have(c, "nodes", dp.nodes()), &want.nodes),
            networks: against(have(c, "networks", dp.networks()), &want.networks),
            endpoints: against(have(c, "endpoints", dp.endpoints()), &want.endpoints),
            backend_sets: against(
                have(c, "backend sets", dp.backend_sets()),
                &want.backend_sets,
            ),
            services: against(have(c, "services", dp.services()), &want.services),
            published: against(
                have(c, "published ports", dp.published()).map(|v| {
                    v.into_iter()
                        .map(|(port, proto, info)| ((port, proto as u8), info))
                }),
                &want.published,
            ),
        }
    }

    /// Against what a pass that wrote `written` without a failure left in the maps.
    fn since(written: &Desired, want: &'a Desired) -> Self {
        Deltas {
            nodes: Some(Delta::since(&written.nodes, &want.nodes)),
            networks: Some(Delta::since(&written.networks, &want.networks)),
            endpoints: Some(Delta::since(&written.endpoints, &want.endpoints)),
            backend_sets: Some(Delta::since(&written.backend_sets, &want.backend_sets)),
            services: Some(Delta::since(&written.services, &want.services)),
            published: Some(Delta::since(&written.published, &want.published)),
        }
    }
}

/// Writes the difference between `want` and the maps, as read from the kernel.
pub fn apply(dp: &mut Datapath, want: &Desired) -> Changes {
    let mut c = Changes::default();
    let deltas = Deltas::read(dp, want, &mut c);
    write(dp, &deltas, c)
}

/// Writes the difference between `want` and `written`, what an earlier pass wrote without a
/// failure: no map is read, so a pass costs syscalls for its changes only. Only for maps
/// nothing else writes (the reconciler is their only writer); [`apply`] repairs the rest.
pub fn apply_since(dp: &mut Datapath, want: &Desired, written: &Desired) -> Changes {
    write(dp, &Deltas::since(written, want), Changes::default())
}

fn write(dp: &mut Datapath, d: &Deltas, mut c: Changes) -> Changes {
    if let Some(nodes) = &d.nodes {
        for (addr, info) in &nodes.upsert {
            c.upsert(format_args!("node {addr}"), dp.upsert_node(*addr, info));
        }
    }
    if let Some(nets) = &d.networks {
        for (subnet, info) in &nets.upsert {
            c.upsert(
                format_args!("network {}/{}", subnet.0, subnet.1),
                dp.upsert_network(*subnet, info),
            );
        }
    }
    let mut gone = HashSet::new();
    if let Some(eps) = &d.endpoints {
        for (ip, info) in &eps.upsert {
            c.upsert(format_args!("endpoint {ip}"), dp.upsert_endpoint(*ip, info));
        }
        for ip in &eps.remove {
            c.remove(format_args!("endpoint {ip}"), dp.remove_endpoint(*ip));
            gone.insert(*ip);
        }
    }
    apply_services(dp, d, &mut c);
    // A removed endpoint's address will be handed out again: its connections must not reach
    // whoever gets it (TCP clients get a reset, UDP flows are balanced anew).
    if !gone.is_empty() {
        match dp.purge_backends(&gone) {
            Ok(n) => c.purged += n,
            Err(e) => c.fail("purging connections of removed endpoints", e),
        }
    }
    // Networks go last so no endpoint is ever left without its subnet.
    if let Some(nets) = &d.networks {
        for subnet in &nets.remove {
            c.remove(
                format_args!("network {}/{}", subnet.0, subnet.1),
                dp.remove_network(*subnet),
            );
        }
    }
    if let Some(nodes) = &d.nodes {
        for addr in &nodes.remove {
            c.remove(format_args!("node {addr}"), dp.remove_node(*addr));
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
fn apply_services(dp: &mut Datapath, d: &Deltas, c: &mut Changes) {
    if let Some(sets) = &d.backend_sets {
        for (id, ips) in &sets.upsert {
            c.upsert(format_args!("backend set {id}"), dp.set_backends(*id, ips));
        }
    }
    if let Some(svcs) = &d.services {
        for (vip, info) in &svcs.upsert {
            c.upsert(format_args!("service {vip}"), dp.upsert_service(*vip, info));
        }
    }
    if let Some(ports) = &d.published {
        for ((port, proto), info) in &ports.upsert {
            c.upsert(
                format_args!("published port {port}"),
                dp.upsert_published(*port, proto_of(*proto), info),
            );
        }
        for (port, proto) in &ports.remove {
            c.remove(
                format_args!("published port {port}"),
                dp.remove_published(*port, proto_of(*proto)),
            );
        }
    }
    if let Some(svcs) = &d.services {
        for vip in &svcs.remove {
            c.remove(format_args!("service {vip}"), dp.remove_service(*vip));
        }
    }
    if let Some(sets) = &d.backend_sets {
        for id in &sets.remove {
            c.remove(format_args!("backend set {id}"), dp.remove_backends(*id));
        }
    }
}
