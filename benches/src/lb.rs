//! The load-balancer benchmark (issue 4, "Benchmark"): new connections/s
//! (one request per connection) and keep-alive requests/s with p50/p99
//! latency through (a) the service VIP from a client container, (b) the
//! routing mesh from a host on the fabric to a node's published port, against
//! (c) iptables DNAT round-robin the kube-proxy way and (d) HAProxy TCP
//! roundrobin, with the same three replicas; then again with 1000 other
//! services defined. Baselines whose tool is not installed are reported as
//! missing, not installed.
//!
//! The server is `tinyhttp` and the client `lbload`, both in this crate (no
//! nginx or wrk here). Rounds rotate the order of the paths so a slow moment
//! hits them alike; the median of the runs is quoted.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::lbsetup::{BaseLab, LbLab};
use crate::machine::{self, Machine};
use crate::tools::{have, median};

pub struct Options {
    pub runs: usize,
    pub secs: f64,
    pub workers: usize,
    /// Other services defined for the second phase.
    pub services: usize,
    /// Extra arguments for this product's agents.
    pub agent_args: Vec<String>,
    pub json: PathBuf,
    pub markdown: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub date: String,
    pub machine: Machine,
    pub method: Method,
    pub results: Vec<Case>,
    pub ratios: Vec<Ratio>,
    pub missing: Vec<String>,
    pub elapsed_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct Method {
    pub runs: usize,
    pub secs_per_run: f64,
    pub workers: usize,
    pub server: &'static str,
    pub client: &'static str,
    pub vip: String,
    pub mesh: String,
    /// (c) and (d) as `(letter) address`.
    pub baselines: Vec<String>,
    pub replicas: Vec<String>,
    pub baseline_backends: Vec<String>,
    pub notes: Vec<String>,
    pub netagent_build: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub rps: f64,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Case {
    /// a, b, c, d
    pub path: &'static str,
    pub name: &'static str,
    pub other_services: usize,
    /// `new` or `keepalive`
    pub mode: &'static str,
    pub runs: Vec<Run>,
    pub median_rps: Option<f64>,
    pub median_p50_us: Option<f64>,
    pub median_p99_us: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Ratio {
    pub name: String,
    pub other_services: usize,
    pub mode: &'static str,
    pub rps: Option<f64>,
    pub p99: Option<f64>,
}

const PATHS: [(&str, &str); 4] = [
    ("a", "netagent VIP"),
    ("b", "netagent routing mesh"),
    ("c", "iptables DNAT (kube-proxy)"),
    ("d", "HAProxy TCP roundrobin"),
];
const MODES: [&str; 2] = ["new", "keepalive"];

fn parse_run(out: &str) -> Result<Run> {
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("lbload said {out:?}"))?;
    Ok(Run {
        rps: v["rps"].as_f64().context("no rps")?,
        requests: v["requests"].as_u64().unwrap_or(0),
        errors: v["errors"].as_u64().unwrap_or(0),
        p50_us: v["p50_us"].as_f64(),
        p99_us: v["p99_us"].as_f64(),
    })
}

pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let date = machine::utc_now()?;
    let mut missing = Vec::new();
    let (iptables, haproxy) = (
        have("iptables") && have("iptables-restore"),
        have("haproxy"),
    );
    if !iptables {
        missing.push("(c) iptables DNAT: `iptables` is not installed (Debian package iptables; `cargo xtask setup`)".to_owned());
    }
    if !haproxy {
        missing.push(
            "(d) HAProxy: `haproxy` is not installed (Debian package haproxy; `cargo xtask setup`)"
                .to_owned(),
        );
    }
    for m in &missing {
        eprintln!("bench: missing {m}");
    }

    eprintln!(
        "bench: building the lab (3 nodes, service {} with 3 tinyhttp replicas)",
        crate::lbsetup::SERVICE
    );
    let mut lab = LbLab::build(&opts.agent_args)?;
    // (index into PATHS, client netns, address)
    let mut targets: Vec<(usize, PathBuf, String)> = lab
        .targets()
        .into_iter()
        .enumerate()
        .map(|(i, (ns, a))| (i, ns.to_owned(), a))
        .collect();
    let mut base = if iptables || haproxy {
        eprintln!("bench: building the baselines' lab (3 backend nodes + a proxy node)");
        let b = BaseLab::build(iptables, haproxy)?;
        targets.extend(b.targets());
        Some(b)
    } else {
        None
    };
    let mut results = Vec::new();
    for phase in [0, opts.services] {
        if phase > 0 {
            let t = Instant::now();
            eprintln!("bench: defining {phase} other services");
            lab.add_services(phase)?;
            if let Some(b) = base.as_mut() {
                b.add_services(phase)?;
            }
            eprintln!("bench:   took {:.1} s", t.elapsed().as_secs_f64());
        }
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); targets.len() * MODES.len()];
        for round in 0..opts.runs {
            for k in 0..targets.len() {
                let ti = (round + k) % targets.len();
                let (pi, ns, addr) = &targets[ti];
                for (mi, mode) in MODES.iter().enumerate() {
                    let ours = *pi < 2;
                    let before = if ours {
                        crate::cluster::drops(&lab.lab, crate::lbsetup::REPLICAS)?
                    } else {
                        Default::default()
                    };
                    let out = lab.load(ns, addr, mode, opts.workers, opts.secs)?;
                    let r = parse_run(&out)?;
                    if ours {
                        // What the datapath dropped during the run, if anything.
                        let after = crate::cluster::drops(&lab.lab, crate::lbsetup::REPLICAS)?;
                        let new: Vec<String> = after
                            .iter()
                            .filter(|(k, n)| before.get(*k).is_none_or(|b| *b < **n))
                            .map(|(k, n)| format!("{k}=+{}", n - before.get(k).unwrap_or(&0)))
                            .collect();
                        if !new.is_empty() {
                            eprintln!("bench:   drops during the run: {}", new.join(" "));
                        }
                    }
                    eprintln!(
                        "bench: {} services, run {}/{} ({}) {mode}: {:.0} req/s, p50 {} us, p99 {} us, {} errors",
                        phase,
                        round + 1,
                        opts.runs,
                        PATHS[*pi].0,
                        r.rps,
                        r.p50_us.unwrap_or(f64::NAN),
                        r.p99_us.unwrap_or(f64::NAN),
                        r.errors
                    );
                    runs[ti * MODES.len() + mi].push(r);
                }
            }
        }
        for ti in 0..targets.len() {
            let pi = targets[ti].0;
            for (mi, mode) in MODES.iter().enumerate() {
                let rs = std::mem::take(&mut runs[ti * MODES.len() + mi]);
                let med = |f: fn(&Run) -> Option<f64>| {
                    median(&rs.iter().filter_map(f).collect::<Vec<_>>())
                };
                results.push(Case {
                    path: PATHS[pi].0,
                    name: PATHS[pi].1,
                    other_services: phase,
                    mode,
                    median_rps: med(|r| Some(r.rps)),
                    median_p50_us: med(|r| r.p50_us),
                    median_p99_us: med(|r| r.p99_us),
                    runs: rs,
                });
            }
        }
    }
    let method = Method {
        runs: opts.runs,
        secs_per_run: opts.secs,
        workers: opts.workers,
        server: "tinyhttp (benches/src/bin/tinyhttp.rs), one per replica, 64 threads",
        client: "lbload (benches/src/bin/lbload.rs) via nsenter; `new`: connect, GET, read, close",
        vip: targets[0].2.clone(),
        mesh: targets[1].2.clone(),
        baselines: targets[2..]
            .iter()
            .map(|(pi, _, a)| format!("({}) {a}", PATHS[*pi].0))
            .collect(),
        replicas: lab.replica_ips.iter().map(|ip| ip.to_string()).collect(),
        baseline_backends: base.as_ref().map_or_else(Vec::new, |b| {
            b.backend_ips.iter().map(|ip| ip.to_string()).collect()
        }),
        notes: {
            let mut notes = base.as_ref().map_or_else(Vec::new, |b| b.notes.clone());
            if !opts.agent_args.is_empty() {
                notes.push(format!("(a), (b) agent args {}", opts.agent_args.join(" ")));
            }
            notes
        },
        // The agent's profile, not this binary's (xtask hands the bench a release agent).
        netagent_build: machine::netagent_binary().1,
    };
    drop(base);
    drop(lab);

    let mut ratios = Vec::new();
    let find = |p: &str, s: usize, m: &str| {
        results
            .iter()
            .find(|c| c.path == p && c.other_services == s && c.mode == m)
    };
    for (of, to) in [("a", "c"), ("b", "c"), ("a", "d"), ("b", "a")] {
        for s in [0, opts.services] {
            for mode in MODES {
                let (x, y) = (find(of, s, mode), find(to, s, mode));
                let div = |f: fn(&Case) -> Option<f64>| Some(f(x?)? / f(y?)?);
                ratios.push(Ratio {
                    name: format!("{of}/{to}"),
                    other_services: s,
                    mode,
                    rps: div(|c| c.median_rps),
                    p99: div(|c| c.median_p99_us),
                });
            }
        }
    }
    let report = Report {
        bench: "lb",
        date,
        machine: Machine::probe(),
        method,
        results,
        ratios,
        missing,
        elapsed_secs: started.elapsed().as_secs_f64(),
    };
    println!("{}", table(&report, opts.markdown));
    if let Some(dir) = opts.json.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&opts.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    eprintln!(
        "bench: wrote {} ({:.0} s)",
        opts.json.display(),
        report.elapsed_secs
    );
    Ok(())
}

fn f(v: Option<f64>, places: usize) -> String {
    v.map_or("n/a".to_owned(), |v| format!("{v:.places$}"))
}

fn table(r: &Report, markdown: bool) -> String {
    let header = [
        "path",
        "other services",
        "new conn/s",
        "new p99 us",
        "keep-alive req/s",
        "keep-alive p50 us",
        "keep-alive p99 us",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for &(p, name) in &PATHS {
        let mut services: Vec<usize> = r.results.iter().map(|c| c.other_services).collect();
        services.dedup();
        for s in services {
            let get = |m: &str| {
                r.results
                    .iter()
                    .find(|c| c.path == p && c.other_services == s && c.mode == m)
            };
            let (n, k) = (get("new"), get("keepalive"));
            if n.is_none() && k.is_none() {
                rows.push(vec![
                    format!("({p}) {name}"),
                    s.to_string(),
                    "missing".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ]);
                continue;
            }
            rows.push(vec![
                format!("({p}) {name}"),
                s.to_string(),
                f(n.and_then(|c| c.median_rps), 0),
                f(n.and_then(|c| c.median_p99_us), 0),
                f(k.and_then(|c| c.median_rps), 0),
                f(k.and_then(|c| c.median_p50_us), 0),
                f(k.and_then(|c| c.median_p99_us), 0),
            ]);
        }
    }
    let mut out = Vec::new();
    if markdown {
        out.push(format!("| {} |", header.join(" | ")));
        out.push(format!("|{}", "---|".repeat(header.len())));
        for row in &rows {
            out.push(format!("| {} |", row.join(" | ")));
        }
    } else {
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].len())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        out.push(line(header.to_vec()));
        for row in &rows {
            out.push(line(row.iter().map(String::as_str).collect()));
        }
    }
    out.push(String::new());
    out.push(format!(
        "medians of {} runs, {} s each, {} workers; {}",
        r.method.runs,
        r.method.secs_per_run,
        r.method.workers,
        r.machine.summary()
    ));
    for x in &r.ratios {
        out.push(format!(
            "ratio {} ({} other services, {}): req/s {}, p99 {}",
            x.name,
            x.other_services,
            x.mode,
            f(x.rps, 2),
            f(x.p99, 2)
        ));
    }
    for n in &r.method.notes {
        out.push(format!("note: {n}"));
    }
    for m in &r.missing {
        out.push(format!("missing: {m}"));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lbload_output() {
        let r = parse_run(
            r#"{"mode":"new","workers":8,"secs":2.001,"requests":26000,"errors":1,"rps":12993.5,"p50_us":450,"p99_us":null}"#,
        )
        .unwrap();
        assert_eq!((r.requests, r.errors), (26000, 1));
        assert_eq!(r.rps, 12993.5);
        assert_eq!(r.p50_us, Some(450.0));
        assert_eq!(r.p99_us, None);
        assert!(parse_run("connect: refused").is_err());
        assert!(parse_run(r#"{"requests":1}"#).is_err());
    }
}
