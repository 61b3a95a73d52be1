//! `cargo xtask setup`: everything the build and the tests need that cargo
//! does not fetch by itself. Idempotent: each step checks first and skips
//! what is already there, so CI can run it on every build.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cargo;

/// Debian packages, and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links the eBPF object with LLVM 22",
    ),
    (
        "libpolly-22-dev",
        "LLVM 22's static libraries link against Polly",
    ),
    ("libzstd-dev", "linked into bpf-linker with LLVM"),
    ("zlib1g-dev", "linked into bpf-linker with LLVM"),
    (
        "protobuf-compiler",
        "etcd-client generates its gRPC code with protoc",
    ),
    (
        "libprotobuf-dev",
        "protoc's well-known .proto files (only a Recommends of protobuf-compiler)",
    ),
    ("etcd-server", "the real etcd the test lab runs"),
    ("etcd-client", "etcdctl, to check etcd from tests"),
    ("iproute2", "ip: namespaces, veths, bridge of the lab"),
    ("tcpdump", "captures on the lab fabric"),
    ("iperf3", "throughput tests and benchmarks"),
    ("sockperf", "TCP round-trip latency in benchmarks"),
    ("bpftool", "inspecting loaded programs and maps"),
    ("dnsutils", "dig, for DNS tests"),
    (
        "dnsmasq-base",
        "an upstream DNS server in tests; the DNS benchmark's baseline",
    ),
    ("dnsperf", "the DNS benchmark's load generator"),
    ("iputils-ping", "ping, for reachability tests"),
    ("curl", "HTTP requests to published ports in the demo"),
    (
        "socat",
        "TCP and UDP echo servers and clients in containers",
    ),
    ("procps", "pgrep/sysctl, used by tests and the lab"),
    ("util-linux", "nsenter, runs agents in node namespaces"),
    (
        "iptables",
        "the load-balancer benchmark's kube-proxy-style DNAT baseline",
    ),
    (
        "haproxy",
        "the load-balancer benchmark's HAProxy TCP baseline",
    ),
    (
        "wireguard-go",
        "the encrypted benchmark's userspace WireGuard baseline",
    ),
    (
        "wireguard-tools",
        "wg, configures the wireguard-go baseline",
    ),
    (
        "prometheus",
        "a real Prometheus scrapes the agent; promtool checks the metrics",
    ),
    ("podman", "a real container runtime drives the CNI plugin"),
    (
        "runc",
        "the OCI runtime podman uses here (crun refuses this host)",
    ),
    (
        "containernetworking-plugins",
        "portmap/bandwidth/tuning chained after the CNI plugin",
    ),
    (
        "busybox-static",
        "busybox: the demo's replicas and podman's --rootfs (conflicts with busybox)",
    ),
    ("wrk", "HTTP load through VIPs and the routing mesh"),
];

/// The nightly aya-build compiles the eBPF crate with (DESIGN.md section 10).
const NIGHTLY: &str = "nightly-2026-05-19";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

const APT_UPDATE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const APT_INSTALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const RUSTUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// bpf-linker builds in a few minutes against the system LLVM.
const CARGO_INSTALL_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run() -> Result<()> {
    if !netlab::is_root() {
        bail!(
            "`cargo xtask setup` must run as root: it installs Debian packages, mounts \
             bpffs, and the tests create network namespaces (CI runs as root)"
        );
    }
    packages()?;
    nightly()?;
    bpf_linker()?;
    bpffs()?;
    println!("setup: done");
    Ok(())
}

/// Runs a query command; its output, or an error naming the command.
fn query(c: &mut Command) -> Result<netlab::Output> {
    netlab::run(c, QUERY_TIMEOUT)
}

/// Runs an installing command with its output on the terminal.
fn install(c: &mut Command, timeout: Duration, what: &str) -> Result<()> {
    println!("$ {}", netlab::describe(c));
    let status = netlab::run_inherit(c, timeout)?;
    if !status.success() {
        bail!("{what} failed ({status}); see the output above");
    }
    Ok(())
}

/// Names from `wanted` that dpkg does not list as installed.
fn missing_packages(wanted: &[&str]) -> Result<Vec<String>> {
    let out = query(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${Status}\\n"])
            .args(wanted),
    )
    .context("is this Debian? dpkg-query is needed to check packages")?;
    // dpkg-query exits 1 when some name is unknown; those are simply missing.
    let installed: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    Ok(wanted
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| (*p).to_owned())
        .collect())
}

fn packages() -> Result<()> {
    let names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    let missing = missing_packages(&names)?;
    if missing.is_empty() {
        println!("setup: Debian packages: all {} present", names.len());
        return Ok(());
    }
    for (name, why) in PACKAGES
        .iter()
        .filter(|(p, _)| missing.iter().any(|m| m == p))
    {
        println!("setup: installing {name} ({why})");
    }
    install(
        Command::new("apt-get").args(["update", "-q"]),
        APT_UPDATE_TIMEOUT,
        "apt-get update",
    )?;
    install(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
        APT_INSTALL_TIMEOUT,
        &format!("apt-get install {}", missing.join(" ")),
    )?;
    let still = missing_packages(&names)?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

fn nightly() -> Result<()> {
    let toolchains = query(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to install the eBPF toolchain")?;
    let have_toolchain = toolchains
        .stdout
        .lines()
        .any(|l| l.starts_with(&format!("{NIGHTLY}-")) || l.starts_with(&format!("{NIGHTLY} ")));
    let have_src = have_toolchain
        && query(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            NIGHTLY,
        ]))?
        .stdout
        .lines()
        .any(|l| l.starts_with("rust-src"));
    if have_src {
        println!("setup: {NIGHTLY} with rust-src: present");
        return Ok(());
    }
    println!("setup: installing {NIGHTLY} with rust-src (builds the eBPF crate)");
    install(
        Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--component",
            "rust-src",
            "--profile",
            "minimal",
        ]),
        RUSTUP_TIMEOUT,
        &format!("rustup toolchain install {NIGHTLY}"),
    )
}

/// True if `bpf-linker --version` reports 0.13.x.
fn bpf_linker_is_013() -> bool {
    let out = query(Command::new("bpf-linker").arg("--version"));
    matches!(out, Ok(o) if o.success() && is_013(&o.stdout))
}

fn is_013(version_output: &str) -> bool {
    version_output
        .split_whitespace()
        .any(|w| w.starts_with("0.13.") || w == "0.13")
}

fn bpf_linker() -> Result<()> {
    if bpf_linker_is_013() {
        println!("setup: bpf-linker 0.13: present");
        return Ok(());
    }
    println!("setup: installing bpf-linker 0.13 against LLVM 22 (links the eBPF object)");
    let mut c = cargo::cargo();
    c.env("LLVM_PREFIX", LLVM_PREFIX).args([
        "install",
        "bpf-linker",
        "--version",
        "~0.13",
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    install(&mut c, CARGO_INSTALL_TIMEOUT, "cargo install bpf-linker")?;
    if !bpf_linker_is_013() {
        bail!(
            "bpf-linker installed but `bpf-linker --version` does not report 0.13 (is ~/.cargo/bin on PATH?)"
        );
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    if netlab::ensure_bpffs()? {
        println!("setup: mounted bpffs at {}", netlab::BPFFS);
    } else {
        println!("setup: bpffs at {}: mounted", netlab::BPFFS);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_bpf_linker_013() {
        assert!(is_013("bpf-linker 0.13.0\n"));
        assert!(is_013("bpf-linker 0.13.2"));
        assert!(!is_013("bpf-linker 0.9.15"));
        assert!(!is_013("bpf-linker 0.130.0"));
    }

    #[test]
    fn package_list_has_no_duplicates() {
        let mut names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PACKAGES.len());
    }
}
