//! bpffs helpers: checking, mounting, creating and removing the agent's pin directory.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::DatapathError;

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// True if `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = c_path(path)?;
    // SAFETY: `statfs` only writes into the zeroed struct we own; `c` is NUL terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is i64 on x86_64/aarch64 but a narrower integer on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts a bpf filesystem on `mount_point` unless one is already there; returns whether it
/// mounted. Needs CAP_SYS_ADMIN. The mount is visible to every network namespace that shares
/// our mount namespace (hence `nsenter --net`, not `ip netns exec`, for agents in the lab).
pub fn mount_bpffs(mount_point: &Path) -> io::Result<bool> {
    if is_bpffs(mount_point)? {
        return Ok(false);
    }
    let target = c_path(mount_point)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; no mount data is passed.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!(mount_point = %mount_point.display(), "mounted bpffs");
    Ok(true)
}

/// Creates `bpf_dir` (and parents) after checking it will live on bpffs, so the error for a
/// missing mount says so instead of surfacing as EPERM from sysfs or EINVAL from BPF_OBJ_PIN.
pub(crate) fn prepare_dir(bpf_dir: &Path) -> Result<(), DatapathError> {
    let abs =
        std::path::absolute(bpf_dir).map_err(|e| DatapathError::io("resolving", bpf_dir, e))?;
    let mut existing: &Path = &abs;
    while !existing.exists() {
        existing = existing.parent().unwrap_or_else(|| Path::new("/"));
    }
    let on_bpffs = is_bpffs(existing).map_err(|e| DatapathError::io("statfs", existing, e))?;
    if !on_bpffs {
        return Err(DatapathError::NotBpffs {
            path: existing.to_path_buf(),
        });
    }
    // bpffs rejects names containing '.' with EPERM; say why instead of just "not permitted".
    if abs
        .strip_prefix(existing)
        .ok()
        .is_some_and(|rest| rest.as_os_str().as_bytes().contains(&b'.'))
    {
        return Err(DatapathError::io(
            "creating",
            bpf_dir,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "bpffs does not allow '.' in file or directory names",
            ),
        ));
    }
    fs::create_dir_all(bpf_dir).map_err(|e| DatapathError::io("creating", bpf_dir, e))
}

/// Removes the datapath's pin directory and everything in it (maps and pinned links); a
/// missing directory is fine. Used on teardown: once the pins are gone and no program holds
/// the maps, the kernel frees them, and pinned links detach.
///
/// Refuses to touch anything that is not a subdirectory of a bpf filesystem, so a mistaken
/// `--bpf-dir /` or `--bpf-dir /sys/fs/bpf` cannot wipe unrelated files or other users' pins.
pub fn remove_pins(bpf_dir: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(bpf_dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to remove {}: {why}", bpf_dir.display()),
        ))
    };
    if !meta.is_dir() {
        return refuse("not a directory");
    }
    if !is_bpffs(bpf_dir)? {
        return refuse("not on a bpf filesystem");
    }
    let parent: PathBuf = match bpf_dir.canonicalize()?.parent() {
        Some(parent) => parent.to_path_buf(),
        None => return refuse("it is the root directory"),
    };
    if fs::metadata(&parent)?.dev() != meta.dev() {
        return refuse("it is the root of a bpf filesystem");
    }
    // Detach pinned links first: unpinning alone releases them asynchronously, and callers
    // expect nothing of ours to be attached once this returns.
    let links = bpf_dir.join(crate::LINKS_DIR);
    if let Ok(entries) = fs::read_dir(&links) {
        for entry in entries.flatten() {
            if let Err(e) = crate::sys::detach_and_unpin_link(&entry.path()) {
                tracing::warn!(pin = %entry.path().display(), error = %e, "detaching pinned link");
            }
        }
    }
    fs::remove_dir_all(bpf_dir)?;
    tracing::info!(bpf_dir = %bpf_dir.display(), "removed datapath pins");
    Ok(())
}
