//! `service ps` and the progress shown while a service converges (Docker's
//! "overall progress" lines), and when to stop waiting.

use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use crate::client::Client;
use crate::{as_array, seg, str_field, table};

const POLL: Duration = Duration::from_millis(500);

fn ago(secs: u64) -> String {
    match secs {
        0..=1 => "1 second ago".into(),
        2..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        _ => format!("{} hours ago", secs / 3600),
    }
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

pub fn print_ps(tasks: &Value, no_trunc: bool) {
    let rows = as_array(tasks)
        .iter()
        .map(|t| {
            let id = str_field(t, "id");
            let id = if no_trunc {
                id
            } else {
                id.chars().take(12).collect()
            };
            let name = if t["history"].as_bool().unwrap_or(false) {
                format!(" \\_ {}", str_field(t, "name"))
            } else {
                str_field(t, "name")
            };
            let mut error = match t.get("error") {
                Some(Value::String(e)) => e.clone(),
                _ => String::new(),
            };
            if let Some(r) = t["reason"].as_str()
                && error.is_empty()
                && str_field(t, "desired") == "shutdown"
            {
                error = r.to_string();
            }
            vec![
                id,
                name,
                str_field(t, "node"),
                capital(&str_field(t, "desired")),
                format!(
                    "{} {}",
                    capital(&str_field(t, "state")),
                    ago(t["since_secs_ago"].as_u64().unwrap_or(0))
                ),
                error,
            ]
        })
        .collect();
    table::print(
        &[
            "ID",
            "NAME",
            "NODE",
            "DESIRED STATE",
            "CURRENT STATE",
            "ERROR",
        ],
        rows,
    );
}

/// What a service's state says about waiting for it.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Waiting,
    Converged,
    Failed(String),
}

fn verdict(s: &Value, tasks: &Value) -> Verdict {
    let status = &s["update_status"];
    let state = status["state"].as_str().unwrap_or("");
    let message = str_field(status, "message");
    match state {
        "paused" | "rollback_paused" => return Verdict::Failed(message),
        "updating" | "rollback_started" => return Verdict::Waiting,
        _ => {}
    }
    let r = &s["replicas"];
    let (running, desired) = (r["running"].as_u64(), r["desired"].as_u64());
    let current: Vec<&Value> = as_array(tasks)
        .iter()
        .filter(|t| !t["history"].as_bool().unwrap_or(true))
        .collect();
    let all_running = current.iter().all(|t| t["state"] == "running");
    if running.is_some()
        && running == desired
        && all_running
        && current.len() as u64 == desired.unwrap_or(0)
    {
        if state == "rollback_completed" && message.starts_with("update rolled back") {
            return Verdict::Failed(message);
        }
        return Verdict::Converged;
    }
    Verdict::Waiting
}

/// Polls the service until its tasks run as specified, printing progress when `show`.
pub async fn wait_converged(client: &Client, name: &str, show: bool) -> anyhow::Result<()> {
    let mut last = String::new();
    loop {
        let s = client.get(&format!("/v1/services/{}", seg(name))).await?;
        let tasks = client
            .get(&format!("/v1/services/{}/tasks", seg(name)))
            .await?;
        let v = verdict(&s, &tasks);
        if show {
            let r = &s["replicas"];
            let mut text = format!(
                "overall progress: {} out of {} tasks\n",
                r["running"], r["desired"]
            );
            for t in as_array(&tasks)
                .iter()
                .filter(|t| !t["history"].as_bool().unwrap_or(true))
            {
                let mut line = format!("{}: {}", str_field(t, "name"), str_field(t, "state"));
                if let Some(e) = t["error"].as_str() {
                    line.push_str(&format!(" ({e})"));
                }
                text.push_str(&line);
                text.push('\n');
            }
            if text != last {
                print!("{text}");
                last = text;
            }
        }
        match v {
            Verdict::Converged => {
                if show {
                    println!("verify: Service {name} converged");
                }
                return Ok(());
            }
            Verdict::Failed(msg) => bail!("service {name}: {msg}"),
            Verdict::Waiting => tokio::time::sleep(POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn verdicts() {
        let tasks =
            json!([{"state": "running", "history": false}, {"state": "failed", "history": true}]);
        let s = json!({"replicas": {"running": 1, "desired": 1}, "update_status": null});
        assert_eq!(verdict(&s, &tasks), Verdict::Converged);
        let s = json!({"replicas": {"running": 1, "desired": 2}});
        assert_eq!(verdict(&s, &tasks), Verdict::Waiting);
        let s = json!({"replicas": {"running": 1, "desired": 1},
            "update_status": {"state": "paused", "message": "update paused due to x"}});
        assert_eq!(
            verdict(&s, &tasks),
            Verdict::Failed("update paused due to x".into())
        );
        let s = json!({"replicas": {"running": 1, "desired": 1},
            "update_status": {"state": "rollback_completed", "message": "update rolled back due to y"}});
        assert!(matches!(verdict(&s, &tasks), Verdict::Failed(_)));
        let s = json!({"replicas": {"running": 1, "desired": 1},
            "update_status": {"state": "rollback_completed", "message": "rollback completed"}});
        assert_eq!(verdict(&s, &tasks), Verdict::Converged);
    }
}
