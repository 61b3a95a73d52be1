//! `cargo xtask bench NAME`: setup, build, then run benchmark NAME from the
//! `benches` crate (DESIGN.md section 9) with its output on the terminal.

use std::env;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{cargo, setup};

/// The benchmarks `benches` knows; `cargo xtask bench` accepts only these.
pub const NAMES: &[&str] = &["overlay"];

/// A whole benchmark takes a few minutes; this only catches a hang (every
/// tool run inside it is bounded on its own).
const BENCH_TIMEOUT: Duration = Duration::from_secs(15 * 60);

pub fn run(name: &str, extra: &[String]) -> Result<ExitCode> {
    setup::run()?;
    // The whole workspace: the bench drives the netagent and netctl built
    // here (same profile as xtask, so debug by default; the eBPF programs
    // are release builds either way).
    cargo::build(&[])?;
    // Next to xtask's own binary, as the lab finds netagent and netctl.
    let exe = env::current_exe().context("locating the xtask binary")?;
    let bin = exe
        .parent()
        .context("the xtask binary has no directory")?
        .join("benches");
    let mut c = Command::new(&bin);
    c.arg(name).args(extra);
    println!("$ {}", netlab::describe(&c));
    let status = netlab::run_inherit(&mut c, BENCH_TIMEOUT)?;
    Ok(match status.success() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}
