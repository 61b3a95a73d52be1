//! The conntrack tables from the agent's side: inspection, garbage collection of idle
//! established entries, and removal of the connections of a backend that is gone.
//!
//! The programs create and promote entries (see `dataplane_common::conntrack`); CT_NEW is an
//! LRU that recycles itself, but CONNTRACK is a plain hash that only the agent empties.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use dataplane_common::{
    CT_CLOSE_TIMEOUT_DEFAULT_S, CT_F_CLOSING, CT_TCP_TIMEOUT_DEFAULT_S, CT_UDP_TIMEOUT_DEFAULT_S,
    Config, CtEntry, CtKey, CtKind, IPPROTO_TCP, map_names,
};

use crate::lb::{list, removed};
use crate::{Datapath, DatapathError};

/// The two tables, established first.
const TABLES: [&str; 2] = [map_names::CONNTRACK, map_names::CT_NEW];

/// What a garbage-collection pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtGcStats {
    /// Entries in CONNTRACK before the pass.
    pub live: usize,
    /// Entries in CT_NEW (not collected: the LRU recycles them).
    pub new: usize,
    /// Idle CONNTRACK entries deleted.
    pub expired: usize,
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `CtEntry::last_seen_ns`.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn secs_or(value: u32, default: u32) -> u64 {
    u64::from(if value == 0 { default } else { value }) * 1_000_000_000
}

/// Whether an established-table entry is idle past its timeout, by the rules the programs
/// apply (see `dataplane-ebpf/src/conntrack.rs`; half-open entries and their SYN timeout are
/// CT_NEW's, which the agent leaves to the LRU).
pub fn live_entry_expired(key: &CtKey, entry: &CtEntry, config: &Config, now_ns: u64) -> bool {
    let timeout = if key.proto != IPPROTO_TCP {
        secs_or(config.ct_udp_timeout_s, CT_UDP_TIMEOUT_DEFAULT_S)
    } else if entry.flags & CT_F_CLOSING != 0 {
        secs_or(config.ct_close_timeout_s, CT_CLOSE_TIMEOUT_DEFAULT_S)
    } else {
        secs_or(config.ct_tcp_timeout_s, CT_TCP_TIMEOUT_DEFAULT_S)
    };
    now_ns.saturating_sub(entry.last_seen_ns) > timeout
}

/// Whether the entry belongs to a connection with `backend` (an address being removed), or
/// to an egress flow of that address.
fn involves(key: &CtKey, entry: &CtEntry, backend: [u8; 4]) -> bool {
    match CtKind::from_code(entry.kind) {
        // Forward entries point at their backend.
        Some(CtKind::VipForward | CtKind::MeshForward) => entry.nat_ip == backend,
        // Reverse and return entries are keyed by the backend's replies.
        Some(CtKind::VipReverse | CtKind::MeshReverse | CtKind::MeshReturn) => {
            key.src_ip == backend
        }
        // A removed container's own flows to the outside world.
        Some(CtKind::EgressForward) => key.src_ip == backend,
        Some(CtKind::EgressReverse) => entry.nat_ip == backend,
        None => false,
    }
}

impl Datapath {
    /// Every conntrack entry of both tables, sorted by key (for tests and inspection: a
    /// snapshot of maps the programs keep changing), each with whether it is in the
    /// established table. Includes idle entries that have expired but not been collected.
    pub fn conntrack_tables(&self) -> Result<Vec<(CtKey, CtEntry, bool)>, DatapathError> {
        let mut all = Vec::new();
        for (i, name) in TABLES.into_iter().enumerate() {
            let map = self.lb_map::<CtKey, CtEntry>(name)?;
            all.extend(list(name, &map)?.into_iter().map(|(k, e)| (k, e, i == 0)));
        }
        all.sort_by_key(|(key, _, live)| (*key, !*live));
        all.dedup_by_key(|(key, _, _)| *key);
        Ok(all)
    }

    /// Every conntrack entry of both tables, sorted by key (see
    /// [`Datapath::conntrack_tables`]).
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtEntry)>, DatapathError> {
        Ok(self
            .conntrack_tables()?
            .into_iter()
            .map(|(k, e, _)| (k, e))
            .collect())
    }

    /// Deletes the entries of both tables for which `doomed` is true; how many it deleted.
    fn remove_conntrack_where(
        &mut self,
        mut doomed: impl FnMut(&CtKey, &CtEntry, bool) -> bool,
    ) -> Result<usize, DatapathError> {
        let mut n = 0;
        for (i, name) in TABLES.into_iter().enumerate() {
            let keys: Vec<CtKey> = list(name, &self.lb_map::<CtKey, CtEntry>(name)?)?
                .into_iter()
                .filter(|(k, e)| doomed(k, e, i == 0))
                .map(|(k, _)| k)
                .collect();
            let mut map = self.lb_map_mut::<CtKey, CtEntry>(name)?;
            for key in keys {
                if removed(name, map.remove(&key))? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Deletes every conntrack entry; returns how many there were. Established balanced
    /// connections then fail on their next packet: for tests and for an operator's "reset",
    /// not for routine reconciliation.
    pub fn flush_conntrack(&mut self) -> Result<usize, DatapathError> {
        self.remove_conntrack_where(|_, _, _| true)
    }

    /// Deletes every entry of connections with `backend`, whose address is being freed: its
    /// clients' next TCP packet gets a reset and UDP flows are balanced anew, instead of
    /// reaching whatever gets the address next.
    pub fn purge_backend(&mut self, backend: Ipv4Addr) -> Result<usize, DatapathError> {
        self.purge_backends(&HashSet::from([backend]))
    }

    /// [`Datapath::purge_backend`] for several addresses in one walk of the tables.
    pub fn purge_backends(&mut self, backends: &HashSet<Ipv4Addr>) -> Result<usize, DatapathError> {
        let ips: HashSet<[u8; 4]> = backends.iter().map(|ip| ip.octets()).collect();
        self.remove_conntrack_where(|k, e, _| ips.iter().any(|ip| involves(k, e, *ip)))
    }

    /// One garbage-collection pass over CONNTRACK at `now_ns` (see [`monotonic_coarse_ns`]):
    /// [`Datapath::conntrack_gc_walk`], then [`Datapath::conntrack_gc_delete`].
    pub fn conntrack_gc(&mut self, now_ns: u64) -> Result<CtGcStats, DatapathError> {
        let (live, doomed) = self.conntrack_gc_walk(now_ns)?;
        let new = self
            .lb_map::<CtKey, CtEntry>(map_names::CT_NEW)?
            .keys()
            .count();
        let expired = self.conntrack_gc_delete(&doomed, now_ns)?;
        Ok(CtGcStats { live, new, expired })
    }

    /// The walk of a pass: how many entries CONNTRACK holds, and the keys of those idle past
    /// their timeout at `now_ns`.
    pub fn conntrack_gc_walk(&self, now_ns: u64) -> Result<(usize, Vec<CtKey>), DatapathError> {
        let config = self.config()?;
        let live = list(
            map_names::CONNTRACK,
            &self.lb_map::<CtKey, CtEntry>(map_names::CONNTRACK)?,
        )?;
        let doomed = live
            .iter()
            .filter(|(k, e)| live_entry_expired(k, e, &config, now_ns))
            .map(|(k, _)| *k)
            .collect();
        Ok((live.len(), doomed))
    }

    /// The deletions of a pass: each of `keys` whose entry is still expired at `now_ns` when
    /// it is looked at again, just before it goes. The walk takes a while on a full table, and
    /// meanwhile the datapath may have refreshed an entry, or replaced it with a new
    /// connection on the same tuple (a client port reused after the old connection's close
    /// timeout): deleting that one cut the new connection, whose next packet then found no
    /// entry (`no_conntrack`), and its replies neither (`unknown_endpoint`). Returns how many
    /// went.
    pub fn conntrack_gc_delete(
        &mut self,
        keys: &[CtKey],
        now_ns: u64,
    ) -> Result<usize, DatapathError> {
        let config = self.config()?;
        let mut map = self.lb_map_mut::<CtKey, CtEntry>(map_names::CONNTRACK)?;
        let mut expired = 0;
        for key in keys {
            match map.get(key, 0) {
                Ok(current) if live_entry_expired(key, &current, &config, now_ns) => {}
                _ => continue,
            }
            if removed(map_names::CONNTRACK, map.remove(key))? {
                expired += 1;
            }
        }
        Ok(expired)
    }
}
