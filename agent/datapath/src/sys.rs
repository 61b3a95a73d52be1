//! The two bpf(2) commands aya 0.14 does not expose: opening a pinned object and detaching a
//! link synchronously.
//!
//! Why detach explicitly: unpinning a link only drops a reference, and the kernel releases the
//! last reference of a link from a workqueue, so the program can stay attached for a moment
//! after the pin is gone. `BPF_LINK_DETACH` detaches before it returns, which callers that
//! reuse an interface (or tests) can rely on.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_DETACH: libc::c_int = 34;

/// `union bpf_attr` as used by `BPF_OBJ_*` (explicit tail padding: the kernel requires every
/// byte after the last field it knows to be zero).
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` as used by `BPF_LINK_DETACH`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to a properly sized, initialised attribute struct for `cmd`; the
    // kernel reads at most size_of::<T>() bytes from it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the BPF object pinned at `path`.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = libc::c_int::try_from(fd)
        .map_err(|_| io::Error::other("BPF_OBJ_GET returned an out-of-range fd"))?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Detaches the link behind `link` now (the link object stays valid but defunct).
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let raw = u32::try_from(link.as_raw_fd())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative fd"))?;
    let mut attr = LinkDetachAttr { link_fd: raw };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Detaches the link pinned at `path` and removes the pin. Returns false if nothing was
/// pinned there. A detach failure (e.g. the link is already defunct because its interface
/// is gone) is not fatal: removing the pin still releases the link.
pub(crate) fn detach_and_unpin_link(path: &Path) -> io::Result<bool> {
    let fd = match obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if let Err(e) = link_detach(std::os::fd::AsFd::as_fd(&fd)) {
        tracing::debug!(
            path = %path.display(),
            error = %e,
            "BPF_LINK_DETACH failed; unpinning only"
        );
    }
    std::fs::remove_file(path)?;
    Ok(true)
}

const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;

/// `union bpf_attr` as used by `BPF_MAP_*_ELEM` and `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// The number of keys in the map `map` whose keys are `key_size` bytes, by walking them with
/// `BPF_MAP_GET_NEXT_KEY` (aya walks keys only through typed maps). Entries added or removed
/// during the walk may or may not be counted, as with any map iteration.
pub(crate) fn count_keys(map: BorrowedFd<'_>, key_size: u32) -> io::Result<u32> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0u32;
    let mut first = true;
    loop {
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            // A null key asks for the first one.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
        first = false;
        n += 1;
        std::mem::swap(&mut key, &mut next);
    }
}
