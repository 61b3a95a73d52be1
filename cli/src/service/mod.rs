//! `netctl service ...`.

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::Client;
use crate::{Format, as_array, print_inspect, seg, str_field, table};

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service: a VIP on each network, published ports on every node.
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
    },
    /// List services.
    #[command(alias = "list")]
    Ls,
    /// Show a service with its VIPs, ports and backends (JSON).
    Inspect { name: String },
    /// Remove services (their VIPs, ports and datapath entries).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Change published ports live.
    Update {
        /// PUBLISHED:TARGET[/proto] to add (repeatable).
        #[arg(long)]
        publish_add: Vec<String>,
        /// PUBLISHED[/proto] to remove (repeatable).
        #[arg(long)]
        publish_rm: Vec<String>,
        name: String,
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

pub async fn run(client: &Client, format: Format, cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create {
            name,
            networks,
            publish,
            endpoint_mode,
        } => {
            let body = json!({
                "name": name, "networks": networks, "publish": publish,
                "endpoint_mode": endpoint_mode,
            });
            let s = client.post("/v1/services", &body).await?;
            match format {
                Format::Json => println!("{s}"),
                Format::Table => println!("{}", str_field(&s, "id")),
            }
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
                                str_field(s, "endpoint_mode"),
                                as_array(&s["backends"]).len().to_string(),
                                vips,
                                ports_text(s),
                            ]
                        })
                        .collect();
                    table::print(&["NAME", "MODE", "REPLICAS", "VIPS", "PORTS"], rows);
                }
            }
        }
        ServiceCmd::Inspect { name } => {
            let s = client.get(&format!("/v1/services/{}", seg(&name))).await?;
            print_inspect(format, vec![s])?;
        }
        ServiceCmd::Rm { names } => {
            let mut failed = Vec::new();
            for name in &names {
                match client.delete(&format!("/v1/services/{}", seg(name))).await {
                    Ok(_) => println!("{name}"),
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            if !failed.is_empty() {
                bail!("{}", failed.join("; "));
            }
        }
        ServiceCmd::Update {
            publish_add,
            publish_rm,
            name,
        } => {
            if publish_add.is_empty() && publish_rm.is_empty() {
                bail!("nothing to update: give --publish-add or --publish-rm");
            }
            let s = client
                .post(
                    &format!("/v1/services/{}/update", seg(&name)),
                    &json!({ "publish_add": publish_add, "publish_rm": publish_rm }),
                )
                .await?;
            match format {
                Format::Json => println!("{s}"),
                Format::Table => println!("{name}"),
            }
        }
    }
    Ok(())
}
