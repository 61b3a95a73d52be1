//! `cargo xtask test`: setup, build, run every test, then prove the tests
//! cleaned up after themselves.
//!
//! The leak check compares the system before and after the test run, so it
//! catches leftovers whatever their names: namespaces, bpffs entries, labs
//! and lab processes that appeared during the run and are still there.

use std::collections::BTreeSet;
use std::fs;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::{cargo, setup};

/// The whole suite, end-to-end labs included; CI allows 90 minutes in all.
const TEST_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// Process names (as in /proc/PID/comm, 15 chars max) that tests start.
const WATCHED: &[&str] = &[
    "etcd",
    "netagent",
    "netctl",
    "netlab-fake-age",
    "tcpdump",
    "iperf3",
    "ping",
    "dig",
    "socat",
    "dnsmasq",
    "nsenter",
];

pub fn run(extra: &[String]) -> Result<ExitCode> {
    setup::run()?;
    cargo::build(&["--all-targets"])?;

    let before = Snapshot::take()?;
    // All failures in one run, not just the first failing test binary's.
    let mut args = vec!["test", "--no-fail-fast"];
    // cargo ignores -p next to --workspace, so a package selection replaces it.
    if !selects_packages(extra) {
        args.extend(["--workspace", "--exclude", "dataplane-ebpf"]);
    }
    args.extend(extra.iter().map(String::as_str));
    let status = cargo::run(&args, TEST_TIMEOUT)?;
    // Labs that a live process still owns (a benchmark, `lab up`) are not the tests' leftovers:
    // leave them, and everything carrying their prefix, alone.
    let foreign = foreign_labs();
    let leaks: Vec<String> = Snapshot::take()?
        .leaks_since(&before)
        .into_iter()
        .filter(|leak| !foreign.iter().any(|p| belongs_to(leak, p)))
        .collect();

    if !leaks.is_empty() {
        eprintln!("error: the tests left things behind:");
        for leak in &leaks {
            eprintln!("  {leak}");
        }
        // Clean up the tests' own labs so the next run starts clean; this run still fails.
        for lab in netlab::Lab::status_all().unwrap_or_default() {
            if foreign.contains(&lab.prefix) || before.labs.contains(&lab.prefix) {
                continue;
            }
            match netlab::Lab::down(&lab.prefix) {
                Ok(()) => eprintln!("removed lab {}", lab.prefix),
                Err(e) => eprintln!("cleaning up lab {} failed: {e:#}", lab.prefix),
            }
        }
    }
    if !status.success() {
        eprintln!("error: tests failed ({status})");
        let code = status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1);
        return Ok(ExitCode::from(code.max(1)));
    }
    if !leaks.is_empty() {
        bail!("tests passed but left {} thing(s) behind", leaks.len());
    }
    println!("tests passed; nothing left behind");
    Ok(ExitCode::SUCCESS)
}

/// Prefixes of labs whose owner process is still running (or that were detached on purpose).
/// Test processes have all exited when this runs, so these belong to someone else.
fn foreign_labs() -> BTreeSet<String> {
    netlab::Lab::status_all()
        .unwrap_or_default()
        .into_iter()
        .filter(|lab| lab.owner.is_some_and(|o| o.is_alive()))
        .map(|lab| lab.prefix)
        .collect()
}

/// Whether a leak description names something of lab `prefix`: its namespaces, pins and run
/// dir carry the prefix in their names, its processes in their command lines.
fn belongs_to(leak: &str, prefix: &str) -> bool {
    if leak.contains(prefix) {
        return true;
    }
    let pid = leak
        .strip_prefix("process ")
        .and_then(|rest| rest.split_whitespace().next());
    pid.and_then(|pid| fs::read(format!("/proc/{pid}/cmdline")).ok())
        .is_some_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(prefix))
}

/// True if cargo's own options (before `--`) pick packages.
fn selects_packages(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--package" || a.starts_with("--package=") || a.starts_with("-p"))
}

/// What tests may create and must remove.
#[derive(Debug, Default)]
struct Snapshot {
    netns: BTreeSet<String>,
    bpffs: BTreeSet<String>,
    labs: BTreeSet<String>,
    processes: BTreeSet<(i32, String)>,
}

impl Snapshot {
    fn take() -> Result<Snapshot> {
        Ok(Snapshot {
            netns: netlab::list_netns()?.into_iter().collect(),
            bpffs: dir_names(netlab::BPFFS),
            labs: dir_names(netlab::RUN_ROOT),
            processes: watched_processes(),
        })
    }

    /// Human-readable descriptions of everything new in `self`.
    fn leaks_since(&self, before: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.netns
                .difference(&before.netns)
                .map(|n| format!("network namespace {n}")),
        );
        out.extend(
            self.bpffs
                .difference(&before.bpffs)
                .map(|n| format!("bpffs entry {}/{n}", netlab::BPFFS)),
        );
        out.extend(
            self.labs
                .difference(&before.labs)
                .map(|n| format!("lab run dir {}/{n}", netlab::RUN_ROOT)),
        );
        out.extend(
            self.processes
                .difference(&before.processes)
                .filter(|(pid, _)| netlab::is_alive(*pid))
                .map(|(pid, name)| format!("process {pid} ({name})")),
        );
        out
    }
}

/// Entry names of `dir`; empty if it does not exist.
fn dir_names(dir: &str) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn watched_processes() -> BTreeSet<(i32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim();
            WATCHED.contains(&comm).then(|| (pid, comm.to_owned()))
        })
        .filter(|(pid, _)| netlab::is_alive(*pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_selection_replaces_workspace() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(selects_packages(&v(&["-p", "netlab"])));
        assert!(selects_packages(&v(&["-pnetlab"])));
        assert!(selects_packages(&v(&["--package=netlab"])));
        assert!(!selects_packages(&v(&["--", "-p"])));
        assert!(!selects_packages(&v(&["--release", "--", "--nocapture"])));
    }

    #[test]
    fn reports_only_new_things() {
        let before = Snapshot {
            netns: ["a".to_owned()].into(),
            ..Default::default()
        };
        let after = Snapshot {
            netns: ["a".to_owned(), "nl1-n1".to_owned()].into(),
            labs: ["nl1".to_owned()].into(),
            // A process that is not alive (pid out of range) is not a leak.
            processes: [(i32::MAX, "etcd".to_owned())].into(),
            ..Default::default()
        };
        assert_eq!(
            after.leaks_since(&before),
            ["network namespace nl1-n1", "lab run dir /run/netlab/nl1"]
        );
        assert!(before.leaks_since(&after).is_empty());
    }
}
