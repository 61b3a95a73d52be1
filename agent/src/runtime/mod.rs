//! This node's containers: build a sandbox (namespace, interfaces, process) around a store
//! reservation, tear it down again, and adopt the ones a previous run of the agent left.
//!
//! The order is always store first, kernel second on the way up, and kernel first, store last on
//! the way down: an address is never handed to a second container while the first still holds
//! it. A failure half-way undoes exactly what that attempt made (`build::Built` records it) and
//! never touches anything it found. Datapath maps are written only by the reconciler: the
//! runtime registers what it plugged and asks for a pass.

mod adopt;
mod attach;
mod build;
pub mod logs;
mod monitor;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netagent_store::Store;
use serde::Serialize;

pub use attach::{AttachRequest, Attachment, CniResult};

use crate::containers::{self, ContainerCreate, ContainerRecord};
use crate::error::{AgentError, Result};
use crate::model::ContainerKind;
use crate::netlink::Netlink;
use crate::reconcile::Reconciler;
use crate::sandbox;

/// How long a container's process gets between SIGTERM and SIGKILL on `rm`.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a service replica stays up after it left the balancer and DNS, before its process
/// is signalled: long enough for every node to have stopped sending it new connections.
const DRAIN: Duration = Duration::from_secs(1);

/// What a task's sandbox has beyond a plain container's.
#[derive(Debug, Clone, Default)]
pub struct SandboxExtras {
    pub env: Vec<(String, String)>,
    pub hostname: Option<String>,
    pub mounts: Vec<sandbox::MountRequest>,
    pub secrets: Vec<sandbox::SecretFile>,
}

/// Node settings the runtime needs.
pub struct RuntimeConfig {
    pub node: String,
    pub netns_prefix: String,
    pub state_dir: PathBuf,
    pub uplink_mtu: u32,
    pub router_mac: [u8; 6],
    /// Logs are rotated past this size (one rotated copy is kept).
    pub log_max_size: u64,
}

pub struct Runtime {
    pub store: Arc<dyn Store>,
    pub node: String,
    pub netlink: Netlink,
    pub reconciler: Arc<Reconciler>,
    pub netns_prefix: String,
    pub state_dir: PathBuf,
    pub uplink_mtu: u32,
    pub router_mac: [u8; 6],
    pub log_max_size: u64,
    pub dns: Arc<crate::dns::Dns>,
    /// Exit codes of processes this agent saw end (`None`: ended, code unknown).
    exits: Mutex<HashMap<String, Option<i32>>>,
    /// The exit monitor of each local container with a live process.
    monitors: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// One lock per attachment id: an ADD the runtime gave up on (it keeps running) and the
    /// DEL that follows take turns instead of interleaving.
    attach_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What `container inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerView {
    pub name: String,
    pub id: String,
    pub kind: ContainerKind,
    pub node: String,
    pub netns: String,
    /// `running`, `exited`, or `unknown` for containers of other nodes (only their agent knows).
    pub state: &'static str,
    pub pid: Option<u32>,
    pub command: Vec<String>,
    pub aliases: Vec<String>,
    pub endpoints: Vec<EndpointView>,
    pub created: String,
    /// Set once the process has ended.
    pub exit: Option<crate::model::ContainerExit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub ifname: String,
    pub ready: bool,
}

impl Runtime {
    pub fn new(
        store: Arc<dyn Store>,
        netlink: Netlink,
        reconciler: Arc<Reconciler>,
        dns: Arc<crate::dns::Dns>,
        config: RuntimeConfig,
    ) -> Self {
        Self {
            store,
            node: config.node,
            netlink,
            reconciler,
            netns_prefix: config.netns_prefix,
            state_dir: config.state_dir,
            uplink_mtu: config.uplink_mtu,
            router_mac: config.router_mac,
            log_max_size: config.log_max_size,
            dns,
            exits: Mutex::new(HashMap::new()),
            monitors: Mutex::new(HashMap::new()),
            attach_locks: Mutex::new(HashMap::new()),
        }
    }

    fn container_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("containers").join(name)
    }

    /// A container's output goes to a log shim: this very binary, run as `--log-shim`.
    fn log_target(&self, dir: &std::path::Path) -> sandbox::LogTarget {
        // The binary on disk may have been replaced since start; /proc/self/exe is still us.
        let exe = std::env::current_exe()
            .ok()
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        sandbox::LogTarget::Shim(vec![
            exe.into_os_string(),
            logs::SHIM_FLAG.into(),
            dir.join(logs::DIR).into_os_string(),
            self.log_max_size.to_string().into(),
        ])
    }

    fn netns_name(&self, container: &str) -> String {
        format!("{}{container}", self.netns_prefix)
    }

    /// `container run`: reserve in the store, then build the sandbox; undo both on failure.
    pub async fn run(self: &Arc<Self>, req: &ContainerCreate) -> Result<ContainerView> {
        self.run_with(req, &SandboxExtras::default()).await
    }

    /// `run`, with what a task adds to its sandbox.
    pub async fn run_with(
        self: &Arc<Self>,
        req: &ContainerCreate,
        extras: &SandboxExtras,
    ) -> Result<ContainerView> {
        // Refused before anything is reserved: a namespace of that name is not ours.
        if let Some(name) = &req.name {
            let ns = self.netns_name(name);
            if sandbox::netns_exists(&ns) {
                return Err(AgentError::Conflict(format!(
                    "network namespace {ns} already exists and is not a container of this \
                     agent; choose another name"
                )));
            }
        }
        crate::capacity::check_container(&self.reconciler.view(), req)?;
        let rec = containers::reserve(
            &*self.store,
            &self.node,
            ContainerKind::Sandbox,
            req,
            |name, _| {
                sandbox::netns_path(&self.netns_name(name))
                    .display()
                    .to_string()
            },
            sandbox::host_ifname_for,
            |i| format!("eth{i}"),
        )
        .await?;
        let mut built = build::Built::default();
        let outcome = self.build_sandbox(&rec, &mut built, extras).await;
        let mut rec = rec;
        let result = match outcome {
            Ok(process) => {
                match containers::set_process(
                    &*self.store,
                    &mut rec,
                    process.pid,
                    process.start_time,
                )
                .await
                {
                    Ok(()) => Ok(process),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(process) => {
                tracing::info!(container = %rec.container.name, pid = process.pid, "container started");
                self.start_monitor(&rec.container.name, process);
                Ok(self.view(&rec))
            }
            Err(e) => {
                tracing::warn!(container = %rec.container.name, error = %e, "container start failed; rolling back");
                self.rollback(&rec, built).await;
                if let Err(re) = containers::release(&*self.store, &rec).await {
                    tracing::error!(container = %rec.container.name, error = %re, "cannot release reservation");
                }
                Err(e)
            }
        }
    }

    fn check_local(&self, rec: &ContainerRecord) -> Result<()> {
        if rec.container.node != self.node {
            return Err(AgentError::BadRequest(format!(
                "container {:?} runs on node {:?}; talk to that node's agent",
                rec.container.name, rec.container.node
            )));
        }
        Ok(())
    }

    /// `container rm`: out of the balancer and DNS, drain, stop the process, remove
    /// interfaces and namespace, free the addresses.
    pub async fn remove(&self, name: &str) -> Result<()> {
        let rec = containers::get(&*self.store, name).await?;
        self.check_local(&rec)?;
        if rec.container.kind != ContainerKind::Sandbox {
            return Err(AgentError::BadRequest(format!(
                "{name:?} is an external attachment; detach it with the attach API"
            )));
        }
        self.teardown(&rec, STOP_GRACE, None).await;
        containers::release(&*self.store, &rec).await?;
        lock(&self.exits).remove(name);
        Ok(())
    }

    /// Stops and removes a task's container: out of the balancer and DNS, a drain, SIGTERM,
    /// SIGKILL after `grace`; its log moves to `keep_logs` for `service logs`.
    pub async fn remove_task_container(
        &self,
        name: &str,
        grace: Duration,
        keep_logs: &std::path::Path,
    ) -> Result<()> {
        let rec = match containers::get(&*self.store, name).await {
            Ok(rec) => rec,
            // The store may be down: what the view knows is enough to stop it.
            Err(AgentError::Unavailable(_)) => self
                .reconciler
                .view()
                .container_record(name)
                .ok_or_else(|| AgentError::NotFound(format!("container {name:?} not found")))?,
            Err(e) => return Err(e),
        };
        self.check_local(&rec)?;
        self.teardown(&rec, grace, Some(keep_logs)).await;
        containers::release(&*self.store, &rec).await?;
        lock(&self.exits).remove(name);
        Ok(())
    }

    /// Where the log of a local container is, if it still runs here.
    pub fn log_dir(&self, container: &str) -> PathBuf {
        self.container_dir(container).join(logs::DIR)
    }

    pub fn state_of(&self, rec: &ContainerRecord) -> &'static str {
        if rec.container.node != self.node {
            return "unknown";
        }
        match (rec.container.pid, rec.container.start_time) {
            (Some(pid), Some(start_time)) => {
                if sandbox::is_alive(&sandbox::ProcessHandle { pid, start_time }) {
                    "running"
                } else {
                    "exited"
                }
            }
            _ if rec.container.kind == ContainerKind::External => "attached",
            _ => "created",
        }
    }

    pub fn view(&self, rec: &ContainerRecord) -> ContainerView {
        let c = &rec.container;
        ContainerView {
            name: c.name.clone(),
            id: c.id.clone(),
            kind: c.kind,
            node: c.node.clone(),
            netns: c.netns.clone(),
            state: self.state_of(rec),
            pid: c.pid,
            command: c.command.clone(),
            aliases: c.aliases.clone(),
            endpoints: rec
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    network: e.network.clone(),
                    ip: e.ip,
                    mac: e.mac.clone(),
                    ifname: e.ifname.clone(),
                    ready: e.ready,
                })
                .collect(),
            created: c.created.clone(),
            exit: c.exit.clone(),
        }
    }

    /// Waits (bounded by `timeout`) for a local container's process to end; `Some(code)` once
    /// it has ended, the code itself `None` when unknown (an earlier agent started it).
    pub async fn wait(&self, name: &str, timeout: Duration) -> Result<Option<Option<i32>>> {
        let rec = containers::get(&*self.store, name).await?;
        self.check_local(&rec)?;
        let (Some(pid), Some(start_time)) = (rec.container.pid, rec.container.start_time) else {
            return Ok(None);
        };
        let p = sandbox::ProcessHandle { pid, start_time };
        let exit = sandbox::wait_exit(&p, timeout)
            .await
            .map_err(internal("waiting for the process"))?;
        let Some(exit) = exit else {
            return Ok(None);
        };
        let known = lock(&self.exits).get(name).copied().flatten();
        let code = exit
            .shell_code()
            .or(known)
            .or(rec.container.exit.and_then(|e| e.code));
        Ok(Some(code))
    }

    /// Up to `max` bytes of a local container's output from logical `offset`.
    pub async fn logs(&self, name: &str, offset: u64, max: usize) -> Result<logs::Chunk> {
        let rec = containers::get(&*self.store, name).await?;
        self.check_local(&rec)?;
        let dir = self.container_dir(name).join(logs::DIR);
        tokio::task::spawn_blocking(move || logs::read(&dir, offset, max))
            .await
            .map_err(internal("reading the log"))?
            .map_err(internal("reading the log"))
    }
}

fn internal<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> AgentError {
    move |e| AgentError::Internal(format!("{what}: {e}"))
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
