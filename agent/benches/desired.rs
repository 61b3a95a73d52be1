//! Cost of a reconciler pass's desired state as the cluster grows (`cargo bench -p netagent
//! --bench desired`): one container with a service replica starts (its endpoint record and
//! its local interface) or goes, on a node of three, at 100 to 10,000 endpoints in 100
//! networks, 10 replicas per service. (a) `reconcile::Basis::advance`, from the change, and
//! the diff against the last state (persistent maps); against (b) what every pass did before:
//! `reconcile::desired` over the whole view, and each wanted entry looked up in the last
//! state. Microseconds per pass, medians of 5 rounds of 200 passes, one thread.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netagent::fixtures;
use netagent::model::{Endpoint, Network, Service, ServiceNetwork};
use netagent::reconcile::{Basis, Desired, LocalState, Table, desired};
use netagent::view::ClusterView;

const PASSES: u32 = 200;
const ROUNDS: usize = 5;
const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn network(k: u32) -> Network {
    let subnet = format!("10.{}.{}.0/24", 64 + k / 256, k % 256);
    fixtures::network(&format!("net{k}"), &subnet, 4096 + k)
}

fn endpoint(c: &str, net: u32, host: u32, node: &str, svc: &str) -> Endpoint {
    // A range of its own per network, 10.128.0.0/10 (the desired state does not check
    // addresses against subnets).
    let ip = Ipv4Addr::new(10, (128 + net / 256) as u8, (net % 256) as u8, 0)
        .to_bits()
        .wrapping_add(host);
    let ip = Ipv4Addr::from_bits(ip);
    Endpoint {
        id: c.into(),
        container: c.into(),
        network: format!("net{net}"),
        ip,
        mac: String::new(),
        node: node.into(),
        ifname: "eth0".into(),
        host_ifname: format!("na{c}"),
        service: Some(svc.into()),
        aliases: vec![],
        ready: true,
    }
}

/// A cluster of `endpoints` replicas: 10 per service, services spread over 100 networks,
/// replicas round-robin over the nodes; the local state of n1 with every interface plugged.
fn cluster(endpoints: u32) -> (ClusterView, LocalState) {
    let mut v = ClusterView {
        revision: 1,
        ..Default::default()
    };
    for k in 0..100 {
        let n = network(k);
        v.networks.insert(n.name.clone(), n);
    }
    for (i, name) in NODES.iter().enumerate() {
        v.nodes.insert(
            (*name).into(),
            fixtures::node(name, Ipv4Addr::new(198, 18, 0, 11 + i as u8)),
        );
        v.alive.insert((*name).into());
    }
    let mut local = LocalState::default();
    for s in 0..endpoints / 10 {
        let net = s % 100;
        let name = format!("svc{s}");
        v.services.insert(
            name.clone(),
            Service {
                networks: vec![ServiceNetwork {
                    network: format!("net{net}"),
                    vip: Some(Ipv4Addr::new(
                        10,
                        200 + (s / 65536) as u8,
                        (s / 256 % 256) as u8,
                        (s % 256) as u8,
                    )),
                }],
                ..fixtures::service(&name, &name, s + 1)
            },
        );
        for r in 0..10 {
            let c = format!("{name}.{r}");
            let node = NODES[(r % 3) as usize];
            let ep = endpoint(&c, net, 2 + (s / 100) * 10 + r, node, &name);
            if node == "n1" {
                local
                    .ifaces
                    .insert(ep.host_ifname.clone(), 1000 + s * 10 + r);
            }
            v.endpoints.insert(format!("net{net}/{c}"), ep);
        }
    }
    (v, local)
}

/// The views and local states a container starting and going, in turns, leaves.
fn churn(v: &ClusterView, local: &LocalState, i: u32) -> (ClusterView, LocalState) {
    let (mut v, mut local) = (v.clone(), local.clone());
    if i.is_multiple_of(2) {
        let ep = endpoint("probe", 0, 250, "n1", "svc0");
        local.ifaces.insert(ep.host_ifname.clone(), 99);
        v.endpoints.insert("net0/probe".into(), ep);
    }
    (v, local)
}

fn changed<K: Ord + Clone, V: Clone + PartialEq>(was: &Table<K, V>, now: &Table<K, V>) -> usize {
    now.iter().filter(|(k, v)| was.get(*k) != Some(*v)).count()
        + was.keys().filter(|k| !now.contains_key(*k)).count()
}

fn diffed<K: Ord + Clone, V: Clone + PartialEq>(was: &Table<K, V>, now: &Table<K, V>) -> usize {
    was.diff(now).count()
}

fn all(a: &Desired, b: &Desired, f: impl Fn(&Desired, &Desired) -> [usize; 6]) -> usize {
    f(a, b).iter().sum()
}

fn median(mut round: impl FnMut() -> Duration) -> Duration {
    let mut per = (0..ROUNDS).map(|_| round()).collect::<Vec<_>>();
    per.sort();
    per[ROUNDS / 2]
}

fn main() {
    println!("desired state of one pass after a container starts or goes, on n1 of 3 nodes:");
    println!("| endpoints | (a) from the change + diff | (b) whole + lookups | a/b |");
    println!("|---:|---:|---:|---:|");
    for n in [100u32, 1000, 10_000] {
        let (v, local) = cluster(n);
        let states: Vec<_> = (0..2).map(|i| churn(&v, &local, i)).collect();
        let mut basis = Basis::new("n1", Arc::new(states[1].0.clone()), states[1].1.clone());
        let mut last = basis.desired().clone();
        let mut sink = 0usize;
        let a = median(|| {
            let t = Instant::now();
            for i in 0..PASSES {
                let (v, l) = &states[(i % 2) as usize];
                let _ = basis.advance(Arc::new(v.clone()), l.clone());
                let now = basis.desired().clone();
                sink += all(&last, &now, |a, b| {
                    [
                        diffed(&a.endpoints, &b.endpoints),
                        diffed(&a.networks, &b.networks),
                        diffed(&a.services, &b.services),
                        diffed(&a.backend_sets, &b.backend_sets),
                        diffed(&a.published, &b.published),
                        diffed(&a.nodes, &b.nodes),
                    ]
                });
                last = now;
            }
            t.elapsed() / PASSES
        });
        let b = median(|| {
            let t = Instant::now();
            for i in 0..PASSES {
                let (v, l) = &states[(i % 2) as usize];
                let now = desired(v, "n1", l);
                sink += all(&last, &now, |a, b| {
                    [
                        changed(&a.endpoints, &b.endpoints),
                        changed(&a.networks, &b.networks),
                        changed(&a.services, &b.services),
                        changed(&a.backend_sets, &b.backend_sets),
                        changed(&a.published, &b.published),
                        changed(&a.nodes, &b.nodes),
                    ]
                });
                last = now;
            }
            t.elapsed() / PASSES
        });
        // Both found the same change each pass: one endpoint and one backend set.
        assert_eq!(sink, 2 * 2 * ROUNDS * PASSES as usize, "changes seen");
        println!(
            "| {n} | {:.1} us | {:.1} us | {:.3} |",
            a.as_secs_f64() * 1e6,
            b.as_secs_f64() * 1e6,
            a.as_secs_f64() / b.as_secs_f64()
        );
    }
}
