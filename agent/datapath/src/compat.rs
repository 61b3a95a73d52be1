//! Pinned-map compatibility.
//!
//! aya reuses any object already pinned under a map's name without comparing it with the
//! definition in the object. After an upgrade that changed a map (value layout, size, type),
//! the new programs would then run against the old map: silently wrong reads, or a verifier
//! rejection far from the cause. So before loading we compare every pinned map with its
//! definition in the embedded object and unpin the ones that differ, letting aya create them
//! afresh. Unpinning does not free a map the still-attached old programs use, so forwarding
//! continues until the new programs replace them; only the old map's contents are lost.

use std::{fs, io, path::Path};

use aya::maps::{MapInfo, MapType};
use aya_obj::{generated::bpf_map_type, maps::PinningType};
use tracing::{debug, warn};

use crate::DatapathError;

/// What happened to each pinned map, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PinReport {
    /// Maps found pinned and compatible (their contents carry over).
    pub reused: Vec<String>,
    /// Maps found pinned but incompatible, unpinned so they are recreated empty.
    pub replaced: Vec<String>,
    /// Maps that were not pinned yet.
    pub created: Vec<String>,
}

fn expected_type(raw: u32) -> Option<MapType> {
    bpf_map_type::try_from(raw)
        .ok()
        .and_then(|t| MapType::try_from(t).ok())
}

fn mismatch(pinned: &MapInfo, want: &aya_obj::Map, max_entries: u32) -> Option<String> {
    let have_type = pinned.map_type().ok();
    let want_type = expected_type(want.map_type());
    if have_type.is_none() || have_type != want_type {
        return Some(format!("type {have_type:?}, object wants {want_type:?}"));
    }
    let fields = [
        ("key size", pinned.key_size(), want.key_size()),
        ("value size", pinned.value_size(), want.value_size()),
        ("max entries", pinned.max_entries(), max_entries),
        ("flags", pinned.map_flags(), want.map_flags()),
    ];
    fields
        .iter()
        .find(|(_, have, want)| have != want)
        .map(|(what, have, want)| format!("{what} {have}, object wants {want}"))
}

/// Unpins incompatible maps under `bpf_dir`; see the module docs.
/// `sizes` are the capacities the loader will give maps instead of the object's.
pub(crate) fn check_pins(
    bpf_dir: &Path,
    object: &[u8],
    sizes: &[(&str, u32)],
) -> Result<PinReport, DatapathError> {
    let obj = aya_obj::Object::parse(object).map_err(DatapathError::Object)?;
    let mut report = PinReport::default();
    let mut names: Vec<_> = obj.maps.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (name, map) in names {
        if map.pinning() != PinningType::ByName {
            continue;
        }
        let path = bpf_dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.created.push(name.clone());
                continue;
            }
            Err(e) => return Err(DatapathError::io("inspecting pinned map", path, e)),
        }
        // An unreadable pin (not a map, or not a BPF object at all) is not ours to delete.
        let info = MapInfo::from_pin(&path)
            .map_err(|e| DatapathError::io("reading pinned map", &path, io::Error::other(e)))?;
        let max_entries = sizes
            .iter()
            .find(|(n, _)| n == name)
            .map_or(map.max_entries(), |(_, size)| *size);
        match mismatch(&info, map, max_entries) {
            None => {
                debug!(map = %name, path = %path.display(), "reusing pinned map");
                report.reused.push(name.clone());
            }
            Some(why) => {
                warn!(
                    map = %name,
                    path = %path.display(),
                    %why,
                    "pinned map does not match the datapath being loaded; replacing it (its \
                     contents are lost)"
                );
                fs::remove_file(&path)
                    .map_err(|e| DatapathError::io("unpinning incompatible map", &path, e))?;
                report.replaced.push(name.clone());
            }
        }
    }
    Ok(report)
}
