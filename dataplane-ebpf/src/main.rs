//! The netagent eBPF datapath (built for `bpfel-unknown-none` by `agent/datapath/build.rs`).
//!
//! Layout follows Cilium's split: one module per attachment point (`from_container`,
//! `from_overlay`, `from_uplink`) and small shared modules for header parsing (`eth`, `arp`,
//! `ipv4`, `l4`), map definitions (`maps`), packet exits (`forward`, `tunnel`, `vxlan`), the load
//! balancer (`lb`, `conntrack`, `nat`, `atomic`), egress (`egress`) and drop accounting (`drop`). `test_hooks` holds programs that exist only for tests. Each program is a thin
//! `#[classifier]` entry point around a `try_*(ctx) -> Result<i32, DropReason>` function, so
//! every early exit with a reason ends in the one place that counts and reports it.
// Only the BPF target gets the freestanding setup. On the host the binary compiles as an
// ordinary (useless) program so `cargo clippy/build/test --workspace` need no exclusions.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `asm!` on the BPF target (the atomic fetch-and-add in `atomic`, see there for why).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod arp;
mod atomic;
mod conntrack;
mod csum;
mod drop;
mod egress;
mod eth;
mod forward;
mod from_container;
mod from_overlay;
mod from_uplink;
mod ipv4;
mod l4;
mod lb;
mod maps;
mod nat;
mod reset;
mod stats;
mod test_hooks;
mod tunnel;
mod verdict;
mod vxlan;

/// eBPF programs cannot unwind or print; the verifier rejects any path that could reach here
/// (it ends in an infinite loop), so a panic in the source shows up as a load failure.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel only grants GPL-only helpers to programs whose license string it recognises as
/// GPL compatible; "Dual MIT/GPL" is on its list and matches the spirit of the workspace's
/// permissive license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("the dataplane programs only run in the kernel; build for bpfel-unknown-none");
    std::process::exit(2);
}
