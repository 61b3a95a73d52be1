//! What a lab writes into its run dir so that another process can find,
//! inspect and tear it down: its configuration, its owner, and one pid file
//! per daemon.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::StoreKind;
use crate::sys;

const RECORD_FILE: &str = "lab.json";
const OWNER_FILE: &str = "owner";
const PIDS_DIR: &str = "pids";
/// Name of etcd's pid file; agents use their node name.
pub const ETCD: &str = "etcd";

/// The lab's shape, as `lab status` and `lab down` need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub prefix: String,
    pub nodes: usize,
    pub store: StoreKind,
    pub start_agents: bool,
    pub lease_ttl_secs: u64,
}

/// Who tears the lab down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The process that created it, which tears it down when its `Lab` drops.
    /// If that process is gone (killed, aborted), the lab is stale and the
    /// next `Lab::up` removes it.
    Process { pid: i32, start_time: u64 },
    /// Left running on purpose (`Lab::detach`); only `Lab::down` removes it.
    Detached,
}

impl Owner {
    pub fn current() -> Owner {
        let pid = std::process::id() as i32;
        Owner::Process {
            pid,
            start_time: sys::start_time(pid).unwrap_or(0),
        }
    }

    /// True unless the owner is a process that has exited (same pid and
    /// start time means the same process, so pid reuse is not mistaken for it).
    pub fn is_alive(self) -> bool {
        match self {
            Owner::Detached => true,
            Owner::Process { pid, start_time } => {
                sys::is_alive(pid) && sys::start_time(pid) == Some(start_time)
            }
        }
    }

    fn encode(self) -> String {
        match self {
            Owner::Detached => "detached\n".into(),
            Owner::Process { pid, start_time } => format!("pid {pid} {start_time}\n"),
        }
    }

    fn decode(s: &str) -> Option<Owner> {
        let mut w = s.split_whitespace();
        match w.next()? {
            "detached" => Some(Owner::Detached),
            "pid" => Some(Owner::Process {
                pid: w.next()?.parse().ok()?,
                start_time: w.next()?.parse().ok()?,
            }),
            _ => None,
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn write_record(run_dir: &Path, record: &Record) -> Result<()> {
    let path = run_dir.join(RECORD_FILE);
    let json = serde_json::to_string_pretty(record).context("encoding lab record")?;
    fs::write(&path, json).with_context(|| format!("writing {}", path.display()))
}

pub fn read_record(run_dir: &Path) -> Result<Option<Record>> {
    let path = run_dir.join(RECORD_FILE);
    match read_optional(&path)? {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .with_context(|| format!("parsing {}", path.display())),
    }
}

pub fn write_owner(run_dir: &Path, owner: Owner) -> Result<()> {
    let path = run_dir.join(OWNER_FILE);
    fs::write(&path, owner.encode()).with_context(|| format!("writing {}", path.display()))
}

pub fn read_owner(run_dir: &Path) -> Result<Option<Owner>> {
    Ok(read_optional(&run_dir.join(OWNER_FILE))?.and_then(|s| Owner::decode(&s)))
}

pub fn write_pid(run_dir: &Path, name: &str, pid: u32) -> Result<()> {
    let dir = run_dir.join(PIDS_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    fs::write(&path, format!("{pid}\n")).with_context(|| format!("writing {}", path.display()))
}

pub fn remove_pid(run_dir: &Path, name: &str) {
    // A missing pid file means nothing is recorded, which is what we want.
    let _ = fs::remove_file(run_dir.join(PIDS_DIR).join(name));
}

pub fn read_pid(run_dir: &Path, name: &str) -> Option<i32> {
    fs::read_to_string(run_dir.join(PIDS_DIR).join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// All recorded daemons as (name, pid), agents before etcd so that agents can
/// still reach the store while they shut down.
pub fn read_pids(run_dir: &Path) -> Vec<(String, i32)> {
    let Ok(entries) = fs::read_dir(run_dir.join(PIDS_DIR)) else {
        return Vec::new();
    };
    let mut pids: Vec<(String, i32)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| read_pid(run_dir, &name).map(|pid| (name, pid)))
        .collect();
    pids.sort_by_key(|(name, _)| (name == ETCD, name.clone()));
    pids
}

/// True if `pid` is alive and is one of this lab's daemons: every daemon has
/// the run dir on its command line, which guards against a recycled pid.
pub fn is_lab_process(run_dir: &Path, pid: i32) -> bool {
    let marker = format!("{}/", run_dir.display());
    sys::is_alive(pid) && sys::cmdline(pid).is_some_and(|c| c.contains(&marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_round_trips() {
        for o in [
            Owner::Detached,
            Owner::Process {
                pid: 42,
                start_time: 7,
            },
        ] {
            assert_eq!(Owner::decode(&o.encode()), Some(o));
        }
        assert_eq!(Owner::decode("garbage"), None);
        assert_eq!(Owner::decode("pid x 1"), None);
    }

    #[test]
    fn current_owner_is_alive() {
        assert!(Owner::current().is_alive());
        let dead = Owner::Process {
            pid: i32::MAX,
            start_time: 1,
        };
        assert!(!dead.is_alive());
        // Same pid, different start time: a recycled pid, not the owner.
        let Owner::Process { pid, start_time } = Owner::current() else {
            unreachable!()
        };
        let recycled = Owner::Process {
            pid,
            start_time: start_time + 1,
        };
        assert!(!recycled.is_alive());
    }

    #[test]
    fn files_round_trip() {
        let dir = std::env::temp_dir().join(format!("netlab-record-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let rec = Record {
            prefix: "nl1".into(),
            nodes: 3,
            store: StoreKind::Etcd,
            start_agents: true,
            lease_ttl_secs: 5,
        };
        assert_eq!(read_record(&dir).unwrap(), None);
        write_record(&dir, &rec).unwrap();
        assert_eq!(read_record(&dir).unwrap(), Some(rec));
        write_owner(&dir, Owner::Detached).unwrap();
        assert_eq!(read_owner(&dir).unwrap(), Some(Owner::Detached));
        write_pid(&dir, ETCD, 10).unwrap();
        write_pid(&dir, "n2", 12).unwrap();
        write_pid(&dir, "n1", 11).unwrap();
        let names: Vec<String> = read_pids(&dir).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["n1", "n2", "etcd"]);
        remove_pid(&dir, "n1");
        assert_eq!(read_pid(&dir, "n1"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lab_process_check_uses_run_dir() {
        let me = std::process::id() as i32;
        assert!(!is_lab_process(Path::new("/run/netlab/nosuchlab"), me));
    }
}
