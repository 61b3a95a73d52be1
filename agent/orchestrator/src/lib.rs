//! Service orchestration without I/O.
//!
//! A service's spec says what should run (`spec`); tasks are its slots (`task`); `plan` looks
//! at a service, its tasks and the nodes and says what to change: which tasks to create, on
//! which node (`schedule`), which to stop, and how a rolling update advances (`update`). The
//! agent feeds it from the store and writes its answer back, fenced on leadership; nothing
//! here knows about either, so every rule is a unit test.

pub mod duration;
pub mod plan;
pub mod schedule;
pub mod spec;
pub mod task;
mod update;

pub use plan::{Input, NodeInfo, Plan, ServiceState, TaskChange, plan};
pub use spec::{
    Constraint, HealthCheck, Mode, Mount, MountKind, RestartCondition, RestartPolicy, SecretRef,
    ServiceSpec, SpecError, TaskTemplate, UpdateConfig, UpdateFailureAction, UpdateOrder,
};
pub use task::{Desired, ShutdownReason, Task, TaskState, TaskStatus, UpdateState, UpdateStatus};
