//! End to end (root): services that run their own tasks, on a three-node lab with etcd:
//! spread and scale, replacement of killed tasks, drain, nodes that go down and come back,
//! global mode, constraints, secrets, logs across nodes, and bad input.

use std::collections::BTreeMap;
use std::time::Duration;

use netlab::{Lab, LabConfig, Signal, StoreKind};

mod common;
use common::tasks::{
    HOSTNAME_SERVER, answers, container_of, create, current, ps, running_per_node, task_pid,
    wait_running,
};
use common::{exec, json, must_fail, ok, wait_until};

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
        &["network", "create", "--subnet", "10.40.0.0/24", "services"],
    );
    lab
}

fn sorted_counts(m: &BTreeMap<String, usize>) -> Vec<usize> {
    let mut v: Vec<usize> = m.values().copied().collect();
    v.sort_unstable();
    v
}

#[test]
fn replicas_spread_answer_round_robin_and_scale_from_the_busiest() {
    let lab = lab3();
    create(
        &lab,
        &[
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "services",
            "-p",
            "8080:80",
            "--",
            "python3",
            "-c",
            HOSTNAME_SERVER,
        ],
    );
    let placed = running_per_node(&lab, 1, "web");
    assert_eq!(
        placed,
        BTreeMap::from([("n1".into(), 1), ("n2".into(), 1), ("n3".into(), 1)])
    );
    // 300 requests through one node's published port: every task answers a third.
    let got = answers(&lab, &format!("{}:8080", lab.node_addr(2)), 300);
    assert_eq!(
        got,
        BTreeMap::from([
            ("web.1".into(), 100),
            ("web.2".into(), 100),
            ("web.3".into(), 100)
        ]),
        "by hostname"
    );
    let ls = json(&lab, 2, &["service", "ls"]);
    assert_eq!(ls[0]["replicas"]["running"], 3);
    assert_eq!(ls[0]["mode"], "replicated");

    ok(&lab, 1, &["service", "scale", "web=5"]);
    let placed = wait_running(&lab, "web", 5, Duration::from_secs(30));
    assert_eq!(sorted_counts(&placed), [1, 2, 2], "{placed:?}");
    let names: Vec<String> = current(&lab, 1, "web")
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["web.1", "web.2", "web.3", "web.4", "web.5"]);

    // Down to 2: the nodes with two lose one first.
    ok(&lab, 1, &["service", "scale", "web=2"]);
    let placed = wait_running(&lab, "web", 2, Duration::from_secs(30));
    assert_eq!(sorted_counts(&placed), [1, 1], "{placed:?}");
    // Stopped ones are history, not running anywhere.
    let stopped = ps(&lab, 1, "web")
        .into_iter()
        .filter(|t| t["reason"] == "scaled down")
        .count();
    assert_eq!(stopped, 3);
    let got = answers(&lab, &format!("{}:8080", lab.node_addr(3)), 20);
    assert_eq!(got.values().sum::<usize>(), 20);
    assert!(!got.contains_key("FAIL"), "{got:?}");
}

#[test]
fn killed_tasks_are_replaced_and_drain_moves_tasks_without_moving_them_back() {
    let lab = lab3();
    create(
        &lab,
        &[
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "services",
            "--restart-delay",
            "500ms",
            "--",
            "sleep",
            "3600",
        ],
    );
    let victim = current(&lab, 1, "web")
        .into_iter()
        .find(|t| t["node"] == "n2")
        .expect("a task on n2");
    let pid = task_pid(&lab, &victim);
    // SAFETY: kill(2) of the task's process (the lab shares the host's pid namespace).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let replaced = wait_until(Duration::from_secs(20), || {
        let tasks = current(&lab, 1, "web");
        tasks.len() == 3
            && tasks.iter().all(|t| t["state"] == "running")
            && tasks.iter().all(|t| t["id"] != victim["id"])
    });
    assert!(
        replaced.is_some(),
        "not replaced: {:#?}",
        ps(&lab, 1, "web")
    );
    let old = ps(&lab, 1, "web")
        .into_iter()
        .find(|t| t["id"] == victim["id"])
        .expect("kept in the history");
    assert_eq!(old["state"], "failed");
    assert_eq!(old["error"], "exit code 137");
    let slot = victim["slot"].clone();
    assert!(
        current(&lab, 1, "web").iter().any(|t| t["slot"] == slot),
        "the new task is in the same slot"
    );

    ok(
        &lab,
        1,
        &["node", "update", "--availability", "drain", "n3"],
    );
    let moved = wait_until(Duration::from_secs(30), || {
        let placed = running_per_node(&lab, 1, "web");
        !placed.contains_key("n3") && placed.values().sum::<usize>() == 3
    });
    assert!(moved.is_some(), "{:#?}", ps(&lab, 1, "web"));
    ok(
        &lab,
        1,
        &["node", "update", "--availability", "active", "n3"],
    );
    std::thread::sleep(Duration::from_secs(3));
    let placed = running_per_node(&lab, 1, "web");
    assert!(!placed.contains_key("n3"), "tasks moved back: {placed:?}");
    assert_eq!(placed.values().sum::<usize>(), 3);
}

#[test]
fn a_lost_node_s_tasks_move_and_come_back_stopped() {
    let lab = lab3();
    create(
        &lab,
        &[
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "services",
            "--",
            "sleep",
            "3600",
        ],
    );
    let on_n3 = current(&lab, 1, "web")
        .into_iter()
        .find(|t| t["node"] == "n3")
        .expect("a task on n3");
    let pid = task_pid(&lab, &on_n3);
    // The agent dies; its task's process keeps running (it is in its own session).
    lab.kill_agent(3, Signal::SIGKILL).expect("kill agent");
    let moved = wait_until(Duration::from_secs(20), || {
        let placed = running_per_node(&lab, 1, "web");
        !placed.contains_key("n3") && placed.values().sum::<usize>() == 3
    });
    assert!(moved.is_some(), "{:#?}", ps(&lab, 1, "web"));
    let after = moved.unwrap();
    assert!(
        after >= Duration::from_secs(2),
        "moved before the lease TTL: {after:?}"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "still running on the cut-off node"
    );
    // The node comes back: it stops the task it no longer owns, and nothing else changes.
    lab.start_agent(3).expect("restart agent");
    let stopped = wait_until(Duration::from_secs(20), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(stopped.is_some(), "the stale task still runs");
    let old = ps(&lab, 1, "web")
        .into_iter()
        .find(|t| t["id"] == on_n3["id"])
        .expect("history");
    assert_eq!(old["state"], "shutdown");
    assert_eq!(old["reason"], "node down");
    let placed = running_per_node(&lab, 1, "web");
    assert_eq!(placed.values().sum::<usize>(), 3);
    assert!(!placed.contains_key("n3"));
}

#[test]
fn global_services_follow_the_nodes_and_constraints_place_tasks() {
    let lab = lab3();
    create(
        &lab,
        &[
            "--name",
            "agentd",
            "--mode",
            "global",
            "--network",
            "services",
            "--",
            "sleep",
            "3600",
        ],
    );
    assert_eq!(
        running_per_node(&lab, 1, "agentd"),
        BTreeMap::from([("n1".into(), 1), ("n2".into(), 1), ("n3".into(), 1)])
    );
    assert_eq!(current(&lab, 1, "agentd")[0]["name"], "agentd.n1");
    ok(
        &lab,
        1,
        &["node", "update", "--availability", "drain", "n2"],
    );
    let gone = wait_until(Duration::from_secs(20), || {
        running_per_node(&lab, 1, "agentd")
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            == ["n1", "n3"]
    });
    assert!(gone.is_some(), "{:#?}", ps(&lab, 1, "agentd"));
    ok(
        &lab,
        1,
        &["node", "update", "--availability", "active", "n2"],
    );
    wait_running(&lab, "agentd", 3, Duration::from_secs(20));
    must_fail(
        &lab,
        1,
        &["service", "scale", "agentd=2"],
        "scale can only be used with replicated mode",
    );

    // Constraints: pending until a node has the label, with a warning up front.
    let out = ok(
        &lab,
        1,
        &[
            "service",
            "create",
            "-d",
            "--name",
            "zoned",
            "--replicas",
            "2",
            "--network",
            "services",
            "--constraint",
            "node.labels.zone==a",
            "--",
            "sleep",
            "3600",
        ],
    );
    assert!(
        out.stderr
            .contains("no node satisfies the constraints node.labels.zone==a"),
        "{}",
        out.stderr
    );
    std::thread::sleep(Duration::from_secs(1));
    let pending = current(&lab, 1, "zoned");
    assert_eq!(pending.len(), 2);
    assert!(
        pending.iter().all(|t| t["state"] == "pending"),
        "{pending:#?}"
    );
    assert!(
        pending[0]["error"]
            .as_str()
            .unwrap()
            .contains("3 not matching node.labels.zone==a")
    );
    ok(&lab, 1, &["node", "update", "--label-add", "zone=a", "n2"]);
    let placed = wait_running(&lab, "zoned", 2, Duration::from_secs(20));
    assert_eq!(placed, BTreeMap::from([("n2".into(), 2)]));
    let n2 = json(&lab, 1, &["node", "inspect", "n2"]);
    assert_eq!(n2["labels"]["zone"], "a");
}

#[test]
fn a_secret_is_readable_in_its_task_and_nowhere_else() {
    let lab = lab3();
    let value = "s3cr3t-value-4bd1e7";
    let file = lab.run_dir().join("db_pass.txt");
    std::fs::write(&file, value).expect("secret file");
    ok(
        &lab,
        1,
        &["secret", "create", "db_pass", &file.display().to_string()],
    );
    std::fs::remove_file(&file).expect("rm secret file");
    must_fail(
        &lab,
        1,
        &[
            "service",
            "create",
            "-d",
            "--name",
            "app",
            "--network",
            "services",
            "--secret",
            "nope",
            "--",
            "sleep",
            "1",
        ],
        "secret \"nope\" not found",
    );
    create(
        &lab,
        &[
            "--name",
            "app",
            "--network",
            "services",
            "--secret",
            "db_pass",
            "--",
            "sleep",
            "3600",
        ],
    );
    let task = current(&lab, 1, "app").remove(0);
    let node: usize = task["node"].as_str().unwrap()[1..].parse().unwrap();
    let read = exec(
        &lab,
        node,
        &container_of(&task),
        &[
            "sh",
            "-c",
            "cat /run/secrets/db_pass; echo; stat -c '%a %U' /run/secrets/db_pass; grep ' /run/secrets ' /proc/self/mounts",
        ],
    );
    let lines: Vec<&str> = read.stdout.lines().collect();
    assert_eq!(lines[0], value, "{}{}", read.stdout, read.stderr);
    assert_eq!(lines[1], "400 root");
    assert!(
        lines[2].contains("tmpfs /run/secrets tmpfs ro"),
        "{}",
        lines[2]
    );
    // Not outside the task: not in the node's /run/secrets, any inspect, any agent's log or
    // state (the saved view included).
    let outside = std::fs::read_dir("/run/secrets")
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(outside, 0, "files in the node's own /run/secrets");
    for args in [
        vec!["secret", "inspect", "db_pass"],
        vec!["secret", "ls"],
        vec!["service", "inspect", "app"],
        vec!["service", "ps", "app"],
    ] {
        let mut argv = vec!["--format", "json"];
        argv.extend(args.iter().copied());
        let out = ok(&lab, 1, &argv);
        assert!(!out.stdout.contains(value), "{args:?} shows the value");
    }
    for n in 1..=3 {
        assert!(!lab.agent_log(n).contains(value), "in n{n}'s log");
        let grep = std::process::Command::new("grep")
            .args(["-r", "-l", value])
            .arg(lab.state_dir(n))
            .output()
            .expect("grep");
        assert!(
            grep.stdout.is_empty(),
            "on disk: {}",
            String::from_utf8_lossy(&grep.stdout)
        );
    }
    must_fail(
        &lab,
        1,
        &["secret", "rm", "db_pass"],
        "in use by service \"app\"",
    );
    ok(&lab, 1, &["service", "rm", "app"]);
    ok(&lab, 1, &["secret", "rm", "db_pass"]);
}

#[test]
fn logs_of_every_task_come_through_any_node_prefixed() {
    let lab = lab3();
    create(
        &lab,
        &[
            "--name",
            "talk",
            "--replicas",
            "3",
            "--network",
            "services",
            "--",
            "sh",
            "-c",
            "echo hello from $(hostname); sleep 3600",
        ],
    );
    let want = wait_until(Duration::from_secs(15), || {
        let out = ok(&lab, 2, &["service", "logs", "talk"]).stdout;
        (1..=3).all(|i| out.contains(&format!("| hello from talk.{i}")))
    });
    let out = ok(&lab, 2, &["service", "logs", "talk"]).stdout;
    assert!(want.is_some(), "{out}");
    for line in out.lines() {
        // talk.1.<id>@n1    | hello from talk.1
        let (prefix, text) = line.split_once("    | ").expect("prefixed");
        let slot = &text["hello from talk.".len()..];
        assert!(prefix.starts_with(&format!("talk.{slot}.")), "{line}");
    }
}

#[test]
fn bad_service_input_is_refused_and_changes_nothing() {
    let lab = lab3();
    create(
        &lab,
        &[
            "--name",
            "web",
            "--replicas",
            "2",
            "--network",
            "services",
            "--",
            "sleep",
            "3600",
        ],
    );
    let before = json(&lab, 1, &["service", "inspect", "web"]);
    let base = [
        "service",
        "create",
        "-d",
        "--name",
        "x",
        "--network",
        "services",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v: Vec<&'static str> = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    for (args, expect) in [
        (
            with(&["--replicas", "-1", "--", "sleep", "1"]),
            "unexpected argument '-1'",
        ),
        (
            with(&["--replicas", "100000", "--", "sleep", "1"]),
            "more than 10000",
        ),
        (
            with(&["--replicas", "300", "--", "sleep", "1"]),
            "cannot fit",
        ),
        (with(&["--replicas", "2"]), "no command given"),
        (
            with(&["--update-delay", "2", "--", "sleep", "1"]),
            "--update-delay: invalid duration",
        ),
        (
            with(&["--update-order", "sideways", "--", "x"]),
            "expected stop-first or start-first",
        ),
        (
            with(&["--update-failure-action", "ignore", "--", "x"]),
            "expected pause, continue or rollback",
        ),
        (
            with(&["--restart-condition", "always", "--", "x"]),
            "expected any, on-failure or none",
        ),
        (
            with(&["--mode", "sometimes", "--", "x"]),
            "expected replicated or global",
        ),
        (
            with(&["--constraint", "node.role==manager", "--", "x"]),
            "unknown field",
        ),
        (
            with(&["--mount", "type=volume,source=/a,target=/b", "--", "x"]),
            "expected bind or tmpfs",
        ),
        (
            with(&["--bogus", "--", "x"]),
            "unexpected argument '--bogus'",
        ),
    ] {
        must_fail(&lab, 1, &args, expect);
    }
    must_fail(
        &lab,
        1,
        &["service", "update", "web", "--update-monitor", "soon"],
        "--update-monitor",
    );
    must_fail(
        &lab,
        1,
        &["service", "update", "web", "--env-rm", "NOPE"],
        "--env-rm",
    );
    must_fail(
        &lab,
        1,
        &["service", "scale", "web=-2"],
        "replicas must be a number",
    );
    must_fail(
        &lab,
        1,
        &["service", "scale", "nope=2"],
        "service \"nope\" not found",
    );
    must_fail(&lab, 1, &["service", "rollback", "web"], "no previous spec");
    must_fail(
        &lab,
        1,
        &["node", "update", "--availability", "away", "n1"],
        "invalid availability",
    );
    assert_eq!(json(&lab, 1, &["service", "inspect", "web"]), before);
    assert!(
        lab.netctl(1, ["service", "inspect", "x"])
            .expect("netctl")
            .stderr
            .contains("not found")
    );
}
