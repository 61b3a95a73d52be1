//! The typed routing-map API: what the agent's reconciler relies on.

mod common;

use std::net::Ipv4Addr;

use common::*;
use netagent_datapath::{
    DatapathError, EndpointInfo, NETWORK_F_ENCRYPTED, NETWORK_F_INTERNAL, NetworkInfo,
};

#[test]
fn endpoints_upsert_list_remove() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let dp = &mut fx.dp;
    assert!(dp.endpoints().expect("list").is_empty());

    let a = Ipv4Addr::new(10, 0, 0, 2);
    let b = Ipv4Addr::new(10, 0, 0, 3);
    let local = EndpointInfo::local(VNI_A, 5, CONTAINER_MAC);
    let remote = EndpointInfo::remote(VNI_A, REMOTE_NODE, REMOTE_PEER_MAC);
    dp.upsert_endpoint(b, &remote).expect("upsert b");
    dp.upsert_endpoint(a, &local).expect("upsert a");
    assert_eq!(dp.endpoints().expect("list"), [(a, local), (b, remote)]);
    assert_eq!(dp.endpoint(a).expect("get"), Some(local));
    assert!(local.is_local() && !remote.is_local());

    // Upsert replaces in place.
    let moved = EndpointInfo::remote(VNI_A, Ipv4Addr::new(198, 18, 0, 20), CONTAINER_MAC);
    dp.upsert_endpoint(a, &moved).expect("replace a");
    assert_eq!(dp.endpoint(a).expect("get"), Some(moved));

    assert!(dp.remove_endpoint(a).expect("remove"));
    assert!(!dp.remove_endpoint(a).expect("remove again"));
    assert_eq!(dp.endpoint(a).expect("get"), None);
    assert_eq!(dp.endpoints().expect("list"), [(b, remote)]);
}

#[test]
fn invalid_endpoints_are_rejected_and_nothing_is_written() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let ip = Ipv4Addr::new(10, 0, 0, 2);
    let both = EndpointInfo {
        node_ip: netagent_datapath::node_ip_to_abi(REMOTE_NODE),
        ..EndpointInfo::local(VNI_A, 5, CONTAINER_MAC)
    };
    for info in [both, EndpointInfo::local(0, 5, CONTAINER_MAC)] {
        let err = fx.dp.upsert_endpoint(ip, &info).expect_err("invalid");
        assert!(matches!(err, DatapathError::InvalidEntry(_)), "{err}");
    }
    assert!(fx.dp.endpoints().expect("list").is_empty());
}

#[test]
fn networks_upsert_list_remove() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let dp = &mut fx.dp;
    let a = NetworkInfo {
        vni: VNI_A,
        flags: 0,
    };
    let b = NetworkInfo {
        vni: VNI_B,
        flags: NETWORK_F_ENCRYPTED | NETWORK_F_INTERNAL,
    };
    let single = (Ipv4Addr::new(192, 168, 7, 7), 32);
    dp.upsert_network(SUBNET_B, &b).expect("upsert B");
    dp.upsert_network(SUBNET_A, &a).expect("upsert A");
    dp.upsert_network(single, &a).expect("upsert /32");
    assert_eq!(
        dp.networks().expect("list"),
        [(SUBNET_A, a), (SUBNET_B, b), (single, a)]
    );

    // Host bits are a caller bug, not silently masked.
    let err = dp
        .upsert_network((Ipv4Addr::new(10, 0, 0, 1), 24), &a)
        .expect_err("host bits");
    assert!(matches!(err, DatapathError::InvalidEntry(_)), "{err}");
    let err = dp
        .upsert_network(
            SUBNET_A,
            &NetworkInfo {
                vni: 1,
                flags: 0x80,
            },
        )
        .expect_err("unknown flag");
    assert!(matches!(err, DatapathError::InvalidEntry(_)), "{err}");

    // Removal is exact: a covering or covered prefix is a different entry.
    assert!(
        !dp.remove_network((Ipv4Addr::new(10, 0, 0, 0), 16))
            .expect("remove /16")
    );
    assert!(dp.remove_network(SUBNET_A).expect("remove A"));
    assert!(!dp.remove_network(SUBNET_A).expect("remove A again"));
    assert_eq!(dp.networks().expect("list"), [(SUBNET_B, b), (single, a)]);
}

/// The config is read by every program while the agent may rewrite it: it lives in a hash
/// map without preallocation, whose updates replace the element as a whole (RCU), so a
/// program never copies half an old and half a new config (an array update is an in-place
/// memcpy). And the test hooks are not loaded by a plain `load`.
#[test]
fn config_updates_are_whole_and_test_hooks_are_not_loaded_by_default() {
    if !have_root() {
        return;
    }
    let dir = BpfDir::new();
    let dp = netagent_datapath::Datapath::load(dir.path(), config()).expect("load");
    let info = aya::maps::MapInfo::from_pin(dir.path().join("CONFIG")).expect("CONFIG pinned");
    assert_eq!(info.map_type().expect("type"), aya::maps::MapType::Hash);
    assert_eq!(info.map_flags() & 1, 1, "BPF_F_NO_PREALLOC");
    assert!(dp.config().expect("config").is_ready());
    assert!(
        dp.from_container_test().expect("program").fd().is_err(),
        "test hooks stay unloaded in production"
    );
    assert!(dp.from_container().expect("program").fd().is_ok());
}
