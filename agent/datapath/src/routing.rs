//! Typed access to the routing maps: ENDPOINTS (every endpoint the node routes to or from)
//! and NETWORKS (overlay subnets).
//!
//! Writes are single-entry map updates, each atomic for the programs: a packet sees either
//! the old or the new entry, never a mix. The agent reconciles by upserting what is missing
//! or different and removing what should not be there; it never needs to clear a map, so
//! forwarding continues undisturbed during a resync (and across restarts, the maps being
//! pinned).

use std::{io, net::Ipv4Addr};

use aya::maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key};
use dataplane_common::{
    ENDPOINT_F_ALL, ENDPOINT_F_LOCAL, EndpointInfo, EndpointKey, NETWORK_F_ALL, NODE_F_ALL,
    NetworkInfo, NodeInfo, NodeKey, VNI_MAX, map_names,
};

use crate::{Datapath, DatapathError};

/// An IPv4 subnet as (network address, prefix length), e.g. `(10.10.1.0, 24)`.
pub type Subnet = (Ipv4Addr, u8);

fn invalid(what: impl std::fmt::Display, why: impl std::fmt::Display) -> DatapathError {
    DatapathError::InvalidEntry(format!("{what}: {why}"))
}

fn check_vni(what: &dyn std::fmt::Display, vni: u32) -> Result<(), DatapathError> {
    if vni == 0 || vni > VNI_MAX {
        return Err(invalid(
            what,
            format_args!("VNI {vni} is outside 1..={VNI_MAX}"),
        ));
    }
    Ok(())
}

fn check_endpoint_ip(ip: Ipv4Addr) -> Result<(), DatapathError> {
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(invalid(
            format_args!("endpoint {ip}"),
            "not a unicast address",
        ));
    }
    Ok(())
}

fn check_endpoint(ip: Ipv4Addr, info: &EndpointInfo) -> Result<(), DatapathError> {
    check_endpoint_ip(ip)?;
    let what = format!("endpoint {ip}");
    check_vni(&what, info.vni)?;
    let local = info.ifindex != 0;
    let remote = info.node_ip != 0;
    if local == remote {
        return Err(invalid(
            what,
            "exactly one of ifindex (local endpoint) and node_ip (remote endpoint) must be set",
        ));
    }
    if remote {
        let node = info.node_addr();
        if node.is_broadcast() || node.is_multicast() || node.is_loopback() {
            return Err(invalid(
                what,
                format_args!("node address {node} is not unicast"),
            ));
        }
    }
    if (info.flags & ENDPOINT_F_LOCAL != 0) != local {
        return Err(invalid(
            what,
            "ENDPOINT_F_LOCAL must be set exactly when ifindex is (use EndpointInfo::local/remote)",
        ));
    }
    if info.mac == [0; 6] || info.mac[0] & 1 != 0 {
        return Err(invalid(
            what,
            format_args!("MAC {:02x?} is not a unicast address", info.mac),
        ));
    }
    if info.flags & !ENDPOINT_F_ALL != 0 {
        return Err(invalid(
            what,
            format_args!("unknown flags {:#x}", info.flags & !ENDPOINT_F_ALL),
        ));
    }
    Ok(())
}

/// The trie key of `subnet`, which must be in canonical form (no host bits), because the trie
/// stores the address as given: 10.0.0.5/24 would replace 10.0.0.0/24 but list as 10.0.0.5.
fn subnet_key((addr, len): Subnet) -> Result<Key<[u8; 4]>, DatapathError> {
    if len > 32 {
        return Err(invalid(
            format_args!("subnet {addr}/{len}"),
            "prefix length above 32",
        ));
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    if u32::from(addr) & !mask != 0 {
        return Err(invalid(
            format_args!("subnet {addr}/{len}"),
            format_args!(
                "host bits set (did you mean {}/{len}?)",
                Ipv4Addr::from(u32::from(addr) & mask)
            ),
        ));
    }
    Ok(Key::new(u32::from(len), addr.octets()))
}

/// `remove` on a missing key is ENOENT from the kernel: "was not there", not a failure.
fn removed(name: &'static str, result: Result<(), MapError>) -> Result<bool, DatapathError> {
    match result {
        Ok(()) => Ok(true),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(DatapathError::map(name, e)),
    }
}

impl Datapath {
    fn endpoints_map(&self) -> Result<HashMap<&MapData, EndpointKey, EndpointInfo>, DatapathError> {
        let name = map_names::ENDPOINTS;
        HashMap::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))
    }

    fn endpoints_map_mut(
        &mut self,
    ) -> Result<HashMap<&mut MapData, EndpointKey, EndpointInfo>, DatapathError> {
        let name = map_names::ENDPOINTS;
        HashMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))
    }

    fn networks_map(&self) -> Result<LpmTrie<&MapData, [u8; 4], NetworkInfo>, DatapathError> {
        let name = map_names::NETWORKS;
        LpmTrie::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))
    }

    fn networks_map_mut(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, [u8; 4], NetworkInfo>, DatapathError> {
        let name = map_names::NETWORKS;
        LpmTrie::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))
    }

    /// Installs or replaces the endpoint with address `ip`: local
    /// ([`EndpointInfo::local`]: VNI, host-side veth ifindex, MAC) or remote
    /// ([`EndpointInfo::remote`]: VNI, node address, MAC). Rejects entries the programs could
    /// not use (VNI 0 or above 24 bits, both or neither of ifindex/node_ip, non-unicast
    /// addresses or MAC, unknown flags) with [`DatapathError::InvalidEntry`].
    pub fn upsert_endpoint(
        &mut self,
        ip: Ipv4Addr,
        info: &EndpointInfo,
    ) -> Result<(), DatapathError> {
        check_endpoint(ip, info)?;
        self.endpoints_map_mut()?
            .insert(ip.octets(), *info, 0)
            .map_err(|e| DatapathError::map(map_names::ENDPOINTS, e))
    }

    /// Removes the endpoint with address `ip`; returns whether it was there.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<bool, DatapathError> {
        let mut map = self.endpoints_map_mut()?;
        removed(map_names::ENDPOINTS, map.remove(&ip.octets()))
    }

    /// The endpoint with address `ip`, if installed.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<EndpointInfo>, DatapathError> {
        match self.endpoints_map()?.get(&ip.octets(), 0) {
            Ok(info) => Ok(Some(info)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(DatapathError::map(map_names::ENDPOINTS, e)),
        }
    }

    /// Every installed endpoint, sorted by address (the map's own order is arbitrary).
    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>, DatapathError> {
        let map = self.endpoints_map()?;
        let mut all = map
            .iter()
            .map(|entry| entry.map(|(ip, info)| (Ipv4Addr::from(ip), info)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DatapathError::map(map_names::ENDPOINTS, e))?;
        all.sort_by_key(|(ip, _)| *ip);
        // The kernel restarts a hash walk from the first key when the current one is deleted
        // under it; with a concurrent writer a key could be listed twice.
        all.dedup_by_key(|(ip, _)| *ip);
        Ok(all)
    }

    /// Installs or replaces the overlay network with `subnet` (canonical: no host bits, see
    /// [`DatapathError::InvalidEntry`]). `info.flags` may carry [`NETWORK_F_ENCRYPTED`].
    pub fn upsert_network(
        &mut self,
        subnet: Subnet,
        info: &NetworkInfo,
    ) -> Result<(), DatapathError> {
        let key = subnet_key(subnet)?;
        let what = format!("network {}/{}", subnet.0, subnet.1);
        check_vni(&what, info.vni)?;
        if info.flags & !NETWORK_F_ALL != 0 {
            return Err(invalid(
                what,
                format_args!("unknown flags {:#x}", info.flags & !NETWORK_F_ALL),
            ));
        }
        self.networks_map_mut()?
            .insert(&key, *info, 0)
            .map_err(|e| DatapathError::map(map_names::NETWORKS, e))
    }

    /// Removes the network with exactly `subnet`; returns whether it was there.
    pub fn remove_network(&mut self, subnet: Subnet) -> Result<bool, DatapathError> {
        let key = subnet_key(subnet)?;
        let mut map = self.networks_map_mut()?;
        removed(map_names::NETWORKS, map.remove(&key))
    }

    /// Every installed network, sorted by subnet. (Walking an LPM trie's keys is supported
    /// by the kernel since 4.16 and by aya 0.14, so no shadow copy is kept.)
    pub fn networks(&self) -> Result<Vec<(Subnet, NetworkInfo)>, DatapathError> {
        let map = self.networks_map()?;
        let mut all = map
            .iter()
            .map(|entry| {
                entry.map(|(key, info)| {
                    // prefix_len <= 32 is guaranteed by the trie (max_prefixlen = 32 bits).
                    let len = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
                    ((Ipv4Addr::from(key.data()), len), info)
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DatapathError::map(map_names::NETWORKS, e))?;
        all.sort_by_key(|(subnet, _)| *subnet);
        Ok(all)
    }
}

impl Datapath {
    fn nodes_map(&self) -> Result<HashMap<&MapData, NodeKey, NodeInfo>, DatapathError> {
        let name = map_names::NODES;
        HashMap::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))
    }

    /// Installs or replaces the node with advertise address `addr`: overlay packets from it
    /// are accepted.
    pub fn upsert_node(&mut self, addr: Ipv4Addr, info: &NodeInfo) -> Result<(), DatapathError> {
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(invalid(
                format_args!("node {addr}"),
                "not a unicast address",
            ));
        }
        if info.flags & !NODE_F_ALL != 0 {
            return Err(invalid(
                format_args!("node {addr}"),
                format_args!("unknown flags {:#x}", info.flags & !NODE_F_ALL),
            ));
        }
        let name = map_names::NODES;
        let mut map: HashMap<&mut MapData, NodeKey, NodeInfo> =
            HashMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        map.insert(addr.octets(), *info, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Removes the node with address `addr`; returns whether it was there.
    pub fn remove_node(&mut self, addr: Ipv4Addr) -> Result<bool, DatapathError> {
        let name = map_names::NODES;
        let mut map: HashMap<&mut MapData, NodeKey, NodeInfo> =
            HashMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        removed(name, map.remove(&addr.octets()))
    }

    /// Every installed node, sorted by address.
    pub fn nodes(&self) -> Result<Vec<(Ipv4Addr, NodeInfo)>, DatapathError> {
        let map = self.nodes_map()?;
        let mut all = map
            .iter()
            .map(|entry| entry.map(|(ip, info)| (Ipv4Addr::from(ip), info)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DatapathError::map(map_names::NODES, e))?;
        all.sort_by_key(|(ip, _)| *ip);
        all.dedup_by_key(|(ip, _)| *ip);
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x42, 0, 0, 0, 1];
    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    #[test]
    fn endpoint_validation() {
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        assert!(check_endpoint(ip, &EndpointInfo::local(7, 3, MAC)).is_ok());
        assert!(check_endpoint(ip, &EndpointInfo::remote(7, NODE, MAC)).is_ok());

        let bad = [
            (ip, EndpointInfo::local(0, 3, MAC)),
            (ip, EndpointInfo::local(VNI_MAX + 1, 3, MAC)),
            (ip, EndpointInfo::local(7, 0, MAC)),
            (
                ip,
                EndpointInfo {
                    node_ip: dataplane_common::node_ip_to_abi(NODE),
                    ..EndpointInfo::local(7, 3, MAC)
                },
            ),
            (
                ip,
                EndpointInfo::remote(7, Ipv4Addr::new(224, 0, 0, 1), MAC),
            ),
            (ip, EndpointInfo::local(7, 3, [0; 6])),
            (ip, EndpointInfo::local(7, 3, [0x01, 0, 0x5e, 0, 0, 1])),
            (
                ip,
                // Local without ENDPOINT_F_LOCAL.
                EndpointInfo {
                    flags: 0,
                    ..EndpointInfo::local(7, 3, MAC)
                },
            ),
            (
                ip,
                EndpointInfo {
                    flags: ENDPOINT_F_LOCAL,
                    ..EndpointInfo::remote(7, NODE, MAC)
                },
            ),
            (
                ip,
                EndpointInfo {
                    flags: 0x80,
                    ..EndpointInfo::remote(7, NODE, MAC)
                },
            ),
            (Ipv4Addr::UNSPECIFIED, EndpointInfo::local(7, 3, MAC)),
            (Ipv4Addr::BROADCAST, EndpointInfo::local(7, 3, MAC)),
            (Ipv4Addr::new(239, 1, 1, 1), EndpointInfo::local(7, 3, MAC)),
        ];
        for (ip, info) in bad {
            let err = check_endpoint(ip, &info).expect_err("must be rejected");
            assert!(matches!(err, DatapathError::InvalidEntry(_)), "{err}");
        }
    }

    #[test]
    fn subnet_keys_are_canonical() {
        let key = subnet_key((Ipv4Addr::new(10, 10, 1, 0), 24)).expect("valid");
        assert_eq!((key.prefix_len(), key.data()), (24, [10, 10, 1, 0]));
        assert!(subnet_key((Ipv4Addr::UNSPECIFIED, 0)).is_ok());
        assert!(subnet_key((Ipv4Addr::new(10, 0, 0, 7), 32)).is_ok());
        let Err(err) = subnet_key((Ipv4Addr::new(10, 10, 1, 5), 24)) else {
            panic!("host bits must be rejected");
        };
        assert!(err.to_string().contains("10.10.1.0/24"), "{err}");
        assert!(subnet_key((Ipv4Addr::new(10, 0, 0, 0), 33)).is_err());
    }
}
