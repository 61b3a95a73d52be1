//! End to end (root): services in the cluster store as users drive them through netctl.

use std::time::Duration;

use netlab::{Lab, LabConfig, StoreKind};

mod common;
use common::{json as netctl_json, must_fail};

#[test]
fn services_vips_ports_replicas_and_bad_input() {
    let lab = Lab::up(LabConfig {
        nodes: 2,
        store: StoreKind::Etcd,
        lease_ttl_secs: 3,
        ..Default::default()
    })
    .expect("lab up");
    netctl_json(
        &lab,
        1,
        &["network", "create", "--subnet", "10.60.0.0/24", "services"],
    );
    netctl_json(
        &lab,
        1,
        &["network", "create", "--subnet", "10.61.0.0/24", "other"],
    );
    let web = netctl_json(
        &lab,
        1,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--network",
            "services",
            "--publish",
            "8080:80",
        ],
    );
    assert_eq!(web["vips"][0]["network"], "services");
    let vip = web["vips"][0]["vip"].as_str().unwrap().to_string();
    assert_eq!(vip, "10.60.0.2");
    assert_eq!(web["ports"][0]["published"], 8080);
    assert_eq!(web["ports"][0]["target"], 80);
    assert_eq!(web["ports"][0]["protocol"], "tcp");

    // Replicas on both nodes; the VIP is never handed to a container.
    for (node, name) in [(1, "web.1"), (2, "web.2")] {
        let out = lab
            .netctl(
                node,
                [
                    "container",
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--network",
                    "services",
                    "--service",
                    "web",
                    "--",
                    "sleep",
                    "3600",
                ],
            )
            .unwrap();
        assert!(out.success(), "{}", out.stderr);
    }
    let web = netctl_json(&lab, 2, &["service", "inspect", "web"]);
    let backends = web["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2, "{web}");
    assert_eq!(backends[0]["container"], "web.1");
    assert_eq!(backends[0]["node"], "n1");
    assert_eq!(backends[1]["node"], "n2");
    for b in backends {
        assert_ne!(b["ip"].as_str().unwrap(), vip);
    }

    // Published ports change live; the port is free for others once removed.
    netctl_json(
        &lab,
        1,
        &["service", "update", "--publish-add", "53:53/udp", "web"],
    );
    let w = netctl_json(&lab, 1, &["service", "inspect", "web"]);
    assert_eq!(w["ports"].as_array().unwrap().len(), 2);
    netctl_json(
        &lab,
        1,
        &["service", "update", "--publish-rm", "8080", "web"],
    );
    netctl_json(
        &lab,
        1,
        &[
            "service",
            "create",
            "--name",
            "api",
            "--network",
            "services",
            "--publish",
            "8080:9000",
        ],
    );

    let (before_s, before_c) = (
        netctl_json(&lab, 1, &["service", "ls"]),
        netctl_json(&lab, 1, &["container", "ls"]),
    );
    must_fail(
        &lab,
        1,
        &[
            "service",
            "create",
            "--name",
            "x",
            "--network",
            "services",
            "--publish",
            "8080:80",
        ],
        "port 8080/tcp is already published by service \"api\"",
    );
    must_fail(
        &lab,
        1,
        &[
            "service",
            "create",
            "--name",
            "x",
            "--network",
            "services",
            "--publish",
            "70000:80",
        ],
        "outside 1-65535",
    );
    must_fail(
        &lab,
        1,
        &["service", "create", "--name", "x", "--network", "nope"],
        "network \"nope\" not found",
    );
    must_fail(
        &lab,
        1,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--network",
            "services",
        ],
        "service \"web\" already exists",
    );
    must_fail(
        &lab,
        1,
        &[
            "container",
            "run",
            "--name",
            "r",
            "--network",
            "services",
            "--service",
            "ghost",
            "--",
            "true",
        ],
        "service \"ghost\" not found",
    );
    must_fail(
        &lab,
        1,
        &[
            "container",
            "run",
            "--name",
            "r",
            "--network",
            "other",
            "--service",
            "web",
            "--",
            "true",
        ],
        "not on the container's network",
    );
    must_fail(
        &lab,
        1,
        &["service", "rm", "ghost"],
        "service \"ghost\" not found",
    );
    assert_eq!(netctl_json(&lab, 1, &["service", "ls"]), before_s);
    assert_eq!(netctl_json(&lab, 1, &["container", "ls"]), before_c);

    // rm frees the ports at once; the VIP is held back a while (clients may have it cached).
    let out = lab.netctl(1, ["service", "rm", "web"]).unwrap();
    assert!(out.success(), "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(100));
    let again = netctl_json(
        &lab,
        1,
        &[
            "service",
            "create",
            "--name",
            "web2",
            "--network",
            "services",
            "--publish",
            "53:53/udp",
        ],
    );
    assert_ne!(again["vips"][0]["vip"], vip.as_str());
    assert_eq!(again["ports"][0]["published"], 53);
}
