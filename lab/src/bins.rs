//! Locating the netagent and netctl binaries the lab runs.

use std::env;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Finds binary `name`: an explicit path if given, else the path in env var
/// `env_var`, else next to the current executable. Tests run from
/// target/<profile>/deps and xtask from target/<profile>, so the search
/// looks in the executable's directory and, from `deps`, one level up.
pub fn find(name: &str, env_var: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return existing(p.to_path_buf(), name, "the lab config");
    }
    if let Some(p) = env::var_os(env_var) {
        return existing(PathBuf::from(p), name, env_var);
    }
    let exe = env::current_exe().context("locating the current executable")?;
    let candidates = candidates_near(&exe, name);
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "{name} not found (looked at {}); build it with `cargo build --workspace \
                 --exclude dataplane-ebpf` or set {env_var}",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn existing(p: PathBuf, name: &str, source: &str) -> Result<PathBuf> {
    if !p.is_file() {
        bail!(
            "{name} binary {} (from {source}) does not exist",
            p.display()
        );
    }
    Ok(p)
}

/// Where `name` may sit relative to executable `exe`.
fn candidates_near(exe: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = exe.parent() {
        out.push(dir.join(name));
        let sub = dir.file_name().and_then(|n| n.to_str());
        if matches!(sub, Some("deps" | "examples"))
            && let Some(up) = dir.parent()
        {
            out.push(up.join(name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_next_to_exe_and_above_deps() {
        assert_eq!(
            candidates_near(Path::new("/t/target/debug/deps/lab-123"), "netagent"),
            [
                PathBuf::from("/t/target/debug/deps/netagent"),
                PathBuf::from("/t/target/debug/netagent")
            ]
        );
        assert_eq!(
            candidates_near(Path::new("/t/target/debug/xtask"), "netctl"),
            [PathBuf::from("/t/target/debug/netctl")]
        );
    }

    #[test]
    fn explicit_path_must_exist() {
        let err = find(
            "netagent",
            "NETLAB_TEST_UNSET_VAR",
            Some(Path::new("/nonexistent")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let sh = find("sh", "NETLAB_TEST_UNSET_VAR", Some(Path::new("/bin/sh"))).unwrap();
        assert_eq!(sh, PathBuf::from("/bin/sh"));
    }

    #[test]
    fn missing_binary_says_how_to_build_it() {
        let err = find("no-such-binary-xyz", "NETLAB_TEST_UNSET_VAR", None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("cargo build") && msg.contains("NETLAB_TEST_UNSET_VAR"),
            "{msg}"
        );
    }
}
