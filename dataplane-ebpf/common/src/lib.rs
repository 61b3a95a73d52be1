//! The datapath ABI: everything the eBPF programs and the agent must agree on.
//!
//! This crate is the single definition of map names, map value layouts, drop reason codes and
//! event records. It is `no_std` so the eBPF crate can use it; the `user` feature adds
//! `aya::Pod` implementations so the agent can read and write the same types through aya maps.
//!
//! Compatibility rules (maps are pinned and outlive the agent, so old and new binaries meet):
//! - never renumber a [`DropReason`] or reuse a retired code; only append;
//! - never change the layout of a `#[repr(C)]` type in place; the agent recreates pinned maps
//!   whose key/value size no longer matches the object it loads, which loses their contents;
//! - [`DROP_COUNTERS_MAX_ENTRIES`] leaves room for new reasons so adding one does not change the
//!   counter map's shape (and so does not reset the counters of a running node).
#![no_std]

/// Names of the maps, identical to the `#[map(name = ...)]` in the eBPF crate and to the file
/// names under the agent's bpffs directory (maps are pinned by name).
///
/// Kernel map names are truncated to 15 bytes, so keep new names short.
pub mod map_names {
    /// [`crate::Config`], one entry at index [`crate::CONFIG_KEY`].
    pub const CONFIG: &str = "CONFIG";
    /// Per-CPU `u64` counters indexed by [`crate::DropReason`] code.
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    /// Ring buffer of [`crate::DropEvent`] records.
    pub const DROP_EVENTS: &str = "DROP_EVENTS";

    /// Every pinned map of the datapath, for tooling that checks or removes pins.
    pub const ALL: &[&str] = &[CONFIG, DROP_COUNTERS, DROP_EVENTS];
}

/// Names of the programs in the object (the Rust function names of the entry points).
pub mod program_names {
    /// tc ingress on the host side of each container veth.
    pub const FROM_CONTAINER: &str = "from_container";

    /// Every program of the object; the agent loads (verifies) all of them.
    pub const ALL: &[&str] = &[FROM_CONTAINER];
}

/// The only index of the CONFIG array map.
pub const CONFIG_KEY: u32 = 0;

/// Set by the agent when it has written a complete [`Config`]. The programs refuse to answer
/// ARP until then, because a zeroed router MAC would poison the containers' neighbour caches.
pub const CONFIG_F_READY: u32 = 1 << 0;

/// Node-wide settings written by the agent, read by every program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// MAC address the node's programs use as "the router": ARP replies to containers carry it,
    /// and (next issue) routed frames get it as Ethernet source.
    pub router_mac: [u8; 6],
    /// Explicit padding so the layout has no uninitialised bytes (required for `Pod`).
    pub _pad: [u8; 2],
    /// `CONFIG_F_*` bits.
    pub flags: u32,
}

impl Config {
    /// True once the agent has written the config (see [`CONFIG_F_READY`]).
    #[inline(always)]
    pub const fn is_ready(&self) -> bool {
        self.flags & CONFIG_F_READY != 0
    }
}

/// Number of slots of the DROP_COUNTERS per-CPU array. Larger than the number of reasons on
/// purpose: see the crate docs.
pub const DROP_COUNTERS_MAX_ENTRIES: u32 = 64;

/// Slot 0 of DROP_COUNTERS is not a drop reason: it counts drop events that could not be pushed
/// because the ring buffer was full (the packet itself is still counted under its reason).
pub const DROP_COUNTER_EVENTS_LOST: u32 = 0;

/// Byte size of the DROP_EVENTS ring buffer. Must be a power-of-two multiple of the page size;
/// 256 KiB holds about 4000 events, enough to ride out a burst while the agent is busy.
pub const DROP_EVENTS_BYTE_SIZE: u32 = 256 * 1024;

/// Why a program dropped a packet. The discriminant is the wire code used as the DROP_COUNTERS
/// index and in [`DropEvent::reason`]; codes are stable (append only, never reuse).
///
/// Codes 1..=15 are generic parsing/infrastructure reasons, 16..=31 ARP, 32.. are left for
/// routing (local/remote endpoint lookups, VNI checks, encryption, services) in later issues.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The frame is shorter than the headers it claims (truncated Ethernet, ARP or IPv4
    /// header), or an IPv4 header is nonsensical (version != 4, IHL < 5).
    Malformed = 1,
    /// Ethertype the overlay does not carry (IPv6, VLAN tags, LLDP, ...).
    UnsupportedL3 = 2,
    /// The agent has not written the config yet (no router MAC to answer with).
    NotReady = 3,
    /// A kernel helper failed (e.g. `bpf_skb_pull_data` could not linearise the headers).
    Internal = 4,
    /// ARP that is not Ethernet/IPv4 (hardware type, protocol type or address lengths).
    ArpInvalid = 16,
    /// ARP operation other than request (replies, RARP): nobody on the node ARPs containers.
    ArpUnsupportedOp = 17,
    /// Gratuitous ARP or an address-conflict probe (sender IP 0.0.0.0 or equal to the target).
    /// Never answered: a reply would make the container believe its address is taken.
    ArpGratuitous = 18,
}

impl DropReason {
    /// Every reason, in code order. The agent reports counters in this order.
    pub const ALL: &'static [DropReason] = &[
        DropReason::Malformed,
        DropReason::UnsupportedL3,
        DropReason::NotReady,
        DropReason::Internal,
        DropReason::ArpInvalid,
        DropReason::ArpUnsupportedOp,
        DropReason::ArpGratuitous,
    ];

    /// The code stored in maps and events.
    #[inline(always)]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Decodes a code read from a map or event; `None` for codes this build does not know
    /// (e.g. written by a newer datapath still attached during an upgrade).
    pub const fn from_code(code: u32) -> Option<DropReason> {
        Some(match code {
            1 => DropReason::Malformed,
            2 => DropReason::UnsupportedL3,
            3 => DropReason::NotReady,
            4 => DropReason::Internal,
            16 => DropReason::ArpInvalid,
            17 => DropReason::ArpUnsupportedOp,
            18 => DropReason::ArpGratuitous,
            _ => return None,
        })
    }

    /// Stable snake_case name, usable as a metrics label or JSON value.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnsupportedL3 => "unsupported_l3",
            DropReason::NotReady => "not_ready",
            DropReason::Internal => "internal",
            DropReason::ArpInvalid => "arp_invalid",
            DropReason::ArpUnsupportedOp => "arp_unsupported_op",
            DropReason::ArpGratuitous => "arp_gratuitous",
        }
    }
}

/// Where a packet was dropped (stored in [`DropEvent::hook`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// tc ingress on the host side of a container veth.
    FromContainer = 1,
    /// tc ingress on the node's VXLAN device.
    FromOverlay = 2,
    /// tc ingress (or XDP) on the uplink.
    FromUplink = 3,
    /// tc egress on the uplink.
    ToUplink = 4,
}

impl Hook {
    /// Decodes [`DropEvent::hook`].
    pub const fn from_code(code: u8) -> Option<Hook> {
        Some(match code {
            1 => Hook::FromContainer,
            2 => Hook::FromOverlay,
            3 => Hook::FromUplink,
            4 => Hook::ToUplink,
            _ => return None,
        })
    }

    /// The program name of the hook.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::FromContainer => "from_container",
            Hook::FromOverlay => "from_overlay",
            Hook::FromUplink => "from_uplink",
            Hook::ToUplink => "to_uplink",
        }
    }
}

/// One record of the DROP_EVENTS ring buffer.
///
/// Header fields are best effort: whatever part of the frame was long enough to read, the rest
/// stays zero. Multi-byte addresses are kept as network-order byte arrays; the scalar fields are
/// host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the drop.
    pub timestamp_ns: u64,
    /// [`DropReason`] code.
    pub reason: u32,
    /// Interface the packet was seen on (`skb->ifindex`).
    pub ifindex: u32,
    /// Length of the whole frame (`skb->len`).
    pub pkt_len: u32,
    /// VXLAN network identifier, 0 unless dropped by `from_overlay`.
    pub vni: u32,
    /// Ethertype, 0 if the frame had no complete Ethernet header.
    pub ethertype: u16,
    /// ARP operation, 0 if not ARP.
    pub arp_op: u16,
    /// [`Hook`] code.
    pub hook: u8,
    /// IPv4 protocol number, 0 if not IPv4.
    pub ip_proto: u8,
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Ethernet destination.
    pub dst_mac: [u8; 6],
    /// IPv4 source, or ARP sender protocol address.
    pub src_ip: [u8; 4],
    /// IPv4 destination, or ARP target protocol address.
    pub dst_ip: [u8; 4],
    /// Explicit padding up to the 8-byte alignment (no uninitialised bytes).
    pub _pad: [u8; 6],
}

/// The ring buffer hands out 8-byte aligned records; keep the event a multiple of that.
const _: () = assert!(core::mem::size_of::<DropEvent>() == 56);
const _: () = assert!(core::mem::align_of::<DropEvent>() == 8);
const _: () = assert!(core::mem::size_of::<Config>() == 12);
const _: () = assert!((DropReason::ArpGratuitous as u32) < DROP_COUNTERS_MAX_ENTRIES);

#[cfg(feature = "user")]
mod user {
    use core::fmt;

    use super::{DropEvent, DropReason, Hook};

    // SAFETY: plain #[repr(C)] data made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DropEvent {}

    struct Mac<'a>(&'a [u8; 6]);

    impl fmt::Display for Mac<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let [a, b, c, d, e, g] = self.0;
            write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
        }
    }

    struct Ip<'a>(&'a [u8; 4]);

    impl fmt::Display for Ip<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let [a, b, c, d] = self.0;
            write!(f, "{a}.{b}.{c}.{d}")
        }
    }

    /// One line for logs, e.g. `reason=arp_invalid hook=from_container ifindex=7 len=42
    /// ethertype=0x0806 02:..:01 -> ff:..:ff 10.0.0.2 -> 10.0.0.1 arp_op=1`.
    impl fmt::Display for DropEvent {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match DropReason::from_code(self.reason) {
                Some(r) => write!(f, "reason={}", r.name())?,
                None => write!(f, "reason={}", self.reason)?,
            }
            match Hook::from_code(self.hook) {
                Some(h) => write!(f, " hook={}", h.name())?,
                None => write!(f, " hook={}", self.hook)?,
            }
            write!(
                f,
                " ifindex={} len={} ethertype={:#06x} {} -> {}",
                self.ifindex,
                self.pkt_len,
                self.ethertype,
                Mac(&self.src_mac),
                Mac(&self.dst_mac)
            )?;
            if self.src_ip != [0; 4] || self.dst_ip != [0; 4] {
                write!(f, " {} -> {}", Ip(&self.src_ip), Ip(&self.dst_ip))?;
            }
            if self.arp_op != 0 {
                write!(f, " arp_op={}", self.arp_op)?;
            }
            if self.ip_proto != 0 {
                write!(f, " ip_proto={}", self.ip_proto)?;
            }
            if self.vni != 0 {
                write!(f, " vni={}", self.vni)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reason_codes_round_trip_and_names_are_unique() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(DropReason::from_code(r.code()), Some(*r));
            assert_ne!(r.code(), DROP_COUNTER_EVENTS_LOST);
            assert!(r.code() < DROP_COUNTERS_MAX_ENTRIES);
            for other in &DropReason::ALL[i + 1..] {
                assert_ne!(r.name(), other.name());
                assert!(r.code() < other.code(), "ALL must be in code order");
            }
        }
        assert_eq!(DropReason::from_code(0), None);
    }
}
