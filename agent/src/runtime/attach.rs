//! The CNI-shaped attach of a namespace someone else made, and its detach.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::containers::{self, ContainerCreate};
use crate::error::{AgentError, Result};
use crate::model::ContainerKind;
use crate::netlink::validate_ifname;
use crate::networks;
use crate::runtime::Runtime;
use crate::sandbox;

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

impl Runtime {
    /// Plugs the namespace `req.netns` into an `--attachable` network as `req.ifname`.
    pub async fn attach_external(&self, req: &AttachRequest) -> Result<CniResult> {
        let netns = PathBuf::from(&req.netns);
        check_netns(&netns)?;
        validate_ifname(&req.ifname).map_err(|_| {
            AgentError::BadRequest(format!(
                "invalid interface name {:?}: 1 to 15 characters, no '/', ':' or spaces",
                req.ifname
            ))
        })?;
        let create = ContainerCreate {
            name: Some(req.id.clone()),
            networks: vec![req.network.clone()],
            ..Default::default()
        };
        crate::capacity::check_container(&self.reconciler.view(), &create)?;
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
        if let Err(e) = self.plug_endpoints(&netns, &rec, &mut built).await {
            self.rollback(&rec, built).await;
            let _ = containers::release(&*self.store, &rec).await;
            return Err(e);
        }
        let net = networks::get(&*self.store, &req.network).await?;
        let ep = &rec.endpoints[0];
        Ok(CniResult {
            cni_version: "1.0.0",
            interfaces: vec![serde_json::json!({
                "name": ep.ifname, "mac": ep.mac, "sandbox": req.netns,
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
        self.teardown(&rec, super::STOP_GRACE, None).await;
        containers::release(&*self.store, &rec).await
    }
}
