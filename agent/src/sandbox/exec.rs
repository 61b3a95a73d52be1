//! Running a command inside a live sandbox (a task's health check): in its network, mount
//! and UTS namespaces, entered through a pidfd of its process, so it sees what the process
//! sees (its resolv.conf, mounts, secrets and hostname).

use std::os::fd::AsRawFd as _;
use std::time::Duration;

use super::{ProcessHandle, Result, SandboxError, is_alive};

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    /// Exit code (128 + signal when killed).
    Exited { code: i32, output: String },
    /// Still running at the deadline; killed.
    TimedOut,
}

/// Output kept for messages.
const OUTPUT_MAX: usize = 512;

/// Runs `sh -c <cmd>` in the namespaces of `process`, killed after `timeout`.
pub async fn exec_in(process: &ProcessHandle, cmd: &str, timeout: Duration) -> Result<ExecOutcome> {
    let pidfd = super::pidfd_open(process.pid).map_err(|source| SandboxError::Signal {
        pid: process.pid,
        source,
    })?;
    if !is_alive(process) {
        return Err(SandboxError::Invalid(format!(
            "process {} is gone",
            process.pid
        )));
    }
    let raw = pidfd.as_raw_fd();
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(cmd)
        .env_clear()
        .env("PATH", super::process::DEFAULT_PATH)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only raw system calls in the child, on an fd opened before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(
                raw,
                libc::CLONE_NEWNET | libc::CLONE_NEWNS | libc::CLONE_NEWUTS,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| SandboxError::Spawn {
        program: "/bin/sh".into(),
        netns: format!("/proc/{}/ns/net", process.pid).into(),
        source,
    })?;
    drop(pidfd);
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Ok(ExecOutcome::TimedOut),
        Ok(Err(e)) => Err(SandboxError::Spawn {
            program: "/bin/sh".into(),
            netns: format!("/proc/{}/ns/net", process.pid).into(),
            source: e,
        }),
        Ok(Ok(out)) => {
            use std::os::unix::process::ExitStatusExt as _;
            let code = out
                .status
                .code()
                .or_else(|| out.status.signal().map(|s| 128 + s))
                .unwrap_or(-1);
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let mut text = text.trim().to_string();
            if text.len() > OUTPUT_MAX {
                let mut cut = OUTPUT_MAX;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            Ok(ExecOutcome::Exited { code, output: text })
        }
    }
}
