//! Traffic accounting: what the programs let through, by hook and action, and the connections
//! the balancer created, by service and backend. Drops are in [`crate::drop`].

/// The action a hook took on a packet it did not drop (index of [`FORWARDED`]'s slots).
///
/// [`FORWARDED`]: crate::map_names::FORWARDED
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForwardAction {
    /// Handed on to the kernel's stack (TC_ACT_OK): node traffic on the uplink, packets for
    /// the overlay device, ARP replies sent back the way they came.
    Pass = 0,
    /// Redirected to another device (a container's veth, the overlay, the uplink).
    Redirect = 1,
}

impl ForwardAction {
    pub const ALL: [ForwardAction; 2] = [ForwardAction::Pass, ForwardAction::Redirect];

    pub const fn from_code(code: u8) -> Option<ForwardAction> {
        Some(match code {
            0 => ForwardAction::Pass,
            1 => ForwardAction::Redirect,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            ForwardAction::Pass => "pass",
            ForwardAction::Redirect => "redirect",
        }
    }
}

/// Slots per hook in FORWARDED (room for actions to come without a new map shape).
pub const FORWARD_ACTIONS: u32 = 4;
/// FORWARDED: per CPU, [`TrafficCounter`] at `hook * FORWARD_ACTIONS + action`, hook codes
/// below [`crate::DROP_BY_HOOK_HOOKS`].
pub const FORWARDED_MAX_ENTRIES: u32 = crate::DROP_BY_HOOK_HOOKS * FORWARD_ACTIONS;

/// Packets and bytes (`skb->len`, the frame as the hook saw it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of FLOWS: the connections the balancer sent to one backend of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowStatKey {
    /// [`crate::ServiceInfo`]'s service id (the agent's service number).
    pub service_id: u32,
    /// The backend's address, network order.
    pub backend: [u8; 4],
}

/// Entries of FLOWS: an LRU map, so pairs of services and backends that are gone age out
/// without the agent deleting them.
pub const FLOWS_MAX_ENTRIES: u32 = 65536;

/// `DropEvent::reason` of a trace event (`netctl monitor --type trace`): not a drop, a packet
/// a hook let through; `DropEvent::verdict` says how. Code 0 is never a drop reason.
pub const TRACE_REASON: u32 = 0;

/// TRACE (one `u32`): non-zero while someone watches trace events. Programs check it for every
/// packet they let through, so tracing costs one array lookup when off.
pub const TRACE_MAX_ENTRIES: u32 = 1;

/// Trace events each CPU may push per second (a budget of its own, so tracing never crowds
/// out drop events).
pub const TRACE_EVENTS_PER_SEC: u64 = 1000;
