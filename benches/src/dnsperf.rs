//! dnsperf (2.x, Debian's): the command lines the DNS benchmark runs and a
//! parser for what dnsperf prints.
//!
//! dnsperf 2.10 prints an average latency but no percentiles (no histogram
//! option either), so every run is verbose (`-v`: one line per answer with
//! its latency) and the percentiles are computed here. Writing those lines
//! to a file costs dnsperf little (measured: within run-to-run noise at
//! ~80k q/s), and both servers pay the same.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::tools;

/// Queries in flight while saturating (dnsperf's default, made explicit): a
/// closed loop, so the latency under saturation is mostly this queue's
/// length divided by the rate.
pub const OUTSTANDING: u32 = 100;
/// A query unanswered this long counts as lost. dnsperf's default (5 s)
/// would stretch a run by that much whenever a server stalls.
pub const QUERY_TIMEOUT_SECS: u32 = 1;

/// How hard a run pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// As fast as the server answers, [`OUTSTANDING`] queries in flight.
    Saturate,
    /// This many queries per second, whatever the server could do: the
    /// latency an application sees when the resolver is not the bottleneck.
    Rate(u32),
}

/// The dnsperf argv for `secs` seconds of queries from `queries` (or one
/// pass over it with `secs` = None) at `server`:53, its output into `out`.
///
/// Into a file, not a pipe: a saturated run prints ~1M `-v` lines, and a
/// reader woken for every pipe buffer took 15% of a CPU on 2 CPUs (from the
/// server or the client). Wrapped in `sh` so the shell's `times` reports
/// dnsperf's CPU time on stdout after it exits.
///
/// One client socket and one thread (`-c 1 -T 1`, the defaults, explicit):
/// on a 2-CPU machine that leaves the other CPU to the server.
pub fn argv(
    server: &str,
    queries: &Path,
    secs: Option<u32>,
    load: Load,
    out: &Path,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        // $0 is dnsperf, $1 the output file, the rest dnsperf's arguments;
        // keep dnsperf's exit status.
        r#"o=$1; shift; "$0" "$@" >"$o"; s=$?; times; exit $s"#.to_owned(),
        "dnsperf".to_owned(),
        out.display().to_string(),
    ];
    a.extend(
        [
            "-s",
            server,
            "-p",
            "53",
            "-c",
            "1",
            "-T",
            "1",
            "-t",
            &QUERY_TIMEOUT_SECS.to_string(),
            "-q",
            &OUTSTANDING.to_string(),
            "-v",
            "-d",
        ]
        .map(str::to_owned),
    );
    a.push(queries.display().to_string());
    match secs {
        Some(s) => a.extend(["-l".to_owned(), s.to_string()]),
        None => a.extend(["-n".to_owned(), "1".to_owned()]),
    }
    if let Load::Rate(qps) = load {
        a.extend(["-Q".to_owned(), qps.to_string()]);
    }
    a
}

/// Runs dnsperf (see [`argv`]) in `netns`, bounded by `timeout`; parse
/// the result with [`Finished::parse`], after reading any counters that
/// should not include the parsing.
pub fn run(
    netns: &Path,
    server: &str,
    queries: &Path,
    secs: Option<u32>,
    load: Load,
    out: &Path,
    timeout: Duration,
) -> Result<Finished> {
    let argv = argv(server, queries, secs, load, out);
    Ok(Finished {
        shell: netlab::run(&mut tools::in_netns(netns, &argv), timeout)?,
        out: out.to_path_buf(),
    })
}

/// A dnsperf run that has exited.
pub struct Finished {
    shell: netlab::Output,
    out: PathBuf,
}

impl Finished {
    /// What dnsperf wrote, with its CPU time from the shell's `times`.
    pub fn parse(self) -> Result<DnsperfRun> {
        let shell = &self.shell;
        // The shell's status is dnsperf's (128 + N: killed by signal N).
        let context = || {
            format!(
                "`{}` exited with {}: {}",
                shell.command,
                shell.status,
                shell.stderr.trim()
            )
        };
        let text = fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))
            .with_context(context)?;
        let mut run = parse(&text)
            .with_context(|| format!("{} ({} bytes)", self.out.display(), text.len()))
            .with_context(context)?;
        if !shell.success() {
            return Err(anyhow!("dnsperf failed")).with_context(context);
        }
        run.client_cpu_secs = parse_times(&shell.stdout);
        Ok(run)
    }
}

/// One dnsperf run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DnsperfRun {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    /// Answers by RCODE (`NOERROR`, `NXDOMAIN`, ...).
    pub rcodes: BTreeMap<String, u64>,
    pub run_secs: f64,
    pub qps: f64,
    /// dnsperf's own average over all answers.
    pub avg_us: f64,
    /// Nearest-rank percentiles of the per-answer latencies of `-v`.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub max_us: Option<f64>,
    /// dnsperf's own CPU time, user + system (from `times`).
    pub client_cpu_secs: Option<f64>,
}

impl DnsperfRun {
    pub fn noerror(&self) -> u64 {
        self.rcodes.get("NOERROR").copied().unwrap_or(0)
    }

    /// Why this run does not count as "every query answered with a record
    /// set", if it does not.
    pub fn problem(&self) -> Option<String> {
        match (
            self.lost,
            self.completed - self.noerror().min(self.completed),
        ) {
            (0, 0) if self.completed > 0 => None,
            (lost, other) => Some(format!(
                "{lost} of {} queries lost, {other} answers not NOERROR ({:?})",
                self.sent, self.rcodes
            )),
        }
    }
}

/// Parses dnsperf's output (the `-v` lines included); `client_cpu_secs`
/// is left to the caller, who has `times`.
pub fn parse(text: &str) -> Result<DnsperfRun> {
    let field = |key: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(key))
            .map(str::trim)
    };
    let count = |key: &str| -> Result<u64> {
        field(key)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("dnsperf printed no {key:?}"))
    };
    let Ok(sent) = count("Queries sent:") else {
        bail!("dnsperf printed no statistics:\n{}", tail(text, 20));
    };
    let number = |key: &str| -> Result<f64> {
        field(key)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("dnsperf printed no {key:?}"))
    };
    let mut latencies: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("> "))
        // `> RCODE NAME TYPE SECONDS`; a timeout has no latency.
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(DnsperfRun {
        sent,
        completed: count("Queries completed:")?,
        lost: count("Queries lost:")?,
        rcodes: parse_rcodes(field("Response codes:").unwrap_or("")),
        run_secs: number("Run time (s):")?,
        qps: number("Queries per second:")?,
        avg_us: number("Average Latency (s):")? * 1e6,
        p50_us: percentile(&latencies, 50.0),
        p99_us: percentile(&latencies, 99.0),
        max_us: latencies.last().copied(),
        client_cpu_secs: None,
    })
}

/// `NOERROR 990 (99.00%), NXDOMAIN 10 (1.00%)`.
fn parse_rcodes(s: &str) -> BTreeMap<String, u64> {
    s.split(',')
        .filter_map(|part| {
            let mut w = part.split_whitespace();
            let name = w.next()?;
            let n = w.next()?.parse().ok()?;
            Some((name.to_owned(), n))
        })
        .collect()
}

/// The children's line of the shell's `times` (the last of its two lines,
/// `0m3.120000s 0m1.010000s`): user + system seconds.
pub fn parse_times(text: &str) -> Option<f64> {
    let minutes_seconds = |w: &str| -> Option<f64> {
        let (m, s) = w.strip_suffix('s')?.split_once('m')?;
        Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
    };
    text.lines().rev().find_map(|l| {
        let mut w = l.split_whitespace();
        let (user, sys) = (minutes_seconds(w.next()?)?, minutes_seconds(w.next()?)?);
        w.next().is_none().then_some(user + sys)
    })
}

/// Nearest-rank percentile `p` of ascending `sorted`; `None` if empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 127.0.0.12 -d q -l 3 -v
[Status] Sending queries (to 127.0.0.12:53)
> NOERROR n0001 A 0.000175
> NOERROR n0002 A 0.000118
> NXDOMAIN n0003 A 0.000097
> T n0004 A
> NOERROR n0005 A 0.000044
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         5
  Queries completed:    4 (80.00%)
  Queries lost:         1 (20.00%)

  Response codes:       NOERROR 3 (75.00%), NXDOMAIN 1 (25.00%)
  Average packet size:  request 23, response 39
  Run time (s):         3.000547
  Queries per second:   1.333089

  Average Latency (s):  0.000108 (min 0.000044, max 0.000175)
  Latency StdDev (s):   0.000415
";

    #[test]
    fn parses_statistics_and_verbose_lines() {
        let r = parse(OUTPUT).unwrap();
        assert_eq!((r.sent, r.completed, r.lost), (5, 4, 1));
        assert_eq!(r.noerror(), 3);
        assert_eq!(r.rcodes["NXDOMAIN"], 1);
        assert!((r.qps - 1.333089).abs() < 1e-9);
        assert!((r.run_secs - 3.000547).abs() < 1e-9);
        assert!((r.avg_us - 108.0).abs() < 1e-6, "{}", r.avg_us);
        // Four latencies: 44, 97, 118, 175 us.
        assert!((r.p50_us.unwrap() - 97.0).abs() < 1e-6);
        assert!((r.p99_us.unwrap() - 175.0).abs() < 1e-6);
        assert!((r.max_us.unwrap() - 175.0).abs() < 1e-6);
        assert!(r.problem().unwrap().contains("1 of 5 queries lost"));
    }

    #[test]
    fn shell_times() {
        let times = "0m0.000000s 0m0.001000s\n0m1.250000s 0m0.750000s\n";
        assert!((parse_times(times).unwrap() - 2.0).abs() < 1e-9);
        assert!((parse_times("1m2.500s 0m0.500s\n").unwrap() - 63.0).abs() < 1e-9);
        assert_eq!(parse_times("no times\n"), None);
    }

    #[test]
    fn a_clean_run_has_no_problem() {
        let clean = OUTPUT
            .replace("Queries completed:    4", "Queries completed:    5")
            .replace("Queries lost:         1", "Queries lost:         0")
            .replace(
                "NOERROR 3 (75.00%), NXDOMAIN 1 (25.00%)",
                "NOERROR 5 (100.00%)",
            );
        assert_eq!(parse(&clean).unwrap().problem(), None);
    }

    #[test]
    fn no_statistics_is_an_error() {
        let err = parse("Error: could not open q\n").unwrap_err();
        assert!(err.to_string().contains("no statistics"), "{err}");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(100.0));
        assert_eq!(percentile(&v, 99.0), Some(198.0));
        assert_eq!(percentile(&v, 100.0), Some(200.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn command_lines() {
        let out = Path::new("/o");
        let sat = argv("127.0.0.11", Path::new("/q"), Some(10), Load::Saturate, out).join(" ");
        assert!(sat.ends_with("-v -d /q -l 10"), "{sat}");
        assert!(
            sat.contains("dnsperf /o -s 127.0.0.11 -p 53 -c 1 -T 1 -t 1 -q 100"),
            "{sat}"
        );
        let rate = argv(
            "127.0.0.12",
            Path::new("/q"),
            Some(3),
            Load::Rate(2000),
            out,
        );
        assert!(rate.join(" ").ends_with("-l 3 -Q 2000"), "{rate:?}");
        let once = argv("127.0.0.11", Path::new("/q"), None, Load::Saturate, out).join(" ");
        assert!(once.ends_with("-d /q -n 1"), "{once}");
    }

    #[test]
    fn the_wrapper_keeps_output_status_and_times() {
        // The same script with `echo` standing in for dnsperf.
        let dir = std::env::temp_dir().join(format!("dnsperf-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let mut a = argv("127.0.0.1", Path::new("/q"), Some(1), Load::Saturate, &out);
        a[3] = "echo".to_owned();
        let mut c = std::process::Command::new(&a[0]);
        c.args(&a[1..]);
        let shell = netlab::run(&mut c, Duration::from_secs(10)).unwrap();
        assert!(shell.success(), "{}", shell.stderr);
        let written = fs::read_to_string(&out).unwrap();
        assert!(written.starts_with("-s 127.0.0.1 -p 53"), "{written}");
        assert!(parse_times(&shell.stdout).is_some(), "{}", shell.stdout);
        a[3] = "false".to_owned();
        let mut c = std::process::Command::new(&a[0]);
        c.args(&a[1..]);
        assert!(
            !netlab::run(&mut c, Duration::from_secs(10))
                .unwrap()
                .success()
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
