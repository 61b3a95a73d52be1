//! The measuring tools (iperf3, sockperf) and the few host commands the
//! baselines need, each bounded in time, plus parsers for what the tools print.

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
/// What the measuring tools need besides iproute2 and ping.
pub const TOOLS: &[&str] = &[
    "iperf3", "sockperf", "nsenter", "ip", "bridge", "ping", "ss",
];

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

/// Runs a host command (`ip ...`, `bridge ...`) and fails with its stderr if it fails.
pub fn host(program: &str, args: &[&str]) -> Result<String> {
    let mut c = Command::new(program);
    c.args(args);
    Ok(netlab::run(&mut c, QUICK)?.check()?.stdout)
}

/// Fails early, naming the package, if a tool is missing: otherwise the
/// first symptom would be a baseline that "does not connect".
pub fn check_tools() -> Result<()> {
    let missing: Vec<&str> = TOOLS
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
            "missing tools: {}; run `cargo xtask setup` (Debian iperf3, sockperf, iproute2, \
             iputils-ping, util-linux)",
            missing.join(" ")
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
