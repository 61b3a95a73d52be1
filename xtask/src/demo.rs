//! `cargo xtask demo`: what the product does, on a fresh 3-node lab with
//! etcd, as a list of netctl steps. New features add steps to `STEPS`.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use netlab::{Lab, LabConfig, StoreKind};

use crate::{cargo, labcmd, setup};

/// One netctl call on one node.
struct Step {
    /// What the step shows, printed before it.
    what: &'static str,
    node: usize,
    args: &'static [&'static str],
    /// Strings the output must contain. The step is retried (bounded)
    /// until they appear: other nodes see changes through their store
    /// watch, which takes a moment.
    expect: &'static [&'static str],
}

const NODES: usize = 3;
const RETRY_FOR: Duration = Duration::from_secs(10);

/// The replicas' HTTP server: socat hands each connection to a shell that answers with the
/// replica's name and the client address it sees (the routing mesh keeps it).
const HTTP_REPLICA: &str = "socat TCP-LISTEN:80,fork,reuseaddr \
     SYSTEM:'echo HTTP/1.0 200 OK; echo; echo $NETAGENT_CONTAINER sees $SOCAT_PEERADDR'";

/// Node 0 means: run the command in the fabric namespace, a host on the physical network.
const FABRIC: usize = 0;

const STEPS: &[Step] = &[
    Step {
        what: "create an encrypted overlay network from n1 (Docker's example, as written)",
        node: 1,
        args: &[
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
        expect: &[],
    },
    Step {
        what: "n2 lists it: the cluster state is shared through etcd",
        node: 2,
        args: &["network", "ls"],
        expect: &["services"],
    },
    Step {
        what: "n3 inspects it: encrypted, and its MTU leaves room for VXLAN and WireGuard",
        node: 3,
        args: &["network", "inspect", "services"],
        expect: &["10.10.1.0/24", "\"encrypted\": true", "\"mtu\": 1390"],
    },
    Step {
        what: "every node has joined the cluster",
        node: 1,
        args: &["node", "ls"],
        expect: &["n1", "n2", "n3"],
    },
    Step {
        what: "a container on n1 (its own network namespace, eth0 on the overlay)",
        node: 1,
        args: &[
            "container",
            "run",
            "-d",
            "--name",
            "a",
            "--network",
            "services",
            "--",
            "sleep",
            "3600",
        ],
        expect: &["a"],
    },
    Step {
        what: "a container on n2",
        node: 2,
        args: &[
            "container",
            "run",
            "-d",
            "--name",
            "b",
            "--network",
            "services",
            "--",
            "sleep",
            "3600",
        ],
        expect: &["b"],
    },
    Step {
        what: "a container on n3",
        node: 3,
        args: &[
            "container",
            "run",
            "-d",
            "--name",
            "c",
            "--network",
            "services",
            "--",
            "sleep",
            "3600",
        ],
        expect: &["c"],
    },
    Step {
        what: "the cluster's containers, with their addresses",
        node: 1,
        args: &["container", "ls"],
        expect: &["10.10.1.2", "10.10.1.3", "10.10.1.4"],
    },
    Step {
        what: "a on n1 pings b on n2: eBPF routes it into VXLAN, the agent's WireGuard encrypts it",
        node: 1,
        args: &[
            "container",
            "exec",
            "a",
            "--",
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "10.10.1.3",
        ],
        expect: &["3 received"],
    },
    Step {
        what: "b on n2 pings c on n3",
        node: 2,
        args: &[
            "container",
            "exec",
            "b",
            "--",
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "10.10.1.4",
        ],
        expect: &["3 received"],
    },
    Step {
        what: "c on n3 pings a on n1",
        node: 3,
        args: &[
            "container",
            "exec",
            "c",
            "--",
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "10.10.1.2",
        ],
        expect: &["3 received"],
    },
    Step {
        what: "a service with a VIP; its replicas are containers started with --service",
        node: 1,
        args: &[
            "service",
            "create",
            "--name",
            "web",
            "--network",
            "services",
            "--publish",
            "8080:80",
        ],
        expect: &[],
    },
    Step {
        what: "a replica of web on n2: a tiny HTTP server answering with its name and the client's address",
        node: 2,
        args: &[
            "container",
            "run",
            "-d",
            "--name",
            "web.1",
            "--network",
            "services",
            "--service",
            "web",
            "--",
            "sh",
            "-c",
            HTTP_REPLICA,
        ],
        expect: &["web.1"],
    },
    Step {
        what: "a replica of web on n3: a tiny HTTP server answering with its name and the client's address",
        node: 3,
        args: &[
            "container",
            "run",
            "-d",
            "--name",
            "web.2",
            "--network",
            "services",
            "--service",
            "web",
            "--",
            "sh",
            "-c",
            HTTP_REPLICA,
        ],
        expect: &["web.2"],
    },
    Step {
        what: "a replica of web on n1: a tiny HTTP server answering with its name and the client's address",
        node: 1,
        args: &[
            "container",
            "run",
            "-d",
            "--name",
            "web.3",
            "--network",
            "services",
            "--service",
            "web",
            "--",
            "sh",
            "-c",
            HTTP_REPLICA,
        ],
        expect: &["web.3"],
    },
    Step {
        what: "the service: VIP, published port, backends",
        node: 3,
        args: &["service", "ls"],
        expect: &["web", "8080->80/tcp"],
    },
    Step {
        what: "DNS at 127.0.0.11 inside a: the service name resolves to its VIP",
        node: 1,
        args: &["container", "exec", "a", "--", "dig", "+short", "web"],
        expect: &["10.10.1."],
    },
    Step {
        what: "tasks.web lists the replicas; container names resolve across nodes",
        node: 1,
        args: &[
            "container",
            "exec",
            "a",
            "--",
            "getent",
            "hosts",
            "tasks.web",
            "c",
        ],
        expect: &["10.10.1.4"],
    },
    Step {
        what: "curl the published port on n1 from a host on the physical network: round-robin, client address kept",
        node: FABRIC,
        args: &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6; do curl -s --max-time 2 http://198.18.0.11:8080/; done",
        ],
        expect: &[
            "web.1 sees 198.18.0.1",
            "web.2 sees 198.18.0.1",
            "web.3 sees 198.18.0.1",
        ],
    },
    Step {
        what: "the same port on n2 and n3 (every node answers, replica or not)",
        node: FABRIC,
        args: &[
            "sh",
            "-c",
            "for n in 12 13; do for i in 1 2 3; do curl -s --max-time 2 http://198.18.0.$n:8080/; done; done",
        ],
        expect: &["web.1", "web.2", "web.3"],
    },
    Step {
        what: "and through the VIP from container a (DNS name web)",
        node: 1,
        args: &[
            "container",
            "exec",
            "a",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3; do curl -s --max-time 2 http://web/; done",
        ],
        expect: &[
            "web.1 sees 10.10.1.2",
            "web.2 sees 10.10.1.2",
            "web.3 sees 10.10.1.2",
        ],
    },
    Step {
        what: "a reaches a host outside the overlay (beyond the fabric, behind a 1400-byte link): eBPF masquerades it to n1's address",
        node: 1,
        args: &[
            "container",
            "exec",
            "a",
            "--",
            "curl",
            "-s",
            "--max-time",
            "3",
            "http://203.0.113.10/",
        ],
        expect: &["outside sees 198.18.0.11"],
    },
    Step {
        what: "and the published port of its own node, balanced as from outside",
        node: 1,
        args: &[
            "container",
            "exec",
            "a",
            "--",
            "curl",
            "-s",
            "--max-time",
            "3",
            "http://198.18.0.11:8080/",
        ],
        expect: &["sees 198.18.0.11"],
    },
    Step {
        what: "an --internal network has no way out",
        node: 1,
        args: &[
            "network",
            "create",
            "--subnet",
            "10.10.9.0/24",
            "--internal",
            "backend",
        ],
        expect: &[],
    },
    Step {
        what: "a container on it",
        node: 1,
        args: &[
            "container",
            "run",
            "-d",
            "--name",
            "db",
            "--network",
            "backend",
            "--",
            "sleep",
            "3600",
        ],
        expect: &["db"],
    },
    Step {
        what: "cannot reach the outside host (dropped as egress_internal)",
        node: 1,
        args: &[
            "container",
            "exec",
            "db",
            "--",
            "sh",
            "-c",
            "curl -s --max-time 1 http://203.0.113.10/ || echo no way out",
        ],
        expect: &["no way out"],
    },
    Step {
        what: "a keeps pinging b for a few seconds in the background",
        node: 1,
        args: &[
            "container",
            "exec",
            "a",
            "--",
            "sh",
            "-c",
            "ping -c 15 -i 0.2 10.10.1.3 >/dev/null 2>&1 &",
        ],
        expect: &[],
    },
    Step {
        what: "on the wire only WireGuard: a capture on the fabric shows UDP 51820 between the nodes, no VXLAN",
        node: FABRIC,
        args: &[
            "sh",
            "-c",
            "timeout 4 tcpdump -nn -i br0 -c 4 udp 2>/dev/null",
        ],
        expect: &[".51820 >"],
    },
    Step {
        what: "n1's datapath counters (drops by reason) and its WireGuard peers (handshakes, bytes)",
        node: 1,
        args: &["node", "inspect", "n1"],
        expect: &["drops", "last_handshake_secs_ago"],
    },
    Step {
        what: "a service that runs its own replicas (the source text's command, as written): spread over the nodes",
        node: 1,
        args: &[
            "service",
            "create",
            "-p",
            "80:80",
            "--name",
            "busybox",
            "--replicas",
            "2",
            "--network",
            "services",
            "--",
            "busybox",
            "sleep",
            "3000",
        ],
        expect: &["converged"],
    },
    Step {
        what: "its tasks: one per node, named by slot",
        node: 2,
        args: &["service", "ps", "busybox"],
        expect: &["busybox.1", "busybox.2", "Running"],
    },
    Step {
        what: "a rolling update: a new task per slot, one at a time, 1 s apart",
        node: 1,
        args: &[
            "service",
            "update",
            "--env-add",
            "V=2",
            "--update-parallelism",
            "1",
            "--update-delay",
            "1s",
            "busybox",
        ],
        expect: &["converged"],
    },
    Step {
        what: "the replaced tasks stay in the history",
        node: 1,
        args: &["service", "ps", "busybox"],
        expect: &["\\_ busybox.1", "replaced by an update"],
    },
    Step {
        what: "drain n2: its task starts elsewhere first, then stops",
        node: 1,
        args: &["node", "update", "--availability", "drain", "n2"],
        expect: &["n2"],
    },
    Step {
        what: "nothing runs on n2 any more; the count holds",
        node: 1,
        args: &["service", "ps", "busybox"],
        expect: &["moved off its node"],
    },
    Step {
        what: "roll back to the spec before the update",
        node: 1,
        args: &["service", "rollback", "busybox"],
        expect: &["converged"],
    },
    Step {
        what: "the previous spec is back (no V=2), and the update status says so",
        node: 3,
        args: &["service", "inspect", "busybox"],
        expect: &["rollback completed"],
    },
    Step {
        what: "n2 takes tasks again (nothing moves back by itself)",
        node: 1,
        args: &["node", "update", "--availability", "active", "n2"],
        expect: &["n2"],
    },
];

pub fn run(keep: bool) -> Result<()> {
    setup::run()?;
    cargo::build(&[])?;
    println!("\n== lab: {NODES} nodes and etcd");
    let lab = Lab::up(LabConfig {
        nodes: NODES,
        store: StoreKind::Etcd,
        // Each agent in its own node namespace: the same loopback port on every node.
        extra_agent_args: vec!["--metrics-addr".into(), METRICS.into()],
        ..Default::default()
    })?;
    labcmd::print_lab(&lab);
    // A host beyond the fabric for the egress steps: answers with the address it sees.
    lab.add_outside_host(1400)?;
    let _outside = lab.spawn_in_outside(&[
        "socat",
        "TCP-LISTEN:80,fork,reuseaddr",
        "SYSTEM:read request; echo HTTP/1.0 200 OK; echo; echo outside sees $SOCAT_PEERADDR",
    ])?;

    let result = STEPS
        .iter()
        .try_for_each(|step| run_step(&lab, step))
        .and_then(|()| operate(&lab));

    if keep {
        let prefix = lab.detach()?;
        println!("\nlab kept; tear down: cargo xtask lab down --prefix {prefix}");
    } else {
        let prefix = lab.prefix().to_owned();
        drop(lab);
        println!("\nlab {prefix} torn down");
    }
    result
}

/// Where the demo's agents serve metrics (in each node's namespace).
const METRICS: &str = "127.0.0.1:9580";

/// The operator's view: `netctl monitor` while a container pings one on another network, then
/// an excerpt of n1's metrics.
fn operate(lab: &Lab) -> Result<()> {
    let netctl = std::env::current_exe()?
        .parent()
        .map(|d| d.join("netctl"))
        .context("locating netctl")?;
    let db = lab
        .netctl(1, ["--format", "json", "container", "inspect", "db"])?
        .check()?;
    let db: serde_json::Value = serde_json::from_str(&db.stdout)?;
    let db_ip = db["endpoints"][0]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("\n== netctl monitor on n1 while a pings db, which is on another network");
    let sock = lab.socket(1).display().to_string();
    println!("$ netctl -H unix://{sock} monitor   (and: container exec a -- ping -c 2 {db_ip})");
    let monitor = lab.spawn_in_node(
        1,
        &[
            netctl.display().to_string(),
            "-H".into(),
            sock,
            "monitor".into(),
        ],
    )?;
    thread::sleep(Duration::from_millis(500));
    let _ = lab.netctl(
        1,
        [
            "container",
            "exec",
            "a",
            "--",
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            &db_ip,
        ],
    )?;
    thread::sleep(Duration::from_millis(500));
    let out = monitor.stop(Duration::from_secs(2))?;
    print!("{}", out.stdout);
    if !out.stdout.contains("policy_isolation") {
        bail!(
            "netctl monitor showed no isolation drop: {}{}",
            out.stdout,
            out.stderr
        );
    }
    println!("\n== n1's metrics (excerpt), as Prometheus scrapes them");
    println!("$ curl -s http://{METRICS}/metrics | grep -E '...'");
    let out = lab.exec_in_node(
        1,
        &[
            "sh",
            "-c",
            &format!(
                "curl -s http://{METRICS}/metrics | grep -E '^(netagent_datapath_drops_total\\{{reason=\"(policy_isolation|egress_internal)\"|netagent_healthy|netagent_dns_queries_total|netagent_conntrack_entries|netagent_service_backends|netagent_lb_new_flows_total|netagent_datapath_forwarded_packets_total\\{{hook=\"from_container\"|netagent_wireguard_sent_bytes_total|process_resident)'"
            ),
        ],
    )?;
    print!("{}", out.stdout);
    if !out.stdout.contains("netagent_healthy 1") {
        let why = lab.exec_in_node(1, &["curl", "-s", &format!("http://{METRICS}/healthz")])?;
        bail!("n1 is not healthy: {}", why.stdout.trim());
    }
    Ok(())
}

fn run_step(lab: &Lab, step: &Step) -> Result<()> {
    println!("\n== {}", step.what);
    if step.node == FABRIC {
        println!("(fabric)$ {}", step.args.join(" "));
    } else {
        println!(
            "$ netctl -H {} {}",
            lab.host(step.node),
            step.args.join(" ")
        );
    }
    let deadline = Instant::now() + RETRY_FOR;
    loop {
        let out = if step.node == FABRIC {
            lab.exec_in_fabric(step.args)?
        } else {
            lab.netctl(step.node, step.args)?
        };
        let missing: Vec<&str> = step
            .expect
            .iter()
            .copied()
            .filter(|e| !out.stdout.contains(e))
            .collect();
        if out.success() && missing.is_empty() {
            print!("{}", out.stdout);
            return Ok(());
        }
        if Instant::now() >= deadline {
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            if !out.success() {
                bail!("step failed ({}): {}", out.status, out.stderr.trim());
            }
            bail!("output still lacks {missing:?} after {RETRY_FOR:?}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}
