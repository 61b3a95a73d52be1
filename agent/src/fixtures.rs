//! Records for unit tests and benches: a network, a node, a service, a task and a task
//! status with every field not under test at a plain default. Not part of the agent's API.

use std::net::Ipv4Addr;

use netagent_orchestrator::{Desired, Task, TaskState, TaskStatus, TaskTemplate};

use crate::model::{Availability, EndpointMode, Network, Node, Service};

/// An overlay network, its gateway the subnet's first address.
pub fn network(name: &str, subnet: &str, vni: u32) -> Network {
    let subnet: ipnet::Ipv4Net = subnet.parse().expect("a subnet");
    Network {
        name: name.into(),
        id: name.into(),
        driver: "overlay".into(),
        vni,
        subnet,
        gateway: Ipv4Addr::from_bits(subnet.network().to_bits() + 1),
        encrypted: false,
        attachable: false,
        internal: false,
        mtu: None,
        labels: Default::default(),
        created: String::new(),
    }
}

/// An active node without WireGuard.
pub fn node(name: &str, address: Ipv4Addr) -> Node {
    Node {
        name: name.into(),
        address,
        availability: Availability::Active,
        created: String::new(),
        uplink_mtu: None,
        reserved_ports: vec![],
        wireguard: None,
        labels: Default::default(),
    }
}

/// A VIP service on no network, without a spec (a VIP for hand-made replicas).
pub fn service(name: &str, id: &str, num: u32) -> Service {
    Service {
        name: name.into(),
        id: id.into(),
        num,
        endpoint_mode: EndpointMode::Vip,
        networks: vec![],
        ports: vec![],
        created: String::new(),
        spec: None,
        previous_spec: None,
        version: 0,
        update_status: None,
        labels: Default::default(),
        updated: None,
    }
}

/// A running task in slot 1 of `service` on `node`.
pub fn task(id: &str, service: &str, service_id: &str, node: &str) -> Task {
    Task {
        id: id.into(),
        service: service.into(),
        service_id: service_id.into(),
        slot: 1,
        node: Some(node.into()),
        desired: Desired::Running,
        shutdown_reason: None,
        spec_version: 0,
        template: TaskTemplate::default(),
        created_ms: 1,
        start_after_ms: None,
        note: None,
    }
}

/// A status `node` reported.
pub fn status(state: TaskState, node: &str) -> TaskStatus {
    TaskStatus {
        state,
        since_ms: 1,
        running_since_ms: None,
        error: None,
        exit_code: None,
        container: None,
        node: node.into(),
    }
}
