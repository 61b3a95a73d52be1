//! `cargo xtask lab up | down | status`: labs by hand, for poking at the
//! product the way the end-to-end tests do.

use anyhow::Result;
use netlab::{Lab, LabConfig, StoreKind};

use crate::cargo;

pub struct UpArgs {
    pub nodes: usize,
    pub prefix: Option<String>,
    pub store: StoreKind,
    pub lease_ttl: u64,
    pub agents: bool,
    pub build: bool,
}

pub fn up(args: UpArgs) -> Result<()> {
    if args.build && args.agents {
        cargo::build(&["--bins"])?;
    }
    let lab = Lab::up(LabConfig {
        nodes: args.nodes,
        prefix: args.prefix,
        store: args.store,
        lease_ttl_secs: args.lease_ttl,
        start_agents: args.agents,
        ..Default::default()
    })?;
    print_lab(&lab);
    // Leave it running: its pids are in its run dir for `lab down`.
    let prefix = lab.detach()?;
    println!("tear down: cargo xtask lab down --prefix {prefix}");
    Ok(())
}

pub fn print_lab(lab: &Lab) {
    let store = match lab.etcd_endpoint() {
        Some(ep) => format!("etcd at {ep}"),
        None => "embedded".to_owned(),
    };
    println!(
        "lab {} is up: {} node(s), store {store}, run dir {}",
        lab.prefix(),
        lab.nodes(),
        lab.run_dir().display()
    );
    for i in 1..=lab.nodes() {
        let agent = match lab.agent_pid(i) {
            Some(pid) => format!("agent pid {pid}"),
            None => "no agent".to_owned(),
        };
        println!(
            "  {:<4} ns {:<14} {:<13} {agent:<16} netctl -H {}",
            lab.node_name(i),
            lab.node_ns(i),
            lab.node_addr(i).to_string(),
            lab.host(i)
        );
    }
    if lab.nodes() > 0 {
        println!(
            "run a command on a node: nsenter --net=/run/netns/{} -- ip addr",
            lab.node_ns(1)
        );
    }
}

pub fn down(prefix: Option<&str>, all: bool) -> Result<()> {
    if all {
        let removed = Lab::down_all()?;
        if removed.is_empty() {
            println!("no labs under {}", netlab::RUN_ROOT);
        } else {
            println!("removed: {}", removed.join(" "));
        }
        return Ok(());
    }
    if let Some(prefix) = prefix {
        Lab::down(prefix)?;
        println!("removed: {prefix}");
    }
    Ok(())
}

pub fn status() -> Result<()> {
    let labs = Lab::status_all()?;
    if labs.is_empty() {
        println!("no labs under {}", netlab::RUN_ROOT);
    }
    for lab in labs {
        println!("{lab}");
    }
    Ok(())
}
