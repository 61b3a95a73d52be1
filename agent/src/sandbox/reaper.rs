//! Reaping this agent's children without a thread each.
//!
//! A thread blocked in `wait` per sandbox process (and one per log shim) was most of an
//! agent's memory per local container (two stacks and their TLS, ~20 kB touched each): with a
//! thousand containers, two thousand threads. Here a child is waited for by a task on the
//! agent's runtime that sleeps on the child's pidfd (readable once it exits) and then reaps it
//! with `waitid(P_PIDFD)`. Outside a runtime (tools, some tests) a thread still does it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;

use tokio::io::unix::AsyncFd;

use super::process::ProcessExit;

/// `idtype_t` for a pidfd (Linux 5.4), not in the libc crate.
const P_PIDFD: libc::idtype_t = 3;

/// Calls `on_exit` with the exit status of the child `pid` (this process's child, not yet
/// reaped) once it has exited and been reaped.
pub fn reap_pid(pid: u32, name: &str, on_exit: impl FnOnce(ProcessExit) + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let watched = pidfd_open(pid).and_then(|fd| {
            let _in_runtime = rt.enter();
            // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same
            // for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)
        });
        match watched {
            Ok(fd) => {
                rt.spawn(async move {
                    on_exit(wait_pidfd(&fd).await);
                });
                return;
            }
            Err(e) => tracing::debug!(pid, error = %e, "no pidfd; reaping on a thread"),
        }
    }
    reap_on_thread(pid, name, on_exit);
}

fn reap_on_thread(pid: u32, name: &str, on_exit: impl FnOnce(ProcessExit) + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-{pid}"))
        .stack_size(64 * 1024)
        .spawn(move || {
            let exit = loop {
                let mut status = 0;
                // SAFETY: waits for our own child; `status` is a valid out pointer.
                let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
                if rc >= 0 {
                    let status = std::process::ExitStatus::from_raw(status);
                    break match (status.code(), status.signal()) {
                        (Some(code), _) => ProcessExit::Code(code),
                        (None, Some(sig)) => ProcessExit::Signal(sig),
                        (None, None) => ProcessExit::Unknown,
                    };
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::warn!(pid, error = %e, "waiting for a child failed");
                    break ProcessExit::Unknown;
                }
            };
            on_exit(exit);
        });
    if let Err(e) = spawned {
        // The process runs fine; it only lingers as a zombie after exiting until the agent
        // exits. Not worth failing the start for.
        tracing::warn!(pid, error = %e, "could not start a reaper thread");
    }
}

/// A pidfd for `pid` (readable once the process exits; signals through it reach only that
/// process). ESRCH if there is no such process.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

async fn wait_pidfd(fd: &AsyncFd<OwnedFd>) -> ProcessExit {
    loop {
        let mut ready = match fd.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "waiting on a pidfd failed");
                return ProcessExit::Unknown;
            }
        };
        match waitid_nohang(fd.get_ref()) {
            Ok(Some(exit)) => return exit,
            Ok(None) => ready.clear_ready(),
            Err(e) => {
                tracing::warn!(error = %e, "reaping a child failed");
                return ProcessExit::Unknown;
            }
        }
    }
}

/// Reaps the pidfd's process if it has exited; `None` while it runs.
fn waitid_nohang(fd: &OwnedFd) -> std::io::Result<Option<ProcessExit>> {
    // SAFETY: siginfo_t is plain data; all zero is a valid value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: a live pidfd and a writable siginfo_t.
    let ret = unsafe {
        libc::waitid(
            P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (si_pid 0 with WNOHANG: still running).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ProcessExit::Code(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => ProcessExit::Signal(status),
        _ => ProcessExit::Unknown,
    }))
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    async fn exit_of(mut cmd: Command) -> ProcessExit {
        let (tx, rx) = tokio::sync::oneshot::channel();
        reap_pid(cmd.spawn().unwrap().id(), "test", move |e| {
            let _ = tx.send(e);
        });
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn exit_codes_and_signals_reach_the_callback() {
        let mut c = Command::new("sh");
        c.args(["-c", "exit 3"]);
        assert_eq!(exit_of(c).await, ProcessExit::Code(3));
        let mut c = Command::new("sh");
        c.args(["-c", "kill -9 $$"]);
        assert_eq!(exit_of(c).await, ProcessExit::Signal(9));
    }

    #[test]
    fn outside_a_runtime_a_thread_reaps() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut c = Command::new("sh");
        c.args(["-c", "exit 5"]);
        reap_pid(c.spawn().unwrap().id(), "test", move |e| {
            let _ = tx.send(e);
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            ProcessExit::Code(5)
        );
    }
}
