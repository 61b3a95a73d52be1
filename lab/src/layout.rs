//! Names and addresses of a lab: everything is derived from the prefix so
//! that a second process (`cargo xtask lab down`) finds what a first one made.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};

use crate::sys::BPFFS;

/// Every lab has a directory here; its existence is the lab's lock and record.
pub const RUN_ROOT: &str = "/run/netlab";
/// The fabric ("physical network") is 198.18.0.0/24 (RFC 2544 benchmarking
/// range: never routed on real networks).
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// Address of the fabric bridge; the nodes' default gateway.
pub const FABRIC_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Address etcd listens on, a second address on the fabric bridge.
pub const ETCD_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ETCD_PORT: u16 = 2379;
/// The bridge inside the fabric namespace.
pub const BRIDGE: &str = "br0";
/// The node's uplink inside its namespace, as a real host's NIC.
pub const UPLINK: &str = "eth0";
/// Node i gets 198.18.0.(10+i); this caps the node count inside the /24.
pub const MAX_NODES: usize = 200;
const MAX_PREFIX_LEN: usize = 10;

/// Prefixes are `[a-z][a-z0-9]{0,9}`: no '-', so the namespace names
/// `<prefix>-...` of two labs can never be prefixes of one another, and short
/// enough that anything derived from them fits interface-name limits.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok_len = (1..=MAX_PREFIX_LEN).contains(&prefix.len());
    let mut chars = prefix.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(ok_len && ok_first && ok_rest) {
        bail!(
            "invalid lab prefix {prefix:?}: use 1-{MAX_PREFIX_LEN} characters [a-z0-9], \
             starting with a letter"
        );
    }
    Ok(())
}

/// A fresh prefix, "nl" + 5 hex digits, from a randomly keyed hash of pid,
/// time and a process-wide counter. Collisions are still possible (20 bits),
/// so callers claim it by creating the run dir and retry on conflict.
pub fn generate_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    format!("nl{:05x}", h.finish() & 0xf_ffff)
}

pub fn run_dir(prefix: &str) -> PathBuf {
    PathBuf::from(RUN_ROOT).join(prefix)
}

pub fn fabric_ns(prefix: &str) -> String {
    format!("{prefix}-fabric")
}

/// The outside host's namespace (see `Lab::add_outside_host`).
pub fn outside_ns(prefix: &str) -> String {
    format!("{prefix}-wan")
}

/// The outside host: a server beyond the fabric, which routes to it over a link of its own
/// (`OUTSIDE_GATEWAY` on the fabric's end).
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const OUTSIDE_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const OUTSIDE_PREFIX_LEN: u8 = 24;

pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

pub fn node_ns(prefix: &str, i: usize) -> String {
    format!("{prefix}-n{i}")
}

/// Address of node `i` (1-based) on the fabric.
pub fn node_addr(i: usize) -> Ipv4Addr {
    assert!((1..=MAX_NODES).contains(&i), "node index {i} out of range");
    Ipv4Addr::new(198, 18, 0, 10 + i as u8)
}

pub fn socket(prefix: &str, i: usize) -> PathBuf {
    run_dir(prefix).join(format!("n{i}.sock"))
}

pub fn agent_log(prefix: &str, i: usize) -> PathBuf {
    run_dir(prefix).join(format!("n{i}.log"))
}

pub fn state_dir(prefix: &str, i: usize) -> PathBuf {
    run_dir(prefix).join(format!("n{i}")).join("state")
}

pub fn bpf_root(prefix: &str) -> PathBuf {
    PathBuf::from(BPFFS).join(prefix)
}

pub fn bpf_dir(prefix: &str, i: usize) -> PathBuf {
    bpf_root(prefix).join(format!("n{i}"))
}

/// Client address of etcd member `k` (0: [`ETCD_ADDR`]; more members take the next ones).
pub fn etcd_member_addr(k: usize) -> Ipv4Addr {
    let [a, b, c, d] = ETCD_ADDR.octets();
    Ipv4Addr::new(a, b, c, d + k as u8)
}

/// Most etcd members a lab runs (their addresses must stay below the nodes').
pub const MAX_ETCD_MEMBERS: usize = 5;

/// Data dir and log of etcd member `k` >= 1 (member 0 keeps [`etcd_data_dir`] and [`etcd_log`]).
pub fn etcd_member_data_dir(prefix: &str, k: usize) -> PathBuf {
    run_dir(prefix).join(format!("etcd{k}"))
}

pub fn etcd_member_log(prefix: &str, k: usize) -> PathBuf {
    run_dir(prefix).join(format!("etcd{k}.log"))
}

pub fn etcd_data_dir(prefix: &str) -> PathBuf {
    run_dir(prefix).join("etcd")
}

pub fn etcd_log(prefix: &str) -> PathBuf {
    run_dir(prefix).join("etcd.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_prefixes_are_valid_and_vary() {
        let a: Vec<String> = (0..50).map(|_| generate_prefix()).collect();
        for p in &a {
            validate_prefix(p).unwrap();
            assert_eq!(p.len(), 7);
        }
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 45, "too many collisions: {a:?}");
    }

    #[test]
    fn prefix_validation() {
        for ok in ["a", "nl1a2b3", "abcdefghij"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["", "1ab", "a-b", "Ab", "abcdefghijk", "a/b", "a b"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_and_addresses() {
        assert_eq!(fabric_ns("nl1"), "nl1-fabric");
        assert_eq!(node_ns("nl1", 3), "nl1-n3");
        assert_eq!(node_addr(1), Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(node_addr(MAX_NODES), Ipv4Addr::new(198, 18, 0, 210));
        assert_eq!(socket("nl1", 2), PathBuf::from("/run/netlab/nl1/n2.sock"));
        assert_eq!(
            state_dir("nl1", 2),
            PathBuf::from("/run/netlab/nl1/n2/state")
        );
        assert_eq!(bpf_dir("nl1", 2), PathBuf::from("/sys/fs/bpf/nl1/n2"));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn node_zero_is_not_a_node() {
        node_addr(0);
    }
}
