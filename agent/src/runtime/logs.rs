//! Container logs: bounded on disk, read by offset.
//!
//! The process writes its stdout and stderr straight into `log` (opened `O_APPEND`), so it
//! keeps logging while the agent restarts. Rotation is copy-then-truncate: once `log` is past
//! the limit, its content becomes `log.1` (replacing the previous one) and `log` is truncated;
//! `O_APPEND` writers continue at the new end. Lines written between the copy and the
//! truncation are lost, which is the known price of rotating a file someone else holds open.
//!
//! Offsets are logical and only grow: `log.base` holds how many bytes were rotated out of `log`
//! so far, so `log.1` covers `[base - len(log.1), base)` and `log` covers `[base, base +
//! len(log))`. A reader that asks for an offset that has been rotated away gets what is still
//! there.

use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

/// Name of the live log in the container's directory.
pub const LOG: &str = "log";
const OLD: &str = "log.1";
const BASE: &str = "log.base";

/// Largest chunk one read returns.
pub const READ_MAX: usize = 1 << 20;

/// A read of the log: the bytes from `offset`, and where the next read continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub data: Vec<u8>,
    /// Logical offset of `data[0]` (larger than asked if older bytes were rotated away).
    pub offset: u64,
    /// Logical offset right after `data`.
    pub next: u64,
    /// Logical offset of the end of the log at the time of the read.
    pub end: u64,
}

fn base(dir: &Path) -> u64 {
    fs::read_to_string(dir.join(BASE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// Rotates `dir/log` if it holds more than `max_bytes`; returns whether it did.
pub fn rotate_if_needed(dir: &Path, max_bytes: u64) -> std::io::Result<bool> {
    let live = dir.join(LOG);
    let size = len(&live);
    if size <= max_bytes {
        return Ok(false);
    }
    let old = dir.join(OLD);
    fs::copy(&live, &old)?;
    let copied = len(&old);
    // The new base first: if we die between the two steps, offsets stay monotonic (a reader
    // may then skip the copied bytes once, never see them twice).
    let new_base = base(dir) + copied;
    fs::write(dir.join(BASE), new_base.to_string())?;
    OpenOptions::new().write(true).open(&live)?.set_len(0)?;
    Ok(true)
}

/// Reads up to `max` bytes of the log from logical `offset`.
pub fn read(dir: &Path, offset: u64, max: usize) -> std::io::Result<Chunk> {
    let max = max.clamp(1, READ_MAX);
    let base = base(dir);
    let live = dir.join(LOG);
    let old = dir.join(OLD);
    let old_len = len(&old).min(base);
    let live_len = len(&live);
    let end = base + live_len;
    let oldest = base - old_len;
    let offset = offset.clamp(oldest, end);
    let mut data = Vec::new();
    if offset < base {
        read_into(&old, old_len - (base - offset), max, &mut data)?;
    }
    if data.len() < max && offset + data.len() as u64 >= base {
        let from = offset + data.len() as u64 - base;
        read_into(&live, from, max - data.len(), &mut data)?;
    }
    let next = offset + data.len() as u64;
    Ok(Chunk {
        data,
        offset,
        next,
        end: end.max(next),
    })
}

fn read_into(path: &Path, from: u64, max: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(from))?;
    f.take(max as u64).read_to_end(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn append(dir: &Path, s: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG))
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    }

    #[test]
    fn offsets_survive_rotation_and_the_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(read(d, 0, 100).unwrap().data, b"");
        append(d, "0123456789");
        let c = read(d, 0, 4).unwrap();
        assert_eq!(
            (c.data.as_slice(), c.offset, c.next, c.end),
            (&b"0123"[..], 0, 4, 10)
        );
        assert!(!rotate_if_needed(d, 10).unwrap());
        assert!(rotate_if_needed(d, 5).unwrap());
        assert_eq!(len(&d.join(LOG)), 0);
        // A writer that kept its O_APPEND fd open goes on at the start of the truncated file.
        append(d, "abc");
        // Reading across the rotation: the old part from log.1, the rest from log.
        let c = read(d, 4, 100).unwrap();
        assert_eq!(c.data, b"456789abc");
        assert_eq!((c.offset, c.next, c.end), (4, 13, 13));
        // Twice more: the first rotated part is gone, offsets keep growing.
        append(d, "defghij");
        assert!(rotate_if_needed(d, 5).unwrap());
        append(d, "XY");
        let c = read(d, 0, 100).unwrap();
        assert_eq!(c.offset, 10, "bytes before the oldest kept part are gone");
        assert_eq!(c.data, b"abcdefghijXY");
        assert_eq!(read(d, c.next, 100).unwrap().data, b"");
        assert!(len(&d.join(OLD)) + len(&d.join(LOG)) <= 2 * 10 + 2);
    }
}
