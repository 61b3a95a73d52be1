//! `cargo xtask install`: the binaries, the systemd unit and an example configuration onto a
//! node (or under `--root`, for packaging). The unit is not enabled and an existing
//! configuration is never overwritten: both are the operator's to decide.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::cargo;

/// Where `cargo xtask install` puts things.
#[derive(Debug, Clone)]
pub struct InstallArgs {
    /// Everything goes below this directory (`/` on a node; a staging directory for a package).
    pub root: PathBuf,
    /// Binaries go to `PREFIX/bin`, documentation to `PREFIX/share/doc/netagent`.
    pub prefix: PathBuf,
    /// Take the binaries from here instead of building them (`target/release` after a build).
    pub bin_dir: Option<PathBuf>,
    /// The runtimes' CNI plugin directory: `netagent-cni` goes there as `netagent`.
    pub cni_bin_dir: PathBuf,
    /// Also write `/etc/cni/net.d/10-netagent.conflist` for this netagent network (off by
    /// default: a configuration there becomes a runtime's network at once, and kubelet takes
    /// the first file of the directory as the pod network).
    pub cni_network: Option<String>,
}

/// One file to write.
#[derive(Debug, PartialEq)]
struct Item {
    dest: PathBuf,
    contents: Contents,
    mode: u32,
    /// Configuration: an existing file is left as it is.
    keep_existing: bool,
}

#[derive(Debug, PartialEq)]
enum Contents {
    Copy(PathBuf),
    Text(String),
}

/// The binaries a node runs (to PREFIX/bin), and the CNI plugin (to the CNI directory).
const BINARIES: &[&str] = &["netagent", "netctl"];
const CNI_PLUGIN: &str = "netagent-cni";

/// A configuration list for `network` on the agent's default socket.
fn conflist(network: &str) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{network}",
  "plugins": [
    {{ "type": "netagent", "network": "{network}", "socket": "/run/netagent/netagent.sock" }}
  ]
}}
"#
    )
}

pub fn run(args: &InstallArgs) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => {
            let mut build = vec!["build", "--release"];
            for b in BINARIES.iter().chain([&CNI_PLUGIN]) {
                build.extend(["-p", b]);
            }
            let mut c = cargo::cargo();
            c.args(&build);
            println!("$ {}", netlab::describe(&c));
            let status = netlab::run_inherit(&mut c, cargo::BUILD_TIMEOUT)?;
            if !status.success() {
                bail!("`cargo {}` failed ({status})", build.join(" "));
            }
            cargo::workspace_root().join("target/release")
        }
    };
    let items = plan(args, &bin_dir, &cargo::workspace_root())?;
    for item in &items {
        match write(item)? {
            true => println!("installed {}", item.dest.display()),
            false => println!("kept      {} (exists)", item.dest.display()),
        }
    }
    if args.root == Path::new("/") {
        println!(
            "next: edit /etc/default/netagent, then `systemctl daemon-reload && systemctl \
             enable --now netagent`"
        );
    }
    Ok(())
}

/// `root` + an absolute path.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn plan(args: &InstallArgs, bin_dir: &Path, workspace: &Path) -> Result<Vec<Item>> {
    if !args.prefix.is_absolute() {
        bail!(
            "--prefix {}: must be an absolute path",
            args.prefix.display()
        );
    }
    if !args.cni_bin_dir.is_absolute() {
        bail!(
            "--cni-bin-dir {}: must be an absolute path",
            args.cni_bin_dir.display()
        );
    }
    let mut items = Vec::new();
    let bin = args.prefix.join("bin");
    let programs = BINARIES
        .iter()
        .map(|b| (*b, bin.join(b)))
        .chain([(CNI_PLUGIN, args.cni_bin_dir.join("netagent"))]);
    for (name, dest) in programs {
        let src = bin_dir.join(name);
        if !src.is_file() {
            bail!(
                "{}: not built (run without --bin-dir to build)",
                src.display()
            );
        }
        items.push(Item {
            dest: under(&args.root, &dest),
            contents: Contents::Copy(src),
            mode: 0o755,
            keep_existing: false,
        });
    }
    let doc = args.prefix.join("share/doc/netagent");
    items.push(Item {
        dest: under(&args.root, &doc.join("10-netagent.conflist")),
        contents: Contents::Text(conflist("services")),
        mode: 0o644,
        keep_existing: false,
    });
    if let Some(network) = &args.cni_network {
        let valid = network
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && network
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            bail!("--cni-network {network:?}: not a network name (letters, digits, '-_.')");
        }
        items.push(Item {
            dest: under(&args.root, Path::new("/etc/cni/net.d/10-netagent.conflist")),
            contents: Contents::Text(conflist(network)),
            mode: 0o644,
            keep_existing: true,
        });
    }
    let unit_src = workspace.join("packaging/netagent.service");
    let unit =
        fs::read_to_string(&unit_src).with_context(|| format!("reading {}", unit_src.display()))?;
    // The unit names /usr/local; point it at the prefix the binaries went to.
    let prefix = args.prefix.display().to_string();
    let unit = unit.replace("/usr/local/", &format!("{}/", prefix.trim_end_matches('/')));
    items.push(Item {
        dest: under(
            &args.root,
            Path::new("/etc/systemd/system/netagent.service"),
        ),
        contents: Contents::Text(unit),
        mode: 0o644,
        keep_existing: false,
    });
    items.push(Item {
        dest: under(&args.root, Path::new("/etc/default/netagent")),
        contents: Contents::Copy(workspace.join("packaging/netagent.env")),
        mode: 0o644,
        keep_existing: true,
    });
    items.push(Item {
        dest: under(&args.root, &doc.join("README.md")),
        contents: Contents::Copy(workspace.join("README.md")),
        mode: 0o644,
        keep_existing: false,
    });
    Ok(items)
}

/// Writes one item through a temporary file and a rename, so a running binary is replaced,
/// not rewritten under the process using it. False when kept.
fn write(item: &Item) -> Result<bool> {
    if item.keep_existing && item.dest.exists() {
        return Ok(false);
    }
    let dir = item
        .dest
        .parent()
        .with_context(|| format!("{}: no parent directory", item.dest.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = match &item.contents {
        Contents::Copy(src) => {
            fs::read(src).with_context(|| format!("reading {}", src.display()))?
        }
        Contents::Text(t) => t.clone().into_bytes(),
    };
    let name = item.dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.xtask-install"));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.set_permissions(fs::Permissions::from_mode(item.mode))?;
        f.sync_all()?;
        fs::rename(&tmp, &item.dest)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", item.dest.display()));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_binaries_unit_config_and_docs_under_the_root_and_keeps_config() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let bins = base.join("bins");
        fs::create_dir_all(&bins).unwrap();
        for b in BINARIES.iter().chain([&CNI_PLUGIN]) {
            fs::write(bins.join(b), format!("#!/bin/sh\necho {b}\n")).unwrap();
        }
        let root = base.join("root");
        let args = InstallArgs {
            root: root.clone(),
            prefix: PathBuf::from("/usr"),
            bin_dir: Some(bins.clone()),
            cni_bin_dir: PathBuf::from("/opt/cni/bin"),
            cni_network: Some("services".into()),
        };
        run(&args).unwrap();
        for b in BINARIES {
            let p = root.join("usr/bin").join(b);
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o755, "{}", p.display());
        }
        let unit = fs::read_to_string(root.join("etc/systemd/system/netagent.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/netagent "), "{unit}");
        assert!(!unit.contains("/usr/local/"), "{unit}");
        assert!(unit.contains("Type=notify"));
        let env = root.join("etc/default/netagent");
        assert!(fs::read_to_string(&env).unwrap().contains("NODE_NAME="));
        assert!(root.join("usr/share/doc/netagent/README.md").is_file());
        let plugin = fs::read_to_string(root.join("opt/cni/bin/netagent")).unwrap();
        assert!(plugin.contains("netagent-cni"), "{plugin}");
        let list: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(root.join("etc/cni/net.d/10-netagent.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(list["plugins"][0]["type"], "netagent");
        assert_eq!(list["name"], "services");

        // Again, over an edited config: binaries replaced, config kept.
        fs::write(&env, "NODE_NAME=edited\n").unwrap();
        fs::write(bins.join("netctl"), "new").unwrap();
        run(&args).unwrap();
        assert_eq!(fs::read_to_string(&env).unwrap(), "NODE_NAME=edited\n");
        assert_eq!(
            fs::read_to_string(root.join("usr/bin/netctl")).unwrap(),
            "new"
        );
        let leftovers: Vec<_> = fs::read_dir(root.join("usr/bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("xtask-install"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn refuses_a_relative_prefix_and_missing_binaries_before_writing_anything() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let root = base.join("root");
        let err = run(&InstallArgs {
            root: root.clone(),
            prefix: PathBuf::from("usr"),
            bin_dir: Some(base.to_path_buf()),
            cni_bin_dir: PathBuf::from("/opt/cni/bin"),
            cni_network: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
        let err = run(&InstallArgs {
            root: root.clone(),
            prefix: PathBuf::from("/usr"),
            bin_dir: Some(base.join("empty")),
            cni_bin_dir: PathBuf::from("/opt/cni/bin"),
            cni_network: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("not built"), "{err}");
        assert!(!root.exists(), "nothing written");
    }
}
