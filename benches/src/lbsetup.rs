//! The load-balancer benchmark's lab (issue 4, "Benchmark"): three nodes,
//! one network, service `web` published on 8080, one replica of it per node
//! (`tinyhttp`, this crate's minimal HTTP/1.1 responder, since nginx is not
//! installed here), and a client container on n1. The routing-mesh client is
//! the lab's fabric namespace (a host on the physical network).
//!
//! Baselines (c) iptables DNAT and (d) HAProxy need `iptables` and `haproxy`;
//! when they are absent the benchmark says so instead of installing them.
//!
//! Everything lives in the lab, so its teardown (on drop, also on error or
//! panic) removes it all.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netlab::{Background, Lab, LabConfig, StoreKind};
use serde_json::Value;

use crate::cluster::{inspect, netctl, retry, service_vip};
use crate::tools::{self, QUICK};

pub const NETWORK: &str = "lb";
/// A /20: room for the replicas, the client and 1000 extra VIPs.
const SUBNET: &str = "10.54.0.0/20";
pub const SERVICE: &str = "web";
pub const TARGET_PORT: u16 = 80;
pub const PUBLISHED_PORT: u16 = 8080;
pub const REPLICAS: usize = 3;
const CLIENT: &str = "lbclient";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LbLab {
    pub vip: Ipv4Addr,
    pub replica_ips: Vec<Ipv4Addr>,
    pub client_netns: PathBuf,
    pub fabric_netns: PathBuf,
    /// The node address whose published port the mesh client connects to.
    pub mesh_addr: Ipv4Addr,
    pub lbload: PathBuf,
    pub extra_services: usize,
    pub lab: Lab,
}

/// `NAME` built by this crate: the release build if there is one next to
/// ours (a load generator in a debug build would measure itself), else ours.
pub fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the benches binary")?;
    let dir = exe.parent().context("benches binary has no directory")?;
    let release = dir.join("../release").join(name);
    for p in [release, dir.join(name)] {
        if p.is_file() {
            return Ok(p.canonicalize()?);
        }
    }
    bail!("{name} not built: cargo build --release -p benches --bins")
}

impl LbLab {
    /// The product's lab; its agents get `agent_args` too.
    pub fn build(agent_args: &[String]) -> Result<LbLab> {
        let tinyhttp = sibling_bin("tinyhttp")?;
        let lbload = sibling_bin("lbload")?;
        let lab = Lab::up(LabConfig {
            nodes: REPLICAS,
            store: StoreKind::Etcd,
            extra_agent_args: agent_args.to_vec(),
            ..Default::default()
        })
        .context("lab for the load-balancer benchmark")?;
        eprintln!("bench:   lab {}", lab.prefix());
        netctl(&lab, 1, &["network", "create", "--subnet", SUBNET, NETWORK])?;
        for i in 2..=REPLICAS {
            retry(READY_TIMEOUT, || {
                netctl(&lab, i, &["network", "inspect", NETWORK]).map(drop)
            })
            .with_context(|| format!("n{i} never saw the network"))?;
        }
        let publish = format!("{PUBLISHED_PORT}:{TARGET_PORT}");
        netctl(
            &lab,
            1,
            &[
                "service",
                "create",
                "--name",
                SERVICE,
                "--network",
                NETWORK,
                "--publish",
                &publish,
            ],
        )?;
        let vip = service_vip(&lab, 1, SERVICE, NETWORK)?;
        let bin = tinyhttp.to_string_lossy().into_owned();
        let port = TARGET_PORT.to_string();
        let mut replica_ips = Vec::new();
        for i in 1..=REPLICAS {
            let name = format!("{SERVICE}.{i}");
            retry(READY_TIMEOUT, || {
                netctl(&lab, i, &["service", "inspect", SERVICE]).map(drop)
            })?;
            netctl(
                &lab,
                i,
                &[
                    "container",
                    "run",
                    "-d",
                    "--name",
                    &name,
                    "--network",
                    NETWORK,
                    "--service",
                    SERVICE,
                    "--",
                    &bin,
                    &port,
                    &name,
                ],
            )?;
            replica_ips.push(inspect(&lab, i, &name)?.ip);
        }
        netctl(
            &lab,
            1,
            &[
                "container",
                "run",
                "-d",
                "--name",
                CLIENT,
                "--network",
                NETWORK,
                "--",
                "sleep",
                "3600",
            ],
        )?;
        let client_netns = inspect(&lab, 1, CLIENT)?.netns;
        let fabric_netns = Path::new(netlab::NETNS_DIR).join(lab.fabric_ns());
        // New-connection runs leave tens of thousands of TIME_WAIT ports.
        for ns in [&client_netns, &fabric_netns] {
            tools::run_in(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1",
                ],
                QUICK,
            )?;
        }
        let lb = LbLab {
            vip,
            replica_ips,
            client_netns,
            fabric_netns,
            mesh_addr: lab.node_addr(1),
            lbload,
            extra_services: 0,
            lab,
        };
        for (ns, addr) in lb.targets() {
            retry(READY_TIMEOUT, || lb.probe(ns, &addr))
                .with_context(|| format!("{addr} never answered"))?;
        }
        Ok(lb)
    }

    /// (a) the VIP from the client container, (b) the mesh from the fabric.
    pub fn targets(&self) -> [(&Path, String); 2] {
        [
            (&self.client_netns, format!("{}:{TARGET_PORT}", self.vip)),
            (
                &self.fabric_netns,
                format!("{}:{PUBLISHED_PORT}", self.mesh_addr),
            ),
        ]
    }

    fn probe(&self, ns: &Path, addr: &str) -> Result<()> {
        let out = self.load(ns, addr, "new", 1, 0.2)?;
        let v: Value = serde_json::from_str(out.trim())?;
        if v["requests"].as_u64().unwrap_or(0) == 0 || v["errors"].as_u64().unwrap_or(1) != 0 {
            bail!("probe of {addr}: {out}");
        }
        Ok(())
    }

    /// One lbload run in `ns`; its JSON line.
    pub fn load(
        &self,
        ns: &Path,
        addr: &str,
        mode: &str,
        workers: usize,
        secs: f64,
    ) -> Result<String> {
        let argv = [
            self.lbload.to_string_lossy().into_owned(),
            addr.to_owned(),
            mode.to_owned(),
            workers.to_string(),
            secs.to_string(),
        ];
        let timeout = Duration::from_secs_f64(secs + 15.0);
        tools::run_in(ns, &argv, timeout)
    }

    /// Defines `count` more services on the network (VIPs, no replicas),
    /// and waits until every node knows them all.
    pub fn add_services(&mut self, count: usize) -> Result<()> {
        let start = self.extra_services;
        let lab = &self.lab;
        const THREADS: usize = 4;
        thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = (0..THREADS)
                .map(|t| {
                    s.spawn(move || -> Result<()> {
                        for k in (start + t..start + count).step_by(THREADS) {
                            let name = format!("other{k:04}");
                            netctl(
                                lab,
                                1,
                                &["service", "create", "--name", &name, "--network", NETWORK],
                            )?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            }
            Ok(())
        })?;
        self.extra_services += count;
        let want = self.extra_services + 1;
        for i in 1..=REPLICAS {
            retry(READY_TIMEOUT, || {
                let out = netctl(lab, i, &["--format", "json", "service", "ls"])?;
                let v: Value = serde_json::from_str(&out)?;
                let n = v.as_array().map_or(0, Vec::len);
                if n < want {
                    bail!("n{i} knows {n} services of {want}");
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

// ---- baselines (c) iptables DNAT and (d) HAProxy ---------------------------

/// Backend subnet of baseline node `i`: `10.55.<i>.0/24`; the proxy node's
/// client container is in `10.55.<PROXY_NODE>.0/24`.
const BASE_NET: [u8; 2] = [10, 55];
/// Node 4 of the baseline lab is the proxy; nodes 1-3 carry one backend each.
const PROXY_NODE: usize = REPLICAS + 1;
/// The kube-proxy-style ClusterIP of the measured service (c).
pub const BASE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// HAProxy's frontend port on the proxy node's address towards the client (d).
pub const HAPROXY_PORT: u16 = 8081;

/// The baselines' lab, built with iproute2, iptables and haproxy on a lab
/// without agents: three node namespaces with one plain-routed container
/// running `tinyhttp` each (same server, same port as the replicas of (a)
/// and (b)), and a proxy node whose container is the client. The proxy node
/// routes to the backends' subnets via their nodes and the backend nodes
/// route the client's subnet back via the proxy node, so replies cross the
/// proxy (conntrack undoes the DNAT of (c) there). Every namespace is named
/// `<lab prefix>-...`; the servers are stopped before the lab is torn down.
pub struct BaseLab {
    pub client_netns: PathBuf,
    pub proxy_netns: PathBuf,
    pub backend_ips: Vec<Ipv4Addr>,
    pub iptables: bool,
    pub haproxy: bool,
    pub extra_services: usize,
    pub notes: Vec<String>,
    haproxy_proc: Option<Background>,
    _servers: Vec<Background>,
    lab: Lab,
}

fn base_ip(node: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(BASE_NET[0], BASE_NET[1], node as u8, host)
}

fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    tools::host("ip", &all)
}

/// kube-proxy's probability for endpoint `k` (0-based) of `n`: 1/(n-k).
fn kube_probability(k: usize, n: usize) -> String {
    format!("{:.11}", 1.0 / (n - k) as f64)
}

/// The `nat` table kube-proxy (iptables mode) would write for the measured
/// service and `extra` other services, in `iptables-restore` format: one
/// KUBE-SERVICES dispatch rule per service, a KUBE-SVC chain choosing an
/// endpoint with `-m statistic --mode random`, a KUBE-SEP chain per endpoint
/// that DNATs. The other services come first in KUBE-SERVICES, so a new
/// connection to the measured one walks all their dispatch rules (the worst
/// place in kube-proxy's unordered list). No masquerade rules: routes are
/// symmetric here, so none is needed.
pub fn kube_nat_rules(vip: Ipv4Addr, port: u16, backends: &[Ipv4Addr], extra: usize) -> String {
    let mut chains = vec![":KUBE-SERVICES - [0:0]".to_owned()];
    let mut rules = vec![
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            .to_owned(),
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
    ];
    let mut service = |name: &str, vip: Ipv4Addr, eps: &[Ipv4Addr]| {
        let svc = format!("KUBE-SVC-{name}");
        chains.push(format!(":{svc} - [0:0]"));
        rules.push(format!(
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"default/{name}:http cluster IP\" -m tcp --dport {port} -j {svc}"
        ));
        for (k, ep) in eps.iter().enumerate() {
            let sep = format!("KUBE-SEP-{name}-{k}");
            chains.push(format!(":{sep} - [0:0]"));
            if k + 1 < eps.len() {
                rules.push(format!(
                    "-A {svc} -m statistic --mode random --probability {} -j {sep}",
                    kube_probability(k, eps.len())
                ));
            } else {
                rules.push(format!("-A {svc} -j {sep}"));
            }
            rules.push(format!(
                "-A {sep} -p tcp -m tcp -j DNAT --to-destination {ep}:{port}"
            ));
        }
    };
    for k in 0..extra {
        let (hi, lo) = ((k / 250) as u8, (k % 250) as u8 + 1);
        let eps: Vec<Ipv4Addr> = (0..3).map(|e| Ipv4Addr::new(10, 56 + e, hi, lo)).collect();
        service(&format!("OTHER{k:04}"), Ipv4Addr::new(10, 97, hi, lo), &eps);
    }
    service("WEB", vip, backends);
    let mut out = vec!["*nat".to_owned()];
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        out.push(format!(":{builtin} ACCEPT [0:0]"));
    }
    out.extend(chains);
    out.extend(rules);
    out.push("COMMIT".to_owned());
    out.join("\n") + "\n"
}

/// haproxy.cfg: TCP mode, roundrobin over the backends, no health checks
/// (nothing but the measured traffic), and `extra` other frontend/backend
/// pairs on ports of their own, their servers unreachable and unused.
pub fn haproxy_cfg(bind: Ipv4Addr, backends: &[Ipv4Addr], extra: usize) -> String {
    let mut s = String::from(
        "global\n    # maxconn derived from the open-files limit (a few thousand here; 8 clients)\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n",
    );
    let mut pair = |name: &str, bind: String, eps: &[Ipv4Addr]| {
        s += &format!(
            "frontend fe_{name}\n    bind {bind}\n    default_backend be_{name}\n\nbackend be_{name}\n    balance roundrobin\n"
        );
        for (k, ep) in eps.iter().enumerate() {
            s += &format!("    server s{k} {ep}:{TARGET_PORT}\n");
        }
        s += "\n";
    };
    pair(SERVICE, format!("{bind}:{HAPROXY_PORT}"), backends);
    for k in 0..extra {
        let (hi, lo) = ((k / 250) as u8, (k % 250) as u8 + 1);
        let eps: Vec<Ipv4Addr> = (0..3).map(|e| Ipv4Addr::new(10, 56 + e, hi, lo)).collect();
        pair(
            &format!("other{k:04}"),
            format!("{bind}:{}", 20000 + k),
            &eps,
        );
    }
    s
}

impl BaseLab {
    pub fn build(iptables: bool, haproxy: bool) -> Result<BaseLab> {
        let tinyhttp = sibling_bin("tinyhttp")?;
        let lab = Lab::up(LabConfig {
            nodes: PROXY_NODE,
            store: StoreKind::Embedded,
            start_agents: false,
            ..Default::default()
        })
        .context("lab for the load-balancer baselines")?;
        eprintln!("bench:   baseline lab {}", lab.prefix());
        let mut servers = Vec::new();
        let mut backend_ips = Vec::new();
        let proxy_addr = lab.node_addr(PROXY_NODE).to_string();
        for i in 1..=PROXY_NODE {
            let node = lab.node_ns(i);
            let cns = format!("{}-c{i}", lab.prefix());
            tools::host("ip", &["netns", "add", &cns])?;
            ip_in(&cns, &["link", "set", "lo", "up"])?;
            let cpath = Path::new(netlab::NETNS_DIR).join(&cns);
            let npath = Path::new(netlab::NETNS_DIR).join(&node);
            tools::run_in(
                &npath,
                &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
                QUICK,
            )?;
            ip_in(
                &node,
                &[
                    "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", &cns,
                ],
            )?;
            let gw = base_ip(i, 1);
            ip_in(&node, &["addr", "add", &format!("{gw}/24"), "dev", "veth0"])?;
            ip_in(&node, &["link", "set", "veth0", "up"])?;
            ip_in(
                &cns,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", base_ip(i, 2)),
                    "dev",
                    "eth0",
                ],
            )?;
            ip_in(&cns, &["link", "set", "eth0", "up"])?;
            ip_in(&cns, &["route", "add", "default", "via", &gw.to_string()])?;
            if i == PROXY_NODE {
                for b in 1..=REPLICAS {
                    ip_in(
                        &node,
                        &[
                            "route",
                            "add",
                            &format!("{}/24", base_ip(b, 0)),
                            "via",
                            &lab.node_addr(b).to_string(),
                            "dev",
                            "eth0",
                        ],
                    )?;
                }
            } else {
                ip_in(
                    &node,
                    &[
                        "route",
                        "add",
                        &format!("{}/24", base_ip(PROXY_NODE, 0)),
                        "via",
                        &proxy_addr,
                        "dev",
                        "eth0",
                    ],
                )?;
                let name = format!("{SERVICE}.{i}");
                let argv = [
                    tinyhttp.to_string_lossy().into_owned(),
                    TARGET_PORT.to_string(),
                    name,
                ];
                servers.push(netlab::spawn(&mut tools::in_netns(&cpath, &argv))?);
                backend_ips.push(base_ip(i, 2));
            }
        }
        let client_netns =
            Path::new(netlab::NETNS_DIR).join(format!("{}-c{PROXY_NODE}", lab.prefix()));
        let proxy_netns = Path::new(netlab::NETNS_DIR).join(lab.node_ns(PROXY_NODE));
        // The client and HAProxy (which opens a connection per client
        // connection) leave many TIME_WAIT ports.
        for ns in [&client_netns, &proxy_netns] {
            tools::run_in(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1",
                ],
                QUICK,
            )?;
        }
        let mut base = BaseLab {
            client_netns,
            proxy_netns,
            backend_ips,
            iptables,
            haproxy,
            extra_services: 0,
            notes: vec![
                "baselines: separate lab without agents, 3 backend nodes with one plain-routed tinyhttp container each, a proxy node whose container is the client; symmetric static routes so replies cross the proxy node".to_owned(),
            ],
            haproxy_proc: None,
            _servers: servers,
            lab,
        };
        if iptables {
            base.write_iptables()?;
            let v = tools::host("iptables", &["--version"]).unwrap_or_default();
            base.notes.push(format!(
                "(c) {}: kube-proxy iptables-mode chains (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP, statistic random 1/3, 1/2, 1) in the proxy node's nat PREROUTING/OUTPUT; measured service last in KUBE-SERVICES; no masquerade",
                v.trim()
            ));
        }
        if haproxy {
            base.start_haproxy()?;
            let v = tools::host("haproxy", &["-v"]).unwrap_or_default();
            base.notes.push(format!(
                "(d) {}: mode tcp, balance roundrobin, no health checks, default threads (one per CPU), in the proxy node namespace",
                v.lines().next().unwrap_or("").trim()
            ));
        }
        for (_, ns, addr) in base.targets() {
            retry(READY_TIMEOUT, || probe(&ns, &addr))
                .with_context(|| format!("baseline {addr} never answered"))?;
        }
        Ok(base)
    }

    /// `(index into lb::PATHS, netns of the client, address)`: (c) the
    /// ClusterIP, (d) HAProxy's frontend; only those whose tool is installed.
    pub fn targets(&self) -> Vec<(usize, PathBuf, String)> {
        let mut t = Vec::new();
        if self.iptables {
            t.push((
                2,
                self.client_netns.clone(),
                format!("{BASE_VIP}:{TARGET_PORT}"),
            ));
        }
        if self.haproxy {
            t.push((
                3,
                self.client_netns.clone(),
                format!("{}:{HAPROXY_PORT}", base_ip(PROXY_NODE, 1)),
            ));
        }
        t
    }

    fn write_iptables(&self) -> Result<()> {
        let rules = kube_nat_rules(
            BASE_VIP,
            TARGET_PORT,
            &self.backend_ips,
            self.extra_services,
        );
        let path = self.lab.run_dir().join("kube-nat.rules");
        std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
        // iptables-restore replaces the nat table as a whole (one
        // transaction), as kube-proxy does.
        tools::run_in(
            &self.proxy_netns,
            &[
                "iptables-restore".to_owned(),
                path.to_string_lossy().into_owned(),
            ],
            Duration::from_secs(120),
        )
        .context("iptables-restore")?;
        Ok(())
    }

    fn start_haproxy(&mut self) -> Result<()> {
        if let Some(old) = self.haproxy_proc.take() {
            let _ = old.stop(Duration::from_secs(5));
        }
        let cfg = haproxy_cfg(
            base_ip(PROXY_NODE, 1),
            &self.backend_ips,
            self.extra_services,
        );
        let path = self.lab.run_dir().join("haproxy.cfg");
        std::fs::write(&path, cfg).with_context(|| format!("writing {}", path.display()))?;
        let p = path.to_string_lossy().into_owned();
        tools::run_in(&self.proxy_netns, &["haproxy", "-c", "-q", "-f", &p], QUICK)
            .context("haproxy -c")?;
        self.haproxy_proc = Some(netlab::spawn(&mut tools::in_netns(
            &self.proxy_netns,
            &["haproxy", "-f", &p, "-db"],
        ))?);
        Ok(())
    }

    /// `count` more services: KUBE-SERVICES/KUBE-SVC/KUBE-SEP chains for (c),
    /// frontend/backend pairs for (d) (HAProxy restarted with the new config).
    pub fn add_services(&mut self, count: usize) -> Result<()> {
        self.extra_services += count;
        if self.iptables {
            self.write_iptables()?;
            let n = tools::run_in(&self.proxy_netns, &["iptables", "-t", "nat", "-S"], QUICK)?
                .lines()
                .count();
            eprintln!("bench:   (c) nat table now has {n} rules and chains");
        }
        if self.haproxy {
            self.start_haproxy()?;
        }
        for (_, ns, addr) in self.targets() {
            retry(READY_TIMEOUT, || probe(&ns, &addr))
                .with_context(|| format!("baseline {addr} never answered"))?;
        }
        Ok(())
    }
}

impl Drop for BaseLab {
    fn drop(&mut self) {
        if let Some(h) = self.haproxy_proc.take() {
            let _ = h.stop(Duration::from_secs(5));
        }
    }
}

/// One short `new` run of lbload against `addr` in `ns` must succeed.
fn probe(ns: &Path, addr: &str) -> Result<()> {
    let lbload = sibling_bin("lbload")?;
    let argv = [
        lbload.to_string_lossy().into_owned(),
        addr.to_owned(),
        "new".to_owned(),
        "1".to_owned(),
        "0.2".to_owned(),
    ];
    let out = tools::run_in(ns, &argv, Duration::from_secs(15))?;
    let v: Value = serde_json::from_str(out.trim())?;
    if v["requests"].as_u64().unwrap_or(0) == 0 || v["errors"].as_u64().unwrap_or(1) != 0 {
        bail!("probe of {addr}: {out}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_rules_shape() {
        let b = [base_ip(1, 2), base_ip(2, 2), base_ip(3, 2)];
        let r = kube_nat_rules(BASE_VIP, 80, &b, 2);
        assert!(r.contains("--probability 0.33333333333 -j KUBE-SEP-WEB-0"));
        assert!(r.contains("--probability 0.50000000000 -j KUBE-SEP-WEB-1"));
        assert!(r.contains("-A KUBE-SVC-WEB -j KUBE-SEP-WEB-2"));
        assert_eq!(r.matches("-A KUBE-SERVICES ").count(), 3);
        let web = r.find("-A KUBE-SERVICES -d 10.96.0.10/32").unwrap();
        assert!(r.find("-A KUBE-SERVICES -d 10.97.0.2/32").unwrap() < web);
        let c = haproxy_cfg(base_ip(4, 1), &b, 2);
        assert_eq!(c.matches("frontend ").count(), 3);
        assert!(c.contains("bind 10.55.4.1:20001"));
    }
}
