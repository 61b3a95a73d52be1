//! End to end (root): what an operator watches. `--metrics-addr` serves Prometheus metrics that
//! a real Prometheus scrapes and `promtool check metrics` accepts; a crafted drop shows up with
//! its reason in the metric and in `netctl monitor`; `/healthz` turns 503 while etcd is down
//! and 200 again after; balanced traffic shows in the flow, forwarding and map metrics and in
//! `netctl monitor --type trace`.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use netlab::{Lab, LabConfig, StoreKind};

mod common;
use common::{Reaper, ok, sleeper, wait_until};

const METRICS: &str = "127.0.0.1:9580";
const PROMETHEUS: &str = "127.0.0.1:19090";

fn curl(lab: &Lab, path: &str) -> (String, String) {
    let out = lab
        .exec_in_node(
            1,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &format!("http://{METRICS}{path}"),
            ],
        )
        .unwrap();
    let text = out.stdout;
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned())
}

/// The value of the sample line starting with `series` (name and labels), if any.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn prometheus_scrapes_the_agent_and_health_follows_the_store() {
    let lab = Lab::up(LabConfig {
        nodes: 1,
        store: StoreKind::Etcd,
        lease_ttl_secs: 3,
        extra_agent_args: vec![
            "--metrics-addr".into(),
            METRICS.into(),
            "--log-format".into(),
            "json".into(),
        ],
        ..Default::default()
    })
    .expect("lab up");
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.95.0.0/24", "a"],
    );
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.96.0.0/24", "b"],
    );
    for (name, net) in [("x", "a"), ("y", "b")] {
        sleeper(&lab, 1, name, net);
    }

    // DNS from x: its own name (local), y's (another network's: nxdomain).
    for (name, expect) in [("x", "NOERROR"), ("y", "NXDOMAIN")] {
        let out = common::exec(
            &lab,
            1,
            "x",
            &["dig", "+time=2", "+tries=1", "@127.0.0.11", name],
        );
        assert!(out.stdout.contains(expect), "{name}: {}", out.stdout);
    }

    let (code, body) = curl(&lab, "/metrics");
    assert_eq!(code, "200", "{body}");
    assert!(sample(&body, "netagent_dns_queries_total{result=\"local\"}").unwrap() >= 1.0);
    assert!(sample(&body, "netagent_dns_queries_total{result=\"nxdomain\"}").unwrap() >= 1.0);
    assert!(sample(&body, "netagent_dns_query_duration_seconds_count").unwrap() >= 2.0);
    assert!(
        body.contains("netagent_dns_query_duration_seconds_bucket{le=\"0.001\"}"),
        "{body}"
    );
    let isolation = "netagent_datapath_drops_total{reason=\"policy_isolation\"}";
    let before = sample(&body, isolation).expect("drop metric");
    for name in [
        "netagent_conntrack_capacity",
        "netagent_reconcile_passes_total",
        "netagent_reconcile_duration_seconds_total",
        "netagent_store_up 1",
        "netagent_objects{kind=\"networks\"} 2",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    // The view keeps up with etcd: no revision is committed and unseen for long.
    let current = wait_until(Duration::from_secs(5), || {
        sample(
            &curl(&lab, "/metrics").1,
            "netagent_store_watch_lag_revisions",
        ) == Some(0.0)
    });
    assert!(current.is_some(), "the view lags the store:\n{body}");
    // promtool, Prometheus's own linter, accepts the exposition.
    let dir = lab.run_dir().to_path_buf();
    let file = dir.join("metrics.txt");
    std::fs::write(&file, &body).unwrap();
    let check = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // `netctl monitor` follows x's drops.
    let (_monitor, lines) = follow_monitor(&lab, &["--container", "x"]);
    // The stream is open before the drop: the first event of the flood.
    std::thread::sleep(Duration::from_millis(500));

    // A crafted drop: x (network a) pings y (network b).
    let y = common::container_ip(&lab, 1, "y");
    let out = common::exec(&lab, 1, "x", &["ping", "-c", "2", "-W", "1", &y]);
    assert!(!out.success());
    let (_, body) = curl(&lab, "/metrics");
    let after = sample(&body, isolation).unwrap();
    assert!(after >= before + 2.0, "{before} -> {after}");
    let hooked = sample(
        &body,
        "netagent_datapath_hook_drops_total{hook=\"from_container\",reason=\"policy_isolation\"}",
    );
    assert!(hooked.is_some_and(|n| n >= 2.0), "{body}");
    let x = common::container_ip(&lab, 1, "x");
    let event: serde_json::Value = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(5))
            .expect("netctl monitor showed no event");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if v["type"] == "drop" {
            break v;
        }
    };
    assert_eq!(event["reason"], "policy_isolation", "{event}");
    assert_eq!(event["hook"], "from_container");
    assert_eq!(event["proto"], "icmp");
    assert_eq!(
        (event["src"].as_str(), event["dst"].as_str()),
        (Some(x.as_str()), Some(y.as_str()))
    );
    assert_eq!(event["src_container"], "x");
    assert_eq!(event["dst_container"], "y");
    assert_eq!(event["network"], "a");

    // A real Prometheus scrapes it.
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: netagent\n    \
             static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )
    .unwrap();
    let data = dir.join("prometheus-data");
    let _prom = lab
        .spawn_in_node(
            1,
            &[
                "prometheus".to_owned(),
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", data.display()),
                format!("--web.listen-address={PROMETHEUS}"),
            ],
        )
        .unwrap();
    let query = format!(
        "http://{PROMETHEUS}/api/v1/query?query=netagent_datapath_drops_total%7Breason%3D%22policy_isolation%22%7D"
    );
    let mut answer = String::new();
    let scraped = wait_until(Duration::from_secs(30), || {
        answer = lab
            .exec_in_node(1, &["curl", "-sS", "--max-time", "2", &query])
            .map(|o| o.stdout)
            .unwrap_or_default();
        answer.contains("\"policy_isolation\"") && answer.contains("\"success\"")
    });
    assert!(
        scraped.is_some(),
        "Prometheus never had the metric: {answer}"
    );

    // Health follows the store.
    assert_eq!(curl(&lab, "/healthz").0, "200");
    lab.stop_etcd().unwrap();
    let mut last = (String::new(), String::new());
    let down = wait_until(Duration::from_secs(5), || {
        last = curl(&lab, "/healthz");
        last.0 == "503"
    });
    assert!(down.is_some(), "still {last:?} with etcd down");
    assert!(last.1.contains("store"), "{}", last.1);
    let (_, body) = curl(&lab, "/metrics");
    assert!(body.contains("netagent_store_up 0"), "{body}");
    lab.start_etcd().unwrap();
    let up = wait_until(Duration::from_secs(20), || {
        curl(&lab, "/healthz").0 == "200"
    });
    assert!(up.is_some(), "not healthy again after etcd came back");
    let (_, body) = curl(&lab, "/metrics");
    // The outage shows as a resumed watch (the view itself never had to start over).
    let resumed = wait_until(Duration::from_secs(10), || {
        let (_, body) = curl(&lab, "/metrics");
        sample(&body, "netagent_store_watch_reconnects_total").is_some_and(|n| n >= 1.0)
    });
    assert!(resumed.is_some(), "no watch reconnect counted:\n{body}");
    assert!(body.contains("netagent_store_watch_restarts_total"));

    // --log-format json: every line of the agent's log is one JSON object.
    let log = lab.agent_log(1);
    // (The lab marks each agent start with a line of its own.)
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("==== netlab:"))
        .collect();
    assert!(lines.len() > 5, "{log}");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
}

/// Follows `netctl monitor ARGS` on node 1; JSON lines arrive through the channel.
fn follow_monitor(lab: &Lab, args: &[&str]) -> (Reaper, mpsc::Receiver<String>) {
    let mut child = Command::new(common::workspace_bin("netctl"))
        .args(["-H", &lab.socket(1).display().to_string()])
        .args(["--format", "json", "monitor"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Reaper(child), lines)
}

#[test]
fn balanced_traffic_shows_in_flow_forwarding_and_map_metrics_and_in_traces() {
    let lab = Lab::up(LabConfig {
        nodes: 1,
        extra_agent_args: vec!["--metrics-addr".into(), METRICS.into()],
        ..Default::default()
    })
    .expect("lab up");
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.94.0.0/24", "a"],
    );
    ok(
        &lab,
        1,
        &["service", "create", "--name", "web", "--network", "a"],
    );
    for name in ["w1", "w2"] {
        common::http_server(&lab, 1, name, "a", Some("web"));
    }
    sleeper(&lab, 1, "x", "a");
    let vip = common::vip_of(&lab, 1, "web");
    let (_traces, lines) = follow_monitor(&lab, &["--type", "trace", "--container", "x"]);
    std::thread::sleep(Duration::from_millis(500));

    for _ in 0..6 {
        let out = common::exec(
            &lab,
            1,
            "x",
            &["curl", "-sS", "--max-time", "3", &format!("http://{vip}/")],
        );
        assert!(out.success(), "{}", out.stderr);
    }

    let (code, body) = curl(&lab, "/metrics");
    assert_eq!(code, "200", "{body}");
    // Round robin: three new connections to each replica, labelled with its container.
    for name in ["w1", "w2"] {
        let ip = common::container_ip(&lab, 1, name);
        let series = format!(
            "netagent_lb_new_flows_total{{service=\"web\",backend=\"{ip}\",container=\"{name}\"}}"
        );
        assert_eq!(sample(&body, &series), Some(3.0), "{series}:\n{body}");
    }
    let redirected = "{hook=\"from_container\",action=\"redirect\"}";
    let packets = sample(
        &body,
        &format!("netagent_datapath_forwarded_packets_total{redirected}"),
    )
    .expect("forwarded packets");
    let bytes = sample(
        &body,
        &format!("netagent_datapath_forwarded_bytes_total{redirected}"),
    )
    .expect("forwarded bytes");
    // Six connections each way: at least SYN, ACK, request, FIN, ACK from the client and
    // SYN-ACK, response, FIN from the replicas (all leave a veth through from_container).
    assert!(packets >= 6.0 * 8.0, "{packets}");
    assert!(
        bytes >= packets * 54.0,
        "{bytes} bytes in {packets} packets"
    );
    assert_eq!(
        sample(&body, "netagent_map_entries{map=\"ENDPOINTS\"}"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "netagent_map_entries{map=\"SERVICES\"}"),
        Some(1.0)
    );
    assert!(sample(&body, "netagent_map_capacity{map=\"ENDPOINTS\"}").unwrap() >= 1024.0);

    // Traces of x's packets, after the balancer's NAT: to a replica, not the VIP.
    let x = common::container_ip(&lab, 1, "x");
    let replicas = [
        common::container_ip(&lab, 1, "w1"),
        common::container_ip(&lab, 1, "w2"),
    ];
    let trace: serde_json::Value = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(5))
            .expect("netctl monitor --type trace showed nothing");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if v["type"] == "trace" && v["src"] == x.as_str() && v["dst_port"] == 80 {
            break v;
        }
    };
    assert_eq!(trace["hook"], "from_container", "{trace}");
    assert_eq!(trace["action"], "redirect");
    assert_eq!(trace["src_container"], "x");
    assert!(
        replicas.iter().any(|r| trace["dst"] == r.as_str()),
        "{trace}"
    );
    assert!(trace.get("reason").is_none());
}

/// systemd's readiness protocol as a `Type=notify` unit sees it: READY=1 once the API answers,
/// STOPPING=1 on SIGTERM. (No systemd runs here: the test is the service manager's socket.)
#[test]
fn the_agent_tells_its_service_manager_when_it_is_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let lab = Lab::up(LabConfig {
        nodes: 1,
        store: StoreKind::Embedded,
        agent_env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
        ..Default::default()
    })
    .expect("lab up");
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).expect("no READY=1 from the agent");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means ready: the API serves at once.
    common::json(&lab, 1, &["node", "inspect", "n1"]);
    lab.kill_agent(1, netlab::Signal::SIGTERM).unwrap();
    let n = manager
        .recv(&mut buf)
        .expect("no STOPPING=1 from the agent");
    assert_eq!(&buf[..n], b"STOPPING=1");
}
