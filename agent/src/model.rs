//! Cluster objects as they are stored, and the validation of what users ask for.
//!
//! Everything here is pure: no store, no kernel. The API turns these errors into HTTP answers.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Key layout in the store. One prefix per object kind so each can be listed and watched.
pub mod keys {
    pub const ROOT: &str = "/netagent/";
    pub const NETWORKS: &str = "/netagent/networks/";
    pub const VNIS: &str = "/netagent/vnis/";
    pub const NODES: &str = "/netagent/nodes/";
    pub const ALIVE: &str = "/netagent/alive/";
    pub const CONTAINERS: &str = "/netagent/containers/";
    /// `/netagent/endpoints/<network>/<container>`: what every node needs to route to it.
    pub const ENDPOINTS: &str = "/netagent/endpoints/";
    /// `/netagent/ipam/<network>/<ip>`: one key per taken address, so allocation is a
    /// create-if-absent in the same transaction as the endpoint.
    pub const IPAM: &str = "/netagent/ipam/";
    pub const SERVICES: &str = "/netagent/services/";
    /// `/netagent/ports/<proto>/<published>`: a published port belongs to one service.
    pub const PORTS: &str = "/netagent/ports/";
    /// `/netagent/service-ids/<id>`: the datapath's numeric service ids, unique cluster-wide.
    pub const SERVICE_IDS: &str = "/netagent/service-ids/";
    /// Bumped by every network create/remove: the compare on it serialises network allocation
    /// cluster-wide, so overlap checks and VNI choice never race.
    pub const NETWORKS_GUARD: &str = "/netagent/guards/networks";
    /// `/netagent/tunnel-addrs/<ip>`: a node's address on the WireGuard tunnel devices.
    pub const TUNNEL_ADDRS: &str = "/netagent/tunnel-addrs/";

    /// `/netagent/tasks/<id>`: a service's task, written by the leader.
    pub const TASKS: &str = "/netagent/tasks/";
    /// `/netagent/task-status/<id>`: a task as its node reports it (the node's key alone).
    pub const TASK_STATUS: &str = "/netagent/task-status/";
    /// `/netagent/orchestrator/<service>`: bumped by every leader write for the service; the
    /// leader compares it, so a plan made from a view that missed its own last write fails.
    pub const ORCHESTRATOR: &str = "/netagent/orchestrator/";
    /// The leader's key, held under its lease; its revision fences the leader's writes.
    pub const LEADER: &str = "/netagent/leader";
    /// `/netagent-secrets/<name>`: outside `ROOT` on purpose, so secret values are never part
    /// of the watched (and saved) cluster view; agents read one when a task needs it.
    pub const SECRETS: &str = "/netagent-secrets/";

    pub fn task(id: &str) -> String {
        format!("{TASKS}{id}")
    }
    pub fn task_status(id: &str) -> String {
        format!("{TASK_STATUS}{id}")
    }
    pub fn orchestrator(service: &str) -> String {
        format!("{ORCHESTRATOR}{service}")
    }
    pub fn secret(name: &str) -> String {
        format!("{SECRETS}{name}")
    }

    pub fn tunnel_addr(ip: std::net::Ipv4Addr) -> String {
        format!("{TUNNEL_ADDRS}{ip}")
    }

    pub fn network(name: &str) -> String {
        format!("{NETWORKS}{name}")
    }
    pub fn vni(vni: u32) -> String {
        format!("{VNIS}{vni}")
    }
    pub fn node(name: &str) -> String {
        format!("{NODES}{name}")
    }
    pub fn alive(name: &str) -> String {
        format!("{ALIVE}{name}")
    }
    pub fn container(name: &str) -> String {
        format!("{CONTAINERS}{name}")
    }
    pub fn endpoints_of(network: &str) -> String {
        format!("{ENDPOINTS}{network}/")
    }
    pub fn endpoint(network: &str, container: &str) -> String {
        format!("{ENDPOINTS}{network}/{container}")
    }
    pub fn ipam_of(network: &str) -> String {
        format!("{IPAM}{network}/")
    }
    pub fn ipam(network: &str, ip: std::net::Ipv4Addr) -> String {
        format!("{IPAM}{network}/{ip}")
    }
    pub fn service(name: &str) -> String {
        format!("{SERVICES}{name}")
    }
    pub fn port(proto: super::Protocol, published: u16) -> String {
        format!("{PORTS}{}/{published}", proto.as_str())
    }
    pub fn service_id(id: u32) -> String {
        format!("{SERVICE_IDS}{id}")
    }
}

/// VXLAN network identifiers we hand out. Docker starts overlay VNIs at 4096; so do we, which
/// leaves the low range for anything an operator configures by hand.
pub const VNI_MIN: u32 = 4096;
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// Bytes a VXLAN-over-IPv4 encapsulation adds (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes WireGuard over IPv4 adds (IPv4 20 + UDP 8 + WireGuard header 16 + tag 16).
pub const WIREGUARD_OVERHEAD: u32 = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError::Invalid(msg.into())
}

/// An overlay network as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub id: String,
    pub driver: String,
    pub vni: u32,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub encrypted: bool,
    pub attachable: bool,
    /// `--internal`: no egress (Docker's internal networks); containers reach only their own
    /// overlay networks.
    #[serde(default)]
    pub internal: bool,
    /// Explicit `--opt mtu=N`; `None` means "uplink MTU minus encapsulation", decided per node.
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, UTC.
    pub created: String,
}

impl Network {
    /// Encapsulation overhead of this network's packets on the uplink.
    pub fn overhead(&self) -> u32 {
        if self.encrypted {
            VXLAN_OVERHEAD + WIREGUARD_OVERHEAD
        } else {
            VXLAN_OVERHEAD
        }
    }

    /// MTU of container interfaces on this network, on a node whose uplink has `uplink_mtu`.
    pub fn effective_mtu(&self, uplink_mtu: u32) -> u32 {
        self.mtu
            .unwrap_or_else(|| uplink_mtu.saturating_sub(self.overhead()))
    }
}

/// What `network create` asks for, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    #[serde(default)]
    pub driver: Option<String>,
    pub subnet: String,
    #[serde(default)]
    pub gateway: Option<String>,
    /// Docker-style `--opt` values: `encrypted`, `mtu=N`.
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub attachable: bool,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A validated request: everything but the cluster-wide parts (id, VNI, overlap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub encrypted: bool,
    pub attachable: bool,
    pub internal: bool,
    pub mtu: Option<u32>,
    pub labels: BTreeMap<String, String>,
}

/// Names of networks, services, containers and nodes: what Docker accepts, kept short enough to
/// appear in interface names and DNS labels.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(invalid(format!("{kind} name must not be empty")));
    }
    if name.len() > 63 {
        return Err(invalid(format!(
            "{kind} name {name:?} is longer than 63 characters"
        )));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok {
        return Err(invalid(format!(
            "invalid {kind} name {name:?}: use letters, digits, '-', '_' and '.', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Whether encrypted networks can be honoured (the WireGuard datapath exists).
pub const ENCRYPTION_AVAILABLE: bool = true;

/// The nodes' addresses on their WireGuard tunnel devices. Link-local, which no overlay may
/// use (see `parse_subnet`), and routed only into the tunnel devices, with an unreachable
/// route under them so nothing addressed here ever leaves in clear.
pub const TUNNEL_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(169, 254, 128, 0), 17);

pub const MTU_MIN: u32 = 576;
pub const MTU_MAX: u32 = 9000;

impl NetworkCreate {
    pub fn validate(&self) -> Result<NetworkSpec, ValidationError> {
        validate_name("network", &self.name)?;
        match self.driver.as_deref() {
            None | Some("overlay") => {}
            Some(other) => {
                return Err(invalid(format!(
                    "unknown driver {other:?}: only \"overlay\" is supported"
                )));
            }
        }
        let subnet = parse_subnet(&self.subnet)?;
        let gateway = match &self.gateway {
            Some(g) => {
                let gw: Ipv4Addr = g
                    .parse()
                    .map_err(|_| invalid(format!("invalid gateway {g:?}: not an IPv4 address")))?;
                if !subnet.contains(&gw) {
                    return Err(invalid(format!(
                        "gateway {gw} is not inside subnet {subnet}"
                    )));
                }
                if gw == subnet.network() || gw == subnet.broadcast() {
                    return Err(invalid(format!(
                        "gateway {gw} is the network or broadcast address of {subnet}"
                    )));
                }
                gw
            }
            // Docker's default: the first usable address.
            None => first_host(subnet),
        };
        let mut encrypted = false;
        let mut mtu = None;
        for opt in &self.options {
            match opt.split_once('=') {
                None if opt == "encrypted" => encrypted = true,
                Some(("encrypted", v)) => {
                    encrypted = parse_bool(v).ok_or_else(|| {
                        invalid(format!("invalid value {v:?} for --opt encrypted"))
                    })?
                }
                Some(("mtu", v)) => {
                    let n: u32 = v
                        .parse()
                        .map_err(|_| invalid(format!("invalid --opt mtu={v}: not a number")))?;
                    if !(MTU_MIN..=MTU_MAX).contains(&n) {
                        return Err(invalid(format!(
                            "invalid --opt mtu={n}: must be between {MTU_MIN} and {MTU_MAX}"
                        )));
                    }
                    mtu = Some(n);
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown --opt {opt:?} (known: encrypted, mtu=N)"
                    )));
                }
            }
        }
        for k in self.labels.keys() {
            if k.is_empty() {
                return Err(invalid("label key must not be empty"));
            }
        }
        // Refused rather than recorded: a network that claims to be encrypted while its packets
        // cross the wire in clear would be worse than no network.
        if encrypted && !ENCRYPTION_AVAILABLE {
            return Err(invalid(
                "--opt encrypted is not available in this build: the WireGuard tunnels are not \
                 implemented yet, and traffic would cross the wire unencrypted",
            ));
        }
        Ok(NetworkSpec {
            name: self.name.clone(),
            subnet,
            gateway,
            encrypted,
            attachable: self.attachable,
            internal: self.internal,
            mtu,
            labels: self.labels.clone(),
        })
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// Parses an IPv4 subnet in CIDR form, refusing host bits and subnets too small for a gateway
/// and one container.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, ValidationError> {
    let net: Ipv4Net = s.parse().map_err(|_| {
        invalid(format!(
            "invalid subnet {s:?}: expected IPv4 CIDR like 10.10.1.0/24"
        ))
    })?;
    if net.trunc() != net {
        return Err(invalid(format!(
            "subnet {s} has host bits set (did you mean {}?)",
            net.trunc()
        )));
    }
    if net.prefix_len() > 29 {
        return Err(invalid(format!(
            "subnet {s} is too small: use a prefix of /29 or shorter"
        )));
    }
    if net.prefix_len() < 8 {
        return Err(invalid(format!(
            "subnet {s} is too large: use a prefix of /8 or longer"
        )));
    }
    for (range, what) in RESERVED_RANGES {
        let range: Ipv4Net = range.parse().map_err(|_| invalid("bad reserved range"))?;
        if range.contains(&net.network()) || net.contains(&range.network()) {
            return Err(invalid(format!(
                "subnet {s} overlaps {range}, which is {what}"
            )));
        }
    }
    Ok(net)
}

/// Address ranges an overlay may not use: traffic to them never reaches the overlay
/// correctly (or at all), whatever the datapath does.
const RESERVED_RANGES: [(&str, &str); 5] = [
    ("0.0.0.0/8", "\"this network\" (RFC 791)"),
    ("127.0.0.0/8", "loopback"),
    (
        "169.254.0.0/16",
        "link-local (the datapath uses it for hairpin connections)",
    ),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (RFC 1112) and broadcast"),
];

fn first_host(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

/// The first network whose subnet overlaps `subnet`, if any.
pub fn find_overlap<'a>(
    subnet: Ipv4Net,
    existing: impl IntoIterator<Item = &'a Network>,
) -> Option<&'a Network> {
    existing
        .into_iter()
        .find(|n| n.subnet.contains(&subnet.network()) || subnet.contains(&n.subnet.network()))
}

/// The lowest VNI not in `used`.
pub fn lowest_free_vni(used: impl IntoIterator<Item = u32>) -> Option<u32> {
    let mut used: Vec<u32> = used.into_iter().collect();
    used.sort_unstable();
    used.dedup();
    let mut candidate = VNI_MIN;
    for v in used {
        if v < candidate {
            continue;
        }
        if v > candidate {
            break;
        }
        candidate += 1;
    }
    (candidate <= VNI_MAX).then_some(candidate)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Drain,
}

impl std::str::FromStr for Availability {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Availability::Active),
            "drain" => Ok(Availability::Drain),
            other => Err(invalid(format!(
                "invalid availability {other:?}: expected active or drain"
            ))),
        }
    }
}

/// A node as stored: persistent, outlives its agent. Liveness is a separate, leased key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub address: Ipv4Addr,
    pub availability: Availability,
    /// RFC 3339, UTC: first registration.
    pub created: String,
    /// MTU of the node's uplink, as its agent last reported it.
    #[serde(default)]
    pub uplink_mtu: Option<u32>,
    /// Ports the cluster itself uses on this node's address (VXLAN, the store, the agent's
    /// listeners): never publishable, since the routing mesh would take them over.
    #[serde(default)]
    pub reserved_ports: Vec<ReservedPort>,
    /// The node's end of the encrypted tunnels, once its agent has one.
    #[serde(default)]
    pub wireguard: Option<NodeWireguard>,
    /// Set with `node update --label-add`; matched by `node.labels.*` constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What other nodes need to tunnel to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeWireguard {
    /// Base64, as `wg` prints keys.
    pub public_key: String,
    /// UDP port on the node's address.
    pub port: u16,
    /// The node's address on the tunnel devices (in [`TUNNEL_RANGE`]).
    pub tunnel_addr: Ipv4Addr,
}

/// A port the cluster uses on a node's address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReservedPort {
    pub port: u16,
    pub protocol: Protocol,
    /// What uses it, for the error message ("VXLAN", "etcd", ...).
    pub what: String,
}

/// The leased liveness record of a running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alive {
    pub pid: u32,
    pub started: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

/// A container's attachment to one network, as every node sees it (routing, DNS, balancing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    /// The container (or external attachment) it belongs to.
    pub container: String,
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub node: String,
    /// Interface name inside the sandbox (eth0, eth1, ...).
    pub ifname: String,
    /// Host-side veth name on `node`.
    pub host_ifname: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Whether the endpoint takes new connections and is handed out by DNS as a task of its
    /// service. Cleared when its process exits and before it is removed, so the balancer
    /// never sends new connections to a replica that cannot answer them.
    #[serde(default = "yes")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerKind {
    /// A sandbox the agent made: its own namespace and process.
    Sandbox,
    /// A namespace someone else made (the CNI-shaped attach call); the agent owns only the
    /// interface it put there.
    External,
}

/// A container as stored. Its endpoints are stored separately (see [`Endpoint`]) because
/// other nodes watch those, not this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub id: String,
    pub kind: ContainerKind,
    pub node: String,
    /// Path usable with `nsenter --net=`.
    pub netns: String,
    pub networks: Vec<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    /// Start time of `pid` in clock ticks since boot: tells a restarted agent whether the pid
    /// still names our process.
    #[serde(default)]
    pub start_time: Option<u64>,
    pub created: String,
    /// Set once the process has ended: its exit status as a shell reports it (`None` inside
    /// when the agent that saw it end was not its parent), and when.
    #[serde(default)]
    pub exit: Option<ContainerExit>,
    /// The service task it runs, for containers the orchestrator started.
    #[serde(default)]
    pub task: Option<String>,
    /// The CNI attachment it is (external containers attached by `netagent-cni`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniIdentity>,
}

/// What CNI names an attachment by: the runtime's container id and the interface name, and
/// the CNI network (the configuration's `name`) it was added through, which scopes GC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniIdentity {
    pub container_id: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

impl CniIdentity {
    /// The same attachment: container id and interface (the CNI network is not part of the
    /// name; DEL and CHECK do not carry it).
    pub fn same(&self, other: &CniIdentity) -> bool {
        self.container_id == other.container_id && self.ifname == other.ifname
    }
}

/// How a container's process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerExit {
    /// The status as a shell reports it (code, or 128 + signal); `None` if unknown.
    pub code: Option<i32>,
    /// RFC 3339, UTC.
    pub at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One published port: `PUBLISHED:TARGET[/PROTO]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortConfig {
    pub published: u16,
    pub target: u16,
    pub protocol: Protocol,
}

fn parse_port(what: &str, s: &str, spec: &str) -> Result<u16, ValidationError> {
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        Ok(n) => Err(invalid(format!(
            "invalid --publish {spec:?}: {what} port {n} is outside 1-65535"
        ))),
        Err(_) => Err(invalid(format!(
            "invalid --publish {spec:?}: {what} port {s:?} is not a number"
        ))),
    }
}

fn parse_protocol(p: &str, spec: &str) -> Result<Protocol, ValidationError> {
    match p {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        other => Err(invalid(format!(
            "invalid --publish {spec:?}: unknown protocol {other:?} (tcp or udp)"
        ))),
    }
}

impl PortConfig {
    /// Parses Docker's short syntax `PUBLISHED:TARGET[/tcp|/udp]`.
    pub fn parse(spec: &str) -> Result<Self, ValidationError> {
        let (ports, proto) = match spec.split_once('/') {
            Some((p, proto)) => (p, parse_protocol(proto, spec)?),
            None => (spec, Protocol::Tcp),
        };
        let Some((published, target)) = ports.split_once(':') else {
            return Err(invalid(format!(
                "invalid --publish {spec:?}: expected PUBLISHED:TARGET[/tcp|/udp]"
            )));
        };
        let published = parse_port("published", published, spec)?;
        let target = parse_port("target", target, spec)?;
        if proto == Protocol::Udp && published == 4789 {
            return Err(invalid(
                "published port 4789/udp is the VXLAN port of the overlay itself",
            ));
        }
        Ok(PortConfig {
            published,
            target,
            protocol: proto,
        })
    }

    /// Parses `PUBLISHED[/proto]`, the form `--publish-rm` takes (a full spec is accepted too).
    pub fn parse_published(spec: &str) -> Result<(u16, Protocol), ValidationError> {
        let (port, proto) = match spec.split_once('/') {
            Some((p, proto)) => (p, parse_protocol(proto, spec)?),
            None => (spec, Protocol::Tcp),
        };
        let port = port.split_once(':').map_or(port, |(p, _)| p);
        Ok((parse_port("published", port, spec)?, proto))
    }
}

impl std::fmt::Display for PortConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.published,
            self.target,
            self.protocol.as_str()
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    #[default]
    Vip,
    Dnsrr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNetwork {
    pub network: String,
    /// `None` with `--endpoint-mode dnsrr`.
    pub vip: Option<Ipv4Addr>,
}

/// A service as stored. Its replicas are the endpoints whose `service` names it: the tasks
/// the orchestrator runs from `spec`, and containers started by hand with `--service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub id: String,
    /// The datapath's numeric id (map keys), unique cluster-wide.
    pub num: u32,
    pub endpoint_mode: EndpointMode,
    pub networks: Vec<ServiceNetwork>,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    pub created: String,
    /// What its tasks run; `None`: a VIP for hand-made replicas only.
    #[serde(default)]
    pub spec: Option<netagent_orchestrator::ServiceSpec>,
    /// The spec before the last update, for `service rollback`.
    #[serde(default)]
    pub previous_spec: Option<netagent_orchestrator::ServiceSpec>,
    /// Bumped by every change of the spec.
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub update_status: Option<netagent_orchestrator::UpdateStatus>,
    /// Service labels (`--label`): metadata, changing them restarts nothing.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub updated: Option<String>,
}

/// MAC of an endpoint, derived from its address the way Docker does (02:42 + IPv4), so it is
/// stable across restarts and unique wherever the address is.
pub fn endpoint_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The lowest address of `subnet` that is neither network, broadcast, gateway nor in `used`.
pub fn lowest_free_ip(
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    used: &std::collections::BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let first = u32::from(subnet.network()) + 1;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| *ip != gateway && !used.contains(ip))
}

/// Checks a requested `--ip` against the network.
pub fn validate_requested_ip(net: &Network, ip: Ipv4Addr) -> Result<(), ValidationError> {
    if !net.subnet.contains(&ip) {
        return Err(invalid(format!(
            "address {ip} is not inside subnet {} of network {:?}",
            net.subnet, net.name
        )));
    }
    if ip == net.subnet.network() || ip == net.subnet.broadcast() {
        return Err(invalid(format!(
            "address {ip} is the network or broadcast address of {}",
            net.subnet
        )));
    }
    if ip == net.gateway {
        return Err(invalid(format!(
            "address {ip} is the gateway of network {:?}",
            net.name
        )));
    }
    Ok(())
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

pub fn new_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..24)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(subnet: &str) -> NetworkCreate {
        NetworkCreate {
            name: "services".into(),
            subnet: subnet.into(),
            ..Default::default()
        }
    }

    fn net(name: &str, subnet: &str, vni: u32) -> Network {
        Network {
            name: name.into(),
            id: new_id(),
            driver: "overlay".into(),
            vni,
            subnet: subnet.parse().unwrap(),
            gateway: first_host(subnet.parse().unwrap()),
            encrypted: false,
            attachable: false,
            internal: false,
            mtu: None,
            labels: BTreeMap::new(),
            created: now_rfc3339(),
        }
    }

    #[test]
    fn defaults_gateway_to_first_address() {
        let spec = req("10.10.1.0/24").validate().unwrap();
        assert_eq!(spec.gateway, Ipv4Addr::new(10, 10, 1, 1));
        assert!(!spec.encrypted);
        assert_eq!(spec.mtu, None);
    }

    #[test]
    fn rejects_bad_subnets() {
        let e = req("10.10.1.0/33").validate().unwrap_err().to_string();
        assert!(e.contains("invalid subnet"), "{e}");
        let e = req("banana").validate().unwrap_err().to_string();
        assert!(e.contains("invalid subnet \"banana\""), "{e}");
        let e = req("10.10.1.5/24").validate().unwrap_err().to_string();
        assert!(e.contains("host bits") && e.contains("10.10.1.0/24"), "{e}");
        let e = req("10.10.1.0/30").validate().unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
        for (s, why) in [
            ("0.0.0.0/8", "this network"),
            ("127.1.0.0/16", "loopback"),
            ("169.254.0.0/24", "link-local"),
            ("232.0.0.0/8", "multicast"),
            ("248.0.0.0/8", "reserved"),
            ("224.0.0.0/3", "too large"),
        ] {
            let e = req(s).validate().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn gateway_must_be_inside_and_usable() {
        let mut r = req("10.10.1.0/24");
        r.gateway = Some("10.20.0.1".into());
        let e = r.validate().unwrap_err().to_string();
        assert_eq!(e, "gateway 10.20.0.1 is not inside subnet 10.10.1.0/24");
        r.gateway = Some("10.10.1.255".into());
        assert!(r.validate().unwrap_err().to_string().contains("broadcast"));
        r.gateway = Some("10.10.1.254".into());
        assert_eq!(r.validate().unwrap().gateway, Ipv4Addr::new(10, 10, 1, 254));
    }

    #[test]
    fn driver_and_options() {
        let mut r = req("10.10.1.0/24");
        r.driver = Some("bridge".into());
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("unknown driver \"bridge\"")
        );
        r.driver = Some("overlay".into());
        r.options = vec!["encrypted=false".into(), "mtu=1400".into()];
        let spec = r.validate().unwrap();
        assert!(!spec.encrypted);
        assert_eq!(spec.mtu, Some(1400));
        r.options = vec!["encrypted".into()];
        assert!(r.validate().unwrap().encrypted);
        r.options = vec!["mtu=100".into()];
        assert!(r.validate().unwrap_err().to_string().contains("between"));
        r.options = vec!["colour=blue".into()];
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("unknown --opt \"colour=blue\"")
        );
    }

    #[test]
    fn names() {
        assert!(validate_name("network", "services").is_ok());
        assert!(validate_name("network", "a.b-c_d").is_ok());
        assert!(validate_name("network", "").is_err());
        assert!(validate_name("network", "-x").is_err());
        assert!(validate_name("network", "a b").is_err());
        assert!(validate_name("network", &"x".repeat(64)).is_err());
    }

    #[test]
    fn overlap_both_directions() {
        let existing = [
            net("a", "10.10.0.0/16", 4096),
            net("b", "10.20.1.0/24", 4097),
        ];
        assert_eq!(
            find_overlap("10.10.1.0/24".parse().unwrap(), &existing).map(|n| n.name.as_str()),
            Some("a")
        );
        assert_eq!(
            find_overlap("10.20.0.0/16".parse().unwrap(), &existing).map(|n| n.name.as_str()),
            Some("b")
        );
        assert!(find_overlap("10.30.0.0/16".parse().unwrap(), &existing).is_none());
    }

    #[test]
    fn vni_allocation_fills_gaps() {
        assert_eq!(lowest_free_vni([]), Some(VNI_MIN));
        assert_eq!(lowest_free_vni([4096, 4097, 4099]), Some(4098));
        assert_eq!(lowest_free_vni([4097, 4096]), Some(4098));
        assert_eq!(lowest_free_vni([5, 4097]), Some(4096));
    }

    #[test]
    fn effective_mtu_subtracts_overhead() {
        let mut n = net("a", "10.10.0.0/16", 4096);
        assert_eq!(n.effective_mtu(1500), 1450);
        n.encrypted = true;
        assert_eq!(n.effective_mtu(1500), 1390);
        n.mtu = Some(1300);
        assert_eq!(n.effective_mtu(1500), 1300);
    }

    #[test]
    fn ip_allocation_skips_gateway_and_used() {
        let subnet: Ipv4Net = "10.10.1.0/29".parse().unwrap();
        let gw = Ipv4Addr::new(10, 10, 1, 1);
        let mut used = std::collections::BTreeSet::new();
        assert_eq!(
            lowest_free_ip(subnet, gw, &used),
            Some(Ipv4Addr::new(10, 10, 1, 2))
        );
        used.extend((2..=5).map(|i| Ipv4Addr::new(10, 10, 1, i)));
        assert_eq!(
            lowest_free_ip(subnet, gw, &used),
            Some(Ipv4Addr::new(10, 10, 1, 6))
        );
        used.insert(Ipv4Addr::new(10, 10, 1, 6));
        // .7 is broadcast: the /29 is full.
        assert_eq!(lowest_free_ip(subnet, gw, &used), None);
    }

    #[test]
    fn requested_ip_rules() {
        let n = net("services", "10.10.1.0/24", 4096);
        assert!(validate_requested_ip(&n, "10.10.1.9".parse().unwrap()).is_ok());
        for bad in ["10.10.2.9", "10.10.1.0", "10.10.1.255", "10.10.1.1"] {
            assert!(
                validate_requested_ip(&n, bad.parse().unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn publish_specs() {
        let p = PortConfig::parse("8080:80").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol),
            (8080, 80, Protocol::Tcp)
        );
        assert_eq!(p.to_string(), "8080:80/tcp");
        let p = PortConfig::parse("53:5353/udp").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol),
            (53, 5353, Protocol::Udp)
        );
        for (bad, why) in [
            ("0:80", "outside 1-65535"),
            ("70000:80", "outside 1-65535"),
            ("80:99999", "outside 1-65535"),
            ("80", "expected PUBLISHED:TARGET"),
            ("x:80", "not a number"),
            ("80:80/sctp", "unknown protocol"),
            ("4789:4789/udp", "VXLAN"),
        ] {
            let e = PortConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(
            PortConfig::parse_published("8080").unwrap(),
            (8080, Protocol::Tcp)
        );
        assert_eq!(
            PortConfig::parse_published("53/udp").unwrap(),
            (53, Protocol::Udp)
        );
        assert_eq!(
            PortConfig::parse_published("8080:80/udp").unwrap(),
            (8080, Protocol::Udp)
        );
        assert!(PortConfig::parse_published("0").is_err());
    }

    #[test]
    fn macs() {
        let m = endpoint_mac(Ipv4Addr::new(10, 10, 1, 5));
        assert_eq!(format_mac(m), "02:42:0a:0a:01:05");
        assert_eq!(parse_mac("02:42:0a:0a:01:05"), Some(m));
        assert_eq!(parse_mac("02:42:0a"), None);
    }

    #[test]
    fn request_rejects_unknown_fields() {
        let e = serde_json::from_str::<NetworkCreate>(
            r#"{"name":"a","subnet":"10.0.0.0/24","bogus":1}"#,
        );
        assert!(e.is_err());
    }
}
