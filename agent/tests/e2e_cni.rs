//! End to end (root): `netagent-cni` driven the way `cnitool` and runtimes drive a plugin
//! (CNI_* in the environment, the configuration on stdin, real namespaces, a real agent):
//! every verb, the error codes, DEL twice and after the namespace is gone, CHECK against a
//! changed interface, GC, STATUS with the agent down, results in old versions, and a chain
//! with Debian's `portmap` and `tuning` after ours.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netlab::{Lab, Signal};
use serde_json::{Value, json};

mod common;
use common::{Netns, Reaper, etcd_lab, ok, sleeper, wait_until, workspace_bin};

/// Debian's containernetworking-plugins.
const CNI_BIN: &str = "/usr/lib/cni";

/// A namespace standing for a runtime's container.
fn netns(lab: &Lab, name: &str) -> Netns {
    Netns::add(format!("{}-{name}", lab.prefix()))
}

/// One plugin call: (success, stdout as JSON or Null).
struct Call<'a> {
    lab: &'a Lab,
    plugin: String,
    command: &'a str,
    container_id: &'a str,
    netns: Option<String>,
    ifname: &'a str,
    args: &'a str,
}

impl<'a> Call<'a> {
    fn new(lab: &'a Lab, command: &'a str) -> Call<'a> {
        Call {
            lab,
            plugin: workspace_bin("netagent-cni").display().to_string(),
            command,
            container_id: "",
            netns: None,
            ifname: "",
            args: "",
        }
    }

    fn container(mut self, id: &'a str, netns: &Netns, ifname: &'a str) -> Self {
        self.container_id = id;
        self.netns = Some(netns.path());
        self.ifname = ifname;
        self
    }

    /// Runs it in node 1's namespace (where a runtime on n1 runs plugins), bounded by 90 s.
    fn run(&self, conf: &Value) -> (bool, Value) {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.lab.node_ns(1)))
            .arg(&self.plugin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", self.command)
            .env("CNI_PATH", CNI_BIN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in [
            ("CNI_CONTAINERID", self.container_id),
            ("CNI_IFNAME", self.ifname),
            ("CNI_ARGS", self.args),
        ] {
            if !v.is_empty() {
                c.env(k, v);
            }
        }
        if let Some(ns) = &self.netns {
            c.env("CNI_NETNS", ns);
        }
        run_bounded(c, conf.to_string().as_bytes())
    }
}

fn run_bounded(mut c: Command, stdin: &[u8]) -> (bool, Value) {
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("plugin call did not end within 90 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    };
    if !out.status.success() {
        // Errors: one JSON object on stdout, and a line on stderr.
        assert!(v["code"].is_u64(), "{v}");
        assert!(!out.stderr.is_empty());
    }
    (out.status.success(), v)
}

fn conf(lab: &Lab, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "services",
        "type": "netagent",
        "socket": lab.socket(1).display().to_string(),
        "dns": { "search": ["svc.example"], "options": ["ndots:1"] },
    })
}

fn error_code(r: &(bool, Value)) -> u64 {
    assert!(!r.0, "expected an error, got {}", r.1);
    r.1["code"].as_u64().unwrap()
}

fn lab() -> Lab {
    let lab = etcd_lab(2);
    ok(
        &lab,
        1,
        &[
            "network",
            "create",
            "--subnet",
            "10.98.0.0/24",
            "--attachable",
            "services",
        ],
    );
    lab
}

fn dig(lab: &Lab, node: usize, container: &str, name: &str) -> String {
    common::exec(
        lab,
        node,
        container,
        &["dig", "+short", "+time=1", "+tries=1", "@127.0.0.11", name],
    )
    .stdout
    .trim()
    .to_owned()
}

#[test]
fn every_verb_of_the_plugin_against_a_real_agent() {
    let lab = lab();
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
        ],
    );
    sleeper(&lab, 2, "peer", "services");
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.97.5.0/24", "other"],
    );
    sleeper(&lab, 1, "stranger", "other");
    let peer = common::container_ip(&lab, 2, "peer");
    let c = conf(&lab, "1.0.0");

    // VERSION
    let (good, v) = Call::new(&lab, "VERSION").run(&json!({"cniVersion": "1.1.0"}));
    assert!(good);
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    // ADD: a replica of web, named by the runtime's pod name; lo left down on purpose.
    let a = netns(&lab, "cnia");
    let mut add = Call::new(&lab, "ADD").container("podA", &a, "eth0");
    add.args = "IgnoreUnknown=1;K8S_POD_NAME=pod-a;K8S_POD_NAMESPACE=default;NETAGENT_SERVICE=web";
    let (good, result) = add.run(&c);
    assert!(good, "{result}");
    assert_eq!(result["cniVersion"], "1.0.0");
    let ip_cidr = result["ips"][0]["address"].as_str().unwrap().to_owned();
    let ip = ip_cidr.split('/').next().unwrap().to_owned();
    assert!(
        ip_cidr.starts_with("10.98.0.") && ip_cidr.ends_with("/24"),
        "{result}"
    );
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], a.path());
    assert!(result["interfaces"][0].get("sandbox").is_none());
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(result["dns"]["nameservers"], json!(["127.0.0.11"]));
    assert_eq!(result["dns"]["search"], json!(["svc.example"]));
    // It talks to a container on the other node, by address and by name, and is a replica.
    let ping = a.sh(&["ping", "-c", "1", "-W", "2", &peer]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // Isolated like any other endpoint: another network's container is out of reach.
    let stranger = common::container_ip(&lab, 1, "stranger");
    let ping = a.sh(&["ping", "-c", "1", "-W", "1", &stranger]);
    assert!(
        !ping.status.success(),
        "reached another network's container"
    );
    let found = a.sh(&[
        "dig",
        "+short",
        "+time=2",
        "+tries=1",
        "@127.0.0.11",
        "peer",
    ]);
    assert_eq!(String::from_utf8_lossy(&found.stdout).trim(), peer);
    let wait = wait_until(Duration::from_secs(5), || {
        dig(&lab, 2, "peer", "pod-a") == ip
    });
    assert!(wait.is_some(), "pod-a does not resolve on n2");
    let bin = workspace_bin("tinyhttp").display().to_string();
    let server = Command::new("ip")
        .args(["netns", "exec", &a.0, &bin, "80", "pod-a"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Reaper(server);
    let mut answer = String::new();
    let served = wait_until(Duration::from_secs(10), || {
        answer = common::exec(
            &lab,
            2,
            "peer",
            &["curl", "-sS", "--max-time", "2", "http://web/"],
        )
        .stdout;
        answer.contains("pod-a")
    });
    assert!(
        served.is_some(),
        "the VIP never reached the CNI replica: {answer}"
    );

    // CHECK: fine as made; not after the interface changed; fine again once restored.
    let mut conf_prev = c.clone();
    conf_prev["prevResult"] = result.clone();
    let check = Call::new(&lab, "CHECK").container("podA", &a, "eth0");
    assert!(check.run(&conf_prev).0);
    assert!(
        a.sh(&["ip", "link", "set", "eth0", "down"])
            .status
            .success()
    );
    let r = check.run(&conf_prev);
    assert_eq!(error_code(&r), 101);
    assert!(r.1["msg"].as_str().unwrap().contains("down"), "{}", r.1);
    assert!(a.sh(&["ip", "link", "set", "eth0", "up"]).status.success());
    assert!(check.run(&conf_prev).0);
    assert!(
        a.sh(&["ip", "addr", "flush", "dev", "eth0"])
            .status
            .success()
    );
    let r = check.run(&conf_prev);
    assert_eq!(error_code(&r), 101);
    assert!(r.1["msg"].as_str().unwrap().contains(&ip), "{}", r.1);
    // CHECK of a container the agent never saw.
    let r = Call::new(&lab, "CHECK")
        .container("nobody", &a, "eth0")
        .run(&conf_prev);
    assert_eq!(error_code(&r), 3);
    // CHECK checks against the result ADD gave: without it there is nothing to check.
    assert_eq!(error_code(&check.run(&c)), 7);

    // DEL: gone from both nodes' views, twice is fine.
    let del = Call::new(&lab, "DEL").container("podA", &a, "eth0");
    assert!(del.run(&conf_prev).0);
    // (An unknown name is forwarded upstream, which the lab does not have: no answer.)
    let gone = wait_until(Duration::from_secs(5), || {
        !dig(&lab, 2, "peer", "pod-a").contains(&ip)
    });
    assert!(
        gone.is_some(),
        "pod-a still resolves on n2 after DEL: {:?}, attachments: {:?}",
        dig(&lab, 2, "peer", "pod-a"),
        common::api(&lab, 1, "GET", "/v1/attach", "")
    );
    let on_n2 = common::json(&lab, 2, &["container", "ls"]);
    assert!(!on_n2.to_string().contains("podA"), "{on_n2}");
    let links = a.sh(&["ip", "-o", "link"]);
    assert!(!String::from_utf8_lossy(&links.stdout).contains("eth0"));
    assert!(del.run(&c).0, "a second DEL succeeds");

    // DEL after the runtime already deleted the namespace.
    let b = netns(&lab, "cnib");
    let (good, r) = Call::new(&lab, "ADD").container("podB", &b, "eth0").run(&c);
    assert!(good, "{r}");
    let b_path = b.path();
    drop(b);
    let mut del_b = Call::new(&lab, "DEL");
    del_b.container_id = "podB";
    del_b.ifname = "eth0";
    del_b.netns = Some(b_path);
    assert!(del_b.run(&c).0);
    let (status, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert_eq!(status, 200);
    assert!(!list.contains("podB"), "{list}");

    // GC: keeps the attachments the runtime lists, removes the others.
    let cns = netns(&lab, "cnic");
    let dns_ = netns(&lab, "cnid");
    for (id, ns) in [("podC", &cns), ("podD", &dns_)] {
        let (good, r) = Call::new(&lab, "ADD").container(id, ns, "eth0").run(&c);
        assert!(good, "{r}");
    }
    let mut gc_conf = conf(&lab, "1.1.0");
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": "podC", "ifname": "eth0"}]);
    let (good, r) = Call::new(&lab, "GC").run(&gc_conf);
    assert!(good, "{r}");
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert!(list.contains("podC") && !list.contains("podD"), "{list}");
    // GC needs 1.1.0, and the list: without it nothing is collected.
    assert_eq!(error_code(&Call::new(&lab, "GC").run(&c)), 1);
    assert_eq!(
        error_code(&Call::new(&lab, "GC").run(&conf(&lab, "1.1.0"))),
        7
    );
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert!(list.contains("podC"), "{list}");
    // Another CNI configuration on the same netagent network keeps its attachments through
    // this one's GC.
    let g = netns(&lab, "cnig");
    let mut other_cni = c.clone();
    other_cni["name"] = json!("other-cni");
    other_cni["network"] = json!("services");
    let (good, r) = Call::new(&lab, "ADD")
        .container("podG", &g, "eth0")
        .run(&other_cni);
    assert!(good, "{r}");
    assert!(Call::new(&lab, "GC").run(&gc_conf).0);
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert!(list.contains("podG") && list.contains("podC"), "{list}");
    assert!(
        Call::new(&lab, "DEL")
            .container("podG", &g, "eth0")
            .run(&other_cni)
            .0
    );
    // DEL of an id that names one of the agent's own containers: not ours, so done, and the
    // container stays.
    sleeper(&lab, 1, "native-eth0", "services");
    assert!(
        Call::new(&lab, "DEL")
            .container("native", &g, "eth0")
            .run(&c)
            .0
    );
    common::json(&lab, 1, &["container", "inspect", "native-eth0"]);

    // Results in the caller's version: 0.3.1 names the IP family.
    let e = netns(&lab, "cnie");
    let (good, old) = Call::new(&lab, "ADD")
        .container("podE", &e, "eth0")
        .run(&conf(&lab, "0.3.1"));
    assert!(good, "{old}");
    assert_eq!(old["cniVersion"], "0.3.1");
    assert_eq!(old["ips"][0]["version"], "4");
    assert_eq!(
        error_code(
            &Call::new(&lab, "CHECK")
                .container("podE", &e, "eth0")
                .run(&conf(&lab, "0.3.1"))
        ),
        1,
        "CHECK came with 0.4.0"
    );
    // ADD again for an attachment that exists: the agent's conflict, and the first stays.
    let again = Call::new(&lab, "ADD").container("podE", &e, "eth0").run(&c);
    assert_eq!(error_code(&again), 100, "{}", again.1);
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert!(list.contains("podE"), "{list}");

    // Error codes.
    let f = netns(&lab, "cnif");
    let add_f = Call::new(&lab, "ADD").container("podF", &f, "eth0");
    let mut bad = c.clone();
    bad["cniVersion"] = json!("0.2.0");
    assert_eq!(error_code(&add_f.run(&bad)), 1);
    let mut bad = c.clone();
    bad["ipam"] = json!({"type": "host-local"});
    assert_eq!(error_code(&add_f.run(&bad)), 2);
    let mut gone_ns = Call::new(&lab, "ADD");
    gone_ns.container_id = "podF";
    gone_ns.ifname = "eth0";
    gone_ns.netns = Some("/run/netns/does-not-exist".into());
    assert_eq!(error_code(&gone_ns.run(&c)), 3);
    let mut no_if = Call::new(&lab, "ADD").container("podF", &f, "eth0");
    no_if.ifname = "";
    assert_eq!(error_code(&no_if.run(&c)), 4);
    let mut unknown_arg = Call::new(&lab, "ADD").container("podF", &f, "eth0");
    unknown_arg.args = "FOO=bar";
    assert_eq!(error_code(&unknown_arg.run(&c)), 4);
    assert_eq!(error_code(&add_f.run(&json!("not a config"))), 6);
    let mut bad = c.clone();
    bad["network"] = json!("nope");
    let r = add_f.run(&bad);
    assert_eq!(error_code(&r), 7);
    assert!(r.1["msg"].as_str().unwrap().contains("nope"), "{}", r.1);
    let mut bad = c.clone();
    bad["type"] = json!("bridge");
    assert_eq!(error_code(&add_f.run(&bad)), 7);
    // Nothing of the failed ADDs stayed.
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert!(!list.contains("podF"), "{list}");

    // STATUS: fine with the agent up; code 50 at once with it down; ADD says try again.
    let status = Call::new(&lab, "STATUS");
    assert!(status.run(&conf(&lab, "1.1.0")).0);
    let mut no_net = conf(&lab, "1.1.0");
    no_net["network"] = json!("nope");
    assert_eq!(error_code(&status.run(&no_net)), 50);
    lab.kill_agent(1, Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let r = status.run(&conf(&lab, "1.1.0"));
    assert_eq!(error_code(&r), 50);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(error_code(&add_f.run(&c)), 11);
    lab.start_agent(1).unwrap();
    // The restarted agent serves DNS in the attachments' namespaces again.
    let answered = wait_until(Duration::from_secs(10), || {
        let out = cns.sh(&[
            "dig",
            "+short",
            "+time=1",
            "+tries=1",
            "@127.0.0.11",
            "peer",
        ]);
        String::from_utf8_lossy(&out.stdout).trim() == peer
    });
    assert!(
        answered.is_some(),
        "no DNS in the attachment after the agent restarted: {:?}\n{}",
        cns.sh(&["dig", "+time=1", "+tries=1", "@127.0.0.11", "peer"]),
        lab.agent_log(1)
    );

    // An attachment whose namespace went while its agent was down (a runtime that crashed
    // with it): the restarted agent takes it out of service everywhere.
    let h = netns(&lab, "cnih");
    let mut replica = Call::new(&lab, "ADD").container("podH", &h, "eth0");
    replica.args = "NETAGENT_SERVICE=web";
    let (good, r) = replica.run(&c);
    assert!(good, "{r}");
    lab.kill_agent(1, Signal::SIGKILL).unwrap();
    let h_path = h.path();
    drop(h);
    lab.start_agent(1).unwrap();
    let unready = wait_until(Duration::from_secs(10), || {
        common::json(&lab, 2, &["container", "inspect", "podH-eth0"])["endpoints"][0]["ready"]
            == false
    });
    assert!(unready.is_some(), "a lost attachment stays in service");
    let mut del_h = Call::new(&lab, "DEL");
    del_h.container_id = "podH";
    del_h.ifname = "eth0";
    del_h.netns = Some(h_path);
    assert!(del_h.run(&c).0);

    // Clean up through the plugin, as a runtime would.
    for (id, ns) in [("podC", &cns), ("podE", &e)] {
        assert!(Call::new(&lab, "DEL").container(id, ns, "eth0").run(&c).0);
    }
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert_eq!(list.trim(), "[]");
}

/// Runs one of Debian's plugins as the next link of a chain, in node 1's namespace.
fn debian_plugin(
    lab: &Lab,
    plugin: &str,
    command: &str,
    ns: &Netns,
    conf: &Value,
) -> (bool, Value) {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", lab.node_ns(1)))
        .arg(format!("{CNI_BIN}/{plugin}"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", CNI_BIN)
        .env("CNI_CONTAINERID", "chained")
        .env("CNI_NETNS", ns.path())
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_bounded(c, conf.to_string().as_bytes())
}

fn in_node(lab: &Lab, argv: &[&str]) -> String {
    lab.exec_in_node(1, argv).unwrap().stdout
}

/// netagent first, then `tuning` (a sysctl inside), `bandwidth` (a qdisc on the host side
/// netagent reports) and `portmap` (DNAT rules in the node's namespace), each getting the
/// previous result, as a runtime runs a conflist; DEL in reverse order undoes all of it.
#[test]
fn debian_plugins_follow_it_in_a_chain() {
    let lab = lab();
    let ns = netns(&lab, "chain");
    let base = conf(&lab, "1.0.0");
    let (good, ours) = Call::new(&lab, "ADD")
        .container("chained", &ns, "eth0")
        .run(&base);
    assert!(good, "{ours}");
    let ip = ours["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let host_if = ours["interfaces"][0]["name"].as_str().unwrap().to_owned();

    let link = |plugin: Value, prev: &Value| {
        let mut conf = plugin;
        conf["cniVersion"] = json!("1.0.0");
        conf["name"] = json!("services");
        conf["prevResult"] = prev.clone();
        conf
    };
    let tuning = json!({"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.log_martians": "1"}});
    let bandwidth = json!({"type": "bandwidth", "ingressRate": 100_000_000u64,
        "ingressBurst": 1_000_000u64});
    let portmap = json!({"type": "portmap", "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [
            {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}});
    let mut prev = ours.clone();
    let mut confs = Vec::new();
    for (name, plugin) in [
        ("tuning", &tuning),
        ("bandwidth", &bandwidth),
        ("portmap", &portmap),
    ] {
        let conf = link(plugin.clone(), &prev);
        let (good, out) = debian_plugin(&lab, name, "ADD", &ns, &conf);
        assert!(good, "{name}: {out}");
        // Each passes our interfaces and address on.
        assert_eq!(
            out["ips"][0]["address"], ours["ips"][0]["address"],
            "{name}: {out}"
        );
        assert_eq!(out["interfaces"], ours["interfaces"], "{name}");
        prev = out;
        confs.push((name, conf));
    }
    let sysctl = ns.sh(&["sysctl", "-n", "net.ipv4.conf.eth0.log_martians"]);
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "1");
    let qdisc = in_node(&lab, &["tc", "qdisc", "show", "dev", &host_if]);
    assert!(qdisc.contains("tbf"), "{qdisc}");
    let nat = in_node(&lab, &["iptables", "-t", "nat", "-S"]);
    assert!(
        nat.contains("--dport 18080") && nat.contains(&format!("{ip}:80")),
        "{nat}"
    );
    let bin = workspace_bin("tinyhttp").display().to_string();
    let server = Command::new("ip")
        .args(["netns", "exec", &ns.0, &bin, "80", "chained"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Reaper(server);
    std::thread::sleep(Duration::from_millis(300));
    // portmap's DNAT reaches the container from the node itself. (Not from other hosts: the
    // container's reply leaves through netagent's egress masquerade, not the node's
    // conntrack; see the README.)
    let local = lab
        .exec_in_node(
            1,
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                &format!("http://{}:18080/", lab.node_addr(1)),
            ],
        )
        .unwrap();
    assert_eq!(local.stdout, "chained", "{}", local.stderr);
    // The address still works with the chain's additions in place.
    assert!(
        Call::new(&lab, "CHECK")
            .container("chained", &ns, "eth0")
            .run(&link(
                json!({"type": "netagent", "socket": base["socket"]}),
                &prev
            ))
            .0
    );

    // DEL, last plugin first, each with the final result.
    for (name, conf) in confs.iter().rev() {
        let mut conf = conf.clone();
        conf["prevResult"] = prev.clone();
        let (good, out) = debian_plugin(&lab, name, "DEL", &ns, &conf);
        assert!(good, "{name} DEL: {out}");
    }
    let mut del = base.clone();
    del["prevResult"] = prev.clone();
    assert!(
        Call::new(&lab, "DEL")
            .container("chained", &ns, "eth0")
            .run(&del)
            .0
    );
    let nat = in_node(&lab, &["iptables", "-t", "nat", "-S"]);
    assert!(!nat.contains("18080"), "{nat}");
    let links = in_node(&lab, &["ip", "-o", "link"]);
    assert!(!links.contains(&host_if), "{links}");
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert_eq!(list.trim(), "[]");
}
