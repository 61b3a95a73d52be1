//! `netctl node ...`.

use clap::Subcommand;
use serde_json::json;

use crate::client::Client;
use crate::{Format, as_array, print_inspect, seg, str_field, table};

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    #[command(alias = "list")]
    Ls,
    /// Show a node in detail (JSON).
    Inspect { name: String },
    /// Change a node's availability (active, drain) and labels.
    Update {
        /// active or drain (drain moves its tasks elsewhere).
        #[arg(long)]
        availability: Option<String>,
        /// KEY=VALUE (repeatable), for node.labels.KEY constraints.
        #[arg(long)]
        label_add: Vec<String>,
        /// KEY (repeatable).
        #[arg(long)]
        label_rm: Vec<String>,
        name: String,
    },
    /// Give this node (the agent netctl talks to) a new WireGuard key; peers switch over
    /// without interrupting traffic.
    RotateKey,
    /// Forget nodes that are down and run nothing (their peers and routes go everywhere).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn run(client: &Client, format: Format, cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Ls => {
            let nodes = client.get("/v1/nodes").await?;
            match format {
                Format::Json => println!("{nodes}"),
                Format::Table => {
                    let rows = as_array(&nodes)
                        .iter()
                        .map(|n| {
                            let labels = n["labels"]
                                .as_object()
                                .map(|m| {
                                    m.iter()
                                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                                        .collect::<Vec<_>>()
                                        .join(",")
                                })
                                .unwrap_or_default();
                            let leader = if n["leader"] == true { "leader" } else { "" };
                            vec![
                                str_field(n, "name"),
                                str_field(n, "address"),
                                str_field(n, "status"),
                                str_field(n, "availability"),
                                leader.to_string(),
                                labels,
                            ]
                        })
                        .collect();
                    table::print(
                        &[
                            "NAME",
                            "ADDRESS",
                            "STATUS",
                            "AVAILABILITY",
                            "ORCHESTRATOR",
                            "LABELS",
                        ],
                        rows,
                    );
                }
            }
        }
        NodeCmd::Inspect { name } => {
            let n = client.get(&format!("/v1/nodes/{}", seg(&name))).await?;
            print_inspect(format, vec![n])?;
        }
        NodeCmd::Rm { names } => {
            for name in &names {
                client.delete(&format!("/v1/nodes/{}", seg(name))).await?;
                println!("{name}");
            }
        }
        NodeCmd::RotateKey => {
            let ping = client.get("/v1/ping").await?;
            let name = str_field(&ping, "node");
            let r = client
                .post(&format!("/v1/nodes/{}/rotate-key", seg(&name)), &json!({}))
                .await?;
            match format {
                Format::Json => println!("{r}"),
                Format::Table => println!("{name} {}", str_field(&r, "public_key")),
            }
        }
        NodeCmd::Update {
            availability,
            label_add,
            label_rm,
            name,
        } => {
            let n = client
                .post(
                    &format!("/v1/nodes/{}/update", seg(&name)),
                    &json!({
                        "availability": availability,
                        "label_add": label_add,
                        "label_rm": label_rm,
                    }),
                )
                .await?;
            match format {
                Format::Json => println!("{n}"),
                Format::Table => println!("{name}"),
            }
        }
    }
    Ok(())
}
