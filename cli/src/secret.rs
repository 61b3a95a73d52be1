//! `netctl secret ...`: values go in (from a file or stdin) and never come out.

use std::io::Read as _;

use anyhow::Context as _;
use base64::Engine as _;
use clap::Subcommand;
use serde_json::json;

use crate::client::Client;
use crate::{Format, as_array, str_field, table};

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Create a secret from a file, or from stdin with `-`.
    Create {
        name: String,
        file: String,
        /// KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// List secrets (names, sizes, never values).
    #[command(alias = "list")]
    Ls,
    /// Show secrets' metadata (JSON).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove secrets no service uses.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn run(client: &Client, format: Format, cmd: SecretCmd) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Create { name, file, labels } => {
            let mut data = Vec::new();
            if file == "-" {
                std::io::stdin()
                    .read_to_end(&mut data)
                    .context("reading the secret from stdin")?;
            } else {
                data = std::fs::read(&file).with_context(|| format!("reading {file}"))?;
            }
            let body = json!({
                "name": name,
                "data": base64::engine::general_purpose::STANDARD.encode(&data),
                "labels": labels,
            });
            let s = client.post("/v1/secrets", &body).await?;
            match format {
                Format::Json => println!("{s}"),
                Format::Table => println!("{}", str_field(&s, "id")),
            }
        }
        SecretCmd::Ls => {
            let list = client.get("/v1/secrets").await?;
            match format {
                Format::Json => println!("{list}"),
                Format::Table => {
                    let rows = as_array(&list)
                        .iter()
                        .map(|s| {
                            vec![
                                str_field(s, "id").chars().take(12).collect(),
                                str_field(s, "name"),
                                str_field(s, "size"),
                                str_field(s, "created"),
                            ]
                        })
                        .collect();
                    table::print(&["ID", "NAME", "SIZE", "CREATED"], rows);
                }
            }
        }
        SecretCmd::Inspect { names } => {
            crate::inspect_each(client, format, "/v1/secrets", &names).await?
        }
        SecretCmd::Rm { names } => crate::remove_each(client, "/v1/secrets", &names).await?,
    }
    Ok(())
}
