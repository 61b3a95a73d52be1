//! The agent's handle on the eBPF datapath: the embedded object, loading with pinned maps,
//! typed map access and attachment.
//!
//! State lives in bpffs, not in this process: maps are pinned under the agent's `--bpf-dir`
//! and reused on the next [`Datapath::load`], and attachments are pinned TCX links, so the
//! datapath keeps forwarding while the agent restarts, and a restarted agent atomically swaps
//! in its programs. [`remove_pins`] is the teardown.
//!
//! ```text
//! <bpf_dir>/CONFIG, DROP_COUNTERS, DROP_EVENTS,     pinned maps (dataplane_common::map_names)
//!           ENDPOINTS, NETWORKS, SERVICES,
//!           BACKEND_SETS, BACKENDS, RR_CURSORS,
//!           PUBLISHED, CONNTRACK
//! <bpf_dir>/links/from_container@<ifname>           pinned TCX links ('.' in ifname -> ':')
//! <bpf_dir>/links/from_overlay@<ifname>
//! <bpf_dir>/links/from_uplink@<ifname>
//! ```
//!
//! Routing state: [`Datapath::upsert_endpoint`] / [`Datapath::upsert_network`] and their
//! `remove_*` and listing counterparts (see the `routing` module).
//!
//! Load balancing (see the `lb` module):
//!
//! ```text
//! set_lb_config(LbConfig { node_ip, uplink_ifindex, .. })   once, after load
//! attach_from_uplink(uplink)                                 routing mesh on the node address
//! set_backends(id, &[replica addresses on one network])     a backend set (per service+network)
//! upsert_service(vip, &ServiceInfo { id, vni, flags: 0 })   a VIP on that network -> set id
//! upsert_published(port, proto, &PublishedInfo::new(id, target))
//! ```
//!
//! Backends must also be in ENDPOINTS (local or remote), like any destination: the balanced
//! packet is routed to them by address. Removing a replica from a set stops new connections
//! to it; its existing ones continue on their conntrack entries until idle.

mod bpffs;
mod compat;
mod conntrack;
mod error;
mod events;
mod lb;
mod routing;
mod stats;
mod sys;
mod test_hooks;

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
};
pub use bpffs::{is_bpffs, mount_bpffs, remove_pins};
pub use compat::PinReport;
pub use conntrack::{CtGcStats, live_entry_expired, monotonic_coarse_ns};
pub use dataplane_common::{
    BACKEND_SETS_MAX_ENTRIES, BACKENDS_MAX_ENTRIES, BACKENDS_PER_SET_MAX, Backend, BackendKey,
    BackendSet, CONFIG_F_DEVICE_ENCAP, CONFIG_F_READY, CONNTRACK_MAX_ENTRIES,
    CT_CLOSE_TIMEOUT_DEFAULT_S, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_CLOSING, CT_F_ENCRYPTED,
    CT_F_HAIRPIN, CT_NEW_MAX_ENTRIES, CT_SYN_TIMEOUT_DEFAULT_S, CT_TCP_TIMEOUT_DEFAULT_S,
    CT_UDP_TIMEOUT_DEFAULT_S, Config, CtEntry, CtKey, CtKind, DropEvent, DropReason,
    EGRESS_PORT_MAX_DEFAULT, EGRESS_PORT_MIN_DEFAULT, ENDPOINT_F_ENCRYPTED, ENDPOINT_F_INTERNAL,
    ENDPOINT_F_LOCAL, ENDPOINT_F_REPLICA, ENDPOINTS_MAX_ENTRIES, EndpointInfo, FlowStatKey,
    ForwardAction, HAIRPIN_SNAT_IP, Hook, L4Proto, MESH_INNER_SRC_MAC, NETWORK_F_ENCRYPTED,
    NETWORK_F_INTERNAL, NETWORKS_MAX_ENTRIES, NODE_F_TUNNEL_ADDR, NODES_MAX_ENTRIES, NetworkInfo,
    NodeInfo, PUBLISHED_MAX_ENTRIES, PublishedInfo, PublishedKey, RrCursor, SERVICES_MAX_ENTRIES,
    ServiceInfo, TRACE_REASON, TestInput, TestObservation, TrafficCounter, VNI_MAX, map_names,
    node_ip_from_abi, node_ip_to_abi, program_names,
};
use dataplane_common::{CONFIG_KEY, DROP_COUNTER_EVENTS_LOST, DROP_COUNTERS_MAX_ENTRIES};
pub use error::DatapathError;
pub use events::DropEvents;
pub use routing::Subnet;
pub use stats::MapUsage;
use tracing::{debug, info, warn};

/// The eBPF object built by `build.rs` (empty when built with `AYA_BUILD_SKIP`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

/// Default pin directory when the agent is given no `--bpf-dir`.
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/netagent";

/// Subdirectory of the pin directory holding pinned links.
const LINKS_DIR: &str = "links";

/// Node-wide datapath settings chosen by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// MAC the containers see as their router (ARP replies, routed frames). Must be a unicast
    /// address; a locally administered one (first octet with bit 1 set) avoids clashes.
    pub router_mac: [u8; 6],
    /// ifindex of the node's collect-metadata VXLAN device (in the agent's network
    /// namespace). 0 = not created yet: remote destinations are dropped as
    /// `no_tunnel_device` until [`Datapath::set_config`] supplies it. See [`Datapath::load`]
    /// for how 0 is treated on a restart.
    pub vxlan_ifindex: u32,
}

/// Node-wide load-balancer settings, kept apart from [`DatapathConfig`] so code that builds
/// that struct literally keeps compiling. [`Datapath::load`] keeps the ones a previous agent
/// left in the pinned config (defaults on a fresh node); set them with
/// [`Datapath::set_lb_config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbConfig {
    /// The node's advertise address: published ports answer on it (routing mesh) and the
    /// replies of those connections leave with it as source. `None` turns the mesh off.
    pub node_ip: Option<Ipv4Addr>,
    /// ifindex of the uplink, the device `node_ip` is on (in the agent's network namespace):
    /// routing-mesh replies are sent out of it. 0 = unknown: such replies are dropped as
    /// `no_uplink`.
    pub uplink_ifindex: u32,
    /// Idle timeout of TCP connections through a VIP or published port (whole seconds, at
    /// least 1; the fraction is ignored). Default 6 hours.
    pub tcp_timeout: Duration,
    /// Idle timeout of UDP flows (as above). Default 5 minutes.
    pub udp_timeout: Duration,
    /// Idle timeout of a TCP connection whose handshake has not completed. Default 60 s.
    pub syn_timeout: Duration,
    /// Idle timeout of a TCP connection after FIN or RST. Default 10 s.
    pub close_timeout: Duration,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            node_ip: None,
            uplink_ifindex: 0,
            tcp_timeout: Duration::from_secs(CT_TCP_TIMEOUT_DEFAULT_S.into()),
            udp_timeout: Duration::from_secs(CT_UDP_TIMEOUT_DEFAULT_S.into()),
            syn_timeout: Duration::from_secs(CT_SYN_TIMEOUT_DEFAULT_S.into()),
            close_timeout: Duration::from_secs(CT_CLOSE_TIMEOUT_DEFAULT_S.into()),
        }
    }
}

impl LbConfig {
    /// Writes the load-balancer fields of `abi`.
    fn apply(&self, abi: &mut Config) -> Result<(), DatapathError> {
        let secs = |what: &str, d: Duration| {
            u32::try_from(d.as_secs())
                .ok()
                .filter(|s| *s >= 1)
                .ok_or_else(|| {
                    DatapathError::InvalidConfig(format!(
                        "{what} timeout {d:?} is outside 1 s..={} s",
                        u32::MAX
                    ))
                })
        };
        abi.ct_tcp_timeout_s = secs("TCP", self.tcp_timeout)?;
        abi.ct_udp_timeout_s = secs("UDP", self.udp_timeout)?;
        abi.ct_syn_timeout_s = secs("TCP handshake", self.syn_timeout)?;
        abi.ct_close_timeout_s = secs("TCP close", self.close_timeout)?;
        abi.node_ip = match self.node_ip {
            None => [0; 4],
            Some(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() => {
                return Err(DatapathError::InvalidConfig(format!(
                    "node address {ip} is not a unicast address"
                )));
            }
            Some(ip) => ip.octets(),
        };
        abi.uplink_ifindex = self.uplink_ifindex;
        Ok(())
    }

    /// The load-balancer fields of `abi` (0 timeouts, as in a never-written config, read as
    /// the defaults, like the programs do).
    fn from_abi(abi: &Config) -> Self {
        let or_default =
            |s: u32, default: u32| Duration::from_secs(u64::from(if s == 0 { default } else { s }));
        Self {
            node_ip: (abi.node_ip != [0; 4]).then(|| Ipv4Addr::from(abi.node_ip)),
            uplink_ifindex: abi.uplink_ifindex,
            tcp_timeout: or_default(abi.ct_tcp_timeout_s, CT_TCP_TIMEOUT_DEFAULT_S),
            udp_timeout: or_default(abi.ct_udp_timeout_s, CT_UDP_TIMEOUT_DEFAULT_S),
            syn_timeout: or_default(abi.ct_syn_timeout_s, CT_SYN_TIMEOUT_DEFAULT_S),
            close_timeout: or_default(abi.ct_close_timeout_s, CT_CLOSE_TIMEOUT_DEFAULT_S),
        }
    }
}

/// Where traffic of encrypted networks goes: the VXLAN device whose packets are routed into the
/// WireGuard tunnel, and the WireGuard port (only nodes may send to it). Kept apart from
/// [`DatapathConfig`] like [`LbConfig`]; [`Datapath::load`] keeps what a previous agent set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// 0: no tunnel; remote traffic of encrypted networks is dropped as `no_tunnel`.
    pub vxlan_enc_ifindex: u32,
    /// 0: none.
    pub wireguard_port: u16,
}

/// Capacities of the maps the agent sizes per node (`--ct-max`, `--ct-new-max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries of CONNTRACK, the established connections (two per connection).
    pub conntrack: u32,
    /// Entries of CT_NEW, the connections being set up (two per connection).
    pub ct_new: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            conntrack: CONNTRACK_MAX_ENTRIES,
            ct_new: CT_NEW_MAX_ENTRIES,
        }
    }
}

/// Smallest table the limits accept: a handful of connections.
const CT_MIN_ENTRIES: u32 = 64;
/// Largest: 16 Mi entries is about 1.5 GiB of kernel memory for CONNTRACK alone.
const CT_MAX_ENTRIES: u32 = 1 << 24;

impl Limits {
    fn validate(&self) -> Result<(), DatapathError> {
        for (what, n) in [("conntrack", self.conntrack), ("ct-new", self.ct_new)] {
            if !(CT_MIN_ENTRIES..=CT_MAX_ENTRIES).contains(&n) {
                return Err(DatapathError::InvalidConfig(format!(
                    "{what} table size {n} is outside {CT_MIN_ENTRIES}..={CT_MAX_ENTRIES}"
                )));
            }
        }
        Ok(())
    }

    fn overrides(&self) -> Vec<(&'static str, u32)> {
        vec![
            (map_names::CONNTRACK, self.conntrack),
            (map_names::CT_NEW, self.ct_new),
        ]
    }
}

impl DatapathConfig {
    fn to_abi(self, lb: &LbConfig) -> Result<Config, DatapathError> {
        if self.router_mac == [0; 6] {
            return Err(DatapathError::InvalidConfig(
                "router MAC is all zeros".into(),
            ));
        }
        if self.router_mac[0] & 1 != 0 {
            return Err(DatapathError::InvalidConfig(format!(
                "router MAC {:02x?} is a multicast address",
                self.router_mac
            )));
        }
        let mut abi = Config {
            router_mac: self.router_mac,
            _pad: [0; 2],
            flags: CONFIG_F_READY,
            vxlan_ifindex: self.vxlan_ifindex,
            ..Config::default()
        };
        lb.apply(&mut abi)?;
        Ok(abi)
    }
}

/// The loaded datapath. Dropping it unloads the programs that are not attached through pinned
/// links; pinned maps and links stay.
pub struct Datapath {
    ebpf: Ebpf,
    bpf_dir: PathBuf,
    pins: PinReport,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("bpf_dir", &self.bpf_dir)
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the datapath with its maps pinned under `bpf_dir` (created if needed; must be on
    /// bpffs, see [`mount_bpffs`]). Maps already pinned there are reused, so counters, events
    /// and endpoint/network state survive an agent restart; pinned maps that no longer match
    /// this build's definitions are replaced (see [`PinReport`]). Writes `config` and loads
    /// (verifies) every program, but attaches nothing.
    ///
    /// A `config.vxlan_ifindex` of 0 keeps the VXLAN ifindex a previous agent left in the
    /// pinned config: the VXLAN device survives an agent restart, and the still-attached
    /// programs share the pinned config, so overwriting it with 0 would cut remote traffic
    /// until the agent calls [`Datapath::set_config`]. [`Datapath::set_config`] writes what it
    /// is given, 0 included. The load-balancer settings ([`LbConfig`]) of a pinned config are
    /// kept too (on a fresh node they are the defaults: mesh off, default timeouts).
    pub fn load(bpf_dir: &Path, config: DatapathConfig) -> Result<Self, DatapathError> {
        Self::load_with(bpf_dir, config, &Limits::default())
    }

    /// [`Datapath::load`] with the capacities of the maps that are sized per node. A pinned
    /// map of another capacity is replaced (its contents are lost), as for any other change.
    pub fn load_with(
        bpf_dir: &Path,
        config: DatapathConfig,
        limits: &Limits,
    ) -> Result<Self, DatapathError> {
        // Validates the config before anything is touched; rebuilt below with the pinned
        // load-balancer settings once the maps are open.
        let mut abi_config = config.to_abi(&LbConfig::default())?;
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        limits.validate()?;
        bpffs::prepare_dir(bpf_dir)?;
        let sizes = limits.overrides();
        let pins = compat::check_pins(bpf_dir, EBPF_OBJECT, &sizes)?;

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(bpf_dir);
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                bpf_dir: bpf_dir.to_path_buf(),
                source: Box::new(source),
            })?;
        let mut datapath = Self {
            ebpf,
            bpf_dir: bpf_dir.to_path_buf(),
            pins,
        };
        // A fresh map reads as all zeros (not ready): nothing to keep.
        let pinned = datapath.config()?;
        if pinned.is_ready() {
            abi_config = config.to_abi(&LbConfig::from_abi(&pinned))?;
        }
        if pinned.is_ready() {
            // The tunnel device outlives the agent like the plain one.
            abi_config.vxlan_enc_ifindex = pinned.vxlan_enc_ifindex;
            abi_config.wireguard_port = pinned.wireguard_port;
        }
        if abi_config.vxlan_ifindex == 0 && pinned.is_ready() && pinned.vxlan_ifindex != 0 {
            debug!(
                vxlan_ifindex = pinned.vxlan_ifindex,
                "keeping the VXLAN ifindex of the pinned config"
            );
            abi_config.vxlan_ifindex = pinned.vxlan_ifindex;
        }
        datapath.write_config(abi_config)?;

        for &name in program_names::ATTACHED {
            datapath
                .classifier_mut(name)?
                .load()
                .map_err(|e| DatapathError::program(name, e))?;
            debug!(program = name, "program loaded");
        }

        info!(
            bpf_dir = %bpf_dir.display(),
            reused = ?datapath.pins.reused,
            replaced = ?datapath.pins.replaced,
            created = ?datapath.pins.created,
            "datapath loaded"
        );
        Ok(datapath)
    }

    /// The pin directory.
    pub fn bpf_dir(&self) -> &Path {
        &self.bpf_dir
    }

    /// Which maps were reused, replaced or created by [`Datapath::load`].
    pub fn pin_report(&self) -> &PinReport {
        &self.pins
    }

    /// Replaces the node-wide config; attached programs see it on their next packet. The
    /// load-balancer and tunnel settings stay as they are.
    pub fn set_config(&mut self, config: DatapathConfig) -> Result<(), DatapathError> {
        let old = self.config()?;
        let mut abi = config.to_abi(&LbConfig::from_abi(&old))?;
        abi.vxlan_enc_ifindex = old.vxlan_enc_ifindex;
        abi.wireguard_port = old.wireguard_port;
        abi.egress_port_min = old.egress_port_min;
        abi.egress_port_max = old.egress_port_max;
        self.write_config(abi)
    }

    /// Replaces the load-balancer settings; the rest of the config stays as it is.
    pub fn set_lb_config(&mut self, lb: LbConfig) -> Result<(), DatapathError> {
        let mut abi = self.config()?;
        lb.apply(&mut abi)?;
        self.write_config(abi)
    }

    /// Sets the source ports egress flows get on the node's address (inclusive; `min` must not
    /// be above `max`); the rest of the config stays.
    pub fn set_egress_ports(&mut self, min: u16, max: u16) -> Result<(), DatapathError> {
        if min == 0 || min > max {
            return Err(DatapathError::InvalidConfig(format!(
                "egress port range {min}-{max} is empty or starts at 0"
            )));
        }
        let mut abi = self.config()?;
        abi.egress_port_min = min;
        abi.egress_port_max = max;
        self.write_config(abi)
    }

    /// Whether plain overlay traffic leaves and arrives through the VXLAN device (`true`) or
    /// is encapsulated by the programs out of the uplink and decapsulated on it (`false`, what
    /// a load starts with); the rest of the config stays.
    pub fn set_device_encap(&mut self, device: bool) -> Result<(), DatapathError> {
        let mut abi = self.config()?;
        abi.flags = if device {
            abi.flags | CONFIG_F_DEVICE_ENCAP
        } else {
            abi.flags & !CONFIG_F_DEVICE_ENCAP
        };
        self.write_config(abi)
    }

    /// Whether plain overlay traffic leaves through the VXLAN device, as the programs see it.
    pub fn device_encap(&self) -> Result<bool, DatapathError> {
        Ok(self.config()?.flags & CONFIG_F_DEVICE_ENCAP != 0)
    }

    /// Sets where encrypted networks' traffic goes; the rest of the config stays.
    pub fn set_tunnel_config(&mut self, t: TunnelConfig) -> Result<(), DatapathError> {
        let mut abi = self.config()?;
        abi.vxlan_enc_ifindex = t.vxlan_enc_ifindex;
        abi.wireguard_port = t.wireguard_port.to_be_bytes();
        self.write_config(abi)
    }

    /// The tunnel settings as the programs see them.
    pub fn tunnel_config(&self) -> Result<TunnelConfig, DatapathError> {
        let abi = self.config()?;
        Ok(TunnelConfig {
            vxlan_enc_ifindex: abi.vxlan_enc_ifindex,
            wireguard_port: u16::from_be_bytes(abi.wireguard_port),
        })
    }

    /// The load-balancer settings as the programs see them.
    pub fn lb_config(&self) -> Result<LbConfig, DatapathError> {
        Ok(LbConfig::from_abi(&self.config()?))
    }

    /// The config as the programs see it (all zeros, i.e. not ready, before the first
    /// write).
    pub fn config(&self) -> Result<Config, DatapathError> {
        let name = map_names::CONFIG;
        let map: HashMap<&MapData, u32, Config> =
            HashMap::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))?;
        match map.get(&CONFIG_KEY, 0) {
            Ok(config) => Ok(config),
            Err(e) if lb::not_found(&e) => Ok(Config::default()),
            Err(e) => Err(DatapathError::map(name, e)),
        }
    }

    /// One map update: the programs see the old config or the new one, never a mix (see
    /// `dataplane_common::Config`).
    fn write_config(&mut self, config: Config) -> Result<(), DatapathError> {
        let name = map_names::CONFIG;
        let mut map: HashMap<&mut MapData, u32, Config> =
            HashMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        map.insert(CONFIG_KEY, config, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    fn counters(&self) -> Result<PerCpuArray<&MapData, u64>, DatapathError> {
        let name = map_names::DROP_COUNTERS;
        PerCpuArray::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))
    }

    fn counter_sum(map: &PerCpuArray<&MapData, u64>, index: u32) -> Result<u64, DatapathError> {
        let values = map
            .get(&index, 0)
            .map_err(|e| DatapathError::map(map_names::DROP_COUNTERS, e))?;
        // Wrapping: per-CPU u64 counters wrap independently; a sum that wraps is still the
        // right value modulo 2^64, which is what rate computations need.
        Ok(values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v)))
    }

    /// Dropped packets per reason, summed over CPUs, for every reason this build knows, in
    /// code order (zeros included, so the list's shape is stable for metrics).
    pub fn drop_counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        let map = self.counters()?;
        DropReason::ALL
            .iter()
            .map(|reason| Ok((reason.name(), Self::counter_sum(&map, reason.code())?)))
            .collect()
    }

    /// Dropped packets per hook and reason, summed over CPUs; only the non-zero ones.
    pub fn drop_counters_by_hook(
        &self,
    ) -> Result<Vec<(&'static str, &'static str, u64)>, DatapathError> {
        let name = map_names::DROP_BY_HOOK;
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(name)?).map_err(|e| DatapathError::map(name, e))?;
        let mut out = Vec::new();
        for hook in Hook::ALL {
            for reason in DropReason::ALL {
                let index = hook as u32 * DROP_COUNTERS_MAX_ENTRIES + reason.code();
                let values = map
                    .get(&index, 0)
                    .map_err(|e| DatapathError::map(name, e))?;
                let n = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
                if n > 0 {
                    out.push((hook.name(), reason.name(), n));
                }
            }
        }
        Ok(out)
    }

    /// Dropped packets for one reason, summed over CPUs.
    pub fn drop_counter(&self, reason: DropReason) -> Result<u64, DatapathError> {
        Self::counter_sum(&self.counters()?, reason.code())
    }

    /// Drop events that were not reported because the ring buffer was full.
    pub fn drop_events_lost(&self) -> Result<u64, DatapathError> {
        Self::counter_sum(&self.counters()?, DROP_COUNTER_EVENTS_LOST)
    }

    /// Takes the consumer side of the drop event ring buffer. Can be called once per load;
    /// later calls fail with [`DatapathError::Missing`].
    pub fn take_drop_events(&mut self) -> Result<DropEvents, DatapathError> {
        let name = map_names::DROP_EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let ring = RingBuf::try_from(map).map_err(|e| DatapathError::map(name, e))?;
        Ok(DropEvents::new(ring))
    }

    /// The loaded `from_container` program (for `BPF_PROG_TEST_RUN` in tests and benches).
    pub fn from_container(&self) -> Result<&SchedClassifier, DatapathError> {
        self.classifier(program_names::FROM_CONTAINER)
    }

    /// Attaches `from_container` at TCX ingress of `ifname` (the host side of a container
    /// veth) through a link pinned under `<bpf_dir>/links/`, so it stays attached when the
    /// agent exits. If a pinned link for this interface exists (agent restart), the program
    /// behind it is swapped atomically: no packet sees the interface without a program. A
    /// pinned link whose interface is gone (veth deleted and recreated) is replaced.
    pub fn attach_from_container(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_tcx(program_names::FROM_CONTAINER, ifname, TcAttachType::Ingress)
    }

    /// Detaches `from_container` from `ifname` (synchronously: no packet sees the program
    /// after this returns) and removes the pinned link. Returns whether a link was pinned.
    /// Not needed when the veth is deleted (the kernel detaches then), but the pin would
    /// linger until [`remove_pins`] or the next attach on that name.
    pub fn detach_from_container(&self, ifname: &str) -> Result<bool, DatapathError> {
        self.unpin_link(program_names::FROM_CONTAINER, ifname)
    }

    /// The loaded `from_overlay` program (for `BPF_PROG_TEST_RUN`; note that a test run has no
    /// tunnel metadata, so it always drops as `no_tunnel_key`: use
    /// [`Datapath::from_overlay_test`]).
    pub fn from_overlay(&self) -> Result<&SchedClassifier, DatapathError> {
        self.classifier(program_names::FROM_OVERLAY)
    }

    /// Attaches `from_overlay` at TCX ingress of `ifname`, the node's collect-metadata VXLAN
    /// device, with the same pinned-link scheme as [`Datapath::attach_from_container`]
    /// (survives the agent, atomic replacement on restart, stale links replaced).
    pub fn attach_from_overlay(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_tcx(program_names::FROM_OVERLAY, ifname, TcAttachType::Ingress)
    }

    /// Detaches `from_overlay` from `ifname` and removes the pinned link, synchronously.
    /// Returns whether a link was pinned.
    pub fn detach_from_overlay(&self, ifname: &str) -> Result<bool, DatapathError> {
        self.unpin_link(program_names::FROM_OVERLAY, ifname)
    }

    /// The loaded `from_uplink` program (for `BPF_PROG_TEST_RUN`).
    pub fn from_uplink(&self) -> Result<&SchedClassifier, DatapathError> {
        self.classifier(program_names::FROM_UPLINK)
    }

    /// Attaches `from_uplink` at TCX ingress of `ifname`, the node's uplink (the device of
    /// the advertise address), with the same pinned-link scheme as
    /// [`Datapath::attach_from_container`]. It only takes packets to published ports on
    /// [`LbConfig::node_ip`]; everything else passes to the stack untouched.
    pub fn attach_from_uplink(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_tcx(program_names::FROM_UPLINK, ifname, TcAttachType::Ingress)
    }

    /// Detaches `from_uplink` from `ifname` and removes the pinned link, synchronously.
    /// Returns whether a link was pinned.
    pub fn detach_from_uplink(&self, ifname: &str) -> Result<bool, DatapathError> {
        self.unpin_link(program_names::FROM_UPLINK, ifname)
    }

    /// Raw access to the loaded object, for tests and benchmarks that need maps or programs
    /// this crate has no typed accessor for yet. Agent code should add an accessor instead.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing { kind: "map", name })
    }

    fn classifier(&self, name: &'static str) -> Result<&SchedClassifier, DatapathError> {
        let program = self.ebpf.program(name).ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|e| DatapathError::program(name, e))
    }

    fn classifier_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        let program = self.ebpf.program_mut(name).ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|e| DatapathError::program(name, e))
    }

    fn link_pin_path(&self, program: &'static str, ifname: &str) -> Result<PathBuf, DatapathError> {
        // Linux interface names: 1..=15 bytes, no '/', ':' or whitespace, not "." or "..".
        // bpffs forbids '.' in names, and ':' cannot occur in an ifname, so '.' -> ':' is a
        // collision-free encoding ("eth0.100" -> "eth0:100").
        let valid = !ifname.is_empty()
            && ifname.len() < 16
            && ifname != "."
            && ifname != ".."
            && !ifname
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
        if !valid {
            return Err(DatapathError::Attach {
                op: "attaching",
                program,
                ifname: ifname.to_owned(),
                source: Box::new(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "invalid interface name",
                )),
            });
        }
        let pin_name = format!("{program}@{}", ifname.replace('.', ":"));
        Ok(self.bpf_dir.join(LINKS_DIR).join(pin_name))
    }

    fn attach_tcx(
        &mut self,
        program: &'static str,
        ifname: &str,
        attach_type: TcAttachType,
    ) -> Result<(), DatapathError> {
        let pin_path = self.link_pin_path(program, ifname)?;
        let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            op: "attaching",
            program,
            ifname: ifname.to_owned(),
            source,
        };
        let links_dir = self.bpf_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir)
            .map_err(|e| DatapathError::io("creating", &links_dir, e))?;

        let prog = self.classifier_mut(program)?;

        // Restart path: swap our program into the existing link.
        match PinnedLink::from_pin(&pin_path) {
            Ok(pinned) => {
                let replaced: Result<_, Box<dyn std::error::Error + Send + Sync>> =
                    SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(Into::into)
                        .and_then(|link| prog.attach_to_link(link).map_err(Into::into));
                match replaced {
                    Ok(id) => {
                        // The pin keeps the link; dropping our handle only closes the fd.
                        drop(prog.take_link(id));
                        info!(program, ifname, "replaced program on pinned TCX link");
                        return Ok(());
                    }
                    Err(e) => {
                        // Typically ENOLINK: the interface the link was on is gone.
                        warn!(program, ifname, error = %e, "pinned link unusable; re-attaching");
                        std::fs::remove_file(&pin_path)
                            .map_err(|e| DatapathError::io("removing stale link", &pin_path, e))?;
                    }
                }
            }
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(attach_err(Box::new(e))),
        }

        let id = prog
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| attach_err(Box::new(e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
        let fd_link = FdLink::try_from(link).map_err(|e| attach_err(Box::new(e)))?;
        // If pinning fails the link is dropped here and thereby detached: no unpinned leftovers.
        fd_link
            .pin(&pin_path)
            .map_err(|e| attach_err(Box::new(e)))?;
        info!(program, ifname, pin = %pin_path.display(), "attached at TCX");
        Ok(())
    }

    fn unpin_link(&self, program: &'static str, ifname: &str) -> Result<bool, DatapathError> {
        let pin_path = self.link_pin_path(program, ifname)?;
        match sys::detach_and_unpin_link(&pin_path) {
            Ok(true) => {
                info!(program, ifname, "detached");
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(DatapathError::Attach {
                op: "detaching",
                program,
                ifname: ifname.to_owned(),
                source: Box::new(e),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent keeps the datapath in shared state and reads events on a tokio task.
    #[test]
    fn handles_can_move_between_threads() {
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<Datapath>();
        sync::<Datapath>();
        send::<DropEvents>();
    }

    #[test]
    fn lb_config_validation_and_round_trip() {
        let dp = DatapathConfig {
            router_mac: [0x02, 0, 0, 0, 0, 1],
            vxlan_ifindex: 0,
        };
        let lb = LbConfig {
            node_ip: Some(Ipv4Addr::new(198, 18, 0, 1)),
            uplink_ifindex: 3,
            tcp_timeout: Duration::from_secs(7),
            udp_timeout: Duration::from_millis(2500),
            syn_timeout: Duration::from_secs(3),
            close_timeout: Duration::from_secs(4),
        };
        let abi = dp.to_abi(&lb).expect("valid");
        assert_eq!(abi.node_ip, [198, 18, 0, 1]);
        assert_eq!((abi.ct_tcp_timeout_s, abi.ct_udp_timeout_s), (7, 2));
        assert_eq!((abi.ct_syn_timeout_s, abi.ct_close_timeout_s), (3, 4));
        assert_eq!(
            LbConfig::from_abi(&abi),
            LbConfig {
                udp_timeout: Duration::from_secs(2),
                ..lb
            }
        );
        for bad in [
            LbConfig {
                tcp_timeout: Duration::from_millis(999),
                ..lb
            },
            LbConfig {
                udp_timeout: Duration::from_secs(u64::from(u32::MAX) + 1),
                ..lb
            },
            LbConfig {
                node_ip: Some(Ipv4Addr::BROADCAST),
                ..lb
            },
            LbConfig {
                node_ip: Some(Ipv4Addr::UNSPECIFIED),
                ..lb
            },
        ] {
            assert!(dp.to_abi(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_validation() {
        let ok = DatapathConfig {
            router_mac: [0x02, 0, 0, 0, 0, 1],
            vxlan_ifindex: 9,
        };
        let abi = ok.to_abi(&LbConfig::default()).expect("valid");
        assert!(abi.is_ready());
        assert_eq!(abi.router_mac, ok.router_mac);
        assert_eq!(abi.vxlan_ifindex, 9);
        assert_eq!(abi.ct_tcp_timeout_s, 21_600);
        assert_eq!(abi.ct_udp_timeout_s, 300);
        assert_eq!(abi.node_ip, [0; 4]);
        assert_eq!(LbConfig::from_abi(&abi), LbConfig::default());
        assert!(
            DatapathConfig {
                router_mac: [0; 6],
                vxlan_ifindex: 0
            }
            .to_abi(&LbConfig::default())
            .is_err()
        );
        assert!(
            DatapathConfig {
                router_mac: [0x01, 0, 0x5e, 0, 0, 1],
                vxlan_ifindex: 0
            }
            .to_abi(&LbConfig::default())
            .is_err()
        );
    }
}
