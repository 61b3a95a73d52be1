//! Pinned state across loads (agent restarts), pin compatibility, teardown and TCX attach.

mod common;

use std::path::Path;

use aya::{
    maps::{MapData, MapInfo, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use common::*;
use netagent_datapath::{
    Datapath, DatapathConfig, DatapathError, DropReason, EndpointInfo, NetworkInfo, PinReport,
    map_names, remove_pins,
};

/// `list` as a PinReport lists it (sorted by name).
fn names(list: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    names.sort();
    names
}

#[test]
fn second_load_reuses_pinned_maps() {
    if !have_root() {
        return;
    }
    let dir = BpfDir::new();
    let truncated = &arp_request(GATEWAY_IP)[..20];

    {
        let mut first = Datapath::load(dir.path(), config()).expect("first load");
        first
            .upsert_endpoint(
                ip(CONTAINER_IP),
                &EndpointInfo::local(VNI_A, 7, CONTAINER_MAC),
            )
            .expect("endpoint");
        first
            .upsert_network(
                SUBNET_A,
                &NetworkInfo {
                    vni: VNI_A,
                    flags: 0,
                },
            )
            .expect("network");
        assert_eq!(
            first.pin_report(),
            &PinReport {
                created: names(map_names::ALL),
                ..Default::default()
            }
        );
        let (verdict, _) = run(first.from_container().expect("program"), truncated);
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(
            first.drop_counter(DropReason::Malformed).expect("counter"),
            1
        );
        // `first` is dropped here without reading its event, like an agent that crashed.
    }
    for name in map_names::ALL {
        assert!(dir.path().join(name).exists(), "{name} is pinned");
    }

    let other_mac = [0x02, 0, 0, 0, 0, 0x99];
    let mut second = Datapath::load(
        dir.path(),
        DatapathConfig {
            router_mac: other_mac,
            vxlan_ifindex: 0,
        },
    )
    .expect("second load");
    assert_eq!(
        second.pin_report(),
        &PinReport {
            reused: names(map_names::ALL),
            ..Default::default()
        }
    );
    // Routing state carries over: the agent reconciles it instead of rebuilding it.
    assert_eq!(
        second.endpoints().expect("endpoints"),
        [(
            ip(CONTAINER_IP),
            EndpointInfo::local(VNI_A, 7, CONTAINER_MAC)
        )]
    );
    assert_eq!(
        second.networks().expect("networks"),
        [(
            SUBNET_A,
            NetworkInfo {
                vni: VNI_A,
                flags: 0
            }
        )]
    );
    // Written by the first load's program, seen by the second load.
    assert_eq!(
        second.drop_counter(DropReason::Malformed).expect("counter"),
        1
    );
    let events = second.take_drop_events().expect("events").drain();
    assert_eq!(events.len(), 1, "the first run's event survived the reload");
    assert_eq!(events[0].pkt_len, 20);
    // The config is rewritten by every load, except that a VXLAN ifindex of 0 (not known
    // yet to the restarting agent) keeps the one the attached programs are using.
    let config = second.config().expect("config");
    assert_eq!(config.router_mac, other_mac);
    assert_eq!(config.vxlan_ifindex, VXLAN_IFINDEX);
    // set_config writes exactly what it is given.
    second
        .set_config(DatapathConfig {
            router_mac: other_mac,
            vxlan_ifindex: 0,
        })
        .expect("set config");
    assert_eq!(second.config().expect("config").vxlan_ifindex, 0);

    run(second.from_container().expect("program"), truncated);
    assert_eq!(
        second.drop_counter(DropReason::Malformed).expect("counter"),
        2
    );
}

#[test]
fn incompatible_pinned_map_is_replaced() {
    if !have_root() {
        return;
    }
    let dir = BpfDir::new();
    std::fs::create_dir_all(dir.path()).expect("mkdir");
    // A DROP_COUNTERS from an imaginary older build with only 8 slots.
    let old: PerCpuArray<MapData, u64> = PerCpuArray::create(8, 0).expect("create map");
    let pin = dir.path().join(map_names::DROP_COUNTERS);
    old.pin(&pin).expect("pin");

    let dp = Datapath::load(dir.path(), config()).expect("load");
    assert_eq!(dp.pin_report().replaced, names(&["DROP_COUNTERS"]));
    let info = MapInfo::from_pin(&pin).expect("pinned again");
    assert_eq!(
        info.max_entries(),
        dataplane_common::DROP_COUNTERS_MAX_ENTRIES
    );
    run(dp.from_container().expect("program"), &[0u8; 14]);
    assert_eq!(
        dp.drop_counter(DropReason::UnsupportedL3).expect("counter"),
        1
    );
}

#[test]
fn load_outside_bpffs_is_a_clear_error() {
    if !have_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dp-not-bpffs-{}", std::process::id()));
    let err = Datapath::load(&dir, config()).expect_err("must fail");
    assert!(matches!(err, DatapathError::NotBpffs { .. }), "{err}");
    assert!(!dir.exists(), "nothing is created on failure");
}

#[test]
fn remove_pins_is_idempotent_and_careful() {
    if !have_root() {
        return;
    }
    let dir = BpfDir::new();
    drop(Datapath::load(dir.path(), config()).expect("load"));
    assert!(dir.path().exists());
    remove_pins(dir.path()).expect("remove");
    assert!(!dir.path().exists());
    remove_pins(dir.path()).expect("removing again is fine");

    // Never outside bpffs, never the bpffs root itself.
    let tmp = std::env::temp_dir();
    assert!(remove_pins(&tmp).is_err());
    assert!(tmp.exists());
    assert!(remove_pins(Path::new("/sys/fs/bpf")).is_err());
}

fn tcx_program_ids(ifname: &str) -> Vec<u32> {
    let (_, programs) =
        SchedClassifier::query_tcx(ifname, TcAttachType::Ingress).expect("query tcx");
    programs.iter().map(|p| p.id()).collect()
}

#[test]
fn attach_survives_reload_and_replaces_atomically() {
    if !have_root() {
        return;
    }
    in_private_netns(|| {
        let dir = BpfDir::new();
        // Processes spawned from this thread inherit its network namespace.
        ip_cmd(&[
            "link", "add", "dpveth0", "type", "veth", "peer", "name", "dpveth0p",
        ]);

        let first_id = {
            let mut dp = Datapath::load(dir.path(), config()).expect("load");
            dp.attach_from_container("dpveth0").expect("attach");
            dp.from_container()
                .expect("program")
                .info()
                .expect("info")
                .id()
        };
        assert!(
            dir.path().join("links/from_container@dpveth0").exists(),
            "link is pinned"
        );
        // The Datapath is gone but the pinned link keeps the program attached.
        assert_eq!(tcx_program_ids("dpveth0"), [first_id]);

        // Agent restart: the new program takes over the same link, no second attachment.
        let mut dp = Datapath::load(dir.path(), config()).expect("reload");
        dp.attach_from_container("dpveth0").expect("re-attach");
        let second_id = dp
            .from_container()
            .expect("program")
            .info()
            .expect("info")
            .id();
        assert_ne!(first_id, second_id);
        assert_eq!(tcx_program_ids("dpveth0"), [second_id]);

        // The interface is recreated under the same name: the old pinned link is defunct and
        // gets replaced by a fresh one.
        ip_cmd(&["link", "del", "dpveth0"]);
        ip_cmd(&[
            "link", "add", "dpveth0", "type", "veth", "peer", "name", "dpveth0p",
        ]);
        assert!(tcx_program_ids("dpveth0").is_empty());
        dp.attach_from_container("dpveth0")
            .expect("attach after recreate");
        assert_eq!(tcx_program_ids("dpveth0"), [second_id]);

        assert!(dp.detach_from_container("dpveth0").expect("detach"));
        assert!(tcx_program_ids("dpveth0").is_empty());
        assert!(!dp.detach_from_container("dpveth0").expect("detach again"));

        // Dots are valid in interface names but not in bpffs names.
        ip_cmd(&[
            "link", "add", "dp.1", "type", "veth", "peer", "name", "dp.1p",
        ]);
        dp.attach_from_container("dp.1")
            .expect("attach dotted name");
        assert!(dir.path().join("links/from_container@dp:1").exists());
        assert!(dp.attach_from_container("no/such").is_err());

        // Teardown: once remove_pins returns, nothing of ours is attached any more.
        drop(dp);
        assert_eq!(
            tcx_program_ids("dp.1").len(),
            1,
            "pinned link outlives the agent"
        );
        remove_pins(dir.path()).expect("remove pins");
        assert!(tcx_program_ids("dp.1").is_empty());
    });
}

#[test]
fn from_overlay_attaches_to_a_collect_metadata_vxlan_device() {
    if !have_root() {
        return;
    }
    in_private_netns(|| {
        let dir = BpfDir::new();
        // What the agent creates through rtnetlink: external (collect_metadata), UDP 4789,
        // no learning.
        ip_cmd(&[
            "link",
            "add",
            "dpvx0",
            "type",
            "vxlan",
            "external",
            "dstport",
            "4789",
            "nolearning",
        ]);
        let vx = ifindex("dpvx0");

        let first_id = {
            let mut dp = Datapath::load(dir.path(), config()).expect("load");
            dp.set_config(DatapathConfig {
                vxlan_ifindex: vx,
                ..config()
            })
            .expect("set config");
            dp.attach_from_overlay("dpvx0").expect("attach");
            dp.from_overlay()
                .expect("program")
                .info()
                .expect("info")
                .id()
        };
        assert!(dir.path().join("links/from_overlay@dpvx0").exists());
        assert_eq!(tcx_program_ids("dpvx0"), [first_id]);

        // Restart: the program is swapped in place and the VXLAN ifindex is kept.
        let mut dp = Datapath::load(dir.path(), config_without_vxlan()).expect("reload");
        assert_eq!(dp.config().expect("config").vxlan_ifindex, vx);
        dp.attach_from_overlay("dpvx0").expect("re-attach");
        let second_id = dp
            .from_overlay()
            .expect("program")
            .info()
            .expect("info")
            .id();
        assert_ne!(first_id, second_id);
        assert_eq!(tcx_program_ids("dpvx0"), [second_id]);

        // Links of the two programs are independent even on the same interface name.
        assert!(!dp.detach_from_container("dpvx0").expect("no such link"));
        assert!(dp.detach_from_overlay("dpvx0").expect("detach"));
        assert!(tcx_program_ids("dpvx0").is_empty());
        assert!(!dp.detach_from_overlay("dpvx0").expect("detach again"));
    });
}

fn config_without_vxlan() -> DatapathConfig {
    DatapathConfig {
        vxlan_ifindex: 0,
        ..config()
    }
}

#[test]
fn from_uplink_attaches_to_the_uplink_with_a_pinned_link() {
    if !have_root() {
        return;
    }
    in_private_netns(|| {
        let dir = BpfDir::new();
        ip_cmd(&[
            "link", "add", "dpup0", "type", "veth", "peer", "name", "dpup0p",
        ]);
        let first_id = {
            let mut dp = Datapath::load(dir.path(), config()).expect("load");
            dp.attach_from_uplink("dpup0").expect("attach");
            dp.from_uplink()
                .expect("program")
                .info()
                .expect("info")
                .id()
        };
        assert!(dir.path().join("links/from_uplink@dpup0").exists());
        assert_eq!(tcx_program_ids("dpup0"), [first_id], "outlives the agent");

        // Restart: swapped in place; independent of other programs' links on the name.
        let mut dp = Datapath::load(dir.path(), config()).expect("reload");
        dp.attach_from_uplink("dpup0").expect("re-attach");
        let second_id = dp
            .from_uplink()
            .expect("program")
            .info()
            .expect("info")
            .id();
        assert_eq!(tcx_program_ids("dpup0"), [second_id]);
        assert!(!dp.detach_from_container("dpup0").expect("no such link"));
        assert!(dp.detach_from_uplink("dpup0").expect("detach"));
        assert!(tcx_program_ids("dpup0").is_empty());
        assert!(!dp.detach_from_uplink("dpup0").expect("detach again"));
    });
}
