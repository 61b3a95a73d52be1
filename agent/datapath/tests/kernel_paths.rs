//! The datapath forwarding real traffic: two "nodes" (network namespaces joined by a veth
//! fabric, each with a collect-metadata VXLAN device and its own pinned datapath) and
//! "containers" (namespaces with a veth to their node). Pings exercise what a test run
//! cannot: `bpf_redirect_peer` delivery, the tunnel key byte order seen by the VXLAN device,
//! decapsulation into `from_overlay`, and isolation on the wire.
//!
//! Every namespace is created by this test under a per-run name and deleted on drop, also
//! when an assertion fails; addresses exist only inside them.

mod common;

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
};

use common::*;
use netagent_datapath::{
    Datapath, DatapathConfig, DropReason, EndpointInfo, NetworkInfo, NodeInfo,
};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`ip netns`), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("dpk{}-{n}-{tag}", std::process::id());
        let ns = Self { name };
        ns.check(&["netns", "add", &ns.name], false);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn output(&self, args: &[&str], inside: bool) -> Output {
        let mut cmd = Command::new("ip");
        if inside {
            cmd.args(["-n", &self.name]);
        }
        cmd.args(args).output().expect("run ip")
    }

    fn check(&self, args: &[&str], inside: bool) {
        let out = self.output(args, inside);
        assert!(
            out.status.success(),
            "ip {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ip -n <ns> args...`
    fn ip(&self, args: &[&str]) {
        self.check(args, true);
    }

    fn ifindex(&self, ifname: &str) -> u32 {
        let out = self.output(&["-o", "link", "show", "dev", ifname], true);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("ifindex of {ifname} in {}: {text}", self.name))
    }

    /// One ping; true if answered.
    fn ping(&self, dst: Ipv4Addr) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "ping", "-c1", "-W1", "-q"])
            .arg(dst.to_string())
            .output()
            .expect("run ping")
            .status
            .success()
    }

    /// Runs `f` on a thread inside this namespace (attach resolves interface names there).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).expect("open netns");
                // SAFETY: setns only changes this (scoped, short-lived) thread's namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = self.output(&["netns", "del", &self.name], false);
        if !out.status.success() {
            eprintln!(
                "cleanup of netns {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

struct Container {
    ns: Netns,
    ip: Ipv4Addr,
    mac: [u8; 6],
    /// Host-side veth in the node namespace.
    host_if: String,
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Creates a container namespace plugged into `node` with a veth, the way the agent will.
fn container(node: &Netns, host_if: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Container {
    let ns = Netns::new(host_if);
    node.ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ]);
    node.ip(&["link", "set", host_if, "up"]);
    ns.ip(&["link", "set", "eth0", "address", &mac_string(mac)]);
    ns.ip(&["link", "set", "eth0", "mtu", "1450"]);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    Container {
        ns,
        ip,
        mac,
        host_if: host_if.to_owned(),
    }
}

struct Node {
    ns: Netns,
    addr: Ipv4Addr,
    dir: BpfDir,
}

fn node(tag: &str, addr: Ipv4Addr) -> Node {
    Node {
        ns: Netns::new(tag),
        addr,
        dir: BpfDir::new(),
    }
}

impl Node {
    fn load(&self) -> Datapath {
        let vx = self.ns.ifindex("vx0");
        let mut dp = Datapath::load(self.dir.path(), config()).expect("load");
        dp.set_config(DatapathConfig {
            vxlan_ifindex: vx,
            ..config()
        })
        .expect("config");
        for (subnet, vni) in [(SUBNET_A, VNI_A), (SUBNET_B, VNI_B)] {
            dp.upsert_network(subnet, &NetworkInfo { vni, flags: 0 })
                .expect("network");
        }
        self.ns
            .run(|| dp.attach_from_overlay("vx0").expect("attach overlay"));
        dp
    }

    fn add_local(&self, dp: &mut Datapath, c: &Container, vni: u32) {
        let ifindex = self.ns.ifindex(&c.host_if);
        // Marked as a replica whatever it is: a flag that only lets replies of VIP
        // connections be looked up (the replicas of these tests are plain containers).
        let mut info = EndpointInfo::local(vni, ifindex, c.mac);
        info.flags |= netagent_datapath::ENDPOINT_F_REPLICA;
        dp.upsert_endpoint(c.ip, &info).expect("local endpoint");
        let host_if = c.host_if.clone();
        self.ns.run(|| {
            dp.attach_from_container(&host_if)
                .expect("attach container")
        });
    }
}

/// A container on another node; that node becomes a known node (NODES), as the reconciler
/// does for every node of the cluster.
fn add_remote(dp: &mut Datapath, c: &Container, vni: u32, on: &Node) {
    dp.upsert_endpoint(c.ip, &EndpointInfo::remote(vni, on.addr, c.mac))
        .expect("remote endpoint");
    dp.upsert_node(on.addr, &NodeInfo::default()).expect("node");
}

#[test]
fn containers_talk_across_nodes_and_networks_stay_isolated() {
    if !have_root() {
        return;
    }
    // Field order of the guards does not matter: pins and namespaces are independent.
    let n1 = node("n1", Ipv4Addr::new(198, 18, 0, 1));
    let n2 = node("n2", Ipv4Addr::new(198, 18, 0, 2));
    n1.ns.ip(&[
        "link",
        "add",
        "fab",
        "type",
        "veth",
        "peer",
        "name",
        "fab",
        "netns",
        &n2.ns.name,
    ]);
    for (n, addr) in [(&n1, "198.18.0.1/24"), (&n2, "198.18.0.2/24")] {
        n.ns.ip(&["addr", "add", addr, "dev", "fab"]);
        n.ns.ip(&["link", "set", "fab", "up"]);
        n.ns.ip(&[
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "external",
            "dstport",
            "4789",
            "nolearning",
        ]);
        n.ns.ip(&["link", "set", "vx0", "up"]);
    }

    let a1 = container(
        &n1.ns,
        "ha1",
        Ipv4Addr::new(10, 0, 0, 2),
        [2, 0x42, 10, 0, 0, 2],
    );
    let a2 = container(
        &n1.ns,
        "ha2",
        Ipv4Addr::new(10, 0, 0, 3),
        [2, 0x42, 10, 0, 0, 3],
    );
    let b1 = container(
        &n1.ns,
        "hb1",
        Ipv4Addr::new(10, 1, 0, 2),
        [2, 0x42, 10, 1, 0, 2],
    );
    let a3 = container(
        &n2.ns,
        "ha3",
        Ipv4Addr::new(10, 0, 0, 4),
        [2, 0x42, 10, 0, 0, 4],
    );

    let mut dp1 = n1.load();
    n1.add_local(&mut dp1, &a1, VNI_A);
    n1.add_local(&mut dp1, &a2, VNI_A);
    n1.add_local(&mut dp1, &b1, VNI_B);
    add_remote(&mut dp1, &a3, VNI_A, &n2);

    let mut dp2 = n2.load();
    n2.add_local(&mut dp2, &a3, VNI_A);
    for c in [&a1, &a2] {
        add_remote(&mut dp2, c, VNI_A, &n1);
    }
    add_remote(&mut dp2, &b1, VNI_B, &n1);

    // Same node: proxy ARP, then redirect_peer both ways.
    assert!(a1.ns.ping(a2.ip), "a1 -> a2 (same node)");
    // Across nodes through VXLAN, both directions.
    assert!(a1.ns.ping(a3.ip), "a1 -> a3 (other node)");
    assert!(a3.ns.ping(a2.ip), "a3 -> a2 (other node)");
    for dp in [&dp1, &dp2] {
        for reason in [
            DropReason::SourceSpoofed,
            DropReason::PolicyIsolation,
            DropReason::WrongVni,
            DropReason::UnknownEndpoint,
        ] {
            assert_eq!(dp.drop_counter(reason).expect("counter"), 0, "{reason:?}");
        }
    }

    // Network B cannot reach network A, even with a hand-written route to A's subnet.
    b1.ns.ip(&["route", "add", "10.0.0.0/24", "dev", "eth0"]);
    assert!(!b1.ns.ping(a1.ip), "b1 -> a1 must fail");
    assert!(!b1.ns.ping(a3.ip), "b1 -> a3 must fail");
    assert_eq!(
        dp1.drop_counter(DropReason::PolicyIsolation)
            .expect("counter"),
        2
    );
    // Nor by taking an address of network A on its interface.
    b1.ns.ip(&["addr", "add", "10.0.0.66/24", "dev", "eth0"]);
    let spoofed = Command::new("ip")
        .args([
            "netns",
            "exec",
            &b1.ns.name,
            "ping",
            "-c1",
            "-W1",
            "-q",
            "-I",
        ])
        .args(["10.0.0.66", "10.0.0.2"])
        .output()
        .expect("ping");
    assert!(!spoofed.status.success(), "spoofed source must fail");
    assert!(
        dp1.drop_counter(DropReason::SourceSpoofed)
            .expect("counter")
            >= 1
    );

    // A VXLAN packet with the wrong VNI for its destination: node 2 is made to believe a3
    // and a1 are in network B's VNI, so a3's packets to a1 leave with VNI_B.
    n2.add_local(&mut dp2, &a3, VNI_B);
    add_remote(&mut dp2, &a1, VNI_B, &n1);
    assert!(!a3.ns.ping(a1.ip), "wrong VNI must not be delivered");
    assert_eq!(dp1.drop_counter(DropReason::WrongVni).expect("counter"), 1);
    let events = dp1.take_drop_events().expect("events").drain();
    let wrong = events
        .iter()
        .find(|e| e.reason == DropReason::WrongVni.code())
        .expect("wrong_vni event");
    assert_eq!(wrong.vni, VNI_B);
    assert_eq!(wrong.dst_ip, a1.ip.octets());
}

// ---------------------------------------------------------------------------------------------
// Load balancing with real traffic: a VIP across two nodes, and the routing mesh from a host
// on the fabric through either node, with socat as client and servers.
// ---------------------------------------------------------------------------------------------

/// A background process (a server in a namespace), killed on drop: processes outlive the
/// deletion of their network namespace.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Netns {
    /// Starts `args` inside the namespace in the background.
    fn spawn(&self, args: &[&str]) -> Daemon {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        Daemon(child)
    }

    /// Runs `args` inside the namespace with empty stdin, bounded by socat's own timeouts;
    /// returns stdout, or the failure.
    fn exec(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .args(["10", "ip", "netns", "exec", &self.name])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "{args:?} in {}: {} {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// One TCP connection to `addr` (ip:port): sends nothing, returns what the server says.
    fn tcp_get(&self, addr: &str) -> Result<String, String> {
        self.exec(&[
            "socat",
            "-T",
            "3",
            "-",
            &format!("TCP:{addr},connect-timeout=3"),
        ])
    }

    /// One UDP datagram to `addr` from a fresh source port; returns the first reply (which
    /// must come from `addr`: the socket is connected). A socket of our own rather than
    /// socat, which gives up 0.5 s after its input ends, before a slow reply.
    fn udp_get(&self, addr: &str) -> Result<String, String> {
        let addr = addr.to_owned();
        self.run(move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            socket.connect(&addr).map_err(|e| e.to_string())?;
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            socket.send(b"q\n").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 512];
            let n = socket
                .recv(&mut buf)
                .map_err(|e| format!("UDP {addr}: {e}"))?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
        })
    }

    /// Turns TX and RX checksum offload of `ifname` on or off (the ethtool ioctls; no
    /// ethtool binary needed). With both off a veth carries complete checksums and the
    /// receiving stack verifies them (with RX offload on, veth marks them as verified).
    fn set_csum_offload(&self, ifname: &str, on: bool) {
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        const ETHTOOL_SRXCSUM: u32 = 0x15;
        const ETHTOOL_STXCSUM: u32 = 0x17;
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            data: *mut EthtoolValue,
            _pad: [u8; 16],
        }
        let ifname = ifname.to_owned();
        self.run(move || {
            // SAFETY: plain socket creation; closed below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            assert!(fd >= 0);
            for cmd in [ETHTOOL_SRXCSUM, ETHTOOL_STXCSUM] {
                let mut value = EthtoolValue {
                    cmd,
                    data: u32::from(on),
                };
                let mut req = IfReq {
                    name: [0; 16],
                    data: &mut value,
                    _pad: [0; 16],
                };
                req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
                // SAFETY: `req` is a valid ifreq whose data points to a live ethtool_value.
                let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
                assert_eq!(
                    rc,
                    0,
                    "ethtool {cmd:#x} on {ifname}: {}",
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
        });
    }
}

/// Polls `f` until it succeeds (servers starting up), for at most 5 s.
fn eventually(what: &str, mut f: impl FnMut() -> Result<String, String>) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match f() {
            Ok(out) => return out,
            Err(e) if std::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// A UDP server on port 53 of a namespace, on a thread of this process, answering every
/// datagram with "<client address> <name>"; stopped on drop. Not socat: `UDP-LISTEN,fork`
/// rebinds its socket after each new peer, and a datagram arriving meanwhile is lost.
struct UdpEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    fn start(ns: &Netns, name: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (path, name, flag) = (
            format!("/run/netns/{}", ns.name),
            name.to_owned(),
            stop.clone(),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: setns only changes this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let socket = std::net::UdpSocket::bind("0.0.0.0:53").expect("bind 53");
            socket
                .set_read_timeout(Some(std::time::Duration::from_millis(100)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 512];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("{} {name}\n", peer.ip()).as_bytes(), peer);
                }
            }
        });
        ready_rx.recv().expect("UDP server started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Servers in `ns` answering every TCP connection on 80 (socat) and UDP datagram on 53 with
/// "<client address> <name>": what the backend saw as the client.
fn echo_servers(ns: &Netns, name: &str) -> (Daemon, UdpEcho) {
    let reply = format!("SYSTEM:echo \"$SOCAT_PEERADDR {name}\"");
    (
        ns.spawn(&["socat", "TCP-LISTEN:80,fork,reuseaddr", &reply]),
        UdpEcho::start(ns, name),
    )
}

#[test]
fn vip_and_routing_mesh_with_real_tcp_and_udp_across_two_nodes() {
    if !have_root() {
        return;
    }
    use netagent_datapath::{L4Proto, LbConfig, PublishedInfo, ServiceInfo};

    let fabric = Netns::new("fab");
    let n1 = node("n1", Ipv4Addr::new(198, 18, 0, 1));
    let n2 = node("n2", Ipv4Addr::new(198, 18, 0, 2));
    let outside = Netns::new("out");
    fabric.ip(&["link", "add", "br0", "type", "bridge"]);
    fabric.ip(&["link", "set", "br0", "up"]);
    for (ns, port, ifname, addr) in [
        (&n1.ns, "p1", "fab", "198.18.0.1/24"),
        (&n2.ns, "p2", "fab", "198.18.0.2/24"),
        (&outside, "p3", "eth0", "198.18.0.100/24"),
    ] {
        fabric.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", &ns.name,
        ]);
        fabric.ip(&["link", "set", port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", addr, "dev", ifname]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
    for n in [&n1, &n2] {
        n.ns.ip(&[
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "external",
            "dstport",
            "4789",
            "nolearning",
        ]);
        n.ns.ip(&["link", "set", "vx0", "up"]);
    }
    let c1 = container(
        &n1.ns,
        "hc1",
        Ipv4Addr::new(10, 0, 0, 2),
        [2, 0x42, 10, 0, 0, 2],
    );
    let web1 = container(
        &n1.ns,
        "hw1",
        Ipv4Addr::new(10, 0, 0, 3),
        [2, 0x42, 10, 0, 0, 3],
    );
    let web2 = container(
        &n2.ns,
        "hw2",
        Ipv4Addr::new(10, 0, 0, 4),
        [2, 0x42, 10, 0, 0, 4],
    );
    // Replies to routing-mesh clients leave through the gateway (the agent's sandboxes have
    // this default route too).
    for c in [&c1, &web1, &web2] {
        c.ns.ip(&["route", "add", "default", "via", "10.0.0.1", "dev", "eth0"]);
    }

    let vip = Ipv4Addr::new(10, 0, 0, 100);
    let mut dp1 = n1.load();
    n1.add_local(&mut dp1, &c1, VNI_A);
    n1.add_local(&mut dp1, &web1, VNI_A);
    add_remote(&mut dp1, &web2, VNI_A, &n2);
    let mut dp2 = n2.load();
    n2.add_local(&mut dp2, &web2, VNI_A);
    add_remote(&mut dp2, &c1, VNI_A, &n1);
    add_remote(&mut dp2, &web1, VNI_A, &n1);
    for (n, dp) in [(&n1, &mut dp1), (&n2, &mut dp2)] {
        dp.upsert_service(
            vip,
            &ServiceInfo {
                id: 1,
                vni: VNI_A,
                flags: 0,
            },
        )
        .expect("service");
        dp.set_backends(1, &[web1.ip, web2.ip]).expect("backends");
        dp.upsert_published(8080, L4Proto::Tcp, &PublishedInfo::new(1, 80))
            .expect("publish tcp");
        dp.upsert_published(5300, L4Proto::Udp, &PublishedInfo::new(1, 53))
            .expect("publish udp");
        dp.set_lb_config(LbConfig {
            node_ip: Some(n.addr),
            uplink_ifindex: n.ns.ifindex("fab"),
            ..LbConfig::default()
        })
        .expect("lb config");
        n.ns.run(|| dp.attach_from_uplink("fab").expect("attach uplink"));
    }

    let _servers = (
        echo_servers(&web1.ns, "web1"),
        echo_servers(&web2.ns, "web2"),
    );
    // The node's own service on an unpublished port must keep working.
    let _own = n1.ns.spawn(&[
        "socat",
        "TCP-LISTEN:9000,fork,reuseaddr",
        "SYSTEM:echo node1",
    ]);
    eventually("web1 listening", || c1.ns.tcp_get("10.0.0.3:80"));
    eventually("web2 listening", || c1.ns.tcp_get("10.0.0.4:80"));
    eventually("web2 UDP", || c1.ns.udp_get("10.0.0.4:53"));
    eventually("node1 listening", || outside.tcp_get("198.18.0.1:9000"));

    let mut rounds = 0;
    for offload in [true, false] {
        if !offload {
            // Second round: complete checksums on every veth and verified by every receiving
            // stack, so a wrong checksum from our NAT would fail the connection.
            for (ns, ifname) in [
                (&c1.ns, "eth0"),
                (&web1.ns, "eth0"),
                (&web2.ns, "eth0"),
                (&outside, "eth0"),
                (&n1.ns, "fab"),
                (&n2.ns, "fab"),
                (&n1.ns, "hc1"),
                (&n1.ns, "hw1"),
                (&n2.ns, "hw2"),
            ] {
                ns.set_csum_offload(ifname, false);
            }
        }
        rounds += 1;

        // VIP: round-robin in turn, the replica sees the client's own address, and the
        // connection works at all only if replies come back from the VIP.
        let got: Vec<String> = (0..4)
            .map(|_| c1.ns.tcp_get("10.0.0.100:80").expect("TCP via VIP"))
            .collect();
        assert_eq!(
            got,
            [
                "10.0.0.2 web1",
                "10.0.0.2 web2",
                "10.0.0.2 web1",
                "10.0.0.2 web2"
            ],
            "VIP (offload {offload})"
        );
        let got: Vec<String> = (0..2)
            .map(|_| c1.ns.udp_get("10.0.0.100:53").expect("UDP via VIP"))
            .collect();
        assert_eq!(got, ["10.0.0.2 web1", "10.0.0.2 web2"], "UDP VIP");

        // Routing mesh through node 1 (web1 local, web2 behind the tunnel) and node 2: the
        // replica sees the outside client's address.
        for (node_addr, name) in [("198.18.0.1", "n1"), ("198.18.0.2", "n2")] {
            let got: Vec<String> = (0..2)
                .map(|_| {
                    outside
                        .tcp_get(&format!("{node_addr}:8080"))
                        .expect("TCP via mesh")
                })
                .collect();
            assert_eq!(
                got,
                ["198.18.0.100 web1", "198.18.0.100 web2"],
                "mesh via {name} (offload {offload})"
            );
            let got: Vec<String> = (0..2)
                .map(|_| {
                    outside
                        .udp_get(&format!("{node_addr}:5300"))
                        .expect("UDP via mesh")
                })
                .collect();
            assert_eq!(
                got,
                ["198.18.0.100 web1", "198.18.0.100 web2"],
                "UDP mesh via {name}"
            );
        }
        // Unpublished ports are the node's own.
        assert_eq!(outside.tcp_get("198.18.0.1:9000").as_deref(), Ok("node1"));

        // A replica calling its own service: balanced to itself it sees the hairpin address
        // (its own would be a martian source), otherwise its real address.
        let got: Vec<String> = (0..2)
            .map(|_| {
                web1.ns
                    .tcp_get("10.0.0.100:80")
                    .expect("TCP via VIP from a replica")
            })
            .collect();
        assert_eq!(got, ["169.254.42.1 web1", "10.0.0.3 web2"], "hairpin");
    }
    assert_eq!(rounds, 2);
    // n1 balanced 2 rounds x (4 TCP + 2 UDP VIP + 2 TCP + 2 UDP mesh + 2 hairpin round);
    // n2 2 x (2 + 2) mesh.
    assert_eq!(dp1.rr_cursor(1).expect("cursor"), Some(24));
    assert_eq!(dp2.rr_cursor(1).expect("cursor"), Some(8));
    for dp in [&dp1, &dp2] {
        for reason in [
            DropReason::NoRoute,
            DropReason::UnknownEndpoint,
            DropReason::WrongVni,
            DropReason::NoBackend,
            DropReason::ConntrackFailed,
            DropReason::NoUplink,
            DropReason::Malformed,
            DropReason::SourceSpoofed,
        ] {
            assert_eq!(dp.drop_counter(reason).expect("counter"), 0, "{reason:?}");
        }
    }
}
