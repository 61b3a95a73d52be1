//! End to end (root): rolling updates under a load of new connections through the routing
//! mesh: start-first without a failed request, a failing health check rolled back without a
//! failed request, and a leader killed mid-update whose successor carries on.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use netlab::{Lab, LabConfig, Signal, StoreKind};
use serde_json::Value;

mod common;
use common::tasks::{HOSTNAME_SERVER, create, current, ps, wait_running};
use common::{json, ok, wait_until};

fn lab3() -> Lab {
    let lab = Lab::up(LabConfig {
        nodes: 3,
        store: StoreKind::Etcd,
        lease_ttl_secs: 3,
        ..Default::default()
    })
    .expect("lab up");
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.41.0.0/24", "services"],
    );
    lab
}

/// New connections, one after another, to every node's published port in turn, from the
/// fabric, for at most `secs`; each line the HTTP status (000: failed).
fn load(lab: &Lab, secs: u64) -> netlab::Background {
    let targets: Vec<String> = (1..=3)
        .map(|i| format!("http://{}:8080/", lab.node_addr(i)))
        .collect();
    let script = format!(
        "end=$(($(date +%s) + {secs})); while [ $(date +%s) -lt $end ]; do \
         for t in {}; do curl -s -m 3 -o /dev/null -w '%{{http_code}}\\n' $t; done; done",
        targets.join(" ")
    );
    lab.spawn_in_fabric(&["sh", "-c", &script]).expect("load")
}

fn codes(out: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in out.lines() {
        *m.entry(l.trim().to_string()).or_default() += 1;
    }
    m
}

fn web(lab: &Lab, extra: &[&str]) {
    let mut args = vec![
        "--name",
        "web",
        "--replicas",
        "3",
        "--network",
        "services",
        "-p",
        "8080:80",
    ];
    args.extend_from_slice(extra);
    args.extend(["--", "python3", "-c", HOSTNAME_SERVER]);
    create(lab, &args);
}

fn inspect(lab: &Lab) -> Value {
    json(lab, 1, &["service", "inspect", "web"])
}

#[test]
fn a_start_first_rolling_update_under_load_fails_no_request() {
    let lab = lab3();
    web(&lab, &[]);
    let before: BTreeSet<String> = current(&lab, 1, "web")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    let traffic = load(&lab, 60);
    std::thread::sleep(Duration::from_secs(1));
    ok(
        &lab,
        1,
        &[
            "service",
            "update",
            "web",
            "--env-add",
            "V=2",
            "--update-parallelism",
            "1",
            "--update-delay",
            "2s",
            "--update-order",
            "start-first",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let out = traffic.stop(Duration::from_secs(2)).expect("stop load");
    let got = codes(&out.stdout);
    eprintln!("start-first update under load: {got:?}");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["200"],
        "failed requests: {got:?}"
    );
    assert!(
        got["200"] > 100,
        "too little load to mean anything: {got:?}"
    );
    let svc = inspect(&lab);
    assert_eq!(svc["update_status"]["state"], "completed");
    let now = current(&lab, 1, "web");
    assert_eq!(now.len(), 3);
    for t in &now {
        assert!(
            !before.contains(t["id"].as_str().unwrap()),
            "not replaced: {t}"
        );
        assert_eq!(t["spec_version"], svc["version"]);
    }
    let replaced = ps(&lab, 1, "web")
        .into_iter()
        .filter(|t| t["reason"] == "replaced by an update" && t["state"] == "shutdown")
        .count();
    assert_eq!(replaced, 3);
}

#[test]
fn a_failing_health_check_rolls_the_update_back_without_a_failed_request() {
    let lab = lab3();
    web(
        &lab,
        &[
            "--health-cmd",
            "curl -sf http://127.0.0.1/ >/dev/null",
            "--health-interval",
            "300ms",
            "--health-retries",
            "2",
            "--update-order",
            "start-first",
            "--update-failure-action",
            "rollback",
            "--update-monitor",
            "3s",
        ],
    );
    let original = inspect(&lab)["spec"]["task"].clone();
    let traffic = load(&lab, 60);
    std::thread::sleep(Duration::from_secs(1));
    let out = lab
        .netctl(1, ["service", "update", "web", "--health-cmd", "exit 1"])
        .expect("netctl");
    assert!(!out.success(), "the update was reported as a success");
    assert!(
        out.stderr.contains("update rolled back due to failure"),
        "{}",
        out.stderr
    );
    wait_running(&lab, "web", 3, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let load_out = traffic.stop(Duration::from_secs(2)).expect("stop load");
    let got = codes(&load_out.stdout);
    eprintln!("failed update rolled back under load: {got:?}");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["200"],
        "failed requests: {got:?}"
    );
    let svc = inspect(&lab);
    assert_eq!(svc["update_status"]["state"], "rollback_completed");
    assert_eq!(svc["spec"]["task"], original, "the old spec is back");
    for t in current(&lab, 1, "web") {
        assert_eq!(t["state"], "running");
    }
    let unhealthy = ps(&lab, 1, "web")
        .into_iter()
        .filter(|t| {
            t["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("unhealthy"))
        })
        .count();
    assert!(unhealthy >= 1, "{:#?}", ps(&lab, 1, "web"));
}

#[test]
fn a_new_leader_carries_on_an_update_and_no_task_runs_twice() {
    let lab = lab3();
    web(&lab, &[]);
    let nodes = json(&lab, 1, &["node", "ls"]);
    let leader = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["leader"] == true)
        .expect("a leader")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let leader_i: usize = leader[1..].parse().unwrap();
    let other = if leader_i == 1 { 2 } else { 1 };
    ok(
        &lab,
        other,
        &[
            "service",
            "update",
            "web",
            "-d",
            "--env-add",
            "V=2",
            "--update-delay",
            "3s",
        ],
    );
    let version = json(&lab, other, &["service", "inspect", "web"])["version"].clone();
    // One task updated, then the leader dies.
    let first = wait_until(Duration::from_secs(20), || {
        current(&lab, other, "web")
            .iter()
            .any(|t| t["spec_version"] == version && t["state"] == "running")
    });
    assert!(first.is_some());
    lab.kill_agent(leader_i, Signal::SIGKILL)
        .expect("kill leader");
    let done = wait_until(Duration::from_secs(60), || {
        let svc = json(&lab, other, &["service", "inspect", "web"]);
        let cur = current(&lab, other, "web");
        svc["update_status"]["state"] == "completed"
            && cur.len() == 3
            && cur
                .iter()
                .all(|t| t["spec_version"] == version && t["state"] == "running")
    });
    assert!(done.is_some(), "{:#?}", ps(&lab, other, "web"));
    let now_leader = json(&lab, other, &["node", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["leader"] == true)
        .map(|n| n["name"].as_str().unwrap().to_string());
    assert!(now_leader.is_some() && now_leader.as_deref() != Some(leader.as_str()));
    // One running task per slot, and every task in at most one container.
    let running: Vec<Value> = ps(&lab, other, "web")
        .into_iter()
        .filter(|t| t["state"] == "running" && t["desired"] == "running")
        .collect();
    let slots: BTreeSet<u64> = running
        .iter()
        .map(|t| t["slot"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, BTreeSet::from([1, 2, 3]), "{running:#?}");
    let mut containers = BTreeMap::<String, usize>::new();
    for i in (1..=3).filter(|&i| i != leader_i) {
        for c in json(&lab, i, &["container", "ls"]).as_array().unwrap() {
            if c["node"] == format!("n{i}") && c["state"] == "running" {
                let name = c["name"].as_str().unwrap();
                let task = name.rsplit('.').next().unwrap().to_string();
                *containers.entry(task).or_default() += 1;
            }
        }
    }
    assert!(containers.values().all(|&n| n == 1), "{containers:?}");
}
