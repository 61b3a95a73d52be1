//! The machine shape and tool versions a result is quoted with: absolute
//! numbers on a shared 2-core VM mean little without them.

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub memory_mib: u64,
    pub kernel: String,
}

impl Machine {
    /// Best effort: a field that cannot be read says so instead of failing a
    /// benchmark that has already run.
    pub fn probe() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_owned()),
            memory_mib: mem_total_kib(&meminfo).unwrap_or(0) / 1024,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
        }
    }

    /// One line: `2 CPUs (model), 23.5 GiB, Linux 6.1.0`.
    pub fn summary(&self) -> String {
        format!(
            "{} CPUs ({}), {:.1} GiB RAM, Linux {}",
            self.nproc,
            self.cpu,
            self.memory_mib as f64 / 1024.0,
            self.kernel
        )
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The current time in UTC, ISO 8601, from `date` (no date crate for one line).
pub fn utc_now() -> Result<String> {
    let mut c = Command::new("date");
    c.args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
    Ok(netlab::run(&mut c, Duration::from_secs(5))
        .and_then(netlab::Output::check)
        .context("reading the date")?
        .stdout
        .trim()
        .to_owned())
}

/// First line a tool prints for its version (either stream), or "unknown".
pub fn tool_version(argv: &[&str]) -> String {
    tool_line(argv, "")
}

/// First line a tool prints (either stream) that contains `needle`, or
/// "unknown": for tools that bury their version (`dnsperf -h` ends with it).
pub fn tool_line(argv: &[&str], needle: &str) -> String {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]);
    match netlab::run(&mut c, Duration::from_secs(5)) {
        Ok(out) => format!("{}\n{}", out.stdout, out.stderr)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && l.contains(needle))
            .unwrap_or("unknown")
            .to_owned(),
        Err(_) => "unknown".to_owned(),
    }
}

/// The netagent the labs run (as netlab finds it: `NETAGENT_BIN`, else next to this
/// executable) and its profile, read from the target directory it was built into.
pub fn netagent_binary() -> (String, String) {
    let path = std::env::var_os("NETAGENT_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.join("netagent"))
        });
    let Some(path) = path else {
        return ("unknown".to_owned(), "unknown".to_owned());
    };
    let profile = path
        .parent()
        .and_then(std::path::Path::file_name)
        .map_or("unknown".to_owned(), |p| p.to_string_lossy().into_owned());
    (path.display().to_string(), profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_and_memory() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor: 0\n"), None);
        let meminfo = "MemTotal:       24684032 kB\nMemFree:        20000000 kB\n";
        assert_eq!(mem_total_kib(meminfo), Some(24684032));
    }

    #[test]
    fn summary_line() {
        let m = Machine {
            nproc: 2,
            cpu: "X".into(),
            memory_mib: 24105,
            kernel: "6.1.0".into(),
        };
        assert_eq!(m.summary(), "2 CPUs (X), 23.5 GiB RAM, Linux 6.1.0");
    }
}
