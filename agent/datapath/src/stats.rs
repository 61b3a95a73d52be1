//! Reading the traffic counters (FORWARDED, FLOWS), switching trace events on and off (TRACE)
//! and measuring how full each map is.

use std::os::fd::AsFd as _;

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap};
use dataplane_common::{
    FORWARD_ACTIONS, FlowStatKey, ForwardAction, Hook, TrafficCounter, map_names,
};

use crate::{Datapath, DatapathError, sys};

/// How full one map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u32,
    pub capacity: u32,
}

/// Maps whose entries come and go (arrays are always full and are left out).
const COUNTED: &[&str] = &[
    map_names::CONFIG,
    map_names::ENDPOINTS,
    map_names::NETWORKS,
    map_names::SERVICES,
    map_names::BACKEND_SETS,
    map_names::BACKENDS,
    map_names::RR_CURSORS,
    map_names::PUBLISHED,
    map_names::CONNTRACK,
    map_names::CT_NEW,
    map_names::NODES,
    map_names::FLOWS,
];

impl Datapath {
    /// Packets and bytes let through per hook and action, summed over CPUs; only non-zero
    /// ones.
    pub fn forwarded(
        &self,
    ) -> Result<Vec<(&'static str, &'static str, TrafficCounter)>, DatapathError> {
        let name = map_names::FORWARDED;
        let map: PerCpuArray<&MapData, TrafficCounter> =
            PerCpuArray::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))?;
        let mut out = Vec::new();
        for hook in Hook::ALL {
            for action in ForwardAction::ALL {
                let index = hook as u32 * FORWARD_ACTIONS + action as u32;
                let values = map
                    .get(&index, 0)
                    .map_err(|e| DatapathError::map(name, e))?;
                let sum = values
                    .iter()
                    .fold(TrafficCounter::default(), |acc, v| TrafficCounter {
                        packets: acc.packets.wrapping_add(v.packets),
                        bytes: acc.bytes.wrapping_add(v.bytes),
                    });
                if sum.packets > 0 {
                    out.push((hook.name(), action.name(), sum));
                }
            }
        }
        Ok(out)
    }

    /// Connections created per service id and backend, summed over CPUs.
    pub fn flows(&self) -> Result<Vec<(FlowStatKey, u64)>, DatapathError> {
        let name = map_names::FLOWS;
        let map: PerCpuHashMap<&MapData, FlowStatKey, u64> =
            PerCpuHashMap::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))?;
        let mut out = Vec::new();
        for item in map.iter() {
            // An entry evicted between listing its key and reading it is simply not there.
            let Ok((key, values)) = item else { continue };
            out.push((key, values.iter().fold(0u64, |a, v| a.wrapping_add(*v))));
        }
        Ok(out)
    }

    /// Entries in use and capacity of every map whose entries come and go.
    pub fn map_usage(&self) -> Result<Vec<MapUsage>, DatapathError> {
        COUNTED
            .iter()
            .map(|&name| {
                let map = self.map(name)?;
                let data = map_data(map).ok_or(DatapathError::Missing { kind: "map", name })?;
                let info = data.info().map_err(|e| DatapathError::map(name, e))?;
                let entries = sys::count_keys(data.fd().as_fd(), info.key_size())
                    .map_err(|e| DatapathError::io("counting the entries of", name, e))?;
                Ok(MapUsage {
                    name,
                    entries,
                    capacity: info.max_entries(),
                })
            })
            .collect()
    }

    /// Turns trace events on or off.
    pub fn set_trace(&mut self, on: bool) -> Result<(), DatapathError> {
        let name = map_names::TRACE;
        let mut map: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        map.set(0, u32::from(on), 0)
            .map_err(|e| DatapathError::map(name, e))
    }
}

fn map_data(map: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    Some(match map {
        Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::LpmTrie(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m) => m,
        _ => return None,
    })
}
