//! `netctl service ...`.

mod flags;
mod logs;
mod progress;

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::Client;
use crate::{Format, as_array, print_inspect, seg, str_field, table};

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service: a VIP on each network, published ports on every node, and (with a
    /// command) its tasks: `service create --name web --replicas 3 --network N -- CMD ARGS`.
    Create {
        #[arg(long)]
        name: String,
        /// Network to join (repeatable): the service gets a VIP on each.
        #[arg(long = "network", required = true)]
        networks: Vec<String>,
        /// PUBLISHED:TARGET[/tcp|/udp] (repeatable): answered on every node's address.
        #[arg(short, long = "publish")]
        publish: Vec<String>,
        /// vip (default) or dnsrr (DNS returns the replicas, no VIP).
        #[arg(long)]
        endpoint_mode: Option<String>,
        /// Service label KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Return at once instead of showing the tasks start.
        #[arg(short, long)]
        detach: bool,
        #[command(flatten)]
        task: flags::CreateArgs,
        /// The tasks' command and arguments (after --). Without one, the service takes
        /// hand-made replicas only (`container run --service`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List services.
    #[command(alias = "list")]
    Ls,
    /// List a service's tasks, with the history of each slot.
    Ps {
        name: String,
        /// Show full task ids.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Show a service with its spec, VIPs, ports, backends and update status (JSON).
    Inspect { name: String },
    /// Remove services (their VIPs, ports, datapath entries and tasks).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Change a service: ports and labels at once; a new task template rolls out per the
    /// update settings.
    Update {
        /// PUBLISHED:TARGET[/proto] to add (repeatable).
        #[arg(long)]
        publish_add: Vec<String>,
        /// PUBLISHED[/proto] to remove (repeatable).
        #[arg(long)]
        publish_rm: Vec<String>,
        /// Service label KEY=VALUE to add (repeatable).
        #[arg(long)]
        label_add: Vec<String>,
        /// Service label KEY to remove (repeatable).
        #[arg(long)]
        label_rm: Vec<String>,
        /// Go back to the previous spec.
        #[arg(long)]
        rollback: bool,
        #[arg(short, long)]
        detach: bool,
        #[command(flatten)]
        change: flags::ChangeArgs,
        name: String,
    },
    /// Set the number of tasks: `service scale web=5 [api=2 ...]`.
    Scale {
        #[arg(required = true, value_name = "SERVICE=REPLICAS")]
        targets: Vec<String>,
        #[arg(short, long)]
        detach: bool,
    },
    /// Go back to the spec before the last update.
    Rollback {
        name: String,
        #[arg(short, long)]
        detach: bool,
    },
    /// Every task's output, each line prefixed with its task.
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Only tasks that should be running, not the history.
        #[arg(long)]
        current: bool,
    },
}

fn ports_text(s: &Value) -> String {
    as_array(&s["ports"])
        .iter()
        .map(|p| {
            format!(
                "*:{}->{}/{}",
                str_field(p, "published"),
                str_field(p, "target"),
                str_field(p, "protocol")
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn replicas_text(s: &Value) -> String {
    match s.get("replicas") {
        Some(r) if r.is_object() => format!("{}/{}", r["running"], r["desired"]),
        // Hand-made replicas only: how many back it.
        _ => format!("{} (by hand)", as_array(&s["backends"]).len()),
    }
}

/// After a change: show the tasks converge (or say why not), unless detached.
async fn settle(
    client: &Client,
    format: Format,
    name: &str,
    s: &Value,
    detach: bool,
) -> anyhow::Result<()> {
    for w in as_array(&s["warnings"]) {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
    match format {
        Format::Json => println!("{s}"),
        Format::Table => println!("{}", str_field(s, "name")),
    }
    if detach || s["spec"].is_null() {
        return Ok(());
    }
    progress::wait_converged(client, name, format == Format::Table).await
}

pub async fn run(client: &Client, format: Format, cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create {
            name,
            networks,
            publish,
            endpoint_mode,
            labels,
            detach,
            task,
            command,
        } => {
            let body = json!({
                "name": name, "networks": networks, "publish": publish,
                "endpoint_mode": endpoint_mode, "labels": labels,
                "task": task.json(&command),
            });
            let s = client.post("/v1/services", &body).await?;
            settle(client, format, &name, &s, detach).await?;
        }
        ServiceCmd::Ls => {
            let list = client.get("/v1/services").await?;
            match format {
                Format::Json => println!("{list}"),
                Format::Table => {
                    let rows = as_array(&list)
                        .iter()
                        .map(|s| {
                            let vips = as_array(&s["vips"])
                                .iter()
                                .map(|v| {
                                    format!("{}={}", str_field(v, "network"), str_field(v, "vip"))
                                })
                                .collect::<Vec<_>>()
                                .join(",");
                            vec![
                                str_field(s, "name"),
                                str_field(s, "mode"),
                                replicas_text(s),
                                str_field(s, "endpoint_mode"),
                                vips,
                                ports_text(s),
                            ]
                        })
                        .collect();
                    table::print(
                        &["NAME", "MODE", "REPLICAS", "ENDPOINT", "VIPS", "PORTS"],
                        rows,
                    );
                }
            }
        }
        ServiceCmd::Ps { name, no_trunc } => {
            let tasks = client
                .get(&format!("/v1/services/{}/tasks", seg(&name)))
                .await?;
            match format {
                Format::Json => println!("{tasks}"),
                Format::Table => progress::print_ps(&tasks, no_trunc),
            }
        }
        ServiceCmd::Inspect { name } => {
            let s = client.get(&format!("/v1/services/{}", seg(&name))).await?;
            print_inspect(format, vec![s])?;
        }
        ServiceCmd::Rm { names } => crate::remove_each(client, "/v1/services", &names).await?,
        ServiceCmd::Update {
            publish_add,
            publish_rm,
            label_add,
            label_rm,
            rollback,
            detach,
            change,
            name,
        } => {
            let body = json!({
                "publish_add": publish_add, "publish_rm": publish_rm,
                "label_add": label_add, "label_rm": label_rm,
                "rollback": rollback, "spec": change.json(),
            });
            let s = client
                .post(&format!("/v1/services/{}/update", seg(&name)), &body)
                .await?;
            settle(client, format, &name, &s, detach).await?;
        }
        ServiceCmd::Scale { targets, detach } => {
            let mut parsed = Vec::new();
            for t in &targets {
                let Some((name, n)) = t.split_once('=') else {
                    bail!("invalid scale target {t:?}: expected SERVICE=REPLICAS");
                };
                let n: u64 = n.parse().map_err(|_| {
                    anyhow::anyhow!("invalid scale target {t:?}: replicas must be a number >= 0")
                })?;
                parsed.push((name.to_string(), n));
            }
            for (name, n) in parsed {
                let body = json!({ "spec": { "replicas": n } });
                let s = client
                    .post(&format!("/v1/services/{}/update", seg(&name)), &body)
                    .await?;
                if format == Format::Table {
                    println!("{name} scaled to {n}");
                }
                if !detach {
                    progress::wait_converged(client, &name, format == Format::Table).await?;
                } else if format == Format::Json {
                    println!("{s}");
                }
            }
        }
        ServiceCmd::Rollback { name, detach } => {
            let s = client
                .post(&format!("/v1/services/{}/rollback", seg(&name)), &json!({}))
                .await?;
            settle(client, format, &name, &s, detach).await?;
        }
        ServiceCmd::Logs {
            name,
            follow,
            current,
        } => logs::run(client, &name, follow, current).await?,
    }
    Ok(())
}
