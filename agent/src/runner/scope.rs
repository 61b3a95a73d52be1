//! What a view change touched of this node's tasks, so a pass after a change looks at those
//! only: a pass over every task and container of the cluster on every event made each
//! `container run` cost O(cluster) on every node. Pure: diffs of the view's persistent maps.

use std::collections::BTreeSet;

use crate::view::{ClusterView, changes};

#[derive(Debug, Default, PartialEq)]
pub(super) struct Touched {
    /// This node's tasks whose record, status or container changed.
    pub tasks: BTreeSet<String>,
    /// This node's task containers that changed, and those of this node's removed tasks:
    /// each may have lost its task.
    pub containers: BTreeSet<String>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty() && self.containers.is_empty()
    }
}

pub(super) fn touched(node: &str, old: &ClusterView, new: &ClusterView) -> Touched {
    let mut t = Touched::default();
    let local = |id: &str| {
        new.tasks
            .get(id)
            .is_some_and(|task| task.node.as_deref() == Some(node))
    };
    for (id, was, now) in changes(&old.tasks, &new.tasks) {
        if local(id) {
            t.tasks.insert(id.clone());
        }
        if now.is_none()
            && let Some(task) = was.filter(|w| w.node.as_deref() == Some(node))
        {
            t.containers.insert(task.container_name());
        }
    }
    for (id, _, _) in changes(&old.task_status, &new.task_status) {
        if local(id) {
            t.tasks.insert(id.clone());
        }
    }
    for (name, was, now) in changes(&old.containers, &new.containers) {
        for c in [was, now].into_iter().flatten() {
            if c.node != node {
                continue;
            }
            if let Some(id) = c.task.as_deref().filter(|id| local(id)) {
                t.tasks.insert(id.to_string());
            }
        }
        if now.is_some_and(|c| c.node == node && c.task.is_some()) {
            t.containers.insert(name.clone());
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use netagent_orchestrator::{Task, TaskState};

    use super::*;
    use crate::fixtures::status;
    use crate::model::{Container, ContainerKind};

    fn task(id: &str, node: &str) -> Task {
        crate::fixtures::task(id, "web", "s", node)
    }

    fn container(t: &Task, node: &str) -> Container {
        Container {
            name: t.container_name(),
            id: t.id.clone(),
            kind: ContainerKind::Sandbox,
            node: node.into(),
            netns: String::new(),
            networks: vec![],
            command: vec![],
            service: Some("web".into()),
            aliases: vec![],
            pid: Some(10),
            start_time: None,
            created: String::new(),
            exit: None,
            task: Some(t.id.clone()),
            cni: None,
        }
    }

    #[test]
    fn a_change_touches_this_nodes_tasks_and_containers_only() {
        let mut v = ClusterView::default();
        for (id, node) in [("a", "n1"), ("b", "n1"), ("r", "n2")] {
            let t = task(id, node);
            v.containers.insert(t.container_name(), container(&t, node));
            v.task_status
                .insert(id.into(), status(TaskState::Running, node));
            v.tasks.insert(id.into(), t);
        }
        let before = v.clone();
        assert!(touched("n1", &before, &v).is_empty());

        // Another node's task and container: nothing here.
        v.task_status
            .insert("r".into(), status(TaskState::Failed, "n2"));
        let rc = task("r", "n2").container_name();
        v.containers.get_mut(&rc).unwrap().exit = Some(crate::model::ContainerExit {
            code: Some(1),
            at: String::new(),
        });
        assert!(touched("n1", &before, &v).is_empty());

        // A's status, b's container (it exited): both tasks, b's container.
        v.task_status
            .insert("a".into(), status(TaskState::Failed, "n1"));
        let bc = task("b", "n1").container_name();
        v.containers.get_mut(&bc).unwrap().exit = Some(crate::model::ContainerExit {
            code: Some(1),
            at: String::new(),
        });
        let t = touched("n1", &before, &v);
        assert_eq!(t.tasks, BTreeSet::from(["a".into(), "b".into()]));
        assert_eq!(t.containers, BTreeSet::from([bc.clone()]));

        // A removed task: its container may be an orphan now.
        let mut w = before.clone();
        w.tasks.remove("a");
        let t = touched("n1", &before, &w);
        assert!(t.tasks.is_empty());
        assert_eq!(
            t.containers,
            BTreeSet::from([task("a", "n1").container_name()])
        );
    }
}
