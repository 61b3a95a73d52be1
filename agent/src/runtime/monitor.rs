//! Watching a container's process: when it ends, the container leaves the balancer and DNS
//! (here at once, everywhere within the store's round trip), and its exit is recorded.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::containers;
use crate::model::ContainerExit;
use crate::runtime::{Runtime, lock};
use crate::sandbox::{self, ProcessHandle};

/// How often /proc is polled when a pidfd cannot be waited on.
const POLL: Duration = Duration::from_secs(1);
/// How long an exit status may take to arrive from the reaper once the process is gone.
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// A pidfd (readable once the process has exited), or `None` if the process is already gone.
fn pidfd(p: &ProcessHandle) -> Option<AsyncFd<OwnedFd>> {
    let fd = sandbox::pidfd_open(p.pid).ok()?;
    // Opened after the check would race; checked after the open, the fd names our process.
    if !sandbox::is_alive(p) {
        return None;
    }
    // SAFETY: the AsyncFd owns the fd, which stays open (and registered) until it is dropped.
    unsafe { AsyncFd::register(fd) }.ok()
}

impl Runtime {
    /// Starts watching a local container's process (replacing an earlier watch).
    pub(super) fn start_monitor(self: &Arc<Self>, name: &str, process: ProcessHandle) {
        let rt = self.clone();
        let container = name.to_string();
        let task = tokio::spawn(async move { rt.watch(container, process).await });
        if let Some(old) = lock(&self.monitors).insert(name.to_string(), task.abort_handle()) {
            old.abort();
        }
    }

    async fn watch(self: Arc<Self>, name: String, process: ProcessHandle) {
        if let Some(fd) = pidfd(&process)
            && fd.readable().await.is_err()
        {
            // Cannot wait on it: fall back to polling /proc.
            while sandbox::is_alive(&process) {
                tokio::time::sleep(POLL).await;
            }
        }
        let code = match sandbox::wait_exit(&process, STATUS_WAIT).await {
            Ok(Some(exit)) => exit.shell_code(),
            _ => None,
        };
        lock(&self.monitors).remove(&name);
        self.on_exit(&name, code).await;
    }

    /// The process of local container `name` has ended with `code`.
    pub(super) async fn on_exit(&self, name: &str, code: Option<i32>) {
        tracing::info!(container = name, ?code, "container process exited");
        lock(&self.exits).insert(name.to_string(), code);
        self.reconciler.set_ready(name, false);
        self.reconciler.pass().await;
        let exit = ContainerExit {
            code,
            at: crate::model::now_rfc3339(),
        };
        // The store may be down: keep trying while the container exists (rm ends it).
        let mut delay = Duration::from_millis(100);
        loop {
            match containers::record_exit(&*self.store, name, &exit).await {
                Ok(()) => return,
                Err(crate::error::AgentError::NotFound(_)) => return,
                Err(e) => {
                    tracing::warn!(container = name, error = %e, "cannot record the exit yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
