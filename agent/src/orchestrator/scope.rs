//! The services a view change touched, so a pass after a change plans only those: planning
//! every service on every task event made each `service create` (and each task a node
//! reported) cost O(services) on the leader, and a step of the scale bench O(services^2).
//!
//! A service's plan is a function of its record, its tasks and their statuses, the nodes and
//! their liveness (and, for rolling updates, the clock: the tick plans those). So a change to
//! nodes, liveness or the leader key, and anything that leaves garbage for the whole pass to
//! collect (a service removed or replaced, a task of no current service, a status of no
//! task, the orchestrator key of no service), asks for a whole pass. Pure.

use std::collections::BTreeSet;

use crate::model::keys;
use crate::view::{ClusterView, changes};

/// The touched services' names, or `None`: plan everything and collect garbage.
pub(super) fn touched_services(old: &ClusterView, new: &ClusterView) -> Option<BTreeSet<String>> {
    if !(old.nodes.ptr_eq(&new.nodes) && old.alive.ptr_eq(&new.alive)) || old.leader != new.leader {
        return None;
    }
    let mut out = BTreeSet::new();
    for (name, was, now) in changes(&old.services, &new.services) {
        match (was, now) {
            (Some(w), Some(n)) if w.id == n.id && w.spec.is_some() == n.spec.is_some() => {}
            (None, Some(_)) => {}
            _ => return None,
        }
        out.insert(name.clone());
    }
    let current = |service: &str, id: &str| {
        new.services
            .get(service)
            .is_some_and(|s| s.id == id && s.spec.is_some())
    };
    for (_, was, now) in changes(&old.tasks, &new.tasks) {
        if now.is_some_and(|t| !current(&t.service, &t.service_id)) {
            return None;
        }
        out.extend([was, now].into_iter().flatten().map(|t| t.service.clone()));
    }
    for (id, _, now) in changes(&old.task_status, &new.task_status) {
        match (new.tasks.get(id), now) {
            (Some(t), _) => {
                out.insert(t.service.clone());
            }
            (None, Some(_)) => return None,
            // Gone with its task, whose removal names the service.
            (None, None) => {}
        }
    }
    for (key, _, now) in changes(&old.revisions, &new.revisions) {
        if let Some(name) = key.strip_prefix(keys::SERVICES) {
            out.insert(name.to_string());
        } else if let Some(name) = key.strip_prefix(keys::ORCHESTRATOR) {
            if now.is_some() && !new.services.contains_key(name) {
                return None;
            }
            out.insert(name.to_string());
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use netagent_orchestrator::{Mode, ServiceSpec, TaskState, TaskTemplate, UpdateConfig};

    use super::*;
    use crate::fixtures;
    use crate::model::Service;

    fn service(name: &str, id: &str) -> Service {
        Service {
            spec: Some(ServiceSpec {
                mode: Mode::Replicated,
                replicas: 1,
                task: TaskTemplate::default(),
                update: UpdateConfig::default(),
                rollback: UpdateConfig::default(),
            }),
            ..fixtures::service(name, id, 1)
        }
    }

    fn task(id: &str, service: &str, service_id: &str) -> netagent_orchestrator::Task {
        fixtures::task(id, service, service_id, "n1")
    }

    fn status(state: TaskState) -> netagent_orchestrator::TaskStatus {
        fixtures::status(state, "n1")
    }

    fn names(n: &[&str]) -> Option<BTreeSet<String>> {
        Some(n.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_change_plans_the_services_it_touched_and_garbage_plans_all() {
        let mut v = ClusterView::default();
        for (s, id) in [("web", "w1"), ("api", "a1"), ("db", "d1")] {
            v.services.insert(s.into(), service(s, id));
            v.tasks
                .insert(format!("{s}-t"), task(&format!("{s}-t"), s, id));
        }
        let before = v.clone();
        assert_eq!(touched_services(&before, &v), names(&[]));

        // A status, a new task, a service's own revision: those services.
        v.task_status
            .insert("web-t".into(), status(TaskState::Running));
        v.tasks.insert("api-2".into(), task("api-2", "api", "a1"));
        v.revisions.insert(keys::orchestrator("db"), 9);
        assert_eq!(touched_services(&before, &v), names(&["api", "db", "web"]));

        // A new service: itself.
        let mut w = before.clone();
        w.services.insert("new".into(), service("new", "n1"));
        assert_eq!(touched_services(&before, &w), names(&["new"]));

        // Garbage for the whole pass: a service removed or replaced, a task of no current
        // service, a status of no task; and a node change.
        let mut w = before.clone();
        w.services.remove("db");
        assert_eq!(touched_services(&before, &w), None);
        let mut w = before.clone();
        w.services.insert("db".into(), service("db", "d2"));
        assert_eq!(touched_services(&before, &w), None);
        let mut w = before.clone();
        w.tasks.insert("stray".into(), task("stray", "gone", "g1"));
        assert_eq!(touched_services(&before, &w), None);
        let mut w = before.clone();
        w.task_status
            .insert("no-task".into(), status(TaskState::Running));
        assert_eq!(touched_services(&before, &w), None);
        let mut w = before.clone();
        w.alive.insert("n2".into());
        assert_eq!(touched_services(&before, &w), None);
    }
}
