//! Records for unit tests: a service, a task and a task status with every field not under
//! test at a plain default.

use netagent_orchestrator::{Desired, Task, TaskState, TaskStatus, TaskTemplate};

use crate::model::{EndpointMode, Service};

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
