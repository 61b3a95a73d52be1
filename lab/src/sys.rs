//! Host facts and primitives: root, bpffs, processes by pid, network
//! namespaces through iproute2.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::{self, Output};

/// Where `ip netns add` puts its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";
/// The bpffs mount point the agents pin under.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Bound for one `ip` invocation; they normally take milliseconds.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn ensure_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (network namespaces, bpffs, etcd on a private address)");
    }
    Ok(())
}

/// True if `mounts` (the text of /proc/self/mounts) has bpffs at `point`.
fn bpffs_mounted_in(mounts: &str, point: &str) -> bool {
    mounts.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (_dev, mp, fstype) = (f.next(), f.next(), f.next());
        mp == Some(point) && fstype == Some("bpf")
    })
}

/// Mounts bpffs at /sys/fs/bpf unless it is already there. Returns whether it
/// mounted it. Agents pin maps there; without bpffs pinning fails.
pub fn ensure_bpffs() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if bpffs_mounted_in(&mounts, BPFFS) {
        return Ok(false);
    }
    let mut c = Command::new("mount");
    c.args(["-t", "bpf", "bpf", BPFFS]);
    cmd::run(&mut c, Duration::from_secs(10))?
        .check()
        .context("mounting bpffs at /sys/fs/bpf")?;
    Ok(true)
}

/// Runs `ip ARGS...` and fails with its stderr if it fails.
pub fn ip(args: &[&str]) -> Result<Output> {
    let mut c = Command::new("ip");
    c.args(args);
    cmd::run(&mut c, IP_TIMEOUT)?.check()
}

/// A command that runs `argv` inside network namespace `ns`.
///
/// `nsenter --net` only switches the network namespace, unlike
/// `ip netns exec`, which also remounts /sys and so hides bpffs.
pub fn in_netns<S: AsRef<std::ffi::OsStr>>(ns: &str, argv: &[S]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={NETNS_DIR}/{ns}"))
        .arg("--")
        .args(argv);
    c
}

/// Names of all namespaces registered under /run/netns.
pub fn list_netns() -> Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("listing /run/netns"),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Pids of the processes whose network namespace is one of `namespaces` (names under
/// /run/netns), from one walk of /proc: `ip netns pids` walks all of /proc once per
/// namespace, which took minutes for a lab with thousands of containers.
pub fn netns_pids(namespaces: &[String]) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |m: fs::Metadata| (m.dev(), m.ino());
    let wanted: std::collections::HashSet<(u64, u64)> = namespaces
        .iter()
        .filter_map(|ns| fs::metadata(Path::new(NETNS_DIR).join(ns)).ok().map(id))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // Processes that exit meanwhile (or kernel threads without one) are skipped.
            fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| wanted.contains(&id(m)))
        })
        .collect()
}

pub fn delete_netns(ns: &str) -> Result<()> {
    if !Path::new(NETNS_DIR).join(ns).exists() {
        return Ok(());
    }
    ip(&["netns", "del", ns]).map(drop)
}

/// The fields of /proc/<pid>/stat after the command name.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// True if the process exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match stat_fields(pid) {
        Some(f) => !matches!(f.first().map(String::as_str), Some("Z" | "X" | "x")),
        None => false,
    }
}

/// The process's start time (clock ticks since boot): pid plus start time
/// names a process even when pids are reused.
pub fn start_time(pid: i32) -> Option<u64> {
    parse_start_time(&stat_fields(pid)?)
}

fn parse_start_time(fields_after_comm: &[String]) -> Option<u64> {
    // stat field 22 is starttime; the slice starts at field 3 (state).
    fields_after_comm.get(19)?.parse().ok()
}

/// The process's command line with NULs turned into spaces.
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: i32, sig: Signal) -> Result<()> {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("sending {sig} to pid {pid}")),
    }
}

/// Waits until none of `pids` is alive or `timeout` passes; returns the ones
/// still alive.
pub fn wait_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Collects the exit status of `pid` if it is an exited child of this
/// process (a daemon of a lab this process detached), so it does not linger
/// as a zombie; for anyone else's process this does nothing.
pub fn reap_if_child(pid: i32) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// SIGTERM, up to `grace` to exit, then SIGKILL. For processes that are not
/// our children (their parent reaps them).
pub fn terminate(pids: &[i32], grace: Duration) -> Result<()> {
    for &p in pids {
        signal(p, Signal::SIGTERM)?;
    }
    let left = wait_gone(pids, grace);
    for &p in &left {
        signal(p, Signal::SIGKILL)?;
    }
    let left = wait_gone(&left, Duration::from_secs(5));
    for &p in pids {
        reap_if_child(p);
    }
    if !left.is_empty() {
        bail!("processes {left:?} survived SIGKILL for 5 s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bpffs_in_mounts() {
        let m = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,nosuid 0 0\n";
        assert!(bpffs_mounted_in(m, "/sys/fs/bpf"));
        assert!(!bpffs_mounted_in(
            "sysfs /sys sysfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
        // Something else mounted on the mount point is not bpffs.
        assert!(!bpffs_mounted_in(
            "tmpfs /sys/fs/bpf tmpfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        assert!(is_alive(me));
        assert!(start_time(me).is_some());
        assert!(cmdline(me).is_some());
        assert!(!is_alive(i32::MAX));
    }

    #[test]
    fn start_time_is_field_22() {
        let stat = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20";
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        let f: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
        assert_eq!(parse_start_time(&f), Some(424242));
    }

    #[test]
    fn nsenter_command_line() {
        let c = in_netns("nl1-n1", &["ping", "-c1", "198.18.0.2"]);
        assert_eq!(
            cmd::describe(&c),
            "nsenter --net=/run/netns/nl1-n1 -- ping -c1 198.18.0.2"
        );
    }
}
