//! The DNS benchmark (DESIGN.md section 9, DNS row; issue 5): dnsperf
//! against the embedded resolver at 127.0.0.11 in a container, for local
//! names and for forwarded ones, and against dnsmasq serving the same local
//! names from a hosts file in the same namespace (see dnslab.rs for the lab).
//!
//! Each case is measured twice per round:
//! - saturated: dnsperf keeps 100 queries in flight (a closed loop), which
//!   gives the most queries/s the server manages; latency there is mostly
//!   queueing (100 / rate), so it says more about throughput than about
//!   what an application waits.
//! - at a fixed rate well below either server's capacity: the latency an
//!   application sees from a resolver that is not the bottleneck; this is
//!   the p99 the 1 ms target is about.
//!
//! The cases run in interleaved rounds (rotated each round), so a slow
//! minute on a shared machine hits all of them alike; medians are quoted.
//! CPU time of the servers (from /proc) and of dnsperf (from the shell's
//! `times`) is read around every run: on 2 CPUs, client and server share
//! the machine, and a client at 100% of its CPU caps what a server can show.
//! So is the whole machine's (/proc/stat), so that a run a concurrent job
//! disturbed is flagged, with the busiest other process named.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::dnslab::{self, DnsLab, NameCounts};
use crate::dnsperf::{self, DnsperfRun, Load};
use crate::machine::{self, Machine};
use crate::table::{self, fmt};
use crate::tools::{self, CpuTimes, median};

/// Past the measuring time: dnsperf's start and its last queries' timeout (1 s).
const TOOL_SLACK: Duration = Duration::from_secs(15);
/// The targets.
const TARGET_QPS_RATIO: f64 = 1.0;
const TARGET_P99_US: f64 = 1000.0;
/// A client above this share of its CPU is (close to) the bottleneck.
const CLIENT_BOUND_PCT: f64 = 90.0;
/// Other processes above this share of all CPUs during a run disturbed it
/// (undisturbed runs on the 2-CPU VM read 0-5%: etcd, kernel threads).
const OTHERS_DISTURB_PCT: f64 = 10.0;

pub struct Options {
    /// Rounds; each measures every case once saturated and once at `rate`.
    pub runs: usize,
    /// Seconds of each saturated run.
    pub secs: u32,
    /// Seconds of each fixed-rate run.
    pub rate_secs: u32,
    /// Queries/s of the fixed-rate runs.
    pub rate: u32,
    /// Local names (and forwarded names) in the query files.
    pub names: usize,
    pub json: PathBuf,
    pub markdown: bool,
}

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    /// netagent at 127.0.0.11, names of the containers' network.
    OursLocal,
    /// netagent at 127.0.0.11, names it forwards to the upstream.
    OursForwarded,
    /// dnsmasq at 127.0.0.12, the same local names from a hosts file.
    DnsmasqLocal,
}

impl Case {
    pub const ALL: [Case; 3] = [Case::OursLocal, Case::OursForwarded, Case::DnsmasqLocal];

    /// Column header of the table.
    pub fn short(self) -> &'static str {
        match self {
            Case::OursLocal => "ours, local",
            Case::OursForwarded => "ours, forwarded",
            Case::DnsmasqLocal => "dnsmasq, local",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Case::OursLocal => "netagent at 127.0.0.11, local names",
            Case::OursForwarded => "netagent at 127.0.0.11, forwarded names",
            Case::DnsmasqLocal => "dnsmasq at 127.0.0.12, local names from a hosts file",
        }
    }

    fn server(self) -> &'static str {
        match self {
            Case::OursLocal | Case::OursForwarded => dnslab::OURS_ADDR,
            Case::DnsmasqLocal => dnslab::BASELINE_ADDR,
        }
    }

    fn queries(self, lab: &DnsLab) -> &Path {
        match self {
            Case::OursLocal | Case::DnsmasqLocal => &lab.local_queries,
            Case::OursForwarded => &lab.forwarded_queries,
        }
    }

    fn server_pid(self, lab: &DnsLab) -> Option<u32> {
        match self {
            Case::OursLocal | Case::OursForwarded => lab.agent_pid,
            Case::DnsmasqLocal => lab.baseline_pid,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub date: String,
    pub machine: Machine,
    pub method: Method,
    pub lab: String,
    pub names: NameCounts,
    pub cases: Vec<CaseResult>,
    /// ours/dnsmasq on local names.
    pub ratio: Ratio,
    pub targets: Targets,
    /// Runs with lost queries or answers other than NOERROR, rates not kept.
    pub warnings: Vec<String>,
    pub elapsed_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct Method {
    pub path: &'static str,
    pub names: String,
    pub upstream: String,
    pub runs: usize,
    pub secs_per_run: u32,
    pub rate_secs_per_run: u32,
    pub rate: u32,
    pub saturated: String,
    pub at_rate: String,
    pub dnsperf_version: String,
    pub dnsmasq_version: String,
    /// The netagent binary the lab ran and its build profile: the resolver
    /// is user-space code, so unlike the overlay this matters.
    pub netagent: String,
    pub netagent_build: String,
}

/// One dnsperf run with the CPU time spent around it.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub dnsperf: DnsperfRun,
    /// CPU seconds of the answering server during the run: netagent (all
    /// its threads), or the baseline dnsmasq.
    pub server_cpu_secs: Option<f64>,
    /// Forwarded names only: the upstream dnsmasq's CPU seconds.
    pub upstream_cpu_secs: Option<f64>,
    /// Where all CPUs' time went during the run.
    pub machine_cpu: Option<MachineCpu>,
    /// CPU time of everything but the servers and dnsperf, in % of all
    /// CPUs, from /proc/stat: on a shared machine, how much a concurrent job
    /// disturbed the run, short-lived processes and kernel work included.
    /// /proc/stat counts busy time by sampling at ticks, which a mostly idle
    /// tickless machine gets wrong both ways (measured here at 2000 q/s with
    /// nothing else running: 2-7 points too low for local names, 8-26 too
    /// high for forwarded ones), so this is only quoted for saturated runs.
    pub others_cpu_pct: Option<f64>,
    /// CPU time of the other processes alive at the end of the run, in % of
    /// all CPUs, from their own (exact) counters: the disturbance measure of
    /// the fixed-rate runs. Processes that exited during the run are missed.
    pub other_processes_cpu_pct: Option<f64>,
    /// The biggest of those, to tell a concurrent job from a cost of the
    /// path (kernel threads would show here): `name (pid N): P% of a CPU`.
    pub busiest_other: Option<String>,
}

/// All CPUs' time during a run by kind, in % of the machine (sums to 100):
/// what the processes' own CPU times leave out (softirq work on loopback
/// packets, idle time while client and server wait on each other, steal).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MachineCpu {
    pub user_pct: f64,
    pub system_pct: f64,
    pub softirq_pct: f64,
    pub irq_pct: f64,
    pub steal_pct: f64,
    pub idle_pct: f64,
}

impl MachineCpu {
    fn of(t: &CpuTimes) -> Option<MachineCpu> {
        let total = t.total();
        let pct = |v: u64| round(v as f64 / total as f64 * 100.0, 1);
        (total > 0).then(|| MachineCpu {
            user_pct: pct(t.user),
            system_pct: pct(t.system),
            softirq_pct: pct(t.softirq),
            irq_pct: pct(t.irq),
            steal_pct: pct(t.steal),
            idle_pct: pct(t.idle),
        })
    }
}

/// `v` to `places` decimals: CPU times are ticks (10 ms), more digits are noise.
fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

impl Sample {
    fn per_run_secs(&self, cpu: Option<f64>) -> Option<f64> {
        let secs = self.dnsperf.run_secs;
        cpu.filter(|_| secs > 0.0).map(|c| c / secs * 100.0)
    }

    fn server_cpu_pct(&self) -> Option<f64> {
        self.per_run_secs(self.server_cpu_secs)
    }

    fn upstream_cpu_pct(&self) -> Option<f64> {
        self.per_run_secs(self.upstream_cpu_secs)
    }

    fn client_cpu_pct(&self) -> Option<f64> {
        self.per_run_secs(self.dnsperf.client_cpu_secs)
    }

    fn server_cpu_us_per_query(&self) -> Option<f64> {
        let n = self.dnsperf.completed;
        self.server_cpu_secs
            .filter(|_| n > 0)
            .map(|c| c / n as f64 * 1e6)
    }
}

#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub key: Case,
    pub name: &'static str,
    pub server: &'static str,
    pub saturated: Vec<Sample>,
    pub at_rate: Vec<Sample>,
    pub median: Medians,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Medians {
    pub qps: Option<f64>,
    pub saturated_avg_us: Option<f64>,
    pub saturated_p99_us: Option<f64>,
    pub rate_avg_us: Option<f64>,
    pub rate_p50_us: Option<f64>,
    pub rate_p99_us: Option<f64>,
    pub server_cpu_pct: Option<f64>,
    pub server_cpu_us_per_query: Option<f64>,
    pub upstream_cpu_pct: Option<f64>,
    pub client_cpu_pct: Option<f64>,
    pub machine_idle_pct: Option<f64>,
    pub machine_softirq_pct: Option<f64>,
    pub others_cpu_pct: Option<f64>,
}

impl Medians {
    fn of(saturated: &[Sample], at_rate: &[Sample]) -> Medians {
        let m = |samples: &[Sample], f: &dyn Fn(&Sample) -> Option<f64>| {
            median(&samples.iter().filter_map(f).collect::<Vec<_>>())
        };
        Medians {
            qps: m(saturated, &|s| Some(s.dnsperf.qps)),
            saturated_avg_us: m(saturated, &|s| Some(s.dnsperf.avg_us)),
            saturated_p99_us: m(saturated, &|s| s.dnsperf.p99_us),
            rate_avg_us: m(at_rate, &|s| Some(s.dnsperf.avg_us)),
            rate_p50_us: m(at_rate, &|s| s.dnsperf.p50_us),
            rate_p99_us: m(at_rate, &|s| s.dnsperf.p99_us),
            server_cpu_pct: m(saturated, &Sample::server_cpu_pct),
            server_cpu_us_per_query: m(saturated, &Sample::server_cpu_us_per_query),
            upstream_cpu_pct: m(saturated, &Sample::upstream_cpu_pct),
            client_cpu_pct: m(saturated, &Sample::client_cpu_pct),
            machine_idle_pct: m(saturated, &|s| s.machine_cpu.map(|c| c.idle_pct)),
            machine_softirq_pct: m(saturated, &|s| s.machine_cpu.map(|c| c.softirq_pct)),
            others_cpu_pct: m(saturated, &|s| s.others_cpu_pct),
        }
    }
}

/// ours/dnsmasq on the same local names, per metric (queries/s: higher is
/// better; latency and CPU per query: lower is better).
#[derive(Debug, Default, Serialize)]
pub struct Ratio {
    pub qps: Option<f64>,
    pub saturated_avg: Option<f64>,
    pub saturated_p99: Option<f64>,
    pub rate_avg: Option<f64>,
    pub rate_p99: Option<f64>,
    pub server_cpu_per_query: Option<f64>,
}

/// The targets and whether this run met them (`None`: not measured).
#[derive(Debug, Serialize)]
pub struct Targets {
    pub qps_ratio_at_least: f64,
    pub qps_ratio_met: Option<bool>,
    pub p99_us_below: f64,
    /// Ours, local names, at the fixed rate.
    pub p99_at_rate_met: Option<bool>,
    /// Ours, local names, saturated (100 queries in flight).
    pub p99_saturated_met: Option<bool>,
}

pub fn run(opts: &Options) -> Result<()> {
    tools::check_tools(&tools::DNS_TOOLS)?;
    let started = Instant::now();
    let date = machine::utc_now()?;
    let ticks = tools::clock_ticks()?;
    let names = NameCounts::new(opts.names)?;

    eprintln!(
        "bench: building the DNS lab ({} names: {} services, {} containers, {} aliases)",
        names.total, names.services, names.containers, names.aliases
    );
    let built = Instant::now();
    let lab = DnsLab::build(names)?;
    eprintln!(
        "bench:   ready in {:.0} s; client namespace {}",
        built.elapsed().as_secs_f64(),
        lab.client_netns.display()
    );

    let mut samples: Vec<(Vec<Sample>, Vec<Sample>)> =
        Case::ALL.iter().map(|_| Default::default()).collect();
    for round in 0..opts.runs {
        // Rotate the order each round so no case always runs first.
        for k in 0..Case::ALL.len() {
            let idx = (round + k) % Case::ALL.len();
            let case = Case::ALL[idx];
            let sat = measure(&lab, case, Load::Saturate, opts.secs, ticks)?;
            let at = measure(&lab, case, Load::Rate(opts.rate), opts.rate_secs, ticks)?;
            eprintln!(
                "bench: run {}/{} {}: {:.0} q/s, avg {:.0} us, p99 {} us, server CPU {}%, \
                 dnsperf CPU {}%, others {}%; at {} q/s: avg {:.0} us, p99 {} us, others {}%",
                round + 1,
                opts.runs,
                case.short(),
                sat.dnsperf.qps,
                sat.dnsperf.avg_us,
                fmt(sat.dnsperf.p99_us, 0),
                fmt(sat.server_cpu_pct(), 0),
                fmt(sat.client_cpu_pct(), 0),
                fmt(sat.others_cpu_pct, 0),
                opts.rate,
                at.dnsperf.avg_us,
                fmt(at.dnsperf.p99_us, 0),
                fmt(at.other_processes_cpu_pct, 0),
            );
            samples[idx].0.push(sat);
            samples[idx].1.push(at);
        }
    }
    let prefix = lab.prefix().to_owned();
    eprintln!("bench: tearing the lab down");
    drop(lab);

    let warnings = warnings(&samples, opts.rate);
    let cases: Vec<CaseResult> = Case::ALL
        .iter()
        .zip(samples)
        .map(|(&key, (saturated, at_rate))| CaseResult {
            key,
            name: key.describe(),
            server: key.server(),
            median: Medians::of(&saturated, &at_rate),
            saturated,
            at_rate,
        })
        .collect();
    let ratio = ratio(&cases);
    let targets = targets(&cases, &ratio);
    let (netagent, netagent_build) = machine::netagent_binary();
    let report = Report {
        bench: "dns",
        date,
        machine: Machine::probe(),
        method: Method {
            path: "dnsperf in the client container's network namespace -> 127.0.0.11 \
                   (netagent's listener in that namespace) or 127.0.0.12 (dnsmasq in \
                   the same namespace), over loopback; one node",
            names: format!(
                "{} names on one network: {} services (VIP), {} containers (one replica \
                 each), {} aliases; queries for A records, each name in turn",
                names.total, names.services, names.containers, names.aliases
            ),
            upstream: format!(
                "{} names under {}: netagent forwards them to dnsmasq --address on the \
                 lab fabric ({}:53)",
                names.forwarded,
                dnslab::FORWARDED_DOMAIN,
                netlab::FABRIC_GATEWAY
            ),
            runs: opts.runs,
            secs_per_run: opts.secs,
            rate_secs_per_run: opts.rate_secs,
            rate: opts.rate,
            saturated: format!(
                "dnsperf -c 1 -T 1 -q {} -t {} -l {} -v",
                dnsperf::OUTSTANDING,
                dnsperf::QUERY_TIMEOUT_SECS,
                opts.secs
            ),
            at_rate: format!(
                "dnsperf -c 1 -T 1 -Q {} -t {} -l {} -v",
                opts.rate,
                dnsperf::QUERY_TIMEOUT_SECS,
                opts.rate_secs
            ),
            dnsperf_version: machine::tool_line(&["dnsperf", "-h"], "Version")
                .replace("Version", "dnsperf"),
            dnsmasq_version: machine::tool_version(&["dnsmasq", "--version"])
                .split("  ")
                .next()
                .unwrap_or("unknown")
                .to_owned(),
            netagent,
            netagent_build,
        },
        lab: prefix,
        names,
        cases,
        ratio,
        targets,
        warnings,
        elapsed_secs: started.elapsed().as_secs_f64(),
    };
    println!("{}", text(&report, opts.markdown));
    if let Some(dir) = opts.json.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&opts.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("results: {}", opts.json.display());
    Ok(())
}

/// One dnsperf run of `case`, with the servers' CPU time read around it.
fn measure(lab: &DnsLab, case: Case, load: Load, secs: u32, ticks: f64) -> Result<Sample> {
    let cpu = |pid: Option<u32>| pid.and_then(|p| tools::process_cpu_secs(p, ticks).ok());
    let upstream_pid = lab.upstream_pid.filter(|_| case == Case::OursForwarded);
    let before = (
        cpu(case.server_pid(lab)),
        cpu(upstream_pid),
        tools::machine_cpu_times().ok(),
        tools::all_processes_cpu(),
    );
    let finished = dnsperf::run(
        &lab.client_netns,
        case.server(),
        case.queries(lab),
        Some(secs),
        load,
        &lab.dnsperf_out,
        Duration::from_secs(secs.into()) + TOOL_SLACK,
    )
    .with_context(|| case.describe())?;
    // Before parsing: a saturated run's output takes a moment to parse, and
    // this process's CPU would count as another process's.
    let after = (
        cpu(case.server_pid(lab)),
        cpu(upstream_pid),
        tools::machine_cpu_times().ok(),
        tools::all_processes_cpu(),
    );
    let run = finished.parse().with_context(|| case.describe())?;
    let delta = |a: Option<f64>, b: Option<f64>| Some(round(b? - a?, 3));
    let server = delta(before.0, after.0);
    let upstream = delta(before.1, after.1);
    let machine = before.2.zip(after.2).map(|(b, a)| a.since(&b));
    let machine_others = machine.and_then(|t| {
        let all_cpus_secs = t.total() as f64 / ticks;
        // Softirq and irq too: without CONFIG_IRQ_TIME_ACCOUNTING (as on
        // this project's VM) the kernel charges them to the task they
        // interrupted, so they are in the processes' times; with it, they
        // would count here as others (the table shows softirq on its own).
        let busy_secs = (t.user + t.system + t.softirq + t.irq) as f64 / ticks;
        let known = server? + run.client_cpu_secs? + upstream.unwrap_or(0.0);
        (all_cpus_secs > 0.0)
            .then(|| round(((busy_secs - known) / all_cpus_secs * 100.0).max(0.0), 1))
    });
    let known: Vec<u32> = [case.server_pid(lab), upstream_pid]
        .into_iter()
        .flatten()
        .collect();
    let other = tools::other_processes(&before.3, &after.3, &known, &["dnsperf"]);
    let all_cpus_secs = machine.map(|t| t.total() as f64 / ticks);
    let other_pct = all_cpus_secs
        .filter(|&s| s > 0.0)
        .map(|s| round(other.ticks as f64 / ticks / s * 100.0, 1));
    let busiest = other.busiest.map(|(pid, comm, t)| {
        let pct = t as f64 / ticks / run.run_secs.max(0.001) * 100.0;
        format!("{comm} (pid {pid}): {pct:.0}% of a CPU")
    });
    Ok(Sample {
        dnsperf: run,
        server_cpu_secs: server,
        upstream_cpu_secs: upstream,
        machine_cpu: machine.as_ref().and_then(MachineCpu::of),
        others_cpu_pct: machine_others.filter(|_| load == Load::Saturate),
        other_processes_cpu_pct: other_pct,
        busiest_other: busiest,
    })
}

/// Runs that did not get every query answered with NOERROR, runs other
/// processes disturbed, and fixed-rate runs that fell short of the rate
/// (their latency is then queueing).
fn warnings(samples: &[(Vec<Sample>, Vec<Sample>)], rate: u32) -> Vec<String> {
    let mut out = Vec::new();
    for (case, (saturated, at_rate)) in Case::ALL.iter().zip(samples) {
        for (kind, runs) in [("saturated", saturated), ("at rate", at_rate)] {
            for (i, s) in runs.iter().enumerate() {
                if let Some(p) = s.dnsperf.problem() {
                    out.push(format!("{}, {kind} run {}: {p}", case.short(), i + 1));
                }
                let disturbed = [s.others_cpu_pct, s.other_processes_cpu_pct]
                    .into_iter()
                    .flatten()
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                    .filter(|&o| o > OTHERS_DISTURB_PCT);
                if let Some(o) = disturbed {
                    out.push(format!(
                        "{}, {kind} run {}: other processes used {o:.0}% of all CPUs{}",
                        case.short(),
                        i + 1,
                        s.busiest_other
                            .as_ref()
                            .map_or(String::new(), |b| format!(", most {b}"))
                    ));
                }
            }
        }
        for (i, s) in at_rate.iter().enumerate() {
            if s.dnsperf.qps < 0.9 * f64::from(rate) {
                out.push(format!(
                    "{}, at-rate run {}: {:.0} q/s, short of {rate}",
                    case.short(),
                    i + 1,
                    s.dnsperf.qps
                ));
            }
        }
    }
    out
}

fn ratio(cases: &[CaseResult]) -> Ratio {
    let find = |k: Case| cases.iter().find(|c| c.key == k).map(|c| c.median);
    let (Some(a), Some(b)) = (find(Case::OursLocal), find(Case::DnsmasqLocal)) else {
        return Ratio::default();
    };
    Ratio {
        qps: div(a.qps, b.qps),
        saturated_avg: div(a.saturated_avg_us, b.saturated_avg_us),
        saturated_p99: div(a.saturated_p99_us, b.saturated_p99_us),
        rate_avg: div(a.rate_avg_us, b.rate_avg_us),
        rate_p99: div(a.rate_p99_us, b.rate_p99_us),
        server_cpu_per_query: div(a.server_cpu_us_per_query, b.server_cpu_us_per_query),
    }
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn targets(cases: &[CaseResult], ratio: &Ratio) -> Targets {
    let ours = cases
        .iter()
        .find(|c| c.key == Case::OursLocal)
        .map(|c| c.median)
        .unwrap_or_default();
    Targets {
        qps_ratio_at_least: TARGET_QPS_RATIO,
        qps_ratio_met: ratio.qps.map(|r| r >= TARGET_QPS_RATIO),
        p99_us_below: TARGET_P99_US,
        p99_at_rate_met: ours.rate_p99_us.map(|p| p < TARGET_P99_US),
        p99_saturated_met: ours.saturated_p99_us.map(|p| p < TARGET_P99_US),
    }
}

/// One metric row: how to read it from a case's medians and from the ratio.
struct Metric {
    label: String,
    value: fn(&Medians) -> Option<f64>,
    ratio: fn(&Ratio) -> Option<f64>,
    places: usize,
}

fn metrics(rate: u32) -> Vec<Metric> {
    vec![
        Metric {
            label: "queries/s, saturated".to_owned(),
            value: |m| m.qps,
            ratio: |r| r.qps,
            places: 0,
        },
        Metric {
            label: "latency avg, saturated, us".to_owned(),
            value: |m| m.saturated_avg_us,
            ratio: |r| r.saturated_avg,
            places: 0,
        },
        Metric {
            label: "latency p99, saturated, us".to_owned(),
            value: |m| m.saturated_p99_us,
            ratio: |r| r.saturated_p99,
            places: 0,
        },
        Metric {
            label: format!("latency avg at {rate} q/s, us"),
            value: |m| m.rate_avg_us,
            ratio: |r| r.rate_avg,
            places: 0,
        },
        Metric {
            label: format!("latency p99 at {rate} q/s, us"),
            value: |m| m.rate_p99_us,
            ratio: |r| r.rate_p99,
            places: 0,
        },
        Metric {
            label: "server CPU per query, us".to_owned(),
            value: |m| m.server_cpu_us_per_query,
            ratio: |r| r.server_cpu_per_query,
            places: 1,
        },
        Metric {
            label: "server CPU, % of a CPU, saturated".to_owned(),
            value: |m| m.server_cpu_pct,
            ratio: |_| None,
            places: 0,
        },
        Metric {
            label: "dnsperf CPU, % of a CPU, saturated".to_owned(),
            value: |m| m.client_cpu_pct,
            ratio: |_| None,
            places: 0,
        },
        Metric {
            label: "machine softirq, % of all CPUs, saturated".to_owned(),
            value: |m| m.machine_softirq_pct,
            ratio: |_| None,
            places: 0,
        },
        Metric {
            label: "other processes, % of all CPUs, saturated".to_owned(),
            value: |m| m.others_cpu_pct,
            ratio: |_| None,
            places: 0,
        },
        Metric {
            label: "machine idle, % of all CPUs, saturated".to_owned(),
            value: |m| m.machine_idle_pct,
            ratio: |_| None,
            places: 0,
        },
    ]
}

/// Header cells and rows: metric, each case, ours/dnsmasq.
fn cells(report: &Report) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = vec!["".to_owned()];
    header.extend(report.cases.iter().map(|c| c.key.short().to_owned()));
    header.push("ours/dnsmasq, local".to_owned());
    let rows = metrics(report.method.rate)
        .into_iter()
        .map(|m| {
            let mut row = vec![m.label];
            row.extend(
                report
                    .cases
                    .iter()
                    .map(|c| fmt((m.value)(&c.median), m.places)),
            );
            row.push(fmt((m.ratio)(&report.ratio), 2));
            row
        })
        .collect();
    (header, rows)
}

fn preamble(report: &Report) -> Vec<String> {
    let m = &report.method;
    vec![
        format!("dns benchmark, {}", report.date),
        format!("machine: {}", report.machine.summary()),
        format!("path: {}", m.path),
        format!("names: {}", m.names),
        format!("forwarded: {}", m.upstream),
        format!(
            "medians of {} runs each, interleaved; saturated: {}; at rate: {}",
            m.runs, m.saturated, m.at_rate
        ),
        format!(
            "tools: {}; {}; netagent {} build ({}); took {:.0} s",
            m.dnsperf_version, m.dnsmasq_version, m.netagent_build, m.netagent, report.elapsed_secs
        ),
    ]
}

/// Notes under the table: what the odd rows mean, the targets, warnings.
fn footer(report: &Report) -> Vec<String> {
    let met = |v: Option<bool>| match v {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    let ours = report
        .cases
        .iter()
        .find(|c| c.key == Case::OursLocal)
        .map(|c| c.median)
        .unwrap_or_default();
    let t = &report.targets;
    let mut out = vec![
        "ours/dnsmasq: queries/s higher is better; latency and CPU per query lower is better"
            .to_owned(),
        format!(
            "saturated latency is mostly queueing ({} queries in flight / rate); the fixed-rate \
             rows are what an application waits",
            dnsperf::OUTSTANDING
        ),
        "server CPU: netagent (all threads) or the baseline dnsmasq, from /proc; for \
         forwarded names netagent's only (the upstream dnsmasq's is in the JSON); other \
         processes: the machine's CPU time outside the servers and dnsperf, from /proc/stat \
         (a concurrent job shows here)"
            .to_owned(),
        format!(
            "target ours/dnsmasq queries/s >= {:.2}: {} ({}); target p99 < {:.0} us, ours \
             local: at {} q/s {} ({} us), saturated {} ({} us)",
            t.qps_ratio_at_least,
            met(t.qps_ratio_met),
            fmt(report.ratio.qps, 2),
            t.p99_us_below,
            report.method.rate,
            met(t.p99_at_rate_met),
            fmt(ours.rate_p99_us, 0),
            met(t.p99_saturated_met),
            fmt(ours.saturated_p99_us, 0),
        ),
    ];
    if report.method.netagent_build != "release" {
        out.push(format!(
            "netagent is a {} build: the resolver is user-space code, so these are not \
             the product's numbers",
            report.method.netagent_build
        ));
    }
    for c in &report.cases {
        if c.median
            .client_cpu_pct
            .is_some_and(|p| p >= CLIENT_BOUND_PCT)
        {
            out.push(format!(
                "{}: dnsperf used {}% of its CPU, so the load generator, not only the \
                 server, set that rate",
                c.key.short(),
                fmt(c.median.client_cpu_pct, 0)
            ));
        }
    }
    out.extend(report.warnings.iter().map(|w| format!("warning: {w}")));
    out
}

fn text(report: &Report, markdown: bool) -> String {
    let (header, rows) = cells(report);
    let mut out: Vec<String> = match markdown {
        true => preamble(report).into_iter().map(|l| l + "  ").collect(),
        false => preamble(report),
    };
    out.push(String::new());
    out.extend(match markdown {
        true => table::grid_markdown(&header, &rows),
        false => table::grid_plain(&header, &rows),
    });
    out.push(String::new());
    out.extend(match markdown {
        true => footer(report)
            .into_iter()
            .map(|l| format!("- {l}"))
            .collect(),
        false => footer(report),
    });
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn run(qps: f64, avg: f64, p99: f64, completed: u64) -> DnsperfRun {
        DnsperfRun {
            sent: completed,
            completed,
            lost: 0,
            rcodes: BTreeMap::from([("NOERROR".to_owned(), completed)]),
            run_secs: 10.0,
            qps,
            avg_us: avg,
            p50_us: Some(avg),
            p99_us: Some(p99),
            max_us: Some(p99),
            client_cpu_secs: Some(9.5),
        }
    }

    fn case(key: Case, qps: f64, cpu: f64) -> CaseResult {
        let sat = vec![Sample {
            dnsperf: run(qps, 1000.0, 2000.0, (qps * 10.0) as u64),
            server_cpu_secs: Some(cpu),
            upstream_cpu_secs: None,
            machine_cpu: None,
            others_cpu_pct: None,
            other_processes_cpu_pct: None,
            busiest_other: None,
        }];
        let at = vec![Sample {
            dnsperf: run(2000.0, 50.0, 400.0, 6000),
            server_cpu_secs: None,
            upstream_cpu_secs: None,
            machine_cpu: None,
            others_cpu_pct: None,
            other_processes_cpu_pct: None,
            busiest_other: None,
        }];
        CaseResult {
            key,
            name: key.describe(),
            server: key.server(),
            median: Medians::of(&sat, &at),
            saturated: sat,
            at_rate: at,
        }
    }

    #[test]
    fn medians_ratio_and_targets() {
        let cases = vec![
            case(Case::OursLocal, 40000.0, 8.0),
            case(Case::OursForwarded, 10000.0, 9.0),
            case(Case::DnsmasqLocal, 80000.0, 8.0),
        ];
        let m = cases[0].median;
        assert_eq!(m.server_cpu_pct, Some(80.0));
        assert!((m.server_cpu_us_per_query.unwrap() - 20.0).abs() < 1e-9);
        assert!((m.client_cpu_pct.unwrap() - 95.0).abs() < 1e-9);
        let r = ratio(&cases);
        assert_eq!(r.qps, Some(0.5));
        assert_eq!(r.server_cpu_per_query, Some(2.0));
        assert_eq!(r.rate_p99, Some(1.0));
        let t = targets(&cases, &r);
        assert_eq!(t.qps_ratio_met, Some(false));
        assert_eq!(t.p99_at_rate_met, Some(true));
        assert_eq!(t.p99_saturated_met, Some(false));
    }

    #[test]
    fn machine_cpu_shares() {
        let t = CpuTimes {
            user: 50,
            system: 30,
            idle: 100,
            irq: 0,
            softirq: 20,
            steal: 0,
        };
        let m = MachineCpu::of(&t).unwrap();
        assert_eq!((m.user_pct, m.softirq_pct, m.idle_pct), (25.0, 10.0, 50.0));
        assert_eq!(MachineCpu::of(&CpuTimes::default()), None);
        assert_eq!(round(7.619999999999997, 3), 7.62);
    }

    #[test]
    fn warns_about_losses_and_missed_rates() {
        let mut lossy = run(100.0, 10.0, 20.0, 990);
        lossy.sent = 1000;
        lossy.lost = 10;
        let slow = run(1500.0, 10.0, 20.0, 4500);
        let s = |r: DnsperfRun| Sample {
            dnsperf: r,
            server_cpu_secs: None,
            upstream_cpu_secs: None,
            machine_cpu: None,
            others_cpu_pct: None,
            other_processes_cpu_pct: None,
            busiest_other: None,
        };
        let disturbed = Sample {
            other_processes_cpu_pct: Some(35.0),
            busiest_other: Some("rustc (pid 9): 60% of a CPU".to_owned()),
            ..s(run(2000.0, 10.0, 20.0, 6000))
        };
        let samples = vec![
            (vec![s(lossy)], vec![s(slow), disturbed]),
            (Vec::new(), Vec::new()),
            (Vec::new(), Vec::new()),
        ];
        let w = warnings(&samples, 2000);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("saturated run 1: 10 of 1000 queries lost"));
        assert!(w[1].contains(
            "at rate run 2: other processes used 35% of all CPUs, most rustc (pid 9): 60%"
        ));
        assert!(w[2].contains("1500 q/s, short of 2000"));
    }
}
