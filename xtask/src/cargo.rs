//! Running cargo on this workspace from inside xtask.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Result, bail};

/// A cold build of the whole workspace (agent, eBPF via aya-build, etcd
/// client) takes minutes on 2 cores; this only catches a hang.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(50 * 60);

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// `cargo` as the one that runs us (`cargo xtask` sets CARGO), in the
/// workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    c.current_dir(workspace_root());
    c
}

/// Build with the profile xtask itself was built with, so the lab finds
/// netagent and netctl next to the xtask binary.
pub fn profile_args() -> &'static [&'static str] {
    if cfg!(debug_assertions) {
        &[]
    } else {
        &["--release"]
    }
}

/// Runs `cargo ARGS...` with output to the terminal; returns its status.
pub fn run(args: &[&str], timeout: Duration) -> Result<ExitStatus> {
    let mut c = cargo();
    c.args(args).args(profile_args());
    println!("$ {}", netlab::describe(&c));
    netlab::run_inherit(&mut c, timeout)
}

/// Builds the host side of the workspace (the eBPF crate is built by
/// aya-build from the agent's build script, not for the host).
pub fn build(extra: &[&str]) -> Result<()> {
    let mut args = vec!["build", "--workspace", "--exclude", "dataplane-ebpf"];
    args.extend_from_slice(extra);
    let status = run(&args, BUILD_TIMEOUT)?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
