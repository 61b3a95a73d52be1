//! The task flags of `service create` and `service update`, spelled as Docker spells them,
//! turned into the agent's request bodies. The agent validates them (durations, modes,
//! mounts); the CLI only carries them.

use clap::Args;
use serde_json::{Value, json};

#[derive(Debug, Clone, Default, Args)]
pub struct HealthArgs {
    /// Command run (with sh -c) inside the task to check its health.
    #[arg(long)]
    pub health_cmd: Option<String>,
    /// Time between health checks (e.g. 5s).
    #[arg(long)]
    pub health_interval: Option<String>,
    /// Longest a health check may run.
    #[arg(long)]
    pub health_timeout: Option<String>,
    /// Consecutive failures that make a task unhealthy.
    #[arg(long)]
    pub health_retries: Option<u32>,
    /// No health check.
    #[arg(long)]
    pub no_healthcheck: bool,
}

impl HealthArgs {
    fn json(&self) -> Value {
        json!({
            "cmd": self.health_cmd, "interval": self.health_interval,
            "timeout": self.health_timeout, "retries": self.health_retries,
            "none": self.no_healthcheck,
        })
    }
}

#[derive(Debug, Clone, Default, Args)]
pub struct RestartArgs {
    /// any, on-failure or none.
    #[arg(long)]
    pub restart_condition: Option<String>,
    /// Wait before a restart (e.g. 5s).
    #[arg(long)]
    pub restart_delay: Option<String>,
    /// Restarts before giving up (0: no limit).
    #[arg(long)]
    pub restart_max_attempts: Option<u64>,
}

impl RestartArgs {
    fn json(&self) -> Value {
        json!({
            "condition": self.restart_condition, "delay": self.restart_delay,
            "max_attempts": self.restart_max_attempts,
        })
    }
}

#[derive(Debug, Clone, Default, Args)]
pub struct UpdateArgs {
    /// Tasks updated at once (0: all).
    #[arg(long)]
    pub update_parallelism: Option<u64>,
    /// Wait between batches (e.g. 2s).
    #[arg(long)]
    pub update_delay: Option<String>,
    /// stop-first or start-first.
    #[arg(long)]
    pub update_order: Option<String>,
    /// pause, continue or rollback.
    #[arg(long)]
    pub update_failure_action: Option<String>,
    /// How long each new task is watched for failure (e.g. 5s).
    #[arg(long)]
    pub update_monitor: Option<String>,
    /// Tasks rolled back at once (0: all).
    #[arg(long)]
    pub rollback_parallelism: Option<u64>,
    #[arg(long)]
    pub rollback_delay: Option<String>,
    #[arg(long)]
    pub rollback_order: Option<String>,
    /// pause or continue.
    #[arg(long)]
    pub rollback_failure_action: Option<String>,
    #[arg(long)]
    pub rollback_monitor: Option<String>,
}

impl UpdateArgs {
    fn update(&self) -> Value {
        json!({
            "parallelism": self.update_parallelism, "delay": self.update_delay,
            "order": self.update_order, "failure_action": self.update_failure_action,
            "monitor": self.update_monitor,
        })
    }

    fn rollback(&self) -> Value {
        json!({
            "parallelism": self.rollback_parallelism, "delay": self.rollback_delay,
            "order": self.rollback_order, "failure_action": self.rollback_failure_action,
            "monitor": self.rollback_monitor,
        })
    }
}

/// `service create`'s task flags.
#[derive(Debug, Clone, Default, Args)]
pub struct CreateArgs {
    /// replicated (default) or global.
    #[arg(long)]
    pub mode: Option<String>,
    /// Number of tasks (replicated mode; default 1).
    #[arg(long)]
    pub replicas: Option<u64>,
    /// KEY=VALUE in the tasks' environment (repeatable).
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// KEY=VALUE on the tasks (repeatable).
    #[arg(long = "container-label")]
    pub container_labels: Vec<String>,
    /// Placement: node.name==N, node.labels.K==V, or != (repeatable).
    #[arg(long = "constraint")]
    pub constraints: Vec<String>,
    /// type=bind,source=/a,target=/b[,readonly] or type=tmpfs,target=/x (repeatable).
    #[arg(long = "mount")]
    pub mounts: Vec<String>,
    /// NAME or source=NAME,target=FILE,mode=0400: at /run/secrets/FILE (repeatable).
    #[arg(long = "secret")]
    pub secrets: Vec<String>,
    /// The tasks' hostname (default: the task's name, e.g. web.1).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Time between SIGTERM and SIGKILL when a task is stopped (default 10s).
    #[arg(long)]
    pub stop_grace_period: Option<String>,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub restart: RestartArgs,
    #[command(flatten)]
    pub update: UpdateArgs,
}

impl CreateArgs {
    pub fn json(&self, command: &[String]) -> Value {
        json!({
            "command": command, "mode": self.mode, "replicas": self.replicas,
            "env": self.env, "container_labels": self.container_labels,
            "constraints": self.constraints, "mounts": self.mounts, "secrets": self.secrets,
            "hostname": self.hostname, "stop_grace_period": self.stop_grace_period,
            "health": self.health.json(), "restart": self.restart.json(),
            "update": self.update.update(), "rollback": self.update.rollback(),
        })
    }
}

/// `service update`'s task flags.
#[derive(Debug, Clone, Default, Args)]
pub struct ChangeArgs {
    /// Number of tasks.
    #[arg(long)]
    pub replicas: Option<u64>,
    /// The command and its arguments anew (one string, split on spaces).
    #[arg(long)]
    pub args: Option<String>,
    #[arg(long)]
    pub env_add: Vec<String>,
    #[arg(long)]
    pub env_rm: Vec<String>,
    #[arg(long)]
    pub container_label_add: Vec<String>,
    #[arg(long)]
    pub container_label_rm: Vec<String>,
    #[arg(long)]
    pub constraint_add: Vec<String>,
    #[arg(long)]
    pub constraint_rm: Vec<String>,
    #[arg(long)]
    pub mount_add: Vec<String>,
    /// By target path.
    #[arg(long)]
    pub mount_rm: Vec<String>,
    #[arg(long)]
    pub secret_add: Vec<String>,
    #[arg(long)]
    pub secret_rm: Vec<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    #[arg(long)]
    pub stop_grace_period: Option<String>,
    /// Replace every task even if nothing changed.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub restart: RestartArgs,
    #[command(flatten)]
    pub update: UpdateArgs,
}

impl ChangeArgs {
    pub fn json(&self) -> Value {
        let command = self
            .args
            .as_ref()
            .map(|a| a.split_whitespace().map(str::to_string).collect::<Vec<_>>());
        json!({
            "command": command, "replicas": self.replicas,
            "env_add": self.env_add, "env_rm": self.env_rm,
            "container_label_add": self.container_label_add,
            "container_label_rm": self.container_label_rm,
            "constraint_add": self.constraint_add, "constraint_rm": self.constraint_rm,
            "mount_add": self.mount_add, "mount_rm": self.mount_rm,
            "secret_add": self.secret_add, "secret_rm": self.secret_rm,
            "hostname": self.hostname, "stop_grace_period": self.stop_grace_period,
            "force": self.force,
            "health": self.health.json(), "restart": self.restart.json(),
            "update": self.update.update(), "rollback": self.update.rollback(),
        })
    }
}
