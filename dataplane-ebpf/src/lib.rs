//! Library target of the eBPF crate.
//!
//! The programs live in the `dataplane` binary (`src/main.rs`), which is only meaningful for
//! `bpfel-unknown-none`. This empty `no_std` library exists so `agent/datapath` can list the
//! crate as a build-dependency: cargo then rebuilds the agent when the eBPF sources change
//! (the aya-template convention; aya-build adds `rerun-if-changed` for the binary side).
#![no_std]
