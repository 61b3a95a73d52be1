//! The lab's own end-to-end tests (root): topology, etcd, agent lifecycle
//! with a stand-in agent, and that teardown leaves nothing behind, also
//! after a failed start, a panic, or from another "process" (`Lab::down`).
//!
//! The tests run in parallel, each with its own prefix, which also checks
//! that labs do not collide.

use std::fs;
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use netlab::{Lab, LabConfig, Signal, StoreKind};

fn root_or_skip() -> bool {
    if netlab::is_root() {
        return true;
    }
    eprintln!("skipped: the lab needs root");
    false
}

fn fake_agent() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netlab-fake-agent"))
}

/// A config that uses the stand-in agent and `echo` as netctl.
fn fake_config(nodes: usize, store: StoreKind) -> LabConfig {
    LabConfig {
        nodes,
        store,
        lease_ttl_secs: 7,
        netagent_bin: Some(fake_agent()),
        netctl_bin: Some(PathBuf::from("/bin/echo")),
        ..Default::default()
    }
}

fn namespaces_of(prefix: &str) -> Vec<String> {
    netlab::list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

/// Processes whose command line mentions the lab's run dir (agents, etcd).
fn processes_of(prefix: &str) -> Vec<String> {
    let marker = format!("/run/netlab/{prefix}/");
    let out = Command::new("pgrep")
        .args(["-a", "-f", &marker])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_owned)
        .collect()
}

fn assert_gone(prefix: &str, pids: &[u32]) {
    assert_eq!(
        namespaces_of(prefix),
        Vec::<String>::new(),
        "namespaces left"
    );
    assert!(
        !Path::new("/run/netlab").join(prefix).exists(),
        "run dir left"
    );
    assert!(
        !Path::new("/sys/fs/bpf").join(prefix).exists(),
        "bpffs dir left"
    );
    assert_eq!(processes_of(prefix), Vec::<String>::new(), "processes left");
    for &pid in pids {
        assert!(!netlab::is_alive(pid as i32), "pid {pid} still alive");
    }
}

fn ping(lab: &Lab, from: usize, to: &str) {
    let out = lab
        .exec_in_node(from, &["ping", "-c", "1", "-W", "2", to])
        .unwrap();
    assert!(
        out.success(),
        "n{from} cannot ping {to}: {}{}",
        out.stdout,
        out.stderr
    );
}

fn etcdctl(lab: &Lab, node: usize, args: &[&str]) -> netlab::Output {
    let endpoint = lab.etcd_endpoint().unwrap();
    let mut argv = vec![
        "etcdctl",
        "--endpoints",
        &endpoint,
        "--dial-timeout=1s",
        "--command-timeout=2s",
    ];
    argv.extend_from_slice(args);
    lab.exec_in_node(node, &argv).unwrap()
}

#[test]
fn topology_and_etcd() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab::up(LabConfig {
        nodes: 3,
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    let prefix = lab.prefix().to_owned();
    assert!(prefix.starts_with("nl") && prefix.len() == 7, "{prefix}");
    assert_eq!(
        namespaces_of(&prefix),
        [
            format!("{prefix}-fabric"),
            format!("{prefix}-n1"),
            format!("{prefix}-n2"),
            format!("{prefix}-n3")
        ]
    );

    // Every node reaches etcd, the gateway and the other nodes.
    for from in 1..=3 {
        ping(&lab, from, "198.18.0.2");
        ping(&lab, from, "198.18.0.1");
        for to in (1..=3).filter(|&to| to != from) {
            ping(&lab, from, &lab.node_addr(to).to_string());
        }
    }
    let addr = lab
        .exec_in_node(2, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(addr.stdout.contains("198.18.0.12/24"), "{}", addr.stdout);
    let route = lab
        .exec_in_node(2, &["ip", "route", "show", "default"])
        .unwrap();
    assert!(
        route.stdout.contains("via 198.18.0.1 dev eth0"),
        "{}",
        route.stdout
    );
    // IPv6 is off so fabric captures carry no neighbour discovery noise.
    let v6 = lab.exec_in_node(1, &["ip", "-6", "addr"]).unwrap();
    assert_eq!(v6.stdout.trim(), "");
    // The bridge has one port per node.
    let ports = lab
        .exec_in_fabric(&["ip", "-o", "link", "show", "master", "br0"])
        .unwrap();
    assert_eq!(ports.stdout.lines().count(), 3, "{}", ports.stdout);

    // Nothing of the lab is visible from the root namespace.
    let root_addrs = Command::new("ip").args(["-4", "addr"]).output().unwrap();
    let root_routes = Command::new("ip")
        .args(["route", "show", "table", "all"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&root_addrs.stdout).contains("198.18.0."));
    assert!(!String::from_utf8_lossy(&root_routes.stdout).contains("198.18.0."));

    // etcd answers from a node namespace; data survives stop/start.
    assert!(etcdctl(&lab, 1, &["endpoint", "health"]).success());
    assert!(etcdctl(&lab, 1, &["put", "netlab-test", "kept"]).success());
    let etcd_pid = lab.etcd_pid().unwrap();
    lab.stop_etcd().unwrap();
    assert!(!netlab::is_alive(etcd_pid as i32));
    assert!(!etcdctl(&lab, 2, &["endpoint", "health"]).success());
    assert!(
        lab.stop_etcd().is_err(),
        "stopping a stopped etcd must fail"
    );
    lab.start_etcd().unwrap();
    assert!(lab.start_etcd().is_err(), "etcd is already running");
    let got = etcdctl(&lab, 3, &["get", "--print-value-only", "netlab-test"]);
    assert_eq!(got.stdout.trim(), "kept");
    let etcd_pid = lab.etcd_pid().unwrap();

    drop(lab);
    assert_gone(&prefix, &[etcd_pid]);
    Lab::down(&prefix).expect("down of a removed lab is a no-op");
}

#[test]
fn agents_lifecycle_with_embedded_store() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab::up(fake_config(2, StoreKind::Embedded)).unwrap();
    let prefix = lab.prefix().to_owned();
    assert_eq!(lab.etcd_endpoint(), None);
    assert!(lab.etcd_pid().is_none());
    // No etcd address on the fabric with the embedded store.
    let out = lab
        .exec_in_node(1, &["ping", "-c", "1", "-W", "1", "198.18.0.2"])
        .unwrap();
    assert!(!out.success());

    // Each agent runs in its node's namespace with the contract's arguments.
    for i in 1..=2 {
        let pid = lab.agent_pid(i).unwrap();
        let pids = Command::new("ip")
            .args(["netns", "pids", &lab.node_ns(i)])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&pids.stdout)
                .split_whitespace()
                .any(|p| p == pid.to_string())
        );
        UnixStream::connect(lab.socket(i)).unwrap();
        let log = lab.agent_log(i);
        assert!(
            log.contains(&format!(
                "--node-name n{i} --advertise-addr 198.18.0.1{i} --store embedded"
            )),
            "{log}"
        );
        assert!(log.contains("--uplink eth0 --lease-ttl 7"), "{log}");
        assert!(lab.bpf_dir(i).is_dir());
        assert!(lab.state_dir(i).is_dir());
    }

    // netctl gets -H with the node's socket (netctl is `echo` here).
    let out = lab.netctl(2, ["network", "ls"]).unwrap();
    assert_eq!(
        out.stdout.trim(),
        format!("-H unix:///run/netlab/{prefix}/n2.sock network ls")
    );
    assert!(lab.netctl(3, ["network", "ls"]).is_err(), "no node 3");

    // SIGKILL, restart, SIGTERM.
    let first = lab.agent_pid(1).unwrap();
    let status = lab.kill_agent(1, Signal::SIGKILL).unwrap();
    assert!(!status.success());
    assert!(lab.agent_pid(1).is_none());
    assert!(UnixStream::connect(lab.socket(1)).is_err());
    assert!(lab.kill_agent(1, Signal::SIGKILL).is_err(), "already dead");
    lab.start_agent(1).unwrap();
    assert_ne!(lab.agent_pid(1).unwrap(), first);
    assert!(lab.start_agent(1).is_err(), "already running");
    assert_eq!(
        lab.agent_log(1)
            .matches("==== netlab: starting agent n1")
            .count(),
        2
    );
    lab.kill_agent(2, Signal::SIGTERM).unwrap();

    // Background commands in a node and on the fabric.
    let mut server = lab.spawn_in_node(2, &["sleep", "60"]).unwrap();
    assert!(server.is_running());
    let capture = lab.spawn_in_fabric(&["sleep", "60"]).unwrap();
    drop(capture);

    // `server` is still running when the lab goes: teardown must kill it.
    let pids = [lab.agent_pid(1).unwrap(), server.pid()];
    drop(lab);
    assert_gone(&prefix, &pids);
    assert!(!server.is_running());
}

#[test]
fn failing_agent_start_reports_log_and_cleans_up() {
    if !root_or_skip() {
        return;
    }
    let prefix = netlab::generate_prefix();
    let err = Lab::up(LabConfig {
        prefix: Some(prefix.clone()),
        extra_agent_args: vec!["--fail".into()],
        ..fake_config(2, StoreKind::Etcd)
    })
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("agent n1 exited"), "{msg}");
    assert!(msg.contains("told to fail"), "log tail missing: {msg}");
    assert_gone(&prefix, &[]);

    let err = Lab::up(LabConfig {
        prefix: Some(prefix.clone()),
        extra_agent_args: vec!["--never-listen".into()],
        agent_ready_timeout: Duration::from_secs(1),
        ..fake_config(1, StoreKind::Embedded)
    })
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("did not accept connections"), "{msg}");
    assert_gone(&prefix, &[]);

    let err = Lab::up(LabConfig {
        netagent_bin: Some("/nonexistent/netagent".into()),
        ..fake_config(1, StoreKind::Embedded)
    })
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn panic_in_a_test_still_tears_down() {
    if !root_or_skip() {
        return;
    }
    let prefix = netlab::generate_prefix();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let _lab = Lab::up(LabConfig {
            prefix: Some(prefix.clone()),
            ..fake_config(1, StoreKind::Etcd)
        })
        .unwrap();
        assert!(Path::new("/run/netlab").join(&prefix).exists());
        panic!("test failure inside the lab");
    }));
    assert!(result.is_err());
    assert_gone(&prefix, &[]);
}

#[test]
fn detached_lab_survives_until_down() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab::up(fake_config(1, StoreKind::Etcd)).unwrap();
    let pids = [lab.agent_pid(1).unwrap(), lab.etcd_pid().unwrap()];
    let prefix = lab.detach().unwrap();

    // Still there, and visible to `lab status`.
    assert_eq!(namespaces_of(&prefix).len(), 2);
    assert!(pids.iter().all(|&p| netlab::is_alive(p as i32)));
    let status = Lab::status_all().unwrap();
    let mine = status.iter().find(|s| s.prefix == prefix).unwrap();
    assert_eq!(mine.owner, Some(netlab::Owner::Detached));
    assert!(mine.nodes[0].socket_ready && mine.nodes[0].agent.alive);
    assert!(mine.etcd.as_ref().unwrap().alive);
    let text = mine.to_string();
    assert!(
        text.contains(&format!("{prefix}-n1")) && text.contains("ready"),
        "{text}"
    );

    // A second lab with the same prefix is refused.
    let err = Lab::up(LabConfig {
        prefix: Some(prefix.clone()),
        ..fake_config(1, StoreKind::Embedded)
    })
    .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    Lab::down(&prefix).unwrap();
    assert_gone(&prefix, &pids);
    Lab::down(&prefix).unwrap();
    assert!(fs::read_dir("/run/netlab").is_ok());
}
