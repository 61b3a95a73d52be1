//! Removing labs: by prefix, all of them, or the stale ones whose owner died.
//!
//! Everything here works from names and files alone (no `Lab` value), so it
//! also cleans up after a process that was killed before it could, and it is
//! idempotent: each step skips what is already gone.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::Signal;
use crate::layout::{self, RUN_ROOT};
use crate::record::{self, Owner};
use crate::sys;

/// How long agents and etcd get to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Names of the labs that have a run dir.
pub fn list_labs() -> Result<Vec<String>> {
    let entries = match fs::read_dir(RUN_ROOT) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("listing /run/netlab"),
    };
    let mut labs: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| layout::validate_prefix(name).is_ok())
        .collect();
    labs.sort();
    Ok(labs)
}

/// The namespaces that belong to lab `prefix`.
pub fn lab_namespaces(prefix: &str) -> Result<Vec<String>> {
    let start = format!("{prefix}-");
    Ok(sys::list_netns()?
        .into_iter()
        .filter(|ns| ns.starts_with(&start))
        .collect())
}

/// Removes lab `prefix` completely: its daemons (SIGTERM, then SIGKILL),
/// every process left in its namespaces, the namespaces, its bpffs
/// directory and its run dir. Safe to call on a lab that is half gone or
/// does not exist.
pub fn down(prefix: &str) -> Result<()> {
    layout::validate_prefix(prefix)?;
    let run_dir = layout::run_dir(prefix);
    let mut errors: Vec<anyhow::Error> = Vec::new();

    // Daemons recorded in pid files, as their own process tree would see it
    // (another process's lab, or a detached one).
    let daemons: Vec<i32> = record::read_pids(&run_dir)
        .into_iter()
        .map(|(_, pid)| pid)
        .filter(|&pid| record::is_lab_process(&run_dir, pid))
        .collect();
    let (agents, etcd): (Vec<i32>, Vec<i32>) = {
        let etcd_pid = record::read_pid(&run_dir, record::ETCD);
        daemons.into_iter().partition(|&p| Some(p) != etcd_pid)
    };
    // Agents first: they may talk to the store while shutting down.
    for group in [agents, etcd] {
        if let Err(e) = sys::terminate(&group, STOP_GRACE) {
            errors.push(e);
        }
    }

    let namespaces = match lab_namespaces(prefix) {
        Ok(ns) => ns,
        Err(e) => {
            errors.push(e);
            Vec::new()
        }
    };
    // Anything else still running in the lab's namespaces (tools a test
    // started, a daemon without a pid file) would keep them alive.
    let leftovers = sys::netns_pids(&namespaces);
    for &pid in &leftovers {
        if let Err(e) = sys::signal(pid, Signal::SIGKILL) {
            errors.push(e);
        }
    }
    // Thousands of processes (a scale benchmark's tasks) take the kernel a while to reap.
    let grace = Duration::from_secs(5) + Duration::from_millis(2 * leftovers.len() as u64);
    let survivors = sys::wait_gone(&leftovers, grace);
    if !survivors.is_empty() {
        let shown: Vec<i32> = survivors.iter().copied().take(20).collect();
        errors.push(anyhow!(
            "{} processes in lab {prefix} survived SIGKILL (first: {shown:?})",
            survivors.len()
        ));
    }

    for ns in &namespaces {
        if let Err(e) = sys::delete_netns(ns) {
            errors.push(e);
        }
    }
    for dir in [layout::bpf_root(prefix), run_dir] {
        if let Err(e) = remove_tree(&dir) {
            errors.push(e);
        }
    }

    match errors.len() {
        0 => Ok(()),
        _ => Err(anyhow!(
            "tearing down lab {prefix}: {}",
            errors
                .iter()
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

fn remove_tree(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Tears down every lab under /run/netlab; returns the prefixes removed.
pub fn down_all() -> Result<Vec<String>> {
    let labs = list_labs()?;
    let failures: Vec<String> = labs
        .iter()
        .filter_map(|p| down(p).err().map(|e| format!("{e:#}")))
        .collect();
    if failures.is_empty() {
        Ok(labs)
    } else {
        Err(anyhow!(failures.join("\n")))
    }
}

/// Removes labs whose owning process has died without tearing them down
/// (killed test run, abort). Best effort: problems are reported on stderr,
/// since they must not stop a new lab from coming up.
pub fn reap_stale() {
    let Ok(labs) = list_labs() else { return };
    for prefix in labs {
        let run_dir = layout::run_dir(&prefix);
        // No owner file yet: a lab another process is creating right now.
        let Ok(Some(owner)) = record::read_owner(&run_dir) else {
            continue;
        };
        if matches!(owner, Owner::Process { .. }) && !owner.is_alive() {
            eprintln!("netlab: removing stale lab {prefix} (its owner process is gone)");
            if let Err(e) = down(&prefix) {
                eprintln!("netlab: {e:#}");
            }
        }
    }
}
