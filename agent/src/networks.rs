//! Network objects in the store: create (with cluster-wide VNI and subnet allocation), list,
//! inspect, remove.
//!
//! Allocation is one store transaction guarded by `keys::NETWORKS_GUARD`: we read the guard's
//! revision, the existing networks, decide, and commit only if the guard has not moved. Two agents
//! creating networks at once therefore serialise in the store, never on a node-local guess.

use netagent_store::{Compare, Op, Store};

use crate::error::{AgentError, Result};
use crate::model::{self, Network, NetworkCreate, keys};

/// Attempts before giving up under heavy contention; each loser re-reads and re-validates.
const MAX_ATTEMPTS: usize = 32;

pub async fn list(store: &dyn Store) -> Result<Vec<Network>> {
    let (kvs, _) = store.list(keys::NETWORKS).await?;
    kvs.iter()
        .map(|kv| serde_json::from_slice(&kv.value).map_err(AgentError::from))
        .collect()
}

pub async fn get(store: &dyn Store, name: &str) -> Result<Network> {
    match store.get(&keys::network(name)).await? {
        Some(kv) => Ok(serde_json::from_slice(&kv.value)?),
        None => Err(AgentError::NotFound(format!("network {name:?} not found"))),
    }
}

/// Checks the network against the nodes: its subnet must not contain a node's address (the
/// node's own traffic would be taken for the overlay's), and an explicit MTU must fit every
/// node's uplink with the encapsulation on top.
async fn check_against_nodes(store: &dyn Store, spec: &model::NetworkSpec) -> Result<()> {
    let (kvs, _) = store.list(keys::NODES).await?;
    let overhead = if spec.encrypted {
        model::VXLAN_OVERHEAD + model::WIREGUARD_OVERHEAD
    } else {
        model::VXLAN_OVERHEAD
    };
    for kv in &kvs {
        let node: model::Node = serde_json::from_slice(&kv.value)?;
        if spec.subnet.contains(&node.address) {
            return Err(AgentError::BadRequest(format!(
                "subnet {} contains the address {} of node {:?}",
                spec.subnet, node.address, node.name
            )));
        }
        if let (Some(mtu), Some(uplink)) = (spec.mtu, node.uplink_mtu)
            && mtu + overhead > uplink
        {
            return Err(AgentError::BadRequest(format!(
                "--opt mtu={mtu} does not fit node {:?}: its uplink MTU is {uplink} and the \
                 encapsulation takes {overhead} bytes (at most mtu={})",
                node.name,
                uplink.saturating_sub(overhead)
            )));
        }
    }
    Ok(())
}

pub async fn create(store: &dyn Store, req: &NetworkCreate) -> Result<Network> {
    let spec = req.validate()?;
    check_against_nodes(store, &spec).await?;
    for attempt in 0..MAX_ATTEMPTS {
        let guard_rev = store
            .get(keys::NETWORKS_GUARD)
            .await?
            .map_or(0, |kv| kv.mod_revision);
        let existing = list(store).await?;
        if existing.iter().any(|n| n.name == spec.name) {
            return Err(AgentError::Conflict(format!(
                "network {:?} already exists",
                spec.name
            )));
        }
        if let Some(other) = model::find_overlap(spec.subnet, &existing) {
            return Err(AgentError::Conflict(format!(
                "subnet {} overlaps network {:?} ({})",
                spec.subnet, other.name, other.subnet
            )));
        }
        let vni = model::lowest_free_vni(existing.iter().map(|n| n.vni))
            .ok_or_else(|| AgentError::Conflict("no free VNI left".into()))?;
        let network = Network {
            name: spec.name.clone(),
            id: model::new_id(),
            driver: "overlay".into(),
            vni,
            subnet: spec.subnet,
            gateway: spec.gateway,
            encrypted: spec.encrypted,
            attachable: spec.attachable,
            internal: spec.internal,
            mtu: spec.mtu,
            labels: spec.labels.clone(),
            created: model::now_rfc3339(),
        };
        let value = serde_json::to_vec(&network)
            .map_err(|e| AgentError::Internal(format!("encoding network: {e}")))?;
        let committed = store
            .txn(
                vec![
                    Compare::mod_revision(keys::NETWORKS_GUARD, guard_rev),
                    Compare::absent(keys::network(&network.name)),
                    Compare::absent(keys::vni(vni)),
                ],
                vec![
                    Op::put(keys::NETWORKS_GUARD, network.id.as_bytes().to_vec()),
                    Op::put(keys::network(&network.name), value),
                    Op::put(keys::vni(vni), network.name.as_bytes().to_vec()),
                ],
            )
            .await?;
        if committed {
            tracing::info!(network = %network.name, vni, subnet = %network.subnet, "network created");
            return Ok(network);
        }
        tracing::debug!(attempt, "network allocation raced another writer; retrying");
    }
    Err(AgentError::Unavailable(
        "network allocation kept conflicting with concurrent changes; try again".into(),
    ))
}

pub async fn remove(store: &dyn Store, name: &str) -> Result<()> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(kv) = store.get(&keys::network(name)).await? else {
            return Err(AgentError::NotFound(format!("network {name:?} not found")));
        };
        let network: Network = serde_json::from_slice(&kv.value)?;
        let (svcs, _) = store.list(keys::SERVICES).await?;
        for kv in &svcs {
            let svc: model::Service = serde_json::from_slice(&kv.value)?;
            if svc.networks.iter().any(|n| n.network == name) {
                return Err(AgentError::Conflict(format!(
                    "network {name:?} is in use by service {:?}; remove the service or its \
                     network first",
                    svc.name
                )));
            }
        }
        let (eps, _) = store.list(&keys::endpoints_of(name)).await?;
        if !eps.is_empty() {
            let users: Vec<&str> = eps
                .iter()
                .filter_map(|kv| kv.key.rsplit('/').next())
                .take(5)
                .collect();
            return Err(AgentError::Conflict(format!(
                "network {name:?} is in use by {} container(s): {}",
                eps.len(),
                users.join(", ")
            )));
        }
        let guard_rev = store
            .get(keys::NETWORKS_GUARD)
            .await?
            .map_or(0, |kv| kv.mod_revision);
        let committed = store
            .txn(
                vec![
                    Compare::mod_revision(keys::NETWORKS_GUARD, guard_rev),
                    Compare::mod_revision(keys::network(name), kv.mod_revision),
                ],
                vec![
                    Op::put(keys::NETWORKS_GUARD, network.id.as_bytes().to_vec()),
                    Op::delete(keys::network(name)),
                    Op::delete(keys::vni(network.vni)),
                ],
            )
            .await?;
        if committed {
            tracing::info!(network = %name, "network removed");
            return Ok(());
        }
    }
    Err(AgentError::Unavailable(
        "network removal kept conflicting with concurrent changes; try again".into(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use netagent_store::embedded::EmbeddedStore;

    use super::*;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        (dir, Arc::new(s))
    }

    fn req(name: &str, subnet: &str) -> NetworkCreate {
        NetworkCreate {
            name: name.into(),
            subnet: subnet.into(),
            ..Default::default()
        }
    }

    async fn snapshot(store: &dyn Store) -> Vec<(String, Vec<u8>)> {
        let (kvs, _) = store.list(keys::ROOT).await.unwrap();
        kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
    }

    #[tokio::test]
    async fn create_get_list_remove() {
        let (_d, s) = store();
        let n = create(&*s, &req("services", "10.10.1.0/24")).await.unwrap();
        assert_eq!(n.vni, model::VNI_MIN);
        assert_eq!(n.gateway.to_string(), "10.10.1.1");
        assert_eq!(get(&*s, "services").await.unwrap(), n);
        let m = create(&*s, &req("other", "10.10.2.0/24")).await.unwrap();
        assert_eq!(m.vni, model::VNI_MIN + 1);
        assert_eq!(list(&*s).await.unwrap().len(), 2);
        remove(&*s, "services").await.unwrap();
        assert!(matches!(
            get(&*s, "services").await,
            Err(AgentError::NotFound(_))
        ));
        // The freed VNI is reused.
        let k = create(&*s, &req("third", "10.10.3.0/24")).await.unwrap();
        assert_eq!(k.vni, model::VNI_MIN);
    }

    #[tokio::test]
    async fn conflicts_change_nothing() {
        let (_d, s) = store();
        create(&*s, &req("services", "10.10.0.0/16")).await.unwrap();
        let before = snapshot(&*s).await;
        let e = create(&*s, &req("services", "10.20.0.0/16"))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "network \"services\" already exists");
        let e = create(&*s, &req("inner", "10.10.5.0/24"))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 10.10.5.0/24 overlaps network \"services\" (10.10.0.0/16)"
        );
        let e = create(&*s, &req("bad", "10.30.0.1/16")).await.unwrap_err();
        assert!(matches!(e, AgentError::BadRequest(_)));
        let e = remove(&*s, "nope").await.unwrap_err();
        assert_eq!(e.to_string(), "network \"nope\" not found");
        assert_eq!(snapshot(&*s).await, before);
    }

    #[tokio::test]
    async fn concurrent_creates_never_share_vni_or_overlap() {
        let (_d, s) = store();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = s.clone();
            // Pairs ask for the same subnet: exactly one of each pair may win.
            let subnet = format!("10.{}.0.0/16", 100 + i / 2);
            tasks.push(tokio::spawn(async move {
                create(&*s, &req(&format!("net{i}"), &subnet)).await
            }));
        }
        let mut vnis = Vec::new();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(n) => {
                    won += 1;
                    vnis.push(n.vni);
                }
                Err(e) => assert!(e.to_string().contains("overlaps"), "{e}"),
            }
        }
        assert_eq!(won, 8);
        vnis.sort_unstable();
        vnis.dedup();
        assert_eq!(vnis.len(), 8, "VNIs must be unique");
    }
}
