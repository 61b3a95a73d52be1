//! What a service asks to run: the task template and how to roll it out.
//!
//! Field names and defaults follow Docker's (`docker service create`): restart on any exit
//! after 5 s, stop grace 10 s, updates one task at a time, stop-first, pausing on failure,
//! watched for 5 s each.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The largest replica count accepted: more is a typo, not a plan.
pub const MAX_REPLICAS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `replicas` tasks, spread over the nodes.
    #[default]
    Replicated,
    /// One task on every eligible node.
    Global,
}

impl std::str::FromStr for Mode {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "replicated" => Ok(Mode::Replicated),
            "global" => Ok(Mode::Global),
            other => err(format!(
                "invalid --mode {other:?}: expected replicated or global"
            )),
        }
    }
}

/// What a service runs and how. Changing `task` rolls out new tasks; the rest does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub mode: Mode,
    /// Tasks wanted in replicated mode (ignored in global mode).
    pub replicas: u64,
    pub task: TaskTemplate,
    pub update: UpdateConfig,
    pub rollback: UpdateConfig,
}

/// What each task runs. Tasks keep the template they were made from, so a running task never
/// changes under a rolling update: it is replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTemplate {
    pub command: Vec<String>,
    /// `KEY=VALUE`, in the order given.
    #[serde(default)]
    pub env: Vec<String>,
    /// Container labels (`--container-label`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub secrets: Vec<SecretRef>,
    /// Default: the task's name (`web.1`).
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub health: Option<HealthCheck>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default = "default_stop_grace")]
    pub stop_grace_ms: u64,
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Bumped by `update --force`: a different template, so every task is replaced.
    #[serde(default)]
    pub force_update: u64,
}

fn default_stop_grace() -> u64 {
    10_000
}

impl Default for TaskTemplate {
    fn default() -> Self {
        Self {
            command: Vec::new(),
            env: Vec::new(),
            labels: BTreeMap::new(),
            mounts: Vec::new(),
            secrets: Vec::new(),
            hostname: None,
            health: None,
            restart: RestartPolicy::default(),
            stop_grace_ms: default_stop_grace(),
            constraints: Vec::new(),
            force_update: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub kind: MountKind,
    /// Absolute path inside the task's mount namespace.
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum MountKind {
    Bind {
        source: String,
        readonly: bool,
    },
    Tmpfs {
        size: Option<u64>,
        mode: Option<u32>,
    },
}

/// A secret made available at `/run/secrets/<target>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    pub name: String,
    pub target: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Run with `sh -c` inside the task's namespaces; exit 0 means healthy.
    pub cmd: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures that make the task unhealthy.
    pub retries: u32,
}

impl HealthCheck {
    pub fn new(cmd: String) -> Self {
        // Docker's defaults.
        Self {
            cmd,
            interval_ms: 30_000,
            timeout_ms: 30_000,
            retries: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    #[default]
    Any,
    OnFailure,
    None,
}

impl std::str::FromStr for RestartCondition {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "any" => Ok(Self::Any),
            "on-failure" => Ok(Self::OnFailure),
            "none" => Ok(Self::None),
            other => err(format!(
                "invalid --restart-condition {other:?}: expected any, on-failure or none"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub condition: RestartCondition,
    pub delay_ms: u64,
    /// Restarts of a slot before giving up; `None`: no limit (Docker's 0).
    pub max_attempts: Option<u64>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            condition: RestartCondition::Any,
            delay_ms: 5_000,
            max_attempts: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    #[default]
    StopFirst,
    StartFirst,
}

impl std::str::FromStr for UpdateOrder {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "stop-first" => Ok(Self::StopFirst),
            "start-first" => Ok(Self::StartFirst),
            other => err(format!(
                "invalid update order {other:?}: expected stop-first or start-first"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpdateFailureAction {
    #[default]
    Pause,
    Continue,
    Rollback,
}

impl std::str::FromStr for UpdateFailureAction {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "pause" => Ok(Self::Pause),
            "continue" => Ok(Self::Continue),
            "rollback" => Ok(Self::Rollback),
            other => err(format!(
                "invalid failure action {other:?}: expected pause, continue or rollback"
            )),
        }
    }
}

/// How tasks are replaced when the template changes (`--update-*`, `--rollback-*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Tasks replaced at once; 0: all of them.
    pub parallelism: u64,
    /// Wait between batches.
    pub delay_ms: u64,
    pub order: UpdateOrder,
    pub failure_action: UpdateFailureAction,
    /// How long each new task is watched for failure.
    pub monitor_ms: u64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            parallelism: 1,
            delay_ms: 0,
            order: UpdateOrder::StopFirst,
            failure_action: UpdateFailureAction::Pause,
            monitor_ms: 5_000,
        }
    }
}

/// A placement constraint: `node.name==n1`, `node.labels.zone!=b`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    pub field: ConstraintField,
    pub equal: bool,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConstraintField {
    /// `node.name` (also `node.hostname`: a node is named after its host).
    Name,
    /// `node.labels.<key>`.
    Label(String),
}

impl Constraint {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let (lhs, equal, rhs) = if let Some((l, r)) = s.split_once("==") {
            (l, true, r)
        } else if let Some((l, r)) = s.split_once("!=") {
            (l, false, r)
        } else {
            return err(format!(
                "invalid constraint {s:?}: expected FIELD==VALUE or FIELD!=VALUE"
            ));
        };
        let (lhs, rhs) = (lhs.trim(), rhs.trim());
        let field = match lhs {
            "node.name" | "node.hostname" => ConstraintField::Name,
            l => match l.strip_prefix("node.labels.") {
                Some(k) if !k.is_empty() => ConstraintField::Label(k.to_string()),
                _ => {
                    return err(format!(
                        "invalid constraint {s:?}: unknown field {lhs:?} (use node.name, \
                         node.hostname or node.labels.KEY)"
                    ));
                }
            },
        };
        if rhs.is_empty() {
            return err(format!("invalid constraint {s:?}: empty value"));
        }
        Ok(Self {
            field,
            equal,
            value: rhs.to_string(),
        })
    }

    /// Whether a node with this name and labels satisfies the constraint.
    pub fn matches(&self, node: &str, labels: &BTreeMap<String, String>) -> bool {
        let actual = match &self.field {
            ConstraintField::Name => Some(node),
            ConstraintField::Label(k) => labels.get(k).map(String::as_str),
        };
        (actual == Some(self.value.as_str())) == self.equal
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = match &self.field {
            ConstraintField::Name => "node.name".to_string(),
            ConstraintField::Label(k) => format!("node.labels.{k}"),
        };
        let op = if self.equal { "==" } else { "!=" };
        write!(f, "{field}{op}{}", self.value)
    }
}

/// `KEY=VALUE` (or `KEY`, which Docker reads from the client's environment: refused here,
/// the agent's environment is not the user's).
pub fn parse_env(s: &str) -> Result<(String, String), SpecError> {
    match s.split_once('=') {
        Some((k, v)) if valid_env_key(k) && !v.contains('\0') => Ok((k.into(), v.into())),
        Some((k, _)) if !valid_env_key(k) => err(format!("invalid --env {s:?}: bad name {k:?}")),
        _ => err(format!("invalid --env {s:?}: expected KEY=VALUE")),
    }
}

fn valid_env_key(k: &str) -> bool {
    !k.is_empty() && !k.contains('\0') && !k.contains('=')
}

/// Sets `KEY=VALUE` in `env`, replacing an earlier value of the key.
pub fn env_set(env: &mut Vec<String>, entry: &str) -> Result<(), SpecError> {
    let (k, _) = parse_env(entry)?;
    env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
    env.push(entry.to_string());
    Ok(())
}

/// Parses `--mount type=bind,source=/a,target=/b[,readonly]` or
/// `--mount type=tmpfs,target=/x[,tmpfs-size=BYTES][,tmpfs-mode=OCTAL]`.
pub fn parse_mount(s: &str) -> Result<Mount, SpecError> {
    let mut kind = None;
    let (mut source, mut target, mut readonly) = (None, None, false);
    let (mut size, mut mode) = (None, None);
    for part in s.split(',') {
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (part.trim(), None),
        };
        match (k, v) {
            ("type", Some(t)) => kind = Some(t.to_string()),
            ("source" | "src", Some(v)) => source = Some(v.to_string()),
            ("target" | "destination" | "dst", Some(v)) => target = Some(v.to_string()),
            ("readonly" | "ro", None) => readonly = true,
            ("readonly" | "ro", Some("true" | "1")) => readonly = true,
            ("readonly" | "ro", Some("false" | "0")) => readonly = false,
            ("tmpfs-size", Some(v)) => {
                size = Some(parse_size(v).ok_or_else(|| {
                    SpecError(format!("invalid --mount {s:?}: bad tmpfs-size {v:?}"))
                })?)
            }
            ("tmpfs-mode", Some(v)) => {
                mode = Some(u32::from_str_radix(v, 8).map_err(|_| {
                    SpecError(format!("invalid --mount {s:?}: bad tmpfs-mode {v:?}"))
                })?)
            }
            _ => return err(format!("invalid --mount {s:?}: unknown option {part:?}")),
        }
    }
    let Some(target) = target else {
        return err(format!("invalid --mount {s:?}: target is missing"));
    };
    check_abs(s, "target", &target)?;
    let kind = match kind.as_deref() {
        Some("bind") | None => {
            let Some(source) = source else {
                return err(format!("invalid --mount {s:?}: source is missing"));
            };
            check_abs(s, "source", &source)?;
            if size.is_some() || mode.is_some() {
                return err(format!(
                    "invalid --mount {s:?}: tmpfs options on a bind mount"
                ));
            }
            MountKind::Bind { source, readonly }
        }
        Some("tmpfs") => {
            if source.is_some() {
                return err(format!("invalid --mount {s:?}: a tmpfs has no source"));
            }
            MountKind::Tmpfs { size, mode }
        }
        Some(other) => {
            return err(format!(
                "invalid --mount {s:?}: type {other:?} (expected bind or tmpfs)"
            ));
        }
    };
    Ok(Mount { kind, target })
}

fn check_abs(spec: &str, what: &str, path: &str) -> Result<(), SpecError> {
    if !path.starts_with('/') || path.contains('\0') || path.split('/').any(|c| c == "..") {
        return err(format!(
            "invalid --mount {spec:?}: {what} {path:?} must be an absolute path without '..'"
        ));
    }
    Ok(())
}

/// `1048576`, `64k`, `16m`, `1g`.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.to_ascii_lowercase();
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// `--secret NAME` or `--secret source=NAME,target=FILE,mode=0400`.
pub fn parse_secret(s: &str) -> Result<SecretRef, SpecError> {
    if !s.contains('=') {
        return Ok(SecretRef {
            name: s.to_string(),
            target: s.to_string(),
            mode: 0o400,
        });
    }
    let (mut name, mut target, mut mode) = (None, None, 0o400);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("source" | "src", v)) => name = Some(v.to_string()),
            Some(("target", v)) => target = Some(v.to_string()),
            Some(("mode", v)) => {
                mode = u32::from_str_radix(v, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| SpecError(format!("invalid --secret {s:?}: bad mode {v:?}")))?
            }
            _ => return err(format!("invalid --secret {s:?}: unknown option {part:?}")),
        }
    }
    let Some(name) = name else {
        return err(format!("invalid --secret {s:?}: source is missing"));
    };
    let target = target.unwrap_or_else(|| name.clone());
    Ok(SecretRef { name, target, mode })
}

impl ServiceSpec {
    /// Checks what needs no store: counts, durations, names.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.mode == Mode::Replicated && self.replicas > MAX_REPLICAS {
            return err(format!(
                "--replicas {} is more than {MAX_REPLICAS}",
                self.replicas
            ));
        }
        self.task.validate()?;
        for (what, u) in [("update", &self.update), ("rollback", &self.rollback)] {
            if u.parallelism > MAX_REPLICAS {
                return err(format!(
                    "--{what}-parallelism {} is more than {MAX_REPLICAS}",
                    u.parallelism
                ));
            }
        }
        if self.rollback.failure_action == UpdateFailureAction::Rollback {
            return err("--rollback-failure-action must be pause or continue");
        }
        Ok(())
    }
}

impl TaskTemplate {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return err("no command given: netctl service create ... -- CMD [ARGS...]");
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return err("the command contains a NUL byte");
        }
        for e in &self.env {
            parse_env(e)?;
        }
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 64
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
            if !ok {
                return err(format!(
                    "invalid --hostname {h:?}: use up to 64 letters, digits, '-', '.' and '_'"
                ));
            }
        }
        if let Some(hc) = &self.health {
            if hc.cmd.trim().is_empty() || hc.cmd.contains('\0') {
                return err("--health-cmd is empty");
            }
            if hc.interval_ms == 0 {
                return err("--health-interval must be more than 0");
            }
            if hc.timeout_ms == 0 {
                return err("--health-timeout must be more than 0");
            }
            if hc.retries == 0 {
                return err("--health-retries must be at least 1");
            }
        }
        let mut targets = std::collections::BTreeSet::new();
        for m in &self.mounts {
            if !targets.insert(m.target.as_str()) {
                return err(format!("mount target {:?} given twice", m.target));
            }
            if m.target == "/" || m.target.starts_with("/run/secrets") {
                return err(format!(
                    "mount target {:?} is not allowed (/ and /run/secrets are the task's own)",
                    m.target
                ));
            }
        }
        let mut files = std::collections::BTreeSet::new();
        for s in &self.secrets {
            let ok = !s.target.is_empty()
                && s.target.len() <= 255
                && !s.target.contains('/')
                && s.target != "."
                && s.target != ".."
                && !s.target.contains('\0');
            if !ok {
                return err(format!(
                    "invalid secret target {:?}: a file name under /run/secrets",
                    s.target
                ));
            }
            if !files.insert(s.target.as_str()) {
                return err(format!("secret target {:?} given twice", s.target));
            }
        }
        Ok(())
    }

    /// Whether a node with this name and labels may run tasks of this template.
    pub fn allows(&self, node: &str, labels: &BTreeMap<String, String>) -> bool {
        self.constraints.iter().all(|c| c.matches(node, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints() {
        let c = Constraint::parse("node.name==n1").unwrap();
        let none = BTreeMap::new();
        assert!(c.matches("n1", &none) && !c.matches("n2", &none));
        let c = Constraint::parse("node.labels.zone != b").unwrap();
        let b: BTreeMap<_, _> = [("zone".to_string(), "b".to_string())].into();
        assert!(!c.matches("n1", &b) && c.matches("n1", &none));
        assert_eq!(c.to_string(), "node.labels.zone!=b");
        assert!(Constraint::parse("node.role==manager").is_err());
        assert!(Constraint::parse("node.name=n1").is_err());
        assert!(Constraint::parse("node.name==").is_err());
    }

    #[test]
    fn mounts_and_secrets() {
        assert_eq!(
            parse_mount("type=bind,source=/srv/data,target=/data,readonly").unwrap(),
            Mount {
                kind: MountKind::Bind {
                    source: "/srv/data".into(),
                    readonly: true
                },
                target: "/data".into()
            }
        );
        assert_eq!(
            parse_mount("type=tmpfs,target=/cache,tmpfs-size=16m").unwrap(),
            Mount {
                kind: MountKind::Tmpfs {
                    size: Some(16 << 20),
                    mode: None
                },
                target: "/cache".into()
            }
        );
        for bad in [
            "type=bind,target=/x",
            "type=bind,source=rel,target=/x",
            "type=volume,source=/a,target=/x",
            "type=tmpfs,source=/a,target=/x",
            "type=bind,source=/a,target=/../x",
            "type=bind,source=/a,target=/x,bogus=1",
        ] {
            assert!(parse_mount(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            parse_secret("db_pass").unwrap(),
            SecretRef {
                name: "db_pass".into(),
                target: "db_pass".into(),
                mode: 0o400
            }
        );
        let s = parse_secret("source=db,target=password,mode=0440").unwrap();
        assert_eq!((s.target.as_str(), s.mode), ("password", 0o440));
        assert!(parse_secret("target=x").is_err());
    }

    #[test]
    fn env() {
        let mut env = vec!["A=1".to_string(), "B=2".to_string()];
        env_set(&mut env, "A=3").unwrap();
        assert_eq!(env, ["B=2", "A=3"]);
        assert!(env_set(&mut env, "NOVALUE").is_err());
        assert!(env_set(&mut env, "=x").is_err());
    }

    #[test]
    fn validation() {
        let mut spec = ServiceSpec {
            mode: Mode::Replicated,
            replicas: 3,
            task: TaskTemplate {
                command: vec!["sleep".into(), "10".into()],
                ..Default::default()
            },
            update: UpdateConfig::default(),
            rollback: UpdateConfig::default(),
        };
        spec.validate().unwrap();
        spec.replicas = MAX_REPLICAS + 1;
        assert!(spec.validate().unwrap_err().0.contains("more than"));
        spec.replicas = 1;
        spec.task.command.clear();
        assert!(spec.validate().unwrap_err().0.contains("no command"));
        spec.task.command = vec!["x".into()];
        spec.task.health = Some(HealthCheck {
            retries: 0,
            ..HealthCheck::new("true".into())
        });
        assert!(spec.validate().is_err());
        spec.task.health = None;
        spec.task.secrets = vec![parse_secret("source=a,target=../x").unwrap()];
        assert!(spec.validate().is_err());
    }

    #[test]
    fn defaults_follow_docker() {
        let t: TaskTemplate = serde_json::from_str(r#"{"command":["x"]}"#).unwrap();
        assert_eq!(t.stop_grace_ms, 10_000);
        assert_eq!(TaskTemplate::default().stop_grace_ms, 10_000);
        assert_eq!(t.restart, RestartPolicy::default());
        assert_eq!(t.restart.delay_ms, 5_000);
        let u = UpdateConfig::default();
        assert_eq!(
            (u.parallelism, u.order, u.failure_action, u.monitor_ms),
            (1, UpdateOrder::StopFirst, UpdateFailureAction::Pause, 5_000)
        );
    }
}
