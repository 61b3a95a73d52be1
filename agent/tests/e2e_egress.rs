//! End to end (root): containers reach the outside world (a host beyond the fabric, behind a
//! link of MTU 1400) with their node's address, published ports of every node including their
//! own, and their node's own services; ICMP errors about translated packets reach them;
//! `--internal` networks have no way out.

use std::time::Duration;

use netlab::{Background, Lab, LabConfig, OUTSIDE_ADDR, StoreKind};

mod common;
use common::{drops, exec, ok, sleeper, wait_until};

/// The fabric-to-outside link: smaller than the fabric's 1500, so full-size packets of the
/// nodes' containers need path MTU discovery to cross it.
const WAN_MTU: u32 = 1400;

fn lab(nodes: usize) -> Lab {
    let lab = Lab::up(LabConfig {
        nodes,
        store: StoreKind::Etcd,
        lease_ttl_secs: 3,
        ..Default::default()
    })
    .expect("lab up");
    lab.add_outside_host(WAN_MTU).expect("outside host");
    // The outside host advertises the MSS of a 1500-byte path: its own link is the small one,
    // and the containers' 1450-byte segments must learn it from the fabric's ICMP.
    let via = netlab::OUTSIDE_GATEWAY.to_string();
    let out = lab
        .exec_in_outside_timeout(
            &[
                "ip", "route", "change", "default", "via", &via, "dev", "eth0", "advmss", "1460",
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.91.0.0/24", "services"],
    );
    lab
}

/// A server on the outside host, stopped when the test ends (the lab would kill it anyway).
fn outside(lab: &Lab, script: &str) -> Background {
    lab.spawn_in_outside(&["sh", "-c", script]).unwrap()
}

fn sh(lab: &Lab, node: usize, name: &str, script: &str) -> netlab::Output {
    exec(lab, node, name, &["sh", "-c", script])
}

/// Waits until the outside host listens on TCP `port`.
fn listening(lab: &Lab, port: u16) {
    let probe = format!("ss -Hltn 'sport = :{port}' | grep -q LISTEN");
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .exec_in_outside_timeout(&["sh", "-c", &probe], Duration::from_secs(5))
            .is_ok_and(|o| o.success()))
        .is_some(),
        "nothing listens on outside port {port}"
    );
}

#[test]
fn containers_reach_an_outside_host_with_their_nodes_address() {
    let lab = lab(2);
    // HTTP answering with the address the server sees; a TCP port that holds each connection
    // a second (so 200 of them are open at once) and says who it saw; UDP that says who.
    let _http = outside(
        &lab,
        "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'read request; echo HTTP/1.0 200 OK; echo; echo $SOCAT_PEERADDR'",
    );
    let _hold = outside(
        &lab,
        "socat -t5 TCP-LISTEN:7000,fork,reuseaddr,backlog=512 SYSTEM:'sleep 1; echo $SOCAT_PEERADDR'",
    );
    let _udp = outside(
        &lab,
        "socat UDP-RECVFROM:9000,fork SYSTEM:'echo $SOCAT_PEERADDR'",
    );
    let _count = outside(&lab, "socat TCP-LISTEN:7001,fork,reuseaddr SYSTEM:'wc -c'");
    listening(&lab, 80);
    listening(&lab, 7000);
    listening(&lab, 7001);
    for node in 1..=2 {
        sleeper(&lab, node, &format!("app{node}"), "services");
    }
    sleeper(&lab, 1, "app1b", "services");

    // A container on each node: curl, seen as its node.
    for node in 1..=2 {
        let out = sh(
            &lab,
            node,
            &format!("app{node}"),
            &format!("curl -sS --max-time 5 http://{OUTSIDE_ADDR}/"),
        );
        assert!(out.success(), "node {node}: {}", out.stderr);
        assert_eq!(
            out.stdout.trim(),
            lab.node_addr(node).to_string(),
            "node {node}"
        );
    }

    // 200 connections open at once from two containers of one node to one server port.
    let burst = format!(
        "for i in $(seq 100); do socat -t5 -T10 - TCP:{OUTSIDE_ADDR}:7000 </dev/null & done; wait"
    );
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| sh(&lab, 1, "app1", &burst));
        let b = s.spawn(|| sh(&lab, 1, "app1b", &burst));
        (a.join().unwrap(), b.join().unwrap())
    });
    let node1 = lab.node_addr(1).to_string();
    let seen: Vec<&str> = a.stdout.lines().chain(b.stdout.lines()).collect();
    assert_eq!(
        seen.len(),
        200,
        "answers: {} + {} (exit {:?} {:?}); {} {}",
        a.stdout.lines().count(),
        b.stdout.lines().count(),
        a.code(),
        b.code(),
        a.stderr,
        b.stderr
    );
    assert!(seen.iter().all(|l| *l == node1), "{seen:?}");
    assert_eq!(drops(&lab, 1, "egress_no_port"), 0);

    // UDP and ping.
    // UDP may lose a datagram when the machine is busy (the whole suite runs in parallel):
    // a few tries, each with its own source port, every answer must be right.
    let udp = || {
        sh(
            &lab,
            2,
            "app2",
            &format!("echo hi | socat -T3 - UDP:{OUTSIDE_ADDR}:9000"),
        )
    };
    let out = (0..3)
        .map(|_| udp())
        .find(|o| !o.success() || !o.stdout.trim().is_empty())
        .expect("no UDP answer in 3 tries");
    assert!(out.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), lab.node_addr(2).to_string());
    let out = sh(&lab, 2, "app2", &format!("ping -c 3 -W 2 {OUTSIDE_ADDR}"));
    assert!(out.success(), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("3 received"), "{}", out.stdout);

    // ICMP errors about translated packets come back with the container's addresses: a
    // connected UDP socket only takes a port unreachable that quotes its own tuple.
    let out = sh(
        &lab,
        1,
        "app1",
        &format!("echo hi | socat -T3 - UDP:{OUTSIDE_ADDR}:9999"),
    );
    assert!(
        !out.success() && out.stderr.contains("Connection refused"),
        "port unreachable did not reach the container: {} {}",
        out.stdout,
        out.stderr
    );
    // TTL exceeded at the fabric, about an echo request.
    let out = sh(
        &lab,
        1,
        "app1",
        &format!("ping -c 1 -W 2 -t 1 {OUTSIDE_ADDR}"),
    );
    assert!(
        out.stdout.contains("Time to live exceeded"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    // Path MTU: 2 MB up through the 1400-byte link in 1450-byte packets; only the fabric's
    // "fragmentation needed", translated, gets them through.
    let out = sh(
        &lab,
        1,
        "app1",
        &format!("head -c 2000000 /dev/zero | socat -T10 - TCP:{OUTSIDE_ADDR}:7001"),
    );
    assert!(out.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "2000000");
}

#[test]
fn internal_networks_and_other_networks_have_no_way_out() {
    let lab = lab(1);
    ok(
        &lab,
        1,
        &[
            "network",
            "create",
            "--subnet",
            "10.92.0.0/24",
            "--internal",
            "backend",
        ],
    );
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.93.0.0/24", "other"],
    );
    let ls = ok(&lab, 1, &["network", "ls"]).stdout;
    let backend = ls.lines().find(|l| l.contains("backend")).unwrap();
    assert!(backend.trim_end().ends_with("yes"), "{ls}");
    sleeper(&lab, 1, "db", "backend");
    sleeper(&lab, 1, "app", "services");
    sleeper(&lab, 1, "peer", "other");
    let _http = outside(
        &lab,
        "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'read request; echo HTTP/1.0 200 OK; echo; echo ok'",
    );
    listening(&lab, 80);

    // The datapath took every entry (an internal network's flag included).
    let name = lab.node_name(1);
    let inspect = common::json(&lab, 1, &["node", "inspect", &name]);
    let errors = &inspect["datapath"]["reconcile"]["errors"];
    assert_eq!(errors.as_array().map(Vec::len), Some(0), "{errors}");
    let before = drops(&lab, 1, "egress_internal");
    let out = sh(
        &lab,
        1,
        "db",
        &format!("curl -sS --max-time 2 http://{OUTSIDE_ADDR}/"),
    );
    assert!(
        !out.success(),
        "an internal network got out: {}",
        out.stdout
    );
    let out = sh(&lab, 1, "db", &format!("ping -c 1 -W 1 {OUTSIDE_ADDR}"));
    assert!(!out.success());
    // Its own node and published ports are outside too.
    let node = lab.node_addr(1).to_string();
    let out = sh(&lab, 1, "db", &format!("ping -c 1 -W 1 {node}"));
    assert!(!out.success());
    assert!(
        drops(&lab, 1, "egress_internal") >= before + 3,
        "not counted"
    );

    // The other networks: egress does not make another overlay's subnet or the node's
    // tunnel addresses reachable.
    let app = sh(&lab, 1, "app", "curl -sS --max-time 5 http://203.0.113.10/");
    assert!(app.success(), "{}", app.stderr);
    let peer_ip = common::container_ip(&lab, 1, "peer");
    let out = sh(&lab, 1, "app", &format!("ping -c 1 -W 1 {peer_ip}"));
    assert!(!out.success(), "reached another network's container");
    let out = sh(&lab, 1, "app", "ping -c 1 -W 1 169.254.128.1");
    assert!(!out.success(), "reached a tunnel address");
    assert!(drops(&lab, 1, "egress_forbidden") >= 1);
}

#[test]
fn containers_reach_published_ports_and_their_node() {
    let lab = lab(2);
    ok(
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
            "8081:81",
        ],
    );
    // One replica, on node 2; it serves 2 MB so that its replies to an outside client need
    // path MTU discovery through the routing mesh.
    ok(
        &lab,
        2,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "web1",
            "--network",
            "services",
            "--service",
            "web",
            "--",
            "sh",
            "-c",
            "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo $NETAGENT_CONTAINER $SOCAT_PEERADDR' & \
             socat TCP-LISTEN:81,fork,reuseaddr SYSTEM:'head -c 2000000 /dev/zero' & wait",
        ],
    );
    sleeper(&lab, 1, "app", "services");
    // A node service: on node 1's own address.
    let node1 = lab.node_addr(1).to_string();
    let _svc = lab
        .spawn_in_node(
            1,
            &[
                "socat",
                &format!("TCP-LISTEN:9100,bind={node1},fork,reuseaddr"),
                "SYSTEM:echo node-$SOCAT_PEERADDR",
            ],
        )
        .unwrap();

    for node in 1..=2 {
        let target = format!("{}:8080", lab.node_addr(node));
        let out = sh(
            &lab,
            1,
            "app",
            &format!("socat -T3 - TCP:{target} </dev/null"),
        );
        assert!(out.success(), "{target}: {}", out.stderr);
        assert!(out.stdout.starts_with("web1 "), "{target}: {}", out.stdout);
    }

    let app_ip = common::container_ip(&lab, 1, "app");
    let mut answer = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            answer = sh(
                &lab,
                1,
                "app",
                &format!("socat -T3 - TCP:{node1}:9100 </dev/null"),
            )
            .stdout;
            !answer.is_empty()
        })
        .is_some(),
        "the node's own service did not answer"
    );
    assert_eq!(answer.trim(), format!("node-{app_ip}"), "seen as itself");

    // The outside host downloads 2 MB through node 1's published port: the backend's
    // 1450-byte packets learn the 1400-byte link from the fabric's ICMP, translated.
    let out = lab
        .exec_in_outside_timeout(
            &[
                "sh",
                "-c",
                &format!("socat -T10 - TCP:{node1}:8081 </dev/null | wc -c"),
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(out.stdout.trim(), "2000000", "{}", out.stderr);
}
