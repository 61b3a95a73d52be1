//! Watching a change arrive, from outside the agent: an A query to a container's 127.0.0.11
//! and a lookup in a node's pinned ENDPOINTS map, both cheap enough to repeat every
//! millisecond (no process per attempt).

use std::ffi::CString;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A UDP socket connected to 127.0.0.11:53 inside the namespace at `netns` (a socket keeps
/// the namespace it was made in; only a throw-away thread enters it).
pub fn dns_socket(netns: &Path) -> Result<UdpSocket> {
    let netns = netns.to_owned();
    std::thread::spawn(move || -> Result<UdpSocket> {
        let f = std::fs::File::open(&netns).with_context(|| format!("opening {netns:?}"))?;
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.connect("127.0.0.11:53")?;
        s.set_read_timeout(Some(Duration::from_millis(5)))?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

/// A query for `name`'s A records with id `id`, recursion desired.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The A records of an answer to query `id` (empty for NXDOMAIN or no data); an error for
/// a malformed message or another query's answer.
pub fn a_records(id: u16, msg: &[u8]) -> Result<Vec<Ipv4Addr>> {
    if msg.len() < 12 || msg[..2] != id.to_be_bytes() {
        bail!("not an answer to query {id}");
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(msg, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(msg, at)?;
        let fixed = msg.get(at..at + 10).context("truncated record")?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let data = msg.get(at + 10..at + 10 + len).context("truncated data")?;
        if rtype == 1 && len == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    Ok(out)
}

fn skip_name(msg: &[u8], mut at: usize) -> Result<usize> {
    loop {
        let len = *msg.get(at).context("truncated name")?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xC0 == 0xC0 => return Ok(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

/// Whether `name` resolves to `ip` through `sock` now (one query, a short wait).
pub fn resolves(sock: &UdpSocket, id: u16, name: &str, ip: Ipv4Addr) -> bool {
    if sock.send(&a_query(id, name)).is_err() {
        return false;
    }
    let mut buf = [0u8; 1500];
    // Answers to earlier (timed-out) queries may still be queued: skip them.
    for _ in 0..8 {
        let Ok(n) = sock.recv(&mut buf) else {
            return false;
        };
        if let Ok(ips) = a_records(id, &buf[..n]) {
            return ips.contains(&ip);
        }
    }
    false
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_F_RDONLY: u32 = 1 << 3;

/// A pinned BPF map, opened read-only.
pub struct PinnedMap {
    fd: OwnedFd,
}

impl PinnedMap {
    pub fn open(path: &Path) -> Result<PinnedMap> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())?;
        // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
        #[repr(C)]
        struct ObjGet {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let attr = ObjGet {
            pathname: c.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: BPF_F_RDONLY,
        };
        // SAFETY: attr is a valid bpf_attr prefix for this command, and `c` outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                &attr as *const ObjGet,
                size_of::<ObjGet>() as u32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("{path:?}"));
        }
        // SAFETY: the kernel just gave us this descriptor.
        Ok(PinnedMap {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Whether the map has an entry at `key` (values up to 1 KiB).
    pub fn contains(&self, key: &[u8]) -> bool {
        #[repr(C)]
        struct Lookup {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut value = [0u8; 1024];
        let attr = Lookup {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: key and value buffers are live for the call and the value buffer is larger
        // than any of our maps' values.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &attr as *const Lookup,
                size_of::<Lookup>() as u32,
            )
        };
        ret == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_answer() {
        let q = a_query(0x1234, "web.1");
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], b"\x03web\x011\x00\x00\x01\x00\x01");
        // The answer: the question echoed, then one A record through a name pointer.
        let mut a = q.clone();
        a[2] = 0x81;
        a[3] = 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 1, 2, 3]);
        assert_eq!(a_records(0x1234, &a).unwrap(), [Ipv4Addr::new(10, 1, 2, 3)]);
        assert!(a_records(0x1235, &a).is_err(), "another query's answer");
        assert!(a_records(0x1234, &a[..a.len() - 2]).is_err(), "truncated");
        let mut nx = q.clone();
        nx[3] = 0x83;
        assert!(a_records(0x1234, &nx).unwrap().is_empty());
    }
}
