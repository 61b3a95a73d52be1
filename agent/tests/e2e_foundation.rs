//! End to end on the lab (root): real etcd on the fabric, real agents in node namespaces,
//! netctl as a user runs it.

use std::time::{Duration, Instant};

use netlab::{Lab, LabConfig, Signal, StoreKind};
use serde_json::Value;

mod common;
use common::{api, json, must_fail, wait_until};

fn lab(nodes: usize, store: StoreKind) -> Lab {
    Lab::up(LabConfig {
        nodes,
        store,
        lease_ttl_secs: 2,
        ..Default::default()
    })
    .expect("lab up")
}

fn node_status(lab: &Lab, via: usize, name: &str) -> Option<String> {
    let nodes = json(lab, via, &["node", "ls"]);
    nodes.as_array()?.iter().find_map(|n| {
        (n["name"] == name).then(|| n["status"].as_str().unwrap_or_default().to_string())
    })
}

#[test]
fn three_agents_share_networks_and_track_liveness() {
    let lab = lab(3, StoreKind::Etcd);

    // Every node registers and is ready.
    assert!(
        wait_until(Duration::from_secs(5), || {
            (1..=3).all(|i| node_status(&lab, 1, &format!("n{i}")).as_deref() == Some("ready"))
        })
        .is_some(),
        "nodes never all ready: {}",
        json(&lab, 1, &["node", "ls"])
    );

    let created = json(
        &lab,
        1,
        &[
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "10.10.1.0/24",
            "services",
        ],
    );
    for field in [
        "name",
        "id",
        "driver",
        "vni",
        "subnet",
        "gateway",
        "encrypted",
        "attachable",
        "mtu",
        "labels",
        "created",
    ] {
        assert!(created.get(field).is_some(), "missing {field} in {created}");
    }
    assert_eq!(created["gateway"], "10.10.1.1");
    assert_eq!(created["driver"], "overlay");

    // Visible with the same VNI and subnet from the other two nodes within one second.
    for node in [2, 3] {
        let took = wait_until(Duration::from_secs(1), || {
            let out = lab
                .netctl(node, ["network", "inspect", "services", "--format", "json"])
                .unwrap();
            out.success()
                && serde_json::from_str::<Value>(&out.stdout)
                    .map(|v| v["vni"] == created["vni"] && v["subnet"] == created["subnet"])
                    .unwrap_or(false)
        });
        assert!(took.is_some(), "network not visible on n{node} within 1 s");
    }
    let listed = json(&lab, 3, &["network", "ls"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    // kill -9 n3: it goes down after the lease TTL (2 s) and not long after.
    let killed = Instant::now();
    lab.kill_agent(3, Signal::SIGKILL).unwrap();
    let took = wait_until(Duration::from_secs(8), || {
        node_status(&lab, 1, "n3").as_deref() == Some("down")
    });
    let took =
        took.unwrap_or_else(|| panic!("n3 never went down: {}", json(&lab, 1, &["node", "ls"])));
    assert!(
        killed.elapsed() >= Duration::from_millis(1000),
        "n3 went down before its lease could have expired ({took:?})"
    );
    assert_eq!(node_status(&lab, 2, "n1").as_deref(), Some("ready"));

    // Restarted, it comes back and still sees the network.
    lab.start_agent(3).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            node_status(&lab, 1, "n3").as_deref() == Some("ready")
        })
        .is_some(),
        "n3 did not come back"
    );
    assert_eq!(
        json(&lab, 3, &["network", "inspect", "services"])["vni"],
        created["vni"]
    );

    // Draining is visible cluster-wide; `active` brings the node back.
    json(
        &lab,
        2,
        &["node", "update", "--availability", "drain", "n3"],
    );
    let n3 = json(&lab, 1, &["node", "inspect", "n3"]);
    assert_eq!(n3["availability"], "drain");
    for f in ["name", "address", "availability", "status"] {
        assert!(n3.get(f).is_some(), "missing {f} in {n3}");
    }
    json(
        &lab,
        2,
        &["node", "update", "--availability", "active", "n3"],
    );
    assert_eq!(
        json(&lab, 1, &["node", "inspect", "n3"])["availability"],
        "active"
    );
}

fn create<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["network", "create"];
    v.extend_from_slice(extra);
    v
}

fn store_snapshot(lab: &Lab) -> (Value, Value) {
    (
        json(lab, 1, &["network", "ls"]),
        json(lab, 1, &["node", "ls"]),
    )
}

#[test]
fn bad_input_gets_one_line_errors_and_changes_nothing() {
    let lab = lab(1, StoreKind::Etcd);
    json(
        &lab,
        1,
        &["network", "create", "--subnet", "10.10.0.0/16", "services"],
    );
    let before = store_snapshot(&lab);
    must_fail(
        &lab,
        1,
        &create(&["--subnet", "10.10.1.0/33", "a"]),
        "invalid subnet \"10.10.1.0/33\"",
    );
    must_fail(
        &lab,
        1,
        &create(&["--subnet", "nonsense", "a"]),
        "invalid subnet",
    );
    must_fail(
        &lab,
        1,
        &create(&["--subnet", "10.20.1.7/24", "a"]),
        "host bits set",
    );
    must_fail(
        &lab,
        1,
        &create(&["--subnet", "10.10.4.0/24", "a"]),
        "overlaps network \"services\" (10.10.0.0/16)",
    );
    must_fail(
        &lab,
        1,
        &create(&["--subnet", "10.20.0.0/24", "--gateway", "10.30.0.1", "a"]),
        "gateway 10.30.0.1 is not inside subnet 10.20.0.0/24",
    );
    must_fail(
        &lab,
        1,
        &create(&["--driver", "bridge", "--subnet", "10.20.0.0/24", "a"]),
        "unknown driver \"bridge\"",
    );
    must_fail(
        &lab,
        1,
        &create(&["--opt", "secret", "--subnet", "10.20.0.0/24", "a"]),
        "unknown --opt \"secret\"",
    );
    must_fail(
        &lab,
        1,
        &create(&["--subnet", "10.20.0.0/24", "services"]),
        "network \"services\" already exists",
    );
    must_fail(
        &lab,
        1,
        &["network", "rm", "nope"],
        "network \"nope\" not found",
    );
    must_fail(
        &lab,
        1,
        &["network", "inspect", "nope"],
        "network \"nope\" not found",
    );
    must_fail(&lab, 1, &["node", "inspect", "n9"], "node \"n9\" not found");
    must_fail(
        &lab,
        1,
        &["node", "update", "--availability", "sleepy", "n1"],
        "invalid availability \"sleepy\"",
    );

    // A malformed request body straight to the API: 400 with a JSON error naming the problem.
    let (status, body) = api(
        &lab,
        1,
        "POST",
        "/v1/networks",
        "{\"name\": \"x\", \"subnet\": ",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid request body"), "{body}");

    assert_eq!(
        store_snapshot(&lab),
        before,
        "a failed command changed the store"
    );
}

#[test]
fn unreachable_etcd_is_reported_not_hung() {
    let lab = lab(1, StoreKind::Etcd);
    json(&lab, 1, &["network", "ls"]);
    lab.stop_etcd().unwrap();
    let start = Instant::now();
    let out = lab.netctl(1, ["network", "ls"]).unwrap();
    assert!(!out.success());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    let err = out.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(
        err.contains("etcd") && err.contains("198.18.0.2:2379"),
        "{err}"
    );
    let out = lab
        .netctl(1, ["network", "create", "--subnet", "10.10.0.0/16", "x"])
        .unwrap();
    assert!(!out.success());

    // Back up: the same agent serves again without a restart, and nothing was half-created.
    lab.start_etcd().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || {
            lab.netctl(1, ["network", "ls"])
                .map(|o| o.success())
                .unwrap_or(false)
        })
        .is_some(),
        "agent did not recover after etcd came back"
    );
    assert_eq!(json(&lab, 1, &["network", "ls"]), Value::Array(vec![]));
}

#[test]
fn embedded_store_survives_agent_restart() {
    let lab = lab(1, StoreKind::Embedded);
    let created = json(
        &lab,
        1,
        &[
            "network",
            "create",
            "--subnet",
            "10.10.1.0/24",
            "--opt",
            "mtu=1400",
            "services",
        ],
    );
    assert_eq!(created["mtu"], 1400);
    lab.kill_agent(1, Signal::SIGTERM).unwrap();
    lab.start_agent(1).unwrap();
    assert_eq!(json(&lab, 1, &["network", "inspect", "services"]), created);
}
