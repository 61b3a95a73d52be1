//! Node objects: registration of this agent's node, its liveness lease, and the node views the
//! API shows.
//!
//! A node record is persistent (name, address, availability) and outlives its agent; liveness is
//! a separate key attached to a lease that the agent refreshes. When the agent dies the lease
//! expires, the key vanishes, and every other agent sees the node go `down`.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use netagent_store::{Compare, LeaseId, Op, Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{AgentError, Result};
use crate::model::{self, Alive, Availability, Node, NodeStatus, keys};

/// What `node ls` / `node inspect` show.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub name: String,
    pub address: Ipv4Addr,
    pub availability: Availability,
    pub status: NodeStatus,
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink_mtu: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reserved_ports: Vec<model::ReservedPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<serde_json::Value>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its agent is the orchestrator (holds the leader key).
    pub leader: bool,
    /// Filled in only by the node's own agent (it alone can read its kernel state).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<serde_json::Value>,
}

/// The node whose agent holds the leader key, if any.
async fn leader(store: &dyn Store) -> Result<Option<String>> {
    Ok(store
        .get(keys::LEADER)
        .await?
        .and_then(|kv| serde_json::from_slice::<crate::orchestrator::LeaderRecord>(&kv.value).ok())
        .map(|l| l.node))
}

pub async fn list(store: &dyn Store) -> Result<Vec<NodeView>> {
    let leader = leader(store).await?;
    let (nodes, _) = store.list(keys::NODES).await?;
    let (alive, _) = store.list(keys::ALIVE).await?;
    let alive: std::collections::BTreeSet<&str> = alive
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::ALIVE))
        .collect();
    nodes
        .iter()
        .map(|kv| {
            let node: Node = serde_json::from_slice(&kv.value)?;
            let status = if alive.contains(node.name.as_str()) {
                NodeStatus::Ready
            } else {
                NodeStatus::Down
            };
            let mut v = view(node, status);
            v.leader = leader.as_deref() == Some(v.name.as_str());
            Ok(v)
        })
        .collect()
}

pub async fn get(store: &dyn Store, name: &str) -> Result<NodeView> {
    let Some(kv) = store.get(&keys::node(name)).await? else {
        return Err(AgentError::NotFound(format!("node {name:?} not found")));
    };
    let node: Node = serde_json::from_slice(&kv.value)?;
    let status = if store.get(&keys::alive(name)).await?.is_some() {
        NodeStatus::Ready
    } else {
        NodeStatus::Down
    };
    let mut v = view(node, status);
    v.leader = leader(store).await?.as_deref() == Some(name);
    Ok(v)
}

fn view(node: Node, status: NodeStatus) -> NodeView {
    NodeView {
        name: node.name,
        address: node.address,
        availability: node.availability,
        status,
        created: node.created,
        uplink_mtu: node.uplink_mtu,
        reserved_ports: node.reserved_ports,
        wireguard: node
            .wireguard
            .map(|w| serde_json::to_value(w).unwrap_or_default()),
        labels: node.labels,
        leader: false,
        datapath: None,
    }
}

/// `node update`: availability and labels, in one compare-and-swap.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeUpdate {
    /// `active` or `drain`.
    #[serde(default)]
    pub availability: Option<String>,
    /// `KEY=VALUE` (or `KEY`, an empty value).
    #[serde(default)]
    pub label_add: Vec<String>,
    #[serde(default)]
    pub label_rm: Vec<String>,
}

pub async fn set_availability(
    store: &dyn Store,
    name: &str,
    availability: Availability,
) -> Result<NodeView> {
    update(
        store,
        name,
        &NodeUpdate {
            availability: Some(
                match availability {
                    Availability::Active => "active",
                    Availability::Drain => "drain",
                }
                .into(),
            ),
            ..Default::default()
        },
    )
    .await
}

pub async fn update(store: &dyn Store, name: &str, req: &NodeUpdate) -> Result<NodeView> {
    let availability: Option<Availability> = match &req.availability {
        Some(a) => Some(a.parse()?),
        None => None,
    };
    if availability.is_none() && req.label_add.is_empty() && req.label_rm.is_empty() {
        return Err(AgentError::BadRequest(
            "nothing to update: give --availability, --label-add or --label-rm".into(),
        ));
    }
    let mut add = Vec::new();
    for l in &req.label_add {
        let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(AgentError::BadRequest(format!(
                "invalid --label-add {l:?}: expected KEY=VALUE"
            )));
        }
        add.push((k.to_string(), v.to_string()));
    }
    for _ in 0..16 {
        let Some(kv) = store.get(&keys::node(name)).await? else {
            return Err(AgentError::NotFound(format!("node {name:?} not found")));
        };
        let old: Node = serde_json::from_slice(&kv.value)?;
        let mut node = old.clone();
        for k in &req.label_rm {
            if node.labels.remove(k).is_none() {
                return Err(AgentError::NotFound(format!(
                    "node {name:?} has no label {k:?}"
                )));
            }
        }
        for (k, v) in &add {
            node.labels.insert(k.clone(), v.clone());
        }
        if let Some(a) = availability {
            node.availability = a;
        }
        if node == old {
            return get(store, name).await;
        }
        let value = serde_json::to_vec(&node)
            .map_err(|e| AgentError::Internal(format!("encoding node: {e}")))?;
        if store
            .compare_and_swap(&keys::node(name), kv.mod_revision, value)
            .await?
        {
            tracing::info!(node = %name, availability = ?node.availability, labels = ?node.labels, "node updated");
            return get(store, name).await;
        }
    }
    Err(AgentError::Unavailable(
        "node update kept conflicting with concurrent changes; try again".into(),
    ))
}

/// What an agent says about its node when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub address: Ipv4Addr,
    pub uplink_mtu: u32,
    pub reserved_ports: Vec<model::ReservedPort>,
    pub wireguard: Option<model::NodeWireguard>,
}

/// Writes (or refreshes) this node's persistent record. Keeps the availability an operator set.
pub async fn register(store: &dyn Store, name: &str, reg: &Registration) -> Result<()> {
    loop {
        let current = store.get(&keys::node(name)).await?;
        let (node, expected) = match &current {
            Some(kv) => {
                let old: Node = serde_json::from_slice(&kv.value)?;
                let mut node = old.clone();
                node.address = reg.address;
                node.uplink_mtu = Some(reg.uplink_mtu);
                node.reserved_ports = reg.reserved_ports.clone();
                node.wireguard = reg.wireguard.clone();
                if node == old {
                    return Ok(());
                }
                (node, kv.mod_revision)
            }
            None => (
                Node {
                    name: name.to_string(),
                    address: reg.address,
                    availability: Availability::Active,
                    created: model::now_rfc3339(),
                    uplink_mtu: Some(reg.uplink_mtu),
                    reserved_ports: reg.reserved_ports.clone(),
                    wireguard: reg.wireguard.clone(),
                    labels: Default::default(),
                },
                0,
            ),
        };
        let value = serde_json::to_vec(&node)
            .map_err(|e| AgentError::Internal(format!("encoding node: {e}")))?;
        if store
            .compare_and_swap(&keys::node(name), expected, value)
            .await?
        {
            tracing::info!(node = %name, address = %reg.address, "node registered");
            return Ok(());
        }
    }
}

/// `node rm`: forgets a node that is down and runs nothing. Every other node drops it from
/// its datapath and its WireGuard peers. A node that comes back registers anew.
pub async fn remove(store: &dyn Store, name: &str) -> Result<()> {
    let Some(kv) = store.get(&keys::node(name)).await? else {
        return Err(AgentError::NotFound(format!("node {name:?} not found")));
    };
    if store.get(&keys::alive(name)).await?.is_some() {
        return Err(AgentError::Conflict(format!(
            "node {name:?} is up; stop its agent (and wait for it to show as down) first"
        )));
    }
    let (eps, _) = store.list(keys::ENDPOINTS).await?;
    let held = eps
        .iter()
        .filter_map(|kv| serde_json::from_slice::<model::Endpoint>(&kv.value).ok())
        .filter(|e| e.node == name)
        .count();
    if held > 0 {
        return Err(AgentError::Conflict(format!(
            "node {name:?} still holds {held} container endpoint(s); remove its containers first"
        )));
    }
    let node: Node = serde_json::from_slice(&kv.value)?;
    let mut ops = vec![Op::delete(keys::node(name))];
    if let Some(wg) = &node.wireguard {
        ops.push(Op::delete(keys::tunnel_addr(wg.tunnel_addr)));
    }
    if !store
        .txn(
            vec![Compare::mod_revision(keys::node(name), kv.mod_revision)],
            ops,
        )
        .await?
    {
        return Err(AgentError::Unavailable(format!(
            "node {name:?} changed while being removed; try again"
        )));
    }
    tracing::info!(node = %name, "node removed");
    Ok(())
}

/// Keeps this node's record as `reg` says, re-registering whenever it changes (the tunnels
/// come up after the first registration, keys rotate) and retrying while the store is down.
pub async fn keep_registered(
    store: Arc<dyn Store>,
    name: String,
    mut reg: watch::Receiver<Registration>,
) {
    loop {
        let current = reg.borrow_and_update().clone();
        let mut delay = Duration::from_millis(200);
        loop {
            match register(&*store, &name, &current).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register node; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        if reg.changed().await.is_err() {
            return;
        }
    }
}

/// Publishes this node's tunnel end (a rotated key) at once, keeping the rest of its record.
pub async fn set_wireguard(store: &dyn Store, name: &str, wg: &model::NodeWireguard) -> Result<()> {
    for _ in 0..16 {
        let Some(kv) = store.get(&keys::node(name)).await? else {
            return Err(AgentError::NotFound(format!("node {name:?} not found")));
        };
        let mut node: Node = serde_json::from_slice(&kv.value)?;
        node.wireguard = Some(wg.clone());
        let value = serde_json::to_vec(&node)
            .map_err(|e| AgentError::Internal(format!("encoding node: {e}")))?;
        if store
            .compare_and_swap(&keys::node(name), kv.mod_revision, value)
            .await?
        {
            return Ok(());
        }
    }
    Err(AgentError::Unavailable(
        "node update kept conflicting with concurrent changes; try again".into(),
    ))
}

/// This node's address on the tunnel devices: the one it holds in the store, else the lowest
/// free one of [`model::TUNNEL_RANGE`], claimed in one transaction so two nodes never share
/// one. `preferred` (the address a previous run used) is taken back if still free or ours.
pub async fn claim_tunnel_addr(
    store: &dyn Store,
    name: &str,
    preferred: Option<Ipv4Addr>,
) -> Result<Ipv4Addr> {
    let (base, len) = model::TUNNEL_RANGE;
    let range = ipnet::Ipv4Net::new(base, len)
        .map_err(|e| AgentError::Internal(format!("tunnel range: {e}")))?;
    for _ in 0..32 {
        let (kvs, _) = store.list(keys::TUNNEL_ADDRS).await?;
        let mut taken = std::collections::BTreeSet::new();
        for kv in &kvs {
            let Some(ip) = kv
                .key
                .strip_prefix(keys::TUNNEL_ADDRS)
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if kv.value == name.as_bytes() {
                return Ok(ip);
            }
            taken.insert(ip);
        }
        let pick = preferred
            .filter(|p| range.contains(p) && !taken.contains(p))
            .or_else(|| range.hosts().find(|ip| !taken.contains(ip)))
            .ok_or_else(|| AgentError::Conflict("no tunnel address left".into()))?;
        if store
            .create(&keys::tunnel_addr(pick), name.as_bytes().to_vec(), None)
            .await?
        {
            return Ok(pick);
        }
    }
    Err(AgentError::Unavailable(
        "tunnel address allocation kept conflicting; try again".into(),
    ))
}

/// Keeps this node's liveness key alive for as long as the agent runs.
///
/// Survives store outages: while the store is unreachable it retries; if the lease expired in
/// the meantime it takes a new one and re-creates the key. `ready` reports whether the node is
/// currently registered as alive.
pub async fn keep_alive_loop(
    store: Arc<dyn Store>,
    name: String,
    ttl: Duration,
    ready: watch::Sender<bool>,
) {
    let alive = Alive {
        pid: std::process::id(),
        started: model::now_rfc3339(),
    };
    let value = serde_json::to_vec(&alive).unwrap_or_default();
    // Refresh three times per TTL so one lost refresh does not kill the node.
    let period = ttl / 3;
    let mut lease: Option<LeaseId> = None;
    loop {
        match lease {
            None => match take_lease(&*store, &name, ttl, &value).await {
                Ok(id) => {
                    tracing::info!(node = %name, lease = id, ttl = ?ttl, "node is alive");
                    lease = Some(id);
                    ready.send_replace(true);
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "cannot register liveness; retrying");
                    ready.send_replace(false);
                }
            },
            Some(id) => match store.keep_alive(id).await {
                Ok(()) => {}
                Err(StoreError::LeaseNotFound(_)) => {
                    tracing::warn!(node = %name, lease = id, "liveness lease expired; taking a new one");
                    lease = None;
                    ready.send_replace(false);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "liveness refresh failed; retrying");
                }
            },
        }
        tokio::time::sleep(period).await;
    }
}

async fn take_lease(store: &dyn Store, name: &str, ttl: Duration, value: &[u8]) -> Result<LeaseId> {
    let id = store.grant_lease(ttl).await?;
    // Replaces a liveness key left by a previous run of this agent (its lease may still run).
    let committed = store
        .txn(
            Vec::<Compare>::new(),
            vec![Op::put_with_lease(keys::alive(name), value.to_vec(), id)],
        )
        .await?;
    if !committed {
        return Err(AgentError::Internal("liveness transaction refused".into()));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use netagent_store::embedded::EmbeddedStore;

    use super::*;

    #[tokio::test]
    async fn register_keeps_availability_and_lease_drives_status() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let reg = |addr: &str| Registration {
            address: addr.parse().unwrap(),
            uplink_mtu: 1500,
            reserved_ports: vec![],
            wireguard: None,
        };
        register(&*s, "n1", &reg("198.18.0.11")).await.unwrap();
        assert_eq!(get(&*s, "n1").await.unwrap().status, NodeStatus::Down);
        set_availability(&*s, "n1", Availability::Drain)
            .await
            .unwrap();
        register(&*s, "n1", &reg("198.18.0.12")).await.unwrap();
        let v = get(&*s, "n1").await.unwrap();
        assert_eq!(v.availability, Availability::Drain);
        assert_eq!(v.address.to_string(), "198.18.0.12");

        let (tx, mut rx) = watch::channel(false);
        let task = tokio::spawn(keep_alive_loop(
            s.clone(),
            "n1".into(),
            Duration::from_secs(2),
            tx,
        ));
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(list(&*s).await.unwrap()[0].status, NodeStatus::Ready);
        // Kept alive well past one TTL.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(get(&*s, "n1").await.unwrap().status, NodeStatus::Ready);
        task.abort();
        let _ = task.await;
        // Without refreshes the lease runs out and the node goes down.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        loop {
            if get(&*s, "n1").await.unwrap().status == NodeStatus::Down {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node never went down"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(matches!(
            set_availability(&*s, "nope", Availability::Active).await,
            Err(AgentError::NotFound(_))
        ));
    }
}
