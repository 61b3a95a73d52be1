//! End to end (root): the worst day. Keep-alive HTTP load through a VIP and through the
//! routing mesh while the agent is killed with SIGKILL and restarted, then while etcd is down
//! for 30 s; a dead node's backends leaving every other node's balancer and DNS.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netlab::{Lab, LabConfig, Signal, StoreKind};

mod common;
use common::{exec, json, ok, sleeper, vip_of, wait_until};

const LEASE_TTL: u64 = 3;

fn lab(nodes: usize) -> Lab {
    let lab = Lab::up(LabConfig {
        nodes,
        store: StoreKind::Etcd,
        lease_ttl_secs: LEASE_TTL,
        ..Default::default()
    })
    .expect("lab up");
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.97.0.0/24", "services"],
    );
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
        ],
    );
    lab
}

/// A keep-alive HTTP replica of web.
fn replica(lab: &Lab, node: usize, name: &str) {
    common::http_server(lab, node, name, "services", Some("web"));
}

fn netns_of(lab: &Lab, node: usize, name: &str) -> String {
    json(lab, node, &["container", "inspect", name])["netns"]
        .as_str()
        .expect("netns")
        .to_owned()
}

/// wrk's summary: (requests, failures of any kind, the text).
fn wrk_result(out: &std::process::Output) -> (u64, u64, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ")?.0.trim().parse().ok())
        .unwrap_or(0);
    let mut failures = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            failures += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            failures += n.trim().parse::<u64>().unwrap_or(1);
        }
    }
    (requests, failures, text)
}

fn wrk(netns: &str, url: &str, secs: u64) -> Command {
    let mut c = Command::new("nsenter");
    // Niced: unpaced, it would take both CPUs from the tests running beside it.
    c.stdout(Stdio::piped())
        .arg(format!("--net={netns}"))
        .args([
            "--",
            "nice",
            "-n",
            "19",
            "timeout",
            &(secs + 15).to_string(),
            "wrk",
            "-t1",
            "-c2",
            &format!("-d{secs}s"),
            "--timeout",
            "2s",
            url,
        ]);
    c
}

#[test]
fn keep_alive_load_survives_a_killed_agent_and_a_stopped_store() {
    let lab = lab(2);
    replica(&lab, 1, "web.1");
    replica(&lab, 2, "web.2");
    replica(&lab, 2, "web.3");
    sleeper(&lab, 1, "client", "services");
    let vip = vip_of(&lab, 1, "web");
    let client = netns_of(&lab, 1, "client");
    let fabric = format!("{}/{}", netlab::NETNS_DIR, lab.fabric_ns());
    let mesh = format!("http://{}:8080/", lab.node_addr(1));
    let vip_url = format!("http://{vip}/");
    // Every replica answers on both paths before the load starts.
    for (ns, url) in [(&client, &vip_url), (&fabric, &mesh)] {
        let probe = format!("for i in 1 2 3 4 5 6; do curl -s --max-time 2 {url}; echo; done");
        assert!(
            wait_until(Duration::from_secs(10), || {
                let out = Command::new("nsenter")
                    .arg(format!("--net={ns}"))
                    .args(["--", "sh", "-c", &probe])
                    .output()
                    .unwrap();
                let s = String::from_utf8_lossy(&out.stdout).into_owned();
                ["web.1", "web.2", "web.3"].iter().all(|r| s.contains(r))
            })
            .is_some(),
            "{url} does not reach every replica"
        );
    }

    const SECS: u64 = 48;
    let mut loads = Loads(vec![
        wrk(&client, &vip_url, SECS).spawn().unwrap(),
        wrk(&fabric, &mesh, SECS).spawn().unwrap(),
    ]);
    let started = Instant::now();

    // 1. SIGKILL the agent of n1 (the client's node, the mesh's entry), 3 s down.
    std::thread::sleep(Duration::from_secs(3));
    lab.kill_agent(1, Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    lab.start_agent(1).unwrap();

    // 2. etcd down for 30 s.
    std::thread::sleep(Duration::from_secs(3));
    lab.stop_etcd().unwrap();
    let t = Instant::now();
    let out = lab.netctl(1, ["network", "ls"]).unwrap();
    let took = t.elapsed();
    assert!(!out.success(), "network ls answered with etcd down");
    assert!(
        out.stderr.contains("store") || out.stderr.contains("etcd"),
        "{}",
        out.stderr
    );
    assert!(took <= Duration::from_secs(3), "took {took:?} to say so");
    eprintln!(
        "store down: netctl said so in {took:?}: {}",
        out.stderr.trim()
    );
    let out = lab
        .netctl(1, ["network", "create", "--subnet", "10.98.0.0/24", "late"])
        .unwrap();
    assert!(
        !out.success() && (out.stderr.contains("store") || out.stderr.contains("etcd")),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    // DNS keeps answering from the view.
    let dig = exec(
        &lab,
        1,
        "client",
        &["dig", "+short", "+time=2", "@127.0.0.11", "web"],
    );
    assert_eq!(dig.stdout.trim(), vip, "{}", dig.stderr);
    let down_until = t + Duration::from_secs(30);
    while Instant::now() < down_until {
        std::thread::sleep(Duration::from_millis(500));
    }
    lab.start_etcd().unwrap();

    // A change made on the other node after etcd is back reaches this one.
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || lab
            .netctl(2, ["network", "create", "--subnet", "10.98.0.0/24", "late"])
            .is_ok_and(|o| o.success()))
        .is_some(),
        "n2 cannot write after etcd came back"
    );
    let seen = wait_until(Duration::from_secs(15), || {
        lab.netctl(1, ["network", "inspect", "late"])
            .is_ok_and(|o| o.success())
    });
    assert!(seen.is_some(), "n1 never saw n2's network");
    eprintln!(
        "etcd back: n2 wrote and n1 saw it {:?} after etcd started",
        t.elapsed()
    );

    let outs: Vec<_> = std::mem::take(&mut loads.0)
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    eprintln!("load ran {:?}", started.elapsed());
    for (what, out) in ["VIP", "mesh"].into_iter().zip(outs) {
        let (requests, failures, text) = wrk_result(&out);
        eprintln!("{what}: {requests} requests, {failures} failed");
        assert!(requests > 1000, "{what}: {text}");
        assert_eq!(failures, 0, "{what}: {text}");
    }
}

/// The load generators; killed if the test fails before they end.
struct Loads(Vec<Child>);

impl Drop for Loads {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SIGTERM, which timeout(1) passes on to wrk (a SIGKILL would orphan wrk).
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

#[test]
fn a_dead_nodes_backends_leave_the_balancer_and_dns_within_the_lease() {
    let lab = lab(2);
    let answer = "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo $NETAGENT_CONTAINER'";
    for (node, name) in [(1, "web.1"), (2, "web.2")] {
        common::run_detached(
            &lab,
            node,
            name,
            "services",
            Some("web"),
            &["sh", "-c", answer],
        );
    }
    sleeper(&lab, 1, "client", "services");
    let vip = vip_of(&lab, 1, "web");
    let web2 = common::container_ip(&lab, 2, "web.2");
    let four = format!("for i in 1 2 3 4; do socat -T1 - TCP:{vip}:80 </dev/null; done");
    let answers = || exec(&lab, 1, "client", &["sh", "-c", &four]).stdout;
    let tasks = || {
        exec(
            &lab,
            1,
            "client",
            &["dig", "+short", "+time=1", "@127.0.0.11", "tasks.web"],
        )
        .stdout
    };
    assert!(
        wait_until(Duration::from_secs(10), || answers().contains("web.2")
            && tasks().contains(&web2))
        .is_some(),
        "web.2 never served through n1"
    );

    let killed = Instant::now();
    lab.kill_agent(2, Signal::SIGKILL).unwrap();
    let (mut lb_gone, mut dns_gone) = (None, None);
    while killed.elapsed() < Duration::from_secs(LEASE_TTL + 5)
        && (lb_gone.is_none() || dns_gone.is_none())
    {
        if dns_gone.is_none() && !tasks().contains(&web2) {
            dns_gone = Some(killed.elapsed());
        }
        if lb_gone.is_none() && answers().lines().filter(|l| *l == "web.1").count() == 4 {
            lb_gone = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "n2 killed: out of n1's balancer after {lb_gone:?}, out of its DNS after {dns_gone:?} \
         (lease TTL {LEASE_TTL} s)"
    );
    let limit = Duration::from_secs(LEASE_TTL + 1);
    // The balancer's figure includes the four requests that show it.
    assert!(
        lb_gone.is_some_and(|t| t <= limit + Duration::from_millis(500)),
        "balancer: {lb_gone:?}"
    );
    assert!(dns_gone.is_some_and(|t| t <= limit), "dns: {dns_gone:?}");
}

#[test]
fn agents_carry_on_when_one_of_three_etcd_members_dies() {
    let lab = Lab::up(LabConfig {
        nodes: 2,
        store: StoreKind::Etcd,
        etcd_members: 3,
        lease_ttl_secs: LEASE_TTL,
        ..Default::default()
    })
    .expect("lab up");
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.94.0.0/24", "before"],
    );
    for k in [1, 2] {
        // Kill one member; the other two keep a quorum.
        lab.stop_etcd_member(k, Signal::SIGKILL).unwrap();
        let name = format!("after{k}");
        let subnet = format!("10.94.{k}.0/24");
        let t = Instant::now();
        // Reads come back as soon as the two have a leader (a linearizable read needs one; if
        // the dead member led, that takes an election: about a second, more on a busy machine).
        let read = wait_until(Duration::from_secs(10), || {
            lab.netctl(1, ["network", "ls"]).is_ok_and(|o| o.success())
        });
        assert!(read.is_some(), "no read answered with member {k} dead");
        // Then a write succeeds at the first try: a request to the dead member goes to another.
        ok(&lab, 2, &["network", "create", "--subnet", &subnet, &name]);
        let seen = wait_until(Duration::from_secs(10), || {
            lab.netctl(1, ["network", "inspect", &name])
                .is_ok_and(|o| o.success())
        });
        assert!(seen.is_some(), "n1 never saw {name}");
        eprintln!(
            "etcd member {k} killed: reads answered after {read:?}, n2's write seen by n1 {:?} \
             after the kill",
            t.elapsed()
        );
        // Leases are kept alive through the others: both nodes stay up past the TTL.
        std::thread::sleep(Duration::from_secs(LEASE_TTL + 1));
        let out = lab.netctl(1, ["--format", "json", "node", "ls"]).unwrap();
        assert!(
            out.success(),
            "node ls with member {k} dead: {}",
            out.stderr
        );
        let nodes = out.stdout;
        let v: serde_json::Value = serde_json::from_str(&nodes).unwrap();
        let down: Vec<&serde_json::Value> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["status"] != "ready")
            .collect();
        assert!(down.is_empty(), "{nodes}");
        lab.start_etcd_member(k).unwrap();
    }
}
