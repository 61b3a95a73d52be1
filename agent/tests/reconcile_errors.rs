//! The reconciler writes every entry it can, whatever fails (root: a real datapath in a
//! private bpffs directory).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use netagent::reconcile::{Desired, apply};
use netagent_datapath::{Datapath, DatapathConfig, EndpointInfo, NetworkInfo};

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = netagent_datapath::remove_pins(&self.0);
    }
}

#[test]
fn one_entry_the_kernel_refuses_does_not_stop_the_others() {
    if !nix::unistd::Uid::effective().is_root() {
        return;
    }
    netagent_datapath::mount_bpffs(std::path::Path::new("/sys/fs/bpf")).expect("bpffs");
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/reconcile-errors-{}",
        std::process::id()
    )));
    let mut dp = Datapath::load(
        &pins.0,
        DatapathConfig {
            router_mac: [0x02, 0, 0, 0, 0, 1],
            vxlan_ifindex: 0,
        },
    )
    .expect("load");
    let mac = [0x02, 0x42, 10, 0, 0, 2];
    let mut want = Desired::default();
    want.networks.insert(
        (Ipv4Addr::new(10, 0, 0, 0), 24),
        NetworkInfo {
            vni: 4096,
            flags: 0,
        },
    );
    // Sorted first, and refused by the datapath: VNI 0.
    want.endpoints
        .insert(Ipv4Addr::new(10, 0, 0, 2), EndpointInfo::local(0, 7, mac));
    for i in 3..6u8 {
        want.endpoints.insert(
            Ipv4Addr::new(10, 0, 0, i),
            EndpointInfo::remote(
                4096,
                Ipv4Addr::new(198, 18, 0, 12),
                [0x02, 0x42, 10, 0, 0, i],
            ),
        );
    }
    want.nodes
        .insert(Ipv4Addr::new(198, 18, 0, 12), Default::default());
    let changes = apply(&mut dp, &want);
    assert_eq!(changes.failed, 1, "{changes:?}");
    assert!(
        changes.errors[0].starts_with("endpoint 10.0.0.2"),
        "{changes:?}"
    );
    // Everything else made it.
    assert_eq!(dp.endpoints().expect("endpoints").len(), 3);
    assert_eq!(dp.networks().expect("networks").len(), 1);
    assert_eq!(dp.nodes().expect("nodes").len(), 1);
    // The next pass retries only what is still missing.
    let again = apply(&mut dp, &want);
    assert_eq!((again.upserted, again.failed), (0, 1));
}
