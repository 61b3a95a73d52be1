//! `cargo xtask`: project automation (DESIGN.md section 2).
//!
//! - `setup`: install what builds and tests need (idempotent)
//! - `test`:  setup, build, run every test, fail if tests left anything behind
//! - `lab`:   bring a test lab up (left running), down, or show its status
//! - `demo`:  a 3-node lab with etcd and a short netctl session
//! - `bench`: setup, build, run a benchmark against its baselines (`bench overlay|encrypted|dns|lb|egress|scale`)
//! - `install`: binaries, systemd unit and example config onto this node (or under `--root`)

mod bench;
mod cargo;
mod demo;
mod install;
mod labcmd;
mod setup;
mod testrun;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use netlab::StoreKind;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Project automation for netagent/netctl"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install Debian packages, the pinned nightly, bpf-linker; mount bpffs (root, idempotent)
    Setup,
    /// Setup, build everything, run all tests; fails if tests leave namespaces, pins or processes
    Test {
        /// Passed to `cargo test` (e.g. `-p netlab -- --nocapture`)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Manage test labs (network namespaces, etcd, agents) by hand
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Run a short netctl session on a fresh 3-node lab with etcd
    Demo {
        /// Leave the lab running afterwards
        #[arg(long)]
        keep: bool,
    },
    /// Setup, build, run a benchmark against baselines built in the same run (needs root)
    Bench {
        /// Which benchmark
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(bench::NAMES))]
        name: String,
        /// Passed to the benchmark (e.g. `--runs 5`, `--only b,c`, `--markdown`)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build release binaries and install them, the systemd unit and an example config
    Install {
        /// Install below this directory instead of / (for packaging)
        #[arg(long, default_value = "/")]
        root: std::path::PathBuf,
        /// Binaries to PREFIX/bin, the README to PREFIX/share/doc/netagent
        #[arg(long, default_value = "/usr/local")]
        prefix: std::path::PathBuf,
        /// Take the binaries from this directory instead of building them
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// The runtimes' CNI plugin directory (the plugin goes there as `netagent`)
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: std::path::PathBuf,
        /// Also write /etc/cni/net.d/10-netagent.conflist for this network (kept if present)
        #[arg(long)]
        cni_network: Option<String>,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build a lab and leave it running after xtask exits
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Lab prefix ([a-z][a-z0-9]{0,9}); default: a fresh unique one
        #[arg(long)]
        prefix: Option<String>,
        /// etcd (shared, at 198.18.0.2:2379) or embedded (per agent)
        #[arg(long, default_value_t = StoreKind::Etcd)]
        store: StoreKind,
        /// Node lease TTL passed to the agents
        #[arg(long, default_value_t = 5)]
        lease_ttl: u64,
        /// Build only the topology (and etcd), no agents
        #[arg(long)]
        no_agents: bool,
        /// Do not build netagent/netctl first
        #[arg(long)]
        no_build: bool,
    },
    /// Tear a lab down completely
    Down {
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        prefix: Option<String>,
        /// Every lab under /run/netlab
        #[arg(long)]
        all: bool,
    },
    /// List labs with their nodes, sockets and processes
    Status,
}

/// clap swallows a `--` right after `test` (`cargo xtask test -- --nocapture`),
/// but cargo test needs it to tell its own options from the test binary's.
fn restore_separator(argv: &[String], mut args: Vec<String>) -> Vec<String> {
    let after_test = argv.iter().position(|a| a == "test").map(|i| i + 1);
    if after_test
        .and_then(|i| argv.get(i))
        .is_some_and(|a| a == "--")
        && args.first().is_none_or(|a| a != "--")
    {
        args.insert(0, "--".to_owned());
    }
    args
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let cli = Cli::parse_from(&argv);
    let result = match cli.command {
        Command::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Command::Test { args } => testrun::run(&restore_separator(&argv, args)),
        Command::Lab { command } => match command {
            LabCommand::Up {
                nodes,
                prefix,
                store,
                lease_ttl,
                no_agents,
                no_build,
            } => labcmd::up(labcmd::UpArgs {
                nodes,
                prefix,
                store,
                lease_ttl,
                agents: !no_agents,
                build: !no_build,
            }),
            LabCommand::Down { prefix, all } => labcmd::down(prefix.as_deref(), all),
            LabCommand::Status => labcmd::status(),
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Demo { keep } => demo::run(keep).map(|()| ExitCode::SUCCESS),
        Command::Bench { name, args } => bench::run(&name, &args),
        Command::Install {
            root,
            prefix,
            bin_dir,
            cni_bin_dir,
            cni_network,
        } => install::run(&install::InstallArgs {
            root,
            prefix,
            bin_dir,
            cni_bin_dir,
            cni_network,
        })
        .map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<String> {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let cli = Cli::try_parse_from(&argv).unwrap();
        match cli.command {
            Command::Test { args } => restore_separator(&argv, args),
            _ => panic!("not the test command"),
        }
    }

    #[test]
    fn test_passes_arguments_through_to_cargo_test() {
        assert!(test_args(&["xtask", "test"]).is_empty());
        assert_eq!(
            test_args(&["xtask", "test", "-p", "netlab", "--", "--nocapture"]),
            ["-p", "netlab", "--", "--nocapture"]
        );
        assert_eq!(
            test_args(&["xtask", "test", "--", "--nocapture"]),
            ["--", "--nocapture"]
        );
    }

    #[test]
    fn bench_names_are_checked() {
        let err = Cli::try_parse_from(["xtask", "bench", "nope"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("overlay"), "{err}");
        let cli = Cli::try_parse_from(["xtask", "bench", "overlay", "--runs", "5"]).unwrap();
        assert!(
            matches!(cli.command, Command::Bench { name, args } if name == "overlay" && args == ["--runs", "5"])
        );
    }

    #[test]
    fn lab_down_needs_prefix_or_all() {
        assert!(Cli::try_parse_from(["xtask", "lab", "down"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "lab", "down", "--all"]).is_ok());
        assert!(Cli::try_parse_from(["xtask", "lab", "down", "--prefix", "nl1"]).is_ok());
        assert!(Cli::try_parse_from(["xtask", "lab", "down", "--prefix", "a", "--all"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "lab", "up", "--store", "redis"]).is_err());
    }
}
