//! Helpers for tests of services that run their own tasks.

use std::collections::BTreeMap;
use std::time::Duration;

use netlab::Lab;
use serde_json::Value;

use super::{json, ok, wait_until};

/// An HTTP server on port 80 answering every GET with its hostname (the task's name, `web.1`),
/// without logging each request.
pub const HOSTNAME_SERVER: &str = "import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = socket.gethostname().encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(('', 80), H).serve_forever()
";

/// `service ps NAME` as JSON.
pub fn ps(lab: &Lab, node: usize, svc: &str) -> Vec<Value> {
    json(lab, node, &["service", "ps", svc])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The tasks that should run (one per slot; the newest of a slot in a start-first update).
pub fn current(lab: &Lab, node: usize, svc: &str) -> Vec<Value> {
    ps(lab, node, svc)
        .into_iter()
        .filter(|t| t["history"] == false && t["desired"] == "running")
        .collect()
}

/// Running tasks of the service per node.
pub fn running_per_node(lab: &Lab, node: usize, svc: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in ps(lab, node, svc) {
        if t["desired"] == "running" && t["state"] == "running" {
            *out.entry(t["node"].as_str().unwrap_or("-").to_string())
                .or_default() += 1;
        }
    }
    out
}

/// Waits until the service has exactly `n` tasks running and wanting to run.
pub fn wait_running(lab: &Lab, svc: &str, n: usize, limit: Duration) -> BTreeMap<String, usize> {
    let mut last = BTreeMap::new();
    let done = wait_until(limit, || {
        last = running_per_node(lab, 1, svc);
        let cur = current(lab, 1, svc);
        last.values().sum::<usize>() == n
            && cur.len() == n
            && cur.iter().all(|t| t["state"] == "running")
    });
    assert!(
        done.is_some(),
        "{svc}: not {n} running tasks within {limit:?}: {last:?}\n{:#?}",
        ps(lab, 1, svc)
    );
    last
}

/// Answers of `n` sequential HTTP requests to `addr` from the fabric, counted; failures count
/// as "FAIL".
pub fn answers(lab: &Lab, addr: &str, n: usize) -> BTreeMap<String, usize> {
    let script =
        format!("for i in $(seq {n}); do curl -s -m 3 http://{addr}/ || printf FAIL; echo; done");
    let out = lab
        .exec_in_fabric_timeout(&["sh", "-c", &script], Duration::from_secs(120))
        .expect("curl loop");
    let mut counts = BTreeMap::new();
    for line in out.stdout.lines() {
        *counts.entry(line.trim().to_string()).or_default() += 1;
    }
    counts
}

/// The container that runs a task (as `service ps` reports it).
pub fn container_of(task: &Value) -> String {
    task["container"]
        .as_str()
        .expect("task container")
        .to_string()
}

/// The pid of a task's process, asked on its node.
pub fn task_pid(lab: &Lab, task: &Value) -> u32 {
    let node: usize = task["node"].as_str().expect("node")[1..]
        .parse()
        .expect("node number");
    json(lab, node, &["container", "inspect", &container_of(task)])["pid"]
        .as_u64()
        .expect("pid") as u32
}

/// `service create` (waiting for it to converge, as netctl does without --detach).
pub fn create(lab: &Lab, args: &[&str]) {
    let mut argv = vec!["service", "create"];
    argv.extend_from_slice(args);
    ok(lab, 1, &argv);
}
