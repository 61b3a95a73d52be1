//! External commands with a bound on how long they may take.
//!
//! Everything the lab runs (`ip`, `nsenter`, `etcdctl`, `netctl`, tools inside
//! node namespaces) goes through here so that no test can hang forever on a
//! command that never returns.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// What a finished command printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for error messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Exit code, `None` if a signal ended the command.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// `Ok(self)` if the command exited 0, else an error carrying its stderr.
    pub fn check(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            Err(anyhow!(
                "`{}` failed ({}): {}",
                self.command,
                self.status,
                first_non_empty(&self.stderr, &self.stdout).trim()
            ))
        }
    }
}

fn first_non_empty<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.trim().is_empty() { b } else { a }
}

/// The command line of `cmd` as one string (lossy), for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

type Chunk = (Stream, Vec<u8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

fn spawn_readers(stdout: Option<ChildStdout>, stderr: Option<ChildStderr>) -> Receiver<Chunk> {
    fn reader(mut r: impl Read + Send + 'static, which: Stream, tx: Sender<Chunk>) {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error just ends the capture; what was read so far is kept.
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send((which, buf));
        });
    }
    let (tx, rx) = mpsc::channel();
    if let Some(out) = stdout {
        reader(out, Stream::Out, tx.clone());
    }
    if let Some(err) = stderr {
        reader(err, Stream::Err, tx);
    }
    rx
}

/// Polls `child` until it exits or `deadline` passes (`Ok(None)`).
pub(crate) fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured.
///
/// The command gets its own process group so that on timeout the whole group
/// (e.g. `sh -c` and what it started) is killed, not only the leader.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let command = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{command}`"))?;
    let group = Pid::from_raw(child.id() as i32);
    let rx = spawn_readers(child.stdout.take(), child.stderr.take());
    let deadline = Instant::now() + timeout;

    let Some(status) = wait_until(&mut child, deadline)? else {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait();
        bail!("`{command}` did not finish within {timeout:?}");
    };

    let (mut stdout, mut stderr) = (None, None);
    while stdout.is_none() || stderr.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((Stream::Out, bytes)) => stdout = Some(bytes),
            Ok((Stream::Err, bytes)) => stderr = Some(bytes),
            Err(_) => {
                // The leader exited but something it started in the
                // background still holds the pipes open.
                let _ = killpg(group, Signal::SIGKILL);
                bail!(
                    "`{command}` exited ({status}) but a process it left running kept \
                     its output open past {timeout:?}; use a Background for daemons"
                );
            }
        }
    }
    Ok(Output {
        command,
        status,
        stdout: String::from_utf8_lossy(&stdout.unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&stderr.unwrap_or_default()).into_owned(),
    })
}

/// Runs `cmd` with the caller's stdin/stdout/stderr (for long builds and
/// installs whose progress the user should see), bounded by `timeout`.
///
/// The command stays in the caller's process group so Ctrl-C reaches it.
pub fn run_inherit(cmd: &mut Command, timeout: Duration) -> Result<ExitStatus> {
    let command = describe(cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{command}`"))?;
    match wait_until(&mut child, Instant::now() + timeout)? {
        Some(status) => Ok(status),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{command}` did not finish within {timeout:?}")
        }
    }
}

/// A command running in the background (tcpdump, iperf3 -s, ...), with its
/// output captured. Dropping it kills its process group and reaps it.
#[derive(Debug)]
pub struct Background {
    command: String,
    child: Option<Child>,
    rx: Receiver<Chunk>,
}

/// Starts `cmd` in the background in its own process group, stdin closed,
/// stdout/stderr captured.
pub fn spawn(cmd: &mut Command) -> Result<Background> {
    let command = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{command}`"))?;
    let rx = spawn_readers(child.stdout.take(), child.stderr.take());
    Ok(Background {
        command,
        child: Some(child),
        rx,
    })
}

impl Background {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends SIGTERM to the process group (tcpdump flushes and prints its
    /// counts on SIGTERM), waits up to `grace`, then SIGKILLs; returns what
    /// it printed.
    pub fn stop(mut self, grace: Duration) -> Result<Output> {
        let Some(mut child) = self.child.take() else {
            bail!("`{}` was already stopped", self.command);
        };
        let group = Pid::from_raw(child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let status = match wait_until(&mut child, Instant::now() + grace)? {
            Some(status) => status,
            None => {
                let _ = killpg(group, Signal::SIGKILL);
                child
                    .wait()
                    .context("reaping a killed background process")?
            }
        };
        // Helpers it forked are in the same group; make sure none keep the pipes.
        let _ = killpg(group, Signal::SIGKILL);
        self.collect(status)
    }

    /// Waits up to `timeout` for the process to exit on its own; on timeout
    /// kills it and returns an error.
    pub fn wait(mut self, timeout: Duration) -> Result<Output> {
        let Some(mut child) = self.child.take() else {
            bail!("`{}` was already stopped", self.command);
        };
        let group = Pid::from_raw(child.id() as i32);
        match wait_until(&mut child, Instant::now() + timeout)? {
            Some(status) => {
                let _ = killpg(group, Signal::SIGKILL);
                self.collect(status)
            }
            None => {
                let _ = killpg(group, Signal::SIGKILL);
                let _ = child.wait();
                bail!("`{}` did not finish within {timeout:?}", self.command)
            }
        }
    }

    fn collect(&self, status: ExitStatus) -> Result<Output> {
        let (mut stdout, mut stderr) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while stdout.is_none() || stderr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((Stream::Out, b)) => stdout = Some(b),
                Ok((Stream::Err, b)) => stderr = Some(b),
                Err(_) => bail!("output of `{}` still open after it exited", self.command),
            }
        }
        Ok(Output {
            command: self.command.clone(),
            status,
            stdout: String::from_utf8_lossy(&stdout.unwrap_or_default()).into_owned(),
            stderr: String::from_utf8_lossy(&stderr.unwrap_or_default()).into_owned(),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = wait_until(&mut child, Instant::now() + Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn captures_output_and_status() {
        let out = run(
            &mut sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.code(), Some(3));
        let err = out.check().unwrap_err().to_string();
        assert!(err.contains("err"), "{err}");
    }

    #[test]
    fn kills_on_timeout() {
        let start = Instant::now();
        let err = run(&mut sh("sleep 30"), Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn background_process_holding_pipes_is_bounded() {
        let start = Instant::now();
        let err = run(
            &mut sh("sleep 30 & echo started"),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(err.to_string().contains("kept its output open"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_program_is_an_error() {
        let err = run(
            &mut Command::new("/nonexistent/prog"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot start"), "{err}");
    }

    #[test]
    fn background_stop_returns_output() {
        let mut bg = spawn(&mut sh("echo ready; exec sleep 30")).unwrap();
        assert!(bg.is_running());
        thread::sleep(Duration::from_millis(100));
        let out = bg.stop(Duration::from_secs(2)).unwrap();
        assert_eq!(out.stdout, "ready\n");
        assert!(!out.success());
    }

    #[test]
    fn background_wait_times_out() {
        let bg = spawn(&mut sh("exec sleep 30")).unwrap();
        assert!(bg.wait(Duration::from_millis(100)).is_err());
        let bg = spawn(&mut sh("echo done")).unwrap();
        assert_eq!(bg.wait(Duration::from_secs(5)).unwrap().stdout, "done\n");
    }

    #[test]
    fn describe_joins_program_and_args() {
        let mut c = Command::new("ip");
        c.args(["-n", "x", "link"]);
        assert_eq!(describe(&c), "ip -n x link");
    }

    #[test]
    fn run_inherit_is_bounded() {
        let status = run_inherit(&mut sh("exit 4"), Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(4));
        assert!(run_inherit(&mut sh("sleep 30"), Duration::from_millis(100)).is_err());
    }
}
