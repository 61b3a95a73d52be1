//! Map definitions. Names, value types and sizes come from `dataplane_common`, the single
//! definition of the ABI; the `name = "..."` strings must equal `dataplane_common::map_names`
//! (the attribute needs a literal; the agent's tests check the object against the constants).
//!
//! Every map the datapath depends on is pinned by name so the agent can reopen it after a
//! restart while the attached programs keep using it. Only the test-hook maps are not pinned.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use dataplane_common::{
    BACKEND_SETS_MAX_ENTRIES, BACKENDS_MAX_ENTRIES, Backend, BackendKey, BackendSet, CONFIG_KEY,
    CONNTRACK_MAX_ENTRIES, CT_NEW_MAX_ENTRIES, Config, CtEntry, CtKey, DROP_BY_HOOK_MAX_ENTRIES,
    DROP_COUNTERS_MAX_ENTRIES, DROP_EVENTS_BYTE_SIZE, DropReason, ENDPOINTS_MAX_ENTRIES,
    EndpointInfo, EndpointKey, FLOWS_MAX_ENTRIES, FORWARDED_MAX_ENTRIES, FlowStatKey,
    NETWORKS_MAX_ENTRIES, NODE_F_TUNNEL_ADDR, NODES_MAX_ENTRIES, NetworkInfo, NodeInfo, NodeKey,
    PUBLISHED_MAX_ENTRIES, PublishedInfo, PublishedKey, RrCursor, SERVICES_MAX_ENTRIES,
    ServiceInfo, TRACE_MAX_ENTRIES, TestInput, TestObservation, TrafficCounter,
};

/// Node-wide settings, one entry at `CONFIG_KEY`. A hash map without preallocation, not an
/// array, so an update replaces the whole value at once (see `dataplane_common::Config`).
#[map(name = "CONFIG")]
pub static CONFIG: HashMap<u32, Config> = HashMap::pinned(1, BPF_F_NO_PREALLOC);

/// Per-CPU packet counters indexed by drop reason code (per CPU so increments need no atomics;
/// the agent sums the CPUs).
/// Per CPU: [0] the start of the current one-second window of drop events, [1] the events
/// pushed in it, [2] and [3] the same for trace events (see `drop::within_budget`). Not
/// pinned: a restart merely starts a window.
#[map(name = "DROP_BUDGET")]
pub static DROP_BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

/// Packets and bytes let through, by hook and action (see `stats`).
#[map(name = "FORWARDED")]
pub static FORWARDED: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(FORWARDED_MAX_ENTRIES, 0);

/// Connections the balancer created, by service and backend (see `stats`).
#[map(name = "FLOWS")]
pub static FLOWS: LruPerCpuHashMap<FlowStatKey, u64> =
    LruPerCpuHashMap::pinned(FLOWS_MAX_ENTRIES, 0);

/// Non-zero while the agent wants trace events. Unpinned: set by the running agent only.
#[map(name = "TRACE")]
pub static TRACE: Array<u32> = Array::with_max_entries(TRACE_MAX_ENTRIES, 0);

/// The drop counters per hook (see `DROP_BY_HOOK_MAX_ENTRIES`).
#[map(name = "DROP_BY_HOOK")]
pub static DROP_BY_HOOK: PerCpuArray<u64> = PerCpuArray::pinned(DROP_BY_HOOK_MAX_ENTRIES, 0);

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

/// Service VIPs (network-order octets) of the networks this node has endpoints on.
///
/// This and the other maps the agent writes while programs read them are `BPF_F_NO_PREALLOC`
/// for the reason given at ENDPOINTS: a value being read is never recycled under the reader.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<[u8; 4], ServiceInfo> =
    HashMap::pinned(SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Backend set id -> which bank and how many slots of BACKENDS are live.
#[map(name = "BACKEND_SETS")]
pub static BACKEND_SETS: HashMap<u32, BackendSet> =
    HashMap::pinned(BACKEND_SETS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// (set id, bank, slot) -> backend address.
#[map(name = "BACKENDS")]
pub static BACKENDS: HashMap<BackendKey, Backend> =
    HashMap::pinned(BACKENDS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Backend set id -> round-robin cursor, incremented atomically by the programs only (see
/// `RrCursor`). No preallocation: a cursor deleted with its set must not be recycled for
/// another set while a program is adding to it.
#[map(name = "RR_CURSORS")]
pub static RR_CURSORS: HashMap<u32, RrCursor> =
    HashMap::pinned(BACKEND_SETS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Ports published on the node address (routing mesh).
#[map(name = "PUBLISHED")]
pub static PUBLISHED: HashMap<PublishedKey, PublishedInfo> =
    HashMap::pinned(PUBLISHED_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Established connections of balanced flows (see `dataplane_common::conntrack`). A plain
/// hash, so a flood of new connections cannot evict them; the agent removes idle ones. Sized
/// by the agent (`--ct-max`).
#[map(name = "CONNTRACK")]
pub static CONNTRACK: HashMap<CtKey, CtEntry> =
    HashMap::pinned(CONNTRACK_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Connections being set up. LRU: when full, the least recently used half-open entries make
/// room, so a burst of new connections never makes balancing fail. (LRU maps are always
/// preallocated; the programs copy what they need out of an entry right away.) Sized by the
/// agent (`--ct-new-max`).
#[map(name = "CT_NEW")]
pub static CT_NEW: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CT_NEW_MAX_ENTRIES, 0);

/// The nodes of the cluster by advertise address.
#[map(name = "NODES")]
pub static NODES: HashMap<NodeKey, NodeInfo> =
    HashMap::pinned(NODES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

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

/// The config, once the agent has written a complete one: a reference into the map rather
/// than a copy (52 bytes off every program's stack). With BPF_F_NO_PREALLOC an update links a
/// new element and frees the old one only after every program that could see it has
/// finished, and nothing writes an element in place: the program reads one whole version
/// for as long as it runs.
#[inline(always)]
pub fn config() -> Result<&'static Config, DropReason> {
    // SAFETY: see above; the reference does not outlive the program run.
    match unsafe { CONFIG.get(CONFIG_KEY) } {
        Some(cfg) if cfg.is_ready() => Ok(cfg),
        _ => Err(DropReason::NotReady),
    }
}

/// The node with address `ip` (network-order octets: advertise or tunnel address), copied.
#[inline(always)]
pub fn node(ip: &NodeKey) -> Option<NodeInfo> {
    // SAFETY: copied immediately; BPF_F_NO_PREALLOC keeps the element valid meanwhile.
    unsafe { NODES.get(ip).copied() }
}

/// Whether `ip` is the advertise address of a node of the cluster.
#[inline(always)]
pub fn is_node(ip: &NodeKey) -> bool {
    node(ip).is_some_and(|n| n.flags & NODE_F_TUNNEL_ADDR == 0)
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

/// The service whose VIP is `ip`, copied out of the map.
#[inline(always)]
pub fn service(ip: &[u8; 4]) -> Option<ServiceInfo> {
    // SAFETY: copied immediately; BPF_F_NO_PREALLOC keeps the element valid meanwhile.
    unsafe { SERVICES.get(ip).copied() }
}

/// The published port `key`, copied out of the map.
#[inline(always)]
pub fn published(key: &PublishedKey) -> Option<PublishedInfo> {
    // SAFETY: as in `service`.
    unsafe { PUBLISHED.get(key).copied() }
}
