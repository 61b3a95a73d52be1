//! What every end-to-end test does with the lab: run netctl, read JSON, wait, expect errors.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::{Duration, Instant};

pub mod tasks;

use netlab::{Lab, LabConfig, Output, StoreKind};
use serde_json::Value;

/// Runs netctl on `node` and insists it succeeds; on failure shows the agent's log.
/// A lab of `nodes` nodes sharing one etcd, with the lab's defaults otherwise.
pub fn etcd_lab(nodes: usize) -> Lab {
    Lab::up(LabConfig {
        nodes,
        store: StoreKind::Etcd,
        ..Default::default()
    })
    .expect("lab up")
}

pub fn ok(lab: &Lab, node: usize, args: &[&str]) -> Output {
    let out = lab.netctl(node, args).expect("run netctl");
    assert!(
        out.success(),
        "netctl {args:?} on n{node} failed: {}{}\nagent log:\n{}",
        out.stdout,
        out.stderr,
        lab.agent_log(node)
    );
    out
}

/// netctl with `--format json` (given first, so it never lands after a `--`), parsed.
pub fn json(lab: &Lab, node: usize, args: &[&str]) -> Value {
    let mut argv = vec!["--format", "json"];
    argv.extend_from_slice(args);
    let out = ok(lab, node, &argv);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", out.stdout))
}

/// A netctl command that must fail with one stderr line containing `expect`.
pub fn must_fail(lab: &Lab, node: usize, args: &[&str], expect: &str) {
    let out = lab.netctl(node, args).expect("run netctl");
    assert!(!out.success(), "netctl {args:?} succeeded: {}", out.stdout);
    let err = out.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "error is not one line: {err:?}");
    assert!(
        err.contains(expect),
        "netctl {args:?}: expected {expect:?} in {err:?}"
    );
}

/// Polls `f` every 20 ms until it holds or `limit` passes; how long it took.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `netctl container exec NAME -- CMD...` on `node` (success not required).
pub fn exec(lab: &Lab, node: usize, name: &str, cmd: &[&str]) -> Output {
    let mut argv = vec!["container", "exec", name, "--"];
    argv.extend_from_slice(cmd);
    lab.netctl(node, &argv).expect("run netctl exec")
}

/// One HTTP request straight to an agent's API socket: (status code, body).
pub fn api(lab: &Lab, node: usize, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut sock = std::os::unix::net::UnixStream::connect(lab.socket(node)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        sock,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    sock.read_to_string(&mut resp).unwrap();
    let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A binary of this workspace next to the test executable (target/<profile>/NAME).
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not built next to {}", exe.display()))
}

/// Kills a background process when dropped (test failure included).
pub struct Reaper(pub std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first address of a container (inspected on `node`).
pub fn container_ip(lab: &Lab, node: usize, name: &str) -> String {
    json(lab, node, &["container", "inspect", name])["endpoints"][0]["ip"]
        .as_str()
        .expect("ip")
        .to_string()
}

/// A node's drop counter for `reason` (asked on that node, which alone reads its kernel).
pub fn drops(lab: &Lab, node: usize, reason: &str) -> u64 {
    let name = lab.node_name(node);
    json(lab, node, &["node", "inspect", &name])["datapath"]["drops"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no drop counter {reason}"))
}

/// A chunk of a container's log through the API: (text, next offset, end offset).
pub fn log_chunk(lab: &Lab, node: usize, name: &str, offset: u64) -> (String, u64, u64) {
    let (status, body) = api(
        lab,
        node,
        "GET",
        &format!("/v1/containers/{name}/logs?offset={offset}"),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    (
        v["log"].as_str().unwrap_or_default().to_string(),
        v["next"].as_u64().unwrap_or(0),
        v["end"].as_u64().unwrap_or(0),
    )
}

/// `container run -d --name NAME --network NETWORK [--service SERVICE] -- CMD...` on `node`.
pub fn run_detached(
    lab: &Lab,
    node: usize,
    name: &str,
    network: &str,
    service: Option<&str>,
    cmd: &[&str],
) {
    let mut argv = vec![
        "container",
        "run",
        "-d",
        "--name",
        name,
        "--network",
        network,
    ];
    if let Some(s) = service {
        argv.extend(["--service", s]);
    }
    argv.push("--");
    argv.extend_from_slice(cmd);
    ok(lab, node, &argv);
}

/// A container that only sleeps (an hour), to run commands in with [`exec`].
pub fn sleeper(lab: &Lab, node: usize, name: &str, network: &str) {
    run_detached(lab, node, name, network, None, &["sleep", "3600"]);
}

/// A keep-alive HTTP server on port 80 answering its name (tinyhttp: one connection per
/// thread, one thread per CPU), a replica of `service` if given.
pub fn http_server(lab: &Lab, node: usize, name: &str, network: &str, service: Option<&str>) {
    let bin = workspace_bin("tinyhttp").display().to_string();
    run_detached(lab, node, name, network, service, &[&bin, "80", name]);
}

/// The (first) VIP of service `name`.
pub fn vip_of(lab: &Lab, node: usize, name: &str) -> String {
    json(lab, node, &["service", "inspect", name])["vips"][0]["vip"]
        .as_str()
        .expect("a VIP")
        .to_owned()
}

/// A network namespace made by the test, as a runtime or an operator would make one (named
/// with the lab's prefix, so a lab teardown finds it if the test dies); deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn add(name: impl Into<String>) -> Netns {
        let name = name.into();
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip netns add {name}");
        Netns(name)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// Runs `argv` inside (`ip netns exec`).
    pub fn sh(&self, argv: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(argv)
            .output()
            .expect("run ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}
