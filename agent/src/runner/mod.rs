//! This node's share of the orchestration: run the tasks the leader assigned here, stop the
//! ones it wants stopped (and any whose task is gone), and report each task's state.
//!
//! Level-triggered like the reconciler: a pass compares the tasks in the view with the
//! containers on this node and starts one operation per task that needs one; after a view
//! change only the tasks and containers the change touched (`scope`), at least every `TICK`
//! all of them. What the runner knows of each task (`facts`) is written to the task's status
//! key whenever the view shows something else, so reports lost to a store outage are made
//! again.

mod ready;
mod scope;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netagent_orchestrator::{Desired, MountKind, Task, TaskState, TaskStatus};
use netagent_store::{Op, Store};
use tokio::sync::watch;

use crate::containers::ContainerCreate;
use crate::model::{Container, Protocol, keys};
use crate::runtime::{Runtime, SandboxExtras, lock, logs};
use crate::sandbox::{self, ProcessHandle};
use crate::services::tasks::now_ms;
use crate::view::ClusterView;

/// Passes run on view changes, and whole ones at least this often (restart delays end, reports
/// retried).
const TICK: Duration = Duration::from_secs(1);

pub struct Runner {
    runtime: Arc<Runtime>,
    store: Arc<dyn Store>,
    node: String,
    view_rx: watch::Receiver<Arc<ClusterView>>,
    /// Logs of this node's ended tasks, by task id, for `service logs`.
    archive: PathBuf,
    /// Tasks with an operation (start, stop, removal) in flight.
    busy: Mutex<HashSet<String>>,
    /// Readiness watchers (health checks) of running tasks.
    watchers: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// What this node knows of its tasks; reported to the store.
    facts: Mutex<HashMap<String, TaskStatus>>,
    wake: tokio::sync::Notify,
}

/// Releases a task's busy mark when its operation ends, however it ends.
struct Busy(Arc<Runner>, String);

impl Drop for Busy {
    fn drop(&mut self) {
        lock(&self.0.busy).remove(&self.1);
    }
}

impl Runner {
    pub fn new(
        runtime: Arc<Runtime>,
        store: Arc<dyn Store>,
        node: String,
        view_rx: watch::Receiver<Arc<ClusterView>>,
        state_dir: &std::path::Path,
    ) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            store,
            node,
            view_rx,
            archive: state_dir.join("task-logs"),
            busy: Mutex::default(),
            watchers: Mutex::default(),
            facts: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Runs for the agent's life, once the runtime has adopted this node's containers.
    pub async fn run(self: Arc<Self>) {
        self.runtime.reconciler.wait_adopted().await;
        let mut rx = self.view_rx.clone();
        // The view the last pass saw, and when the last whole pass ran: a pass after a view
        // change looks only at what the change touched, one woken by a fact or a TICK (a
        // restart delay ending, an operation ended without a fact) at everything.
        let mut last: Option<Arc<ClusterView>> = None;
        let mut whole_at = tokio::time::Instant::now();
        let mut woken = true;
        loop {
            let view = rx.borrow_and_update().clone();
            if view.revision > 0 {
                match last
                    .as_ref()
                    .filter(|_| !woken && whole_at.elapsed() < TICK)
                {
                    Some(old) => {
                        let touched = scope::touched(&self.node, old, &view);
                        if !touched.is_empty() {
                            self.pass(&view, Some(&touched));
                        }
                    }
                    None => {
                        self.pass(&view, None);
                        self.prune_archive(&view);
                        whole_at = tokio::time::Instant::now();
                    }
                }
                self.report(&view).await;
                last = Some(view);
            }
            woken = tokio::select! {
                _ = rx.changed() => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    false
                }
                _ = self.wake.notified() => true,
                _ = tokio::time::sleep(TICK) => true,
            };
        }
    }

    fn fact(&self, id: &str) -> Option<TaskStatus> {
        lock(&self.facts).get(id).cloned()
    }

    /// Whether what is known of task `id` ([`Runner::fact`], else the view's status) is that
    /// it ended.
    fn known_terminal(&self, id: &str, view: &ClusterView) -> bool {
        match lock(&self.facts).get(id) {
            Some(s) => s.state.is_terminal(),
            None => view
                .task_status
                .get(id)
                .is_some_and(|s| s.state.is_terminal()),
        }
    }

    /// Records what is now known of a task.
    fn set_fact(
        &self,
        task: &Task,
        state: TaskState,
        error: Option<String>,
        exit_code: Option<i32>,
        container: Option<String>,
    ) {
        let now = now_ms();
        let mut facts = lock(&self.facts);
        let prev = facts.get(&task.id);
        if prev.is_some_and(|p| p.state == state && p.error == error) {
            return;
        }
        let running_since_ms = prev
            .and_then(|p| p.running_since_ms)
            .or((state == TaskState::Running).then_some(now));
        let container = container.or_else(|| prev.and_then(|p| p.container.clone()));
        tracing::info!(task = %task.name(), id = %task.id, state = state.as_str(), error = ?error, "task state");
        facts.insert(
            task.id.clone(),
            TaskStatus {
                state,
                since_ms: now,
                running_since_ms,
                error,
                exit_code,
                container,
                node: self.node.clone(),
            },
        );
        drop(facts);
        self.wake.notify_one();
    }

    /// Marks `id` busy; `None` if an operation is already in flight for it.
    fn claim(self: &Arc<Self>, id: &str) -> Option<Busy> {
        lock(&self.busy)
            .insert(id.to_string())
            .then(|| Busy(self.clone(), id.to_string()))
    }

    /// A task's container on this node: the runner names each `Task::container_name`.
    fn container_of<'v>(&self, view: &'v ClusterView, task: &Task) -> Option<&'v Container> {
        view.containers
            .get(&task.container_name())
            .filter(|c| c.node == self.node && c.task.as_ref() == Some(&task.id))
    }

    /// This node's task containers by task id, from one walk of the view's containers (a
    /// search per task made a pass O(tasks x containers)).
    fn containers_by_task<'v>(&self, view: &'v ClusterView) -> HashMap<&'v str, &'v Container> {
        view.containers
            .values()
            .filter(|c| c.node == self.node)
            .filter_map(|c| Some((c.task.as_deref()?, c)))
            .collect()
    }

    /// One pass: an operation for every task of this node that needs one; with `scope`,
    /// only for the tasks and containers a view change touched.
    fn pass(self: &Arc<Self>, view: &ClusterView, scope: Option<&scope::Touched>) {
        let now = now_ms();
        let me = self.node.as_str();
        match scope {
            None => {
                for task in view.tasks.values() {
                    if task.node.as_deref() == Some(me) {
                        self.consider(view, task, self.container_of(view, task), now);
                    }
                }
                // Containers of tasks that no longer exist (their service was removed, or
                // the leader gave up on them while this node was away).
                for c in view.containers.values() {
                    self.consider_orphan(view, c);
                }
            }
            Some(touched) => {
                for id in &touched.tasks {
                    let Some(task) = view.tasks.get(id).filter(|t| t.node.as_deref() == Some(me))
                    else {
                        continue;
                    };
                    self.consider(view, task, self.container_of(view, task), now);
                }
                for name in &touched.containers {
                    if let Some(c) = view.containers.get(name) {
                        self.consider_orphan(view, c);
                    }
                }
            }
        }
    }

    /// Starts the operation `task`, one of this node's, needs, if any; `container` is its
    /// container on this node.
    fn consider(
        self: &Arc<Self>,
        view: &ClusterView,
        task: &Task,
        container: Option<&Container>,
        now: u64,
    ) {
        // Most tasks, most passes: running and watched, nothing to do. Decided on
        // references, as the operations below would decide it, without copying anything.
        if task.desired == Desired::Running
            && container.is_some_and(|c| {
                c.exit.is_none()
                    && c.pid.is_some()
                    && lock(&self.watchers).contains_key(&task.id)
                    && !self.known_terminal(&task.id, view)
            })
        {
            return;
        }
        let container = container.cloned();
        let known = self
            .fact(&task.id)
            .or_else(|| view.task_status.get(&task.id).cloned());
        let Some(busy) = self.claim(&task.id) else {
            return;
        };
        let me = self.clone();
        let task = task.clone();
        match (task.desired, container) {
            (Desired::Shutdown, Some(c)) => {
                tokio::spawn(async move {
                    let _busy = busy;
                    me.stop(&task, &c.name, TaskState::Shutdown, None, None)
                        .await;
                });
            }
            (Desired::Shutdown, None) => {
                if known.as_ref().is_none_or(|s| !s.state.is_terminal()) {
                    self.set_fact(&task, TaskState::Shutdown, None, None, None);
                }
            }
            (Desired::Running, Some(c)) => {
                if known.as_ref().is_some_and(|s| s.state.is_terminal()) {
                    // Reported ended; whatever is left goes.
                    tokio::spawn(async move {
                        let _busy = busy;
                        me.remove_container(&task, &c.name).await;
                    });
                } else if let Some(exit) = &c.exit {
                    let (state, error) = match exit.code {
                        Some(0) => (TaskState::Complete, None),
                        Some(code) => (TaskState::Failed, Some(format!("exit code {code}"))),
                        None => (TaskState::Failed, Some("exited (status unknown)".into())),
                    };
                    let code = exit.code;
                    tokio::spawn(async move {
                        let _busy = busy;
                        me.stop(&task, &c.name, state, error, code).await;
                    });
                } else if c.pid.is_none() {
                    tokio::spawn(async move {
                        let _busy = busy;
                        let why = Some("the start was interrupted".to_string());
                        me.stop(&task, &c.name, TaskState::Failed, why, None).await;
                    });
                } else if !lock(&self.watchers).contains_key(&task.id) {
                    drop(busy);
                    self.watch(&task, &c, known);
                }
            }
            (Desired::Running, None) => match known.as_ref().map(|s| s.state) {
                Some(s) if s.is_terminal() => {}
                Some(TaskState::Starting | TaskState::Running) => {
                    self.set_fact(
                        &task,
                        TaskState::Failed,
                        Some("the container is gone".into()),
                        None,
                        None,
                    );
                }
                _ if task.start_after_ms.is_some_and(|t| t > now) => {
                    if known.is_none() {
                        self.set_fact(&task, TaskState::Assigned, None, None, None);
                    }
                }
                _ => {
                    tokio::spawn(async move {
                        let _busy = busy;
                        me.start(&task).await;
                    });
                }
            },
        }
    }

    /// Removes `c` if it is a task container of this node whose task no longer exists.
    fn consider_orphan(self: &Arc<Self>, view: &ClusterView, c: &Container) {
        let Some(id) = &c.task else { return };
        if c.node != self.node || view.tasks.contains_key(id) {
            return;
        }
        let Some(busy) = self.claim(id) else { return };
        let me = self.clone();
        let (name, id) = (c.name.clone(), id.clone());
        tokio::spawn(async move {
            let _busy = busy;
            tracing::info!(container = %name, task = %id, "removing the container of a task that is gone");
            me.unwatch(&id);
            let logs = me.archive.join(&id);
            if let Err(e) = me
                .runtime
                .remove_task_container(&name, Duration::ZERO, &logs)
                .await
            {
                tracing::warn!(container = %name, error = %e, "removing task container");
            }
            lock(&me.facts).remove(&id);
        });
    }

    /// Starts a task's container; it takes traffic once `watch` says it is ready.
    async fn start(self: &Arc<Self>, task: &Task) {
        self.set_fact(task, TaskState::Preparing, None, None, None);
        let view = self.view_rx.borrow().clone();
        let Some(svc) = view
            .services
            .get(&task.service)
            .filter(|s| s.id == task.service_id)
        else {
            return;
        };
        let mut secrets = Vec::new();
        for s in &task.template.secrets {
            match crate::secrets::value(&*self.store, &s.name).await {
                Ok((data, _)) => secrets.push(sandbox::SecretFile {
                    name: s.target.clone(),
                    data,
                    mode: s.mode,
                }),
                Err(e) => {
                    let why = format!("secret {:?}: {e}", s.name);
                    self.set_fact(task, TaskState::Rejected, Some(why), None, None);
                    return;
                }
            }
        }
        let env = task
            .template
            .env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mounts = task
            .template
            .mounts
            .iter()
            .map(|m| sandbox::MountRequest {
                target: m.target.clone().into(),
                kind: match &m.kind {
                    MountKind::Bind { source, readonly } => sandbox::MountRequestKind::Bind {
                        source: source.into(),
                        readonly: *readonly,
                    },
                    MountKind::Tmpfs { size, mode } => {
                        let mut opts = vec![format!("mode={:o}", mode.unwrap_or(0o1777))];
                        if let Some(size) = size {
                            opts.push(format!("size={size}"));
                        }
                        sandbox::MountRequestKind::Tmpfs {
                            options: opts.join(","),
                        }
                    }
                },
            })
            .collect();
        let extras = SandboxExtras {
            env,
            hostname: Some(
                task.template
                    .hostname
                    .clone()
                    .unwrap_or_else(|| task.name()),
            ),
            mounts,
            secrets,
        };
        let req = ContainerCreate {
            name: Some(task.container_name()),
            networks: svc.networks.iter().map(|n| n.network.clone()).collect(),
            service: Some(svc.name.clone()),
            command: task.template.command.clone(),
            task: Some(task.id.clone()),
            start_unready: true,
            ..Default::default()
        };
        match self.runtime.run_with(&req, &extras).await {
            Ok(c) => {
                self.set_fact(task, TaskState::Starting, None, None, Some(c.name.clone()));
                match crate::containers::get(&*self.store, &c.name).await {
                    Ok(rec) => self.watch(task, &rec.container, self.fact(&task.id)),
                    // The next pass finds it in the view and watches it then.
                    Err(e) => {
                        tracing::warn!(container = %c.name, error = %e, "reading the new task container")
                    }
                }
            }
            Err(e) => {
                self.set_fact(task, TaskState::Rejected, Some(e.to_string()), None, None);
            }
        }
    }

    /// Watches a running task's readiness (and health, if it has a check).
    fn watch(self: &Arc<Self>, task: &Task, c: &Container, known: Option<TaskStatus>) {
        let (Some(pid), Some(start_time)) = (c.pid, c.start_time) else {
            return;
        };
        let process = ProcessHandle { pid, start_time };
        let view = self.view_rx.borrow().clone();
        let ports: BTreeSet<u16> = view
            .services
            .get(&task.service)
            .map(|s| {
                s.ports
                    .iter()
                    .filter(|p| p.protocol == Protocol::Tcp)
                    .map(|p| p.target)
                    .collect()
            })
            .unwrap_or_default();
        let me = self.clone();
        let task = task.clone();
        let name = c.name.clone();
        let already = known.is_some_and(|s| s.state == TaskState::Running);
        if already {
            // Adopted after an agent restart: it was taking traffic; keep its facts.
            lock(&self.facts).entry(task.id.clone()).or_insert_with(|| {
                view.task_status
                    .get(&task.id)
                    .cloned()
                    .unwrap_or(TaskStatus {
                        state: TaskState::Running,
                        since_ms: now_ms(),
                        running_since_ms: Some(now_ms()),
                        error: None,
                        exit_code: None,
                        container: Some(name.clone()),
                        node: self.node.clone(),
                    })
            });
        }
        let id = task.id.clone();
        let handle = tokio::spawn(async move {
            let Some(hc) = task.template.health.clone() else {
                if !already && ready::wait_listening(&process, &ports).await {
                    me.mark_ready(&task, &name).await;
                }
                return;
            };
            let mut healthy = already;
            let mut failures = 0u32;
            loop {
                match ready::check(&process, &hc).await {
                    Ok(()) => {
                        failures = 0;
                        if !healthy {
                            healthy = true;
                            me.mark_ready(&task, &name).await;
                        }
                    }
                    Err(why) => {
                        if !sandbox::is_alive(&process) {
                            return;
                        }
                        failures += 1;
                        tracing::info!(task = %task.name(), failures, %why, "health check failed");
                        if failures >= hc.retries {
                            let Some(busy) = me.claim(&task.id) else {
                                return;
                            };
                            let _busy = busy;
                            let why = format!("unhealthy: {why}");
                            lock(&me.watchers).remove(&task.id);
                            me.stop(&task, &name, TaskState::Failed, Some(why), None)
                                .await;
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(hc.interval_ms)).await;
            }
        });
        if let Some(old) = lock(&self.watchers).insert(id, handle.abort_handle()) {
            old.abort();
        }
    }

    fn unwatch(&self, id: &str) {
        if let Some(h) = lock(&self.watchers).remove(id) {
            h.abort();
        }
    }

    /// The task takes traffic: in the store first (every node's balancer and DNS), then here.
    async fn mark_ready(&self, task: &Task, container: &str) {
        let mut delay = Duration::from_millis(100);
        loop {
            match crate::containers::set_ready(&*self.store, container, true).await {
                Ok(()) => break,
                Err(crate::error::AgentError::NotFound(_)) => return,
                Err(e) => {
                    tracing::warn!(container, error = %e, "cannot mark the task ready yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        self.runtime.reconciler.set_ready(container, true);
        self.runtime.reconciler.pass().await;
        self.set_fact(
            task,
            TaskState::Running,
            None,
            None,
            Some(container.to_string()),
        );
    }

    /// Stops and removes the task's container, then records `state`.
    async fn stop(
        &self,
        task: &Task,
        container: &str,
        state: TaskState,
        error: Option<String>,
        exit_code: Option<i32>,
    ) {
        self.unwatch(&task.id);
        let grace = Duration::from_millis(task.template.stop_grace_ms);
        let logs = self.archive.join(&task.id);
        match self
            .runtime
            .remove_task_container(container, grace, &logs)
            .await
        {
            Ok(()) | Err(crate::error::AgentError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(container, error = %e, "stopping task container; will retry");
                return;
            }
        }
        self.set_fact(task, state, error, exit_code, Some(container.to_string()));
    }

    async fn remove_container(&self, task: &Task, container: &str) {
        self.unwatch(&task.id);
        let logs = self.archive.join(&task.id);
        match self
            .runtime
            .remove_task_container(container, Duration::ZERO, &logs)
            .await
        {
            // Already gone from the store: the view showing it is behind.
            Ok(()) | Err(crate::error::AgentError::NotFound(_)) => {}
            Err(e) => tracing::warn!(container, error = %e, "removing an ended task's container"),
        }
    }

    /// Writes the facts the view does not show yet.
    async fn report(&self, view: &ClusterView) {
        // Only what the view does not show yet is copied out of the lock (usually nothing).
        let facts: Vec<(String, TaskStatus)> = {
            let mut facts = lock(&self.facts);
            if view.revision > 0 {
                // Tasks that are gone; so is what we knew of them.
                facts.retain(|id, _| view.tasks.contains_key(id));
            }
            facts
                .iter()
                .filter(|(id, _)| view.tasks.contains_key(*id))
                .filter(|(id, fact)| {
                    !view
                        .task_status
                        .get(*id)
                        .is_some_and(|s| s.state == fact.state && s.error == fact.error)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (id, fact) in facts {
            let Ok(value) = serde_json::to_vec(&fact) else {
                continue;
            };
            if let Err(e) = self
                .store
                .txn(Vec::new(), vec![Op::put(keys::task_status(&id), value)])
                .await
            {
                tracing::warn!(task = %id, error = %e, "cannot report task state yet");
                return;
            }
        }
    }

    /// Removes kept logs of tasks the leader has forgotten.
    fn prune_archive(&self, view: &ClusterView) {
        let Ok(entries) = std::fs::read_dir(&self.archive) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if !view.tasks.contains_key(&id) && !lock(&self.busy).contains(&id) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// A chunk of a local task's output: from its container while it runs, else from the log
    /// kept when it ended.
    pub fn logs(&self, task: &str, offset: u64, max: usize) -> std::io::Result<logs::Chunk> {
        let view = self.view_rx.borrow().clone();
        let dir = match self.containers_by_task(&view).get(task) {
            Some(c) => self.runtime.log_dir(&c.name),
            None => self.archive.join(task),
        };
        logs::read(&dir, offset, max)
    }
}
