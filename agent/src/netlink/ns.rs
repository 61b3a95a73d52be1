//! Running a closure inside another network namespace without moving any agent thread.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use super::{NetlinkError, Result};

/// Runs `f` on a fresh OS thread that has joined the network namespace at `path`, and returns
/// its result.
///
/// A namespace switch applies to one thread only, so doing it on a throw-away thread keeps
/// every runtime thread in the node namespace (a pooled thread left in a container's
/// namespace would silently send later work to the wrong place). Anything `f` creates that is
/// bound to a namespace at creation (sockets, /proc/sys/net lookups) stays bound to this one.
///
/// Blocks the caller for the thread's lifetime, so keep `f` short.
pub fn run_in_netns<T, F>(path: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let netns_err = |source: std::io::Error| NetlinkError::Netns {
        path: path.to_path_buf(),
        source,
    };
    let ns = File::open(path).map_err(netns_err)?;
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("netns-helper".into())
            .spawn_scoped(scope, || -> Result<T> {
                // setns with CLONE_NEWNET also rejects a file that is not a network
                // namespace (EINVAL), so a wrong path cannot run `f` in the node namespace.
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| netns_err(std::io::Error::from(e)))?;
                Ok(f())
            })
            .map_err(netns_err)?;
        worker.join().unwrap_or_else(|_| {
            Err(netns_err(std::io::Error::other(
                "helper thread panicked inside the namespace",
            )))
        })
    })
}
