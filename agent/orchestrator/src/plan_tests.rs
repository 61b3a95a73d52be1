//! The planner driven by a small simulation of nodes: each step plans, applies the plan, and
//! lets the simulated nodes start what is assigned to them and stop what should stop.

use std::collections::BTreeMap;

use super::*;
use crate::spec::{
    Constraint, Mode, RestartCondition, ServiceSpec, TaskTemplate, UpdateConfig,
    UpdateFailureAction, UpdateOrder,
};
use crate::task::{Desired, ShutdownReason, Task, TaskState, TaskStatus, UpdateState};

struct Sim {
    spec: ServiceSpec,
    previous: Option<ServiceSpec>,
    version: u64,
    update: Option<UpdateStatus>,
    tasks: BTreeMap<String, Task>,
    status: BTreeMap<String, TaskStatus>,
    nodes: Vec<NodeInfo>,
    /// Load of other services per node.
    other_load: BTreeMap<String, usize>,
    now: u64,
    next_id: u64,
    /// Nodes that do not act (their agent is down but they count as ready, or frozen).
    frozen: Vec<String>,
    /// Commands whose tasks fail at once.
    failing: Vec<String>,
}

fn template(cmd: &str) -> TaskTemplate {
    TaskTemplate {
        command: vec![cmd.into()],
        ..Default::default()
    }
}

fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        ready: true,
        active: true,
        labels: BTreeMap::new(),
    }
}

impl Sim {
    fn new(replicas: u64, nodes: &[&str]) -> Self {
        Self {
            spec: ServiceSpec {
                mode: Mode::Replicated,
                replicas,
                task: template("v1"),
                update: UpdateConfig::default(),
                rollback: UpdateConfig::default(),
            },
            previous: None,
            version: 1,
            update: None,
            tasks: BTreeMap::new(),
            status: BTreeMap::new(),
            nodes: nodes.iter().map(|n| node(n)).collect(),
            other_load: BTreeMap::new(),
            now: 1_000_000,
            next_id: 0,
            frozen: Vec::new(),
            failing: Vec::new(),
        }
    }

    fn plan(&mut self) -> Plan {
        let mut load = self.other_load.clone();
        for t in self.tasks.values() {
            if t.desired == Desired::Running
                && let Some(n) = &t.node
            {
                *load.entry(n.clone()).or_default() += 1;
            }
        }
        let tasks = self
            .tasks
            .values()
            .map(|t| (t, self.status.get(&t.id)))
            .collect();
        let mut next = self.next_id;
        let plan = plan(
            Input {
                service: ServiceState {
                    name: "web",
                    id: "svc1",
                    version: self.version,
                    spec: &self.spec,
                    update: self.update.as_ref(),
                },
                tasks,
                nodes: &self.nodes,
                load_total: &load,
                now_ms: self.now,
            },
            &mut || {
                next += 1;
                format!("t{next:04}")
            },
        );
        self.next_id = next;
        plan
    }

    /// One leader pass; returns whether it changed anything.
    fn lead(&mut self) -> bool {
        let plan = self.plan();
        let changed = !plan.is_empty();
        if let Some(msg) = plan.rollback {
            let prev = self.previous.take().expect("a previous spec");
            self.previous = Some(std::mem::replace(&mut self.spec, prev));
            self.version += 1;
            self.update = Some(UpdateStatus {
                state: UpdateState::RollbackStarted,
                started_ms: self.now,
                completed_ms: None,
                message: msg,
            });
            return true;
        }
        if let Some(u) = plan.update {
            self.update = Some(u);
        }
        for c in plan.changes {
            match c {
                TaskChange::Create(t) | TaskChange::Update(t) => {
                    self.tasks.insert(t.id.clone(), t);
                }
                TaskChange::Delete(id) => {
                    self.tasks.remove(&id);
                    self.status.remove(&id);
                }
            }
        }
        changed
    }

    fn set(&mut self, id: &str, state: TaskState) {
        let node = self.tasks[id].node.clone().unwrap_or_default();
        let prev = self.status.get(id).and_then(|s| s.running_since_ms);
        self.status.insert(
            id.to_string(),
            TaskStatus {
                state,
                since_ms: self.now,
                running_since_ms: if state == TaskState::Running {
                    prev.or(Some(self.now))
                } else {
                    prev
                },
                error: (state == TaskState::Failed).then(|| "exit code 1".to_string()),
                exit_code: None,
                container: None,
                node,
            },
        );
    }

    /// The nodes act: start what is due, stop what should stop.
    fn nodes_act(&mut self) -> bool {
        let mut changed = false;
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        for id in ids {
            let t = self.tasks[&id].clone();
            let Some(n) = t.node.clone() else { continue };
            let ready = self.nodes.iter().any(|x| x.name == n && x.ready);
            if !ready || self.frozen.contains(&n) {
                continue;
            }
            let state = self.status.get(&id).map(|s| s.state);
            match t.desired {
                Desired::Running if state.is_none() => {
                    if t.start_after_ms.is_some_and(|a| a > self.now) {
                        continue;
                    }
                    let fails = self.failing.contains(&t.template.command[0]);
                    self.set(
                        &id,
                        if fails {
                            TaskState::Failed
                        } else {
                            TaskState::Running
                        },
                    );
                    changed = true;
                }
                Desired::Shutdown if state.is_none_or(|s| !s.is_terminal()) => {
                    self.set(&id, TaskState::Shutdown);
                    changed = true;
                }
                _ => {}
            }
        }
        changed
    }

    /// Leader passes and node actions for `steps` half-second steps.
    fn run_for(&mut self, steps: usize) {
        for _ in 0..steps {
            self.lead();
            self.nodes_act();
            self.now += 500;
        }
    }

    /// Alternates leader passes and node actions, advancing time, until nothing changes.
    fn converge(&mut self) {
        for _ in 0..200 {
            let a = self.lead();
            let b = self.nodes_act();
            self.now += 500;
            // A restart delay still running: not settled yet.
            let waiting = self.tasks.values().any(|t| {
                t.desired == Desired::Running
                    && !self.status.contains_key(&t.id)
                    && t.start_after_ms.is_some()
            });
            if !a && !b && !waiting && !self.lead() {
                return;
            }
        }
        panic!("did not converge");
    }

    fn running(&self) -> Vec<&Task> {
        self.tasks
            .values()
            .filter(|t| {
                t.desired == Desired::Running
                    && self.status.get(&t.id).map(|s| s.state) == Some(TaskState::Running)
            })
            .collect()
    }

    fn per_node(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in self.running() {
            *m.entry(t.node.clone().unwrap_or_default()).or_default() += 1;
        }
        m
    }

    fn counts(&self) -> Vec<usize> {
        self.per_node().values().copied().collect()
    }

    fn node_mut(&mut self, name: &str) -> &mut NodeInfo {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }
}

#[test]
fn replicas_spread_then_scale_up_and_down_from_the_busiest() {
    let mut s = Sim::new(3, &["n1", "n2", "n3"]);
    s.converge();
    assert_eq!(s.counts(), [1, 1, 1]);
    let slots: Vec<u64> = s.running().iter().map(|t| t.slot).collect();
    assert_eq!(slots, [1, 2, 3]);
    s.spec.replicas = 5;
    s.converge();
    assert_eq!(s.counts(), [2, 2, 1]);
    // n3 is busy with another service: scaling down takes from n1/n2 first anyway (service
    // count first), and a tie on the service count goes to the node busier overall.
    s.other_load.insert("n2".into(), 4);
    s.spec.replicas = 4;
    s.converge();
    assert_eq!(s.per_node()["n2"], 1, "{:?}", s.per_node());
    assert_eq!(s.counts().iter().sum::<usize>(), 4);
    s.spec.replicas = 0;
    s.converge();
    assert!(s.running().is_empty());
    // Idempotent: a settled state plans nothing.
    assert!(s.plan().is_empty());
}

#[test]
fn ended_tasks_restart_in_their_slot_after_the_delay() {
    let mut s = Sim::new(1, &["n1", "n2"]);
    s.converge();
    let first = s.running()[0].id.clone();
    s.set(&first, TaskState::Failed);
    s.lead();
    let t = &s.tasks[&first];
    assert_eq!(
        (t.desired, t.shutdown_reason),
        (Desired::Shutdown, Some(ShutdownReason::Restarted))
    );
    let new: Vec<&Task> = s
        .tasks
        .values()
        .filter(|t| t.desired == Desired::Running)
        .collect();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].slot, 1, "same slot");
    assert_eq!(new[0].start_after_ms, Some(s.now + 5_000), "restart delay");
    s.converge();
    assert_eq!(s.running().len(), 1);

    // condition none: an ended task stays ended.
    let mut s = Sim::new(1, &["n1"]);
    s.spec.task.restart.condition = RestartCondition::None;
    s.converge();
    let id = s.running()[0].id.clone();
    s.set(&id, TaskState::Complete);
    s.converge();
    assert!(s.running().is_empty());
    assert_eq!(s.tasks.len(), 1);

    // on-failure: exit 0 stays ended, a failure restarts.
    let mut s = Sim::new(1, &["n1"]);
    s.spec.task.restart.condition = RestartCondition::OnFailure;
    s.converge();
    let id = s.running()[0].id.clone();
    s.set(&id, TaskState::Complete);
    s.converge();
    assert_eq!(s.tasks.len(), 1);

    // max attempts: the first run and two restarts, then no more.
    let mut s = Sim::new(1, &["n1"]);
    s.spec.task.restart.max_attempts = Some(2);
    s.failing.push("v1".into());
    s.converge();
    assert_eq!(s.tasks.len(), 3);
    assert!(s.running().is_empty());
}

#[test]
fn a_down_node_s_tasks_start_elsewhere_and_stop_when_it_returns() {
    let mut s = Sim::new(3, &["n1", "n2", "n3"]);
    s.converge();
    let on_n3: Vec<String> = s
        .running()
        .iter()
        .filter(|t| t.node.as_deref() == Some("n3"))
        .map(|t| t.id.clone())
        .collect();
    s.node_mut("n3").ready = false;
    s.converge();
    assert_eq!(s.counts(), [2, 1], "{:?}", s.per_node());
    let old = &s.tasks[&on_n3[0]];
    assert_eq!(old.desired, Desired::Shutdown);
    assert_eq!(old.shutdown_reason, Some(ShutdownReason::NodeDown));
    // Back: nothing moves back, and its old task is stopped by its node.
    s.node_mut("n3").ready = true;
    s.converge();
    assert_eq!(s.status[&on_n3[0]].state, TaskState::Shutdown);
    assert_eq!(s.running().len(), 3);
    assert!(!s.per_node().contains_key("n3"));
}

#[test]
fn drain_starts_replacements_first_and_active_does_not_move_them_back() {
    let mut s = Sim::new(3, &["n1", "n2", "n3"]);
    s.converge();
    s.node_mut("n3").active = false;
    // First pass: a replacement is created, the old task still runs.
    s.lead();
    assert_eq!(
        s.tasks
            .values()
            .filter(|t| t.desired == Desired::Running)
            .count(),
        4
    );
    assert_eq!(
        s.running().len(),
        3,
        "the old task serves until the new one is up"
    );
    s.converge();
    assert_eq!(s.running().len(), 3);
    assert!(!s.per_node().contains_key("n3"));
    s.node_mut("n3").active = true;
    s.converge();
    assert!(!s.per_node().contains_key("n3"));
    // Drained with nowhere to go: the tasks stop and the new ones wait.
    let mut s = Sim::new(1, &["n1"]);
    s.converge();
    s.node_mut("n1").active = false;
    s.converge();
    assert!(s.running().is_empty());
    let pending: Vec<&Task> = s.tasks.values().filter(|t| t.node.is_none()).collect();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].note.as_deref().unwrap().contains("1 drained"));
    s.node_mut("n1").active = true;
    s.converge();
    assert_eq!(s.running().len(), 1);
}

fn start_update(s: &mut Sim, cmd: &str) {
    s.previous = Some(s.spec.clone());
    s.spec.task = template(cmd);
    s.version += 1;
    s.update = Some(UpdateStatus {
        state: UpdateState::Updating,
        started_ms: s.now,
        completed_ms: None,
        message: String::new(),
    });
}

fn templates_running(s: &Sim) -> Vec<String> {
    s.running()
        .iter()
        .map(|t| t.template.command[0].clone())
        .collect()
}

#[test]
fn stop_first_update_one_at_a_time_with_delay() {
    let mut s = Sim::new(3, &["n1", "n2", "n3"]);
    s.spec.update.delay_ms = 2_000;
    s.converge();
    start_update(&mut s, "v2");
    let mut fewest = 3;
    let mut seen_mixed = false;
    for _ in 0..100 {
        s.lead();
        s.nodes_act();
        s.now += 500;
        fewest = fewest.min(s.running().len());
        let t = templates_running(&s);
        seen_mixed |= t.contains(&"v1".to_string()) && t.contains(&"v2".to_string());
        if s.update.as_ref().unwrap().state == UpdateState::Completed {
            break;
        }
    }
    assert_eq!(s.update.as_ref().unwrap().state, UpdateState::Completed);
    assert_eq!(templates_running(&s), ["v2", "v2", "v2"]);
    assert_eq!(
        fewest, 2,
        "stop-first, parallelism 1: one task down at a time"
    );
    assert!(seen_mixed);
    assert_eq!(s.counts(), [1, 1, 1], "the slots keep their spread");
}

#[test]
fn start_first_update_never_has_fewer_tasks_up() {
    let mut s = Sim::new(3, &["n1", "n2", "n3"]);
    s.spec.update.order = UpdateOrder::StartFirst;
    s.spec.update.parallelism = 1;
    s.converge();
    start_update(&mut s, "v2");
    for _ in 0..100 {
        s.lead();
        assert!(
            s.running().len() >= 3,
            "fewer than 3 up during a start-first update"
        );
        s.nodes_act();
        assert!(s.running().len() >= 3);
        s.now += 500;
        if s.update.as_ref().unwrap().state == UpdateState::Completed {
            break;
        }
    }
    assert_eq!(templates_running(&s), ["v2", "v2", "v2"]);
    s.converge();
    assert_eq!(s.running().len(), 3);
}

#[test]
fn a_failing_update_pauses_or_rolls_back() {
    let mut s = Sim::new(3, &["n1", "n2", "n3"]);
    s.converge();
    s.failing.push("bad".into());
    start_update(&mut s, "bad");
    // The failed task keeps being restarted (its policy says so), the update stays paused.
    s.run_for(60);
    let u = s.update.clone().unwrap();
    assert_eq!(u.state, UpdateState::Paused);
    assert!(
        u.message.contains("update paused due to failure"),
        "{}",
        u.message
    );
    // Paused after the first batch: the other two still run the old template.
    assert_eq!(templates_running(&s), ["v1", "v1"]);

    let mut s = Sim::new(3, &["n1", "n2", "n3"]);
    s.spec.update.failure_action = UpdateFailureAction::Rollback;
    s.spec.update.order = UpdateOrder::StartFirst;
    s.converge();
    s.failing.push("bad".into());
    start_update(&mut s, "bad");
    s.converge();
    let u = s.update.clone().unwrap();
    assert_eq!(u.state, UpdateState::RollbackCompleted, "{u:?}");
    assert_eq!(templates_running(&s), ["v1", "v1", "v1"]);
    assert_eq!(s.spec.task.command, ["v1"]);
    assert_eq!(s.previous.as_ref().unwrap().task.command, ["bad"]);
}

#[test]
fn completion_waits_for_the_monitor() {
    let mut s = Sim::new(1, &["n1"]);
    s.spec.update.monitor_ms = 10_000;
    s.converge();
    start_update(&mut s, "v2");
    let t0 = s.now;
    for _ in 0..100 {
        s.lead();
        s.nodes_act();
        s.now += 500;
        if s.update.as_ref().unwrap().state == UpdateState::Completed {
            break;
        }
    }
    assert!(s.now - t0 >= 10_000);
    // A task that dies within the monitor fails the update even though it was up.
    let mut s = Sim::new(1, &["n1"]);
    s.spec.update.monitor_ms = 10_000;
    s.converge();
    start_update(&mut s, "v2");
    for _ in 0..6 {
        s.lead();
        s.nodes_act();
        s.now += 500;
    }
    let id = s.running()[0].id.clone();
    s.set(&id, TaskState::Failed);
    s.lead();
    assert_eq!(s.update.as_ref().unwrap().state, UpdateState::Paused);
}

#[test]
fn global_mode_follows_the_nodes() {
    let mut s = Sim::new(0, &["n1", "n2"]);
    s.spec.mode = Mode::Global;
    s.converge();
    assert_eq!(s.counts(), [1, 1]);
    s.nodes.push(node("n3"));
    s.converge();
    assert_eq!(s.counts(), [1, 1, 1]);
    s.node_mut("n2").active = false;
    s.converge();
    assert_eq!(s.per_node().keys().collect::<Vec<_>>(), ["n1", "n3"]);
    s.node_mut("n2").active = true;
    s.converge();
    assert_eq!(s.counts(), [1, 1, 1]);
    assert!(s.running().iter().all(|t| t.slot == 0));
    // A global update goes node by node.
    start_update(&mut s, "v2");
    s.converge();
    assert_eq!(templates_running(&s), ["v2", "v2", "v2"]);
}

#[test]
fn constraints_place_and_wait() {
    let mut s = Sim::new(2, &["n1", "n2", "n3"]);
    s.spec.task.constraints = vec![Constraint::parse("node.labels.zone==a").unwrap()];
    s.converge();
    assert!(s.running().is_empty());
    assert!(s.tasks.values().all(|t| t.node.is_none()));
    s.node_mut("n2").labels.insert("zone".into(), "a".into());
    s.converge();
    assert_eq!(s.per_node()["n2"], 2);
    // The label goes: the tasks are moved off (and wait, since no node matches).
    s.node_mut("n2").labels.clear();
    s.converge();
    assert!(s.running().is_empty());
}

#[test]
fn history_is_bounded_per_slot() {
    let mut s = Sim::new(1, &["n1"]);
    s.spec.task.restart.delay_ms = 0;
    s.converge();
    for _ in 0..12 {
        let id = s.running()[0].id.clone();
        s.set(&id, TaskState::Failed);
        s.converge();
    }
    assert!(
        s.tasks.len() <= 1 + HISTORY_LIMIT,
        "{} tasks kept",
        s.tasks.len()
    );
    assert_eq!(s.running().len(), 1);
}

#[test]
fn a_stale_plan_changes_nothing_twice() {
    // The same state planned twice gives the same answer (apart from new ids): the leader's
    // fenced write is what makes a plan happen once.
    let mut s = Sim::new(3, &["n1", "n2", "n3"]);
    let a = s.plan();
    let b = s.plan();
    assert_eq!(a.changes.len(), b.changes.len());
    assert_eq!(a.changes.len(), 3);
}
