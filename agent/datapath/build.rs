//! Builds the eBPF object (`dataplane-ebpf`, bin `dataplane`) for `bpfel-unknown-none` with the
//! pinned nightly and drops it into OUT_DIR, where `src/lib.rs` embeds it.
//!
//! aya-build runs `rustup run <toolchain> cargo build --package dataplane-ebpf --bins --release
//! --target bpfel-unknown-none -Z build-std=core` inside this workspace, so the whole workspace
//! manifest must parse for this to work. Set `AYA_BUILD_SKIP=1` to skip it (e.g. for
//! `cargo doc`); the embedded object is then empty and `Datapath::load` fails at run time.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

/// The nightly that builds the eBPF side (LLVM 22 to match bpf-linker 0.13 `--features llvm-22`).
/// Userspace stays on stable.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
const EBPF_PACKAGE: &str = "dataplane-ebpf";
const EBPF_BIN: &str = "dataplane";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    // Located relative to this crate rather than through cargo_metadata: the layout is fixed
    // by the workspace and this avoids a second `cargo metadata` run per build.
    let ebpf_dir = manifest_dir.join("../../dataplane-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", ebpf_dir.display()))?;

    // aya-build forwards every stderr line of the inner cargo as a `cargo:warning`, so each
    // eBPF rebuild would print ~40 "Compiling ..." warnings. Quiet only drops those status
    // lines: compiler diagnostics arrive as JSON on stdout and cargo errors are still printed.
    // SAFETY: build scripts are single threaded here; nothing reads the environment
    // concurrently.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };

    // root_dir covers dataplane-ebpf/common too (aya-build emits rerun-if-changed for it).
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the eBPF object (needs the pinned nightly with rust-src and bpf-linker)")?;

    // With AYA_BUILD_SKIP aya-build produces nothing; leave an empty file so include_bytes!
    // still compiles and loading reports a clear error instead.
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?)
        .join(EBPF_BIN);
    if !out.exists() {
        fs::write(&out, []).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
