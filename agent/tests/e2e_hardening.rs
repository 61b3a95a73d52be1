//! End to end (root): the agent changes nothing it did not make, finishes what it starts
//! whatever the client does, keeps serving without its store, and refuses bad input.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use netlab::{Lab, LabConfig, Signal, StoreKind};

mod common;
use common::{
    Reaper, api, container_ip, drops, etcd_lab, exec, json, log_chunk, must_fail, ok, wait_until,
};

fn one_node(extra: &[&str]) -> Lab {
    Lab::up(LabConfig {
        nodes: 1,
        store: StoreKind::Embedded,
        extra_agent_args: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .expect("lab up")
}

fn sh(argv: &[&str]) -> netlab::Output {
    netlab::run(
        Command::new(argv[0]).args(&argv[1..]),
        Duration::from_secs(30),
    )
    .expect("run")
}

/// A namespace made by hand (an operator's), removed on drop.
#[test]
fn a_container_never_touches_a_namespace_it_did_not_make() {
    let lab = one_node(&[]);
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.90.0.0/24", "services"],
    );
    // What the agent would name container "foo" (the lab's agents use the prefix
    // "<lab>-n1-"), made by someone else, with a process in it.
    let name = format!("{}-n1-foo", lab.prefix());
    let _guard = common::Netns::add(name.clone());
    let sleeper = Reaper(
        Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "120"])
            .spawn()
            .expect("sleep in the operator's namespace"),
    );
    std::thread::sleep(Duration::from_millis(200));
    let before = json(&lab, 1, &["container", "ls"]);
    must_fail(
        &lab,
        1,
        &[
            "container",
            "run",
            "--name",
            "foo",
            "--network",
            "services",
            "--",
            "true",
        ],
        "already exists",
    );
    // Everything it found is still there, and nothing was recorded.
    assert!(sh(&["ip", "netns", "list"]).stdout.contains(&name));
    let pid = sleeper.0.id();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the operator's process was killed"
    );
    assert_eq!(json(&lab, 1, &["container", "ls"]), before);
    // Another name works.
    ok(
        &lab,
        1,
        &[
            "container",
            "run",
            "--name",
            "bar",
            "--network",
            "services",
            "--",
            "true",
        ],
    );
}

#[test]
fn containers_started_while_the_node_keeps_reconciling_are_reachable_at_once() {
    let lab = etcd_lab(2);
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.91.0.0/16", "services"],
    );
    ok(
        &lab,
        2,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "peer",
            "--network",
            "services",
            "--",
            "sleep",
            "600",
        ],
    );
    let peer = container_ip(&lab, 2, "peer");
    // Constant store events: every one of them is a reconcile pass on n1.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        let sock = lab.socket(2);
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let body = format!(
                    r#"{{"name":"churn{i}","subnet":"10.{}.0.0/24"}}"#,
                    100 + i % 50
                );
                let _ = raw_request(&sock, "POST", "/v1/networks", &body, true);
                let _ = raw_request(&sock, "DELETE", &format!("/v1/networks/churn{i}"), "", true);
                i += 1;
            }
            i
        })
    };
    for i in 0..8 {
        let name = format!("c{i}");
        ok(
            &lab,
            1,
            &[
                "container",
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                "services",
                "--",
                "sleep",
                "600",
            ],
        );
        let out = exec(&lab, 1, &name, &["ping", "-c", "1", "-W", "2", &peer]);
        assert!(
            out.success(),
            "{name} could not reach {peer} right after starting"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let events = churn.join().expect("churn");
    assert!(events > 4, "the churn ran ({events} rounds)");
    // No packet of a fresh container was taken for a spoofed one.
    assert_eq!(drops(&lab, 1, "source_spoofed"), 0);
    for i in 0..8 {
        let out = exec(
            &lab,
            1,
            &format!("c{i}"),
            &["ping", "-c", "1", "-W", "2", &peer],
        );
        assert!(out.success(), "c{i} lost its endpoint later");
    }
}

/// One HTTP request on a unix socket; `wait` false closes the connection right after sending.
fn raw_request(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
    wait: bool,
) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    if wait {
        s.read_to_string(&mut out)?;
    }
    Ok(out)
}

fn lab_netns(lab: &Lab) -> BTreeSet<String> {
    let prefix = format!("{}-n1-", lab.prefix());
    sh(&["ip", "netns", "list"])
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn veths(lab: &Lab) -> usize {
    lab.exec_in_node(1, &["ip", "-o", "link"])
        .expect("ip link")
        .stdout
        .lines()
        // The node's uplink is a veth to the fabric too.
        .filter(|l| l.contains("link-netns") && !l.contains(": eth0@"))
        .count()
}

fn link_pins(lab: &Lab) -> usize {
    std::fs::read_dir(lab.bpf_dir(1).join("links"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("from_container@")
                })
                .count()
        })
        .unwrap_or(0)
}

/// What the node holds for its containers, once nothing is in flight: (containers in the
/// store, namespaces, veths, pinned programs).
fn settled(lab: &Lab) -> (BTreeSet<String>, BTreeSet<String>, usize, usize) {
    let mut last = None;
    loop {
        let names: BTreeSet<String> = json(lab, 1, &["container", "ls"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect();
        let prefix = format!("{}-n1-", lab.prefix());
        let ns: BTreeSet<String> = lab_netns(lab)
            .into_iter()
            .map(|n| n.trim_start_matches(&prefix).to_string())
            .collect();
        let now = (names, ns, veths(lab), link_pins(lab));
        if last.as_ref() == Some(&now) {
            return now;
        }
        last = Some(now);
        std::thread::sleep(Duration::from_millis(1500));
    }
}

#[test]
fn operations_finish_or_roll_back_when_the_client_goes_away() {
    let lab = one_node(&[]);
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.92.0.0/24", "services"],
    );
    let sock = lab.socket(1);
    // Clients that hang up at various points while their container is being made (a run
    // takes tens of milliseconds): what the agent had started it finishes.
    for i in 0..10u64 {
        let body =
            format!(r#"{{"name":"k{i}","networks":["services"],"command":["sleep","600"]}}"#);
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        write!(
            s,
            "POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        std::thread::sleep(Duration::from_millis(5 + i * 6));
        drop(s);
    }
    let (names, ns, veths_n, pins) = settled(&lab);
    assert!(!names.is_empty(), "some runs were taken");
    assert_eq!(
        ns, names,
        "a namespace for each container and none without one"
    );
    assert_eq!(
        (veths_n, pins),
        (names.len(), names.len()),
        "a veth and a pinned program each"
    );
    for n in &names {
        assert_eq!(
            json(&lab, 1, &["container", "inspect", n])["state"],
            "running",
            "{n}"
        );
    }
    // The same for removals.
    for n in &names {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        write!(s, "DELETE /v1/containers/{n} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        std::thread::sleep(Duration::from_millis(30));
        drop(s);
    }
    let (names_after, ns_after, veths_after, pins_after) = settled(&lab);
    assert_eq!(ns_after, names_after, "no namespace without a container");
    assert_eq!(
        (veths_after, pins_after),
        (names_after.len(), names_after.len())
    );
    assert!(names_after.len() < names.len(), "removals were taken");
}

#[test]
fn an_agent_restarted_while_etcd_is_down_serves_its_containers() {
    let lab = etcd_lab(2);
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.93.0.0/24", "services"],
    );
    for (node, name) in [(1, "a"), (2, "b")] {
        common::run_detached(&lab, node, name, "services", None, &["sleep", "600"]);
    }
    ok(
        &lab,
        1,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "short",
            "--network",
            "services",
            "--",
            "sleep",
            "3",
        ],
    );
    let b = container_ip(&lab, 2, "b");
    // The view is saved within half a second of a change.
    std::thread::sleep(Duration::from_millis(1500));

    lab.stop_etcd().expect("stop etcd");
    lab.kill_agent(1, Signal::SIGKILL).expect("kill agent");
    lab.start_agent(1).expect("agent starts without its store");
    // DNS is served again from the saved view, and forwarding goes on.
    let resolves = |name: &str, want: &str| {
        let out = exec(
            &lab,
            1,
            "a",
            &["dig", "+short", "+time=1", "+tries=1", name],
        );
        out.stdout.trim() == want
    };
    assert!(
        wait_until(Duration::from_secs(10), || resolves("b", &b)).is_some(),
        "a resolves b from the saved view\n{}",
        lab.agent_log(1)
    );
    assert!(exec(&lab, 1, "a", &["ping", "-c", "1", "-W", "2", &b]).success());

    lab.start_etcd().expect("start etcd");
    // A change made elsewhere while this node was cut off from the store reaches it.
    ok(
        &lab,
        2,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "c",
            "--network",
            "services",
            "--",
            "sleep",
            "600",
        ],
    );
    let c = container_ip(&lab, 2, "c");
    assert!(
        wait_until(Duration::from_secs(30), || resolves("c", &c)).is_some(),
        "the live view took over\n{}",
        lab.agent_log(1)
    );
    assert!(
        wait_until(Duration::from_secs(5), || exec(
            &lab,
            1,
            "a",
            &["ping", "-c", "1", "-W", "1", &c]
        )
        .success())
        .is_some()
    );
    // "short" ended while its agent was away: it is exited, and its exit status is unknown,
    // never reported as success.
    let ended = || {
        let (status, body) = api(
            &lab,
            1,
            "POST",
            "/v1/containers/short/wait",
            r#"{"timeout_secs":1}"#,
        );
        status == 200 && body.contains(r#""state":"exited""#)
    };
    assert!(wait_until(Duration::from_secs(10), ended).is_some());
    let (_, body) = api(&lab, 1, "POST", "/v1/containers/short/wait", "{}");
    assert!(body.contains(r#""exit_code":null"#), "{body}");
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let lab = one_node(&[]);
    ok(
        &lab,
        1,
        &[
            "network",
            "create",
            "--subnet",
            "10.94.0.0/24",
            "--attachable",
            "services",
        ],
    );
    let before = json(&lab, 1, &["network", "ls"]);
    for (subnet, why) in [
        ("0.1.0.0/16", "this network"),
        ("127.0.0.0/24", "loopback"),
        ("169.254.10.0/24", "link-local"),
        ("224.1.0.0/16", "multicast"),
        ("240.0.0.0/8", "reserved"),
        // The lab's fabric: it holds the node's own address.
        ("198.18.0.0/24", "contains the address"),
    ] {
        must_fail(
            &lab,
            1,
            &["network", "create", "--subnet", subnet, "bad"],
            why,
        );
    }
    // The uplink is 1500 and VXLAN takes 50.
    must_fail(
        &lab,
        1,
        &[
            "network",
            "create",
            "--subnet",
            "10.95.0.0/24",
            "--opt",
            "mtu=1451",
            "bad",
        ],
        "does not fit",
    );
    assert_eq!(json(&lab, 1, &["network", "ls"]), before);
    ok(
        &lab,
        1,
        &[
            "network",
            "create",
            "--subnet",
            "10.95.0.0/24",
            "--opt",
            "mtu=1450",
            "fits",
        ],
    );
    must_fail(
        &lab,
        1,
        &[
            "service",
            "create",
            "--name",
            "s",
            "--network",
            "services",
            "--network",
            "services",
        ],
        "given twice",
    );
    must_fail(
        &lab,
        1,
        &[
            "service",
            "create",
            "--name",
            "s",
            "--network",
            "services",
            "--publish",
            "4789:80/udp",
        ],
        "VXLAN",
    );
    ok(
        &lab,
        1,
        &["service", "create", "--name", "web", "--network", "fits"],
    );
    must_fail(&lab, 1, &["network", "rm", "fits"], "in use by service");

    // The attach API: not a namespace, or the node's own.
    let agent_ns = format!("/proc/{}/ns/net", lab.agent_pid(1).expect("agent pid"));
    for (netns, why) in [
        ("/etc/hostname", "not a network namespace"),
        (agent_ns.as_str(), "node's own network namespace"),
        ("/nonexistent", "does not exist"),
    ] {
        let body =
            format!(r#"{{"netns":"{netns}","ifname":"eth0","network":"services","id":"x1"}}"#);
        let (status, resp) = api(&lab, 1, "POST", "/v1/attach", &body);
        assert_eq!(status, 400, "{netns}: {resp}");
        assert!(resp.contains(why), "{netns}: {resp}");
    }
    // The interface name it is given is the one recorded.
    let ns = format!("{}-cni1", lab.prefix());
    let _guard = common::Netns::add(ns.clone());
    let body =
        format!(r#"{{"netns":"/run/netns/{ns}","ifname":"net5","network":"services","id":"x2"}}"#);
    let (status, resp) = api(&lab, 1, "POST", "/v1/attach", &body);
    assert_eq!(status, 200, "{resp}");
    assert!(resp.contains(r#""name":"net5""#), "{resp}");
    let c = json(&lab, 1, &["container", "inspect", "x2"]);
    assert_eq!(c["endpoints"][0]["ifname"], "net5");
    assert!(sh(&["ip", "-n", &ns, "link", "show", "net5"]).success());
    let (status, _) = api(&lab, 1, "DELETE", "/v1/attach/x2", "");
    assert_eq!(status, 204);
    assert!(
        sh(&["ip", "netns", "list"]).stdout.contains(&ns),
        "the caller's namespace stays"
    );
}

#[test]
fn logs_stay_bounded_and_are_read_by_offset() {
    let lab = one_node(&["--log-max-size", "65536"]);
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.96.0.0/24", "services"],
    );
    // ~400 KB over about four seconds, in numbered lines.
    ok(
        &lab,
        1,
        &[
            "container",
            "run",
            "-d",
            "--name",
            "chatty",
            "--network",
            "services",
            "--",
            "sh",
            "-c",
            "for i in $(seq 400); do printf 'line %04d %0989d\\n' $i 0; sleep 0.01; done; sleep 600",
        ],
    );
    let dir = lab.state_dir(1).join("containers").join("chatty");
    let on_disk = || {
        std::fs::read_dir(dir.join("logs"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0)
    };
    let line = 1000;
    let mut peak = 0;
    let done = wait_until(Duration::from_secs(30), || {
        peak = peak.max(on_disk());
        let (_, _, end) = log_chunk(&lab, 1, "chatty", 0);
        // Nothing is lost to rotation: the end is exactly every byte written.
        end >= 400 * line
    });
    assert!(done.is_some(), "all output arrived");
    assert!(
        peak < 300_000,
        "the log was not bounded: {peak} bytes on disk"
    );
    // Offsets keep growing across rotations; the oldest lines are gone, the newest are read.
    let (text, next, end) = log_chunk(&lab, 1, "chatty", 0);
    assert!(next <= end);
    assert!(
        !text.starts_with("line 0001"),
        "rotated-away output is not served"
    );
    let mut offset = next;
    let mut tail = text;
    while offset < end {
        let (more, n, _) = log_chunk(&lab, 1, "chatty", offset);
        tail.push_str(&more);
        offset = n;
    }
    assert_eq!(end, 400 * line, "every byte written, no more");
    // Every line after the first one served is there, in order (no loss at rotations).
    let numbers: Vec<u32> = tail
        .lines()
        .skip(1)
        .map(|l| l[5..9].parse().expect("a whole numbered line"))
        .collect();
    let first = numbers[0];
    assert_eq!(numbers, (first..=400).collect::<Vec<_>>());
}

#[test]
fn the_api_socket_is_for_root_only() {
    let lab = one_node(&[]);
    let sock = lab.socket(1);
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let ping = |as_nobody: bool| {
        let sock = sock.display().to_string();
        let mut argv = vec![];
        if as_nobody {
            argv.extend([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
            ]);
        }
        argv.extend([
            "curl",
            "-s",
            "-m",
            "5",
            "--unix-socket",
            &sock,
            "http://x/v1/ping",
        ]);
        sh(&argv)
    };
    assert!(ping(false).stdout.contains("\"node\""));
    // Even with the file opened up by mistake, a non-root peer is refused.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = ping(true);
    assert!(
        !out.stdout.contains("\"node\""),
        "a non-root user got an answer: {out:?}"
    );
    assert!(
        lab.agent_log(1).contains("non-root"),
        "the refusal is logged"
    );
}
