//! Tasks in the store as users see them: `service ps`, the replica counts of `service ls`.

use std::collections::BTreeMap;

use netagent_orchestrator::{Desired, Mode, Task, TaskState, TaskStatus};
use netagent_store::Store;
use serde::Serialize;

use crate::error::Result;
use crate::model::{Availability, Service, keys};
use crate::view::ClusterView;

/// Wall-clock milliseconds since the Unix epoch: the time base of tasks.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ReplicaCount {
    pub running: usize,
    pub desired: usize,
}

/// One row of `service ps`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub id: String,
    /// `web.1` (`web.n1` in global mode).
    pub name: String,
    pub service: String,
    pub slot: u64,
    pub node: Option<String>,
    pub desired: Desired,
    /// `pending`, `assigned`, `preparing`, `starting`, `running`, `complete`, `failed`,
    /// `rejected`, `shutdown`.
    pub state: String,
    /// When it entered `state` (RFC 3339) and how long ago, in seconds.
    pub since: String,
    pub since_secs_ago: u64,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    /// Why the leader stopped it.
    pub reason: Option<&'static str>,
    pub container: Option<String>,
    pub spec_version: u64,
    /// An ended task kept for the record (shown indented under its slot's current one).
    pub history: bool,
}

/// The tasks in the store (of one service, or all) with their nodes' reports.
pub async fn list(
    store: &dyn Store,
    service: Option<&Service>,
) -> Result<Vec<(Task, Option<TaskStatus>)>> {
    let (tasks, _) = store.list(keys::TASKS).await?;
    let (statuses, _) = store.list(keys::TASK_STATUS).await?;
    let mut status: BTreeMap<String, TaskStatus> = statuses
        .iter()
        .filter_map(|kv| {
            let id = kv.key.strip_prefix(keys::TASK_STATUS)?;
            Some((id.to_string(), serde_json::from_slice(&kv.value).ok()?))
        })
        .collect();
    Ok(tasks
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Task>(&kv.value).ok())
        .filter(|t| service.is_none_or(|s| t.service == s.name && t.service_id == s.id))
        .map(|t| {
            let st = status.remove(&t.id);
            (t, st)
        })
        .collect())
}

/// Rows for `service ps`: per slot the current task first, then its history, newest first.
pub fn views(tasks: &[(Task, Option<TaskStatus>)]) -> Vec<TaskView> {
    let now = now_ms();
    // A slot is its number, or in global mode its node.
    let key = |t: &Task| {
        if t.slot == 0 {
            (0, t.node.clone())
        } else {
            (t.slot, None)
        }
    };
    let mut sorted: Vec<&(Task, Option<TaskStatus>)> = tasks.iter().collect();
    sorted.sort_by(|(a, _), (b, _)| {
        key(a)
            .cmp(&key(b))
            .then(b.created_ms.cmp(&a.created_ms))
            .then(b.id.cmp(&a.id))
    });
    // The current task of a slot: its newest that should run. The rest is history.
    let mut current: BTreeMap<(u64, Option<String>), &str> = BTreeMap::new();
    for (t, _) in &sorted {
        if t.desired == Desired::Running {
            current.entry(key(t)).or_insert(t.id.as_str());
        }
    }
    let mut out = Vec::new();
    for (t, st) in sorted.iter().copied() {
        let is_current = current.get(&key(t)) == Some(&t.id.as_str());
        let state = match st {
            Some(s) => s.state.as_str().to_string(),
            None if t.node.is_none() => "pending".to_string(),
            None => "assigned".to_string(),
        };
        let since_ms = st.as_ref().map_or(t.created_ms, |s| s.since_ms);
        out.push(TaskView {
            id: t.id.clone(),
            name: t.name(),
            service: t.service.clone(),
            slot: t.slot,
            node: t.node.clone(),
            desired: t.desired,
            state,
            since: rfc3339(since_ms),
            since_secs_ago: now.saturating_sub(since_ms) / 1000,
            error: st
                .as_ref()
                .and_then(|s| s.error.clone())
                .or_else(|| t.note.clone()),
            exit_code: st.as_ref().and_then(|s| s.exit_code),
            reason: t.shutdown_reason.map(|r| r.text()),
            container: st.as_ref().and_then(|s| s.container.clone()),
            spec_version: t.spec_version,
            history: !is_current,
        });
    }
    // Stable: within a slot the current task first, the history newest first.
    out.sort_by_key(|v| {
        let node = if v.slot == 0 { v.node.clone() } else { None };
        (v.slot, node, v.history)
    });
    out
}

/// Running and wanted tasks of a service. Global mode wants one per node that may run it.
pub fn replica_count(
    svc: &Service,
    tasks: &[(Task, Option<TaskStatus>)],
    view: &ClusterView,
) -> Option<ReplicaCount> {
    let spec = svc.spec.as_ref()?;
    let running = tasks
        .iter()
        .filter(|(t, s)| {
            t.desired == Desired::Running
                && s.as_ref().is_some_and(|s| s.state == TaskState::Running)
        })
        .count();
    let desired = match spec.mode {
        Mode::Replicated => spec.replicas as usize,
        Mode::Global => view
            .nodes
            .values()
            .filter(|n| {
                view.alive.contains(&n.name)
                    && n.availability == Availability::Active
                    && spec.task.allows(&n.name, &n.labels)
            })
            .count(),
    };
    Some(ReplicaCount { running, desired })
}

#[cfg(test)]
mod tests {
    use netagent_orchestrator::{ShutdownReason, TaskTemplate};

    use super::*;

    fn task(id: &str, slot: u64, created: u64, desired: Desired) -> Task {
        Task {
            id: id.into(),
            service: "web".into(),
            service_id: "s".into(),
            slot,
            node: Some("n1".into()),
            desired,
            shutdown_reason: (desired == Desired::Shutdown).then_some(ShutdownReason::Restarted),
            spec_version: 1,
            template: TaskTemplate::default(),
            created_ms: created,
            start_after_ms: None,
            note: None,
        }
    }

    #[test]
    fn the_current_task_of_a_slot_comes_first_whatever_its_age() {
        // Slot 1: a newer task already stopped (a failed start-first replacement) above the
        // older one that still runs.
        let tasks = vec![
            (task("old", 1, 1, Desired::Running), None),
            (task("new", 1, 2, Desired::Shutdown), None),
            (task("other", 2, 3, Desired::Running), None),
        ];
        let v = views(&tasks);
        let rows: Vec<(&str, bool)> = v.iter().map(|t| (t.id.as_str(), t.history)).collect();
        assert_eq!(rows, [("old", false), ("new", true), ("other", false)]);
    }
}
