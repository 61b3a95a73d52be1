//! The rolling update: replaces tasks of an old template in batches of `parallelism`, waits
//! `delay` after a batch is up before the next, watches each new task for `monitor`, and on a
//! failure pauses, goes on, or asks for a rollback. Its only memory is the update status in the
//! service record (state and start time); everything else is read off the tasks, so a new
//! leader continues an update where the old one left it.
//!
//! Stop-first stops the old task and lets the slot logic start the new one once it has ended;
//! start-first starts the new task and the slot logic stops the old one once the new is up.

use crate::plan::{Key, Pass};
use crate::spec::{UpdateFailureAction, UpdateOrder};
use crate::task::{ShutdownReason, UpdateState, UpdateStatus};

#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub status: Option<UpdateStatus>,
    pub rollback: Option<String>,
}

pub(crate) fn advance(p: &mut Pass) -> Outcome {
    let stored = p.svc.update.cloned();
    let rolling_back = stored.as_ref().is_some_and(|s| s.state.is_rollback());
    let cfg = if rolling_back {
        p.svc.spec.rollback.clone()
    } else {
        p.svc.spec.update.clone()
    };
    let template = p.template().clone();

    // A pending task of an old template protects nothing: replace it at once.
    for i in 0..p.tasks.len() {
        let w = &p.tasks[i];
        if w.live() && w.task.node.is_none() && w.task.template != template {
            p.shutdown(i, ShutdownReason::Updated);
        }
    }

    let started = stored.as_ref().map_or(p.now, |s| s.started_ms);
    let mut outdated: Vec<(Key, Vec<usize>)> = Vec::new();
    let mut in_flight = 0usize;
    for (key, list) in p.by_key() {
        let live: Vec<usize> = list
            .iter()
            .copied()
            .filter(|&i| p.tasks[i].live())
            .collect();
        if live.is_empty() {
            // Stopped for the update: in flight until its successor is up (the slot logic
            // creates it once the old task has ended, possibly later in this very pass).
            let w = &p.tasks[list[0]];
            let successor_due = match &key {
                Key::Slot(_) => true,
                Key::Node(n) => p
                    .nodes
                    .iter()
                    .any(|x| x.name == *n && crate::schedule::eligible(x, &template)),
            };
            if w.task.shutdown_reason == Some(ShutdownReason::Updated) && successor_due {
                in_flight += 1;
            }
            continue;
        }
        let fresh: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| p.tasks[i].task.template == template)
            .collect();
        if fresh.is_empty() {
            if live.iter().any(|&i| p.placed_well(&p.tasks[i])) {
                outdated.push((key, live));
            }
            continue;
        }
        let coming = fresh.iter().any(|&i| {
            let w = &p.tasks[i];
            !w.up() && !w.terminal() && w.task.created_ms >= started
        });
        if coming && !fresh.iter().any(|&i| p.tasks[i].up()) {
            in_flight += 1;
        }
    }

    let mut status = match &stored {
        Some(s) if s.state.in_progress() => s.clone(),
        Some(s) if matches!(s.state, UpdateState::Paused | UpdateState::RollbackPaused) => {
            return Outcome::default();
        }
        _ if outdated.is_empty() && in_flight == 0 => return Outcome::default(),
        // Tasks of an old template and no update under way (the record was written without
        // one): start it now.
        _ => UpdateStatus {
            state: UpdateState::Updating,
            started_ms: p.now,
            completed_ms: None,
            message: "update in progress".into(),
        },
    };

    // Tasks of the new template that ended on their own while watched.
    let failed = p.tasks.iter().find(|w| {
        w.task.template == template
            && w.task.created_ms >= status.started_ms
            && w.ended_on_own()
            && w.ended_ms() >= status.started_ms
            && w.status
                .as_ref()
                .and_then(|s| s.running_since_ms)
                .is_none_or(|up| w.ended_ms().saturating_sub(up) <= cfg.monitor_ms)
    });
    if let Some(w) = failed {
        let why = w
            .status
            .as_ref()
            .and_then(|s| s.error.clone())
            .unwrap_or_else(|| w.state().as_str().to_string());
        let task = w.task.name();
        let what = if rolling_back { "rollback" } else { "update" };
        match cfg.failure_action {
            UpdateFailureAction::Continue => {}
            UpdateFailureAction::Rollback if !rolling_back => {
                return Outcome {
                    status: None,
                    rollback: Some(format!(
                        "update rolled back due to failure or early termination of task {task}: {why}"
                    )),
                };
            }
            _ => {
                status.state = if rolling_back {
                    UpdateState::RollbackPaused
                } else {
                    UpdateState::Paused
                };
                status.message = format!(
                    "{what} paused due to failure or early termination of task {task}: {why}"
                );
                return changed(stored, status);
            }
        }
    }

    let last_up = p
        .tasks
        .iter()
        .filter(|w| w.task.template == template && w.task.created_ms >= status.started_ms)
        .filter_map(|w| w.status.as_ref().and_then(|s| s.running_since_ms))
        .max();
    if in_flight == 0 && !outdated.is_empty() {
        if last_up.is_none_or(|t| p.now >= t + cfg.delay_ms) {
            let n = if cfg.parallelism == 0 {
                outdated.len()
            } else {
                (cfg.parallelism as usize).min(outdated.len())
            };
            for (key, live) in outdated.into_iter().take(n) {
                match cfg.order {
                    UpdateOrder::StartFirst => match key {
                        Key::Slot(s) => {
                            p.create(s, None, None);
                        }
                        Key::Node(node) => {
                            p.create(0, Some(&node), None);
                        }
                    },
                    UpdateOrder::StopFirst => {
                        for i in live {
                            p.shutdown(i, ShutdownReason::Updated);
                        }
                    }
                }
            }
        }
    } else if in_flight == 0 && last_up.is_none_or(|t| p.now >= t + cfg.monitor_ms) {
        // Nothing old left and the last new task has been watched long enough.
        let rollback = status.state.is_rollback();
        status.state = if rollback {
            UpdateState::RollbackCompleted
        } else {
            UpdateState::Completed
        };
        status.completed_ms = Some(p.now);
        status.message = if !rollback {
            "update completed".into()
        } else if status.message.starts_with("update rolled back") {
            // Why it was rolled back stays what the status says.
            format!("{}; rollback completed", status.message)
        } else {
            "rollback completed".into()
        };
    }
    changed(stored, status)
}

fn changed(stored: Option<UpdateStatus>, status: UpdateStatus) -> Outcome {
    Outcome {
        status: (stored.as_ref() != Some(&status)).then_some(status),
        rollback: None,
    }
}
