//! netctl: the operator's CLI. It only speaks to the agent's API; the agent validates.

mod client;
mod container;
mod monitor;
mod node;
mod secret;
mod service;
mod table;

use std::collections::BTreeMap;

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use client::Client;

#[derive(Debug, Parser)]
#[command(
    name = "netctl",
    version,
    about = "Manage overlay networks, services and nodes"
)]
struct Cli {
    /// Agent to talk to.
    #[arg(
        short = 'H',
        long = "host",
        env = "NETCTL_HOST",
        default_value = "unix:///run/netagent/netagent.sock",
        global = true
    )]
    host: String,
    /// Output format of ls and inspect.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage overlay networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Inspect nodes and change their availability and labels.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Run and manage containers (sandboxes) on the agent's node.
    #[command(subcommand)]
    Container(container::ContainerCmd),
    /// Manage services: virtual IPs, published ports, replicas.
    #[command(subcommand)]
    Service(Box<service::ServiceCmd>),
    /// Manage secrets for services' tasks (read at /run/secrets/NAME).
    #[command(subcommand)]
    Secret(secret::SecretCmd),
    /// Follow this node's datapath events (drops, with their reason), until Ctrl-C.
    Monitor(monitor::MonitorArgs),
}

#[derive(Debug, Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        /// Network driver (only "overlay").
        #[arg(short, long, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form, e.g. 10.10.1.0/24.
        #[arg(long)]
        subnet: String,
        /// Gateway address (default: the first address of the subnet).
        #[arg(long)]
        gateway: Option<String>,
        /// Driver options: `encrypted`, `mtu=N`.
        #[arg(short, long = "opt")]
        opt: Vec<String>,
        /// Allow standalone containers to attach.
        #[arg(long)]
        attachable: bool,
        /// No way out: containers reach only overlay networks, not the outside world.
        #[arg(long)]
        internal: bool,
        /// Metadata labels, K=V.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls,
    /// Show networks in detail (JSON).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove networks.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid label {s:?}: expected KEY=VALUE")),
    }
}

/// clap's usage errors in one line, like every other error of netctl: the first line of its
/// message (which names the flag or value), without the usage block.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("invalid arguments");
    let mut out = first.strip_prefix("error: ").unwrap_or(first).to_string();
    // "the following required arguments were not provided:" lists them below.
    if out.ends_with(':') {
        let items: Vec<&str> = lines
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        out.push(' ');
        out.push_str(&items.join(", "));
    }
    out
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("Error: {}", one_line(&e));
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    drop(runtime);
    match outcome {
        Ok(Outcome::Done) => std::process::ExitCode::SUCCESS,
        Ok(Outcome::Exit(code)) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Ok(Outcome::Exec(plan)) => match plan.run() {
            Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("Error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Err(e) => {
            // One line: the agent's message already names the problem.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let client = Client::new(&cli.host)?;
    match cli.command {
        Command::Network(cmd) => network(&client, cli.format, cmd)
            .await
            .map(|()| Outcome::Done),
        Command::Node(cmd) => node::run(&client, cli.format, cmd)
            .await
            .map(|()| Outcome::Done),
        Command::Secret(cmd) => secret::run(&client, cli.format, cmd)
            .await
            .map(|()| Outcome::Done),
        Command::Container(cmd) => container::run(&client, cli.format, cmd).await,
        Command::Monitor(args) => monitor::run(&client, cli.format, args)
            .await
            .map(|()| Outcome::Done),
        Command::Service(cmd) => service::run(&client, cli.format, *cmd)
            .await
            .map(|()| Outcome::Done),
    }
}

/// What main does after the runtime is gone: some commands end in another process's exit code.
pub enum Outcome {
    Done,
    Exit(i32),
    Exec(container::ExecPlan),
}

/// URL path segment for a user-supplied name. Names are validated by the agent; this only keeps
/// a stray '/' or '?' from changing which endpoint is called.
pub(crate) fn seg(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn network(client: &Client, format: Format, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            driver,
            subnet,
            gateway,
            opt,
            attachable,
            internal,
            labels,
            name,
        } => {
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let body = json!({
                "name": name,
                "driver": driver,
                "subnet": subnet,
                "gateway": gateway,
                "options": opt,
                "attachable": attachable,
                "internal": internal,
                "labels": labels,
            });
            let net = client.post("/v1/networks", &body).await?;
            match format {
                Format::Json => println!("{net}"),
                Format::Table => println!("{}", str_field(&net, "id")),
            }
        }
        NetworkCmd::Ls => {
            let nets = client.get("/v1/networks").await?;
            match format {
                Format::Json => println!("{nets}"),
                Format::Table => {
                    let rows = as_array(&nets)
                        .iter()
                        .map(|n| {
                            vec![
                                short_id(&str_field(n, "id")),
                                str_field(n, "name"),
                                str_field(n, "driver"),
                                str_field(n, "vni"),
                                str_field(n, "subnet"),
                                str_field(n, "gateway"),
                                yes_no(n, "encrypted"),
                                yes_no(n, "attachable"),
                                yes_no(n, "internal"),
                            ]
                        })
                        .collect();
                    table::print(
                        &[
                            "NETWORK ID",
                            "NAME",
                            "DRIVER",
                            "VNI",
                            "SUBNET",
                            "GATEWAY",
                            "ENCRYPTED",
                            "ATTACHABLE",
                            "INTERNAL",
                        ],
                        rows,
                    );
                }
            }
        }
        NetworkCmd::Inspect { names } => {
            inspect_each(client, format, "/v1/networks", &names).await?
        }
        NetworkCmd::Rm { names } => remove_each(client, "/v1/networks", &names).await?,
    }
    Ok(())
}

/// `inspect NAME...`: every object under `collection`, printed together; the first that
/// cannot be read is the error.
pub(crate) async fn inspect_each(
    client: &Client,
    format: Format,
    collection: &str,
    names: &[String],
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    for name in names {
        out.push(client.get(&format!("{collection}/{}", seg(name))).await?);
    }
    print_inspect(format, out)
}

/// `rm NAME...`: removes each one under `collection`, printing the names removed; goes on past
/// failures and reports them all in one line.
pub(crate) async fn remove_each(
    client: &Client,
    collection: &str,
    names: &[String],
) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for name in names {
        match client.delete(&format!("{collection}/{}", seg(name))).await {
            Ok(_) => println!("{name}"),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// One object prints as an object, several as an array; `--format json` is compact for scripts,
/// the default is indented for people.
pub(crate) fn print_inspect(format: Format, mut items: Vec<Value>) -> anyhow::Result<()> {
    let value = if items.len() == 1 {
        items.remove(0)
    } else {
        Value::Array(items)
    };
    match format {
        Format::Json => println!("{value}"),
        Format::Table => println!("{}", serde_json::to_string_pretty(&value)?),
    }
    Ok(())
}

pub(crate) fn as_array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

pub(crate) fn str_field(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn yes_no(v: &Value, key: &str) -> String {
    if v.get(key).and_then(Value::as_bool).unwrap_or(false) {
        "yes".into()
    } else {
        "no".into()
    }
}

fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_style_network_create() {
        let cli = Cli::try_parse_from([
            "netctl",
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "10.10.1.0/24",
            "--opt",
            "encrypted",
            "--label",
            "team=web",
            "services",
        ])
        .unwrap();
        match cli.command {
            Command::Network(NetworkCmd::Create {
                driver,
                subnet,
                opt,
                labels,
                name,
                ..
            }) => {
                assert_eq!(driver, "overlay");
                assert_eq!(subnet, "10.10.1.0/24");
                assert_eq!(opt, vec!["encrypted"]);
                assert_eq!(labels, vec![("team".into(), "web".into())]);
                assert_eq!(name, "services");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn host_and_format_are_global() {
        let cli = Cli::try_parse_from([
            "netctl",
            "network",
            "ls",
            "-H",
            "unix:///tmp/x.sock",
            "--format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.host, "unix:///tmp/x.sock");
        assert_eq!(cli.format, Format::Json);
    }

    #[test]
    fn rejects_bad_cli_input() {
        assert!(Cli::try_parse_from(["netctl", "network", "create", "services"]).is_err());
        assert!(Cli::try_parse_from(["netctl", "network", "rm"]).is_err());
        assert!(
            Cli::try_parse_from([
                "netctl",
                "network",
                "create",
                "--subnet",
                "10.0.0.0/24",
                "--label",
                "novalue",
                "x"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["netctl", "network", "ls", "--format", "yaml"]).is_err());
        assert!(Client::new("tcp://1.2.3.4:2375").is_err());
        assert!(Client::new("unix:///run/a.sock").is_ok());
        assert!(Client::new("unix://").is_err());
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(seg("services"), "services");
        assert_eq!(seg("a/b?c"), "a%2Fb%3Fc");
    }
}
