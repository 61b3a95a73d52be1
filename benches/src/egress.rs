//! The egress benchmark (issue 11): new connections/s and TCP throughput from a container to a
//! host outside the overlay through (a) netagent's egress (eBPF masquerade on the node's
//! address), against (b) the kernel's masquerade, Docker-style: the container on a Linux bridge
//! in the node, `iptables -t nat ... -j MASQUERADE` out of the uplink.
//!
//! The clients sit on two nodes of one lab, built alike, and reach the same outside host (the
//! lab's, beyond the fabric) through the same kind of uplink and the same fabric; only the way
//! from the container to the uplink differs. Two nodes, not one: both masquerades keep the
//! client's port when they can, and neither sees the other's mappings (netagent checks the
//! node's sockets, not the kernel's NAT table), so on one node they would answer each other's
//! replies. Both container interfaces have the overlay's MTU (1450), so the
//! segments are the same size. The server is `tinyhttp` (new connections) and `iperf3 -s`; the
//! client `lbload new` and `iperf3 -c`. Rounds alternate which path goes first; medians are
//! quoted, for the client and server tools on one CPU and on two.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netlab::{Background, Lab, LabConfig, OUTSIDE_ADDR, StoreKind};
use serde::Serialize;
use serde_json::Value;

use crate::cluster::{inspect, netctl, retry};
use crate::lbsetup::sibling_bin;
use crate::machine::{self, Machine};
use crate::table;
use crate::tools::{self, QUICK, median};

pub struct Options {
    pub runs: usize,
    pub secs: u32,
    pub workers: usize,
    pub json: PathBuf,
    pub markdown: bool,
}

const NETWORK: &str = "egress";
const SUBNET: &str = "10.60.0.0/24";
/// The baseline's node, bridge and container.
const BASE_NODE: usize = 2;
const BRIDGE: &str = "mqbr0";
const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 61, 0, 1);
const BASE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 61, 0, 2);
const CONTAINER_MTU: &str = "1450";
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub date: String,
    pub machine: Machine,
    pub runs: usize,
    pub secs_per_run: u32,
    pub workers: usize,
    pub placements: Vec<Placement>,
    pub elapsed_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct Placement {
    /// CPUs of the client and the server tools.
    pub cpus: [usize; 2],
    pub paths: Vec<PathResult>,
    /// a/b.
    pub conn_ratio: Option<f64>,
    pub throughput_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct PathResult {
    pub path: &'static str,
    pub name: &'static str,
    pub conns_per_sec: Vec<f64>,
    pub gbits_per_sec: Vec<f64>,
    pub conn_errors: u64,
    pub median_conns_per_sec: Option<f64>,
    pub median_gbits_per_sec: Option<f64>,
}

const PATHS: [(&str, &str); 2] = [
    ("a", "netagent egress (eBPF masquerade)"),
    ("b", "iptables MASQUERADE on a bridge"),
];

struct EgressLab {
    /// Client namespaces, by path.
    clients: [PathBuf; 2],
    lbload: PathBuf,
    /// Stopped before the lab goes (fields drop in order).
    _servers: Vec<Background>,
    _lab: Lab,
}

impl EgressLab {
    fn build(cpus: &[usize]) -> Result<EgressLab> {
        let tinyhttp = sibling_bin("tinyhttp")?;
        let lbload = sibling_bin("lbload")?;
        let lab = Lab::up(LabConfig {
            nodes: 2,
            store: StoreKind::Embedded,
            ..Default::default()
        })
        .context("lab for the egress benchmark")?;
        eprintln!("bench:   lab {}", lab.prefix());
        lab.add_outside_host(1500)?;
        netctl(&lab, 1, &["network", "create", "--subnet", SUBNET, NETWORK])?;
        netctl(
            &lab,
            1,
            &[
                "container",
                "run",
                "-d",
                "--name",
                "client",
                "--network",
                NETWORK,
                "--",
                "sleep",
                "3600",
            ],
        )?;
        let ours = inspect(&lab, 1, "client")?.netns;
        let base = build_baseline(&lab)?;
        // One server of each kind per CPU a placement puts servers on, on its own port.
        let mut servers = Vec::new();
        for &cpu in cpus {
            let http = tools::on_cpu(
                Some(cpu),
                vec![
                    tinyhttp.to_string_lossy().into_owned(),
                    (HTTP_PORT + cpu as u16).to_string(),
                    "outside".into(),
                ],
            );
            servers.push(lab.spawn_in_outside(&http)?);
            let iperf = tools::on_cpu(
                Some(cpu),
                vec![
                    "iperf3".into(),
                    "-s".into(),
                    "-p".into(),
                    (IPERF_PORT + cpu as u16).to_string(),
                ],
            );
            servers.push(lab.spawn_in_outside(&iperf)?);
        }
        let wan = Path::new(netlab::NETNS_DIR).join(lab.outside_ns());
        // New-connection runs leave tens of thousands of TIME_WAIT ports on either side.
        for ns in [&ours, &base, &wan] {
            tools::run_in(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=1024 60999",
                    "net.ipv4.tcp_tw_reuse=1",
                ],
                QUICK,
            )?;
        }
        let e = EgressLab {
            clients: [ours, base],
            lbload,
            _servers: servers,
            _lab: lab,
        };
        for (i, ns) in e.clients.iter().enumerate() {
            for &cpu in cpus {
                let addr = format!("{OUTSIDE_ADDR}:{}", HTTP_PORT + cpu as u16);
                retry(Duration::from_secs(20), || {
                    let v = e.connections(ns, &addr, 1, 0.2, None)?;
                    match v.1 {
                        0 if v.0 > 0.0 => Ok(()),
                        errors => bail!("probe: {} conn/s, {errors} errors", v.0),
                    }
                })
                .with_context(|| format!("({}) never reached {addr}", PATHS[i].0))?;
            }
        }
        Ok(e)
    }

    /// lbload's new-connection mode: (connections/s, errors).
    fn connections(
        &self,
        ns: &Path,
        addr: &str,
        workers: usize,
        secs: f64,
        cpu: Option<usize>,
    ) -> Result<(f64, u64)> {
        let argv = tools::on_cpu(
            cpu,
            vec![
                self.lbload.to_string_lossy().into_owned(),
                addr.to_owned(),
                "new".into(),
                workers.to_string(),
                secs.to_string(),
            ],
        );
        let out = tools::run_in(ns, &argv, Duration::from_secs_f64(secs + 15.0))?;
        let v: Value =
            serde_json::from_str(out.trim()).with_context(|| format!("lbload said {out:?}"))?;
        Ok((
            v["rps"].as_f64().context("no rps")?,
            v["errors"].as_u64().unwrap_or(0),
        ))
    }

    fn throughput(&self, ns: &Path, port: u16, secs: u32, cpu: usize) -> Result<f64> {
        let mut argv = tools::iperf3_client(&OUTSIDE_ADDR.to_string(), secs);
        argv.extend(["-p".into(), port.to_string()]);
        let argv = tools::on_cpu(Some(cpu), argv);
        let out = tools::run_in(ns, &argv, Duration::from_secs(u64::from(secs) + 15))?;
        Ok(tools::parse_iperf3(&out)?.bits_per_second / 1e9)
    }
}

/// (b): a namespace on a Linux bridge in node 2, masqueraded by iptables out of the uplink.
/// Named under the lab's prefix, so the lab's teardown removes it with everything else.
fn build_baseline(lab: &Lab) -> Result<PathBuf> {
    let node = lab.node_ns(BASE_NODE);
    let name = format!("{}-mq", lab.prefix());
    tools::host("ip", &["netns", "add", &name])?;
    let ns = Path::new(netlab::NETNS_DIR).join(&name);
    let bridge_addr = format!("{BRIDGE_ADDR}/24");
    let base_addr = format!("{BASE_ADDR}/24");
    let gw = BRIDGE_ADDR.to_string();
    let steps: [&[&str]; 11] = [
        &["-n", &name, "link", "set", "lo", "up"],
        &["-n", &node, "link", "add", BRIDGE, "type", "bridge"],
        &["-n", &node, "addr", "add", &bridge_addr, "dev", BRIDGE],
        &["-n", &node, "link", "set", BRIDGE, "up"],
        &[
            "link",
            "add",
            "mq0",
            "netns",
            &node,
            "mtu",
            CONTAINER_MTU,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &name,
            "mtu",
            CONTAINER_MTU,
        ],
        &["-n", &node, "link", "set", "mq0", "master", BRIDGE],
        &["-n", &node, "link", "set", "mq0", "up"],
        &["-n", &name, "addr", "add", &base_addr, "dev", "eth0"],
        &["-n", &name, "link", "set", "eth0", "up"],
        &["-n", &name, "route", "add", "default", "via", &gw],
        &["-n", &node, "link", "set", "mq0", "mtu", CONTAINER_MTU],
    ];
    for s in steps {
        tools::host("ip", s)?;
    }
    let node_ns = Path::new(netlab::NETNS_DIR).join(&node);
    tools::run_in(
        &node_ns,
        &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        QUICK,
    )?;
    tools::run_in(
        &node_ns,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.61.0.0/24",
            "-o",
            netlab::UPLINK,
            "-j",
            "MASQUERADE",
        ],
        QUICK,
    )?;
    Ok(ns)
}

pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let date = machine::utc_now()?;
    for tool in ["iptables", "iperf3", "taskset"] {
        if !tools::have(tool) {
            bail!("`{tool}` is not installed: run `cargo xtask setup`");
        }
    }
    let last = std::thread::available_parallelism().map_or(1, usize::from) - 1;
    // Both on the last CPU, then split (as the other benchmarks).
    let placements: Vec<[usize; 2]> = if last == 0 {
        vec![[0, 0]]
    } else {
        vec![[last, last], [0, last]]
    };
    let mut server_cpus: Vec<usize> = placements.iter().map(|p| p[1]).collect();
    server_cpus.dedup();
    eprintln!("bench: building the lab (2 nodes, an outside host, the iptables baseline on n2)");
    let lab = EgressLab::build(&server_cpus)?;
    let mut report = Report {
        bench: "egress",
        date,
        machine: Machine::probe(),
        runs: opts.runs,
        secs_per_run: opts.secs,
        workers: opts.workers,
        placements: Vec::new(),
        elapsed_secs: 0.0,
    };
    for [ccpu, scpu] in placements {
        let mut paths: Vec<PathResult> = PATHS
            .iter()
            .map(|(path, name)| PathResult {
                path,
                name,
                conns_per_sec: Vec::new(),
                gbits_per_sec: Vec::new(),
                conn_errors: 0,
                median_conns_per_sec: None,
                median_gbits_per_sec: None,
            })
            .collect();
        let http = format!("{OUTSIDE_ADDR}:{}", HTTP_PORT + scpu as u16);
        for round in 0..opts.runs {
            for k in 0..PATHS.len() {
                let pi = (round + k) % PATHS.len();
                let ns = &lab.clients[pi];
                let (cps, errors) =
                    lab.connections(ns, &http, opts.workers, f64::from(opts.secs), Some(ccpu))?;
                let gbps = lab.throughput(ns, IPERF_PORT + scpu as u16, opts.secs, ccpu)?;
                eprintln!(
                    "bench: cpus {ccpu},{scpu} run {}/{} ({}): {cps:.0} conn/s ({errors} errors), {gbps:.2} Gbit/s",
                    round + 1,
                    opts.runs,
                    PATHS[pi].0
                );
                let p = &mut paths[pi];
                p.conns_per_sec.push(cps);
                p.gbits_per_sec.push(gbps);
                p.conn_errors += errors;
            }
        }
        for p in &mut paths {
            p.median_conns_per_sec = median(&p.conns_per_sec);
            p.median_gbits_per_sec = median(&p.gbits_per_sec);
        }
        let ratio = |f: fn(&PathResult) -> Option<f64>| match (f(&paths[0]), f(&paths[1])) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        report.placements.push(Placement {
            cpus: [ccpu, scpu],
            conn_ratio: ratio(|p| p.median_conns_per_sec),
            throughput_ratio: ratio(|p| p.median_gbits_per_sec),
            paths,
        });
    }
    // The lab goes before the report is printed: its teardown is part of the run.
    drop(lab);
    report.elapsed_secs = started.elapsed().as_secs_f64();
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.json, serde_json::to_vec_pretty(&report)?)?;
    println!("{}", render(&report, opts.markdown).join("\n"));
    println!("(JSON: {})", opts.json.display());
    Ok(())
}

fn render(r: &Report, markdown: bool) -> Vec<String> {
    let header: Vec<String> = [
        "CPUs (client,server)",
        "path",
        "new conn/s",
        "TCP Gbit/s",
        "conn errors",
    ]
    .map(str::to_owned)
    .into();
    let mut rows = Vec::new();
    for p in &r.placements {
        let cpus = format!("{},{}", p.cpus[0], p.cpus[1]);
        for path in &p.paths {
            rows.push(vec![
                cpus.clone(),
                format!("({}) {}", path.path, path.name),
                table::fmt(path.median_conns_per_sec, 0),
                table::fmt(path.median_gbits_per_sec, 2),
                path.conn_errors.to_string(),
            ]);
        }
        rows.push(vec![
            cpus,
            "a/b".into(),
            table::fmt(p.conn_ratio, 2),
            table::fmt(p.throughput_ratio, 2),
            String::new(),
        ]);
    }
    let mut out = vec![format!(
        "egress: {} runs of {} s per case (medians), {} lbload workers; {}",
        r.runs,
        r.secs_per_run,
        r.workers,
        r.machine.summary()
    )];
    out.extend(match markdown {
        true => table::grid_markdown(&header, &rows),
        false => table::grid_plain(&header, &rows),
    });
    out
}
