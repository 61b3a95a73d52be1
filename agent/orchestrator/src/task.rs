//! Tasks: one slot of a service, as the leader assigns it and as its node reports it.
//!
//! The leader writes [`Task`] (what should run where); the node that runs it writes
//! [`TaskStatus`] under a key of its own, so the two never contend for one record.

use serde::{Deserialize, Serialize};

use crate::spec::TaskTemplate;

/// What the leader wants of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    /// Stop it; the slot goes on (or is retired, see [`ShutdownReason::retires`]).
    Shutdown,
}

/// Why the leader stopped a task: decides whether its slot gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownReason {
    /// Replaced by a task of the new template.
    Updated,
    /// It ended and the restart policy starts a new one.
    Restarted,
    /// Its node went down; a new one starts elsewhere.
    NodeDown,
    /// Its node was drained or no longer meets the constraints; moved elsewhere.
    Moved,
    /// Another task of the slot took over (a replacement that came up).
    Superseded,
    /// The slot was scaled away, or (global mode) its node left the service.
    ScaledDown,
}

impl ShutdownReason {
    /// Whether the slot ends with this task.
    pub fn retires(self) -> bool {
        self == ShutdownReason::ScaledDown
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::Updated => "replaced by an update",
            Self::Restarted => "restarted",
            Self::NodeDown => "node down",
            Self::Moved => "moved off its node",
            Self::Superseded => "superseded",
            Self::ScaledDown => "scaled down",
        }
    }
}

/// A task as the leader writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub service: String,
    /// Tasks of an earlier service of the same name are not this one's.
    pub service_id: String,
    /// Replicated: 1, 2, ...; global: 0 (the node is the slot).
    pub slot: u64,
    /// `None` while no node can take it (pending).
    pub node: Option<String>,
    pub desired: Desired,
    #[serde(default)]
    pub shutdown_reason: Option<ShutdownReason>,
    /// The service's spec version the template is from (for display).
    pub spec_version: u64,
    pub template: TaskTemplate,
    /// Wall-clock milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// A restart's delay: the node starts it no earlier.
    #[serde(default)]
    pub start_after_ms: Option<u64>,
    /// Why it is pending, when it is.
    #[serde(default)]
    pub note: Option<String>,
}

impl Task {
    /// `web.1`, or `web.n1` in global mode: the name `service ps` shows and the default hostname.
    pub fn name(&self) -> String {
        if self.slot == 0 {
            format!("{}.{}", self.service, self.node.as_deref().unwrap_or("?"))
        } else {
            format!("{}.{}", self.service, self.slot)
        }
    }

    /// The name of the container that runs it: `web.1.<id>`, unique per task.
    pub fn container_name(&self) -> String {
        format!("{}.{}", self.name(), &self.id[..self.id.len().min(12)])
    }
}

/// States a node reports, in Docker's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Assigned, not yet picked up by the node (or waiting for a restart delay).
    Assigned,
    /// Being started: sandbox, process.
    Preparing,
    /// The process runs but is not yet taking traffic (health check or port not yet passed).
    Starting,
    /// Runs and takes traffic.
    Running,
    /// Exited with 0.
    Complete,
    /// Exited non-zero, was killed, or turned unhealthy.
    Failed,
    /// Could not be started at all.
    Rejected,
    /// Stopped because the leader asked.
    Shutdown,
}

impl TaskState {
    /// The task will not run again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Complete | Self::Failed | Self::Rejected | Self::Shutdown
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Assigned => "assigned",
            Self::Preparing => "preparing",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Shutdown => "shutdown",
        }
    }
}

/// A task as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: TaskState,
    /// When it entered `state`.
    pub since_ms: u64,
    /// When it first started taking traffic.
    #[serde(default)]
    pub running_since_ms: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The container that runs (ran) it.
    #[serde(default)]
    pub container: Option<String>,
    /// The node that wrote this.
    pub node: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

impl UpdateState {
    pub fn is_rollback(self) -> bool {
        matches!(
            self,
            Self::RollbackStarted | Self::RollbackPaused | Self::RollbackCompleted
        )
    }

    pub fn in_progress(self) -> bool {
        matches!(self, Self::Updating | Self::RollbackStarted)
    }
}

/// A rolling update's progress, kept in the service record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub started_ms: u64,
    #[serde(default)]
    pub completed_ms: Option<u64>,
    #[serde(default)]
    pub message: String,
}
