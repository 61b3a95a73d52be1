//! Containers and their endpoints in the store: address allocation and release.
//!
//! A container's record, its endpoints and their IPAM keys are written and removed in one
//! transaction each, so an address is never both free and used, and other nodes see a
//! container's endpoints appear and vanish at once. The transaction also rewrites each joined
//! network's record unchanged: that bumps its revision, so a concurrent `network rm` (which
//! compares that revision) cannot remove a network while an endpoint is being added to it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use netagent_store::{Compare, Op, Store};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::model::{self, Container, ContainerKind, Endpoint, Network, keys};

const MAX_ATTEMPTS: usize = 32;

/// What `container run` (or the attach call) asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerCreate {
    #[serde(default)]
    pub name: Option<String>,
    pub networks: Vec<String>,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Makes the container a replica (backend) of this service.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    /// The task this container runs (the orchestrator's containers only; not from the API).
    #[serde(skip)]
    pub task: Option<String>,
    /// Endpoints start unready: the container takes traffic only once it is marked ready
    /// (a task that passed its health check). Not from the API.
    #[serde(skip)]
    pub start_unready: bool,
    /// The CNI attachment this is (the attach call only).
    #[serde(skip)]
    pub cni: Option<model::CniIdentity>,
}

/// A container with its endpoints, in network order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecord {
    pub container: Container,
    pub endpoints: Vec<Endpoint>,
    /// Revision of the container key, for compare-and-swap updates.
    pub revision: i64,
}

/// Everything about the request that needs no store.
pub fn validate(req: &ContainerCreate, kind: ContainerKind) -> Result<Option<Ipv4Addr>> {
    if let Some(name) = &req.name {
        model::validate_name("container", name)?;
    }
    if req.networks.is_empty() {
        return Err(AgentError::BadRequest(
            "a container needs at least one --network".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for n in &req.networks {
        if !seen.insert(n) {
            return Err(AgentError::BadRequest(format!("network {n:?} given twice")));
        }
    }
    for a in &req.aliases {
        model::validate_name("alias", a)?;
    }
    if kind == ContainerKind::Sandbox && req.command.is_empty() {
        return Err(AgentError::BadRequest(
            "no command given: netctl container run ... -- CMD [ARGS...]".into(),
        ));
    }
    let ip = match &req.ip {
        None => None,
        Some(s) => {
            if req.networks.len() != 1 {
                return Err(AgentError::BadRequest(
                    "--ip needs exactly one --network".into(),
                ));
            }
            Some(s.parse::<Ipv4Addr>().map_err(|_| {
                AgentError::BadRequest(format!("invalid --ip {s:?}: not an IPv4 address"))
            })?)
        }
    };
    Ok(ip)
}

/// Allocates addresses and writes the container and its endpoints. `netns` and host interface
/// names are decided by the caller from the id given here, before anything exists in the kernel.
pub async fn reserve(
    store: &dyn Store,
    node: &str,
    kind: ContainerKind,
    req: &ContainerCreate,
    netns_for: impl Fn(&str, &str) -> String,
    host_ifname_for: impl Fn(&str) -> String,
    ifname_for: impl Fn(usize) -> String,
) -> Result<ContainerRecord> {
    let requested_ip = validate(req, kind)?;
    let id = model::new_id();
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("c-{}", &id[..8]));
    for _ in 0..MAX_ATTEMPTS {
        if store.get(&keys::container(&name)).await?.is_some() {
            return Err(AgentError::Conflict(format!(
                "container {name:?} already exists"
            )));
        }
        let mut compares = vec![Compare::absent(keys::container(&name))];
        let mut ops = Vec::new();
        let mut endpoints = Vec::new();
        let service = match &req.service {
            None => None,
            Some(svc_name) => {
                let Some(kv) = store.get(&keys::service(svc_name)).await? else {
                    return Err(AgentError::NotFound(format!(
                        "service {svc_name:?} not found"
                    )));
                };
                let svc: model::Service = serde_json::from_slice(&kv.value)?;
                if !svc
                    .networks
                    .iter()
                    .any(|n| req.networks.contains(&n.network))
                {
                    let nets: Vec<&str> = svc.networks.iter().map(|n| n.network.as_str()).collect();
                    return Err(AgentError::BadRequest(format!(
                        "service {svc_name:?} is not on the container's network (it is on {})",
                        nets.join(", ")
                    )));
                }
                // A concurrent `service rm` must not leave a replica of a service that is gone.
                compares.push(Compare::mod_revision(
                    keys::service(svc_name),
                    kv.mod_revision,
                ));
                Some(svc)
            }
        };
        for (i, net_name) in req.networks.iter().enumerate() {
            let Some(kv) = store.get(&keys::network(net_name)).await? else {
                return Err(AgentError::NotFound(format!(
                    "network {net_name:?} not found"
                )));
            };
            let net: Network = serde_json::from_slice(&kv.value)?;
            // Docker's rule: only attachable networks take namespaces the agent did not make.
            if kind == ContainerKind::External && !net.attachable {
                return Err(AgentError::BadRequest(format!(
                    "network {net_name:?} is not attachable (create it with --attachable)"
                )));
            }
            let (taken, _) = store.list(&keys::ipam_of(net_name)).await?;
            let used: BTreeSet<Ipv4Addr> = taken
                .iter()
                .filter_map(|kv| kv.key.rsplit('/').next()?.parse().ok())
                .collect();
            let ip = match requested_ip {
                Some(ip) => {
                    model::validate_requested_ip(&net, ip)?;
                    if used.contains(&ip) {
                        return Err(AgentError::Conflict(format!(
                            "address {ip} is already in use on network {net_name:?}"
                        )));
                    }
                    ip
                }
                None => model::lowest_free_ip(net.subnet, net.gateway, &used).ok_or_else(|| {
                    AgentError::Conflict(format!(
                        "network {net_name:?} has no free address left in {}",
                        net.subnet
                    ))
                })?,
            };
            let ep_id = model::new_id();
            let ep = Endpoint {
                host_ifname: host_ifname_for(&ep_id),
                id: ep_id,
                container: name.clone(),
                network: net_name.clone(),
                ip,
                mac: model::format_mac(model::endpoint_mac(ip)),
                node: node.to_string(),
                ifname: ifname_for(i),
                service: service
                    .as_ref()
                    .filter(|svc| svc.networks.iter().any(|n| &n.network == net_name))
                    .map(|svc| svc.name.clone()),
                aliases: req.aliases.clone(),
                ready: !req.start_unready,
            };
            compares.push(Compare::mod_revision(
                keys::network(net_name),
                kv.mod_revision,
            ));
            compares.push(Compare::absent(keys::ipam(net_name, ip)));
            compares.push(Compare::absent(keys::endpoint(net_name, &name)));
            // Rewriting the network unchanged bumps its revision: see the module comment.
            ops.push(Op::put(keys::network(net_name), kv.value.clone()));
            ops.push(Op::put(keys::ipam(net_name, ip), name.as_bytes().to_vec()));
            ops.push(Op::put(keys::endpoint(net_name, &name), encode(&ep)?));
            endpoints.push(ep);
        }
        let container = Container {
            name: name.clone(),
            id: id.clone(),
            kind,
            node: node.to_string(),
            netns: netns_for(&name, &id),
            networks: req.networks.clone(),
            command: req.command.clone(),
            service: req.service.clone(),
            aliases: req.aliases.clone(),
            pid: None,
            start_time: None,
            created: model::now_rfc3339(),
            exit: None,
            task: req.task.clone(),
            cni: req.cni.clone(),
        };
        ops.push(Op::put(keys::container(&name), encode(&container)?));
        if store.txn(compares, ops).await? {
            tracing::info!(container = %name, ips = ?endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(), "container reserved");
            let revision = store
                .get(&keys::container(&name))
                .await?
                .map_or(0, |kv| kv.mod_revision);
            return Ok(ContainerRecord {
                container,
                endpoints,
                revision,
            });
        }
    }
    Err(AgentError::Unavailable(
        "address allocation kept conflicting with concurrent changes; try again".into(),
    ))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| AgentError::Internal(format!("encoding record: {e}")))
}

pub async fn get(store: &dyn Store, name: &str) -> Result<ContainerRecord> {
    let Some(kv) = store.get(&keys::container(name)).await? else {
        return Err(AgentError::NotFound(format!(
            "container {name:?} not found"
        )));
    };
    let container: Container = serde_json::from_slice(&kv.value)?;
    let mut endpoints = Vec::new();
    for net in &container.networks {
        if let Some(ep) = store.get(&keys::endpoint(net, name)).await? {
            endpoints.push(serde_json::from_slice(&ep.value)?);
        }
    }
    Ok(ContainerRecord {
        container,
        endpoints,
        revision: kv.mod_revision,
    })
}

pub async fn list(store: &dyn Store) -> Result<Vec<ContainerRecord>> {
    let (containers, _) = store.list(keys::CONTAINERS).await?;
    let (eps, _) = store.list(keys::ENDPOINTS).await?;
    let mut endpoints: Vec<Endpoint> = eps
        .iter()
        .map(|kv| serde_json::from_slice(&kv.value))
        .collect::<Result<_, _>>()?;
    containers
        .iter()
        .map(|kv| {
            let container: Container = serde_json::from_slice(&kv.value)?;
            let mut mine: Vec<Endpoint> = Vec::new();
            for net in &container.networks {
                if let Some(pos) = endpoints
                    .iter()
                    .position(|e| e.container == container.name && &e.network == net)
                {
                    mine.push(endpoints.swap_remove(pos));
                }
            }
            Ok(ContainerRecord {
                container,
                endpoints: mine,
                revision: kv.mod_revision,
            })
        })
        .collect()
}

/// Records the container's process once it runs.
pub async fn set_process(
    store: &dyn Store,
    rec: &mut ContainerRecord,
    pid: u32,
    start_time: u64,
) -> Result<()> {
    let mut updated = rec.container.clone();
    updated.pid = Some(pid);
    updated.start_time = Some(start_time);
    let value = encode(&updated)?;
    if !store
        .compare_and_swap(&keys::container(&updated.name), rec.revision, value)
        .await?
    {
        return Err(AgentError::Conflict(format!(
            "container {:?} changed while it was starting",
            updated.name
        )));
    }
    rec.container = updated;
    rec.revision = store
        .get(&keys::container(&rec.container.name))
        .await?
        .map_or(0, |kv| kv.mod_revision);
    Ok(())
}

/// Rewrites the container's endpoints with `ready`, in one transaction.
pub async fn set_ready(store: &dyn Store, name: &str, ready: bool) -> Result<()> {
    update(store, name, |_, endpoints| {
        for ep in endpoints.iter_mut() {
            ep.ready = ready;
        }
    })
    .await
}

/// Records that the container's process ended: its exit, and endpoints no longer ready.
pub async fn record_exit(store: &dyn Store, name: &str, exit: &model::ContainerExit) -> Result<()> {
    update(store, name, |c, endpoints| {
        c.exit = Some(exit.clone());
        for ep in endpoints.iter_mut() {
            ep.ready = false;
        }
    })
    .await
}

/// Read-modify-write of a container and its endpoints, retried on conflicts.
async fn update(
    store: &dyn Store,
    name: &str,
    change: impl Fn(&mut Container, &mut Vec<Endpoint>),
) -> Result<()> {
    for _ in 0..MAX_ATTEMPTS {
        let rec = get(store, name).await?;
        let mut container = rec.container.clone();
        let mut endpoints = rec.endpoints.clone();
        change(&mut container, &mut endpoints);
        let mut compares = vec![Compare::mod_revision(keys::container(name), rec.revision)];
        let mut ops = Vec::new();
        if container != rec.container {
            ops.push(Op::put(keys::container(name), encode(&container)?));
        }
        for (old, new) in rec.endpoints.iter().zip(&endpoints) {
            if old != new {
                let key = keys::endpoint(&new.network, name);
                let Some(kv) = store.get(&key).await? else {
                    continue;
                };
                compares.push(Compare::mod_revision(key.clone(), kv.mod_revision));
                ops.push(Op::put(key, encode(new)?));
            }
        }
        if ops.is_empty() || store.txn(compares, ops).await? {
            return Ok(());
        }
    }
    Err(AgentError::Unavailable(format!(
        "container {name:?} kept changing while being updated; try again"
    )))
}

/// How long a released address stays out of allocation: longer than DNS answers are cached
/// (5 s) and than any node needs to drop the connections it tracked to it, so nothing meant
/// for the old holder reaches the next one.
pub const ADDRESS_QUARANTINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Deletes the container and its endpoints in one transaction. Their addresses stay taken
/// for [`ADDRESS_QUARANTINE`] (their IPAM keys move to a short lease) before they can be
/// handed out again.
pub async fn release(store: &dyn Store, rec: &ContainerRecord) -> Result<()> {
    let name = &rec.container.name;
    let lease = store.grant_lease(ADDRESS_QUARANTINE).await?;
    let mut ops = vec![Op::delete(keys::container(name))];
    for ep in &rec.endpoints {
        ops.push(Op::delete(keys::endpoint(&ep.network, name)));
        ops.push(Op::put_with_lease(
            keys::ipam(&ep.network, ep.ip),
            format!("released:{name}").into_bytes(),
            lease,
        ));
    }
    // No compares: removal must succeed even if the record was updated meanwhile.
    store.txn(Vec::new(), ops).await?;
    tracing::info!(container = %name, "container released");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use netagent_store::embedded::EmbeddedStore;

    use super::*;
    use crate::model::NetworkCreate;
    use crate::networks;

    async fn setup() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        for (name, subnet) in [("services", "10.10.1.0/24"), ("tiny", "10.10.2.0/29")] {
            networks::create(
                &*s,
                &NetworkCreate {
                    name: name.into(),
                    subnet: subnet.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        (dir, s)
    }

    fn req(name: &str, nets: &[&str]) -> ContainerCreate {
        ContainerCreate {
            name: Some(name.into()),
            networks: nets.iter().map(|s| s.to_string()).collect(),
            command: vec!["sleep".into(), "1".into()],
            ..Default::default()
        }
    }

    async fn reserve_on(s: &dyn Store, r: &ContainerCreate) -> Result<ContainerRecord> {
        reserve(
            s,
            "n1",
            ContainerKind::Sandbox,
            r,
            |n, _| format!("/run/netns/{n}"),
            |id| format!("na{}", &id[..12]),
            |i| format!("eth{i}"),
        )
        .await
    }

    #[tokio::test]
    async fn allocates_lowest_free_and_releases() {
        let (_d, s) = setup().await;
        let a = reserve_on(&*s, &req("a", &["services"])).await.unwrap();
        assert_eq!(a.endpoints[0].ip.to_string(), "10.10.1.2");
        assert_eq!(a.endpoints[0].mac, "02:42:0a:0a:01:02");
        let b = reserve_on(&*s, &req("b", &["services", "tiny"]))
            .await
            .unwrap();
        assert_eq!(b.endpoints[0].ip.to_string(), "10.10.1.3");
        assert_eq!(b.endpoints[1].ip.to_string(), "10.10.2.2");
        assert_eq!(b.endpoints[1].ifname, "eth1");
        assert_eq!(get(&*s, "b").await.unwrap(), b);
        assert_eq!(list(&*s).await.unwrap().len(), 2);
        release(&*s, &a).await.unwrap();
        // The released address is held back for a while: the next container gets another.
        let c = reserve_on(&*s, &req("c", &["services"])).await.unwrap();
        assert_eq!(
            c.endpoints[0].ip.to_string(),
            "10.10.1.4",
            "not the fresh release"
        );
        let mut again = req("d", &["services"]);
        again.ip = Some("10.10.1.2".into());
        let e = reserve_on(&*s, &again).await.unwrap_err();
        assert!(e.to_string().contains("10.10.1.2"), "{e}");
    }

    #[tokio::test]
    async fn readiness_and_exit_are_recorded_on_every_endpoint() {
        let (_d, s) = setup().await;
        reserve_on(&*s, &req("a", &["services", "tiny"]))
            .await
            .unwrap();
        assert!(
            get(&*s, "a")
                .await
                .unwrap()
                .endpoints
                .iter()
                .all(|e| e.ready)
        );
        set_ready(&*s, "a", false).await.unwrap();
        assert!(
            get(&*s, "a")
                .await
                .unwrap()
                .endpoints
                .iter()
                .all(|e| !e.ready)
        );
        set_ready(&*s, "a", true).await.unwrap();
        let exit = model::ContainerExit {
            code: Some(3),
            at: model::now_rfc3339(),
        };
        record_exit(&*s, "a", &exit).await.unwrap();
        let rec = get(&*s, "a").await.unwrap();
        assert_eq!(rec.container.exit, Some(exit.clone()));
        assert!(rec.endpoints.iter().all(|e| !e.ready));
        assert!(matches!(
            record_exit(&*s, "nope", &exit).await,
            Err(AgentError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn errors_change_nothing() {
        let (_d, s) = setup().await;
        reserve_on(&*s, &req("a", &["services"])).await.unwrap();
        let (before, _) = s.list(keys::ROOT).await.unwrap();
        let e = reserve_on(&*s, &req("a", &["services"])).await.unwrap_err();
        assert_eq!(e.to_string(), "container \"a\" already exists");
        let e = reserve_on(&*s, &req("x", &["nope"])).await.unwrap_err();
        assert_eq!(e.to_string(), "network \"nope\" not found");
        let mut r = req("x", &["services"]);
        r.ip = Some("10.10.1.2".into());
        let e = reserve_on(&*s, &r).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "address 10.10.1.2 is already in use on network \"services\""
        );
        r.ip = Some("10.99.0.1".into());
        assert!(
            reserve_on(&*s, &r)
                .await
                .unwrap_err()
                .to_string()
                .contains("not inside")
        );
        let mut r = req("x", &["services"]);
        r.command.clear();
        assert!(
            reserve_on(&*s, &r)
                .await
                .unwrap_err()
                .to_string()
                .contains("no command")
        );
        // A /29 holds 5 containers (8 - network - broadcast - gateway).
        for i in 0..5 {
            reserve_on(&*s, &req(&format!("t{i}"), &["tiny"]))
                .await
                .unwrap();
        }
        let (mid, _) = s.list(keys::ROOT).await.unwrap();
        let e = reserve_on(&*s, &req("t5", &["tiny"])).await.unwrap_err();
        assert!(e.to_string().contains("no free address"), "{e}");
        let (after, _) = s.list(keys::ROOT).await.unwrap();
        assert_eq!(mid, after);
        assert!(before.len() < mid.len());
    }

    #[tokio::test]
    async fn network_in_use_cannot_be_removed() {
        let (_d, s) = setup().await;
        let a = reserve_on(&*s, &req("a", &["services"])).await.unwrap();
        let e = networks::remove(&*s, "services").await.unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        release(&*s, &a).await.unwrap();
        networks::remove(&*s, "services").await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_reservations_get_distinct_addresses() {
        let (_d, s) = setup().await;
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(
                    async move { reserve_on(&*s, &req(&format!("c{i}"), &["services"])).await },
                )
            })
            .collect();
        let mut ips = BTreeSet::new();
        for t in tasks {
            ips.insert(t.await.unwrap().unwrap().endpoints[0].ip);
        }
        assert_eq!(ips.len(), 12);
    }
}
