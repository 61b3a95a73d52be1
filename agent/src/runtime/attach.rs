//! Attaching a namespace someone else made (a CNI runtime's), checking and listing such
//! attachments, and detaching them.
//!
//! An attachment is a container of kind `External`: the same endpoints, balancing, DNS and
//! isolation as the agent's own, but the namespace and the processes in it belong to the
//! runtime. The agent makes the interface, serves DNS at 127.0.0.11 inside, and on detach
//! removes only what it made.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::containers::{self, ContainerCreate, ContainerRecord};
use crate::error::{AgentError, Result};
use crate::model::{CniIdentity, ContainerKind};
use crate::netlink::{self, Netlink, validate_ifname};
use crate::networks;
use crate::runtime::Runtime;
use crate::sandbox;

/// The nameserver an attached namespace gets (the agent listens there inside it).
pub const NAMESERVER: &str = "127.0.0.11";

/// The CNI-shaped answer of the attach call (CNI 1.0 result; the plugin converts it to the
/// version its caller speaks).
#[derive(Debug, Clone, Serialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: &'static str,
    pub interfaces: Vec<serde_json::Value>,
    pub ips: Vec<serde_json::Value>,
    pub routes: Vec<serde_json::Value>,
    pub dns: serde_json::Value,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// Path of the network namespace (e.g. /proc/PID/ns/net or /run/netns/NAME).
    pub netns: String,
    /// Interface name to create inside it.
    pub ifname: String,
    pub network: String,
    /// Caller's id for the attachment; also its name in the cluster (and in DNS).
    pub id: String,
    /// Makes the attachment a replica of this service.
    #[serde(default)]
    pub service: Option<String>,
    /// More DNS names for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The CNI attachment it is, for CHECK, DEL and GC by container id and interface.
    #[serde(default)]
    pub cni: Option<CniIdentity>,
}

/// One attachment of this node, as `GET /v1/attach` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub id: String,
    pub network: String,
    pub netns: String,
    pub ifname: String,
    pub ip: String,
    pub mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniIdentity>,
}

impl Attachment {
    fn of(r: &ContainerRecord) -> Option<Attachment> {
        let ep = r.endpoints.first()?;
        Some(Attachment {
            id: r.container.name.clone(),
            network: ep.network.clone(),
            netns: r.container.netns.clone(),
            ifname: ep.ifname.clone(),
            ip: ep.ip.to_string(),
            mac: ep.mac.clone(),
            service: r.container.service.clone(),
            cni: r.container.cni.clone(),
        })
    }
}

/// An attachment id's turn; the last one out removes the id's lock from the map.
struct AttachTurn<'a> {
    runtime: &'a Runtime,
    id: String,
    lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for AttachTurn<'_> {
    fn drop(&mut self) {
        let mut locks = super::lock(&self.runtime.attach_locks);
        // Ours, the map's and the guard's: nobody else waits for this id.
        if std::sync::Arc::strong_count(&self.lock) <= 3 {
            locks.remove(&self.id);
        }
    }
}

/// (device, inode) of a namespace file: two paths name the same namespace iff these match.
fn ns_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Refuses a path that is not a network namespace, or is the agent's own (the node's):
/// attaching there would put an overlay interface and routes into the node itself.
fn check_netns(path: &Path) -> Result<()> {
    let shown = path.display();
    if !path.exists() {
        return Err(AgentError::BadRequest(format!(
            "network namespace {shown} does not exist"
        )));
    }
    if !sandbox::is_netns(path) {
        return Err(AgentError::BadRequest(format!(
            "{shown} is not a network namespace (expected /proc/PID/ns/net or /run/netns/NAME)"
        )));
    }
    let own = ns_identity(Path::new("/proc/thread-self/ns/net"))
        .map_err(|e| AgentError::Internal(format!("reading the agent's namespace: {e}")))?;
    let target = ns_identity(path)
        .map_err(|e| AgentError::BadRequest(format!("cannot read {shown}: {e}")))?;
    if own == target {
        return Err(AgentError::BadRequest(format!(
            "{shown} is the node's own network namespace; attach containers, not the node"
        )));
    }
    Ok(())
}

/// Whether an error chain is "address in use": another attachment of the same namespace
/// already serves DNS there.
fn addr_in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
}

impl Runtime {
    /// Holds the attachment `id`'s turn (see `attach_locks`).
    async fn attach_turn(&self, id: &str) -> AttachTurn<'_> {
        let lock = super::lock(&self.attach_locks)
            .entry(id.to_owned())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        AttachTurn {
            runtime: self,
            id: id.to_owned(),
            lock,
            _guard: guard,
        }
    }

    pub async fn attach_external(&self, req: &AttachRequest) -> Result<CniResult> {
        let _turn = self.attach_turn(&req.id).await;
        let netns = PathBuf::from(&req.netns);
        check_netns(&netns)?;
        validate_ifname(&req.ifname).map_err(|_| {
            AgentError::BadRequest(format!(
                "invalid interface name {:?}: 1 to 15 characters, no '/', ':' or spaces",
                req.ifname
            ))
        })?;
        if let Some(cni) = &req.cni
            && cni.ifname != req.ifname
        {
            return Err(AgentError::BadRequest(format!(
                "CNI interface {:?} differs from the interface to create {:?}",
                cni.ifname, req.ifname
            )));
        }
        let create = ContainerCreate {
            name: Some(req.id.clone()),
            networks: vec![req.network.clone()],
            service: req.service.clone(),
            aliases: req.aliases.clone(),
            cni: req.cni.clone(),
            ..Default::default()
        };
        containers::validate(&create, ContainerKind::External)?;
        crate::capacity::check_container(&self.reconciler.view(), &create)?;
        // Read before anything is made, so nothing needs undoing if it fails.
        let net = networks::get(&*self.store, &req.network).await?;
        let ifname = req.ifname.clone();
        let rec = containers::reserve(
            &*self.store,
            &self.node,
            ContainerKind::External,
            &create,
            |_, _| req.netns.clone(),
            sandbox::host_ifname_for,
            |_| ifname.clone(),
        )
        .await?;
        let mut built = super::build::Built::default();
        if let Err(e) = self.plug_external(&netns, &rec, &mut built).await {
            self.rollback(&rec, built).await;
            let _ = containers::release(&*self.store, &rec).await;
            return Err(e);
        }
        let ep = &rec.endpoints[0];
        tracing::info!(id = %req.id, netns = %req.netns, ip = %ep.ip, "attached");
        Ok(CniResult {
            cni_version: "1.0.0",
            // The host side first, as CNI's own main plugins report it: chained plugins
            // (bandwidth) find the host interface there.
            interfaces: vec![
                serde_json::json!({
                    "name": ep.host_ifname, "mac": crate::model::format_mac(self.router_mac),
                }),
                serde_json::json!({
                    "name": ep.ifname, "mac": ep.mac, "sandbox": req.netns,
                }),
            ],
            ips: vec![serde_json::json!({
                "address": format!("{}/{}", ep.ip, net.subnet.prefix_len()),
                "gateway": net.gateway.to_string(),
                "interface": 1,
            })],
            routes: vec![serde_json::json!({ "dst": "0.0.0.0/0", "gw": net.gateway.to_string() })],
            dns: serde_json::json!({ "nameservers": [NAMESERVER] }),
        })
    }

    /// The interface and datapath side (as for the agent's own containers), then DNS inside.
    async fn plug_external(
        &self,
        netns: &Path,
        rec: &ContainerRecord,
        built: &mut super::build::Built,
    ) -> Result<()> {
        self.plug_endpoints(netns, rec, built).await?;
        // 127.0.0.11 exists only while lo is up; runtimes bring it up (CNI's loopback plugin,
        // Podman itself), but not necessarily before us.
        let inside = Netlink::in_netns(netns)
            .map_err(|e| AgentError::Internal(format!("netlink in {}: {e}", netns.display())))?;
        match inside.link_by_name("lo").await {
            Ok(Some(lo)) if !netlink::link_is_up(&lo) => {
                inside
                    .set_link_up(lo.header.index)
                    .await
                    .map_err(|e| AgentError::Internal(format!("setting lo up: {e}")))?;
                built.lo_up(lo.header.index);
            }
            Ok(_) => {}
            Err(e) => return Err(AgentError::Internal(format!("looking up lo: {e}"))),
        }
        let c = &rec.container;
        match self.dns.start(&c.name, netns, &c.networks) {
            Ok(()) => built.dns_started(),
            // One listener per namespace: the first attachment's serves it.
            Err(e) if addr_in_use(&e) => tracing::info!(
                id = %c.name,
                "another attachment already serves DNS in this namespace"
            ),
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "starting DNS in the namespace: {e:#}"
                )));
            }
        }
        Ok(())
    }

    /// Removes an attachment. With `cni`, only if it is that CNI attachment (else NotFound:
    /// an id shared by chance never removes another runtime's attachment).
    pub async fn detach_external(&self, id: &str, cni: Option<&CniIdentity>) -> Result<()> {
        let _turn = self.attach_turn(id).await;
        let rec = containers::get(&*self.store, id).await?;
        // Identity first: a name that belongs to something else (a container, another node's
        // attachment) is not this CNI attachment, and its DEL must succeed, not fail forever.
        if let Some(want) = cni
            && !rec.container.cni.as_ref().is_some_and(|c| c.same(want))
        {
            return Err(AgentError::NotFound(format!(
                "no attachment {id:?} of container {} interface {}",
                want.container_id, want.ifname
            )));
        }
        self.check_local(&rec)?;
        if rec.container.kind != ContainerKind::External {
            return Err(AgentError::BadRequest(format!(
                "{id:?} is a container; remove it with `container rm`"
            )));
        }
        self.teardown(&rec, super::STOP_GRACE, None).await;
        containers::release(&*self.store, &rec).await?;
        tracing::info!(id, "detached");
        Ok(())
    }

    /// This node's attachments.
    pub async fn attachments(&self) -> Result<Vec<Attachment>> {
        Ok(containers::list(&*self.store)
            .await?
            .iter()
            .filter(|r| {
                r.container.node == self.node && r.container.kind == ContainerKind::External
            })
            .filter_map(Attachment::of)
            .collect())
    }

    /// CNI CHECK: the attachment is still what ADD made: the namespace, the interface with
    /// its MAC and address, up, and the endpoint in the datapath. Conflict says what differs.
    pub async fn check_external(&self, id: &str, cni: Option<&CniIdentity>) -> Result<Attachment> {
        let rec = containers::get(&*self.store, id).await?;
        if let Some(want) = cni
            && !rec.container.cni.as_ref().is_some_and(|c| c.same(want))
        {
            return Err(AgentError::NotFound(format!("no such attachment {id:?}")));
        }
        self.check_local(&rec)?;
        let netns = PathBuf::from(&rec.container.netns);
        if !netns.exists() {
            return Err(AgentError::Conflict(format!(
                "{id}: network namespace {} is gone",
                netns.display()
            )));
        }
        check_netns(&netns)?;
        let ep = rec
            .endpoints
            .first()
            .ok_or_else(|| AgentError::Internal(format!("attachment {id:?} has no endpoint")))?;
        let inside = Netlink::in_netns(&netns)
            .map_err(|e| AgentError::Internal(format!("netlink in {}: {e}", netns.display())))?;
        let differs = |what: String| Err(AgentError::Conflict(format!("{id}: {what}")));
        let Some(link) = inside
            .link_by_name(&ep.ifname)
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
        else {
            return differs(format!("interface {} is gone", ep.ifname));
        };
        let mac = netlink::link_mac(&link).map(crate::model::format_mac);
        if mac.as_deref() != Some(ep.mac.as_str()) {
            return differs(format!(
                "interface {} has MAC {}, not {}",
                ep.ifname,
                mac.unwrap_or_default(),
                ep.mac
            ));
        }
        if !netlink::link_is_up(&link) {
            return differs(format!("interface {} is down", ep.ifname));
        }
        let holder = inside
            .interface_with_address(ep.ip)
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        if holder.as_deref() != Some(ep.ifname.as_str()) {
            return differs(format!("address {} is not on {}", ep.ip, ep.ifname));
        }
        if !self.reconciler.has_local_iface(&ep.host_ifname) {
            return differs(format!(
                "the datapath does not serve {} (host side {})",
                ep.ip, ep.host_ifname
            ));
        }
        Attachment::of(&rec)
            .ok_or_else(|| AgentError::Internal(format!("attachment {id:?} has no endpoint")))
    }
}
