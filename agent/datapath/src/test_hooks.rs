//! Accessors for the test-hook programs and their maps (see `program_names::FROM_*_TEST`).
//! They exist for `BPF_PROG_TEST_RUN` tests and benchmarks; the agent never attaches them.

use aya::{
    maps::{Array, MapData},
    programs::SchedClassifier,
};
use dataplane_common::{TestInput, TestObservation, map_names, program_names};

use crate::{Datapath, DatapathError};

impl Datapath {
    /// `from_container` plus a record of the skb's tunnel key and packet type after the
    /// decision, readable with [`Datapath::test_observation`].
    pub fn from_container_test(&self) -> Result<&SchedClassifier, DatapathError> {
        self.classifier(program_names::FROM_CONTAINER_TEST)
    }

    /// `from_overlay`'s decision for a packet received with the VNI set by
    /// [`Datapath::set_test_vni`]; records like [`Datapath::from_container_test`].
    pub fn from_overlay_test(&self) -> Result<&SchedClassifier, DatapathError> {
        self.classifier(program_names::FROM_OVERLAY_TEST)
    }

    /// Sets the VNI `from_overlay_test` pretends packets arrived with.
    pub fn set_test_vni(&mut self, vni: u32) -> Result<(), DatapathError> {
        let name = map_names::TEST_INPUT;
        let mut map: Array<&mut MapData, TestInput> =
            Array::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        map.set(0, TestInput { vni }, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// What the last test-hook run observed.
    pub fn test_observation(&self) -> Result<TestObservation, DatapathError> {
        let name = map_names::TEST_OBSERVED;
        let map: Array<&MapData, TestObservation> =
            Array::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))?;
        map.get(&0, 0).map_err(|e| DatapathError::map(name, e))
    }
}
