//! Named network namespaces, made the way iproute2 makes them so `ip netns` lists ours and
//! `ip netns exec` / `nsenter --net=/run/netns/<name>` work on them.

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::statfs::{NSFS_MAGIC, statfs};

use super::{Result, SandboxError};
use crate::netlink::{set_link_up_blocking, write_disable_ipv6};

/// Where iproute2 keeps named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// `/run/netns/<name>`: the path to hand to `nsenter --net=` or
/// [`crate::netlink::Netlink::in_netns`].
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn validate_netns_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == 0);
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidNetnsName(name.to_string()))
    }
}

/// Whether `path` is a mounted namespace (not just the empty placeholder file a crash between
/// "create file" and "bind-mount" would leave).
pub fn is_netns(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Whether the named namespace exists and is mounted.
pub fn netns_exists(name: &str) -> bool {
    validate_netns_name(name).is_ok() && is_netns(&netns_path(name))
}

/// Makes /run/netns a shared mount point, as iproute2 does: a namespace mounted under it then
/// shows up in every mount namespace that has a slave copy of it (e.g. a sandbox process's),
/// and unmounting it there releases the namespace everywhere.
fn prepare_run_dir() -> Result<()> {
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(SandboxError::io("creating", dir))?;
    let make_shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        // EINVAL: not a mount point yet. Bind it onto itself to make it one, then retry.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| SandboxError::io("bind-mounting onto itself", dir)(e.into()))?;
            make_shared().map_err(|e| SandboxError::io("making shared mount", dir)(e.into()))
        }
        Err(e) => Err(SandboxError::io("making shared mount", dir)(e.into())),
    }
}

/// Creates the network namespace `name` at /run/netns/<name> (visible to `ip netns`) with
/// `lo` up and IPv6 disabled, and returns its path.
///
/// Fails with [`SandboxError::NetnsExists`] if it is already there. A stale placeholder file
/// (left by a crash half-way through an earlier creation) is replaced. Blocks for the few
/// milliseconds namespace creation takes; it needs no runtime.
pub fn create_netns(name: &str) -> Result<PathBuf> {
    validate_netns_name(name)?;
    prepare_run_dir()?;
    let path = netns_path(name);
    if is_netns(&path) {
        return Err(SandboxError::NetnsExists(name.to_string()));
    }
    if path.exists() {
        tracing::warn!(netns = name, "replacing stale namespace placeholder file");
        std::fs::remove_file(&path).map_err(SandboxError::io("removing stale", &path))?;
    }
    // The placeholder the namespace is bound onto. create_new: two concurrent creators of the
    // same name must not both believe they made it.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                SandboxError::NetnsExists(name.to_string())
            } else {
                SandboxError::io("creating", &path)(e)
            }
        })?;

    if let Err(e) = make_netns(&path) {
        // Whatever got made (placeholder, maybe the mount) must not be adopted later as a
        // working namespace.
        if let Err(del) = delete_netns(name) {
            tracing::warn!(netns = name, error = %del, "could not remove half-made namespace");
        }
        return Err(e);
    }
    tracing::info!(netns = name, "created network namespace");
    Ok(path)
}

/// Creates a new network namespace on a throw-away thread, bind-mounts it onto `path` and
/// configures it from inside. The thread exits afterwards, so no agent thread is left in the
/// new namespace; the mount keeps the namespace alive.
fn make_netns(path: &Path) -> Result<()> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("netns-create".into())
            .spawn_scoped(scope, || -> Result<()> {
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| SandboxError::io("unshare(CLONE_NEWNET) for", path)(e.into()))?;
                // thread-self, not self: /proc/self/ns/net is the main thread's namespace.
                mount(
                    Some("/proc/thread-self/ns/net"),
                    path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| {
                    SandboxError::io("bind-mounting new namespace onto", path)(e.into())
                })?;
                // IPv6 off before anything comes up: router solicitations and MLD reports
                // from the sandbox's interfaces would otherwise land in the datapath's drop
                // counters. `default` covers interfaces created later, `all` covers lo.
                // /proc/sys/net resolves in this thread's (the new) namespace.
                for conf in ["all", "default"] {
                    write_disable_ipv6(conf)
                        .map_err(|e| SandboxError::io("disabling IPv6 in", path)(e))?;
                }
                set_link_up_blocking("lo")?;
                Ok(())
            })
            .map_err(SandboxError::io("starting namespace thread for", path))?;
        worker.join().unwrap_or_else(|_| {
            Err(SandboxError::io("creating namespace", path)(
                std::io::Error::other("namespace thread panicked"),
            ))
        })
    })
}

/// Removes the named namespace: detaches its mount and deletes the file. The namespace itself
/// lives on while a process or open fd still uses it. `Ok(false)` if there was nothing to
/// remove.
pub fn delete_netns(name: &str) -> Result<bool> {
    validate_netns_name(name)?;
    let path = netns_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not mounted (a stale placeholder); ENOENT: already gone.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(SandboxError::io("unmounting", &path)(e.into())),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(netns = name, "deleted network namespace");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SandboxError::io("removing", &path)(e)),
    }
}
