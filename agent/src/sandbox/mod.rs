//! The kernel side of a sandbox (what `netctl container run` makes on this node): a named
//! network namespace, veth interfaces into it, and a process running inside it.
//!
//! This layer knows nothing about the store or the API: it is handed names, addresses and
//! paths, and it makes or removes exactly those kernel objects. Every creation undoes itself
//! on failure, so a failed call leaves nothing behind for the caller to find.

mod exec;
mod iface;
mod netns;
mod process;
mod reaper;
mod setup;
mod spawn;

use std::path::PathBuf;

pub use exec::{ExecOutcome, exec_in};
pub use iface::{AttachRequest, AttachedInterface, attach, detach, host_ifname_for};
pub use netns::{NETNS_RUN_DIR, create_netns, delete_netns, is_netns, netns_exists, netns_path};
pub use process::{
    LogTarget, ProcessExit, ProcessHandle, SpawnRequest, is_alive, kill_namespace_processes,
    process_start_time, spawn, stop, wait_exit,
};
pub use reaper::pidfd_open;
pub use setup::{MountRequest, MountRequestKind, SECRETS_DIR, SecretFile};

use crate::netlink::NetlinkError;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("invalid network namespace name {0:?}: 1 to 255 bytes, no '/', not '.' or '..'")]
    InvalidNetnsName(String),
    #[error("network namespace {0} already exists")]
    NetnsExists(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A system call or file operation on `path` failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {program:?} in {}: {source}", netns.display())]
    Spawn {
        program: String,
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("signalling process {pid}: {source}")]
    Signal { pid: u32, source: std::io::Error },
    #[error("process {pid} still running {secs}s after SIGKILL")]
    Unkillable { pid: u32, secs: u64 },
}

impl SandboxError {
    fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| SandboxError::Io { op, path, source }
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;
