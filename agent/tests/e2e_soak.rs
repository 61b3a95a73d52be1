//! End to end (root): 300 container run/rm cycles and 100 service create/rm cycles (each
//! service's task running before it goes) leave the datapath's maps, the agent's file
//! descriptors, the namespaces and the agent's memory where they started.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use netlab::{Lab, LabConfig, StoreKind};

mod common;
use common::{ok, wait_until};

/// Maps whose entries follow containers and services (conntrack follows traffic: none here).
const MAPS: &[&str] = &[
    "ENDPOINTS",
    "NETWORKS",
    "SERVICES",
    "BACKEND_SETS",
    "BACKENDS",
    "RR_CURSORS",
    "PUBLISHED",
    "NODES",
];

#[derive(Debug, PartialEq)]
struct Footprint {
    maps: BTreeMap<&'static str, usize>,
    fds: usize,
    namespaces: usize,
}

fn footprint(lab: &Lab) -> Footprint {
    let maps = MAPS
        .iter()
        .map(|m| {
            let path = lab.bpf_dir(1).join(m);
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(&path)
                .output()
                .expect("bpftool");
            assert!(
                out.status.success(),
                "bpftool {m}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
            (*m, v.as_array().map_or(0, Vec::len))
        })
        .collect();
    let pid = lab.agent_pid(1).expect("agent pid");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let prefix = format!("{}-n1-", lab.prefix());
    let namespaces = std::fs::read_dir("/run/netns")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count();
    Footprint {
        maps,
        fds,
        namespaces,
    }
}

fn rss_kib(lab: &Lab) -> u64 {
    let pid = lab.agent_pid(1).expect("agent pid");
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("VmRSS")
}

fn container_cycle(lab: &Lab, name: &str) {
    ok(
        lab,
        1,
        &[
            "container",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "soak",
            "--",
            "sleep",
            "600",
        ],
    );
    ok(lab, 1, &["container", "rm", name]);
}

fn service_cycle(lab: &Lab, name: &str) {
    ok(
        lab,
        1,
        &[
            "service",
            "create",
            "--name",
            name,
            "--network",
            "soak",
            "--publish",
            "8080:80",
            "--replicas",
            "1",
            "-d",
            "--",
            "sleep",
            "600",
        ],
    );
    // Running (a backend in the maps) before it goes.
    let running = wait_until(Duration::from_secs(10), || {
        lab.netctl(1, ["--format", "json", "service", "ps", name])
            .is_ok_and(|o| o.stdout.contains("\"running\""))
    });
    assert!(running.is_some(), "{name} never ran");
    ok(lab, 1, &["service", "rm", name]);
}

#[test]
fn run_rm_cycles_leave_maps_fds_namespaces_and_memory_as_they_were() {
    let lab = Lab::up(LabConfig {
        nodes: 1,
        store: StoreKind::Embedded,
        ..Default::default()
    })
    .expect("lab up");
    // /22: released addresses stay reserved for 30 s, longer than 250 cycles take.
    ok(
        &lab,
        1,
        &["network", "create", "--subnet", "10.99.0.0/22", "soak"],
    );
    // Warm-up (allocator, lazily opened files), then the baseline.
    for i in 0..5 {
        container_cycle(&lab, &format!("warm{i}"));
        service_cycle(&lab, &format!("warm{i}"));
    }
    let settle = || std::thread::sleep(Duration::from_secs(2));
    settle();
    let before = footprint(&lab);
    let rss_before = rss_kib(&lab);

    let t = Instant::now();
    for i in 0..300 {
        container_cycle(&lab, &format!("c{i}"));
    }
    let containers_took = t.elapsed();
    let t = Instant::now();
    for i in 0..100 {
        service_cycle(&lab, &format!("s{i}"));
    }
    let services_took = t.elapsed();

    let mut after = footprint(&lab);
    // The last removals reach the maps on the next reconcile pass.
    wait_until(Duration::from_secs(15), || {
        after = footprint(&lab);
        after == before
    });
    let rss_after = rss_kib(&lab);
    eprintln!(
        "soak: 300 container cycles in {containers_took:?}, 100 service cycles in \
         {services_took:?}; before {before:?}, RSS {rss_before} KiB; after {after:?}, RSS \
         {rss_after} KiB"
    );
    assert_eq!(after, before);
    // Memory: allocator arenas may keep a little; a leak per cycle would show as megabytes.
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}
