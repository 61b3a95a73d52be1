//! The three ways two containers on two nodes are connected (DESIGN.md
//! section 9, first row), each on its own lab of the same shape: two node
//! namespaces on the lab's fabric bridge, a client container on n1 and a
//! server container on n2.
//!
//! The baselines are built with iproute2 on labs without agents. Every
//! namespace they add is named `<lab prefix>-...`, so the lab's teardown
//! (on drop, also on error or panic, or by the next `Lab::up` if this
//! process was killed) removes them with the rest of the lab.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use netlab::{Background, Lab, LabConfig, StoreKind};
use serde::Serialize;

use crate::cluster::{inspect, netctl, retry};
use crate::machine;
use crate::tools::{self, QUICK, host, run_in};

/// The fabric MTU of the lab (veths default to 1500).
const FABRIC_MTU: u32 = 1500;
/// VXLAN over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
const VXLAN_OVERHEAD: u32 = 50;
/// How long servers get to listen and the path to carry a first ping.
/// Generous for (a): the client's node learns about the server container
/// through its etcd watch.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which setup; the letters are the ones the issue and the table use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// This product: netagent's eBPF datapath over VXLAN.
    A,
    /// Linux bridge + VXLAN device with static FDB and neighbour entries (Docker/Flannel style).
    B,
    /// Plain routing between the nodes, no overlay.
    C,
    /// This product with `--opt encrypted`: VXLAN inside the agent's WireGuard.
    E,
    /// wireguard-go (Debian's) between the nodes, carrying bridge + VXLAN as in (b).
    W,
}

impl Kind {
    /// Column header of the table (the benchmark adds its letter).
    pub fn short(self) -> &'static str {
        match self {
            Kind::A => "netagent",
            Kind::B => "bridge+VXLAN",
            Kind::C => "routing",
            Kind::E => "netagent encrypted",
            Kind::W => "wireguard-go",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::A => "netagent eBPF VXLAN",
            Kind::B => "bridge + VXLAN, static FDB",
            Kind::C => "plain routing, no overlay",
            Kind::E => "netagent eBPF VXLAN in its userspace WireGuard (boringtun)",
            Kind::W => "wireguard-go between the nodes, bridge + VXLAN over it",
        }
    }

    /// Whether the setup is this product (built after the baselines, which need no build).
    pub fn is_product(self) -> bool {
        matches!(self, Kind::A | Kind::E)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A ready setup: where to run the clients and what to connect to.
pub struct Pair {
    pub kind: Kind,
    /// Network namespace of the client container (on n1).
    pub client: PathBuf,
    /// Network namespace of the server container (on n2).
    pub server: PathBuf,
    pub server_ip: Ipv4Addr,
    /// MTU of the client's interface towards the server.
    pub mtu: u32,
    pub lab_prefix: String,
    /// Facts about the setup worth quoting with its numbers.
    pub notes: Vec<String>,
    /// Servers this process started (baselines); declared before `lab` so
    /// they are stopped before the lab is torn down.
    _servers: Vec<Background>,
    lab: Lab,
}

impl Pair {
    /// Names the lab so a failure can be looked at (`cargo xtask lab status`).
    pub fn lab(&self) -> &Lab {
        &self.lab
    }
}

/// Builds setup `kind` with its servers on `server_cpu` (any CPU for
/// `None`) and waits until they answer; this product's agents get `agent_args` too.
pub fn build(kind: Kind, server_cpu: Option<usize>, agent_args: &[String]) -> Result<Pair> {
    let pair = match kind {
        Kind::A => product(server_cpu, false, agent_args)?,
        Kind::E => product(server_cpu, true, agent_args)?,
        Kind::B => bridge_vxlan(server_cpu)?,
        Kind::W => wireguard_go(server_cpu)?,
        Kind::C => routing(server_cpu)?,
    };
    wait_ready(&pair).with_context(|| format!("setup {kind} on lab {}", pair.lab_prefix))?;
    Ok(pair)
}

// ---- (a) this product ----------------------------------------------------

const BENCH_NET: &str = "bench";
const BENCH_SUBNET: &str = "10.50.0.0/24";

fn product(server_cpu: Option<usize>, encrypted: bool, agent_args: &[String]) -> Result<Pair> {
    let lab = Lab::up(LabConfig {
        nodes: 2,
        store: StoreKind::Etcd,
        extra_agent_args: agent_args.to_vec(),
        ..Default::default()
    })
    .context("lab for netagent")?;
    let mut create = vec!["network", "create", "--subnet", BENCH_SUBNET];
    if encrypted {
        create.extend(["--opt", "encrypted"]);
    }
    create.push(BENCH_NET);
    netctl(&lab, 1, &create)?;
    // n2 sees the network through its etcd watch; running a container there
    // before it does would fail with an unknown network.
    retry(READY_TIMEOUT, || {
        netctl(&lab, 2, &["network", "inspect", BENCH_NET]).map(drop)
    })
    .context("n2 never saw the bench network")?;
    // One container for both servers, so both measurements cross the same path.
    let servers = format!(
        "{} & {} & wait",
        tools::on_cpu(server_cpu, tools::iperf3_server()).join(" "),
        tools::on_cpu(server_cpu, tools::sockperf_server()).join(" ")
    );
    netctl(
        &lab,
        2,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "srv",
            "--network",
            BENCH_NET,
            "--",
            "sh",
            "-c",
            &servers,
        ],
    )?;
    netctl(
        &lab,
        1,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "cli",
            "--network",
            BENCH_NET,
            "--",
            "sleep",
            "3600",
        ],
    )?;
    let srv = inspect(&lab, 2, "srv")?;
    let cli = inspect(&lab, 1, "cli")?;
    let server_ip = srv.ip;
    Ok(Pair {
        kind: if encrypted { Kind::E } else { Kind::A },
        mtu: tools::path_mtu(&cli.netns, &server_ip.to_string())?,
        client: cli.netns,
        server: srv.netns,
        server_ip,
        lab_prefix: lab.prefix().to_owned(),
        notes: if agent_args.is_empty() {
            Vec::new()
        } else {
            vec![format!("agent args {}", agent_args.join(" "))]
        },
        _servers: Vec::new(),
        lab,
    })
}

// ---- baselines ------------------------------------------------------------

/// A lab with the two node namespaces and the fabric only.
fn bare_lab(what: &str) -> Result<Lab> {
    Lab::up(LabConfig {
        nodes: 2,
        // Nothing reads a store: no etcd to start.
        store: StoreKind::Embedded,
        start_agents: false,
        ..Default::default()
    })
    .with_context(|| format!("lab for {what}"))
}

/// Container namespace `i` of a baseline lab: `<prefix>-c<i>`.
fn container_ns(lab: &Lab, i: usize) -> String {
    format!("{}-c{i}", lab.prefix())
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new(netlab::NETNS_DIR).join(ns)
}

/// Adds a container namespace configured like the lab's own: loopback up,
/// IPv6 off (the design is IPv4-only; this keeps ND and MLD out of the runs).
fn add_container_ns(ns: &str) -> Result<()> {
    host("ip", &["netns", "add", ns])?;
    host("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    if Path::new("/proc/sys/net/ipv6").exists() {
        run_in(
            &netns_path(ns),
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
            QUICK,
        )?;
    }
    Ok(())
}

/// Starts iperf3 and sockperf servers in `ns`.
fn start_servers(ns: &Path, cpu: Option<usize>) -> Result<Vec<Background>> {
    [tools::iperf3_server(), tools::sockperf_server()]
        .into_iter()
        .map(|argv| netlab::spawn(&mut tools::in_netns(ns, &tools::on_cpu(cpu, argv))))
        .collect()
}

/// Docker-style MAC for a container address: 02:42 and the four address bytes.
fn mac_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

const VXLAN_DEV: &str = "vxlan42";
const VNI: &str = "42";
const NODE_BRIDGE: &str = "br0";
/// Host side of a container's veth in its node namespace.
const HOST_VETH: &str = "veth0";
/// Inside the container, as in the product.
const CONTAINER_IF: &str = "eth0";

/// (b) How Docker's overlay driver and Flannel's vxlan backend connect
/// containers: a Linux bridge per node with the container veth and a VXLAN
/// device as ports; everything a peer needs is installed statically (VXLAN
/// FDB, bridge FDB, the container's neighbour entry), so no ARP or
/// flooding happens during the runs, as the eBPF datapath answers ARP itself.
fn bridge_vxlan(server_cpu: Option<usize>) -> Result<Pair> {
    let lab = bare_lab("(b)")?;
    let underlay = |i: usize| lab.node_addr(i);
    let notes = bridge_vxlan_over(&lab, "eth0", FABRIC_MTU, &underlay)?;
    finish_baseline(
        Kind::B,
        lab,
        Ipv4Addr::new(10, 50, 0, 3),
        server_cpu,
        notes,
        Vec::new(),
    )
}

/// wireguard-go's interface MTU (its default).
const WG_MTU: u32 = 1420;

/// (w) What users of userspace WireGuard run: wireguard-go between the two nodes (one TUN
/// each, configured with `wg`), and the bridge + VXLAN of (b) over the tunnel addresses.
fn wireguard_go(server_cpu: Option<usize>) -> Result<Pair> {
    let lab = bare_lab("(w)")?;
    let dir = tempfile::tempdir().context("key directory")?;
    let wg_if = |i: usize| format!("{}w{i}", lab.prefix());
    let wg_ip = |i: usize| Ipv4Addr::new(10, 79, 0, i as u8);
    let mut keys = Vec::new();
    for i in 1..=2 {
        let key = dir.path().join(format!("k{i}"));
        let private = host("wg", &["genkey"])?;
        std::fs::write(&key, &private).context("writing a key")?;
        let public = run_stdin("wg", &["pubkey"], &private)?;
        keys.push((key, public.trim().to_owned()));
    }
    let mut daemons = Vec::new();
    for i in 1..=2 {
        let node = netns_path(&lab.node_ns(i));
        // Foreground, so the lab's teardown (and ours, before it) can stop it.
        daemons.push(netlab::spawn(&mut tools::in_netns(
            &node,
            &[
                "env",
                "WG_PROCESS_FOREGROUND=1",
                "wireguard-go",
                "-f",
                &wg_if(i),
            ],
        ))?);
    }
    for i in 1..=2 {
        let peer = 3 - i;
        let node = netns_path(&lab.node_ns(i));
        retry(READY_TIMEOUT, || {
            run_in(&node, &["ip", "link", "show", "dev", &wg_if(i)], QUICK).map(drop)
        })
        .context("wireguard-go made no interface")?;
        run_in(
            &node,
            &[
                "wg",
                "set",
                &wg_if(i),
                "listen-port",
                "51820",
                "private-key",
                keys[i - 1].0.to_str().unwrap_or_default(),
                "peer",
                &keys[peer - 1].1,
                "endpoint",
                &format!("{}:51820", lab.node_addr(peer)),
                "allowed-ips",
                &format!("{}/32", wg_ip(peer)),
            ],
            QUICK,
        )?;
        run_in(
            &node,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", wg_ip(i)),
                "dev",
                &wg_if(i),
            ],
            QUICK,
        )?;
        run_in(&node, &["ip", "link", "set", &wg_if(i), "up"], QUICK)?;
    }
    let version = machine::tool_version(&["wireguard-go", "--version"]);
    let mut notes = bridge_vxlan_over(&lab, &wg_if(1), WG_MTU, &wg_ip)?;
    notes.push(format!("{version}, MTU {WG_MTU}, over the fabric"));
    finish_baseline(
        Kind::W,
        lab,
        Ipv4Addr::new(10, 50, 0, 3),
        server_cpu,
        notes,
        daemons,
    )
}

/// The bridge + VXLAN of (b) on `lab`, its VXLAN device over `dev` (MTU `dev_mtu`) between the
/// addresses `underlay(i)` of the nodes. Returns notes for the legend.
fn bridge_vxlan_over(
    lab: &Lab,
    dev: &str,
    dev_mtu: u32,
    underlay: &dyn Fn(usize) -> Ipv4Addr,
) -> Result<Vec<String>> {
    let mtu = dev_mtu - VXLAN_OVERHEAD;
    let ip = |i: usize| Ipv4Addr::new(10, 50, 0, 1 + i as u8);
    for i in 1..=2 {
        let peer = 3 - i;
        let node = lab.node_ns(i);
        let cns = container_ns(lab, i);
        let local = underlay(i).to_string();
        let remote = underlay(peer).to_string();
        // wireguard-go names its interface per node; the fabric's is eth0 on both.
        let dev = if dev == "eth0" {
            dev.to_owned()
        } else {
            format!("{}w{i}", lab.prefix())
        };
        let (mtu_s, my_mac, peer_mac) = (mtu.to_string(), mac_for(ip(i)), mac_for(ip(peer)));
        add_container_ns(&cns)?;
        let n = node.as_str();
        let ipn = |args: &[&str]| -> Result<String> {
            let mut all = vec!["-n", n];
            all.extend_from_slice(args);
            host("ip", &all)
        };
        ipn(&["link", "add", NODE_BRIDGE, "type", "bridge"])?;
        ipn(&["link", "set", NODE_BRIDGE, "up"])?;
        ipn(&[
            "link",
            "add",
            VXLAN_DEV,
            "type",
            "vxlan",
            "id",
            VNI,
            "dstport",
            "4789",
            "local",
            &local,
            "dev",
            &dev,
            "nolearning",
        ])?;
        ipn(&["link", "set", VXLAN_DEV, "master", NODE_BRIDGE, "up"])?;
        ipn(&[
            "link",
            "add",
            HOST_VETH,
            "mtu",
            &mtu_s,
            "type",
            "veth",
            "peer",
            "name",
            CONTAINER_IF,
            "mtu",
            &mtu_s,
            "netns",
            &cns,
        ])?;
        ipn(&["link", "set", HOST_VETH, "master", NODE_BRIDGE, "up"])?;
        let ipc = |args: &[&str]| -> Result<String> {
            let mut all = vec!["-n", cns.as_str()];
            all.extend_from_slice(args);
            host("ip", &all)
        };
        ipc(&["link", "set", CONTAINER_IF, "address", &my_mac])?;
        ipc(&["addr", "add", &format!("{}/24", ip(i)), "dev", CONTAINER_IF])?;
        ipc(&["link", "set", CONTAINER_IF, "up"])?;
        ipc(&[
            "neigh",
            "replace",
            &ip(peer).to_string(),
            "lladdr",
            &peer_mac,
            "dev",
            CONTAINER_IF,
            "nud",
            "permanent",
        ])?;
        let fdb = |args: &[&str]| -> Result<String> {
            let mut all = vec!["-n", n, "fdb"];
            all.extend_from_slice(args);
            host("bridge", &all)
        };
        // Default destination for broadcast and unknown MACs (Docker's and
        // Flannel's all-zeros entry) ...
        fdb(&[
            "append",
            "00:00:00:00:00:00",
            "dev",
            VXLAN_DEV,
            "dst",
            &remote,
        ])?;
        // ... the peer's MAC behind the remote VTEP ...
        fdb(&[
            "add",
            &peer_mac,
            "dev",
            VXLAN_DEV,
            "dst",
            &remote,
            "self",
            "permanent",
        ])?;
        // ... and on the bridge's VXLAN port, so the bridge never floods it.
        fdb(&["add", &peer_mac, "dev", VXLAN_DEV, "master", "static"])?;
    }
    // Bridged IPv4 goes through the netfilter hooks when br_netfilter is on
    // (Docker and Kubernetes require it); quote it, since it costs a little.
    let nf = run_in(
        &netns_path(&lab.node_ns(1)),
        &["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"],
        QUICK,
    )
    .map_or_else(|_| "absent".to_owned(), |v| v.trim().to_owned());
    Ok(vec![format!(
        "bridge-nf-call-iptables={nf} in the node namespaces (kernel default), no iptables rules"
    )])
}

/// Runs `program args` on the host with `input` on stdin; its stdout.
fn run_stdin(program: &str, args: &[&str], input: &str) -> Result<String> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (c) No overlay: each node routes its container subnet and the peer's
/// (via the peer's fabric address), the upper bound of what any datapath on
/// this fabric can do.
fn routing(server_cpu: Option<usize>) -> Result<Pair> {
    let lab = bare_lab("(c)")?;
    let gw = |i: usize| Ipv4Addr::new(10, 51, i as u8, 1);
    let ip = |i: usize| Ipv4Addr::new(10, 51, i as u8, 2);
    for i in 1..=2 {
        let peer = 3 - i;
        let node = lab.node_ns(i);
        let cns = container_ns(&lab, i);
        add_container_ns(&cns)?;
        run_in(
            &netns_path(&node),
            &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
            QUICK,
        )?;
        let n = node.as_str();
        host(
            "ip",
            &[
                "-n",
                n,
                "link",
                "add",
                HOST_VETH,
                "type",
                "veth",
                "peer",
                "name",
                CONTAINER_IF,
                "netns",
                &cns,
            ],
        )?;
        host(
            "ip",
            &[
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", gw(i)),
                "dev",
                HOST_VETH,
            ],
        )?;
        host("ip", &["-n", n, "link", "set", HOST_VETH, "up"])?;
        host(
            "ip",
            &[
                "-n",
                n,
                "route",
                "add",
                &format!("10.51.{peer}.0/24"),
                "via",
                &lab.node_addr(peer).to_string(),
                "dev",
                "eth0",
            ],
        )?;
        let c = cns.as_str();
        host(
            "ip",
            &[
                "-n",
                c,
                "addr",
                "add",
                &format!("{}/24", ip(i)),
                "dev",
                CONTAINER_IF,
            ],
        )?;
        host("ip", &["-n", c, "link", "set", CONTAINER_IF, "up"])?;
        host(
            "ip",
            &[
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &gw(i).to_string(),
            ],
        )?;
    }
    let notes = vec!["static routes via the peer's fabric address, ip_forward=1".to_owned()];
    finish_baseline(Kind::C, lab, ip(2), server_cpu, notes, Vec::new())
}

/// Starts the servers in container 2 and describes the pair.
fn finish_baseline(
    kind: Kind,
    lab: Lab,
    server_ip: Ipv4Addr,
    server_cpu: Option<usize>,
    notes: Vec<String>,
    daemons: Vec<Background>,
) -> Result<Pair> {
    let client = netns_path(&container_ns(&lab, 1));
    let server = netns_path(&container_ns(&lab, 2));
    let mut servers = start_servers(&server, server_cpu)?;
    servers.extend(daemons);
    Ok(Pair {
        kind,
        mtu: tools::path_mtu(&client, &server_ip.to_string())?,
        client,
        server,
        server_ip,
        lab_prefix: lab.prefix().to_owned(),
        notes,
        _servers: servers,
        lab,
    })
}

// ---- readiness -------------------------------------------------------------

/// Waits until both servers listen and a ping crosses the path: the first
/// measured run must not include ARP, FDB or agent convergence.
fn wait_ready(pair: &Pair) -> Result<()> {
    let iperf = ":5201".to_owned();
    let sockperf = format!(":{}", tools::SOCKPERF_PORT);
    retry(READY_TIMEOUT, || {
        let listening = run_in(&pair.server, &["ss", "-Hltn"], QUICK)?;
        let has = |port: &str| listening.split_whitespace().any(|w| w.ends_with(port));
        if !(has(&iperf) && has(&sockperf)) {
            bail!("servers not listening yet:\n{listening}");
        }
        Ok(())
    })?;
    let dest = pair.server_ip.to_string();
    retry(READY_TIMEOUT, || {
        run_in(
            &pair.client,
            &["ping", "-c", "1", "-W", "1", "-q", &dest],
            Duration::from_secs(5),
        )
        .map(drop)
    })
    .with_context(|| format!("no ping from the client to {dest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_style_macs() {
        assert_eq!(mac_for(Ipv4Addr::new(10, 50, 0, 2)), "02:42:0a:32:00:02");
    }
}
