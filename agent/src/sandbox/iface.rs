//! Veth interfaces that connect a sandbox's namespace to the node.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::{Result, SandboxError};
use crate::netlink::{IFNAME_MAX, Netlink, validate_ifname};

/// One interface to put into a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    /// The target namespace (`/run/netns/<name>` or `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    /// Host-side veth name, at most 15 bytes (see [`host_ifname_for`]).
    pub host_ifname: String,
    /// Interface name inside the namespace, e.g. `eth0`.
    pub ifname: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// The endpoint's MAC, on the inside interface.
    pub mac: [u8; 6],
    /// The MAC the datapath answers ARP with, on the host-side veth.
    pub router_mac: [u8; 6],
    /// Add `default via gateway`. Only the first interface of a sandbox gets it; further
    /// interfaces (a container on several networks) get only their subnet route.
    pub default_route: bool,
}

/// What [`attach`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedInterface {
    pub host_ifname: String,
    /// Where the datapath's `from_container` program attaches.
    pub host_ifindex: u32,
    pub ifname: String,
}

/// A deterministic host-side veth name for an endpoint id: `na` + 12 characters, so a
/// restarted agent finds the same interface again and an operator can match it to the id.
/// Ids that are not plain alphanumerics (or are shorter than 12) are hashed so the result is
/// always a valid interface name.
pub fn host_ifname_for(id: &str) -> String {
    const PREFIX: &str = "na";
    const TAIL: usize = IFNAME_MAX - 3; // 12, leaving a byte of slack under the limit
    if id.len() >= TAIL && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return format!("{PREFIX}{}", &id[..TAIL]);
    }
    // FNV-1a: stable across builds and platforms, unlike std's randomly seeded hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let hex = format!("{h:016x}");
    format!("{PREFIX}{}", &hex[..TAIL])
}

fn validate(req: &AttachRequest) -> Result<()> {
    validate_ifname(&req.host_ifname)?;
    validate_ifname(&req.ifname)?;
    if req.prefix_len > 32 {
        return Err(SandboxError::Invalid(format!(
            "prefix length {} is not between 0 and 32",
            req.prefix_len
        )));
    }
    // 68 is IPv4's minimum MTU; anything smaller the kernel would refuse with a bare EINVAL.
    if req.mtu < 68 {
        return Err(SandboxError::Invalid(format!(
            "mtu {} is below 68",
            req.mtu
        )));
    }
    Ok(())
}

/// Puts a veth into `req.netns`: `req.ifname` inside with the endpoint's MAC, address, MTU and
/// routes; `req.host_ifname` in the node namespace (the namespace of `node`) with the router
/// MAC, the same MTU and IPv6 off; both up.
///
/// The inside end is created directly in the target namespace, so its name never has to be
/// free in the node namespace. If any step fails the veth is deleted again (deleting the host
/// end removes both), so a failed attach leaves nothing behind. A host name that is already
/// taken fails without touching the existing interface.
pub async fn attach(node: &Netlink, req: &AttachRequest) -> Result<AttachedInterface> {
    validate(req)?;
    let ns = File::open(&req.netns).map_err(SandboxError::io("opening namespace", &req.netns))?;
    node.add_veth(
        &req.host_ifname,
        req.router_mac,
        &req.ifname,
        req.mac,
        &ns,
        req.mtu,
    )
    .await?;
    drop(ns);

    match configure(node, req).await {
        Ok(host_ifindex) => {
            tracing::info!(
                host_ifname = %req.host_ifname,
                host_ifindex,
                ifname = %req.ifname,
                netns = %req.netns.display(),
                address = %req.address,
                "attached interface"
            );
            Ok(AttachedInterface {
                host_ifname: req.host_ifname.clone(),
                host_ifindex,
                ifname: req.ifname.clone(),
            })
        }
        Err(e) => {
            match node.delete_link(&req.host_ifname).await {
                Ok(_) => tracing::debug!(host_ifname = %req.host_ifname, "removed half-made veth"),
                Err(del) => tracing::warn!(
                    host_ifname = %req.host_ifname,
                    error = %del,
                    "could not remove half-made veth"
                ),
            }
            Err(e)
        }
    }
}

/// Everything after the veth exists; returns the host ifindex.
async fn configure(node: &Netlink, req: &AttachRequest) -> Result<u32> {
    let host_ifindex = node.require_link_index(&req.host_ifname).await?;
    // IPv6 off before the link comes up, so it never sends a router solicitation.
    node.disable_ipv6(&req.host_ifname).await?;
    node.set_link_up(host_ifindex).await?;

    let inside = Netlink::in_netns(&req.netns)?;
    // Namespaces made by create_netns already default to IPv6 off; one made by someone else
    // (the CNI-shaped attach) may not.
    inside.disable_ipv6(&req.ifname).await?;
    let index = inside.require_link_index(&req.ifname).await?;
    inside
        .add_address(index, req.address, req.prefix_len)
        .await?;
    // Up before the default route: the kernel accepts a gateway only when a connected route
    // to it exists, and the subnet route appears when the link is up.
    inside.set_link_up(index).await?;
    if req.default_route {
        inside
            .add_route(Ipv4Addr::UNSPECIFIED, 0, Some(req.gateway), index)
            .await?;
    }
    // The node's way back to the container (its own services, published ports it answers
    // itself); both go with the veth.
    node.set_permanent_neighbour(host_ifindex, req.address, req.mac)
        .await?;
    node.add_host_route(req.address, host_ifindex).await?;
    Ok(host_ifindex)
}

/// Deletes the veth whose host end is `host_ifname` (its inside end goes with it).
/// `Ok(false)` if it was already gone.
pub async fn detach(node: &Netlink, host_ifname: &str) -> Result<bool> {
    let removed = node.delete_link(host_ifname).await?;
    if removed {
        tracing::info!(host_ifname, "detached interface");
    }
    Ok(removed)
}
