//! End to end (root): the load balancer stops sending to replicas that cannot answer, fails
//! fast for connections whose backend is gone, keeps established connections through a SYN
//! flood, and trusts nothing on the underlay that does not come from a node.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netlab::{Lab, LabConfig, StoreKind};

mod common;
use common::{Reaper, api, container_ip, drops, exec, json, ok, wait_until, workspace_bin};

/// TCP 80 answers the replica's name; TCP 7000 greets with the name, then echoes; UDP 9000
/// answers the name. One process per port, each the container's only purpose.
const REPLICA: &str = "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo $NETAGENT_CONTAINER' & \
     socat TCP-LISTEN:7000,fork,reuseaddr SYSTEM:'echo $NETAGENT_CONTAINER; cat' & \
     socat UDP-RECVFROM:9000,fork SYSTEM:'echo $NETAGENT_CONTAINER' & wait";

fn lab(nodes: usize, extra: &[&str]) -> Lab {
    Lab::up(LabConfig {
        nodes,
        store: StoreKind::Etcd,
        lease_ttl_secs: 3,
        extra_agent_args: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .expect("lab up")
}

fn replica(lab: &Lab, node: usize, name: &str, cmd: &str) {
    common::run_detached(lab, node, name, "services", Some("web"), &["sh", "-c", cmd]);
}

fn setup(lab: &Lab, publish: Option<&str>) -> String {
    ok(
        lab,
        1,
        &["network", "create", "--subnet", "10.70.0.0/24", "services"],
    );
    let mut args = vec![
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "services",
    ];
    if let Some(p) = publish {
        args.extend(["--publish", p]);
    }
    let svc = json(lab, 1, &args);
    ok(
        lab,
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
    svc["vips"][0]["vip"].as_str().expect("vip").to_string()
}

/// Answers of `n` new connections to `target` from the client, one name per line; "FAIL" for
/// a connection that got no answer.
fn connect_n(lab: &Lab, n: usize, target: &str) -> Vec<String> {
    let script =
        format!("for i in $(seq {n}); do socat -T2 - TCP:{target} </dev/null || echo FAIL; done");
    let out = exec(lab, 1, "client", &["sh", "-c", &script]);
    out.stdout.lines().map(str::to_string).collect()
}

fn pid_of(lab: &Lab, node: usize, name: &str) -> u32 {
    json(lab, node, &["container", "inspect", name])["pid"]
        .as_u64()
        .expect("pid") as u32
}

#[test]
fn replicas_that_cannot_answer_get_no_new_connections() {
    let lab = lab(3, &[]);
    let vip = setup(&lab, None);
    // r1's whole purpose is one socat: when it dies, nothing answers there any more.
    replica(
        &lab,
        2,
        "r1",
        "exec socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo r1'",
    );
    replica(&lab, 3, "r2", REPLICA);
    replica(&lab, 3, "r3", REPLICA);
    let target = format!("{vip}:80");
    let answers = connect_n(&lab, 30, &target);
    assert!(
        answers.iter().filter(|a| *a == "r1").count() >= 9,
        "{answers:?}"
    );

    // The process of r1 ends: within a second it is out of every node's balancer and DNS.
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-9", &pid_of(&lab, 2, "r1").to_string()])
            .status()
            .unwrap()
            .success()
    );
    let r1_ip = container_ip(&lab, 2, "r1");
    let gone_from_dns = wait_until(Duration::from_secs(5), || {
        let out = exec(&lab, 1, "client", &["dig", "+short", "tasks.web"]);
        out.success() && !out.stdout.contains(&r1_ip) && out.stdout.lines().count() == 2
    });
    let took = killed.elapsed();
    assert!(gone_from_dns.is_some(), "r1 stayed in tasks.web");
    assert!(took < Duration::from_secs(2), "r1 left DNS after {took:?}");
    let answers = connect_n(&lab, 40, &target);
    assert!(
        answers.iter().all(|a| a == "r2" || a == "r3"),
        "new connections went to the dead replica: {answers:?}"
    );
    eprintln!("exited replica out of DNS on another node after {took:?}");

    // rm takes a replica out of the balancer before stopping it: a stream of new connections
    // from another node sees no failure.
    let script =
        format!("for i in $(seq 150); do socat -T2 - TCP:{target} </dev/null || echo FAIL; done");
    let netctl = workspace_bin("netctl");
    let load = Reaper(
        Command::new(&netctl)
            .args(["-H", &format!("unix://{}", lab.socket(1).display())])
            .args(["container", "exec", "client", "--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("load"),
    );
    std::thread::sleep(Duration::from_millis(700));
    ok(&lab, 3, &["container", "rm", "r2"]);
    let out = output_of(load);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 150, "{out}");
    assert!(
        !lines.contains(&"FAIL"),
        "failed requests during rm: {lines:?}"
    );
    assert!(lines.contains(&"r2") && lines.contains(&"r3"), "{lines:?}");
}

/// Everything a background command prints, once it has ended.
fn output_of(mut r: Reaper) -> String {
    use std::io::Read as _;
    let mut s = String::new();
    if let Some(mut out) = r.0.stdout.take() {
        let _ = out.read_to_string(&mut s);
    }
    s
}

#[test]
fn connections_whose_backend_is_removed_fail_fast() {
    let lab = lab(2, &[]);
    let vip = setup(&lab, None);
    replica(&lab, 2, "ra", REPLICA);
    replica(&lab, 2, "rb", REPLICA);
    // A TCP connection that goes quiet, then speaks again after its backend is gone.
    let netctl = workspace_bin("netctl");
    let client = format!(
        r#"
import socket, time
s = socket.create_connection(("{vip}", 7000), timeout=20)
print(s.recv(100).decode().strip(), flush=True)
time.sleep(5)
t = time.time()
try:
    for _ in range(50):
        s.sendall(b"again\n")
        if s.recv(100) == b"":
            time.sleep(0.1)
    print("no error", flush=True)
except (ConnectionResetError, BrokenPipeError) as e:
    print("reset after %.1f s" % (time.time() - t), flush=True)
except socket.timeout:
    print("hung", flush=True)
"#
    );
    let conn = Reaper(
        Command::new(&netctl)
            .args(["-H", &format!("unix://{}", lab.socket(1).display())])
            .args([
                "container",
                "exec",
                "client",
                "--",
                "python3",
                "-c",
                &client,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("client"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    // It is balanced to ra (the first new connection of the set).
    let resets_before = drops(&lab, 1, "no_conntrack");
    ok(&lab, 2, &["container", "rm", "ra"]);
    let out = output_of(conn);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"ra"), "{out}");
    assert!(
        lines
            .get(1)
            .is_some_and(|l| l.starts_with("reset after 0.")),
        "the client was not reset at once: {out}"
    );
    assert!(
        drops(&lab, 1, "no_conntrack") > resets_before,
        "the datapath answered"
    );
    // A UDP flow (fixed source port) is balanced anew once its backend is gone.
    let ask = || {
        exec(
            &lab,
            1,
            "client",
            &[
                "sh",
                "-c",
                &format!("echo q | socat -T1 - UDP:{vip}:9000,sourceport=5555,reuseaddr"),
            ],
        )
        .stdout
        .trim()
        .to_string()
    };
    assert_eq!(ask(), "rb");
    replica(&lab, 2, "rc", REPLICA);
    ok(&lab, 2, &["container", "rm", "rb"]);
    assert!(
        wait_until(Duration::from_secs(5), || ask() == "rc").is_some(),
        "the UDP flow stuck to its removed backend"
    );
}

#[test]
fn established_connections_survive_a_syn_flood_through_the_mesh() {
    let lab = lab(2, &["--ct-max", "2048", "--ct-new-max", "1024"]);
    setup(&lab, Some("8080:7000"));
    replica(&lab, 2, "r1", REPLICA);
    replica(&lab, 2, "r2", REPLICA);
    let node = lab.node_addr(1).to_string();
    // An idle keep-alive connection from a host on the fabric through n1's published port.
    let conn = lab
        .spawn_in_fabric(&[
            "sh",
            "-c",
            &format!("(echo one; sleep 12; echo two; sleep 2) | socat -T30 - TCP:{node}:8080"),
        ])
        .expect("client");
    std::thread::sleep(Duration::from_secs(2));
    // Four times both tables together, from the fabric host itself.
    let flood = lab
        .exec_in_fabric_timeout(
            &[
                workspace_bin("synflood").to_str().unwrap(),
                "--dst",
                &node,
                "--port",
                "8080",
                "--count",
                "12288",
                "--src",
                "198.18.0.1",
            ],
            Duration::from_secs(60),
        )
        .expect("flood");
    assert!(flood.success(), "{flood:?}");
    let out = conn.wait(Duration::from_secs(40)).expect("client ends");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert!(lines[0] == "r1" || lines[0] == "r2", "{lines:?}");
    assert_eq!(
        &lines[1..],
        ["one", "two"],
        "the idle connection still works on its backend"
    );
    // And new connections are still balanced after the flood.
    let fresh = lab
        .exec_in_fabric(&["sh", "-c", &format!("echo x | socat -T3 - TCP:{node}:8080")])
        .expect("new connection");
    assert!(fresh.stdout.starts_with('r'), "{fresh:?}");
}

/// A VXLAN datagram carrying an Ethernet frame with IPv4/UDP from `src` to `dst`:`port`.
fn vxlan(
    vni: u32,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + 8 + payload.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&1234u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

#[test]
fn the_underlay_cannot_inject_into_the_overlay() {
    let lab = lab(2, &[]);
    setup(&lab, Some("5353:9000/udp"));
    // The victim logs every UDP datagram it receives on 9999.
    ok(
        &lab,
        1,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "victim",
            "--network",
            "services",
            "--",
            "socat",
            "-u",
            "UDP-RECV:9999",
            "STDOUT",
        ],
    );
    ok(
        &lab,
        2,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "friend",
            "--network",
            "services",
            "--",
            "sleep",
            "600",
        ],
    );
    replica(&lab, 2, "r1", REPLICA);
    let net = json(&lab, 1, &["network", "inspect", "services"]);
    let net = if net.is_array() { net[0].clone() } else { net };
    let vni = net["vni"].as_u64().expect("vni") as u32;
    let victim: std::net::Ipv4Addr = container_ip(&lab, 1, "victim").parse().unwrap();
    let mac = {
        let o = victim.octets();
        [0x02, 0x42, o[0], o[1], o[2], o[3]]
    };
    let node = lab.node_addr(1).to_string();
    let dir = tempfile::tempdir().expect("tmp");
    let send = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write packet");
        let out = lab
            .exec_in_fabric(&[
                "socat",
                "-u",
                &format!("OPEN:{}", path.display()),
                &format!("UDP:{node}:4789"),
            ])
            .expect("send");
        assert!(out.success(), "{out:?}");
    };
    let before = drops(&lab, 1, "unknown_node");
    // Clear VXLAN with the right VNI and inner destination, from a host that is not a node.
    send(
        "plain",
        &vxlan(
            vni,
            mac,
            [2, 0, 0, 0, 0, 0x99],
            [10, 70, 0, 200],
            victim.octets(),
            9999,
            b"INJECTED-PLAIN\n",
        ),
    );
    // The same with the routing mesh's marker as inner source.
    send(
        "marked",
        &vxlan(
            vni,
            mac,
            [0x02, 0x6d, 0x65, 0x73, 0x68, 0x00],
            [198, 51, 100, 7],
            victim.octets(),
            9999,
            b"INJECTED-MESH\n",
        ),
    );
    // A packet from outside claiming an overlay source, to a published port.
    let add = lab
        .exec_in_fabric(&["ip", "addr", "add", "10.70.0.250/32", "dev", "br0"])
        .expect("addr");
    assert!(add.success(), "{add:?}");
    let spoofed = lab
        .exec_in_fabric(&[
            "sh",
            "-c",
            &format!("echo spoof | socat -u - UDP:{node}:5353,bind=10.70.0.250"),
        ])
        .expect("spoof");
    assert!(spoofed.success(), "{spoofed:?}");
    // A real container's datagram arrives (the listener works).
    let real = exec(
        &lab,
        2,
        "friend",
        &[
            "sh",
            "-c",
            &format!("echo REAL | socat -u - UDP:{victim}:9999"),
        ],
    );
    assert!(real.success());
    let got = || {
        let (status, body) = api(&lab, 1, "GET", "/v1/containers/victim/logs", "");
        assert_eq!(status, 200);
        body
    };
    assert!(wait_until(Duration::from_secs(5), || got().contains("REAL")).is_some());
    std::thread::sleep(Duration::from_millis(500));
    let log = got();
    assert!(
        !log.contains("INJECTED"),
        "an injected frame was delivered: {log}"
    );
    assert!(
        drops(&lab, 1, "unknown_node") >= before + 2,
        "VXLAN from a stranger is counted"
    );
    assert!(drops(&lab, 1, "overlay_source_outside") >= 1);
}
