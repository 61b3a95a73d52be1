//! Cost of publishing a changed view (`cargo bench -p netagent-dns --bench publish`): one
//! container added to a cluster of 100 networks x 10 services x 10 tasks (10,000 endpoints,
//! each also a container name), into a resolver holding the previous view: (a) the changed
//! network's names alone (`publish_networks`, what the agent sends when only endpoints
//! changed), (b) the whole view, compared with the previous one and only the changed network
//! compiled (`publish`), against the baseline (c) of compiling the whole view, which is what
//! every publish did before. Medians of 21 rounds, one CPU (the calling thread).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netagent_dns::{DnsView, Endpoint, Resolver, ResolverConfig, Service};

const NETWORKS: u32 = 100;
const SERVICES: u32 = 10;
const TASKS: u32 = 10;
const ROUNDS: usize = 21;

fn cluster() -> DnsView {
    let mut view = DnsView::new();
    for n in 0..NETWORKS {
        let net = view.network_mut(&format!("net{n}"));
        for s in 0..SERVICES {
            let tasks: Vec<Ipv4Addr> = (0..TASKS)
                .map(|t| Ipv4Addr::from(0x0a00_0000 + (n << 16) + (s << 8) + t + 2))
                .collect();
            for (t, ip) in tasks.iter().enumerate() {
                net.insert_container(&format!("svc{s}.{}.x1y2z3", t + 1), *ip);
            }
            let vip = Ipv4Addr::from(0x0b00_0000 + (n << 8) + s);
            net.insert_service(
                &format!("svc{s}"),
                Service {
                    endpoint: Endpoint::Vip(vip),
                    tasks,
                    ports: vec![],
                },
            );
        }
    }
    view
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let before = cluster();
    let mut after = before.clone();
    after
        .network_mut("net42")
        .insert_container("probe", Ipv4Addr::new(10, 42, 255, 254));

    let time = |publish: &dyn Fn(&Resolver)| -> Duration {
        median(
            (0..ROUNDS)
                .map(|_| {
                    let resolver = Resolver::new(ResolverConfig::default());
                    resolver.publish(before.clone());
                    let t = Instant::now();
                    publish(&resolver);
                    t.elapsed()
                })
                .collect(),
        )
    };
    let changed = after.networks["net42"].clone();
    let one = time(&|r| r.publish_networks(vec![("net42".into(), Some(changed.clone()))]));
    let diffed = time(&|r| r.publish(after.clone()));
    let full = median(
        (0..ROUNDS)
            .map(|_| {
                let resolver = Resolver::new(ResolverConfig::default());
                let view = after.clone();
                let t = Instant::now();
                resolver.publish(view);
                t.elapsed()
            })
            .collect(),
    );
    let endpoints = NETWORKS * SERVICES * TASKS;
    let ratio = |d: Duration| d.as_secs_f64() / full.as_secs_f64();
    println!("publish one added container, {NETWORKS} networks, {endpoints} endpoints:");
    println!(
        "  (a) the changed network's names only:      {one:?}  a/c {:.4}",
        ratio(one)
    );
    println!(
        "  (b) the whole view, diffed, one compiled:  {diffed:?}  b/c {:.3}",
        ratio(diffed)
    );
    println!("  (c) the whole view compiled (before):      {full:?}");
}
