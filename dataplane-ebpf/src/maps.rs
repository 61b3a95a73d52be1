//! Map definitions. Names, value types and sizes come from `dataplane_common`, the single
//! definition of the ABI; the `name = "..."` strings must equal `dataplane_common::map_names`
//! (the attribute needs a literal; the agent's tests check the object against the constants).
//!
//! Every map is pinned by name so the agent can reopen it after a restart while the attached
//! programs keep using it.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use dataplane_common::{Config, DROP_COUNTERS_MAX_ENTRIES, DROP_EVENTS_BYTE_SIZE};

/// Node-wide settings, one entry at `CONFIG_KEY`.
#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Per-CPU packet counters indexed by drop reason code (per CPU so increments need no atomics;
/// the agent sums the CPUs).
#[map(name = "DROP_COUNTERS")]
pub static DROP_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_COUNTERS_MAX_ENTRIES, 0);

/// `DropEvent` records for the agent.
#[map(name = "DROP_EVENTS")]
pub static DROP_EVENTS: RingBuf = RingBuf::pinned(DROP_EVENTS_BYTE_SIZE, 0);
