//! From the flags a user gives (`service create`, `service update`) to a service spec.
//!
//! Everything is checked here, before the store is touched, and each error names the flag
//! that is wrong.

use std::collections::BTreeMap;

use netagent_orchestrator::{
    Constraint, HealthCheck, Mode, ServiceSpec, TaskTemplate, UpdateConfig, duration, spec,
};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

fn bad(msg: impl Into<String>) -> AgentError {
    AgentError::BadRequest(msg.into())
}

/// Removes every item `matches` picks; the error `missing` says why if there was none (an
/// `--x-rm` of something the service does not have is refused, not ignored).
fn remove_all<T>(
    items: &mut Vec<T>,
    matches: impl Fn(&T) -> bool,
    missing: impl FnOnce() -> String,
) -> Result<()> {
    let before = items.len();
    items.retain(|x| !matches(x));
    if items.len() == before {
        return Err(bad(missing()));
    }
    Ok(())
}

fn dur(flag: &str, v: &str) -> Result<u64> {
    duration::parse_ms(v).map_err(|e| bad(format!("--{flag}: {e}")))
}

fn spec_err(e: spec::SpecError) -> AgentError {
    bad(e.0)
}

/// `--health-*`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFlags {
    #[serde(default)]
    pub cmd: Option<String>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<u32>,
    /// `--no-healthcheck` (update: drop the check).
    #[serde(default)]
    pub none: bool,
}

impl HealthFlags {
    fn is_empty(&self) -> bool {
        self.cmd.is_none()
            && self.interval.is_none()
            && self.timeout.is_none()
            && self.retries.is_none()
            && !self.none
    }

    fn apply(&self, current: Option<HealthCheck>) -> Result<Option<HealthCheck>> {
        if self.none {
            if !self.is_empty_but_none() {
                return Err(bad(
                    "--no-healthcheck conflicts with the other --health-* flags",
                ));
            }
            return Ok(None);
        }
        // A new command keeps the interval, timeout and retries already set.
        let mut hc = match (current, &self.cmd) {
            (Some(hc), _) => hc,
            (None, Some(cmd)) => HealthCheck::new(cmd.clone()),
            (None, None) => {
                if self.is_empty() {
                    return Ok(None);
                }
                return Err(bad(
                    "--health-interval, --health-timeout and --health-retries need --health-cmd",
                ));
            }
        };
        if let Some(cmd) = &self.cmd {
            hc.cmd = cmd.clone();
        }
        if let Some(v) = &self.interval {
            hc.interval_ms = dur("health-interval", v)?;
        }
        if let Some(v) = &self.timeout {
            hc.timeout_ms = dur("health-timeout", v)?;
        }
        if let Some(r) = self.retries {
            hc.retries = r;
        }
        Ok(Some(hc))
    }

    fn is_empty_but_none(&self) -> bool {
        self.cmd.is_none()
            && self.interval.is_none()
            && self.timeout.is_none()
            && self.retries.is_none()
    }
}

/// `--restart-*`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartFlags {
    #[serde(default)]
    pub condition: Option<String>,
    #[serde(default)]
    pub delay: Option<String>,
    /// 0: no limit (Docker's meaning).
    #[serde(default)]
    pub max_attempts: Option<u64>,
}

/// `--update-*` or `--rollback-*`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateFlags {
    #[serde(default)]
    pub parallelism: Option<u64>,
    #[serde(default)]
    pub delay: Option<String>,
    #[serde(default)]
    pub order: Option<String>,
    #[serde(default)]
    pub failure_action: Option<String>,
    #[serde(default)]
    pub monitor: Option<String>,
}

impl UpdateFlags {
    fn apply(&self, which: &str, cfg: &mut UpdateConfig) -> Result<()> {
        if let Some(p) = self.parallelism {
            cfg.parallelism = p;
        }
        if let Some(v) = &self.delay {
            cfg.delay_ms = dur(&format!("{which}-delay"), v)?;
        }
        if let Some(v) = &self.order {
            cfg.order = v
                .parse()
                .map_err(|e: spec::SpecError| bad(format!("--{which}-order: {e}")))?;
        }
        if let Some(v) = &self.failure_action {
            cfg.failure_action = v
                .parse()
                .map_err(|e: spec::SpecError| bad(format!("--{which}-failure-action: {e}")))?;
        }
        if let Some(v) = &self.monitor {
            cfg.monitor_ms = dur(&format!("{which}-monitor"), v)?;
        }
        Ok(())
    }
}

/// The task-related flags of `service create`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFlags {
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub replicas: Option<u64>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub container_labels: Vec<String>,
    #[serde(default)]
    pub constraints: Vec<String>,
    #[serde(default)]
    pub mounts: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub health: HealthFlags,
    #[serde(default)]
    pub restart: RestartFlags,
    #[serde(default)]
    pub stop_grace_period: Option<String>,
    #[serde(default)]
    pub update: UpdateFlags,
    #[serde(default)]
    pub rollback: UpdateFlags,
}

impl TaskFlags {
    /// Any flag that only makes sense with a command.
    pub fn is_empty(&self) -> bool {
        self.command.is_empty()
            && self.mode.is_none()
            && self.replicas.is_none()
            && self.env.is_empty()
            && self.container_labels.is_empty()
            && self.constraints.is_empty()
            && self.mounts.is_empty()
            && self.secrets.is_empty()
            && self.hostname.is_none()
            && self.health.is_empty()
            && self.restart.condition.is_none()
            && self.restart.delay.is_none()
            && self.restart.max_attempts.is_none()
            && self.stop_grace_period.is_none()
    }
}

pub fn parse_labels(flag: &str, labels: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in labels {
        let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
        if k.is_empty() {
            return Err(bad(format!("invalid --{flag} {l:?}: expected KEY=VALUE")));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn apply_restart(flags: &RestartFlags, t: &mut TaskTemplate) -> Result<()> {
    if let Some(c) = &flags.condition {
        t.restart.condition = c.parse().map_err(spec_err)?;
    }
    if let Some(d) = &flags.delay {
        t.restart.delay_ms = dur("restart-delay", d)?;
    }
    if let Some(m) = flags.max_attempts {
        t.restart.max_attempts = (m > 0).then_some(m);
    }
    Ok(())
}

/// The spec `service create` asks for, or `None` for a VIP-only service (no command).
pub fn from_create(f: &TaskFlags) -> Result<Option<ServiceSpec>> {
    if f.command.is_empty() {
        if f.is_empty() {
            return Ok(None);
        }
        return Err(bad(
            "no command given: netctl service create ... -- CMD [ARGS...] (a service without \
             a command takes hand-made replicas only, and no task flags)",
        ));
    }
    let mode: Mode = f
        .mode
        .as_deref()
        .unwrap_or("replicated")
        .parse()
        .map_err(spec_err)?;
    if mode == Mode::Global && f.replicas.is_some() {
        return Err(bad("--replicas can only be used with replicated mode"));
    }
    let mut task = TaskTemplate {
        command: f.command.clone(),
        labels: parse_labels("container-label", &f.container_labels)?,
        hostname: f.hostname.clone(),
        ..Default::default()
    };
    for e in &f.env {
        spec::env_set(&mut task.env, e).map_err(spec_err)?;
    }
    for c in &f.constraints {
        task.constraints
            .push(Constraint::parse(c).map_err(spec_err)?);
    }
    for m in &f.mounts {
        task.mounts.push(spec::parse_mount(m).map_err(spec_err)?);
    }
    for s in &f.secrets {
        task.secrets.push(spec::parse_secret(s).map_err(spec_err)?);
    }
    task.health = f.health.apply(None)?;
    apply_restart(&f.restart, &mut task)?;
    if let Some(g) = &f.stop_grace_period {
        task.stop_grace_ms = dur("stop-grace-period", g)?;
    }
    let mut update = UpdateConfig::default();
    f.update.apply("update", &mut update)?;
    let mut rollback = UpdateConfig::default();
    f.rollback.apply("rollback", &mut rollback)?;
    let spec = ServiceSpec {
        mode,
        replicas: f.replicas.unwrap_or(1),
        task,
        update,
        rollback,
    };
    spec.validate().map_err(spec_err)?;
    Ok(Some(spec))
}

/// The spec-related flags of `service update`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecUpdate {
    /// `--args`: the whole command anew.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub replicas: Option<u64>,
    #[serde(default)]
    pub env_add: Vec<String>,
    #[serde(default)]
    pub env_rm: Vec<String>,
    #[serde(default)]
    pub container_label_add: Vec<String>,
    #[serde(default)]
    pub container_label_rm: Vec<String>,
    #[serde(default)]
    pub constraint_add: Vec<String>,
    #[serde(default)]
    pub constraint_rm: Vec<String>,
    #[serde(default)]
    pub mount_add: Vec<String>,
    /// By target path.
    #[serde(default)]
    pub mount_rm: Vec<String>,
    #[serde(default)]
    pub secret_add: Vec<String>,
    #[serde(default)]
    pub secret_rm: Vec<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub health: HealthFlags,
    #[serde(default)]
    pub restart: RestartFlags,
    #[serde(default)]
    pub stop_grace_period: Option<String>,
    #[serde(default)]
    pub update: UpdateFlags,
    #[serde(default)]
    pub rollback: UpdateFlags,
    /// Replace every task even though nothing changed.
    #[serde(default)]
    pub force: bool,
}

impl SpecUpdate {
    pub fn touches_spec(&self) -> bool {
        self.command.is_some()
            || self.replicas.is_some()
            || !self.env_add.is_empty()
            || !self.env_rm.is_empty()
            || !self.container_label_add.is_empty()
            || !self.container_label_rm.is_empty()
            || !self.constraint_add.is_empty()
            || !self.constraint_rm.is_empty()
            || !self.mount_add.is_empty()
            || !self.mount_rm.is_empty()
            || !self.secret_add.is_empty()
            || !self.secret_rm.is_empty()
            || self.hostname.is_some()
            || !self.health.is_empty()
            || self.restart.condition.is_some()
            || self.restart.delay.is_some()
            || self.restart.max_attempts.is_some()
            || self.stop_grace_period.is_some()
            || self.update.parallelism.is_some()
            || self.update.delay.is_some()
            || self.update.order.is_some()
            || self.update.failure_action.is_some()
            || self.update.monitor.is_some()
            || self.rollback.parallelism.is_some()
            || self.rollback.delay.is_some()
            || self.rollback.order.is_some()
            || self.rollback.failure_action.is_some()
            || self.rollback.monitor.is_some()
            || self.force
    }

    /// The spec after this update.
    pub fn apply(&self, service: &str, current: &ServiceSpec) -> Result<ServiceSpec> {
        let mut s = current.clone();
        if let Some(r) = self.replicas {
            if s.mode == Mode::Global {
                return Err(bad(format!(
                    "service {service:?} is global: scale can only be used with replicated mode"
                )));
            }
            s.replicas = r;
        }
        let t = &mut s.task;
        if let Some(c) = &self.command {
            t.command = c.clone();
        }
        for k in &self.env_rm {
            remove_all(
                &mut t.env,
                |e| e.split_once('=').map_or(e.as_str(), |(ek, _)| ek) == k,
                || format!("--env-rm {k:?}: the service sets no such variable"),
            )?;
        }
        for e in &self.env_add {
            spec::env_set(&mut t.env, e).map_err(spec_err)?;
        }
        for k in &self.container_label_rm {
            if t.labels.remove(k).is_none() {
                return Err(bad(format!("--container-label-rm {k:?}: no such label")));
            }
        }
        t.labels.extend(parse_labels(
            "container-label-add",
            &self.container_label_add,
        )?);
        for c in &self.constraint_rm {
            let c = Constraint::parse(c).map_err(spec_err)?;
            remove_all(
                &mut t.constraints,
                |x| *x == c,
                || format!("--constraint-rm {c}: the service has no such constraint"),
            )?;
        }
        for c in &self.constraint_add {
            let c = Constraint::parse(c).map_err(spec_err)?;
            if !t.constraints.contains(&c) {
                t.constraints.push(c);
            }
        }
        for target in &self.mount_rm {
            remove_all(
                &mut t.mounts,
                |m| m.target == *target,
                || format!("--mount-rm {target:?}: no mount at that target"),
            )?;
        }
        for m in &self.mount_add {
            let m = spec::parse_mount(m).map_err(spec_err)?;
            t.mounts.retain(|x| x.target != m.target);
            t.mounts.push(m);
        }
        for name in &self.secret_rm {
            remove_all(
                &mut t.secrets,
                |x| x.name == *name,
                || format!("--secret-rm {name:?}: the service does not use it"),
            )?;
        }
        for x in &self.secret_add {
            let x = spec::parse_secret(x).map_err(spec_err)?;
            t.secrets.retain(|y| y.target != x.target);
            t.secrets.push(x);
        }
        if let Some(h) = &self.hostname {
            t.hostname = (!h.is_empty()).then(|| h.clone());
        }
        t.health = self.health.apply(t.health.take())?;
        apply_restart(&self.restart, t)?;
        if let Some(g) = &self.stop_grace_period {
            t.stop_grace_ms = dur("stop-grace-period", g)?;
        }
        if self.force {
            t.force_update += 1;
        }
        self.update.apply("update", &mut s.update)?;
        self.rollback.apply("rollback", &mut s.rollback)?;
        s.validate().map_err(spec_err)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(cmd: &[&str]) -> TaskFlags {
        TaskFlags {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn create_defaults_and_errors() {
        assert!(from_create(&TaskFlags::default()).unwrap().is_none());
        let s = from_create(&create(&["sleep", "1"])).unwrap().unwrap();
        assert_eq!((s.mode, s.replicas), (Mode::Replicated, 1));
        let mut f = create(&[]);
        f.replicas = Some(2);
        assert!(
            from_create(&f)
                .unwrap_err()
                .to_string()
                .contains("no command")
        );
        let mut f = create(&["x"]);
        f.update.delay = Some("2".into());
        let e = from_create(&f).unwrap_err().to_string();
        assert!(e.starts_with("--update-delay:"), "{e}");
        let mut f = create(&["x"]);
        f.update.order = Some("sideways".into());
        assert!(
            from_create(&f)
                .unwrap_err()
                .to_string()
                .contains("--update-order")
        );
        let mut f = create(&["x"]);
        f.mode = Some("global".into());
        f.replicas = Some(2);
        assert!(from_create(&f).is_err());
        let mut f = create(&["x"]);
        f.health.interval = Some("1s".into());
        assert!(
            from_create(&f)
                .unwrap_err()
                .to_string()
                .contains("need --health-cmd")
        );
    }

    #[test]
    fn updates_change_only_what_they_name() {
        let mut f = create(&["python3", "-m", "http.server"]);
        f.env = vec!["A=1".into()];
        f.replicas = Some(3);
        let s = from_create(&f).unwrap().unwrap();
        let u = SpecUpdate {
            env_add: vec!["V=2".into()],
            update: UpdateFlags {
                parallelism: Some(1),
                delay: Some("2s".into()),
                order: Some("start-first".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let n = u.apply("web", &s).unwrap();
        assert_eq!(n.task.env, ["A=1", "V=2"]);
        assert_eq!(n.update.delay_ms, 2000);
        assert_eq!(n.replicas, 3);
        let forced = SpecUpdate {
            force: true,
            ..Default::default()
        }
        .apply("web", &n)
        .unwrap();
        assert_ne!(forced.task, n.task, "--force makes a new template");
        let e = SpecUpdate {
            env_rm: vec!["NOPE".into()],
            ..Default::default()
        }
        .apply("web", &n)
        .unwrap_err();
        assert!(e.to_string().contains("--env-rm"), "{e}");
        let mut g = n.clone();
        g.mode = Mode::Global;
        let e = SpecUpdate {
            replicas: Some(2),
            ..Default::default()
        }
        .apply("web", &g)
        .unwrap_err();
        assert!(e.to_string().contains("replicated mode"), "{e}");
    }
}
