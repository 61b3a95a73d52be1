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
    CtEntry, CtKey, CtKind, Datapath, DatapathConfig, DropEvent, DropReason, EndpointInfo,
    LbConfig, Limits, NetworkInfo, NodeInfo, ServiceInfo, TestObservation,
};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
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

/// Services on network A: VIP 10.0.0.100 balances (set SVC_ID) over the local peer, the
/// remote peer and a second local endpoint B3, in that order.
pub const VIP: Ipv4Address = Ipv4Address::new(10, 0, 0, 100);
pub const SVC_ID: u32 = 1;
pub const B3_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 5);
pub const B3_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x00, 0x00, 0x05];
pub const B3_IFINDEX: u32 = 45;
/// The node's advertise address and uplink (routing mesh).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const UPLINK_IFINDEX: u32 = 77;
/// A host outside the overlay (a routing-mesh client).
pub const OUTSIDE_CLIENT: Ipv4Address = Ipv4Address::new(198, 51, 100, 7);

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
        // Tables large enough that no test's connections are evicted.
        Self::with_limits(Limits {
            conntrack: 1 << 18,
            ct_new: 1 << 18,
        })
    }

    /// A loaded datapath with these conntrack capacities.
    pub fn with_limits(limits: Limits) -> Self {
        let dir = BpfDir::new();
        let mut dp = Datapath::load_with(dir.path(), config(), &limits).expect("load datapath");
        dp.load_test_hooks().expect("load test hooks");
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
        dp.upsert_node(REMOTE_NODE, &NodeInfo::default())
            .expect("upsert node");
    }

    /// The routed topology plus the service VIP (set SVC_ID = [local peer, remote peer, B3])
    /// and the mesh config (NODE_IP, UPLINK_IFINDEX).
    pub fn with_services() -> Self {
        Self::with_services_in(Self::routed())
    }

    /// [`Fixture::with_services`] on the routed topology of `fx`.
    pub fn with_services_in(mut fx: Self) -> Self {
        if fx.dp.endpoints().expect("endpoints").is_empty() {
            fx.install_topology();
        }
        fx.dp
            .upsert_endpoint(ip(B3_IP), &EndpointInfo::local(VNI_A, B3_IFINDEX, B3_MAC))
            .expect("B3");
        fx.dp
            .upsert_service(
                ip(VIP),
                &ServiceInfo {
                    id: SVC_ID,
                    vni: VNI_A,
                    flags: 0,
                },
            )
            .expect("service");
        fx.dp
            .set_backends(SVC_ID, &[ip(LOCAL_PEER_IP), ip(REMOTE_PEER_IP), ip(B3_IP)])
            .expect("backends");
        fx.dp
            .set_lb_config(LbConfig {
                node_ip: Some(NODE_IP),
                uplink_ifindex: UPLINK_IFINDEX,
                ..LbConfig::default()
            })
            .expect("lb config");
        fx
    }

    /// Moves the endpoint `addr` onto the test-run "veth" (ifindex 1) and `CONTAINER_IP` to
    /// `elsewhere`, so `from_container` runs can send as `addr` (test runs always come in on
    /// ifindex 1).
    pub fn send_as(&mut self, addr: Ipv4Address, mac: [u8; 6], elsewhere: u32) {
        self.dp
            .upsert_endpoint(
                ip(CONTAINER_IP),
                &EndpointInfo::local(VNI_A, elsewhere, CONTAINER_MAC),
            )
            .expect("move client");
        // Senders other than the client are backends here: replicas, whose packets may be
        // VIP replies (ENDPOINT_F_REPLICA).
        let mut sender = EndpointInfo::local(VNI_A, TEST_RUN_IFINDEX, mac);
        sender.flags |= netagent_datapath::ENDPOINT_F_REPLICA;
        self.dp
            .upsert_endpoint(ip(addr), &sender)
            .expect("move sender");
    }

    /// Runs the `from_uplink_test` hook.
    pub fn run_uplink(&self, frame: &[u8]) -> (u32, Vec<u8>, TestObservation) {
        let before = self.observation().runs;
        let (verdict, out) = run(self.dp.from_uplink_test().expect("program"), frame);
        let obs = self.observation();
        assert_eq!(
            obs.runs,
            before.wrapping_add(1),
            "the hook recorded this run"
        );
        assert_eq!(obs.verdict, verdict);
        observe_encapsulation(verdict, out, obs)
    }

    /// Runs the `from_overlay_test` hook as if the frame arrived with `vni` from `node`.
    pub fn run_overlay_from(
        &mut self,
        vni: u32,
        node: Ipv4Addr,
        frame: &[u8],
    ) -> (u32, Vec<u8>, TestObservation) {
        self.dp.set_test_tunnel(vni, node).expect("set test tunnel");
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

    /// The conntrack entries.
    pub fn ct(&self) -> Vec<(CtKey, CtEntry)> {
        self.dp.conntrack_entries().expect("conntrack")
    }

    /// The conntrack entry under `key`, if any.
    pub fn ct_entry(&self, key: &CtKey) -> Option<CtEntry> {
        self.ct()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| e)
    }

    /// Runs `from_container`; a frame it encapsulated comes back decapsulated (checked by
    /// [`decapsulate`]).
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out) = run(self.dp.from_container().expect("program"), frame);
        match decapsulate(verdict, &out) {
            Some((inner, _)) => (verdict, inner),
            None => (verdict, out),
        }
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
        observe_encapsulation(verdict, out, obs)
    }

    /// Runs the `from_overlay_test` hook as if the frame arrived with `vni` from
    /// `REMOTE_NODE`.
    pub fn run_overlay(&mut self, vni: u32, frame: &[u8]) -> (u32, Vec<u8>, TestObservation) {
        self.dp
            .set_test_tunnel(vni, REMOTE_NODE)
            .expect("set test tunnel");
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

/// What VXLAN encapsulation in eBPF put around a frame (see [`decapsulate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    pub vni: u32,
    pub remote: Ipv4Addr,
    pub ttl: u8,
    pub sport: u16,
}

/// If the program redirected `out` in VXLAN from this node (NODE_IP) it built itself, checks
/// the outer headers are what the VXLAN device would send (IPv4 checksum and lengths, DF,
/// UDP to 4789 without checksum, the VNI flag) and returns the inner frame and what the outer
/// headers say. Anything else (another node's VXLAN passing the uplink, a frame not
/// redirected) is not ours: None.
pub fn decapsulate(verdict: u32, out: &[u8]) -> Option<(Vec<u8>, Outer)> {
    const ENCAP: usize = 14 + 20 + 8 + 8;
    if verdict != TC_ACT_REDIRECT || out.len() < ENCAP + 14 || out[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &out[14..34];
    if ip[9] != 17 || ip[12..16] != NODE_IP.octets() || out[36..38] != 4789u16.to_be_bytes() {
        return None;
    }
    assert_eq!(ip[0], 0x45, "outer IPv4 without options");
    assert_eq!(
        usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        out.len() - 14,
        "outer total length"
    );
    assert_eq!(ip[6..8], [0x40, 0], "DF, no fragment offset");
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    assert_eq!(
        (folded & 0xffff) + (folded >> 16),
        0xffff,
        "outer IPv4 checksum"
    );
    let udp = &out[34..42];
    assert_eq!(
        usize::from(u16::from_be_bytes([udp[4], udp[5]])),
        out.len() - 34,
        "UDP length"
    );
    assert_eq!(udp[6..8], [0, 0], "no outer UDP checksum");
    let vxlan = &out[42..50];
    assert_eq!(vxlan[0..4], [0x08, 0, 0, 0], "VXLAN flags: VNI present");
    assert_eq!(vxlan[7], 0);
    let outer = Outer {
        vni: u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]),
        remote: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        sport: u16::from_be_bytes([udp[0], udp[1]]),
    };
    assert!(
        outer.sport >= 32768,
        "source port from the flow hash, in the VXLAN range"
    );
    Some((out[50..].to_vec(), outer))
}

/// A hook's result with a frame the program encapsulated itself replaced by the inner frame,
/// and the outer headers reported in the observation's tunnel fields, as the VXLAN device's
/// tunnel key would have been: tests say "tunnelled to node N with VNI V" either way.
fn observe_encapsulation(
    verdict: u32,
    out: Vec<u8>,
    mut obs: TestObservation,
) -> (u32, Vec<u8>, TestObservation) {
    let Some((inner, outer)) = decapsulate(verdict, &out) else {
        return (verdict, out, obs);
    };
    assert_ne!(
        obs.tunnel_key_status, 0,
        "encapsulated in eBPF and given a tunnel key for the device as well"
    );
    obs.tunnel_key_status = 0;
    obs.tunnel_id = outer.vni;
    obs.tunnel_remote = outer.remote.octets();
    obs.tunnel_ttl = outer.ttl;
    obs.tunnel_tos = 0;
    (verdict, inner, obs)
}

/// Runs `from_container` on `frame` and checks that the program left the VXLAN to a device:
/// redirected, not encapsulated by the program, with a tunnel key set for the device. Returns
/// the frame as left and the observation (the key's fields).
pub fn run_for_the_device(fx: &Fixture, frame: &[u8]) -> (Vec<u8>, TestObservation) {
    let (verdict, out) = run(fx.dp.from_container_test().expect("program"), frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert!(
        decapsulate(verdict, &out).is_none(),
        "encapsulated by the program"
    );
    let obs = fx.observation();
    assert_eq!(obs.tunnel_key_status, 0, "no tunnel key for the device");
    (out, obs)
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

/// Ethernet + IPv4 + UDP (port 40000 -> 7) carrying `payload`, checksummed, from the
/// container.
pub fn ipv4(dst: Ipv4Address, payload: &[u8]) -> Vec<u8> {
    ipv4_from(CONTAINER_IP, dst, payload)
}

/// Ethernet + IPv4 + UDP (port 40000 -> 7) carrying `payload`, checksummed, from `src`.
pub fn ipv4_from(src: Ipv4Address, dst: Ipv4Address, payload: &[u8]) -> Vec<u8> {
    udp_frame(src, 40000, dst, 7, payload)
}

/// Ethernet (container -> router MAC) + IPv4 + `l4` (protocol `proto`, already built).
pub fn ipv4_raw(src: Ipv4Address, dst: Ipv4Address, proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len: l4.len(),
        hop_limit: 64,
    };
    let mut l3 = vec![0u8; repr.buffer_len() + l4.len()];
    let mut packet = Ipv4Packet::new_unchecked(&mut l3[..]);
    repr.emit(&mut packet, &Default::default());
    packet.payload_mut().copy_from_slice(l4);
    ethernet(EthernetAddress(ROUTER_MAC), EthernetProtocol::Ipv4, &l3)
}

/// A UDP datagram in a frame, with a correct UDP checksum.
pub fn udp_frame(
    src: Ipv4Address,
    sport: u16,
    dst: Ipv4Address,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    let mut l4 = vec![0u8; repr.header_len() + payload.len()];
    repr.emit(
        &mut UdpPacket::new_unchecked(&mut l4[..]),
        &src.into(),
        &dst.into(),
        payload.len(),
        |buf| buf.copy_from_slice(payload),
        &Default::default(),
    );
    ipv4_raw(src, dst, IpProtocol::Udp, &l4)
}

/// A TCP segment in a frame with `flags` set (seq 1000, ack 0 unless ACK), correct checksum.
pub fn tcp_frame(
    src: Ipv4Address,
    sport: u16,
    dst: Ipv4Address,
    dport: u16,
    flags: TcpFlags,
    payload: &[u8],
) -> Vec<u8> {
    tcp_frame_seq(src, sport, dst, dport, flags, 1000, payload)
}

/// [`tcp_frame`] with sequence number `seq`.
pub fn tcp_frame_seq(
    src: Ipv4Address,
    sport: u16,
    dst: Ipv4Address,
    dport: u16,
    flags: TcpFlags,
    seq: i32,
    payload: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control: match flags {
            TcpFlags::Syn | TcpFlags::SynAck => TcpControl::Syn,
            TcpFlags::Fin => TcpControl::Fin,
            TcpFlags::Rst => TcpControl::Rst,
            TcpFlags::Ack | TcpFlags::Psh => TcpControl::None,
        },
        seq_number: TcpSeqNumber(seq),
        ack_number: match flags {
            TcpFlags::Syn => None,
            _ => Some(TcpSeqNumber(2000)),
        },
        window_len: 64240,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let mut l4 = vec![0u8; repr.buffer_len()];
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut l4[..]),
        &src.into(),
        &dst.into(),
        &Default::default(),
    );
    if flags == TcpFlags::Psh {
        let mut packet = TcpPacket::new_unchecked(&mut l4[..]);
        packet.set_psh(true);
        packet.fill_checksum(&src.into(), &dst.into());
    }
    ipv4_raw(src, dst, IpProtocol::Tcp, &l4)
}

/// The TCP segment kinds the tests send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpFlags {
    Syn,
    SynAck,
    Ack,
    Psh,
    Fin,
    Rst,
}

/// What a test needs to know about a TCP/UDP frame after the program ran, with every
/// checksum recomputed from the bytes (not trusted from the program).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: Ipv4Address,
    pub dst: Ipv4Address,
    pub sport: u16,
    pub dport: u16,
    pub proto: IpProtocol,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The L4 payload.
    pub payload: Vec<u8>,
    /// The UDP checksum field (0 = none).
    pub udp_checksum: Option<u16>,
}

/// Parses an Ethernet/IPv4/TCP-or-UDP frame and asserts that the IPv4 header checksum and
/// the L4 checksum (pseudo header included) are right.
pub fn parse_checked(frame: &[u8]) -> Parsed {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
    assert!(ip.verify_checksum(), "IPv4 header checksum");
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let proto = ip.next_header();
    let (sport, dport, payload, udp_checksum) = match proto {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
            assert!(
                tcp.verify_checksum(&src.into(), &dst.into()),
                "TCP checksum of {src}:{} -> {dst}:{}",
                tcp.src_port(),
                tcp.dst_port()
            );
            (tcp.src_port(), tcp.dst_port(), tcp.payload().to_vec(), None)
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(ip.payload()).expect("udp");
            // verify_checksum accepts 0 ("no checksum"); callers check udp_checksum for that.
            assert!(
                udp.verify_checksum(&src.into(), &dst.into()),
                "UDP checksum of {src}:{} -> {dst}:{}",
                udp.src_port(),
                udp.dst_port()
            );
            (
                udp.src_port(),
                udp.dst_port(),
                udp.payload().to_vec(),
                Some(udp.checksum()),
            )
        }
        other => panic!("not TCP/UDP: {other}"),
    };
    Parsed {
        src,
        dst,
        sport,
        dport,
        proto,
        dst_mac: eth.dst_addr().0,
        src_mac: eth.src_addr().0,
        payload,
        udp_checksum,
    }
}

/// Asserts `out` is the TCP reset the datapath answers `frame` (a container's TCP packet to
/// `from`) with: addressed back to the sender from `from`, RST per RFC 9293 3.10.7.1, correct
/// checksums, no payload.
pub fn assert_reset(out: &[u8], frame: &[u8]) {
    let sent = parse_checked(frame);
    let got = parse_checked(out);
    assert_eq!(out.len(), 54, "bare Ethernet + IPv4 + TCP");
    assert_eq!(
        (got.src, got.sport),
        (sent.dst, sent.dport),
        "from the address sent to"
    );
    assert_eq!(
        (got.dst, got.dport),
        (sent.src, sent.sport),
        "to the sender"
    );
    assert_eq!(got.dst_mac, sent.src_mac);
    assert_eq!(got.src_mac, ROUTER_MAC);
    assert!(got.payload.is_empty());
    let tcp_in = TcpPacket::new_checked(&frame[34..]).expect("tcp");
    let tcp = TcpPacket::new_checked(&out[34..]).expect("tcp");
    assert!(tcp.rst(), "RST flag");
    if tcp_in.ack() {
        assert_eq!(tcp.seq_number(), tcp_in.ack_number());
        assert!(!tcp.ack());
    } else {
        assert_eq!(tcp.seq_number().0, 0);
        assert!(tcp.ack());
        let len = tcp_in.payload().len() + usize::from(tcp_in.syn()) + usize::from(tcp_in.fin());
        assert_eq!(tcp.ack_number(), tcp_in.seq_number() + len);
    }
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

/// A conntrack key (ports host order).
pub fn ct_key(
    src: Ipv4Address,
    sport: u16,
    dst: Ipv4Address,
    dport: u16,
    proto: u8,
    dir: u8,
) -> CtKey {
    CtKey {
        src_ip: src.octets(),
        dst_ip: dst.octets(),
        src_port: sport.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// Asserts `entry` is of `kind` and rewrites to `nat:port`.
pub fn assert_ct(entry: Option<CtEntry>, kind: CtKind, nat: Ipv4Address, port: u16) -> CtEntry {
    let entry = entry.unwrap_or_else(|| panic!("no {kind:?} entry"));
    assert_eq!(CtKind::from_code(entry.kind), Some(kind), "{entry:?}");
    assert_eq!(entry.nat_ip, nat.octets(), "{kind:?} NAT address");
    assert_eq!(entry.nat_port(), port, "{kind:?} NAT port");
    entry
}
