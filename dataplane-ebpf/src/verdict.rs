//! tc verdicts as the `i32` a classifier returns.
//!
//! The generated bindings give these constants different integer types depending on the
//! architecture the bindings were generated for (`u32` for the BPF target, `i32` on some
//! hosts), so the casts are needed on one side and redundant on the other.
#![allow(clippy::unnecessary_cast)]

use aya_ebpf::bindings;

/// Continue to the stack (TCX: `TCX_PASS`): what `from_uplink` answers for everything that
/// is not a published port.
pub const TC_ACT_OK: i32 = bindings::TC_ACT_OK as i32;
/// Drop (TCX: `TCX_DROP`).
pub const TC_ACT_SHOT: i32 = bindings::TC_ACT_SHOT as i32;
/// The packet was redirected by `bpf_redirect*` (TCX: `TCX_REDIRECT`).
pub const TC_ACT_REDIRECT: i32 = bindings::TC_ACT_REDIRECT as i32;
