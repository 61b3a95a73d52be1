//! The measuring tools (iperf3, sockperf) and the few host commands the
//! baselines need, each bounded in time, plus parsers for what the tools
//! print (dnsperf's are in dnsperf.rs).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

/// Bound for one `ip`/`bridge`/`sysctl`/`ss` call; they take milliseconds.
pub const QUICK: Duration = Duration::from_secs(10);
/// TCP port of `sockperf server` (its default).
pub const SOCKPERF_PORT: u16 = 11111;
/// Commands a benchmark needs, and the Debian packages that bring them.
pub struct Tools {
    pub commands: &'static [&'static str],
    pub packages: &'static str,
}

/// What the overlay benchmark runs.
pub const OVERLAY_TOOLS: Tools = Tools {
    commands: &[
        "iperf3", "sockperf", "nsenter", "ip", "bridge", "ping", "ss",
    ],
    packages: "iperf3, sockperf, iproute2, iputils-ping, util-linux",
};

/// What the DNS benchmark runs (`getconf` turns /proc CPU ticks into seconds).
pub const DNS_TOOLS: Tools = Tools {
    commands: &["dnsperf", "dnsmasq", "dig", "nsenter", "getconf"],
    packages: "dnsperf, dnsmasq-base, dnsutils, util-linux, libc-bin",
};

/// A command that runs `argv` in the network namespace at `netns` (a path
/// under /run/netns or an agent's container netns path). `nsenter --net`
/// switches only the network namespace, so the tools see the host's files.
pub fn in_netns<S: AsRef<OsStr>>(netns: &Path, argv: &[S]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(argv);
    c
}

/// Runs `argv` in `netns`, bounded by `timeout`; fails with its stderr if it fails.
pub fn run_in<S: AsRef<OsStr>>(netns: &Path, argv: &[S], timeout: Duration) -> Result<String> {
    Ok(netlab::run(&mut in_netns(netns, argv), timeout)?
        .check()?
        .stdout)
}

/// Whether `cmd` is on the PATH.
pub fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Runs a host command (`ip ...`, `bridge ...`) and fails with its stderr if it fails.
pub fn host(program: &str, args: &[&str]) -> Result<String> {
    let mut c = Command::new(program);
    c.args(args);
    Ok(netlab::run(&mut c, QUICK)?.check()?.stdout)
}

/// Fails early, naming the package, if a tool is missing: otherwise the
/// first symptom would be a baseline that "does not connect".
pub fn check_tools(tools: &Tools) -> Result<()> {
    let missing: Vec<&str> = tools
        .commands
        .iter()
        .copied()
        .filter(|t| {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("command -v {t}")]);
            !netlab::run(&mut c, QUICK).is_ok_and(|o| o.success())
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}; run `cargo xtask setup` (Debian {})",
            missing.join(" "),
            tools.packages
        );
    }
    Ok(())
}

/// One iperf3 run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IperfRun {
    /// Receiver-side goodput: what actually arrived, not what the sender queued.
    pub bits_per_second: f64,
    /// Sender-side TCP retransmissions (absent on kernels that do not report them).
    pub retransmits: Option<u64>,
}

/// iperf3 client argv: one TCP stream for `secs` seconds, JSON output.
pub fn iperf3_client(server: &str, secs: u32) -> Vec<String> {
    [
        "iperf3",
        "-c",
        server,
        "-t",
        &secs.to_string(),
        "-J",
        // Without it a lost SYN would stall for the kernel's connect timeout.
        "--connect-timeout",
        "3000",
    ]
    .map(str::to_owned)
    .into()
}

/// Parses `iperf3 -J` output. iperf3 reports its own failures (server busy,
/// connection refused) in an `error` field, also with a zero exit code.
pub fn parse_iperf3(json: &str) -> Result<IperfRun> {
    let v: Value = serde_json::from_str(json).context("iperf3 -J did not print JSON")?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {err}");
    }
    let end = &v["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    Ok(IperfRun {
        bits_per_second: bps,
        retransmits: end["sum_sent"]["retransmits"].as_u64(),
    })
}

/// One sockperf ping-pong run, round-trip times in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RttRun {
    pub avg_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// sockperf client argv: TCP ping-pong for `secs` seconds.
pub fn sockperf_client(server: &str, secs: u32) -> Vec<String> {
    [
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        server,
        "-p",
        &SOCKPERF_PORT.to_string(),
        "-t",
        &secs.to_string(),
        // Report round trips: by default sockperf prints half of them ("latency").
        "--full-rtt",
        // Explicit rather than the version's default (14 bytes).
        "--msg-size",
        "64",
        // The TSC may be unreliable in a VM; the monotonic clock is not.
        "--no-rdtsc",
    ]
    .map(str::to_owned)
    .into()
}

/// iperf3 server argv (serves one test after another).
pub fn iperf3_server() -> Vec<String> {
    vec!["iperf3".to_owned(), "-s".to_owned()]
}

/// `argv` bound to CPU `cpu` with taskset, or unchanged for `None`.
pub fn on_cpu(cpu: Option<usize>, argv: Vec<String>) -> Vec<String> {
    match cpu {
        Some(cpu) => ["taskset".to_owned(), "-c".to_owned(), cpu.to_string()]
            .into_iter()
            .chain(argv)
            .collect(),
        None => argv,
    }
}

/// sockperf server argv (TCP; without --tcp it serves only UDP).
pub fn sockperf_server() -> Vec<String> {
    [
        "sockperf",
        "server",
        "--tcp",
        "-i",
        "0.0.0.0",
        "-p",
        &SOCKPERF_PORT.to_string(),
    ]
    .map(str::to_owned)
    .into()
}

/// Parses sockperf 3.x ping-pong output (stdout and stderr together).
///
/// With `--full-rtt` it prints `avg-rtt=`; without, `avg-latency=`, which is
/// half a round trip, so those numbers are doubled.
pub fn parse_sockperf(text: &str) -> Result<RttRun> {
    let text = strip_ansi(text);
    let (avg, factor) = match number_after(&text, "avg-rtt=") {
        Some(v) => (v, 1.0),
        None => match number_after(&text, "avg-latency=") {
            Some(v) => (v, 2.0),
            None => bail!(
                "sockperf printed no avg-rtt (did the server answer?):\n{}",
                text.trim()
            ),
        },
    };
    let percentile = |p: &str| -> Result<f64> {
        number_after(&text, &format!("percentile {p} ="))
            .with_context(|| format!("sockperf printed no percentile {p}"))
    };
    Ok(RttRun {
        avg_us: avg * factor,
        p50_us: percentile("50.000")? * factor,
        p99_us: percentile("99.000")? * factor,
    })
}

/// The decimal number right after the first `key` (spaces skipped).
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Removes terminal colour sequences (ESC [ ... m), which sockperf prints
/// around its headline numbers even into a pipe.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Median; the mean of the middle two for an even count. `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(match n % 2 {
        1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    })
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> Result<f64> {
    let ticks = host("getconf", &["CLK_TCK"])?;
    let ticks: f64 = ticks
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {ticks:?}"))?;
    if ticks <= 0.0 {
        bail!("getconf CLK_TCK printed {ticks}");
    }
    Ok(ticks)
}

/// CPU seconds (user + system, all threads) process `pid` has used so far.
pub fn process_cpu_secs(pid: u32, ticks_per_sec: f64) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_cpu(&stat)
        .map(|ticks| ticks as f64 / ticks_per_sec)
        .with_context(|| format!("no utime/stime in {path}: {stat}"))
}

/// A process as /proc/PID/stat shows it: enough to follow its CPU time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCpu {
    /// May change over a process's life (kernel workers name their current work).
    pub comm: String,
    /// Start time since boot, in ticks: tells a reused pid from the same process.
    pub start: u64,
    /// utime + stime so far, in ticks.
    pub ticks: u64,
}

/// Every process in /proc; processes that vanish while being read are skipped.
pub fn all_processes_cpu() -> HashMap<u32, ProcCpu> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_proc_cpu(&stat)?))
        })
        .collect()
}

fn parse_proc_cpu(stat: &str) -> Option<ProcCpu> {
    let comm = stat[stat.find('(')? + 1..stat.rfind(')')?].to_owned();
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 22 (starttime), counted from field 3 (state), the first after comm.
    let start = after_comm.split_whitespace().nth(22 - 3)?.parse().ok()?;
    Some(ProcCpu {
        comm,
        start,
        ticks: parse_stat_cpu(stat)?,
    })
}

/// CPU used between two [`all_processes_cpu`] snapshots by the processes
/// other than `skip` pids and `skip_comm` names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OtherProcesses {
    /// Their total, in ticks.
    pub ticks: u64,
    /// The one that used the most: `(pid, name, ticks)`.
    pub busiest: Option<(u32, String, u64)>,
}

/// A process started in between counts with all its time; one that exited
/// in between is not seen at all.
pub fn other_processes(
    before: &HashMap<u32, ProcCpu>,
    after: &HashMap<u32, ProcCpu>,
    skip: &[u32],
    skip_comm: &[&str],
) -> OtherProcesses {
    let used: Vec<(u32, &str, u64)> = after
        .iter()
        .filter(|(pid, p)| !skip.contains(pid) && !skip_comm.contains(&p.comm.as_str()))
        .map(|(&pid, p)| {
            let earlier = before
                .get(&pid)
                .filter(|b| b.start == p.start)
                .map_or(0, |b| b.ticks);
            (pid, p.comm.as_str(), p.ticks.saturating_sub(earlier))
        })
        .filter(|&(_, _, ticks)| ticks > 0)
        .collect();
    OtherProcesses {
        ticks: used.iter().map(|&(_, _, t)| t).sum(),
        busiest: used
            .iter()
            .max_by_key(|&&(_, _, t)| t)
            .map(|&(pid, comm, t)| (pid, comm.to_owned(), t)),
    }
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The command
/// name (field 2) may hold spaces and parentheses, so count from its end.
fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Machine-wide CPU time by kind, in ticks (the `cpu` line of /proc/stat;
/// guest time is already inside user).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub user: u64,
    pub system: u64,
    pub idle: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    pub fn total(&self) -> u64 {
        self.user + self.system + self.idle + self.irq + self.softirq + self.steal
    }

    /// Time spent between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// Pins every process in network namespace `netns` (all its threads) to `cpu`, or lets them
/// run anywhere for `None`: how a benchmark moves its servers between CPU placements.
pub fn pin_namespace(netns: &Path, cpu: Option<usize>) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let target = std::fs::metadata(netns).with_context(|| format!("stat {}", netns.display()))?;
    let cpus = match cpu {
        Some(c) => c.to_string(),
        None => format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, usize::from) - 1
        ),
    };
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .context("reading /proc")?
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .collect();
    for pid in pids {
        // A process may have exited meanwhile; that is fine.
        let _ = host("taskset", &["-a", "-p", "-c", &cpus, &pid]);
    }
    Ok(())
}

/// All CPUs' time so far, from /proc/stat.
pub fn machine_cpu_times() -> Result<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_proc_stat(&stat).context("no cpu line in /proc/stat")
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: nice counts as
/// user and iowait as idle.
fn parse_proc_stat(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(CpuTimes {
        user: at(0) + at(1),
        system: at(2),
        idle: at(3) + at(4),
        irq: at(5),
        softirq: at(6),
        steal: at(7),
    })
}

/// The MTU of the interface `netns` uses to reach `dest`.
pub fn path_mtu(netns: &Path, dest: &str) -> Result<u32> {
    let route = run_in(netns, &["ip", "-o", "route", "get", dest], QUICK)?;
    let dev = word_after(&route, "dev").context("`ip route get` names no device")?;
    let link = run_in(netns, &["ip", "-o", "link", "show", "dev", &dev], QUICK)?;
    word_after(&link, "mtu")
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("no mtu in `ip link show dev {dev}`: {link}"))
}

fn word_after(text: &str, key: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    words.find(|w| *w == key)?;
    words.next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKPERF_RTT: &str = "\
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=99628; ReceivedMessages=99628
sockperf: \u{1b}[2;35m====> avg-rtt=15.535 (std-dev=73.831)\u{1b}[0m
sockperf: Summary: Round trip is 15.535 usec
sockperf: ---> percentile 99.999 = 5352.669
sockperf: ---> percentile 99.000 =   18.877
sockperf: ---> percentile 90.000 =   14.241
sockperf: ---> percentile 50.000 =   13.339
sockperf: ---> <MIN> observation =   13.099
";

    #[test]
    fn parses_sockperf_round_trips() {
        let r = parse_sockperf(SOCKPERF_RTT).unwrap();
        assert_eq!(
            r,
            RttRun {
                avg_us: 15.535,
                p50_us: 13.339,
                p99_us: 18.877
            }
        );
    }

    #[test]
    fn doubles_sockperf_one_way_latency() {
        let text = SOCKPERF_RTT.replace("avg-rtt", "avg-latency");
        let r = parse_sockperf(&text).unwrap();
        assert!((r.avg_us - 31.07).abs() < 1e-9, "{r:?}");
        assert!((r.p50_us - 26.678).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn sockperf_without_answers_is_an_error() {
        let err = parse_sockperf("sockperf: ERROR: connect failed").unwrap_err();
        assert!(err.to_string().contains("no avg-rtt"), "{err}");
    }

    #[test]
    fn parses_iperf3_json() {
        let json = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":2.1e9,"retransmits":7},
            "sum_received":{"bits_per_second":2.0e9}}}"#;
        assert_eq!(
            parse_iperf3(json).unwrap(),
            IperfRun {
                bits_per_second: 2.0e9,
                retransmits: Some(7)
            }
        );
        let err = parse_iperf3(r#"{"error":"the server is busy running a test"}"#).unwrap_err();
        assert!(err.to_string().contains("busy"), "{err}");
        assert!(parse_iperf3("iperf3: error").is_err());
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn finds_words_after_keys() {
        let route = "10.50.0.3 dev eth0 src 10.50.0.2 uid 0 \\    cache ";
        assert_eq!(word_after(route, "dev").as_deref(), Some("eth0"));
        let link = "7: eth0@if8: <BROADCAST,UP> mtu 1450 qdisc noqueue state UP";
        assert_eq!(word_after(link, "mtu").as_deref(), Some("1450"));
        assert_eq!(word_after(link, "nothing"), None);
    }

    #[test]
    fn cpu_time_from_proc_stat() {
        let stat = "4242 (net agent) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 \
                    9 0 100 2000000 3000 18446744073709551615";
        assert_eq!(parse_stat_cpu(stat), Some(1234 + 567));
        assert_eq!(parse_stat_cpu("4242 (x"), None);
    }

    #[test]
    fn busiest_other_process() {
        let snap = |v: &[(u32, &str, u64, u64)]| -> HashMap<u32, ProcCpu> {
            v.iter()
                .map(|&(pid, comm, start, ticks)| {
                    let comm = comm.to_owned();
                    (pid, ProcCpu { comm, start, ticks })
                })
                .collect()
        };
        let before = snap(&[
            (1, "netagent", 5, 100),
            (2, "kworker/u8:2-flush", 1, 500),
            (3, "etcd", 5, 10),
            (4, "rustc", 7, 900),
        ]);
        let after = snap(&[
            (1, "netagent", 5, 900),
            // Renamed by its work item, still the same worker.
            (2, "kworker/u8:2-ext4", 1, 540),
            (3, "etcd", 5, 12),
            // Pid 4 reused by a new process.
            (4, "cc1", 90, 60),
            (5, "dnsperf", 95, 700),
        ]);
        assert_eq!(
            other_processes(&before, &after, &[1], &["dnsperf"]),
            OtherProcesses {
                ticks: 40 + 2 + 60,
                busiest: Some((4, "cc1".to_owned(), 60))
            }
        );
        assert_eq!(
            other_processes(&before, &before, &[], &[]),
            OtherProcesses::default()
        );
        assert!(!all_processes_cpu().is_empty());
    }

    #[test]
    fn proc_stat_start_time() {
        let stat = "4242 (kworker/u8:2-ext4 (x)) I 2 0 0 0 -1 69238880 0 0 0 0 12 34 0 0 20 \
                    0 1 0 777 0 0";
        let p = parse_proc_cpu(stat).unwrap();
        assert_eq!(p.comm, "kworker/u8:2-ext4 (x)");
        assert_eq!((p.start, p.ticks), (777, 46));
    }

    #[test]
    fn machine_cpu_from_proc_stat() {
        let stat = "cpu  100 5 50 1000 7 3 20 9 0 0\ncpu0 50 2 25 500 3 1 10 4 0 0\n";
        let t = parse_proc_stat(stat).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                user: 105,
                system: 50,
                idle: 1007,
                irq: 3,
                softirq: 20,
                steal: 9
            }
        );
        assert_eq!(t.total(), 1194);
        assert_eq!(t.since(&t), CpuTimes::default());
        assert_eq!(parse_proc_stat("intr 1 2\n"), None);
    }

    #[test]
    fn pins_to_a_cpu() {
        assert_eq!(on_cpu(None, iperf3_server()), ["iperf3", "-s"]);
        assert_eq!(
            on_cpu(Some(1), iperf3_server()),
            ["taskset", "-c", "1", "iperf3", "-s"]
        );
    }

    #[test]
    fn netns_command_line() {
        let c = in_netns(Path::new("/run/netns/x-c1"), &["ping", "-c1", "10.0.0.1"]);
        assert_eq!(
            netlab::describe(&c),
            "nsenter --net=/run/netns/x-c1 -- ping -c1 10.0.0.1"
        );
    }
}
