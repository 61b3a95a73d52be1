//! `aya::Pod` for the map types and `Display` for events (the agent's side only).

use core::fmt;

use crate::{DropEvent, DropReason, Hook};

// SAFETY: plain #[repr(C)] data made only of integers and byte arrays, with explicit
// padding fields, so every bit pattern is valid and there are no uninitialised bytes.
unsafe impl aya::Pod for crate::Config {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::DropEvent {}
// SAFETY: as above (EndpointInfo: 4+4+4+6+2 bytes, no implicit padding).
unsafe impl aya::Pod for crate::EndpointInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::NetworkInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::NodeInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::TestInput {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::TestObservation {}
// SAFETY: as above (4+4+4, no implicit padding).
unsafe impl aya::Pod for crate::ServiceInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::BackendSet {}
// SAFETY: as above (4+2+2).
unsafe impl aya::Pod for crate::BackendKey {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::Backend {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::RrCursor {}
// SAFETY: as above (2+1+1).
unsafe impl aya::Pod for crate::PublishedKey {}
// SAFETY: as above (4+2+2).
unsafe impl aya::Pod for crate::PublishedInfo {}
// SAFETY: as above (4+4+2+2+1+1+2).
unsafe impl aya::Pod for crate::CtKey {}
// SAFETY: as above (8+4+2+1+1+4+4+4+4).
unsafe impl aya::Pod for crate::CtEntry {}
// SAFETY: as above (8+8).
unsafe impl aya::Pod for crate::TrafficCounter {}
// SAFETY: as above (4+4).
unsafe impl aya::Pod for crate::FlowStatKey {}

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
        if self.reason == crate::TRACE_REASON {
            match crate::ForwardAction::from_code(self.action) {
                Some(a) => write!(f, "trace action={}", a.name())?,
                None => write!(f, "trace action={}", self.action)?,
            }
        } else {
            match DropReason::from_code(self.reason) {
                Some(r) => write!(f, "reason={}", r.name())?,
                None => write!(f, "reason={}", self.reason)?,
            }
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
