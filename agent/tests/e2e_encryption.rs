//! End to end (root): `--opt encrypted` networks between three nodes: everything a plain
//! overlay does, nothing on the wire in clear, survival of restarts and key rotation, tunnels
//! that follow the node list.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netlab::{Lab, LabConfig, Signal, StoreKind};
use serde_json::Value;

mod common;
use common::{Reaper, api, container_ip, drops, exec, json, ok, wait_until, workspace_bin};

/// TCP 7000 and UDP 7001 echo; TCP 80 answers the container's name.
const SERVERS: &str = "socat TCP-LISTEN:7000,fork,reuseaddr EXEC:cat & \
     socat UDP-RECVFROM:7001,fork EXEC:cat & \
     socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo $NETAGENT_CONTAINER' & wait";

fn lab() -> Lab {
    Lab::up(LabConfig {
        nodes: 3,
        store: StoreKind::Etcd,
        lease_ttl_secs: 3,
        ..Default::default()
    })
    .expect("lab up")
}

fn run(lab: &Lab, node: usize, name: &str, net: &str, extra: &[&str], cmd: &str) {
    let mut args = vec!["container", "run", "-d", "--name", name, "--network", net];
    args.extend_from_slice(extra);
    args.extend(["--", "sh", "-c", cmd]);
    ok(lab, node, &args);
}

fn echo_tcp(lab: &Lab, node: usize, from: &str, to: &str, msg: &str) -> String {
    exec(
        lab,
        node,
        from,
        &[
            "sh",
            "-c",
            &format!("echo {msg} | socat -T3 - TCP:{to}:7000"),
        ],
    )
    .stdout
    .trim()
    .to_string()
}

fn echo_udp(lab: &Lab, node: usize, from: &str, to: &str, msg: &str) -> String {
    exec(
        lab,
        node,
        from,
        &[
            "sh",
            "-c",
            &format!("echo {msg} | socat -T2 - UDP:{to}:7001"),
        ],
    )
    .stdout
    .trim()
    .to_string()
}

fn wireguard(lab: &Lab, node: usize) -> Value {
    json(lab, node, &["node", "inspect", &lab.node_name(node)])["wireguard"].clone()
}

/// A VXLAN datagram (VNI `vni`) carrying IPv4/UDP from `src` to `dst`:9999 with `payload`.
fn vxlan_payload(
    vni: u32,
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77, 0x08, 0x00]);
    let total = 28 + payload.len();
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
    let mut s: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    ip[10..12].copy_from_slice(&(!(s as u16)).to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&[0x04, 0xd2, 0x27, 0x0f]);
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

#[test]
fn an_encrypted_network_carries_everything_and_nothing_in_clear() {
    let lab = lab();
    // The project's first example, as written.
    ok(
        &lab,
        1,
        &[
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "10.10.1.0/24",
            "--opt",
            "encrypted",
            "services",
        ],
    );
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.11.0.0/24", "plain"],
    );
    let net = json(&lab, 1, &["network", "inspect", "services"]);
    let net = if net.is_array() { net[0].clone() } else { net };
    assert_eq!(net["encrypted"], true);
    assert_eq!(net["mtu"], 1390, "1500 less VXLAN (50) and WireGuard (60)");
    let vni = net["vni"].as_u64().unwrap() as u32;
    for i in 1..=3 {
        run(&lab, i, &format!("c{i}"), "services", &[], SERVERS);
    }
    run(&lab, 1, "p1", "plain", &[], "sleep 600");
    run(&lab, 2, "p2", "plain", &[], "sleep 600");
    let ips: Vec<String> = (1..=3)
        .map(|i| container_ip(&lab, i, &format!("c{i}")))
        .collect();

    // Every pair of nodes: ping, TCP and UDP.
    for a in 1..=3usize {
        for b in 1..=3usize {
            if a == b {
                continue;
            }
            let (from, to) = (format!("c{a}"), &ips[b - 1]);
            let reached = wait_until(Duration::from_secs(10), || {
                exec(&lab, a, &from, &["ping", "-c", "1", "-W", "1", to]).success()
            });
            assert!(
                reached.is_some(),
                "{from} cannot ping c{b}\n{}",
                lab.agent_log(a)
            );
            assert_eq!(
                echo_tcp(&lab, a, &from, to, "tcp-hello"),
                "tcp-hello",
                "{from} -> c{b}"
            );
            assert_eq!(
                echo_udp(&lab, a, &from, to, "udp-hello"),
                "udp-hello",
                "{from} -> c{b}"
            );
        }
    }
    // Each node shows its key, port and peers with handshakes and bytes.
    let wg = wireguard(&lab, 1);
    assert_eq!(wg["port"], 51820);
    assert_eq!(wg["public_key"].as_str().unwrap().len(), 44);
    let peers = wg["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{wg}");
    for p in peers {
        assert!(p["last_handshake_secs_ago"].is_number(), "{p}");
        assert!(p["tx_bytes"].as_u64().unwrap() > 0 && p["rx_bytes"].as_u64().unwrap() > 0);
        assert!(p["endpoint"].as_str().unwrap().ends_with(":51820"));
    }

    // On the wire: a marker sent over the encrypted network is nowhere, and no VXLAN of it
    // is seen; the plain network beside it is plain VXLAN.
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("fabric.pcap");
    let capture = lab
        .spawn_in_fabric(&[
            "tcpdump",
            "-i",
            "br0",
            "-U",
            "-s",
            "0",
            "-w",
            pcap.to_str().unwrap(),
            "udp",
        ])
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(800));
    let marker = "MARKER-5f3a9c-IN-THE-CLEAR";
    assert_eq!(echo_tcp(&lab, 1, "c1", &ips[1], marker), marker);
    assert_eq!(echo_udp(&lab, 1, "c1", &ips[2], marker), marker);
    std::thread::sleep(Duration::from_millis(500));
    let _ = capture.stop(Duration::from_secs(3));
    let read = |filter: &[&str]| {
        let mut argv = vec!["tcpdump", "-nn", "-A", "-r", pcap.to_str().unwrap()];
        argv.extend_from_slice(filter);
        netlab::run(
            Command::new(argv[0]).args(&argv[1..]),
            Duration::from_secs(30),
        )
        .unwrap()
        .stdout
    };
    let all = read(&[]);
    assert!(
        all.contains("51820"),
        "the traffic went through WireGuard:\n{all}"
    );
    assert!(
        !all.contains(marker),
        "the marker crossed the fabric in clear"
    );
    assert_eq!(
        read(&["udp", "port", "4789"]).trim(),
        "",
        "VXLAN of the encrypted network on the wire"
    );
    let plain_pcap = dir.path().join("plain.pcap");
    let capture = lab
        .spawn_in_fabric(&[
            "tcpdump",
            "-i",
            "br0",
            "-U",
            "-w",
            plain_pcap.to_str().unwrap(),
            "udp port 4789",
        ])
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(800));
    let p2 = container_ip(&lab, 2, "p2");
    assert!(exec(&lab, 1, "p1", &["ping", "-c", "2", "-W", "1", &p2]).success());
    std::thread::sleep(Duration::from_millis(300));
    let _ = capture.stop(Duration::from_secs(3));
    let plain = netlab::run(
        Command::new("tcpdump").args(["-nn", "-r", plain_pcap.to_str().unwrap()]),
        Duration::from_secs(30),
    )
    .unwrap()
    .stdout;
    assert!(
        plain.contains("VXLAN") || plain.contains(".4789"),
        "the plain network stays plain VXLAN: {plain}"
    );

    // MTU: a DF ping of exactly MTU - 28 bytes passes, one byte more fails locally.
    assert!(
        exec(
            &lab,
            1,
            "c1",
            &[
                "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1362", &ips[1]
            ]
        )
        .success()
    );
    let big = exec(
        &lab,
        1,
        "c1",
        &[
            "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1363", &ips[1],
        ],
    );
    assert!(!big.success());
    assert!(
        format!("{}{}", big.stdout, big.stderr).contains("message too long"),
        "{big:?}"
    );

    // A service on it, through its VIP and the routing mesh.
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
        ],
    );
    let vip = svc["vips"][0]["vip"].as_str().unwrap().to_string();
    run(&lab, 2, "r2", "services", &["--service", "web"], SERVERS);
    run(&lab, 3, "r3", "services", &["--service", "web"], SERVERS);
    let names = |out: String| out.lines().map(str::to_string).collect::<Vec<_>>();
    let via_vip = names(
        exec(
            &lab,
            1,
            "c1",
            &[
                "sh",
                "-c",
                "for i in 1 2 3 4; do socat -T2 - TCP:web:80 </dev/null; done",
            ],
        )
        .stdout,
    );
    assert_eq!(
        via_vip.iter().filter(|n| *n == "r2").count(),
        2,
        "{via_vip:?} (VIP {vip})"
    );
    assert_eq!(
        via_vip.iter().filter(|n| *n == "r3").count(),
        2,
        "{via_vip:?}"
    );
    let node1 = lab.node_addr(1).to_string();
    let mesh = lab
        .exec_in_fabric(&[
            "sh",
            "-c",
            &format!("for i in 1 2 3 4; do socat -T2 - TCP:{node1}:8080 </dev/null; done"),
        ])
        .unwrap()
        .stdout;
    let mesh = names(mesh);
    assert_eq!(mesh.len(), 4, "{mesh:?}");
    assert!(
        mesh.contains(&"r2".into()) && mesh.contains(&"r3".into()),
        "{mesh:?}"
    );

    // Clear VXLAN with the encrypted VNI, aimed at c1: from a stranger, and spoofing n2.
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
    let victim: std::net::Ipv4Addr = container_ip(&lab, 1, "victim").parse().unwrap();
    let o = victim.octets();
    let payload = vxlan_payload(
        vni,
        [0x02, 0x42, o[0], o[1], o[2], o[3]],
        ips[1].parse::<std::net::Ipv4Addr>().unwrap().octets(),
        o,
        b"INJECTED\n",
    );
    let file = dir.path().join("vxlan.bin");
    std::fs::write(&file, &payload).unwrap();
    let rawudp = workspace_bin("rawudp");
    let (unknown, unencrypted) = (
        drops(&lab, 1, "unknown_node"),
        drops(&lab, 1, "unencrypted"),
    );
    for src in ["198.18.0.1", &lab.node_addr(2).to_string()] {
        let out = lab
            .exec_in_fabric(&[
                rawudp.to_str().unwrap(),
                "--src",
                src,
                "--dst",
                &node1,
                "--sport",
                "4789",
                "--dport",
                "4789",
                "--payload",
                file.to_str().unwrap(),
                "--count",
                "3",
            ])
            .unwrap();
        assert!(out.success(), "{out:?}");
    }
    let real = exec(
        &lab,
        2,
        "c2",
        &[
            "sh",
            "-c",
            &format!("echo REAL | socat -u - UDP:{victim}:9999"),
        ],
    );
    assert!(real.success());
    let log = || api(&lab, 1, "GET", "/v1/containers/victim/logs", "").1;
    assert!(wait_until(Duration::from_secs(5), || log().contains("REAL")).is_some());
    assert!(
        !log().contains("INJECTED"),
        "clear VXLAN of an encrypted network was delivered"
    );
    assert!(
        drops(&lab, 1, "unknown_node") >= unknown + 3,
        "the stranger's packets"
    );
    assert!(
        drops(&lab, 1, "unencrypted") >= unencrypted + 3,
        "the spoofed node's packets"
    );
}

/// A Python client in container `c1` that keeps one TCP connection to `to`:7000 busy for
/// `secs` seconds (a line every 50 ms, each echoed), then prints `ok <longest gap in ms>` or
/// `reset ...` if the connection broke.
fn steady_client(lab: &Lab, to: &str, secs: u32) -> Reaper {
    let script = format!(
        r#"
import socket, time
s = socket.create_connection(("{to}", 7000), timeout=30)
f = s.makefile("rb")
end = time.time() + {secs}
last = time.time()
gap = 0.0
try:
    while time.time() < end:
        s.sendall(b"x\n")
        if f.readline() != b"x\n":
            raise ConnectionResetError("bad echo")
        now = time.time()
        gap = max(gap, now - last)
        last = now
        time.sleep(0.05)
    print("ok %d" % (gap * 1000), flush=True)
except Exception as e:
    print("reset %s" % e, flush=True)
"#
    );
    Reaper(
        Command::new(workspace_bin("netctl"))
            .args(["-H", &format!("unix://{}", lab.socket(1).display())])
            .args(["container", "exec", "c1", "--", "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("client"),
    )
}

fn output_of(mut r: Reaper) -> String {
    use std::io::Read as _;
    let mut s = String::new();
    if let Some(mut out) = r.0.stdout.take() {
        let _ = out.read_to_string(&mut s);
    }
    s
}

#[test]
fn tunnels_survive_restarts_and_key_rotation_and_follow_the_node_list() {
    let lab = lab();
    ok(
        &lab,
        1,
        &[
            "network",
            "create",
            "--subnet",
            "10.12.0.0/24",
            "--opt",
            "encrypted",
            "services",
        ],
    );
    run(&lab, 1, "c1", "services", &[], "sleep 600");
    run(&lab, 2, "c2", "services", &[], SERVERS);
    let c2 = container_ip(&lab, 2, "c2");
    assert!(
        wait_until(Duration::from_secs(10), || echo_tcp(
            &lab, 1, "c1", &c2, "up"
        ) == "up")
        .is_some()
    );

    // kill -9 of n1's agent, back within 2 s: the connection survives and carries data
    // again soon after.
    let client = steady_client(&lab, &c2, 10);
    std::thread::sleep(Duration::from_secs(2));
    lab.kill_agent(1, Signal::SIGKILL).expect("kill");
    let down = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    lab.start_agent(1).expect("restart");
    let back = Instant::now();
    eprintln!("agent down for {:?}", back - down);
    let out = output_of(client);
    assert!(out.starts_with("ok "), "the connection broke: {out}");
    let gap_ms: u64 = out[3..].trim().parse().unwrap();
    let down_ms = (back - down).as_millis() as u64;
    eprintln!("longest silence on the connection {gap_ms} ms (agent down {down_ms} ms)");
    assert!(
        gap_ms <= down_ms + 1000,
        "data flowed again {} ms after the agent was back",
        gap_ms.saturating_sub(down_ms)
    );

    // n2 rotates its key under a running connection.
    let before = wireguard(&lab, 2)["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let client = steady_client(&lab, &c2, 6);
    std::thread::sleep(Duration::from_secs(1));
    let rotated = json(&lab, 2, &["node", "rotate-key"]);
    let after = rotated["public_key"].as_str().unwrap().to_string();
    assert_ne!(before, after);
    let out = output_of(client);
    assert!(
        out.starts_with("ok "),
        "rotation broke the connection: {out}"
    );
    eprintln!("longest silence during rotation: {} ms", out[3..].trim());
    // Everybody switched: n1 knows n2 by its new key and handshook with it.
    let switched = wait_until(Duration::from_secs(15), || {
        let p = wireguard(&lab, 1)["peers"].clone();
        p.as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == "n2" && p["public_key"] == after.as_str())
    });
    assert!(switched.is_some(), "{}", wireguard(&lab, 1));
    assert_eq!(
        echo_tcp(&lab, 1, "c1", &c2, "after-rotation"),
        "after-rotation"
    );

    // A node that leaves loses its peer everywhere.
    let peers_of_n1 = || {
        wireguard(&lab, 1)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(peers_of_n1(), ["n2", "n3"]);
    lab.kill_agent(3, Signal::SIGTERM).expect("stop n3");
    assert!(
        wait_until(Duration::from_secs(10), || {
            json(&lab, 1, &["node", "inspect", "n3"])["status"] == "down"
        })
        .is_some()
    );
    ok(&lab, 1, &["node", "rm", "n3"]);
    assert!(wait_until(Duration::from_secs(5), || peers_of_n1() == ["n2"]).is_some());
}
