//! Shared helpers for the datapath tests (root, no network): a per-test bpffs directory that
//! is removed even when the test panics, frame builders on smoltcp, BPF_PROG_TEST_RUN, and a
//! small two-network topology for the routing tests.

#![allow(dead_code)] // each test binary uses a different subset

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use aya::{TestRun as _, TestRunOptions, programs::SchedClassifier};
use netagent_datapath::{
    Datapath, DatapathConfig, DropEvent, DropReason, EndpointInfo, NetworkInfo, TestObservation,
};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const ROUTER_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
pub const CONTAINER_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x00, 0x00, 0x02];
pub const CONTAINER_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
pub const GATEWAY_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
pub const BROADCAST: EthernetAddress = EthernetAddress([0xff; 6]);

/// ifindex the tests configure as the VXLAN device. Test runs never perform the redirect, so
/// it need not exist.
pub const VXLAN_IFINDEX: u32 = 99;

pub fn config() -> DatapathConfig {
    DatapathConfig {
        router_mac: ROUTER_MAC,
        vxlan_ifindex: VXLAN_IFINDEX,
    }
}

// The test topology. BPF_PROG_TEST_RUN runs skb programs on the loopback device, so the
// sending container's veth is ifindex 1 as far as the program can tell.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// Network A, 10.0.0.0/24: the sending container (CONTAINER_IP, on "veth" 1), a peer on this
/// node and one on another node.
pub const VNI_A: u32 = 0x1001;
pub const SUBNET_A: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 0, 0), 24);
pub const LOCAL_PEER_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 3);
pub const LOCAL_PEER_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x00, 0x00, 0x03];
pub const LOCAL_PEER_IFINDEX: u32 = 42;
pub const REMOTE_PEER_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 4);
pub const REMOTE_PEER_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x00, 0x00, 0x04];
pub const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);

/// Network B, 10.1.0.0/24: one local and one remote endpoint.
pub const VNI_B: u32 = 0x1002;
pub const SUBNET_B: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 1, 0, 0), 24);
pub const B_LOCAL_IP: Ipv4Address = Ipv4Address::new(10, 1, 0, 2);
pub const B_LOCAL_IFINDEX: u32 = 43;
pub const B_REMOTE_IP: Ipv4Address = Ipv4Address::new(10, 1, 0, 3);
pub const B_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x01, 0x00, 0x02];

pub fn ip(addr: Ipv4Address) -> Ipv4Addr {
    Ipv4Addr::from(addr.octets())
}

/// Returns false (and says so) when not root: these tests load BPF programs.
pub fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: datapath tests need root (BPF_PROG_LOAD, bpffs)");
    }
    root
}

static MOUNT: Mutex<()> = Mutex::new(());
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A unique pin directory under /sys/fs/bpf, removed on drop (also when the test panics).
pub struct BpfDir {
    path: PathBuf,
}

impl BpfDir {
    pub fn new() -> Self {
        {
            // Serialised: two threads both seeing "not mounted" would stack two mounts.
            let _guard = MOUNT.lock().unwrap_or_else(|e| e.into_inner());
            netagent_datapath::mount_bpffs(Path::new("/sys/fs/bpf")).expect("mount bpffs");
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/sys/fs/bpf/dp-test-{}-{n}", std::process::id()));
        // A leftover from a crashed run with the same pid would make results depend on it.
        netagent_datapath::remove_pins(&path).expect("clear stale test dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        if let Err(e) = netagent_datapath::remove_pins(&self.path) {
            eprintln!("cleanup of {} failed: {e}", self.path.display());
        }
    }
}

/// A loaded datapath plus its directory. Field order matters: the datapath (and the map fds
/// it holds) goes before the pins are removed.
pub struct Fixture {
    pub dp: Datapath,
    pub dir: BpfDir,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = BpfDir::new();
        let dp = Datapath::load(dir.path(), config()).expect("load datapath");
        Self { dp, dir }
    }

    /// A loaded datapath with the two-network topology installed.
    pub fn routed() -> Self {
        let mut fx = Self::new();
        fx.install_topology();
        fx
    }

    pub fn install_topology(&mut self) {
        let dp = &mut self.dp;
        let eps = [
            (
                CONTAINER_IP,
                EndpointInfo::local(VNI_A, TEST_RUN_IFINDEX, CONTAINER_MAC),
            ),
            (
                LOCAL_PEER_IP,
                EndpointInfo::local(VNI_A, LOCAL_PEER_IFINDEX, LOCAL_PEER_MAC),
            ),
            (
                REMOTE_PEER_IP,
                EndpointInfo::remote(VNI_A, REMOTE_NODE, REMOTE_PEER_MAC),
            ),
            (
                B_LOCAL_IP,
                EndpointInfo::local(VNI_B, B_LOCAL_IFINDEX, B_MAC),
            ),
            (B_REMOTE_IP, EndpointInfo::remote(VNI_B, REMOTE_NODE, B_MAC)),
        ];
        for (addr, info) in eps {
            dp.upsert_endpoint(ip(addr), &info)
                .expect("upsert endpoint");
        }
        for (subnet, vni) in [(SUBNET_A, VNI_A), (SUBNET_B, VNI_B)] {
            dp.upsert_network(subnet, &NetworkInfo { vni, flags: 0 })
                .expect("upsert network");
        }
    }

    /// Runs `from_container`.
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(self.dp.from_container().expect("program"), frame)
    }

    /// Runs the `from_container_test` hook; returns what it observed too.
    pub fn run_container_hook(&self, frame: &[u8]) -> (u32, Vec<u8>, TestObservation) {
        let before = self.observation().runs;
        let (verdict, out) = run(self.dp.from_container_test().expect("program"), frame);
        let obs = self.observation();
        assert_eq!(
            obs.runs,
            before.wrapping_add(1),
            "the hook recorded this run"
        );
        assert_eq!(obs.verdict, verdict);
        (verdict, out, obs)
    }

    /// Runs the `from_overlay_test` hook as if the frame arrived with `vni`.
    pub fn run_overlay(&mut self, vni: u32, frame: &[u8]) -> (u32, Vec<u8>, TestObservation) {
        self.dp.set_test_vni(vni).expect("set test VNI");
        let before = self.observation().runs;
        let (verdict, out) = run(self.dp.from_overlay_test().expect("program"), frame);
        let obs = self.observation();
        assert_eq!(
            obs.runs,
            before.wrapping_add(1),
            "the hook recorded this run"
        );
        assert_eq!(obs.verdict, verdict);
        (verdict, out, obs)
    }

    pub fn observation(&self) -> TestObservation {
        self.dp.test_observation().expect("read observation")
    }

    pub fn counter(&self, reason: DropReason) -> u64 {
        self.dp.drop_counter(reason).expect("read counter")
    }

    /// Counters of all reasons except `reason` are zero and `reason` is `n`.
    pub fn assert_only_drops(&self, reason: Option<DropReason>, n: u64) {
        for (name, count) in self.dp.drop_counters().expect("counters") {
            let want = if reason.map(DropReason::name) == Some(name) {
                n
            } else {
                0
            };
            assert_eq!(count, want, "drop counter {name}");
        }
    }

    pub fn events(&mut self) -> Vec<DropEvent> {
        self.dp.take_drop_events().expect("ring buffer").drain()
    }
}

/// Runs the program once on `frame`; returns the verdict and the frame as the program left it.
pub fn run(prog: &SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Runs the program `repeat` times on `frame` in one BPF_PROG_TEST_RUN; returns the verdict and
/// the kernel's mean time per run (it divides the total by `repeat`). The same skb is reused
/// for every repetition, so this measures the program on a hot cache.
pub fn run_repeat(prog: &SchedClassifier, frame: &[u8], repeat: u32) -> (u32, std::time::Duration) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    (result.return_value, result.duration)
}

pub fn ethernet(dst: EthernetAddress, ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: EthernetAddress(CONTAINER_MAC),
        dst_addr: dst,
        ethertype,
    };
    let mut buf = vec![0u8; repr.buffer_len() + payload.len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    repr.emit(&mut frame);
    frame.payload_mut().copy_from_slice(payload);
    buf
}

pub fn arp(op: ArpOperation, sender_ip: Ipv4Address, target_ip: Ipv4Address) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: op,
        source_hardware_addr: EthernetAddress(CONTAINER_MAC),
        source_protocol_addr: sender_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target_ip,
    };
    let mut payload = vec![0u8; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut payload[..]));
    ethernet(BROADCAST, EthernetProtocol::Arp, &payload)
}

/// An ARP request from the container for `target`, as its kernel sends it (42 bytes).
pub fn arp_request(target: Ipv4Address) -> Vec<u8> {
    arp(ArpOperation::Request, CONTAINER_IP, target)
}

/// Ethernet + IPv4 + `payload` (as UDP), checksummed, from the container.
pub fn ipv4(dst: Ipv4Address, payload: &[u8]) -> Vec<u8> {
    ipv4_from(CONTAINER_IP, dst, payload)
}

/// Ethernet + IPv4 + `payload` (as UDP), checksummed, from `src`.
pub fn ipv4_from(src: Ipv4Address, dst: Ipv4Address, payload: &[u8]) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: payload.len(),
        hop_limit: 64,
    };
    let mut l3 = vec![0u8; repr.buffer_len() + payload.len()];
    let mut packet = Ipv4Packet::new_unchecked(&mut l3[..]);
    repr.emit(&mut packet, &Default::default());
    packet.payload_mut().copy_from_slice(payload);
    ethernet(EthernetAddress(ROUTER_MAC), EthernetProtocol::Ipv4, &l3)
}

/// Asserts the frame was readdressed to `dst_mac` from the router and nothing else changed.
pub fn assert_readdressed(out: &[u8], frame: &[u8], dst_mac: [u8; 6]) {
    assert_eq!(out.len(), frame.len(), "length unchanged");
    assert_eq!(&out[0..6], &dst_mac, "Ethernet destination");
    assert_eq!(&out[6..12], &ROUTER_MAC, "Ethernet source");
    assert_eq!(
        &out[12..],
        &frame[12..],
        "ethertype and everything after untouched"
    );
}

/// Runs `f` on a thread that has its own, empty network namespace (it disappears when the
/// thread ends, also when `f` panics), so attach tests touch no interface of the host. bpffs
/// is a mount, not part of the network namespace, so pins work as usual.
pub fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only affects the calling thread's namespace membership.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip` (tests only: the agent itself uses rtnetlink) in the calling thread's netns.
pub fn ip_cmd(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip");
    assert!(status.success(), "ip {args:?}");
}

/// The ifindex of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> u32 {
    let c = std::ffi::CString::new(ifname).expect("ifname");
    // SAFETY: `c` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "{ifname}: {}", std::io::Error::last_os_error());
    index
}
