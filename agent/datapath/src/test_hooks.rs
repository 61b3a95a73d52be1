//! Accessors for the test-hook programs and their maps (see `program_names::FROM_*_TEST`).
//! They exist for `BPF_PROG_TEST_RUN` tests and benchmarks; the agent never attaches them.

use std::net::Ipv4Addr;

use aya::{
    maps::{Array, MapData},
    programs::SchedClassifier,
};
use dataplane_common::{TestInput, TestObservation, map_names, program_names};

use crate::{Datapath, DatapathError};

impl Datapath {
    /// Loads (verifies) the test-hook programs, which [`Datapath::load`] leaves out: a node
    /// never runs them. Idempotent.
    pub fn load_test_hooks(&mut self) -> Result<(), DatapathError> {
        for &name in program_names::TEST_HOOKS {
            let prog = self.classifier_mut(name)?;
            if prog.fd().is_ok() {
                continue;
            }
            prog.load().map_err(|e| DatapathError::program(name, e))?;
        }
        Ok(())
    }

    /// `from_container` plus a record of the skb's tunnel key and packet type after the
    /// decision, readable with [`Datapath::test_observation`].
    pub fn from_container_test(&self) -> Result<&SchedClassifier, DatapathError> {
        self.classifier(program_names::FROM_CONTAINER_TEST)
    }

    /// `from_overlay`'s decision for a packet received with the VNI set by
    /// [`Datapath::set_test_tunnel`]; records like [`Datapath::from_container_test`].
    pub fn from_overlay_test(&self) -> Result<&SchedClassifier, DatapathError> {
        self.classifier(program_names::FROM_OVERLAY_TEST)
    }

    /// Sets the VNI and the sending node (outer source) `from_overlay_test` pretends packets
    /// arrived with. The node must be in NODES (see [`Datapath::upsert_node`]) for packets to
    /// be accepted.
    pub fn set_test_tunnel(
        &mut self,
        vni: u32,
        remote_node: Ipv4Addr,
    ) -> Result<(), DatapathError> {
        self.set_test_tunnel_via(vni, remote_node, false)
    }

    /// [`Datapath::set_test_tunnel`], as received on the plain VXLAN device or
    /// (`encrypted`) on the one fed by the WireGuard tunnel.
    pub fn set_test_tunnel_via(
        &mut self,
        vni: u32,
        remote_node: Ipv4Addr,
        encrypted: bool,
    ) -> Result<(), DatapathError> {
        let name = map_names::TEST_INPUT;
        let mut map: Array<&mut MapData, TestInput> =
            Array::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        let input = TestInput {
            vni,
            remote_node: remote_node.octets(),
            encrypted: u32::from(encrypted),
        };
        map.set(0, input, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// `from_uplink` plus the TEST_OBSERVED record, like [`Datapath::from_container_test`].
    pub fn from_uplink_test(&self) -> Result<&SchedClassifier, DatapathError> {
        self.classifier(program_names::FROM_UPLINK_TEST)
    }

    /// What the last test-hook run observed.
    pub fn test_observation(&self) -> Result<TestObservation, DatapathError> {
        let name = map_names::TEST_OBSERVED;
        let map: Array<&MapData, TestObservation> =
            Array::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))?;
        map.get(&0, 0).map_err(|e| DatapathError::map(name, e))
    }
}
