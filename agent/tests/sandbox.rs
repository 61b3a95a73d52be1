//! Sandbox and netlink layer against the real kernel (root): named namespaces, veth attach
//! and detach, processes inside namespaces, and the node's VXLAN device.
//!
//! Every test works on objects named after this process and a counter, so tests run in
//! parallel and next to other users of the machine; guards remove every namespace, link and
//! process on success and on panic.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use netagent::netlink::Netlink;
use netagent::sandbox::{
    self, AttachRequest, ProcessExit, ProcessHandle, SandboxError, SpawnRequest,
};
use serde_json::Value;

const CMD_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A per-test unique number.
fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A namespace name unique to this test process and call.
fn ns_name() -> String {
    format!("natest-{}-{}", std::process::id(), next())
}

/// A host interface name (at most 15 bytes) unique to this process and call.
fn host_name() -> String {
    let n = format!("nt{}x{}", std::process::id(), next());
    assert!(n.len() <= 15, "test interface name {n} too long");
    n
}

/// Runs a command with a bound on its duration and returns its stdout; panics with stderr on
/// failure.
fn sh(argv: &[&str]) -> String {
    let out = try_sh(argv);
    assert!(out.success(), "{} failed: {}", out.command, out.stderr);
    out.stdout
}

fn try_sh(argv: &[&str]) -> netlab::Output {
    netlab::run(Command::new(argv[0]).args(&argv[1..]), CMD_TIMEOUT)
        .unwrap_or_else(|e| panic!("running {argv:?}: {e:#}"))
}

fn json(argv: &[&str]) -> Value {
    let out = sh(argv);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{argv:?} printed bad JSON {out:?}: {e}"))
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads a file inside a namespace as a process there sees it (used for /proc/sys/net).
fn read_in_ns(path: &Path, file: &str) -> String {
    let arg = format!("--net={}", path.display());
    sh(&["nsenter", &arg, "cat", file]).trim().to_string()
}

fn host_link_exists(name: &str) -> bool {
    try_sh(&["ip", "link", "show", "dev", name]).success()
}

fn netns_listed(name: &str) -> bool {
    sh(&["ip", "netns", "list"])
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Polls `f` every 10 ms for at most `limit`.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Deletes a namespace when dropped (also during a panic).
struct NsGuard {
    name: String,
    path: PathBuf,
}

impl NsGuard {
    fn create() -> NsGuard {
        let name = ns_name();
        let path = sandbox::create_netns(&name).expect("create netns");
        NsGuard { name, path }
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Err(e) = sandbox::delete_netns(&self.name) {
            eprintln!("cleanup: deleting netns {}: {e}", self.name);
        }
    }
}

/// Deletes a host link when dropped (also during a panic).
struct LinkGuard(String);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if host_link_exists(&self.0) {
            let _ = try_sh(&["ip", "link", "del", "dev", &self.0]);
        }
    }
}

/// Kills a process when dropped (also during a panic).
struct ProcGuard(ProcessHandle);

impl Drop for ProcGuard {
    fn drop(&mut self) {
        if sandbox::is_alive(&self.0) {
            // SAFETY: plain kill(2); is_alive just confirmed the pid is still ours.
            unsafe {
                libc::kill(self.0.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

fn attach_req(
    ns: &NsGuard,
    host: &str,
    ifname: &str,
    third_octet: u8,
    default_route: bool,
) -> AttachRequest {
    AttachRequest {
        netns: ns.path.clone(),
        host_ifname: host.to_string(),
        ifname: ifname.to_string(),
        address: Ipv4Addr::new(10, 77, third_octet, 5),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, 77, third_octet, 1),
        mtu: 1400,
        mac: [0x02, 0x42, 10, 77, third_octet, 5],
        router_mac: [0x02, 0xfe, 0, 0, 0, third_octet],
        default_route,
    }
}

/// `ip -j link show` of one link in a namespace (or the node when `ns` is None).
fn link_json(ns: Option<&str>, name: &str) -> Value {
    let mut argv = vec!["ip"];
    if let Some(ns) = ns {
        argv.extend(["-n", ns]);
    }
    argv.extend(["-d", "-j", "link", "show", "dev", name]);
    json(&argv)[0].clone()
}

fn has_flag(link: &Value, flag: &str) -> bool {
    link["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == flag))
}

#[test]
fn netns_create_is_visible_and_delete_removes_it() {
    let host_v6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6").ok();
    let ns = NsGuard::create();
    assert_eq!(ns.path, sandbox::netns_path(&ns.name));
    assert!(
        netns_listed(&ns.name),
        "ip netns list does not show {}",
        ns.name
    );
    assert!(sandbox::netns_exists(&ns.name));

    // lo is up inside, IPv6 is off inside (all and default) but untouched on the node.
    let lo = link_json(Some(&ns.name), "lo");
    assert!(has_flag(&lo, "UP"), "lo is not up: {lo}");
    assert_eq!(
        read_in_ns(&ns.path, "/proc/sys/net/ipv6/conf/all/disable_ipv6"),
        "1"
    );
    assert_eq!(
        read_in_ns(&ns.path, "/proc/sys/net/ipv6/conf/default/disable_ipv6"),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6").ok(),
        host_v6,
        "the node's IPv6 setting changed"
    );

    // A second create of the same name is refused and leaves the first intact.
    match sandbox::create_netns(&ns.name) {
        Err(SandboxError::NetnsExists(n)) => assert_eq!(n, ns.name),
        other => panic!("expected NetnsExists, got {other:?}"),
    }
    assert!(sandbox::netns_exists(&ns.name));

    assert!(sandbox::delete_netns(&ns.name).expect("delete"));
    assert!(!netns_listed(&ns.name));
    assert!(!ns.path.exists());
    assert!(!sandbox::delete_netns(&ns.name).expect("second delete is a no-op"));
}

#[test]
fn netns_create_replaces_a_stale_placeholder() {
    let name = ns_name();
    let path = sandbox::netns_path(&name);
    std::fs::create_dir_all(sandbox::NETNS_RUN_DIR).expect("mkdir");
    std::fs::write(&path, b"").expect("placeholder");
    let guard = NsGuard {
        name: name.clone(),
        path: path.clone(),
    };
    assert!(!sandbox::netns_exists(&name));
    let made = sandbox::create_netns(&name).expect("create over placeholder");
    assert_eq!(made, path);
    assert!(sandbox::netns_exists(&name));
    drop(guard);
    assert!(!path.exists());
}

#[test]
fn netns_names_are_validated() {
    for bad in ["", ".", "..", "a/b"] {
        assert!(
            matches!(
                sandbox::create_netns(bad),
                Err(SandboxError::InvalidNetnsName(_))
            ),
            "{bad:?} accepted"
        );
    }
}

#[tokio::test]
async fn attach_configures_both_ends_and_detach_removes_them() {
    let node = Netlink::new().expect("netlink");
    let ns = NsGuard::create();
    let host0 = host_name();
    let _g0 = LinkGuard(host0.clone());
    let req0 = attach_req(&ns, &host0, "eth0", 1, true);
    let att0 = sandbox::attach(&node, &req0).await.expect("attach eth0");
    assert_eq!(att0.host_ifname, host0);
    assert_eq!(att0.ifname, "eth0");

    // Inside: address/prefix, MAC, MTU, up.
    let addrs = json(&["ip", "-n", &ns.name, "-j", "addr", "show", "dev", "eth0"]);
    let eth0 = &addrs[0];
    assert_eq!(eth0["address"], mac_str(req0.mac), "{eth0}");
    assert_eq!(eth0["mtu"], 1400);
    assert!(has_flag(eth0, "UP"), "{eth0}");
    let inet: Vec<_> = eth0["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["family"] == "inet")
        .collect();
    assert_eq!(inet.len(), 1, "{eth0}");
    assert_eq!(inet[0]["local"], "10.77.1.5");
    assert_eq!(inet[0]["prefixlen"], 24);
    // No IPv6 at all inside, not even link-local.
    assert!(
        !eth0["addr_info"]
            .as_array()
            .expect("addr_info")
            .iter()
            .any(|a| a["family"] == "inet6"),
        "{eth0}"
    );
    assert_eq!(
        read_in_ns(&ns.path, "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"),
        "1"
    );

    // Default route via the gateway.
    let routes = json(&["ip", "-n", &ns.name, "-j", "route", "show", "default"]);
    let defaults = routes.as_array().expect("routes");
    assert_eq!(defaults.len(), 1, "{routes}");
    assert_eq!(defaults[0]["gateway"], "10.77.1.1");
    assert_eq!(defaults[0]["dev"], "eth0");

    // Host side: router MAC, MTU, up, IPv6 off, index as reported.
    let host = link_json(None, &host0);
    assert_eq!(host["address"], mac_str(req0.router_mac), "{host}");
    assert_eq!(host["mtu"], 1400);
    assert!(has_flag(&host, "UP"), "{host}");
    assert_eq!(host["ifindex"], att0.host_ifindex);
    assert_eq!(host["linkinfo"]["info_kind"], "veth");
    let v6 = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{host0}/disable_ipv6"))
        .expect("host sysctl");
    assert_eq!(v6.trim(), "1");
    assert_eq!(
        node.link_index(&host0).await.expect("link_index"),
        Some(att0.host_ifindex)
    );
    assert_eq!(node.link_mtu(&host0).await.expect("link_mtu"), Some(1400));

    // Second network: eth1 with only its subnet route; still one default route, via eth0.
    let host1 = host_name();
    let _g1 = LinkGuard(host1.clone());
    let req1 = attach_req(&ns, &host1, "eth1", 2, false);
    sandbox::attach(&node, &req1).await.expect("attach eth1");
    let routes = json(&["ip", "-n", &ns.name, "-j", "route", "show"]);
    let routes = routes.as_array().expect("routes");
    let defaults: Vec<_> = routes.iter().filter(|r| r["dst"] == "default").collect();
    assert_eq!(defaults.len(), 1, "{routes:?}");
    assert_eq!(defaults[0]["dev"], "eth0");
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "10.77.2.0/24" && r["dev"] == "eth1"),
        "no subnet route on eth1: {routes:?}"
    );
    let eth1 = link_json(Some(&ns.name), "eth1");
    assert_eq!(eth1["address"], mac_str(req1.mac));

    // Detach removes both ends; a second detach finds nothing.
    assert!(sandbox::detach(&node, &host0).await.expect("detach"));
    assert!(!host_link_exists(&host0));
    assert!(!try_sh(&["ip", "-n", &ns.name, "link", "show", "dev", "eth0"]).success());
    assert!(!sandbox::detach(&node, &host0).await.expect("second detach"));
    assert!(sandbox::detach(&node, &host1).await.expect("detach eth1"));
    assert!(!host_link_exists(&host1));
}

#[tokio::test]
async fn failed_attach_leaves_nothing_behind() {
    let node = Netlink::new().expect("netlink");

    // Missing namespace: fails before anything is made.
    let ns = NsGuard::create();
    let host = host_name();
    let _g = LinkGuard(host.clone());
    let mut req = attach_req(&ns, &host, "eth0", 3, true);
    req.netns = sandbox::netns_path(&ns_name());
    assert!(sandbox::attach(&node, &req).await.is_err());
    assert!(!host_link_exists(&host));

    // Failure after the veth exists (a gateway outside the subnet cannot be routed to):
    // both ends are removed again.
    let mut req = attach_req(&ns, &host, "eth0", 3, true);
    req.gateway = Ipv4Addr::new(192, 0, 2, 1);
    let err = sandbox::attach(&node, &req)
        .await
        .expect_err("unreachable gateway must fail");
    assert!(
        err.to_string().contains("192.0.2.1"),
        "error lacks context: {err}"
    );
    assert!(!host_link_exists(&host), "half-made veth left on the node");
    assert!(!try_sh(&["ip", "-n", &ns.name, "link", "show", "dev", "eth0"]).success());

    // A host name that is already taken: the attach fails and the existing interface (not
    // ours to remove) survives.
    let req = attach_req(&ns, &host, "eth0", 3, true);
    sandbox::attach(&node, &req).await.expect("attach");
    let other = NsGuard::create();
    let clash = attach_req(&other, &host, "eth0", 4, true);
    assert!(sandbox::attach(&node, &clash).await.is_err());
    assert!(
        host_link_exists(&host),
        "a failed attach removed someone else's interface"
    );
    assert!(try_sh(&["ip", "-n", &ns.name, "link", "show", "dev", "eth0"]).success());
    assert!(!try_sh(&["ip", "-n", &other.name, "link", "show", "dev", "eth0"]).success());

    // A second default route (another network's gateway) is refused rather than silently
    // ignored, and that attach is rolled back while the first interface stays.
    let host2 = host_name();
    let _g2 = LinkGuard(host2.clone());
    let second = attach_req(&ns, &host2, "eth1", 6, true);
    let err = sandbox::attach(&node, &second)
        .await
        .expect_err("second default route must fail");
    assert!(err.to_string().contains("10.77.6.1"), "{err}");
    assert!(!host_link_exists(&host2));
    assert!(!try_sh(&["ip", "-n", &ns.name, "link", "show", "dev", "eth1"]).success());
    let routes = json(&["ip", "-n", &ns.name, "-j", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "10.77.3.1", "{routes}");

    // Invalid names and prefixes are refused before the kernel sees them.
    let mut bad = attach_req(&ns, "this-name-is-too-long", "eth9", 5, false);
    assert!(sandbox::attach(&node, &bad).await.is_err());
    bad.host_ifname = host_name();
    bad.prefix_len = 33;
    assert!(sandbox::attach(&node, &bad).await.is_err());
    assert!(!host_link_exists(&bad.host_ifname));
}

#[test]
fn host_ifnames_are_short_deterministic_and_valid() {
    let id = "3f2a9c0d1e4b5a6978877665";
    assert_eq!(sandbox::host_ifname_for(id), "na3f2a9c0d1e4b");
    assert_eq!(sandbox::host_ifname_for(id), sandbox::host_ifname_for(id));
    for odd in ["short", "has/slash and spaces-and-more", ""] {
        let n = sandbox::host_ifname_for(odd);
        assert!(n.len() <= 15 && n.starts_with("na"), "{n}");
        assert!(n.bytes().all(|b| b.is_ascii_alphanumeric()), "{n}");
    }
    assert_ne!(
        sandbox::host_ifname_for("short"),
        sandbox::host_ifname_for("shore")
    );
}

fn spawn_req(ns: &NsGuard, log: &Path, argv: &[&str]) -> SpawnRequest {
    SpawnRequest {
        netns: ns.path.clone(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        resolv_conf: None,
        log: sandbox::LogTarget::File(log.to_path_buf()),
        env: Vec::new(),
        hosts_file: None,
        hostname: None,
        mounts: Vec::new(),
        secrets: Vec::new(),
    }
}

#[tokio::test]
async fn spawned_process_runs_in_the_namespace_and_stops() {
    let ns = NsGuard::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let p = sandbox::spawn(&spawn_req(&ns, &log, &["sleep", "30"])).expect("spawn");
    let _pg = ProcGuard(p);
    assert!(sandbox::is_alive(&p));
    assert_eq!(sandbox::process_start_time(p.pid), Some(p.start_time));

    // Same network namespace as the netns file, not the node's.
    let proc_ns = std::fs::metadata(format!("/proc/{}/ns/net", p.pid))
        .expect("proc ns")
        .ino();
    let file_ns = std::fs::metadata(&ns.path).expect("netns file").ino();
    let own_ns = std::fs::metadata("/proc/self/ns/net")
        .expect("own ns")
        .ino();
    assert_eq!(proc_ns, file_ns);
    assert_ne!(proc_ns, own_ns);
    // Its own session, so it is not tied to the agent's process group or terminal.
    // SAFETY: getsid(2) only reads.
    assert_eq!(
        unsafe { libc::getsid(p.pid as libc::pid_t) },
        p.pid as libc::pid_t
    );

    // A handle with the wrong start time names someone else.
    let impostor = ProcessHandle {
        pid: p.pid,
        start_time: p.start_time + 1,
    };
    assert!(!sandbox::is_alive(&impostor));
    assert!(
        !sandbox::stop(&impostor, Duration::from_millis(100))
            .await
            .expect("stop impostor")
    );
    assert!(
        sandbox::is_alive(&p),
        "stopping a stale handle hit the live process"
    );

    assert_eq!(
        sandbox::wait_exit(&p, Duration::from_millis(50))
            .await
            .expect("wait"),
        None,
        "still running"
    );
    assert!(
        sandbox::stop(&p, Duration::from_secs(5))
            .await
            .expect("stop")
    );
    assert!(!sandbox::is_alive(&p));
    assert_eq!(
        sandbox::wait_exit(&p, Duration::from_secs(5))
            .await
            .expect("wait"),
        Some(ProcessExit::Signal(libc::SIGTERM))
    );
    assert!(
        !sandbox::stop(&p, Duration::from_secs(1))
            .await
            .expect("second stop")
    );
    // Reaped: no zombie left under our pid.
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{}",
            p.pid
        ))
        .exists()),
        "process {} not reaped",
        p.pid
    );
}

#[tokio::test]
async fn stop_escalates_to_sigkill() {
    let ns = NsGuard::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    // exec keeps one process; the ignored SIGTERM survives exec.
    let p = sandbox::spawn(&spawn_req(
        &ns,
        &log,
        &["sh", "-c", "trap '' TERM; exec sleep 30"],
    ))
    .expect("spawn");
    let _pg = ProcGuard(p);
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                .is_ok_and(|c| c.trim() == "sleep")
        }),
        "sh did not exec sleep"
    );
    let started = Instant::now();
    assert!(
        sandbox::stop(&p, Duration::from_millis(300))
            .await
            .expect("stop")
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "SIGTERM should have been ignored"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        sandbox::wait_exit(&p, Duration::from_secs(5))
            .await
            .expect("wait"),
        Some(ProcessExit::Signal(libc::SIGKILL))
    );
}

#[tokio::test]
async fn a_process_with_its_own_mounts_holds_no_copy_of_the_nodes_namespaces() {
    let ns = NsGuard::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.11\n").expect("write resolv.conf");
    let mut req = spawn_req(&ns, &dir.path().join("log"), &["sleep", "30"]);
    req.resolv_conf = Some(resolv);
    let p = sandbox::spawn(&req).expect("spawn");
    let _pg = ProcGuard(p);
    // A namespace the node mounts after the process started does not propagate into it, and
    // the ones before (its own among them) are not there either.
    let later = NsGuard::create();
    let netns_mounts: Vec<String> = std::fs::read_to_string(format!("/proc/{}/mountinfo", p.pid))
        .expect("mountinfo")
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| m.starts_with(sandbox::NETNS_RUN_DIR))
        })
        .map(String::from)
        .collect();
    assert!(netns_mounts.is_empty(), "{netns_mounts:?}");
    // The node still has both, and the process still runs in its namespace.
    assert!(sandbox::is_netns(&later.path) && sandbox::is_netns(&ns.path));
    let own = std::fs::read_link(format!("/proc/{}/ns/net", p.pid)).expect("ns link");
    let meta = std::fs::metadata(&ns.path).expect("netns");
    assert!(
        own.to_string_lossy()
            .contains(&std::os::unix::fs::MetadataExt::ino(&meta).to_string()),
        "{own:?}"
    );
}

#[tokio::test]
async fn spawned_process_sees_its_resolv_conf_and_env_only() {
    let ns = NsGuard::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let resolv = dir.path().join("resolv.conf");
    let content = "nameserver 127.0.0.11\noptions ndots:0\n";
    std::fs::write(&resolv, content).expect("write resolv.conf");
    let host_before = std::fs::read("/etc/resolv.conf").ok();

    let log = dir.path().join("log");
    let mut req = spawn_req(
        &ns,
        &log,
        &[
            "sh",
            "-c",
            "cat /etc/resolv.conf; echo \"FOO=$FOO\"; echo x >> /etc/resolv.conf || echo read-only",
        ],
    );
    req.resolv_conf = Some(resolv.clone());
    req.env = vec![("FOO".into(), "bar".into())];
    let p = sandbox::spawn(&req).expect("spawn");
    let _pg = ProcGuard(p);
    let exit = sandbox::wait_exit(&p, Duration::from_secs(10))
        .await
        .expect("wait");
    assert_eq!(exit, Some(ProcessExit::Code(0)));
    let out = std::fs::read_to_string(&log).expect("log");
    assert!(out.starts_with(content), "log: {out:?}");
    assert!(out.contains("FOO=bar\n"), "log: {out:?}");
    assert!(
        out.contains("read-only"),
        "the process could write resolv.conf: {out:?}"
    );
    assert_eq!(std::fs::read_to_string(&resolv).expect("resolv"), content);

    // The node's resolv.conf is untouched and nothing is mounted over it here.
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_before);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mountinfo
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/etc/resolv.conf")),
        "resolv.conf bind leaked into the node's mount namespace"
    );

    // The log is appended, not truncated.
    let p2 = sandbox::spawn(&spawn_req(
        &ns,
        &log,
        &["sh", "-c", "echo second >&2; exit 3"],
    ))
    .expect("spawn");
    let _pg2 = ProcGuard(p2);
    assert_eq!(
        sandbox::wait_exit(&p2, Duration::from_secs(10))
            .await
            .expect("wait"),
        Some(ProcessExit::Code(3))
    );
    let out = std::fs::read_to_string(&log).expect("log");
    assert!(
        out.starts_with(content) && out.ends_with("second\n"),
        "log: {out:?}"
    );
}

#[tokio::test]
async fn spawn_failures_are_reported() {
    let ns = NsGuard::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let err = sandbox::spawn(&spawn_req(&ns, &log, &["/nonexistent/program"]))
        .expect_err("no such program");
    assert!(err.to_string().contains("/nonexistent/program"), "{err}");
    assert!(sandbox::spawn(&spawn_req(&ns, &log, &[])).is_err());
    let mut req = spawn_req(&ns, &log, &["true"]);
    req.netns = sandbox::netns_path(&ns_name());
    assert!(sandbox::spawn(&req).is_err());
    let mut req = spawn_req(&ns, &log, &["true"]);
    req.resolv_conf = Some(dir.path().join("missing"));
    assert!(sandbox::spawn(&req).is_err());
    // A step that fails in the child, before exec, is named.
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"").expect("write");
    let mut req = spawn_req(&ns, &log, &["true"]);
    req.netns = plain;
    let err = sandbox::spawn(&req).expect_err("not a namespace");
    assert!(
        err.to_string().contains("entering the network namespace"),
        "{err}"
    );
    let err = sandbox::spawn(&spawn_req(&ns, &log, &["no-such-program-anywhere"]))
        .expect_err("not in PATH");
    assert!(err.to_string().contains("No such file"), "{err}");
}

#[tokio::test]
async fn wait_exit_of_a_process_we_did_not_spawn() {
    // A child of the test but unknown to the sandbox module, as an adopted process is.
    let mut child = Command::new("sleep")
        .arg("0.2")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    let p = ProcessHandle {
        pid,
        start_time: sandbox::process_start_time(pid).expect("start time"),
    };
    assert!(sandbox::is_alive(&p));
    let exit = sandbox::wait_exit(&p, Duration::from_secs(5))
        .await
        .expect("wait");
    assert_eq!(exit, Some(ProcessExit::Unknown));
    // It was a zombie (is_alive treats that as gone); reap it.
    child.wait().expect("reap");
    assert!(!sandbox::is_alive(&p));
}

#[tokio::test]
async fn ensure_vxlan_is_idempotent_and_repairs() {
    let ns = NsGuard::create();
    let nl = Netlink::in_netns(&ns.path).expect("netlink in netns");

    let index = nl
        .ensure_vxlan("vx0", 4789, Some(1450))
        .await
        .expect("create");
    let link = link_json(Some(&ns.name), "vx0");
    assert_eq!(link["ifindex"], index);
    assert_eq!(link["mtu"], 1450);
    assert!(has_flag(&link, "UP"), "{link}");
    let info = &link["linkinfo"];
    assert_eq!(info["info_kind"], "vxlan");
    let data = &info["info_data"];
    assert_eq!(data["external"], true, "{data}");
    assert_eq!(data["port"], 4789, "{data}");
    assert_eq!(data["learning"], false, "{data}");
    assert_eq!(
        read_in_ns(&ns.path, "/proc/sys/net/ipv6/conf/vx0/disable_ipv6"),
        "1"
    );
    // Not in the node namespace.
    assert_eq!(
        Netlink::new()
            .expect("node netlink")
            .link_index("vx0")
            .await
            .ok()
            .flatten(),
        None
    );

    // Again: kept (same index). A new MTU is applied in place; a downed device comes back up.
    assert_eq!(
        nl.ensure_vxlan("vx0", 4789, Some(1450))
            .await
            .expect("again"),
        index
    );
    sh(&["ip", "-n", &ns.name, "link", "set", "vx0", "down"]);
    assert_eq!(
        nl.ensure_vxlan("vx0", 4789, Some(1400)).await.expect("mtu"),
        index
    );
    let link = link_json(Some(&ns.name), "vx0");
    assert_eq!(link["mtu"], 1400);
    assert!(has_flag(&link, "UP"), "{link}");
    assert_eq!(
        nl.ensure_vxlan("vx0", 4789, None).await.expect("no mtu"),
        index
    );

    // A wrongly configured device of that name is replaced.
    assert!(nl.delete_link("vx0").await.expect("delete"));
    assert!(!nl.delete_link("vx0").await.expect("delete again"));
    sh(&[
        "ip", "-n", &ns.name, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789",
    ]);
    let wrong = nl.link_index("vx0").await.expect("index").expect("exists");
    let fixed = nl.ensure_vxlan("vx0", 4789, None).await.expect("repair");
    assert_ne!(fixed, wrong);
    let data = link_json(Some(&ns.name), "vx0")["linkinfo"]["info_data"].clone();
    assert_eq!(data["external"], true, "{data}");
    assert_eq!(data["learning"], false, "{data}");
    // So is one on another port, and a device of another kind.
    let moved = nl
        .ensure_vxlan("vx0", 4790, None)
        .await
        .expect("port change");
    assert_eq!(
        link_json(Some(&ns.name), "vx0")["linkinfo"]["info_data"]["port"],
        4790
    );
    assert_ne!(moved, fixed);
    nl.delete_link("vx0").await.expect("delete");
    // (veth, not dummy: the test kernel may lack the dummy driver)
    sh(&[
        "ip", "-n", &ns.name, "link", "add", "vx0", "type", "veth", "peer", "name", "vx0p",
    ]);
    nl.ensure_vxlan("vx0", 4789, None)
        .await
        .expect("replace veth");
    assert_eq!(
        link_json(Some(&ns.name), "vx0")["linkinfo"]["info_kind"],
        "vxlan"
    );
}

#[tokio::test]
async fn link_and_address_lookups() {
    let ns = NsGuard::create();
    let nl = Netlink::in_netns(&ns.path).expect("netlink in netns");
    // (veth, not dummy: the test kernel may lack the dummy driver)
    sh(&[
        "ip", "-n", &ns.name, "link", "add", "up0", "mtu", "1300", "type", "veth", "peer", "name",
        "up0p",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns.name,
        "addr",
        "add",
        "198.18.7.2/24",
        "dev",
        "up0",
    ]);

    assert_eq!(
        nl.interface_with_address(Ipv4Addr::new(198, 18, 7, 2))
            .await
            .expect("lookup"),
        Some("up0".to_string())
    );
    assert_eq!(
        nl.interface_with_address(Ipv4Addr::new(127, 0, 0, 1))
            .await
            .expect("lookup lo"),
        Some("lo".to_string())
    );
    assert_eq!(
        nl.interface_with_address(Ipv4Addr::new(198, 18, 7, 3))
            .await
            .expect("lookup"),
        None
    );
    assert_eq!(nl.link_mtu("up0").await.expect("mtu"), Some(1300));
    assert_eq!(nl.link_mtu("nope0").await.expect("mtu"), None);
    assert_eq!(nl.link_index("nope0").await.expect("index"), None);
    assert!(nl.link_index("bad/name").await.is_err());
}

#[tokio::test]
async fn netlink_in_a_missing_namespace_fails() {
    let missing = sandbox::netns_path(&ns_name());
    let err = Netlink::in_netns(&missing).expect_err("must fail");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
    // A file that is not a namespace is refused too, rather than silently using the node's.
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    assert!(Netlink::in_netns(file.path()).is_err());
}
