//! The orchestrator: on the leader only, plans every service's tasks from the cluster view
//! (pure code in `netagent-orchestrator`) and writes the plans to the store, each write fenced
//! on the leader key and on the service's own orchestrator key. The nodes run what is
//! assigned to them (`crate::runner`).

mod election;
mod scope;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use netagent_orchestrator::{
    Desired, Input, NodeInfo, Plan, ServiceState, TaskChange, UpdateState, UpdateStatus,
};
use netagent_store::{Compare, Op, Revision, Store};
use tokio::sync::watch;

pub use election::LeaderRecord;

use crate::model::{Availability, Service, keys};
use crate::services::tasks::now_ms;
use crate::view::ClusterView;

/// Passes run on every view change, and at least this often (restart delays, update delays
/// and monitors are deadlines, not events).
const TICK: Duration = Duration::from_millis(500);
/// Changes arriving together are planned together.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// etcd refuses transactions of more than 128 operations; the rest waits for the next pass.
const MAX_OPS: usize = 100;

/// Runs for the agent's life: campaigns whenever no one leads, orchestrates while it does.
pub async fn run(
    store: Arc<dyn Store>,
    node: String,
    ttl: Duration,
    mut view_rx: watch::Receiver<Arc<ClusterView>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let view = view_rx.borrow_and_update().clone();
        if view.revision > 0 {
            match election::campaign(&store, &node, ttl, &view).await {
                Ok(Some(term)) => {
                    let resign = tokio::select! {
                        _ = lead(&store, &node, &term, view_rx.clone()) => false,
                        _ = shutdown.wait_for(|s| *s) => true,
                    };
                    if resign {
                        term.resign(&*store).await;
                        return;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
            }
        }
        tokio::select! {
            _ = view_rx.changed() => {}
            _ = tokio::time::sleep(ttl / 2) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Orchestrates until the term ends.
async fn lead(
    store: &Arc<dyn Store>,
    node: &str,
    term: &election::Term,
    mut view_rx: watch::Receiver<Arc<ClusterView>>,
) {
    let mut lost = term.lost.clone();
    // Plans start from a view that includes everything the previous leader wrote.
    if view_rx
        .wait_for(|v| v.revision >= term.revision)
        .await
        .is_err()
    {
        return;
    }
    // The view of the last pass that wrote everything it planned. Planning is a function of
    // the inputs (`same_orchestration`) and of the clock, and only rolling updates read the
    // clock (their delay and monitor windows): a view change that leaves the inputs shared (a
    // container or an endpoint came or went) needs no pass, one that changes them plans the
    // services it touched (`scope`), and the tick plans only the services with an update in
    // progress. A failed write makes the next pass a whole one.
    let mut last: Option<Arc<ClusterView>> = None;
    let mut last_pass = tokio::time::Instant::now();
    loop {
        if *lost.borrow() {
            return;
        }
        let view = view_rx.borrow_and_update().clone();
        if view.leader.as_deref() != Some(node) {
            tracing::warn!(leader = ?view.leader, "the view shows another leader; stepping down");
            return;
        }
        let changed = !last.as_ref().is_some_and(|l| l.same_orchestration(&view));
        if changed || last_pass.elapsed() >= TICK {
            let scope = match &last {
                _ if !changed => Scope::ClockDriven,
                Some(l) => {
                    scope::touched_services(l, &view).map_or(Scope::Everything, Scope::Services)
                }
                None => Scope::Everything,
            };
            let written = pass(&**store, term.revision, &view, &scope).await;
            last = written.then_some(view);
            last_pass = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = view_rx.changed() => tokio::time::sleep(DEBOUNCE).await,
            _ = tokio::time::sleep_until(last_pass + TICK) => {}
            _ = lost.changed() => return,
        }
    }
}

fn nodes_of(view: &ClusterView) -> Vec<NodeInfo> {
    view.nodes
        .values()
        .map(|n| NodeInfo {
            name: n.name.clone(),
            ready: view.alive.contains(&n.name),
            active: n.availability == Availability::Active,
            labels: n.labels.clone(),
        })
        .collect()
}

/// What a pass plans.
#[derive(Clone, PartialEq, Eq)]
enum Scope {
    /// Every service, and the garbage of removed ones.
    Everything,
    /// The services whose plan can change with the clock alone: those with a rolling update
    /// (or rollback) in progress.
    ClockDriven,
    /// These services (a view change touched them), and the clock-driven ones.
    Services(std::collections::BTreeSet<String>),
}

impl Scope {
    fn plans(&self, svc: &Service) -> bool {
        match self {
            Scope::Everything => true,
            Scope::ClockDriven => clock_driven(svc),
            Scope::Services(names) => names.contains(&svc.name) || clock_driven(svc),
        }
    }
}

fn clock_driven(svc: &Service) -> bool {
    svc.update_status
        .as_ref()
        .is_some_and(|u| u.state.in_progress())
}

/// One pass over the services of `scope`; whether every write it planned succeeded (and, for
/// a whole pass, all garbage went).
async fn pass(store: &dyn Store, fence: Revision, view: &ClusterView, scope: &Scope) -> bool {
    if *scope == Scope::ClockDriven && !view.services.values().any(clock_driven) {
        return true;
    }
    let nodes = nodes_of(view);
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for t in view.tasks.values() {
        if t.desired == Desired::Running
            && let Some(n) = &t.node
        {
            // A key is copied once per node, not once per task.
            match load.get_mut(n.as_str()) {
                Some(count) => *count += 1,
                None => {
                    load.insert(n.clone(), 1);
                }
            }
        }
    }
    // Tasks by service in one walk: a filter per service made a pass O(services x tasks).
    // A service with a task no node could take is planned by every pass: whatever freed
    // room (another service's task gone) may be no change of its own.
    let mut by_service: BTreeMap<(&str, &str), Vec<_>> = BTreeMap::new();
    let mut pending: std::collections::BTreeSet<&str> = Default::default();
    for t in view.tasks.values() {
        if t.node.is_none() && t.desired == Desired::Running {
            pending.insert(t.service.as_str());
        }
        by_service
            .entry((t.service.as_str(), t.service_id.as_str()))
            .or_default()
            .push((t, view.task_status.get(&t.id)));
    }
    let now = now_ms();
    let mut written = true;
    for svc in view.services.values() {
        let Some(spec) = &svc.spec else { continue };
        if !scope.plans(svc) && !pending.contains(svc.name.as_str()) {
            continue;
        }
        let tasks = by_service
            .remove(&(svc.name.as_str(), svc.id.as_str()))
            .unwrap_or_default();
        let plan = netagent_orchestrator::plan(
            Input {
                service: ServiceState {
                    name: &svc.name,
                    id: &svc.id,
                    version: svc.version,
                    spec,
                    update: svc.update_status.as_ref(),
                },
                tasks,
                nodes: &nodes,
                load_total: &load,
                now_ms: now,
            },
            &mut crate::model::new_id,
        );
        if plan.is_empty() {
            continue;
        }
        if let Err(e) = write(store, fence, view, svc, plan, now).await {
            tracing::warn!(service = %svc.name, error = %e, "orchestrator write failed; will retry");
            written = false;
        }
    }
    if *scope == Scope::Everything {
        written &= collect_garbage(store, fence, view).await;
    }
    written
}

/// Writes one service's plan in one transaction, fenced: it fails (and the next pass plans
/// again) if leadership moved, the service changed, or this view missed the leader's last
/// write for the service.
async fn write(
    store: &dyn Store,
    fence: Revision,
    view: &ClusterView,
    svc: &Service,
    plan: Plan,
    now: u64,
) -> crate::error::Result<()> {
    let orch_key = keys::orchestrator(&svc.name);
    let svc_key = keys::service(&svc.name);
    let mut compares = vec![Compare::mod_revision(keys::LEADER, fence)];
    compares.push(match view.revisions.get(&svc_key) {
        Some(&r) => Compare::mod_revision(svc_key.clone(), r),
        None => return Ok(()),
    });
    compares.push(match view.revisions.get(&orch_key) {
        Some(&r) => Compare::mod_revision(orch_key.clone(), r),
        None => Compare::absent(orch_key.clone()),
    });
    let mut ops = vec![Op::put(orch_key, now.to_string().into_bytes())];
    let mut record = svc.clone();
    let mut record_changed = false;
    if let Some(message) = &plan.rollback {
        let Some(previous) = record.previous_spec.take() else {
            tracing::warn!(service = %svc.name, "update failed but there is no previous spec to roll back to");
            return Ok(());
        };
        record.previous_spec = record.spec.replace(previous);
        record.version += 1;
        record.update_status = Some(UpdateStatus {
            state: UpdateState::RollbackStarted,
            started_ms: now,
            completed_ms: None,
            message: message.clone(),
        });
        record_changed = true;
        tracing::warn!(service = %svc.name, %message, "rolling back");
    }
    if let Some(status) = plan.update {
        tracing::info!(service = %svc.name, state = ?status.state, message = %status.message, "update status");
        record.update_status = Some(status);
        record_changed = true;
    }
    if record_changed {
        ops.push(Op::put(
            svc_key,
            serde_json::to_vec(&record)
                .map_err(|e| crate::error::AgentError::Internal(e.to_string()))?,
        ));
    }
    let total = plan.changes.len();
    for change in plan.changes {
        if ops.len() + 2 > MAX_OPS {
            tracing::info!(service = %svc.name, total, "plan larger than one transaction; the rest follows");
            break;
        }
        match change {
            TaskChange::Create(t) | TaskChange::Update(t) => {
                let value = serde_json::to_vec(&t)
                    .map_err(|e| crate::error::AgentError::Internal(e.to_string()))?;
                ops.push(Op::put(keys::task(&t.id), value));
            }
            TaskChange::Delete(id) => {
                ops.push(Op::delete(keys::task(&id)));
                ops.push(Op::delete(keys::task_status(&id)));
            }
        }
    }
    if store.txn(compares, ops).await? {
        tracing::debug!(service = %svc.name, changes = total, "plan written");
    }
    Ok(())
}

/// Tasks of services that are gone (or replaced by a new service of the same name), reports
/// of tasks that are gone, orchestrator keys of removed services.
/// Deletes the tasks and keys of removed services; whether that succeeded (or there were
/// none).
async fn collect_garbage(store: &dyn Store, fence: Revision, view: &ClusterView) -> bool {
    let mut ops = Vec::new();
    for t in view.tasks.values() {
        let current = view
            .services
            .get(&t.service)
            .is_some_and(|s| s.id == t.service_id && s.spec.is_some());
        if !current {
            ops.push(Op::delete(keys::task(&t.id)));
            ops.push(Op::delete(keys::task_status(&t.id)));
        }
    }
    for id in view.task_status.keys() {
        if !view.tasks.contains_key(id) {
            ops.push(Op::delete(keys::task_status(id)));
        }
    }
    for key in view.revisions.keys() {
        if let Some(name) = key.strip_prefix(keys::ORCHESTRATOR)
            && !view.services.contains_key(name)
        {
            ops.push(Op::delete(key.clone()));
        }
    }
    if ops.is_empty() {
        return true;
    }
    // More than one transaction holds: the rest waits for the next pass, a whole one.
    let all = ops.len() <= MAX_OPS;
    ops.truncate(MAX_OPS);
    let compares = vec![Compare::mod_revision(keys::LEADER, fence)];
    if let Err(e) = store.txn(compares, ops).await {
        tracing::warn!(error = %e, "cannot remove tasks of removed services yet");
        return false;
    }
    all
}
