//! What every end-to-end test does with the lab: run netctl, read JSON, wait, expect errors.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::{Duration, Instant};

use netlab::{Lab, Output};
use serde_json::Value;

/// Runs netctl on `node` and insists it succeeds; on failure shows the agent's log.
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
