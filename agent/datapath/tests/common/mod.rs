//! Shared helpers for the datapath tests (root, no network): a per-test bpffs directory that
//! is removed even when the test panics, frame builders on smoltcp, and BPF_PROG_TEST_RUN.

#![allow(dead_code)] // each test binary uses a different subset

use std::{
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use aya::{TestRun as _, TestRunOptions, programs::SchedClassifier};
use netagent_datapath::{Datapath, DatapathConfig, DropEvent, DropReason};
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

pub fn config() -> DatapathConfig {
    DatapathConfig {
        router_mac: ROUTER_MAC,
    }
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

    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(self.dp.from_container().expect("program"), frame)
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

/// Ethernet + IPv4 + `payload` (as UDP), checksummed.
pub fn ipv4(dst: Ipv4Address, payload: &[u8]) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: CONTAINER_IP,
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
