//! `netctl container ...`.
//!
//! `exec` does not go through the agent: netctl runs on the container's node (it talks to that
//! node's socket), so it joins the container's namespaces itself, the way `nsenter` does, and
//! the command's terminal, pipes and exit code are the user's own.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::Client;
use crate::{Format, Outcome, as_array, print_inspect, seg, str_field, table};

#[derive(Debug, Subcommand)]
pub enum ContainerCmd {
    /// Run a command in a new container on the agent's node.
    Run {
        #[arg(long)]
        name: Option<String>,
        /// Network to join (repeat for several: one interface each).
        #[arg(long = "network", required = true)]
        networks: Vec<String>,
        /// Address on the (single) network; default: the next free one.
        #[arg(long)]
        ip: Option<String>,
        /// Extra DNS name of the container on its networks.
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// Make the container a replica of this service.
        #[arg(long)]
        service: Option<String>,
        /// Run in the background and print the container's name.
        #[arg(short, long)]
        detach: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List containers of the whole cluster.
    #[command(alias = "list")]
    Ls,
    /// Show a container in detail (JSON).
    Inspect { name: String },
    /// Run a command inside a running container of this node.
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop and remove containers.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn run(client: &Client, format: Format, cmd: ContainerCmd) -> anyhow::Result<Outcome> {
    match cmd {
        ContainerCmd::Run {
            name,
            networks,
            ip,
            aliases,
            service,
            detach,
            command,
        } => {
            let body = json!({
                "name": name, "networks": networks, "ip": ip,
                "aliases": aliases, "service": service, "command": command,
            });
            let c = client.post("/v1/containers", &body).await?;
            let name = str_field(&c, "name");
            if detach {
                match format {
                    Format::Json => println!("{c}"),
                    Format::Table => println!("{name}"),
                }
                return Ok(Outcome::Done);
            }
            let code = wait(client, &name).await?;
            print_logs(client, &name).await?;
            match code {
                Some(code) => Ok(Outcome::Exit(code)),
                None => bail!(
                    "container {name:?} ended but its exit status is unknown (the agent was \
                     restarted while it ran)"
                ),
            }
        }
        ContainerCmd::Ls => {
            let list = client.get("/v1/containers").await?;
            match format {
                Format::Json => println!("{list}"),
                Format::Table => {
                    let rows = as_array(&list)
                        .iter()
                        .map(|c| {
                            let eps = as_array(&c["endpoints"])
                                .iter()
                                .map(|e| {
                                    format!("{}={}", str_field(e, "network"), str_field(e, "ip"))
                                })
                                .collect::<Vec<_>>()
                                .join(",");
                            let cmd = as_array(&c["command"])
                                .iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(" ");
                            vec![
                                str_field(c, "name"),
                                str_field(c, "node"),
                                str_field(c, "state"),
                                eps,
                                cmd,
                            ]
                        })
                        .collect();
                    table::print(&["NAME", "NODE", "STATE", "NETWORKS", "COMMAND"], rows);
                }
            }
            Ok(Outcome::Done)
        }
        ContainerCmd::Inspect { name } => {
            let c = client
                .get(&format!("/v1/containers/{}", seg(&name)))
                .await?;
            print_inspect(format, vec![c])?;
            Ok(Outcome::Done)
        }
        ContainerCmd::Exec { name, command } => {
            let c = client
                .get(&format!("/v1/containers/{}", seg(&name)))
                .await?;
            let ping = client.get("/v1/ping").await?;
            let node = str_field(&c, "node");
            if node != str_field(&ping, "node") {
                bail!(
                    "container {name:?} runs on node {node:?}; use -H to talk to that node's agent"
                );
            }
            if str_field(&c, "state") != "running" {
                bail!("container {name:?} is not running");
            }
            let pid = c["pid"].as_u64().context("container has no process")?;
            Ok(Outcome::Exec(ExecPlan {
                pid: pid as u32,
                command,
            }))
        }
        ContainerCmd::Rm { names } => {
            crate::remove_each(client, "/v1/containers", &names).await?;
            Ok(Outcome::Done)
        }
    }
}

/// Waits for a foreground container to end; the agent answers in bounded slices. `None`: it
/// ended but nobody knows how (never taken as success).
async fn wait(client: &Client, name: &str) -> anyhow::Result<Option<i32>> {
    loop {
        let r = client
            .post(
                &format!("/v1/containers/{}/wait", seg(name)),
                &json!({ "timeout_secs": 10 }),
            )
            .await?;
        if r["state"] != "running" {
            return Ok(r["exit_code"].as_i64().map(|c| c as i32));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Prints a container's whole log, reading it in bounded chunks.
pub async fn print_logs(client: &Client, name: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut offset = 0u64;
    loop {
        let chunk = client
            .get(&format!(
                "/v1/containers/{}/logs?offset={offset}",
                seg(name)
            ))
            .await?;
        let text = chunk["log"].as_str().unwrap_or_default();
        std::io::stdout().write_all(text.as_bytes())?;
        let next = chunk["next"].as_u64().unwrap_or(offset);
        let end = chunk["end"].as_u64().unwrap_or(next);
        if next >= end || next == offset {
            return Ok(());
        }
        offset = next;
    }
}

/// Joins a container's network and mount namespaces in a child and runs a command there.
pub struct ExecPlan {
    pid: u32,
    command: Vec<String>,
}

impl ExecPlan {
    pub fn run(self) -> anyhow::Result<i32> {
        let open = |kind: &str| -> anyhow::Result<OwnedFd> {
            let path = format!("/proc/{}/ns/{kind}", self.pid);
            let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            Ok(f.into())
        };
        let net = open("net")?;
        let mnt = open("mnt")?;
        let (net_fd, mnt_fd) = (net.as_raw_fd(), mnt.as_raw_fd());
        let mut cmd = std::process::Command::new(&self.command[0]);
        cmd.args(&self.command[1..]);
        // SAFETY: between fork and exec only async-signal-safe syscalls run (setns, chdir), on
        // fds opened before the fork. The child is single-threaded, which setns(CLONE_NEWNS)
        // requires.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(net_fd, libc::CLONE_NEWNET) != 0
                    || libc::setns(mnt_fd, libc::CLONE_NEWNS) != 0
                    || libc::chdir(c"/".as_ptr()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let status = cmd
            .status()
            .with_context(|| format!("running {:?} in the container", self.command[0]))?;
        drop((net, mnt));
        Ok(status
            .code()
            .unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
    }
}
