//! When a task takes traffic: with a health command, once it passes (and no longer once it
//! fails `retries` times in a row); without one, once the process listens on every TCP port
//! the service publishes (so a rolling update never sends a connection to a server that has
//! not bound its port yet), or [`LISTEN_WAIT`] after it started if it never does (it is then
//! running as far as anyone can tell, as Docker would say); otherwise as soon as it runs.

use std::collections::BTreeSet;
use std::time::Duration;

use netagent_orchestrator::HealthCheck;

use crate::sandbox::{self, ExecOutcome, ProcessHandle};

/// How often the listening sockets are looked at.
const LISTEN_POLL: Duration = Duration::from_millis(100);
/// How long a task without a health check may take to listen on its published ports before
/// it counts as running anyway. Slower servers want a `--health-cmd`.
pub const LISTEN_WAIT: Duration = Duration::from_secs(3);

/// The TCP ports (host order) in LISTEN state in the network namespace of `pid`.
pub fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for file in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut f = line.split_whitespace();
            let (Some(local), Some(state)) = (f.nth(1), f.nth(1)) else {
                continue;
            };
            // st 0A is TCP_LISTEN; the local address ends in :PORT (hex).
            if state == "0A"
                && let Some(port) = local.rsplit(':').next()
                && let Ok(p) = u16::from_str_radix(port, 16)
            {
                out.insert(p);
            }
        }
    }
    out
}

/// Waits until `process` listens on every port in `ports`, at most [`LISTEN_WAIT`]; `false`
/// if it ended first.
pub async fn wait_listening(process: &ProcessHandle, ports: &BTreeSet<u16>) -> bool {
    let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
    loop {
        if !sandbox::is_alive(process) {
            return false;
        }
        if ports.is_subset(&listening_ports(process.pid)) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(
                pid = process.pid,
                ?ports,
                "the task does not listen on its published ports; counting it as running"
            );
            return true;
        }
        tokio::time::sleep(LISTEN_POLL).await;
    }
}

/// One health check: `Ok(())` healthy, `Err(why)` not.
pub async fn check(process: &ProcessHandle, hc: &HealthCheck) -> Result<(), String> {
    match sandbox::exec_in(process, &hc.cmd, Duration::from_millis(hc.timeout_ms)).await {
        Ok(ExecOutcome::Exited { code: 0, .. }) => Ok(()),
        Ok(ExecOutcome::Exited { code, output }) if output.is_empty() => {
            Err(format!("health check exited {code}"))
        }
        Ok(ExecOutcome::Exited { code, output }) => {
            Err(format!("health check exited {code}: {output}"))
        }
        Ok(ExecOutcome::TimedOut) => Err(format!(
            "health check timed out after {}",
            netagent_orchestrator::duration::format_ms(hc.timeout_ms)
        )),
        Err(e) => Err(format!("health check could not run: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_listener_is_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening_ports(std::process::id()).contains(&port));
        drop(l);
        assert!(!listening_ports(std::process::id()).contains(&port));
    }
}
