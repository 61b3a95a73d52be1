//! This node's containers: build a sandbox (namespace, interfaces, process) around a store
//! reservation, tear it down again, and adopt the ones a previous run of the agent left.
//!
//! The order is always store first, kernel second on the way up, and kernel first, store last on
//! the way down: an address is never handed to a second container while the first still holds
//! it, and a failure half-way rolls back what was made.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netagent_datapath::Datapath;
use netagent_store::Store;
use serde::Serialize;

use crate::containers::{self, ContainerCreate, ContainerRecord};
use crate::error::{AgentError, Result};
use crate::model::{self, ContainerKind, Endpoint, Network};
use crate::netlink::Netlink;
use crate::networks;
use crate::reconcile as datapath_sync;
use crate::sandbox;

/// How long a container's process gets between SIGTERM and SIGKILL on `rm`.
const STOP_GRACE: Duration = Duration::from_secs(3);

pub struct Runtime {
    pub store: Arc<dyn Store>,
    pub node: String,
    pub netlink: Netlink,
    pub datapath: Arc<Mutex<Datapath>>,
    pub netns_prefix: String,
    pub state_dir: PathBuf,
    pub uplink_mtu: u32,
    pub router_mac: [u8; 6],
    pub dns: Arc<crate::dns::Dns>,
    /// Exit codes of processes this agent started and saw end.
    exits: Mutex<HashMap<String, i32>>,
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
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub ifname: String,
}

/// The CNI-shaped answer of the attach call.
#[derive(Debug, Clone, Serialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: &'static str,
    pub interfaces: Vec<serde_json::Value>,
    pub ips: Vec<serde_json::Value>,
    pub routes: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// Path of the network namespace (e.g. /proc/PID/ns/net or /run/netns/NAME).
    pub netns: String,
    /// Interface name to create inside it.
    pub ifname: String,
    pub network: String,
    /// Caller's id for the attachment (CNI's container id); also its name in the cluster.
    pub id: String,
}

impl Runtime {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        node: String,
        netlink: Netlink,
        datapath: Arc<Mutex<Datapath>>,
        netns_prefix: String,
        state_dir: PathBuf,
        uplink_mtu: u32,
        router_mac: [u8; 6],
        dns: Arc<crate::dns::Dns>,
    ) -> Self {
        Self {
            store,
            node,
            netlink,
            datapath,
            netns_prefix,
            state_dir,
            uplink_mtu,
            router_mac,
            dns,
            exits: Mutex::new(HashMap::new()),
        }
    }

    fn container_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("containers").join(name)
    }

    fn netns_name(&self, container: &str) -> String {
        format!("{}{container}", self.netns_prefix)
    }

    /// `container run`: reserve in the store, then build the sandbox; undo both on failure.
    pub async fn run(&self, req: &ContainerCreate) -> Result<ContainerView> {
        let mut rec = containers::reserve(
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
        )
        .await?;
        match self.build_sandbox(&rec).await {
            Ok(process) => {
                tracing::info!(container = %rec.container.name, pid = process.pid, "container started");
                if let Err(e) =
                    containers::set_process(&*self.store, &mut rec, process.pid, process.start_time)
                        .await
                {
                    self.teardown(&rec).await;
                    let _ = containers::release(&*self.store, &rec).await;
                    return Err(e);
                }
                Ok(self.view(&rec))
            }
            Err(e) => {
                tracing::warn!(container = %rec.container.name, error = %e, "container start failed; rolling back");
                self.teardown(&rec).await;
                if let Err(re) = containers::release(&*self.store, &rec).await {
                    tracing::error!(container = %rec.container.name, error = %re, "cannot release reservation");
                }
                Err(e)
            }
        }
    }

    async fn build_sandbox(&self, rec: &ContainerRecord) -> Result<sandbox::ProcessHandle> {
        let c = &rec.container;
        let ns_name = self.netns_name(&c.name);
        let netns =
            sandbox::create_netns(&ns_name).map_err(internal("creating network namespace"))?;
        self.plug_endpoints(&netns, &rec.endpoints).await?;
        let dir = self.container_dir(&c.name);
        std::fs::create_dir_all(&dir).map_err(internal("creating container state dir"))?;
        let resolv = dir.join("resolv.conf");
        // The embedded DNS answers at 127.0.0.11 inside every container; ndots:0 keeps bare
        // service names from being tried against search domains first.
        std::fs::write(&resolv, "nameserver 127.0.0.11\noptions ndots:0\n")
            .map_err(internal("writing resolv.conf"))?;
        self.dns
            .start(&c.name, &netns, &c.networks)
            .map_err(internal("starting the container's DNS"))?;
        let process = sandbox::spawn(&sandbox::SpawnRequest {
            netns: netns.clone(),
            argv: c.command.clone(),
            resolv_conf: Some(resolv),
            log: dir.join("log"),
            env: vec![("NETAGENT_CONTAINER".into(), c.name.clone())],
        })
        .map_err(|e| {
            AgentError::BadRequest(format!("cannot start {:?}: {e}", c.command.join(" ")))
        })?;
        Ok(process)
    }

    /// Creates each endpoint's interface in `netns` and programs the datapath for it.
    async fn plug_endpoints(&self, netns: &Path, endpoints: &[Endpoint]) -> Result<()> {
        for (i, ep) in endpoints.iter().enumerate() {
            let net = networks::get(&*self.store, &ep.network).await?;
            let mac = model::parse_mac(&ep.mac)
                .ok_or_else(|| AgentError::Internal(format!("bad MAC {} in store", ep.mac)))?;
            let attached = sandbox::attach(
                &self.netlink,
                &sandbox::AttachRequest {
                    netns: netns.to_path_buf(),
                    host_ifname: ep.host_ifname.clone(),
                    ifname: ep.ifname.clone(),
                    address: ep.ip,
                    prefix_len: net.subnet.prefix_len(),
                    gateway: net.gateway,
                    mtu: net.effective_mtu(self.uplink_mtu),
                    mac,
                    router_mac: self.router_mac,
                    default_route: i == 0,
                },
            )
            .await
            .map_err(internal("creating the container interface"))?;
            self.program_local(&net, ep, attached.host_ifindex, mac)?;
        }
        Ok(())
    }

    fn program_local(
        &self,
        net: &Network,
        ep: &Endpoint,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<()> {
        let mut dp = lock(&self.datapath);
        dp.attach_from_container(&ep.host_ifname)
            .map_err(internal("attaching from_container"))?;
        datapath_sync::upsert_network(&mut dp, net).map_err(internal("programming network"))?;
        datapath_sync::upsert_local_endpoint(&mut dp, ep.ip, net.vni, ifindex, mac)
            .map_err(internal("programming endpoint"))?;
        Ok(())
    }

    /// Removes everything the kernel holds for the container; tolerant of parts already gone.
    async fn teardown(&self, rec: &ContainerRecord) {
        let c = &rec.container;
        // The listener's sockets hold the namespace; close them first.
        self.dns.stop(&c.name).await;
        if let (Some(pid), Some(start_time)) = (c.pid, c.start_time) {
            let p = sandbox::ProcessHandle { pid, start_time };
            if let Err(e) = sandbox::stop(&p, STOP_GRACE).await {
                tracing::warn!(container = %c.name, error = %e, "stopping process");
            }
        }
        // Whatever the main process left running in the namespace goes with it. Only for our
        // own sandboxes: an external namespace's processes belong to whoever made it.
        if c.kind == ContainerKind::Sandbox {
            match sandbox::kill_namespace_processes(Path::new(&c.netns)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(container = %c.name, n, "killed leftover processes"),
                Err(e) => tracing::debug!(container = %c.name, error = %e, "no namespace to sweep"),
            }
        }
        for ep in &rec.endpoints {
            {
                let mut dp = lock(&self.datapath);
                if let Err(e) = dp.remove_endpoint(ep.ip) {
                    tracing::warn!(ip = %ep.ip, error = %e, "removing endpoint from datapath");
                }
                if let Err(e) = dp.detach_from_container(&ep.host_ifname) {
                    tracing::warn!(ifname = %ep.host_ifname, error = %e, "detaching from_container");
                }
            }
            if let Err(e) = sandbox::detach(&self.netlink, &ep.host_ifname).await {
                tracing::warn!(ifname = %ep.host_ifname, error = %e, "deleting veth");
            }
        }
        if c.kind == ContainerKind::Sandbox {
            if let Err(e) = sandbox::delete_netns(&self.netns_name(&c.name)) {
                tracing::warn!(container = %c.name, error = %e, "deleting namespace");
            }
            let _ = std::fs::remove_dir_all(self.container_dir(&c.name));
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

    /// `container rm`: stop the process, remove interfaces and namespace, free the addresses.
    pub async fn remove(&self, name: &str) -> Result<()> {
        let rec = containers::get(&*self.store, name).await?;
        self.check_local(&rec)?;
        if rec.container.kind != ContainerKind::Sandbox {
            return Err(AgentError::BadRequest(format!(
                "{name:?} is an external attachment; detach it with the attach API"
            )));
        }
        self.teardown(&rec).await;
        containers::release(&*self.store, &rec).await?;
        lock(&self.exits).remove(name);
        Ok(())
    }

    /// The CNI-shaped attach of a namespace someone else made.
    pub async fn attach_external(&self, req: &AttachRequest) -> Result<CniResult> {
        let netns = PathBuf::from(&req.netns);
        if !netns.exists() {
            return Err(AgentError::BadRequest(format!(
                "network namespace {} does not exist",
                req.netns
            )));
        }
        if req.ifname.is_empty() || req.ifname.len() > 15 {
            return Err(AgentError::BadRequest(format!(
                "invalid interface name {:?}: 1 to 15 characters",
                req.ifname
            )));
        }
        let create = ContainerCreate {
            name: Some(req.id.clone()),
            networks: vec![req.network.clone()],
            ..Default::default()
        };
        let mut rec = containers::reserve(
            &*self.store,
            &self.node,
            ContainerKind::External,
            &create,
            |_, _| req.netns.clone(),
            sandbox::host_ifname_for,
        )
        .await?;
        rec.endpoints[0].ifname = req.ifname.clone();
        if let Err(e) = self.plug_endpoints(&netns, &rec.endpoints).await {
            self.teardown(&rec).await;
            let _ = containers::release(&*self.store, &rec).await;
            return Err(e);
        }
        let net = networks::get(&*self.store, &req.network).await?;
        let ep = &rec.endpoints[0];
        Ok(CniResult {
            cni_version: "1.0.0",
            interfaces: vec![serde_json::json!({
                "name": req.ifname, "mac": ep.mac, "sandbox": req.netns,
            })],
            ips: vec![serde_json::json!({
                "address": format!("{}/{}", ep.ip, net.subnet.prefix_len()),
                "gateway": net.gateway.to_string(),
                "interface": 0,
            })],
            routes: vec![serde_json::json!({ "dst": "0.0.0.0/0", "gw": net.gateway.to_string() })],
        })
    }

    pub async fn detach_external(&self, id: &str) -> Result<()> {
        let rec = containers::get(&*self.store, id).await?;
        self.check_local(&rec)?;
        if rec.container.kind != ContainerKind::External {
            return Err(AgentError::BadRequest(format!(
                "{id:?} is a container; remove it with `container rm`"
            )));
        }
        self.teardown(&rec).await;
        containers::release(&*self.store, &rec).await
    }

    /// Re-takes this node's containers after an agent restart: nothing is recreated; programs
    /// are re-attached (atomically replacing the old ones) and exits are noticed.
    pub async fn adopt(&self) -> Result<usize> {
        let mut adopted = 0;
        for rec in containers::list(&*self.store).await? {
            if rec.container.node != self.node {
                continue;
            }
            for ep in &rec.endpoints {
                let Ok(net) = networks::get(&*self.store, &ep.network).await else {
                    continue;
                };
                match self.netlink.link_index(&ep.host_ifname).await {
                    Ok(Some(ifindex)) => {
                        let mac = model::parse_mac(&ep.mac).unwrap_or(model::endpoint_mac(ep.ip));
                        if let Err(e) = self.program_local(&net, ep, ifindex, mac) {
                            tracing::warn!(container = %rec.container.name, error = %e, "re-programming endpoint");
                        }
                    }
                    Ok(None) => tracing::warn!(
                        container = %rec.container.name,
                        ifname = %ep.host_ifname,
                        "interface missing; the container has lost its network"
                    ),
                    Err(e) => tracing::warn!(error = %e, "looking up interface"),
                }
            }
            if rec.container.kind == ContainerKind::Sandbox {
                let netns = Path::new(&rec.container.netns);
                if let Err(e) = self
                    .dns
                    .start(&rec.container.name, netns, &rec.container.networks)
                {
                    tracing::warn!(container = %rec.container.name, error = %e, "restarting DNS");
                }
            }
            adopted += 1;
        }
        tracing::info!(adopted, "adopted containers");
        Ok(adopted)
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
                })
                .collect(),
            created: c.created.clone(),
        }
    }

    /// Waits (bounded by `timeout`) for a local container's process to end; its exit code if
    /// this agent started it.
    pub async fn wait(&self, name: &str, timeout: Duration) -> Result<Option<i32>> {
        let rec = containers::get(&*self.store, name).await?;
        self.check_local(&rec)?;
        let (Some(pid), Some(start_time)) = (rec.container.pid, rec.container.start_time) else {
            return Ok(None);
        };
        let p = sandbox::ProcessHandle { pid, start_time };
        let code = sandbox::wait_exit(&p, timeout)
            .await
            .map_err(internal("waiting for the process"))?;
        if let Some(c) = code.and_then(|e| e.shell_code()) {
            lock(&self.exits).insert(name.to_string(), c);
        }
        Ok(lock(&self.exits).get(name).copied())
    }

    pub async fn logs(&self, name: &str) -> Result<String> {
        let rec = containers::get(&*self.store, name).await?;
        self.check_local(&rec)?;
        match std::fs::read(self.container_dir(name).join("log")) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(AgentError::Internal(format!("reading log: {e}"))),
        }
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
