//! One node's agent: flags, start-up order, background tasks, shutdown.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::api::{self, ApiState};
use crate::model::{Protocol, ReservedPort};
use crate::netlink::Netlink;
use crate::reconcile::{self, Reconciler};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::tunnels::{TunnelSetup, Tunnels};
use crate::view::{self, ClusterView};
use crate::{model, nodes};

/// The node's collect-metadata VXLAN device (one for all networks: the VNI is per packet).
pub const VXLAN_DEVICE: &str = "netagent-vx";
/// IANA's VXLAN port, as Linux, Docker and Cilium use.
pub const VXLAN_PORT: u16 = 4789;
/// TCP port of the agents' API to each other, on their tunnel addresses only (see
/// `api::peer`): reachable by the other nodes through WireGuard and by nothing else.
pub const CONTROL_PORT: u16 = 4791;

/// How long a starting agent waits for the store's view before adopting its containers from
/// the saved one.
const ADOPT_WAITS_FOR_STORE: Duration = Duration::from_secs(3);

/// The MAC containers see as their router. Locally administered and the same on every node,
/// so a container's neighbour entry stays valid wherever its peers live (Calico does the same).
pub const ROUTER_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "netagent",
    version,
    about = "Overlay network agent: one per node"
)]
pub struct Args {
    /// Name of this node in the cluster.
    #[arg(long)]
    pub node_name: String,
    /// Address other nodes reach this node at (tunnel endpoint, published ports).
    #[arg(long)]
    pub advertise_addr: Ipv4Addr,
    /// Cluster state store: `embedded` (a file in --state-dir, one node) or
    /// `etcd://host:port[,host:port...]`.
    #[arg(long, default_value = "embedded")]
    pub store: String,
    /// Unix socket of the API (mode 0600).
    #[arg(long, default_value = "/run/netagent/netagent.sock")]
    pub socket: PathBuf,
    /// Where the agent keeps its own files (embedded store, keys).
    #[arg(long, default_value = "/var/lib/netagent")]
    pub state_dir: PathBuf,
    /// bpffs directory for pinned maps; they outlive the agent so forwarding survives restarts.
    #[arg(long, default_value = "/sys/fs/bpf/netagent")]
    pub bpf_dir: PathBuf,
    /// Uplink interface (default: the one that holds --advertise-addr).
    #[arg(long)]
    pub uplink: Option<String>,
    /// Upstream DNS resolvers for names outside the cluster (default: the node's resolv.conf).
    #[arg(long = "dns-upstream", value_name = "IP[:PORT]", value_parser = parse_upstream)]
    pub dns_upstreams: Vec<SocketAddr>,
    /// Prefix of the names of container network namespaces (`ip netns`): container `web.1`
    /// gets `<prefix>web.1`. Never empty, so the agent's namespaces cannot be confused with
    /// an operator's; lets several agents share a machine (the test lab does).
    #[arg(long, default_value = "netagent-", value_parser = parse_netns_prefix)]
    pub netns_prefix: String,
    /// Idle timeout of TCP connections through a VIP or published port, seconds. Far above
    /// IPVS's 900 s, which resets idle connections in Docker's load balancer.
    #[arg(long, default_value_t = 21600, value_parser = clap::value_parser!(u64).range(1..))]
    pub ct_tcp_timeout: u64,
    /// Idle timeout of UDP flows through a VIP or published port, seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub ct_udp_timeout: u64,
    /// Idle timeout of a TCP connection through a VIP or published port whose handshake has
    /// not completed, seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub ct_syn_timeout: u64,
    /// Idle timeout of a TCP connection after FIN or RST, seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub ct_close_timeout: u64,
    /// Entries of the established-connection table (two per balanced connection). A flood of
    /// new connections cannot push these out.
    #[arg(long, default_value_t = netagent_datapath::CONNTRACK_MAX_ENTRIES,
          value_parser = clap::value_parser!(u32).range(64..=(1 << 24)))]
    pub ct_max: u32,
    /// Entries of the table of connections being set up (two per connection); when full,
    /// the oldest half-open ones make room.
    #[arg(long, default_value_t = netagent_datapath::CT_NEW_MAX_ENTRIES,
          value_parser = clap::value_parser!(u32).range(64..=(1 << 24)))]
    pub ct_new_max: u32,
    /// A container's log is rotated once it is larger than this many bytes (one rotated copy
    /// is kept, so a container's output takes at most twice this on disk).
    #[arg(long, default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(4096..))]
    pub log_max_size: u64,
    /// Source ports on --advertise-addr for containers' egress flows that cannot keep their
    /// own (taken for that destination, or held by a node socket), `MIN-MAX`. Keep it clear of
    /// the node's own ephemeral ports (net.ipv4.ip_local_port_range, 32768-60999 by default).
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    pub egress_ports: (u16, u16),
    /// Log lines as `text` (human) or `json` (one object per line, for log collectors).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics (`/metrics`) and a health check (`/healthz`) on this TCP
    /// address, e.g. 127.0.0.1:9580. Off by default.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// UDP port of this node's WireGuard tunnels (encrypted networks), on --advertise-addr.
    #[arg(long, default_value_t = 51820, value_parser = clap::value_parser!(u16).range(1..))]
    pub wireguard_port: u16,
    /// Seconds without a refresh after which this node counts as down.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_ttl: u64,
    /// Who puts plain overlay traffic in VXLAN and takes it out: `ebpf` (the programs, straight
    /// out of the uplink and from the uplink into the container) or `device` (the kernel's
    /// VXLAN device both ways, routed by the node's routing table and seen by its netfilter:
    /// for nodes that reach each other through another interface than the uplink, or filter
    /// VXLAN with iptables). Encrypted networks always go through the tunnel's device.
    #[arg(long, value_enum, default_value = "ebpf")]
    pub overlay_encap: OverlayEncap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverlayEncap {
    Ebpf,
    Device,
}

/// How long the agent waits for its own node record to reach its view before it serves the
/// API anyway (see where it is used).
const REGISTERED_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("invalid port range {s:?}: expected MIN-MAX, 1 <= MIN <= MAX <= 65535");
    let (min, max) = s.split_once('-').ok_or_else(bad)?;
    let min: u16 = min.trim().parse().map_err(|_| bad())?;
    let max: u16 = max.trim().parse().map_err(|_| bad())?;
    if min == 0 || min > max {
        return Err(bad());
    }
    Ok((min, max))
}

fn parse_netns_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err(
            "the namespace prefix must not be empty: unprefixed names could be an \
                    operator's namespaces"
                .into(),
        );
    }
    if s.len() > 64 || s.contains('/') || s.contains('\0') {
        return Err(format!(
            "invalid namespace prefix {s:?}: at most 64 bytes, no '/'"
        ));
    }
    Ok(s.to_string())
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse()
        .map_err(|_| format!("invalid DNS upstream {s:?}: expected IP or IP:PORT"))
}

/// Ports the cluster uses on this node's address, which services must never publish.
fn reserved_ports(args: &Args) -> Vec<ReservedPort> {
    let mut ports = vec![
        ReservedPort {
            port: VXLAN_PORT,
            protocol: Protocol::Udp,
            what: "the overlay's VXLAN".into(),
        },
        ReservedPort {
            port: args.wireguard_port,
            protocol: Protocol::Udp,
            what: "the encrypted networks' WireGuard".into(),
        },
    ];
    // etcd members on this node's address: their client port, and the peer port beside it.
    if let Some(rest) = args.store.strip_prefix("etcd://") {
        for ep in rest.split(',') {
            let Some((host, port)) = ep.rsplit_once(':') else {
                continue;
            };
            if host.parse::<Ipv4Addr>() == Ok(args.advertise_addr)
                && let Ok(port) = port.parse::<u16>()
            {
                ports.push(ReservedPort {
                    port,
                    protocol: Protocol::Tcp,
                    what: "etcd".into(),
                });
                if port == 2379 {
                    ports.push(ReservedPort {
                        port: 2380,
                        protocol: Protocol::Tcp,
                        what: "etcd peers".into(),
                    });
                }
            }
        }
    }
    ports
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    model::validate_name("node", &args.node_name).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state dir {}", args.state_dir.display()))?;

    let store = netagent_store::open(&args.store, &args.state_dir)
        .await
        .with_context(|| format!("opening store {}", args.store))?;
    tracing::info!(node = %args.node_name, store = %store.describe(), "starting");

    let netlink = Netlink::new().context("opening rtnetlink")?;
    let uplink = match &args.uplink {
        Some(u) => u.clone(),
        None => netlink
            .interface_with_address(args.advertise_addr)
            .await
            .context("looking for the uplink")?
            .with_context(|| {
                format!(
                    "no interface holds --advertise-addr {}; add the address or pass --uplink",
                    args.advertise_addr
                )
            })?,
    };
    let uplink_mtu = netlink
        .link_mtu(&uplink)
        .await
        .context("reading the uplink")?
        .with_context(|| format!("uplink {uplink:?} does not exist"))?;
    tracing::info!(%uplink, uplink_mtu, "uplink");

    // The VXLAN device outlives the agent like the pinned programs on it: a restart keeps it,
    // and it exists before the datapath loads so the config never points at nothing.
    let vxlan_ifindex = netlink
        .ensure_vxlan(
            VXLAN_DEVICE,
            VXLAN_PORT,
            Some(uplink_mtu.saturating_sub(model::VXLAN_OVERHEAD)),
        )
        .await
        .context("creating the VXLAN device")?;
    let mut datapath = netagent_datapath::Datapath::load_with(
        &args.bpf_dir,
        netagent_datapath::DatapathConfig {
            router_mac: ROUTER_MAC,
            vxlan_ifindex,
        },
        &netagent_datapath::Limits {
            conntrack: args.ct_max,
            ct_new: args.ct_new_max,
        },
    )
    .with_context(|| {
        format!(
            "loading the eBPF datapath (bpffs dir {})",
            args.bpf_dir.display()
        )
    })?;
    datapath
        .attach_from_overlay(VXLAN_DEVICE)
        .context("attaching from_overlay")?;
    let uplink_ifindex = netlink
        .link_index(&uplink)
        .await
        .context("reading the uplink")?
        .with_context(|| format!("uplink {uplink:?} does not exist"))?;
    datapath
        .set_lb_config(netagent_datapath::LbConfig {
            node_ip: Some(args.advertise_addr),
            uplink_ifindex,
            tcp_timeout: Duration::from_secs(args.ct_tcp_timeout),
            udp_timeout: Duration::from_secs(args.ct_udp_timeout),
            syn_timeout: Duration::from_secs(args.ct_syn_timeout),
            close_timeout: Duration::from_secs(args.ct_close_timeout),
        })
        .context("configuring the load balancer")?;
    datapath
        .set_egress_ports(args.egress_ports.0, args.egress_ports.1)
        .context("configuring egress")?;
    datapath
        .set_device_encap(args.overlay_encap == OverlayEncap::Device)
        .context("configuring the overlay's encapsulation")?;
    // The routing mesh: published ports answer on this node's address.
    datapath
        .attach_from_uplink(&uplink)
        .context("attaching from_uplink")?;
    let datapath = Arc::new(Mutex::new(datapath));

    // The last view this agent saw comes first: with the store unreachable, the node still
    // knows its containers (DNS, datapath) until the store answers and the live view
    // replaces it.
    let saved_view = args.state_dir.join(view::PERSISTED_VIEW);
    let initial = ClusterView::load(&saved_view).unwrap_or_default();
    if initial.revision > 0 {
        tracing::info!(
            revision = initial.revision,
            "starting from the saved cluster view"
        );
    }
    let (view_tx, view_rx) = watch::channel(Arc::new(initial));
    let reconciler = Reconciler::new(args.node_name.clone(), datapath.clone(), view_rx.clone());
    // The drop events' reader; without it only `netctl monitor` is missing.
    let monitor: Arc<std::sync::OnceLock<Arc<crate::monitor::Monitor>>> = Arc::default();
    match crate::monitor::Monitor::start(datapath.clone(), view_rx.clone()) {
        Ok(m) => {
            let _ = monitor.set(m);
        }
        Err(e) => tracing::warn!(error = %e, "drop events cannot be read; netctl monitor is off"),
    }

    let dns = crate::dns::Dns::new(&args.dns_upstreams);
    let runtime = Arc::new(Runtime::new(
        store.clone(),
        netlink,
        reconciler.clone(),
        dns.clone(),
        RuntimeConfig {
            node: args.node_name.clone(),
            netns_prefix: args.netns_prefix.clone(),
            state_dir: args.state_dir.clone(),
            uplink_mtu,
            router_mac: ROUTER_MAC,
            log_max_size: args.log_max_size,
        },
    ));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut background = tokio::task::JoinSet::new();
    let runner = crate::runner::Runner::new(
        runtime.clone(),
        store.clone(),
        args.node_name.clone(),
        view_rx.clone(),
        &args.state_dir,
    );

    // Registration retries until the store answers: an agent that starts while etcd is down
    // still serves its API (which reports the outage) and joins once etcd is back. The record
    // is rewritten whenever it changes (the tunnels come up, a key rotates).
    let (registration, registration_rx) = watch::channel(nodes::Registration {
        address: args.advertise_addr,
        uplink_mtu,
        reserved_ports: reserved_ports(&args),
        wireguard: None,
    });
    background.spawn(nodes::keep_registered(
        store.clone(),
        args.node_name.clone(),
        registration_rx,
    ));
    {
        let (ready_tx, _ready_rx) = watch::channel(false);
        background.spawn(nodes::keep_alive_loop(
            store.clone(),
            args.node_name.clone(),
            Duration::from_secs(args.lease_ttl),
            ready_tx,
        ));
    }
    // The tunnels of encrypted networks. Until they are up (and if they cannot come up),
    // the datapath drops encrypted traffic to other nodes as `no_tunnel`.
    let tunnels: Arc<std::sync::OnceLock<Arc<Tunnels>>> = Arc::default();
    {
        let (store, tunnels, registration, datapath) = (
            store.clone(),
            tunnels.clone(),
            registration.clone(),
            datapath.clone(),
        );
        let netlink = Netlink::new().context("opening rtnetlink")?;
        let (node, state_dir, advertise, port) = (
            args.node_name.clone(),
            args.state_dir.clone(),
            args.advertise_addr,
            args.wireguard_port,
        );
        let view_rx = view_rx.clone();
        let runner = runner.clone();
        background.spawn(async move {
            let setup = TunnelSetup {
                node: &node,
                state_dir: &state_dir,
                advertise,
                port,
                uplink_mtu,
                store: &*store,
                netlink: &netlink,
                datapath: &datapath,
            };
            match Tunnels::start(setup).await {
                Ok(t) => {
                    let record = t.record();
                    registration.send_modify(|r| r.wireguard = Some(record.clone()));
                    let _ = tunnels.set(t.clone());
                    tokio::spawn(async move {
                        if let Err(e) = api::peer::serve(record.tunnel_addr, CONTROL_PORT, runner).await {
                            tracing::error!(error = %e, "the peer API stopped: other nodes cannot read this node's task logs");
                        }
                    });
                    t.follow(view_rx).await;
                }
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "encrypted networks cannot reach other nodes: the tunnels did not start"
                ),
            }
        });
    }

    background.spawn(view::follow(store.clone(), view_tx));
    background.spawn(view::persist(view_rx.clone(), saved_view.clone()));
    background.spawn(dns.clone().follow(view_rx.clone()));
    // The pinned links keep this node's containers forwarding meanwhile, so adoption may wait
    // for a view (the saved one, or the store's); the reconciler waits for adoption.
    {
        let runtime = runtime.clone();
        let mut rx = view_rx.clone();
        background.spawn(async move {
            // The store's view when it answers soon: the saved copy can miss the last
            // changes before the agent stopped (it is written at most every 0.5 s), and a
            // container missing from the view adoption works from would lose its network.
            // Only with the store unreachable does the saved copy stand in for it.
            let fresh = tokio::time::timeout(ADOPT_WAITS_FOR_STORE, rx.wait_for(|v| v.live))
                .await
                .is_ok_and(|r| r.is_ok());
            if !fresh {
                tracing::warn!(
                    revision = rx.borrow().revision,
                    "the store did not answer; adopting containers from the saved view"
                );
            }
            let Ok(view) = rx.wait_for(|v| v.revision > 0).await.map(|v| v.clone()) else {
                return;
            };
            runtime.adopt(&view).await;
        });
    }
    background.spawn(reconciler.clone().run());
    background.spawn(runner.clone().run());
    background.spawn(crate::orchestrator::run(
        store.clone(),
        args.node_name.clone(),
        Duration::from_secs(args.lease_ttl),
        view_rx.clone(),
        shutdown_rx.clone(),
    ));
    background.spawn(reconcile::conntrack_gc(datapath.clone()));

    let metrics = match args.metrics_addr {
        Some(addr) => Some(
            crate::metrics::serve(
                addr,
                crate::metrics::Sources {
                    store: store.clone(),
                    runtime: runtime.clone(),
                    view: view_rx.clone(),
                    tunnels: tunnels.clone(),
                    ct_capacity: (args.ct_max, args.ct_new_max),
                    dns: dns.clone(),
                },
                shutdown_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let state = ApiState {
        store: store.clone(),
        node_name: args.node_name.clone(),
        runtime,
        ops: tokio_util::task::TaskTracker::new(),
        tunnels,
        registration,
        runner,
        monitor,
        shutdown: shutdown_rx.clone(),
    };
    let ops = state.ops.clone();
    let mut stop = shutdown_rx.clone();
    // Ready (the API, READY=1) means this node is in the cluster: its record has reached the
    // view, so `node inspect` of itself answers. Bounded: with the store slow or down the
    // API must still come up, to say why.
    let mut own = view_rx.clone();
    let name = args.node_name.clone();
    let registered = own.wait_for(|v| v.nodes.contains_key(&name));
    if tokio::time::timeout(REGISTERED_WAIT, registered)
        .await
        .is_err()
    {
        tracing::warn!(
            node = %args.node_name,
            "serving the API before this node's record reached the cluster view"
        );
    }
    let api = tokio::spawn({
        let socket = args.socket.clone();
        async move {
            api::serve(&socket, state, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        }
    });

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let api_result = tokio::select! {
        _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); None }
        r = api => Some(r),
    };
    let _ = shutdown_tx.send(true);
    let _ = crate::sd_notify::notify("STOPPING=1");
    // Operations in flight (a container being built or removed) finish or roll back before
    // the agent exits: none is left half-done by a shutdown.
    ops.close();
    if tokio::time::timeout(Duration::from_secs(60), ops.wait())
        .await
        .is_err()
    {
        tracing::warn!("operations still running after 60 s; exiting anyway");
    }
    background.shutdown().await;
    // The last view, for a restart while the store is unreachable (persist writes at most
    // every 0.5 s, and may not have caught up).
    let last = view_rx.borrow().clone();
    if last.revision > 0
        && let Err(e) = last.save(&saved_view)
    {
        tracing::warn!(error = %e, "cannot save the cluster view");
    }
    if let Some(m) = metrics {
        let _ = m.await;
    }
    // The liveness lease is left to expire rather than revoked: a quick restart (an upgrade)
    // then never shows the node as down to the rest of the cluster. The pinned datapath stays.
    match api_result {
        None => Ok(()),
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(anyhow::anyhow!("API task failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn the_cluster_s_own_ports_are_reserved() {
        let a = Args::try_parse_from([
            "netagent",
            "--node-name",
            "n1",
            "--advertise-addr",
            "192.0.2.11",
            "--store",
            "etcd://192.0.2.11:2379,192.0.2.12:2379",
        ])
        .unwrap();
        let ports: Vec<(u16, Protocol)> = reserved_ports(&a)
            .into_iter()
            .map(|p| (p.port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                (4789, Protocol::Udp),
                (51820, Protocol::Udp),
                (2379, Protocol::Tcp),
                (2380, Protocol::Tcp)
            ]
        );
    }

    #[test]
    fn flags_and_defaults() {
        let a = Args::try_parse_from([
            "netagent",
            "--node-name",
            "n1",
            "--advertise-addr",
            "198.18.0.11",
        ])
        .unwrap();
        assert_eq!(a.store, "embedded");
        assert_eq!(a.lease_ttl, 5);
        assert_eq!(
            a.netns_prefix, "netagent-",
            "never an operator's namespace names"
        );
        assert!(
            Args::try_parse_from([
                "netagent",
                "--node-name",
                "n1",
                "--advertise-addr",
                "198.18.0.11",
                "--netns-prefix",
                ""
            ])
            .is_err()
        );
        assert_eq!(a.socket, PathBuf::from("/run/netagent/netagent.sock"));
        let a = Args::try_parse_from([
            "netagent",
            "--node-name",
            "n1",
            "--advertise-addr",
            "198.18.0.11",
            "--dns-upstream",
            "192.0.2.53",
            "--dns-upstream",
            "192.0.2.54:5353",
        ])
        .unwrap();
        assert_eq!(a.dns_upstreams[0].port(), 53);
        assert_eq!(a.dns_upstreams[1].port(), 5353);
        assert!(
            Args::try_parse_from(["netagent", "--node-name", "n1", "--advertise-addr", "x"])
                .is_err()
        );
        assert!(
            Args::try_parse_from([
                "netagent",
                "--node-name",
                "n1",
                "--advertise-addr",
                "198.18.0.11",
                "--lease-ttl",
                "1"
            ])
            .is_err()
        );
    }
}
