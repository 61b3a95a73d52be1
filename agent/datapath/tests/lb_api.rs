//! The typed load-balancer API the agent's reconciler relies on: services, backend sets
//! (atomic replacement through banks), published ports, conntrack inspection, LB config.

mod common;

use std::{net::Ipv4Addr, time::Duration};

use aya::maps::{HashMap, MapData};
use common::*;
use netagent_datapath::{
    BACKENDS_PER_SET_MAX, Backend, BackendKey, Datapath, DatapathError, L4Proto, LbConfig,
    PublishedInfo, ServiceInfo, map_names,
};

fn svc(id: u32) -> ServiceInfo {
    ServiceInfo {
        id,
        vni: VNI_A,
        flags: 0,
    }
}

fn addrs(last: &[u8]) -> Vec<Ipv4Addr> {
    last.iter().map(|b| Ipv4Addr::new(10, 0, 0, *b)).collect()
}

/// Every BACKENDS entry of set `id` as (bank, slot, address), sorted.
fn raw_slots(dp: &mut Datapath, id: u32) -> Vec<(u16, u16, Ipv4Addr)> {
    let map = dp
        .ebpf_mut()
        .map_mut(map_names::BACKENDS)
        .expect("BACKENDS");
    let map: HashMap<&mut MapData, BackendKey, Backend> = HashMap::try_from(map).expect("hash map");
    let mut all: Vec<_> = map
        .iter()
        .map(|e| e.expect("entry"))
        .filter(|(k, _)| k.service_id == id)
        .map(|(k, v)| (k.bank, k.slot, Ipv4Addr::from(v.ip)))
        .collect();
    all.sort();
    all
}

#[test]
fn services_upsert_list_remove() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let dp = &mut fx.dp;
    let (a, b) = (Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 1, 0, 100));
    dp.upsert_service(
        b,
        &ServiceInfo {
            vni: VNI_B,
            ..svc(2)
        },
    )
    .expect("b");
    dp.upsert_service(a, &svc(1)).expect("a");
    assert_eq!(
        dp.services().expect("list"),
        [
            (a, svc(1)),
            (
                b,
                ServiceInfo {
                    vni: VNI_B,
                    ..svc(2)
                }
            )
        ]
    );
    dp.upsert_service(a, &svc(7)).expect("replace");
    assert_eq!(dp.service(a).expect("get"), Some(svc(7)));
    assert!(dp.remove_service(a).expect("remove"));
    assert!(!dp.remove_service(a).expect("remove again"));
    assert_eq!(dp.service(a).expect("get"), None);

    for (vip, info) in [
        (Ipv4Addr::UNSPECIFIED, svc(1)),
        (Ipv4Addr::new(224, 0, 0, 1), svc(1)),
        (a, svc(0)),
        (a, ServiceInfo { vni: 0, ..svc(1) }),
        (
            a,
            ServiceInfo {
                vni: 1 << 24,
                ..svc(1)
            },
        ),
        (a, ServiceInfo { flags: 1, ..svc(1) }),
    ] {
        let err = dp.upsert_service(vip, &info).expect_err("invalid");
        assert!(matches!(err, DatapathError::InvalidEntry(_)), "{err}");
    }
    assert_eq!(dp.services().expect("list").len(), 1);
}

#[test]
fn backend_sets_switch_banks_and_leave_no_stale_slots() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    assert!(fx.dp.backends(5).expect("none").is_empty());
    fx.dp.set_backends(5, &addrs(&[3, 4, 5, 6])).expect("four");
    assert_eq!(fx.dp.backends(5).expect("get"), addrs(&[3, 4, 5, 6]));
    assert_eq!(fx.dp.rr_cursor(5).expect("cursor"), Some(0));
    let bank0: Vec<_> = (0..4)
        .map(|s| (0, s, addrs(&[3, 4, 5, 6])[s as usize]))
        .collect();
    assert_eq!(raw_slots(&mut fx.dp, 5), bank0);

    // Shrink: written to bank 1, bank 0 untouched (a reader may still be using it).
    fx.dp.set_backends(5, &addrs(&[4, 6])).expect("two");
    assert_eq!(fx.dp.backends(5).expect("get"), addrs(&[4, 6]));
    let mut expect = bank0.clone();
    expect.extend([(1, 0, addrs(&[4])[0]), (1, 1, addrs(&[6])[0])]);
    assert_eq!(raw_slots(&mut fx.dp, 5), expect);

    // Next write goes to bank 0 again and deletes its leftovers beyond the new count.
    fx.dp.set_backends(5, &addrs(&[9])).expect("one");
    assert_eq!(fx.dp.backends(5).expect("get"), addrs(&[9]));
    assert_eq!(
        raw_slots(&mut fx.dp, 5),
        [
            (0, 0, addrs(&[9])[0]),
            (1, 0, addrs(&[4])[0]),
            (1, 1, addrs(&[6])[0])
        ]
    );
    // Writing the same set changes nothing.
    let before = raw_slots(&mut fx.dp, 5);
    fx.dp.set_backends(5, &addrs(&[9])).expect("same");
    assert_eq!(raw_slots(&mut fx.dp, 5), before);

    fx.dp.set_backends(6, &addrs(&[7])).expect("other set");
    assert_eq!(
        fx.dp.backend_sets().expect("sets"),
        [(5, addrs(&[9])), (6, addrs(&[7]))]
    );
    // Empty set: exists, no backends.
    fx.dp.set_backends(6, &[]).expect("empty");
    assert!(fx.dp.backends(6).expect("get").is_empty());

    assert!(fx.dp.remove_backends(5).expect("remove"));
    assert!(raw_slots(&mut fx.dp, 5).is_empty());
    assert_eq!(fx.dp.rr_cursor(5).expect("cursor"), None);
    assert!(!fx.dp.remove_backends(5).expect("remove again"));
    assert_eq!(fx.dp.backend_sets().expect("sets"), [(6, vec![])]);
}

#[test]
fn invalid_backend_sets_are_rejected_and_nothing_is_written() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let too_many: Vec<Ipv4Addr> = (0..=BACKENDS_PER_SET_MAX)
        .map(|i| Ipv4Addr::from(0x0a00_0000 + i + 1))
        .collect();
    for (id, list) in [
        (0, addrs(&[3])),
        (1, addrs(&[3, 4, 3])),
        (1, vec![Ipv4Addr::BROADCAST]),
        (1, vec![Ipv4Addr::LOCALHOST]),
        (1, too_many),
    ] {
        let err = fx.dp.set_backends(id, &list).expect_err("invalid");
        assert!(matches!(err, DatapathError::InvalidEntry(_)), "{err}");
    }
    assert!(fx.dp.backend_sets().expect("sets").is_empty());
    assert!(raw_slots(&mut fx.dp, 1).is_empty());
}

#[test]
fn published_ports_upsert_list_remove() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::new();
    let dp = &mut fx.dp;
    dp.upsert_published(8080, L4Proto::Udp, &PublishedInfo::new(2, 53))
        .expect("udp");
    dp.upsert_published(8080, L4Proto::Tcp, &PublishedInfo::new(1, 80))
        .expect("tcp");
    dp.upsert_published(443, L4Proto::Tcp, &PublishedInfo::new(1, 8443))
        .expect("tls");
    assert_eq!(
        dp.published().expect("list"),
        [
            (443, L4Proto::Tcp, PublishedInfo::new(1, 8443)),
            (8080, L4Proto::Tcp, PublishedInfo::new(1, 80)),
            (8080, L4Proto::Udp, PublishedInfo::new(2, 53)),
        ]
    );
    assert!(dp.remove_published(8080, L4Proto::Tcp).expect("remove"));
    assert!(!dp.remove_published(8080, L4Proto::Tcp).expect("again"));
    assert_eq!(dp.published().expect("list").len(), 2);
    for (port, info) in [
        (0, PublishedInfo::new(1, 80)),
        (80, PublishedInfo::new(1, 0)),
        (80, PublishedInfo::new(0, 80)),
    ] {
        let err = dp
            .upsert_published(port, L4Proto::Tcp, &info)
            .expect_err("invalid");
        assert!(matches!(err, DatapathError::InvalidEntry(_)), "{err}");
    }
}

#[test]
fn lb_config_is_separate_and_survives_a_reload() {
    if !have_root() {
        return;
    }
    let dir = BpfDir::new();
    let lb = LbConfig {
        node_ip: Some(NODE_IP),
        uplink_ifindex: 5,
        tcp_timeout: Duration::from_secs(3600),
        udp_timeout: Duration::from_secs(60),
        syn_timeout: Duration::from_secs(30),
        close_timeout: Duration::from_secs(5),
    };
    {
        let mut dp = Datapath::load(dir.path(), config()).expect("load");
        assert_eq!(dp.lb_config().expect("lb"), LbConfig::default());
        dp.set_lb_config(lb).expect("set lb");
        // set_config leaves the LB settings alone, and the other way round.
        dp.set_config(config()).expect("set config");
        assert_eq!(dp.lb_config().expect("lb"), lb);
        assert_eq!(dp.config().expect("config").vxlan_ifindex, VXLAN_IFINDEX);
        let bad = LbConfig {
            tcp_timeout: Duration::ZERO,
            ..lb
        };
        assert!(matches!(
            dp.set_lb_config(bad),
            Err(DatapathError::InvalidConfig(_))
        ));
        assert_eq!(dp.lb_config().expect("lb"), lb, "nothing written");
    }
    // An agent restart keeps them (the attached programs use the pinned config).
    let dp = Datapath::load(dir.path(), config()).expect("reload");
    assert_eq!(dp.lb_config().expect("lb"), lb);
}

#[test]
fn conntrack_can_be_listed_and_flushed() {
    if !have_root() {
        return;
    }
    let mut fx = Fixture::with_services();
    for sport in [40000, 40001] {
        let frame = tcp_frame(CONTAINER_IP, sport, VIP, 80, TcpFlags::Syn, b"");
        assert_eq!(fx.run(&frame).0, TC_ACT_REDIRECT);
    }
    assert_eq!(fx.ct().len(), 4);
    assert_eq!(fx.dp.flush_conntrack().expect("flush"), 4);
    assert!(fx.ct().is_empty());
}
