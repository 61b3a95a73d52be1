//! Starting a sandbox process without copying the agent.
//!
//! `std::process::Command` with a `pre_exec` step forks: the child gets a copy of the agent's
//! page tables, which it throws away at exec, and until then every page the agent's threads
//! write is copied. That cost grows with the agent's memory, so with the cluster: at a
//! thousand endpoints it was a fifth of the agent's CPU per `container run`. Here the child
//! is made like `posix_spawn` makes it, with `clone(CLONE_VM | CLONE_VFORK)`: it runs on a
//! stack of its own in the agent's memory, the calling thread waits until it has called
//! `execve` (or died), and nothing is copied.
//!
//! The child may therefore only make raw system calls on data prepared before the clone (no
//! allocation, no locks: the agent's other threads keep running beside it), which is what the
//! namespace setup was already written for. It reports a failure by writing the errno and the
//! step into the request, which the parent reads once it runs again.

use std::cell::Cell;
use std::ffi::{CString, c_void};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::setup::ChildSetup;

/// The child's stack: the setup's system calls need little; a guard page below it turns an
/// overflow into a fault of the child instead of a write into the agent's memory.
const STACK_SIZE: usize = 256 * 1024;
const PAGE: usize = 4096;

/// Everything the child needs, prepared in the parent.
pub(super) struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// The network namespace to enter, and the mount and file setup; `None` for helpers of
    /// the agent's own (the log shim), which stay where the agent is.
    netns: Option<OwnedFd>,
    setup: Option<ChildSetup>,
    root: CString,
}

impl Prepared {
    /// `argv[0]` is looked up in the `PATH` of `env` (which must have one), as `execvp` would.
    pub(super) fn new<A: AsRef<std::ffi::OsStr>>(
        argv: &[A],
        env: &[(String, String)],
        stdio: [OwnedFd; 3],
        netns: Option<OwnedFd>,
        setup: Option<ChildSetup>,
    ) -> std::io::Result<Self> {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let name = argv
            .first()
            .and_then(|a| a.as_ref().to_str())
            .ok_or_else(|| invalid("empty command, or not UTF-8"))?;
        let path = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or("", |(_, v)| v.as_str());
        let program = resolve(name, path)?;
        let cstr = |s: &[u8]| CString::new(s).map_err(|_| invalid("a NUL byte in the command"));
        let argv = argv
            .iter()
            .map(|a| cstr(a.as_ref().as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        // Later entries override earlier ones with the same key, like `Command::env`.
        let mut vars: Vec<&(String, String)> = Vec::new();
        for kv in env {
            vars.retain(|(k, _)| *k != kv.0);
            vars.push(kv);
        }
        let envp = vars
            .iter()
            .map(|(k, v)| cstr(format!("{k}={v}").as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let [stdin, stdout, stderr] = stdio;
        Ok(Self {
            program: cstr(program.as_os_str().as_bytes())?,
            argv,
            envp,
            stdin,
            stdout,
            stderr,
            netns,
            setup,
            root: cstr(b"/")?,
        })
    }
}

/// The program `name` (a path if it has a '/', else searched in `path`), as `execvp` finds
/// it: the first executable regular file.
fn resolve(name: &str, path: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|p| executable(p))
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))
}

/// What the child reports when it cannot exec: the errno and which step failed.
struct Outcome {
    errno: Cell<i32>,
    step: Cell<&'static str>,
}

struct ChildArgs<'a> {
    prepared: &'a Prepared,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    outcome: &'a Outcome,
}

/// A child-side failure: recorded for the parent, then the child ends.
///
/// # Safety
/// Only in the cloned child.
unsafe fn fail(outcome: &Outcome, step: &'static str) -> ! {
    // SAFETY: reading errno is a plain thread-local load.
    let errno = unsafe { *libc::__errno_location() };
    outcome
        .errno
        .set(if errno == 0 { libc::EINVAL } else { errno });
    outcome.step.set(step);
    // SAFETY: ends the child without running anything of the parent's (no atexit, no flush).
    unsafe { libc::_exit(127) }
}

extern "C" fn child_main(arg: *mut c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` the parent passed and keeps alive until the child has
    // exec'd or exited (CLONE_VFORK); everything below is async-signal-safe system calls on
    // data prepared before the clone.
    unsafe {
        let a = &*(arg as *const ChildArgs<'_>);
        let p = a.prepared;
        // The agent's signal handlers are code for the agent: default dispositions (and
        // SIGPIPE, which Rust ignores, back to default as std does), then an empty mask.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..65 {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for (fd, to) in [(&p.stdin, 0), (&p.stdout, 1), (&p.stderr, 2)] {
            if libc::dup2(fd.as_raw_fd(), to) < 0 {
                fail(a.outcome, "redirecting stdio");
            }
        }
        // Own session: the agent's terminal or process group signals do not reach it.
        if libc::setsid() < 0 {
            fail(a.outcome, "setsid");
        }
        if let Some(netns) = &p.netns
            && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
        {
            fail(a.outcome, "entering the network namespace");
        }
        if let Some(setup) = &p.setup
            && setup.apply().is_err()
        {
            fail(a.outcome, "setting up the container's files");
        }
        if libc::chdir(p.root.as_ptr()) != 0 {
            fail(a.outcome, "chdir /");
        }
        libc::execve(p.program.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
        fail(a.outcome, "exec")
    }
}

/// Restores the calling thread's signal mask when dropped.
struct MaskGuard(libc::sigset_t);

impl Drop for MaskGuard {
    fn drop(&mut self) {
        // SAFETY: a signal set pthread_sigmask itself returned.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Starts the prepared process; returns its pid once it runs the program. On failure the
/// child is reaped and the error names the step ("exec: No such file or directory").
pub(super) fn spawn(p: &Prepared) -> std::io::Result<u32> {
    start(p).map_err(|(e, step)| std::io::Error::new(e.kind(), format!("{step}: {e}")))
}

fn start(p: &Prepared) -> Result<u32, (std::io::Error, &'static str)> {
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let (argv, envp) = (ptrs(&p.argv), ptrs(&p.envp));
    let outcome = Outcome {
        errno: Cell::new(0),
        step: Cell::new(""),
    };
    let args = ChildArgs {
        prepared: p,
        argv: &argv,
        envp: &envp,
        outcome: &outcome,
    };
    let stack = Stack::new().map_err(|e| (e, "allocating the child's stack"))?;
    // No signal handler of the agent may run on the child's stack before it resets them.
    // SAFETY: sigset_t is plain data (all zero is valid), filled in by sigfillset and
    // pthread_sigmask through valid pointers.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    let guard = MaskGuard(old);
    // SAFETY: the stack is mapped, writable and 16-byte aligned at its top; `args` outlives
    // the child's use of it, since CLONE_VFORK returns only after exec or exit.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw const args).cast_mut().cast(),
        )
    };
    let clone_err = std::io::Error::last_os_error();
    drop(guard);
    drop(stack);
    if pid < 0 {
        return Err((clone_err, "clone"));
    }
    if outcome.errno.get() != 0 {
        // It failed before exec and exited: reap it so it leaves no zombie.
        let mut status = 0;
        // SAFETY: our own child, exited.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err((
            std::io::Error::from_raw_os_error(outcome.errno.get()),
            outcome.step.get(),
        ));
    }
    Ok(pid as u32)
}

/// An anonymous mapping for the child's stack with a guard page at its low end.
struct Stack {
    base: *mut c_void,
    len: usize,
}

impl Stack {
    fn new() -> std::io::Result<Self> {
        let len = STACK_SIZE + PAGE;
        // SAFETY: a fresh private anonymous mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let stack = Self { base, len };
        // SAFETY: the first page of the mapping just made.
        if unsafe { libc::mprotect(base, PAGE, libc::PROT_NONE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stack)
    }

    fn top(&self) -> *mut c_void {
        // SAFETY: one past the end of the mapping, where a downward stack starts.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used (the child exec'd or exited).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_path_like_execvp() {
        assert_eq!(
            resolve("sh", "/nonexistent:/bin:/usr/bin").unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert_eq!(
            resolve("./x", "/bin").unwrap(),
            PathBuf::from("./x"),
            "a path is taken as it is"
        );
        let err = resolve("no-such-program-here", "/bin:/usr/bin").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        // A directory or a file without x bits is no program.
        assert!(resolve("passwd", "/etc").is_err());
    }
}
