//! The container-to-container benchmarks (DESIGN.md section 9): TCP throughput, round trip
//! and CPU per gigabyte across two nodes, for a suite of three setups:
//! - `overlay`: (a) this datapath, (b) Linux bridge + VXLAN, (c) plain routing;
//! - `encrypted`: (a) this datapath with `--opt encrypted`, (b) wireguard-go carrying bridge +
//!   VXLAN, (c) this datapath without encryption.
//!
//! Each suite is measured in two CPU placements, since results differ: client and server on
//! one CPU (throughput is then the path's CPU cost per byte), and on two (as two machines
//! would be, with the cross-CPU wake-ups that brings).
//!
//! All setups are up at the same time and measured in interleaved rounds
//! (a b c, b c a, c a b, ...), so a slow minute on a shared machine hits
//! every setup alike instead of whichever happened to run then: the ratios
//! are what this benchmark is for. The client and server tools are pinned
//! (by default both to one CPU) so a round trip never depends on where the
//! scheduler happened to put them.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::machine::{self, Machine};
use crate::setups::{self, Kind, Pair};
use crate::tools::{self, IperfRun, RttRun, median};

/// Past the measuring time: connecting, iperf3's JSON summary, sockperf's warm-up.
const TOOL_SLACK: Duration = Duration::from_secs(15);

/// Which setups a benchmark compares: columns a, b and c, a being this product.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Suite {
    pub name: &'static str,
    pub columns: [Kind; 3],
    /// The targets, for the line under the table.
    pub targets: &'static str,
}

pub const OVERLAY: Suite = Suite {
    name: "overlay",
    columns: [Kind::A, Kind::B, Kind::C],
    targets: "throughput higher is better (target a/b >= 1.10); RTT lower is better (target a/b <= 0.95)",
};

pub const ENCRYPTED: Suite = Suite {
    name: "encrypted",
    columns: [Kind::E, Kind::W, Kind::A],
    targets: "throughput higher is better (target a/b >= 4, moonshot 8); RTT lower is better (target a/b <= 0.5)",
};

impl Suite {
    /// "a", "b" or "c": the column of `kind` in this suite.
    pub fn letter(&self, kind: Kind) -> &'static str {
        match self.columns.iter().position(|k| *k == kind) {
            Some(0) => "a",
            Some(1) => "b",
            _ => "c",
        }
    }
}

pub struct Options {
    pub suite: Suite,
    /// Runs of each tool per setup.
    pub runs: usize,
    /// Seconds per run.
    pub secs: u32,
    /// The columns to measure (all of the suite's by default).
    pub kinds: Vec<Kind>,
    /// CPUs for the client and the server tools, one table per placement (see `pin` in
    /// main.rs); `None` leaves placement to the scheduler.
    pub placements: Vec<Option<[usize; 2]>>,
    /// Extra arguments for this product's agents (columns a and, encrypted, c).
    pub agent_args: Vec<String>,
    pub json: PathBuf,
    pub markdown: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub suite: Suite,
    pub date: String,
    pub machine: Machine,
    pub method: Method,
    pub setups: Vec<SetupResult>,
    pub ratios: Vec<Ratio>,
    pub elapsed_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct Method {
    pub path: &'static str,
    pub runs: usize,
    pub secs_per_run: u32,
    /// CPUs of the client and server tools, if pinned.
    pub pin: Option<[usize; 2]>,
    pub throughput: String,
    pub rtt: String,
    pub iperf3_version: String,
    pub sockperf_version: String,
    /// netagent's user-space build; the eBPF programs are release builds either way.
    pub netagent_build: String,
}

#[derive(Debug, Serialize)]
pub struct SetupResult {
    pub key: Kind,
    pub name: &'static str,
    pub lab: String,
    pub mtu: u32,
    pub notes: Vec<String>,
    pub throughput_runs: Vec<IperfRun>,
    pub rtt_runs: Vec<RttRun>,
    pub median: Medians,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Medians {
    pub throughput_bps: Option<f64>,
    /// CPU seconds of the whole machine (every CPU, all of the path) per GB received.
    pub cpu_s_per_gb: Option<f64>,
    pub rtt_avg_us: Option<f64>,
    pub rtt_p50_us: Option<f64>,
    pub rtt_p99_us: Option<f64>,
}

/// `of` divided by `to`, per metric (throughput: higher is better; RTT: lower).
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub name: String,
    pub throughput: Option<f64>,
    pub cpu_per_gb: Option<f64>,
    pub rtt_avg: Option<f64>,
    pub rtt_p50: Option<f64>,
    pub rtt_p99: Option<f64>,
}

pub fn run(opts: &Options) -> Result<()> {
    tools::check_tools(&tools::OVERLAY_TOOLS)?;
    let started = Instant::now();
    let date = machine::utc_now()?;

    // Baselines first: they need nothing but iproute2, so a broken product
    // build still fails fast here, with the baselines proven to work.
    let mut kinds: Vec<Kind> = opts
        .suite
        .columns
        .into_iter()
        .filter(|k| opts.kinds.contains(k))
        .collect();
    kinds.sort_by_key(|k| k.is_product());
    let first_server_cpu = opts.placements.first().copied().flatten().map(|[_, s]| s);
    let mut pairs: Vec<Pair> = Vec::new();
    for kind in kinds {
        eprintln!("bench: building {kind}");
        let pair = setups::build(kind, first_server_cpu, &opts.agent_args)?;
        eprintln!(
            "bench:   lab {}: client {} -> server {} ({}), MTU {}",
            pair.lab().prefix(),
            pair.client.display(),
            pair.server_ip,
            pair.server.display(),
            pair.mtu
        );
        pairs.push(pair);
    }
    let col = |k: Kind| opts.suite.columns.iter().position(|c| *c == k);
    pairs.sort_by_key(|p| col(p.kind));

    let mut reports = Vec::new();
    for pin in &opts.placements {
        for pair in &pairs {
            tools::pin_namespace(&pair.server, pin.map(|[_, s]| s))?;
        }
        let placement = describe_pin(*pin);
        eprintln!("bench: placement: {placement}");
        let mut samples: Vec<(Vec<IperfRun>, Vec<RttRun>, Vec<f64>)> =
            vec![Default::default(); pairs.len()];
        for round in 0..opts.runs {
            // Rotate the order each round so no setup always runs first.
            for k in 0..pairs.len() {
                let idx = (round + k) % pairs.len();
                let pair = &pairs[idx];
                let cpu = pin.map(|[client, _]| client);
                let (tp, cpu_gb) = measure_throughput(pair, opts.secs, cpu)?;
                let rtt = measure_rtt(pair, opts.secs, cpu)?;
                eprintln!(
                    "bench: run {}/{} {}: {:.2} Gbit/s ({} retransmits, {:.2} CPU s/GB), RTT avg {:.1} us p50 {:.1} us p99 {:.1} us",
                    round + 1,
                    opts.runs,
                    pair.kind,
                    tp.bits_per_second / 1e9,
                    tp.retransmits.map_or("?".to_owned(), |r| r.to_string()),
                    cpu_gb,
                    rtt.avg_us,
                    rtt.p50_us,
                    rtt.p99_us
                );
                samples[idx].0.push(tp);
                samples[idx].1.push(rtt);
                samples[idx].2.push(cpu_gb);
            }
        }
        let setups: Vec<SetupResult> = pairs
            .iter()
            .zip(samples)
            .map(|(p, (tp, rtt, cpu))| SetupResult {
                key: p.kind,
                name: p.kind.describe(),
                lab: p.lab().prefix().to_owned(),
                mtu: p.mtu,
                notes: p.notes.clone(),
                median: Medians {
                    throughput_bps: median(
                        &tp.iter().map(|r| r.bits_per_second).collect::<Vec<_>>(),
                    ),
                    cpu_s_per_gb: median(&cpu),
                    rtt_avg_us: median(&rtt.iter().map(|r| r.avg_us).collect::<Vec<_>>()),
                    rtt_p50_us: median(&rtt.iter().map(|r| r.p50_us).collect::<Vec<_>>()),
                    rtt_p99_us: median(&rtt.iter().map(|r| r.p99_us).collect::<Vec<_>>()),
                },
                throughput_runs: tp,
                rtt_runs: rtt,
            })
            .collect();
        reports.push(Report {
            bench: opts.suite.name,
            suite: opts.suite,
            date: date.clone(),
            machine: Machine::probe(),
            method: Method {
                path: "container on n1 -> container on n2, two lab nodes on the lab fabric \
                       bridge (veths, MTU 1500)",
                runs: opts.runs,
                secs_per_run: opts.secs,
                pin: *pin,
                throughput: format!(
                    "iperf3, 1 TCP stream, -t {}, receiver bits_per_second",
                    opts.secs
                ),
                rtt: format!(
                    "sockperf ping-pong --tcp --full-rtt, 64-byte messages, -t {}",
                    opts.secs
                ),
                iperf3_version: machine::tool_version(&["iperf3", "--version"]),
                sockperf_version: machine::tool_version(&["sockperf", "--version"]),
                netagent_build: machine::netagent_binary().1,
            },
            ratios: ratios(&opts.suite, &setups),
            setups,
            elapsed_secs: started.elapsed().as_secs_f64(),
        });
    }
    eprintln!("bench: tearing the labs down");
    drop(pairs);

    for report in &reports {
        let text = match opts.markdown {
            true => crate::table::markdown(report),
            false => crate::table::plain(report),
        };
        println!("{text}\n");
    }
    if let Some(dir) = opts.json.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&opts.json, serde_json::to_string_pretty(&reports)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("results: {}", opts.json.display());
    Ok(())
}

pub fn describe_pin(pin: Option<[usize; 2]>) -> String {
    match pin {
        Some([c, s]) if c == s => format!("client and server both on CPU {c}"),
        Some([c, s]) => format!("client on CPU {c}, server on CPU {s}"),
        None => "not pinned".to_owned(),
    }
}

/// One iperf3 run, with the CPU seconds the whole machine spent per GB received; retried
/// once, since iperf3's server can still be closing the previous test ("the server is busy")
/// when the next one starts.
fn measure_throughput(pair: &Pair, secs: u32, cpu: Option<usize>) -> Result<(IperfRun, f64)> {
    let argv = tools::on_cpu(cpu, tools::iperf3_client(&pair.server_ip.to_string(), secs));
    let ticks = tools::clock_ticks()?;
    let once = || -> Result<(IperfRun, f64)> {
        let before = tools::machine_cpu_times()?;
        let out = netlab::run(
            &mut tools::in_netns(&pair.client, &argv),
            Duration::from_secs(secs.into()) + TOOL_SLACK,
        )?;
        let spent = tools::machine_cpu_times()?.since(&before);
        // iperf3 -J puts its errors into the JSON; parse before looking at the status.
        let run = tools::parse_iperf3(&out.stdout).with_context(|| format!("`{}`", out.command))?;
        // The busy time includes iperf3's start and summary, a fraction of a second.
        let busy_s = (spent.total() - spent.idle) as f64 / ticks;
        let gb = run.bits_per_second * f64::from(secs) / 8e9;
        Ok((run, if gb > 0.0 { busy_s / gb } else { f64::NAN }))
    };
    once()
        .or_else(|first| {
            eprintln!("bench: {}: {first:#}; retrying once", pair.kind);
            std::thread::sleep(Duration::from_secs(1));
            once()
        })
        .with_context(|| format!("throughput of {}", pair.kind))
}

fn measure_rtt(pair: &Pair, secs: u32, cpu: Option<usize>) -> Result<RttRun> {
    let argv = tools::on_cpu(
        cpu,
        tools::sockperf_client(&pair.server_ip.to_string(), secs),
    );
    let out = netlab::run(
        &mut tools::in_netns(&pair.client, &argv),
        Duration::from_secs(secs.into()) + TOOL_SLACK,
    )?;
    tools::parse_sockperf(&format!("{}\n{}", out.stdout, out.stderr))
        .with_context(|| format!("round trip of {} (`{}`)", pair.kind, out.command))
}

/// a/b and a/c for whichever of them were measured.
fn ratios(suite: &Suite, setups: &[SetupResult]) -> Vec<Ratio> {
    let find = |k: Kind| setups.iter().find(|s| s.key == k).map(|s| s.median);
    let [a, b, c] = suite.columns;
    let Some(a) = find(a) else {
        return Vec::new();
    };
    [b, c]
        .into_iter()
        .filter_map(|k| find(k).map(|m| (k, m)))
        .map(|(k, m)| Ratio {
            name: format!("a/{}", suite.letter(k)),
            throughput: div(a.throughput_bps, m.throughput_bps),
            cpu_per_gb: div(a.cpu_s_per_gb, m.cpu_s_per_gb),
            rtt_avg: div(a.rtt_avg_us, m.rtt_avg_us),
            rtt_p50: div(a.rtt_p50_us, m.rtt_p50_us),
            rtt_p99: div(a.rtt_p99_us, m.rtt_p99_us),
        })
        .collect()
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(key: Kind, bps: f64, rtt: f64) -> SetupResult {
        SetupResult {
            key,
            name: key.describe(),
            lab: String::new(),
            mtu: 1450,
            notes: Vec::new(),
            throughput_runs: Vec::new(),
            rtt_runs: Vec::new(),
            median: Medians {
                throughput_bps: Some(bps),
                cpu_s_per_gb: None,
                rtt_avg_us: Some(rtt),
                rtt_p50_us: Some(rtt),
                rtt_p99_us: None,
            },
        }
    }

    #[test]
    fn ratios_are_a_over_each_baseline() {
        let r = ratios(
            &OVERLAY,
            &[
                setup(Kind::A, 11.0, 45.0),
                setup(Kind::B, 10.0, 50.0),
                setup(Kind::C, 22.0, 30.0),
            ],
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "a/b");
        assert!((r[0].throughput.unwrap() - 1.1).abs() < 1e-9);
        assert!((r[0].rtt_avg.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(r[0].rtt_p99, None);
        assert_eq!(r[1].name, "a/c");
        assert!((r[1].throughput.unwrap() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn no_ratios_without_a() {
        assert!(ratios(&OVERLAY, &[setup(Kind::B, 1.0, 1.0)]).is_empty());
        let only_a = ratios(
            &OVERLAY,
            &[setup(Kind::A, 1.0, 1.0), setup(Kind::C, 0.0, 1.0)],
        );
        assert_eq!(only_a[0].throughput, None);
    }
}
