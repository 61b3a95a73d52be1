//! What a sandbox process's child does between fork and exec: its own mount namespace (the
//! resolv.conf and hosts binds, the task's mounts, the secrets tmpfs) and UTS namespace (the hostname).
//!
//! Everything is prepared before the fork ([`ChildSetup::prepare`]: paths as C strings, secret
//! bytes in place), because the child may only make raw system calls: [`ChildSetup::apply`]
//! allocates nothing and takes no locks.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Result, SandboxError};

/// A mount in the process's own mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    /// Must exist on the node: sandboxes see the node's filesystem, so nothing is created.
    pub target: PathBuf,
    pub kind: MountRequestKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountRequestKind {
    Bind {
        source: PathBuf,
        readonly: bool,
    },
    /// `options`: tmpfs mount data, e.g. `size=1048576,mode=1777`.
    Tmpfs {
        options: String,
    },
}

/// A file under `/run/secrets`, on a tmpfs only the process's mount namespace has.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretFile {
    pub name: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

impl std::fmt::Debug for SecretFile {
    // Never the value, whatever gets logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("name", &self.name)
            .field("len", &self.data.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

pub const SECRETS_DIR: &str = "/run/secrets";

fn cstring(what: &str, bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| SandboxError::Invalid(format!("{what} contains a NUL byte")))
}

fn cpath(what: &str, p: &Path) -> Result<CString> {
    cstring(what, p.as_os_str().as_bytes())
}

enum PreparedMount {
    Bind {
        source: CString,
        target: CString,
        readonly: bool,
    },
    Tmpfs {
        target: CString,
        options: CString,
    },
}

struct PreparedSecret {
    path: CString,
    data: Vec<u8>,
    mode: u32,
}

/// The child's namespace work, ready to run after the fork.
pub struct ChildSetup {
    resolv: Option<CString>,
    hosts: Option<CString>,
    mounts: Vec<PreparedMount>,
    secrets: Vec<PreparedSecret>,
    secrets_options: CString,
    hostname: Option<Vec<u8>>,
    root: CString,
    etc_resolv: CString,
    etc_hosts: CString,
    secrets_dir: CString,
    tmpfs: CString,
    netns_dir: CString,
}

/// Writes a fixed message to stderr (the log by then) from the forked child, so the log says
/// which step failed; async-signal-safe.
pub(super) fn child_fail(msg: &[u8]) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    // SAFETY: write(2) on fd 2 with a valid buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
    err
}

impl ChildSetup {
    pub fn prepare(
        resolv_conf: Option<&Path>,
        hosts_file: Option<&Path>,
        mounts: &[MountRequest],
        secrets: &[SecretFile],
        hostname: Option<&str>,
    ) -> Result<Self> {
        let resolv = match resolv_conf {
            Some(p) => {
                // Fail here with a clear message rather than with a bare ENOENT from the child.
                if !p.is_file() {
                    return Err(SandboxError::Invalid(format!(
                        "resolv.conf {} is not a file",
                        p.display()
                    )));
                }
                Some(cpath("resolv.conf path", p)?)
            }
            None => None,
        };
        let hosts = match hosts_file {
            Some(p) if p.is_file() => Some(cpath("hosts path", p)?),
            Some(p) => {
                return Err(SandboxError::Invalid(format!(
                    "hosts file {} is not a file",
                    p.display()
                )));
            }
            None => None,
        };
        let mut prepared = Vec::new();
        for m in mounts {
            if !m.target.is_absolute() || !m.target.exists() {
                return Err(SandboxError::Invalid(format!(
                    "mount target {} does not exist on this node",
                    m.target.display()
                )));
            }
            let target = cpath("mount target", &m.target)?;
            prepared.push(match &m.kind {
                MountRequestKind::Bind { source, readonly } => {
                    if !source.exists() {
                        return Err(SandboxError::Invalid(format!(
                            "bind mount source {} does not exist on this node",
                            source.display()
                        )));
                    }
                    PreparedMount::Bind {
                        source: cpath("mount source", source)?,
                        target,
                        readonly: *readonly,
                    }
                }
                MountRequestKind::Tmpfs { options } => PreparedMount::Tmpfs {
                    target,
                    options: cstring("tmpfs options", options.as_bytes())?,
                },
            });
        }
        let mut total = 0usize;
        let mut files = Vec::new();
        for s in secrets {
            if s.name.is_empty() || s.name.contains('/') || s.name == "." || s.name == ".." {
                return Err(SandboxError::Invalid(format!(
                    "secret file name {:?} is not a plain file name",
                    s.name
                )));
            }
            total += s.data.len() + 4096;
            files.push(PreparedSecret {
                path: cstring(
                    "secret name",
                    format!("{SECRETS_DIR}/{}", s.name).as_bytes(),
                )?,
                data: s.data.clone(),
                mode: s.mode,
            });
        }
        let hostname = match hostname {
            Some(h) if h.is_empty() || h.len() > 64 => {
                return Err(SandboxError::Invalid(format!(
                    "hostname {h:?} must be 1 to 64 bytes"
                )));
            }
            Some(h) => Some(h.as_bytes().to_vec()),
            None => None,
        };
        Ok(Self {
            resolv,
            hosts,
            mounts: prepared,
            secrets: files,
            secrets_options: cstring(
                "options",
                format!("mode=0755,size={}", total.max(4096)).as_bytes(),
            )?,
            hostname,
            root: cstring("root", b"/")?,
            etc_resolv: cstring("target", b"/etc/resolv.conf")?,
            etc_hosts: cstring("target", b"/etc/hosts")?,
            secrets_dir: cstring("secrets dir", SECRETS_DIR.as_bytes())?,
            tmpfs: cstring("fstype", b"tmpfs")?,
            netns_dir: cstring("netns dir", super::netns::NETNS_RUN_DIR.as_bytes())?,
        })
    }

    fn needs_mount_ns(&self) -> bool {
        self.resolv.is_some()
            || self.hosts.is_some()
            || !self.mounts.is_empty()
            || !self.secrets.is_empty()
    }

    /// Runs in the forked child, before exec.
    ///
    /// # Safety
    /// Only between fork and exec, in a single-threaded child.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        // SAFETY (whole body): raw system calls on C strings and buffers prepared before the
        // fork, which stay alive for the child's lifetime.
        unsafe {
            if self.needs_mount_ns() {
                // A mount namespace of its own, so its mounts are invisible to the node.
                // Slave, not private: mounts made on the node later still show up inside (the
                // process sees the node's filesystem), ours never leak out.
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(child_fail(b"netagent: unshare(CLONE_NEWNS) failed\n"));
                }
                if libc::mount(
                    std::ptr::null(),
                    self.root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(child_fail(b"netagent: making / a slave mount failed\n"));
                }
                // The node's /run/netns (one mount per container) goes from this namespace:
                // the process has no use for other containers' namespaces, and each copy
                // here would receive every namespace mounted on the node from now on (work
                // for the kernel per container run, growing with the containers). EINVAL:
                // not a mount point here, nothing to detach.
                if libc::umount2(self.netns_dir.as_ptr(), libc::MNT_DETACH) != 0
                    && *libc::__errno_location() != libc::EINVAL
                    && *libc::__errno_location() != libc::ENOENT
                {
                    return Err(child_fail(b"netagent: detaching /run/netns failed\n"));
                }
            }
            if let Some(src) = &self.resolv {
                bind(src, &self.etc_resolv, true).map_err(|()| {
                    child_fail(
                        b"netagent: bind-mounting resolv.conf over /etc/resolv.conf failed\n",
                    )
                })?;
            }
            if let Some(src) = &self.hosts {
                bind(src, &self.etc_hosts, true).map_err(|()| {
                    child_fail(b"netagent: bind-mounting the hosts file over /etc/hosts failed\n")
                })?;
            }
            for m in &self.mounts {
                match m {
                    PreparedMount::Bind {
                        source,
                        target,
                        readonly,
                    } => bind(source, target, *readonly)
                        .map_err(|()| child_fail(b"netagent: a bind mount failed\n"))?,
                    PreparedMount::Tmpfs { target, options } => {
                        if libc::mount(
                            self.tmpfs.as_ptr(),
                            target.as_ptr(),
                            self.tmpfs.as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV,
                            options.as_ptr().cast(),
                        ) != 0
                        {
                            return Err(child_fail(b"netagent: a tmpfs mount failed\n"));
                        }
                    }
                }
            }
            if !self.secrets.is_empty() {
                self.mount_secrets()?;
            }
            if let Some(h) = &self.hostname {
                if libc::unshare(libc::CLONE_NEWUTS) != 0 {
                    return Err(child_fail(b"netagent: unshare(CLONE_NEWUTS) failed\n"));
                }
                if libc::sethostname(h.as_ptr().cast(), h.len()) != 0 {
                    return Err(child_fail(b"netagent: sethostname failed\n"));
                }
            }
        }
        Ok(())
    }

    /// A tmpfs at /run/secrets with one file per secret, then read-only.
    unsafe fn mount_secrets(&self) -> std::io::Result<()> {
        // SAFETY: as in `apply`.
        unsafe {
            // The mount point on the node's /run: an empty directory, created once.
            if libc::mkdir(self.secrets_dir.as_ptr(), 0o755) != 0
                && *libc::__errno_location() != libc::EEXIST
            {
                return Err(child_fail(b"netagent: creating /run/secrets failed\n"));
            }
            if libc::mount(
                self.tmpfs.as_ptr(),
                self.secrets_dir.as_ptr(),
                self.tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                self.secrets_options.as_ptr().cast(),
            ) != 0
            {
                return Err(child_fail(b"netagent: mounting the secrets tmpfs failed\n"));
            }
            for s in &self.secrets {
                let fd = libc::open(
                    s.path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    s.mode as libc::c_uint,
                );
                if fd < 0 {
                    return Err(child_fail(b"netagent: creating a secret file failed\n"));
                }
                let mut off = 0;
                while off < s.data.len() {
                    let n = libc::write(fd, s.data[off..].as_ptr().cast(), s.data.len() - off);
                    if n <= 0 {
                        libc::close(fd);
                        return Err(child_fail(b"netagent: writing a secret file failed\n"));
                    }
                    off += n as usize;
                }
                // The umask must not change the mode asked for.
                libc::fchmod(fd, s.mode);
                libc::close(fd);
            }
            if libc::mount(
                std::ptr::null(),
                self.secrets_dir.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ) != 0
            {
                return Err(child_fail(
                    b"netagent: making /run/secrets read-only failed\n",
                ));
            }
        }
        Ok(())
    }
}

/// Bind-mounts `src` on `dst`, read-only if asked.
unsafe fn bind(src: &CString, dst: &CString, readonly: bool) -> Result<(), ()> {
    // SAFETY: raw mount(2) calls on valid C strings.
    unsafe {
        if libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(());
        }
        if readonly
            && libc::mount(
                std::ptr::null(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ) != 0
        {
            return Err(());
        }
    }
    Ok(())
}
