//! rtnetlink access for the agent: links, addresses and routes, in the node's network
//! namespace or in any other one reachable by path.
//!
//! Every kernel change the agent makes to interfaces goes through here (never through `ip`), so
//! errors carry the operation and the object they were about, and idempotency rules (what counts
//! as "already right") live in one place.

mod blocking;
mod ns;
mod vxlan;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

pub use blocking::set_link_up_blocking;
pub use ns::run_in_netns;

/// Linux limit for interface names (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// rtnetlink needs a tokio reactor for its socket and a task for its connection.
    #[error("netlink needs a tokio runtime, and none is running on this thread")]
    NoRuntime,
    #[error("opening a netlink socket in {netns}: {source}")]
    Socket {
        netns: String,
        source: std::io::Error,
    },
    #[error("entering network namespace {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} {what} (in {netns}): {source}")]
    Request {
        op: &'static str,
        what: String,
        netns: String,
        // Boxed: rtnetlink's error can carry a whole netlink message, which would make every
        // Result in the agent as large as that.
        source: Box<rtnetlink::Error>,
    },
    #[error("setting {what} (in {netns}): {source}")]
    Sysctl {
        what: String,
        netns: String,
        source: std::io::Error,
    },
    #[error("invalid interface name {0:?}: 1 to 15 bytes, no '/', ':' or whitespace")]
    InvalidIfname(String),
    #[error("link {what} not found (in {netns})")]
    LinkNotFound { what: String, netns: String },
}

impl NetlinkError {
    /// The kernel's errno for a rejected request (positive, e.g. `libc::EEXIST`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request { source, .. } => rt_errno(source),
            NetlinkError::Socket { source, .. } | NetlinkError::Netns { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

/// The positive errno inside an rtnetlink error, if the kernel sent one.
fn rt_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        // Netlink NACKs carry the negated errno.
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Checks a name the kernel would accept for a network interface. Validating up front turns
/// the kernel's bare EINVAL into a message that names the culprit.
pub fn validate_ifname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(NetlinkError::InvalidIfname(name.to_string()))
    }
}

/// An rtnetlink connection bound to one network namespace.
///
/// The namespace of a netlink socket is fixed when the socket is created, so a handle made by
/// [`Netlink::in_netns`] keeps talking to that namespace whatever thread later uses it.
/// Cloning is cheap and shares the connection; the connection task ends when the last clone
/// is dropped.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    /// For error messages: "node" or the namespace path.
    netns: String,
    /// The namespace to enter for per-namespace files such as /proc/sys/net; `None` means
    /// the namespace of the agent's own threads.
    netns_path: Option<PathBuf>,
}

impl Netlink {
    /// A handle in the calling thread's network namespace (the node's, for the agent). The
    /// connection task is spawned on the current tokio runtime.
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (conn, handle, _messages) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Socket {
                netns: "node".into(),
                source,
            })?;
        rt.spawn(conn);
        Ok(Netlink {
            handle,
            netns: "node".into(),
            netns_path: None,
        })
    }

    /// A handle whose socket lives in the network namespace at `path` (a `/run/netns/<name>`
    /// file or a `/proc/<pid>/ns/net`).
    ///
    /// The socket is created on a short-lived helper thread that has `setns`'d into the
    /// namespace, so no agent thread ever changes namespace. The runtime is entered on that
    /// thread so the socket registers with the runtime's reactor.
    pub fn in_netns(path: &Path) -> Result<Self> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let label = path.display().to_string();
        let rt_inner = rt.clone();
        let (conn, handle, _messages) = run_in_netns(path, move || {
            let _entered = rt_inner.enter();
            rtnetlink::new_connection()
        })?
        .map_err(|source| NetlinkError::Socket {
            netns: label.clone(),
            source,
        })?;
        rt.spawn(conn);
        Ok(Netlink {
            handle,
            netns: label,
            netns_path: Some(path.to_path_buf()),
        })
    }

    /// The raw rtnetlink handle, for requests this module has no helper for yet.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    fn req_err(
        &self,
        op: &'static str,
        what: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let what = what.into();
        let netns = self.netns.clone();
        move |source| NetlinkError::Request {
            op,
            what,
            netns,
            source: Box::new(source),
        }
    }

    /// The link called `name`, or `None` if there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        validate_ifname(name)?;
        let mut stream = self.handle.link().get().match_name(name).execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg),
            // ENODEV is how the kernel says "no such name"; that is an answer, not a failure.
            Err(e) if rt_errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.req_err("looking up link", name)(e)),
        }
    }

    /// The link with index `index`, or `None`.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg),
            Err(e) if rt_errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.req_err("looking up link index", index.to_string())(e)),
        }
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link_by_name(name).await?.map(|m| m.header.index))
    }

    pub async fn link_mtu(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link_by_name(name).await?.and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
        }))
    }

    pub async fn link_name(&self, index: u32) -> Result<Option<String>> {
        Ok(self
            .link_by_index(index)
            .await?
            .and_then(|m| link_ifname(&m)))
    }

    /// The link's index, or an error naming it if it does not exist.
    pub async fn require_link_index(&self, name: &str) -> Result<u32> {
        self.link_index(name)
            .await?
            .ok_or_else(|| NetlinkError::LinkNotFound {
                what: name.to_string(),
                netns: self.netns.clone(),
            })
    }

    /// Deletes the link called `name`. `Ok(false)` if there was none (deleting is idempotent:
    /// both ends of a veth vanish together, so the second delete often finds nothing).
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => {
                tracing::debug!(link = name, netns = %self.netns, "deleted link");
                Ok(true)
            }
            // Raced with another deleter (or the peer's deletion): the goal is reached.
            Err(e) if rt_errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(self.req_err("deleting link", name)(e)),
        }
    }

    pub async fn set_link_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(self.req_err("setting up link index", index.to_string()))
    }

    pub async fn set_link_down(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(self.req_err("setting down link index", index.to_string()))
    }

    pub async fn set_link_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(self.req_err("setting mtu of link index", format!("{index} to {mtu}")))
    }

    /// Adds `ip/prefix_len` to the link. An address that is already there with the same
    /// prefix counts as success, so callers can re-run after a partial failure.
    pub async fn add_address(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if rt_errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(self.req_err(
                "adding address",
                format!("{ip}/{prefix_len} to link index {index}"),
            )(e)),
        }
    }

    /// Adds `dst/prefix_len via gateway` out of link `index` to the main table; a default
    /// route is `dst = 0.0.0.0, prefix_len = 0`. If the same route is already there that is
    /// success (so a caller can re-run after a partial failure); a different route to the same
    /// destination (another gateway or device) is an EEXIST error, not silently kept.
    pub async fn add_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        gateway: Option<Ipv4Addr>,
        index: u32,
    ) -> Result<()> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .output_interface(index);
        if let Some(gw) = gateway {
            builder = builder.gateway(gw);
        }
        let what = match gateway {
            Some(gw) => format!("{dst}/{prefix_len} via {gw} on link index {index}"),
            None => format!("{dst}/{prefix_len} on link index {index}"),
        };
        match self.handle.route().add(builder.build()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if rt_errno(&e) == Some(libc::EEXIST) => {
                if self.has_route(dst, prefix_len, gateway, index).await? {
                    Ok(())
                } else {
                    Err(self
                        .req_err("adding route (another route to it exists)", what)(
                        e,
                    ))
                }
            }
            Err(e) => Err(self.req_err("adding route", what)(e)),
        }
    }

    /// Adds `ip/32 dev index scope link` to the main table (idempotent): the node's own way
    /// to a local container, for its replies to the container's packets (the container's
    /// packets to the node's address reach its stack directly) and its own connections.
    pub async fn add_host_route(&self, ip: Ipv4Addr, index: u32) -> Result<()> {
        use rtnetlink::packet_route::route::RouteScope;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if rt_errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(self.req_err(
                "adding host route",
                format!("{ip}/32 on link index {index}"),
            )(e)),
        }
    }

    /// Sets a permanent neighbour `ip lladdr mac` on link `index` (replacing one that is
    /// there): the datapath answers ARP for the containers, never the containers for the node,
    /// so the node must not have to ask.
    pub async fn set_permanent_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(self.req_err(
                "setting neighbour",
                format!("{ip} lladdr {mac:02x?} on link index {index}"),
            ))
    }

    /// Adds `unreachable dst/prefix_len metric <metric>` to the main table (idempotent): a
    /// floor under more specific or lower-metric routes, so traffic for the range is refused
    /// when they are gone instead of following the default route.
    pub async fn add_unreachable_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        metric: u32,
    ) -> Result<()> {
        use rtnetlink::packet_route::route::{RouteScope, RouteType};
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .kind(RouteType::Unreachable)
            .scope(RouteScope::Universe)
            .priority(metric)
            .build();
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if rt_errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(self.req_err(
                "adding unreachable route",
                format!("{dst}/{prefix_len} metric {metric}"),
            )(e)),
        }
    }

    /// Whether the main table holds exactly `dst/prefix_len [via gateway] dev index`.
    async fn has_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        gateway: Option<Ipv4Addr>,
        index: u32,
    ) -> Result<bool> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
        let mut stream = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut found = false;
        while let Some(route) = stream
            .try_next()
            .await
            .map_err(self.req_err("listing routes", format!("{dst}/{prefix_len}")))?
        {
            let mut r_dst = Ipv4Addr::UNSPECIFIED;
            let (mut r_gw, mut r_oif) = (None, None);
            let mut table = u32::from(route.header.table);
            for attr in &route.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => r_dst = *a,
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => r_gw = Some(*a),
                    RouteAttribute::Oif(i) => r_oif = Some(*i),
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            // Keep draining rather than returning early: see interface_with_address.
            found |= table == u32::from(RouteHeader::RT_TABLE_MAIN)
                && route.header.destination_prefix_length == prefix_len
                && r_dst == dst
                && r_gw == gateway
                && r_oif == Some(index);
        }
        Ok(found)
    }

    /// Turns IPv6 off on interface `ifname` (or `all` / `default`) of this handle's
    /// namespace. Our interfaces carry only IPv4; with IPv6 on, every link that comes up sends
    /// router solicitations and MLD reports that the datapath can only count as drops.
    /// A kernel without IPv6 has nothing to turn off, which counts as success.
    pub async fn disable_ipv6(&self, ifname: &str) -> Result<()> {
        if ifname != "all" && ifname != "default" {
            validate_ifname(ifname)?;
        }
        let write = || write_disable_ipv6(ifname);
        let res = match &self.netns_path {
            None => write(),
            Some(path) => run_in_netns(path, write)?,
        };
        res.map_err(|source| NetlinkError::Sysctl {
            what: format!("net.ipv6.conf.{ifname}.disable_ipv6"),
            netns: self.netns.clone(),
            source,
        })
    }

    /// The name of the interface that holds `ip` (e.g. the uplink carrying the node's
    /// advertise address), or `None` if no interface has it.
    pub async fn interface_with_address(&self, ip: Ipv4Addr) -> Result<Option<String>> {
        let want = IpAddr::V4(ip);
        let mut stream = self.handle.address().get().execute();
        let mut index = None;
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(self.req_err("listing addresses", ip.to_string()))?
        {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
            // point-to-point links, so prefer LOCAL and fall back to ADDRESS.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(a) => Some(*a),
                _ => None,
            });
            let addr = local.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(a) => Some(*a),
                    _ => None,
                })
            });
            if addr == Some(want) {
                index = Some(msg.header.index);
                // Keep draining: abandoning a dump mid-way leaves its remaining parts queued.
            }
        }
        match index {
            Some(i) => self.link_name(i).await,
            None => Ok(None),
        }
    }

    /// Creates a veth pair: `host` here with `host_mac`, and `peer` created directly inside
    /// the namespace open as `peer_netns` with `peer_mac`, both with `mtu`. Both ends start
    /// down. Creating the peer in place (rather than here and then moving it) means the inside
    /// name never has to be free in this namespace and nothing needs renaming.
    pub async fn add_veth(
        &self,
        host: &str,
        host_mac: [u8; 6],
        peer: &str,
        peer_mac: [u8; 6],
        peer_netns: &File,
        mtu: u32,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        validate_ifname(host)?;
        validate_ifname(peer)?;
        let peer_msg = LinkUnspec::new_with_name(peer)
            .address(peer_mac.to_vec())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        // LinkVeth::new fills in a bare peer message; ours carries MAC, MTU and netns.
        let msg = LinkVeth::new(host, peer)
            .address(host_mac.to_vec())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(self.req_err("creating veth", format!("{host} (peer {peer})")))
    }
}

/// Writes 1 to /proc/sys/net/ipv6/conf/<ifname>/disable_ipv6 as seen by the calling thread
/// (the kernel resolves /proc/sys/net in the network namespace of the thread that opens it).
pub fn write_disable_ipv6(ifname: &str) -> std::io::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match std::fs::write(&path, b"1") {
        Ok(()) => Ok(()),
        // No IPv6 in this kernel (or on this device): nothing to disable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(std::io::Error::new(e.kind(), format!("{path}: {e}"))),
    }
}

/// The IFLA_IFNAME of a link message.
pub fn link_ifname(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// The link-layer address, if it is a 6-byte (Ethernet) one.
pub fn link_mac(msg: &LinkMessage) -> Option<[u8; 6]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => <[u8; 6]>::try_from(a.as_slice()).ok(),
        _ => None,
    })
}

/// Whether the administrative up flag is set.
pub fn link_is_up(msg: &LinkMessage) -> bool {
    msg.header.flags.contains(LinkFlags::Up)
}
