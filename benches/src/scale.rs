//! `bench scale`: the control plane as the cluster grows. Three nodes on etcd, `--networks`
//! overlay networks, services of `--replicas` tasks each added in steps until the cluster
//! holds each of `--steps` endpoints. After each step settles it measures, per node: the
//! agent's memory, its idle CPU, the cost of `service create` and `container run`, the agent
//! CPU one `container run` costs (all agents, and per store revision), and how long a new
//! container takes from `container run` returning to every node's ENDPOINTS map and DNS.
//! The probe containers run on n1: n1's figures are local, n2's and n3's remote.
//!
//! There is no baseline to run beside it: the figures to compare are the steps', and the
//! growth column says how each grows with the cluster.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netlab::{Lab, LabConfig, StoreKind};
use serde::Serialize;
use serde_json::Value;

use crate::cluster::{inspect, netctl};
use crate::dnsperf::percentile;
use crate::probe::{PinnedMap, dns_socket, resolves};
use crate::table;
use crate::tools;

pub struct Options {
    pub networks: usize,
    pub replicas: usize,
    pub steps: Vec<usize>,
    pub probes: usize,
    pub json: PathBuf,
    pub markdown: bool,
}

const NODES: usize = 3;
const PROBE_NET: &str = "probe";
const PROBE_SUBNET: &str = "10.63.0.0/16";
/// What the tasks run: nothing but being there.
const TASK: &[&str] = &["sleep", "1000000"];
/// Longest wait for a probe container to show up everywhere before it counts as lost.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Quiet time before memory and idle CPU are read.
const SETTLE: Duration = Duration::from_secs(3);
const IDLE_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Serialize)]
pub struct Step {
    pub endpoints: usize,
    pub services: usize,
    /// Tasks this step added.
    pub started: usize,
    /// Containers (tasks and probes) on each node.
    pub local: Vec<usize>,
    pub rss_mb: Vec<f64>,
    /// Seconds from the step's first `service create` until every task ran.
    pub converge_secs: f64,
    pub service_create_ms: Vec<f64>,
    pub container_run_ms: Vec<f64>,
    /// Per probe: ms from `container run` returning until n1 (local) has it in its map and
    /// answers its name, and until both other nodes do (remote).
    pub arrival_local_ms: Vec<f64>,
    pub arrival_remote_ms: Vec<f64>,
    pub lost: usize,
    /// Agent CPU (all nodes) per probe `container run`, and per store revision it made.
    pub cpu_per_run_ms: f64,
    pub cpu_per_revision_ms: f64,
    /// Agent CPU (all nodes) while nothing changes, ms per second.
    pub idle_cpu_ms_per_s: f64,
}

pub fn run(o: &Options) -> Result<()> {
    if o.steps.windows(2).any(|w| w[0] >= w[1]) || o.steps.iter().any(|s| *s < o.replicas) {
        bail!(
            "--steps must grow and each be at least --replicas ({})",
            o.replicas
        );
    }
    let lab = Lab::up(LabConfig {
        nodes: NODES,
        store: StoreKind::Etcd,
        ..Default::default()
    })
    .context("lab for the scale benchmark")?;
    eprintln!("bench:   lab {}", lab.prefix());
    let probe = Probe::new(&lab)?;
    for k in 0..o.networks {
        let subnet = format!("10.{}.{}.0/24", 64 + k / 256, k % 256);
        netctl(
            &lab,
            1,
            &["network", "create", "--subnet", &subnet, &format!("net{k}")],
        )?;
    }
    let ticks = tools::clock_ticks()?;
    let mut steps: Vec<Step> = Vec::new();
    let mut services = 0;
    // A step that fails ends the run, but the steps before it are still reported.
    let mut failed = None;
    for (s, &target) in o.steps.iter().enumerate() {
        match one_step(
            &lab,
            &probe,
            o,
            ticks,
            s,
            target,
            &mut services,
            steps.last(),
        ) {
            Ok(step) => steps.push(step),
            Err(e) => {
                failed = Some(e.context(format!("step {target}")));
                break;
            }
        }
    }
    drop(probe);
    let report = Report {
        date: tools::host("date", &["-u", "+%Y-%m-%d"])?.trim().to_owned(),
        networks: o.networks,
        replicas: o.replicas,
        probes: o.probes,
        steps,
    };
    if let Some(dir) = o.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.json, serde_json::to_vec_pretty(&report)?)?;
    println!("{}", render(&report, o.markdown).join("\n"));
    println!("(JSON: {})", o.json.display());
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Grows the cluster to `target` endpoints (`services` made so far), lets it settle, and
/// measures it.
#[allow(clippy::too_many_arguments)]
fn one_step(
    lab: &Lab,
    probe: &Probe,
    o: &Options,
    ticks: f64,
    s: usize,
    target: usize,
    services: &mut usize,
    previous: Option<&Step>,
) -> Result<Step> {
    let mut step = Step {
        endpoints: target,
        ..Default::default()
    };
    let started = Instant::now();
    while *services * o.replicas < target {
        let name = format!("s{}", *services);
        let network = format!("net{}", *services % o.networks);
        let replicas = o.replicas.to_string();
        let mut args = vec![
            "service",
            "create",
            "-d",
            "--name",
            &name,
            "--network",
            &network,
            "--replicas",
            &replicas,
            "--",
        ];
        args.extend(TASK);
        let t = Instant::now();
        netctl(lab, 1 + *services % NODES, &args)?;
        step.service_create_ms.push(ms(t.elapsed()));
        *services += 1;
    }
    step.services = *services;
    step.started = *services * o.replicas - previous.map_or(0, |p| p.services * o.replicas);
    wait_running(lab, *services * o.replicas, target)?;
    step.converge_secs = started.elapsed().as_secs_f64();
    thread::sleep(SETTLE);
    let cpu0 = agents_cpu(lab, ticks)?;
    thread::sleep(IDLE_WINDOW);
    step.idle_cpu_ms_per_s = (agents_cpu(lab, ticks)? - cpu0) * 1000.0 / IDLE_WINDOW.as_secs_f64();
    let rev0 = store_revision(lab)?;
    let cpu0 = agents_cpu(lab, ticks)?;
    for k in 0..o.probes {
        let name = format!("p{s}-{k}");
        let ip = Ipv4Addr::new(10, 63, s as u8 + 1, k as u8 + 10);
        let (run, arrival) = probe.one(lab, &name, ip)?;
        step.container_run_ms.push(run);
        match arrival {
            Some([local, remote]) => {
                step.arrival_local_ms.push(local);
                step.arrival_remote_ms.push(remote);
            }
            None => step.lost += 1,
        }
    }
    // The last probe's status updates land after it arrived everywhere.
    thread::sleep(Duration::from_secs(1));
    let cpu = agents_cpu(lab, ticks)? - cpu0;
    let revisions = store_revision(lab)?.saturating_sub(rev0).max(1);
    step.cpu_per_run_ms = cpu * 1000.0 / o.probes as f64;
    step.cpu_per_revision_ms = cpu * 1000.0 / revisions as f64;
    thread::sleep(SETTLE);
    for i in 1..=NODES {
        step.rss_mb.push(rss_mb(lab, i)?);
        step.local.push(local_containers(lab, i)?);
    }
    eprintln!(
        "bench:   step {target}: {}",
        serde_json::to_string(&summary(&step))?
    );
    Ok(step)
}

/// A watcher container per node on the probe network, whose 127.0.0.11 the probe asks, and
/// each node's pinned ENDPOINTS map.
struct Probe {
    dns: Vec<UdpSocket>,
    maps: Vec<PinnedMap>,
    queries: std::cell::Cell<u16>,
}

impl Probe {
    fn new(lab: &Lab) -> Result<Probe> {
        netctl(
            lab,
            1,
            &["network", "create", "--subnet", PROBE_SUBNET, PROBE_NET],
        )?;
        let mut dns = Vec::new();
        let mut maps = Vec::new();
        for i in 1..=NODES {
            let name = format!("watch{i}");
            crate::cluster::retry(Duration::from_secs(10), || {
                probe_container(lab, i, &name, &[])
            })?;
            dns.push(dns_socket(&inspect(lab, i, &name)?.netns)?);
            maps.push(PinnedMap::open(&lab.bpf_dir(i).join("ENDPOINTS"))?);
        }
        Ok(Probe {
            dns,
            maps,
            queries: std::cell::Cell::new(0),
        })
    }

    /// Runs container `name` at `ip` on n1: how long `container run` took, then how long until
    /// n1, and until both other nodes, had it in their maps and answered for it (None: not
    /// within ARRIVAL_TIMEOUT).
    fn one(&self, lab: &Lab, name: &str, ip: Ipv4Addr) -> Result<(f64, Option<[f64; 2]>)> {
        let ip_arg = ip.to_string();
        let t = Instant::now();
        probe_container(lab, 1, name, &["--ip", &ip_arg])?;
        let run = ms(t.elapsed());
        let returned = Instant::now();
        let mut in_map = [None; NODES];
        let mut answers = [None; NODES];
        while returned.elapsed() < ARRIVAL_TIMEOUT {
            for i in 0..NODES {
                if in_map[i].is_none() && self.maps[i].contains(&ip.octets()) {
                    in_map[i] = Some(ms(returned.elapsed()));
                }
                if answers[i].is_none() {
                    let id = self.queries.get().wrapping_add(1);
                    self.queries.set(id);
                    if resolves(&self.dns[i], id, name, ip) {
                        answers[i] = Some(ms(returned.elapsed()));
                    }
                }
            }
            let node: Vec<Option<f64>> = (0..NODES)
                .map(|i| Some(in_map[i]?.max(answers[i]?)))
                .collect();
            if let Some(all) = node.iter().copied().collect::<Option<Vec<f64>>>() {
                let remote = all[1..].iter().copied().fold(0.0, f64::max);
                return Ok((run, Some([all[0], remote])));
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok((run, None))
    }
}

/// `container run -d` of a `sleep` named `name` on the probe network from node `i`.
fn probe_container(lab: &Lab, i: usize, name: &str, extra: &[&str]) -> Result<()> {
    let mut args = vec![
        "container",
        "run",
        "-d",
        "--name",
        name,
        "--network",
        PROBE_NET,
    ];
    args.extend(extra);
    args.push("--");
    args.extend(TASK);
    netctl(lab, i, &args).map(drop)
}

/// Waits until `want` tasks run (the bound allows 4 a second: a 10,000 step on 2 cores).
fn wait_running(lab: &Lab, want: usize, target: usize) -> Result<()> {
    let timeout = Duration::from_secs(60 + target as u64 / 4);
    let deadline = Instant::now() + timeout;
    let mut last = 0;
    while Instant::now() < deadline {
        let out = netctl(lab, 1, &["--format", "json", "service", "ls"])?;
        let v: Value = serde_json::from_str(&out).context("service ls is not JSON")?;
        last = v
            .as_array()
            .context("service ls is not a list")?
            .iter()
            .filter_map(|s| s["replicas"]["running"].as_u64())
            .sum::<u64>() as usize;
        if last >= want {
            return Ok(());
        }
        thread::sleep(Duration::from_secs(1));
    }
    bail!("{last} of {want} tasks running after {timeout:?}")
}

fn agents_cpu(lab: &Lab, ticks: f64) -> Result<f64> {
    (1..=NODES).try_fold(0.0, |sum, i| {
        let pid = lab.agent_pid(i).context("an agent is not running")?;
        Ok(sum + tools::process_cpu_secs(pid, ticks)?)
    })
}

fn rss_mb(lab: &Lab, i: usize) -> Result<f64> {
    let pid = lab.agent_pid(i).context("an agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn local_containers(lab: &Lab, i: usize) -> Result<usize> {
    let out = netctl(lab, i, &["--format", "json", "container", "ls"])?;
    let v: Value = serde_json::from_str(&out).context("container ls is not JSON")?;
    let node = lab.node_name(i);
    Ok(v.as_array()
        .context("container ls is not a list")?
        .iter()
        .filter(|c| c["node"].as_str() == Some(node.as_str()))
        .count())
}

/// etcd's revision, from etcdctl on the fabric.
fn store_revision(lab: &Lab) -> Result<u64> {
    let ep = lab.etcd_endpoint().context("no etcd")?;
    let argv = [
        "etcdctl",
        "--endpoints",
        &ep,
        "endpoint",
        "status",
        "-w",
        "json",
    ];
    let out = lab.exec_in_fabric(&argv)?.check()?.stdout;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("etcdctl said {out}"))?;
    v[0]["Status"]["header"]["revision"]
        .as_u64()
        .with_context(|| format!("no revision in {out}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Serialize)]
struct Report {
    date: String,
    networks: usize,
    replicas: usize,
    probes: usize,
    steps: Vec<Step>,
}

fn pct(values: &[f64], p: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, p)
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// One of a step's lists of latencies.
type Series = fn(&Step) -> &[f64];

/// One row per figure: its value at each step, then last step / first step.
fn rows(steps: &[Step]) -> Vec<(String, Vec<Option<f64>>, usize)> {
    let mut out: Vec<(String, Vec<Option<f64>>, usize)> = Vec::new();
    let mut row = |label: &str, places: usize, f: &dyn Fn(&Step) -> Option<f64>| {
        out.push((label.to_owned(), steps.iter().map(f).collect(), places));
    };
    row("containers on the busiest node", 0, &|s| {
        s.local.iter().max().map(|m| *m as f64)
    });
    row("agent RSS, largest node (MB)", 1, &|s| {
        Some(max_of(&s.rss_mb))
    });
    row("agent RSS per local container (kB)", 1, &|s| {
        let (rss, n) = s
            .rss_mb
            .iter()
            .zip(&s.local)
            .max_by(|a, b| a.0.total_cmp(b.0))?;
        Some(rss * 1024.0 / (*n).max(1) as f64)
    });
    row("agent CPU idle, all nodes (ms/s)", 1, &|s| {
        Some(s.idle_cpu_ms_per_s)
    });
    row("step: tasks started per second", 0, &|s| {
        Some(s.started as f64 / s.converge_secs.max(1e-9))
    });
    let latencies: [(&str, Series); 4] = [
        ("service create", |s| &s.service_create_ms),
        ("container run", |s| &s.container_run_ms),
        ("run -> local map + DNS", |s| &s.arrival_local_ms),
        ("run -> remote maps + DNS", |s| &s.arrival_remote_ms),
    ];
    for (what, values) in latencies {
        for p in [50.0, 99.0] {
            row(&format!("{what} p{p} (ms)"), 1, &|s| pct(values(s), p));
        }
    }
    row("probes not arrived in 10 s", 0, &|s| Some(s.lost as f64));
    row("agent CPU per container run (ms)", 1, &|s| {
        Some(s.cpu_per_run_ms)
    });
    row("agent CPU per store revision (ms)", 2, &|s| {
        Some(s.cpu_per_revision_ms)
    });
    out
}

/// The summary a step prints as it ends, for following a long run.
fn summary(step: &Step) -> Vec<(String, String)> {
    rows(std::slice::from_ref(step))
        .into_iter()
        .map(|(label, v, places)| (label, table::fmt(v[0], places)))
        .collect()
}

fn render(report: &Report, markdown: bool) -> Vec<String> {
    let mut header = vec![String::new()];
    header.extend(
        report
            .steps
            .iter()
            .map(|s| format!("{} endpoints", s.endpoints)),
    );
    header.push("last / first".to_owned());
    let rows: Vec<Vec<String>> = rows(&report.steps)
        .into_iter()
        .map(|(label, values, places)| {
            let growth = match (
                values.first().copied().flatten(),
                values.last().copied().flatten(),
            ) {
                (Some(a), Some(b)) if a > 0.0 && values.len() > 1 => Some(b / a),
                _ => None,
            };
            let mut r = vec![label];
            r.extend(values.iter().map(|v| table::fmt(*v, places)));
            r.push(table::fmt(growth, 2));
            r
        })
        .collect();
    let mut out = vec![format!(
        "Scale, {}: 3 nodes on etcd, {} networks, services of {} tasks (`sleep`), {} probe \
         containers per step run on n1 (local) and watched from n2 and n3 (remote).",
        report.date, report.networks, report.replicas, report.probes
    )];
    out.push(String::new());
    out.extend(match markdown {
        true => table::grid_markdown(&header, &rows),
        false => table::grid_plain(&header, &rows),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_and_growth() {
        let step = |endpoints, rss: f64, run: f64| Step {
            endpoints,
            services: endpoints / 10,
            started: endpoints,
            local: vec![endpoints / 3, endpoints / 3, endpoints / 3],
            rss_mb: vec![rss, rss - 1.0, rss - 2.0],
            converge_secs: 2.0,
            service_create_ms: vec![5.0, 7.0],
            container_run_ms: vec![run, run * 2.0],
            arrival_local_ms: vec![10.0],
            arrival_remote_ms: vec![20.0],
            lost: 0,
            cpu_per_run_ms: 30.0,
            cpu_per_revision_ms: 3.0,
            idle_cpu_ms_per_s: 1.0,
        };
        let report = Report {
            date: "2026-12-01".into(),
            networks: 10,
            replicas: 10,
            probes: 2,
            steps: vec![step(300, 20.0, 40.0), step(3000, 40.0, 40.0)],
        };
        let text = render(&report, false).join("\n");
        let line = |label: &str| {
            text.lines()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no {label} in\n{text}"))
                .split_whitespace()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
        };
        assert_eq!(line("agent RSS, largest"), ["2.00", "40.0", "20.0"]);
        assert_eq!(line("container run p99"), ["1.00", "80.0", "80.0"]);
        assert_eq!(line("containers on the busiest"), ["10.00", "1000", "100"]);
        assert!(text.contains("300 endpoints"), "{text}");
    }
}
