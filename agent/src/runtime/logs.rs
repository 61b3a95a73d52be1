//! Container logs: bounded on disk, lossless, read by offset.
//!
//! A container's stdout and stderr go into a pipe read by a small log shim (`netagent
//! --log-shim`, started beside the process, in its own session like it), which appends them
//! to segment files. The shim, not the agent, holds the pipe, so the container keeps logging
//! while the agent restarts; it ends when every writer has closed the pipe.
//!
//! Offsets are logical and only grow. Each segment is named for the logical offset of its first
//! byte (`log.<start>`) and is only ever appended to, so a reader never needs a second file
//! to know where a byte is: it lists the segments and reads across them. Once the live
//! segment reaches the size limit the shim starts a new one and deletes all but the previous,
//! so at most two segments (about twice the limit) stay on disk. Nothing is copied or
//! truncated, so no output is lost to rotation; a reader that asks for an offset that has been
//! deleted gets the oldest bytes still there.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

const PREFIX: &str = "log.";

/// The folder of a container's state directory that holds its log segments.
pub const DIR: &str = "logs";

/// Largest chunk one read returns.
pub const READ_MAX: usize = 1 << 20;

/// The flag that makes `netagent` run as a log shim: `netagent --log-shim <dir> <max-bytes>`.
pub const SHIM_FLAG: &str = "--log-shim";

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

/// The segments in `dir` as (start offset, path), oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let start = e.file_name().to_str()?.strip_prefix(PREFIX)?.parse().ok()?;
            Some((start, e.path()))
        })
        .collect();
    out.sort_unstable_by_key(|(start, _)| *start);
    Ok(out)
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{start}"))
}

/// Bytes of log on disk in `dir` (all segments).
pub fn disk_usage(dir: &Path) -> u64 {
    segments(dir)
        .unwrap_or_default()
        .iter()
        .map(|(_, p)| fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// Reads up to `max` bytes of the log from logical `offset`.
pub fn read(dir: &Path, offset: u64, max: usize) -> std::io::Result<Chunk> {
    let max = max.clamp(1, READ_MAX);
    let segs = segments(dir)?;
    // Lengths are taken once, before reading: bytes appended meanwhile wait for the next read.
    let mut spans = Vec::with_capacity(segs.len());
    for (start, path) in segs {
        match fs::metadata(&path) {
            Ok(m) => spans.push((start, m.len(), path)),
            // Deleted by a rotation since the listing: it only held older bytes.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let oldest = spans.first().map_or(0, |(s, _, _)| *s);
    let end = spans.last().map_or(0, |(s, l, _)| s + l);
    let mut offset = offset.clamp(oldest, end);
    let mut data = Vec::new();
    for (start, len, path) in &spans {
        let pos = offset + data.len() as u64;
        let seg_end = start + len;
        if pos >= seg_end || data.len() >= max {
            continue;
        }
        // A gap (a segment deleted between listing and reading) skips ahead.
        if pos < *start {
            if !data.is_empty() {
                break;
            }
            offset = *start;
        }
        let from = offset + data.len() as u64 - start;
        let want = ((len - from) as usize).min(max - data.len());
        match read_into(path, from, want, &mut data) {
            Ok(()) => {}
            // Rotated away while we read: only older bytes, go on with the next segment.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && data.is_empty() => {
                offset = seg_end;
            }
            Err(e) => return Err(e),
        }
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
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    f.take(max as u64).read_to_end(out)?;
    Ok(())
}

/// The shim's writer: appends to the live segment, starts a new one past `max` bytes.
pub struct SegmentWriter {
    dir: PathBuf,
    max: u64,
    start: u64,
    len: u64,
    file: File,
}

impl SegmentWriter {
    /// Continues the log in `dir` (after the newest segment, if any).
    pub fn open(dir: &Path, max: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let (start, len) = match segments(dir)?.last() {
            Some((start, path)) => (*start, fs::metadata(path)?.len()),
            None => (0, 0),
        };
        let file = open_segment(dir, start)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            max: max.max(1),
            start,
            len,
            file,
        })
    }

    /// Appends `buf` (whole: a chunk is never split across segments, so a segment may end
    /// up to one read past the limit).
    pub fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.len >= self.max {
            self.rotate()?;
        }
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let start = self.start + self.len;
        self.file = open_segment(&self.dir, start)?;
        let previous = self.start;
        self.start = start;
        self.len = 0;
        // Keep the segment just finished; everything older goes.
        for (s, path) in segments(&self.dir)? {
            if s < previous {
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }
}

fn open_segment(dir: &Path, start: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(segment_path(dir, start))
}

/// The log shim's main loop: copies `input` into the segments of `dir` until end of file.
pub fn run_shim(mut input: impl Read, dir: &Path, max: u64) -> std::io::Result<()> {
    let mut out = SegmentWriter::open(dir, max)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write(&buf[..n])?;
    }
}

/// Entry point of `netagent --log-shim <dir> <max-bytes>` (stdin is the container's pipe).
pub fn shim_main(args: &[String]) -> std::process::ExitCode {
    let (Some(dir), Some(max)) = (args.first(), args.get(1).and_then(|m| m.parse().ok())) else {
        eprintln!("usage: netagent {SHIM_FLAG} <dir> <max-bytes>");
        return std::process::ExitCode::FAILURE;
    };
    // The agent's stop signals are not ours: the shim ends when the container's output does.
    // SAFETY: setting dispositions to SIG_IGN before any threads exist.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    match run_shim(std::io::stdin().lock(), Path::new(dir), max) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netagent log shim {dir}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_survive_rotation_and_the_disk_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(read(d, 0, 100).unwrap().data, b"");
        let mut w = SegmentWriter::open(d, 5).unwrap();
        w.write(b"0123456789").unwrap();
        let c = read(d, 0, 4).unwrap();
        assert_eq!(
            (c.data.as_slice(), c.offset, c.next, c.end),
            (&b"0123"[..], 0, 4, 10)
        );
        // Past the limit: the next write starts log.10.
        w.write(b"abc").unwrap();
        assert!(d.join("log.10").exists());
        // Reading across the segments.
        let c = read(d, 4, 100).unwrap();
        assert_eq!(c.data, b"456789abc");
        assert_eq!((c.offset, c.next, c.end), (4, 13, 13));
        // Two more rotations: the first segment is gone, offsets keep growing.
        w.write(b"defghij").unwrap();
        w.write(b"XY").unwrap();
        let c = read(d, 0, 100).unwrap();
        assert_eq!(
            c.offset, 10,
            "bytes before the oldest kept segment are gone"
        );
        assert_eq!(c.data, b"abcdefghijXY");
        assert_eq!(read(d, c.next, 100).unwrap().data, b"");
        assert_eq!(segments(d).unwrap().len(), 2);
        // A new writer (a restarted shim) continues after the newest segment.
        drop(w);
        let mut w = SegmentWriter::open(d, 5).unwrap();
        w.write(b"!").unwrap();
        let c = read(d, 20, 100).unwrap();
        assert_eq!((c.data.as_slice(), c.offset), (&b"XY!"[..], 20));
    }

    #[test]
    fn the_shim_copies_everything_until_eof() {
        let dir = tempfile::tempdir().unwrap();
        let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        run_shim(&input[..], dir.path(), 1 << 30).unwrap();
        let c = read(dir.path(), 0, READ_MAX).unwrap();
        assert_eq!(c.data, input);
    }
}
