//! tc verdicts as the `i32` a classifier returns.
//!
//! The generated bindings give these constants different integer types depending on the
//! architecture the bindings were generated for (`u32` for the BPF target, `i32` on some
//! hosts), so the casts are needed on one side and redundant on the other.
#![allow(clippy::unnecessary_cast)]

use aya_ebpf::bindings;
use dataplane_common::DropReason;

/// Continue to the stack (TCX: `TCX_PASS`): what `from_uplink` answers for everything that
/// is not a published port.
pub const TC_ACT_OK: i32 = bindings::TC_ACT_OK as i32;
/// Drop (TCX: `TCX_DROP`).
pub const TC_ACT_SHOT: i32 = bindings::TC_ACT_SHOT as i32;
/// The packet was redirected by `bpf_redirect*` (TCX: `TCX_REDIRECT`).
pub const TC_ACT_REDIRECT: i32 = bindings::TC_ACT_REDIRECT as i32;

/// What a BPF-to-BPF subprogram returns: a `Result<i32, DropReason>` in one register.
///
/// A subprogram returning the `Result` itself gets it packed by LLVM into `r0` with whatever
/// the unused half of the register held, once a stack pointer, and the verifier refuses to
/// let a stack pointer reach the caller. Verdicts (and the callers' sentinels, -1) are kept
/// as they are; a drop reason becomes `-(2^32 + code)`, out of `i32`'s range.
///
/// Only [`Packed::pack`] makes one, so [`Packed::unpack`] always sees a real code.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct Packed(i64);

const ERR_BASE: i64 = 1 << 32;

impl Packed {
    #[inline(always)]
    pub fn pack(result: Result<i32, DropReason>) -> Packed {
        Packed(match result {
            Ok(verdict) => verdict as i64,
            Err(reason) => -(ERR_BASE + reason as u32 as i64),
        })
    }

    #[inline(always)]
    pub fn unpack(self) -> Result<i32, DropReason> {
        if self.0 >= i32::MIN as i64 {
            return Ok(self.0 as i32);
        }
        let code = (-self.0 - ERR_BASE) as u32;
        // SAFETY: `pack` is the only way to build a `Packed`, and it stores the discriminant
        // of a `DropReason` (`repr(u32)`) here.
        Err(unsafe { core::mem::transmute::<u32, DropReason>(code) })
    }
}

/// Declares `$name`, an always-inlined function that calls `$body` through a BPF-to-BPF
/// subprogram returning [`Packed`]: `$body`'s locals get a stack frame of their own, and the
/// `Result` crosses the call as one well-defined register.
macro_rules! subprogram {
    ($(#[$meta:meta])* $vis:vis fn $name:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$meta])*
        #[inline(always)]
        $vis fn $name($($arg: $ty),*) -> Result<i32, dataplane_common::DropReason> {
            #[inline(never)]
            fn frame($($arg: $ty),*) -> $crate::verdict::Packed {
                $crate::verdict::Packed::pack($body($($arg),*))
            }
            frame($($arg),*).unpack()
        }
    };
}
pub(crate) use subprogram;
