//! One orchestration pass over one service: from its spec, its tasks and the nodes, the task
//! records to create, change or delete, and how its rolling update stands.
//!
//! Level-triggered: the plan depends only on the state it is given, so running it again on the
//! same state changes nothing, and a new leader carries on where the old one stopped. In order:
//! tasks on nodes that went down are stopped; ended tasks are restarted per their policy; the
//! rolling update advances (`update`); every slot gets a task (new slots on scale-up, retired
//! ones on scale-down, replacements for moved, restarted and updated tasks) and a slot whose
//! replacement is up loses its other tasks; old history is pruned.

use std::collections::{BTreeMap, BTreeSet};

use crate::schedule::{self, Load};
use crate::spec::{Mode, ServiceSpec, TaskTemplate};
use crate::task::{Desired, ShutdownReason, Task, TaskState, TaskStatus, UpdateStatus};
use crate::update;

/// Ended tasks kept per slot for `service ps` (Docker's task history retention limit).
pub const HISTORY_LIMIT: usize = 5;

/// A node as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Its agent is alive.
    pub ready: bool,
    /// Availability `active` (not drained).
    pub active: bool,
    pub labels: BTreeMap<String, String>,
}

/// The service being planned.
#[derive(Debug, Clone, Copy)]
pub struct ServiceState<'a> {
    pub name: &'a str,
    pub id: &'a str,
    pub version: u64,
    pub spec: &'a ServiceSpec,
    pub update: Option<&'a UpdateStatus>,
}

pub struct Input<'a> {
    pub service: ServiceState<'a>,
    /// The service's tasks (of this service id) with their nodes' reports.
    pub tasks: Vec<(&'a Task, Option<&'a TaskStatus>)>,
    pub nodes: &'a [NodeInfo],
    /// Live tasks per node over every service, this one included.
    pub load_total: &'a BTreeMap<String, usize>,
    pub now_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskChange {
    Create(Task),
    /// The whole new record.
    Update(Task),
    Delete(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Vec<TaskChange>,
    /// The update status to store, when it changes.
    pub update: Option<UpdateStatus>,
    /// The update failed and asks for a rollback (with this message): restore the previous
    /// spec. No task changes come with it; the next pass plans the rollback.
    pub rollback: Option<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.update.is_none() && self.rollback.is_none()
    }
}

/// Where a task belongs: its slot number, or in global mode its node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    Slot(u64),
    Node(String),
}

/// A task being planned: the record, its node's report, and whether the record changed.
#[derive(Debug, Clone)]
pub(crate) struct Work {
    pub task: Task,
    pub status: Option<TaskStatus>,
    pub new: bool,
    pub dirty: bool,
    pub deleted: bool,
}

impl Work {
    pub fn live(&self) -> bool {
        !self.deleted && self.task.desired == Desired::Running
    }

    pub fn state(&self) -> TaskState {
        self.status
            .as_ref()
            .map_or(TaskState::Assigned, |s| s.state)
    }

    pub fn terminal(&self) -> bool {
        self.state().is_terminal()
    }

    /// Runs and takes traffic.
    pub fn up(&self) -> bool {
        self.live() && self.state() == TaskState::Running
    }

    /// It ended without being asked to (and may have been restarted since).
    pub fn ended_on_own(&self) -> bool {
        self.terminal()
            && (self.task.desired == Desired::Running
                || self.task.shutdown_reason == Some(ShutdownReason::Restarted))
    }

    pub fn ended_ms(&self) -> u64 {
        self.status
            .as_ref()
            .map_or(self.task.created_ms, |s| s.since_ms)
    }

    pub fn key(&self) -> Key {
        if self.task.slot == 0 {
            Key::Node(self.task.node.clone().unwrap_or_default())
        } else {
            Key::Slot(self.task.slot)
        }
    }
}

/// The working state of one pass.
pub(crate) struct Pass<'a, 'g> {
    pub svc: ServiceState<'a>,
    pub nodes: &'a [NodeInfo],
    pub now: u64,
    pub tasks: Vec<Work>,
    pub load: Load,
    new_id: &'g mut dyn FnMut() -> String,
}

impl Pass<'_, '_> {
    pub fn template(&self) -> &TaskTemplate {
        &self.svc.spec.task
    }

    fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn node_ready(&self, name: Option<&str>) -> bool {
        name.and_then(|n| self.node(n)).is_some_and(|n| n.ready)
    }

    /// The task may stay where it is: its node is up, active and meets the constraints.
    pub fn placed_well(&self, w: &Work) -> bool {
        w.task
            .node
            .as_deref()
            .and_then(|n| self.node(n))
            .is_some_and(|n| schedule::eligible(n, &w.task.template))
    }

    /// A live task of the current template on a good node.
    pub fn keeper(&self, w: &Work) -> bool {
        w.live() && w.task.template == *self.template() && self.placed_well(w)
    }

    /// Indices of the tasks of each key, newest first.
    pub fn by_key(&self) -> BTreeMap<Key, Vec<usize>> {
        let mut out: BTreeMap<Key, Vec<usize>> = BTreeMap::new();
        for (i, w) in self.tasks.iter().enumerate() {
            if !w.deleted {
                out.entry(w.key()).or_default().push(i);
            }
        }
        for list in out.values_mut() {
            list.sort_by(|&a, &b| {
                let (ta, tb) = (&self.tasks[a].task, &self.tasks[b].task);
                tb.created_ms.cmp(&ta.created_ms).then(tb.id.cmp(&ta.id))
            });
        }
        out
    }

    pub fn shutdown(&mut self, i: usize, reason: ShutdownReason) {
        let w = &mut self.tasks[i];
        if w.task.desired == Desired::Shutdown {
            return;
        }
        w.task.desired = Desired::Shutdown;
        w.task.shutdown_reason = Some(reason);
        w.dirty = true;
        if let Some(n) = w.task.node.clone() {
            self.load.remove(&n);
        }
    }

    /// A new task of the current template for `slot` (0 in global mode, with `node` set).
    pub fn create(&mut self, slot: u64, node: Option<&str>, start_after_ms: Option<u64>) -> usize {
        let (node, note) = match node {
            Some(n) => (Some(n.to_string()), None),
            None => match schedule::pick(self.nodes, self.template(), &self.load) {
                Ok(n) => (Some(n.to_string()), None),
                Err(why) => (None, Some(why)),
            },
        };
        if let Some(n) = &node {
            self.load.add(n);
        }
        let task = Task {
            id: (self.new_id)(),
            service: self.svc.name.to_string(),
            service_id: self.svc.id.to_string(),
            slot,
            node,
            desired: Desired::Running,
            shutdown_reason: None,
            spec_version: self.svc.version,
            template: self.template().clone(),
            created_ms: self.now,
            start_after_ms: start_after_ms.filter(|t| *t > self.now),
            note,
        };
        self.tasks.push(Work {
            task,
            status: None,
            new: true,
            dirty: false,
            deleted: false,
        });
        self.tasks.len() - 1
    }
}

/// Plans one pass. `new_id` names new tasks.
pub fn plan(input: Input<'_>, new_id: &mut dyn FnMut() -> String) -> Plan {
    let mut load = Load {
        service: BTreeMap::new(),
        total: input.load_total.clone(),
    };
    let tasks: Vec<Work> = input
        .tasks
        .iter()
        .map(|(t, s)| Work {
            task: (*t).clone(),
            status: s.cloned(),
            new: false,
            dirty: false,
            deleted: false,
        })
        .collect();
    for w in &tasks {
        if let (true, Some(n)) = (w.live(), &w.task.node) {
            *load.service.entry(n.clone()).or_default() += 1;
        }
    }
    let mut pass = Pass {
        svc: input.service,
        nodes: input.nodes,
        now: input.now_ms,
        tasks,
        load,
        new_id,
    };
    stop_on_lost_nodes(&mut pass);
    restart_ended(&mut pass);
    let outcome = update::advance(&mut pass);
    if let Some(message) = outcome.rollback {
        return Plan {
            rollback: Some(message),
            ..Default::default()
        };
    }
    match pass.svc.spec.mode {
        Mode::Replicated => {
            scale(&mut pass);
            keep_replicated_slots(&mut pass);
        }
        Mode::Global => keep_global_slots(&mut pass),
    }
    prune_history(&mut pass);
    let changes = pass
        .tasks
        .into_iter()
        .filter_map(|w| match (w.new, w.dirty, w.deleted) {
            (true, _, false) => Some(TaskChange::Create(w.task)),
            (false, _, true) => Some(TaskChange::Delete(w.task.id)),
            (false, true, false) => Some(TaskChange::Update(w.task)),
            _ => None,
        })
        .collect();
    Plan {
        changes,
        update: outcome.status,
        rollback: None,
    }
}

/// Tasks whose node is down (or gone) stop counting: their slots get new tasks elsewhere, and
/// the node stops them when it returns. Ended tasks stay as they are (nothing runs).
fn stop_on_lost_nodes(p: &mut Pass) {
    for i in 0..p.tasks.len() {
        let w = &p.tasks[i];
        if w.live()
            && w.task.node.is_some()
            && !w.terminal()
            && !p.node_ready(w.task.node.as_deref())
        {
            p.shutdown(i, ShutdownReason::NodeDown);
        }
    }
}

/// An ended task is replaced (in its slot, after the restart delay) if its policy says so;
/// otherwise it stays as the slot's task, ended.
fn restart_ended(p: &mut Pass) {
    let by_key = p.by_key();
    for i in 0..p.tasks.len() {
        let w = &p.tasks[i];
        if !(w.live() && w.terminal()) {
            continue;
        }
        let policy = &w.task.template.restart;
        use crate::spec::RestartCondition::*;
        let wanted = match policy.condition {
            Any => true,
            OnFailure => w.state() != TaskState::Complete,
            None => false,
        };
        let attempts = by_key.get(&w.key()).map_or(0, |list| {
            list.iter()
                .map(|&j| &p.tasks[j])
                .filter(|o| o.task.template == w.task.template && o.ended_on_own())
                .count() as u64
        });
        let within = policy.max_attempts.is_none_or(|max| attempts <= max);
        if wanted && within {
            p.shutdown(i, ShutdownReason::Restarted);
        }
    }
}

/// Slots that go on: with a live task, or whose newest task was stopped to be replaced.
fn active_slots(p: &Pass) -> BTreeMap<u64, Vec<usize>> {
    p.by_key()
        .into_iter()
        .filter_map(|(k, list)| match k {
            Key::Slot(s) => {
                let newest = &p.tasks[list[0]];
                let live = list.iter().any(|&i| p.tasks[i].live());
                let replaced = newest.task.desired == Desired::Shutdown
                    && !newest
                        .task
                        .shutdown_reason
                        .is_some_and(ShutdownReason::retires);
                (live || replaced).then_some((s, list))
            }
            Key::Node(_) => None,
        })
        .collect()
}

/// Replicated mode: as many slots as replicas. Scaling down retires slots on the nodes with
/// most tasks of the service (then most tasks overall); scaling up adds the lowest free slots.
fn scale(p: &mut Pass) {
    let slots = active_slots(p);
    let want = p.svc.spec.replicas as usize;
    if slots.len() > want {
        let mut candidates: Vec<(u64, Vec<usize>)> = slots.into_iter().collect();
        for _ in 0..candidates.len() - want {
            // Recomputed after each pick: retiring one changes the load.
            let rank = |p: &Pass, list: &Vec<usize>| {
                let node = list
                    .iter()
                    .find(|&&i| p.tasks[i].live())
                    .and_then(|&i| p.tasks[i].task.node.clone());
                match node {
                    // A slot between tasks costs nothing to retire: first.
                    None => (1, usize::MAX, usize::MAX),
                    Some(n) => (
                        0,
                        p.load.service.get(&n).copied().unwrap_or(0),
                        p.load.total.get(&n).copied().unwrap_or(0),
                    ),
                }
            };
            let Some(best) = (0..candidates.len()).max_by(|&a, &b| {
                rank(p, &candidates[a].1)
                    .cmp(&rank(p, &candidates[b].1))
                    .then(candidates[a].0.cmp(&candidates[b].0))
            }) else {
                break;
            };
            let (_, list) = candidates.swap_remove(best);
            let mut any_live = false;
            for &i in &list {
                if p.tasks[i].live() {
                    any_live = true;
                    p.shutdown(i, ShutdownReason::ScaledDown);
                }
            }
            if !any_live {
                let w = &mut p.tasks[list[0]];
                w.task.shutdown_reason = Some(ShutdownReason::ScaledDown);
                w.dirty = true;
            }
        }
    } else if slots.len() < want {
        let taken: BTreeSet<u64> = slots.keys().copied().collect();
        let free = (1u64..).filter(|s| !taken.contains(s));
        for s in free.take(want - slots.len()).collect::<Vec<_>>() {
            p.create(s, None, None);
        }
    }
}

/// Replicated mode, per slot: a replacement where the slot has no live task; pending tasks
/// placed when a node appears; tasks moved off drained or no longer matching nodes (the new
/// task first); once a slot's current task is up, its other tasks stop.
fn keep_replicated_slots(p: &mut Pass) {
    for (slot, list) in active_slots(p) {
        let live: Vec<usize> = list
            .iter()
            .copied()
            .filter(|&i| p.tasks[i].live())
            .collect();
        if live.is_empty() {
            replace_if_due(p, list[0], slot, None);
            continue;
        }
        for &i in &live {
            if p.tasks[i].task.node.is_none()
                && let Ok(n) = schedule::pick(p.nodes, &p.tasks[i].task.template, &p.load)
            {
                let n = n.to_string();
                p.load.add(&n);
                let w = &mut p.tasks[i];
                w.task.node = Some(n);
                w.task.note = None;
                w.dirty = true;
            }
        }
        supersede(p, &live);
        let live: Vec<usize> = live.into_iter().filter(|&i| p.tasks[i].live()).collect();
        let has_keeper_or_pending = live
            .iter()
            .any(|&i| p.keeper(&p.tasks[i]) || p.tasks[i].task.node.is_none());
        let movers: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| {
                let w = &p.tasks[i];
                p.node_ready(w.task.node.as_deref()) && !p.placed_well(w)
            })
            .collect();
        if !movers.is_empty() && !has_keeper_or_pending {
            let new = p.create(slot, None, None);
            if p.tasks[new].task.node.is_none() {
                // Nowhere to go: a drained node still drains.
                for i in movers {
                    p.shutdown(i, ShutdownReason::Moved);
                }
            }
        }
    }
}

/// Once one of a slot's live tasks of the current template is up, the others stop.
fn supersede(p: &mut Pass, live: &[usize]) {
    let Some(&winner) = live
        .iter()
        .find(|&&i| p.tasks[i].up() && p.keeper(&p.tasks[i]))
    else {
        return;
    };
    for &i in live {
        if i == winner {
            continue;
        }
        let reason = if p.tasks[i].task.template != *p.template() {
            ShutdownReason::Updated
        } else if !p.placed_well(&p.tasks[i]) {
            ShutdownReason::Moved
        } else {
            ShutdownReason::Superseded
        };
        p.shutdown(i, reason);
    }
}

/// The slot's newest task (`newest`) is stopped or stopping: start its successor unless a
/// stop-first update still waits for it to end. A restart waits out the restart delay.
fn replace_if_due(p: &mut Pass, newest: usize, slot: u64, node: Option<&str>) {
    let w = &p.tasks[newest];
    let stopping = !w.terminal() && p.node_ready(w.task.node.as_deref());
    if w.task.shutdown_reason == Some(ShutdownReason::Updated) && stopping {
        return;
    }
    let start_after = (w.task.shutdown_reason == Some(ShutdownReason::Restarted))
        .then(|| w.ended_ms() + w.task.template.restart.delay_ms);
    let node = node.map(str::to_string);
    p.create(slot, node.as_deref(), start_after);
}

/// Global mode: one task on every eligible node; none elsewhere.
fn keep_global_slots(p: &mut Pass) {
    let eligible: Vec<String> = p
        .nodes
        .iter()
        .filter(|n| schedule::eligible(n, p.template()))
        .map(|n| n.name.clone())
        .collect();
    for i in 0..p.tasks.len() {
        let w = &p.tasks[i];
        if w.live() && p.node_ready(w.task.node.as_deref()) && !p.placed_well(w) {
            p.shutdown(i, ShutdownReason::ScaledDown);
        }
    }
    let by_key = p.by_key();
    for node in eligible {
        let list = by_key
            .get(&Key::Node(node.clone()))
            .cloned()
            .unwrap_or_default();
        let live: Vec<usize> = list
            .iter()
            .copied()
            .filter(|&i| p.tasks[i].live())
            .collect();
        if !live.is_empty() {
            supersede(p, &live);
            continue;
        }
        match list.first() {
            Some(&newest)
                if !p.tasks[newest]
                    .task
                    .shutdown_reason
                    .is_some_and(ShutdownReason::retires) =>
            {
                replace_if_due(p, newest, 0, Some(&node))
            }
            _ => {
                p.create(0, Some(&node), None);
            }
        }
    }
}

/// Keeps the newest [`HISTORY_LIMIT`] finished tasks of each slot; a task still stopping on a
/// node that is up is not history yet.
fn prune_history(p: &mut Pass) {
    for (_, list) in p.by_key() {
        let history: Vec<usize> = list
            .iter()
            .copied()
            .filter(|&i| {
                let w = &p.tasks[i];
                !w.new && !w.live() && (w.terminal() || !p.node_ready(w.task.node.as_deref()))
            })
            .collect();
        // The newest task of a slot is never pruned: it says what the slot is doing.
        for &i in history
            .iter()
            .filter(|&&i| i != list[0])
            .skip(HISTORY_LIMIT)
        {
            p.tasks[i].deleted = true;
        }
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
