//! Typed access to the load-balancer maps: SERVICES (VIPs), BACKEND_SETS/BACKENDS (who gets
//! new connections), RR_CURSORS (round-robin positions), PUBLISHED (routing-mesh ports) and
//! CONNTRACK (read-only here, for tests and inspection).
//!
//! As with the routing maps, each call is a handful of single-entry updates that the programs
//! see atomically one by one, and [`Datapath::set_backends`] is ordered so that the programs
//! see either the whole old backend set or the whole new one.

use std::{collections::HashSet, io, net::Ipv4Addr};

use aya::maps::{HashMap, MapData, MapError};
use dataplane_common::{
    BACKENDS_PER_SET_MAX, Backend, BackendKey, BackendSet, L4Proto, PublishedInfo, PublishedKey,
    RrCursor, SERVICE_F_ALL, ServiceInfo, VNI_MAX, map_names,
};

use crate::{Datapath, DatapathError};

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;

fn invalid(what: impl std::fmt::Display, why: impl std::fmt::Display) -> DatapathError {
    DatapathError::InvalidEntry(format!("{what}: {why}"))
}

fn is_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

fn check_set_id(what: &dyn std::fmt::Display, id: u32) -> Result<(), DatapathError> {
    if id == 0 {
        return Err(invalid(what, "backend set id 0 is reserved"));
    }
    Ok(())
}

/// ENOENT from the kernel ("was not there") is not a failure for removals and lookups.
pub(crate) fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

pub(crate) fn removed(
    name: &'static str,
    result: Result<(), MapError>,
) -> Result<bool, DatapathError> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if not_found(&e) => Ok(false),
        Err(e) => Err(DatapathError::map(name, e)),
    }
}

fn get<K: aya::Pod, V: aya::Pod>(
    name: &'static str,
    map: &HashMap<&MapData, K, V>,
    key: &K,
) -> Result<Option<V>, DatapathError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(DatapathError::map(name, e)),
    }
}

pub(crate) fn list<K: aya::Pod, V: aya::Pod>(
    name: &'static str,
    map: &HashMap<&MapData, K, V>,
) -> Result<Vec<(K, V)>, DatapathError> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DatapathError::map(name, e))
}

impl Datapath {
    pub(crate) fn lb_map<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))
    }

    pub(crate) fn lb_map_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))
    }

    /// Installs or replaces the service VIP `vip` (an address of the network `info.vni`,
    /// balanced over backend set `info.id`). Connections to any TCP or UDP port of the VIP
    /// from containers on that network are balanced to the same port on the set's backends.
    /// Rejects a non-unicast VIP, set id 0, an invalid VNI or unknown flags.
    pub fn upsert_service(
        &mut self,
        vip: Ipv4Addr,
        info: &ServiceInfo,
    ) -> Result<(), DatapathError> {
        let what = format!("service VIP {vip}");
        if !is_unicast(vip) {
            return Err(invalid(&what, "not a unicast address"));
        }
        check_set_id(&what, info.id)?;
        if info.vni == 0 || info.vni > VNI_MAX {
            return Err(invalid(
                &what,
                format_args!("VNI {} is outside 1..={VNI_MAX}", info.vni),
            ));
        }
        if info.flags & !SERVICE_F_ALL != 0 {
            return Err(invalid(
                &what,
                format_args!("unknown flags {:#x}", info.flags),
            ));
        }
        let name = map_names::SERVICES;
        self.lb_map_mut::<[u8; 4], ServiceInfo>(name)?
            .insert(vip.octets(), *info, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Removes the VIP; returns whether it was there. Its backend set stays (a published port
    /// or another VIP may use it; see [`Datapath::remove_backends`]). Connections through the
    /// VIP stop: their next packet finds no service and is dropped.
    pub fn remove_service(&mut self, vip: Ipv4Addr) -> Result<bool, DatapathError> {
        let name = map_names::SERVICES;
        let mut map = self.lb_map_mut::<[u8; 4], ServiceInfo>(name)?;
        removed(name, map.remove(&vip.octets()))
    }

    /// The service with VIP `vip`, if installed.
    pub fn service(&self, vip: Ipv4Addr) -> Result<Option<ServiceInfo>, DatapathError> {
        let name = map_names::SERVICES;
        get(name, &self.lb_map(name)?, &vip.octets())
    }

    /// Every installed VIP, sorted by address.
    pub fn services(&self) -> Result<Vec<(Ipv4Addr, ServiceInfo)>, DatapathError> {
        let name = map_names::SERVICES;
        let mut all: Vec<_> = list(name, &self.lb_map::<[u8; 4], ServiceInfo>(name)?)?
            .into_iter()
            .map(|(ip, info)| (Ipv4Addr::from(ip), info))
            .collect();
        all.sort_by_key(|(ip, _)| *ip);
        all.dedup_by_key(|(ip, _)| *ip);
        Ok(all)
    }

    /// Makes `backends` (addresses of endpoints, in the order new connections take them) the
    /// backend set `service_id`. New connections are spread over exactly these from the next
    /// packet on; existing connections keep their backend (conntrack), also when it is no
    /// longer in the set (drain, scale down). An empty list makes new connections fail with
    /// `no_backend`.
    ///
    /// Atomic for the programs: the new list is written to the set's unused bank of slots,
    /// then one update of BACKEND_SETS switches bank and count, so a program sees the whole
    /// old set or the whole new one, never a mix, and never a slot past the current count.
    /// Slots left over in that bank from an earlier, longer list are deleted before the
    /// switch. Writing the set it already has changes nothing (the round-robin position
    /// carries on).
    ///
    /// Rejects set id 0, more than [`BACKENDS_PER_SET_MAX`] backends, non-unicast or
    /// duplicate addresses (a duplicate would get twice the share).
    pub fn set_backends(
        &mut self,
        service_id: u32,
        backends: &[Ipv4Addr],
    ) -> Result<(), DatapathError> {
        let what = format!("backend set {service_id}");
        check_set_id(&what, service_id)?;
        if backends.len() > BACKENDS_PER_SET_MAX as usize {
            return Err(invalid(
                &what,
                format_args!(
                    "{} backends, at most {BACKENDS_PER_SET_MAX}",
                    backends.len()
                ),
            ));
        }
        let mut seen = HashSet::new();
        for ip in backends {
            if !is_unicast(*ip) {
                return Err(invalid(
                    &what,
                    format_args!("backend {ip} is not a unicast address"),
                ));
            }
            if !seen.insert(*ip) {
                return Err(invalid(&what, format_args!("backend {ip} is listed twice")));
            }
        }
        let current = {
            let name = map_names::BACKEND_SETS;
            get(name, &self.lb_map::<u32, BackendSet>(name)?, &service_id)?
        };
        if let Some(current) = current
            && self.bank(service_id, &current)? == backends
        {
            return Ok(());
        }
        let bank = match current {
            Some(set) => (set.bank ^ 1) & 1,
            None => 0,
        };
        // Lossless: at most BACKENDS_PER_SET_MAX (checked above, and <= 65536).
        let count = backends.len() as u32;

        {
            let name = map_names::BACKENDS;
            let mut slots = self.lb_map_mut::<BackendKey, Backend>(name)?;
            for (slot, ip) in backends.iter().enumerate() {
                let key = BackendKey {
                    service_id,
                    slot: slot as u16,
                    bank: bank as u16,
                };
                let backend = Backend {
                    ip: ip.octets(),
                    flags: 0,
                };
                slots
                    .insert(key, backend, 0)
                    .map_err(|e| DatapathError::map(name, e))?;
            }
            // A bank's slots are always 0..n, so the leftovers end at the first gap.
            for slot in count..BACKENDS_PER_SET_MAX {
                let key = BackendKey {
                    service_id,
                    slot: slot as u16,
                    bank: bank as u16,
                };
                if !removed(name, slots.remove(&key))? {
                    break;
                }
            }
        }
        {
            // Created once, written only by the programs after that (see RrCursor).
            let name = map_names::RR_CURSORS;
            match self.lb_map_mut::<u32, RrCursor>(name)?.insert(
                service_id,
                RrCursor::default(),
                BPF_NOEXIST,
            ) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(DatapathError::map(name, e)),
            }
        }
        let name = map_names::BACKEND_SETS;
        self.lb_map_mut::<u32, BackendSet>(name)?
            .insert(service_id, BackendSet { count, bank }, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// The live slots of `set`, in slot order.
    fn bank(&self, service_id: u32, set: &BackendSet) -> Result<Vec<Ipv4Addr>, DatapathError> {
        let name = map_names::BACKENDS;
        let slots = self.lb_map::<BackendKey, Backend>(name)?;
        let mut out = Vec::with_capacity(set.count as usize);
        for slot in 0..set.count.min(BACKENDS_PER_SET_MAX) {
            let key = BackendKey {
                service_id,
                slot: slot as u16,
                bank: set.bank as u16,
            };
            match get(name, &slots, &key)? {
                Some(backend) => out.push(Ipv4Addr::from(backend.ip)),
                // Only a set written by something else than set_backends can have a hole.
                None => break,
            }
        }
        Ok(out)
    }

    /// The backends new connections of set `service_id` go to, in round-robin order (empty if
    /// the set does not exist).
    pub fn backends(&self, service_id: u32) -> Result<Vec<Ipv4Addr>, DatapathError> {
        let name = map_names::BACKEND_SETS;
        match get(name, &self.lb_map::<u32, BackendSet>(name)?, &service_id)? {
            Some(set) => self.bank(service_id, &set),
            None => Ok(Vec::new()),
        }
    }

    /// Every backend set with its live backends, sorted by id (for a reconciler's diff).
    pub fn backend_sets(&self) -> Result<Vec<(u32, Vec<Ipv4Addr>)>, DatapathError> {
        let name = map_names::BACKEND_SETS;
        let mut sets = list(name, &self.lb_map::<u32, BackendSet>(name)?)?;
        sets.sort_by_key(|(id, _)| *id);
        sets.dedup_by_key(|(id, _)| *id);
        sets.into_iter()
            .map(|(id, set)| Ok((id, self.bank(id, &set)?)))
            .collect()
    }

    /// Removes backend set `service_id` entirely (set, both banks of slots, round-robin
    /// cursor); returns whether it existed. New connections through VIPs or ports still
    /// pointing at it are dropped as `no_backend`; existing ones continue.
    pub fn remove_backends(&mut self, service_id: u32) -> Result<bool, DatapathError> {
        // The set first: once it is gone no program reads the slots or the cursor.
        let existed = {
            let name = map_names::BACKEND_SETS;
            let mut sets = self.lb_map_mut::<u32, BackendSet>(name)?;
            removed(name, sets.remove(&service_id))?
        };
        {
            let name = map_names::BACKENDS;
            let mut slots = self.lb_map_mut::<BackendKey, Backend>(name)?;
            for bank in 0..2u16 {
                for slot in 0..BACKENDS_PER_SET_MAX {
                    let key = BackendKey {
                        service_id,
                        slot: slot as u16,
                        bank,
                    };
                    if !removed(name, slots.remove(&key))? {
                        break;
                    }
                }
            }
        }
        let name = map_names::RR_CURSORS;
        let mut cursors = self.lb_map_mut::<u32, RrCursor>(name)?;
        let cursor = removed(name, cursors.remove(&service_id))?;
        Ok(existed || cursor)
    }

    /// How many backends set `service_id` has handed out so far (its round-robin cursor), if
    /// it has one. The next new connection gets slot `cursor % count`.
    pub fn rr_cursor(&self, service_id: u32) -> Result<Option<u64>, DatapathError> {
        let name = map_names::RR_CURSORS;
        Ok(get(name, &self.lb_map::<u32, RrCursor>(name)?, &service_id)?.map(|c| c.next))
    }

    /// Publishes `port`/`proto` on the node address ([`crate::LbConfig::node_ip`]): new
    /// connections to it are balanced over set `info.service_id`, to `info.target_port` on the
    /// backends, keeping the client's address. Rejects port 0, target port 0 and set id 0.
    ///
    /// The port is taken from the node's own stack: whatever listens on it on the node
    /// address (the VXLAN port 4789/udp included!) stops receiving. The agent must refuse to
    /// publish the VXLAN port.
    pub fn upsert_published(
        &mut self,
        port: u16,
        proto: L4Proto,
        info: &PublishedInfo,
    ) -> Result<(), DatapathError> {
        let what = format!("published port {port}/{}", proto.name());
        if port == 0 {
            return Err(invalid(&what, "port 0"));
        }
        if info.target() == 0 {
            return Err(invalid(&what, "target port 0"));
        }
        check_set_id(&what, info.service_id)?;
        let info = PublishedInfo {
            _pad: [0; 2],
            ..*info
        };
        let name = map_names::PUBLISHED;
        self.lb_map_mut::<PublishedKey, PublishedInfo>(name)?
            .insert(PublishedKey::new(port, proto), info, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Unpublishes `port`/`proto`; returns whether it was published. From the next packet on
    /// the port belongs to the node's stack again (which answers a TCP SYN with a RST), and
    /// established connections through it stop.
    pub fn remove_published(&mut self, port: u16, proto: L4Proto) -> Result<bool, DatapathError> {
        let name = map_names::PUBLISHED;
        let mut map = self.lb_map_mut::<PublishedKey, PublishedInfo>(name)?;
        removed(name, map.remove(&PublishedKey::new(port, proto)))
    }

    /// Every published port as (port, protocol, info), sorted by port then protocol.
    pub fn published(&self) -> Result<Vec<(u16, L4Proto, PublishedInfo)>, DatapathError> {
        let name = map_names::PUBLISHED;
        let mut all: Vec<_> = list(name, &self.lb_map::<PublishedKey, PublishedInfo>(name)?)?
            .into_iter()
            .filter_map(|(key, info)| {
                L4Proto::from_number(key.proto).map(|p| (u16::from_be_bytes(key.port), p, info))
            })
            .collect();
        all.sort_by_key(|(port, proto, _)| (*port, *proto));
        all.dedup_by_key(|(port, proto, _)| (*port, *proto));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_key_is_network_order() {
        let key = PublishedKey::new(8080, L4Proto::Udp);
        assert_eq!(key.port, [0x1f, 0x90]);
        assert_eq!(key.proto, 17);
        let info = PublishedInfo::new(3, 80);
        assert_eq!(info.target_port, [0, 80]);
        assert_eq!(info.target(), 80);
    }

    #[test]
    fn unicast_check() {
        assert!(is_unicast(Ipv4Addr::new(10, 0, 0, 2)));
        for ip in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(224, 0, 0, 5),
        ] {
            assert!(!is_unicast(ip), "{ip}");
        }
    }
}
