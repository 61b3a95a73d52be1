//! The process of a sandbox: started inside its network namespace, detached from the agent so
//! it outlives an agent restart, and identified by (pid, start time) so a restarted agent can
//! tell its process from an unrelated one that got the same pid.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Result, SandboxError};

/// The PATH a sandbox process starts with unless the request sets one: the agent's own
/// environment is not passed on (it would leak the agent's settings into every container).
pub(super) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long [`stop`] waits after SIGKILL before reporting the process as unkillable (e.g.
/// stuck in uninterruptible sleep).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How often waits on processes that are not our children look again.
const POLL: Duration = Duration::from_millis(10);

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnRequest {
    /// The network namespace to run in.
    pub netns: PathBuf,
    /// Program and arguments; the program is looked up in the process's PATH.
    pub argv: Vec<String>,
    /// A file bind-mounted (read-only) over /etc/resolv.conf in a mount namespace private to
    /// the process, so only the process sees it. The bind pins the file's inode: update it
    /// in place (write/truncate), not by rename, or the process keeps the old contents.
    pub resolv_conf: Option<PathBuf>,
    /// Where stdout and stderr go.
    pub log: LogTarget,
    /// The process's environment, on top of a default PATH.
    pub env: Vec<(String, String)>,
    /// Bind-mounted (read-only) over /etc/hosts, like `resolv_conf`.
    pub hosts_file: Option<PathBuf>,
    /// Set in a UTS namespace of its own.
    pub hostname: Option<String>,
    pub mounts: Vec<super::MountRequest>,
    /// Files on a tmpfs at /run/secrets that only the process's mount namespace has.
    pub secrets: Vec<super::SecretFile>,
}

/// Where a sandbox process's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Appended to this file (created 0640 if missing).
    File(PathBuf),
    /// Into a pipe read by this program (argv), started in its own session beside the
    /// process; it sees end of file once the process and everything it started are gone.
    Shim(Vec<std::ffi::OsString>),
}

/// A running (or once running) process, identified so that pid reuse is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessHandle {
    pub pid: u32,
    /// Field 22 of /proc/<pid>/stat: clock ticks after boot at which the process started.
    pub start_time: u64,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessExit {
    /// Exited normally with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Gone, but not our child (adopted after an agent restart), so the kernel gave its exit
    /// status to someone else.
    Unknown,
}

impl ProcessExit {
    /// The status as a shell reports it: the exit code, or 128 + signal; `None` if unknown.
    pub fn shell_code(&self) -> Option<i32> {
        match *self {
            ProcessExit::Code(c) => Some(c),
            ProcessExit::Signal(s) => Some(128 + s),
            ProcessExit::Unknown => None,
        }
    }
}

/// Exit statuses of the children this agent process started, filled in by their reaper
/// threads. Keyed by handle so a reused pid never matches an old entry.
fn children() -> &'static Mutex<HashMap<ProcessHandle, watch::Receiver<Option<ProcessExit>>>> {
    static CHILDREN: OnceLock<Mutex<HashMap<ProcessHandle, watch::Receiver<Option<ProcessExit>>>>> =
        OnceLock::new();
    CHILDREN.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Pruning threshold: entries of exited children are dropped once there are this many.
const CHILDREN_KEEP: usize = 1024;

fn register_child(handle: ProcessHandle, rx: watch::Receiver<Option<ProcessExit>>) {
    // A poisoned lock only means a panic elsewhere while holding it; the map is still usable.
    let mut map = children().lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= CHILDREN_KEEP {
        map.retain(|_, rx| rx.borrow().is_none());
    }
    map.insert(handle, rx);
}

fn child_exit_receiver(handle: &ProcessHandle) -> Option<watch::Receiver<Option<ProcessExit>>> {
    let map = children().lock().unwrap_or_else(|p| p.into_inner());
    map.get(handle).cloned()
}

/// (state, start_time) from /proc/<pid>/stat, or `None` if there is no such process.
fn read_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) is in parentheses and may itself contain spaces and ')': fields resume
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); field 22 is 19 further on.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// The start time of process `pid` (field 22 of /proc/<pid>/stat), or `None` if there is none.
pub fn process_start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|(_, start)| start)
}

/// Whether the process still runs: the pid exists, has the recorded start time (so it is not
/// a newer process that reused the pid) and is not a zombie.
pub fn is_alive(handle: &ProcessHandle) -> bool {
    matches!(read_stat(handle.pid), Some((state, start))
        if start == handle.start_time && state != 'Z' && state != 'X' && state != 'x')
}

/// The two ends stdout and stderr of the process get.
fn open_log(target: &LogTarget) -> Result<(OwnedFd, OwnedFd)> {
    let (out, what) = match target {
        LogTarget::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)
                .map_err(SandboxError::io("opening log", path))?;
            (OwnedFd::from(f), path.clone())
        }
        LogTarget::Shim(argv) => (spawn_shim(argv)?, PathBuf::from(&argv[0])),
    };
    let err = out
        .try_clone()
        .map_err(SandboxError::io("duplicating log fd", &what))?;
    Ok((out, err))
}

/// Starts the log shim on the read end of a new pipe and returns the write end. Like a
/// container's process it is not forked from the agent (`spawn.rs`); it keeps the agent's
/// environment and namespaces, in a session of its own.
fn spawn_shim(argv: &[std::ffi::OsString]) -> Result<OwnedFd> {
    let program = argv
        .first()
        .ok_or_else(|| SandboxError::Invalid("empty log shim command".into()))?;
    let spawn_err = |source| SandboxError::Spawn {
        program: program.to_string_lossy().into_owned(),
        netns: PathBuf::from("(the agent's)"),
        source,
    };
    let (read, write) = std::io::pipe().map_err(SandboxError::io("creating log pipe", program))?;
    let null = |how: &mut OpenOptions| how.open("/dev/null").map(OwnedFd::from);
    let out =
        null(OpenOptions::new().write(true)).map_err(SandboxError::io("opening", "/dev/null"))?;
    let err = out
        .try_clone()
        .map_err(SandboxError::io("opening", "/dev/null"))?;
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let prepared =
        super::spawn::Prepared::new(argv, &env, [OwnedFd::from(read), out, err], None, None)
            .map_err(spawn_err)?;
    let pid = super::spawn::spawn(&prepared).map_err(spawn_err)?;
    // Reaped while this agent runs; after a restart init inherits it.
    super::reaper::reap_pid(pid, "reap-shim", |_| {});
    Ok(OwnedFd::from(write))
}

/// Starts `req.argv` inside `req.netns` and returns its handle.
///
/// The process runs in its own session (no controlling terminal, not in the agent's process
/// group), so it does not die with the agent and is adopted by a restarted agent through its
/// handle. While this agent runs, a reaper thread waits for it, so it never lingers as a
/// zombie; [`wait_exit`] reports its status. stdin is /dev/null.
pub fn spawn(req: &SpawnRequest) -> Result<ProcessHandle> {
    let program = req
        .argv
        .first()
        .ok_or_else(|| SandboxError::Invalid("empty command".into()))?
        .clone();
    let spawn_err = |source| SandboxError::Spawn {
        program: program.clone(),
        netns: req.netns.clone(),
        source,
    };

    // Opened and prepared before the child exists: it may only make raw system calls
    // (`spawn.rs`). O_CLOEXEC (std's default) keeps them out of the process.
    let ns = File::open(&req.netns).map_err(SandboxError::io("opening namespace", &req.netns))?;
    let (log, log_err) = open_log(&req.log)?;
    let devnull = File::open("/dev/null").map_err(SandboxError::io("opening", "/dev/null"))?;
    let setup = super::setup::ChildSetup::prepare(
        req.resolv_conf.as_deref(),
        req.hosts_file.as_deref(),
        &req.mounts,
        &req.secrets,
        req.hostname.as_deref(),
    )?;
    let mut env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
    env.extend(req.env.iter().cloned());
    let prepared = super::spawn::Prepared::new(
        &req.argv,
        &env,
        [OwnedFd::from(devnull), log, log_err],
        Some(OwnedFd::from(ns)),
        Some(setup),
    )
    .map_err(spawn_err)?;
    let pid = super::spawn::spawn(&prepared).map_err(spawn_err)?;
    drop(prepared);
    // Read before the reaper exists: until someone waits, an exited child stays a zombie, so
    // its stat is still there to read.
    let Some(start_time) = process_start_time(pid) else {
        // SAFETY: our own child, not yet reaped: kill and reap it.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
        return Err(spawn_err(std::io::Error::other(format!(
            "cannot read /proc/{pid}/stat of the new process"
        ))));
    };
    let handle = ProcessHandle { pid, start_time };
    start_reaper(handle);
    tracing::info!(pid, start_time, program = %program, netns = %req.netns.display(), "started sandbox process");
    Ok(handle)
}

/// Publishes the child's exit status once it is reaped ([`super::reaper`]: no thread per child).
///
/// Dropping `Child` itself neither kills nor waits, so the process survives the agent.
fn start_reaper(handle: ProcessHandle) {
    let (tx, rx) = watch::channel(None);
    register_child(handle, rx);
    super::reaper::reap_pid(handle.pid, "reap", move |exit| {
        tracing::info!(pid = handle.pid, ?exit, "sandbox process exited");
        tx.send_replace(Some(exit));
    });
}

/// Waits up to `timeout` for the process to end. `Ok(None)`: still running at the deadline.
/// For a child of this agent process the exit status is returned; for an adopted process
/// (started by an earlier agent) only that it is gone ([`ProcessExit::Unknown`]).
pub async fn wait_exit(handle: &ProcessHandle, timeout: Duration) -> Result<Option<ProcessExit>> {
    let deadline = tokio::time::Instant::now() + timeout;
    if let Some(mut rx) = child_exit_receiver(handle) {
        match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(exit)) => return Ok(*exit),
            Err(_elapsed) => return Ok(None),
            // The reaper thread is gone without a status (it could not start): fall back to
            // watching /proc like for a process we did not start.
            Ok(Err(_closed)) => {}
        }
    }
    loop {
        if !is_alive(handle) {
            return Ok(Some(ProcessExit::Unknown));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A pidfd for the process if it is still the one `handle` names. Signalling through a pidfd
/// can never hit a different process that reused the pid after this check.
fn open_pidfd(handle: &ProcessHandle) -> Result<Option<OwnedFd>> {
    let fd = match super::pidfd_open(handle.pid) {
        Ok(fd) => fd,
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(source) => {
            return Err(SandboxError::Signal {
                pid: handle.pid,
                source,
            });
        }
    };
    // Checked after opening: if the pid named our process now, the pidfd refers to it.
    if is_alive(handle) {
        Ok(Some(fd))
    } else {
        Ok(None)
    }
}

/// Sends `sig`; `Ok(false)` if the process had already exited.
fn send_signal(handle: &ProcessHandle, pidfd: &OwnedFd, sig: libc::c_int) -> Result<bool> {
    // SAFETY: valid pidfd, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(SandboxError::Signal {
            pid: handle.pid,
            source: err,
        })
    }
}

/// Stops the process: SIGTERM, then SIGKILL if it is still running after `grace`. Returns
/// `Ok(false)` if it was already gone, `Ok(true)` once it has ended. Bounded: fails with
/// [`SandboxError::Unkillable`] if it survives SIGKILL for a few seconds.
pub async fn stop(handle: &ProcessHandle, grace: Duration) -> Result<bool> {
    let Some(pidfd) = open_pidfd(handle)? else {
        return Ok(false);
    };
    if !send_signal(handle, &pidfd, libc::SIGTERM)? {
        return Ok(false);
    }
    if wait_exit(handle, grace).await?.is_some() {
        tracing::info!(pid = handle.pid, "sandbox process stopped by SIGTERM");
        return Ok(true);
    }
    tracing::info!(pid = handle.pid, grace = ?grace, "sandbox process ignored SIGTERM; sending SIGKILL");
    if !send_signal(handle, &pidfd, libc::SIGKILL)? {
        return Ok(true);
    }
    if wait_exit(handle, KILL_WAIT).await?.is_some() {
        return Ok(true);
    }
    Err(SandboxError::Unkillable {
        pid: handle.pid,
        secs: KILL_WAIT.as_secs(),
    })
}

/// SIGKILLs every process whose network namespace is the one at `netns` and waits (bounded)
/// for them to go. A container's main process may leave children behind (a shell's background
/// jobs, daemons that left its process group); they all share the container's namespace, and
/// once the namespace's name is gone nobody could find them any more. Returns how many were
/// signalled.
pub async fn kill_namespace_processes(netns: &std::path::Path) -> Result<usize> {
    use std::os::unix::fs::MetadataExt as _;
    let target = std::fs::metadata(netns).map_err(|source| SandboxError::Io {
        op: "stat",
        path: netns.to_path_buf(),
        source,
    })?;
    let same_ns = |pid: i32| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
    };
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| pid != std::process::id() as i32 && same_ns(pid))
                .collect()
        })
        .unwrap_or_default();
    for &pid in &pids {
        // SAFETY: plain kill(2); ESRCH (already gone) is fine.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = tokio::time::Instant::now() + KILL_WAIT;
    while pids.iter().any(|&p| same_ns(p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(pids.len())
}
