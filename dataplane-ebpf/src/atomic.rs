//! The one atomic read-modify-write the datapath needs: fetch-and-add on a map value.
//!
//! Why inline assembly: `core::sync::atomic` has no `fetch_add` on `bpfel-unknown-none` (the
//! target spec says `atomic-cas: false`, so `target_has_atomic` is unset and only loads and
//! stores exist), and the `atomic_xadd` intrinsic is rejected by LLVM for the target's
//! default CPU (`generic` = v1: "Invalid usage of the XADD return value"); only `-C
//! target-cpu=v3` or `+alu32` lets LLVM emit the fetch form, and aya-build owns the
//! RUSTFLAGS of the eBPF build. The kernel does not care about LLVM's CPU levels: the
//! instruction below (`BPF_STX | BPF_DW | BPF_ATOMIC` with `imm = BPF_ADD | BPF_FETCH`,
//! opcode 0xdb imm 0x01) is accepted since Linux 5.12 and JITs to `lock xadd` on x86-64.

/// Atomically adds `value` to `*ptr` and returns the previous value (sequentially
/// consistent: BPF_FETCH atomics are full barriers).
///
/// # Safety
///
/// `ptr` must be an 8-byte aligned pointer to a `u64` the verifier lets the program write
/// atomically (a map value; hash and array map values are 8-byte aligned).
#[inline(always)]
pub unsafe fn fetch_add(ptr: *mut u64, value: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    {
        let mut v = value;
        // SAFETY: the caller guarantees `ptr`; the instruction reads and writes only `*ptr`
        // and `v`. No `nomem`: the compiler must treat it as a memory access.
        unsafe {
            core::arch::asm!(
                "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
                p = in(reg) ptr,
                v = inout(reg) v,
                options(nostack),
            );
        }
        v
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        // Host builds (clippy, `cargo check --workspace`) never run this; keep it meaningful.
        // SAFETY: the caller guarantees an aligned, valid u64.
        unsafe { core::sync::atomic::AtomicU64::from_ptr(ptr) }
            .fetch_add(value, core::sync::atomic::Ordering::SeqCst)
    }
}
