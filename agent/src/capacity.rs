//! What the datapath's maps can hold, checked before a request is accepted: a network,
//! container or service that could never be installed on the nodes is refused with a clear
//! error instead of being stored and then failing in every node's reconciler.
//!
//! Counted from the watched view, so a burst of concurrent requests can overshoot by a few;
//! the reconciler then reports the entries it cannot write (`node inspect`) and keeps writing
//! everything else.

use netagent_datapath::{
    BACKEND_SETS_MAX_ENTRIES, BACKENDS_PER_SET_MAX, ENDPOINTS_MAX_ENTRIES, NETWORKS_MAX_ENTRIES,
    PUBLISHED_MAX_ENTRIES, SERVICES_MAX_ENTRIES,
};

use crate::containers::ContainerCreate;
use crate::error::{AgentError, Result};
use crate::model::EndpointMode;
use crate::view::ClusterView;

/// Networks one service may join: its backend set ids are `num << 8 | network index`.
pub const SERVICE_NETWORKS_MAX: usize = 256;
/// Service numbers must leave 8 bits for the network index in a 32-bit set id.
pub const SERVICE_NUM_MAX: u32 = (1 << 24) - 1;
/// BACKENDS holds two banks per set; new sets are written into the spare bank first.
const BACKEND_SLOTS_MAX: usize = netagent_datapath::BACKENDS_MAX_ENTRIES as usize / 2;

fn full(what: &str, max: impl std::fmt::Display) -> AgentError {
    AgentError::Conflict(format!(
        "the datapath holds at most {max} {what}; remove some first"
    ))
}

pub fn check_network(view: &ClusterView) -> Result<()> {
    if view.networks.len() + 1 > NETWORKS_MAX_ENTRIES as usize {
        return Err(full("networks", NETWORKS_MAX_ENTRIES));
    }
    Ok(())
}

pub fn check_container(view: &ClusterView, req: &ContainerCreate) -> Result<()> {
    if view.endpoints.len() + req.networks.len() > ENDPOINTS_MAX_ENTRIES as usize {
        return Err(full("container endpoints", ENDPOINTS_MAX_ENTRIES));
    }
    let Some(svc) = req.service.as_ref().and_then(|s| view.services.get(s)) else {
        return Ok(());
    };
    for sn in svc
        .networks
        .iter()
        .filter(|n| req.networks.contains(&n.network))
    {
        let replicas = view
            .endpoints
            .values()
            .filter(|e| e.service.as_deref() == Some(&svc.name) && e.network == sn.network)
            .count();
        if replicas + 1 > BACKENDS_PER_SET_MAX as usize {
            return Err(AgentError::Conflict(format!(
                "service {:?} has {replicas} replicas on network {:?}, the most one backend \
                 set holds is {BACKENDS_PER_SET_MAX}",
                svc.name, sn.network
            )));
        }
    }
    let backends = view
        .endpoints
        .values()
        .filter(|e| e.service.is_some())
        .count();
    if backends + 1 > BACKEND_SLOTS_MAX {
        return Err(full("service replicas in all", BACKEND_SLOTS_MAX));
    }
    Ok(())
}

/// A new service on `networks` networks publishing `ports` ports.
pub fn check_service(
    view: &ClusterView,
    networks: usize,
    ports: usize,
    mode: EndpointMode,
) -> Result<()> {
    if networks > SERVICE_NETWORKS_MAX {
        return Err(AgentError::BadRequest(format!(
            "a service joins at most {SERVICE_NETWORKS_MAX} networks"
        )));
    }
    if mode == EndpointMode::Dnsrr {
        return Ok(());
    }
    let vips: usize = view
        .services
        .values()
        .map(|s| s.networks.iter().filter(|n| n.vip.is_some()).count())
        .sum();
    if vips + networks > SERVICES_MAX_ENTRIES as usize {
        return Err(full("service VIPs", SERVICES_MAX_ENTRIES));
    }
    if vips + networks > BACKEND_SETS_MAX_ENTRIES as usize {
        return Err(full("backend sets", BACKEND_SETS_MAX_ENTRIES));
    }
    let published: usize = view.services.values().map(|s| s.ports.len()).sum();
    if published + ports > PUBLISHED_MAX_ENTRIES as usize {
        return Err(full("published ports", PUBLISHED_MAX_ENTRIES));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Service, ServiceNetwork};

    fn endpoint(i: u32, service: Option<&str>) -> Endpoint {
        Endpoint {
            id: i.to_string(),
            container: format!("c{i}"),
            network: "a".into(),
            ip: std::net::Ipv4Addr::from(0x0a00_0000 + i),
            mac: String::new(),
            node: "n1".into(),
            ifname: "eth0".into(),
            host_ifname: String::new(),
            service: service.map(str::to_string),
            aliases: vec![],
            ready: true,
        }
    }

    #[test]
    fn full_maps_are_refused_before_anything_is_stored() {
        let mut v = ClusterView::default();
        v.services.insert(
            "web".into(),
            Service {
                networks: vec![ServiceNetwork {
                    network: "a".into(),
                    vip: Some("10.0.0.1".parse().unwrap()),
                }],
                ports: vec![],
                ..crate::fixtures::service("web", "", 1)
            },
        );
        for i in 0..BACKENDS_PER_SET_MAX {
            v.endpoints
                .insert(format!("a/c{i}"), endpoint(i, Some("web")));
        }
        let req = |service: Option<&str>| ContainerCreate {
            networks: vec!["a".into()],
            service: service.map(str::to_string),
            ..Default::default()
        };
        let e = check_container(&v, &req(Some("web")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("4096 replicas") || e.contains("holds is 4096"),
            "{e}"
        );
        assert!(check_container(&v, &req(None)).is_ok());
        assert!(check_service(&v, 257, 0, EndpointMode::Vip).is_err());
        assert!(check_service(&v, 1, 0, EndpointMode::Vip).is_ok());
        assert!(check_network(&v).is_ok());
    }
}
