//! Map definitions. Names, value types and sizes come from `dataplane_common`, the single
//! definition of the ABI; the `name = "..."` strings must equal `dataplane_common::map_names`
//! (the attribute needs a literal; the agent's tests check the object against the constants).
//!
//! Every map the datapath depends on is pinned by name so the agent can reopen it after a
//! restart while the attached programs keep using it. Only the test-hook maps are not pinned.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use dataplane_common::{
    CONFIG_KEY, Config, DROP_COUNTERS_MAX_ENTRIES, DROP_EVENTS_BYTE_SIZE, DropReason,
    ENDPOINTS_MAX_ENTRIES, EndpointInfo, EndpointKey, NETWORKS_MAX_ENTRIES, NetworkInfo, TestInput,
    TestObservation,
};

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

/// Every endpoint the node routes to or from, local and remote, keyed by IPv4 address.
///
/// `BPF_F_NO_PREALLOC`: elements are then freed through RCU, so a value a program is reading
/// cannot be recycled for another key by a concurrent agent update (with preallocation a
/// deleted element goes straight back to the free list and may be reused mid-read). Memory
/// also grows with the endpoints actually installed instead of 65536 entries up front.
#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> =
    HashMap::pinned(ENDPOINTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Overlay subnets, for telling "unknown address in my network" from "another network" and
/// "outside every network" when the destination is not an endpoint. (aya adds the
/// `BPF_F_NO_PREALLOC` the kernel requires for LPM tries.)
#[map(name = "NETWORKS")]
pub static NETWORKS: LpmTrie<[u8; 4], NetworkInfo> = LpmTrie::pinned(NETWORKS_MAX_ENTRIES, 0);

/// Test-hook input (see `test_hooks`); unpinned, private to one load.
#[map(name = "TEST_INPUT")]
pub static TEST_INPUT: Array<TestInput> = Array::with_max_entries(1, 0);

/// Test-hook output (see `test_hooks`); unpinned, private to one load.
#[map(name = "TEST_OBSERVED")]
pub static TEST_OBSERVED: Array<TestObservation> = Array::with_max_entries(1, 0);

// The bindings' integer type for this enum differs between the architectures they were
// generated for (see verdict.rs), so the cast is redundant on some and needed on others.
#[allow(clippy::unnecessary_cast)]
const BPF_F_NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC as u32;

/// The config, once the agent has written a complete one. Programs copy it (16 bytes) rather
/// than hold the map pointer, so a concurrent `set_config` cannot be seen half-written
/// field by field across the function.
#[inline(always)]
pub fn config() -> Result<Config, DropReason> {
    match CONFIG.get(CONFIG_KEY) {
        Some(cfg) if cfg.is_ready() => Ok(*cfg),
        _ => Err(DropReason::NotReady),
    }
}

/// The endpoint with address `ip` (network-order octets), copied out of the map.
#[inline(always)]
pub fn endpoint(ip: &EndpointKey) -> Option<EndpointInfo> {
    // SAFETY: the value is copied immediately; with BPF_F_NO_PREALLOC the element stays valid
    // for the duration of the program even if the agent deletes it concurrently (RCU).
    unsafe { ENDPOINTS.get(ip).copied() }
}

/// The network whose subnet contains `ip` (longest prefix), copied out of the map.
#[inline(always)]
pub fn network_of(ip: [u8; 4]) -> Option<NetworkInfo> {
    NETWORKS
        .get(aya_ebpf::maps::lpm_trie::Key::new(32, ip))
        .copied()
}
