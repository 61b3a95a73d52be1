//! `benches`: the side-by-side benchmarks of DESIGN.md section 9, each
//! against baselines built in the same run. Run through `cargo xtask bench
//! NAME`, which installs the tools and builds netagent/netctl first; needs root.

mod cluster;
mod dns;
mod dnslab;
mod dnsperf;
mod egress;
mod lb;
mod lbsetup;
mod machine;
mod overlay;
mod probe;
mod scale;
mod setups;
mod table;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::setups::Kind;

#[derive(Parser)]
#[command(
    name = "benches",
    about = "Benchmarks against baselines built in the same run"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Container-to-container TCP throughput and RTT across two nodes:
    /// (a) netagent, (b) bridge + VXLAN, (c) plain routing
    Overlay(OverlayArgs),
    /// The same across an encrypted network: (a) netagent `--opt encrypted`, (b) wireguard-go
    /// carrying bridge + VXLAN, (c) netagent unencrypted
    Encrypted(OverlayArgs),
    /// DNS queries/s and latency at 127.0.0.11 in a container, for local and
    /// forwarded names, against dnsmasq serving the same local names
    Dns(DnsArgs),
    /// Load balancer: new connections/s and keep-alive requests/s with p99
    /// through (a) the VIP, (b) the routing mesh, against (c) iptables DNAT
    /// and (d) HAProxy when installed, with and without 1000 other services
    Lb(LbArgs),
    /// Egress: new connections/s and TCP throughput from a container to a host outside the
    /// overlay through (a) netagent's eBPF masquerade, against (b) iptables MASQUERADE on a
    /// Linux bridge (Docker's way)
    Egress(EgressArgs),
    /// Control plane at scale: 3 nodes on etcd, services added in steps; agent memory and CPU,
    /// `service create` and `container run` latency, and the time from `container run` to
    /// every node's maps and DNS, at each step
    Scale(ScaleArgs),
}

#[derive(Args)]
struct ScaleArgs {
    /// Overlay networks the services are spread over
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=4096))]
    networks: u32,
    /// Tasks per service
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    replicas: u32,
    /// Endpoints (tasks) in the cluster at each step, growing
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000, 10000])]
    steps: Vec<usize>,
    /// Probe containers per step (at most 240)
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=240))]
    probes: u32,
    /// Where to write the results as JSON
    #[arg(long, default_value_os_t = default_json("scale"))]
    json: PathBuf,
    /// Print the table as Markdown (for the README)
    #[arg(long)]
    markdown: bool,
}

#[derive(Args)]
struct EgressArgs {
    /// Runs of each case (the median is quoted)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    runs: u16,
    /// Seconds per run
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=60))]
    secs: u32,
    /// Concurrent client connections of the new-connection runs
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Where to write the results as JSON
    #[arg(long, default_value_os_t = default_json("egress"))]
    json: PathBuf,
    /// Print the table as Markdown (for the README)
    #[arg(long)]
    markdown: bool,
}

#[derive(Args)]
struct LbArgs {
    /// Runs of each case (the median is quoted)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    runs: u16,
    /// Seconds per run
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Concurrent client connections
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Other services defined for the second phase
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// An argument for this product's agents (repeatable), as for `overlay`; quoted under the
    /// table
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Where to write the results as JSON
    #[arg(long, default_value_os_t = default_json("lb"))]
    json: PathBuf,
    /// Print the table as Markdown (for the README)
    #[arg(long)]
    markdown: bool,
}

#[derive(Args)]
struct OverlayArgs {
    /// Runs of each tool per setup (the median is quoted)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    runs: u16,
    /// Seconds per run (at least 2: sockperf discards its first 0.4 s and
    /// last 0.2 s as warm-up and cool-down, and finds nothing left in 1 s)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=60))]
    secs: u32,
    /// Columns to measure: a, b, c
    #[arg(long, value_delimiter = ',', default_values = ["a", "b", "c"], value_parser = ["a", "b", "c"])]
    only: Vec<String>,
    /// One placement: CPUs for the client and the server tools, `CLIENT,SERVER` (default: two
    /// tables, both on the last CPU, then the client on the first CPU and the server on the last)
    #[arg(long, value_parser = parse_pin, conflicts_with = "no_pin")]
    pin: Option<[usize; 2]>,
    /// Leave the tools' placement to the scheduler
    #[arg(long)]
    no_pin: bool,
    /// An argument for this product's agents (repeatable), e.g.
    /// `--agent-arg=--overlay-encap=device` to measure the kernel's VXLAN device instead of
    /// the programs' encapsulation; quoted under the table
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Where to write the results as JSON
    #[arg(long, default_value_os_t = default_json("overlay"))]
    json: PathBuf,
    /// Print the table as Markdown (for the README)
    #[arg(long)]
    markdown: bool,
}

#[derive(Args)]
struct DnsArgs {
    /// Rounds of runs (the median is quoted); each round runs every case
    /// once saturated and once at --rate
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    runs: u16,
    /// Seconds of each saturated run
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=60))]
    secs: u32,
    /// Seconds of each fixed-rate run
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=60))]
    rate_secs: u32,
    /// Queries/s of the fixed-rate runs (latency without queueing: well
    /// below either server's capacity)
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(100..=100_000))]
    rate: u32,
    /// Names on the network, queried in turn (10 services, 10 containers, the rest aliases)
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(dnslab::MIN_NAMES as i64..=10_000))]
    names: u32,
    /// Where to write the results as JSON
    #[arg(long, default_value_os_t = default_json("dns"))]
    json: PathBuf,
    /// Print the table as Markdown (for the README)
    #[arg(long)]
    markdown: bool,
}

fn run_pairs(suite: overlay::Suite, a: OverlayArgs, name: &str) -> anyhow::Result<()> {
    let kinds: Vec<Kind> = a
        .only
        .iter()
        .map(|l| suite.columns[usize::from(l.as_bytes()[0] - b'a')])
        .collect();
    let json = if a.json == default_json("overlay") {
        default_json(name)
    } else {
        a.json
    };
    overlay::run(&overlay::Options {
        suite,
        runs: a.runs.into(),
        secs: a.secs,
        kinds,
        placements: placements(a.pin, a.no_pin),
        agent_args: a.agent_args,
        json,
        markdown: a.markdown,
    })
}

/// The placements to measure: as asked, else both on the last CPU, then split across the
/// first and the last.
fn placements(asked: Option<[usize; 2]>, no_pin: bool) -> Vec<Option<[usize; 2]>> {
    if no_pin || asked.is_some() {
        return vec![pin(asked, no_pin)];
    }
    let last = std::thread::available_parallelism().map_or(1, usize::from) - 1;
    if last == 0 {
        return vec![Some([0, 0])];
    }
    vec![Some([last, last]), Some([0, last])]
}

/// The CPUs to pin client and server to: as asked, else both on the last
/// CPU (CPU 0 takes most device interrupts in a VM).
///
/// One CPU for everything: veth delivery runs the receive path in the
/// sender's softirq, so the client, the server and every hop of the path
/// then share that CPU, throughput becomes the path's CPU cost per byte, and
/// a round trip involves no cross-CPU wake-up. Those wake-ups cost ~40 us
/// in a VM (measured here: ~60 us RTT split across CPUs vs ~25 us on one),
/// swamp the datapath's share, and, unpinned, the scheduler makes them
/// happen in some runs and not others, so round trips come out bimodal.
fn pin(asked: Option<[usize; 2]>, no_pin: bool) -> Option<[usize; 2]> {
    if no_pin {
        return None;
    }
    asked.or_else(|| {
        let last = std::thread::available_parallelism().map_or(1, usize::from) - 1;
        Some([last, last])
    })
}

fn parse_pin(s: &str) -> Result<[usize; 2], String> {
    let cpus: Vec<usize> = s
        .split(',')
        .map(|c| c.trim().parse().map_err(|e| format!("{c:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match cpus[..] {
        [client, server] => Ok([client, server]),
        _ => Err("expected two CPU numbers, CLIENT,SERVER".to_owned()),
    }
}

/// `target/bench/NAME.json` in the workspace.
fn default_json(name: &str) -> PathBuf {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .parent()
        .unwrap_or(&crate_dir)
        .join("target/bench")
        .join(format!("{name}.json"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !netlab::is_root() {
        eprintln!("error: benchmarks build network namespaces and need root");
        return ExitCode::FAILURE;
    }
    let result = match cli.bench {
        Bench::Overlay(a) => run_pairs(overlay::OVERLAY, a, "overlay"),
        Bench::Encrypted(a) => run_pairs(overlay::ENCRYPTED, a, "encrypted"),
        Bench::Dns(a) => dns::run(&dns::Options {
            runs: a.runs.into(),
            secs: a.secs,
            rate_secs: a.rate_secs,
            rate: a.rate,
            names: a.names as usize,
            json: a.json,
            markdown: a.markdown,
        }),
        Bench::Egress(a) => egress::run(&egress::Options {
            runs: a.runs.into(),
            secs: a.secs,
            workers: a.workers,
            json: a.json,
            markdown: a.markdown,
        }),
        Bench::Scale(a) => scale::run(&scale::Options {
            networks: a.networks as usize,
            replicas: a.replicas as usize,
            steps: a.steps,
            probes: a.probes as usize,
            json: a.json,
            markdown: a.markdown,
        }),
        Bench::Lb(a) => lb::run(&lb::Options {
            runs: a.runs.into(),
            secs: a.secs,
            workers: a.workers,
            services: a.services,
            agent_args: a.agent_args,
            json: a.json,
            markdown: a.markdown,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_arguments() {
        let cli =
            Cli::try_parse_from(["benches", "overlay", "--only", "b,c", "--runs", "5"]).unwrap();
        let Bench::Overlay(a) = cli.bench else {
            panic!("not overlay")
        };
        assert_eq!(a.only, ["b", "c"]);
        assert_eq!(a.runs, 5);
        assert!(a.json.ends_with("target/bench/overlay.json"));
        let cli = Cli::try_parse_from(["benches", "overlay"]).unwrap();
        let Bench::Overlay(a) = cli.bench else {
            panic!("not overlay")
        };
        assert_eq!(a.only, ["a", "b", "c"]);
        assert_eq!(
            placements(None, false).len(),
            2,
            "both placements by default"
        );
        assert_eq!(placements(Some([1, 1]), false), [Some([1, 1])]);
        assert!(Cli::try_parse_from(["benches", "overlay", "--only", "d"]).is_err());
        assert!(Cli::try_parse_from(["benches", "overlay", "--runs", "0"]).is_err());
        assert!(Cli::try_parse_from(["benches", "overlay", "--secs", "1"]).is_err());
        let cli = Cli::try_parse_from(["benches", "overlay", "--pin", "1,0"]).unwrap();
        let Bench::Overlay(a) = cli.bench else {
            panic!("not overlay")
        };
        assert_eq!(pin(a.pin, a.no_pin), Some([1, 0]));
        assert_eq!(pin(None, true), None);
        let [client, server] = pin(None, false).unwrap();
        assert_eq!(client, server);
        assert!(Cli::try_parse_from(["benches", "overlay", "--pin", "1"]).is_err());
        assert!(Cli::try_parse_from(["benches", "overlay", "--pin", "0,1", "--no-pin"]).is_err());
    }

    #[test]
    fn dns_arguments() {
        let cli = Cli::try_parse_from(["benches", "dns"]).unwrap();
        let Bench::Dns(a) = cli.bench else {
            panic!("not dns")
        };
        assert_eq!(
            (a.runs, a.secs, a.rate_secs, a.rate, a.names),
            (3, 10, 3, 2000, 1000)
        );
        assert!(a.json.ends_with("target/bench/dns.json"));
        assert!(!a.markdown);
        let cli = Cli::try_parse_from([
            "benches",
            "dns",
            "--runs",
            "1",
            "--secs",
            "2",
            "--rate",
            "500",
            "--markdown",
        ])
        .unwrap();
        let Bench::Dns(a) = cli.bench else {
            panic!("not dns")
        };
        assert_eq!((a.runs, a.secs, a.rate), (1, 2, 500));
        assert!(a.markdown);
        assert!(Cli::try_parse_from(["benches", "dns", "--names", "10"]).is_err());
        assert!(Cli::try_parse_from(["benches", "dns", "--secs", "1"]).is_err());
        assert!(Cli::try_parse_from(["benches", "dns", "--only", "a"]).is_err());
    }
}
