//! Service objects in the store: VIP allocation, published ports, numeric ids, specs, updates.
//!
//! Like networks and containers, every change is one transaction: the service record, one key
//! per published port (so two services can never publish the same port), one IPAM key per VIP
//! (so a VIP is never handed to a container) and one key for the datapath id. A change of the
//! spec is a compare-and-swap on the record; the leader's orchestrator does the rest.

pub mod spec;
pub mod tasks;
mod update;

pub use update::{rollback, update};

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use netagent_store::{Compare, Op, Store};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::model::{
    self, Endpoint, EndpointMode, Network, PortConfig, Protocol, Service, ServiceNetwork, keys,
};

pub(super) const MAX_ATTEMPTS: usize = 32;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCreate {
    pub name: String,
    pub networks: Vec<String>,
    /// Docker short syntax: `PUBLISHED:TARGET[/tcp|/udp]`.
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub endpoint_mode: Option<String>,
    /// Service labels, `KEY=VALUE`.
    #[serde(default)]
    pub labels: Vec<String>,
    /// What the tasks run; none at all: a VIP for hand-made replicas.
    #[serde(default)]
    pub task: spec::TaskFlags,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceUpdate {
    #[serde(default)]
    pub publish_add: Vec<String>,
    /// `PUBLISHED[/proto]`.
    #[serde(default)]
    pub publish_rm: Vec<String>,
    #[serde(default)]
    pub label_add: Vec<String>,
    #[serde(default)]
    pub label_rm: Vec<String>,
    #[serde(default)]
    pub spec: spec::SpecUpdate,
    /// `service update --rollback`: back to the previous spec.
    #[serde(default)]
    pub rollback: bool,
}

impl ServiceUpdate {
    pub fn is_empty(&self) -> bool {
        self.publish_add.is_empty()
            && self.publish_rm.is_empty()
            && self.label_add.is_empty()
            && self.label_rm.is_empty()
            && !self.spec.touches_spec()
            && !self.rollback
    }
}

/// What `service inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub name: String,
    pub id: String,
    pub endpoint_mode: EndpointMode,
    pub vips: Vec<VipView>,
    pub ports: Vec<PortConfig>,
    pub backends: Vec<BackendView>,
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// `replicated`, `global`, or `none` (hand-made replicas only).
    pub mode: &'static str,
    /// Tasks wanted, and running (filled in from the tasks by the API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<tasks::ReplicaCount>,
    pub version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<netagent_orchestrator::ServiceSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_spec: Option<netagent_orchestrator::ServiceSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_status: Option<netagent_orchestrator::UpdateStatus>,
    /// Said once, by create and update: e.g. no node can ever meet the constraints.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VipView {
    pub network: String,
    pub vip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendView {
    pub container: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Takes new connections (running, and healthy if it has a check).
    pub ready: bool,
}

pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| AgentError::Internal(format!("encoding record: {e}")))
}

pub(super) fn parse_ports(specs: &[String]) -> Result<Vec<PortConfig>> {
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for s in specs {
        let p = PortConfig::parse(s)?;
        if !seen.insert((p.protocol, p.published)) {
            return Err(AgentError::BadRequest(format!(
                "port {}/{} is published twice",
                p.published,
                p.protocol.as_str()
            )));
        }
        ports.push(p);
    }
    Ok(ports)
}

pub fn parse_mode(mode: Option<&str>) -> Result<EndpointMode> {
    match mode {
        None | Some("vip") => Ok(EndpointMode::Vip),
        Some("dnsrr") => Ok(EndpointMode::Dnsrr),
        Some(other) => Err(AgentError::BadRequest(format!(
            "invalid --endpoint-mode {other:?}: expected vip or dnsrr"
        ))),
    }
}

/// Refuses ports the cluster itself uses on some node's address (VXLAN, etcd, the agent's
/// listeners): the routing mesh takes a published port over on every node.
pub(super) async fn check_reserved(store: &dyn Store, ports: &[PortConfig]) -> Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    let (kvs, _) = store.list(keys::NODES).await?;
    for kv in &kvs {
        let node: model::Node = serde_json::from_slice(&kv.value)?;
        for p in ports {
            if let Some(r) = node
                .reserved_ports
                .iter()
                .find(|r| r.port == p.published && r.protocol == p.protocol)
            {
                return Err(AgentError::BadRequest(format!(
                    "port {}/{} cannot be published: {} uses it on node {:?} ({})",
                    p.published,
                    p.protocol.as_str(),
                    r.what,
                    node.name,
                    node.address
                )));
            }
        }
    }
    Ok(())
}

/// Adds compares/ops claiming each port for `service`; fails if one is taken by another.
pub(super) async fn claim_ports(
    store: &dyn Store,
    service: &str,
    ports: &[PortConfig],
    compares: &mut Vec<Compare>,
    ops: &mut Vec<Op>,
) -> Result<()> {
    for p in ports {
        let key = keys::port(p.protocol, p.published);
        if let Some(kv) = store.get(&key).await? {
            let owner = String::from_utf8_lossy(&kv.value).into_owned();
            return Err(AgentError::Conflict(format!(
                "port {}/{} is already published by service {owner:?}",
                p.published,
                p.protocol.as_str()
            )));
        }
        compares.push(Compare::absent(key.clone()));
        ops.push(Op::put(key, service.as_bytes().to_vec()));
    }
    Ok(())
}

pub async fn create(store: &dyn Store, req: &ServiceCreate) -> Result<Service> {
    model::validate_name("service", &req.name)?;
    let mode = parse_mode(req.endpoint_mode.as_deref())?;
    let ports = parse_ports(&req.publish)?;
    if mode == EndpointMode::Dnsrr && !ports.is_empty() {
        return Err(AgentError::BadRequest(
            "published ports need --endpoint-mode vip (the routing mesh balances to a VIP's backends)"
                .into(),
        ));
    }
    if req.networks.is_empty() {
        return Err(AgentError::BadRequest(
            "a service needs at least one --network".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for n in &req.networks {
        if !seen.insert(n) {
            return Err(AgentError::BadRequest(format!("network {n:?} given twice")));
        }
    }
    let labels = spec::parse_labels("label", &req.labels)?;
    let spec = spec::from_create(&req.task)?;
    let secret_compares = match &spec {
        Some(sp) => check_secrets(store, &sp.task).await?,
        None => Vec::new(),
    };
    check_reserved(store, &ports).await?;
    for _ in 0..MAX_ATTEMPTS {
        if store.get(&keys::service(&req.name)).await?.is_some() {
            return Err(AgentError::Conflict(format!(
                "service {:?} already exists",
                req.name
            )));
        }
        let mut compares = vec![Compare::absent(keys::service(&req.name))];
        compares.extend(secret_compares.iter().cloned());
        let mut ops = Vec::new();
        claim_ports(store, &req.name, &ports, &mut compares, &mut ops).await?;
        let mut networks = Vec::new();
        for net_name in &req.networks {
            let Some(kv) = store.get(&keys::network(net_name)).await? else {
                return Err(AgentError::NotFound(format!(
                    "network {net_name:?} not found"
                )));
            };
            let net: Network = serde_json::from_slice(&kv.value)?;
            if let Some(sp) = &spec {
                check_room(&net, sp)?;
            }
            let vip = if mode == EndpointMode::Vip {
                let (taken, _) = store.list(&keys::ipam_of(net_name)).await?;
                let used: BTreeSet<Ipv4Addr> = taken
                    .iter()
                    .filter_map(|kv| kv.key.rsplit('/').next()?.parse().ok())
                    .collect();
                let vip =
                    model::lowest_free_ip(net.subnet, net.gateway, &used).ok_or_else(|| {
                        AgentError::Conflict(format!(
                            "network {net_name:?} has no free address left for a VIP"
                        ))
                    })?;
                compares.push(Compare::absent(keys::ipam(net_name, vip)));
                ops.push(Op::put(
                    keys::ipam(net_name, vip),
                    format!("service:{}", req.name).into_bytes(),
                ));
                Some(vip)
            } else {
                None
            };
            // Bumps the network's revision so a concurrent `network rm` fails its compare.
            compares.push(Compare::mod_revision(
                keys::network(net_name),
                kv.mod_revision,
            ));
            ops.push(Op::put(keys::network(net_name), kv.value.clone()));
            networks.push(ServiceNetwork {
                network: net_name.clone(),
                vip,
            });
        }
        let (ids, _) = store.list(keys::SERVICE_IDS).await?;
        let used_ids: BTreeSet<u32> = ids
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next()?.parse().ok())
            .collect();
        // Ids leave 8 bits for the network index of each backend set (reconcile::set_id).
        let num = (1..=crate::capacity::SERVICE_NUM_MAX)
            .find(|n| !used_ids.contains(n))
            .ok_or_else(|| AgentError::Conflict("no free service id".into()))?;
        compares.push(Compare::absent(keys::service_id(num)));
        ops.push(Op::put(keys::service_id(num), req.name.as_bytes().to_vec()));
        let service = Service {
            name: req.name.clone(),
            id: model::new_id(),
            num,
            endpoint_mode: mode,
            networks,
            ports: ports.clone(),
            created: model::now_rfc3339(),
            spec: spec.clone(),
            previous_spec: None,
            version: 1,
            update_status: None,
            labels: labels.clone(),
            updated: None,
        };
        ops.push(Op::put(keys::service(&service.name), encode(&service)?));
        if store.txn(compares, ops).await? {
            tracing::info!(service = %service.name, num, "service created");
            return Ok(service);
        }
    }
    Err(AgentError::Unavailable(
        "service creation kept conflicting with concurrent changes; try again".into(),
    ))
}

pub async fn get(store: &dyn Store, name: &str) -> Result<(Service, i64)> {
    match store.get(&keys::service(name)).await? {
        Some(kv) => Ok((serde_json::from_slice(&kv.value)?, kv.mod_revision)),
        None => Err(AgentError::NotFound(format!("service {name:?} not found"))),
    }
}

pub async fn list(store: &dyn Store) -> Result<Vec<Service>> {
    let (kvs, _) = store.list(keys::SERVICES).await?;
    kvs.iter()
        .map(|kv| serde_json::from_slice(&kv.value).map_err(AgentError::from))
        .collect()
}

pub async fn remove(store: &dyn Store, name: &str) -> Result<()> {
    let (svc, rev) = get(store, name).await?;
    // The VIPs stay taken a while, like a container's addresses (see
    // containers::ADDRESS_QUARANTINE): clients may still have them cached.
    let lease = store
        .grant_lease(crate::containers::ADDRESS_QUARANTINE)
        .await?;
    // Its tasks go with it: the leader deletes them, and their nodes stop them.
    let mut ops = vec![
        Op::delete(keys::service(name)),
        Op::delete(keys::service_id(svc.num)),
        Op::delete(keys::orchestrator(name)),
    ];
    for p in &svc.ports {
        ops.push(Op::delete(keys::port(p.protocol, p.published)));
    }
    for n in &svc.networks {
        if let Some(vip) = n.vip {
            ops.push(Op::put_with_lease(
                keys::ipam(&n.network, vip),
                format!("released:service:{name}").into_bytes(),
                lease,
            ));
        }
    }
    if !store
        .txn(vec![Compare::mod_revision(keys::service(name), rev)], ops)
        .await?
    {
        return Err(AgentError::Unavailable(format!(
            "service {name:?} changed while being removed; try again"
        )));
    }
    tracing::info!(service = %name, "service removed");
    Ok(())
}

/// Refuses more replicas than a network of the service has addresses: they could never run.
pub(super) fn check_room(net: &Network, spec: &netagent_orchestrator::ServiceSpec) -> Result<()> {
    if spec.mode != netagent_orchestrator::Mode::Replicated {
        return Ok(());
    }
    // Network and broadcast addresses, the gateway and the VIP are not for tasks.
    let usable = (1u64 << (32 - net.subnet.prefix_len())).saturating_sub(4);
    if spec.replicas > usable {
        return Err(AgentError::BadRequest(format!(
            "--replicas {} cannot fit: network {:?} ({}) has {usable} addresses for tasks",
            spec.replicas, net.name, net.subnet
        )));
    }
    Ok(())
}

/// Every secret the template names must exist; the compares keep them existing until the
/// service record is written (a concurrent `secret rm` fails or makes this fail).
pub(super) async fn check_secrets(
    store: &dyn Store,
    t: &netagent_orchestrator::TaskTemplate,
) -> Result<Vec<Compare>> {
    let mut compares = Vec::new();
    for s in &t.secrets {
        match store.get(&keys::secret(&s.name)).await? {
            Some(kv) => compares.push(Compare::mod_revision(kv.key, kv.mod_revision)),
            None => {
                return Err(AgentError::NotFound(format!(
                    "secret {:?} not found",
                    s.name
                )));
            }
        }
    }
    Ok(compares)
}

/// The backends a view shows: every replica endpoint of the service on its networks.
pub fn backends(svc: &Service, endpoints: &[Endpoint]) -> Vec<BackendView> {
    let mut out: Vec<BackendView> = endpoints
        .iter()
        .filter(|e| e.service.as_deref() == Some(svc.name.as_str()))
        .filter(|e| svc.networks.iter().any(|n| n.network == e.network))
        .map(|e| BackendView {
            container: e.container.clone(),
            node: e.node.clone(),
            ip: e.ip,
            ready: e.ready,
        })
        .collect();
    out.sort();
    out
}

pub fn view(svc: &Service, endpoints: &[Endpoint]) -> ServiceView {
    ServiceView {
        name: svc.name.clone(),
        id: svc.id.clone(),
        endpoint_mode: svc.endpoint_mode,
        vips: svc
            .networks
            .iter()
            .map(|n| VipView {
                network: n.network.clone(),
                vip: n.vip,
            })
            .collect(),
        ports: svc.ports.clone(),
        backends: backends(svc, endpoints),
        created: svc.created.clone(),
        updated: svc.updated.clone(),
        labels: svc.labels.clone(),
        mode: match &svc.spec {
            None => "none",
            Some(s) if s.mode == netagent_orchestrator::Mode::Global => "global",
            Some(_) => "replicated",
        },
        replicas: None,
        version: svc.version,
        spec: svc.spec.clone(),
        previous_spec: svc.previous_spec.clone(),
        update_status: svc.update_status.clone(),
        warnings: Vec::new(),
    }
}

pub async fn all_endpoints(store: &dyn Store) -> Result<Vec<Endpoint>> {
    let (eps, _) = store.list(keys::ENDPOINTS).await?;
    eps.iter()
        .map(|kv| serde_json::from_slice(&kv.value).map_err(AgentError::from))
        .collect()
}

/// Protocol of a published port as the datapath numbers it (IPPROTO_*).
pub fn ip_proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
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
        networks::create(
            &*s,
            &NetworkCreate {
                name: "services".into(),
                subnet: "10.10.1.0/24".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        (dir, s)
    }

    fn req(name: &str, publish: &[&str]) -> ServiceCreate {
        ServiceCreate {
            name: name.into(),
            networks: vec!["services".into()],
            publish: publish.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    async fn snapshot(s: &dyn Store) -> Vec<(String, Vec<u8>)> {
        let (kvs, _) = s.list(keys::ROOT).await.unwrap();
        kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
    }

    #[tokio::test]
    async fn create_allocates_vip_id_and_ports() {
        let (_d, s) = setup().await;
        let web = create(&*s, &req("web", &["8080:80"])).await.unwrap();
        assert_eq!(web.networks[0].vip, Some("10.10.1.2".parse().unwrap()));
        assert_eq!(web.num, 1);
        let db = create(&*s, &req("db", &["5432:5432", "53:53/udp"]))
            .await
            .unwrap();
        assert_eq!(db.networks[0].vip, Some("10.10.1.3".parse().unwrap()));
        assert_eq!(db.num, 2);
        assert_eq!(list(&*s).await.unwrap().len(), 2);
        remove(&*s, "web").await.unwrap();
        // Port and id are free again; the VIP is held back for a while (clients may still
        // have it cached), so the next service gets the next free address.
        let again = create(&*s, &req("web2", &["8080:80"])).await.unwrap();
        assert_eq!(again.networks[0].vip, Some("10.10.1.4".parse().unwrap()));
        assert_eq!(again.num, 1);
    }

    #[tokio::test]
    async fn bad_requests_change_nothing() {
        let (_d, s) = setup().await;
        create(&*s, &req("web", &["8080:80"])).await.unwrap();
        let before = snapshot(&*s).await;
        let e = create(&*s, &req("other", &["8080:81"])).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "port 8080/tcp is already published by service \"web\""
        );
        let e = create(&*s, &req("web", &["9090:80"])).await.unwrap_err();
        assert_eq!(e.to_string(), "service \"web\" already exists");
        let e = create(&*s, &req("x", &["0:80"])).await.unwrap_err();
        assert!(e.to_string().contains("outside 1-65535"), "{e}");
        let mut r = req("x", &[]);
        r.networks = vec!["nope".into()];
        assert_eq!(
            create(&*s, &r).await.unwrap_err().to_string(),
            "network \"nope\" not found"
        );
        let mut r = req("x", &["9090:80"]);
        r.endpoint_mode = Some("dnsrr".into());
        assert!(
            create(&*s, &r)
                .await
                .unwrap_err()
                .to_string()
                .contains("need --endpoint-mode vip")
        );
        assert_eq!(
            remove(&*s, "nope").await.unwrap_err().to_string(),
            "service \"nope\" not found"
        );
        let e = update(
            &*s,
            "web",
            &ServiceUpdate {
                publish_rm: vec!["9999".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("does not publish 9999/tcp"), "{e}");
        assert_eq!(snapshot(&*s).await, before);
        // The UDP port of the same number is a different port.
        create(&*s, &req("dns", &["8080:53/udp"])).await.unwrap();
    }

    #[tokio::test]
    async fn update_adds_and_removes_ports() {
        let (_d, s) = setup().await;
        create(&*s, &req("web", &["8080:80"])).await.unwrap();
        create(&*s, &req("api", &["9000:9000"])).await.unwrap();
        let up = ServiceUpdate {
            publish_add: vec!["8443:443".into()],
            publish_rm: vec!["8080".into()],
            ..Default::default()
        };
        let svc = update(&*s, "web", &up).await.unwrap();
        assert_eq!(svc.ports, vec![PortConfig::parse("8443:443").unwrap()]);
        assert!(
            s.get(&keys::port(Protocol::Tcp, 8080))
                .await
                .unwrap()
                .is_none()
        );
        let e = update(
            &*s,
            "web",
            &ServiceUpdate {
                publish_add: vec!["9000:80".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("already published by service \"api\""),
            "{e}"
        );
    }

    #[tokio::test]
    async fn dnsrr_has_no_vip() {
        let (_d, s) = setup().await;
        let mut r = req("db", &[]);
        r.endpoint_mode = Some("dnsrr".into());
        let svc = create(&*s, &r).await.unwrap();
        assert_eq!(svc.networks[0].vip, None);
        assert_eq!(svc.endpoint_mode, EndpointMode::Dnsrr);
    }
}
