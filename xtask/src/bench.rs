//! `cargo xtask bench NAME`: setup, build, then run benchmark NAME from the
//! `benches` crate (DESIGN.md section 9) with its output on the terminal.
//!
//! The benchmarks drive the netagent and netctl built with xtask's own
//! profile, except those whose measured path is netagent's user-space code
//! (DNS): they get a release netagent whatever xtask's profile, since an
//! unoptimised resolver against dnsmasq's optimised C measures the compiler
//! settings, not the design.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{cargo, setup};

/// The benchmarks `benches` knows; `cargo xtask bench` accepts only these.
pub const NAMES: &[&str] = &["overlay", "encrypted", "dns", "lb", "egress", "scale"];

/// A whole benchmark takes a few minutes; this only catches a hang (every
/// tool run inside it is bounded on its own).
const BENCH_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The scale benchmark starts ten thousand tasks.
const SCALE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

pub fn run(name: &str, extra: &[String]) -> Result<ExitCode> {
    setup::run()?;
    // The whole workspace: the bench drives the netagent and netctl built
    // here (same profile as xtask, so debug by default; the eBPF programs
    // are release builds either way).
    cargo::build(&[])?;
    // Next to xtask's own binary, as the lab finds netagent and netctl.
    let exe = env::current_exe().context("locating the xtask binary")?;
    let dir = exe.parent().context("the xtask binary has no directory")?;
    let mut c = Command::new(dir.join("benches"));
    c.arg(name).args(extra);
    let mut shown = String::new();
    // Every benchmark runs netagent as users do, a release build: those that measure its own
    // code (resolver, WireGuard, control plane) need it, and the datapath ones too, since the
    // agents share the CPUs being measured and a debug agent's periodic work (leases,
    // reconcile passes, view saves) costs several times a release one's. A NETAGENT_BIN the
    // caller set wins (netlab reads it too).
    if env::var_os("NETAGENT_BIN").is_none() {
        let agent = release_agent(dir)?;
        shown = format!("NETAGENT_BIN={} ", agent.display());
        c.env("NETAGENT_BIN", agent);
    }
    println!("$ {shown}{}", netlab::describe(&c));
    let status = netlab::run_inherit(
        &mut c,
        match name {
            "scale" => SCALE_TIMEOUT,
            _ => BENCH_TIMEOUT,
        },
    )?;
    Ok(match status.success() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// A release netagent, built if xtask is a debug build (a release xtask's
/// workspace build above already is one). netctl stays as built: it only
/// sets the lab up, it is not in the measured path.
fn release_agent(profile_dir: &Path) -> Result<PathBuf> {
    if cfg!(debug_assertions) {
        let args = ["build", "--release", "-p", "netagent"];
        let status = cargo::run(&args, cargo::BUILD_TIMEOUT)?;
        if !status.success() {
            bail!("`cargo {}` failed ({status})", args.join(" "));
        }
    }
    let target = profile_dir
        .parent()
        .context("the xtask binary is not in target/<profile>")?;
    Ok(target.join("release").join("netagent"))
}
