//! What is running in each lab, for `cargo xtask lab status`.

use std::fmt;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::Result;

use crate::layout;
use crate::record::{self, Owner, Record};
use crate::teardown;

/// One daemon of a lab.
#[derive(Debug, Clone)]
pub struct ProcStatus {
    pub pid: Option<i32>,
    pub alive: bool,
}

#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub name: String,
    pub namespace: String,
    pub addr: Ipv4Addr,
    pub socket: PathBuf,
    /// The agent's API socket accepts connections.
    pub socket_ready: bool,
    pub agent: ProcStatus,
}

#[derive(Debug, Clone)]
pub struct LabStatus {
    pub prefix: String,
    pub run_dir: PathBuf,
    pub record: Option<Record>,
    pub owner: Option<Owner>,
    pub etcd: Option<ProcStatus>,
    pub nodes: Vec<NodeStatus>,
    pub namespaces: Vec<String>,
}

fn proc_status(run_dir: &std::path::Path, name: &str) -> ProcStatus {
    let pid = record::read_pid(run_dir, name);
    ProcStatus {
        pid,
        alive: pid.is_some_and(|p| record::is_lab_process(run_dir, p)),
    }
}

/// Status of lab `prefix` as read from its run dir and the system.
pub fn status(prefix: &str) -> Result<LabStatus> {
    layout::validate_prefix(prefix)?;
    let run_dir = layout::run_dir(prefix);
    let record = record::read_record(&run_dir)?;
    let owner = record::read_owner(&run_dir)?;
    let etcd = record
        .as_ref()
        .filter(|r| r.store == crate::StoreKind::Etcd)
        .map(|_| proc_status(&run_dir, record::ETCD));
    let nodes = (1..=record.as_ref().map_or(0, |r| r.nodes))
        .map(|i| {
            let socket = layout::socket(prefix, i);
            NodeStatus {
                name: layout::node_name(i),
                namespace: layout::node_ns(prefix, i),
                addr: layout::node_addr(i),
                socket_ready: UnixStream::connect(&socket).is_ok(),
                socket,
                agent: proc_status(&run_dir, &layout::node_name(i)),
            }
        })
        .collect();
    Ok(LabStatus {
        prefix: prefix.to_owned(),
        namespaces: teardown::lab_namespaces(prefix)?,
        run_dir,
        record,
        owner,
        etcd,
        nodes,
    })
}

/// Status of every lab under /run/netlab.
pub fn status_all() -> Result<Vec<LabStatus>> {
    teardown::list_labs()?.iter().map(|p| status(p)).collect()
}

impl fmt::Display for ProcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, self.alive) {
            (Some(pid), true) => write!(f, "pid {pid} alive"),
            (Some(pid), false) => write!(f, "pid {pid} dead"),
            (None, _) => write!(f, "not running"),
        }
    }
}

impl fmt::Display for LabStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let owner = match self.owner {
            Some(Owner::Detached) => "detached".to_owned(),
            Some(o @ Owner::Process { pid, .. }) => {
                format!(
                    "pid {pid} ({})",
                    if o.is_alive() { "alive" } else { "gone: stale" }
                )
            }
            None => "unknown".to_owned(),
        };
        writeln!(
            f,
            "lab {}  run dir {}  owner {owner}",
            self.prefix,
            self.run_dir.display()
        )?;
        if let Some(r) = &self.record {
            writeln!(
                f,
                "  store {}  lease ttl {} s  agents {}",
                r.store,
                r.lease_ttl_secs,
                if r.start_agents {
                    "started"
                } else {
                    "not started"
                }
            )?;
        }
        if let Some(etcd) = &self.etcd {
            writeln!(
                f,
                "  etcd  {}:{}  {etcd}",
                layout::ETCD_ADDR,
                layout::ETCD_PORT
            )?;
        }
        for n in &self.nodes {
            writeln!(
                f,
                "  {:<4} ns {:<14} {:<13} agent {:<16} socket {} ({})",
                n.name,
                n.namespace,
                n.addr.to_string(),
                n.agent.to_string(),
                n.socket.display(),
                if n.socket_ready { "ready" } else { "not ready" }
            )?;
        }
        write!(f, "  namespaces: {}", self.namespaces.join(" "))
    }
}
