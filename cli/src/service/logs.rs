//! `service logs`: every task's output, read through the agent netctl talks to (which asks
//! the task's own node), each line prefixed with the task's name and id like Docker does.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::client::Client;
use crate::{as_array, seg, str_field};

const FOLLOW_POLL: Duration = Duration::from_millis(500);

pub async fn run(
    client: &Client,
    name: &str,
    follow: bool,
    current_only: bool,
) -> anyhow::Result<()> {
    // Per task: read offset and the partial line not yet printed.
    let mut offsets: BTreeMap<String, (u64, String, String)> = BTreeMap::new();
    loop {
        let tasks = client
            .get(&format!("/v1/services/{}/tasks", seg(name)))
            .await?;
        for t in as_array(&tasks) {
            if current_only && t["history"].as_bool().unwrap_or(false) {
                continue;
            }
            if t["node"].is_null() {
                continue;
            }
            let id = str_field(t, "id");
            let prefix = format!(
                "{}.{}@{}",
                str_field(t, "name"),
                id.chars().take(12).collect::<String>(),
                str_field(t, "node")
            );
            let entry = offsets
                .entry(id.clone())
                .or_insert((0, String::new(), prefix.clone()));
            loop {
                let chunk = match client
                    .get(&format!("/v1/tasks/{}/logs?offset={}", seg(&id), entry.0))
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{prefix}: cannot read the log: {e:#}");
                        break;
                    }
                };
                print_lines(&prefix, &chunk, &mut entry.1);
                let (next, end) = (
                    chunk["next"].as_u64().unwrap_or(0),
                    chunk["end"].as_u64().unwrap_or(0),
                );
                entry.0 = next;
                if next >= end {
                    break;
                }
            }
        }
        if !follow {
            for (_, rest, prefix) in offsets.values() {
                if !rest.is_empty() {
                    println!("{prefix}    | {rest}");
                }
            }
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

fn print_lines(prefix: &str, chunk: &Value, partial: &mut String) {
    partial.push_str(chunk["log"].as_str().unwrap_or_default());
    while let Some(i) = partial.find('\n') {
        let line: String = partial.drain(..=i).collect();
        println!("{prefix}    | {}", line.trim_end_matches('\n'));
    }
}
