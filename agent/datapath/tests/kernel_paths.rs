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
use netagent_datapath::{Datapath, DatapathConfig, DropReason, EndpointInfo, NetworkInfo};

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
        dp.upsert_endpoint(c.ip, &EndpointInfo::local(vni, ifindex, c.mac))
            .expect("local endpoint");
        let host_if = c.host_if.clone();
        self.ns.run(|| {
            dp.attach_from_container(&host_if)
                .expect("attach container")
        });
    }
}

fn add_remote(dp: &mut Datapath, c: &Container, vni: u32, on: &Node) {
    dp.upsert_endpoint(c.ip, &EndpointInfo::remote(vni, on.addr, c.mac))
        .expect("remote endpoint");
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
