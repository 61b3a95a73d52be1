//! End to end (root): services balance round-robin through their VIP and through every node's
//! published port, keep the client's address, and never break live connections.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netlab::{Lab, LabConfig, Signal, StoreKind};

mod common;
use common::{exec, json, ok, wait_until};

/// Every replica: TCP 80 answers "<name> <client address>", TCP 7000 greets with its name and
/// then echoes, UDP 9000 answers its name.
const REPLICA: &str = "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo $NETAGENT_CONTAINER $SOCAT_PEERADDR' & \
     socat TCP-LISTEN:7000,fork,reuseaddr SYSTEM:'echo $NETAGENT_CONTAINER; cat' & \
     socat UDP-RECVFROM:9000,fork SYSTEM:'echo $NETAGENT_CONTAINER' & wait";

fn replica(lab: &Lab, node: usize, name: &str) {
    common::run_detached(
        lab,
        node,
        name,
        "services",
        Some("web"),
        &["sh", "-c", REPLICA],
    );
}

/// `n` sequential new connections; the answers as (replica, client address) lines.
fn connect_loop(n: usize, target: &str) -> String {
    format!("for i in $(seq {n}); do socat -T2 - TCP:{target} </dev/null; done")
}

fn count(out: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        if let Some(name) = line.split_whitespace().next() {
            *m.entry(name.to_string()).or_default() += 1;
        }
    }
    m
}

fn from_client(lab: &Lab, n: usize, target: &str) -> String {
    let out = exec(lab, 1, "client", &["sh", "-c", &connect_loop(n, target)]);
    assert!(out.success(), "{}", out.stderr);
    out.stdout
}

fn from_fabric(lab: &Lab, n: usize, target: &str) -> String {
    let out = lab
        .exec_in_fabric_timeout(
            &["sh", "-c", &connect_loop(n, target)],
            Duration::from_secs(120),
        )
        .unwrap();
    out.stdout
}

/// Kills a background process when dropped (test failure included).
struct Reaper(Child);
impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn netctl_bin() -> String {
    std::env::var("NETCTL_BIN").unwrap_or_else(|_| {
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("netctl")
            .display()
            .to_string()
    })
}

#[test]
fn vip_and_routing_mesh_balance_round_robin() {
    let lab = Lab::up(LabConfig {
        nodes: 3,
        store: StoreKind::Etcd,
        lease_ttl_secs: 3,
        ..Default::default()
    })
    .expect("lab up");
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.80.0.0/24", "services"],
    );
    let svc = json(
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
            "--publish",
            "9000:9000/udp",
        ],
    );
    let vip = svc["vips"][0]["vip"].as_str().unwrap().to_string();
    for (node, name) in [(1, "web.1"), (2, "web.2"), (3, "web.3")] {
        replica(&lab, node, name);
    }
    ok(
        &lab,
        1,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "client",
            "--network",
            "services",
            "--",
            "sleep",
            "3600",
        ],
    );
    let client_ip = json(&lab, 1, &["container", "inspect", "client"])["endpoints"][0]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let vip80 = format!("{vip}:80");
    // Every node's datapath has all three replicas once a short burst reaches all of them.
    assert!(
        wait_until(Duration::from_secs(10), || count(&from_client(
            &lab, 6, &vip80
        ))
        .len()
            == 3)
        .is_some(),
        "the VIP never balanced over 3 replicas\n{}",
        lab.agent_log(1)
    );

    // 300 sequential connections through the VIP: exactly 100 each, client address kept.
    let out = from_client(&lab, 300, &vip80);
    let counts = count(&out);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![100, 100, 100],
        "{counts:?}"
    );
    for line in out.lines() {
        assert!(
            line.ends_with(&client_ip),
            "replica saw {line:?}, not {client_ip}"
        );
    }

    // The same through each node's published port, from a host on the physical network.
    for node in 1..=3 {
        let target = format!("{}:8080", lab.node_addr(node));
        assert!(
            wait_until(Duration::from_secs(10), || count(&from_fabric(
                &lab, 6, &target
            ))
            .len()
                == 3)
            .is_some(),
            "mesh on n{node} never balanced over 3 replicas\n{}",
            lab.agent_log(node)
        );
        // Exact also when the fabric client reuses, towards this node, a source port it used
        // through another node: a replica may still hold that connection in TIME_WAIT, and
        // the SYN the client retransmits after the replica's stale ACK is the same
        // connection (see CT_F_CLOSING).
        let out = from_fabric(&lab, 300, &target);
        let counts = count(&out);
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            vec![100, 100, 100],
            "n{node}: {counts:?}"
        );
        for line in out.lines() {
            assert!(
                line.ends_with("198.18.0.1"),
                "replica saw {line:?} through n{node}"
            );
        }
    }

    // UDP through the VIP and the mesh.
    let udp = exec(
        &lab,
        1,
        "client",
        &["sh", "-c", &format!("echo hi | socat -T2 - UDP:{vip}:9000")],
    );
    assert!(
        udp.stdout.trim().starts_with("web."),
        "{}{}",
        udp.stdout,
        udp.stderr
    );
    let udp = lab
        .exec_in_fabric(&[
            "sh",
            "-c",
            &format!("echo hi | socat -T2 - UDP:{}:9000", lab.node_addr(2)),
        ])
        .unwrap();
    assert!(
        udp.stdout.trim().starts_with("web."),
        "{}{}",
        udp.stdout,
        udp.stderr
    );

    // A long-lived connection survives a replica being added and an unrelated one removed.
    let mut child = Command::new(netctl_bin())
        .args(["-H", &lab.host(1), "container", "exec", "client", "--", "sh", "-c"])
        .arg(format!(
            "i=0; while [ $i -lt 16 ]; do echo tick$i; sleep 0.25; i=$((i+1)); done | socat -T5 - TCP:{vip}:7000"
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reaper = Reaper(child);
    let mut lines = BufReader::new(stdout).lines();
    let serving = lines.next().unwrap().unwrap();
    let unrelated = ["web.1", "web.2", "web.3"]
        .into_iter()
        .find(|n| *n != serving)
        .unwrap();
    replica(&lab, 2, "web.4");
    ok(&lab, 1, &["container", "rm", unrelated]);
    let echoed: Vec<String> = lines.map_while(Result::ok).collect();
    drop(reaper);
    assert_eq!(
        echoed.len(),
        16,
        "connection to {serving} broke: {echoed:?}"
    );

    // A removed replica leaves the backends on every node within a second.
    let gone = wait_until(Duration::from_secs(1), || {
        !from_client(&lab, 9, &vip80).contains(unrelated)
            && !from_fabric(&lab, 9, &format!("{}:8080", lab.node_addr(3))).contains(unrelated)
    });
    assert!(gone.is_some(), "{unrelated} still served after rm");

    // Drain n3: its replicas take no new connections; active brings them back.
    let on_n3: Vec<String> = json(&lab, 1, &["service", "inspect", "web"])["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["node"] == "n3")
        .map(|b| b["container"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !on_n3.is_empty(),
        "web.3 runs on n3 and is never the one removed"
    );
    {
        ok(
            &lab,
            1,
            &["node", "update", "--availability", "drain", "n3"],
        );
        let drained = wait_until(Duration::from_secs(2), || {
            let out = from_client(&lab, 12, &vip80);
            on_n3.iter().all(|n| !out.contains(n.as_str()))
        });
        assert!(
            drained.is_some(),
            "drained replicas {on_n3:?} still took connections"
        );
        ok(
            &lab,
            1,
            &["node", "update", "--availability", "active", "n3"],
        );
        let back = wait_until(Duration::from_secs(2), || {
            let out = from_client(&lab, 12, &vip80);
            on_n3.iter().all(|n| out.contains(n.as_str()))
        });
        assert!(back.is_some(), "{on_n3:?} did not come back after active");
    }

    // A node whose agent dies drops out of the backends once its lease expires.
    lab.kill_agent(2, Signal::SIGKILL).unwrap();
    let out_of_rotation = wait_until(Duration::from_secs(8), || {
        let out = from_client(&lab, 12, &vip80);
        !out.contains("web.2") && !out.contains("web.4")
    });
    assert!(
        out_of_rotation.is_some(),
        "n2's replicas still served after its lease expired"
    );
    lab.start_agent(2).unwrap();

    // publish-rm: the port stops answering on every node within a second.
    ok(
        &lab,
        1,
        &["service", "update", "--publish-rm", "8080", "web"],
    );
    let closed = wait_until(Duration::from_secs(1), || {
        (1..=3).all(|n| {
            from_fabric(&lab, 1, &format!("{}:8080", lab.node_addr(n)))
                .trim()
                .is_empty()
        })
    });
    assert!(
        closed.is_some(),
        "port 8080 still answers after --publish-rm"
    );
}
